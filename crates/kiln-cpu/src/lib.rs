//! kiln-cpu: CPU kernels on plain slices plus shapes and strides.
//!
//! | module | kernels |
//! |---|---|
//! | [`gemm`] | `C = alpha·A·B + beta·C`: packing, cache blocking, SIMD microkernels, threads |
//! | [`attention`] | fused online-softmax attention, KV-cache decode, training forward/backward |
//! | [`conv`] | conv2d and conv-transpose2d, forward and backward |
//! | [`norm`] | layer norm, batch norm |
//! | [`elementwise`] | GELU, activations, softmax, cross-entropy, add, embedding gather |
//! | [`peak`] | this machine's FMA and memory-bandwidth ceilings |
//!
//! Every kernel is a plain function documented with its shapes and layouts, tested against a
//! naive f64 twin; SIMD variants are chosen once per process by run-time feature detection.
//! Kernels run on the caller's rayon pool and split work so that results are bitwise identical
//! for any thread count.
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod norm;
pub mod peak;
