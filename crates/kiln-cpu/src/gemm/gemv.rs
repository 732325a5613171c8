//! The M = 1 path (GEMV, a decode step): `y[j] = Σ_p x[p]·B[p, j]`, streaming B once from
//! memory with no packing. It is bandwidth-bound, so bf16/f16 weights are widened in registers
//! (bf16: a 16-bit shift; f16: F16C) and read half the bytes of f32.
//!
//! Two layouts are streamed directly:
//! * row-major B (`[k, n]`, a Conv1D weight): each thread owns a run of columns; for every depth
//!   step `p` (four at a time) the row run `B[p, j0..j1]` is read contiguously and
//!   `y[j] = fma(x[p], B[p, j], y[j])` is applied in order of `p`;
//! * column-major B (`wteᵀ` for the logits): each column is a contiguous dot product, taken in
//!   order (one sequential stream), four 8-lane accumulators summed by a fixed tree.
//!
//! Each output's arithmetic is independent of how columns are split among threads, so results
//! are bitwise identical for any thread count.
use super::pack::convert_run;
use super::{Isa, MatRef};
use kiln_tensor::FloatElement;
use rayon::prelude::*;

/// B larger than this (bytes) is split among threads.
const PARALLEL_BYTES: usize = 256 << 10;

/// `y = x·B` for `x` of length `k` (contiguous), B `k × n` with a unit row or column stride,
/// `y` of length `n` (overwritten). Returns false (and leaves `y` alone) when B's layout is
/// neither row- nor column-contiguous.
pub fn gemv<TB: FloatElement>(isa: Isa, x: &[f32], b: &MatRef<'_, TB>, y: &mut [f32]) -> bool {
    let (k, n) = (b.rows, b.cols);
    debug_assert!(x.len() == k && y.len() == n);
    let row_major = b.col_stride == 1 || n == 1;
    if !row_major && b.row_stride != 1 && k != 1 {
        return false;
    }
    let bytes = k * n * std::mem::size_of::<TB>();
    let threads = if bytes >= PARALLEL_BYTES {
        rayon::current_num_threads()
    } else {
        1
    };
    // One run of columns per thread: longer row runs stream better from DRAM than finer,
    // load-balancing chunks (GPT-2 124M decode on 2 threads: bf16 36–40 against 32–35
    // tokens/s, f32 23–26 against 20–21, alternating runs).
    let chunk = if threads > 1 {
        n.div_ceil(threads).next_multiple_of(64)
    } else {
        n
    }
    .max(1);
    let run = |(ci, yc): (usize, &mut [f32])| {
        let j0 = ci * chunk;
        if row_major {
            gemv_rows(isa, x, b, j0, yc);
        } else {
            gemv_cols(isa, x, b, j0, yc);
        }
    };
    if threads > 1 {
        y.par_chunks_mut(chunk).enumerate().for_each(run);
    } else {
        y.chunks_mut(chunk).enumerate().for_each(run);
    }
    true
}

