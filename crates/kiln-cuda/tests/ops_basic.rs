//! The element-wise, row, normalisation, loss, optimiser, reduction and embedding ops against
//! kiln-cpu (and kiln-nn's losses and Adam): on the CPU emulator (both thread orders, small odd
//! sizes) and on a GPU when there is one (larger odd sizes).
mod common;
use common::{assert_close, emulators, gpu, values};
use kiln_cpu::elementwise::activations::{self, Activation};
use kiln_cpu::norm::batch_norm::{self as bn, BnShape};
use kiln_cuda::ops::{elementwise as ew, embedding as emb, loss, norm, optim, reduce, softmax};
use kiln_cuda::{CudaBuf, CudaDevice};
use kiln_tensor::DType;

fn up(dev: &CudaDevice, x: &[f32]) -> CudaBuf {
    dev.upload(x).unwrap()
}
fn down(dev: &CudaDevice, b: &CudaBuf) -> Vec<f32> {
    dev.download::<f32>(b).unwrap()
}

fn on_devices(name: &str, small: impl Fn(&CudaDevice), big: impl Fn(&CudaDevice)) {
    for dev in emulators(name) {
        small(dev);
    }
    if let Some(dev) = gpu(name) {
        big(dev);
    }
}

// ---- element-wise ---------------------------------------------------------------------------

fn check_elementwise(dev: &CudaDevice, n: usize) {
    let x: Vec<f32> = values(n, 10).iter().map(|v| v * 4.0).collect();
    let dy = values(n, 11);
    let xb = up(dev, &x);
    let dyb = up(dev, &dy);
    // GELU forward, in place, backward (accumulating).
    let mut y = dev.zeros(DType::F32, n).unwrap();
    ew::gelu_forward(dev, &xb, &mut y, n).unwrap();
    let mut want = vec![0f32; n];
    kiln_cpu::elementwise::gelu::gelu_forward(&x, &mut want).unwrap();
    assert_close("gelu", &down(dev, &y), &want, 1e-6, 1e-5);
    let mut yi = up(dev, &x);
    ew::gelu_inplace(dev, &mut yi, n).unwrap();
    assert_close("gelu inplace", &down(dev, &yi), &want, 1e-6, 1e-5);
    let dx0 = values(n, 12);
    let mut dx = up(dev, &dx0);
    ew::gelu_backward(dev, &xb, &dyb, &mut dx, n).unwrap();
    let mut want = dx0.clone();
    kiln_cpu::elementwise::gelu::gelu_backward(&x, &dy, &mut want).unwrap();
    assert_close("gelu backward", &down(dev, &dx), &want, 1e-6, 1e-5);
    // Activations.
    for act in [
        Activation::Relu,
        Activation::LeakyRelu(0.2),
        Activation::Tanh,
        Activation::Sigmoid,
    ] {
        let mut y = dev.zeros(DType::F32, n).unwrap();
        ew::activation_forward(dev, act, &xb, &mut y, n).unwrap();
        let mut want = vec![0f32; n];
        activations::forward_with(activations::Isa::Scalar, act, &x, &mut want).unwrap();
        let got = down(dev, &y);
        assert_close(&format!("{act:?}"), &got, &want, 1e-6, 1e-5);
        let mut dx = dev.alloc(DType::F32, n).unwrap();
        ew::activation_backward(dev, act, &y, &dyb, &mut dx, n).unwrap();
        let mut wdx = vec![0f32; n];
        activations::backward(act, &got, &dy, &mut wdx).unwrap();
        assert_close(
            &format!("{act:?} backward"),
            &down(dev, &dx),
            &wdx,
            1e-6,
            1e-5,
        );
        let mut yi = up(dev, &x);
        ew::activation_inplace(dev, act, &mut yi, n).unwrap();
        assert_close(
            &format!("{act:?} inplace"),
            &down(dev, &yi),
            &want,
            1e-6,
            1e-5,
        );
    }
    assert!(ew::activation_forward(dev, Activation::LeakyRelu(-1.0), &xb, &mut y, n).is_err());
    // add, add_inplace, axpby.
    let mut out = dev.alloc(DType::F32, n).unwrap();
    ew::add(dev, &xb, &dyb, &mut out, n).unwrap();
    let want: Vec<f32> = x.iter().zip(&dy).map(|(a, b)| a + b).collect();
    assert_eq!(down(dev, &out), want);
    let mut acc = up(dev, &x);
    ew::add_inplace(dev, &mut acc, &dyb, n).unwrap();
    assert_eq!(down(dev, &acc), want);
    let mut yy = up(dev, &dy);
    ew::axpby(dev, 2.0, &xb, 0.5, &mut yy, n).unwrap();
    let want: Vec<f32> = x.iter().zip(&dy).map(|(a, b)| 2.0 * a + 0.5 * b).collect();
    assert_close("axpby", &down(dev, &yy), &want, 1e-6, 1e-6);
    // Casts, both ways, both 16-bit types (round to nearest even, as `half`).
    let mut b16 = dev.alloc(DType::BF16, n).unwrap();
    ew::cast(dev, &xb, &mut b16, n).unwrap();
    let want: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    assert_eq!(dev.download::<half::bf16>(&b16).unwrap(), want);
    let mut back = dev.alloc(DType::F32, n).unwrap();
    ew::cast(dev, &b16, &mut back, n).unwrap();
    assert_eq!(
        down(dev, &back),
        want.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
    );
    let mut f16b = dev.alloc(DType::F16, n).unwrap();
    ew::cast(dev, &xb, &mut f16b, n).unwrap();
    let want: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    assert_eq!(dev.download::<half::f16>(&f16b).unwrap(), want);
    ew::cast(dev, &f16b, &mut back, n).unwrap();
    assert_eq!(
        down(dev, &back),
        want.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
    );
    // Too-short buffers are errors.
    assert!(ew::gelu_forward(dev, &xb, &mut y, n + 1).is_err());
}

