//! Reading `tests/fixtures/gpt2_train/` (made by `tests/fixtures/make_gpt2_train_fixtures.py`):
//! PyTorch's reference of GPT-2 training steps (a 2-layer, width-64 model with the real
//! 50257-token vocabulary). See `tests/fixtures/gpt2_train/README.md` for every tensor.
//!
//! * [`TrainFixtures::initial_weights`] regenerates the initial parameters bit for bit from the
//!   integer hash and the manifest's `init` table (`name → [seed, scale, shift]`), in
//!   transformers' names and order (`transformer.wte.weight`, …; the output projection is tied
//!   to `transformer.wte.weight` and not listed). Linear weights are transformers' `Conv1D`
//!   layout `[in, out]` (`y = x·W + b`).
//! * [`TrainFixtures::micro_batch`] gives the tokens of one micro-batch (`[batch, seq + 1]`;
//!   inputs `[:, :-1]`, targets `[:, 1:]`), [`TrainFixtures::step`] the scalars of one
//!   optimizer step, [`TrainFixtures::check`] compares a computed tensor with a stored one
//!   (stored whole, or as every `step`-th element plus sums, plus whole rows for the token
//!   table).
#![allow(dead_code)]
use serde_json::Value;
use std::path::PathBuf;

/// The model's configuration (GPT-2 names).
#[derive(Clone, Copy, Debug)]
pub struct TrainConfig {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f64,
}

/// The scalars of one optimizer step.
#[derive(Clone, Debug)]
pub struct StepRecord {
    /// Learning rate of this step.
    pub lr: f64,
    /// Mean of the micro-batch losses (each the mean cross-entropy over its `batch·seq`
    /// targets).
    pub loss: f64,
    pub micro_losses: Vec<f64>,
    /// Global 2-norm of the accumulated gradients before clipping, as PyTorch computes it (in
    /// f32; this is what the clipping used).
    pub grad_norm: f64,
    /// The same norm computed in f64 (PyTorch's f32 norm of the token table's gradient is
    /// about 1e-4 relative low, so `grad_norm` is about 2e-5 below this).
    pub grad_norm_f64: f64,
    /// `min(1, clip/(grad_norm + 1e-6))` (1 without clipping); the stored gradients are
    /// already multiplied by it.
    pub clip_coef: f64,
}

/// One stored tensor: `count` samples (`data[offset..]`, every `step`-th element of the
/// flattened tensor), its f64 sum, sum of absolute values and sum of squares, and for the
/// token table also whole rows (`row_ids`, at `rows_offset`).
#[derive(Clone, Debug)]
pub struct Entry {
    pub shape: Vec<usize>,
    pub len: usize,
    pub step: usize,
    pub count: usize,
    pub offset: usize,
    pub sum: f64,
    pub abs_sum: f64,
    pub sq_sum: f64,
    pub row_ids: Vec<usize>,
    pub rows_offset: Option<usize>,
}

pub struct TrainFixtures {
    pub manifest: Value,
    data: Vec<f32>,
}

