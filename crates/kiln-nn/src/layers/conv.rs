//! `Conv2d` and `ConvTranspose2d` layers over [`kiln_cpu::conv`].
use kiln_cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
    Conv2dParams, ConvGeometry,
};
use kiln_tensor::{Error, Result};

/// The state both convolution layers share.
#[derive(Clone, Debug)]
struct ConvState {
    /// `[C_out, C_in/G, kh, kw]` (conv) or `[C_in, C_out/G, kh, kw]` (transposed conv).
    weight: Vec<f32>,
    weight_shape: [usize; 4],
    bias: Option<Vec<f32>>,
    weight_grad: Vec<f32>,
    bias_grad: Option<Vec<f32>>,
    params: Conv2dParams,
    /// The last forward pass's input and geometry.
    saved: Option<(Vec<f32>, ConvGeometry)>,
}

impl ConvState {
    fn new(weight_shape: [usize; 4], bias_len: usize, bias: bool, params: Conv2dParams) -> Self {
        let n = weight_shape.iter().product();
        ConvState {
            weight: vec![0.0; n],
            weight_shape,
            bias: bias.then(|| vec![0.0; bias_len]),
            weight_grad: vec![0.0; n],
            bias_grad: bias.then(|| vec![0.0; bias_len]),
            params,
            saved: None,
        }
    }
    fn saved(&self) -> Result<&(Vec<f32>, ConvGeometry)> {
        self.saved
            .as_ref()
            .ok_or_else(|| Error::invalid("conv layer: backward before forward"))
    }
}

macro_rules! conv_layer {
    ($name:ident, $doc:literal, $geom:path, $fwd:path, $bwd:path) => {
        #[doc = $doc]
        #[derive(Clone, Debug)]
        pub struct $name {
            st: ConvState,
        }

        impl $name {
            /// The weight (PyTorch layout) and its gradient.
            pub fn weight(&self) -> &[f32] {
                &self.st.weight
            }
            pub fn weight_mut(&mut self) -> &mut [f32] {
                &mut self.st.weight
            }
            pub fn weight_shape(&self) -> [usize; 4] {
                self.st.weight_shape
            }
            pub fn weight_grad(&self) -> &[f32] {
                &self.st.weight_grad
            }
            pub fn bias(&self) -> Option<&[f32]> {
                self.st.bias.as_deref()
            }
            pub fn bias_mut(&mut self) -> Option<&mut [f32]> {
                self.st.bias.as_deref_mut()
            }
            pub fn bias_grad(&self) -> Option<&[f32]> {
                self.st.bias_grad.as_deref()
            }
            /// Parameters and their gradients, weight first, for an optimiser.
            pub fn params_and_grads(&mut self) -> Vec<(&mut [f32], &[f32])> {
                let mut v: Vec<(&mut [f32], &[f32])> =
                    vec![(&mut self.st.weight[..], &self.st.weight_grad[..])];
                if let (Some(b), Some(g)) = (self.st.bias.as_mut(), self.st.bias_grad.as_ref()) {
                    v.push((&mut b[..], &g[..]));
                }
                v
            }

            /// `x` `[N, C_in, H, W]` → `(y, y_shape)`; keeps `x` for the backward pass.
            pub fn forward(
                &mut self,
                x: &[f32],
                x_shape: [usize; 4],
            ) -> Result<(Vec<f32>, [usize; 4])> {
                let g = $geom(x_shape, self.st.weight_shape, &self.st.params)?;
                let mut y = vec![0f32; g.output_len()];
                $fwd(&g, x, &self.st.weight, self.st.bias.as_deref(), &mut y)?;
                self.st.saved = Some((x.to_vec(), g));
                Ok((y, g.output_shape()))
            }

            /// From `dy` (the output's shape): overwrites the weight and bias gradients and
            /// returns `dx` (the input's shape).
            pub fn backward(&mut self, dy: &[f32]) -> Result<Vec<f32>> {
                self.st.saved()?;
                let st = &mut self.st;
                let (x, g) = st.saved.as_ref().expect("checked above");
                let g = *g;
                let mut dx = vec![0f32; g.input_len()];
                $bwd(
                    &g,
                    x,
                    &st.weight,
                    dy,
                    Some(&mut dx),
                    Some(&mut st.weight_grad),
                    st.bias_grad.as_deref_mut(),
                )?;
                Ok(dx)
            }
        }
    };
}

conv_layer!(
    Conv2d,
    "A 2-D convolution: weight `[C_out, C_in/G, kh, kw]`, optional bias `[C_out]`.",
    ConvGeometry::conv2d,
    conv2d_forward,
    conv2d_backward
);
conv_layer!(
    ConvTranspose2d,
    "A 2-D transposed convolution: weight `[C_in, C_out/G, kh, kw]`, optional bias `[C_out]`.",
    ConvGeometry::conv_transpose2d,
    conv_transpose2d_forward,
    conv_transpose2d_backward
);

/// Both channel counts must split evenly into `groups > 0` groups.
fn check_groups(layer: &str, in_channels: usize, out_channels: usize, groups: usize) -> Result<()> {
    if groups == 0 || !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
        return Err(Error::invalid(format!(
            "{layer}: channels {in_channels}→{out_channels} do not divide into {groups} groups"
        )));
    }
    Ok(())
}

impl Conv2d {
    /// Zero-initialised parameters (the caller loads or initialises them).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        params: Conv2dParams,
        bias: bool,
    ) -> Result<Self> {
        check_groups("Conv2d", in_channels, out_channels, params.groups)?;
        let ws = [
            out_channels,
            in_channels / params.groups,
            kernel[0],
            kernel[1],
        ];
        Ok(Conv2d {
            st: ConvState::new(ws, out_channels, bias, params),
        })
    }
}

impl ConvTranspose2d {
    /// Zero-initialised parameters (the caller loads or initialises them).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        params: Conv2dParams,
        bias: bool,
    ) -> Result<Self> {
        check_groups("ConvTranspose2d", in_channels, out_channels, params.groups)?;
        let ws = [
            in_channels,
            out_channels / params.groups,
            kernel[0],
            kernel[1],
        ];
        Ok(ConvTranspose2d {
            st: ConvState::new(ws, out_channels, bias, params),
        })
    }
}