#[test]
fn elementwise_ops_match_cpu() {
    on_devices(
        "elementwise_ops_match_cpu",
        |d| check_elementwise(d, 1031),
        |d| check_elementwise(d, 1_000_003),
    );
}

// ---- softmax ---------------------------------------------------------------------------------

fn check_softmax(dev: &CudaDevice, rows: usize, cols: usize) {
    let n = rows * cols;
    let x: Vec<f32> = values(n, 20).iter().map(|v| v * 8.0).collect();
    let xb = up(dev, &x);
    let mut y = dev.alloc(DType::F32, n).unwrap();
    softmax::softmax_rows(dev, &xb, &mut y, rows, cols).unwrap();
    let mut want = vec![0f32; n];
    kiln_cpu::elementwise::softmax::softmax_rows(&x, rows, cols, &mut want).unwrap();
    assert_close("softmax", &down(dev, &y), &want, 1e-7, 1e-5);
    let mut xi = up(dev, &x);
    softmax::softmax_rows_inplace(dev, &mut xi, rows, cols).unwrap();
    assert_close("softmax inplace", &down(dev, &xi), &want, 1e-7, 1e-5);
    let dy = values(n, 21);
    let dx0 = values(n, 22);
    let mut dx = up(dev, &dx0);
    softmax::softmax_backward(dev, &y, &up(dev, &dy), &mut dx, rows, cols).unwrap();
    let mut wdx = dx0.clone();
    kiln_cpu::elementwise::softmax::softmax_backward(&want, &dy, rows, cols, &mut wdx).unwrap();
    assert_close("softmax backward", &down(dev, &dx), &wdx, 1e-6, 1e-4);
}

#[test]
fn softmax_matches_cpu() {
    on_devices(
        "softmax_matches_cpu",
        |d| {
            check_softmax(d, 3, 7);
            check_softmax(d, 2, 300);
        },
        |d| {
            check_softmax(d, 33, 50257);
            check_softmax(d, 257, 1);
        },
    );
}

// ---- layer norm ------------------------------------------------------------------------------

