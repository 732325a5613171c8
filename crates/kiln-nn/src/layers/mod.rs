//! Layers: parameters with their gradients, and forward and backward side by side, written once
//! against the op interface ([`crate::backend::Backend`]) so that they run on every device.
//!
//! A layer does not keep its input: the model graph owns every activation (llm.c style) and
//! hands the forward pass's input back to `backward`. Shapes are NCHW `[N, C, H, W]` for the
//! image layers and `[rows, features]` for [`Linear`]. `backward` overwrites the layer's
//! parameter gradients, or adds to them with `accumulate` (PyTorch's `.grad` accumulation
//! across backward passes), and writes the input gradient when asked for.
pub mod batch_norm;
pub mod conv;
pub mod linear;
pub mod param;
pub mod sequential;

pub use batch_norm::BatchNorm2d;
pub use conv::Conv2d;
pub use linear::Linear;
pub use param::{Optimizer, Param};
pub use sequential::{Layer, Mode, Sequential};
