//! The encode cache: piece → ids, shared by all threads behind a `RwLock`.
//!
//! Most pieces are short (a word with its leading space), so a piece of at most [`SHORT`] bytes is stored
//! inline in the table key and its ids (when there are at most [`INLINE_IDS`]) inline in the value: a lookup
//! touches one table slot and no other heap memory. Longer pieces (up to [`MAX_CACHED_PIECE`] bytes) go to a
//! second map keyed by boxed strings. The cache stops growing at [`CACHE_CAPACITY`] entries: later pieces are
//! merged on every call, with the same result.

use super::bpe::{FxBuild, FxHashMap};

/// Pieces up to this many bytes have inline keys.
pub(crate) const SHORT: usize = 23;
/// Up to this many ids are stored inline.
const INLINE_IDS: usize = 4;
/// Pieces longer than this many bytes are not cached (they are rare, and costly to keep).
pub(crate) const MAX_CACHED_PIECE: usize = 64;
/// The cache stops growing at this many pieces.
pub(crate) const CACHE_CAPACITY: usize = 1 << 16;

/// A piece of at most [`SHORT`] bytes, zero-padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ShortKey {
    len: u8,
    bytes: [u8; SHORT],
}

impl ShortKey {
    #[inline]
    pub(crate) fn new(piece: &[u8]) -> Option<Self> {
        if piece.len() > SHORT {
            return None;
        }
        let mut bytes = [0u8; SHORT];
        bytes[..piece.len()].copy_from_slice(piece);
        Some(ShortKey {
            len: piece.len() as u8,
            bytes,
        })
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
