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
    for (i, row) in acc.iter().enumerate() {
        for (h, &v) in row.iter().enumerate() {
            // SAFETY: (i, 8h .. 8h+8) is inside the tile the caller vouches for.
            unsafe { store8(c.add(i * rs_c + 8 * h), v, alpha, beta) };
        }
    }
}

/// `c[..8] = alpha·acc` (`beta == 0`: C not read) or `alpha·acc + beta·c[..8]`, the two products
/// rounded separately: the tile update of the [`super::micro::MicroFn`] contract, shared by the
/// full and the edge kernel so that both round alike.
///
/// # Safety
/// `c` is valid for 8 writes (and reads when `beta != 0`); the CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store8(c: *mut f32, acc: __m256, alpha: f32, beta: f32) {
    let va = _mm256_set1_ps(alpha);
    // SAFETY: the contract above.
    unsafe {
        let out = if beta == 0.0 {
            _mm256_mul_ps(va, acc)
        } else {
            let vb = _mm256_set1_ps(beta);
            _mm256_add_ps(
                _mm256_mul_ps(va, acc),
                _mm256_mul_ps(vb, _mm256_loadu_ps(c)),
            )
        };
        _mm256_storeu_ps(c, out);
    }
}

/// The last `rows < MR` rows of two horizontally adjacent tiles ([`super::micro::EdgeFn`]
/// contract): the rows a product's height leaves over after whole 6-row tiles (GPT-2's 128
/// prompt rows, a conv layer's 128 output channels: 21 tiles and 2 rows). The full kernel
/// would spend a whole call on them; with so few rows there are not 12 accumulators to hide
/// the FMA latency, so 1 and 2 rows take two B panels at once (`rows × 32` columns, 4 or 8
/// chains), 3 to 5 rows one panel at a time (6 to 10 chains; 3 rows of two panels needed 17
/// registers and spilled). Measured on a Zen 3 core (profile samples against the full kernel's,
/// `m × 2304 × 768`), per panel in full-call units: 1 row 0.29, 2 rows 0.46, 3 rows 0.52,
/// 4 rows 0.85, 5 rows 0.93, where the full call into a tile buffer cost 1 and more. Each
/// element's arithmetic is the full kernel's (FMAs in order of p from zero, then the same
/// update), so results are bitwise those of [`microkernel_avx2`].
///
/// # Safety
/// As [`super::micro::EdgeFn`]; also the CPU must have AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
pub unsafe fn edge_avx2(
    rows: usize,
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: [*mut f32; 2],
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    assert!(
        (1..MR).contains(&rows) && a.len() >= kc * MR && b.len() >= 2 * kc * NR,
        "edge tiles: rows or packed panels out of range"
    );
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let b1 = b.wrapping_add(kc * NR);
    // SAFETY: the panels hold kc steps of both tiles (checked above); `c`, the rows and the CPU
    // features are the caller's contract.
    unsafe {
        match rows {
            1 => edge_rows::<1, 2>(kc, a, [b, b1], c, rs_c, alpha, beta),
            2 => edge_rows::<2, 2>(kc, a, [b, b1], c, rs_c, alpha, beta),
            3 => {
                edge_rows::<3, 1>(kc, a, [b, b], [c[0], c[0]], rs_c, alpha, beta);
                edge_rows::<3, 1>(kc, a, [b1, b1], [c[1], c[1]], rs_c, alpha, beta);
            }
            4 => {
                edge_rows::<4, 1>(kc, a, [b, b], [c[0], c[0]], rs_c, alpha, beta);
                edge_rows::<4, 1>(kc, a, [b1, b1], [c[1], c[1]], rs_c, alpha, beta);
            }
            _ => {
                edge_rows::<5, 1>(kc, a, [b, b], [c[0], c[0]], rs_c, alpha, beta);
                edge_rows::<5, 1>(kc, a, [b1, b1], [c[1], c[1]], rs_c, alpha, beta);
            }
        }
    }
}

/// `R` rows of `P` (1 or 2) tiles: accumulator `acc[i][2t + h]` is row i, columns
/// `8h .. 8h+8` of tile t.
#[target_feature(enable = "avx2,fma")]
unsafe fn edge_rows<const R: usize, const P: usize>(
    kc: usize,
    a: *const f32,
    b: [*const f32; 2],
    c: [*mut f32; 2],
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for p in 0..kc {
        // SAFETY (whole loop): step p reads a[p·MR + i] (i < R < MR) and b[t][p·NR .. +NR],
        // inside the panels of kc steps.
        unsafe {
            let bv: [__m256; 4] = std::array::from_fn(|v| {
                if v < 2 * P {
                    _mm256_loadu_ps(b[v / 2].add(p * NR + 8 * (v % 2)))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(*a.add(p * MR + i));
                for v in 0..2 * P {
                    row[v] = _mm256_fmadd_ps(ai, bv[v], row[v]);
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, &x) in row.iter().enumerate().take(2 * P) {
            // SAFETY: row i < R, columns 8(v%2) .. +8 of tile v/2 are inside the tiles the
            // caller vouches for.
            unsafe { store8(c[v / 2].add(i * rs_c + 8 * (v % 2)), x, alpha, beta) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The edge kernel writes, for every row count, bitwise what the full kernel writes into
    /// those rows of the two tiles (beta 0 and not), and nothing below them.
    #[test]
    fn edge_rows_equal_full_kernel() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: this CPU has no AVX2 + FMA");
            return;
        }
        let mut s = 7u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) - 0.5
        };
        for kc in [1, 7, 64, 257] {
            let a: Vec<f32> = (0..kc * MR).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..2 * kc * NR).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..MR * 2 * NR).map(|_| rnd()).collect();
            for rows in 1..MR {
                for beta in [0.0, 0.5] {
                    // C: MR rows of two tiles side by side (row stride 2·NR).
                    let (mut full, mut edge) = (c0.clone(), c0.clone());
                    let (b0, b1) = b.split_at(kc * NR);
                    // SAFETY: each tile is MR × NR inside `full` at row stride 2·NR; AVX2 and
                    // FMA are present (checked above).
                    unsafe {
                        let p = full.as_mut_ptr();
                        microkernel_avx2(kc, &a, b0, p, 2 * NR, 1.5, beta);
                        microkernel_avx2(kc, &a, b1, p.add(NR), 2 * NR, 1.5, beta);
                        let p = edge.as_mut_ptr();
                        edge_avx2(rows, kc, &a, &b, [p, p.add(NR)], 2 * NR, 1.5, beta);
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let n = rows * 2 * NR;
                    assert_eq!(bits(&edge[..n]), bits(&full[..n]), "kc {kc} rows {rows}");
                    assert_eq!(
                        bits(&edge[n..]),
                        bits(&c0[n..]),
                        "rows below {rows} written"
                    );
                }
            }
        }
    }
}
