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
    unsafe {
        kernel_12x32::<false>(
            kc,
            a.as_ptr(),
            b.as_ptr() as *const u8,
            c,
            rs_c,
            alpha,
            beta,
        )
    }
}

/// The left half of the AVX-512F tile, `12 × 16`, from the same packed panels (B rows of `NR`,
/// of which only the first 16 columns are read): for an edge panel of at most 16 columns, where
/// the whole kernel spends half its FMAs on zero padding (a DCGAN weight gradient `[64, 48]`
/// has one such panel in two). Each element gets the whole kernel's FMAs in the same order and
/// the same update, so the 16 columns are bitwise the whole kernel's.
///
/// # Safety
/// As [`super::micro::MicroFn`], with `c` a `12 × 16` tile; the CPU must have AVX-512F.
pub unsafe fn microkernel_avx512_half(
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
    unsafe { kernel_12x16(kc, a.as_ptr(), b.as_ptr(), c, rs_c, alpha, beta) }
}

/// [`kernel_12x32`]'s first 16 columns on packed f32 panels: 12 FMAs per depth step against one
/// B vector and twelve broadcasts, the C tile hinted as there.
#[target_feature(enable = "avx512f")]
unsafe fn kernel_12x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [_mm512_setzero_ps(); MR];
    let mut ap = a;
    let mut bp = b;
    macro_rules! steps {
        ($n:expr) => {
            for _ in 0..$n {
                // SAFETY (whole loop): step p reads a[p·MR .. p·MR+MR] and the first 16 of the
                // NR elements of B's step p, inside the panels of kc steps.
                unsafe {
                    let b0 = _mm512_loadu_ps(bp);
                    for (i, row) in acc.iter_mut().enumerate() {
                        *row = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(i)), b0, *row);
                    }
                    ap = ap.add(MR);
                    bp = bp.add(NR);
                }
            }
        };
    }
    let lead = kc.min(C_PREFETCH_LEAD);
    steps!(kc - lead);
    for i in 0..MR {
        // SAFETY: prefetching never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs_c) as *const i8) };
    }
    steps!(lead);
    let va = _mm512_set1_ps(alpha);
    let vb = _mm512_set1_ps(beta);
    for (i, &v) in acc.iter().enumerate() {
        // SAFETY: (i, 0 .. 16) is inside the tile the caller vouches for.
        unsafe {
            let p = c.add(i * rs_c);
            let out = if beta == 0.0 {
                _mm512_mul_ps(va, v)
            } else {
                _mm512_add_ps(_mm512_mul_ps(va, v), _mm512_mul_ps(vb, _mm512_loadu_ps(p)))
            };
            _mm512_storeu_ps(p, out);
        }
    }
}

