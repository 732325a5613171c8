//! Self-consistency of the GPT-2 training fixtures (`tests/fixtures/gpt2_train/`), with no
//! kiln code involved: the initial weights regenerated from the manifest run through a naive f64
//! GPT-2 forward give PyTorch's per-position losses and logits (which also validates the
//! weight regeneration); the stored gradients' sums of squares give the stored global norms
//! (times the clipping factor); and the first AdamW step, recomputed in f64 from the initial
//! weights and the stored gradients, gives the stored parameters (decay on matrices and
//! embeddings only).
mod gpt2_train_common;

use gpt2_train_common::{TrainConfig, TrainFixtures};
use std::collections::HashMap;

type Params = HashMap<String, Vec<f64>>;

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    x.iter()
        .zip(w.iter().zip(b))
        .map(|(v, (w, b))| (v - mean) * r * w + b)
        .collect()
}

/// `y = x·W + b` with transformers' Conv1D layout `W [in, out]`.
fn conv1d(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let out = b.len();
    let mut y = b.to_vec();
    for (i, &xi) in x.iter().enumerate() {
        for (o, yo) in y.iter_mut().enumerate() {
            *yo += xi * w[i * out + o];
        }
    }
    y
}

fn gelu_new(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// Naive f64 forward of one sequence (`tokens` = `seq + 1` ids): per-position cross-entropy
/// losses and the logits of the first `keep` positions.
fn forward(cfg: &TrainConfig, p: &Params, tokens: &[i64], keep: usize) -> (Vec<f64>, Vec<f64>) {
    let (c, nh) = (cfg.n_embd, cfg.n_head);
    let d = c / nh;
    let t_len = tokens.len() - 1;
    let g = |name: &str| -> &Vec<f64> { &p[name] };
    let wte = g("transformer.wte.weight");
    let wpe = g("transformer.wpe.weight");
    let mut x: Vec<Vec<f64>> = (0..t_len)
        .map(|t| {
            let id = tokens[t] as usize;
            (0..c).map(|k| wte[id * c + k] + wpe[t * c + k]).collect()
        })
        .collect();
    for l in 0..cfg.n_layer {
        let pre = format!("transformer.h.{l}.");
        let n = |s: &str| g(&format!("{pre}{s}"));
        let eps = cfg.layer_norm_epsilon;
        let qkv: Vec<Vec<f64>> = x
            .iter()
            .map(|xt| {
                let a = layer_norm(xt, n("ln_1.weight"), n("ln_1.bias"), eps);
                conv1d(&a, n("attn.c_attn.weight"), n("attn.c_attn.bias"))
            })
            .collect();
        let mut att = vec![vec![0f64; c]; t_len];
        for h in 0..nh {
            for i in 0..t_len {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|k| qkv[i][h * d + k] * qkv[j][c + h * d + k])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    let pj = (sj - m).exp() / z;
                    for k in 0..d {
                        att[i][h * d + k] += pj * qkv[j][2 * c + h * d + k];
                    }
                }
            }
        }
        for t in 0..t_len {
            let y = conv1d(&att[t], n("attn.c_proj.weight"), n("attn.c_proj.bias"));
            for k in 0..c {
                x[t][k] += y[k];
            }
            let a = layer_norm(&x[t], n("ln_2.weight"), n("ln_2.bias"), eps);
            let hid: Vec<f64> = conv1d(&a, n("mlp.c_fc.weight"), n("mlp.c_fc.bias"))
                .into_iter()
                .map(gelu_new)
                .collect();
            let y = conv1d(&hid, n("mlp.c_proj.weight"), n("mlp.c_proj.bias"));
            for k in 0..c {
                x[t][k] += y[k];
            }
        }
    }
    let mut losses = Vec::new();
    let mut kept = Vec::new();
    for t in 0..t_len {
        let h = layer_norm(
            &x[t],
            g("transformer.ln_f.weight"),
            g("transformer.ln_f.bias"),
            cfg.layer_norm_epsilon,
        );
        let logits: Vec<f64> = (0..cfg.vocab_size)
            .map(|v| (0..c).map(|k| h[k] * wte[v * c + k]).sum())
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        losses.push(lse - logits[tokens[t + 1] as usize]);
        if t < keep {
            kept.extend_from_slice(&logits);
        }
    }
    (losses, kept)
}

fn initial(fx: &TrainFixtures) -> Params {
    fx.initial_weights()
        .into_iter()
        .map(|(n, _, v)| (n, to_f64(&v)))
        .collect()
}

#[test]
fn manifest_describes_every_parameter_and_token() {
    let fx = TrainFixtures::load();
    let cfg = fx.config();
    let w = fx.initial_weights();
    assert_eq!(w.len(), 4 + 12 * cfg.n_layer);
    assert_eq!(w[0].0, "transformer.wte.weight");
    assert_eq!(w[0].1, vec![cfg.vocab_size, cfg.n_embd]);
    for (name, shape, values) in &w {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
        assert!(values.iter().all(|v| v.is_finite()), "{name}");
        // The stored gradient and updated parameter have the same shape.
        let e = fx.entry(&TrainFixtures::grad_name("plain", 1, name));
        assert_eq!(&e.shape, shape, "{name}");
    }
    // Layer-norm weights start near 1, everything else near 0.
    let ln = &w
        .iter()
        .find(|x| x.0 == "transformer.ln_f.weight")
        .unwrap()
        .2;
    assert!(ln.iter().all(|&v| (0.89..=1.11).contains(&v)));
    for case in ["plain", "accum_clip"] {
        let (b, t, m, steps) = fx.case_dims(case);
        let (shape, tokens) = fx.tokens(case);
        assert_eq!(shape, vec![steps * m, b, t + 1]);
        assert!(tokens
            .iter()
            .all(|&x| (0..cfg.vocab_size as i64).contains(&x)));
        assert!(t < cfg.n_positions);
    }
}

