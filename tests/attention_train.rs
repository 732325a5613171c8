//! Training attention (fused-QKV layout, causal), forward with log-sum-exp and backward, against
//! a naive f64 reference that materialises the `T × T` matrix: odd sizes (T = 1, 7, 65, 257;
//! head_dim 1, 7, 64; 1–3 heads; batch 1–2), block-multiple sizes, large magnitudes, every
//! kernel family this CPU runs, bitwise equality between 1 and 2 threads, agreement with the
//! inference kernel, a finite-difference check, and errors for bad shapes.
use kiln::cpu::attention::{
    attention_backward, attention_backward_with, attention_forward, attention_train_forward,
    attention_train_forward_with, AttentionOptions, HeadsMut, HeadsRef,
};
use kiln::cpu::elementwise::activations::Isa;

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

/// f64 reference: `(out [B·T, C], lse [B, H, T], dqkv [B·T, 3C])`.
struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dqkv: Vec<f64>,
}

fn naive(qkv: &[f32], dout: &[f32], b_: usize, t_: usize, h_: usize, d: usize) -> Reference {
    let c = h_ * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b_ * t_ * c];
    let mut lse = vec![0f64; b_ * h_ * t_];
    let mut dqkv = vec![0f64; b_ * t_ * 3 * c];
    let at = |b: usize, t: usize, part: usize, h: usize, x: usize| {
        qkv[(b * t_ + t) * 3 * c + part * c + h * d + x] as f64
    };
    for b in 0..b_ {
        for h in 0..h_ {
            // Scores, probabilities: the full T × T matrix (lower triangle).
            let mut p = vec![0f64; t_ * t_];
            for i in 0..t_ {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        scale
                            * (0..d)
                                .map(|x| at(b, i, 0, h, x) * at(b, j, 1, h, x))
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                lse[(b * h_ + h) * t_ + i] = m + z.ln();
                for j in 0..=i {
                    p[i * t_ + j] = (s[j] - m).exp() / z;
                }
                for x in 0..d {
                    out[(b * t_ + i) * c + h * d + x] =
                        (0..=i).map(|j| p[i * t_ + j] * at(b, j, 2, h, x)).sum();
                }
            }
            let g = |i: usize, x: usize| dout[(b * t_ + i) * c + h * d + x] as f64;
            for i in 0..t_ {
                let dp: Vec<f64> = (0..=i)
                    .map(|j| (0..d).map(|x| g(i, x) * at(b, j, 2, h, x)).sum())
                    .collect();
                let dl: f64 = (0..=i).map(|j| p[i * t_ + j] * dp[j]).sum();
                for j in 0..=i {
                    let pij = p[i * t_ + j];
                    let ds = pij * (dp[j] - dl);
                    for x in 0..d {
                        dqkv[(b * t_ + i) * 3 * c + h * d + x] += ds * at(b, j, 1, h, x) * scale;
                        dqkv[(b * t_ + j) * 3 * c + c + h * d + x] +=
                            ds * at(b, i, 0, h, x) * scale;
                        dqkv[(b * t_ + j) * 3 * c + 2 * c + h * d + x] += pij * g(i, x);
                    }
                }
            }
        }
    }
    Reference { out, lse, dqkv }
}

/// `max |got − want| ≤ tol · max(max |want|, floor)` (reported with the worst index).
fn close(name: &str, got: &[f32], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f64, |a, v| a.max(v.abs())).max(floor);
    let (mut worst, mut at) = (0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{name}[{i}] = {g}");
        let e = (g as f64 - w).abs();
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{name}: max error {worst:e} at {at} (got {}, want {}), scale {scale:e}",
        got[at],
        want[at]
    );
}

struct Case {
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
    amp: f32,
}

