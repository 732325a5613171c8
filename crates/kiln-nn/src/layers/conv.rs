//! `Conv2d` and `ConvTranspose2d` (one type; [`Conv2d::transposed`] tells which) with PyTorch's
//! weight layouts.
use super::param::Param;
use crate::backend::{Backend, Conv2dParams, ConvGeometry, Grads};
use kiln_tensor::{Error, Result};

/// A 2-D convolution (weight `[C_out, C_in/G, kh, kw]`) or transposed convolution (weight
/// `[C_in, C_out/G, kh, kw]`), optional bias `[C_out]`.
pub struct Conv2d<B: Backend> {
    pub weight: Param<B>,
    pub bias: Option<Param<B>>,
    pub params: Conv2dParams,
    pub transposed: bool,
    pub in_channels: usize,
    pub out_channels: usize,
}

impl<B: Backend> Conv2d<B> {
    /// A zero-initialised convolution (`transposed` false) or transposed convolution.
    pub fn new(
        be: &B,
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        params: Conv2dParams,
        bias: bool,
        transposed: bool,
    ) -> Result<Self> {
        let g = params.groups;
        if g == 0 || !in_channels.is_multiple_of(g) || !out_channels.is_multiple_of(g) {
            return Err(Error::invalid(format!(
                "conv: channels {in_channels}→{out_channels} do not divide into {g} groups"
            )));
        }
        let shape = if transposed {
            [in_channels, out_channels / g, kernel[0], kernel[1]]
        } else {
            [out_channels, in_channels / g, kernel[0], kernel[1]]
        };
        Ok(Conv2d {
            weight: Param::zeros(be, &shape)?,
            bias: if bias {
                Some(Param::zeros(be, &[out_channels])?)
            } else {
                None
            },
            params,
            transposed,
            in_channels,
            out_channels,
        })
    }

    /// The geometry for an input of `x_shape` `[N, C_in, H, W]` (errors name the mismatch).
    pub fn geometry(&self, x_shape: [usize; 4]) -> Result<ConvGeometry> {
        let w: [usize; 4] = self.weight.shape[..]
            .try_into()
            .map_err(|_| Error::invalid("conv: the weight must have 4 dimensions"))?;
        if self.transposed {
            ConvGeometry::conv_transpose2d(x_shape, w, &self.params)
        } else {
            ConvGeometry::conv2d(x_shape, w, &self.params)
        }
    }

    /// `y = W ⋆ x + b` (or the transposed convolution) for geometry `g`.
    pub fn forward(&self, be: &B, g: &ConvGeometry, x: &B::Buf, y: &mut B::Buf) -> Result<()> {
        let bias = self.bias.as_ref().map(|b| &b.value);
        be.conv(g, x, &self.weight.value, bias, y)
    }

    /// From `dy`: `dW`, `db`, and `dx` when asked for (see [`Backend::conv_backward`]).
    pub fn backward(
        &mut self,
        be: &B,
        g: &ConvGeometry,
        x: &B::Buf,
        dy: &B::Buf,
        dx: Option<&mut B::Buf>,
        accumulate: bool,
    ) -> Result<()> {
        be.conv_backward(
            g,
            x,
            &self.weight.value,
            dy,
            Grads {
                dx,
                dw: Some(&mut self.weight.grad),
                db: self.bias.as_mut().map(|b| &mut b.grad),
                accumulate,
            },
        )
    }

    /// `dx` only (the parameters' gradients untouched): the pass through a network whose own
    /// parameters are not being trained in this step (the discriminator in the generator's
    /// step).
    pub fn backward_input(
        &self,
        be: &B,
        g: &ConvGeometry,
        x: &B::Buf,
        dy: &B::Buf,
        dx: &mut B::Buf,
    ) -> Result<()> {
        be.conv_backward(
            g,
            x,
            &self.weight.value,
            dy,
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
