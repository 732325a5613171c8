//! The M = 1 path (GEMV, a decode step): `y[j] = Σ_p x[p]·B[p, j]`, streaming B once from
//! memory with no packing. It is bandwidth-bound, so bf16/f16 weights are widened in registers
//! (bf16: a 16-bit shift; f16: F16C) and read half the bytes of f32.
//!
//! Two layouts are streamed directly:
//! * row-major B (`[k, n]`, a Conv1D weight): each thread owns a run of columns; for every depth
//!   step `p` (four at a time) the row run `B[p, j0..j1]` is read contiguously and
//!   `y[j] = fma(x[p], B[p, j], y[j])` is applied in order of `p`; short rows
//!   (`depth_streams`) are summed as four runs of the depth read side by side instead,
//!   `y = ((y0 + y1) + y2) + y3`, two runs per thread when there are two;
//! * column-major B (`wteᵀ` for the logits): each column is a contiguous dot product, four
//!   8-lane accumulators summed by a fixed tree; each thread reads three runs of its columns side
//!   by side (three sequential streams, [`COL_STREAMS`]).
//!
//! Each output's arithmetic is independent of how columns (or the depth runs) are split among
//! threads, so results are bitwise identical for any thread count.
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
    #[cfg(target_arch = "x86_64")]
    if threads > 1 && row_major && n > 1 && gemv_depth_streams(isa, x, b, 0, y, true) {
        return true;
    }
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

/// How [`gemv`] forms each output for this B and `isa` ([`super::rows::Chain`]), or `None` when
/// it does not stream B's layout (neither a unit row nor a unit column stride). The batched
/// decode kernels (`rows.rs`) form each output in the same order.
pub(super) fn chain_of<TB: FloatElement>(
    isa: Isa,
    k: usize,
    n: usize,
    row_stride: usize,
    col_stride: usize,
) -> Option<super::rows::Chain> {
    use super::rows::Chain;
    let row_major = col_stride == 1 || n == 1;
    if !row_major && row_stride != 1 && k != 1 {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if row_major {
            if x86::streams_fn::<TB>(isa).is_some() && depth_streams::<TB>(isa, k, n) {
                return Some(Chain::FmaStreams);
            }
            if x86::rows_fn::<TB>(isa).is_some() {
                return Some(Chain::Fma);
            }
        } else if x86::cols_fn::<TB>(isa).is_some() {
            return Some(Chain::Dots);
        }
    }
    let _ = (isa, k);
    Some(if row_major {
        Chain::MulAdd
    } else {
        Chain::DotMulAdd
    })
}