fn check_layer_norm(dev: &CudaDevice, rows: usize, dim: usize) {
    let n = rows * dim;
    let x: Vec<f32> = values(n, 30).iter().map(|v| v * 3.0 + 0.5).collect();
    let w = values(dim, 31);
    let b = values(dim, 32);
    let (xb, wb, bb) = (up(dev, &x), up(dev, &w), up(dev, &b));
    let mut out = dev.alloc(DType::F32, n).unwrap();
    let mut mean = dev.alloc(DType::F32, rows).unwrap();
    let mut rstd = dev.alloc(DType::F32, rows).unwrap();
    norm::layer_norm_forward(
        dev,
        &xb,
        &wb,
        &bb,
        rows,
        dim,
        1e-5,
        &mut out,
        Some(&mut mean),
        Some(&mut rstd),
    )
    .unwrap();
    let (mut wo, mut wm, mut wr) = (vec![0f32; n], vec![0f32; rows], vec![0f32; rows]);
    kiln_cpu::norm::layer_norm::layer_norm_forward(
        &x,
        &w,
        &b,
        rows,
        dim,
        1e-5,
        &mut wo,
        Some(&mut wm),
        Some(&mut wr),
    )
    .unwrap();
    assert_close("layer_norm out", &down(dev, &out), &wo, 1e-5, 1e-4);
    assert_close("layer_norm mean", &down(dev, &mean), &wm, 1e-6, 1e-5);
    assert_close("layer_norm rstd", &down(dev, &rstd), &wr, 1e-6, 1e-4);
    // Without statistics.
    let mut out2 = dev.alloc(DType::F32, n).unwrap();
    norm::layer_norm_forward(dev, &xb, &wb, &bb, rows, dim, 1e-5, &mut out2, None, None).unwrap();
    assert_close(
        "layer_norm out (no stats)",
        &down(dev, &out2),
        &wo,
        1e-5,
        1e-4,
    );
    // Backward, accumulating into nonzero gradients.
    let dout = values(n, 33);
    let (dx0, dw0, db0) = (values(n, 34), values(dim, 35), values(dim, 36));
    let (mut dx, mut dw, mut db) = (up(dev, &dx0), up(dev, &dw0), up(dev, &db0));
    norm::layer_norm_backward(
        dev,
        &up(dev, &dout),
        &xb,
        &wb,
        &mean,
        &rstd,
        rows,
        dim,
        &mut dx,
        &mut dw,
        &mut db,
    )
    .unwrap();
    let (mut wdx, mut wdw, mut wdb) = (dx0.clone(), dw0.clone(), db0.clone());
    kiln_cpu::norm::layer_norm::layer_norm_backward(
        &dout, &x, &w, &wm, &wr, rows, dim, &mut wdx, &mut wdw, &mut wdb,
    )
    .unwrap();
    assert_close("layer_norm dx", &down(dev, &dx), &wdx, 1e-5, 1e-3);
    assert_close("layer_norm dweight", &down(dev, &dw), &wdw, 1e-4, 1e-3);
    assert_close("layer_norm dbias", &down(dev, &db), &wdb, 1e-4, 1e-4);
}

#[test]
fn layer_norm_matches_cpu() {
    on_devices(
        "layer_norm_matches_cpu",
        |d| {
            check_layer_norm(d, 3, 37);
            check_layer_norm(d, 40, 300);
        },
        |d| {
            check_layer_norm(d, 1027, 768);
            check_layer_norm(d, 7, 1);
        },
    );
}

// ---- batch norm ------------------------------------------------------------------------------

