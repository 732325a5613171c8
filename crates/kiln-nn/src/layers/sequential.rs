//! `Sequential`: a chain of layers run forward and backward, as PyTorch's `nn.Sequential` — and
//! named as its `state_dict` names them (`{prefix}{index}.{weight|bias|running_mean|…}`, where
//! every module counts, activations and reshapes included).
//!
//! Every activation shape is `[N, C, H, W]`; a fully connected layer sees `[N, F, 1, 1]`.
//! The container owns every activation of the last forward pass: layer `i` writes slot
//! `slot[i]`, and an activation that follows a layer with parameters is applied in place on that
//! layer's slot (no layer's backward needs its own output — convolutions, linear layers and
//! batch norm read their input, activations their output — so the overwrite is safe). The
//! backward pass keeps one gradient buffer per layer input.
use super::{BatchNorm2d, Conv2d, Linear, Param};
use crate::backend::{ensure_len, Backend, BnShape, ConvGeometry, Pointwise};
use kiln_tensor::{Error, Result};

/// One module of a [`Sequential`].
pub enum Layer<B: Backend> {
    Conv(Conv2d<B>),
    BatchNorm(BatchNorm2d<B>),
    Linear(Linear<B>),
    Act(Pointwise),
    /// `[N, F, 1, 1] → [N, C, H, W]` with `F = C·H·W` (PyTorch's `nn.Unflatten(1, (C, H, W))`).
    Unflatten([usize; 3]),
    /// `[N, C, H, W] → [N, C·H·W, 1, 1]` (`nn.Flatten()`).
    Flatten,
}

/// Batch norm's behaviour in a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics; running statistics updated.
    Train,
    /// Running statistics.
    Eval,
}

/// A chain of layers with the activations of its last forward pass.
pub struct Sequential<B: Backend> {
    pub layers: Vec<Layer<B>>,
    /// The `state_dict` name prefix (`"main."` for a module whose chain is `self.main`).
    pub prefix: String,
    /// Shape of the network input of the last [`Sequential::prepare`].
    input_shape: [usize; 4],
    /// Output shape of each layer.
    shapes: Vec<[usize; 4]>,
    /// Geometry of each convolution.
    geoms: Vec<Option<ConvGeometry>>,
    /// Activation slot of each layer's output.
    slot: Vec<usize>,
    bufs: Vec<B::Buf>,
    /// Gradient with respect to each layer's input (index 0 unused: that is the caller's `dx`).
    grads: Vec<B::Buf>,
}

fn numel(s: &[usize; 4]) -> usize {
    s.iter().product()
}

impl<B: Backend> Sequential<B> {
    pub fn new(be: &B, layers: Vec<Layer<B>>, prefix: &str) -> Result<Self> {
        let n = layers.len();
        Ok(Sequential {
            layers,
            prefix: prefix.to_string(),
            input_shape: [0; 4],
            shapes: vec![[0; 4]; n],
            geoms: vec![None; n],
            slot: vec![0; n],
            bufs: Vec::new(),
            grads: (0..n).map(|_| be.zeros(0)).collect::<Result<_>>()?,
        })
    }

