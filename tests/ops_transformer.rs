//! Layer norm, GELU (tanh), row softmax, residual add and embedding gather: against PyTorch
//! fixtures (`tests/fixtures/make_attention_fixtures.py`), naive f64 twins, every kernel family
//! this CPU runs, bitwise equality between 1 and 2 threads, and clear errors on bad input.
use half::bf16;
use kiln::cpu::attention::Isa;
use kiln::cpu::elementwise::add::{add, add_inplace};
use kiln::cpu::elementwise::embedding::{embedding_backward, embedding_forward};
use kiln::cpu::elementwise::gelu::{
    gelu_backward, gelu_backward_isa, gelu_forward, gelu_forward_isa, gelu_inplace,
};
use kiln::cpu::elementwise::softmax::{
    softmax_backward, softmax_rows, softmax_rows_inplace, softmax_rows_isa,
};
use kiln::cpu::norm::layer_norm::{layer_norm_backward, layer_norm_forward};
use kiln::Error;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/attention/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| amp * self.next()).collect()
    }
}

fn on_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
        .install(f)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn layer_norm_matches_torch() {
    let fx = fixture("layer_norm.json");
    for c in fx["cases"].as_array().unwrap() {
        let rows = c["rows"].as_u64().unwrap() as usize;
        let dim = c["dim"].as_u64().unwrap() as usize;
        let eps = c["eps"].as_f64().unwrap() as f32;
        let (x, w, b) = (floats(&c["x"]), floats(&c["weight"]), floats(&c["bias"]));
        let mut out = vec![0f32; rows * dim];
        let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
        layer_norm_forward(
            &x,
            &w,
            &b,
            rows,
            dim,
            eps,
            &mut out,
            Some(&mut mean),
            Some(&mut rstd),
        )
        .unwrap();
        assert_close(&out, &floats(&c["out"]), 2e-5, 2e-5, "layer_norm out");
        let dout = floats(&c["dout"]);
        let mut dx = vec![0f32; rows * dim];
        let (mut dw, mut db) = (vec![0f32; dim], vec![0f32; dim]);
        layer_norm_backward(
            &dout, &x, &w, &mean, &rstd, rows, dim, &mut dx, &mut dw, &mut db,
        )
        .unwrap();
        assert_close(&dx, &floats(&c["dx"]), 2e-5, 1e-4, "layer_norm dx");
        assert_close(
            &dw,
            &floats(&c["dweight"]),
            2e-5,
            1e-4,
            "layer_norm dweight",
        );
        assert_close(&db, &floats(&c["dbias"]), 2e-5, 1e-4, "layer_norm dbias");
        // Accumulation: a second backward doubles every gradient.
        let (dx1, dw1) = (dx.clone(), dw.clone());
        layer_norm_backward(
            &dout, &x, &w, &mean, &rstd, rows, dim, &mut dx, &mut dw, &mut db,
        )
        .unwrap();
        assert_close(
            &dx,
            &dx1.iter().map(|v| 2.0 * v).collect::<Vec<_>>(),
            1e-6,
            1e-6,
            "2·dx",
        );
        assert_close(
            &dw,
            &dw1.iter().map(|v| 2.0 * v).collect::<Vec<_>>(),
            1e-6,
            1e-6,
            "2·dw",
        );
    }
}

#[test]
fn layer_norm_matches_naive_and_is_thread_independent() {
    for &(rows, dim) in &[(1usize, 1usize), (7, 33), (257, 7), (100, 768)] {
        let mut rng = Rng(rows as u64 * 31 + dim as u64);
        let x: Vec<f32> = rng.vec(rows * dim, 4.0).iter().map(|v| v + 10.0).collect();
        let w = rng.vec(dim, 1.0);
        let b = rng.vec(dim, 1.0);
        let dout = rng.vec(rows * dim, 1.0);
        let eps = 1e-5f32;
        // Naive f64 forward and backward.
        let mut want = vec![0f64; rows * dim];
        let mut want_dx = vec![0f64; rows * dim];
        let (mut want_dw, mut want_db) = (vec![0f64; dim], vec![0f64; dim]);
        for r in 0..rows {
            let xr: Vec<f64> = x[r * dim..(r + 1) * dim]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let m = xr.iter().sum::<f64>() / dim as f64;
            let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / dim as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            let n: Vec<f64> = xr.iter().map(|v| (v - m) * rs).collect();
            let g: Vec<f64> = (0..dim)
                .map(|j| w[j] as f64 * dout[r * dim + j] as f64)
                .collect();
            let gm = g.iter().sum::<f64>() / dim as f64;
            let gnm = g.iter().zip(&n).map(|(a, b)| a * b).sum::<f64>() / dim as f64;
            for j in 0..dim {
                want[r * dim + j] = n[j] * w[j] as f64 + b[j] as f64;
                want_dx[r * dim + j] = (g[j] - gm - n[j] * gnm) * rs;
                want_dw[j] += dout[r * dim + j] as f64 * n[j];
                want_db[j] += dout[r * dim + j] as f64;
            }
        }
        let run = |threads: usize| {
            on_threads(threads, || {
                let mut out = vec![0f32; rows * dim];
                let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
                layer_norm_forward(
                    &x,
                    &w,
                    &b,
                    rows,
                    dim,
                    eps,
                    &mut out,
                    Some(&mut mean),
                    Some(&mut rstd),
                )
                .unwrap();
                let mut dx = vec![0f32; rows * dim];
                let (mut dw, mut db) = (vec![0f32; dim], vec![0f32; dim]);
                layer_norm_backward(
                    &dout, &x, &w, &mean, &rstd, rows, dim, &mut dx, &mut dw, &mut db,
                )
                .unwrap();
                (out, dx, dw, db)
            })
        };
        let (out, dx, dw, db) = run(1);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        assert_close(&out, &f(&want), 1e-4, 1e-4, "ln out");
        assert_close(&dx, &f(&want_dx), 1e-3, 1e-3, "ln dx");
        assert_close(&dw, &f(&want_dw), 1e-3, 1e-3, "ln dw");
        assert_close(&db, &f(&want_db), 1e-3, 1e-3, "ln db");
        let (out2, dx2, dw2, db2) = run(2);
        assert_eq!(bits(&out), bits(&out2));
        assert_eq!(bits(&dx), bits(&dx2));
        assert_eq!(bits(&dw), bits(&dw2));
        assert_eq!(bits(&db), bits(&db2));
    }
}

