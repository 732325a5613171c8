//! Attention against a naive f64 reference: sequence lengths 1…1000, head_dim 32/64/80/128,
//! 1/3/12 heads, batch 1–3, causal and not, strided layouts (`[batch, seq, heads·head_dim]` and
//! a fused QKV buffer), Tq ≠ Tk (bottom-right causal alignment), every kernel family this CPU
//! runs, bf16/f16 K/V, KV-cache decode equal to the matching prefill rows, large magnitudes
//! without NaN, and bitwise equality between 1 and 2 threads.
use half::{bf16, f16};
use kiln::cpu::attention::{
    attention_cached, attention_forward, AttentionOptions, HeadsMut, HeadsRef, Isa, KvCache,
};
use kiln::tensor::FloatElement;
use kiln::Error;

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

/// Naive f64 attention over arbitrary views; K/V elements converted from their storage type.
/// Rows that see no key are zeros.
fn naive<T: FloatElement>(
    q: &HeadsRef<f32>,
    k: &HeadsRef<T>,
    v: &HeadsRef<T>,
    causal: bool,
    scale: f64,
) -> Vec<f64> {
    let (b_, h_, tq, tk, d) = (q.batch, q.heads, q.seq, k.seq, q.head_dim);
    let mut out = vec![0f64; b_ * h_ * tq * d];
    let shift = tk as isize - tq as isize;
    for b in 0..b_ {
        for h in 0..h_ {
            for i in 0..tq {
                let lim = if causal {
                    (i as isize + shift + 1).clamp(0, tk as isize) as usize
                } else {
                    tk
                };
                if lim == 0 {
                    continue;
                }
                let qi = q.row(b, h, i);
                let s: Vec<f64> = (0..lim)
                    .map(|j| {
                        let kj = k.row(b, h, j);
                        scale
                            * (0..d)
                                .map(|c| qi[c] as f64 * kj[c].to_f32() as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = p.iter().sum();
                let o = &mut out[((b * h_ + h) * tq + i) * d..][..d];
                for (j, pj) in p.iter().enumerate() {
                    let vj = v.row(b, h, j);
                    for c in 0..d {
                        o[c] += pj / l * vj[c].to_f32() as f64;
                    }
                }
            }
        }
    }
    out
}

/// Reads an output view into `[batch, heads, seq, head_dim]` order.
fn gather(o: &HeadsRef<f32>) -> Vec<f32> {
    let mut v = Vec::new();
    for b in 0..o.batch {
        for h in 0..o.heads {
            for t in 0..o.seq {
                v.extend_from_slice(o.row(b, h, t));
            }
        }
    }
    v
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g as f64 - w).abs() / (1.0 + w.abs())
        })
        .fold(0.0, f64::max)
}

fn opts(causal: bool, isa: Isa) -> AttentionOptions {
    AttentionOptions {
        causal,
        scale: None,
        isa: Some(isa),
    }
}

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

/// Contiguous `[batch, heads, seq, head_dim]` inputs, checked against the reference for every
/// kernel family; returns the outputs per family.
#[allow(clippy::too_many_arguments)]
fn check_contiguous(
    batch: usize,
    heads: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let q = rng.vec(batch * heads * tq * d, 1.5);
    let k = rng.vec(batch * heads * tk * d, 1.5);
    let v = rng.vec(batch * heads * tk * d, 1.0);
    let qv = HeadsRef::contiguous(&q[..], batch, heads, tq, d);
    let kv = HeadsRef::contiguous(&k[..], batch, heads, tk, d);
    let vv = HeadsRef::contiguous(&v[..], batch, heads, tk, d);
    let want = naive(&qv, &kv, &vv, causal, 1.0 / (d as f64).sqrt());
    for isa in Isa::available() {
        let mut out = vec![f32::NAN; batch * heads * tq * d];
        attention_forward(
            qv,
            kv,
            vv,
            HeadsMut::contiguous(&mut out, batch, heads, tq, d),
            opts(causal, isa),
        )
        .unwrap();
        let e = max_err(&out, &want);
        assert!(
            e < 2e-5,
            "{isa:?} b{batch} h{heads} tq{tq} tk{tk} d{d} causal={causal}: err {e}"
        );
    }
}

