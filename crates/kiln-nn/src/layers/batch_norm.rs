//! `BatchNorm2d`: per-channel normalisation of `[N, C, H, W]` with affine `γ`, `β` and running
//! statistics (momentum 0.1, eps 1e-5 by default, as PyTorch).
//!
//! Training: `y = γ·(x − mean)/√(var + eps) + β` with the batch's mean and biased variance,
//! running statistics updated with the unbiased variance; eval: the running statistics.
use super::param::Param;
use crate::backend::{download_all, Backend, BnShape, Grads};
use kiln_tensor::{Error, Result};

/// Batch normalisation over channels.
pub struct BatchNorm2d<B: Backend> {
    /// γ.
    pub weight: Param<B>,
    /// β.
    pub bias: Param<B>,
    pub running_mean: B::Buf,
    pub running_var: B::Buf,
    /// Training-mode forward passes so far (PyTorch's `num_batches_tracked`).
    pub num_batches_tracked: i64,
    pub eps: f32,
    pub momentum: f32,
    pub channels: usize,
    /// The last training forward pass's per-channel mean and `1/√(var + eps)`.
    saved_mean: B::Buf,
    saved_rstd: B::Buf,
}

impl<B: Backend> BatchNorm2d<B> {
    /// γ = 1, β = 0, running mean 0 and variance 1.
    pub fn new(be: &B, channels: usize) -> Result<Self> {
        Ok(BatchNorm2d {
            weight: Param::new(be, &vec![1.0; channels], &[channels])?,
            bias: Param::zeros(be, &[channels])?,
            running_mean: be.zeros(channels)?,
            running_var: be.upload(&vec![1.0; channels])?,
            num_batches_tracked: 0,
            eps: 1e-5,
            momentum: 0.1,
            channels,
            saved_mean: be.zeros(channels)?,
            saved_rstd: be.zeros(channels)?,
        })
    }

    fn shape(&self, x_shape: [usize; 4]) -> Result<BnShape> {
        if x_shape[1] != self.channels {
            return Err(Error::shape(
                "BatchNorm2d channels",
                &[self.channels],
                &[x_shape[1]],
            ));
        }
        Ok(BnShape {
            batch: x_shape[0],
            channels: x_shape[1],
            hw: x_shape[2] * x_shape[3],
        })
    }

    /// Training-mode forward `x → y` (`[N, C, H, W]`): batch statistics, saved for
    /// [`BatchNorm2d::backward`], running statistics updated, `num_batches_tracked` + 1.
    pub fn forward_train(
        &mut self,
        be: &B,
        x: &B::Buf,
        x_shape: [usize; 4],
        y: &mut B::Buf,
    ) -> Result<()> {
        let s = self.shape(x_shape)?;
        be.batch_norm_train(
            &s,
            x,
            &self.weight.value,
            &self.bias.value,
            Some((&mut self.running_mean, &mut self.running_var)),
            self.momentum,
            self.eps,
            y,
            &mut self.saved_mean,
            &mut self.saved_rstd,
        )?;
        self.num_batches_tracked += 1;
        Ok(())
    }

    /// Eval-mode forward with the running statistics.
    pub fn forward_eval(
        &self,
        be: &B,
        x: &B::Buf,
        x_shape: [usize; 4],
        y: &mut B::Buf,
    ) -> Result<()> {
        let s = self.shape(x_shape)?;
        be.batch_norm_eval(
            &s,
            x,
            &self.weight.value,
            &self.bias.value,
            &self.running_mean,
            &self.running_var,
            self.eps,
            y,
        )
    }

    /// Backward of the last [`BatchNorm2d::forward_train`] (whose input was `x`) from `dy`:
    /// `dγ`, `dβ` (overwritten or accumulated), and `dx` when asked for.
    pub fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        x_shape: [usize; 4],
        dy: &B::Buf,
        dx: Option<&mut B::Buf>,
        accumulate: bool,
    ) -> Result<()> {
        let s = self.shape(x_shape)?;
        be.batch_norm_backward(
            &s,
            x,
            dy,
            &self.weight.value,
            &self.saved_mean,
            &self.saved_rstd,
            Grads {
                dx,
                dw: Some(&mut self.weight.grad),
                db: Some(&mut self.bias.grad),
                accumulate,
            },
        )
    }

    /// `dx` only, parameter gradients untouched.
    pub fn backward_input(
        &self,
        be: &B,
        x: &B::Buf,
        x_shape: [usize; 4],
        dy: &B::Buf,
        dx: &mut B::Buf,
    ) -> Result<()> {
        let s = self.shape(x_shape)?;
        be.batch_norm_backward(
            &s,
            x,
            dy,
            &self.weight.value,
            &self.saved_mean,
            &self.saved_rstd,
            Grads {
                dx: Some(dx),
                ..Grads::none()
            },
        )
    }

    /// The running statistics, read back to the host.
    pub fn running_stats(&self, be: &B) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            download_all(be, &self.running_mean)?,
            download_all(be, &self.running_var)?,
        ))
    }

    /// γ then β.
    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.weight, &mut self.bias]
    }
}
