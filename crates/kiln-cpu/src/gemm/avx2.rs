//! AVX2 + FMA microkernel: `MR × NR = 6 × 16`.
//!
//! Why 6 × 16: x86 has 16 ymm registers. The tile's accumulators take `6 · 16/8 = 12`, the two
//! B vectors of one depth step take 2, the broadcast A element 1 — 15 of 16, no spills. Each
//! depth step issues 12 FMAs against 2 vector loads and 6 broadcasts, which keeps both FMA
//! pipes busy (12 independent accumulators cover a 4-cycle FMA latency on 2 pipes).
use std::arch::x86_64::*;

pub const MR: usize = 6;
pub const NR: usize = 16;

/// The AVX2 microkernel ([`super::micro::MicroFn`] contract).
///
/// # Safety
/// As [`super::micro::MicroFn`]; also the CPU must have AVX2 and FMA (the dispatcher only hands
/// this function out when `Isa::Avx2.is_available()`).
pub unsafe fn microkernel_avx2(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    assert!(
        a.len() >= kc * MR && b.len() >= kc * NR,
        "packed panels too short"
    );
    // SAFETY: the panels hold kc steps (checked above); `c` and the CPU features are the
    // caller's contract.
    unsafe { kernel_6x16(kc, a.as_ptr(), b.as_ptr(), c, rs_c, alpha, beta) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // Start fetching the C tile now, so its misses overlap the depth loop.
    for i in 0..MR {
        // SAFETY: prefetching never faults; the addresses are inside the tile anyway.
        unsafe {
            let row = c.add(i * rs_c) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(4 * NR - 1));
        }
    }
    let mut ap = a;
    let mut bp = b;
    for _ in 0..kc {
        // SAFETY (whole loop): step p reads a[p·MR .. p·MR+MR] and b[p·NR .. p·NR+NR], inside
        // the panels of kc steps.
        unsafe {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(*ap.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
    }
    let va = _mm256_set1_ps(alpha);
    let vb = _mm256_set1_ps(beta);
    for (i, row) in acc.iter().enumerate() {
        for (h, &v) in row.iter().enumerate() {
            // SAFETY: (i, 8h .. 8h+8) is inside the tile the caller vouches for.
            unsafe {
                let p = c.add(i * rs_c + 8 * h);
                let out = if beta == 0.0 {
                    _mm256_mul_ps(va, v)
                } else {
                    _mm256_add_ps(_mm256_mul_ps(va, v), _mm256_mul_ps(vb, _mm256_loadu_ps(p)))
                };
                _mm256_storeu_ps(p, out);
            }
        }
    }
}