fn run_case(isa: Isa, cs: &Case, seed: u64) {
    let Case {
        batch,
        seq,
        heads,
        d,
        amp,
    } = *cs;
    let c = heads * d;
    let mut rng = Rng(seed);
    let qkv = rng.vec(batch * seq * 3 * c, amp);
    let dout = rng.vec(batch * seq * c, 1.0);
    let r = naive(&qkv, &dout, batch, seq, heads, d);
    let mut out = vec![f32::NAN; batch * seq * c];
    let mut lse = vec![f32::NAN; batch * heads * seq];
    attention_train_forward_with(isa, &qkv, batch, seq, heads, d, &mut out, &mut lse).unwrap();
    let what = format!("{isa:?} B{batch} T{seq} H{heads} D{d} amp{amp}");
    close(&format!("{what} out"), &out, &r.out, 2e-5, 1e-3);
    // The log-sum-exp is compared absolutely (it is O(1) or O(amp²·√D)).
    let lse_scale = r.lse.iter().fold(1f64, |a, v| a.max(v.abs()));
    for (i, (&g, &w)) in lse.iter().zip(&r.lse).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * lse_scale,
            "{what} lse[{i}]: {g} vs {w}"
        );
    }
    let mut dqkv = vec![f32::NAN; batch * seq * 3 * c];
    attention_backward_with(
        isa, &qkv, &out, &dout, &lse, batch, seq, heads, d, &mut dqkv,
    )
    .unwrap();
    // Per third (dQ, dK, dV have different magnitudes); a third that is (nearly) zero, as dQ
    // and dK are at T = 1, is held to the rounding level of the whole gradient.
    let floor = 1e-2 * r.dqkv.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
    for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let pick = |v: &[f32]| -> Vec<f32> {
            v.chunks(3 * c)
                .flat_map(|row| row[part * c..(part + 1) * c].to_vec())
                .collect()
        };
        let pick64 = |v: &[f64]| -> Vec<f64> {
            v.chunks(3 * c)
                .flat_map(|row| row[part * c..(part + 1) * c].to_vec())
                .collect()
        };
        close(
            &format!("{what} {name}"),
            &pick(&dqkv),
            &pick64(&r.dqkv),
            1e-4,
            floor,
        );
    }
}

fn cases() -> Vec<Case> {
    let mk = |batch, seq, heads, d| Case {
        batch,
        seq,
        heads,
        d,
        amp: 1.0,
    };
    vec![
        mk(1, 1, 1, 1),
        mk(2, 1, 3, 64),
        mk(1, 7, 2, 7),
        mk(2, 7, 1, 1),
        mk(1, 65, 3, 64),
        mk(2, 65, 1, 7),
        mk(1, 64, 2, 16),
        mk(1, 128, 1, 64),
        mk(1, 257, 1, 64),
        mk(2, 257, 2, 7),
        mk(1, 257, 3, 1),
        mk(1, 130, 2, 33),
    ]
}

#[test]
fn forward_and_backward_match_f64_on_every_isa() {
    for isa in Isa::available() {
        for (n, cs) in cases().iter().enumerate() {
            run_case(isa, cs, 100 + n as u64);
        }
    }
}

#[test]
fn large_magnitudes_stay_accurate() {
    // Scores up to ~|amp²·√D| = 9·8 = 72: sharp softmax rows, no overflow.
    for isa in Isa::available() {
        run_case(
            isa,
            &Case {
                batch: 1,
                seq: 70,
                heads: 2,
                d: 64,
                amp: 3.0,
            },
            7,
        );
    }
}

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

#[test]
fn one_and_two_threads_are_bitwise_equal() {
    let (batch, seq, heads, d) = (2, 257, 3, 64);
    let c = heads * d;
    let mut rng = Rng(42);
    let qkv = rng.vec(batch * seq * 3 * c, 1.0);
    let dout = rng.vec(batch * seq * c, 1.0);
    for isa in Isa::available() {
        let run = |threads: usize| {
            pool(threads).install(|| {
                let mut out = vec![0f32; batch * seq * c];
                let mut lse = vec![0f32; batch * heads * seq];
                attention_train_forward_with(isa, &qkv, batch, seq, heads, d, &mut out, &mut lse)
                    .unwrap();
                let mut dqkv = vec![0f32; batch * seq * 3 * c];
                attention_backward_with(
                    isa, &qkv, &out, &dout, &lse, batch, seq, heads, d, &mut dqkv,
                )
                .unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                (bits(&out), bits(&lse), bits(&dqkv))
            })
        };
        assert!(
            run(1) == run(2),
            "{isa:?}: results differ between 1 and 2 threads"
        );
    }
}

