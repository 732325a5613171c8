//! Ops composed as the models compose them, against the same composition on kiln-cpu:
//! a GPT-2 block with the tied output projection (logits), and one training step of a DCGAN
//! discriminator (forward, BCE, backward through conv / batch norm / LeakyReLU / sigmoid, Adam).
//! Small sizes on the emulator; larger ones on a GPU.
mod common;
use common::{assert_close, emulators, gpu, values};
use kiln_cpu::attention::{self as cpu_att, HeadsMut, HeadsRef};
use kiln_cpu::conv::{self as cpu_conv, Conv2dParams, ConvGeometry};
use kiln_cpu::elementwise::activations::{self, Activation};
use kiln_cpu::gemm::{self as cpu_gemm, Epilogue, GemmOptions, MatMut, MatRef};
use kiln_cpu::norm::batch_norm::{self as cpu_bn, BnShape};
use kiln_cpu::norm::layer_norm as cpu_ln;
use kiln_cuda::ops::attention::{attention_forward, AttentionOptions, HeadsLayout, HeadsView};
use kiln_cuda::ops::gemm::{gemm, GemmDims, GemmEpilogue};
use kiln_cuda::ops::{conv, elementwise as ew, embedding, loss, norm, optim};
use kiln_cuda::{CudaBuf, CudaDevice};
use kiln_tensor::DType;

struct Gpt2Sizes {
    batch: usize,
    seq: usize,
    c: usize,
    heads: usize,
    vocab: usize,
}

