//! GPT-2's byte ↔ unicode table.
//!
//! Byte-level BPE works on bytes, but GPT-2's `vocab.json` and `merges.txt` spell every token as a string of
//! printable characters: each byte `b` stands for one character `U(b)`. The 188 bytes that are already printable
//! Latin-1 (`'!'..='~'`, `'¡'..='¬'`, `'®'..='ÿ'`) stand for themselves; the other 68 (controls, space, DEL,
//! NBSP, soft hyphen, ...) are given the code points 256, 257, ... in increasing byte order, so a space is `Ġ`
//! (U+0120) and a newline is `Ċ` (U+010A).

/// `true` for the bytes that stand for themselves.
const fn is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// `BYTE_TO_CHAR[b]` is the code point that spells byte `b` in the vocabulary files.
pub const BYTE_TO_CHAR: [char; 256] = build_byte_to_char();

const fn build_byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    let mut b = 0usize;
    while b < 256 {
        let cp = if is_printable(b as u8) {
            b as u32
        } else {
            let cp = next;
            next += 1;
            cp
        };
        // The table only holds code points below 324, all valid scalar values.
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
}

/// `CHAR_TO_BYTE[cp]` is the byte spelled by code point `cp < 324`, or -1 for code points that spell none.
const CHAR_TO_BYTE: [i16; 324] = build_char_to_byte();

const fn build_char_to_byte() -> [i16; 324] {
    let mut table = [-1i16; 324];
    let mut b = 0usize;
    while b < 256 {
        table[BYTE_TO_CHAR[b] as usize] = b as i16;
        b += 1;
    }
    table
}

/// The byte a vocabulary character stands for, or `None` for a character outside the table.
pub fn char_to_byte(c: char) -> Option<u8> {
    match CHAR_TO_BYTE.get(c as usize) {
        Some(&b) if b >= 0 => Some(b as u8),
        _ => None,
    }
}

/// Appends the bytes a vocabulary string stands for to `out`. Characters outside the table (which GPT-2's
/// files do not contain) stand for their own UTF-8 bytes.
pub fn push_vocab_string_bytes(s: &str, out: &mut Vec<u8>) {
    for c in s.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// The bytes a vocabulary string stands for (see [`push_vocab_string_bytes`]).
pub fn vocab_string_to_bytes(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    push_vocab_string_bytes(s, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_a_bijection_with_known_points() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[b'!' as usize], '!');
        assert_eq!(BYTE_TO_CHAR[0xAD], '\u{0143}');
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[b as usize];
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('\u{0144}'), None);
        assert_eq!(char_to_byte('€'), None);
    }
}
