//! `kiln bench matmul`: `C = A·B` with A `[m, k]` f32, B `[k, n]` in f32, bf16 or f16, C f32.
//!
//! `--layout` says how each operand is stored, as a training step sees it: `nn` (both
//! row-major, the default), `tn` (A is the transposed view of a row-major `[k, m]` array:
//! `dW = Xᵀ·dY`) or `nt` (B is the transposed view of a row-major `[n, k]` array: `dX = dY·Wᵀ`,
//! `x·wteᵀ`). `row` and `col` (B's layout) are aliases of `nn` and `nt`.
//!
//! Reports the median time, GFLOP/s (`2·m·n·k` flops) and the fraction of the measured FMA
//! peak for the same thread count; for `m = 1` (a decode step, bandwidth-bound) also GB/s of B
//! read per call and the fraction of the measured triad bandwidth. `--matmul-precision bf16`
//! times the native bf16 × bf16 product instead (AMX or AVX512-BF16, see `docs/gemm-amx.md`).
use super::{median_ms, random_f32, with_threads, BenchRecord};
use clap::Args;
use half::{bf16, f16};
use kiln_cpu::gemm::{amx, gemm_with_blocking, GemmOptions, Isa, MatMut, MatRef};
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
    /// Operand layouts: `nn` (A `[m, k]` and B `[k, n]` row-major), `tn` (A the transposed
    /// view of a row-major `[k, m]` array, as `Xᵀ` in `dW = Xᵀ·dY`) or `nt` (B the transposed
    /// view of a row-major `[n, k]` array, as `Wᵀ` in `dX = dY·Wᵀ` or `wteᵀ` in the logits).
    /// `row` and `col` (B's layout alone) are aliases of `nn` and `nt`.
    #[arg(long, default_value = "nn")]
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
    /// Other cache blocking than this machine's rules, for measuring: comma-separated
    /// `name=value` with names kc, mc, nc (general loop nest), small_kc, small_mc, slab (the
    /// small-M nest), e.g. `kc=512,mc=120`. The blocking used is in the JSON record.
    #[arg(long, value_name = "SIZES")]
    pub blocking: Option<String>,
    /// The batch-invariant product of a few rows (a batched decode step: every row bitwise
    /// its M = 1 product), as `kiln serve` runs it; `--m` at most 64.
    #[arg(long)]
    pub rows_invariant: bool,
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
    let layout = Layout::parse(&args.layout).ok_or_else(|| {
        Error::invalid(format!(
            "bench matmul: --layout must be nn, tn, nt, row or col, not {}",
            args.layout
        ))
    })?;
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
        Some(MatmulPrecision::Bf16) => return bench_native_bf16(&args, layout),
        None => {
            return Err(Error::invalid(format!(
                "bench matmul: --matmul-precision must be f32 or bf16, not {}",
                args.matmul_precision
            )))
        }
    }
    match args.dtype.to_ascii_lowercase().as_str() {
        "f32" => bench::<f32>(&args, isa, layout),
        "bf16" => bench::<bf16>(&args, isa, layout),
        "f16" => bench::<f16>(&args, isa, layout),
        other => Err(Error::invalid(format!(
            "bench matmul: --dtype must be f32, bf16 or f16, not {other}"
        ))),
    }
}

/// Which operands are transposed views of row-major arrays (`--layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// A `[m, k]`, B `[k, n]`, both row-major.
    Nn,
    /// A = the transpose of a row-major `[k, m]` array (column-major A), B row-major.
    Tn,
    /// A row-major, B = the transpose of a row-major `[n, k]` array (column-major B).
    Nt,
}