/// Embedding, one transformer block, the final layer norm and the tied logits.
fn check_gpt2_block(dev: &CudaDevice, s: Gpt2Sizes) {
    let (b, t, c, h, v) = (s.batch, s.seq, s.c, s.heads, s.vocab);
    let (n, d) = (b * t, c / h);
    let ids: Vec<u32> = (0..n).map(|i| ((i * 13 + 5) % v) as u32).collect();
    let scaled =
        |len, seed, k: f32| -> Vec<f32> { values(len, seed).iter().map(|x| x * k).collect() };
    let wte = scaled(v * c, 1, 0.5);
    let wpe = scaled(t * c, 2, 0.1);
    let (ln1w, ln1b, ln2w, ln2b, lnfw, lnfb) = (
        scaled(c, 3, 1.0),
        scaled(c, 4, 0.1),
        scaled(c, 5, 1.0),
        scaled(c, 6, 0.1),
        scaled(c, 7, 1.0),
        scaled(c, 8, 0.1),
    );
    let (wa, ba) = (scaled(c * 3 * c, 9, 0.2), scaled(3 * c, 10, 0.1));
    let (wp, bp) = (scaled(c * c, 11, 0.2), scaled(c, 12, 0.1));
    let (wf, bf) = (scaled(c * 4 * c, 13, 0.2), scaled(4 * c, 14, 0.1));
    let (wfp, bfp) = (scaled(4 * c * c, 15, 0.1), scaled(c, 16, 0.1));

    // ---- CPU ----
    let mm = |a: &[f32],
              m: usize,
              k: usize,
              bm: &[f32],
              nn: usize,
              bt: bool,
              epi: Epilogue<'_>,
              out: &mut [f32]| {
        let bref = if bt {
            MatRef::row_major(bm, nn, k).t()
        } else {
            MatRef::row_major(bm, k, nn)
        };
        let opts = GemmOptions {
            epilogue: epi,
            ..Default::default()
        };
        cpu_gemm::gemm(
            MatRef::row_major(a, m, k),
            bref,
            MatMut::row_major(out, m, nn),
            &opts,
        )
        .unwrap();
    };
    let ln = |x: &[f32], w: &[f32], bb: &[f32]| -> Vec<f32> {
        let mut o = vec![0f32; n * c];
        cpu_ln::layer_norm_forward(x, w, bb, n, c, 1e-5, &mut o, None, None).unwrap();
        o
    };
    let mut x = vec![0f32; n * c];
    kiln_cpu::elementwise::embedding::embedding_forward(&ids, t, &wte, &wpe, 0, c, &mut x).unwrap();
    let hh = ln(&x, &ln1w, &ln1b);
    let mut qkv = vec![0f32; n * 3 * c];
    mm(&hh, n, c, &wa, 3 * c, false, Epilogue::Bias(&ba), &mut qkv);
    let mut att = vec![0f32; n * c];
    cpu_att::attention_forward(
        HeadsRef::fused_qkv(&qkv, b, t, h, d, 0).unwrap(),
        HeadsRef::fused_qkv(&qkv, b, t, h, d, 1).unwrap(),
        HeadsRef::fused_qkv(&qkv, b, t, h, d, 2).unwrap(),
        HeadsMut::seq_major(&mut att, b, t, h, d),
        cpu_att::AttentionOptions::causal(),
    )
    .unwrap();
    let mut proj = vec![0f32; n * c];
    mm(&att, n, c, &wp, c, false, Epilogue::Bias(&bp), &mut proj);
    for (a, p) in x.iter_mut().zip(&proj) {
        *a += p;
    }
    let hh = ln(&x, &ln2w, &ln2b);
    let mut f = vec![0f32; n * 4 * c];
    mm(
        &hh,
        n,
        c,
        &wf,
        4 * c,
        false,
        Epilogue::BiasGelu(&bf),
        &mut f,
    );
    let mut fp = vec![0f32; n * c];
    mm(&f, n, 4 * c, &wfp, c, false, Epilogue::Bias(&bfp), &mut fp);
    for (a, p) in x.iter_mut().zip(&fp) {
        *a += p;
    }
    let hh = ln(&x, &lnfw, &lnfb);
    let mut want = vec![0f32; n * v];
    mm(&hh, n, c, &wte, v, true, Epilogue::None, &mut want);

    // ---- device ----
    let up = |x: &[f32]| dev.upload(x).unwrap();
    let dgemm = |a: &CudaBuf,
                 bm: &CudaBuf,
                 out: &mut CudaBuf,
                 m: usize,
                 k: usize,
                 nn: usize,
                 bt: bool,
                 e: GemmEpilogue<'_>| {
        gemm(
            dev,
            a,
            bm,
            out,
            GemmDims {
                m,
                n: nn,
                k,
                a_t: false,
                b_t: bt,
            },
            1.0,
            0.0,
            e,
        )
        .unwrap();
    };
    let dln = |x: &CudaBuf, w: &[f32], bb: &[f32]| -> CudaBuf {
        let mut o = dev.alloc(DType::F32, n * c).unwrap();
        norm::layer_norm_forward(dev, x, &up(w), &up(bb), n, c, 1e-5, &mut o, None, None).unwrap();
        o
    };
    let wte_b = up(&wte);
    let mut xb = dev.alloc(DType::F32, n * c).unwrap();
    embedding::embedding_forward(
        dev,
        &dev.upload(&ids).unwrap(),
        n,
        t,
        &wte_b,
        &up(&wpe),
        0,
        c,
        &mut xb,
    )
    .unwrap();
    let hb = dln(&xb, &ln1w, &ln1b);
    let mut qkvb = dev.alloc(DType::F32, n * 3 * c).unwrap();
    let bab = up(&ba);
    dgemm(
        &hb,
        &up(&wa),
        &mut qkvb,
        n,
        c,
        3 * c,
        false,
        GemmEpilogue::Bias(&bab),
    );
    let mut attb = dev.alloc(DType::F32, n * c).unwrap();
    let l = |w| HeadsLayout::fused_qkv(b, t, h, d, w).unwrap();
    attention_forward(
        dev,
        HeadsView::new(&qkvb, l(0)),
        HeadsView::new(&qkvb, l(1)),
        HeadsView::new(&qkvb, l(2)),
        (&mut attb, HeadsLayout::seq_major(b, t, h, d)),
        None,
        AttentionOptions::causal(),
    )
    .unwrap();
    let mut projb = dev.alloc(DType::F32, n * c).unwrap();
    let bpb = up(&bp);
    dgemm(
        &attb,
        &up(&wp),
        &mut projb,
        n,
        c,
        c,
        false,
        GemmEpilogue::Bias(&bpb),
    );
    ew::add_inplace(dev, &mut xb, &projb, n * c).unwrap();
    let hb = dln(&xb, &ln2w, &ln2b);
    let mut fb = dev.alloc(DType::F32, n * 4 * c).unwrap();
    let bfb = up(&bf);
    dgemm(
        &hb,
        &up(&wf),
        &mut fb,
        n,
        c,
        4 * c,
        false,
        GemmEpilogue::BiasGelu(&bfb),
    );
    let mut fpb = dev.alloc(DType::F32, n * c).unwrap();
    let bfpb = up(&bfp);
    dgemm(
        &fb,
        &up(&wfp),
        &mut fpb,
        n,
        4 * c,
        c,
        false,
        GemmEpilogue::Bias(&bfpb),
    );
    ew::add_inplace(dev, &mut xb, &fpb, n * c).unwrap();
    let hb = dln(&xb, &lnfw, &lnfb);
    let mut logits = dev.alloc(DType::F32, n * v).unwrap();
    dgemm(&hb, &wte_b, &mut logits, n, c, v, true, GemmEpilogue::None);
    assert_close(
        "gpt2 block logits",
        &dev.download::<f32>(&logits).unwrap(),
        &want,
        1e-4,
        1e-3,
    );
}

