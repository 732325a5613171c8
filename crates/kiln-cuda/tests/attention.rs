//! Attention against kiln-cpu's `attention_forward` (forward, decode over a KV cache) and an
//! f64 reference (log-sum-exp, backward): odd sequence lengths, causal and not, fewer queries
//! than keys and the reverse, f32/bf16/f16 caches, the fused qkv layout; the tensor-core flash
//! kernel with bf16 and f16 inputs.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod common;
use common::{assert_close, emulators, gpu, values};
use half::{bf16, f16};
use kiln_cpu::attention::{self as cpu, HeadsMut, HeadsRef};
use kiln_cuda::ops::attention::{
    attention_backward, attention_decode, attention_forward, kv_cache_append, AttentionGrads,
    AttentionOptions, DecodeLens, HeadsLayout, HeadsView, KvCacheLayout,
};
use kiln_cuda::{CudaBuf, CudaDevice};
use kiln_tensor::DType;

fn cpu_opts(causal: bool) -> cpu::AttentionOptions {
    cpu::AttentionOptions {
        causal,
        scale: None,
        isa: None,
    }
}

fn heads_ref<'a, T>(data: &'a [T], l: &HeadsLayout) -> HeadsRef<'a, T> {
    HeadsRef {
        data: &data[l.offset..],
        batch: l.batch,
        heads: l.heads,
        seq: l.seq,
        head_dim: l.head_dim,
        stride_batch: l.stride_batch,
        stride_head: l.stride_head,
        stride_seq: l.stride_seq,
    }
}

/// f64 reference: output, LSE and (given dO) dQ, dK, dV of one (b, h), contiguous rows.
#[allow(clippy::type_complexity)]
fn reference(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    dout: &[Vec<f64>],
    causal: bool,
    scale: f64,
) -> (
    Vec<Vec<f64>>,
    Vec<f64>,
    Vec<Vec<f64>>,
    Vec<Vec<f64>>,
    Vec<Vec<f64>>,
) {
    let (tq, tk, d) = (q.len(), k.len(), q[0].len());
    let off = tk as i64 - tq as i64;
    let mut o = vec![vec![0.0; d]; tq];
    let mut lse = vec![f64::NEG_INFINITY; tq];
    let mut p = vec![vec![0.0; tk]; tq];
    for i in 0..tq {
        let vis: Vec<usize> = (0..tk)
            .filter(|&j| !causal || j as i64 <= i as i64 + off)
            .collect();
        if vis.is_empty() {
            continue;
        }
        let s: Vec<f64> = vis
            .iter()
            .map(|&j| scale * (0..d).map(|c| q[i][c] * k[j][c]).sum::<f64>())
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        lse[i] = m + z.ln();
        for (n, &j) in vis.iter().enumerate() {
            p[i][j] = (s[n] - m).exp() / z;
            for c in 0..d {
                o[i][c] += p[i][j] * v[j][c];
            }
        }
    }
    let mut dq = vec![vec![0.0; d]; tq];
    let mut dk = vec![vec![0.0; d]; tk];
    let mut dv = vec![vec![0.0; d]; tk];
    if !dout.is_empty() {
        for i in 0..tq {
            let delta: f64 = (0..d).map(|c| dout[i][c] * o[i][c]).sum();
            for j in 0..tk {
                if p[i][j] == 0.0 {
                    continue;
                }
                let dp: f64 = (0..d).map(|c| dout[i][c] * v[j][c]).sum();
                let ds = p[i][j] * (dp - delta);
                for c in 0..d {
                    dv[j][c] += p[i][j] * dout[i][c];
                    dq[i][c] += scale * ds * k[j][c];
                    dk[j][c] += scale * ds * q[i][c];
                }
            }
        }
    }
    (o, lse, dq, dk, dv)
}

fn rows(data: &[f32], l: &HeadsLayout, b: usize, h: usize) -> Vec<Vec<f64>> {
    (0..l.seq)
        .map(|t| {
            let o = l.offset + b * l.stride_batch + h * l.stride_head + t * l.stride_seq;
            data[o..o + l.head_dim].iter().map(|&x| x as f64).collect()
        })
        .collect()
}