    /// Works out every layer's output shape for an input of `input` `[N, C, H, W]` and makes
    /// room for the activations (buffers grow; they never shrink). A layer that does not fit
    /// its input is an error naming the layer.
    pub fn prepare(&mut self, be: &B, input: [usize; 4]) -> Result<()> {
        if self.input_shape == input && !self.bufs.is_empty() {
            return Ok(());
        }
        let mut shape = input;
        let mut slots = 0usize;
        for (i, layer) in self.layers.iter().enumerate() {
            let name = format!("{}{i}", self.prefix);
            let (out, geom, in_place) = match layer {
                Layer::Conv(c) => {
                    let g = c
                        .geometry(shape)
                        .map_err(|e| Error::invalid(format!("layer {name}: {e}")))?;
                    (g.output_shape(), Some(g), false)
                }
                Layer::BatchNorm(bn) => {
                    if shape[1] != bn.channels {
                        return Err(Error::invalid(format!(
                            "layer {name}: batch norm of {} channels on an input of shape {shape:?}",
                            bn.channels
                        )));
                    }
                    (shape, None, false)
                }
                Layer::Linear(l) => {
                    let f = shape[1] * shape[2] * shape[3];
                    if f != l.in_features {
                        return Err(Error::invalid(format!(
                            "layer {name}: linear layer of {} inputs on an input of shape {shape:?}",
                            l.in_features
                        )));
                    }
                    ([shape[0], l.out_features, 1, 1], None, false)
                }
                Layer::Act(_) => (shape, None, i > 0),
                Layer::Unflatten(chw) => {
                    if shape[1] * shape[2] * shape[3] != chw.iter().product::<usize>() {
                        return Err(Error::invalid(format!(
                            "layer {name}: cannot unflatten {shape:?} to {chw:?}"
                        )));
                    }
                    ([shape[0], chw[0], chw[1], chw[2]], None, i > 0)
                }
                Layer::Flatten => (
                    [shape[0], shape[1] * shape[2] * shape[3], 1, 1],
                    None,
                    i > 0,
                ),
            };
            self.slot[i] = if in_place {
                self.slot[i - 1]
            } else {
                slots += 1;
                slots - 1
            };
            self.shapes[i] = out;
            self.geoms[i] = geom;
            shape = out;
        }
        while self.bufs.len() < slots {
            self.bufs.push(be.zeros(0)?);
        }
        for i in 0..self.layers.len() {
            ensure_len(be, &mut self.bufs[self.slot[i]], numel(&self.shapes[i]))?;
            let in_len = if i == 0 {
                numel(&input)
            } else {
                numel(&self.shapes[i - 1])
            };
            if i > 0 {
                ensure_len(be, &mut self.grads[i], in_len)?;
            }
        }
        self.input_shape = input;
        Ok(())
    }

    /// Output shape of the last prepared input.
    pub fn output_shape(&self) -> [usize; 4] {
        *self.shapes.last().unwrap_or(&self.input_shape)
    }

    /// The output of the last forward pass (its first `numel(output_shape)` elements).
    pub fn output(&self) -> &B::Buf {
        &self.bufs[*self.slot.last().expect("a Sequential has layers")]
    }

    /// The forward pass of `x` (`input` `[N, C, H, W]`).
    pub fn forward(&mut self, be: &B, x: &B::Buf, input: [usize; 4], mode: Mode) -> Result<()> {
        if self.layers.is_empty() {
            return Err(Error::invalid("an empty Sequential"));
        }
        self.prepare(be, input)?;
        let Sequential {
            layers,
            shapes,
            geoms,
            slot,
            bufs,
            ..
        } = self;
        for (i, layer) in layers.iter_mut().enumerate() {
            let in_shape = if i == 0 { input } else { shapes[i - 1] };
            let same = i > 0 && slot[i] == slot[i - 1];
            if same {
                // In place on the previous layer's output (or a reshape: nothing to do).
                if let Layer::Act(act) = layer {
                    be.pointwise_inplace(*act, &mut bufs[slot[i]], numel(&in_shape))?;
                }
                continue;
            }
            let (x_in, y) = input_and_output(bufs, x, i, slot);
            match layer {
                Layer::Conv(c) => c.forward(be, geoms[i].as_ref().expect("prepared"), x_in, y)?,
                Layer::BatchNorm(bn) => match mode {
                    Mode::Train => bn.forward_train(be, x_in, in_shape, y)?,
                    Mode::Eval => bn.forward_eval(be, x_in, in_shape, y)?,
                },
                Layer::Linear(l) => l.forward(be, x_in, y, in_shape[0])?,
                Layer::Act(act) => be.pointwise(*act, x_in, y, numel(&in_shape))?,
                Layer::Unflatten(_) | Layer::Flatten => {
                    be.copy(x_in, 0, y, 0, numel(&in_shape))?;
                }
            }
        }
        Ok(())
    }

