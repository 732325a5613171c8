//! `kiln bench peak`: this machine's FP32 FMA throughput and memory bandwidth, for one thread
//! and for `--threads` (default: all cores), and, where the CPU has native bf16 arithmetic (AMX
//! or AVX512-BF16), one core's bf16 product throughput. Every other benchmark divides by these.
use super::BenchRecord;
use clap::Args;
use kiln_cpu::gemm::amx;
use kiln_cpu::peak;
use kiln_tensor::Result;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct PeakArgs {
    /// Threads for the aggregate figures (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds of FMA chains per thread count.
    #[arg(long, default_value_t = 0.5)]
    pub seconds: f64,
    /// Triad passes (the best one is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu (default), or cuda / cuda:N (kiln-cuda's kernels on that GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: PeakArgs) -> Result<()> {
    let all = args.threads.unwrap_or_else(super::default_threads).max(1);
    let secs = Duration::from_secs_f64(args.seconds.clamp(0.01, 60.0));
    let len = peak::triad_len();
    let mut counts = vec![1];
    if all > 1 {
        counts.push(all);
    }
    for &t in &counts {
        let start = Instant::now();
        let g = peak::fma_gflops(t, secs);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        record(
            "fma",
            serde_json::json!([t]),
            t,
            ms,
            Some(g),
            None,
            peak::fma_isa(),
        )
        .print(args.json);
    }
    // Native bf16 arithmetic (the ceiling of bf16 × bf16 products), one core, where present.
    if let Some(kernel) = amx::best_native_kernel() {
        let start = Instant::now();
        let (g, isa) = (kernel.peak_gflops_one_core()?, kernel.name());
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let mut r = record(
            "bf16_peak",
            serde_json::json!([1]),
            1,
            ms,
            Some(g),
            None,
            isa,
        );
        r.dtype = "bf16".into();
        r.print(args.json);
    }
    for &t in &counts {
        let gbps = peak::triad_gbps(t, len, args.reps.max(1));
        let ms = (3 * 4 * len) as f64 / gbps / 1e6;
        record(
            "triad",
            serde_json::json!([len]),
            t,
            ms,
            None,
            Some(gbps),
            "f32",
        )
        .print(args.json);
    }
    Ok(())
}

fn record(
    op: &str,
    shape: serde_json::Value,
    threads: usize,
    median_ms: f64,
    gflops: Option<f64>,
    gbps: Option<f64>,
    isa: &str,
) -> BenchRecord {
    let mut extra = serde_json::Map::new();
    extra.insert("isa".into(), isa.into());
    BenchRecord {
        op: op.into(),
        shape,
        dtype: "f32".into(),
        threads,
        median_ms,
        gflops,
        gbps,
        peak_fraction: 1.0,
        extra,
    }
}
