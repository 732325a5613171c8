//! kiln-tensor: dtypes, shapes and strides, storage (64-byte aligned owned buffers or bytes
//! borrowed from a memory map), the [`Tensor`] view type, and the engine's one [`Error`] type.
//!
//! Kernels do not take `Tensor`s: they take plain slices plus a [`Layout`] or explicit strides.
//! `Tensor` is how data arrives (from files, from users) and how it is described.
#[cfg(target_arch = "x86_64")]
mod convert_simd;
pub mod device;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod storage;
pub mod tensor;

pub use device::Device;
pub use dtype::{convert, DType, Element, FloatElement};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use layout::{Layout, Shape};
pub use storage::{AlignedBuffer, SharedBytes, Storage};
pub use tensor::Tensor;
