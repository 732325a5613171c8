//! Byte-pair merges applied by rank.
//!
//! A piece starts as one symbol per byte. Repeatedly, among all adjacent symbol pairs that have a merge, the
//! pair with the lowest rank (the earliest line of `merges.txt`) is merged, the leftmost one when the same pair
//! occurs several times; this stops when no adjacent pair has a merge. The symbols are kept in a linked list
//! and the candidate pairs in a min-heap keyed by `(rank, position)`, so a piece of `n` bytes costs
//! `O(n log n)`; heap entries made stale by an earlier merge are recognised and skipped when popped. Short
//! pieces (nearly all) use a simpler in-place loop without allocation that gives the same result.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A small multiplicative hasher for integer and short string keys (the keys are not attacker-chosen in a way
/// that matters here: a collision only costs time).
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;
pub(crate) type FxHashMap<K, V> = HashMap<K, V, FxBuild>;

/// The merge table: `(left id, right id)` → `(rank, merged id)`.
pub(crate) struct Merges {
    map: FxHashMap<u64, (u32, u32)>,
}

#[inline]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl Merges {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Merges {
            map: FxHashMap::with_capacity_and_hasher(n, FxBuild::default()),
        }
    }

    /// Adds a merge; a pair listed twice keeps its later line, as in the reference.
    pub(crate) fn insert(&mut self, a: u32, b: u32, rank: u32, merged: u32) {
        self.map.insert(key(a, b), (rank, merged));
    }

    #[inline]
    pub(crate) fn get(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.map.get(&key(a, b)).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// A candidate merge of the symbol at `pos` with its right neighbour.
#[derive(PartialEq, Eq)]
struct Candidate {
    rank: u32,
    pos: u32,
    merged: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the lowest rank, then the leftmost position, must compare greatest.
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

const NONE: u32 = u32::MAX;

/// Pieces of up to this many bytes use [`merge_short`], longer ones [`merge_long`].
const SHORT_PIECE: usize = 64;

/// Applies the merges to the symbol ids `syms` (one per byte at first; used as scratch) and appends the result
/// to `out`. `ranks` is scratch space.
pub(crate) fn merge_word(
    merges: &Merges,
    syms: &mut Vec<u32>,
    ranks: &mut Vec<(u32, u32)>,
    out: &mut Vec<u32>,
) {
    let n = syms.len();
    if n <= 1 {
        out.extend_from_slice(syms);
    } else if n == 2 {
        match merges.get(syms[0], syms[1]) {
            Some((_, m)) => out.push(m),
            None => out.extend_from_slice(syms),
        }
    } else if n <= SHORT_PIECE {
        merge_short(merges, syms, ranks);
        out.extend_from_slice(syms);
    } else {
        merge_long(merges, syms, out);
    }
}

/// Short pieces: `ranks[i]` holds the `(rank, merged id)` of the pair `(syms[i], syms[i + 1])` (rank `NONE`
/// without a rule). Each step scans `ranks` for the lowest rank (the first one on ties), merges that pair in
/// place and looks up only the two pairs that changed: `O(n)` hash lookups and `O(n²)` integer compares, with
/// no allocation.
fn merge_short(merges: &Merges, syms: &mut Vec<u32>, ranks: &mut Vec<(u32, u32)>) {
    let pair = |a: u32, b: u32| merges.get(a, b).unwrap_or((NONE, 0));
    ranks.clear();
    ranks.extend(syms.windows(2).map(|w| pair(w[0], w[1])));
    loop {
        let mut best = NONE;
        let mut at = 0usize;
        for (i, &(rank, _)) in ranks.iter().enumerate() {
            if rank < best {
                best = rank;
                at = i;
            }
        }
        if best == NONE {
            return;
        }
        syms[at] = ranks[at].1;
        syms.remove(at + 1);
        ranks.remove(at);
        if at > 0 {
            ranks[at - 1] = pair(syms[at - 1], syms[at]);
        }
        if at + 1 < syms.len() {
            ranks[at] = pair(syms[at], syms[at + 1]);
        }
    }
}

/// Long pieces: the linked list and heap described at the top of this file.
fn merge_long(merges: &Merges, syms: &[u32], out: &mut Vec<u32>) {
    let n = syms.len();
    // Linked list over the original positions: id, and prev/next live positions (NONE at the ends).
    let mut id: Vec<u32> = syms.to_vec();
    let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
    let mut next: Vec<u32> = (1..=n as u32).collect();
    prev[0] = NONE;
    next[n - 1] = NONE;
    let mut alive = vec![true; n];

    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        if let Some((rank, merged)) = merges.get(id[i], id[i + 1]) {
            heap.push(Candidate {
                rank,
                pos: i as u32,
                merged,
            });
        }
    }
    while let Some(c) = heap.pop() {
        let p = c.pos as usize;
        if !alive[p] || next[p] == NONE {
            continue;
        }
        let q = next[p] as usize;
        // Stale if either side changed since the candidate was pushed.
        match merges.get(id[p], id[q]) {
            Some((rank, merged)) if rank == c.rank && merged == c.merged => {}
            _ => continue,
        }
        // Merge q into p.
        id[p] = c.merged;
        alive[q] = false;
        next[p] = next[q];
        if next[q] != NONE {
            prev[next[q] as usize] = p as u32;
        }
        if prev[p] != NONE {
            let l = prev[p] as usize;
            if let Some((rank, merged)) = merges.get(id[l], id[p]) {
                heap.push(Candidate {
                    rank,
                    pos: l as u32,
                    merged,
                });
            }
        }
        if next[p] != NONE {
            let r = next[p] as usize;
            if let Some((rank, merged)) = merges.get(id[p], id[r]) {
                heap.push(Candidate {
                    rank,
                    pos: p as u32,
                    merged,
                });
            }
        }
    }
    // Position 0 is never merged away (a merge keeps its left symbol's position).
    let mut i = 0u32;
    while i != NONE {
        out.push(id[i as usize]);
        i = next[i as usize];
    }
}

/// The textbook algorithm (rescan all pairs, merge the lowest-ranked leftmost one), kept as the reference the
/// other two are tested against.
#[cfg(test)]
pub(crate) fn merge_word_both(merges: &Merges, syms: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut short = syms.to_vec();
    merge_short(merges, &mut short, &mut Vec::new());
    let mut long = Vec::new();
    merge_long(merges, syms, &mut long);
    (short, long)
}

#[cfg(test)]
pub(crate) fn merge_word_naive(merges: &Merges, syms: &[u32]) -> Vec<u32> {
    let mut s = syms.to_vec();
    loop {
        let mut best: Option<(u32, usize, u32)> = None;
        for i in 0..s.len().saturating_sub(1) {
            if let Some((rank, merged)) = merges.get(s[i], s[i + 1]) {
                if best.is_none_or(|(r, _, _)| rank < r) {
                    best = Some((rank, i, merged));
                }
            }
        }
        match best {
            None => return s,
            Some((_, i, merged)) => {
                s[i] = merged;
                s.remove(i + 1);
            }
        }
    }
}
