//! Optimisers: Adam and AdamW with PyTorch's update order and bias correction.
//!
//! For step `t = 1, 2, …` and each parameter tensor (any shape; a parameter set mixes shapes):
//! ```text
//! Adam  (L2):        g ← g + wd·θ
//! AdamW (decoupled): θ ← θ·(1 − lr·wd)
//! m ← m + (1 − β1)·(g − m)                  (torch.lerp)
//! v ← β2·v + (1 − β2)·g²
//! θ ← θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
//! ```
//! The bias corrections are computed in f64 (Python floats in PyTorch) and applied in f32.
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// Hyper-parameters of Adam / AdamW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// true: AdamW (decoupled weight decay); false: Adam (L2 added to the gradient).
    pub decoupled: bool,
}

impl AdamConfig {
    /// `torch.optim.Adam(lr=lr)` defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn adam(lr: f64) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
    /// `torch.optim.AdamW(lr=lr, weight_decay=wd)`.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        AdamConfig {
            weight_decay,
            decoupled: true,
            ..Self::adam(lr)
        }
    }
    /// Sets the betas (DCGAN uses (0.5, 0.999)).
    pub fn betas(self, beta1: f64, beta2: f64) -> Self {
        AdamConfig {
            beta1,
            beta2,
            ..self
        }
    }
}

/// Adam / AdamW state over a fixed list of parameter tensors.
#[derive(Clone, Debug)]
pub struct Adam {
    pub config: AdamConfig,
    /// Steps taken so far.
    pub step: u64,
    /// First and second moments, one buffer per parameter tensor.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl Adam {
    /// State for parameter tensors of the given element counts.
    pub fn new(config: AdamConfig, sizes: &[usize]) -> Result<Self> {
        let c = &config;
        let ok = c.lr >= 0.0
            && c.eps >= 0.0
            && c.weight_decay >= 0.0
            && (0.0..1.0).contains(&c.beta1)
            && (0.0..1.0).contains(&c.beta2);
        if !ok {
            return Err(Error::invalid(format!(
                "adam: invalid hyper-parameters {c:?}"
            )));
        }
        Ok(Adam {
            config,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        })
    }

    /// One update of every parameter tensor from its gradient (same order and sizes as `new`).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]]) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::invalid(format!(
                "adam: {} parameter tensors and {} gradients for a state of {}",
                params.len(),
                grads.len(),
                self.m.len()
            )));
        }
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if p.len() != self.m[i].len() || g.len() != self.m[i].len() {
                return Err(Error::shape(
                    format!("adam parameter {i}"),
                    &[self.m[i].len()],
                    &[p.len(), g.len()],
                ));
            }
        }
        self.step += 1;
        for ((p, g), (m, v)) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
        {
            adam_update(&self.config, self.step, p, g, m, v)?;
        }
        Ok(())
    }
}

/// One Adam / AdamW update of a single parameter tensor `p` from its gradient `g`, with its
/// moments `m` and `v` (all of equal length), at step `step ≥ 1`. Element-wise, in parallel
/// chunks: the result does not depend on the thread count.
pub fn adam_update(
    c: &AdamConfig,
    step: u64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    let n = p.len();
    if g.len() != n || m.len() != n || v.len() != n {
        return Err(Error::shape(
            "adam: gradient and moments",
            &[n],
            &[g.len(), m.len(), v.len()],
        ));
    }
    if step == 0 || step > i32::MAX as u64 {
        return Err(Error::invalid(format!("adam: step {step} out of range")));
    }
    let t = step as i32;
    let bc1 = 1.0 - c.beta1.powi(t);
    let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
    let step_size = (c.lr / bc1) as f32;
    let (w1, b2, w2) = (
        (1.0 - c.beta1) as f32,
        c.beta2 as f32,
        (1.0 - c.beta2) as f32,
    );
    let (eps, wd) = (c.eps as f32, c.weight_decay as f32);
    let decay = (1.0 - c.lr * c.weight_decay) as f32;
    let decoupled = c.decoupled;
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let mut g = g;
                if wd != 0.0 {
                    if decoupled {
                        *p *= decay;
                    } else {
                        g += wd * *p;
                    }
                }
                *m += w1 * (g - *m);
                *v = b2 * *v + w2 * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p += -step_size * (*m / denom);
            }
        });
    Ok(())
}
