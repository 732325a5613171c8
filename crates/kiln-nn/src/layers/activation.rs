//! A point-wise activation layer over [`kiln_cpu::elementwise::activations`].
use kiln_cpu::elementwise::activations::{backward, forward, Activation};
use kiln_tensor::{Error, Result};

/// Applies an [`Activation`]; keeps its output for the backward pass.
#[derive(Clone, Debug)]
pub struct ActivationLayer {
    pub act: Activation,
    saved: Option<Vec<f32>>,
}

impl ActivationLayer {
    pub fn new(act: Activation) -> Self {
        ActivationLayer { act, saved: None }
    }
    /// `y = f(x)`.
    pub fn forward(&mut self, x: &[f32]) -> Result<Vec<f32>> {
        let mut y = vec![0f32; x.len()];
        forward(self.act, x, &mut y)?;
        self.saved = Some(y.clone());
        Ok(y)
    }
    /// `dx = dy · f'`.
    pub fn backward(&mut self, dy: &[f32]) -> Result<Vec<f32>> {
        let y = self
            .saved
            .as_ref()
            .ok_or_else(|| Error::invalid("activation: backward before forward"))?;
        let mut dx = vec![0f32; dy.len()];
        backward(self.act, y, dy, &mut dx)?;
        Ok(dx)
    }
}
