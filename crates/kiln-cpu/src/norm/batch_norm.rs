//! Batch normalisation over `[N, C, HW]` (NCHW with the spatial dims flattened), per channel.
//!
//! Training (`M = N·HW` values per channel):
//! ```text
//! mean_c = Σ x / M            var_c = Σ (x − mean_c)² / M          (biased: used to normalise)
//! rstd_c = 1 / √(var_c + eps) x̂ = (x − mean_c)·rstd_c              y = γ_c·x̂ + β_c
//! running_mean ← (1 − m)·running_mean + m·mean_c
//! running_var  ← (1 − m)·running_var  + m·var_c·M/(M − 1)           (unbiased, as PyTorch does)
//! ```
//! Backward (training): `dβ = Σ dy`, `dγ = Σ dy·x̂`, `dx = γ·rstd/M · (M·dy − dβ − x̂·dγ)`.
//! Eval: `y = γ·(x − running_mean)/√(running_var + eps) + β`, `dx = dy·γ/√(running_var + eps)`.
//!
//! Statistics are accumulated in f64 in a fixed order; channels run in parallel, so results are
//! identical for any thread count.
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// The shape `[N, C, HW]` of a batch-norm operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    pub batch: usize,
    pub channels: usize,
    /// Height × width.
    pub hw: usize,
}

impl BnShape {
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values per channel: `N·HW`.
    fn m(&self) -> usize {
        self.batch * self.hw
    }
    /// The `HW` values of channel `c` in image `n`.
    fn plane<'a>(&self, x: &'a [f32], n: usize, c: usize) -> &'a [f32] {
        &x[(n * self.channels + c) * self.hw..][..self.hw]
    }
}

fn check(s: &BnShape, tensors: &[(&str, usize)], per_channel: &[(&str, usize)]) -> Result<()> {
    if s.batch == 0 || s.channels == 0 || s.hw == 0 {
        return Err(Error::invalid(format!("batch_norm: empty shape {s:?}")));
    }
    for (name, len) in tensors {
        if *len != s.len() {
            return Err(Error::shape(
                format!("batch_norm {name}"),
                &[s.batch, s.channels, s.hw],
                &[*len],
            ));
        }
    }
    for (name, len) in per_channel {
        if *len != s.channels {
            return Err(Error::shape(
                format!("batch_norm {name}"),
                &[s.channels],
                &[*len],
            ));
        }
    }
    Ok(())
}

/// What a training forward pass saves for the backward pass, per channel.
#[derive(Clone, Debug, Default)]
pub struct BnSaved {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// Training-mode forward. `x`, `y` `[N, C, HW]`; `gamma`, `beta`, the running statistics
/// `[C]`. Updates `running_mean`/`running_var` with `momentum` (PyTorch: 0.1) when given.
/// Needs `N·HW > 1` for the unbiased variance (as PyTorch does).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_forward(
    s: &BnShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    momentum: f32,
    running: Option<(&mut [f32], &mut [f32])>,
    y: &mut [f32],
) -> Result<BnSaved> {
    check(
        s,
        &[("x", x.len()), ("y", y.len())],
        &[("gamma", gamma.len()), ("beta", beta.len())],
    )?;
    let m = s.m();
    if m < 2 {
        return Err(Error::invalid(format!(
            "batch_norm: training needs more than one value per channel, got shape {s:?}"
        )));
    }
    // Per-channel statistics, two passes in f64.
    let stats: Vec<(f64, f64)> = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let mut sum = 0f64;
            for n in 0..s.batch {
                sum += s.plane(x, n, c).iter().map(|&v| v as f64).sum::<f64>();
            }
            let mean = sum / m as f64;
            let mut sq = 0f64;
            for n in 0..s.batch {
                sq += s
                    .plane(x, n, c)
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>();
            }
            (mean, sq)
        })
        .collect();
    let mut saved = BnSaved {
        mean: Vec::with_capacity(s.channels),
        rstd: Vec::with_capacity(s.channels),
    };
    for &(mean, sq) in &stats {
        saved.mean.push(mean as f32);
        saved
            .rstd
            .push((1.0 / (sq / m as f64 + eps as f64).sqrt()) as f32);
    }
    if let Some((rm, rv)) = running {
        check(
            s,
            &[],
            &[("running_mean", rm.len()), ("running_var", rv.len())],
        )?;
        for (c, &(mean, sq)) in stats.iter().enumerate() {
            let unbiased = (sq / (m - 1) as f64) as f32;
            rm[c] = (1.0 - momentum) * rm[c] + momentum * mean as f32;
            rv[c] = (1.0 - momentum) * rv[c] + momentum * unbiased;
        }
    }
    normalize(s, x, &saved.mean, &saved.rstd, gamma, beta, y);
    Ok(saved)
}

