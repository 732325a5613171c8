//! kiln: a from-scratch tensor and kernel engine.
//!
//! This facade re-exports the workspace crates so an embedding program needs one dependency:
//!
//! | module | crate | what it holds |
//! |---|---|---|
//! | [`tensor`] | `kiln-tensor` | dtypes, shapes and strides, storage (aligned or memory-mapped), the error type |
//! | [`io`] | `kiln-io` | safetensors reading (mmap or plain read) and atomic writing |
//! | [`cpu`] | `kiln-cpu` | CPU kernels: GEMM, attention, convolution, normalisation, element-wise ops |
//! | [`nn`] | `kiln-nn` | layers with forward and backward, losses, optimisers |
//! | [`models`] | `kiln-models` | GPT-2 (with its tokenizer) and DCGAN |
pub use kiln_cpu as cpu;
pub use kiln_io as io;
pub use kiln_models as models;
pub use kiln_nn as nn;
pub use kiln_tensor as tensor;

pub use kiln_tensor::{DType, Device, Error, Layout, Result, Shape, Tensor};