/// A few rows at once (`xs.len()` = m ≥ 1, a batched decode step): `ys[i][j] = Σ_p xs[i][p]·B[p, j]`
/// for B `k × n` with a unit row or column stride. B is cut into column blocks of about half of
/// L2; each block is read from memory once and then summed against every row while it is in
/// L2. Each output's arithmetic is that of [`gemv`] (the same kernels on a column range), so a
/// row of a batch is bitwise the row computed alone, for any thread count. Returns false
/// (touching nothing) when B's layout is neither row- nor column-contiguous.
pub fn gemv_rows_batch<TB: FloatElement>(
    isa: Isa,
    xs: &[Vec<f32>],
    b: &MatRef<'_, TB>,
    ys: &mut [Vec<f32>],
) -> bool {
    let (k, n) = (b.rows, b.cols);
    let row_major = b.col_stride == 1 || n == 1;
    if !row_major && b.row_stride != 1 && k != 1 {
        return false;
    }
    let l2 = super::blocking::CacheSizes::detect().l2;
    let block = (l2 / 2 / (k.max(1) * std::mem::size_of::<TB>()))
        .next_multiple_of(64)
        .clamp(64, n.next_multiple_of(64).max(64));
    let blocks = n.div_ceil(block);
    let threads = if k * n * std::mem::size_of::<TB>() >= PARALLEL_BYTES {
        rayon::current_num_threads()
    } else {
        1
    };
    // Each task fills its block of every row into its own buffers, copied out afterwards.
    let run = |bi: usize| -> Vec<Vec<f32>> {
        let j0 = bi * block;
        let w = block.min(n - j0);
        xs.iter()
            .map(|x| {
                let mut yc = vec![0f32; w];
                if row_major {
                    gemv_rows(isa, x, b, j0, &mut yc);
                } else {
                    gemv_cols(isa, x, b, j0, &mut yc);
                }
                yc
            })
            .collect()
    };
    let parts: Vec<Vec<Vec<f32>>> = if threads > 1 && blocks > 1 {
        (0..blocks).into_par_iter().map(run).collect()
    } else {
        (0..blocks).map(run).collect()
    };
    for (bi, part) in parts.into_iter().enumerate() {
        for (y, yc) in ys.iter_mut().zip(part) {
            y[bi * block..bi * block + yc.len()].copy_from_slice(&yc);
        }
    }
    true
}

/// Row-major B: `yc[j] = Σ_p x[p]·B[p, j0 + j]`.
fn gemv_rows<TB: FloatElement>(isa: Isa, x: &[f32], b: &MatRef<'_, TB>, j0: usize, yc: &mut [f32]) {
    let k = b.rows;
    let w = yc.len();
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = x86::rows_fn::<TB>(isa) {
        if k > 0 {
            // The view was validated: every (p, j) with p < k, j < n is inside b.data.
            let last = (k - 1) * b.row_stride + j0 + w;
            assert!(last <= b.data.len() && x.len() >= k);
            // SAFETY: rows p < k at stride row_stride, columns j0 .. j0+w are inside b.data
            // (checked above); yc has w elements; rows_fn only returns a function whose CPU
            // features are present.
            unsafe {
                f(
                    k,
                    x.as_ptr(),
                    b.data[j0..].as_ptr() as *const u8,
                    b.row_stride,
                    yc.as_mut_ptr(),
                    w,
                )
            };
        } else {
            yc.fill(0.0);
        }
        return;
    }
    let _ = isa;
    yc.fill(0.0);
    let mut buf = [0f32; 256];
    for (cj, ys) in yc.chunks_mut(buf.len()).enumerate() {
        let c0 = j0 + cj * buf.len();
        for (p, &xp) in x.iter().enumerate().take(k) {
            let s = p * b.row_stride + c0 * b.col_stride;
            let row = &mut buf[..ys.len()];
            if b.col_stride == 1 {
                convert_run(&b.data[s..s + ys.len()], row);
            } else {
                for (j, r) in row.iter_mut().enumerate() {
                    *r = b.data[s + j * b.col_stride].to_f32();
                }
            }
            for (y, &v) in ys.iter_mut().zip(row.iter()) {
                *y += xp * v;
            }
        }
    }
}

