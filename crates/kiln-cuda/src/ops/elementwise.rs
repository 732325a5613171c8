//! Point-wise ops (`kernels/elementwise.cu`, `kernels/cast.cu`). Every op takes the element
//! count `n`; buffers hold at least `n` elements.
use super::grid_stride;
use crate::device::Arg;
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_cpu::elementwise::activations::Activation;
use kiln_tensor::{DType, Error, Result};

fn check_f32(what: &str, n: usize, bufs: &[(&str, &CudaBuf)]) -> Result<()> {
    for (name, b) in bufs {
        b.check(&format!("{what} {name}"), DType::F32, n)?;
    }
    Ok(())
}

fn launch_n(dev: &CudaDevice, kernel: &str, n: usize, args: &[Arg<'_>]) -> Result<()> {
    dev.launch(&sources::ELEMENTWISE, kernel, grid_stride(n), args)
}

/// `y = gelu_tanh(x)`.
pub fn gelu_forward(dev: &CudaDevice, x: &CudaBuf, y: &mut CudaBuf, n: usize) -> Result<()> {
    check_f32("gelu_forward", n, &[("x", x), ("y", y)])?;
    launch_n(
        dev,
        "gelu_forward",
        n,
        &[Arg::Buf(x), Arg::Buf(y), Arg::I64(n as i64)],
    )
}

/// `y = gelu_tanh(y)`.
pub fn gelu_inplace(dev: &CudaDevice, y: &mut CudaBuf, n: usize) -> Result<()> {
    check_f32("gelu_inplace", n, &[("y", y)])?;
    launch_n(
        dev,
        "gelu_forward",
        n,
        &[Arg::Buf(y), Arg::Buf(y), Arg::I64(n as i64)],
    )
}

/// `dx += gelu_tanh'(x)·dy` (accumulates).
pub fn gelu_backward(
    dev: &CudaDevice,
    x: &CudaBuf,
    dy: &CudaBuf,
    dx: &mut CudaBuf,
    n: usize,
) -> Result<()> {
    check_f32("gelu_backward", n, &[("x", x), ("dy", dy), ("dx", dx)])?;
    launch_n(
        dev,
        "gelu_backward",
        n,
        &[Arg::Buf(x), Arg::Buf(dy), Arg::Buf(dx), Arg::I64(n as i64)],
    )
}

fn act_kind(act: Activation) -> Result<(i32, f32)> {
    Ok(match act {
        Activation::Relu => (0, 0.0),
        Activation::LeakyRelu(a) => {
            if a.is_nan() || a < 0.0 {
                return Err(Error::invalid(format!(
                    "LeakyRelu: slope {a} must be ≥ 0 (the backward pass works from the output)"
                )));
            }
            (1, a)
        }
        Activation::Tanh => (2, 0.0),
        Activation::Sigmoid => (3, 0.0),
    })
}

/// `y = f(x)`.
pub fn activation_forward(
    dev: &CudaDevice,
    act: Activation,
    x: &CudaBuf,
    y: &mut CudaBuf,
    n: usize,
) -> Result<()> {
    check_f32("activation_forward", n, &[("x", x), ("y", y)])?;
    let (kind, slope) = act_kind(act)?;
    launch_n(
        dev,
        "activation_forward",
        n,
        &[
            Arg::I32(kind),
            Arg::F32(slope),
            Arg::Buf(x),
            Arg::Buf(y),
            Arg::I64(n as i64),
        ],
    )
}

/// `y = f(y)`.
pub fn activation_inplace(
    dev: &CudaDevice,
    act: Activation,
    y: &mut CudaBuf,
    n: usize,
) -> Result<()> {
    check_f32("activation_inplace", n, &[("y", y)])?;
    let (kind, slope) = act_kind(act)?;
    launch_n(
        dev,
        "activation_forward",
        n,
        &[
            Arg::I32(kind),
            Arg::F32(slope),
            Arg::Buf(y),
            Arg::Buf(y),
            Arg::I64(n as i64),
        ],
    )
}

/// `dx = dy·f'` from the forward output `y` (overwrites).
pub fn activation_backward(
    dev: &CudaDevice,
    act: Activation,
    y: &CudaBuf,
    dy: &CudaBuf,
    dx: &mut CudaBuf,
    n: usize,
) -> Result<()> {
    check_f32(
        "activation_backward",
        n,
        &[("y", y), ("dy", dy), ("dx", dx)],
    )?;
    let (kind, slope) = act_kind(act)?;
    launch_n(
        dev,
        "activation_backward",
        n,
        &[
            Arg::I32(kind),
            Arg::F32(slope),
            Arg::Buf(y),
            Arg::Buf(dy),
            Arg::Buf(dx),
            Arg::I64(n as i64),
        ],
    )
}

/// `out = a + b`.
pub fn add(dev: &CudaDevice, a: &CudaBuf, b: &CudaBuf, out: &mut CudaBuf, n: usize) -> Result<()> {
    check_f32("add", n, &[("a", a), ("b", b), ("out", out)])?;
    launch_n(
        dev,
        "add",
        n,
        &[Arg::Buf(a), Arg::Buf(b), Arg::Buf(out), Arg::I64(n as i64)],
    )
}

/// `acc += b` (the residual add).
pub fn add_inplace(dev: &CudaDevice, acc: &mut CudaBuf, b: &CudaBuf, n: usize) -> Result<()> {
    check_f32("add_inplace", n, &[("acc", acc), ("b", b)])?;
    launch_n(
        dev,
        "add",
        n,
        &[
            Arg::Buf(acc),
            Arg::Buf(b),
            Arg::Buf(acc),
            Arg::I64(n as i64),
        ],
    )
}

/// `y = alpha·x + beta·y` (`beta == 0` ignores y's previous contents).
pub fn axpby(
    dev: &CudaDevice,
    alpha: f32,
    x: &CudaBuf,
    beta: f32,
    y: &mut CudaBuf,
    n: usize,
) -> Result<()> {
    check_f32("axpby", n, &[("x", x), ("y", y)])?;
    launch_n(
        dev,
        "axpby",
        n,
        &[
            Arg::F32(alpha),
            Arg::Buf(x),
            Arg::F32(beta),
            Arg::Buf(y),
            Arg::I64(n as i64),
        ],
    )
}

/// `dst[..n] = src[..n]` converted between f32 and bf16/f16 (round to nearest even); the same
/// dtype is a copy.
pub fn cast(dev: &CudaDevice, src: &CudaBuf, dst: &mut CudaBuf, n: usize) -> Result<()> {
    src.check_len("cast src", n)?;
    dst.check_len("cast dst", n)?;
    let kernel = match (src.dtype(), dst.dtype()) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (a, b) if a == b => {
            return dev.copy_prefix(src, dst, n);
        }
        (a, b) => return Err(Error::invalid(format!("cast: {a} to {b} is not supported"))),
    };
    dev.launch(
        &sources::CAST,
        kernel,
        grid_stride(n),
        &[Arg::Buf(src), Arg::Buf(dst), Arg::I64(n as i64)],
    )
}