fn check_batch_norm(dev: &CudaDevice, batch: usize, channels: usize, hw: usize) {
    let s = BnShape {
        batch,
        channels,
        hw,
    };
    let n = s.len();
    let x: Vec<f32> = values(n, 40).iter().map(|v| v * 2.0 + 1.0).collect();
    let gamma = values(channels, 41);
    let beta = values(channels, 42);
    let (rm0, rv0): (Vec<f32>, Vec<f32>) = (
        (0..channels).map(|c| c as f32 * 0.1).collect(),
        vec![1.0; channels],
    );
    let (xb, gb, bb) = (up(dev, &x), up(dev, &gamma), up(dev, &beta));
    let (mut rm, mut rv) = (up(dev, &rm0), up(dev, &rv0));
    let mut y = dev.alloc(DType::F32, n).unwrap();
    let mut sm = dev.alloc(DType::F32, channels).unwrap();
    let mut sr = dev.alloc(DType::F32, channels).unwrap();
    norm::batch_norm_train_forward(
        dev,
        &s,
        &xb,
        &gb,
        &bb,
        1e-5,
        0.1,
        Some((&mut rm, &mut rv)),
        &mut y,
        &mut sm,
        &mut sr,
    )
    .unwrap();
    let (mut wrm, mut wrv) = (rm0.clone(), rv0.clone());
    let mut wy = vec![0f32; n];
    let saved = bn::batch_norm_train_forward(
        &s,
        &x,
        &gamma,
        &beta,
        1e-5,
        0.1,
        Some((&mut wrm, &mut wrv)),
        &mut wy,
    )
    .unwrap();
    assert_close("bn y", &down(dev, &y), &wy, 1e-5, 1e-5);
    assert_close("bn mean", &down(dev, &sm), &saved.mean, 1e-7, 1e-6);
    assert_close("bn rstd", &down(dev, &sr), &saved.rstd, 1e-7, 1e-6);
    assert_close("bn running_mean", &down(dev, &rm), &wrm, 1e-7, 1e-6);
    assert_close("bn running_var", &down(dev, &rv), &wrv, 1e-7, 1e-6);
    // Eval forward from the updated running statistics.
    let mut ye = dev.alloc(DType::F32, n).unwrap();
    norm::batch_norm_eval_forward(dev, &s, &xb, &gb, &bb, &rm, &rv, 1e-5, &mut ye).unwrap();
    let mut wye = vec![0f32; n];
    bn::batch_norm_eval_forward(&s, &x, &gamma, &beta, &wrm, &wrv, 1e-5, &mut wye).unwrap();
    assert_close("bn eval y", &down(dev, &ye), &wye, 1e-5, 1e-5);
    // Train backward.
    let dy = values(n, 43);
    let dyb = up(dev, &dy);
    let mut dx = dev.alloc(DType::F32, n).unwrap();
    let mut dg = dev.alloc(DType::F32, channels).unwrap();
    let mut dbt = dev.alloc(DType::F32, channels).unwrap();
    norm::batch_norm_train_backward(
        dev, &s, &xb, &dyb, &gb, &sm, &sr, &mut dx, &mut dg, &mut dbt,
    )
    .unwrap();
    let (mut wdx, mut wdg, mut wdb) = (vec![0f32; n], vec![0f32; channels], vec![0f32; channels]);
    bn::batch_norm_train_backward(&s, &x, &dy, &gamma, &saved, &mut wdx, &mut wdg, &mut wdb)
        .unwrap();
    assert_close("bn dx", &down(dev, &dx), &wdx, 1e-5, 1e-4);
    assert_close("bn dgamma", &down(dev, &dg), &wdg, 1e-5, 1e-5);
    assert_close("bn dbeta", &down(dev, &dbt), &wdb, 1e-5, 1e-5);
    // Eval backward.
    norm::batch_norm_eval_backward(
        dev, &s, &xb, &dyb, &gb, &rm, &rv, 1e-5, &mut dx, &mut dg, &mut dbt,
    )
    .unwrap();
    bn::batch_norm_eval_backward(
        &s, &x, &dy, &gamma, &wrm, &wrv, 1e-5, &mut wdx, &mut wdg, &mut wdb,
    )
    .unwrap();
    assert_close("bn eval dx", &down(dev, &dx), &wdx, 1e-6, 1e-5);
    assert_close("bn eval dgamma", &down(dev, &dg), &wdg, 1e-5, 1e-5);
    assert_close("bn eval dbeta", &down(dev, &dbt), &wdb, 1e-5, 1e-5);
    // No running statistics; a shape with one value per channel is refused.
    norm::batch_norm_train_forward(
        dev, &s, &xb, &gb, &bb, 1e-5, 0.1, None, &mut y, &mut sm, &mut sr,
    )
    .unwrap();
    assert_close("bn y (no running)", &down(dev, &y), &wy, 1e-5, 1e-5);
    let one = BnShape {
        batch: 1,
        channels,
        hw: 1,
    };
    assert!(norm::batch_norm_train_forward(
        dev, &one, &xb, &gb, &bb, 1e-5, 0.1, None, &mut y, &mut sm, &mut sr
    )
    .is_err());
}

