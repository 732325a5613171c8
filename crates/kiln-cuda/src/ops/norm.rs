//! Layer norm and batch norm (`kernels/layer_norm.cu`, `kernels/batch_norm.cu`).
use super::{i32_arg, mul, row_threads};
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_cpu::norm::batch_norm::BnShape;
use kiln_tensor::{DType, Error, Result};

const LN_CHUNK: usize = 32;

fn null_or<'a>(b: Option<&'a CudaBuf>) -> Arg<'a> {
    match b {
        Some(b) => Arg::Buf(b),
        None => Arg::I64(0),
    }
}

/// Forward: `out = (x − mean)·rstd·weight + bias` per row. `x`, `out` `[rows, dim]`;
/// `weight`, `bias` `[dim]`; `mean`, `rstd` `[rows]` receive the statistics when given.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward(
    dev: &CudaDevice,
    x: &CudaBuf,
    weight: &CudaBuf,
    bias: &CudaBuf,
    rows: usize,
    dim: usize,
    eps: f32,
    out: &mut CudaBuf,
    mean: Option<&mut CudaBuf>,
    rstd: Option<&mut CudaBuf>,
) -> Result<()> {
    let n = mul("layer_norm", rows, dim)?;
    x.check("layer_norm x", DType::F32, n)?;
    out.check("layer_norm out", DType::F32, n)?;
    weight.check("layer_norm weight", DType::F32, dim)?;
    bias.check("layer_norm bias", DType::F32, dim)?;
    if let Some(m) = &mean {
        m.check("layer_norm mean", DType::F32, rows)?;
    }
    if let Some(r) = &rstd {
        r.check("layer_norm rstd", DType::F32, rows)?;
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(format!(
            "layer_norm: eps {eps} must be finite and ≥ 0"
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (r, d) = (i32_arg("rows", rows)?, i32_arg("dim", dim)?);
    dev.launch(
        &sources::LAYER_NORM,
        "layer_norm_forward",
        LaunchDims::linear(rows as u32, row_threads(dim, 256), 0),
        &[
            Arg::Buf(x),
            Arg::Buf(weight),
            Arg::Buf(bias),
            Arg::Buf(out),
            null_or(mean.map(|m| &*m)),
            null_or(rstd.map(|r| &*r)),
            Arg::I32(r),
            Arg::I32(d),
            Arg::F32(eps),
        ],
    )
}

/// Backward: accumulates into `dx` `[rows, dim]`, `dweight`, `dbias` `[dim]` (zero them for a
/// plain gradient). `mean`, `rstd` `[rows]` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    dev: &CudaDevice,
    dout: &CudaBuf,
    x: &CudaBuf,
    weight: &CudaBuf,
    mean: &CudaBuf,
    rstd: &CudaBuf,
    rows: usize,
    dim: usize,
    dx: &mut CudaBuf,
    dweight: &mut CudaBuf,
    dbias: &mut CudaBuf,
) -> Result<()> {
    let n = mul("layer_norm", rows, dim)?;
    for (name, b, need) in [
        ("dout", dout, n),
        ("x", x, n),
        ("dx", &*dx, n),
        ("weight", weight, dim),
        ("dweight", &*dweight, dim),
        ("dbias", &*dbias, dim),
        ("mean", mean, rows),
        ("rstd", rstd, rows),
    ] {
        b.check(&format!("layer_norm_backward {name}"), DType::F32, need)?;
    }
    if n == 0 {
        return Ok(());
    }
    let (r, d) = (i32_arg("rows", rows)?, i32_arg("dim", dim)?);
    dev.launch(
        &sources::LAYER_NORM,
        "layer_norm_backward_dx",
        LaunchDims::linear(rows as u32, row_threads(dim, 256), 0),
        &[
            Arg::Buf(dout),
            Arg::Buf(x),
            Arg::Buf(weight),
            Arg::Buf(mean),
            Arg::Buf(rstd),
            Arg::Buf(dx),
            Arg::I32(r),
            Arg::I32(d),
        ],
    )?;
    let chunks = rows.div_ceil(LN_CHUNK);
    let partial = dev.alloc(DType::F32, 2 * mul("layer_norm partials", chunks, dim)?)?;
    let col_blocks = dim.div_ceil(128) as u32;
    dev.launch(
        &sources::LAYER_NORM,
        "layer_norm_backward_params_partial",
        LaunchDims {
            grid: [col_blocks, i32_arg("row chunks", chunks)? as u32, 1],
            block: [128, 1, 1],
            smem: 0,
        },
        &[
            Arg::Buf(dout),
            Arg::Buf(x),
            Arg::Buf(mean),
            Arg::Buf(rstd),
            Arg::Buf(&partial),
            Arg::I32(r),
            Arg::I32(d),
        ],
    )?;
    dev.launch(
        &sources::LAYER_NORM,
        "layer_norm_backward_params_finish",
        LaunchDims::linear(col_blocks, 128, 0),
        &[
            Arg::Buf(&partial),
            Arg::I32(chunks as i32),
            Arg::I32(d),
            Arg::Buf(dweight),
            Arg::Buf(dbias),
        ],
    )
}

fn bn_check(s: &BnShape) -> Result<(i32, i32, i32)> {
    if s.batch == 0 || s.channels == 0 || s.hw == 0 {
        return Err(Error::invalid(format!("batch_norm: empty shape {s:?}")));
    }
    mul("batch_norm", mul("batch_norm", s.batch, s.channels)?, s.hw)?;
    Ok((
        i32_arg("batch", s.batch)?,
        i32_arg("channels", s.channels)?,
        i32_arg("hw", s.hw)?,
    ))
}

fn bn_bufs(s: &BnShape, full: &[(&str, &CudaBuf)], per_channel: &[(&str, &CudaBuf)]) -> Result<()> {
    for (name, b) in full {
        b.check(&format!("batch_norm {name}"), DType::F32, s.len())?;
    }
    for (name, b) in per_channel {
        b.check(&format!("batch_norm {name}"), DType::F32, s.channels)?;
    }
    Ok(())
}

/// Training forward: `y = γ·(x − mean)·rstd + β` with the batch statistics, which are saved in
/// `saved_mean`, `saved_rstd` `[C]` for the backward pass; updates the running statistics with
/// `momentum` (PyTorch: 0.1; unbiased variance) when given. `x`, `y` `[N, C, HW]`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_forward(
    dev: &CudaDevice,
    s: &BnShape,
    x: &CudaBuf,
    gamma: &CudaBuf,
    beta: &CudaBuf,
    eps: f32,
    momentum: f32,
    running: Option<(&mut CudaBuf, &mut CudaBuf)>,
    y: &mut CudaBuf,
    saved_mean: &mut CudaBuf,
    saved_rstd: &mut CudaBuf,
) -> Result<()> {
    let (n, c, hw) = bn_check(s)?;
    bn_bufs(
        s,
        &[("x", x), ("y", y)],
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("saved mean", saved_mean),
            ("saved rstd", saved_rstd),
        ],
    )?;
    if s.batch * s.hw < 2 {
        return Err(Error::invalid(format!(
            "batch_norm: training needs more than one value per channel, got shape {s:?}"
        )));
    }
    let (rm, rv) = match &running {
        Some((m, v)) => {
            bn_bufs(s, &[], &[("running_mean", m), ("running_var", v)])?;
            (Arg::Buf(m), Arg::Buf(v))
        }
        None => (Arg::I64(0), Arg::I64(0)),
    };
    dev.launch(
        &sources::BATCH_NORM,
        "batch_norm_train_forward",
        LaunchDims::linear(c as u32, row_threads(s.hw, 256), 0),
        &[
            Arg::Buf(x),
            Arg::Buf(gamma),
            Arg::Buf(beta),
            Arg::Buf(y),
            Arg::Buf(saved_mean),
            Arg::Buf(saved_rstd),
            rm,
            rv,
            Arg::I32(n),
            Arg::I32(c),
            Arg::I32(hw),
            Arg::F32(eps),
            Arg::F32(momentum),
        ],
    )
}