/// `x[..n] = value`.
pub fn fill(dev: &CudaDevice, x: &mut CudaBuf, n: usize, value: f32) -> Result<()> {
    check_f32("fill", n, &[("x", x)])?;
    launch_n(
        dev,
        "fill_f32",
        n,
        &[Arg::Buf(x), Arg::F32(value), Arg::I64(n as i64)],
    )
}

/// `x[..n] *= s`.
pub fn scale(dev: &CudaDevice, x: &mut CudaBuf, n: usize, s: f32) -> Result<()> {
    check_f32("scale", n, &[("x", x)])?;
    launch_n(
        dev,
        "scale_f32",
        n,
        &[Arg::Buf(x), Arg::F32(s), Arg::I64(n as i64)],
    )
}

/// Inverted dropout of `x[..n]` in place with probability `p` (in [0, 1)): element `i` is kept
/// (and scaled by `1/(1 − p)`) when the top 24 bits of `mix64(seed ^ mix64(i))` are at least
/// `p·2²⁴` — the mask of kiln-nn's CPU backend, bit for bit.
pub fn dropout(dev: &CudaDevice, x: &mut CudaBuf, n: usize, p: f32, seed: u64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(format!(
            "dropout: p = {p} must be in [0, 1)"
        )));
    }
    check_f32("dropout", n, &[("x", x)])?;
    let scale = 1.0 / (1.0 - p);
    let threshold = (p as f64 * (1u64 << 24) as f64) as u64;
    launch_n(
        dev,
        "dropout_f32",
        n,
        &[
            Arg::Buf(x),
            Arg::I64(n as i64),
            Arg::I64(seed as i64),
            Arg::I64(threshold as i64),
            Arg::F32(scale),
        ],
    )
}