/// `y = γ·(x − mean)·rstd + β`, per channel.
fn normalize(
    s: &BnShape,
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
) {
    y.par_chunks_mut(s.hw)
        .zip(x.par_chunks(s.hw))
        .enumerate()
        .for_each(|(i, (yp, xp))| {
            let c = i % s.channels;
            let scale = gamma[c] * rstd[c];
            let shift = beta[c] - mean[c] * scale;
            for (y, &x) in yp.iter_mut().zip(xp) {
                *y = x * scale + shift;
            }
        });
}

/// Eval-mode forward with the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_forward(
    s: &BnShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    y: &mut [f32],
) -> Result<()> {
    check(
        s,
        &[("x", x.len()), ("y", y.len())],
        &[
            ("gamma", gamma.len()),
            ("beta", beta.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
        ],
    )?;
    let rstd: Vec<f32> = running_var
        .iter()
        .map(|&v| (1.0 / (v as f64 + eps as f64).sqrt()) as f32)
        .collect();
    normalize(s, x, running_mean, &rstd, gamma, beta, y);
    Ok(())
}

/// Training-mode backward: `dx` `[N, C, HW]` (overwritten), `dgamma`, `dbeta` `[C]`
/// (overwritten), from `x`, `dy` and what the forward pass saved.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_backward(
    s: &BnShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    saved: &BnSaved,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    check(
        s,
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
        &[
            ("gamma", gamma.len()),
            ("saved mean", saved.mean.len()),
            ("saved rstd", saved.rstd.len()),
            ("dgamma", dgamma.len()),
            ("dbeta", dbeta.len()),
        ],
    )?;
    // dβ = Σ dy, dγ = Σ dy·x̂ (f64, fixed order).
    let sums: Vec<(f64, f64)> = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let (mean, rstd) = (saved.mean[c] as f64, saved.rstd[c] as f64);
            let (mut sdy, mut sdyx) = (0f64, 0f64);
            for n in 0..s.batch {
                for (&g, &v) in s.plane(dy, n, c).iter().zip(s.plane(x, n, c)) {
                    sdy += g as f64;
                    sdyx += g as f64 * (v as f64 - mean) * rstd;
                }
            }
            (sdy, sdyx)
        })
        .collect();
    for (c, &(sdy, sdyx)) in sums.iter().enumerate() {
        dbeta[c] = sdy as f32;
        dgamma[c] = sdyx as f32;
    }
    // dx = γ·rstd/M · (M·dy − dβ − x̂·dγ) = k·dy − k/M·(dβ + x̂·dγ), k = γ·rstd.
    let inv_m = 1.0 / s.m() as f64;
    dx.par_chunks_mut(s.hw)
        .zip(x.par_chunks(s.hw).zip(dy.par_chunks(s.hw)))
        .enumerate()
        .for_each(|(i, (dxp, (xp, dyp)))| {
            let c = i % s.channels;
            let (sdy, sdyx) = sums[c];
            let rstd = saved.rstd[c];
            let k = gamma[c] * rstd;
            let mean_dy = (sdy * inv_m) as f32;
            let mean_dyx = (sdyx * inv_m) as f32;
            let mean = saved.mean[c];
            for ((d, &v), &g) in dxp.iter_mut().zip(xp).zip(dyp) {
                let xhat = (v - mean) * rstd;
                *d = k * (g - mean_dy - xhat * mean_dyx);
            }
        });
    Ok(())
}

/// Eval-mode backward: `dx = dy·γ/√(running_var + eps)`; `dγ = Σ dy·x̂`, `dβ = Σ dy` with
/// `x̂` from the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_backward(
    s: &BnShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    check(
        s,
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
        &[
            ("gamma", gamma.len()),
            ("running_mean", running_mean.len()),
            ("running_var", running_var.len()),
            ("dgamma", dgamma.len()),
            ("dbeta", dbeta.len()),
        ],
    )?;
    let saved = BnSaved {
        mean: running_mean.to_vec(),
        rstd: running_var
            .iter()
            .map(|&v| (1.0 / (v as f64 + eps as f64).sqrt()) as f32)
            .collect(),
    };
    for c in 0..s.channels {
        let (mut sdy, mut sdyx) = (0f64, 0f64);
        for n in 0..s.batch {
            for (&g, &v) in s.plane(dy, n, c).iter().zip(s.plane(x, n, c)) {
                sdy += g as f64;
                sdyx += g as f64 * ((v - saved.mean[c]) * saved.rstd[c]) as f64;
            }
        }
        dbeta[c] = sdy as f32;
        dgamma[c] = sdyx as f32;
    }
    dx.par_chunks_mut(s.hw)
        .zip(dy.par_chunks(s.hw))
        .enumerate()
        .for_each(|(i, (dxp, dyp))| {
            let c = i % s.channels;
            let k = gamma[c] * saved.rstd[c];
            for (d, &g) in dxp.iter_mut().zip(dyp) {
                *d = k * g;
            }
        });
    Ok(())
}
