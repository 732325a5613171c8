//! Adam / AdamW (`kernels/adam.cu`), PyTorch's update order and bias correction, as kiln-nn's
//! `optim::Adam`.
use super::grid_stride;
use crate::device::Arg;
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Error, Result};

/// Hyper-parameters (the fields of kiln-nn's `AdamConfig`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// true: AdamW (decoupled weight decay); false: Adam (L2 added to the gradient).
    pub decoupled: bool,
}

/// One update of `param` from `grad` with moments `m`, `v` (all `n` f32 elements) at step
/// `step` (1 for the first update). The bias corrections are computed in f64, applied in f32.
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    dev: &CudaDevice,
    p: &AdamParams,
    step: u64,
    param: &mut CudaBuf,
    grad: &CudaBuf,
    m: &mut CudaBuf,
    v: &mut CudaBuf,
    n: usize,
) -> Result<()> {
    let ok = p.lr >= 0.0
        && p.eps >= 0.0
        && p.weight_decay >= 0.0
        && (0.0..1.0).contains(&p.beta1)
        && (0.0..1.0).contains(&p.beta2);
    if !ok || step == 0 {
        return Err(Error::invalid(format!(
            "adam: invalid hyper-parameters {p:?} at step {step}"
        )));
    }
    for (name, b) in [("param", &*param), ("grad", grad), ("m", &*m), ("v", &*v)] {
        b.check(&format!("adam {name}"), DType::F32, n)?;
    }
    let t = i32::try_from(step).map_err(|_| Error::invalid("adam: step count overflows"))?;
    let bc1 = 1.0 - p.beta1.powi(t);
    let bc2_sqrt = (1.0 - p.beta2.powi(t)).sqrt();
    let step_size = (p.lr / bc1) as f32;
    dev.launch(
        &sources::ADAM,
        "adam_step",
        grid_stride(n),
        &[
            Arg::Buf(param),
            Arg::Buf(grad),
            Arg::Buf(m),
            Arg::Buf(v),
            Arg::I64(n as i64),
            Arg::F32(step_size),
            Arg::F32(bc2_sqrt as f32),
            Arg::F32((1.0 - p.beta1) as f32),
            Arg::F32(p.beta2 as f32),
            Arg::F32((1.0 - p.beta2) as f32),
            Arg::F32(p.eps as f32),
            Arg::F32(p.weight_decay as f32),
            Arg::F32((1.0 - p.lr * p.weight_decay) as f32),
            Arg::I32(p.decoupled as i32),
        ],
    )
}
