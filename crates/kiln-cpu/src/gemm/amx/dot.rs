//! The AVX512-BF16 microkernel: the same packed panels as the AMX tiles, multiplied with
//! `vdpbf16ps` on zmm registers (CPUs with AVX512-BF16 and no AMX: AMD Zen 4 / Zen 5, Intel
//! Cooper Lake).
//!
//! `vdpbf16ps acc, a, b` computes, for each of the 16 f32 lanes `l`,
//! `acc[l] += a.bf16[2l+1]·b.bf16[2l+1]`, then `acc[l] += a.bf16[2l]·b.bf16[2l]` — two k per
//! instruction, each product exact in f32, each sum rounded (denormals flushed).
//! With `a` = the pair `(A[i][2r], A[i][2r+1])` broadcast to every lane and `b` = one line of a
//! packed B tile (`(B[2r][j], B[2r+1][j])` for 16 columns `j`), one instruction adds the pair
//! `r` of row `i` to 16 outputs.
//!
//! The 32×32 block of C is done as four strips of 8 rows × 32 columns: 16 accumulators, and per
//! pair two B loads and eight 32-bit broadcasts for 16 `vdpbf16ps` (the accumulators, the two B
//! registers and a broadcast register fit in the 32 zmm registers with room to spare).
//!
//! Summation order per element: k-steps in order, within one pair-row `r` first `2r+1`, then
//! `2r` — fixed by the packing, so every thread count gives the same bits. It is not the AMX
//! tile's order (`tdpbf16ps` is specified with `2r` first), so the two kernels agree with each
//! other and with the f64 reference only to f32 rounding.
use super::tiles::{Line, LINES_PER_KSTEP};

/// Whether this CPU runs the kernel (AVX-512F, AVX-512BW and AVX512-BF16).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows of C per register strip.
const STRIP: usize = 8;

