//! Timing harness for the AMX bf16 GEMM (`kiln::cpu::gemm::amx`), driven by
//! `benches/compare/matmul_amx.py`, which runs PyTorch's bf16 matmul on the same shapes.
//!
//! ```sh
//! cargo run --release --example amx_bench            # all shapes, 1 and 2 threads
//! cargo run --release --example amx_bench -- --quick # fewer repetitions
//! cargo run --release --example amx_bench -- --emulated  # software tile model (no AMX needed;
//!                                                        # exercises the harness, times nothing useful)
//! ```
//!
//! Prints one JSON object per line: first `{"op":"amx_peak",...}` with the measured
//! `tdpbf16ps` ceiling of one core, then per shape and thread count
//! `{"op","shape":[m,n,k],"dtype","threads","median_ms","gflops","peak_fraction"}` for
//! `matmul_amx` (f32 A rounded while packing, B packed in the call) and `matmul_amx_prepacked`
//! (B packed once beforehand, as for weights). Without AMX (and without `--emulated`) it prints
//! `{"op":"amx_peak","skip":"..."}` and exits successfully.
use half::bf16;
use kiln::cpu::gemm::amx::{
    amx_unavailable_reason, gemm_bf16_amx_packed_with, gemm_bf16_amx_with, AmxConfig, AmxPackedB,
};
use kiln::cpu::gemm::{GemmOptions, MatMut, MatRef};
use serde_json::json;
use std::time::Instant;

/// (m, n, k): squares, then GPT-2's M = 128 projections ((K, N) = (768, 2304), (768, 3072),
/// (3072, 768), (768, 50257)).
const SHAPES: [(usize, usize, usize); 7] = [
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (4096, 4096, 4096),
    (128, 2304, 768),
    (128, 3072, 768),
    (128, 768, 3072),
    (128, 50257, 768),
];

/// Median wall time in ms of `f` after one warm-up call: at least `min_reps` runs and at least
/// `min_secs` seconds in all (at most 200 runs).
fn median_ms(min_reps: usize, min_secs: f64, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_reps || (start.elapsed().as_secs_f64() < min_secs && times.len() < 200)
    {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let emulated = args.iter().any(|a| a == "--emulated");
    let (min_reps, min_secs) = if quick { (3, 0.2) } else { (7, 1.0) };

    let (cfg, peak, dtype) = if emulated {
        (AmxConfig::emulated(), f64::NAN, "bf16-emulated")
    } else if let Some(cfg) = AmxConfig::native() {
        let peak = cfg
            .tiles
            .peak_gflops_one_core()
            .expect("native bf16 kernel available");
        (cfg, peak, "bf16")
    } else {
        let why = amx_unavailable_reason().unwrap_or("unknown");
        println!(
            "{}",
            json!({"op": "amx_peak", "skip": format!("no AMX ({why}) and no AVX512-BF16")})
        );
        return;
    };
    let kernel = cfg.tiles.name();
    println!(
        "{}",
        json!({"op": "amx_peak", "threads": 1, "gflops": peak, "dtype": dtype, "kernel": kernel})
    );

    let shapes: Vec<_> = if emulated {
        // The software model is ~1000x slower: small shapes only.
        vec![(128, 256, 256), (128, 768, 768)]
    } else {
        SHAPES.to_vec()
    };
    // Packing B alone (runs without AMX too): bytes read + written per second, into a fresh
    // buffer (`amx_pack_b_fresh`, page faults included: packing weights once) and into a
    // reused one (`amx_pack_b`: what `gemm_bf16_amx` does on every call).
    for &(k, n) in &[(768usize, 2304usize), (768, 50257), (4096, 4096)] {
        let b: Vec<bf16> = (0..k * n)
            .map(|i| bf16::from_f32(((i * 104729) % 2001) as f32 / 1000.0 - 1.0))
            .collect();
        let bv = MatRef::row_major(&b[..], k, n);
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let mut packed = AmxPackedB::pack_with(bv, cfg.pack).expect("pack B");
            let bytes = 2 * k * n + packed.size_bytes();
            let fresh = pool.install(|| {
                median_ms(min_reps, min_secs, || {
                    AmxPackedB::pack_with(bv, cfg.pack).expect("pack B");
                })
            });
            let reused = pool
                .install(|| median_ms(min_reps, min_secs, || packed.repack(bv).expect("pack B")));
            for (op, ms) in [("amx_pack_b_fresh", fresh), ("amx_pack_b", reused)] {
                println!(
                    "{}",
                    json!({
                        "op": op,
                        "shape": [k, n],
                        "dtype": "bf16",
                        "pack": format!("{:?}", cfg.pack),
                        "threads": threads,
                        "median_ms": ms,
                        "gbps": bytes as f64 / (ms * 1e-3) / 1e9,
                    })
                );
            }
        }
    }

    for &(m, n, k) in &shapes {
        // Values in [-1, 1); the timing does not depend on them.
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let b: Vec<bf16> = (0..k * n)
            .map(|i| bf16::from_f32(((i * 104729) % 2001) as f32 / 1000.0 - 1.0))
            .collect();
        let mut c = vec![0f32; m * n];
        let opts = GemmOptions::default();
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let av = MatRef::row_major(&a[..], m, k);
            let bv = MatRef::row_major(&b[..], k, n);
            let packed = AmxPackedB::pack_with(bv, cfg.pack).expect("pack B");
            let emit = |op: &str, ms: f64| {
                let gflops = flops / (ms * 1e-3) / 1e9;
                println!(
                    "{}",
                    json!({
                        "op": op,
                        "shape": [m, n, k],
                        "dtype": dtype,
                        "kernel": kernel,
                        "threads": threads,
                        "median_ms": ms,
                        "gflops": gflops,
                        "peak_fraction": gflops / (peak * threads as f64),
                    })
                );
            };
            let ms = pool.install(|| {
                median_ms(min_reps, min_secs, || {
                    let cv = MatMut::row_major(&mut c[..], m, n);
                    gemm_bf16_amx_with(&cfg, av, bv, cv, &opts).expect("gemm");
                })
            });
            emit("matmul_amx", ms);
            let ms = pool.install(|| {
                median_ms(min_reps, min_secs, || {
                    let cv = MatMut::row_major(&mut c[..], m, n);
                    gemm_bf16_amx_packed_with(&cfg, av, &packed, cv, &opts).expect("gemm");
                })
            });
            emit("matmul_amx_prepacked", ms);
        }
    }
}
