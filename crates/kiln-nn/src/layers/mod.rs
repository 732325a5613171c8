//! Layers: parameters, saved activations, and forward and backward side by side.
//!
//! Tensors are plain `Vec<f32>` in NCHW with an explicit `[N, C, H, W]` shape. `forward` saves
//! what `backward` needs; `backward` takes the output gradient, overwrites the layer's parameter
//! gradients and returns the input gradient.
pub mod activation;
pub mod batch_norm;
pub mod conv;

pub use activation::ActivationLayer;
pub use batch_norm::BatchNorm2d;
pub use conv::{Conv2d, ConvTranspose2d};
