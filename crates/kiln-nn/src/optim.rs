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
    let k = AdamConsts {
        w1,
        b2,
        w2,
        eps,
        wd,
        decay,
        bc2_sqrt,
        step_size,
        decoupled: c.decoupled,
    };
    let isa = Isa::detect();
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| adam_chunk(isa, &k, p, g, m, v));
    Ok(())
}

/// The per-element constants of one Adam step.
struct AdamConsts {
    w1: f32,
    b2: f32,
    w2: f32,
    eps: f32,
    wd: f32,
    decay: f32,
    bc2_sqrt: f32,
    step_size: f32,
    decoupled: bool,
}

/// The instruction set the update loop is compiled for (chosen at run time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// One chunk of the update on `isa`. Every path runs the same IEEE operations in the same order
/// per element (no contraction into fused multiply-adds), so the results are bitwise equal.
fn adam_chunk(isa: Isa, k: &AdamConsts, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` chose this path only after checking that the CPU has AVX-512F.
        Isa::Avx512 => unsafe { adam_avx512(k, p, g, m, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` chose this path only after checking that the CPU has AVX2.
        Isa::Avx2 => unsafe { adam_avx2(k, p, g, m, v) },
        Isa::Scalar => adam_body(k, p, g, m, v),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn adam_avx512(k: &AdamConsts, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    adam_body(k, p, g, m, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn adam_avx2(k: &AdamConsts, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    adam_body(k, p, g, m, v)
}

/// `m ← m + w1·(g − m)`, `v ← b2·v + w2·g²`, `p ← p − step·m/(√v/bc2 + eps)`, with the decay
/// (decoupled: `p ← p·decay` first; L2: `g ← g + wd·p`) in a loop of its own per mode, so that
/// each loop is branch-free and vectorises.
#[inline(always)]
fn adam_body(k: &AdamConsts, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    let update = |p: &mut f32, g: f32, m: &mut f32, v: &mut f32| {
        *m += k.w1 * (g - *m);
        *v = k.b2 * *v + k.w2 * g * g;
        let denom = v.sqrt() / k.bc2_sqrt + k.eps;
        *p += -k.step_size * (*m / denom);
    };
    let it = p.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut()));
    if k.wd == 0.0 {
        it.for_each(|((p, &g), (m, v))| update(p, g, m, v));
    } else if k.decoupled {
        it.for_each(|((p, &g), (m, v))| {
            *p *= k.decay;
            update(p, g, m, v)
        });
    } else {
        it.for_each(|((p, &g), (m, v))| {
            let g = g + k.wd * *p;
            update(p, g, m, v)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction-set path gives bitwise the scalar path's update, in each decay mode.
    #[test]
    fn update_paths_are_bitwise_equal() {
        let n = 1000 + 13;
        let mut s = 0x1234_5678u32;
        let mut r = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as f32 / u32::MAX as f32 - 0.5
        };
        let p0: Vec<f32> = (0..n).map(|_| r()).collect();
        let g: Vec<f32> = (0..n).map(|_| r() * 1e-2).collect();
        let m0: Vec<f32> = (0..n).map(|_| r() * 1e-3).collect();
        let v0: Vec<f32> = (0..n).map(|_| (r() * 1e-3).abs()).collect();
        let mut paths = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                paths.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                paths.push(Isa::Avx512);
            }
        }
        for (wd, decoupled) in [(0.0, true), (0.1, true), (0.1, false)] {
            let k = AdamConsts {
                w1: 0.1,
                b2: 0.95,
                w2: 0.05,
                eps: 1e-8,
                wd,
                decay: 1.0 - 1e-3 * wd,
                bc2_sqrt: 0.3,
                step_size: 1e-3,
                decoupled,
            };
            let run = |isa| {
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                adam_chunk(isa, &k, &mut p, &g, &mut m, &mut v);
                (p, m, v)
            };
            let want = run(Isa::Scalar);
            for &isa in &paths {
                let got = run(isa);
                let bits = |x: &Vec<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.0), bits(&want.0), "{isa:?} p (wd {wd})");
                assert_eq!(bits(&got.1), bits(&want.1), "{isa:?} m");
                assert_eq!(bits(&got.2), bits(&want.2), "{isa:?} v");
            }
        }
    }
}
