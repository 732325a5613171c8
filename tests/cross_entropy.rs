//! Cross-entropy fused with the softmax (`kiln_cpu::elementwise::cross_entropy`) against f64:
//! vocab 1, 7, 50257, extreme logits (±1e4, all equal, −∞), every kernel family this CPU runs,
//! bitwise equality between 1 and 2 threads and between the loss-only and the fused entry
//! points, and bad targets/shapes as errors that leave the logits untouched.
use kiln::cpu::elementwise::activations::Isa;
use kiln::cpu::elementwise::cross_entropy::{
    cross_entropy_forward, cross_entropy_forward_backward, cross_entropy_forward_backward_with,
    cross_entropy_forward_with,
};

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

/// f64 loss and gradient `(softmax − onehot)·dscale` of each row.
fn naive(x: &[f32], vocab: usize, targets: &[u32], dscale: f64) -> (Vec<f64>, Vec<f64>) {
    let mut losses = Vec::new();
    let mut grad = Vec::new();
    for (row, &t) in x.chunks(vocab).zip(targets) {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        losses.push(s.ln() + m - row[t as usize] as f64);
        for (j, &v) in row.iter().enumerate() {
            let p = (v as f64 - m).exp() / s;
            grad.push((p - if j == t as usize { 1.0 } else { 0.0 }) * dscale);
        }
    }
    (losses, grad)
}

fn check(isa: Isa, name: &str, x: &[f32], vocab: usize, targets: &[u32], dscale: f32) {
    let rows = targets.len();
    let (want_loss, want_grad) = naive(x, vocab, targets, dscale as f64);
    let mut g = x.to_vec();
    let mut losses = vec![f32::NAN; rows];
    cross_entropy_forward_backward_with(isa, &mut g, rows, vocab, targets, dscale, &mut losses)
        .unwrap();
    for (r, (&l, &w)) in losses.iter().zip(&want_loss).enumerate() {
        assert!(
            (l as f64 - w).abs() <= 2e-6 * w.abs().max(1.0),
            "{isa:?} {name}: loss[{r}] {l} vs {w}"
        );
    }
    let gmax = dscale.abs() as f64;
    for (i, (&a, &w)) in g.iter().zip(&want_grad).enumerate() {
        // Gradients are probabilities times dscale: relative 1e-5 plus a floor of 1e-7·dscale.
        assert!(
            (a as f64 - w).abs() <= 1e-5 * w.abs() + 1e-7 * gmax,
            "{isa:?} {name}: grad[{i}] {a} vs {w}"
        );
    }
    // Loss only: bitwise the same losses, logits untouched.
    let mut only = vec![f32::NAN; rows];
    cross_entropy_forward_with(isa, x, rows, vocab, targets, &mut only).unwrap();
    assert_eq!(
        only.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        losses.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{isa:?} {name}: forward-only losses differ from the fused ones"
    );
}

#[test]
fn matches_f64_for_odd_and_real_vocabularies() {
    for isa in Isa::available() {
        for (n, &vocab) in [1usize, 7, 33, 50257].iter().enumerate() {
            let rows = if vocab > 1000 { 3 } else { 5 };
            let mut rng = Rng(10 + n as u64);
            let x = rng.vec(rows * vocab, 4.0);
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 3) % vocab) as u32).collect();
            check(
                isa,
                &format!("vocab {vocab}"),
                &x,
                vocab,
                &targets,
                1.0 / rows as f32,
            );
        }
    }
}

