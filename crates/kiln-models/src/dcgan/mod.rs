//! DCGAN: generator/discriminator pairs that map noise to 64×64 colour images, trained
//! adversarially — both architectures as layer chains on the op interface, PyTorch-compatible
//! checkpoints, the training loop of the PyTorch DCGAN example, data sets and a sample-quality
//! metric.
//!
//! | module | what |
//! |---|---|
//! | [`model`] | the `dcgan` and `seed` architectures, init, `state_dict` checkpoints |
//! | [`train`] | one training iteration as the PyTorch example takes it |
//! | [`run`] | a training run: data order, noise, quality figure, checkpoints, resume |
//! | [`data`] | the synthetic shapes set, image folders, safetensors image sets, the epoch shuffler |
//! | [`image`] | PNG/JPEG decoding, torchvision-style resize + centre crop, PNG grids |
//! | [`quality`] | the sliced Wasserstein distance between two image sets |
pub mod data;
pub mod image;
pub mod model;
pub mod quality;
pub mod run;
pub mod train;

pub use model::{Arch, Discriminator, DiscriminatorSpec, Generator, GeneratorSpec, IMAGE_SIZE};

/// Bytes a generator (and, for training, a discriminator) need at `batch` images: the weights
/// (with training: gradients and Adam's two moments too) and every layer's activations and
/// their gradients (D's twice: real and fake batches), f32. An estimate to refuse what cannot
/// fit before anything is allocated ([`crate::memory::check`]).
pub fn memory_need(
    g: &model::GeneratorSpec,
    d: Option<&model::DiscriminatorSpec>,
    batch: usize,
) -> u64 {
    let (gp, ga) = g.sizes();
    let (dp, da) = d.map_or((0, 0), |d| d.sizes());
    let copies = if d.is_some() { 4 } else { 1 };
    let b = batch as u64;
    let floats = copies * (gp + dp) + b * (2 * ga + 4 * da);
    floats.saturating_mul(4)
}
