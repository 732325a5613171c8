//! `CudaBackend` (kiln-nn's op interface on kiln-cuda's kernels) against `CpuBackend`, on the
//! CPU emulator (and on a GPU where there is one, with `KILN_SKIP_EMU` unset or set):
//!
//! * every op of the trait on odd sizes, its outputs against the CPU backend's;
//! * GPT-2 on the tiny fixture checkpoint (`tests/fixtures/gpt2`, bf16): prefill, decode steps
//!   and a batched decode step — logits against the CPU backend, greedy ids equal, batched rows
//!   bitwise their single-sequence selves, and the transfers of a decode step: the ids in and
//!   the logits out, nothing else (counted both at the trait and at the device's copies);
//! * one DCGAN training iteration (`Gan::step`) from the fixture checkpoints with the fixture's
//!   real batch and noise: losses, D(x), D(G(z)) and the updated parameters against the CPU
//!   backend's iteration;
//! * one GPT-2 training step (`Gpt2Trainer`: forward, backward, clipping, AdamW) against the
//!   CPU backend, on a tiny config of our own (vocabulary 331: the fixtures' 50257-word
//!   vocabulary makes the emulator spend its time on the [rows, 50257] products);
//! * bad input gives errors, never panics; without a GPU `CudaBackend::new` is the "no CUDA
//!   device" error.
//!
//! Tolerances. Both backends compute in f32 with f32 accumulation; they differ in the order of
//! the sums (tiles, warps, K slices vs kiln-cpu's blocking), so a sum of `k` products differs
//! by a few units in the last place of its magnitude, growing like √k: 1e-5 absolute + 1e-4
//! relative bounds that for every op here. Copies, gathers, casts, masks and element-wise
//! arithmetic without transcendental functions are exact.
use kiln_cuda::{is_no_device, CudaBackend};
use kiln_io::SafeTensors;
use kiln_models::dcgan::train::{Gan, TrainConfig};
use kiln_models::dcgan::{Discriminator, Generator};
use kiln_models::gpt2::train::{from_tensors, AdamW, Gpt2Trainer};
use kiln_models::gpt2::{
    generate_ids, GenerateOptions, Gpt2, Gpt2Config, Gpt2Model, LoadOptions, Logits,
};
use kiln_nn::backend::{
    download_all, Activation, Backend, BnShape, Conv2dParams, ConvGeometry, CpuBackend, Grads,
    KvCache, LinearDims, MatrixOptions, Pointwise, Transfers,
};
use kiln_nn::optim::AdamConfig;
use kiln_tensor::{DType, Result, Tensor};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

// ---- devices ------------------------------------------------------------------------------------

fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// The devices to test on: the emulator (unless `KILN_SKIP_EMU`), and the GPU when there is one.
/// Each call makes fresh backends (their transfer counts are their own).
fn backends(test: &str) -> Vec<CudaBackend> {
    let mut v = Vec::new();
    if std::env::var_os("KILN_SKIP_EMU").is_some() {
        println!("SKIP {test} (emulator): KILN_SKIP_EMU is set");
    } else {
        match CudaBackend::emulator() {
            Ok(b) => v.push(b),
            Err(e) if in_ci() => panic!("{test}: the CPU emulator is required under CI: {e}"),
            Err(e) => println!("SKIP {test} (emulator): {e}"),
        }
    }
    match CudaBackend::new(0) {
        Ok(b) => v.push(b),
        Err(e) => println!("SKIP {test} (gpu): {e}"),
    }
    v
}

/// One shared emulator backend for the op tests (its counts are not looked at).
fn shared() -> Vec<&'static CudaBackend> {
    static EMU: OnceLock<Option<CudaBackend>> = OnceLock::new();
    static GPU: OnceLock<Option<CudaBackend>> = OnceLock::new();
    let mut v = Vec::new();
    if std::env::var_os("KILN_SKIP_EMU").is_none() {
        let e = EMU.get_or_init(|| match CudaBackend::emulator() {
            Ok(b) => Some(b),
            Err(e) if in_ci() => panic!("the CPU emulator is required under CI: {e}"),
            Err(e) => {
                println!("SKIP (emulator): {e}");
                None
            }
        });
        v.extend(e.as_ref());
    }
    v.extend(GPU.get_or_init(|| CudaBackend::new(0).ok()).as_ref());
    v
}