/// Column-major B: `yc[j] = Σ_p x[p]·B[p, j0 + j]`, a contiguous dot product per column.
fn gemv_cols<TB: FloatElement>(isa: Isa, x: &[f32], b: &MatRef<'_, TB>, j0: usize, yc: &mut [f32]) {
    let k = b.rows;
    let w = yc.len();
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = x86::cols_fn::<TB>(isa) {
        if k > 0 {
            let last = (j0 + w - 1) * b.col_stride + k;
            assert!(last <= b.data.len() && x.len() >= k);
            // SAFETY: columns j0 .. j0+w at stride col_stride, rows p < k are inside b.data
            // (checked above); yc has w elements; the CPU features are present.
            unsafe {
                f(
                    k,
                    x.as_ptr(),
                    b.data[j0 * b.col_stride..].as_ptr() as *const u8,
                    b.col_stride,
                    yc.as_mut_ptr(),
                    w,
                )
            };
        } else {
            yc.fill(0.0);
        }
        return;
    }
    let _ = isa;
    let mut buf = [0f32; 256];
    for (j, y) in yc.iter_mut().enumerate() {
        let s = (j0 + j) * b.col_stride;
        let mut acc = 0f32;
        for (p0, xs) in x[..k].chunks(buf.len()).enumerate() {
            let s = s + p0 * buf.len();
            let col = &mut buf[..xs.len()];
            convert_run(&b.data[s..s + xs.len()], col);
            for (&xp, &v) in xs.iter().zip(col.iter()) {
                acc += xp * v;
            }
        }
        *y = acc;
    }
}

