//! Deterministic reductions (`kernels/reduce.cu`).
use super::{i32_arg, mul, row_threads};
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Error, Result};

/// Must match REDUCE_BLOCKS / REDUCE_THREADS / COLSUM_CHUNK in reduce.cu.
const REDUCE_BLOCKS: usize = 256;
const REDUCE_THREADS: u32 = 256;
const COLSUM_CHUNK: usize = 256;

/// `out[0] = √(Σ_tensors Σ x²)`: the global norm of a list of gradient tensors (each used in
/// full). Two passes, in an order that depends only on the tensors' lengths.
pub fn grad_norm(dev: &CudaDevice, tensors: &[&CudaBuf], out: &mut CudaBuf) -> Result<()> {
    sum_squares_into(dev, tensors, out, true)
}

/// `out[0] = Σ_tensors Σ x²` (deterministic, as [`grad_norm`]).
pub fn sum_squares(dev: &CudaDevice, tensors: &[&CudaBuf], out: &mut CudaBuf) -> Result<()> {
    sum_squares_into(dev, tensors, out, false)
}

fn sum_squares_into(
    dev: &CudaDevice,
    tensors: &[&CudaBuf],
    out: &mut CudaBuf,
    take_sqrt: bool,
) -> Result<()> {
    out.check("sum_squares out", DType::F32, 1)?;
    if tensors.is_empty() {
        return Err(Error::invalid("sum_squares: no tensors"));
    }
    for (i, t) in tensors.iter().enumerate() {
        t.expect_dtype(&format!("sum_squares tensor {i}"), DType::F32)?;
    }
    let count = mul("sum_squares", tensors.len(), REDUCE_BLOCKS)?;
    let partial = dev.zeros(DType::F32, count)?;
    for (i, t) in tensors.iter().enumerate() {
        if t.is_empty() {
            continue;
        }
        dev.launch(
            &sources::REDUCE,
            "sum_squares_partial",
            LaunchDims::linear(REDUCE_BLOCKS as u32, REDUCE_THREADS, 0),
            &[
                Arg::Buf(t),
                Arg::I64(t.len() as i64),
                Arg::At(&partial, i * REDUCE_BLOCKS),
            ],
        )?;
    }
    dev.launch(
        &sources::REDUCE,
        "sum_partials",
        LaunchDims::linear(1, 32, 0),
        &[
            Arg::Buf(&partial),
            Arg::I32(i32_arg("partials", count)?),
            Arg::Buf(out),
            Arg::I32(take_sqrt as i32),
        ],
    )
}

/// `out[0] = Σ x[..n]` (f32 partial sums over a fixed grid, added in a fixed order: the order
/// depends only on `n`).
pub fn sum(dev: &CudaDevice, x: &CudaBuf, n: usize, out: &mut CudaBuf) -> Result<()> {
    x.check("sum x", DType::F32, n)?;
    out.check("sum out", DType::F32, 1)?;
    // Every block writes its partial.
    let partial = dev.scratch(REDUCE_BLOCKS)?;
    dev.launch(
        &sources::REDUCE,
        "sum_values_partial",
        LaunchDims::linear(REDUCE_BLOCKS as u32, REDUCE_THREADS, 0),
        &[Arg::Buf(x), Arg::I64(n as i64), Arg::Buf(&partial)],
    )?;
    dev.launch(
        &sources::REDUCE,
        "sum_partials",
        LaunchDims::linear(1, 32, 0),
        &[
            Arg::Buf(&partial),
            Arg::I32(REDUCE_BLOCKS as i32),
            Arg::Buf(out),
            Arg::I32(0),
        ],
    )?;
    dev.recycle(partial);
    Ok(())
}

