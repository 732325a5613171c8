//! Machine peak probes: FP32 FMA throughput and memory bandwidth — the ceilings every
//! benchmark figure is divided by.
//!
//! * FMA: each thread runs chains of fused multiply-adds on `ACC` independent vector
//!   accumulators (enough to cover the FMA latency on every FMA pipe), widest ISA available
//!   (AVX-512F, else AVX2+FMA, else `wide`); one FMA on `L` lanes is `2·L` flops.
//! * Bandwidth: a STREAM-like triad `a[i] = b[i] + s·c[i]` on three f32 arrays each far larger
//!   than the last-level cache; bytes moved per pass are counted as `3 · 4 · len` (STREAM's
//!   convention: the write-allocate read of `a` is not counted). The best pass is reported.
//!
//! Threads are plain OS threads (not the rayon pool), started together behind a barrier; the
//! aggregate rate is the total work over the slowest thread's time.
use crate::gemm::blocking::CacheSizes;
use std::collections::HashMap;
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Measured ceilings for one thread count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// Threads used for the `*_all` figures.
    pub threads: usize,
    /// FP32 FMA GFLOP/s of one thread.
    pub fma_gflops_1: f64,
    /// FP32 FMA GFLOP/s of `threads` threads together.
    pub fma_gflops_all: f64,
    /// Triad GB/s of one thread.
    pub gbps_1: f64,
    /// Triad GB/s of `threads` threads together.
    pub gbps_all: f64,
    /// The vector ISA the FMA probe used.
    pub isa: &'static str,
}

impl Peak {
    /// FMA GFLOP/s for `t` threads: measured for 1 and `threads`, proportional in between.
    pub fn fma_gflops(&self, t: usize) -> f64 {
        match t {
            0 | 1 => self.fma_gflops_1,
            t if t >= self.threads => self.fma_gflops_all,
            t => self.fma_gflops_all * t as f64 / self.threads as f64,
        }
    }
    /// Triad GB/s for `t` threads (1 or `threads` measured; in between, the larger bound).
    pub fn gbps(&self, t: usize) -> f64 {
        if t <= 1 {
            self.gbps_1
        } else {
            self.gbps_all
        }
    }
}

/// The FMA probe's ISA name on this CPU.
pub fn fma_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2";
        }
    }
    "portable"
}

/// Runs `iters` rounds of the FMA chains on this thread; returns (flops, a value to keep the
/// work from being optimised away).
fn fma_chains(iters: u64) -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        match fma_isa() {
            "avx512" => {
                // SAFETY: the CPU has AVX-512F (checked by fma_isa).
                let keep = unsafe { x86::chains_avx512(iters) };
                return (iters as f64 * x86::FLOPS_512, keep);
            }
            "avx2" => {
                // SAFETY: the CPU has AVX2 and FMA (checked by fma_isa).
                let keep = unsafe { x86::chains_avx2(iters) };
                return (iters as f64 * x86::FLOPS_256, keep);
            }
            _ => {}
        }
    }
    use wide::f32x8;
    let x = std::hint::black_box([0.5f32, 0.999_999_9, 1e-7]);
    let mut acc = [f32x8::splat(x[0]); 12];
    let (a, b) = (f32x8::splat(x[1]), f32x8::splat(x[2]));
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = r.mul_add(a, b);
        }
    }
    let s: f32 = acc.iter().map(|v| v.reduce_add()).sum();
    (iters as f64 * 12.0 * 8.0 * 2.0, s)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Independent accumulators: FMA latency 4 cycles × 2 pipes needs 8; 12 (ymm) and 24 (zmm)
    /// leave slack without spilling.
    const ACC256: usize = 12;
    const ACC512: usize = 24;
    pub const FLOPS_256: f64 = (ACC256 * 8 * 2) as f64;
    pub const FLOPS_512: f64 = (ACC512 * 16 * 2) as f64;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains_avx2(iters: u64) -> f32 {
        // Opaque inputs, so the compiler cannot fold the chains.
        let x = std::hint::black_box([0.5f32, 0.999_999_9, 1e-7]);
        let mut acc = [_mm256_set1_ps(x[0]); ACC256];
        let (a, b) = (_mm256_set1_ps(x[1]), _mm256_set1_ps(x[2]));
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for r in acc {
            s = _mm256_add_ps(s, r);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains_avx512(iters: u64) -> f32 {
        let x = std::hint::black_box([0.5f32, 0.999_999_9, 1e-7]);
        let mut acc = [_mm512_set1_ps(x[0]); ACC512];
        let (a, b) = (_mm512_set1_ps(x[1]), _mm512_set1_ps(x[2]));
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for r in acc {
            s = _mm512_add_ps(s, r);
        }
        _mm512_reduce_add_ps(s)
    }
}

/// FP32 FMA GFLOP/s of `threads` threads running together for about `duration`.
pub fn fma_gflops(threads: usize, duration: Duration) -> f64 {
    let threads = threads.max(1);
    // Calibrate: rounds per millisecond on this thread.
    let mut iters = 1u64 << 12;
    let per_ms = loop {
        let t = Instant::now();
        std::hint::black_box(fma_chains(iters));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if ms > 2.0 {
            break iters as f64 / ms;
        }
        iters *= 4;
    };
    let iters = ((per_ms * duration.as_secs_f64() * 1e3) as u64).max(1);
    let barrier = Barrier::new(threads);
    let results: Vec<(f64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let t = Instant::now();
                    let (flops, v) = fma_chains(iters);
                    std::hint::black_box(v);
                    (flops, t.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("fma thread"))
            .collect()
    });
    let flops: f64 = results.iter().map(|r| r.0).sum();
    let secs = results.iter().map(|r| r.1).fold(0f64, f64::max);
    flops / secs / 1e9
}

