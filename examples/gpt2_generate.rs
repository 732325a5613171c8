//! Using kiln's GPT-2 from a program: load a checkpoint folder, tokenize, and generate with a
//! callback that receives every token as it is produced.
//!
//! ```sh
//! cargo run --release --example gpt2_generate -- [MODEL_DIR] [PROMPT]
//! ```
//!
//! `MODEL_DIR` is a folder as the Hub has it (`config.json`, `model.safetensors`, `vocab.json`,
//! `merges.txt`), e.g. a download of `openai-community/gpt2` or one written by
//! `kiln gpt2 init`; it defaults to the small test checkpoint in `tests/fixtures/gpt2`.
use kiln_models::gpt2::{GenerateOptions, Gpt2, LoadOptions, SamplerConfig};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt2").into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".into());

    // Weights stay in the checkpoint's dtype and are used straight from the memory map.
    let gpt2 = Gpt2::load(&dir, &LoadOptions::default())?;
    println!("prompt ids: {:?}", gpt2.encode(&prompt, false));

    let opts = GenerateOptions {
        max_new_tokens: 24,
        // Top-k / top-p sampling with a fixed seed: the same text on every run.
        sampler: SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
            ..Default::default()
        },
        ..Default::default()
    };
    print!("{prompt}");
    let out = gpt2.generate(&prompt, &opts, |_id, text| {
        print!("{text}");
        let _ = std::io::stdout().flush();
        true // return false to stop early
    })?;
    println!();
    println!(
        "{} new tokens ({:?}); load {:.0} ms, prefill {:.1} ms, decode {:.1} tokens/s",
        out.ids.len(),
        out.stop,
        gpt2.load_ms,
        out.prefill_ms,
        out.decode_tokens_per_s()
    );
    Ok(())
}
