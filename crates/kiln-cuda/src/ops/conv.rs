//! Convolution and transposed convolution, forward and backward (`kernels/conv.cu`), with
//! kiln-cpu's [`ConvGeometry`] (image side `big`, patch side `small`, PyTorch weight layouts)
//! and the argument meanings of kiln-cpu's `conv2d_*` / `conv_transpose2d_*`.
use super::{i32_arg, mul};
use crate::device::{Arg, LaunchDims};
use crate::ops::reduce::channel_sums;
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_cpu::conv::ConvGeometry;
use kiln_tensor::{DType, Error, Result};

const TILE: usize = 64;
/// Reduction length per slice of the weight gradient.
const RCHUNK: usize = 4096;
const MAX_SLICES: usize = 64;

fn geom_arg(g: &ConvGeometry) -> Result<Arg<'static>> {
    let v = [
        g.batch,
        g.big[0],
        g.big[1],
        g.big[2],
        g.small[0],
        g.small[1],
        g.small[2],
        g.kernel[0],
        g.kernel[1],
        g.stride[0],
        g.stride[1],
        g.padding[0],
        g.padding[1],
        g.dilation[0],
        g.dilation[1],
        g.groups,
    ];
    let mut out = [0i32; 16];
    for (o, x) in out.iter_mut().zip(v) {
        *o = i32_arg("conv geometry", x)?;
    }
    // The kernels index images with 32-bit pixel counts.
    i32_arg(
        "conv batch·big pixels",
        mul("conv", g.batch, g.big[1] * g.big[2])?,
    )?;
    i32_arg(
        "conv batch·small pixels",
        mul("conv", g.batch, g.small[1] * g.small[2])?,
    )?;
    Ok(Arg::I32x16(out))
}

fn check(g: &ConvGeometry, transposed: bool, x: &CudaBuf, w: &CudaBuf, y: &CudaBuf) -> Result<()> {
    if g.transposed != transposed {
        return Err(Error::invalid(format!(
            "conv: geometry is for a {} convolution",
            if g.transposed { "transposed" } else { "plain" }
        )));
    }
    if g.groups == 0 || !g.big[0].is_multiple_of(g.groups) || !g.small[0].is_multiple_of(g.groups) {
        return Err(Error::invalid(format!(
            "conv: groups {} do not divide the channels",
            g.groups
        )));
    }
    x.check("conv input", DType::F32, g.input_len())?;
    y.check("conv output", DType::F32, g.output_len())?;
    w.check_len("conv weight", g.weight_len())?;
    if !matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::invalid(format!("conv: weight of {}", w.dtype())));
    }
    Ok(())
}

fn wname(w: &CudaBuf) -> &'static str {
    match w.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        _ => "f16",
    }
}

fn bias_arg(b: Option<&CudaBuf>) -> Arg<'_> {
    b.map_or(Arg::I64(0), Arg::Buf)
}

/// `small = W ⋆ big (+ bias)`: conv forward, transposed-conv input gradient.
fn correlate(
    dev: &CudaDevice,
    g: &ConvGeometry,
    big: &CudaBuf,
    w: &CudaBuf,
    bias: Option<&CudaBuf>,
    small: &CudaBuf,
) -> Result<()> {
    let pixels = g.batch * g.small[1] * g.small[2];
    dev.launch(
        &sources::CONV,
        &format!("conv_correlate_{}", wname(w)),
        LaunchDims {
            grid: [
                pixels.div_ceil(TILE) as u32,
                (g.small[0] / g.groups).div_ceil(TILE) as u32,
                g.groups as u32,
            ],
            block: [256, 1, 1],
            smem: 0,
        },
        &[
            Arg::Buf(big),
            Arg::Buf(w),
            bias_arg(bias),
            Arg::Buf(small),
            geom_arg(g)?,
        ],
    )
}

/// `big = col2im(Wᵀ·small) (+ bias)`: conv input gradient, transposed-conv forward.
fn scatter(
    dev: &CudaDevice,
    g: &ConvGeometry,
    small: &CudaBuf,
    w: &CudaBuf,
    bias: Option<&CudaBuf>,
    big: &CudaBuf,
) -> Result<()> {
    let pixels = g.batch * g.big[1] * g.big[2];
    dev.launch(
        &sources::CONV,
        &format!("conv_scatter_{}", wname(w)),
        LaunchDims {
            grid: [
                pixels.div_ceil(TILE) as u32,
                (g.big[0] / g.groups).div_ceil(TILE) as u32,
                g.groups as u32,
            ],
            block: [256, 1, 1],
            smem: 0,
        },
        &[
            Arg::Buf(small),
            Arg::Buf(w),
            bias_arg(bias),
            Arg::Buf(big),
            geom_arg(g)?,
        ],
    )
}