#[test]
fn naive_forward_of_regenerated_weights_gives_pytorch_losses_and_logits() {
    let fx = TrainFixtures::load();
    let cfg = fx.config();
    let p = initial(&fx);
    // Step 1 of both cases runs on the initial weights.
    for (case, micro) in [("plain", 1), ("accum_clip", 1), ("accum_clip", 2)] {
        let (b, t, _, _) = fx.case_dims(case);
        let tokens = fx.micro_batch(case, 1, micro);
        let mut losses = Vec::new();
        let mut logits = Vec::new();
        for s in 0..b {
            let (l, k) = forward(&cfg, &p, &tokens[s * (t + 1)..(s + 1) * (t + 1)], 4);
            losses.extend(l);
            if s == 0 {
                logits = k;
            }
        }
        let got: Vec<f32> = losses.iter().map(|&v| v as f32).collect();
        fx.check(&TrainFixtures::losses_name(case, 1, micro), &got, 2e-6);
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        let rec = fx.step(case, 1);
        assert!(
            (mean - rec.micro_losses[micro - 1]).abs() < 2e-5,
            "{case} micro {micro}: mean loss {mean} vs {}",
            rec.micro_losses[micro - 1]
        );
        if micro == 1 {
            let got: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
            fx.check(&TrainFixtures::logits_name(case, 1), &got, 2e-5);
        }
    }
    let rec = fx.step("accum_clip", 1);
    let mean = rec.micro_losses.iter().sum::<f64>() / rec.micro_losses.len() as f64;
    assert!((mean - rec.loss).abs() < 1e-6);
}

#[test]
fn stored_gradients_have_the_stored_norms() {
    let fx = TrainFixtures::load();
    for (case, step) in [("plain", 1), ("accum_clip", 1), ("accum_clip", 2)] {
        let rec = fx.step(case, step);
        let sq: f64 = fx
            .param_names()
            .iter()
            .map(|n| fx.entry(&TrainFixtures::grad_name(case, step, n)).sq_sum)
            .sum();
        // The stored gradients are after clipping; their exact norm is the exact norm before
        // clipping times the factor. PyTorch's own f32 norm is within 1e-4 of the exact one.
        let want = rec.grad_norm_f64 * rec.clip_coef;
        assert!(
            (sq.sqrt() - want).abs() <= 1e-6 * want,
            "{case} step {step}: norm of the stored gradients {} vs {want}",
            sq.sqrt()
        );
        assert!((rec.grad_norm - rec.grad_norm_f64).abs() <= 1e-4 * rec.grad_norm_f64);
        if case == "accum_clip" {
            assert!(rec.clip_coef < 1.0, "clipping was expected to act");
            assert!((rec.clip_coef - 1.0 / (rec.grad_norm + 1e-6)).abs() < 1e-9);
        } else {
            assert_eq!(rec.clip_coef, 1.0);
        }
    }
}

/// PyTorch's AdamW at step 1 in f64: `p·(1 − lr·wd) − (lr/(1−β1))·m / (√v/√(1−β2) + eps)`
/// with `m = (1−β1)·g`, `v = (1−β2)·g²`.
fn adamw_first_step(p: f64, g: f64, lr: f64, decay: f64, fx: &TrainFixtures) -> f64 {
    let (b1, b2, eps, _) = fx.adamw();
    let m = (1.0 - b1) * g;
    let v = (1.0 - b2) * g * g;
    let denom = v.sqrt() / (1.0 - b2).sqrt() + eps;
    p * (1.0 - lr * decay) - lr / (1.0 - b1) * m / denom
}

#[test]
fn first_adamw_step_follows_from_the_stored_gradients() {
    let fx = TrainFixtures::load();
    let (_, _, _, wd) = fx.adamw();
    let init = fx.initial_weights();
    for case in ["plain", "accum_clip"] {
        let lr = fx.step(case, 1).lr;
        for (name, shape, p0) in &init {
            let decay = if shape.len() >= 2 { wd } else { 0.0 };
            let gname = TrainFixtures::grad_name(case, 1, name);
            let pname = TrainFixtures::param_name(case, 1, name);
            let (ge, pe) = (fx.entry(&gname), fx.entry(&pname));
            // Compare wherever both gradient and parameter were stored.
            let mut pairs: Vec<(usize, f32, f32)> = Vec::new();
            let (gs, ps) = (fx.samples(&gname), fx.samples(&pname));
            for (k, &p) in ps.iter().enumerate() {
                let i = k * pe.step;
                if i % ge.step == 0 {
                    pairs.push((i, gs[i / ge.step], p));
                }
            }
            if ge.rows_offset.is_some() {
                let ((ids, gr), (_, pr)) = (fx.rows(&gname), fx.rows(&pname));
                let width = shape[1];
                for (r, &id) in ids.iter().enumerate() {
                    for x in 0..width {
                        let k = r * width + x;
                        pairs.push((id * width + x, gr[k], pr[k]));
                    }
                }
            }
            assert!(!pairs.is_empty(), "{case}: nothing to compare for {name}");
            for (i, g, p1) in pairs {
                let want = adamw_first_step(p0[i] as f64, g as f64, lr, decay, &fx);
                assert!(
                    (p1 as f64 - want).abs() <= 2.5e-7 * want.abs() + 1e-9,
                    "{case} {name}[{i}]: stored {p1}, AdamW from the stored gradient {want}"
                );
            }
        }
    }
}