#[test]
fn batch_norm_matches_cpu() {
    on_devices(
        "batch_norm_matches_cpu",
        |d| check_batch_norm(d, 3, 5, 37),
        |d| {
            check_batch_norm(d, 64, 128, 257);
            check_batch_norm(d, 7, 3, 1);
        },
    );
}

// ---- losses ----------------------------------------------------------------------------------

fn check_bce(dev: &CudaDevice, n: usize) {
    let mut p: Vec<f32> = values(n, 50).iter().map(|v| (v + 1.0) / 2.0).collect();
    p[0] = 0.0;
    if n > 1 {
        p[1] = 1.0;
    }
    let t: Vec<f32> = values(n, 51)
        .iter()
        .map(|v| if *v > 0.0 { 1.0 } else { 0.0 })
        .collect();
    let (pb, tb) = (up(dev, &p), up(dev, &t));
    let mut l = dev.alloc(DType::F32, 1).unwrap();
    loss::bce_forward(dev, &pb, &tb, n, &mut l).unwrap();
    let want = kiln_nn::loss::bce_forward(&p, &t).unwrap();
    assert_close("bce", &down(dev, &l), &[want], 1e-6, 1e-5);
    // Deterministic: the same bits again.
    let mut l2 = dev.alloc(DType::F32, 1).unwrap();
    loss::bce_forward(dev, &pb, &tb, n, &mut l2).unwrap();
    assert_eq!(down(dev, &l)[0].to_bits(), down(dev, &l2)[0].to_bits());
    let mut dp = dev.alloc(DType::F32, n).unwrap();
    loss::bce_backward(dev, &pb, &tb, n, 0.7, &mut dp).unwrap();
    let mut wdp = vec![0f32; n];
    kiln_nn::loss::bce_backward(&p, &t, 0.7, &mut wdp).unwrap();
    assert_close("bce backward", &down(dev, &dp), &wdp, 1e-6, 1e-5);
}

#[test]
fn bce_matches_cpu() {
    on_devices(
        "bce_matches_cpu",
        |d| check_bce(d, 1001),
        |d| check_bce(d, 64 * 4097),
    );
}

fn ce_reference(logits: &[f32], targets: &[i32], vocab: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let rows = targets.len();
    let mut losses = vec![0f32; rows];
    let mut d = vec![0f32; rows * vocab];
    for r in 0..rows {
        let x = &logits[r * vocab..(r + 1) * vocab];
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        let t = targets[r];
        if t < 0 || t as usize >= vocab {
            continue;
        }
        losses[r] = (m + s.ln() - x[t as usize] as f64) as f32;
        for c in 0..vocab {
            let p = (x[c] as f64 - m).exp() / s;
            d[r * vocab + c] =
                (scale as f64 * (p - if c == t as usize { 1.0 } else { 0.0 })) as f32;
        }
    }
    (losses, d)
}

fn check_cross_entropy(dev: &CudaDevice, rows: usize, vocab: usize) {
    let logits: Vec<f32> = values(rows * vocab, 60).iter().map(|v| v * 10.0).collect();
    let mut targets: Vec<i32> = (0..rows).map(|r| ((r * 7919) % vocab) as i32).collect();
    targets[rows - 1] = -100; // ignored
    let (lb, tb) = (up(dev, &logits), dev.upload(&targets).unwrap());
    let scale = 1.0 / rows as f32;
    let (wl, wd) = ce_reference(&logits, &targets, vocab, scale);
    let mut l = dev.alloc(DType::F32, rows).unwrap();
    loss::cross_entropy_forward(dev, &lb, &tb, rows, vocab, &mut l).unwrap();
    assert_close("ce losses", &down(dev, &l), &wl, 1e-5, 1e-5);
    let mut d = dev.alloc(DType::F32, rows * vocab).unwrap();
    let mut l2 = dev.alloc(DType::F32, rows).unwrap();
    loss::cross_entropy_backward(dev, &lb, &tb, rows, vocab, scale, Some(&mut l2), &mut d).unwrap();
    assert_close("ce losses (fused)", &down(dev, &l2), &wl, 1e-5, 1e-5);
    assert_close("ce dlogits", &down(dev, &d), &wd, 1e-8, 1e-4);
    let mut inplace = up(dev, &logits);
    loss::cross_entropy_backward_inplace(dev, &mut inplace, &tb, rows, vocab, scale, None).unwrap();
    assert_close("ce dlogits in place", &down(dev, &inplace), &wd, 1e-8, 1e-4);
}