/// A file of the repository: found from where this test was built, or from the working
/// directory (`benches/cuda/run.sh` runs a prebuilt copy of this test from the repository root
/// of another machine).
fn repo(path: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    if built.exists() {
        return built;
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    [cwd.join(path), cwd.join("../..").join(path)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or(built)
}

/// Deterministic values in [-1, 1).
fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn scaled(n: usize, seed: u64, k: f32) -> Vec<f32> {
    vals(n, seed).into_iter().map(|v| v * k).collect()
}

// ---- comparing the two backends ---------------------------------------------------------------

/// One output of an op: a name, the values, the tolerance it is compared with.
struct Out {
    name: String,
    vals: Vec<f32>,
    atol: f32,
    rtol: f32,
}

const EXACT: (f32, f32) = (0.0, 0.0);
const SUMS: (f32, f32) = (1e-5, 1e-4);
/// Transcendental functions (tanh, exp, log): the emulator's libm against Rust's.
const FUNCS: (f32, f32) = (1e-6, 1e-5);

struct Outs(Vec<Out>);

impl Outs {
    fn new() -> Self {
        Outs(Vec::new())
    }
    fn push(&mut self, name: impl Into<String>, vals: Vec<f32>, tol: (f32, f32)) {
        self.0.push(Out {
            name: name.into(),
            vals,
            atol: tol.0,
            rtol: tol.1,
        });
    }
    /// The first `len` elements of `buf`.
    fn buf<B: Backend>(
        &mut self,
        be: &B,
        name: impl Into<String>,
        buf: &B::Buf,
        len: usize,
        tol: (f32, f32),
    ) -> Result<()> {
        let mut v = vec![0f32; len];
        be.download(buf, 0, &mut v)?;
        self.push(name, v, tol);
        Ok(())
    }
}

/// Runs `f` on the CPU backend and on every CUDA backend and compares every output.
fn compare(
    test: &str,
    f_cpu: fn(&CpuBackend) -> Result<Outs>,
    f_dev: fn(&CudaBackend) -> Result<Outs>,
) {
    let want = f_cpu(&CpuBackend::default()).unwrap_or_else(|e| panic!("{test} on cpu: {e}"));
    for be in shared() {
        let got = f_dev(be).unwrap_or_else(|e| panic!("{test} on {}: {e}", be.name()));
        assert_eq!(got.0.len(), want.0.len(), "{test}: outputs");
        for (g, w) in got.0.iter().zip(&want.0) {
            assert_eq!(g.name, w.name);
            assert_close(
                &format!("{test} {} on {}", w.name, be.name()),
                &g.vals,
                &w.vals,
                w.atol,
                w.rtol,
            );
        }
    }
}

/// Every `|got − want| ≤ atol + rtol·|want|` (NaN where the other is NaN).
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if g.is_nan() || w.is_nan() {
            g.is_nan() && w.is_nan()
        } else {
            g == w || (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

/// The largest `|got − want|`.
fn max_abs_diff(got: &[f32], want: &[f32]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .fold(0.0, f64::max)
}

/// Prints one `FIGURE {json}` line: a comparison figure `benches/cuda/run.sh` collects into its
/// figures JSON from the GPU run of this test.
fn figure(name: &str, device: &str, value: f64) {
    let v = if value.is_finite() {
        format!("{value:e}")
    } else {
        "null".into()
    };
    println!("FIGURE {{\"figure\": \"{name}\", \"device\": \"{device}\", \"value\": {v}}}");
}

macro_rules! both {
    ($test:expr, $f:ident) => {
        compare($test, $f::<CpuBackend>, $f::<CudaBackend>)
    };
}

// ---- the ops ------------------------------------------------------------------------------------

fn memory_and_pointwise<B: Backend>(be: &B) -> Result<Outs> {
    let mut o = Outs::new();
    let n = 257;
    let x = be.upload(&vals(n, 1))?;
    let mut y = be.upload(&vals(n + 7, 2))?;
    be.copy(&x, 3, &mut y, 5, 200)?;
    be.upload_into(&[7.0, 8.0, 9.0], &mut y, 261)?;
    o.buf(be, "copy + upload_into", &y, n + 7, EXACT)?;
    be.fill(&mut y, 33, 0.5)?;
    be.scale(&mut y, 100, -1.5)?;
    be.add(&mut y, &x, n)?;
    o.buf(be, "fill scale add", &y, n + 7, EXACT)?;
    let z = be.zeros(13)?;
    o.buf(be, "zeros", &z, 13, EXACT)?;
    // GELU in place, forward, backward (dx starts as garbage: the trait overwrites it).
    let big = scaled(n, 3, 4.0);
    let mut g = be.upload(&big)?;
    be.gelu(&mut g, n - 4)?;
    o.buf(be, "gelu", &g, n, FUNCS)?;
    let xb = be.upload(&big)?;
    let mut gy = be.zeros(n)?;
    be.gelu_forward(&xb, &mut gy, n)?;
    o.buf(be, "gelu_forward", &gy, n, FUNCS)?;
    let dy = be.upload(&vals(n, 4))?;
    let mut dx = be.upload(&vals(n, 5))?;
    be.gelu_backward(&xb, &dy, &mut dx, n)?;
    o.buf(be, "gelu_backward", &dx, n, FUNCS)?;
    // Softmax rows.
    let mut s = be.upload(&scaled(7 * 33, 6, 5.0))?;
    be.softmax(&mut s, 7, 33)?;
    o.buf(be, "softmax", &s, 7 * 33, FUNCS)?;
    // Point-wise activations.
    for (i, act) in [
        Pointwise::Relu,
        Pointwise::LeakyRelu(0.2),
        Pointwise::Tanh,
        Pointwise::Sigmoid,
    ]
    .into_iter()
    .enumerate()
    {
        let mut y = be.zeros(n)?;
        be.pointwise(act, &xb, &mut y, n)?;
        o.buf(be, format!("{act:?} forward"), &y, n, FUNCS)?;
        let mut yi = be.upload(&big)?;
        be.pointwise_inplace(act, &mut yi, n - 1)?;
        o.buf(be, format!("{act:?} in place"), &yi, n, FUNCS)?;
        let mut dx = be.upload(&vals(n, 10 + i as u64))?;
        be.pointwise_backward(act, &y, &dy, &mut dx, n)?;
        o.buf(be, format!("{act:?} backward"), &dx, n, FUNCS)?;
    }
    // Dropout: the same mask, bit for bit.
    let mut d = be.upload(&vals(1000, 7))?;
    be.dropout(&mut d, 999, 0.3, 42)?;
    o.buf(be, "dropout", &d, 1000, EXACT)?;
    be.dropout_backward(&mut d, 1000, 0.5, 43)?;
    o.buf(be, "dropout backward", &d, 1000, EXACT)?;
    // Scalars that come back to the host.
    o.push(
        "sum_squares",
        vec![be.sum_squares(&[&x, &y, &d])? as f32],
        SUMS,
    );
    o.push("mean", vec![be.mean(&x, n - 2)?], SUMS);
    let p: Vec<f32> = vals(37, 8).iter().map(|v| 0.5 + 0.45 * v).collect();
    let t: Vec<f32> = vals(37, 9)
        .iter()
        .map(|v| (*v > 0.0) as u8 as f32)
        .collect();
    let (pb, tb) = (be.upload(&p)?, be.upload(&t)?);
    o.push("bce", vec![be.bce(&pb, &tb, 37)?], FUNCS);
    let mut dp = be.zeros(37)?;
    be.bce_backward(&pb, &tb, 0.75, &mut dp, 37)?;
    o.buf(be, "bce backward", &dp, 37, FUNCS)?;
    Ok(o)
}

#[test]
fn memory_and_pointwise_ops_match_the_cpu_backend() {
    both!("memory and point-wise ops", memory_and_pointwise);
}

/// A `[rows, cols]` f32 tensor converted to `dtype`.
fn tensor(rows: usize, cols: usize, seed: u64, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(scaled(rows * cols, seed, 0.5), vec![rows, cols])?.to_dtype(dtype)
}

fn matrices_and_products<B: Backend>(be: &B) -> Result<Outs> {
    let mut o = Outs::new();
    // Matrices in every dtype and layout read back as the tensor.
    for (dtype, src) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F32),
        (DType::F32, DType::BF16),
    ] {
        for used_transposed in [false, true] {
            let t = tensor(33, 17, 1, src)?;
            let opts = MatrixOptions {
                dtype: Some(dtype),
                used_transposed,
                streaming_layout: true,
            };
            let m = be.upload_matrix(&t, &opts)?;
            let info = be.info(&m);
            assert_eq!((info.dtype, info.len), (dtype, 33 * 17));
            o.buf(
                be,
                format!("matrix {src}->{dtype} t={used_transposed}"),
                &m,
                33 * 17,
                EXACT,
            )?;
            let mut part = vec![0f32; 40];
            be.download(&m, 100, &mut part)?;
            o.push(
                format!("matrix {src}->{dtype} t={used_transposed} part"),
                part,
                EXACT,
            );
        }
    }
    // Products: every weight form, with and without bias and GELU, 1, 3 and 7 rows.
    let (k, n) = (33, 65);
    let w_kn = scaled(k * n, 2, 0.3);
    let w_nk: Vec<f32> = (0..n * k).map(|i| w_kn[(i % k) * n + i / k]).collect();
    let bias = be.upload(&scaled(n, 3, 0.1))?;
    let mat = |data: &[f32], rows, cols, dtype, used_transposed| -> Result<B::Buf> {
        let t = Tensor::from_slice(data, vec![rows, cols])?;
        be.upload_matrix(
            &t,
            &MatrixOptions {
                dtype: Some(dtype),
                used_transposed,
                streaming_layout: true,
            },
        )
    };
    let weights: Vec<(&str, B::Buf, bool)> = vec![
        ("f32 [k,n]", be.upload(&w_kn)?, false),
        ("f32 [n,k]", be.upload(&w_nk)?, true),
        (
            "bf16 matrix [k,n]",
            mat(&w_kn, k, n, DType::BF16, false)?,
            false,
        ),
        (
            "f16 matrix [k,n]",
            mat(&w_kn, k, n, DType::F16, false)?,
            false,
        ),
        (
            "bf16 matrix [n,k] kept transposed",
            mat(&w_nk, n, k, DType::BF16, true)?,
            true,
        ),
        (
            "f32 matrix [n,k] as stored",
            mat(&w_nk, n, k, DType::F32, false)?,
            true,
        ),
    ];
    for m in [1, 3, 7] {
        let x = be.upload(&vals(m * k, 4 + m as u64))?;
        for (wname, w, transposed) in &weights {
            for (b, act) in [
                (None, Activation::None),
                (Some(&bias), Activation::None),
                (Some(&bias), Activation::GeluTanh),
                (None, Activation::GeluTanh),
            ] {
                let d = LinearDims {
                    w_transposed: *transposed,
                    ..LinearDims::new(m, k, n)
                };
                let mut y = be.upload(&vals(m * n, 9))?;
                be.linear(&x, w, b, &mut y, d, act)?;
                o.buf(
                    be,
                    format!("linear m={m} {wname} bias={} {act:?}", b.is_some()),
                    &y,
                    m * n,
                    SUMS,
                )?;
            }
        }
    }
    // Backward: dx, dW, db, overwritten and accumulated, both weight layouts.
    let m = 7;
    let x = be.upload(&vals(m * k, 20))?;
    let dy = be.upload(&vals(m * n, 21))?;
    for (wname, w, transposed) in &weights[..2] {
        for accumulate in [false, true] {
            let d = LinearDims {
                w_transposed: *transposed,
                ..LinearDims::new(m, k, n)
            };
            let mut dx = be.upload(&vals(m * k, 22))?;
            let mut dw = be.upload(&vals(k * n, 23))?;
            let mut db = be.upload(&vals(n, 24))?;
            be.linear_backward(
                &x,
                w,
                &dy,
                d,
                Grads {
                    dx: Some(&mut dx),
                    dw: Some(&mut dw),
                    db: Some(&mut db),
                    accumulate,
                },
            )?;
            let tag = format!("linear backward {wname} accumulate={accumulate}");
            o.buf(be, format!("{tag} dx"), &dx, m * k, SUMS)?;
            o.buf(be, format!("{tag} dw"), &dw, k * n, SUMS)?;
            o.buf(be, format!("{tag} db"), &db, n, SUMS)?;
        }
    }
    Ok(o)
}

#[test]
fn matrices_and_linear_products_match_the_cpu_backend() {
    both!("matrices and products", matrices_and_products);
}

fn embeddings_and_losses<B: Backend>(be: &B) -> Result<Outs> {
    let mut o = Outs::new();
    let (v, dim, npos) = (37, 24, 9);
    let wte = scaled(v * dim, 1, 0.5);
    let t = Tensor::from_slice(&wte, vec![v, dim])?;
    let pos = be.upload(&scaled(npos * dim, 2, 0.1))?;
    let ids = [0u32, 36, 5, 5, 17, 2, 36];
    let at = [8u32, 0, 3, 4, 4, 1, 7];
    for (name, table) in [
        ("f32 array", be.upload(&wte)?),
        (
            "bf16 matrix",
            be.upload_matrix(
                &t,
                &MatrixOptions {
                    dtype: Some(DType::BF16),
                    used_transposed: false,
                    streaming_layout: false,
                },
            )?,
        ),
        (
            "bf16 matrix kept transposed",
            be.upload_matrix(
                &t,
                &MatrixOptions {
                    dtype: Some(DType::BF16),
                    used_transposed: true,
                    streaming_layout: true,
                },
            )?,
        ),
    ] {
        let mut out = be.zeros(ids.len() * dim + 5)?;
        be.embedding(&ids, &at, &table, &pos, dim, &mut out)?;
        o.buf(
            be,
            format!("embedding {name}"),
            &out,
            ids.len() * dim,
            EXACT,
        )?;
    }
    // Backward: repeated ids and positions accumulate in order.
    let dout = be.upload(&vals(ids.len() * dim, 3))?;
    let mut dwte = be.upload(&vals(v * dim, 4))?;
    let mut dwpe = be.upload(&vals(npos * dim, 5))?;
    be.embedding_backward(&ids, &at, &dout, &mut dwte, &mut dwpe, dim)?;
    o.buf(be, "embedding backward tokens", &dwte, v * dim, EXACT)?;
    o.buf(be, "embedding backward positions", &dwpe, npos * dim, EXACT)?;
    // Cross-entropy: the mean loss, and with dscale the gradient in place of the logits.
    let (rows, vocab) = (5, 37);
    let targets = [3u32, 0, 36, 17, 3];
    let logits = scaled(rows * vocab, 6, 4.0);
    let mut l = be.upload(&logits)?;
    o.push(
        "cross_entropy",
        vec![be.cross_entropy(&mut l, &targets, rows, vocab, None)?],
        SUMS,
    );
    o.buf(
        be,
        "cross_entropy logits untouched",
        &l,
        rows * vocab,
        EXACT,
    )?;
    o.push(
        "cross_entropy with gradient",
        vec![be.cross_entropy(&mut l, &targets, rows, vocab, Some(0.25))?],
        SUMS,
    );
    o.buf(be, "cross_entropy gradient", &l, rows * vocab, FUNCS)?;
    Ok(o)
}

#[test]
fn embeddings_and_losses_match_the_cpu_backend() {
    both!("embeddings and losses", embeddings_and_losses);
}

fn norms<B: Backend>(be: &B) -> Result<Outs> {
    let mut o = Outs::new();
    let (rows, dim) = (7, 33);
    let x = be.upload(&scaled(rows * dim, 1, 3.0))?;
    let gamma = be.upload(&vals(dim, 2))?;
    let beta = be.upload(&vals(dim, 3))?;
    let mut y = be.zeros(rows * dim)?;
    be.layer_norm(&x, &gamma, &beta, &mut y, rows, dim, 1e-5)?;
    o.buf(be, "layer_norm", &y, rows * dim, SUMS)?;
    let (mut mean, mut rstd) = (be.zeros(rows)?, be.zeros(rows)?);
    be.layer_norm_train(
        &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, rows, dim, 1e-5,
    )?;
    o.buf(be, "layer_norm_train y", &y, rows * dim, SUMS)?;
    o.buf(be, "layer_norm_train mean", &mean, rows, SUMS)?;
    o.buf(be, "layer_norm_train rstd", &rstd, rows, SUMS)?;
    let dy = be.upload(&vals(rows * dim, 4))?;
    for accumulate in [false, true] {
        let mut dx = be.upload(&vals(rows * dim, 5))?;
        let mut dg = be.upload(&vals(dim, 6))?;
        let mut db = be.upload(&vals(dim, 7))?;
        be.layer_norm_backward(
            &x,
            &gamma,
            &mean,
            &rstd,
            &dy,
            rows,
            dim,
            Grads {
                dx: Some(&mut dx),
                dw: Some(&mut dg),
                db: Some(&mut db),
                accumulate,
            },
        )?;
        o.buf(
            be,
            format!("layer_norm backward dx acc={accumulate}"),
            &dx,
            rows * dim,
            SUMS,
        )?;
        o.buf(
            be,
            format!("layer_norm backward dgamma acc={accumulate}"),
            &dg,
            dim,
            SUMS,
        )?;
        o.buf(
            be,
            format!("layer_norm backward dbeta acc={accumulate}"),
            &db,
            dim,
            SUMS,
        )?;
    }
    // Only the parameter gradients.
    let mut dg = be.zeros(dim)?;
    be.layer_norm_backward(
        &x,
        &gamma,
        &mean,
        &rstd,
        &dy,
        rows,
        dim,
        Grads {
            dx: None,
            dw: Some(&mut dg),
            db: None,
            accumulate: false,
        },
    )?;
    o.buf(be, "layer_norm backward dgamma only", &dg, dim, SUMS)?;
    // Batch norm: train (with running statistics), eval, backward.
    let s = BnShape {
        batch: 3,
        channels: 5,
        hw: 7,
    };
    let x = be.upload(&scaled(s.len(), 8, 2.0))?;
    let gamma = be.upload(&vals(5, 9))?;
    let beta = be.upload(&vals(5, 10))?;
    let (mut rm, mut rv) = (
        be.upload(&vals(5, 11))?,
        be.upload(&[1.0, 2.0, 0.5, 1.5, 3.0])?,
    );
    let mut y = be.zeros(s.len())?;
    let (mut sm, mut sr) = (be.zeros(5)?, be.zeros(5)?);
    be.batch_norm_train(
        &s,
        &x,
        &gamma,
        &beta,
        Some((&mut rm, &mut rv)),
        0.1,
        1e-5,
        &mut y,
        &mut sm,
        &mut sr,
    )?;
    o.buf(be, "batch_norm_train y", &y, s.len(), SUMS)?;
    o.buf(be, "batch_norm_train saved mean", &sm, 5, SUMS)?;
    o.buf(be, "batch_norm_train saved rstd", &sr, 5, SUMS)?;
    o.buf(be, "batch_norm_train running mean", &rm, 5, SUMS)?;
    o.buf(be, "batch_norm_train running var", &rv, 5, SUMS)?;
    be.batch_norm_eval(&s, &x, &gamma, &beta, &rm, &rv, 1e-5, &mut y)?;
    o.buf(be, "batch_norm_eval", &y, s.len(), SUMS)?;
    let dy = be.upload(&vals(s.len(), 12))?;
    for accumulate in [false, true] {
        let mut dx = be.upload(&vals(s.len(), 13))?;
        let mut dg = be.upload(&vals(5, 14))?;
        let mut db = be.upload(&vals(5, 15))?;
        be.batch_norm_backward(
            &s,
            &x,
            &dy,
            &gamma,
            &sm,
            &sr,
            Grads {
                dx: Some(&mut dx),
                dw: Some(&mut dg),
                db: Some(&mut db),
                accumulate,
            },
        )?;
        o.buf(
            be,
            format!("batch_norm backward dx acc={accumulate}"),
            &dx,
            s.len(),
            SUMS,
        )?;
        o.buf(
            be,
            format!("batch_norm backward dgamma acc={accumulate}"),
            &dg,
            5,
            SUMS,
        )?;
        o.buf(
            be,
            format!("batch_norm backward dbeta acc={accumulate}"),
            &db,
            5,
            SUMS,
        )?;
    }
    let mut dx = be.zeros(s.len())?;
    be.batch_norm_backward(
        &s,
        &x,
        &dy,
        &gamma,
        &sm,
        &sr,
        Grads {
            dx: Some(&mut dx),
            dw: None,
            db: None,
            accumulate: false,
        },
    )?;
    o.buf(be, "batch_norm backward dx only", &dx, s.len(), SUMS)?;
    Ok(o)
}

#[test]
fn layer_and_batch_norm_match_the_cpu_backend() {
    both!("norms", norms);
}

fn attention_ops<B: Backend>(be: &B) -> Result<Outs> {
    let mut o = Outs::new();
    let (h, d, cap) = (2, 8, 12);
    let c = h * d;
    let cache = |b: &B| KvCache::new(b, h, d, cap);
    // Caches of different capacities in one batch.
    let (mut a, mut b, mut e) = (
        cache(be)?,
        KvCache::new(be, h, d, 9)?,
        KvCache::new(be, h, d, 3)?,
    );
    // Prefill: 5 positions into a, 3 into b (two sequences of 3 in one call: a2 and b).
    let qkv = be.upload(&vals(5 * 3 * c, 1))?;
    let mut out = be.zeros(5 * c)?;
    be.attention(&qkv, 5, &mut [&mut a], &mut out)?;
    o.buf(be, "prefill out", &out, 5 * c, SUMS)?;
    let mut a2 = cache(be)?;
    let qkv2 = be.upload(&vals(2 * 3 * 3 * c, 2))?;
    let mut out2 = be.zeros(2 * 3 * c)?;
    be.attention(&qkv2, 3, &mut [&mut a2, &mut b], &mut out2)?;
    o.buf(be, "two-sequence prefill out", &out2, 2 * 3 * c, SUMS)?;
    // Decode steps: three sequences at lengths 5, 3 and 0, then again.
    for step in 0..2 {
        let q = be.upload(&vals(3 * 3 * c, 10 + step))?;
        let mut out = be.zeros(3 * c)?;
        be.attention(&q, 1, &mut [&mut a, &mut b, &mut e], &mut out)?;
        o.buf(be, format!("decode step {step} out"), &out, 3 * c, SUMS)?;
    }
    for (name, k) in [("a", &a), ("b", &b), ("e", &e), ("a2", &a2)] {
        o.push(format!("cache {name} len"), vec![k.len as f32], EXACT);
        o.buf(
            be,
            format!("cache {name} keys"),
            &k.k,
            h * k.capacity * d,
            EXACT,
        )?;
        o.buf(
            be,
            format!("cache {name} values"),
            &k.v,
            h * k.capacity * d,
            EXACT,
        )?;
    }
    // Training attention: forward with LSE, backward into the fused gradient.
    let (batch, seq) = (2, 7);
    let rows = batch * seq;
    let qkv = be.upload(&vals(rows * 3 * c, 20))?;
    let mut out = be.zeros(rows * c)?;
    let mut lse = be.zeros(batch * h * seq)?;
    be.attention_train(&qkv, &mut out, &mut lse, batch, seq, h, d)?;
    o.buf(be, "attention_train out", &out, rows * c, SUMS)?;
    o.buf(be, "attention_train lse", &lse, batch * h * seq, SUMS)?;
    let dout = be.upload(&vals(rows * c, 21))?;
    let mut dqkv = be.upload(&vals(rows * 3 * c, 22))?;
    be.attention_backward(&qkv, &out, &dout, &lse, &mut dqkv, batch, seq, h, d)?;
    o.buf(be, "attention_backward dqkv", &dqkv, rows * 3 * c, SUMS)?;
    Ok(o)
}

#[test]
fn attention_with_caches_and_for_training_matches_the_cpu_backend() {
    both!("attention", attention_ops);
}

fn convolutions<B: Backend>(be: &B) -> Result<Outs> {
    let mut o = Outs::new();
    let conv = ConvGeometry::conv2d([2, 3, 9, 9], [5, 3, 3, 3], &Conv2dParams::new(2, 1))?;
    let convt =
        ConvGeometry::conv_transpose2d([2, 4, 5, 5], [4, 3, 4, 4], &Conv2dParams::new(2, 1))?;
    for (name, g) in [("conv2d", conv), ("conv_transpose2d", convt)] {
        let x = be.upload(&vals(g.input_len(), 1))?;
        let w = be.upload(&scaled(g.weight_len(), 2, 0.3))?;
        let bias = be.upload(&vals(g.out_channels(), 3))?;
        let mut y = be.upload(&vals(g.output_len(), 4))?;
        be.conv(&g, &x, &w, Some(&bias), &mut y)?;
        o.buf(be, format!("{name} forward"), &y, g.output_len(), SUMS)?;
        be.conv(&g, &x, &w, None, &mut y)?;
        o.buf(
            be,
            format!("{name} forward no bias"),
            &y,
            g.output_len(),
            SUMS,
        )?;
        let dy = be.upload(&vals(g.output_len(), 5))?;
        for accumulate in [false, true] {
            let mut dx = be.upload(&vals(g.input_len(), 6))?;
            let mut dw = be.upload(&vals(g.weight_len(), 7))?;
            let mut db = be.upload(&vals(g.out_channels(), 8))?;
            be.conv_backward(
                &g,
                &x,
                &w,
                &dy,
                Grads {
                    dx: Some(&mut dx),
                    dw: Some(&mut dw),
                    db: Some(&mut db),
                    accumulate,
                },
            )?;
            let tag = format!("{name} backward acc={accumulate}");
            o.buf(be, format!("{tag} dx"), &dx, g.input_len(), SUMS)?;
            o.buf(be, format!("{tag} dw"), &dw, g.weight_len(), SUMS)?;
            o.buf(be, format!("{tag} db"), &db, g.out_channels(), SUMS)?;
        }
    }
    Ok(o)
}

#[test]
fn convolutions_match_the_cpu_backend() {
    both!("convolutions", convolutions);
}

fn adam<B: Backend>(be: &B) -> Result<Outs> {
    let mut o = Outs::new();
    let lens = [37, 5];
    let mut p: Vec<B::Buf> = lens
        .iter()
        .map(|&n| be.upload(&vals(n, n as u64)))
        .collect::<Result<_>>()?;
    let g: Vec<B::Buf> = lens
        .iter()
        .map(|&n| be.upload(&vals(n, 100 + n as u64)))
        .collect::<Result<_>>()?;
    let mut m: Vec<B::Buf> = lens.iter().map(|&n| be.zeros(n)).collect::<Result<_>>()?;
    let mut v: Vec<B::Buf> = lens.iter().map(|&n| be.zeros(n)).collect::<Result<_>>()?;
    for (step, cfg) in [
        (1, AdamConfig::adam(1e-2)),
        (
            2,
            AdamConfig {
                weight_decay: 0.1,
                decoupled: true,
                ..AdamConfig::adam(1e-2)
            },
        ),
        (
            3,
            AdamConfig {
                weight_decay: 0.1,
                ..AdamConfig::adam(1e-3)
            },
        ),
    ] {
        let mut pr: Vec<&mut B::Buf> = p.iter_mut().collect();
        let gr: Vec<&B::Buf> = g.iter().collect();
        let mut mr: Vec<&mut B::Buf> = m.iter_mut().collect();
        let mut vr: Vec<&mut B::Buf> = v.iter_mut().collect();
        be.adam(&cfg, step, &mut pr, &gr, &mut mr, &mut vr)?;
    }
    for (i, &n) in lens.iter().enumerate() {
        o.buf(be, format!("adam param {i}"), &p[i], n, SUMS)?;
        o.buf(be, format!("adam m {i}"), &m[i], n, SUMS)?;
        o.buf(be, format!("adam v {i}"), &v[i], n, SUMS)?;
    }
    Ok(o)
}

#[test]
fn adam_matches_the_cpu_backend() {
    both!("adam", adam);
}

/// Rows of a row-invariant product are bitwise each row alone (the batched decode step's
/// promise), for more rows than the decode kernel takes at once.
#[test]
fn row_invariant_products_give_each_row_its_own_result() {
    for be in shared() {
        let (m, k, n) = (9, 33, 70);
        let t = tensor(k, n, 1, DType::F32).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let w = be
                .upload_matrix(
                    &t,
                    &MatrixOptions {
                        dtype: Some(dtype),
                        ..Default::default()
                    },
                )
                .unwrap();
            let bias = be.upload(&vals(n, 2)).unwrap();
            let xs = vals(m * k, 3);
            let x = be.upload(&xs).unwrap();
            let mut y = be.zeros(m * n).unwrap();
            let d = LinearDims::new(m, k, n).rows_invariant(true);
            be.linear(&x, &w, Some(&bias), &mut y, d, Activation::GeluTanh)
                .unwrap();
            let all = download_all(be, &y).unwrap();
            for r in 0..m {
                let xr = be.upload(&xs[r * k..(r + 1) * k]).unwrap();
                let mut yr = be.zeros(n).unwrap();
                be.linear(
                    &xr,
                    &w,
                    Some(&bias),
                    &mut yr,
                    LinearDims::new(1, k, n),
                    Activation::GeluTanh,
                )
                .unwrap();
                assert_eq!(
                    download_all(be, &yr).unwrap(),
                    all[r * n..(r + 1) * n],
                    "{dtype} row {r}"
                );
            }
        }
    }
}

/// Bad input is an error (never a panic), and a failed op changes nothing it should not.
#[test]
fn bad_input_is_an_error() {
    for be in shared() {
        let x = be.upload(&[1.0; 8]).unwrap();
        let mut y = be.zeros(4).unwrap();
        assert!(be.add(&mut y, &x, 5).is_err());
        assert!(be.copy(&x, 6, &mut y, 0, 3).is_err());
        assert!(be.upload_into(&[1.0; 3], &mut y, 2).is_err());
        let mut out = [0f32; 3];
        assert!(be.download(&x, 6, &mut out).is_err());
        assert!(be
            .linear(
                &x,
                &x,
                None,
                &mut y,
                LinearDims::new(2, 4, 4),
                Activation::None
            )
            .is_err());
        // A weight matrix is read-only, and must match the product's shape.
        let t = tensor(4, 2, 1, DType::BF16).unwrap();
        let mut m = be.upload_matrix(&t, &MatrixOptions::default()).unwrap();
        assert!(be.fill(&mut m, 8, 0.0).is_err());
        assert!(be
            .linear(
                &x,
                &m,
                None,
                &mut y,
                LinearDims::new(2, 2, 4),
                Activation::None
            )
            .is_err());
        assert!(be
            .upload_matrix(
                &Tensor::from_vec(vec![1f32; 8], vec![2, 2, 2]).unwrap(),
                &MatrixOptions::default()
            )
            .is_err());
        // Ids and positions out of range.
        let table = be.upload(&[0.5; 12]).unwrap();
        let mut e = be.zeros(8).unwrap();
        assert!(be.embedding(&[3], &[0], &table, &table, 4, &mut e).is_err());
        assert!(be.embedding(&[0], &[3], &table, &table, 4, &mut e).is_err());
        assert!(be
            .embedding(&[0, 1], &[0], &table, &table, 4, &mut e)
            .is_err());
        let mut l = be.upload(&[0.0; 8]).unwrap();
        assert!(be.cross_entropy(&mut l, &[4, 0], 2, 4, None).is_err());
        assert!(be.cross_entropy(&mut l, &[1], 2, 4, None).is_err());
        // A BCE input that is not a probability.
        let p = be.upload(&[0.5, 1.5]).unwrap();
        let t = be.upload(&[1.0, 0.0]).unwrap();
        assert!(be.bce(&p, &t, 2).is_err());
        assert!(be.mean(&p, 0).is_err());
        assert!(be.dropout(&mut y, 4, 1.0, 1).is_err());
        // A full cache refuses before writing anything.
        let mut c1 = KvCache::new(be, 1, 4, 2).unwrap();
        let mut c2 = KvCache::new(be, 1, 4, 2).unwrap();
        let qkv = be.upload(&vals(3 * 12, 1)).unwrap();
        let mut out = be.zeros(12).unwrap();
        be.attention(&qkv, 2, &mut [&mut c1], &mut out).unwrap();
        assert!(be
            .attention(&qkv, 1, &mut [&mut c2, &mut c1], &mut out)
            .is_err());
        assert_eq!((c1.len, c2.len), (2, 0));
        let mut c3 = KvCache::new(be, 2, 2, 2).unwrap();
        assert!(be
            .attention(&qkv, 1, &mut [&mut c2, &mut c3], &mut out)
            .is_err());
        assert_eq!((c2.len, c3.len), (0, 0));
        // Adam with mismatched lists.
        let mut p = be.zeros(4).unwrap();
        assert!(be
            .adam(
                &AdamConfig::adam(0.1),
                1,
                &mut [&mut p],
                &[],
                &mut [],
                &mut []
            )
            .is_err());
    }
}

#[test]
fn without_a_gpu_new_is_the_no_device_error() {
    match CudaBackend::new(0) {
        Ok(be) => println!("a GPU is present: {}", be.device().info().name),
        Err(e) => assert!(is_no_device(&e), "{e}"),
    }
    // A bad ordinal is the same error, never a panic.
    if let Err(e) = CudaBackend::new(1 << 20) {
        assert!(is_no_device(&e), "{e}");
    }
}

// ---- GPT-2 --------------------------------------------------------------------------------------

/// The bf16 fixture checkpoint: 2 layers, width 64, 4 heads, the full vocabulary.
fn gpt2_dir() -> PathBuf {
    repo("tests/fixtures/gpt2")
}

/// Logits: both backends widen the same bf16 weights to f32 and sum in f32; only the order of
/// the sums differs (layer norms over 64 values, products of k = 64 or 256, the decode
/// kernel's warps vs kiln-cpu's blocked softmax). The logits are O(1); 1e-4 absolute + 1e-4
/// relative bounds those rounding differences by about 30 times what we observe (≈ 4e-6), and
/// is far below the gap between a model's top two logits that would change a greedy choice.
const LOGITS: (f32, f32) = (1e-4, 1e-4);

#[test]
fn gpt2_prefill_decode_and_batched_decode_match_the_cpu_backend() {
    let cpu = Gpt2::load(gpt2_dir(), &LoadOptions::default()).unwrap();
    let v = cpu.model.config.vocab_size;
    for be in backends("gpt2 decode") {
        let gpu = Gpt2::load_on(gpt2_dir(), &LoadOptions::default(), be).unwrap();
        let be = gpu.model.backend();
        let name = be.name();
        assert_eq!(gpu.model.weights.dtype, DType::BF16);
        let prompt = [464u32, 3139, 286, 4881, 318];
        let (mut sc, mut sg) = (
            cpu.model.new_state(16).unwrap(),
            gpu.model.new_state(16).unwrap(),
        );
        let (mut lc, mut lg) = (Vec::new(), Vec::new());
        // Prefill: the prompt's ids and positions in, one row of logits out.
        be.reset_transfers();
        let copies = be.device().host_copies();
        gpu.model
            .forward(&prompt, &mut sg, Logits::Last, &mut lg)
            .unwrap();
        let after = be.device().host_copies();
        assert_eq!(
            be.transfers(),
            Transfers {
                to_device: 1,
                to_device_elements: 10,
                to_host: 1,
                to_host_elements: v
            }
        );
        assert_eq!(
            (
                after.to_device - copies.to_device,
                after.to_host - copies.to_host
            ),
            (1, 1),
            "prefill copies"
        );
        cpu.model
            .forward(&prompt, &mut sc, Logits::Last, &mut lc)
            .unwrap();
        assert_close(
            &format!("prefill logits on {name}"),
            &lg,
            &lc,
            LOGITS.0,
            LOGITS.1,
        );
        let mut worst = max_abs_diff(&lg, &lc);
        // Decode steps: the id (and its position) in, the logits out; nothing else crosses.
        for id in [100u32, 7, 50256] {
            be.reset_transfers();
            let c0 = be.device().host_copies();
            gpu.model
                .forward(&[id], &mut sg, Logits::Last, &mut lg)
                .unwrap();
            let c1 = be.device().host_copies();
            assert_eq!(
                be.transfers(),
                Transfers {
                    to_device: 1,
                    to_device_elements: 2,
                    to_host: 1,
                    to_host_elements: v
                },
                "decode step {id} on {name}"
            );
            // At the device: one copy in (the id and its position, 8 bytes), one out (the
            // logits): no weight, activation or cache ever comes back.
            assert_eq!(c1.to_device - c0.to_device, 1);
            assert_eq!(c1.to_device_bytes - c0.to_device_bytes, 8);
            assert_eq!(c1.to_host - c0.to_host, 1);
            assert_eq!(c1.to_host_bytes - c0.to_host_bytes, 4 * v);
            cpu.model
                .forward(&[id], &mut sc, Logits::Last, &mut lc)
                .unwrap();
            worst = worst.max(max_abs_diff(&lg, &lc));
            assert_close(
                &format!("decode {id} logits on {name}"),
                &lg,
                &lc,
                LOGITS.0,
                LOGITS.1,
            );
        }
        // A batched decode step of five sequences at different lengths: one transfer in (all
        // ids and positions), one out (all rows); each row bitwise the sequence's own step.
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[9], &[40, 41, 42, 43, 44, 45, 46], &[5, 6]];
        let mut states = vec![sg];
        let mut states_cpu = vec![sc];
        for (i, p) in prompts.into_iter().enumerate() {
            // Each its own capacity, as generation makes them.
            let mut s = gpu.model.new_state(12 + i).unwrap();
            gpu.model.forward(p, &mut s, Logits::Last, &mut lg).unwrap();
            states.push(s);
            let mut s = cpu.model.new_state(12 + i).unwrap();
            cpu.model.forward(p, &mut s, Logits::Last, &mut lc).unwrap();
            states_cpu.push(s);
        }
        let ids = [11u32, 12, 13, 14, 15];
        // Each sequence's step alone, from copies of the states (re-run by truncating).
        let mut alone = Vec::new();
        for (s, &id) in states.iter_mut().zip(&ids) {
            let len = s.len();
            gpu.model.forward(&[id], s, Logits::Last, &mut lg).unwrap();
            alone.extend_from_slice(&lg);
            s.truncate(len);
        }
        be.reset_transfers();
        let c0 = be.device().host_copies();
        let mut refs: Vec<_> = states.iter_mut().collect();
        gpu.model.forward_batch(&ids, &mut refs, &mut lg).unwrap();
        let c1 = be.device().host_copies();
        assert_eq!(
            be.transfers(),
            Transfers {
                to_device: 1,
                to_device_elements: 10,
                to_host: 1,
                to_host_elements: 5 * v
            }
        );
        assert_eq!(
            (c1.to_device - c0.to_device, c1.to_host - c0.to_host),
            (1, 1)
        );
        assert!(
            lg == alone,
            "batched rows on {name} are not bitwise each sequence's own step"
        );
        let mut refs: Vec<_> = states_cpu.iter_mut().collect();
        cpu.model.forward_batch(&ids, &mut refs, &mut lc).unwrap();
        assert_close(
            &format!("batched decode logits on {name}"),
            &lg,
            &lc,
            LOGITS.0,
            LOGITS.1,
        );
        figure("gpt2_fixture_decode_logits_max_abs_diff", name, worst);
        figure(
            "gpt2_fixture_batched_logits_max_abs_diff",
            name,
            max_abs_diff(&lg, &lc),
        );
    }
}

