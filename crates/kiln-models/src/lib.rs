//! kiln-models: GPT-2 (with its byte-level BPE tokenizer) and DCGAN.
pub mod dcgan;
pub mod gpt2;
pub mod memory;
pub mod tokenizer;