impl Layout {
    pub(crate) fn parse(s: &str) -> Option<Layout> {
        match s.to_ascii_lowercase().as_str() {
            "nn" | "row" => Some(Layout::Nn),
            "tn" => Some(Layout::Tn),
            "nt" | "col" => Some(Layout::Nt),
            _ => None,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Layout::Nn => "nn",
            Layout::Tn => "tn",
            Layout::Nt => "nt",
        }
    }
    /// B's own layout, the `layout` field's value since before `tn` existed.
    fn b_layout(self) -> &'static str {
        if self == Layout::Nt {
            "col"
        } else {
            "row"
        }
    }
    /// A's layout.
    fn a_layout(self) -> &'static str {
        if self == Layout::Tn {
            "col"
        } else {
            "row"
        }
    }
}

/// The JSON fields that describe the layouts: `layout` (B's: `row` or `col`, as before `tn`),
/// `a_layout` (`row` or `col`) and `layouts` (`nn`, `tn` or `nt`).
pub(crate) fn layout_fields(
    extra: &mut serde_json::Map<String, serde_json::Value>,
    layout: Layout,
) {
    extra.insert("layout".into(), layout.b_layout().into());
    extra.insert("a_layout".into(), layout.a_layout().into());
    extra.insert("layouts".into(), layout.name().into());
}

/// `cpu_ms` (CPU time of the whole process per call, all threads) and `gflops_per_cpu_s`
/// (`flops` per CPU-second): the figures to compare on a loaded machine, where wall time
/// counts the time other processes held the cores.
fn cpu_fields(extra: &mut serde_json::Map<String, serde_json::Value>, t: &Timing, flops: f64) {
    if let Some(cpu) = t.cpu_ms.filter(|&c| c > 0.0) {
        extra.insert("cpu_ms".into(), cpu.into());
        extra.insert(
            "gflops_per_cpu_s".into(),
            (flops / (cpu * 1e-3) / 1e9).into(),
        );
    }
}