#[test]
fn extreme_logits() {
    for isa in Isa::available() {
        let vocab = 50257;
        // ±1e4 mixed: the target on the maximum, on the minimum, and in between.
        let mut x: Vec<f32> = (0..3 * vocab)
            .map(|i| {
                if i % 5 == 0 {
                    1e4
                } else if i % 5 == 1 {
                    -1e4
                } else {
                    (i % 97) as f32
                }
            })
            .collect();
        check(isa, "±1e4", &x, vocab, &[0, 1, 2], 0.5);
        // Identical values: uniform probabilities, loss = ln(vocab).
        x.iter_mut().for_each(|v| *v = 3.25);
        check(isa, "identical", &x, vocab, &[0, 17, 50256], 1.0);
        let mut losses = [0f32; 3];
        cross_entropy_forward_with(isa, &x, 3, vocab, &[0, 17, 50256], &mut losses).unwrap();
        for l in losses {
            assert!((l as f64 - (vocab as f64).ln()).abs() < 1e-5, "{l}");
        }
        // −∞ logits (masked entries) have probability 0; a −∞ target has infinite loss.
        let mut y = vec![
            0.5f32,
            f32::NEG_INFINITY,
            2.0,
            f32::NEG_INFINITY,
            -1.0,
            0.0,
            1.0,
        ];
        let mut l = [0f32; 1];
        cross_entropy_forward_backward_with(isa, &mut y, 1, 7, &[2], 1.0, &mut l).unwrap();
        assert!(
            l[0].is_finite() && y[1] == 0.0 && y[3] == 0.0,
            "{isa:?} {l:?} {y:?}"
        );
        let y = vec![0.5f32, f32::NEG_INFINITY, 2.0];
        cross_entropy_forward_with(isa, &y, 1, 3, &[1], &mut l).unwrap();
        assert_eq!(l[0], f32::INFINITY);
        // NaN propagates to the loss, as in PyTorch.
        let y = vec![
            0.5f32,
            f32::NAN,
            2.0,
            0.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
        ];
        cross_entropy_forward_with(isa, &y, 1, 12, &[0], &mut l).unwrap();
        assert!(l[0].is_nan());
        // Huge dynamic range within one row: 1 is certain, the loss is 0.
        let mut y = vec![-1e4f32; 40];
        y[13] = 1e4;
        let mut l = [1f32; 1];
        cross_entropy_forward_backward_with(isa, &mut y, 1, 40, &[13], 1.0, &mut l).unwrap();
        assert_eq!(l[0], 0.0);
        assert!(y.iter().all(|&v| v == 0.0), "{y:?}");
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
    let (rows, vocab) = (9, 50257);
    let x = Rng(3).vec(rows * vocab, 6.0);
    let targets: Vec<u32> = (0..rows).map(|r| (r * 5003) as u32).collect();
    for isa in Isa::available() {
        let run = |threads: usize| {
            pool(threads).install(|| {
                let mut g = x.clone();
                let mut l = vec![0f32; rows];
                cross_entropy_forward_backward_with(
                    isa, &mut g, rows, vocab, &targets, 0.1, &mut l,
                )
                .unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                (bits(&g), bits(&l))
            })
        };
        assert!(run(1) == run(2), "{isa:?}: 1 vs 2 threads differ");
    }
}

#[test]
fn bad_input_is_an_error_and_writes_nothing() {
    let (rows, vocab) = (3, 7);
    let x = Rng(1).vec(rows * vocab, 1.0);
    let mut g = x.clone();
    let mut l = vec![-7f32; rows];
    // Target out of range (in the last row): nothing written.
    let err =
        cross_entropy_forward_backward(&mut g, rows, vocab, &[1, 2, 7], 1.0, &mut l).unwrap_err();
    assert!(err.to_string().contains("target 7"), "{err}");
    assert_eq!(g, x);
    assert!(l.iter().all(|&v| v == -7.0));
    assert!(cross_entropy_forward(&x, rows, vocab, &[9, 0, 0], &mut l).is_err());
    // Shapes.
    assert!(
        cross_entropy_forward_backward(&mut g[1..], rows, vocab, &[0; 3], 1.0, &mut l).is_err()
    );
    assert!(cross_entropy_forward_backward(&mut g, rows, vocab, &[0; 2], 1.0, &mut l).is_err());
    assert!(
        cross_entropy_forward_backward(&mut g, rows, vocab, &[0; 3], 1.0, &mut l[1..]).is_err()
    );
    assert!(cross_entropy_forward(&x, rows, 0, &[0; 3], &mut l).is_err());
    assert!(cross_entropy_forward(&x, usize::MAX, 2, &[0; 3], &mut l).is_err());
    // No rows: fine.
    cross_entropy_forward_backward(&mut [], 0, vocab, &[], 1.0, &mut []).unwrap();
    // The default entry points agree with a forced path.
    let targets = [0u32, 3, 6];
    let mut a = x.clone();
    let mut la = vec![0f32; rows];
    cross_entropy_forward_backward(&mut a, rows, vocab, &targets, 1.0, &mut la).unwrap();
    let (wl, wg) = naive(&x, vocab, &targets, 1.0);
    for (g, w) in a.iter().zip(&wg) {
        assert!((*g as f64 - w).abs() < 1e-6);
    }
    for (g, w) in la.iter().zip(&wl) {
        assert!((*g as f64 - w).abs() < 1e-5);
    }
}
