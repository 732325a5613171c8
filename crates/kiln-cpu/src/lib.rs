//! kiln-cpu: CPU kernels on plain slices plus shapes and strides.
//!
//! | module | kernels |
//! |---|---|
//! | [`gemm`] | `C = alpha·A·B + beta·C`: packing, cache blocking, SIMD microkernels, threads |
//!
//! Every kernel is a plain function documented with its shapes and layouts, tested against a
//! naive f64 twin; SIMD variants are chosen once per process by run-time feature detection.
pub mod gemm;