/// The first `rows < 12` rows of the AVX-512F tile (all 32 columns, or with `half` the first
/// 16) from the same packed panels: for the rows under the last whole tile (a 64-row product
/// leaves 4, where the whole kernel would spend two thirds of that call on zero rows). Each
/// element gets the whole kernel's FMAs in the same order and the same update, so those rows
/// are bitwise the whole kernel's.
///
/// # Safety
/// As [`super::micro::MicroFn`], with `c` a `rows × 32` (or `rows × 16`) tile, `1 ≤ rows < 12`;
/// the CPU must have AVX-512F.
#[allow(clippy::too_many_arguments)]
pub unsafe fn microkernel_avx512_rows(
    rows: usize,
    half: bool,
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
    let (a, b) = (a.as_ptr(), b.as_ptr());
    macro_rules! go {
        ($($r:literal)*) => {
            match (rows, half) {
                // SAFETY (every arm): the panels hold kc steps (checked above); `c` holds the
                // rows × (16 or 32) tile and the CPU has AVX-512F (the caller's contract).
                $(($r, false) => unsafe { kernel_rows::<$r, 2>(kc, a, b, c, rs_c, alpha, beta) },
                  ($r, true) => unsafe { kernel_rows::<$r, 1>(kc, a, b, c, rs_c, alpha, beta) },)*
                _ => panic!("microkernel_avx512_rows: {rows} rows (1 to 11)"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8 9 10 11);
}

/// `R` rows and `V` vectors of 16 columns of [`kernel_12x32`] on packed f32 panels (A steps of
/// `MR`, B steps of `NR`): `R·V` FMAs per depth step, the C rows hinted as there.
#[target_feature(enable = "avx512f")]
unsafe fn kernel_rows<const R: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let mut ap = a;
    let mut bp = b;
    macro_rules! steps {
        ($n:expr) => {
            for _ in 0..$n {
                // SAFETY (whole loop): step p reads a[p·MR .. p·MR+R] and the first 16·V of the
                // NR elements of B's step p, inside the panels of kc steps.
                unsafe {
                    let bv: [__m512; V] = std::array::from_fn(|h| _mm512_loadu_ps(bp.add(16 * h)));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let ai = _mm512_set1_ps(*ap.add(i));
                        for (h, x) in row.iter_mut().enumerate() {
                            *x = _mm512_fmadd_ps(ai, bv[h], *x);
                        }
                    }
                    ap = ap.add(MR);
                    bp = bp.add(NR);
                }
            }
        };
    }
    let lead = kc.min(C_PREFETCH_LEAD);
    steps!(kc - lead);
    for i in 0..R {
        // SAFETY: prefetching never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs_c) as *const i8) };
    }
    steps!(lead);
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

/// The AVX-512F microkernel on bf16 column-panel rows ([`super::micro::Bf16PanelMicroFn`]).
///
/// # Safety
/// As [`super::micro::Bf16PanelMicroFn`]; also the CPU must have AVX-512F.
pub unsafe fn microkernel_avx512_bf16_panel(
    kc: usize,
    a: &[f32],
    b: *const u16,
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    assert!(a.len() >= kc * MR, "packed A panel too short");
    // SAFETY: the A panel holds kc steps (checked above); the panel rows, `c` and the CPU
    // features are the caller's contract.
    unsafe { kernel_12x32::<true>(kc, a.as_ptr(), b as *const u8, c, rs_c, alpha, beta) }
}

/// Depth steps between the C tile's prefetch and its update: 96 steps of 24 FMAs are about 1,150
/// cycles, longer than a miss to L3 or DRAM takes.
const C_PREFETCH_LEAD: usize = 96;

/// `BF16_PANEL`: B is bf16 panel rows (64 bytes a step, each 32-bit word widened in place: the
/// shift gives columns `{0..8, 16..24}`, the mask `{8..16, 24..32}` — the panel's slot order —
/// and the accumulators are put back in column order before the update); otherwise packed f32
/// (128 bytes a step). The FMAs and the update are the same, so both give the same bits.
#[target_feature(enable = "avx512f")]
unsafe fn kernel_12x32<const BF16_PANEL: bool>(
    kc: usize,
    a: *const f32,
    b: *const u8,
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let high = _mm512_set1_epi32(-65536); // 0xffff_0000: a word's upper bf16 as f32
    let mut ap = a;
    let mut bp = b;
    // `n` depth steps: 24 FMAs on one B step (two vectors) and twelve broadcasts of A.
    macro_rules! steps {
        ($n:expr) => {
            for _ in 0..$n {
                // SAFETY (whole loop): step p reads a[p·MR .. p·MR+MR] and one B step (NR f32,
                // or NR bf16 panel elements), inside the panels of kc steps.
                unsafe {
                    let (b0, b1) = if BF16_PANEL {
                        let v = _mm512_loadu_si512(bp as *const __m512i);
                        (
                            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                            _mm512_castsi512_ps(_mm512_and_si512(v, high)),
                        )
                    } else {
                        (
                            _mm512_loadu_ps(bp as *const f32),
                            _mm512_loadu_ps((bp as *const f32).add(16)),
                        )
                    };
                    for (i, row) in acc.iter_mut().enumerate() {
                        let ai = _mm512_set1_ps(*ap.add(i));
                        row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                        row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
                    }
                    ap = ap.add(MR);
                    bp = bp.add(if BF16_PANEL { 2 * NR } else { 4 * NR });
                }
            }
        };
    }
    // The C tile is hinted into L1 `C_PREFETCH_LEAD` steps before the update reads it (at the
    // start when the depth is shorter). Asked for at the start of a deep call, its lines can be
    // evicted again by the 100+ KiB of panels streaming through L1 before the update. Measured
    // on a Zen 5 core against the hint at entry, five interleaved pairs (median GFLOP/s): 512³
    // 236.8 → 242.2, `128 × 2304 × 768` 222.4 → 225.4, 2048³ on two threads 451 → 456, 4096³
    // even (236.3 / 236.4).
    let lead = kc.min(C_PREFETCH_LEAD);
    steps!(kc - lead);
    for i in 0..MR {
        // SAFETY: prefetching never faults; the addresses are inside the tile anyway.
        unsafe {
            let row = c.add(i * rs_c) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(4 * NR - 1));
        }
    }
    steps!(lead);
    // Panel rows: [cols 0..8 | 16..24], [cols 8..16 | 24..32] → [cols 0..16], [cols 16..32].
    let first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    let second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    let va = _mm512_set1_ps(alpha);
    let vb = _mm512_set1_ps(beta);
    for (i, row) in acc.iter().enumerate() {
        let row = if BF16_PANEL {
            [
                _mm512_permutex2var_ps(row[0], first, row[1]),
                _mm512_permutex2var_ps(row[0], second, row[1]),
            ]
        } else {
            *row
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The row kernel writes bitwise the whole kernel's first rows (all 32 or the first 16
    /// columns, beta 0 and not) and nothing else.
    #[test]
    fn row_tiles_equal_the_whole_kernel() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut s = 5u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) - 0.5
        };
        for kc in [1, 9, 96, 200] {
            let a: Vec<f32> = (0..kc * MR).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..kc * NR).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..MR * NR).map(|_| rnd()).collect();
            for rows in 1..MR {
                for half in [false, true] {
                    for beta in [0.0, 0.5] {
                        let (mut whole, mut part) = (c0.clone(), c0.clone());
                        // SAFETY: each C is a 12 × 32 tile at row stride 32; the panels hold kc
                        // steps; AVX-512F is present (checked above).
                        unsafe {
                            microkernel_avx512(kc, &a, &b, whole.as_mut_ptr(), NR, 1.5, beta);
                            microkernel_avx512_rows(
                                rows,
                                half,
                                kc,
                                &a,
                                &b,
                                part.as_mut_ptr(),
                                NR,
                                1.5,
                                beta,
                            );
                        }
                        let cols = if half { 16 } else { NR };
                        for i in 0..MR {
                            for j in 0..NR {
                                let written = i < rows && j < cols;
                                let want = if written {
                                    whole[i * NR + j]
                                } else {
                                    c0[i * NR + j]
                                };
                                assert_eq!(
                                    part[i * NR + j].to_bits(),
                                    want.to_bits(),
                                    "kc {kc} rows {rows} half {half} beta {beta} ({i}, {j})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The half kernel writes bitwise the whole kernel's first 16 columns (beta 0 and not) and
    /// leaves the other 16 untouched.
    #[test]
    fn half_tile_equals_the_whole_kernel() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut s = 11u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) - 0.5
        };
        for kc in [1, 7, 95, 96, 97, 300] {
            let a: Vec<f32> = (0..kc * MR).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..kc * NR).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..MR * NR).map(|_| rnd()).collect();
            for beta in [0.0, 0.5] {
                let (mut whole, mut half) = (c0.clone(), c0.clone());
                // SAFETY: each C is a 12 × 32 tile at row stride 32; the panels hold kc steps;
                // AVX-512F is present (checked above).
                unsafe {
                    microkernel_avx512(kc, &a, &b, whole.as_mut_ptr(), NR, 1.5, beta);
                    microkernel_avx512_half(kc, &a, &b, half.as_mut_ptr(), NR, 1.5, beta);
                }
                for i in 0..MR {
                    for j in 0..NR {
                        let want = if j < 16 {
                            whole[i * NR + j]
                        } else {
                            c0[i * NR + j]
                        };
                        assert_eq!(
                            half[i * NR + j].to_bits(),
                            want.to_bits(),
                            "kc {kc} beta {beta} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}