/// Greedy generation gives the CPU backend's ids (also with f32 weights converted on the
/// device), and logits over a whole sequence agree.
#[test]
fn gpt2_greedy_generation_matches_the_cpu_backend() {
    for dtype in [DType::BF16, DType::F32] {
        let opts = LoadOptions {
            dtype: Some(dtype),
            ..Default::default()
        };
        let cpu = Gpt2::load(gpt2_dir(), &opts).unwrap();
        let gen = GenerateOptions {
            max_new_tokens: 6,
            ..Default::default()
        };
        // The fixture's first prompt, whose greedy steps PyTorch made with top-two margins of at
        // least 0.02: far above the backends' rounding differences, so the ids must agree.
        let prompt = [2061u32, 318, 262, 3139, 286, 4881, 30];
        let want = generate_ids(&cpu.model, &prompt, &gen, |_| Ok(true)).unwrap();
        for be in backends("gpt2 greedy") {
            let gpu = Gpt2::load_on(gpt2_dir(), &opts, be).unwrap();
            let got = generate_ids(&gpu.model, &prompt, &gen, |_| Ok(true)).unwrap();
            assert_eq!(
                got.ids,
                want.ids,
                "{dtype} on {}",
                gpu.model.backend().name()
            );
            let lg = gpu.model.logits(&prompt).unwrap();
            let lc = cpu.model.logits(&prompt).unwrap();
            assert_close(
                &format!("{dtype} logits [T, V]"),
                &lg,
                &lc,
                LOGITS.0,
                LOGITS.1,
            );
            let name = gpu.model.backend().name();
            figure(&format!("gpt2_fixture_{dtype}_greedy_ids_equal"), name, 1.0);
            figure(
                &format!("gpt2_fixture_{dtype}_prompt_logits_max_abs_diff"),
                name,
                max_abs_diff(&lg, &lc),
            );
        }
    }
}

