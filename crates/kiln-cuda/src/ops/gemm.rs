//! `C = alpha·op(A)·op(B) + beta·C`, then an epilogue (`kernels/gemm_f32.cu`, `gemm_tc.cu`,
//! `gemv.cu`), with the meanings of kiln-cpu's `gemm::gemm` and `GemmOptions`.
//!
//! Kernel choice, from the operands' dtypes and the shape:
//! * A f32, M ≤ 4, A not transposed: the decode product (`gemv.cu`), B f32, bf16 or f16;
//! * A and B both bf16 (or both f16), with 16-byte aligned rows: tensor cores (`gemm_tc.cu`,
//!   `mma.sync` m16n8k16 with f32 accumulation);
//! * otherwise the f32 tiled kernel (`gemm_f32.cu`), converting 16-bit operands as it loads
//!   them (A f32 with B f32/bf16/f16, or A and B of the same 16-bit type).
//!
//! To run an f32 activation through the tensor cores, cast it first ([`super::elementwise::cast`]).
use super::i32_arg;
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Error, Result};

/// The shape of one product: op(A) `[m, k]`, op(B) `[k, n]`, C `[m, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A is stored transposed, `[k, m]` row-major.
    pub a_t: bool,
    /// B is stored transposed, `[n, k]` row-major (the tied output projection wteᵀ).
    pub b_t: bool,
}

/// Where the operands start in their buffers and their row strides (elements). The dense
/// layout is [`GemmStrides::dense`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmStrides {
    pub a_offset: usize,
    pub lda: usize,
    pub b_offset: usize,
    pub ldb: usize,
    pub c_offset: usize,
    pub ldc: usize,
}

impl GemmStrides {
    /// Row-major operands starting at element 0, rows packed.
    pub fn dense(d: &GemmDims) -> Self {
        GemmStrides {
            a_offset: 0,
            lda: if d.a_t { d.m } else { d.k },
            b_offset: 0,
            ldb: if d.b_t { d.k } else { d.n },
            c_offset: 0,
            ldc: d.n,
        }
    }
}

/// What happens to each output element after `alpha·A·B + beta·C` (kiln-cpu's `Epilogue`, with
/// the bias in device memory).
#[derive(Clone, Copy, Debug, Default)]
pub enum GemmEpilogue<'a> {
    #[default]
    None,
    /// `c[i][j] += bias[j]` (bias: `n` f32).
    Bias(&'a CudaBuf),
    /// `c[i][j] = gelu_tanh(c[i][j] + bias[j])`.
    BiasGelu(&'a CudaBuf),
    /// `c[i][j] = gelu_tanh(c[i][j])`.
    Gelu,
}

impl<'a> GemmEpilogue<'a> {
    fn code(&self) -> i32 {
        match self {
            GemmEpilogue::None => 0,
            GemmEpilogue::Bias(_) => 1,
            GemmEpilogue::BiasGelu(_) => 2,
            GemmEpilogue::Gelu => 3,
        }
    }
    fn bias(&self) -> Option<&'a CudaBuf> {
        match self {
            GemmEpilogue::Bias(b) | GemmEpilogue::BiasGelu(b) => Some(b),
            _ => None,
        }
    }
}

/// Which kernel family runs a product (for benchmarks and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// Chosen from the dtypes and the shape (see the module docs).
    Auto,
    /// The f32 tiled kernel.
    Tiled,
    /// Tensor cores (both operands bf16 or both f16, aligned rows).
    TensorCore,
    /// The decode product (A f32, m ≤ 4, not transposed).
    Gemv,
}

/// `C = alpha·op(A)·op(B) + beta·C` then the epilogue, dense operands.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dev: &CudaDevice,
    a: &CudaBuf,
    b: &CudaBuf,
    c: &mut CudaBuf,
    dims: GemmDims,
    alpha: f32,
    beta: f32,
    epilogue: GemmEpilogue<'_>,
) -> Result<()> {
    gemm_with(
        dev,
        a,
        b,
        c,
        dims,
        GemmStrides::dense(&dims),
        alpha,
        beta,
        epilogue,
        GemmKernel::Auto,
    )
}