/// Eval forward with the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_forward(
    dev: &CudaDevice,
    s: &BnShape,
    x: &CudaBuf,
    gamma: &CudaBuf,
    beta: &CudaBuf,
    running_mean: &CudaBuf,
    running_var: &CudaBuf,
    eps: f32,
    y: &mut CudaBuf,
) -> Result<()> {
    let (n, c, hw) = bn_check(s)?;
    bn_bufs(
        s,
        &[("x", x), ("y", y)],
        &[
            ("gamma", gamma),
            ("beta", beta),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ],
    )?;
    let planes = i32_arg("planes", s.batch * s.channels)?;
    dev.launch(
        &sources::BATCH_NORM,
        "batch_norm_eval_forward",
        LaunchDims::linear(planes as u32, row_threads(s.hw, 256), 0),
        &[
            Arg::Buf(x),
            Arg::Buf(gamma),
            Arg::Buf(beta),
            Arg::Buf(running_mean),
            Arg::Buf(running_var),
            Arg::Buf(y),
            Arg::I32(n),
            Arg::I32(c),
            Arg::I32(hw),
            Arg::F32(eps),
        ],
    )
}

/// Training backward: `dx` `[N, C, HW]`, `dgamma`, `dbeta` `[C]` (all overwritten) from `x`,
/// `dy` and the forward's saved statistics.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_backward(
    dev: &CudaDevice,
    s: &BnShape,
    x: &CudaBuf,
    dy: &CudaBuf,
    gamma: &CudaBuf,
    saved_mean: &CudaBuf,
    saved_rstd: &CudaBuf,
    dx: &mut CudaBuf,
    dgamma: &mut CudaBuf,
    dbeta: &mut CudaBuf,
) -> Result<()> {
    let (n, c, hw) = bn_check(s)?;
    bn_bufs(
        s,
        &[("x", x), ("dy", dy), ("dx", dx)],
        &[
            ("gamma", gamma),
            ("saved mean", saved_mean),
            ("saved rstd", saved_rstd),
            ("dgamma", dgamma),
            ("dbeta", dbeta),
        ],
    )?;
    dev.launch(
        &sources::BATCH_NORM,
        "batch_norm_train_backward",
        LaunchDims::linear(c as u32, row_threads(s.hw, 256), 0),
        &[
            Arg::Buf(x),
            Arg::Buf(dy),
            Arg::Buf(gamma),
            Arg::Buf(saved_mean),
            Arg::Buf(saved_rstd),
            Arg::Buf(dx),
            Arg::Buf(dgamma),
            Arg::Buf(dbeta),
            Arg::I32(n),
            Arg::I32(c),
            Arg::I32(hw),
        ],
    )
}