// ---- DCGAN ----------------------------------------------------------------------------------------

/// One training iteration from the fixture checkpoints (ngf = ndf = 8) with the fixture's real
/// batch (4 images) and first noise: the six scalars, the generated batch, and every parameter
/// after both Adam steps against the CPU backend's iteration. Losses and means go through the
/// whole network (convolutions with k up to 1024, batch norm over 4·HW values, BCE): they are
/// compared at 1e-4 relative; parameters move by lr = 2e-4 per step, so after one Adam step
/// they agree to 1e-5 absolute + 1e-4 relative (Adam's update m/√v amplifies gradient
/// differences only where v is tiny, which the fixture's initial step keeps small).
#[test]
fn dcgan_training_iteration_matches_the_cpu_backend() {
    let st = SafeTensors::read(repo("tests/fixtures/dcgan/dcgan_train_step.safetensors")).unwrap();
    let real = st.tensor("real").unwrap().to_f32_vec().unwrap();
    let noise = st.tensor("noise").unwrap().to_f32_vec().unwrap();
    let g_path = repo("tests/fixtures/dcgan/dcgan_G.safetensors");
    let d_path = repo("tests/fixtures/dcgan/dcgan_D.safetensors");
    let cfg = TrainConfig {
        batch: 4,
        ..Default::default()
    };
    let cpu = CpuBackend::default();
    let mut want = Gan::new(
        &cpu,
        Generator::load(&cpu, &g_path, None).unwrap(),
        Discriminator::load(&cpu, &d_path, None).unwrap(),
        cfg,
    )
    .unwrap();
    let nl = want.noise_len();
    let mw = want.step(&cpu, &real, &noise[..nl]).unwrap();
    for be in backends("dcgan step") {
        let mut got = Gan::new(
            &be,
            Generator::load(&be, &g_path, None).unwrap(),
            Discriminator::load(&be, &d_path, None).unwrap(),
            cfg,
        )
        .unwrap();
        be.reset_transfers();
        let mg = got.step(&be, &real, &noise[..nl]).unwrap();
        // The batch and the noise in; the six scalars out.
        assert_eq!(
            be.transfers(),
            Transfers {
                to_device: 2,
                to_device_elements: real.len() + nl,
                to_host: 6,
                to_host_elements: 6
            }
        );
        let mut worst = 0f64;
        for (name, g, w) in [
            ("errD_real", mg.loss_d_real, mw.loss_d_real),
            ("errD_fake", mg.loss_d_fake, mw.loss_d_fake),
            ("errD", mg.loss_d, mw.loss_d),
            ("errG", mg.loss_g, mw.loss_g),
            ("D_x", mg.d_x, mw.d_x),
            ("D_G_z1", mg.d_g_z1, mw.d_g_z1),
            ("D_G_z2", mg.d_g_z2, mw.d_g_z2),
        ] {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{name}: {g} vs {w}"
            );
            worst = worst.max(((g - w).abs() / w.abs().max(1e-3)) as f64);
        }
        figure("dcgan_step_scalars_max_rel_diff", be.name(), worst);
        let fake = download_all(&be, got.g.net.output()).unwrap();
        let fake_cpu = download_all(&cpu, want.g.net.output()).unwrap();
        let n = got.batch_len();
        assert_close("fake batch", &fake[..n], &fake_cpu[..n], 1e-5, 1e-4);
        let cpu_params: Vec<(String, Vec<f32>)> = want
            .named_params()
            .into_iter()
            .map(|(n, p)| (n, p.values(&cpu).unwrap()))
            .collect();
        let mut worst = 0f64;
        for ((name, p), (_, w)) in got.named_params().into_iter().zip(cpu_params) {
            let g = p.values(&be).unwrap();
            assert_close(&format!("{name} after the step"), &g, &w, 1e-5, 1e-4);
            worst = worst.max(max_abs_diff(&g, &w));
        }
        figure("dcgan_step_params_max_abs_diff", be.name(), worst);
    }
}

