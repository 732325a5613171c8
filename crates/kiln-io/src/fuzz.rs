//! Support for fuzzing the reader: the property every input must satisfy, and a mutator that
//! turns valid files into nearly-valid ones.
//!
//! Used by the cargo-fuzz target in `fuzz/`, by the stable-toolchain mutation fuzzer
//! `examples/fuzz_safetensors.rs`, and by a short bounded run in the test suite.
use crate::{serialize, SafeTensors};
use kiln_tensor::{DType, Result};

/// Parses `data` as a safetensors file and, if it is accepted, exercises it fully: takes every
/// tensor, reads every element, writes the tensors back with the writer and checks that the
/// result parses to the same names, dtypes, shapes, bytes and metadata.
///
/// Returns the reader's verdict. Panics only if a property is broken (a writer/reader
/// disagreement or an inconsistent tensor) — which is what a fuzzer should report.
pub fn exercise(data: &[u8]) -> Result<usize> {
    let st = SafeTensors::from_bytes(data)?;
    let mut tensors = Vec::with_capacity(st.len());
    let mut checksum = 0u64;
    for info in st.tensors() {
        let t = st.tensor(&info.name)?;
        assert_eq!(t.dims(), info.shape.as_slice());
        assert_eq!(t.dtype(), info.dtype);
        let bytes = t.as_bytes().expect("a tensor from a file is contiguous");
        assert_eq!(bytes, st.tensor_bytes(&info.name).expect("name exists"));
        checksum = bytes
            .iter()
            .fold(checksum, |h, &b| h.rotate_left(5) ^ b as u64);
        if info.dtype.is_float() {
            let v = t.to_f32_vec().expect("float tensors convert");
            assert_eq!(v.len(), info.numel());
        }
        if info.dtype == DType::I64 {
            assert_eq!(t.to_vec::<i64>().expect("i64 view").len(), info.numel());
        }
        tensors.push((info.name.clone(), t));
    }
    let again = serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), st.metadata())
        .expect("writing tensors that were just read");
    let back = SafeTensors::from_bytes(&again).expect("the writer's output parses");
    assert_eq!(back.metadata(), st.metadata());
    assert_eq!(back.len(), st.len());
    for info in st.tensors() {
        let b = back.info(&info.name).expect("every tensor is written back");
        assert_eq!((b.dtype, &b.shape), (info.dtype, &info.shape));
        assert_eq!(
            back.tensor_bytes(&info.name).expect("present"),
            st.tensor_bytes(&info.name).expect("present")
        );
    }
    Ok(checksum as usize)
}

/// A small deterministic random generator (xorshift64*), so that runs are reproducible from a
/// seed without extra dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Interesting numbers to splice into length fields, offsets and shapes.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    255,
    256,
    65535,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    100_000_000,
    100_000_001,
    (1 << 53) + 1,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// JSON fragments to splice into headers.
const FRAGMENTS: &[&str] = &[
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"__metadata__\"",
    "\"F64\"",
    "\"BOOL\"",
    "\"I64\"",
    "[]",
    "[0]",
    "[0,0]",
    "[18446744073709551615,2]",
    "[4294967296,4294967296]",
    "-1",
    "1e400",
    "null",
    "{}",
    "\\u0000",
    "\\ud800",
    "\u{ff}",
    ",",
    ":",
    "{",
    "}",
    "\"",
];

/// Applies one to four random mutations to `data`: bit flips, byte sets, truncation, extension,
/// rewriting the length field, editing numbers and keys inside the JSON header, duplicating or
/// deleting a span, splicing JSON fragments.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let header_end = header_end(data);
        match rng.below(12) {
            0 | 1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            2 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next_u64() as u8;
            }
            3 => {
                let n = rng.below(data.len() + 1);
                data.truncate(n);
            }
            4 => {
                let extra = rng.below(64);
                for _ in 0..extra {
                    data.push(rng.next_u64() as u8);
                }
            }
            5 if data.len() >= 8 => {
                // Rewrite the length field: an interesting value or a small nudge.
                let old = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                let new = if rng.below(2) == 0 {
                    INTERESTING[rng.below(INTERESTING.len())]
                } else {
                    old.wrapping_add(rng.below(17) as u64).wrapping_sub(8)
                };
                data[..8].copy_from_slice(&new.to_le_bytes());
            }
            6 | 7 if header_end > 8 => {
                // Replace a run of digits in the header with another number.
                let start = 8 + rng.below(header_end - 8);
                if let Some(p) = (start..header_end).find(|&i| data[i].is_ascii_digit()) {
                    let end = (p..header_end)
                        .find(|&i| !data[i].is_ascii_digit())
                        .unwrap_or(header_end);
                    let value = match rng.below(3) {
                        0 => INTERESTING[rng.below(INTERESTING.len())],
                        1 => {
                            let s = std::str::from_utf8(&data[p..end]).unwrap_or("0");
                            s.parse::<u64>()
                                .unwrap_or(0)
                                .wrapping_add(rng.below(9) as u64)
                                .wrapping_sub(4)
                        }
                        _ => rng.below(100) as u64,
                    };
                    let text = value.to_string().into_bytes();
                    data.splice(p..end, text);
                }
            }
            8 if header_end > 8 => {
                // Splice a JSON fragment into the header.
                let at = 8 + rng.below(header_end - 8);
                let frag = FRAGMENTS[rng.below(FRAGMENTS.len())].as_bytes().to_vec();
                let del = rng.below(8).min(header_end - at);
                data.splice(at..at + del, frag);
            }
            9 if data.len() > 1 => {
                // Duplicate a span (duplicate entries, repeated data).
                let a = rng.below(data.len());
                let len = 1 + rng.below((data.len() - a).min(96));
                let at = rng.below(data.len());
                let span = data[a..a + len].to_vec();
                data.splice(at..at, span);
            }
            10 if data.len() > 1 => {
                // Delete a span.
                let a = rng.below(data.len());
                let len = 1 + rng.below((data.len() - a).min(32));
                data.drain(a..a + len);
            }
            _ if data.len() >= 8 => {
                // Keep the length field consistent with an edited header: set it to where the
                // JSON really ends, so mutations reach the later checks.
                if let Some(close) = data[8..].iter().rposition(|&b| b == b'}') {
                    let n = (close + 1) as u64;
                    if rng.below(2) == 0 {
                        data[..8].copy_from_slice(&n.to_le_bytes());
                    }
                }
            }
            _ => {}
        }
    }
}

/// End of the JSON header according to the length field, clamped to the data.
fn header_end(data: &[u8]) -> usize {
    if data.len() < 8 {
        return 0;
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    (8u64.saturating_add(n)).min(data.len() as u64) as usize
}
