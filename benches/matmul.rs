//! Criterion benchmark of `C = A·B`: kiln side by side with the `gemm` and `matrixmultiply`
//! crates in the same group, on square sizes and GPT-2 shapes, at 1 and 2 threads; with bf16
//! weights kept in f32 arithmetic (`bf16_weights`) and, where the CPU has native bf16
//! arithmetic (AMX or AVX512-BF16), as bf16 × bf16 products (`bf16_products`).
//!
//! The operand layouts of training run too, in groups named `t{threads}/matmul_{layout}_{m}x{n}x{k}`:
//! `tn` (A the transposed view of a row-major `[k, m]` array: `dW = Xᵀ·dY`) and `nt` (B the
//! transposed view of a row-major `[n, k]` array: `dX = dY·Wᵀ`, a conv weight gradient's
//! `dy·colᵀ`), each peer given the same strided operands.
//!
//! `cargo bench --bench matmul` (all), `cargo bench --bench matmul -- 't1/'` (one thread only),
//! `cargo bench --bench matmul -- '_tn_|_nt_'` (the transposed layouts only).
//! Throughput is reported in elements = flops (`2·m·n·k`), so criterion's "elem/s" is FLOP/s.
//! `matrixmultiply` runs single-threaded (its thread count is fixed per process by
//! `MATMUL_NUM_THREADS`, which this bench sets to 1).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use kiln_cpu::gemm::{amx, gemm, gemm_bf16_compute, GemmOptions, MatMut, MatRef, AMX_MIN_M};
use std::time::Duration;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn pool(t: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .expect("thread pool")
}

/// (m, n, k) shapes: squares, GPT-2 124M projections at a 128-token prefill, and decode (m = 1).
const SHAPES: &[(usize, usize, usize)] = &[
    (256, 256, 256),
    (512, 512, 512),
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (128, 2304, 768),
    (128, 3072, 768),
    (128, 768, 3072),
    (1, 2304, 768),
    (1, 768, 3072),
];

/// Operand layouts: `"nn"` (both row-major), `"tn"` (A column-major), `"nt"` (B column-major).
type Layout = &'static str;

/// (m, n, k, layout) of a backward pass: GPT-2 124M's `c_fc` and `c_attn` at 256 tokens (dW =
/// Xᵀ·dY is `tn`, dX = dY·Wᵀ is `nt`) and the DCGAN weight gradient of D2/G4 (`dy·colᵀ`, one
/// 4096-pixel chunk).
const TRAIN_SHAPES: &[(usize, usize, usize, Layout)] = &[
    (768, 3072, 256, "tn"),
    (256, 768, 3072, "nt"),
    (768, 2304, 256, "tn"),
    (256, 768, 2304, "nt"),
    (128, 1024, 4096, "nt"),
];

/// Element strides `(row, col)` of A `[m, k]` and B `[k, n]` in `layout`.
fn strides(m: usize, n: usize, k: usize, layout: Layout) -> ((usize, usize), (usize, usize)) {
    let a = if layout == "tn" { (1, m) } else { (k, 1) };
    let b = if layout == "nt" { (1, k) } else { (n, 1) };
    (a, b)
}

fn bench_matmul(c: &mut Criterion) {
    // SAFETY (edition 2021: a safe call): set before matrixmultiply's first use.
    std::env::set_var("MATMUL_NUM_THREADS", "1");
    for threads in [1usize, 2] {
        let p = pool(threads);
        let shapes = SHAPES
            .iter()
            .map(|&(m, n, k)| (m, n, k, "nn"))
            .chain(TRAIN_SHAPES.iter().copied());
        for (m, n, k, layout) in shapes {
            let name = if layout == "nn" {
                format!("t{threads}/matmul_{m}x{n}x{k}")
            } else {
                format!("t{threads}/matmul_{layout}_{m}x{n}x{k}")
            };
            let ((ars, acs), (brs, bcs)) = strides(m, n, k, layout);
            let mut g = c.benchmark_group(name);
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            g.sample_size(10);
            g.warm_up_time(Duration::from_millis(300));
            g.measurement_time(Duration::from_secs(1));
            let a = random(m * k, 1);
            let b = random(k * n, 2);
            let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut out = vec![0f32; m * n];
            g.bench_function(BenchmarkId::new("kiln", "f32"), |bn| {
                p.install(|| {
                    bn.iter(|| {
                        gemm(
                            MatRef::strided(&a, m, k, ars, acs),
                            MatRef::strided(&b, k, n, brs, bcs),
                            MatMut::row_major(&mut out, m, n),
                            &GemmOptions::default(),
                        )
                        .expect("gemm")
                    })
                })
            });
            g.bench_function(BenchmarkId::new("kiln", "bf16_weights"), |bn| {
                p.install(|| {
                    bn.iter(|| {
                        gemm(
                            MatRef::strided(&a, m, k, ars, acs),
                            MatRef::strided(&bh, k, n, brs, bcs),
                            MatMut::row_major(&mut out, m, n),
                            &GemmOptions::default(),
                        )
                        .expect("gemm")
                    })
                })
            });
            // bf16 × bf16 on the CPU's native bf16 arithmetic (AMX, else AVX512-BF16), where
            // present: A rounded to bf16, B packed in the call (`gemm_bf16_compute`, m ≥ 16).
            if m >= AMX_MIN_M && amx::best_native_kernel().is_some() {
                g.bench_function(BenchmarkId::new("kiln", "bf16_products"), |bn| {
                    p.install(|| {
                        bn.iter(|| {
                            gemm_bf16_compute(
                                MatRef::strided(&a, m, k, ars, acs),
                                MatRef::strided(&bh, k, n, brs, bcs),
                                MatMut::row_major(&mut out, m, n),
                                &GemmOptions::default(),
                            )
                            .expect("gemm")
                        })
                    })
                });
            }
            g.bench_function(BenchmarkId::new("gemm_crate", "f32"), |bn| {
                let par = if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                };
                p.install(|| {
                    bn.iter(|| {
                        // SAFETY: the buffers hold the strided views given (A and B `m·k` and
                        // `k·n` elements, C row-major); the gemm crate computes
                        // dst = alpha·dst + beta·lhs·rhs and reads no dst here.
                        unsafe {
                            gemm::gemm(
                                m,
                                n,
                                k,
                                out.as_mut_ptr(),
                                1,
                                n as isize,
                                false,
                                a.as_ptr(),
                                acs as isize,
                                ars as isize,
                                b.as_ptr(),
                                bcs as isize,
                                brs as isize,
                                0.0f32,
                                1.0f32,
                                false,
                                false,
                                false,
                                par,
                            )
                        }
                    })
                })
            });
            if threads == 1 {
                g.bench_function(BenchmarkId::new("matrixmultiply", "f32"), |bn| {
                    bn.iter(|| {
                        // SAFETY: buffers holding the strided views given, C row-major.
                        unsafe {
                            matrixmultiply::sgemm(
                                m,
                                k,
                                n,
                                1.0,
                                a.as_ptr(),
                                ars as isize,
                                acs as isize,
                                b.as_ptr(),
                                brs as isize,
                                bcs as isize,
                                0.0,
                                out.as_mut_ptr(),
                                n as isize,
                                1,
                            )
                        }
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
