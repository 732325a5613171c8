//! Losses.
//!
//! Binary cross-entropy on probabilities `p ∈ [0, 1]` against targets `t`, mean reduction, with
//! PyTorch's clamping of each log at −100 (so `p = 0` or `p = 1` give a finite loss):
//! ```text
//! L  = −(1/N) Σ [ t·max(ln p, −100) + (1 − t)·max(ln(1 − p), −100) ]
//! ∂L/∂p = (1/N) · (p − t) / max(p·(1 − p), 1e−12)
//! ```
use kiln_tensor::{Error, Result};

fn check_bce(p: &[f32], t: &[f32]) -> Result<()> {
    if p.len() != t.len() {
        return Err(Error::shape(
            "binary_cross_entropy target",
            &[p.len()],
            &[t.len()],
        ));
    }
    if p.is_empty() {
        return Err(Error::invalid("binary_cross_entropy: empty input"));
    }
    if let Some(bad) = p.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        return Err(Error::invalid(format!(
            "binary_cross_entropy: every input must be a probability in [0, 1], found {bad}"
        )));
    }
    Ok(())
}

/// Mean binary cross-entropy of probabilities `p` against targets `t` (equal lengths).
pub fn bce_forward(p: &[f32], t: &[f32]) -> Result<f32> {
    check_bce(p, t)?;
    let mut sum = 0f64;
    for (&p, &t) in p.iter().zip(t) {
        let log_p = (p.ln()).max(-100.0) as f64;
        let log_1mp = ((-p).ln_1p()).max(-100.0) as f64;
        sum += (t as f64 - 1.0) * log_1mp - t as f64 * log_p;
    }
    Ok((sum / p.len() as f64) as f32)
}

/// `dp = dloss · ∂L/∂p` (overwritten), for the upstream gradient `dloss` of the mean loss.
pub fn bce_backward(p: &[f32], t: &[f32], dloss: f32, dp: &mut [f32]) -> Result<()> {
    check_bce(p, t)?;
    if dp.len() != p.len() {
        return Err(Error::shape(
            "binary_cross_entropy dp",
            &[p.len()],
            &[dp.len()],
        ));
    }
    const EPS: f32 = 1e-12;
    let scale = dloss / p.len() as f32;
    for ((d, &p), &t) in dp.iter_mut().zip(p).zip(t) {
        *d = scale * (p - t) / (p * (1.0 - p)).max(EPS);
    }
    Ok(())
}