/// `out[at] = ` the number of `x[..n]` outside `[lo, hi]` (NaN counts as outside), as an f32.
pub fn count_outside(
    dev: &CudaDevice,
    x: &CudaBuf,
    n: usize,
    lo: f32,
    hi: f32,
    out: &mut CudaBuf,
    at: usize,
) -> Result<()> {
    x.check("count_outside x", DType::F32, n)?;
    out.check("count_outside out", DType::F32, at + 1)?;
    // Every block writes its partial.
    let partial = dev.scratch(REDUCE_BLOCKS)?;
    dev.launch(
        &sources::REDUCE,
        "count_outside_partial",
        LaunchDims::linear(REDUCE_BLOCKS as u32, REDUCE_THREADS, 0),
        &[
            Arg::Buf(x),
            Arg::I64(n as i64),
            Arg::F32(lo),
            Arg::F32(hi),
            Arg::Buf(&partial),
        ],
    )?;
    dev.launch(
        &sources::REDUCE,
        "sum_partials",
        LaunchDims::linear(1, 32, 0),
        &[
            Arg::Buf(&partial),
            Arg::I32(REDUCE_BLOCKS as i32),
            Arg::At(out, at),
            Arg::I32(0),
        ],
    )?;
    dev.recycle(partial);
    Ok(())
}

/// `out[j] (+)= Σ_i x[i][j]` over `x` `[rows, cols]`: a linear layer's bias gradient from its
/// output gradient. Overwrites `out` unless `accumulate`.
pub fn column_sums(
    dev: &CudaDevice,
    x: &CudaBuf,
    rows: usize,
    cols: usize,
    out: &mut CudaBuf,
    accumulate: bool,
) -> Result<()> {
    x.check("column_sums x", DType::F32, mul("column_sums", rows, cols)?)?;
    out.check("column_sums out", DType::F32, cols)?;
    if cols == 0 {
        return Ok(());
    }
    let (r, c) = (i32_arg("rows", rows)?, i32_arg("cols", cols)?);
    let chunks = rows.div_ceil(COLSUM_CHUNK).max(1);
    let partial = dev.zeros(DType::F32, mul("column_sums partials", chunks, cols)?)?;
    let col_blocks = cols.div_ceil(128) as u32;
    if rows > 0 {
        dev.launch(
            &sources::REDUCE,
            "column_sums_partial",
            LaunchDims {
                grid: [col_blocks, i32_arg("row chunks", chunks)? as u32, 1],
                block: [128, 1, 1],
                smem: 0,
            },
            &[Arg::Buf(x), Arg::I32(r), Arg::I32(c), Arg::Buf(&partial)],
        )?;
    }
    dev.launch(
        &sources::REDUCE,
        "column_sums_finish",
        LaunchDims::linear(col_blocks, 128, 0),
        &[
            Arg::Buf(&partial),
            Arg::I32(chunks as i32),
            Arg::I32(c),
            Arg::Buf(out),
            Arg::I32(accumulate as i32),
        ],
    )
}

/// `out[c] (+)= Σ_n Σ_p x[n][c][p]` over `x` `[batch, channels, hw]`: a convolution's bias
/// gradient (f64 accumulation, as kiln-cpu's `conv::bias_grad`).
pub fn channel_sums(
    dev: &CudaDevice,
    x: &CudaBuf,
    batch: usize,
    channels: usize,
    hw: usize,
    out: &mut CudaBuf,
    accumulate: bool,
) -> Result<()> {
    x.check(
        "channel_sums x",
        DType::F32,
        mul("channel_sums", mul("channel_sums", batch, channels)?, hw)?,
    )?;
    out.check("channel_sums out", DType::F32, channels)?;
    dev.launch(
        &sources::REDUCE,
        "channel_sums",
        LaunchDims::linear(
            i32_arg("channels", channels)? as u32,
            row_threads(hw, 256),
            0,
        ),
        &[
            Arg::Buf(x),
            Arg::I32(i32_arg("batch", batch)?),
            Arg::I32(channels as i32),
            Arg::I32(i32_arg("hw", hw)?),
            Arg::Buf(out),
            Arg::I32(accumulate as i32),
        ],
    )
}