#[test]
fn layer_norm_rejects_bad_lengths() {
    let x = vec![0f32; 12];
    let mut out = vec![0f32; 12];
    let w = vec![1f32; 4];
    assert!(layer_norm_forward(&x, &w, &w, 3, 5, 1e-5, &mut out, None, None).is_err());
    assert!(layer_norm_forward(&x, &w[..3], &w, 3, 4, 1e-5, &mut out, None, None).is_err());
    assert!(layer_norm_forward(&x, &w, &w, 3, 4, f32::NAN, &mut out, None, None).is_err());
    let mut m = vec![0f32; 2];
    assert!(layer_norm_forward(&x, &w, &w, 3, 4, 1e-5, &mut out, Some(&mut m), None).is_err());
    // A constant row: variance 0, output = bias, no NaN.
    layer_norm_forward(&x, &w, &w, 3, 4, 1e-5, &mut out, None, None).unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
}

#[test]
fn gelu_matches_torch_on_every_kernel() {
    let fx = fixture("gelu.json");
    let (x, want, dout, want_dx) = (
        floats(&fx["x"]),
        floats(&fx["out"]),
        floats(&fx["dout"]),
        floats(&fx["dx"]),
    );
    for isa in Isa::available() {
        let mut out = vec![0f32; x.len()];
        gelu_forward_isa(isa, &x, &mut out).unwrap();
        assert_close(&out, &want, 1e-6, 2e-6, &format!("gelu {isa:?}"));
        let mut dx = vec![0f32; x.len()];
        gelu_backward_isa(isa, &x, &dout, &mut dx).unwrap();
        assert_close(&dx, &want_dx, 2e-6, 1e-5, &format!("gelu dx {isa:?}"));
    }
    let mut y = x.clone();
    gelu_inplace(&mut y);
    assert_close(&y, &want, 1e-6, 2e-6, "gelu inplace");
}

#[test]
fn gelu_thread_independent_and_checked() {
    let mut rng = Rng(3);
    let x = rng.vec(100_003, 6.0);
    let d = rng.vec(100_003, 1.0);
    let run = |t| {
        on_threads(t, || {
            let mut y = vec![0f32; x.len()];
            gelu_forward(&x, &mut y).unwrap();
            let mut g = vec![0f32; x.len()];
            gelu_backward(&x, &d, &mut g).unwrap();
            (y, g)
        })
    };
    let (a, b) = (run(1), run(2));
    assert_eq!(bits(&a.0), bits(&b.0));
    assert_eq!(bits(&a.1), bits(&b.1));
    let mut short = vec![0f32; 3];
    assert!(gelu_forward(&x, &mut short).is_err());
}

#[test]
fn softmax_matches_torch_on_every_kernel() {
    let fx = fixture("softmax.json");
    for c in fx["cases"].as_array().unwrap() {
        let rows = c["rows"].as_u64().unwrap() as usize;
        let cols = c["cols"].as_u64().unwrap() as usize;
        let x = floats(&c["x"]);
        for isa in Isa::available() {
            let mut y = vec![0f32; x.len()];
            softmax_rows_isa(isa, &x, rows, cols, &mut y).unwrap();
            assert_close(
                &y,
                &floats(&c["out"]),
                1e-7,
                2e-6,
                &format!("softmax {isa:?}"),
            );
        }
        let mut y = x.clone();
        softmax_rows_inplace(&mut y, rows, cols).unwrap();
        assert_close(&y, &floats(&c["out"]), 1e-7, 2e-6, "softmax inplace");
        let mut dx = vec![0f32; x.len()];
        softmax_backward(&y, &floats(&c["dout"]), rows, cols, &mut dx).unwrap();
        assert_close(&dx, &floats(&c["dx"]), 1e-6, 1e-5, "softmax dx");
    }
}