    /// The backward pass of the last forward pass (whose input was `x`) from `dout`, the
    /// gradient of the output. With `param_grads`, every parameter gradient is written
    /// (overwritten, or added to with `accumulate`); without, only input gradients flow (the
    /// parameters' gradients are left alone). `dx` receives the gradient of the network input.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        dout: &B::Buf,
        mut dx: Option<&mut B::Buf>,
        param_grads: bool,
        accumulate: bool,
    ) -> Result<()> {
        let input = self.input_shape;
        let Sequential {
            layers,
            shapes,
            geoms,
            slot,
            bufs,
            grads,
            ..
        } = self;
        let n = layers.len();
        for i in (0..n).rev() {
            let in_shape = if i == 0 { input } else { shapes[i - 1] };
            let x_in: &B::Buf = if i == 0 { x } else { &bufs[slot[i - 1]] };
            // g_out = ∂L/∂(output of layer i); g_in = ∂L/∂(input of layer i).
            let (lower, upper) = grads.split_at_mut(i + 1);
            let g_out: &B::Buf = if i + 1 == n { dout } else { &upper[0] };
            let g_in: Option<&mut B::Buf> = if i == 0 {
                dx.as_deref_mut()
            } else {
                Some(&mut lower[i])
            };
            match &mut layers[i] {
                Layer::Conv(c) => {
                    let g = geoms[i].as_ref().expect("prepared");
                    if param_grads {
                        c.backward(be, g, x_in, g_out, g_in, accumulate)?;
                    } else if let Some(g_in) = g_in {
                        c.backward_input(be, g, x_in, g_out, g_in)?;
                    }
                }
                Layer::BatchNorm(bn) => {
                    if param_grads {
                        bn.backward(be, x_in, in_shape, g_out, g_in, accumulate)?;
                    } else if let Some(g_in) = g_in {
                        bn.backward_input(be, x_in, in_shape, g_out, g_in)?;
                    }
                }
                Layer::Linear(l) => {
                    if param_grads {
                        l.backward(be, x_in, g_out, g_in, in_shape[0], accumulate)?;
                    } else if let Some(g_in) = g_in {
                        l.backward_input(be, g_out, g_in, in_shape[0])?;
                    }
                }
                Layer::Act(act) => {
                    if let Some(g_in) = g_in {
                        let y = &bufs[slot[i]];
                        be.pointwise_backward(*act, y, g_out, g_in, numel(&in_shape))?;
                    }
                }
                Layer::Unflatten(_) | Layer::Flatten => {
                    if let Some(g_in) = g_in {
                        be.copy(g_out, 0, g_in, 0, numel(&in_shape))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every parameter in `state_dict` order.
    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut v = Vec::new();
        for layer in &mut self.layers {
            match layer {
                Layer::Conv(c) => v.extend(c.params_mut()),
                Layer::BatchNorm(bn) => v.extend(bn.params_mut()),
                Layer::Linear(l) => v.extend(l.params_mut()),
                _ => {}
            }
        }
        v
    }

    /// Element counts of [`Sequential::params_mut`].
    pub fn param_sizes(&mut self) -> Vec<usize> {
        self.params_mut().iter().map(|p| p.len()).collect()
    }
}

/// The input of layer `i` (the network input for `i = 0`) and its output slot, borrowed
/// together; `slot[i] != slot[i - 1]`.
fn input_and_output<'a, Buf>(
    bufs: &'a mut [Buf],
    x: &'a Buf,
    i: usize,
    slot: &[usize],
) -> (&'a Buf, &'a mut Buf) {
    let out = slot[i];
    if i == 0 {
        return (x, &mut bufs[out]);
    }
    let inp = slot[i - 1];
    if inp < out {
        let (a, b) = bufs.split_at_mut(out);
        (&a[inp], &mut b[0])
    } else {
        let (a, b) = bufs.split_at_mut(inp);
        (&b[0], &mut a[out])
    }
}

/// A BN shape from an activation shape (for callers that run batch norm directly).
pub fn bn_shape(s: [usize; 4]) -> BnShape {
    BnShape {
        batch: s[0],
        channels: s[1],
        hw: s[2] * s[3],
    }
}