/// Eval backward: `dx = dy·γ/√(running_var + eps)`, `dγ = Σ dy·x̂`, `dβ = Σ dy` (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_backward(
    dev: &CudaDevice,
    s: &BnShape,
    x: &CudaBuf,
    dy: &CudaBuf,
    gamma: &CudaBuf,
    running_mean: &CudaBuf,
    running_var: &CudaBuf,
    eps: f32,
    dx: &mut CudaBuf,
    dgamma: &mut CudaBuf,
    dbeta: &mut CudaBuf,
) -> Result<()> {
    let (n, c, hw) = bn_check(s)?;
    bn_bufs(
        s,
        &[("x", x), ("dy", dy), ("dx", dx)],
        &[
            ("gamma", gamma),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("dgamma", dgamma),
            ("dbeta", dbeta),
        ],
    )?;
    dev.launch(
        &sources::BATCH_NORM,
        "batch_norm_eval_backward",
        LaunchDims::linear(c as u32, row_threads(s.hw, 256), 0),
        &[
            Arg::Buf(x),
            Arg::Buf(dy),
            Arg::Buf(gamma),
            Arg::Buf(running_mean),
            Arg::Buf(running_var),
            Arg::Buf(dx),
            Arg::Buf(dgamma),
            Arg::Buf(dbeta),
            Arg::I32(n),
            Arg::I32(c),
            Arg::I32(hw),
            Arg::F32(eps),
        ],
    )
}
