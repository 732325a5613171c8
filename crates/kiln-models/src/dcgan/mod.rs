//! DCGAN: data sets, image I/O and the sample-quality metric.
//!
//! | module | what |
//! |---|---|
//! | [`data`] | the synthetic shapes set, image folders, safetensors image sets, the epoch shuffler |
//! | [`image`] | PNG/JPEG decoding, torchvision-style resize + centre crop, PNG grids |
//! | [`quality`] | the sliced Wasserstein distance between two image sets |
pub mod data;
pub mod image;
pub mod quality;