/// `C[0..32][0..32] = (accumulate ? C : 0) + A_panel · B_panel` over `ksteps` k-steps, the
/// operands as [`super::tiles::kernel_32x32`] takes them (lengths checked by it).
///
/// `PANEL`: B is read straight from a bf16 column panel ([`crate::gemm::PanelMatrix`]): `b` is
/// `ksteps·32` consecutive panel rows (row `k` = line `k`: 32 bf16 in the panel's slot order,
/// the 32-bit word `i` of half `t` holding columns `16t + i` and `16t + 8 + i`). Per pair-row,
/// two 16-bit blends of rows `2r` and `2r + 1` give the `vdpbf16ps` operands for columns
/// `{0..8, 16..24}` and `{8..16, 24..32}`; the accumulators are kept in that order and C is
/// permuted in and out once per call. Each output receives exactly the pairs of the packed
/// layout in the same order, so the result is bitwise that of packing B first
/// ([`super::pack`]) — without the packing pass over the weights. Otherwise `b` is packed tile
/// lines.
///
/// # Safety
/// [`available`] is true; `a` and `b` hold `ksteps·32` lines each; `c` holds 32 rows of 32 f32 at
/// stride `ldc` (`c.len() ≥ 31·ldc + 32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn dpbf16_32x32<const PANEL: bool>(
    a: &[Line],
    b: &[Line],
    ksteps: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= ksteps * LINES_PER_KSTEP && b.len() >= ksteps * LINES_PER_KSTEP);
    debug_assert!(ldc >= 32 && c.len() >= 31 * ldc + 32);
    let (ap, bp, cp) = (a.as_ptr() as *const u8, b.as_ptr(), c.as_mut_ptr());
    // Panel order <-> column order: [lo, hi] = [cols 0..8 | 16..24, cols 8..16 | 24..32] and
    // [c0, c1] = [cols 0..16, cols 16..32] map to each other by the same two index vectors.
    let first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    let second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    let swap = |x: __m512, y: __m512| {
        (
            _mm512_permutex2var_ps(x, first, y),
            _mm512_permutex2var_ps(x, second, y),
        )
    };
    for i0 in (0..32).step_by(STRIP) {
        let mut acc = [[_mm512_setzero_ps(); 2]; STRIP];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: row i0+i < 32 of C, columns 0..32, inside `c` (the contract).
                let (c0, c1) = unsafe {
                    let r = cp.add((i0 + i) * ldc);
                    (_mm512_loadu_ps(r), _mm512_loadu_ps(r.add(16)))
                };
                (row[0], row[1]) = if PANEL { swap(c0, c1) } else { (c0, c1) };
            }
        }
        for s in 0..ksteps {
            // SAFETY: k-step s < ksteps: lines s·32 .. s·32+32 of both panels exist.
            let (a_rows, b_step) = unsafe {
                (
                    ap.add((s * LINES_PER_KSTEP + i0) * 64),
                    bp.add(s * LINES_PER_KSTEP),
                )
            };
            for r in 0..16 {
                // SAFETY: lines r and 16+r (packed: pair-row r of columns 0..16 and 16..32) or
                // 2r and 2r+1 (panel rows) of this k-step, 64-byte aligned `Line`s.
                let (b0, b1) = unsafe {
                    if PANEL {
                        let x = _mm512_load_si512(b_step.add(2 * r) as *const __m512i);
                        let y = _mm512_load_si512(b_step.add(2 * r + 1) as *const __m512i);
                        // Odd 16-bit elements from the second operand: (x.lo, y.lo) and
                        // (x.hi, y.hi) pairs of every 32-bit word.
                        (
                            _mm512_mask_blend_epi16(0xAAAA_AAAA, x, _mm512_slli_epi32::<16>(y)),
                            _mm512_mask_blend_epi16(0xAAAA_AAAA, _mm512_srli_epi32::<16>(x), y),
                        )
                    } else {
                        (
                            _mm512_load_si512(b_step.add(r) as *const __m512i),
                            _mm512_load_si512(b_step.add(16 + r) as *const __m512i),
                        )
                    }
                };
                let (b0, b1) = (as_bf16(b0), as_bf16(b1));
                for (i, row) in acc.iter_mut().enumerate() {
                    // SAFETY: bytes 4r..4r+4 of line i0+i of this k-step (row i0+i, k pair r).
                    let pair =
                        unsafe { (a_rows.add(i * 64 + 4 * r) as *const i32).read_unaligned() };
                    let av = as_bf16(_mm512_set1_epi32(pair));
                    row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, b1);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let (c0, c1) = if PANEL {
                swap(row[0], row[1])
            } else {
                (row[0], row[1])
            };
            // SAFETY: as for the loads above.
            unsafe {
                let r = cp.add((i0 + i) * ldc);
                _mm512_storeu_ps(r, c0);
                _mm512_storeu_ps(r.add(16), c1);
            }
        }
    }
}

/// A 512-bit integer vector seen as 32 bf16 (a bit cast).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn as_bf16(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    use std::arch::x86_64::*;
    // SAFETY: both are 64-byte vectors of plain bits; every bit pattern is valid for each.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// `vdpbf16ps` throughput of one core in GFLOP/s (16 lanes × 2 products × 2 flops per
/// instruction), with 16 independent accumulators so latency is hidden; the best of several
/// timed runs. `None` without AVX512-BF16.
pub(crate) fn peak_gflops_one_core() -> Option<f64> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        const ITERS: usize = 1 << 16;
        const FLOPS_PER_ITER: f64 = 16.0 * 16.0 * 2.0 * 2.0;
        let run = || {
            let t = std::time::Instant::now();
            // SAFETY: AVX512-BF16 and AVX-512F are present (checked above).
            std::hint::black_box(unsafe { dp_loop(ITERS) });
            t.elapsed().as_secs_f64()
        };
        run();
        let best = (0..15).map(|_| run()).fold(f64::INFINITY, f64::min);
        Some(ITERS as f64 * FLOPS_PER_ITER / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// `iters` rounds of 16 independent `vdpbf16ps`; returns a lane sum so nothing is dropped.
///
/// # Safety
/// AVX-512F and AVX512-BF16 are present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 16];
    // 1.0 and 2^-20 in bf16 pairs: the sums stay finite.
    let (x, y) = (
        as_bf16(_mm512_set1_epi32(0x3f80_3f80)),
        as_bf16(_mm512_set1_epi32(0x3580_3580)),
    );
    for _ in 0..std::hint::black_box(iters) {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, x, y);
        }
    }
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}