#[test]
fn softmax_masked_rows_and_errors() {
    let ninf = f32::NEG_INFINITY;
    let x = vec![ninf, ninf, ninf, 0.0, ninf, 1.0];
    let mut y = vec![f32::NAN; 6];
    softmax_rows(&x, 2, 3, &mut y).unwrap();
    assert_eq!(&y[..3], &[0.0, 0.0, 0.0]);
    assert_eq!(y[4], 0.0);
    assert!((y[3] + y[5] - 1.0).abs() < 1e-6 && y[5] > y[3]);
    assert!(softmax_rows(&x, 4, 3, &mut y).is_err());
    let mut rng = Rng(4);
    let big = rng.vec(37 * 301, 50.0);
    let run = |t| {
        on_threads(t, || {
            let mut o = vec![0f32; big.len()];
            softmax_rows(&big, 37, 301, &mut o).unwrap();
            o
        })
    };
    assert_eq!(bits(&run(1)), bits(&run(2)));
}

#[test]
fn add_and_add_inplace() {
    let mut rng = Rng(5);
    let a = rng.vec(70_001, 1.0);
    let b = rng.vec(70_001, 1.0);
    let mut out = vec![0f32; a.len()];
    add(&a, &b, &mut out).unwrap();
    assert!(out
        .iter()
        .zip(a.iter().zip(&b))
        .all(|(o, (x, y))| *o == x + y));
    let mut acc = a.clone();
    add_inplace(&mut acc, &b).unwrap();
    assert_eq!(bits(&acc), bits(&out));
    assert!(add(&a, &b[1..], &mut out).is_err());
    assert!(add_inplace(&mut acc[1..], &b).is_err());
}

#[test]
fn embedding_forward_backward_and_errors() {
    let (vocab, npos, dim, seq) = (11, 9, 5, 4);
    let mut rng = Rng(6);
    let wte = rng.vec(vocab * dim, 1.0);
    let wpe = rng.vec(npos * dim, 1.0);
    let ids = [3u32, 0, 10, 3, 7, 7, 1, 2]; // [batch 2, seq 4]
    let pos_start = 5;
    let mut out = vec![0f32; ids.len() * dim];
    embedding_forward(&ids, seq, &wte, &wpe, pos_start, dim, &mut out).unwrap();
    for (n, &id) in ids.iter().enumerate() {
        let p = pos_start + n % seq;
        for c in 0..dim {
            assert_eq!(
                out[n * dim + c],
                wte[id as usize * dim + c] + wpe[p * dim + c]
            );
        }
    }
    // bf16 tables: exact widening, then the same sum.
    let wte_b: Vec<bf16> = wte.iter().map(|&v| bf16::from_f32(v)).collect();
    let wpe_b: Vec<bf16> = wpe.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut out_b = vec![0f32; ids.len() * dim];
    embedding_forward(&ids, seq, &wte_b, &wpe_b, pos_start, dim, &mut out_b).unwrap();
    assert_eq!(
        out_b[0],
        wte_b[3 * dim].to_f32() + wpe_b[pos_start * dim].to_f32()
    );
    // Backward accumulates every token's gradient.
    let dout = rng.vec(ids.len() * dim, 1.0);
    let mut dwte = vec![0f32; vocab * dim];
    let mut dwpe = vec![0f32; npos * dim];
    embedding_backward(&ids, seq, &dout, pos_start, dim, &mut dwte, &mut dwpe).unwrap();
    for c in 0..dim {
        // id 3 at tokens 0 and 3; id 7 at tokens 4 and 5.
        assert_eq!(dwte[3 * dim + c], dout[c] + dout[3 * dim + c]);
        assert_eq!(dwte[7 * dim + c], dout[4 * dim + c] + dout[5 * dim + c]);
        assert_eq!(dwpe[pos_start * dim + c], dout[c] + dout[4 * dim + c]);
        assert_eq!(dwte[4 * dim + c], 0.0);
    }
    // Errors: an id beyond the vocabulary, positions beyond the table, bad shapes.
    let e = embedding_forward(&[11], 1, &wte, &wpe, 0, dim, &mut out[..dim]).unwrap_err();
    assert!(e.to_string().contains("11"), "{e}");
    let e = embedding_forward(&ids, seq, &wte, &wpe, 6, dim, &mut out).unwrap_err();
    assert!(matches!(e, Error::Capacity(_)), "{e}");
    assert!(embedding_forward(&ids, 3, &wte, &wpe, 0, dim, &mut out).is_err());
    assert!(embedding_forward(&ids, seq, &wte, &wpe, 0, dim, &mut out[1..]).is_err());
}
