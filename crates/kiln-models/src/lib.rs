//! kiln-models: GPT-2 and DCGAN.
