//! GELU, tanh approximation, forward and backward.
//!
//! `u = √(2/π)·(x + 0.044715·x³)`, `gelu(x) = ½·x·(1 + tanh u)`,
//! `gelu'(x) = ½·(1 + tanh u) + ½·x·(1 − tanh² u)·√(2/π)·(1 + 3·0.044715·x²)`.
//!
//! The vector path uses `½·(1 + tanh u) = 1/(1 + e^(−2u))` (the same function, one exponential,
//! no cancellation at either tail). Work is split in fixed chunks of [`CHUNK`] elements.
use crate::attention::Isa;
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// Elements per parallel task.
pub const CHUNK: usize = 1 << 14;
const S2PI: f32 = std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2; // √(2/π)
const A: f32 = 0.044715;

fn check(name: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::shape(format!("gelu: {name}"), &[a], &[b]));
    }
    Ok(())
}

/// `out[i] = gelu(x[i])`. `x` and `out` have the same length.
pub fn gelu_forward(x: &[f32], out: &mut [f32]) -> Result<()> {
    gelu_forward_isa(Isa::detect(), x, out)
}

/// [`gelu_forward`] with a chosen kernel family (for tests).
pub fn gelu_forward_isa(isa: Isa, x: &[f32], out: &mut [f32]) -> Result<()> {
    check("out", x.len(), out.len())?;
    let isa = usable(isa)?;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, xc)| forward_chunk(isa, xc, o));
    Ok(())
}

/// `x[i] = gelu(x[i])`.
pub fn gelu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(gelu_row_inplace);
}

/// `x[i] = gelu(x[i])` on the calling thread, vectorised (what a fused GEMM epilogue applies
/// to one row of a tile).
pub fn gelu_row_inplace(x: &mut [f32]) {
    let isa = Isa::detect();
    let mut tmp = [0f32; 256];
    for part in x.chunks_mut(256) {
        let n = part.len();
        forward_chunk(isa, part, &mut tmp[..n]);
        part.copy_from_slice(&tmp[..n]);
    }
}

/// `dx[i] += gelu'(x[i])·dout[i]` (accumulates; zero `dx` first for a plain gradient).
pub fn gelu_backward(x: &[f32], dout: &[f32], dx: &mut [f32]) -> Result<()> {
    gelu_backward_isa(Isa::detect(), x, dout, dx)
}

/// [`gelu_backward`] with a chosen kernel family (for tests).
pub fn gelu_backward_isa(isa: Isa, x: &[f32], dout: &[f32], dx: &mut [f32]) -> Result<()> {
    check("dout", x.len(), dout.len())?;
    check("dx", x.len(), dx.len())?;
    let isa = usable(isa)?;
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK)))
        .for_each(|(g, (xc, dc))| backward_chunk(isa, xc, dc, g));
    Ok(())
}

fn usable(isa: Isa) -> Result<Isa> {
    if !isa.is_available() {
        return Err(Error::invalid(format!(
            "gelu: kernel {isa:?} is not supported by this CPU"
        )));
    }
    Ok(isa)
}

/// Scalar reference: `½·x·(1 + tanh u)`.
#[inline]
pub fn gelu_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + (S2PI * (x + A * x * x * x)).tanh())
}

/// Scalar reference of the derivative.
#[inline]
pub fn gelu_grad_scalar(x: f32) -> f32 {
    let u = S2PI * (x + A * x * x * x);
    let t = u.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * S2PI * (1.0 + 3.0 * A * x * x)
}

fn forward_chunk(isa: Isa, x: &[f32], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: AVX2+FMA checked by `usable`/`detect`; lengths equal.
            unsafe { x86::forward(x, out) }
        }
        _ => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = gelu_scalar(v);
            }
        }
    }
}

fn backward_chunk(isa: Isa, x: &[f32], dout: &[f32], dx: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: AVX2+FMA checked by `usable`; lengths equal.
            unsafe { x86::backward(x, dout, dx) }
        }
        _ => {
            for ((g, &v), &d) in dx.iter_mut().zip(x).zip(dout) {
                *g += gelu_grad_scalar(v) * d;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{gelu_grad_scalar, gelu_scalar, A, S2PI};
    use crate::attention::simd::x86::exp2_ps;
    use std::arch::x86_64::*;

    /// `sg = 1/(1 + 2^(−2u·log2 e))` = ½(1 + tanh u), for 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn half_one_plus_tanh(x: __m256) -> __m256 {
        let x2 = _mm256_mul_ps(x, x);
        let inner = _mm256_fmadd_ps(_mm256_set1_ps(A), x2, _mm256_set1_ps(1.0));
        let u = _mm256_mul_ps(_mm256_mul_ps(x, inner), _mm256_set1_ps(S2PI));
        let e = exp2_ps(_mm256_mul_ps(
            u,
            _mm256_set1_ps(-2.0 * std::f32::consts::LOG2_E),
        ));
        _mm256_div_ps(_mm256_set1_ps(1.0), _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }

    /// Safety: AVX2+FMA present; `x.len() == out.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward(x: &[f32], out: &mut [f32]) {
        let n = x.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            let y = _mm256_mul_ps(xv, half_one_plus_tanh(xv));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        }
        for i in n..x.len() {
            out[i] = gelu_scalar(x[i]);
        }
    }

    /// `dx += gelu'(x)·dout` with `gelu' = sg + x·sg·(1 − sg)·2·√(2/π)(1 + 3a x²)`,
    /// `sg = ½(1 + tanh u)` (since `½(1 − tanh² u) = 2·sg·(1 − sg)`).
    /// Safety: AVX2+FMA present; equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn backward(x: &[f32], dout: &[f32], dx: &mut [f32]) {
        let n = x.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            let sg = half_one_plus_tanh(xv);
            let x2 = _mm256_mul_ps(xv, xv);
            let du = _mm256_mul_ps(
                _mm256_set1_ps(2.0 * S2PI),
                _mm256_fmadd_ps(_mm256_set1_ps(3.0 * A), x2, one),
            );
            let t = _mm256_mul_ps(_mm256_mul_ps(xv, sg), _mm256_sub_ps(one, sg));
            let g = _mm256_fmadd_ps(t, du, sg);
            let p = dx.as_mut_ptr().add(i);
            let d = _mm256_loadu_ps(dout.as_ptr().add(i));
            _mm256_storeu_ps(p, _mm256_fmadd_ps(g, d, _mm256_loadu_ps(p)));
        }
        for i in n..x.len() {
            dx[i] += gelu_grad_scalar(x[i]) * dout[i];
        }
    }
}