#[test]
fn matches_naive_over_sequence_lengths() {
    for &t in &[1usize, 2, 7, 64, 65, 257] {
        for &causal in &[false, true] {
            check_contiguous(1, 3, t, t, 64, causal, 10 + t as u64);
        }
    }
}

#[test]
fn matches_naive_long_sequence() {
    check_contiguous(1, 1, 1000, 1000, 64, true, 3);
    check_contiguous(1, 1, 1000, 1000, 32, false, 4);
}

#[test]
fn matches_naive_over_head_dims_heads_and_batches() {
    for &d in &[32usize, 64, 80, 128, 7, 20] {
        check_contiguous(2, 3, 33, 33, d, true, d as u64);
    }
    check_contiguous(3, 12, 17, 17, 64, true, 77);
    check_contiguous(1, 12, 70, 70, 64, false, 78);
    check_contiguous(3, 1, 130, 130, 80, false, 79);
}

#[test]
fn bottom_right_causal_alignment_for_short_query_blocks() {
    // Decode (Tq = 1), chunked prefill (Tq < Tk) and Tq > Tk (rows that see nothing are zero).
    for &(tq, tk) in &[
        (1usize, 1usize),
        (1, 100),
        (5, 100),
        (64, 130),
        (70, 64),
        (9, 3),
    ] {
        check_contiguous(2, 2, tq, tk, 64, true, (tq * 1000 + tk) as u64);
        check_contiguous(1, 2, tq, tk, 32, false, (tq * 1000 + tk + 1) as u64);
    }
    // Explicitly: with Tq > Tk the first Tq − Tk rows see no key and output zeros.
    let (tq, tk, d) = (5, 2, 8);
    let q = vec![1.0f32; tq * d];
    let k = vec![1.0f32; tk * d];
    let v = vec![3.0f32; tk * d];
    let mut out = vec![f32::NAN; tq * d];
    attention_forward(
        HeadsRef::contiguous(&q[..], 1, 1, tq, d),
        HeadsRef::contiguous(&k[..], 1, 1, tk, d),
        HeadsRef::contiguous(&v[..], 1, 1, tk, d),
        HeadsMut::contiguous(&mut out, 1, 1, tq, d),
        AttentionOptions::causal(),
    )
    .unwrap();
    assert!(out[..3 * d].iter().all(|&x| x == 0.0));
    assert!(out[3 * d..].iter().all(|&x| (x - 3.0).abs() < 1e-6));
}

#[test]
fn strided_layouts_fused_qkv_and_seq_major_output() {
    // GPT-2: c_attn output [batch, seq, 3·heads·head_dim]; output [batch, seq, heads·head_dim].
    let (batch, seq, heads, d) = (2, 67, 3, 64);
    let mut rng = Rng(5);
    let qkv = rng.vec(batch * seq * 3 * heads * d, 1.0);
    let q = HeadsRef::fused_qkv(&qkv, batch, seq, heads, d, 0).unwrap();
    let k = HeadsRef::fused_qkv(&qkv, batch, seq, heads, d, 1).unwrap();
    let v = HeadsRef::fused_qkv(&qkv, batch, seq, heads, d, 2).unwrap();
    let want = naive(&q, &k, &v, true, 0.125);
    for isa in Isa::available() {
        let mut out = vec![f32::NAN; batch * seq * heads * d];
        attention_forward(
            q,
            k,
            v,
            HeadsMut::seq_major(&mut out, batch, seq, heads, d),
            opts(true, isa),
        )
        .unwrap();
        let got = gather(&HeadsRef::seq_major(&out[..], batch, seq, heads, d));
        assert!(max_err(&got, &want) < 2e-5, "{isa:?}");
    }
    // A padded row stride on the output (extra columns are left alone).
    let mut out = vec![-7.0f32; batch * heads * seq * (d + 5)];
    let o = HeadsMut {
        data: &mut out,
        batch,
        heads,
        seq,
        head_dim: d,
        stride_batch: heads * seq * (d + 5),
        stride_head: seq * (d + 5),
        stride_seq: d + 5,
    };
    attention_forward(q, k, v, o, AttentionOptions::causal()).unwrap();
    let ov = HeadsRef {
        data: &out[..],
        batch,
        heads,
        seq,
        head_dim: d,
        stride_batch: heads * seq * (d + 5),
        stride_head: seq * (d + 5),
        stride_seq: d + 5,
    };
    assert!(max_err(&gather(&ov), &want) < 2e-5);
    assert!(out.chunks(d + 5).all(|r| r[d..].iter().all(|&x| x == -7.0)));
}