#[test]
fn cross_entropy_matches_reference() {
    on_devices(
        "cross_entropy_matches_reference",
        |d| check_cross_entropy(d, 3, 301),
        |d| check_cross_entropy(d, 65, 50257),
    );
}

// ---- Adam ------------------------------------------------------------------------------------

fn check_adam(dev: &CudaDevice, n: usize) {
    for (cfg, decoupled) in [
        (
            kiln_nn::optim::AdamConfig::adam(1e-3).betas(0.5, 0.999),
            false,
        ),
        (kiln_nn::optim::AdamConfig::adamw(3e-4, 0.1), true),
        (
            kiln_nn::optim::AdamConfig {
                weight_decay: 0.01,
                ..kiln_nn::optim::AdamConfig::adam(1e-2)
            },
            false,
        ),
    ] {
        assert_eq!(cfg.decoupled, decoupled);
        let p0 = values(n, 70);
        let mut cpu = kiln_nn::optim::Adam::new(cfg, &[n]).unwrap();
        let mut pc = p0.clone();
        let mut pb = up(dev, &p0);
        let mut m = dev.zeros(DType::F32, n).unwrap();
        let mut v = dev.zeros(DType::F32, n).unwrap();
        let params = optim::AdamParams {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            decoupled: cfg.decoupled,
        };
        for step in 1..=3u64 {
            let g = values(n, 71 + step);
            cpu.step(&mut [&mut pc], &[&g]).unwrap();
            optim::adam_step(dev, &params, step, &mut pb, &up(dev, &g), &mut m, &mut v, n).unwrap();
        }
        assert_close("adam params", &down(dev, &pb), &pc, 1e-7, 1e-5);
        assert_close("adam m", &down(dev, &m), &cpu.m[0], 1e-7, 1e-5);
        assert_close("adam v", &down(dev, &v), &cpu.v[0], 1e-9, 1e-5);
    }
}

#[test]
fn adam_matches_cpu() {
    on_devices(
        "adam_matches_cpu",
        |d| check_adam(d, 1001),
        |d| check_adam(d, 1 << 20 | 7),
    );
}

// ---- reductions ------------------------------------------------------------------------------

fn check_reductions(dev: &CudaDevice, rows: usize, cols: usize) {
    let a = values(rows * cols, 80);
    let b = values(1 + rows, 81);
    let (ab, bb) = (up(dev, &a), up(dev, &b));
    let mut out = dev.alloc(DType::F32, 1).unwrap();
    reduce::grad_norm(dev, &[&ab, &bb], &mut out).unwrap();
    let want = a
        .iter()
        .chain(&b)
        .map(|&v| v as f64 * v as f64)
        .sum::<f64>()
        .sqrt() as f32;
    assert_close("grad_norm", &down(dev, &out), &[want], 1e-6, 1e-5);
    reduce::sum_squares(dev, &[&ab], &mut out).unwrap();
    let want = a.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32;
    assert_close("sum_squares", &down(dev, &out), &[want], 1e-6, 1e-5);
    // Column sums (overwrite, accumulate).
    let mut cs = up(dev, &vec![1.0; cols]);
    reduce::column_sums(dev, &ab, rows, cols, &mut cs, true).unwrap();
    let want: Vec<f32> = (0..cols)
        .map(|j| 1.0 + (0..rows).map(|i| a[i * cols + j] as f64).sum::<f64>() as f32)
        .collect();
    assert_close("column_sums", &down(dev, &cs), &want, 1e-5, 1e-5);
    reduce::column_sums(dev, &ab, rows, cols, &mut cs, false).unwrap();
    let want: Vec<f32> = want.iter().map(|w| w - 1.0).collect();
    assert_close(
        "column_sums (overwrite)",
        &down(dev, &cs),
        &want,
        1e-5,
        1e-5,
    );
    // Channel sums as kiln-cpu's conv bias gradient.
    let (n, c, hw) = (3, cols.min(5), rows);
    let x = &a[..n * c * hw];
    let mut ch = dev.alloc(DType::F32, c).unwrap();
    reduce::channel_sums(dev, &ab, n, c, hw, &mut ch, false).unwrap();
    let mut wc = vec![0f32; c];
    kiln_cpu::conv::bias_grad(x, n, c, hw, &mut wc);
    assert_close("channel_sums", &down(dev, &ch), &wc, 1e-6, 1e-5);
}

