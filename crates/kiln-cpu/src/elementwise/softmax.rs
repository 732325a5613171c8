//! Row softmax, forward and backward: `y_j = e^(x_j − max x) / Σ_k e^(x_k − max x)`.
//!
//! A row of all −∞ gives zeros (there is nothing to normalise); `+∞` or NaN gives NaN.
//! Rows are split across rayon tasks in fixed chunks; results do not depend on the thread count.
use crate::attention::Isa;
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

fn check(name: &str, got: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == got => Ok(()),
        _ => Err(Error::shape(
            format!("softmax: {name}"),
            &[rows, cols],
            &[got],
        )),
    }
}

fn rows_per_task(cols: usize) -> usize {
    (8192 / cols.max(1)).max(1)
}

/// `out[r, :] = softmax(x[r, :])`; `x`, `out` `[rows, cols]` row-major.
pub fn softmax_rows(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    softmax_rows_isa(Isa::detect(), x, rows, cols, out)
}

/// [`softmax_rows`] with a chosen kernel family (for tests).
pub fn softmax_rows_isa(
    isa: Isa,
    x: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [f32],
) -> Result<()> {
    check("x", x.len(), rows, cols)?;
    check("out", out.len(), rows, cols)?;
    if !isa.is_available() {
        return Err(Error::invalid(format!(
            "softmax: kernel {isa:?} is not supported by this CPU"
        )));
    }
    if cols == 0 {
        return Ok(());
    }
    let step = rows_per_task(cols) * cols;
    out.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(oc, xc)| {
            for (o, xr) in oc.chunks_mut(cols).zip(xc.chunks(cols)) {
                o.copy_from_slice(xr);
                row_inplace(isa, o);
            }
        });
    Ok(())
}

/// `x[r, :] = softmax(x[r, :])` in place.
pub fn softmax_rows_inplace(x: &mut [f32], rows: usize, cols: usize) -> Result<()> {
    check("x", x.len(), rows, cols)?;
    if cols == 0 {
        return Ok(());
    }
    let isa = Isa::detect();
    x.par_chunks_mut(rows_per_task(cols) * cols).for_each(|c| {
        for r in c.chunks_mut(cols) {
            row_inplace(isa, r);
        }
    });
    Ok(())
}

/// Backward from the forward's output `y`: `dx += y ⊙ (dy − Σ_j dy_j·y_j)` per row
/// (accumulates; zero `dx` first for a plain gradient). All `[rows, cols]`.
pub fn softmax_backward(
    y: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
) -> Result<()> {
    check("y", y.len(), rows, cols)?;
    check("dy", dy.len(), rows, cols)?;
    check("dx", dx.len(), rows, cols)?;
    if cols == 0 {
        return Ok(());
    }
    let step = rows_per_task(cols) * cols;
    dx.par_chunks_mut(step)
        .zip(y.par_chunks(step).zip(dy.par_chunks(step)))
        .for_each(|(dc, (yc, gc))| {
            for ((d, yr), gr) in dc
                .chunks_mut(cols)
                .zip(yc.chunks(cols))
                .zip(gc.chunks(cols))
            {
                let mut acc = [0f32; 8];
                let mut ia = yr.chunks_exact(8);
                let mut ib = gr.chunks_exact(8);
                for (a, b) in (&mut ia).zip(&mut ib) {
                    for ((s, &p), &q) in acc.iter_mut().zip(a).zip(b) {
                        *s += p * q;
                    }
                }
                let mut dot = ((acc[0] + acc[4]) + (acc[1] + acc[5]))
                    + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                for (&p, &q) in ia.remainder().iter().zip(ib.remainder()) {
                    dot += p * q;
                }
                for ((dv, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                    *dv += yv * (gv - dot);
                }
            }
        });
    Ok(())
}

fn row_inplace(isa: Isa, r: &mut [f32]) {
    let m = r.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    if m == f32::NEG_INFINITY {
        r.fill(0.0);
        return;
    }
    let sum = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: the caller checked AVX2+FMA (`Isa::detect` or `is_available`).
            unsafe { x86::exp_sub_sum(r, m) }
        }
        _ => {
            let mut acc = [0f32; 8];
            let mut it = r.chunks_exact_mut(8);
            for c in &mut it {
                for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                    *v = (*v - m).exp();
                    *a += *v;
                }
            }
            let mut s =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for v in it.into_remainder() {
                *v = (*v - m).exp();
                s += *v;
            }
            s
        }
    };
    let inv = 1.0 / sum;
    for v in r.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::attention::simd::x86::{exp2_ps, hsum_ps};
    use std::arch::x86_64::*;

    /// `r_j = e^(r_j − m)`; returns `Σ r_j`. Safety: AVX2+FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sub_sum(r: &mut [f32], m: f32) -> f32 {
        let l2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
        let mv = _mm256_set1_ps(m);
        let n = r.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            let p = r.as_mut_ptr().add(i);
            let e = exp2_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), mv), l2e));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut s = hsum_ps(acc);
        for v in &mut r[n..] {
            *v = (*v - m).exp();
            s += *v;
        }
        s
    }
}