fn gather(data: &[f32], l: &HeadsLayout) -> Vec<f32> {
    let mut out = Vec::new();
    for b in 0..l.batch {
        for h in 0..l.heads {
            for r in rows(data, l, b, h) {
                out.extend(r.iter().map(|&x| x as f32));
            }
        }
    }
    out
}

/// Forward (f32 kernel, K/V of `kv`), LSE, and the backward in both gradient layouts.
fn check_f32(
    dev: &CudaDevice,
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
    kv: DType,
) {
    let what = format!("attention f32 b{b} h{h} tq{tq} tk{tk} d{d} causal {causal} kv {kv}");
    let ql = HeadsLayout::contiguous(b, h, tq, d);
    let kl = HeadsLayout::seq_major(b, tk, h, d); // a different layout for k and v
    let q = values(b * h * tq * d, 1);
    let round = |x: Vec<f32>| -> Vec<f32> {
        match kv {
            DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            _ => x,
        }
    };
    let k = round(values(b * h * tk * d, 2));
    let v = round(values(b * h * tk * d, 3));
    let up = |x: &[f32]| -> CudaBuf {
        match kv {
            DType::BF16 => dev
                .upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
                .unwrap(),
            DType::F16 => dev
                .upload(&x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())
                .unwrap(),
            _ => dev.upload(x).unwrap(),
        }
    };
    let (qb, kb, vb) = (dev.upload(&q).unwrap(), up(&k), up(&v));
    let mut ob = dev.alloc(DType::F32, b * h * tq * d).unwrap();
    let mut lse = dev.alloc(DType::F32, b * h * tq).unwrap();
    let opts = AttentionOptions {
        causal,
        scale: None,
    };
    attention_forward(
        dev,
        HeadsView::new(&qb, ql),
        HeadsView::new(&kb, kl),
        HeadsView::new(&vb, kl),
        (&mut ob, ql),
        Some(&mut lse),
        opts,
    )
    .unwrap();
    // kiln-cpu's forward on the same values.
    let mut want = vec![0f32; b * h * tq * d];
    cpu::attention_forward(
        heads_ref(&q, &ql),
        heads_ref(&k, &kl),
        heads_ref(&v, &kl),
        HeadsMut::contiguous(&mut want, b, h, tq, d),
        cpu_opts(causal),
    )
    .unwrap();
    let o = dev.download::<f32>(&ob).unwrap();
    assert_close(&format!("{what}: out"), &o, &want, 1e-5, 1e-4);
    // LSE and the backward pass against the f64 reference.
    let scale = 1.0 / (d as f64).sqrt();
    let dout = values(b * h * tq * d, 4);
    let dob = dev.upload(&dout).unwrap();
    let lse_got = dev.download::<f32>(&lse).unwrap();
    let (mut wl, mut wdq, mut wdk, mut wdv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for bb in 0..b {
        for hh in 0..h {
            let (_, l, dq, dk, dv) = reference(
                &rows(&q, &ql, bb, hh),
                &rows(&k, &kl, bb, hh),
                &rows(&v, &kl, bb, hh),
                &rows(&dout, &ql, bb, hh),
                causal,
                scale,
            );
            wl.extend(l.iter().map(|&x| x as f32));
            wdq.extend(dq.iter().flatten().map(|&x| x as f32));
            wdk.extend(dk.iter().flatten().map(|&x| x as f32));
            wdv.extend(dv.iter().flatten().map(|&x| x as f32));
        }
    }
    assert_close(&format!("{what}: lse"), &lse_got, &wl, 1e-5, 1e-5);
    if kv != DType::F32 {
        return; // the backward pass is f32
    }
    let mut dq = dev.alloc(DType::F32, q.len()).unwrap();
    let mut dk = dev.alloc(DType::F32, k.len()).unwrap();
    let mut dv = dev.alloc(DType::F32, v.len()).unwrap();
    attention_backward(
        dev,
        HeadsView::new(&qb, ql),
        HeadsView::new(&kb, kl),
        HeadsView::new(&vb, kl),
        HeadsView::new(&ob, ql),
        HeadsView::new(&dob, ql),
        &lse,
        AttentionGrads::Separate {
            dq: (&mut dq, ql),
            dk: (&mut dk, kl),
            dv: (&mut dv, kl),
        },
        opts,
    )
    .unwrap();
    let g = |buf: &CudaBuf, l: &HeadsLayout| gather(&dev.download::<f32>(buf).unwrap(), l);
    assert_close(&format!("{what}: dq"), &g(&dq, &ql), &wdq, 1e-4, 1e-3);
    assert_close(&format!("{what}: dk"), &g(&dk, &kl), &wdk, 1e-4, 1e-3);
    assert_close(&format!("{what}: dv"), &g(&dv, &kl), &wdv, 1e-4, 1e-3);
}

/// GPT-2's layout: q, k, v are thirds of one qkv buffer, the gradient one dqkv buffer.
fn check_fused(dev: &CudaDevice, b: usize, t: usize, h: usize, d: usize) {
    let c = h * d;
    let qkv = values(b * t * 3 * c, 5);
    let dout = values(b * t * c, 6);
    let l: Vec<HeadsLayout> = (0..3)
        .map(|w| HeadsLayout::fused_qkv(b, t, h, d, w).unwrap())
        .collect();
    let ol = HeadsLayout::seq_major(b, t, h, d);
    let qkvb = dev.upload(&qkv).unwrap();
    let mut ob = dev.alloc(DType::F32, b * t * c).unwrap();
    let mut lse = dev.alloc(DType::F32, b * h * t).unwrap();
    let opts = AttentionOptions::causal();
    attention_forward(
        dev,
        HeadsView::new(&qkvb, l[0]),
        HeadsView::new(&qkvb, l[1]),
        HeadsView::new(&qkvb, l[2]),
        (&mut ob, ol),
        Some(&mut lse),
        opts,
    )
    .unwrap();
    let dob = dev.upload(&dout).unwrap();
    let mut dqkv = dev.alloc(DType::F32, qkv.len()).unwrap();
    attention_backward(
        dev,
        HeadsView::new(&qkvb, l[0]),
        HeadsView::new(&qkvb, l[1]),
        HeadsView::new(&qkvb, l[2]),
        HeadsView::new(&ob, ol),
        HeadsView::new(&dob, ol),
        &lse,
        AttentionGrads::FusedQkv(&mut dqkv),
        opts,
    )
    .unwrap();
    let got = dev.download::<f32>(&dqkv).unwrap();
    let o = dev.download::<f32>(&ob).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let mut want = vec![0f32; qkv.len()];
    let mut want_o = vec![0f32; o.len()];
    for bb in 0..b {
        for hh in 0..h {
            let (ro, _, dq, dk, dv) = reference(
                &rows(&qkv, &l[0], bb, hh),
                &rows(&qkv, &l[1], bb, hh),
                &rows(&qkv, &l[2], bb, hh),
                &rows(&dout, &ol, bb, hh),
                true,
                scale,
            );
            for (w, g) in [dq, dk, dv].iter().enumerate() {
                for (tt, row) in g.iter().enumerate() {
                    let at = l[w].offset
                        + bb * l[w].stride_batch
                        + hh * l[w].stride_head
                        + tt * l[w].stride_seq;
                    for (cc, &x) in row.iter().enumerate() {
                        want[at + cc] = x as f32;
                    }
                }
            }
            for (tt, row) in ro.iter().enumerate() {
                let at = bb * ol.stride_batch + hh * ol.stride_head + tt * ol.stride_seq;
                for (cc, &x) in row.iter().enumerate() {
                    want_o[at + cc] = x as f32;
                }
            }
        }
    }
    assert_close("fused out", &o, &want_o, 1e-5, 1e-4);
    assert_close("fused dqkv", &got, &want, 1e-4, 1e-3);
}

/// The tensor-core flash kernel against kiln-cpu on the same (rounded) inputs.
fn check_flash(
    dev: &CudaDevice,
    ty: DType,
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
) {
    let what = format!("flash {ty} b{b} h{h} tq{tq} tk{tk} d{d} causal {causal}");
    let ql = HeadsLayout::contiguous(b, h, tq, d);
    let kl = HeadsLayout::seq_major(b, tk, h, d);
    let round = |x: Vec<f32>| -> Vec<f32> {
        if ty == DType::BF16 {
            x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
        } else {
            x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
        }
    };
    let up = |x: &[f32]| -> CudaBuf {
        if ty == DType::BF16 {
            dev.upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
                .unwrap()
        } else {
            dev.upload(&x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())
                .unwrap()
        }
    };
    let q: Vec<f32> = round(values(b * h * tq * d, 7).iter().map(|x| x * 2.0).collect());
    let k = round(values(b * h * tk * d, 8).iter().map(|x| x * 2.0).collect());
    let v = round(values(b * h * tk * d, 9));
    let mut ob = dev.alloc(DType::F32, q.len()).unwrap();
    let mut lse = dev.alloc(DType::F32, b * h * tq).unwrap();
    attention_forward(
        dev,
        HeadsView::new(&up(&q), ql),
        HeadsView::new(&up(&k), kl),
        HeadsView::new(&up(&v), kl),
        (&mut ob, ql),
        Some(&mut lse),
        AttentionOptions {
            causal,
            scale: None,
        },
    )
    .unwrap();
    let mut want = vec![0f32; q.len()];
    cpu::attention_forward(
        heads_ref(&q, &ql),
        heads_ref(&k, &kl),
        heads_ref(&v, &kl),
        HeadsMut::contiguous(&mut want, b, h, tq, d),
        cpu_opts(causal),
    )
    .unwrap();
    // P is rounded to 16 bits before P·V: errors of a few 1e-3 relative to |V| ≤ 1.
    let tol = if ty == DType::BF16 { 2e-2 } else { 4e-3 };
    assert_close(
        &format!("{what}: out"),
        &dev.download::<f32>(&ob).unwrap(),
        &want,
        tol,
        tol,
    );
    let mut wl = Vec::new();
    let scale = 1.0 / (d as f64).sqrt();
    for bb in 0..b {
        for hh in 0..h {
            let (_, l, ..) = reference(
                &rows(&q, &ql, bb, hh),
                &rows(&k, &kl, bb, hh),
                &rows(&v, &kl, bb, hh),
                &[],
                causal,
                scale,
            );
            wl.extend(l.iter().map(|&x| x as f32));
        }
    }
    assert_close(
        &format!("{what}: lse"),
        &dev.download::<f32>(&lse).unwrap(),
        &wl,
        1e-4,
        1e-4,
    );
}

/// Append to a cache, then decode against it; compared with kiln-cpu over the cache views.
fn check_decode(dev: &CudaDevice, s: usize, h: usize, cap: usize, d: usize, ty: DType) {
    let layout = KvCacheLayout {
        offset: 3,
        sequences: s,
        heads: h,
        capacity: cap,
        head_dim: d,
    };
    let n = 3 + s * h * cap * d;
    let mut kc = dev.zeros(ty, n).unwrap();
    let mut vc = dev.zeros(ty, n).unwrap();
    // Fill positions 0..cap in two appends (the second of 5 positions at cap − 5).
    let kall = values(s * h * cap * d, 10);
    let vall = values(s * h * cap * d, 11);
    for (pos, len) in [(0, cap - 5), (cap - 5, 5)] {
        let pick = |all: &[f32]| -> Vec<f32> {
            let mut out = Vec::new();
            for ss in 0..s {
                for hh in 0..h {
                    let base = ((ss * h + hh) * cap + pos) * d;
                    out.extend_from_slice(&all[base..base + len * d]);
                }
            }
            out
        };
        let src_l = HeadsLayout::contiguous(s, h, len, d);
        kv_cache_append(
            dev,
            HeadsView::new(&dev.upload(&pick(&kall)).unwrap(), src_l),
            &mut kc,
            layout,
            pos,
        )
        .unwrap();
        kv_cache_append(
            dev,
            HeadsView::new(&dev.upload(&pick(&vall)).unwrap(), src_l),
            &mut vc,
            layout,
            pos,
        )
        .unwrap();
    }
    let src_l = HeadsLayout::contiguous(s, h, 1, d);
    let one = dev.upload(&values(s * h * d, 1)).unwrap();
    assert!(kv_cache_append(dev, HeadsView::new(&one, src_l), &mut kc, layout, cap).is_err());
    let round = |x: &[f32]| -> Vec<f32> {
        match ty {
            DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            _ => x.to_vec(),
        }
    };
    let (kr, vr) = (round(&kall), round(&vall));
    assert_eq!(&dev.download_f32(&kc).unwrap()[3..], &kr[..]);
    let q = values(s * h * d, 12);
    let ql = HeadsLayout::contiguous(s, h, 1, d);
    let qb = dev.upload(&q).unwrap();
    let lens: Vec<i32> = (0..s)
        .map(|i| [1, cap, cap / 2 + 1][i % 3] as i32)
        .collect();
    for (mode, per_seq) in [("uniform", false), ("per-sequence", true)] {
        let mut ob = dev.alloc(DType::F32, s * h * d).unwrap();
        let lb = dev.upload(&lens).unwrap();
        let dl = if per_seq {
            DecodeLens::PerSequence(&lb)
        } else {
            DecodeLens::Uniform(cap - 2)
        };
        attention_decode(
            dev,
            HeadsView::new(&qb, ql),
            &kc,
            &vc,
            layout,
            dl,
            (&mut ob, ql),
            None,
        )
        .unwrap();
        let got = dev.download::<f32>(&ob).unwrap();
        let mut want = vec![0f32; s * h * d];
        for ss in 0..s {
            let len = if per_seq { lens[ss] as usize } else { cap - 2 };
            let kv_l = HeadsLayout {
                offset: ss * h * cap * d,
                batch: 1,
                heads: h,
                seq: len,
                head_dim: d,
                stride_batch: h * cap * d,
                stride_head: cap * d,
                stride_seq: d,
            };
            let q1 = HeadsLayout {
                offset: ss * h * d,
                batch: 1,
                ..ql
            };
            cpu::attention_forward(
                heads_ref(&q, &q1),
                heads_ref(&kr, &kv_l),
                heads_ref(&vr, &kv_l),
                HeadsMut::contiguous(&mut want[ss * h * d..(ss + 1) * h * d], 1, h, 1, d),
                cpu_opts(false),
            )
            .unwrap();
        }
        assert_close(&format!("decode {ty} {mode}"), &got, &want, 1e-5, 1e-4);
    }
}

#[test]
fn emu_attention_f32_matches_reference() {
    for dev in emulators("emu_attention_f32_matches_reference") {
        check_f32(dev, 2, 3, 37, 37, 16, true, DType::F32);
        check_f32(dev, 1, 2, 5, 40, 80, true, DType::F32);
        check_f32(dev, 1, 2, 40, 5, 8, true, DType::F32);
        check_f32(dev, 2, 1, 33, 65, 24, false, DType::F32);
        check_f32(dev, 1, 2, 20, 33, 16, true, DType::BF16);
        check_f32(dev, 1, 1, 7, 9, 16, false, DType::F16);
    }
}

#[test]
fn emu_attention_fused_qkv_backward() {
    for dev in emulators("emu_attention_fused_qkv_backward") {
        check_fused(dev, 2, 35, 2, 8);
    }
}

#[test]
fn emu_flash_attention_tensor_cores() {
    if let Some(dev) = emulators("emu_flash_attention_tensor_cores").first() {
        check_flash(dev, DType::BF16, 1, 2, 70, 70, 64, true);
        check_flash(dev, DType::F16, 1, 1, 9, 130, 128, true);
        check_flash(dev, DType::BF16, 1, 1, 66, 3, 64, true);
        check_flash(dev, DType::BF16, 2, 1, 65, 100, 64, false);
    }
}

#[test]
fn emu_flash_attention_reverse_order() {
    if let Some(dev) = emulators("emu_flash_attention_reverse_order").get(1) {
        check_flash(dev, DType::BF16, 1, 1, 70, 70, 64, true);
    }
}

#[test]
fn emu_decode_matches_cpu() {
    for dev in emulators("emu_decode_matches_cpu") {
        check_decode(dev, 3, 2, 50, 16, DType::F32);
        check_decode(dev, 2, 1, 40, 72, DType::BF16);
        check_decode(dev, 1, 2, 33, 64, DType::F16);
    }
}

#[test]
fn gpu_attention_matches_reference() {
    let Some(dev) = gpu("gpu_attention_matches_reference") else {
        return;
    };
    check_f32(dev, 2, 3, 257, 257, 64, true, DType::F32);
    check_f32(dev, 1, 2, 33, 300, 128, true, DType::BF16);
    check_fused(dev, 2, 129, 4, 64);
    check_flash(dev, DType::BF16, 2, 3, 257, 257, 64, true);
    check_flash(dev, DType::F16, 1, 2, 100, 513, 128, true);
    check_flash(dev, DType::BF16, 1, 12, 1024, 1024, 64, true);
    check_decode(dev, 4, 12, 1024, 64, DType::BF16);
}