/// One discriminator step: conv(3→c1, 4, s2, p1) → LeakyReLU(0.2) → conv(c1→c2, 4, s2, p1) →
/// batch norm (train) → LeakyReLU(0.2) → conv(c2→1, 4, s1, p0) → sigmoid → BCE against 1,
/// backward, then Adam (lr 2e-4, betas (0.5, 0.999)) on every parameter.
fn check_dcgan_step(dev: &CudaDevice, batch: usize, size: usize, c1: usize, c2: usize) {
    let p = Conv2dParams::new(2, 1);
    let g1 = ConvGeometry::conv2d([batch, 3, size, size], [c1, 3, 4, 4], &p).unwrap();
    let s1 = g1.output_shape();
    let g2 = ConvGeometry::conv2d(s1, [c2, c1, 4, 4], &p).unwrap();
    let s2 = g2.output_shape();
    let g3 = ConvGeometry::conv2d(s2, [1, c2, 4, 4], &Conv2dParams::new(1, 0)).unwrap();
    assert_eq!(
        g3.output_shape(),
        [batch, 1, 1, 1],
        "the sizes must end at 1×1"
    );
    let bn = BnShape {
        batch,
        channels: c2,
        hw: s2[2] * s2[3],
    };
    let x = values(g1.input_len(), 20);
    let w1 = values(g1.weight_len(), 21)
        .iter()
        .map(|v| v * 0.2)
        .collect::<Vec<_>>();
    let w2 = values(g2.weight_len(), 22)
        .iter()
        .map(|v| v * 0.1)
        .collect::<Vec<_>>();
    let w3 = values(g3.weight_len(), 23)
        .iter()
        .map(|v| v * 0.1)
        .collect::<Vec<_>>();
    let (gamma, beta) = (vec![1.0f32; c2], vec![0.0f32; c2]);
    let target = vec![1.0f32; batch];
    let leaky = Activation::LeakyRelu(0.2);
    let adam = kiln_nn::optim::AdamConfig::adam(2e-4).betas(0.5, 0.999);

    // ---- CPU ----
    let mut a1 = vec![0f32; g1.output_len()];
    cpu_conv::conv2d_forward(&g1, &x, &w1, None, &mut a1).unwrap();
    let mut h1 = vec![0f32; a1.len()];
    activations::forward(leaky, &a1, &mut h1).unwrap();
    let mut a2 = vec![0f32; g2.output_len()];
    cpu_conv::conv2d_forward(&g2, &h1, &w2, None, &mut a2).unwrap();
    let (mut rm, mut rv) = (vec![0f32; c2], vec![1f32; c2]);
    let mut b2 = vec![0f32; a2.len()];
    let saved = cpu_bn::batch_norm_train_forward(
        &bn,
        &a2,
        &gamma,
        &beta,
        1e-5,
        0.1,
        Some((&mut rm, &mut rv)),
        &mut b2,
    )
    .unwrap();
    let mut h2 = vec![0f32; b2.len()];
    activations::forward(leaky, &b2, &mut h2).unwrap();
    let mut a3 = vec![0f32; batch];
    cpu_conv::conv2d_forward(&g3, &h2, &w3, None, &mut a3).unwrap();
    let mut pr = vec![0f32; batch];
    activations::forward(Activation::Sigmoid, &a3, &mut pr).unwrap();
    let want_loss = kiln_nn::loss::bce_forward(&pr, &target).unwrap();
    let mut dp = vec![0f32; batch];
    kiln_nn::loss::bce_backward(&pr, &target, 1.0, &mut dp).unwrap();
    let mut da3 = vec![0f32; batch];
    activations::backward(Activation::Sigmoid, &pr, &dp, &mut da3).unwrap();
    let (mut dh2, mut dw3) = (vec![0f32; h2.len()], vec![0f32; w3.len()]);
    cpu_conv::conv2d_backward(&g3, &h2, &w3, &da3, Some(&mut dh2), Some(&mut dw3), None).unwrap();
    let mut db2 = vec![0f32; b2.len()];
    activations::backward(leaky, &h2, &dh2, &mut db2).unwrap();
    let (mut da2, mut dgamma, mut dbeta) = (vec![0f32; a2.len()], vec![0f32; c2], vec![0f32; c2]);
    cpu_bn::batch_norm_train_backward(
        &bn,
        &a2,
        &db2,
        &gamma,
        &saved,
        &mut da2,
        &mut dgamma,
        &mut dbeta,
    )
    .unwrap();
    let (mut dh1, mut dw2) = (vec![0f32; h1.len()], vec![0f32; w2.len()]);
    cpu_conv::conv2d_backward(&g2, &h1, &w2, &da2, Some(&mut dh1), Some(&mut dw2), None).unwrap();
    let mut da1 = vec![0f32; a1.len()];
    activations::backward(leaky, &h1, &dh1, &mut da1).unwrap();
    let mut dw1 = vec![0f32; w1.len()];
    cpu_conv::conv2d_backward(&g1, &x, &w1, &da1, None, Some(&mut dw1), None).unwrap();
    let mut params = [
        w1.clone(),
        w2.clone(),
        gamma.clone(),
        beta.clone(),
        w3.clone(),
    ];
    let sizes: Vec<usize> = params.iter().map(|p| p.len()).collect();
    let mut opt = kiln_nn::optim::Adam::new(adam, &sizes).unwrap();
    {
        let mut refs: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
        opt.step(&mut refs, &[&dw1, &dw2, &dgamma, &dbeta, &dw3])
            .unwrap();
    }

    // ---- device ----
    let up = |v: &[f32]| dev.upload(v).unwrap();
    let z = |n: usize| dev.zeros(DType::F32, n).unwrap();
    let xb = up(&x);
    let mut pw = [up(&w1), up(&w2), up(&gamma), up(&beta), up(&w3)];
    let mut a1b = z(a1.len());
    conv::conv2d_forward(dev, &g1, &xb, &pw[0], None, &mut a1b).unwrap();
    let mut h1b = z(a1.len());
    ew::activation_forward(dev, leaky, &a1b, &mut h1b, a1.len()).unwrap();
    let mut a2b = z(a2.len());
    conv::conv2d_forward(dev, &g2, &h1b, &pw[1], None, &mut a2b).unwrap();
    let (mut rmb, mut rvb) = (z(c2), up(&vec![1.0; c2]));
    let (mut b2b, mut smean, mut srstd) = (z(a2.len()), z(c2), z(c2));
    norm::batch_norm_train_forward(
        dev,
        &bn,
        &a2b,
        &pw[2],
        &pw[3],
        1e-5,
        0.1,
        Some((&mut rmb, &mut rvb)),
        &mut b2b,
        &mut smean,
        &mut srstd,
    )
    .unwrap();
    let mut h2b = z(a2.len());
    ew::activation_forward(dev, leaky, &b2b, &mut h2b, a2.len()).unwrap();
    let mut a3b = z(batch);
    conv::conv2d_forward(dev, &g3, &h2b, &pw[4], None, &mut a3b).unwrap();
    let mut prb = z(batch);
    ew::activation_forward(dev, Activation::Sigmoid, &a3b, &mut prb, batch).unwrap();
    let tb = up(&target);
    let mut lossb = z(1);
    loss::bce_forward(dev, &prb, &tb, batch, &mut lossb).unwrap();
    let mut dpb = z(batch);
    loss::bce_backward(dev, &prb, &tb, batch, 1.0, &mut dpb).unwrap();
    let mut da3b = z(batch);
    ew::activation_backward(dev, Activation::Sigmoid, &prb, &dpb, &mut da3b, batch).unwrap();
    let (mut dh2b, mut dw3b) = (z(h2.len()), z(w3.len()));
    conv::conv2d_backward(
        dev,
        &g3,
        &h2b,
        &pw[4],
        &da3b,
        Some(&mut dh2b),
        Some(&mut dw3b),
        None,
    )
    .unwrap();
    let mut db2b = z(b2.len());
    ew::activation_backward(dev, leaky, &h2b, &dh2b, &mut db2b, b2.len()).unwrap();
    let (mut da2b, mut dgb, mut dbb) = (z(a2.len()), z(c2), z(c2));
    norm::batch_norm_train_backward(
        dev, &bn, &a2b, &db2b, &pw[2], &smean, &srstd, &mut da2b, &mut dgb, &mut dbb,
    )
    .unwrap();
    let (mut dh1b, mut dw2b) = (z(h1.len()), z(w2.len()));
    conv::conv2d_backward(
        dev,
        &g2,
        &h1b,
        &pw[1],
        &da2b,
        Some(&mut dh1b),
        Some(&mut dw2b),
        None,
    )
    .unwrap();
    let mut da1b = z(a1.len());
    ew::activation_backward(dev, leaky, &h1b, &dh1b, &mut da1b, a1.len()).unwrap();
    let mut dw1b = z(w1.len());
    conv::conv2d_backward(dev, &g1, &xb, &pw[0], &da1b, None, Some(&mut dw1b), None).unwrap();
    let grads = [&dw1b, &dw2b, &dgb, &dbb, &dw3b];
    let ap = optim::AdamParams {
        lr: adam.lr,
        beta1: adam.beta1,
        beta2: adam.beta2,
        eps: adam.eps,
        weight_decay: adam.weight_decay,
        decoupled: adam.decoupled,
    };
    for (p, g) in pw.iter_mut().zip(grads) {
        let len = p.len();
        let (mut m, mut v) = (z(len), z(len));
        optim::adam_step(dev, &ap, 1, p, g, &mut m, &mut v, len).unwrap();
    }

    let got_loss = dev.download::<f32>(&lossb).unwrap();
    assert_close("dcgan D loss", &got_loss, &[want_loss], 1e-6, 1e-5);
    for (name, got, want) in [
        ("dw1", &dw1b, &dw1),
        ("dw2", &dw2b, &dw2),
        ("dgamma", &dgb, &dgamma),
        ("dbeta", &dbb, &dbeta),
        ("dw3", &dw3b, &dw3),
    ] {
        assert_close(
            &format!("dcgan {name}"),
            &dev.download::<f32>(got).unwrap(),
            want,
            1e-5,
            1e-3,
        );
    }
    // Adam's first step moves each parameter by about ±lr: compare the updated values.
    for (i, (got, want)) in pw.iter().zip(&params).enumerate() {
        assert_close(
            &format!("dcgan param {i} after Adam"),
            &dev.download::<f32>(got).unwrap(),
            want,
            1e-5,
            1e-4,
        );
    }
    assert_close(
        "dcgan running_mean",
        &dev.download::<f32>(&rmb).unwrap(),
        &rm,
        1e-6,
        1e-4,
    );
    assert_close(
        "dcgan running_var",
        &dev.download::<f32>(&rvb).unwrap(),
        &rv,
        1e-6,
        1e-4,
    );
}

#[test]
fn emu_gpt2_block_matches_cpu() {
    for dev in emulators("emu_gpt2_block_matches_cpu") {
        check_gpt2_block(
            dev,
            Gpt2Sizes {
                batch: 2,
                seq: 9,
                c: 32,
                heads: 2,
                vocab: 37,
            },
        );
    }
}

#[test]
fn emu_dcgan_discriminator_step_matches_cpu() {
    for dev in emulators("emu_dcgan_discriminator_step_matches_cpu") {
        check_dcgan_step(dev, 3, 16, 4, 8);
    }
}

#[test]
fn gpu_composites_match_cpu() {
    let Some(dev) = gpu("gpu_composites_match_cpu") else {
        return;
    };
    check_gpt2_block(
        dev,
        Gpt2Sizes {
            batch: 2,
            seq: 129,
            c: 768,
            heads: 12,
            vocab: 50257,
        },
    );
    check_dcgan_step(dev, 64, 16, 64, 128);
}
