//! GPT-2: config, weights from memory-mapped safetensors, the forward pass with a KV cache,
//! sampling, generation, and random checkpoints in the Hub's layout.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | `config.json` (unknown fields ignored), validation, the released sizes |
//! | [`weights`] | tensor names with or without `transformer.`, shape checks, dtype choice |
//! | [`model`] | pre-LN blocks, prefill in one pass, decode against the KV cache, logits |
//! | [`sampler`] | greedy, temperature, top-k, top-p, repetition penalty, seeded RNG |
//! | [`generate`] | load a folder, tokenize, generate with a callback per token |
//! | [`init`] | a random checkpoint folder (GPT-2's own init) |
pub mod config;
pub mod generate;
pub mod init;
pub mod model;
pub mod run;
pub mod sampler;
pub mod train;
pub mod weights;

pub use config::Gpt2Config;
pub use generate::{
    generate_batch_ids, generate_ids, ContextPolicy, GenerateOptions, Generation, Gpt2,
    LoadOptions, MatmulPrecision, StopReason, TextStream, EOT,
};
pub use init::init_checkpoint;
pub use model::{Gpt2Model, Gpt2State, Logits};
pub use sampler::{argmax, Rng, Sampler, SamplerConfig};
pub use weights::{BlockWeights, Gpt2Weights};
