//! AVX-512F microkernel: `MR × NR = 12 × 32`.
//!
//! Why 12 × 32: AVX-512 has 32 zmm registers. The accumulators take `12 · 32/16 = 24`, the two
//! B vectors 2, the broadcast 1 — 27 of 32, leaving the compiler room so nothing spills (14 × 32
//! would use 31). 24 independent accumulators cover a 4-cycle FMA latency on 2 pipes three
//! times over; each depth step is 24 FMAs against 2 vector loads and 12 broadcasts.
use std::arch::x86_64::*;

pub const MR: usize = 12;
pub const NR: usize = 32;

/// The AVX-512F microkernel ([`super::micro::MicroFn`] contract).
///
/// # Safety
/// As [`super::micro::MicroFn`]; also the CPU must have AVX-512F (the dispatcher only hands
/// this function out when `Isa::Avx512.is_available()`).
pub unsafe fn microkernel_avx512(
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
    unsafe { kernel_12x32(kc, a.as_ptr(), b.as_ptr(), c, rs_c, alpha, beta) }
}

#[target_feature(enable = "avx512f")]
unsafe fn kernel_12x32(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
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
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
    }
    let va = _mm512_set1_ps(alpha);
    let vb = _mm512_set1_ps(beta);
    for (i, row) in acc.iter().enumerate() {
        for (h, &v) in row.iter().enumerate() {
            // SAFETY: (i, 16h .. 16h+16) is inside the tile the caller vouches for.
            unsafe {
                let p = c.add(i * rs_c + 16 * h);
                let out = if beta == 0.0 {
                    _mm512_mul_ps(va, v)
                } else {
                    _mm512_add_ps(_mm512_mul_ps(va, v), _mm512_mul_ps(vb, _mm512_loadu_ps(p)))
                };
                _mm512_storeu_ps(p, out);
            }
        }
    }
}
