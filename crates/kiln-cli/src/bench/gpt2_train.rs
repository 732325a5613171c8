//! `kiln bench gpt2-train`: one full GPT-2 training step (forward, backward, AdamW) on random
//! tokens, timed. FLOPs are counted as `6 · P · tokens` (P parameters without the position
//! table; the attention's own `T²` terms are left out, as llm.c and nanoGPT count them).
use super::dcgan::peak_rss_mib;
use super::{median_ms, with_threads, BenchRecord};
use clap::Args;
use kiln_models::gpt2::train::{from_tensors, AdamW, Gpt2Trainer};
use kiln_models::gpt2::{Gpt2Config, Gpt2Model, Rng};
use kiln_nn::backend::CpuBackend;
use kiln_tensor::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct Gpt2TrainBenchArgs {
    /// A checkpoint folder (its config and weights).
    #[arg(long, conflicts_with = "size")]
    pub model: Option<PathBuf>,
    /// A model shape with random weights: 124M, 355M, mini, tiny, …
    #[arg(long)]
    pub size: Option<String>,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Minimum measuring time, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub min_time: f64,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Gpt2TrainBenchArgs) -> Result<()> {
    let cfg = match (&args.model, &args.size) {
        (Some(dir), _) => Gpt2Config::from_file(&dir.join("config.json"))?,
        (None, Some(size)) => Gpt2Config::preset(size)?,
        (None, None) => Gpt2Config::preset("124M")?,
    };
    if args.batch == 0 || args.seq == 0 || args.seq > cfg.n_positions {
        return Err(Error::invalid(format!(
            "--batch must be ≥ 1 and --seq in 1..={}",
            cfg.n_positions
        )));
    }
    kiln_models::memory::check(
        kiln_models::gpt2::run::training_bytes(&cfg, args.batch, args.seq),
        &format!("a step at --batch {} × --seq {}", args.batch, args.seq),
        "use a smaller --batch or a shorter --seq",
    )?;
    let threads = args.threads.unwrap_or_else(super::default_threads);
    let record = with_threads(Some(threads), || -> Result<BenchRecord> {
        let be = CpuBackend::default();
        let mut rng = Rng::new(1);
        let weights = match &args.model {
            Some(dir) => {
                let st = kiln_io::SafeTensors::open(dir.join("model.safetensors"))?;
                from_tensors(&be, &cfg, |name, _| {
                    let full = if st.contains(name) {
                        name.to_string()
                    } else {
                        format!("transformer.{name}")
                    };
                    st.tensor(&full)?.to_f32_vec()
                })?
            }
            None => from_tensors(&be, &cfg, |name, shape| {
                let n: usize = shape.iter().product();
                Ok(if name.ends_with(".weight") && shape.len() == 1 {
                    vec![1.0; n]
                } else {
                    (0..n).map(|_| (0.02 * rng.next_normal()) as f32).collect()
                })
            })?,
        };
        let model = Gpt2Model::with_backend(cfg.clone(), weights, be)?;
        let mut trainer = Gpt2Trainer::new(model)?;
        let (b, t) = (args.batch, args.seq);
        let tokens: Vec<u32> = (0..b * (t + 1))
            .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
            .collect();
        let opt = AdamW::default();
        let mut err = None;
        let ms = median_ms(1, 3, Duration::from_secs_f64(args.min_time), || {
            let r = trainer
                .zero_grads()
                .and_then(|_| trainer.forward_backward(&tokens, b, t, 1.0, 0))
                .and_then(|_| trainer.step(3e-4, &opt));
            if let Err(e) = r {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        let params = (cfg.num_params() - cfg.n_positions * cfg.n_embd) as f64;
        let n_tokens = (b * t) as f64;
        let gflops = 6.0 * params * n_tokens / (ms * 1e6);
        let peak = kiln_cpu::peak::quick(threads).fma_gflops(threads);
        let mut extra = serde_json::Map::new();
        extra.insert("tokens_per_s".into(), (n_tokens / (ms / 1e3)).into());
        extra.insert("params".into(), cfg.num_params().into());
        if let Some(rss) = peak_rss_mib() {
            extra.insert("peak_rss_mib".into(), rss.into());
        }
        Ok(BenchRecord {
            op: "gpt2_train_step".into(),
            shape: serde_json::json!([b, t, cfg.n_layer, cfg.n_embd]),
            dtype: "f32".into(),
            threads,
            median_ms: ms,
            gflops: Some(gflops),
            gbps: None,
            peak_fraction: gflops / peak,
            extra,
        })
    })??;
    record.print(args.json);
    Ok(())
}