// ---- GPT-2 training -----------------------------------------------------------------------------

/// A tiny GPT-2 of our own: 2 layers, 2 heads of width 16, 4·32 MLP, 16 positions, 331 tokens.
fn train_config() -> Gpt2Config {
    Gpt2Config {
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        n_positions: 16,
        vocab_size: 331,
        ..Gpt2Config::preset("tiny").unwrap()
    }
}

fn trainer<B: Backend>(be: B) -> Gpt2Trainer<B> {
    let cfg = train_config();
    let mut seed = 0;
    let weights = from_tensors(&be, &cfg, |name, shape| {
        seed += 1;
        let n = shape.iter().product();
        Ok(
            if name.ends_with("ln_1.weight")
                || name.ends_with("ln_2.weight")
                || name.ends_with("ln_f.weight")
            {
                scaled(n, seed, 0.1).into_iter().map(|v| v + 1.0).collect()
            } else {
                scaled(n, seed, 0.1)
            },
        )
    })
    .unwrap();
    Gpt2Trainer::new(Gpt2Model::with_backend(cfg, weights, be).unwrap()).unwrap()
}

/// One step: two micro-batches (2 sequences of 15 tokens), dropout 0.1 (the same masks on both
/// backends), clipping, AdamW. Against the CPU backend: the micro-batch losses (means of
/// log-softmax over 331 logits, 1e-5 relative), the gradients before the step (sums over 30
/// rows: 1e-6 absolute + 1e-3 relative), the gradient norm, and every parameter after the
/// step: Adam moves each by about lr·g/|g| = ±lr, so parameters agree to 1e-5 absolute + 1e-4
/// relative — except where the gradient is rounding noise around an exact zero (the key
/// biases: adding a constant to every key of a query leaves its softmax unchanged), where
/// g/(|g| + eps) is noise on either backend and the update may be anything in ±lr.
#[test]
fn gpt2_training_step_matches_the_cpu_backend() {
    let (b, t, lr) = (2, 15, 1e-3);
    let tokens: Vec<Vec<u32>> = (0..2)
        .map(|m| {
            (0..b * (t + 1))
                .map(|i| ((i * 37 + m * 101 + 5) % 331) as u32)
                .collect()
        })
        .collect();
    let opt = AdamW {
        grad_clip: 0.5,
        ..Default::default()
    };
    let names = kiln_models::gpt2::train::tensor_names(&train_config());
    let mut cpu = trainer(CpuBackend::default());
    cpu.dropout = 0.1;
    cpu.zero_grads().unwrap();
    let lc: Vec<f32> = tokens
        .iter()
        .enumerate()
        .map(|(m, tk)| cpu.forward_backward(tk, b, t, 0.5, 7 + m as u64).unwrap())
        .collect();
    let be_cpu = *cpu.model.backend();
    let gc: Vec<Vec<f32>> = cpu
        .grads
        .tensors()
        .iter()
        .map(|g| download_all(&be_cpu, g).unwrap())
        .collect();
    let nc = cpu.step(lr, &opt).unwrap();
    let want: Vec<Vec<f32>> = cpu
        .model
        .weights
        .tensors()
        .iter()
        .map(|w| download_all(&be_cpu, w).unwrap())
        .collect();
    for be in backends("gpt2 train step") {
        let mut gpu = trainer(be);
        gpu.dropout = 0.1;
        gpu.zero_grads().unwrap();
        let lg: Vec<f32> = tokens
            .iter()
            .enumerate()
            .map(|(m, tk)| gpu.forward_backward(tk, b, t, 0.5, 7 + m as u64).unwrap())
            .collect();
        assert_close("micro-batch losses", &lg, &lc, 1e-5, 1e-5);
        let name = gpu.model.backend().name();
        figure(
            "gpt2_train_step_loss_max_abs_diff",
            name,
            max_abs_diff(&lg, &lc),
        );
        for ((g, want), (name, _)) in gpu.grads.tensors().iter().zip(&gc).zip(&names) {
            let got = download_all(gpu.model.backend(), g).unwrap();
            assert_close(&format!("gradient of {name}"), &got, want, 1e-6, 1e-3);
        }
        gpu.model.backend().reset_transfers();
        let ng = gpu.step(lr, &opt).unwrap();
        let be = gpu.model.backend();
        // The step: the gradient norm out, nothing else.
        assert_eq!(
            be.transfers(),
            Transfers {
                to_device: 0,
                to_device_elements: 0,
                to_host: 1,
                to_host_elements: 1
            }
        );
        assert_close("gradient norm", &[ng], &[nc], 1e-5, 1e-4);
        figure(
            "gpt2_train_step_grad_norm_rel_diff",
            be.name(),
            ((ng - nc).abs() / nc) as f64,
        );
        let mut worst = 0f64;
        for (((w, want), g), (name, _)) in gpu
            .model
            .weights
            .tensors()
            .iter()
            .zip(&want)
            .zip(&gc)
            .zip(&names)
        {
            let got = download_all(be, w).unwrap();
            for (i, ((&x, &y), &gr)) in got.iter().zip(want).zip(g).enumerate() {
                let tol = if gr.abs() < 1e-7 {
                    2.0 * lr as f32
                } else {
                    1e-5 + 1e-4 * y.abs()
                };
                assert!(
                    (x - y).abs() <= tol,
                    "{name} after the step: element {i}: got {x}, want {y} (gradient {gr})"
                );
                if gr.abs() >= 1e-7 {
                    worst = worst.max((x as f64 - y as f64).abs());
                }
            }
        }
        figure("gpt2_train_step_params_max_abs_diff", be.name(), worst);
    }
}
