//! `BatchNorm2d` over [`kiln_cpu::norm::batch_norm`].
use kiln_cpu::norm::batch_norm::{
    batch_norm_eval_backward, batch_norm_eval_forward, batch_norm_train_backward,
    batch_norm_train_forward, BnSaved, BnShape,
};
use kiln_tensor::{Error, Result};

/// Batch normalisation of `[N, C, H, W]` per channel, with affine `γ`, `β` and running
/// statistics (momentum 0.1, eps 1e-5 by default, as PyTorch).
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    pub gamma_grad: Vec<f32>,
    pub beta_grad: Vec<f32>,
    pub eps: f32,
    pub momentum: f32,
    /// Training mode: batch statistics and running-stat updates. Eval mode: running statistics.
    pub training: bool,
    /// Forward passes taken in training mode (`num_batches_tracked`).
    pub num_batches_tracked: i64,
    saved: Option<(Vec<f32>, BnShape, Option<BnSaved>)>,
}

impl BatchNorm2d {
    /// γ = 1, β = 0, running mean 0 and variance 1, training mode.
    pub fn new(channels: usize) -> Self {
        BatchNorm2d {
            gamma: vec![1.0; channels],
            beta: vec![0.0; channels],
            running_mean: vec![0.0; channels],
            running_var: vec![1.0; channels],
            gamma_grad: vec![0.0; channels],
            beta_grad: vec![0.0; channels],
            eps: 1e-5,
            momentum: 0.1,
            training: true,
            num_batches_tracked: 0,
            saved: None,
        }
    }

    /// Parameters and their gradients (γ then β), for an optimiser.
    pub fn params_and_grads(&mut self) -> Vec<(&mut [f32], &[f32])> {
        vec![
            (&mut self.gamma[..], &self.gamma_grad[..]),
            (&mut self.beta[..], &self.beta_grad[..]),
        ]
    }

    /// `x` `[N, C, H, W]` → `y` of the same shape; keeps `x` for the backward pass.
    pub fn forward(&mut self, x: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
        if shape[1] != self.gamma.len() {
            return Err(Error::shape(
                "BatchNorm2d channels",
                &[self.gamma.len()],
                &[shape[1]],
            ));
        }
        let s = BnShape {
            batch: shape[0],
            channels: shape[1],
            hw: shape[2] * shape[3],
        };
        let mut y = vec![0f32; x.len()];
        let saved = if self.training {
            let sv = batch_norm_train_forward(
                &s,
                x,
                &self.gamma,
                &self.beta,
                self.eps,
                self.momentum,
                Some((&mut self.running_mean, &mut self.running_var)),
                &mut y,
            )?;
            self.num_batches_tracked += 1;
            Some(sv)
        } else {
            batch_norm_eval_forward(
                &s,
                x,
                &self.gamma,
                &self.beta,
                &self.running_mean,
                &self.running_var,
                self.eps,
                &mut y,
            )?;
            None
        };
        self.saved = Some((x.to_vec(), s, saved));
        Ok(y)
    }

    /// From `dy`: overwrites `gamma_grad`, `beta_grad` and returns `dx`.
    pub fn backward(&mut self, dy: &[f32]) -> Result<Vec<f32>> {
        let (x, s, saved) = self
            .saved
            .as_ref()
            .ok_or_else(|| Error::invalid("BatchNorm2d: backward before forward"))?;
        let mut dx = vec![0f32; x.len()];
        match saved {
            Some(sv) => batch_norm_train_backward(
                s,
                x,
                dy,
                &self.gamma,
                sv,
                &mut dx,
                &mut self.gamma_grad,
                &mut self.beta_grad,
            )?,
            None => batch_norm_eval_backward(
                s,
                x,
                dy,
                &self.gamma,
                &self.running_mean,
                &self.running_var,
                self.eps,
                &mut dx,
                &mut self.gamma_grad,
                &mut self.beta_grad,
            )?,
        }
        Ok(dx)
    }
}
