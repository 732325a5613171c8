//! The tensor-core product (`kernels/gemm_tc.cu`), reached through [`super::gemm::gemm_with`].
use super::gemm::{GemmDims, GemmEpilogue, GemmStrides};
use super::i32_arg;
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Result};

/// Dynamic shared memory of one block: 4 stages of a 128×32 A tile and a 32×128 B tile.
pub const SMEM_BYTES: u32 = 4 * (128 * 32 + 32 * 128) * 2;

/// Whether the tensor-core kernel takes this layout: 16-byte aligned operand rows.
pub(crate) fn supports(_d: &GemmDims, s: &GemmStrides) -> bool {
    s.a_offset.is_multiple_of(8)
        && s.lda.is_multiple_of(8)
        && s.b_offset.is_multiple_of(8)
        && s.ldb.is_multiple_of(8)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn launch(
    dev: &CudaDevice,
    a: &CudaBuf,
    b: &CudaBuf,
    c: &mut CudaBuf,
    d: GemmDims,
    s: GemmStrides,
    alpha: f32,
    beta: f32,
    epilogue: GemmEpilogue<'_>,
) -> Result<()> {
    let t = if a.dtype() == DType::BF16 {
        "bf16"
    } else {
        "f16"
    };
    let name = format!(
        "gemm_tc_{t}_{}{}",
        if d.a_t { 't' } else { 'n' },
        if d.b_t { 't' } else { 'n' }
    );
    let (bias, code) = match epilogue {
        GemmEpilogue::None => (Arg::I64(0), 0),
        GemmEpilogue::Bias(b) => (Arg::Buf(b), 1),
        GemmEpilogue::BiasGelu(b) => (Arg::Buf(b), 2),
        GemmEpilogue::Gelu => (Arg::I64(0), 3),
    };
    dev.launch(
        &sources::GEMM_TC,
        &name,
        LaunchDims {
            grid: [d.n.div_ceil(128) as u32, d.m.div_ceil(128) as u32, 1],
            block: [256, 1, 1],
            smem: SMEM_BYTES,
        },
        &[
            Arg::I32(i32_arg("m", d.m)?),
            Arg::I32(i32_arg("n", d.n)?),
            Arg::I32(i32_arg("k", d.k)?),
            Arg::F32(alpha),
            Arg::At(a, s.a_offset),
            Arg::I64(s.lda as i64),
            Arg::At(b, s.b_offset),
            Arg::I64(s.ldb as i64),
            Arg::F32(beta),
            Arg::At(c, s.c_offset),
            Arg::I64(s.ldc as i64),
            bias,
            Arg::I32(code),
        ],
    )
}