/// Columns per block of the row-major kernels for elements of `elem` bytes. 16-bit weights
/// prefetch the next group of eight rows at the same columns, so a group's sweep (8 rows of the
/// block) must stay well inside L2 for those lines to be there when used: the block is sized so
/// that a sweep reads an eighth of L2 (8192 columns on a 1 MiB L2). Measured on the Zen 5 machine,
/// `1 × 50257 × 768` bf16: 3.1–3.9 ms unblocked, 2.2–2.7 ms in 8192-column blocks (1 thread),
/// 2.1–2.5 against 1.8–2.0 ms (2 threads). f32 weights go unblocked: without the prefetch the
/// long row runs stream best (blocks of 4096–16384 measured no better).
#[cfg(target_arch = "x86_64")]
fn column_block(elem: usize) -> usize {
    if elem >= 4 {
        return usize::MAX;
    }
    static BLOCK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BLOCK.get_or_init(|| {
        let l2 = super::blocking::CacheSizes::detect().l2;
        (l2 / 8 / (8 * 2)).next_multiple_of(64).max(1024)
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::Isa;
    use kiln_tensor::{DType, FloatElement};
    use std::arch::x86_64::*;

    /// `(k, x, b, stride, y, w)`: see `gemv_rows` / `gemv_cols`.
    pub type GemvFn = unsafe fn(usize, *const f32, *const u8, usize, *mut f32, usize);

    fn simd_ok<TB: FloatElement>(isa: Isa) -> bool {
        matches!(isa, Isa::Avx2 | Isa::Avx512)
            && matches!(TB::DTYPE, DType::F32 | DType::BF16 | DType::F16)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// The AVX2 row-major kernel for `TB`, when the CPU runs it.
    pub fn rows_fn<TB: FloatElement>(isa: Isa) -> Option<GemvFn> {
        if !simd_ok::<TB>(isa) {
            return None;
        }
        Some(match TB::DTYPE {
            DType::F32 => rows_f32,
            DType::BF16 => rows_bf16,
            _ => rows_f16,
        })
    }

    /// The AVX2 column-major kernel for `TB`, when the CPU runs it.
    pub fn cols_fn<TB: FloatElement>(isa: Isa) -> Option<GemvFn> {
        if !simd_ok::<TB>(isa) {
            return None;
        }
        Some(match TB::DTYPE {
            DType::F32 => cols_f32,
            DType::BF16 => cols_bf16,
            _ => cols_f16,
        })
    }

    macro_rules! load8 {
        (f32, $p:expr) => {
            _mm256_loadu_ps($p as *const f32)
        };
        (bf16, $p:expr) => {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128($p as *const __m128i)),
                16,
            ))
        };
        (f16, $p:expr) => {
            _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i))
        };
    }
    macro_rules! load1 {
        (f32, $p:expr) => {
            *($p as *const f32)
        };
        (bf16, $p:expr) => {
            f32::from_bits((*($p as *const u16) as u32) << 16)
        };
        (f16, $p:expr) => {
            half::f16::from_bits(*($p as *const u16)).to_f32()
        };
    }

    /// Sixteen consecutive weights as two 8-lane f32 vectors. f32 and f16 give them in order
    /// (`[0..8]`, `[8..16]`). bf16 gives the even and the odd elements (`[0, 2, …, 14]`,
    /// `[1, 3, …, 15]`): read as eight 32-bit words, the odd element already sits in the high
    /// half of its word (masking the low half makes it an f32) and the even one moves there by a
    /// 16-bit shift. That is one load, one AND and one shift per sixteen weights, against two
    /// zero-extending shuffles and two shifts for the ordered widening, which limited bf16 GEMV
    /// from L2. Measured on a Zen 3 core (best of 10, one thread), row-major `1 × 256 × 768`
    /// (L2-resident) 10.5 → 7.3 µs and `1 × 768 × 3072` 122 → 89 µs, with the 32-column step
    /// below; the 32-column step alone gave 9.9 and 117 µs. DRAM-sized weights are unchanged
    /// (bandwidth-bound).
    macro_rules! load16 {
        (f32, $p:expr) => {
            (load8!(f32, $p), load8!(f32, $p.add(8)))
        };
        (bf16, $p:expr) => {{
            let v = _mm256_loadu_si256($p as *const __m256i);
            (
                _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
                _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536))),
            )
        }};
        (f16, $p:expr) => {
            (load8!(f16, $p), load8!(f16, $p.add(8)))
        };
    }
    /// Whether [`load16`] gives this element type's sixteen weights split even / odd.
    macro_rules! split16 {
        (bf16) => {
            true
        };
        ($t:tt) => {
            false
        };
    }

    /// Undoes the even / odd split of `y[16t .. 16t + 16]` (evens in the first eight slots,
    /// odds in the last eight) for every full block of sixteen in `y[..w]`.
    ///
    /// # Safety
    /// `y` has `w` writable elements; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn interleave16(y: *mut f32, w: usize) {
        let mut j = 0;
        while j + 16 <= w {
            // SAFETY: j + 16 <= w elements of y.
            unsafe {
                let e = _mm256_loadu_ps(y.add(j));
                let o = _mm256_loadu_ps(y.add(j + 8));
                // [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7].
                let lo = _mm256_unpacklo_ps(e, o);
                let hi = _mm256_unpackhi_ps(e, o);
                _mm256_storeu_ps(y.add(j), _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(y.add(j + 8), _mm256_permute2f128_ps(lo, hi, 0x31));
            }
            j += 16;
        }
    }

    macro_rules! gemv_kernels {
        ($rows:ident, $cols:ident, $dot:ident, $t:tt, $elem:ty) => {
            /// Row-major: `y[j] = Σ_p x[p]·B[p, j]`, `j < w`, B row `p` at `b + p·rs` elements.
            ///
            /// # Safety
            /// B rows `p < k`, columns `j < w` readable; `x` has `k`, `y` has `w` elements;
            /// the CPU has AVX2, FMA (and F16C for f16).
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $rows(
                k: usize,
                x: *const f32,
                b: *const u8,
                rs: usize,
                y: *mut f32,
                w: usize,
            ) {
                /// `y[j] += Σ_{q<R} x[q]·B[q, j]` for the R rows at `b`, `b + rs`, …, each
                /// `y[j]` receiving its FMAs in order of q. y is loaded and stored once per R
                /// FMAs.
                ///
                /// # Safety
                /// As the enclosing function, for R rows from `x` and `b`.
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn group<const R: usize>(
                    x: *const f32,
                    b: *const $elem,
                    rs: usize,
                    y: *mut f32,
                    w: usize,
                ) {
                    // SAFETY (whole body): rows q < R, columns j < w (the contract above).
                    unsafe {
                        let xs: [f32; R] = std::array::from_fn(|q| *x.add(q));
                        let xv = xs.map(|v| _mm256_set1_ps(v));
                        let r: [*const $elem; R] = std::array::from_fn(|q| b.add(q * rs));
                        // 16-bit weights, groups of eight: the same columns of the next eight
                        // rows. Each row of a group is a short stream (a row run) that ends
                        // before the hardware prefetcher is far ahead; asking for the next
                        // group one group early keeps DRAM busy. Measured on a decode-sized
                        // sequence of weights: bf16 +15–35 %; for f32 it gained nothing from
                        // DRAM and cost load slots when B is cache-resident, so f32 goes
                        // without. One hint per row and 32 columns (a 64-byte line).
                        let prefetch_next_group = |j: usize| {
                            if R == 8 && std::mem::size_of::<$elem>() == 2 {
                                for &row in &r {
                                    _mm_prefetch::<_MM_HINT_T0>(
                                        row.wrapping_add(j + R * rs) as *const i8
                                    );
                                }
                            }
                        };
                        let mut j = 0;
                        // Four accumulators (32 columns) per step: each takes a chain of R
                        // dependent FMAs, and four chains keep both FMA pipes busy across
                        // their latency where two did not.
                        while j + 32 <= w {
                            prefetch_next_group(j);
                            let mut a = [
                                _mm256_loadu_ps(y.add(j)),
                                _mm256_loadu_ps(y.add(j + 8)),
                                _mm256_loadu_ps(y.add(j + 16)),
                                _mm256_loadu_ps(y.add(j + 24)),
                            ];
                            for q in 0..R {
                                let (v0, v1) = load16!($t, r[q].add(j));
                                let (v2, v3) = load16!($t, r[q].add(j + 16));
                                a[0] = _mm256_fmadd_ps(xv[q], v0, a[0]);
                                a[1] = _mm256_fmadd_ps(xv[q], v1, a[1]);
                                a[2] = _mm256_fmadd_ps(xv[q], v2, a[2]);
                                a[3] = _mm256_fmadd_ps(xv[q], v3, a[3]);
                            }
                            for (h, v) in a.iter().enumerate() {
                                _mm256_storeu_ps(y.add(j + 8 * h), *v);
                            }
                            j += 32;
                        }
                        // At most one block of 16 is left.
                        if j + 16 <= w {
                            prefetch_next_group(j);
                            // With a split load (bf16) y[j..j+16] holds this block's even
                            // columns, then its odd ones, until `interleave16`.
                            let mut a0 = _mm256_loadu_ps(y.add(j));
                            let mut a1 = _mm256_loadu_ps(y.add(j + 8));
                            for q in 0..R {
                                let (v0, v1) = load16!($t, r[q].add(j));
                                a0 = _mm256_fmadd_ps(xv[q], v0, a0);
                                a1 = _mm256_fmadd_ps(xv[q], v1, a1);
                            }
                            _mm256_storeu_ps(y.add(j), a0);
                            _mm256_storeu_ps(y.add(j + 8), a1);
                            j += 16;
                        }
                        while j + 8 <= w {
                            let mut a0 = _mm256_loadu_ps(y.add(j));
                            for q in 0..R {
                                a0 = _mm256_fmadd_ps(xv[q], load8!($t, r[q].add(j)), a0);
                            }
                            _mm256_storeu_ps(y.add(j), a0);
                            j += 8;
                        }
                        while j < w {
                            let mut acc = *y.add(j);
                            for q in 0..R {
                                acc = xs[q].mul_add(load1!($t, r[q].add(j)), acc);
                            }
                            *y.add(j) = acc;
                            j += 1;
                        }
                    }
                }

                let b = b as *const $elem;
                // SAFETY (whole body): every group reads rows p .. p+R < k, columns j < w
                // (the contract above).
                unsafe {
                    for j in 0..w {
                        *y.add(j) = 0.0;
                    }
                    // Column blocks, each swept through all k rows: the order of the FMAs
                    // into one y[j] is unchanged (bitwise the same result).
                    let cb = super::column_block(std::mem::size_of::<$elem>());
                    let mut j0 = 0;
                    while j0 < w {
                        let wc = cb.min(w - j0);
                        let (b, y) = (b.add(j0), y.add(j0));
                        let mut p = 0;
                        while p + 8 <= k {
                            group::<8>(x.add(p), b.add(p * rs), rs, y, wc);
                            p += 8;
                        }
                        while p + 4 <= k {
                            group::<4>(x.add(p), b.add(p * rs), rs, y, wc);
                            p += 4;
                        }
                        while p < k {
                            group::<1>(x.add(p), b.add(p * rs), rs, y, wc);
                            p += 1;
                        }
                        j0 += wc;
                    }
                    // Column blocks are multiples of 16 wide, so the split blocks are exactly
                    // the full blocks of sixteen from column 0.
                    if split16!($t) {
                        interleave16(y, w);
                    }
                }
            }

            /// Column-major: `y[j] = Σ_p x[p]·B[p, j]`, column `j` contiguous at `b + j·cs`.
            /// Columns are taken one after the other, so with `cs = k` (`wteᵀ`) B is read as
            /// one sequential stream.
            ///
            /// # Safety
            /// B columns `j < w`, rows `p < k` readable; `x` has `k`, `y` has `w` elements;
            /// the CPU has AVX2, FMA (and F16C for f16).
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $cols(
                k: usize,
                x: *const f32,
                b: *const u8,
                cs: usize,
                y: *mut f32,
                w: usize,
            ) {
                let b = b as *const $elem;
                // 16-bit weights: the column about 8 KiB ahead is requested while this one is
                // summed (the dot product of a 1.5 KiB bf16 column is too short for the hardware
                // prefetcher to run far enough ahead). Measured, 1 × 50257 × 768 bf16 `wteᵀ`, one
                // thread: 3.1–3.3 ms without, 2.1–2.7 ms with. f32 gained nothing (4.5–5.1 ms
                // either way), so it goes without.
                let bytes = k * std::mem::size_of::<$elem>();
                let ahead = if std::mem::size_of::<$elem>() == 2 {
                    (8192usize).div_ceil(bytes.max(1)).max(1)
                } else {
                    0
                };
                for j in 0..w {
                    if ahead > 0 && j + ahead < w {
                        let next = b.wrapping_add((j + ahead) * cs) as *const i8;
                        for o in (0..bytes).step_by(64) {
                            // A hint only (never faults); column j + ahead < w is inside B.
                            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(o));
                        }
                    }
                    // SAFETY: column j < w, as the contract says.
                    unsafe { *y.add(j) = $dot(k, x, b.add(j * cs)) };
                }
            }

            /// The dot product of `x` with one contiguous column: four 8-lane accumulators
            /// (depth blocks of 32), a fixed reduction tree, then the depth tail in order.
            ///
            /// # Safety
            /// The column has `k` readable elements, `x` has `k`.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $dot(k: usize, x: *const f32, col: *const $elem) -> f32 {
                // SAFETY: accesses are at p < k.
                unsafe {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut p = 0;
                    while p + 32 <= k {
                        for (q, a) in acc.iter_mut().enumerate() {
                            let o = p + 8 * q;
                            *a = _mm256_fmadd_ps(
                                _mm256_loadu_ps(x.add(o)),
                                load8!($t, col.add(o)),
                                *a,
                            );
                        }
                        p += 32;
                    }
                    while p + 8 <= k {
                        acc[0] = _mm256_fmadd_ps(
                            _mm256_loadu_ps(x.add(p)),
                            load8!($t, col.add(p)),
                            acc[0],
                        );
                        p += 8;
                    }
                    let s =
                        _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                    let mut v = _mm_cvtss_f32(h);
                    while p < k {
                        v = (*x.add(p)).mul_add(load1!($t, col.add(p)), v);
                        p += 1;
                    }
                    v
                }
            }
        };
    }

    gemv_kernels!(rows_f32, cols_f32, dot_f32, f32, f32);
    gemv_kernels!(rows_bf16, cols_bf16, dot_bf16, bf16, u16);
    gemv_kernels!(rows_f16, cols_f16, dot_f16, f16, u16);
}