/// Row-major B: `yc[j] = Σ_p x[p]·B[p, j0 + j]`.
fn gemv_rows<TB: FloatElement>(isa: Isa, x: &[f32], b: &MatRef<'_, TB>, j0: usize, yc: &mut [f32]) {
    let k = b.rows;
    let w = yc.len();
    #[cfg(target_arch = "x86_64")]
    if gemv_depth_streams(isa, x, b, j0, yc, false) {
        return;
    }
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

/// Row-major B through the depth-stream kernel when [`depth_streams`] says so (else false, `yc`
/// untouched): the depth cut into [`DEPTH_STREAMS`] runs of `⌈k / DEPTH_STREAMS⌉` rows, run `s`
/// summed into its own `y_s`, then `yc[j] = ((y_0[j] + y_1[j]) + y_2[j]) + y_3[j]`. With
/// `threads`, two runs per thread (two streams each), otherwise all four read side by side on
/// this thread; each run's arithmetic is the same either way.
#[cfg(target_arch = "x86_64")]
fn gemv_depth_streams<TB: FloatElement>(
    isa: Isa,
    x: &[f32],
    b: &MatRef<'_, TB>,
    j0: usize,
    yc: &mut [f32],
    threads: bool,
) -> bool {
    let (k, w, rs) = (b.rows, yc.len(), b.row_stride);
    let Some(f) = x86::streams_fn::<TB>(isa).filter(|_| depth_streams::<TB>(isa, k, b.cols)) else {
        return false;
    };
    let rows = k.div_ceil(DEPTH_STREAMS);
    // The view was validated: every (p, j) with p < k, j < n is inside b.data.
    assert!((k - 1) * rs + j0 + w <= b.data.len() && x.len() >= k);
    let mut ys = vec![vec![0f32; w]; DEPTH_STREAMS];
    // Runs s0 .. s0 + ys.len() into `ys`.
    let run = |s0: usize, ys: &mut [Vec<f32>]| {
        let p0 = (s0 * rows).min(k);
        let kk = (k - p0).min(ys.len() * rows);
        let outs: [*mut f32; DEPTH_STREAMS] = std::array::from_fn(|s| {
            ys.get_mut(s)
                .map_or(std::ptr::null_mut(), |y| y.as_mut_ptr())
        });
        let (xs, bs) = (&x[p0..], &b.data[(p0 * rs + j0).min(b.data.len())..]);
        // SAFETY: rows p0 .. p0+kk ≤ k at stride rs, columns j0 .. j0+w are inside b.data
        // (checked above), x has k elements, each of the ys.len() outputs w; `streams_fn` only
        // returns a kernel whose CPU features are present.
        unsafe {
            f(
                kk,
                rows,
                xs.as_ptr(),
                bs.as_ptr() as *const u8,
                rs,
                outs.as_ptr(),
                ys.len(),
                w,
            )
        }
    };
    if threads {
        let (lo, hi) = ys.split_at_mut(DEPTH_STREAMS / 2);
        rayon::join(|| run(0, lo), || run(DEPTH_STREAMS / 2, hi));
    } else {
        run(0, &mut ys);
    }
    for (j, y) in yc.iter_mut().enumerate() {
        *y = ys.iter().skip(1).fold(ys[0][j], |acc, part| acc + part[j]);
    }
    true
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

/// Sequential streams (runs of columns far apart) that one call of the column-major kernel reads
/// side by side, 32 elements of each in turn. One stream per column run ends before the hardware
/// prefetcher is far ahead (a 3 KiB f32 or 1.5 KiB bf16 column); several interleaved keep more
/// lines in flight. Measured on a Zen 3 core, `wteᵀ` (`1 × 50257 × 768`) in a decode-sized
/// sequence of weights: f32, one thread, 1 stream 17.2, 2: 19.5, 3: 22.7, 4: 23.9 GB/s (a probe,
/// medians of 7); in `examples/decode_gemv` against the kernel before (two streams taken a whole
/// column at a time on one thread, one stream with 8 KiB hints per thread on two), as a ratio
/// to the same run's `[768, 2304]` figure: f32 1t 1.13–1.16 (4 streams 1.15–1.19) against
/// 0.87–0.99; f32 2t 1.20–1.38 against 1.10–1.11; bf16 1t 21–22 against 12–15 GB/s; bf16 2t
/// 1.37–1.54 against 1.16–1.23. Three, not four: four need 16 accumulators and spill.
#[cfg(target_arch = "x86_64")]
const COL_STREAMS: usize = 3;

/// Rows of at most this many bytes are read as depth streams ([`depth_streams`]).
#[cfg(target_arch = "x86_64")]
const SHORT_ROW_BYTES: usize = 4096;

/// Runs of the depth that the depth-stream kernel reads side by side (fixed, whatever the
/// thread count, so that the result is too).
#[cfg(target_arch = "x86_64")]
const DEPTH_STREAMS: usize = 4;

/// Whether a row-major `k × n` B goes through the depth-stream kernel (`streams_*`): rows of
/// at most [`SHORT_ROW_BYTES`] (GPT-2's `[768, 768]` and `[3072, 768]`: 3 KiB rows in f32,
/// 1.5 KiB in bf16). The eight-row groups of the default kernel then read eight streams of 24–48
/// lines each, too short for the hardware prefetcher. Reading [`DEPTH_STREAMS`] runs of the
/// depth one whole row at a time instead, 32 columns of each run in turn, gives four long
/// sequential streams, summed at the end. Measured on a Zen 3 core, a decode-sized sequence of
/// f32 weights (a probe, medians of 7, one thread): `[768, 768]` and `[3072, 768]` 15.0–16.3 →
/// 18.4–19.2 GB/s (three runs: 18.0–19.0, two: 17.8–18.1); the long rows (`[768, 2304]`,
/// `[768, 3072]`) lose this way (18.7–20.2 → 17.1–18.0), so they keep the groups. (bf16, the
/// two halves one whole row at a time, before: `[768, 768]` and `[3072, 768]` 7.1–7.4 → 9.8–10.3.)
/// The price is paid when B is read from cache: one FMA per row and output (y loaded and stored
/// per row) runs well under the eight-row groups there (`1 × 768 × 768` bf16 hot in L3: 35 →
/// 66 µs), so B smaller than [`DEPTH_STREAM_MIN_BYTES`] (a small model's weights, likely to stay
/// cached between calls) keeps the groups.
///
/// Only for [`Isa::Avx2`] (a CPU without AVX-512): on the Zen 5 machine (AVX-512) the same
/// kernel ran the short rows at 10–11 GB/s against 27–29 for the eight-row groups
/// (`examples/decode_gemv f32 1`, `[768, 768]` and `[3072, 768]`; the whole step 23–24 → 15 ms),
/// so CPUs with AVX-512 keep the groups. The split depends on the ISA, `k` and `n` only, never on
/// threads.
#[cfg(target_arch = "x86_64")]
fn depth_streams<TB: FloatElement>(isa: Isa, k: usize, n: usize) -> bool {
    let elem = std::mem::size_of::<TB>();
    isa == Isa::Avx2
        && n * elem <= SHORT_ROW_BYTES
        && n >= 16
        && k * n * elem >= DEPTH_STREAM_MIN_BYTES
}

/// The smallest B (bytes) read as depth streams.
#[cfg(target_arch = "x86_64")]
const DEPTH_STREAM_MIN_BYTES: usize = 1 << 20;

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

    /// The kernel of `fns` (`[f32, bf16, f16]`) for `TB`, when the CPU runs it.
    fn pick<TB: FloatElement, F>(isa: Isa, fns: [F; 3]) -> Option<F> {
        if !simd_ok::<TB>(isa) {
            return None;
        }
        let [f32_fn, bf16_fn, f16_fn] = fns;
        Some(match TB::DTYPE {
            DType::F32 => f32_fn,
            DType::BF16 => bf16_fn,
            _ => f16_fn,
        })
    }

    /// The AVX2 row-major kernel for `TB`, when the CPU runs it.
    pub fn rows_fn<TB: FloatElement>(isa: Isa) -> Option<GemvFn> {
        if isa == Isa::Avx512
            && TB::DTYPE == DType::BF16
            && simd_ok::<TB>(isa)
            && is_x86_feature_detected!("avx512f")
        {
            return Some(rows_bf16_avx512);
        }
        pick::<TB, GemvFn>(isa, [rows_f32, rows_bf16, rows_f16])
    }

    /// Rows per group of [`rows_bf16_avx512`].
    const GROUP_512: usize = 12;

    /// Row-major bf16 with AVX-512: `y[j] = Σ_p x[p]·B[p, j]`, `j < w`, B row `p` at `b + p·rs`
    /// elements. Columns are taken 64 at a time (two 64-byte loads per row), each 32-bit word
    /// widened in place — a 16-bit shift gives the even column as f32, masking the low half the
    /// odd one — so one load, two integer ops and two FMAs cover 32 weights (half the
    /// instructions of the AVX2 kernel); groups of 12 rows, no blocking and no software
    /// prefetch. Measured on a Zen 5 core, `1 × 50257 × 768` from DRAM: groups of 4 / 8 / 12 / 16
    /// rows 29–31 / 35–37 / 39.6–39.7 / 36.5–36.7 GB/s against 30–32 for the AVX2 kernel; the
    /// unblocked, unprefetched loop beat 8192- and 16384-column blocks and prefetching one or two
    /// groups ahead (24–35 GB/s). Each `y[j]` receives its FMAs in order of p from 0, exactly as in
    /// the AVX2 kernel, so the two are bitwise equal; the last `w mod 64` columns are the AVX2
    /// kernel's.
    ///
    /// # Safety
    /// B rows `p < k`, columns `j < w` readable; `x` has `k`, `y` has `w` elements; the CPU has
    /// AVX-512F, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn rows_bf16_avx512(
        k: usize,
        x: *const f32,
        b: *const u8,
        rs: usize,
        y: *mut f32,
        w: usize,
    ) {
        let b = b as *const u16;
        let w64 = w / 64 * 64;
        // SAFETY (whole body): rows p < k, columns j < w64 ≤ w of B, and y[..w], as the contract
        // says; the tail call gets the columns w64..w of the same rows.
        unsafe {
            for j in 0..w64 {
                *y.add(j) = 0.0;
            }
            let mut p = 0;
            while p + GROUP_512 <= k {
                group_bf16_512::<GROUP_512>(x.add(p), b.add(p * rs), rs, y, w64);
                p += GROUP_512;
            }
            while p + 4 <= k {
                group_bf16_512::<4>(x.add(p), b.add(p * rs), rs, y, w64);
                p += 4;
            }
            while p < k {
                group_bf16_512::<1>(x.add(p), b.add(p * rs), rs, y, w64);
                p += 1;
            }
            // Each block of 32 holds its 16 even columns, then its 16 odd ones: interleave.
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            let mut j = 0;
            while j < w64 {
                let e = _mm512_loadu_ps(y.add(j));
                let o = _mm512_loadu_ps(y.add(j + 16));
                _mm512_storeu_ps(y.add(j), _mm512_permutex2var_ps(e, lo, o));
                _mm512_storeu_ps(y.add(j + 16), _mm512_permutex2var_ps(e, hi, o));
                j += 32;
            }
            if w64 < w {
                rows_bf16(k, x, b.add(w64) as *const u8, rs, y.add(w64), w - w64);
            }
        }
    }

    /// `y[j] += Σ_{q<R} x[q]·B[q, j]` for `j < w` (a multiple of 64), y in the split order of
    /// [`rows_bf16_avx512`]; each `y[j]` receives its FMAs in order of q.
    ///
    /// # Safety
    /// Rows q < R, columns j < w of B readable; `x` has R, `y` w elements; AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn group_bf16_512<const R: usize>(
        x: *const f32,
        b: *const u16,
        rs: usize,
        y: *mut f32,
        w: usize,
    ) {
        // SAFETY (whole body): reads rows q < R, columns j < w, and y[..w] (the contract).
        unsafe {
            let odd = _mm512_set1_epi32(0xffff_0000_u32 as i32);
            let xv: [__m512; R] = std::array::from_fn(|q| _mm512_set1_ps(*x.add(q)));
            let r: [*const u16; R] = std::array::from_fn(|q| b.add(q * rs));
            let mut j = 0;
            while j + 64 <= w {
                let yp = y.add(j);
                let mut a = [
                    _mm512_loadu_ps(yp),
                    _mm512_loadu_ps(yp.add(16)),
                    _mm512_loadu_ps(yp.add(32)),
                    _mm512_loadu_ps(yp.add(48)),
                ];
                for q in 0..R {
                    let v0 = _mm512_loadu_si512(r[q].add(j) as *const __m512i);
                    let v1 = _mm512_loadu_si512(r[q].add(j + 32) as *const __m512i);
                    let even0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0));
                    let odd0 = _mm512_castsi512_ps(_mm512_and_si512(v0, odd));
                    let even1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1));
                    let odd1 = _mm512_castsi512_ps(_mm512_and_si512(v1, odd));
                    a[0] = _mm512_fmadd_ps(xv[q], even0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv[q], odd0, a[1]);
                    a[2] = _mm512_fmadd_ps(xv[q], even1, a[2]);
                    a[3] = _mm512_fmadd_ps(xv[q], odd1, a[3]);
                }
                for (h, v) in a.iter().enumerate() {
                    _mm512_storeu_ps(yp.add(16 * h), *v);
                }
                j += 64;
            }
        }
    }

    /// `(k, rows, x, b, stride, ys, streams, w)`: see `streams_f32`.
    pub type StreamsFn =
        unsafe fn(usize, usize, *const f32, *const u8, usize, *const *mut f32, usize, usize);

    /// The AVX2 depth-stream row-major kernel for `TB`, when the CPU runs it.
    pub fn streams_fn<TB: FloatElement>(isa: Isa) -> Option<StreamsFn> {
        pick::<TB, StreamsFn>(isa, [streams_f32, streams_bf16, streams_f16])
    }

    /// `(k, x, b, stride, y, w)`: see `gemv_cols` and `cols_f32`.
    pub type ColsFn = unsafe fn(usize, *const f32, *const u8, usize, *mut f32, usize);

    /// The AVX2 column-major kernel for `TB`, when the CPU runs it.
    pub fn cols_fn<TB: FloatElement>(isa: Isa) -> Option<ColsFn> {
        pick::<TB, ColsFn>(isa, [cols_f32, cols_bf16, cols_f16])
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
        ($rows:ident, $rows_streams:ident, $group:ident, $cols:ident, $dots:ident, $t:tt, $elem:ty) => {
            /// `y[j] += Σ_{q<R} x[q]·B[q, j]` for the R rows at `b`, `b + rs`, …, each `y[j]`
            /// receiving its FMAs in order of q. y is loaded and stored once per R FMAs. With
            /// `ahead > 0`, every 32-column step also hints `row + ahead + j` of each row into L1
            /// (one 64-byte line of 16-bit weights): the callers point it at rows they read next.
            ///
            /// # Safety
            /// Rows q < R, columns j < w of B readable; `x` has R, `y` w elements; the CPU has
            /// AVX2, FMA (and F16C for f16).
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $group<const R: usize>(
                x: *const f32,
                b: *const $elem,
                rs: usize,
                ahead: usize,
                y: *mut f32,
                w: usize,
            ) {
                // SAFETY (whole body): rows q < R, columns j < w (the contract above).
                unsafe {
                    let xs: [f32; R] = std::array::from_fn(|q| *x.add(q));
                    let xv = xs.map(|v| _mm256_set1_ps(v));
                    let r: [*const $elem; R] = std::array::from_fn(|q| b.add(q * rs));
                    let prefetch = |j: usize| {
                        if ahead > 0 {
                            for &row in &r {
                                // A hint only: never faults, whatever the address.
                                _mm_prefetch::<_MM_HINT_T0>(
                                    row.wrapping_add(j + ahead) as *const i8
                                );
                            }
                        }
                    };
                    let mut j = 0;
                    // Four accumulators (32 columns) per step: each takes a chain of R
                    // dependent FMAs, and four chains keep both FMA pipes busy across their
                    // latency where two did not.
                    while j + 32 <= w {
                        prefetch(j);
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
                        prefetch(j);
                        // With a split load (bf16) y[j..j+16] holds this block's even columns,
                        // then its odd ones, until `interleave16`.
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
                let b = b as *const $elem;
                // 16-bit weights, groups of eight: the same columns of the next eight rows.
                // Each row of a group is a short stream (a row run) that ends before the
                // hardware prefetcher is far ahead; asking for the next group one group early
                // keeps DRAM busy. Measured on a decode-sized sequence of weights: bf16
                // +15–35 %; for f32 it gained nothing from DRAM and cost load slots when B is
                // cache-resident, so f32 goes without.
                let ahead8 = if std::mem::size_of::<$elem>() == 2 {
                    8 * rs
                } else {
                    0
                };
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
                            $group::<8>(x.add(p), b.add(p * rs), rs, ahead8, y, wc);
                            p += 8;
                        }
                        while p + 4 <= k {
                            $group::<4>(x.add(p), b.add(p * rs), rs, 0, y, wc);
                            p += 4;
                        }
                        while p < k {
                            $group::<1>(x.add(p), b.add(p * rs), rs, 0, y, wc);
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

            /// Row-major, as `streams ≤ DEPTH_STREAMS` runs of the depth read side by side: run
            /// `s` covers rows `s·rows .. min((s + 1)·rows, k)` and is summed into `ys[s]`,
            /// `ys[s][j] = Σ_{p in run s} x[p]·B[p, j]`, one row at a time, each `y[j]` receiving
            /// its FMAs in order of p (see [`super::depth_streams`]). 32 columns of each run's
            /// current row are taken in turn, so B is read as `streams` sequential streams. A
            /// run's arithmetic does not depend on which call reads it: two threads may each take
            /// two runs (a call each, `x` and `b` at the first row of its first run), bitwise the
            /// same.
            ///
            /// # Safety
            /// B rows `p < k`, columns `j < w` readable; `x` has `k` elements; `ys` holds
            /// `streams` pointers to `w` writable elements each; the CPU has AVX2, FMA (and F16C
            /// for f16).
            // A raw kernel entry (pointers and sizes, as `StreamsFn`), not an API.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $rows_streams(
                k: usize,
                rows: usize,
                x: *const f32,
                b: *const u8,
                rs: usize,
                ys: *const *mut f32,
                streams: usize,
                w: usize,
            ) {
                let b = b as *const $elem;
                // SAFETY (whole body): rows p < k of B, `streams` outputs of w elements (the
                // contract above).
                unsafe {
                    let ys = std::slice::from_raw_parts(ys, streams);
                    for &y in ys {
                        for j in 0..w {
                            *y.add(j) = 0.0;
                        }
                    }
                    for t in 0..rows {
                        // Runs still going at this row (a prefix: only the last may be shorter).
                        let live = (0..streams).take_while(|s| s * rows + t < k).count();
                        let mut j = 0;
                        while j < w {
                            // Chunks of 32 (the last shorter): each row's columns go through
                            // `$group` exactly as one call over the whole row would take them.
                            let wc = 32.min(w - j);
                            for (s, &y) in ys.iter().enumerate().take(live) {
                                let p = s * rows + t;
                                $group::<1>(x.add(p), b.add(p * rs + j), rs, 0, y.add(j), wc);
                            }
                            j += wc;
                        }
                    }
                    if split16!($t) {
                        for &y in ys {
                            interleave16(y, w);
                        }
                    }
                }
            }

            /// Column-major: `y[j] = Σ_p x[p]·B[p, j]`, column `j` contiguous at `b + j·cs`.
            /// Columns are taken one after the other, so with `cs = k` (`wteᵀ`) B is read as
            /// [`super::COL_STREAMS`] sequential streams summed side by side (with `cs = k`,
            /// `wteᵀ`, each a run of whole columns), without software prefetch. Each column's
            /// dot product does not depend on which stream reads it (bitwise).
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
                // COL_STREAMS sequential streams far apart (columns j, j + h, j + 2h, …),
                // summed side by side 32 elements at a time, no hints; the last w mod
                // COL_STREAMS columns one at a time.
                let h = w / super::COL_STREAMS;
                for j in 0..h {
                    let cols = std::array::from_fn(|s| b.wrapping_add((s * h + j) * cs));
                    // SAFETY: columns s·h + j < w, as the contract says.
                    let v = unsafe { $dots::<{ super::COL_STREAMS }>(k, x, cols) };
                    for (s, v) in v.into_iter().enumerate() {
                        // SAFETY: s·h + j < w.
                        unsafe { *y.add(s * h + j) = v };
                    }
                }
                for j in super::COL_STREAMS * h..w {
                    // SAFETY: column j < w, as the contract says.
                    unsafe { *y.add(j) = $dots::<1>(k, x, [b.add(j * cs)])[0] };
                }
            }

            /// The dot products of `x` with S contiguous columns, side by side (S sequential
            /// streams). Each column's arithmetic is that of a single one: four 8-lane
            /// accumulators (depth blocks of 32), a fixed reduction tree, then the depth tail in
            /// order, so a column's result does not depend on S.
            ///
            /// # Safety
            /// Each column has `k` readable elements, `x` has `k`.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $dots<const S: usize>(
                k: usize,
                x: *const f32,
                cols: [*const $elem; S],
            ) -> [f32; S] {
                // SAFETY: accesses are at p < k.
                unsafe {
                    let mut acc = [[_mm256_setzero_ps(); 4]; S];
                    let mut p = 0;
                    while p + 32 <= k {
                        for q in 0..4 {
                            let o = p + 8 * q;
                            let xv = _mm256_loadu_ps(x.add(o));
                            for s in 0..S {
                                acc[s][q] =
                                    _mm256_fmadd_ps(xv, load8!($t, cols[s].add(o)), acc[s][q]);
                            }
                        }
                        p += 32;
                    }
                    while p + 8 <= k {
                        let xv = _mm256_loadu_ps(x.add(p));
                        for s in 0..S {
                            acc[s][0] = _mm256_fmadd_ps(xv, load8!($t, cols[s].add(p)), acc[s][0]);
                        }
                        p += 8;
                    }
                    std::array::from_fn(|s| {
                        let a = &acc[s];
                        let t = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                        let h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
                        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                        let mut v = _mm_cvtss_f32(h);
                        for q in p..k {
                            v = (*x.add(q)).mul_add(load1!($t, cols[s].add(q)), v);
                        }
                        v
                    })
                }
            }
        };
    }

    gemv_kernels!(
        rows_f32,
        streams_f32,
        group_f32,
        cols_f32,
        dots_f32,
        f32,
        f32
    );
    gemv_kernels!(
        rows_bf16,
        streams_bf16,
        group_bf16,
        cols_bf16,
        dots_bf16,
        bf16,
        u16
    );
    gemv_kernels!(
        rows_f16,
        streams_f16,
        group_f16,
        cols_f16,
        dots_f16,
        f16,
        u16
    );
}
