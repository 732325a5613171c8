//! `Linear`: `y = x·Wᵀ + b` with PyTorch's `nn.Linear` weight layout `[out, in]`.
use super::param::Param;
use crate::backend::{Activation, Backend, Grads, LinearDims};
use kiln_tensor::Result;

/// A fully connected layer: weight `[out, in]`, optional bias `[out]`.
pub struct Linear<B: Backend> {
    pub weight: Param<B>,
    pub bias: Option<Param<B>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl<B: Backend> Linear<B> {
    /// Zero parameters (the caller loads or initialises them).
    pub fn new(be: &B, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: Param::zeros(be, &[out_features, in_features])?,
            bias: if bias {
                Some(Param::zeros(be, &[out_features])?)
            } else {
                None
            },
            in_features,
            out_features,
        })
    }

    fn dims(&self, rows: usize) -> LinearDims {
        LinearDims::transposed(rows, self.in_features, self.out_features)
    }

    /// `y [rows, out] = x [rows, in] · Wᵀ + b`.
    pub fn forward(&self, be: &B, x: &B::Buf, y: &mut B::Buf, rows: usize) -> Result<()> {
        let bias = self.bias.as_ref().map(|b| &b.value);
        be.linear(
            x,
            &self.weight.value,
            bias,
            y,
            self.dims(rows),
            Activation::None,
        )
    }

    /// From `dy [rows, out]`: `dW = dyᵀ·x`, `db = Σ dy`, and `dx = dy·W` when asked for.
    pub fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        dy: &B::Buf,
        dx: Option<&mut B::Buf>,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        let dims = self.dims(rows);
        be.linear_backward(
            x,
            &self.weight.value,
            dy,
            dims,
            Grads {
                dx,
                dw: Some(&mut self.weight.grad),
                db: self.bias.as_mut().map(|b| &mut b.grad),
                accumulate,
            },
        )
    }

    /// `dx = dy·W` only, the parameters' gradients untouched.
    pub fn backward_input(&self, be: &B, dy: &B::Buf, dx: &mut B::Buf, rows: usize) -> Result<()> {
        let dims = self.dims(rows);
        // The weight is not read for dW, so the input is not needed: pass dy in its place.
        be.linear_backward(
            dy,
            &self.weight.value,
            dy,
            dims,
            Grads {
                dx: Some(dx),
                ..Grads::none()
            },
        )
    }

    /// The parameters, weight first.
    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut v = vec![&mut self.weight];
        v.extend(self.bias.as_mut());
        v
    }
}