impl TrainFixtures {
    pub fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2_train")
    }

    pub fn load() -> TrainFixtures {
        let dir = Self::dir();
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("data.bin")).unwrap();
        let data = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        TrainFixtures { manifest, data }
    }

    pub fn config(&self) -> TrainConfig {
        let c = &self.manifest["config"];
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        TrainConfig {
            vocab_size: u("vocab_size"),
            n_positions: u("n_positions"),
            n_embd: u("n_embd"),
            n_layer: u("n_layer"),
            n_head: u("n_head"),
            layer_norm_epsilon: c["layer_norm_epsilon"].as_f64().unwrap(),
        }
    }

    /// Parameter names in transformers' `named_parameters()` order.
    pub fn param_names(&self) -> Vec<String> {
        self.manifest["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    pub fn shape(&self, param: &str) -> Vec<usize> {
        usizes(&self.manifest["shapes"][param])
    }

    /// `[seed, scale, shift]` of a parameter's initial values.
    pub fn init_spec(&self, param: &str) -> (u64, f32, f32) {
        let s = self.manifest["init"][param].as_array().unwrap();
        (
            s[0].as_u64().unwrap(),
            s[1].as_f64().unwrap() as f32,
            s[2].as_f64().unwrap() as f32,
        )
    }

    /// Every parameter's initial value: `(name, shape, values)`, row-major, in order.
    pub fn initial_weights(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.param_names()
            .into_iter()
            .map(|name| {
                let shape = self.shape(&name);
                let (seed, scale, shift) = self.init_spec(&name);
                let values = make(shape.iter().product(), seed, scale, shift);
                (name, shape, values)
            })
            .collect()
    }

    pub fn case(&self, case: &str) -> &Value {
        let c = &self.manifest["cases"][case];
        assert!(!c.is_null(), "no fixture case {case}");
        c
    }

    /// `(batch, seq, micro_batches, optimizer steps)` of a case.
    pub fn case_dims(&self, case: &str) -> (usize, usize, usize, usize) {
        let c = self.case(case);
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        (
            u("batch"),
            u("seq"),
            u("micro_batches"),
            c["steps"].as_array().unwrap().len(),
        )
    }

    /// All tokens of a case: shape `[steps·micro_batches, batch, seq + 1]`, micro-batch `m` of
    /// step `s` (both from 1) at index `(s − 1)·micro_batches + m − 1`.
    pub fn tokens(&self, case: &str) -> (Vec<usize>, Vec<i64>) {
        let t = &self.case(case)["tokens"];
        let data = t["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        (usizes(&t["shape"]), data)
    }

    /// Tokens of micro-batch `micro` of step `step` (both from 1): `[batch, seq + 1]`.
    pub fn micro_batch(&self, case: &str, step: usize, micro: usize) -> Vec<i64> {
        let (b, t, m, _) = self.case_dims(case);
        let (_, all) = self.tokens(case);
        let n = b * (t + 1);
        let i = (step - 1) * m + (micro - 1);
        all[i * n..(i + 1) * n].to_vec()
    }

    /// The scalars of optimizer step `step` (from 1).
    pub fn step(&self, case: &str, step: usize) -> StepRecord {
        let s = &self.case(case)["steps"][step - 1];
        let f = |k: &str| s[k].as_f64().unwrap();
        StepRecord {
            lr: f("lr"),
            loss: f("loss"),
            micro_losses: s["micro_losses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect(),
            grad_norm: f("grad_norm"),
            grad_norm_f64: f("grad_norm_f64"),
            clip_coef: f("clip_coef"),
        }
    }

    /// AdamW hyper-parameters: `(beta1, beta2, eps, weight_decay)`; the decay applies to
    /// parameters of 2 or more dimensions only.
    pub fn adamw(&self) -> (f64, f64, f64, f64) {
        let o = &self.manifest["optimizer"];
        (
            o["betas"][0].as_f64().unwrap(),
            o["betas"][1].as_f64().unwrap(),
            o["eps"].as_f64().unwrap(),
            o["weight_decay"].as_f64().unwrap(),
        )
    }

    /// Name of the gradient of `param` at optimizer step `step` (after clipping).
    pub fn grad_name(case: &str, step: usize, param: &str) -> String {
        format!("{case}/step{step}/grad/{param}")
    }

    /// Name of `param` after optimizer step `step`.
    pub fn param_name(case: &str, step: usize, param: &str) -> String {
        format!("{case}/step{step}/param/{param}")
    }

    /// Name of the per-position losses `[batch, seq]` of a micro-batch.
    pub fn losses_name(case: &str, step: usize, micro: usize) -> String {
        format!("{case}/step{step}/micro{micro}/losses")
    }

    /// Name of the logits of the first sequence's first 4 positions (`[4, vocab]`, sampled),
    /// from the first micro-batch of a step.
    pub fn logits_name(case: &str, step: usize) -> String {
        format!("{case}/step{step}/logits_first4")
    }

    pub fn has(&self, name: &str) -> bool {
        !self.manifest["tensors"][name].is_null()
    }

    pub fn entry(&self, name: &str) -> Entry {
        let e = &self.manifest["tensors"][name];
        assert!(!e.is_null(), "fixture tensor {name} missing");
        let u = |k: &str| e[k].as_u64().unwrap() as usize;
        let f = |k: &str| e[k].as_f64().unwrap();
        Entry {
            shape: usizes(&e["shape"]),
            len: u("len"),
            step: u("step"),
            count: u("count"),
            offset: u("offset"),
            sum: f("sum"),
            abs_sum: f("abs_sum"),
            sq_sum: f("sq_sum"),
            row_ids: if e["row_ids"].is_null() {
                Vec::new()
            } else {
                usizes(&e["row_ids"])
            },
            rows_offset: e["rows_offset"].as_u64().map(|v| v as usize),
        }
    }

    /// The stored samples (every `step`-th element).
    pub fn samples(&self, name: &str) -> Vec<f32> {
        let e = self.entry(name);
        self.data[e.offset..e.offset + e.count].to_vec()
    }

    /// A tensor stored whole.
    pub fn full(&self, name: &str) -> Vec<f32> {
        let e = self.entry(name);
        assert_eq!(e.step, 1, "{name} is stored as samples only");
        self.samples(name)
    }

    /// The whole rows stored for the token table: `(row ids, [ids.len(), row length])`.
    pub fn rows(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let e = self.entry(name);
        let off = e.rows_offset.expect("no rows stored");
        let width: usize = e.shape[1..].iter().product();
        let n = e.row_ids.len() * width;
        (e.row_ids, self.data[off..off + n].to_vec())
    }

    /// Compares `got` (the whole tensor, row-major) with the fixture: every stored sample and
    /// row element within `tol · (mean|ref| + |ref|)`, the sum within `tol · Σ|ref|`, and the
    /// sums of absolute values and of squares within `tol` relative.
    pub fn check(&self, name: &str, got: &[f32], tol: f64) {
        let e = self.entry(name);
        assert_eq!(got.len(), e.len, "{name}: length");
        let mean_abs = e.abs_sum / e.len.max(1) as f64;
        let near = |what: String, a: f64, b: f64| {
            let err = (a - b).abs();
            assert!(
                err <= tol * (mean_abs + b.abs()),
                "{what}: got {a}, want {b} (err {err:e}, mean |ref| {mean_abs:e})"
            );
        };
        for (k, &want) in self.samples(name).iter().enumerate() {
            near(
                format!("{name}[{}]", k * e.step),
                got[k * e.step] as f64,
                want as f64,
            );
        }
        if e.rows_offset.is_some() {
            let (ids, rows) = self.rows(name);
            let width = rows.len() / ids.len().max(1);
            for (r, &id) in ids.iter().enumerate() {
                for x in 0..width {
                    near(
                        format!("{name} row {id} [{x}]"),
                        got[id * width + x] as f64,
                        rows[r * width + x] as f64,
                    );
                }
            }
        }
        let sum: f64 = got.iter().map(|&v| v as f64).sum();
        let abs: f64 = got.iter().map(|&v| (v as f64).abs()).sum();
        let sq: f64 = got.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let floor = 1e-30;
        assert!(
            (sum - e.sum).abs() <= tol * e.abs_sum.max(floor),
            "{name}: sum {sum} vs {}",
            e.sum
        );
        assert!(
            (abs - e.abs_sum).abs() <= tol * e.abs_sum.max(floor),
            "{name}: abs sum {abs} vs {}",
            e.abs_sum
        );
        assert!(
            (sq - e.sq_sum).abs() <= 2.0 * tol * e.sq_sum.max(floor),
            "{name}: square sum {sq} vs {}",
            e.sq_sum
        );
    }
}

/// `n` values in [-1, 1): the integer hash of (index, seed) of the fixture script (the same as
/// `tests/conv_support`).
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
