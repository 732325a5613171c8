//! `kiln bench matmul`: `C = A·B` with A `[m, k]` f32, B `[k, n]` in f32, bf16 or f16, C f32.
//!
//! Reports the median time, GFLOP/s (`2·m·n·k` flops) and the fraction of the measured FMA
//! peak for the same thread count; for `m = 1` (a decode step, bandwidth-bound) also GB/s of B
//! read per call and the fraction of the measured triad bandwidth. `--matmul-precision bf16`
//! times the native bf16 × bf16 product instead (AMX or AVX512-BF16, see `docs/gemm-amx.md`).
use super::{median_ms, random_f32, with_threads, BenchRecord};
use clap::Args;
use half::{bf16, f16};
use kiln_cpu::gemm::{amx, gemm_with_isa, GemmOptions, Isa, MatMut, MatRef};
use kiln_cpu::peak;
use kiln_nn::backend::MatmulPrecision;
use kiln_tensor::{Error, FloatElement, Result};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MatmulArgs {
    #[arg(long)]
    pub m: usize,
    #[arg(long)]
    pub n: usize,
    #[arg(long)]
    pub k: usize,
    /// B's dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// B's layout: `row` (`[k, n]` row-major, a Conv1D weight) or `col` (`[n, k]` row-major
    /// viewed transposed, as `x·wteᵀ` for the logits).
    #[arg(long, default_value = "row")]
    pub layout: String,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Minimum timed repetitions (after warm-up); timing also runs for at least 0.5 s.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Microkernel: avx512, avx2, portable or scalar (default: the fastest available).
    #[arg(long)]
    pub isa: Option<String>,
    /// Arithmetic: f32 (default), or bf16 — A rounded to bf16 and the product on the CPU's
    /// native bf16 arithmetic (AMX tiles, else AVX512-BF16), B packed in every call; needs
    /// `--dtype bf16` and such a CPU. The fraction is then of the measured bf16 peak.
    #[arg(long, value_name = "f32|bf16", default_value = "f32")]
    pub matmul_precision: String,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu (default), or cuda / cuda:N (kiln-cuda's kernels on that GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: MatmulArgs) -> Result<()> {
    let isa = match &args.isa {
        Some(s) => Isa::parse(s)
            .ok_or_else(|| Error::invalid(format!("bench matmul: unknown --isa {s}")))?,
        None => Isa::best(),
    };
    if !isa.is_available() {
        return Err(Error::invalid(format!(
            "bench matmul: this CPU cannot run --isa {}",
            isa.name()
        )));
    }
    let col = match args.layout.as_str() {
        "row" => false,
        "col" => true,
        other => {
            return Err(Error::invalid(format!(
                "bench matmul: --layout must be row or col, not {other}"
            )))
        }
    };
    if args.m == 0 || args.n == 0 || args.k == 0 {
        return Err(Error::invalid(
            "bench matmul: --m, --n and --k must be at least 1",
        ));
    }
    let elems = args
        .m
        .checked_mul(args.k)
        .and_then(|a| args.k.checked_mul(args.n).map(|b| a.max(b)))
        .filter(|&e| e <= 1 << 31)
        .ok_or_else(|| Error::invalid("bench matmul: operands too large"))?;
    let _ = elems;
    match MatmulPrecision::parse(&args.matmul_precision) {
        Some(MatmulPrecision::F32) => {}
        Some(MatmulPrecision::Bf16) => return bench_native_bf16(&args, col),
        None => {
            return Err(Error::invalid(format!(
                "bench matmul: --matmul-precision must be f32 or bf16, not {}",
                args.matmul_precision
            )))
        }
    }
    match args.dtype.to_ascii_lowercase().as_str() {
        "f32" => bench::<f32>(&args, isa, col),
        "bf16" => bench::<bf16>(&args, isa, col),
        "f16" => bench::<f16>(&args, isa, col),
        other => Err(Error::invalid(format!(
            "bench matmul: --dtype must be f32, bf16 or f16, not {other}"
        ))),
    }
}

/// `--matmul-precision bf16`: the native bf16 GEMM (`kiln_cpu::gemm::amx`), against one core's
/// measured bf16 throughput × threads.
fn bench_native_bf16(args: &MatmulArgs, col: bool) -> Result<()> {
    if !args.dtype.eq_ignore_ascii_case("bf16") {
        return Err(Error::invalid(
            "bench matmul: --matmul-precision bf16 needs --dtype bf16",
        ));
    }
    let cfg = amx::AmxConfig::native().ok_or_else(|| {
        Error::invalid("bench matmul: --matmul-precision bf16 needs AMX or AVX512-BF16")
    })?;
    let (m, n, k) = (args.m, args.n, args.k);
    let (threads, ms) = time_product::<bf16>(args, col, |a, b, c, opts| {
        amx::gemm_bf16_amx_with(&cfg, a, b, c, opts)
    })?;
    let (kernel, peak_one) = (cfg.tiles.name(), cfg.tiles.peak_gflops_one_core()?);
    let gflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e9;
    let mut extra = serde_json::Map::new();
    extra.insert("matmul_precision".into(), "bf16".into());
    extra.insert("kernel".into(), kernel.into());
    extra.insert("layout".into(), if col { "col" } else { "row" }.into());
    extra.insert("peak_gflops".into(), (peak_one * threads as f64).into());
    BenchRecord {
        op: "matmul".into(),
        shape: serde_json::json!([m, n, k]),
        dtype: "bf16".into(),
        threads,
        median_ms: ms,
        gflops: Some(gflops),
        gbps: None,
        peak_fraction: gflops / (peak_one * threads as f64),
        extra,
    }
    .print(args.json);
    Ok(())
}

/// Threads used and the median ms of `product(A, B, C, options)` on random operands of the
/// arguments' shape (B `[k, n]` of `TB`, or its `[n, k]` transpose with `col`).
fn time_product<TB: FloatElement>(
    args: &MatmulArgs,
    col: bool,
    product: impl Fn(MatRef<'_, f32>, MatRef<'_, TB>, MatMut<'_>, &GemmOptions<'_>) -> Result<()> + Sync,
) -> Result<(usize, f64)> {
    let (m, n, k) = (args.m, args.n, args.k);
    let a = random_f32(m * k, 1);
    let b: Vec<TB> = random_f32(k * n, 2).into_iter().map(TB::from_f32).collect();
    let mut c = vec![0f32; m * n];
    let opts = GemmOptions::default();
    with_threads(args.threads, || {
        let threads = rayon::current_num_threads();
        let mut err = None;
        let ms = median_ms(2, args.reps.max(1), Duration::from_millis(500), || {
            let bv = if col {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            let cv = MatMut::row_major(&mut c, m, n);
            if let Err(e) = product(MatRef::row_major(&a, m, k), bv, cv, &opts) {
                err = Some(e);
            }
        });
        err.map_or(Ok((threads, ms)), Err)
    })?
}

fn bench<TB: FloatElement>(args: &MatmulArgs, isa: Isa, col: bool) -> Result<()> {
    let (m, n, k) = (args.m, args.n, args.k);
    let (threads, ms) =
        time_product::<TB>(args, col, |a, b, c, opts| gemm_with_isa(isa, a, b, c, opts))?;
    let pk = peak::quick(threads);
    let gflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e9;
    let b_bytes = (k * n * std::mem::size_of::<TB>()) as f64;
    let gbps = b_bytes / (ms * 1e-3) / 1e9;
    let mut extra = serde_json::Map::new();
    extra.insert("isa".into(), isa.name().into());
    extra.insert("layout".into(), if col { "col" } else { "row" }.into());
    extra.insert("peak_gflops".into(), pk.fma_gflops(threads).into());
    extra.insert("peak_gbps".into(), pk.gbps(threads).into());
    let (gbps_field, fraction) = if m == 1 {
        extra.insert("gflops_m1".into(), gflops.into());
        (Some(gbps), gbps / pk.gbps(threads))
    } else {
        (None, gflops / pk.fma_gflops(threads))
    };
    BenchRecord {
        op: "matmul".into(),
        shape: serde_json::json!([m, n, k]),
        dtype: TB::DTYPE.name().into(),
        threads,
        median_ms: ms,
        gflops: if m == 1 { None } else { Some(gflops) },
        gbps: gbps_field,
        peak_fraction: fraction,
        extra,
    }
    .print(args.json);
    Ok(())
}
