//! `kiln gpt2 train`: pre-training or fine-tuning GPT-2 on text.
//!
//! The run folder is a Hub-layout model folder (`config.json`, `model.safetensors`,
//! `vocab.json`, `merges.txt`) plus `training_state.safetensors` (what `--resume` reads),
//! `tokens.safetensors` (the text's tokens, cached), `metrics.csv` (first columns
//! `step,loss,val_loss,lr,grad_norm,tokens_per_s`), `loss.png` and `samples.txt`.
use crate::plot::{render_png, Plot, Series};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_io::write_atomic;
use kiln_models::gpt2::run::{ModelSource, TextSource, TrainOptions, TrainRun, STATE_FILE};
use kiln_models::gpt2::train::AdamW;
use kiln_models::gpt2::Gpt2Config;
use kiln_nn::backend::{Backend, CpuBackend};
use kiln_tensor::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A UTF-8 text file, a folder of .txt files, or a safetensors file with tensor `tokens`
    /// `[steps, batch, seq + 1]` (used in order; batch and seq come from its shape).
    #[arg(long)]
    pub data: String,
    /// The run folder (a model folder `generate` and transformers load).
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this checkpoint folder (fine-tuning).
    #[arg(long, conflicts_with = "init")]
    pub model: Option<PathBuf>,
    /// Train a new model of this size from scratch: 124M, 355M, 774M, 1558M, mini (4 layers,
    /// width 128, 256 positions) or tiny.
    #[arg(long, value_name = "SIZE")]
    pub init: Option<String>,
    /// Optimiser steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Micro-batches per step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 6e-4, allow_negative_numbers = true)]
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (default: lr/10).
    #[arg(long, allow_negative_numbers = true)]
    pub min_lr: Option<f64>,
    /// Linear warmup steps (default: a tenth of the steps, at most 100).
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8, allow_negative_numbers = true)]
    pub eps: f64,
    /// Decoupled weight decay on matrices and embedding tables.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold (0: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub grad_clip: f64,
    /// Dropout at the embeddings and on the residual branches.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub dropout: f32,
    /// Fraction of the text held out for validation (its tail).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub val_fraction: f64,
    /// Validation loss every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Batches of the validation split each evaluation reads.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// A sample from --sample-prompt into samples.txt every N steps (and at the end).
    #[arg(long, default_value_t = 200)]
    pub sample_every: u64,
    #[arg(long, default_value = "\n")]
    pub sample_prompt: String,
    /// Tokens per sample.
    #[arg(long, default_value_t = 128)]
    pub sample_tokens: usize,
    /// Checkpoint every N steps (and at the end, and on Ctrl-C).
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Continue the run saved in --out (bit-identical to never having stopped).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this step (checkpoint written) although the schedule runs to --steps:
    /// training in slices, continued with --resume.
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<u64>,
    /// No progress bar (a line per evaluation instead).
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda", help = crate::device::HELP)]
    pub device: String,
}

/// The columns of `metrics.csv`.
const CSV_HEADER: &str = "step,loss,val_loss,lr,grad_norm,tokens_per_s,elapsed_s";

struct Row {
    step: u64,
    loss: f64,
    val: Option<f64>,
    line: String,
}

fn parse_row(line: &str) -> Option<Row> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() < 6 {
        return None;
    }
    Some(Row {
        step: f[0].parse().ok()?,
        loss: f[1].parse().ok()?,
        val: f[2].parse().ok(),
        line: line.to_string(),
    })
}

fn plot(path: &Path, rows: &[Row]) -> Result<()> {
    let p = Plot {
        title: "GPT-2 training".into(),
        x_label: "step".into(),
        y_label: "cross-entropy (nats/token)".into(),
        series: vec![
            Series {
                name: "train loss".into(),
                color: [31, 119, 180],
                points: rows.iter().map(|r| (r.step as f64, r.loss)).collect(),
            },
            Series {
                name: "validation loss".into(),
                color: [214, 39, 40],
                points: rows
                    .iter()
                    .filter_map(|r| r.val.map(|v| (r.step as f64, v)))
                    .collect(),
            },
        ],
        log_y: false,
        right: Vec::new(),
        right_label: String::new(),
    };
    render_png(&p, 960, 540, path)
}

pub fn run(a: TrainArgs) -> Result<()> {
    match crate::device::Device::parse(&a.device)?.cuda_backend()? {
        None => run_on(CpuBackend::default(), a),
        Some(be) => run_on(be, a),
    }
}

