//! Losses (`kernels/loss.cu`): binary cross-entropy (mean) and cross-entropy fused with the
//! softmax over the vocabulary.
use super::{grid_stride, i32_arg, mul, row_threads};
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Error, Result};

/// Must match BCE_BLOCKS / BCE_THREADS in loss.cu.
const BCE_BLOCKS: u32 = 128;
const BCE_THREADS: u32 = 256;

/// `loss[0] = −(1/n) Σ [t·max(ln p, −100) + (1 − t)·max(ln(1 − p), −100)]` over the first `n`
/// probabilities `p` and targets `t`. The sum's order depends only on `n` (deterministic).
/// Unlike kiln-cpu, values of `p` outside [0, 1] are not detected (they give NaN).
pub fn bce_forward(
    dev: &CudaDevice,
    p: &CudaBuf,
    t: &CudaBuf,
    n: usize,
    loss: &mut CudaBuf,
) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("binary_cross_entropy: empty input"));
    }
    p.check("bce p", DType::F32, n)?;
    t.check("bce t", DType::F32, n)?;
    loss.check("bce loss", DType::F32, 1)?;
    // f64 partials, stored in an f32 buffer of twice the length (256-byte aligned); every
    // block writes its own.
    let partial = dev.scratch(2 * BCE_BLOCKS as usize)?;
    dev.launch(
        &sources::LOSS,
        "bce_forward_partial",
        LaunchDims::linear(BCE_BLOCKS, BCE_THREADS, 0),
        &[
            Arg::Buf(p),
            Arg::Buf(t),
            Arg::Buf(&partial),
            Arg::I64(n as i64),
        ],
    )?;
    dev.launch(
        &sources::LOSS,
        "bce_forward_finish",
        LaunchDims::linear(1, 32, 0),
        &[
            Arg::Buf(&partial),
            Arg::I32(BCE_BLOCKS as i32),
            Arg::I64(n as i64),
            Arg::Buf(loss),
        ],
    )?;
    dev.recycle(partial);
    Ok(())
}

/// `dp = dloss·(1/n)·(p − t)/max(p·(1 − p), 1e−12)` (overwritten).
pub fn bce_backward(
    dev: &CudaDevice,
    p: &CudaBuf,
    t: &CudaBuf,
    n: usize,
    dloss: f32,
    dp: &mut CudaBuf,
) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("binary_cross_entropy: empty input"));
    }
    p.check("bce p", DType::F32, n)?;
    t.check("bce t", DType::F32, n)?;
    dp.check("bce dp", DType::F32, n)?;
    dev.launch(
        &sources::LOSS,
        "bce_backward",
        grid_stride(n),
        &[
            Arg::Buf(p),
            Arg::Buf(t),
            Arg::Buf(dp),
            Arg::I64(n as i64),
            Arg::F32(dloss / n as f32),
        ],
    )
}

fn ce_check(logits: &CudaBuf, targets: &CudaBuf, rows: usize, vocab: usize) -> Result<(i32, i32)> {
    logits.check(
        "cross_entropy logits",
        DType::F32,
        mul("cross_entropy", rows, vocab)?,
    )?;
    targets.check("cross_entropy targets", DType::I32, rows)?;
    if vocab == 0 {
        return Err(Error::invalid("cross_entropy: empty vocabulary"));
    }
    Ok((i32_arg("rows", rows)?, i32_arg("vocab", vocab)?))
}

/// `losses[r] = logsumexp(logits[r]) − logits[r][targets[r]]` for `logits` `[rows, vocab]`,
/// `targets` `[rows]` (i32; a target outside [0, vocab) gives a loss of 0: an ignored row).
pub fn cross_entropy_forward(
    dev: &CudaDevice,
    logits: &CudaBuf,
    targets: &CudaBuf,
    rows: usize,
    vocab: usize,
    losses: &mut CudaBuf,
) -> Result<()> {
    let (r, v) = ce_check(logits, targets, rows, vocab)?;
    losses.check("cross_entropy losses", DType::F32, rows)?;
    dev.launch(
        &sources::LOSS,
        "cross_entropy_forward",
        LaunchDims::linear(rows as u32, row_threads(vocab, 1024), 0),
        &[
            Arg::Buf(logits),
            Arg::Buf(targets),
            Arg::Buf(losses),
            Arg::I32(r),
            Arg::I32(v),
        ],
    )
}

/// The loss per row (when `losses` is given) and `dlogits = scale·(softmax(logits) −
/// onehot(targets))` in one pass (scale = dloss/rows for a mean over rows). Ignored rows
/// (targets outside [0, vocab)) get a zero gradient.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward(
    dev: &CudaDevice,
    logits: &CudaBuf,
    targets: &CudaBuf,
    rows: usize,
    vocab: usize,
    scale: f32,
    losses: Option<&mut CudaBuf>,
    dlogits: &mut CudaBuf,
) -> Result<()> {
    let (r, v) = ce_check(logits, targets, rows, vocab)?;
    dlogits.check("cross_entropy dlogits", DType::F32, rows * vocab)?;
    if let Some(l) = &losses {
        l.check("cross_entropy losses", DType::F32, rows)?;
    }
    dev.launch(
        &sources::LOSS,
        "cross_entropy_backward",
        LaunchDims::linear(rows as u32, row_threads(vocab, 1024), 0),
        &[
            Arg::Buf(logits),
            Arg::Buf(targets),
            losses.map_or(Arg::I64(0), |l| Arg::Buf(l)),
            Arg::Buf(dlogits),
            Arg::I32(r),
            Arg::I32(v),
            Arg::F32(scale),
        ],
    )
}

/// [`cross_entropy_backward`] writing the gradient over the logits (saves a `[rows, vocab]`
/// buffer).
pub fn cross_entropy_backward_inplace(
    dev: &CudaDevice,
    logits: &mut CudaBuf,
    targets: &CudaBuf,
    rows: usize,
    vocab: usize,
    scale: f32,
    losses: Option<&mut CudaBuf>,
) -> Result<()> {
    let (r, v) = ce_check(logits, targets, rows, vocab)?;
    if let Some(l) = &losses {
        l.check("cross_entropy losses", DType::F32, rows)?;
    }
    dev.launch(
        &sources::LOSS,
        "cross_entropy_backward",
        LaunchDims::linear(rows as u32, row_threads(vocab, 1024), 0),
        &[
            Arg::Buf(logits),
            Arg::Buf(targets),
            losses.map_or(Arg::I64(0), |l| Arg::Buf(l)),
            Arg::Buf(logits),
            Arg::I32(r),
            Arg::I32(v),
            Arg::F32(scale),
        ],
    )
}