#[test]
fn reductions_match_reference() {
    on_devices(
        "reductions_match_reference",
        |d| check_reductions(d, 37, 300),
        |d| check_reductions(d, 4099, 769),
    );
}

// ---- embedding -------------------------------------------------------------------------------

fn check_embedding(
    dev: &CudaDevice,
    batch: usize,
    seq: usize,
    vocab: usize,
    npos: usize,
    dim: usize,
) {
    let nt = batch * seq;
    let ids: Vec<u32> = (0..nt).map(|i| ((i * 7 + i / 3) % vocab) as u32).collect();
    emb::check_ids(&ids, vocab).unwrap();
    assert!(emb::check_ids(&[vocab as u32], vocab).is_err());
    let wte = values(vocab * dim, 90);
    let wpe = values(npos * dim, 91);
    let idb = dev.upload(&ids).unwrap();
    let mut out = dev.alloc(DType::F32, nt * dim).unwrap();
    let pos_start = npos - seq;
    emb::embedding_forward(
        dev,
        &idb,
        nt,
        seq,
        &up(dev, &wte),
        &up(dev, &wpe),
        pos_start,
        dim,
        &mut out,
    )
    .unwrap();
    let mut want = vec![0f32; nt * dim];
    kiln_cpu::elementwise::embedding::embedding_forward(
        &ids, seq, &wte, &wpe, pos_start, dim, &mut want,
    )
    .unwrap();
    assert_eq!(down(dev, &out), want);
    // bf16 tables.
    let wte16: Vec<half::bf16> = wte.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let wpe16: Vec<half::bf16> = wpe.iter().map(|&v| half::bf16::from_f32(v)).collect();
    emb::embedding_forward(
        dev,
        &idb,
        nt,
        seq,
        &dev.upload(&wte16).unwrap(),
        &dev.upload(&wpe16).unwrap(),
        pos_start,
        dim,
        &mut out,
    )
    .unwrap();
    kiln_cpu::elementwise::embedding::embedding_forward(
        &ids, seq, &wte16, &wpe16, pos_start, dim, &mut want,
    )
    .unwrap();
    assert_eq!(down(dev, &out), want);
    // Positions past the table are a capacity error.
    assert!(emb::embedding_forward(
        dev,
        &idb,
        nt,
        seq,
        &up(dev, &wte),
        &up(dev, &wpe),
        pos_start + 1,
        dim,
        &mut out
    )
    .is_err());
    // Backward: bitwise kiln-cpu's sequential accumulation.
    let dout = values(nt * dim, 92);
    let (dwte0, dwpe0) = (values(vocab * dim, 93), values(npos * dim, 94));
    let (mut dwte, mut dwpe) = (up(dev, &dwte0), up(dev, &dwpe0));
    emb::embedding_backward(
        dev,
        &idb,
        nt,
        seq,
        &up(dev, &dout),
        pos_start,
        dim,
        &mut dwte,
        &mut dwpe,
    )
    .unwrap();
    let (mut wdwte, mut wdwpe) = (dwte0.clone(), dwpe0.clone());
    kiln_cpu::elementwise::embedding::embedding_backward(
        &ids, seq, &dout, pos_start, dim, &mut wdwte, &mut wdwpe,
    )
    .unwrap();
    assert_eq!(down(dev, &dwte), wdwte);
    assert_eq!(down(dev, &dwpe), wdwpe);
}

#[test]
fn embedding_matches_cpu() {
    on_devices(
        "embedding_matches_cpu",
        |d| check_embedding(d, 3, 67, 131, 70, 33),
        |d| check_embedding(d, 8, 1024, 50257, 1024, 768),
    );
}