/// [`gemm`] with explicit offsets and row strides (views into larger buffers), and a forced
/// kernel family.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    dev: &CudaDevice,
    a: &CudaBuf,
    b: &CudaBuf,
    c: &mut CudaBuf,
    d: GemmDims,
    s: GemmStrides,
    alpha: f32,
    beta: f32,
    epilogue: GemmEpilogue<'_>,
    kernel: GemmKernel,
) -> Result<()> {
    let (m, n, k) = (d.m, d.n, d.k);
    check_view(
        "A",
        a,
        s.a_offset,
        s.lda,
        if d.a_t { (k, m) } else { (m, k) },
    )?;
    check_view(
        "B",
        b,
        s.b_offset,
        s.ldb,
        if d.b_t { (n, k) } else { (k, n) },
    )?;
    check_view("C", c, s.c_offset, s.ldc, (m, n))?;
    c.expect_dtype("gemm C", DType::F32)?;
    if let Some(bias) = epilogue.bias() {
        bias.check("gemm bias", DType::F32, n)?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let pair = (a.dtype(), b.dtype());
    let a_f32 = a.dtype() == DType::F32;
    let same16 = matches!(pair, (DType::BF16, DType::BF16) | (DType::F16, DType::F16));
    let float_b = matches!(b.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !(a_f32 && float_b || same16) {
        return Err(Error::invalid(format!(
            "gemm: A {} with B {} (A f32 with B f32/bf16/f16, or A and B both bf16 or both f16)",
            pair.0, pair.1
        )));
    }
    let gemv_ok = a_f32 && m <= GEMV_MAX_M && !d.a_t;
    let tc_ok = same16 && super::gemm_tc::supports(&d, &s);
    let chosen = match kernel {
        GemmKernel::Auto if gemv_ok => GemmKernel::Gemv,
        GemmKernel::Auto if tc_ok => GemmKernel::TensorCore,
        GemmKernel::Auto => GemmKernel::Tiled,
        GemmKernel::Gemv if !gemv_ok => {
            return Err(Error::invalid(format!("gemm: the decode kernel needs A f32, m ≤ {GEMV_MAX_M}, not transposed")))
        }
        GemmKernel::TensorCore if !tc_ok => {
            return Err(Error::invalid(
                "gemm: tensor cores need A and B of the same 16-bit type with rows and offsets multiples of 8 elements",
            ))
        }
        other => other,
    };
    if k == 0 {
        // C = beta·C then the epilogue: a product with a zero A does that.
        let zero_a = dev.zeros(DType::F32, m)?;
        let zero_b = dev.zeros(DType::F32, n)?;
        let d1 = GemmDims {
            m,
            n,
            k: 1,
            a_t: false,
            b_t: false,
        };
        let s1 = GemmStrides {
            a_offset: 0,
            lda: 1,
            b_offset: 0,
            ldb: n,
            c_offset: s.c_offset,
            ldc: s.ldc,
        };
        return tiled(dev, &zero_a, &zero_b, c, d1, s1, alpha, beta, epilogue);
    }
    match chosen {
        GemmKernel::Gemv => gemv(dev, a, b, c, d, s, alpha, beta, epilogue),
        GemmKernel::TensorCore => super::gemm_tc::launch(dev, a, b, c, d, s, alpha, beta, epilogue),
        _ => tiled(dev, a, b, c, d, s, alpha, beta, epilogue),
    }
}

/// Checks that a `rows × cols` view at `offset` with row stride `ld` fits in `buf`.
fn check_view(
    name: &str,
    buf: &CudaBuf,
    offset: usize,
    ld: usize,
    (rows, cols): (usize, usize),
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if ld < cols {
        return Err(Error::invalid(format!(
            "gemm: {name} row stride {ld} < its {cols} columns"
        )));
    }
    let end = (rows - 1)
        .checked_mul(ld)
        .and_then(|x| x.checked_add(cols))
        .and_then(|x| x.checked_add(offset));
    match end {
        Some(e) if e <= buf.len() => Ok(()),
        _ => Err(Error::invalid(format!(
            "gemm: {name} view {rows}x{cols} (row stride {ld}, offset {offset}) exceeds its buffer of {} elements",
            buf.len()
        ))),
    }
}

fn type_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        _ => "f16",
    }
}

fn bias_arg<'a>(e: &GemmEpilogue<'a>) -> Arg<'a> {
    match e.bias() {
        Some(b) => Arg::Buf(b),
        None => Arg::I64(0),
    }
}

