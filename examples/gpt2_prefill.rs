//! Prefill timing: one process, the same prompt's forward pass repeated, so first-use costs
//! (page faults of fresh buffers, thread start) are separated from the steady state.
//!
//! ```sh
//! cargo run --release --example gpt2_prefill -- MODEL_DIR [TOKENS] [REPEATS] [f32|bf16] [DTYPE]
//! ```
//!
//! `MODEL_DIR` as for `kiln gpt2 generate` (e.g. written by `kiln gpt2 init`); the fourth argument
//! is the matmul precision of bf16 weights, the fifth the weights' dtype in memory (f32, bf16 or
//! f16, as `--dtype`; default the checkpoint's). Prints the first and the median prefill in ms and
//! the rate in GFLOP/s of the linear layers (`2·T·params` of the blocks).
use kiln_models::gpt2::{Gpt2, LoadOptions, Logits, MatmulPrecision};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .ok_or("usage: gpt2_prefill MODEL_DIR [TOKENS] [REPEATS] [f32|bf16]")?;
    let tokens: usize = args.get(1).map_or(Ok(128), |s| s.parse())?;
    let repeats: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let precision = match args.get(3) {
        Some(s) => MatmulPrecision::parse(s).ok_or("precision: f32 or bf16")?,
        None => MatmulPrecision::F32,
    };
    let dtype = match args.get(4) {
        Some(s) => Some(kiln_tensor::DType::parse(s).ok_or("dtype: f32, bf16 or f16")?),
        None => None,
    };
    let gpt2 = Gpt2::load(
        dir,
        &LoadOptions {
            matmul_precision: precision,
            dtype,
            ..Default::default()
        },
    )?;
    let ids: Vec<u32> = (0..tokens as u32).map(|i| 31373 + i % 7).collect();
    let mut state = gpt2.model.new_state(tokens)?;
    let mut logits = Vec::new();
    let mut times = Vec::new();
    for _ in 0..repeats.max(1) {
        state.clear();
        let t = Instant::now();
        gpt2.model
            .forward(&ids, &mut state, Logits::Last, &mut logits)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let first = times[0];
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let cfg = &gpt2.model.config;
    let block_params = cfg.n_layer * 12 * cfg.n_embd * cfg.n_embd;
    let gflops = 2.0 * tokens as f64 * block_params as f64 / (median * 1e-3) / 1e9;
    println!(
        "{{\"tokens\":{tokens},\"dtype\":\"{}\",\"precision\":\"{}\",\"threads\":{},\"first_ms\":{first:.2},\"median_ms\":{median:.2},\"linear_gflops\":{gflops:.1}}}",
        dtype.map_or("file", |d| d.name()),
        precision.name(),
        rayon::current_num_threads()
    );
    Ok(())
}
