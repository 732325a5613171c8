//! Normalisation kernels.
pub mod batch_norm;
pub mod layer_norm;