/// `--matmul-precision bf16`: the native bf16 GEMM (`kiln_cpu::gemm::amx`), against one core's
/// measured bf16 throughput × threads.
fn bench_native_bf16(args: &MatmulArgs, layout: Layout) -> Result<()> {
    if args.blocking.is_some() {
        return Err(Error::invalid(
            "bench matmul: --blocking applies to the f32 GEMM, not --matmul-precision bf16",
        ));
    }
    if !args.dtype.eq_ignore_ascii_case("bf16") {
        return Err(Error::invalid(
            "bench matmul: --matmul-precision bf16 needs --dtype bf16",
        ));
    }
    let cfg = amx::AmxConfig::native().ok_or_else(|| {
        Error::invalid("bench matmul: --matmul-precision bf16 needs AMX or AVX512-BF16")
    })?;
    let (m, n, k) = (args.m, args.n, args.k);
    let timing = time_product::<bf16>(args, layout, |a, b, c, opts| {
        amx::gemm_bf16_amx_with(&cfg, a, b, c, opts)
    })?;
    let (threads, ms) = (timing.threads, timing.ms);
    let (kernel, peak_one) = (cfg.tiles.name(), cfg.tiles.peak_gflops_one_core()?);
    let gflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e9;
    let mut extra = serde_json::Map::new();
    extra.insert("matmul_precision".into(), "bf16".into());
    extra.insert("kernel".into(), kernel.into());
    layout_fields(&mut extra, layout);
    cpu_fields(&mut extra, &timing, 2.0 * (m * n * k) as f64);
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

/// What [`time_product`] measured: threads used, the median wall time of one call, and the
/// process's CPU time per call (all calls, warm-up included) where the OS tells it.
struct Timing {
    threads: usize,
    ms: f64,
    cpu_ms: Option<f64>,
}

/// The CPU time all threads of this process have run, in nanoseconds (Linux:
/// `/proc/self/task/*/schedstat`, whose first field is the time on a CPU). On a machine shared
/// with other work this, unlike wall time, leaves out the time other processes held the core.
fn process_cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Times `product(A, B, C, options)` on random operands of the arguments' shape: A `[m, k]` (or
/// the transpose of `[k, m]` with `tn`), B `[k, n]` of `TB` (or the transpose of `[n, k]` with
/// `nt`).
fn time_product<TB: FloatElement>(
    args: &MatmulArgs,
    layout: Layout,
    product: impl Fn(MatRef<'_, f32>, MatRef<'_, TB>, MatMut<'_>, &GemmOptions<'_>) -> Result<()> + Sync,
) -> Result<Timing> {
    let (m, n, k) = (args.m, args.n, args.k);
    let a = random_f32(m * k, 1);
    let b: Vec<TB> = random_f32(k * n, 2).into_iter().map(TB::from_f32).collect();
    let mut c = vec![0f32; m * n];
    let opts = GemmOptions {
        rows_invariant: args.rows_invariant,
        ..Default::default()
    };
    with_threads(args.threads, || {
        let threads = rayon::current_num_threads();
        let mut err = None;
        let mut calls = 0usize;
        let cpu0 = process_cpu_ns();
        let ms = median_ms(2, args.reps.max(1), Duration::from_millis(500), || {
            calls += 1;
            let av = if layout == Layout::Tn {
                MatRef::row_major(&a, k, m).t()
            } else {
                MatRef::row_major(&a, m, k)
            };
            let bv = if layout == Layout::Nt {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            let cv = MatMut::row_major(&mut c, m, n);
            if let Err(e) = product(av, bv, cv, &opts) {
                err = Some(e);
            }
        });
        let cpu_ms = cpu0
            .zip(process_cpu_ns())
            .map(|(t0, t1)| t1.saturating_sub(t0) as f64 * 1e-6 / calls.max(1) as f64);
        err.map_or(
            Ok(Timing {
                threads,
                ms,
                cpu_ms,
            }),
            Err,
        )
    })?
}

fn bench<TB: FloatElement>(args: &MatmulArgs, isa: Isa, layout: Layout) -> Result<()> {
    let (m, n, k) = (args.m, args.n, args.k);
    let (mr, nr) = isa.tile();
    let blk = match &args.blocking {
        Some(spec) => isa
            .blocking()
            .with_overrides(spec, mr, nr)
            .map_err(|e| Error::invalid(format!("bench matmul: --{e}")))?,
        None => isa.blocking(),
    };
    let timing = time_product::<TB>(args, layout, |a, b, c, opts| {
        gemm_with_blocking(isa, blk, a, b, c, opts)
    })?;
    let (threads, ms) = (timing.threads, timing.ms);
    let pk = peak::quick(threads);
    let gflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e9;
    let b_bytes = (k * n * std::mem::size_of::<TB>()) as f64;
    let gbps = b_bytes / (ms * 1e-3) / 1e9;
    let mut extra = serde_json::Map::new();
    extra.insert("isa".into(), isa.name().into());
    layout_fields(&mut extra, layout);
    if args.rows_invariant {
        extra.insert("rows_invariant".into(), true.into());
    }
    cpu_fields(&mut extra, &timing, 2.0 * (m * n * k) as f64);
    extra.insert(
        "blocking".into(),
        serde_json::json!({
            "mc": blk.mc, "kc": blk.kc, "nc": blk.nc,
            "small_mc": blk.small_mc, "small_kc": blk.small_kc, "slab": blk.slab,
        }),
    );
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

#[cfg(test)]
mod tests {
    use super::Layout;

    /// `nn`, `tn`, `nt`, and the older `row` / `col` (B's layout alone) as aliases.
    #[test]
    fn layouts_and_aliases() {
        for (s, want, b, a) in [
            ("nn", Layout::Nn, "row", "row"),
            ("row", Layout::Nn, "row", "row"),
            ("tn", Layout::Tn, "row", "col"),
            ("nt", Layout::Nt, "col", "row"),
            ("col", Layout::Nt, "col", "row"),
            ("NT", Layout::Nt, "col", "row"),
        ] {
            let l = Layout::parse(s).unwrap();
            assert_eq!(l, want, "{s}");
            assert_eq!((l.b_layout(), l.a_layout()), (b, a), "{s}");
        }
        for bad in ["tt", "", "column"] {
            assert!(Layout::parse(bad).is_none(), "{bad}");
        }
    }
}
