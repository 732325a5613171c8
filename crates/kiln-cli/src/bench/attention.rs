//! `kiln bench attention`: fused attention prefill (`Tq = Tk = seq`) or one KV-cache decode step
//! (one query per head over `seq` cached positions).
//!
//! Prefill reports GFLOP/s with `4·batch·heads·head_dim·pairs` flops, `pairs = seq²` (or
//! `seq·(seq+1)/2` causal); decode reports the GB/s of reading K and V from the cache.
use super::{median_ms, with_threads, BenchRecord};
use clap::Args;
use half::{bf16, f16};
use kiln_cpu::attention::{
    attention_cached, attention_forward, AttentionOptions, HeadsMut, HeadsRef, KvCache,
};
use kiln_tensor::{DType, Error, FloatElement, Result};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Sequence length (prefill) or number of cached positions (decode).
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    #[arg(long = "head-dim", default_value_t = 64)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Causal mask.
    #[arg(long)]
    pub causal: bool,
    /// One decode step against a KV cache of `seq` positions instead of a prefill.
    #[arg(long)]
    pub decode: bool,
    /// Training attention (causal, fused QKV layout): forward with log-sum-exp plus backward;
    /// GFLOP/s count the backward as 2.5× the forward's flops.
    #[arg(long)]
    pub backward: bool,
    /// Storage type of K and V: f32, bf16 or f16.
    #[arg(long = "kv-dtype", default_value = "f32")]
    pub kv_dtype: String,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Minimum measuring time per shape, in milliseconds.
    #[arg(long = "min-ms", default_value_t = 1000)]
    pub min_ms: u64,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu (default), or cuda / cuda:N (kiln-cuda's kernels on that GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: AttentionArgs) -> Result<()> {
    if args.seq == 0 || args.heads == 0 || args.head_dim == 0 || args.batch == 0 {
        return Err(Error::invalid(
            "bench attention: every size must be positive",
        ));
    }
    if args.backward {
        return super::attention_train::run(&args);
    }
    let dtype = DType::parse(&args.kv_dtype)
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            Error::invalid(format!(
                "bench attention: kv dtype `{}` (f32, bf16 or f16)",
                args.kv_dtype
            ))
        })?;
    let rec = match dtype {
        DType::BF16 => bench::<bf16>(&args)?,
        DType::F16 => bench::<f16>(&args)?,
        _ => bench::<f32>(&args)?,
    };
    rec.print(args.json);
    Ok(())
}

/// Deterministic values in [-1, 1).
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn fill_as<T: FloatElement>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            T::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

fn bench<T: FloatElement>(a: &AttentionArgs) -> Result<BenchRecord> {
    let (b, h, t, d) = (a.batch, a.heads, a.seq, a.head_dim);
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let min_time = Duration::from_millis(a.min_ms);
    let mut extra = serde_json::Map::new();
    let (op, ms, gflops, gbps) = if a.decode {
        let mut cache = KvCache::<T>::new(1, b, h, t, d)?;
        let k = fill(b * h * t * d, 1);
        let v = fill(b * h * t * d, 2);
        cache.append(
            0,
            HeadsRef::contiguous(&k[..], b, h, t, d),
            HeadsRef::contiguous(&v[..], b, h, t, d),
        )?;
        let q = fill(b * h * d, 3);
        let mut out = vec![0f32; b * h * d];
        let opts = AttentionOptions {
            causal: a.causal,
            ..Default::default()
        };
        let mut calls = 0usize;
        let cpu0 = process_cpu_s();
        let ms = with_threads(Some(threads), || {
            median_ms(3, 10, min_time, || {
                calls += 1;
                attention_cached(
                    HeadsRef::contiguous(&q[..], b, h, 1, d),
                    &cache,
                    0,
                    HeadsMut::contiguous(&mut out, b, h, 1, d),
                    opts,
                )
                .expect("attention decode");
            })
        })?;
        insert_cpu_ms(&mut extra, cpu0, calls);
        let bytes = 2.0 * (b * h * t * d * std::mem::size_of::<T>()) as f64;
        extra.insert("kv_bytes".into(), bytes.into());
        ("attention_decode", ms, None, Some(bytes / ms / 1e6))
    } else {
        // Generated straight into their storage type: no temporary copies, so that the peak
        // resident set is the tensors plus what the kernel itself allocates.
        let q = fill(b * h * t * d, 1);
        let k: Vec<T> = fill_as(b * h * t * d, 2);
        let v: Vec<T> = fill_as(b * h * t * d, 3);
        let mut out = vec![0f32; b * h * t * d];
        let opts = AttentionOptions {
            causal: a.causal,
            ..Default::default()
        };
        let mut calls = 0usize;
        let cpu0 = process_cpu_s();
        let ms = with_threads(Some(threads), || {
            median_ms(1, 3, min_time, || {
                calls += 1;
                attention_forward(
                    HeadsRef::contiguous(&q[..], b, h, t, d),
                    HeadsRef::contiguous(&k[..], b, h, t, d),
                    HeadsRef::contiguous(&v[..], b, h, t, d),
                    HeadsMut::contiguous(&mut out, b, h, t, d),
                    opts,
                )
                .expect("attention prefill");
            })
        })?;
        insert_cpu_ms(&mut extra, cpu0, calls);
        let pairs = if a.causal {
            (t * (t + 1) / 2) as f64
        } else {
            (t * t) as f64
        };
        let flops = 4.0 * (b * h * d) as f64 * pairs;
        let io_bytes =
            (2 * b * h * t * d * 4 + 2 * b * h * t * d * std::mem::size_of::<T>()) as f64;
        extra.insert("io_mib".into(), (io_bytes / (1u64 << 20) as f64).into());
        ("attention_prefill", ms, Some(flops / ms / 1e6), None)
    };
    if let Some(rss) = peak_rss_mib() {
        extra.insert("peak_rss_mib".into(), rss.into());
    }
    // Ceilings measured now, with the same thread count (`kiln bench peak`).
    let pk = kiln_cpu::peak::quick(threads);
    extra.insert("peak_gflops".into(), pk.fma_gflops(threads).into());
    extra.insert("peak_gbps".into(), pk.gbps(threads).into());
    let peak_fraction = match (gflops, gbps) {
        (Some(g), _) => g / pk.fma_gflops(threads),
        (_, Some(bw)) => bw / pk.gbps(threads),
        _ => 0.0,
    };
    Ok(BenchRecord {
        op: op.into(),
        shape: serde_json::json!({"batch": b, "heads": h, "seq": t, "head_dim": d, "causal": a.causal}),
        dtype: format!("f32/kv:{}", T::DTYPE.name()),
        threads,
        median_ms: ms,
        gflops,
        gbps,
        peak_fraction,
        extra,
    })
}

/// The process's peak resident set (VmHWM), in MiB (Linux only).
pub(super) fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user + system, all threads) of this process in seconds, from `/proc/self/stat`
/// (clock-tick resolution); `None` off Linux.
pub(super) fn process_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// `cpu_ms`: CPU time per call, averaged over every call (warm-up included). On a loaded
/// machine this is steadier than wall time; with several threads it sums over them.
pub(super) fn insert_cpu_ms(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    cpu0: Option<f64>,
    calls: usize,
) {
    if let (Some(c0), Some(c1)) = (cpu0, process_cpu_s()) {
        if calls > 0 {
            extra.insert("cpu_ms".into(), (1e3 * (c1 - c0) / calls as f64).into());
        }
    }
}