fn run_on<B: Backend>(be: B, a: TrainArgs) -> Result<()> {
    let model = match (&a.model, &a.init) {
        (Some(dir), _) => ModelSource::Checkpoint(dir.clone()),
        (None, Some(size)) => ModelSource::New(Gpt2Config::preset(size)?),
        (None, None) if a.resume => ModelSource::Checkpoint(a.out.clone()),
        (None, None) => {
            return Err(Error::invalid(
                "pass --model DIR (fine-tune a checkpoint) or --init SIZE (train from scratch)",
            ))
        }
    };
    if a.eval_every == 0 || a.sample_every == 0 || a.checkpoint_every == 0 {
        return Err(Error::invalid(
            "--eval-every, --sample-every and --checkpoint-every must be at least 1",
        ));
    }
    let opts = TrainOptions {
        data: TextSource::parse(&a.data),
        model,
        steps: a.steps,
        batch: a.batch,
        seq: a.seq,
        accum: a.accum,
        lr: a.lr,
        min_lr: a.min_lr.unwrap_or(a.lr / 10.0),
        warmup: a.warmup.unwrap_or((a.steps / 10).min(100)),
        adamw: AdamW {
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
            grad_clip: a.grad_clip,
        },
        dropout: a.dropout,
        val_fraction: a.val_fraction,
        seed: a.seed,
    };
    for (flag, v) in [("--beta1", a.beta1), ("--beta2", a.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::invalid(format!("{flag} {v} must be in [0, 1)")));
        }
    }
    for (flag, v) in [
        ("--eps", a.eps),
        ("--weight-decay", a.weight_decay),
        ("--grad-clip", a.grad_clip),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(Error::invalid(format!("{flag} {v} must be finite and ≥ 0")));
        }
    }
    let out = a.out.clone();
    let mut run = TrainRun::start(be, opts, &out, a.resume)?;
    let csv = out.join("metrics.csv");
    let mut rows: Vec<Row> = std::fs::read_to_string(&csv)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(parse_row)
        .filter(|r| r.step <= run.step())
        .collect();
    write_atomic(&csv, |w| {
        writeln!(w, "{CSV_HEADER}")?;
        for r in &rows {
            writeln!(w, "{}", r.line)?;
        }
        Ok(())
    })?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv)
        .map_err(|e| Error::io(&csv, e))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let cfg = run.trainer.config().clone();
    let (ntrain, nval) = run.split_sizes();
    eprintln!(
        "training GPT-2 ({} layers, width {}, {:.1}M parameters) on {} ({} + {} validation \
         tokens), {} tokens per step, {} steps, {} threads -> {}",
        cfg.n_layer,
        cfg.n_embd,
        cfg.num_params() as f64 / 1e6,
        a.data,
        ntrain,
        nval,
        run.tokens_per_step(),
        run.total_steps,
        rayon::current_num_threads(),
        out.display()
    );
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(run.total_steps);
        b.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
                .map_err(|e| Error::invalid(e.to_string()))?
                .progress_chars("=> "),
        );
        b.set_position(run.step());
        b
    };
    let start = Instant::now();
    let mut last_plot = Instant::now();
    let mut rate = 0.0;
    while !run.done() {
        let t = Instant::now();
        let (loss, lr, norm) = run.train_step()?;
        let tps = run.tokens_per_step() as f64 / t.elapsed().as_secs_f64().max(1e-9);
        rate = if rate == 0.0 {
            tps
        } else {
            0.9 * rate + 0.1 * tps
        };
        if !loss.is_finite() {
            bar.abandon();
            return Err(Error::invalid(format!(
                "training diverged at step {}: loss {loss} (try a lower --lr)",
                run.step()
            )));
        }
        let step = run.step();
        let last = run.done();
        let stopping = stop.load(Ordering::SeqCst) || a.stop_after.is_some_and(|s| step >= s);
        let val = if step % a.eval_every == 0 || last {
            run.val_loss(a.eval_batches)?
        } else {
            None
        };
        let line = format!(
            "{step},{loss},{},{lr:e},{norm},{tps:.1},{:.3}",
            val.map(|v| v.to_string()).unwrap_or_default(),
            start.elapsed().as_secs_f64()
        );
        writeln!(file, "{line}").map_err(|e| Error::io(&csv, e))?;
        rows.extend(parse_row(&line));
        bar.set_position(step);
        bar.set_message(format!(
            "loss {loss:.4}{} lr {lr:.2e} {rate:.0} tok/s",
            val.map(|v| format!(" val {v:.4}")).unwrap_or_default()
        ));
        if a.quiet && val.is_some() {
            eprintln!(
                "step {step}: loss {loss:.4} val {:.4} lr {lr:.2e} {rate:.0} tokens/s",
                val.unwrap_or(f32::NAN)
            );
        }
        if step % a.sample_every == 0 || last {
            let text = run.sample(&a.sample_prompt, a.sample_tokens, 0.8, step)?;
            let path = out.join("samples.txt");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            writeln!(f, "=== step {step} ===\n{}{}\n", a.sample_prompt, text)
                .map_err(|e| Error::io(&path, e))?;
        }
        if val.is_some() || last || stopping || last_plot.elapsed().as_secs() >= 10 {
            plot(&out.join("loss.png"), &rows)?;
            last_plot = Instant::now();
        }
        if step % a.checkpoint_every == 0 || last || stopping {
            file.flush().map_err(|e| Error::io(&csv, e))?;
            run.save(&out)?;
        }
        if stopping && !last {
            bar.abandon();
            eprintln!(
                "stopped at step {step}; checkpoint written. Continue with the same command and --resume."
            );
            return Ok(());
        }
    }
    bar.finish();
    if !out.join(STATE_FILE).exists() {
        run.save(&out)?;
    }
    eprintln!(
        "done: {} steps in {:.1} s -> {} (kiln gpt2 generate --model {} ...)",
        run.step(),
        start.elapsed().as_secs_f64(),
        out.display(),
        out.display()
    );
    Ok(())
}
