//! Reading `tests/fixtures/conv/` (made by `tests/fixtures/make_conv_fixtures.py`): the inputs
//! are regenerated here bit for bit from the same integer hash; outputs are compared against the
//! stored samples (every `step`-th element) and the stored sum and sum of absolute values.
#![allow(dead_code)]
use serde_json::Value;
use std::path::PathBuf;

pub struct Fixtures {
    pub manifest: Value,
    data: Vec<f32>,
}

impl Fixtures {
    pub fn load() -> Fixtures {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conv");
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("data.bin")).unwrap();
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Fixtures { manifest, data }
    }

    fn entry(&self, name: &str) -> &Value {
        self.manifest["tensors"]
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
    }

    /// The stored samples of a small tensor stored whole (step 1).
    pub fn full(&self, name: &str) -> Vec<f32> {
        let e = self.entry(name);
        assert_eq!(e["step"].as_u64(), Some(1), "{name} is sampled");
        let (off, n) = (
            e["offset"].as_u64().unwrap() as usize,
            e["count"].as_u64().unwrap() as usize,
        );
        self.data[off..off + n].to_vec()
    }

    /// Compares `got` with the fixture: every stored sample within
    /// `tol · (mean|ref| + |ref|)`, and the sums within `tol · Σ|ref|`.
    pub fn check(&self, name: &str, got: &[f32], tol: f64) {
        let e = self.entry(name);
        let (off, n, step, len) = (
            e["offset"].as_u64().unwrap() as usize,
            e["count"].as_u64().unwrap() as usize,
            e["step"].as_u64().unwrap() as usize,
            e["len"].as_u64().unwrap() as usize,
        );
        assert_eq!(got.len(), len, "{name}: length");
        let abs_sum = e["abs_sum"].as_f64().unwrap();
        let mean_abs = abs_sum / len as f64;
        let mut worst = 0f64;
        for (k, &want) in self.data[off..off + n].iter().enumerate() {
            let a = got[k * step] as f64;
            let b = want as f64;
            let err = (a - b).abs();
            worst = worst.max(err / (mean_abs + b.abs()).max(1e-30));
            assert!(
                err <= tol * (mean_abs + b.abs()),
                "{name}[{}]: got {a}, want {b} (err {err:e}, mean |ref| {mean_abs:e})",
                k * step
            );
        }
        let sum: f64 = got.iter().map(|&v| v as f64).sum();
        let want_sum = e["sum"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= tol * abs_sum.max(1e-30),
            "{name}: sum {sum} vs {want_sum}"
        );
        let got_abs: f64 = got.iter().map(|&v| (v as f64).abs()).sum();
        assert!(
            (got_abs - abs_sum).abs() <= tol * abs_sum.max(1e-30),
            "{name}: abs sum {got_abs} vs {abs_sum}"
        );
        let _ = worst;
    }
}

/// `n` values in [-1, 1): the integer hash of (index, seed) of the fixture script.
pub fn hashed(n: usize, seed: u64) -> Vec<f32> {
    const M: u64 = 0xFFFF_FFFF;
    (0..n as u64)
        .map(|i| {
            let mut u = (i * 2654435761 + seed * 40503 + 12345) & M;
            u ^= u >> 13;
            u = (u * 0x5BD1E995) & M;
            u ^= u >> 15;
            let v = (u >> 8) as f32 / 16777216.0;
            v * 2.0 - 1.0
        })
        .collect()
}

/// `hashed(n, seed) · scale + shift` in f32, as the script's `make`.
pub fn make(n: usize, seed: u64, scale: f32, shift: f32) -> Vec<f32> {
    hashed(n, seed)
        .into_iter()
        .map(|v| v * scale + shift)
        .collect()
}

pub fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

pub fn shape4(v: &Value) -> [usize; 4] {
    usizes(v).try_into().unwrap()
}

pub fn pair(v: &Value) -> [usize; 2] {
    usizes(v).try_into().unwrap()
}