#[test]
fn bf16_and_f16_keys_and_values() {
    let (batch, heads, t, d) = (1, 3, 75, 64);
    let mut rng = Rng(6);
    let q = rng.vec(batch * heads * t * d, 1.0);
    let k: Vec<f32> = rng.vec(batch * heads * t * d, 1.0);
    let v: Vec<f32> = rng.vec(batch * heads * t * d, 1.0);
    let kb: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
    let vb: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    let kh: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    let vh: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let qv = HeadsRef::contiguous(&q[..], batch, heads, t, d);
    for isa in Isa::available() {
        // The reference uses the same rounded K/V, so only kernel error remains.
        let kv = HeadsRef::contiguous(&kb[..], batch, heads, t, d);
        let vv = HeadsRef::contiguous(&vb[..], batch, heads, t, d);
        let want = naive(&qv, &kv, &vv, true, 0.125);
        let mut out = vec![0f32; q.len()];
        attention_forward(
            qv,
            kv,
            vv,
            HeadsMut::contiguous(&mut out, batch, heads, t, d),
            opts(true, isa),
        )
        .unwrap();
        assert!(max_err(&out, &want) < 2e-5, "bf16 {isa:?}");
        let kv = HeadsRef::contiguous(&kh[..], batch, heads, t, d);
        let vv = HeadsRef::contiguous(&vh[..], batch, heads, t, d);
        let want = naive(&qv, &kv, &vv, true, 0.125);
        attention_forward(
            qv,
            kv,
            vv,
            HeadsMut::contiguous(&mut out, batch, heads, t, d),
            opts(true, isa),
        )
        .unwrap();
        assert!(max_err(&out, &want) < 2e-5, "f16 {isa:?}");
    }
}

fn decode_matches_prefill<T: FloatElement>() {
    // Prefill a prompt into the cache, then decode token by token; each decode output must
    // equal the matching row of a full causal prefill over the same K/V (stored as T).
    let (layers, batch, heads, d, prompt, total) = (2, 2, 3, 64, 37, 80);
    let mut rng = Rng(7);
    let q = rng.vec(batch * heads * total * d, 1.0);
    let k = rng.vec(batch * heads * total * d, 1.0);
    let v = rng.vec(batch * heads * total * d, 1.0);
    fn view(x: &[f32], batch: usize, heads: usize, total: usize, d: usize) -> HeadsRef<'_, f32> {
        HeadsRef::contiguous(x, batch, heads, total, d)
    }
    // Positions [t0, t1) of a full view, without copying.
    fn part_of(
        x: &[f32],
        batch: usize,
        heads: usize,
        total: usize,
        d: usize,
        t0: usize,
        t1: usize,
    ) -> HeadsRef<'_, f32> {
        HeadsRef {
            data: &x[t0 * d..],
            seq: t1 - t0,
            ..HeadsRef::contiguous(x, batch, heads, total, d)
        }
    }
    let kr: Vec<T> = k.iter().map(|&x| T::from_f32(x)).collect();
    let vr: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    let mut full = vec![0f32; q.len()];
    attention_forward(
        view(&q, batch, heads, total, d),
        HeadsRef::contiguous(&kr[..], batch, heads, total, d),
        HeadsRef::contiguous(&vr[..], batch, heads, total, d),
        HeadsMut::contiguous(&mut full, batch, heads, total, d),
        AttentionOptions::causal(),
    )
    .unwrap();
    let mut cache = KvCache::<T>::new(layers, batch, heads, total, d).unwrap();
    let mut t0 = 0;
    let mut steps = vec![(0, prompt)];
    steps.extend((prompt..total).map(|t| (t, t + 1)));
    steps.push((total, total)); // empty step: nothing appended
    for &(a, bnd) in &steps {
        if a == bnd {
            continue;
        }
        assert_eq!(a, t0);
        for layer in 0..layers {
            cache
                .append(
                    layer,
                    part_of(&k, batch, heads, total, d, a, bnd),
                    part_of(&v, batch, heads, total, d, a, bnd),
                )
                .unwrap();
        }
        t0 = bnd;
        assert_eq!(cache.len(), t0);
        for layer in 0..layers {
            let n = bnd - a;
            let mut out = vec![0f32; batch * heads * n * d];
            attention_cached(
                part_of(&q, batch, heads, total, d, a, bnd),
                &cache,
                layer,
                HeadsMut::contiguous(&mut out, batch, heads, n, d),
                AttentionOptions::causal(),
            )
            .unwrap();
            for b in 0..batch {
                for h in 0..heads {
                    for t in 0..n {
                        let got = &out[((b * heads + h) * n + t) * d..][..d];
                        let want = &full[((b * heads + h) * total + a + t) * d..][..d];
                        for (g, w) in got.iter().zip(want) {
                            assert!(
                                (g - w).abs() < 1e-5,
                                "layer {layer} pos {}: {g} vs {w}",
                                a + t
                            );
                        }
                    }
                }
            }
        }
    }
    // Full: a clear capacity error, nothing written.
    let err = cache
        .append(
            0,
            part_of(&k, batch, heads, total, d, 0, 1),
            part_of(&v, batch, heads, total, d, 0, 1),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Capacity(_)), "{err}");
    assert_eq!(cache.layer_len(0), total);
    cache.reset();
    assert_eq!(cache.len(), 0);
}