#[test]
fn default_entry_points_match_the_inference_kernel() {
    let (batch, seq, heads, d) = (2, 100, 3, 64);
    let c = heads * d;
    let mut rng = Rng(5);
    let qkv = rng.vec(batch * seq * 3 * c, 1.0);
    let mut out = vec![0f32; batch * seq * c];
    let mut lse = vec![0f32; batch * heads * seq];
    attention_train_forward(&qkv, batch, seq, heads, d, &mut out, &mut lse).unwrap();
    let mut inf = vec![0f32; batch * seq * c];
    attention_forward(
        HeadsRef::fused_qkv(&qkv, batch, seq, heads, d, 0).unwrap(),
        HeadsRef::fused_qkv(&qkv, batch, seq, heads, d, 1).unwrap(),
        HeadsRef::fused_qkv(&qkv, batch, seq, heads, d, 2).unwrap(),
        HeadsMut::seq_major(&mut inf, batch, seq, heads, d),
        AttentionOptions::causal(),
    )
    .unwrap();
    for (a, b) in out.iter().zip(&inf) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
    let dout = rng.vec(batch * seq * c, 1.0);
    let mut dqkv = vec![0f32; batch * seq * 3 * c];
    attention_backward(&qkv, &out, &dout, &lse, batch, seq, heads, d, &mut dqkv).unwrap();
    assert!(dqkv.iter().all(|v| v.is_finite()));
}

#[test]
fn gradient_matches_finite_differences() {
    // L = Σ dout ⊙ attention(qkv); central differences in f32 with a step of 1e-2.
    let (batch, seq, heads, d) = (1, 5, 2, 4);
    let c = heads * d;
    let mut rng = Rng(9);
    let qkv = rng.vec(batch * seq * 3 * c, 0.8);
    let dout = rng.vec(batch * seq * c, 1.0);
    let loss = |x: &[f32]| -> f64 {
        let mut out = vec![0f32; batch * seq * c];
        let mut lse = vec![0f32; batch * heads * seq];
        attention_train_forward_with(Isa::Scalar, x, batch, seq, heads, d, &mut out, &mut lse)
            .unwrap();
        out.iter()
            .zip(&dout)
            .map(|(&o, &g)| o as f64 * g as f64)
            .sum()
    };
    let mut out = vec![0f32; batch * seq * c];
    let mut lse = vec![0f32; batch * heads * seq];
    attention_train_forward(&qkv, batch, seq, heads, d, &mut out, &mut lse).unwrap();
    let mut dqkv = vec![0f32; qkv.len()];
    attention_backward(&qkv, &out, &dout, &lse, batch, seq, heads, d, &mut dqkv).unwrap();
    let gmax = dqkv.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
    let eps = 1e-2f32;
    for i in 0..qkv.len() {
        let mut x = qkv.clone();
        x[i] = qkv[i] + eps;
        let lp = loss(&x);
        x[i] = qkv[i] - eps;
        let lm = loss(&x);
        let fd = (lp - lm) / (2.0 * eps as f64);
        assert!(
            (fd - dqkv[i] as f64).abs() <= 2e-3 * gmax,
            "dqkv[{i}]: backward {} vs finite difference {fd}",
            dqkv[i]
        );
    }
}

