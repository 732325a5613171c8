//! The encode cache: piece → ids, shared by all threads behind a `RwLock`.
//!
//! Most pieces are short (a word with its leading space), so a piece of at most [`SHORT`] bytes is stored
//! inline in the table key and its ids (when there are at most [`INLINE_IDS`]) inline in the value: a lookup
//! touches one table slot and no other heap memory. Longer pieces (up to [`MAX_CACHED_PIECE`] bytes) go to a
//! second map keyed by boxed strings. The cache stops growing at [`CACHE_CAPACITY`] entries: later pieces are
//! merged on every call, with the same result.

use super::bpe::{FxBuild, FxHashMap};

/// Pieces up to this many bytes have inline keys (at most 23: see [`ShortKey`]).
pub(crate) const SHORT: usize = 23;
/// Up to this many ids are stored inline.
const INLINE_IDS: usize = 4;
/// Pieces longer than this many bytes are not cached (they are rare, and costly to keep).
pub(crate) const MAX_CACHED_PIECE: usize = 64;
/// The cache stops growing at this many pieces.
pub(crate) const CACHE_CAPACITY: usize = 1 << 16;

/// A piece of at most [`SHORT`] bytes: its bytes little-endian in three words, zero-padded, with the length in
/// the top byte of the last word (always free, as the piece has at most 23 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShortKey {
    words: [u64; 3],
}

impl std::hash::Hash for ShortKey {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.words[0]);
        state.write_u64(self.words[1]);
        state.write_u64(self.words[2]);
    }
}

impl ShortKey {
    #[inline]
    pub(crate) fn new(piece: &[u8]) -> Option<Self> {
        let n = piece.len();
        if n > SHORT {
            return None;
        }
        let mut words = [0u64; 3];
        let mut chunks = piece.chunks_exact(8);
        for (w, c) in words.iter_mut().zip(&mut chunks) {
            *w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        }
        let tail = chunks.remainder();
        let mut t = 0u64;
        for (k, &b) in tail.iter().enumerate() {
            t |= (b as u64) << (8 * k);
        }
        words[n / 8] |= t;
        words[2] |= (n as u64) << 56;
        Some(ShortKey { words })
    }
}

/// The ids of a cached piece.
enum Ids {
    Inline(u8, [u32; INLINE_IDS]),
    Heap(Box<[u32]>),
}

impl Ids {
    fn new(ids: &[u32]) -> Self {
        if ids.len() <= INLINE_IDS {
            let mut a = [0u32; INLINE_IDS];
            a[..ids.len()].copy_from_slice(ids);
            Ids::Inline(ids.len() as u8, a)
        } else {
            Ids::Heap(ids.into())
        }
    }

    #[inline]
    fn as_slice(&self) -> &[u32] {
        match self {
            Ids::Inline(n, a) => &a[..*n as usize],
            Ids::Heap(b) => b,
        }
    }
}

/// Piece → ids.
pub(crate) struct PieceCache {
    short: FxHashMap<ShortKey, Ids>,
    long: FxHashMap<Box<[u8]>, Box<[u32]>>,
}

impl PieceCache {
    pub(crate) fn new() -> Self {
        PieceCache {
            short: FxHashMap::with_capacity_and_hasher(4096, FxBuild::default()),
            long: FxHashMap::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// The ids of `piece`, if cached; `key` is `ShortKey::new(piece)`.
    #[inline]
    pub(crate) fn get(&self, piece: &[u8], key: Option<&ShortKey>) -> Option<&[u32]> {
        match key {
            Some(k) => self.short.get(k).map(Ids::as_slice),
            None => self.long.get(piece).map(|b| &b[..]),
        }
    }

    /// Remembers the ids of `piece` (at most [`MAX_CACHED_PIECE`] bytes) unless the cache is full.
    pub(crate) fn insert(&mut self, piece: &[u8], ids: &[u32]) {
        if self.len() >= CACHE_CAPACITY || piece.len() > MAX_CACHED_PIECE {
            return;
        }
        match ShortKey::new(piece) {
            Some(k) => {
                self.short.entry(k).or_insert_with(|| Ids::new(ids));
            }
            None => {
                self.long.entry(piece.into()).or_insert_with(|| ids.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_distinct_per_piece() {
        let pieces: [&[u8]; 9] = [
            b"",
            b"\0",
            b"\0\0",
            b"a",
            b"a\0",
            b"abcdefgh",
            b"abcdefgh\0",
            b"abcdefghijklmnopqrstuvw",
            b"abcdefghijklmnopqrstuv",
        ];
        for (i, a) in pieces.iter().enumerate() {
            for (j, b) in pieces.iter().enumerate() {
                assert_eq!(ShortKey::new(a) == ShortKey::new(b), i == j, "{a:?} {b:?}");
            }
        }
        assert!(ShortKey::new(&[b'x'; 24]).is_none());
        let mut c = PieceCache::new();
        c.insert(b"ab", &[1, 2]);
        c.insert(b"ab\0", &[3]);
        c.insert(&[b'y'; 30], &[4, 5, 6, 7, 8, 9]);
        assert_eq!(
            c.get(b"ab", ShortKey::new(b"ab").as_ref()),
            Some(&[1, 2][..])
        );
        assert_eq!(
            c.get(b"ab\0", ShortKey::new(b"ab\0").as_ref()),
            Some(&[3][..])
        );
        assert_eq!(c.get(&[b'y'; 30], None), Some(&[4, 5, 6, 7, 8, 9][..]));
        assert_eq!(c.get(b"a", ShortKey::new(b"a").as_ref()), None);
    }
}