/// Triad GB/s of `threads` threads on three arrays of `len` f32 each, best of `reps` passes.
pub fn triad_gbps(threads: usize, len: usize, reps: usize) -> f64 {
    let threads = threads.max(1);
    let chunk = len.div_ceil(threads).next_multiple_of(16).max(16);
    let mut a = vec![0f32; len];
    let mut b = vec![0f32; len];
    let mut c = vec![0f32; len];
    let barrier = Barrier::new(len.div_ceil(chunk).max(1));
    let times: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = a
            .chunks_mut(chunk)
            .zip(b.chunks_mut(chunk))
            .zip(c.chunks_mut(chunk))
            .map(|((a, b), c)| {
                let barrier = &barrier;
                s.spawn(move || {
                    // First touch by the thread that streams the chunk.
                    b.fill(1.0);
                    c.fill(2.0);
                    a.fill(0.0);
                    let mut times = Vec::with_capacity(reps);
                    for r in 0..reps.max(1) {
                        let scale = 0.5 + r as f32 * 1e-3;
                        barrier.wait();
                        let t = Instant::now();
                        for ((x, &y), &z) in a.iter_mut().zip(b.iter()).zip(c.iter()) {
                            *x = y + scale * z;
                        }
                        std::hint::black_box(&mut *a);
                        times.push(t.elapsed().as_secs_f64());
                    }
                    times
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("triad thread"))
            .collect()
    });
    // Per pass: the slowest thread; then the best pass.
    let passes = times.iter().map(|t| t.len()).min().unwrap_or(0);
    let best = (0..passes)
        .map(|r| times.iter().map(|t| t[r]).fold(0f64, f64::max))
        .fold(f64::INFINITY, f64::min);
    (3 * 4 * len) as f64 / best / 1e9
}

/// Triad array length (f32 elements): each array 4× the last-level cache, at least 32 MiB.
pub fn triad_len() -> usize {
    (CacheSizes::detect().l3 * 4).max(32 << 20) / 4
}

/// A full measurement: FMA for `fma_time` per thread count, triad best of `reps`.
pub fn measure(threads: usize, fma_time: Duration, reps: usize) -> Peak {
    let threads = threads.max(1);
    let fma_1 = fma_gflops(1, fma_time);
    let fma_all = if threads > 1 {
        fma_gflops(threads, fma_time)
    } else {
        fma_1
    };
    let len = triad_len();
    let gbps_1 = triad_gbps(1, len, reps);
    let gbps_all = if threads > 1 {
        triad_gbps(threads, len, reps)
    } else {
        gbps_1
    };
    Peak {
        threads,
        fma_gflops_1: fma_1,
        fma_gflops_all: fma_all,
        gbps_1,
        gbps_all,
        isa: fma_isa(),
    }
}

/// A short measurement (about half a second), cached per thread count for the process: what
/// `kiln bench …` commands divide by.
pub fn quick(threads: usize) -> Peak {
    static CACHE: OnceLock<Mutex<HashMap<usize, Peak>>> = OnceLock::new();
    let threads = threads.max(1);
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache
        .lock()
        .map(|c| c.get(&threads).copied())
        .ok()
        .flatten()
    {
        return p;
    }
    let p = measure(threads, Duration::from_millis(60), 3);
    if let Ok(mut c) = cache.lock() {
        c.insert(threads, p);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_return_positive_rates() {
        assert!(fma_gflops(1, Duration::from_millis(5)) > 0.0);
        assert!(triad_gbps(2, 1 << 16, 2) > 0.0);
    }
}
