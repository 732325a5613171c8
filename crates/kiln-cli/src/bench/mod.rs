//! `kiln bench …`: kernel benchmarks.
//!
//! Every benchmark prints the same fields — `op`, `shape`, `dtype`, `threads`, `median_ms`,
//! `gflops` or `gbps`, `peak_fraction` — as a table row, or as one JSON object per line with
//! `--json`, so that one comparison script (`benches/compare/`) serves all kernels.
//! `--device cuda` runs the same benchmark on a GPU with kiln-cuda's kernels (`cuda.rs`).
use clap::Subcommand;
use kiln_tensor::Result;
use serde::Serialize;
use std::time::{Duration, Instant};

pub mod attention;
pub mod attention_train;
pub mod conv;
pub mod cuda;
pub mod dcgan;
pub mod gpt2_train;
pub mod matmul;
pub mod peak;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// This machine's FP32 FMA throughput and memory bandwidth: the ceilings of every figure.
    Peak(peak::PeakArgs),
    /// `C = A·B` (f32 A, f32/bf16/f16 B).
    Matmul(matmul::MatmulArgs),
    /// Scaled dot-product attention, prefill or KV-cache decode.
    Attention(attention::AttentionArgs),
    /// 2-D convolution.
    Conv2d(conv::ConvArgs),
    /// 2-D transposed convolution.
    #[command(name = "conv-transpose2d")]
    ConvTranspose2d(conv::ConvArgs),
    /// DCGAN: the generator's forward pass, or one full training iteration (`--train`).
    Dcgan(dcgan::DcganBenchArgs),
    /// One GPT-2 training step (forward, backward, AdamW) on random tokens.
    #[command(name = "gpt2-train")]
    Gpt2Train(gpt2_train::Gpt2TrainBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    use cuda::parse_device as on;
    match cmd {
        BenchCommand::Peak(args) => match on(&args.device)? {
            Some(d) => cuda::peak(&args, d),
            None => peak::run(args),
        },
        BenchCommand::Matmul(args) => match on(&args.device)? {
            Some(d) => cuda::matmul(&args, d),
            None => matmul::run(args),
        },
        BenchCommand::Attention(args) => match on(&args.device)? {
            Some(d) => cuda::attention(&args, d),
            None => attention::run(args),
        },
        BenchCommand::Conv2d(args) => match on(&args.device)? {
            Some(d) => cuda::conv(&args, false, d),
            None => conv::run(args, false),
        },
        BenchCommand::ConvTranspose2d(args) => match on(&args.device)? {
            Some(d) => cuda::conv(&args, true, d),
            None => conv::run(args, true),
        },
        BenchCommand::Dcgan(args) => dcgan::run(args),
        BenchCommand::Gpt2Train(args) => gpt2_train::run(args),
    }
}

/// One benchmark result.
#[derive(Serialize, Debug, Clone)]
pub struct BenchRecord {
    pub op: String,
    /// The problem shape, e.g. `[m, n, k]` for a matmul.
    pub shape: serde_json::Value,
    pub dtype: String,
    pub threads: usize,
    pub median_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// `gflops` over the measured FMA peak, or `gbps` over the measured memory bandwidth, for the
    /// same thread count.
    pub peak_fraction: f64,
    /// Anything else an op wants to report.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BenchRecord {
    /// Prints the record as one JSON line or one human-readable line.
    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string(self).expect("bench record serialises")
            );
        } else {
            let rate = match (self.gflops, self.gbps) {
                (Some(g), _) => format!("{g:9.1} GFLOP/s"),
                (None, Some(b)) => format!("{b:9.1} GB/s"),
                _ => String::new(),
            };
            println!(
                "{:<18} {:<24} {:<5} threads={} median={:.4} ms {} ({:.1}% of peak)",
                self.op,
                self.shape.to_string(),
                self.dtype,
                self.threads,
                self.median_ms,
                rate,
                100.0 * self.peak_fraction
            );
        }
    }
}

/// Times `f`: `warmup` untimed calls, then at least `min_reps` timed calls and at least
/// `min_time` in total; returns the median time of one call in milliseconds.
pub fn median_ms(warmup: usize, min_reps: usize, min_time: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_reps || start.elapsed() < min_time {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if times.len() >= 10_000 {
            break;
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// The number of cores (the thread count when `--threads` is not given).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift64*), for benchmark inputs.
pub fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Runs `f` on a rayon pool of `threads` threads (all cores when `None`).
pub fn with_threads<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        builder = builder.num_threads(t.max(1));
    }
    let pool = builder
        .build()
        .map_err(|e| kiln_tensor::Error::invalid(format!("thread pool: {e}")))?;
    Ok(pool.install(f))
}
