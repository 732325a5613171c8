//! GPT-2's pre-tokenizer: the pattern
//!
//! ```text
//! 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//! ```
//!
//! written out by hand. Every character falls in exactly one of four classes: letter (`\p{L}`), number
//! (`\p{N}`), whitespace (`\s`, the White_Space property) or other. At each position the alternatives are tried
//! in order, which comes down to:
//!
//! 1. `'` followed by `s`, `t`, `m`, `d`, `re`, `ve` or `ll` (lower case only, no word boundary): that contraction.
//! 2. A letter, number or other character, optionally preceded by one U+0020 space: the space (if any) and the
//!    longest run of characters of that same class.
//! 3. Whitespace: the maximal run of whitespace `i..k`. `\s+(?!\S)` backtracks until the next character is not
//!    a non-space, so if the run reaches the end of the text it is taken whole; if it is followed by a
//!    non-space and has two or more characters, all but its last character are taken (the last one, typically
//!    the space in front of a word, starts the next piece); a single whitespace character before a non-space
//!    fails the look-ahead and is taken alone by the final `\s+`.

use super::unicode_tables::{LETTER, NUMBER, WHITESPACE};

/// The class of a character under the pattern.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Class {
    Letter,
    Number,
    Space,
    Other,
}

/// Classes of the 128 ASCII characters.
const ASCII_CLASS: [Class; 128] = build_ascii_classes();

const fn build_ascii_classes() -> [Class; 128] {
    let mut t = [Class::Other; 128];
    let mut b = 0usize;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if matches!(c, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ') {
            Class::Space
        } else {
            Class::Other
        };
        b += 1;
    }
    t
}

fn in_ranges(ranges: &[(u32, u32)], cp: u32) -> bool {
    // Ranges are sorted and disjoint: find the last range starting at or before `cp`.
    let idx = ranges.partition_point(|&(lo, _)| lo <= cp);
    idx > 0 && cp <= ranges[idx - 1].1
}

/// The class of code point `cp`.
#[inline]
pub(crate) fn class_of(cp: u32) -> Class {
    if cp < 128 {
        ASCII_CLASS[cp as usize]
    } else if in_ranges(LETTER, cp) {
        Class::Letter
    } else if in_ranges(NUMBER, cp) {
        Class::Number
    } else if in_ranges(WHITESPACE, cp) {
        Class::Space
    } else {
        Class::Other
    }
}

/// Decodes the character starting at byte `i` of valid UTF-8 `s`: (code point, length in bytes).
#[inline]
fn char_at(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

/// The class and byte length of the character at byte `i`.
#[inline]
fn class_at(s: &[u8], i: usize) -> (Class, usize) {
    let b = s[i];
    if b < 0x80 {
        (ASCII_CLASS[b as usize], 1)
    } else {
        let (cp, len) = char_at(s, i);
        (class_of(cp), len)
    }
}

/// End (exclusive byte index) of the run of `class` characters starting at byte `i`.
#[inline]
fn run_end(s: &[u8], mut i: usize, class: Class) -> usize {
    while i < s.len() {
        let (c, len) = class_at(s, i);
        if c != class {
            break;
        }
        i += len;
    }
    i
}

/// Length of a contraction (`'s`, `'t`, `'m`, `'d`, `'re`, `'ve`, `'ll`) starting at byte `i`, or 0.
#[inline]
fn contraction_len(s: &[u8], i: usize) -> usize {
    if s[i] != b'\'' || i + 1 >= s.len() {
        return 0;
    }
    match s[i + 1] {
        b's' | b't' | b'm' | b'd' => 2,
        b'r' if s.get(i + 2) == Some(&b'e') => 3,
        b'v' if s.get(i + 2) == Some(&b'e') => 3,
        b'l' if s.get(i + 2) == Some(&b'l') => 3,
        _ => 0,
    }
}

/// End (exclusive byte index) of the piece starting at byte `i < s.len()`.
#[inline]
fn piece_end(s: &[u8], i: usize) -> usize {
    let n = contraction_len(s, i);
    if n > 0 {
        return i + n;
    }
    let (class, len) = class_at(s, i);
    match class {
        Class::Letter | Class::Number | Class::Other => run_end(s, i + len, class),
        Class::Space => {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a space in front of a non-space.
            if s[i] == b' ' && i + 1 < s.len() {
                let (next, next_len) = class_at(s, i + 1);
                if next != Class::Space {
                    return run_end(s, i + 1 + next_len, next);
                }
            }
            // `\s+(?!\S)` then `\s+`: scan the run, remembering where its last character starts.
            let mut last = i;
            let mut j = i + len;
            while j < s.len() {
                let (c, l) = class_at(s, j);
                if c != Class::Space {
                    break;
                }
                last = j;
                j += l;
            }
            if j == s.len() || last == i {
                j
            } else {
                last
            }
        }
    }
}

/// Iterator over the pieces of a text, as sub-slices in order; their concatenation is the text.
pub struct Pieces<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let s = self.text.as_bytes();
        if self.pos >= s.len() {
            return None;
        }
        let start = self.pos;
        let end = piece_end(s, start);
        self.pos = end;
        // Pieces end on character boundaries by construction.
        Some(&self.text[start..end])
    }
}

/// Splits `text` into GPT-2 pre-tokenization pieces.
pub fn pieces(text: &str) -> Pieces<'_> {
    Pieces { text, pos: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        pieces(s).collect()
    }

    #[test]
    fn lookahead_gives_last_space_to_the_word() {
        assert_eq!(split("a   b"), ["a", "  ", " b"]);
        assert_eq!(split("a b"), ["a", " b"]);
        assert_eq!(split("a  "), ["a", "  "]);
        assert_eq!(split("a\t\tb"), ["a", "\t", "\t", "b"]);
        assert_eq!(split("a \nb"), ["a", " ", "\n", "b"]);
        assert_eq!(split("\n\n\nx"), ["\n\n", "\n", "x"]);
        assert_eq!(split("x\r\ny"), ["x", "\r", "\n", "y"]);
    }

    #[test]
    fn contractions_and_classes() {
        assert_eq!(split("I'm it's"), ["I", "'m", " it", "'s"]);
        assert_eq!(split("IT'S"), ["IT", "'", "S"]);
        assert_eq!(split("'sand"), ["'s", "and"]);
        assert_eq!(split("it’s"), ["it", "’", "s"]);
        assert_eq!(split("abc123 !!x"), ["abc", "123", " !!", "x"]);
        assert_eq!(split(" 's"), [" '", "s"]);
        assert_eq!(split(""), Vec::<&str>::new());
    }
}