#[test]
fn kv_cache_decode_equals_prefill_rows() {
    decode_matches_prefill::<f32>();
    decode_matches_prefill::<bf16>();
    decode_matches_prefill::<f16>();
}

#[test]
fn large_magnitudes_and_masks_give_no_nan() {
    let (heads, t, d) = (2, 130, 64);
    let mut rng = Rng(8);
    let q = rng.vec(heads * t * d, 1e4);
    let k = rng.vec(heads * t * d, 1e4);
    let v = rng.vec(heads * t * d, 1e4);
    for isa in Isa::available() {
        for &causal in &[false, true] {
            for &(tq, tk) in &[(t, t), (1, t), (t, 3)] {
                let qv = HeadsRef::contiguous(&q[..heads * tq * d], 1, heads, tq, d);
                let kv = HeadsRef::contiguous(&k[..heads * tk * d], 1, heads, tk, d);
                let vv = HeadsRef::contiguous(&v[..heads * tk * d], 1, heads, tk, d);
                let mut out = vec![f32::NAN; heads * tq * d];
                attention_forward(
                    qv,
                    kv,
                    vv,
                    HeadsMut::contiguous(&mut out, 1, heads, tq, d),
                    opts(causal, isa),
                )
                .unwrap();
                assert!(
                    out.iter().all(|x| x.is_finite()),
                    "{isa:?} causal={causal} {tq}x{tk}"
                );
                // Every output is a convex combination of V rows.
                assert!(out.iter().all(|x| x.abs() <= 1e4 * 1.0001));
            }
        }
    }
    // Huge scale: scores far beyond exp's range in both directions.
    let mut out = vec![0f32; heads * t * d];
    let o = AttentionOptions {
        causal: true,
        scale: Some(1e3),
        isa: None,
    };
    attention_forward(
        HeadsRef::contiguous(&q[..], 1, heads, t, d),
        HeadsRef::contiguous(&k[..], 1, heads, t, d),
        HeadsRef::contiguous(&v[..], 1, heads, t, d),
        HeadsMut::contiguous(&mut out, 1, heads, t, d),
        o,
    )
    .unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn bitwise_equal_for_one_and_two_threads() {
    let (batch, heads, t, d) = (2, 3, 300, 64);
    let mut rng = Rng(9);
    let q = rng.vec(batch * heads * t * d, 1.0);
    let k = rng.vec(batch * heads * t * d, 1.0);
    let v = rng.vec(batch * heads * t * d, 1.0);
    for isa in Isa::available() {
        for &causal in &[false, true] {
            let run = |threads: usize| {
                let mut out = vec![0f32; q.len()];
                pool(threads).install(|| {
                    attention_forward(
                        HeadsRef::contiguous(&q[..], batch, heads, t, d),
                        HeadsRef::contiguous(&k[..], batch, heads, t, d),
                        HeadsRef::contiguous(&v[..], batch, heads, t, d),
                        HeadsMut::contiguous(&mut out, batch, heads, t, d),
                        opts(causal, isa),
                    )
                    .unwrap()
                });
                out
            };
            let (a, b) = (run(1), run(2));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?}"
            );
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let x = [0f32; 2 * 8];
    let mut o = vec![0f32; 2 * 8];
    let q = HeadsRef::contiguous(&x[..], 1, 1, 2, 8);
    // View larger than its buffer.
    let big = HeadsRef::contiguous(&x[..], 1, 1, 3, 8);
    assert!(attention_forward(
        q,
        big,
        big,
        HeadsMut::contiguous(&mut o, 1, 1, 2, 8),
        AttentionOptions::default()
    )
    .is_err());
    // head_dim mismatch.
    let k4 = HeadsRef::contiguous(&x[..], 1, 1, 4, 4);
    assert!(attention_forward(
        q,
        k4,
        k4,
        HeadsMut::contiguous(&mut o, 1, 1, 2, 8),
        AttentionOptions::default()
    )
    .is_err());
    // Overlapping output rows.
    let bad = HeadsMut {
        data: &mut o,
        batch: 1,
        heads: 1,
        seq: 2,
        head_dim: 8,
        stride_batch: 16,
        stride_head: 16,
        stride_seq: 4,
    };
    assert!(attention_forward(q, q, q, bad, AttentionOptions::default()).is_err());
    // Non-finite scale; fused QKV part out of range; zero-sized cache; layer out of range.
    let o2 = AttentionOptions {
        scale: Some(f32::NAN),
        ..Default::default()
    };
    assert!(attention_forward(q, q, q, HeadsMut::contiguous(&mut o, 1, 1, 2, 8), o2).is_err());
    assert!(HeadsRef::fused_qkv(&x[..], 1, 1, 1, 4, 3).is_err());
    assert!(KvCache::<f32>::new(1, 1, 1, 0, 8).is_err());
    let mut c = KvCache::<f32>::new(1, 1, 1, 4, 8).unwrap();
    assert!(c.append(1, q, q).is_err());
    assert!(c.append(0, k4, k4).is_err());
}

fn fixture_floats(v: &serde_json::Value) -> Vec<f32> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn fixture_shape(v: &serde_json::Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// PyTorch `scaled_dot_product_attention` with an explicit bottom-right boolean mask
/// (`tests/fixtures/make_attention_fixtures.py`).
#[test]
fn matches_torch_sdpa_fixtures() {
    let path = format!(
        "{}/tests/fixtures/attention/sdpa.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for c in fx["cases"].as_array().unwrap() {
        let causal = c["causal"].as_bool().unwrap();
        let qs = fixture_shape(&c["q"]);
        let ks = fixture_shape(&c["k"]);
        let (b, h, tq, d) = (qs[0], qs[1], qs[2], qs[3]);
        let tk = ks[2];
        let (q, k, v, want) = (
            fixture_floats(&c["q"]),
            fixture_floats(&c["k"]),
            fixture_floats(&c["v"]),
            fixture_floats(&c["out"]),
        );
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; want.len()];
            attention_forward(
                HeadsRef::contiguous(&q[..], b, h, tq, d),
                HeadsRef::contiguous(&k[..], b, h, tk, d),
                HeadsRef::contiguous(&v[..], b, h, tk, d),
                HeadsMut::contiguous(&mut out, b, h, tq, d),
                opts(causal, isa),
            )
            .unwrap();
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-5 + 2e-5 * w.abs(),
                    "{isa:?} {qs:?}x{tk} [{i}]: {g} vs {w}"
                );
            }
        }
    }
}
