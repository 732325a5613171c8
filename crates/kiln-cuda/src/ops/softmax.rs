//! Softmax over the rows of `[rows, cols]` (`kernels/softmax.cu`).
use super::{i32_arg, mul, row_threads};
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Result};

fn dims(rows: usize, cols: usize) -> Result<LaunchDims> {
    Ok(LaunchDims::linear(
        if cols == 0 { 0 } else { rows as u32 },
        row_threads(cols, 1024),
        0,
    ))
}

/// `y = softmax(x)` per row.
pub fn softmax_rows(
    dev: &CudaDevice,
    x: &CudaBuf,
    y: &mut CudaBuf,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = mul("softmax", rows, cols)?;
    x.check("softmax x", DType::F32, n)?;
    y.check("softmax y", DType::F32, n)?;
    let (r, c) = (i32_arg("rows", rows)?, i32_arg("cols", cols)?);
    dev.launch(
        &sources::SOFTMAX,
        "softmax_rows",
        dims(rows, cols)?,
        &[Arg::Buf(x), Arg::Buf(y), Arg::I32(r), Arg::I32(c)],
    )
}

/// `x = softmax(x)` per row.
pub fn softmax_rows_inplace(
    dev: &CudaDevice,
    x: &mut CudaBuf,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = mul("softmax", rows, cols)?;
    x.check("softmax x", DType::F32, n)?;
    let (r, c) = (i32_arg("rows", rows)?, i32_arg("cols", cols)?);
    dev.launch(
        &sources::SOFTMAX,
        "softmax_rows",
        dims(rows, cols)?,
        &[Arg::Buf(x), Arg::Buf(x), Arg::I32(r), Arg::I32(c)],
    )
}

/// `dx += y ⊙ (dy − Σ_j dy_j·y_j)` per row (accumulates).
pub fn softmax_backward(
    dev: &CudaDevice,
    y: &CudaBuf,
    dy: &CudaBuf,
    dx: &mut CudaBuf,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = mul("softmax_backward", rows, cols)?;
    y.check("softmax_backward y", DType::F32, n)?;
    dy.check("softmax_backward dy", DType::F32, n)?;
    dx.check("softmax_backward dx", DType::F32, n)?;
    let (r, c) = (i32_arg("rows", rows)?, i32_arg("cols", cols)?);
    dev.launch(
        &sources::SOFTMAX,
        "softmax_backward",
        dims(rows, cols)?,
        &[
            Arg::Buf(y),
            Arg::Buf(dy),
            Arg::Buf(dx),
            Arg::I32(r),
            Arg::I32(c),
        ],
    )
}
