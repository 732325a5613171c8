//! Element-wise and row-wise kernels.
pub mod activations;
pub mod add;
pub mod cross_entropy;
pub mod embedding;
pub mod gelu;
pub mod softmax;