#[allow(clippy::too_many_arguments)]
fn tiled(
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
    let name = format!(
        "gemm_{}_{}_{}{}",
        type_name(a.dtype()),
        type_name(b.dtype()),
        if d.a_t { 't' } else { 'n' },
        if d.b_t { 't' } else { 'n' }
    );
    // 16-byte (f32) or 8-byte (16-bit) vector loads of 4 elements need 4-element alignment.
    let vec_a = s.a_offset.is_multiple_of(4) && s.lda.is_multiple_of(4);
    let vec_b = s.b_offset.is_multiple_of(4) && s.ldb.is_multiple_of(4);
    let dims = LaunchDims {
        grid: [d.n.div_ceil(128) as u32, d.m.div_ceil(128) as u32, 1],
        block: [256, 1, 1],
        smem: 0,
    };
    dev.launch(
        &sources::GEMM_F32,
        &name,
        dims,
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
            bias_arg(&epilogue),
            Arg::I32(epilogue.code()),
            Arg::I32(vec_a as i32),
            Arg::I32(vec_b as i32),
        ],
    )
}

/// Rows the decode kernel takes per launch (GEMV_MAX_M in gemv.cu).
pub const GEMV_MAX_M: usize = 4;
const GEMV_WARPS: usize = 8;

#[allow(clippy::too_many_arguments)]
fn gemv(
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
    let tname = type_name(b.dtype());
    let vec = 16 / b.dtype().size_in_bytes(); // elements per 16-byte load
    let vec_b = s.b_offset.is_multiple_of(vec) && s.ldb.is_multiple_of(vec);
    let (m, n, k) = (i32_arg("m", d.m)?, i32_arg("n", d.n)?, i32_arg("k", d.k)?);
    let common = vec![
        Arg::I32(m),
        Arg::I32(n),
        Arg::I32(k),
        Arg::F32(alpha),
        Arg::At(a, s.a_offset),
        Arg::I64(s.lda as i64),
        Arg::At(b, s.b_offset),
        Arg::I64(s.ldb as i64),
        Arg::F32(beta),
        Arg::At(c, s.c_offset),
        Arg::I64(s.ldc as i64),
        bias_arg(&epilogue),
        Arg::I32(epilogue.code()),
        Arg::I32(vec_b as i32),
    ];
    if d.b_t {
        let blocks = d.n.div_ceil(GEMV_WARPS) as u32;
        return dev.launch(
            &sources::GEMV,
            &format!("gemv_nk_{tname}"),
            LaunchDims::linear(blocks, 256, 0),
            &common,
        );
    }
    // kn: column groups of 32·vec; split K so that the grid covers the GPU about twice.
    let groups = d.n.div_ceil(32 * vec);
    let target = 2 * dev.info().multiprocessors as usize;
    let max_slices = d.k.div_ceil(64).max(1);
    let slices = target.div_ceil(groups).clamp(1, max_slices);
    let kchunk = d.k.div_ceil(slices).div_ceil(GEMV_WARPS) * GEMV_WARPS;
    let slices = d.k.div_ceil(kchunk);
    // The K slices' partial sums (every element written before it is read), from the device's
    // scratch: a decode step allocates nothing.
    let partial = dev.scratch(if slices > 1 { slices * d.m * d.n } else { 1 })?;
    dev.launch(
        &sources::GEMV,
        &format!("gemv_kn_{tname}"),
        LaunchDims {
            grid: [groups as u32, slices as u32, 1],
            block: [256, 1, 1],
            smem: 0,
        },
        &[common, vec![Arg::I32(kchunk as i32), Arg::Buf(&partial)]].concat(),
    )?;
    if slices > 1 {
        dev.launch(
            &sources::GEMV,
            "gemv_kn_finish",
            LaunchDims::linear((d.m * d.n).div_ceil(256) as u32, 256, 0),
            &[
                Arg::I32(m),
                Arg::I32(n),
                Arg::I32(slices as i32),
                Arg::Buf(&partial),
                Arg::F32(alpha),
                Arg::F32(beta),
                Arg::At(c, s.c_offset),
                Arg::I64(s.ldc as i64),
                bias_arg(&epilogue),
                Arg::I32(epilogue.code()),
            ],
        )?;
    }
    dev.recycle(partial);
    Ok(())
}