/// `dW = small · im2col(big)ᵀ` (overwritten), over fixed slices of the reduction added in order.
fn weight_grad(
    dev: &CudaDevice,
    g: &ConvGeometry,
    big: &CudaBuf,
    small: &CudaBuf,
    dw: &mut CudaBuf,
) -> Result<()> {
    dw.check("conv dw", DType::F32, g.weight_len())?;
    let r = g.batch * g.small[1] * g.small[2];
    let kg = g.big[0] / g.groups * g.kernel[0] * g.kernel[1];
    let slices = r.div_ceil(RCHUNK).clamp(1, MAX_SLICES);
    let rchunk = r.div_ceil(slices);
    let slices = r.div_ceil(rchunk).max(1);
    let grid_z = g.groups * slices;
    if grid_z > 65535 {
        return Err(Error::invalid("conv: too many groups for one launch"));
    }
    let wlen = g.weight_len();
    let partial = if slices > 1 {
        Some(dev.alloc(DType::F32, slices * wlen)?)
    } else {
        None
    };
    let out: &CudaBuf = partial.as_ref().unwrap_or(dw);
    dev.launch(
        &sources::CONV,
        "conv_weight_grad",
        LaunchDims {
            grid: [
                kg.div_ceil(TILE) as u32,
                (g.small[0] / g.groups).div_ceil(TILE) as u32,
                grid_z as u32,
            ],
            block: [256, 1, 1],
            smem: 0,
        },
        &[
            Arg::Buf(big),
            Arg::Buf(small),
            Arg::Buf(out),
            geom_arg(g)?,
            Arg::I32(slices as i32),
            Arg::I32(i32_arg("conv reduction slice", rchunk)?),
        ],
    )?;
    if let Some(p) = &partial {
        dev.launch(
            &sources::CONV,
            "conv_sum_slices",
            super::grid_stride(wlen),
            &[
                Arg::Buf(p),
                Arg::I32(slices as i32),
                Arg::I64(wlen as i64),
                Arg::Buf(dw),
            ],
        )?;
    }
    Ok(())
}

/// Conv2d forward: `y = W ⋆ x + b`; `x` `[N, C_in, H, W]`, `w` `[C_out, C_in/G, kh, kw]` (f32,
/// bf16 or f16), `bias` `[C_out]`, `y` `[N, C_out, OH, OW]` (overwritten).
pub fn conv2d_forward(
    dev: &CudaDevice,
    g: &ConvGeometry,
    x: &CudaBuf,
    w: &CudaBuf,
    bias: Option<&CudaBuf>,
    y: &mut CudaBuf,
) -> Result<()> {
    check(g, false, x, w, y)?;
    if let Some(b) = bias {
        b.check("conv bias", DType::F32, g.out_channels())?;
    }
    if g.output_len() == 0 {
        return Ok(());
    }
    correlate(dev, g, x, w, bias, y)
}

/// Conv2d backward from `dy` `[N, C_out, OH, OW]`: `dx` (a transposed conv of `dy`),
/// `dw = dy · im2col(x)ᵀ` (f32), `db = Σ dy`; each requested gradient is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    dev: &CudaDevice,
    g: &ConvGeometry,
    x: &CudaBuf,
    w: &CudaBuf,
    dy: &CudaBuf,
    dx: Option<&mut CudaBuf>,
    dw: Option<&mut CudaBuf>,
    db: Option<&mut CudaBuf>,
) -> Result<()> {
    check(g, false, x, w, dy)?;
    if let Some(dx) = dx {
        dx.check("conv dx", DType::F32, g.input_len())?;
        scatter(dev, g, dy, w, None, dx)?;
    }
    if let Some(dw) = dw {
        weight_grad(dev, g, x, dy, dw)?;
    }
    if let Some(db) = db {
        channel_sums(
            dev,
            dy,
            g.batch,
            g.small[0],
            g.small[1] * g.small[2],
            db,
            false,
        )?;
    }
    Ok(())
}

/// ConvTranspose2d forward: `y = col2im(Wᵀ·x) + b`; `x` `[N, C_in, H, W]`, `w`
/// `[C_in, C_out/G, kh, kw]`, `bias` `[C_out]`, `y` `[N, C_out, OH, OW]` (overwritten).
pub fn conv_transpose2d_forward(
    dev: &CudaDevice,
    g: &ConvGeometry,
    x: &CudaBuf,
    w: &CudaBuf,
    bias: Option<&CudaBuf>,
    y: &mut CudaBuf,
) -> Result<()> {
    check(g, true, x, w, y)?;
    if let Some(b) = bias {
        b.check("conv bias", DType::F32, g.out_channels())?;
    }
    if g.output_len() == 0 {
        return Ok(());
    }
    scatter(dev, g, x, w, bias, y)
}

/// ConvTranspose2d backward from `dy` `[N, C_out, OH, OW]`: `dx = W ⋆ dy`,
/// `dw = x · im2col(dy)ᵀ` (f32), `db = Σ dy`; each requested gradient is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward(
    dev: &CudaDevice,
    g: &ConvGeometry,
    x: &CudaBuf,
    w: &CudaBuf,
    dy: &CudaBuf,
    dx: Option<&mut CudaBuf>,
    dw: Option<&mut CudaBuf>,
    db: Option<&mut CudaBuf>,
) -> Result<()> {
    check(g, true, x, w, dy)?;
    if let Some(dx) = dx {
        dx.check("conv dx", DType::F32, g.input_len())?;
        correlate(dev, g, dy, w, None, dx)?;
    }
    if let Some(dw) = dw {
        weight_grad(dev, g, dy, x, dw)?;
    }
    if let Some(db) = db {
        channel_sums(dev, dy, g.batch, g.big[0], g.big[1] * g.big[2], db, false)?;
    }
    Ok(())
}
