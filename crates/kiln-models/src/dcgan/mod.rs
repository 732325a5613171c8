//! DCGAN: generator/discriminator pairs that map noise to 64×64 colour images, trained
//! adversarially — both architectures as layer chains on the op interface, PyTorch-compatible
//! checkpoints, and the training loop of the PyTorch DCGAN example.
//!
//! | module | what |
//! |---|---|
//! | [`model`] | the `dcgan` and `seed` architectures, init, `state_dict` checkpoints |
//! | [`train`] | one training step as the PyTorch example takes it, the run state, resume |
pub mod model;
pub mod train;

pub use model::{Arch, Discriminator, DiscriminatorSpec, Generator, GeneratorSpec, IMAGE_SIZE};