#[test]
fn bad_shapes_are_errors() {
    let (b, t, h, d) = (2, 5, 3, 4);
    let c = h * d;
    let qkv = vec![0.1f32; b * t * 3 * c];
    let dout = vec![0.1f32; b * t * c];
    let mut out = vec![0f32; b * t * c];
    let mut lse = vec![0f32; b * h * t];
    let mut dqkv = vec![0f32; b * t * 3 * c];
    assert!(attention_train_forward(&qkv[1..], b, t, h, d, &mut out, &mut lse).is_err());
    assert!(attention_train_forward(&qkv, b, t, h, d, &mut out[1..], &mut lse).is_err());
    assert!(attention_train_forward(&qkv, b, t, h, d, &mut out, &mut lse[1..]).is_err());
    assert!(attention_train_forward(&qkv, b, t, 0, d, &mut out, &mut lse).is_err());
    assert!(attention_train_forward(&qkv, b, t, h, 0, &mut out, &mut lse).is_err());
    assert!(attention_train_forward(&qkv, usize::MAX, t, h, d, &mut out, &mut lse).is_err());
    attention_train_forward(&qkv, b, t, h, d, &mut out, &mut lse).unwrap();
    let bw = |qkv: &[f32], out: &[f32], dout: &[f32], lse: &[f32], dqkv: &mut [f32]| {
        attention_backward(qkv, out, dout, lse, b, t, h, d, dqkv)
    };
    assert!(bw(&qkv[1..], &out, &dout, &lse, &mut dqkv).is_err());
    assert!(bw(&qkv, &out[1..], &dout, &lse, &mut dqkv).is_err());
    assert!(bw(&qkv, &out, &dout[1..], &lse, &mut dqkv).is_err());
    assert!(bw(&qkv, &out, &dout, &lse[1..], &mut dqkv).is_err());
    assert!(bw(&qkv, &out, &dout, &lse, &mut dqkv[1..]).is_err());
    assert!(attention_backward(&qkv, &out, &dout, &lse, b, t, h, 0, &mut dqkv).is_err());
    bw(&qkv, &out, &dout, &lse, &mut dqkv).unwrap();
    // Empty batches or sequences are fine and touch nothing.
    attention_train_forward(&[], 0, t, h, d, &mut [], &mut []).unwrap();
    attention_backward(&[], &[], &[], &[], b, 0, h, d, &mut []).unwrap();
    // An unavailable path is an error, not a crash.
    for isa in [Isa::Avx2, Isa::Avx512] {
        if !Isa::available().contains(&isa) {
            assert!(
                attention_train_forward_with(isa, &qkv, b, t, h, d, &mut out, &mut lse).is_err()
            );
        }
    }
}

#[test]
fn non_finite_inputs_do_not_leak_into_later_calls() {
    // Scratch buffers are reused between calls on a thread: a call on infinite and NaN inputs
    // must not change the result of the next clean call.
    let (batch, seq, heads, d) = (1, 70, 2, 64);
    let c = heads * d;
    let mut rng = Rng(11);
    let qkv = rng.vec(batch * seq * 3 * c, 1.0);
    let dout = rng.vec(batch * seq * c, 1.0);
    let mut bad = qkv.clone();
    for (i, v) in bad.iter_mut().enumerate() {
        if i % 7 == 0 {
            *v = if i % 2 == 0 { f32::INFINITY } else { f32::NAN };
        }
    }
    let bad_dout: Vec<f32> = dout.iter().map(|v| v * f32::MAX).collect();
    for isa in Isa::available() {
        pool(1).install(|| {
            let run = |qkv: &[f32], dout: &[f32]| {
                let mut out = vec![0f32; batch * seq * c];
                let mut lse = vec![0f32; batch * heads * seq];
                attention_train_forward_with(isa, qkv, batch, seq, heads, d, &mut out, &mut lse)
                    .unwrap();
                let mut dqkv = vec![0f32; batch * seq * 3 * c];
                attention_backward_with(
                    isa, qkv, &out, dout, &lse, batch, seq, heads, d, &mut dqkv,
                )
                .unwrap();
                [out, lse, dqkv].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            };
            let clean = run(&qkv, &dout);
            run(&bad, &bad_dout);
            run(&qkv, &bad_dout);
            assert!(
                run(&qkv, &dout) == clean,
                "{isa:?}: a poisoned call changed the next one"
            );
        });
    }
}
