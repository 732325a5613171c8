//! One function per op. Each validates its sizes against the buffers (a buffer may be longer
//! than the sizes need, never shorter; dtypes must match), picks a kernel and launches it on the
//! device's stream (asynchronously: download a result to wait for it). Arguments mean what they
//! mean for the CPU kernels of `kiln-cpu` with the same names; outputs that kiln-cpu overwrites
//! are overwritten, gradients it accumulates (`+=`) are accumulated.
//!
//! | module | ops |
//! |---|---|
//! | [`elementwise`] | GELU, ReLU/LeakyReLU/Tanh/Sigmoid (forward, backward), add, axpby, casts |
//! | [`softmax`] | softmax over rows, backward |
//! | [`norm`] | layer norm, batch norm (train / eval, forward / backward) |
//! | [`loss`] | binary cross-entropy, cross-entropy fused with the softmax |
//! | [`optim`] | Adam / AdamW step |
//! | [`reduce`] | global gradient norm, column sums, channel sums |
//! | [`embedding`] | token + position embedding, forward and backward |
//! | [`gemm`] | `C = alpha·op(A)·op(B) + beta·C` + epilogue: f32 tiles, tensor cores, M = 1 decode |
//! | [`attention`] | flash-style prefill (+ LSE), KV-cache decode and append, backward |
//! | [`conv`] | conv2d / conv-transpose2d forward and backward (implicit GEMM) |
use crate::device::LaunchDims;
use kiln_tensor::{Error, Result};

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod gemm_tc;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod softmax;

/// Threads per block of the element-wise and row kernels.
pub(crate) const THREADS: u32 = 256;

/// A grid-stride launch over `n` elements: enough blocks to cover them, at most 2^16 blocks.
pub(crate) fn grid_stride(n: usize) -> LaunchDims {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchDims::linear(if n == 0 { 0 } else { blocks }, THREADS, 0)
}

/// Threads for a one-block-per-row kernel over `cols` columns: a multiple of 32, ≤ `max`.
pub(crate) fn row_threads(cols: usize, max: u32) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, max as usize) as u32
}

/// `v` as an i32 kernel argument.
pub(crate) fn i32_arg(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::invalid(format!(
            "{what} = {v} exceeds the kernels' 32-bit index range"
        ))
    })
}

/// `a·b` without overflow.
pub(crate) fn mul(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(format!("{what}: {a}·{b} overflows")))
}
