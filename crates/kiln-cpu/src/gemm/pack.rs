//! Packing: copying a block of A or B into the contiguous, zero-padded layout the microkernel
//! streams through.
//!
//! * Packed A (`pack_a`): an `mc × kc` block as `⌈mc/MR⌉` micro-panels; panel `r` holds rows
//!   `r·MR .. r·MR+MR` as `kc` columns of `MR` elements: `panel[p·MR + i] = A[i0 + r·MR + i, p0 + p]`.
//! * Packed B (`pack_b_panel`): a `kc × NR` micro-panel as `kc` rows of `NR` elements:
//!   `panel[p·NR + j] = B[p0 + p, j0 + j]`, converted to f32 (f16/bf16 weights are widened here).
//!
//! Rows or columns past the matrix edge are written as zeros, so the microkernel always computes
//! a full `MR × NR` tile and never reads outside the packed buffers.
use super::MatRef;
use half::slice::HalfFloatSliceExt;
use kiln_tensor::{DType, FloatElement};

/// `dst[i] = src[i] as f32` for a contiguous run (a copy for f32, a shift for bf16, F16C for
/// f16 when the CPU has it).
#[inline]
pub fn convert_run<TB: FloatElement>(src: &[TB], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    match TB::DTYPE {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::BF16 => {
            let s: &[u16] = bytemuck::cast_slice(src);
            for (d, &x) in dst.iter_mut().zip(s) {
                *d = f32::from_bits((x as u32) << 16);
            }
        }
        DType::F16 => {
            let s: &[half::f16] = bytemuck::cast_slice(src);
            s.convert_to_f32_slice(dst);
        }
        _ => {
            for (d, x) in dst.iter_mut().zip(src) {
                *d = x.to_f32();
            }
        }
    }
}

/// The first `panels` whole micro-panels of a column-major A (`src` at the block's first
/// element, depth step `stride` apart): eight panels at a time, each depth step's `8·MR`
/// contiguous elements (whole cache lines, each read once) go to the eight panels, instead of one
/// panel's `MR` elements per line read (a column stride of 16 KiB, `W_gᵀ` of a transposed conv,
/// made every depth step of every panel a new line and page). Measured on a Zen 3 core, G2 of
/// DCGAN (transposed conv `512 → 256`, 4 × 4, batch 64) forward, one thread, four interleaved
/// pairs: 58.1–59.2 → 56.3–57.7 ms, `pack_a` 7.1 → 4.2 % of the profile. Each run is copied as
/// a fixed-size array (a slice copy of run-time length had become one `memmove` call per step).
fn pack_cols<const MR: usize>(
    src: &[f32],
    stride: usize,
    kc: usize,
    panels: usize,
    dst: &mut [f32],
) {
    const GROUP: usize = 8;
    for g0 in (0..panels).step_by(GROUP) {
        let g = GROUP.min(panels - g0);
        // The lines eight depth steps on are hinted: at such strides the hardware prefetcher
        // has nothing to follow.
        const AHEAD: usize = 8;
        for p in 0..kc {
            if p + AHEAD < kc {
                let at = (p + AHEAD) * stride + g0 * MR;
                prefetch_lines(&src[at..at + g * MR]);
            }
            let run = &src[p * stride + g0 * MR..][..g * MR];
            for (q, chunk) in run.chunks_exact(MR).enumerate() {
                let at = (g0 + q) * MR * kc + p * MR;
                let out: &mut [f32; MR] = (&mut dst[at..at + MR]).try_into().expect("MR");
                *out = chunk.try_into().expect("MR");
            }
        }
    }
}

/// Packs rows `i0 .. i0+mc`, columns `p0 .. p0+kc` of A into `⌈mc/MR⌉` micro-panels of
/// `kc × mr` (layout in the module comment). `dst` holds at least `⌈mc/mr⌉·mr·kc` elements.
#[allow(clippy::too_many_arguments)]
pub fn pack_a(
    a: &MatRef<'_, f32>,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    let panels = mc.div_ceil(mr);
    // Column-major A: the whole panels a group at a time ([`pack_cols`]), the rest below.
    let mut done = 0;
    if a.row_stride == 1 && kc > 0 && matches!(mr, 4 | 6 | 12) {
        let full = mc / mr;
        let src = &a.data[i0 + p0 * a.col_stride..];
        match mr {
            4 => pack_cols::<4>(src, a.col_stride, kc, full, dst),
            6 => pack_cols::<6>(src, a.col_stride, kc, full, dst),
            _ => pack_cols::<12>(src, a.col_stride, kc, full, dst),
        }
        done = full;
    }
    for (ip, panel) in dst
        .chunks_exact_mut(mr * kc)
        .take(panels)
        .enumerate()
        .skip(done)
    {
        let r0 = i0 + ip * mr;
        let rows = mr.min(i0 + mc - r0);
        if a.row_stride == 1 && rows == mr {
            // Column-major A with an MR that `pack_cols` has no copy for: each depth step is a
            // contiguous run of MR elements.
            let start = r0 + p0 * a.col_stride;
            for (p, out) in panel.chunks_exact_mut(mr).enumerate() {
                let s = p * a.col_stride;
                out.copy_from_slice(&a.data[start + s..start + s + mr]);
            }
            continue;
        }
        if a.col_stride == 1 && rows == mr && matches!(mr, 4 | 6 | 12) {
            // Row-major A: MR row streams read side by side, the panel written in order. The
            // next panel's rows are short streams (kc elements) the hardware prefetcher barely
            // sees before they end, so they are requested now.
            for i in mr..2 * mr {
                if r0 + i < i0 + mc {
                    let base = (r0 + i) * a.row_stride + p0;
                    prefetch_lines(&a.data[base..base + kc]);
                }
            }
            let row = |i: usize| {
                let base = (r0 + i) * a.row_stride + p0;
                &a.data[base..base + kc]
            };
            #[cfg(target_arch = "x86_64")]
            if mr == 12 && !scalar_pack() && x86::available() {
                let rows: [&[f32]; 12] = std::array::from_fn(row);
                assert!(panel.len() >= 12 * kc);
                // SAFETY: each of the 12 rows has kc elements and the panel 12·kc (asserted;
                // `row` slices exactly kc); AVX2 and F16C are present (checked).
                unsafe { x86::interleave12(rows.map(|r| r.as_ptr()), kc, panel.as_mut_ptr()) };
                continue;
            }
            match mr {
                6 => interleave_rows::<6>(std::array::from_fn(row), panel),
                12 => interleave_rows::<12>(std::array::from_fn(row), panel),
                _ => interleave_rows::<4>(std::array::from_fn(row), panel),
            }
            continue;
        }
        for i in 0..rows {
            let base = (r0 + i) * a.row_stride + p0 * a.col_stride;
            if a.col_stride == 1 {
                let row = &a.data[base..base + kc];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * mr + i] = v;
                }
            } else {
                for p in 0..kc {
                    panel[p * mr + i] = a.data[base + p * a.col_stride];
                }
            }
        }
        for i in rows..mr {
            for p in 0..kc {
                panel[p * mr + i] = 0.0;
            }
        }
    }
}

/// `panel[p·MR + i] = rows[i][p]`: MR equally long rows interleaved depth step by depth step.
#[inline(always)]
fn interleave_rows<const MR: usize>(rows: [&[f32]; MR], panel: &mut [f32]) {
    let kc = rows[0].len();
    assert!(rows.iter().all(|r| r.len() == kc) && panel.len() >= kc * MR);
    for (p, out) in panel.chunks_exact_mut(MR).take(kc).enumerate() {
        let out: &mut [f32; MR] = out.try_into().expect("MR elements");
        for i in 0..MR {
            out[i] = rows[i][p];
        }
    }
}

/// Packs rows `p0 .. p0+kc`, columns `j0 .. j0+cols` (`cols ≤ nr`) of B into one `kc × nr`
/// micro-panel, converting to f32 and zero-filling columns `cols .. nr`. `dst` holds `kc·nr`.
#[allow(clippy::too_many_arguments)]
pub fn pack_b_panel<TB: FloatElement>(
    b: &MatRef<'_, TB>,
    p0: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    nr: usize,
    dst: &mut [f32],
) {
    debug_assert!(cols <= nr && dst.len() >= kc * nr);
    if b.col_stride == 1 || cols == 1 {
        // Row-major B (a Conv1D weight `[in, out]`): each depth step is a contiguous run.
        for p in 0..kc {
            let s = (p0 + p) * b.row_stride + j0 * b.col_stride;
            let out = &mut dst[p * nr..p * nr + nr];
            convert_run(&b.data[s..s + cols], &mut out[..cols]);
            out[cols..].fill(0.0);
        }
    } else if b.row_stride == 1 {
        // Column-major B (`wteᵀ` for the logits, `colᵀ` of a conv weight gradient): each
        // column is a contiguous run of depth. Eight columns × eight depth steps at a time are
        // transposed in registers where the CPU can; the rest goes element by element.
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if cols >= 8 && x86::available() {
            done = cols / 8 * 8;
            for j in (0..done).step_by(8) {
                let base = |i: usize| p0 + (j0 + j + i) * b.col_stride;
                // The view was validated: column j0+j+7 holds depth p0 .. p0+kc.
                assert!(base(7) + kc <= b.data.len());
                let mut p = 0;
                while p + 8 <= kc {
                    let srcs: [*const TB; 8] =
                        std::array::from_fn(|i| b.data[base(i) + p..].as_ptr());
                    let out = dst[p * nr + j..][..7 * nr + 8].as_mut_ptr();
                    // SAFETY: each source has 8 readable elements (asserted above), `out` has
                    // rows 0..8 of 8 elements at stride nr (the slice above); AVX2 and F16C are
                    // present (`x86::available`).
                    unsafe { x86::transpose8x8(srcs, out, nr) };
                    p += 8;
                }
                for i in 0..8 {
                    for q in p..kc {
                        dst[q * nr + j + i] = b.data[base(i) + q].to_f32();
                    }
                }
            }
        }
        let mut col = [0f32; 64];
        for j in done..cols {
            let s = p0 + (j0 + j) * b.col_stride;
            let mut p = 0;
            while p < kc {
                let len = (kc - p).min(col.len());
                convert_run(&b.data[s + p..s + p + len], &mut col[..len]);
                for (q, &v) in col[..len].iter().enumerate() {
                    dst[(p + q) * nr + j] = v;
                }
                p += len;
            }
        }
        for p in 0..kc {
            dst[p * nr + cols..p * nr + nr].fill(0.0);
        }
    } else {
        for p in 0..kc {
            let out = &mut dst[p * nr..p * nr + nr];
            for (j, o) in out.iter_mut().enumerate() {
                *o = if j < cols {
                    b.data[(p0 + p) * b.row_stride + (j0 + j) * b.col_stride].to_f32()
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs rows `p0 .. p0+kc`, columns `j0 .. j0+nc` of B as `⌈nc/nr⌉` consecutive micro-panels.
///
/// For a row-major B the copy runs over 8 rows at a time and, inside, over the panels: the
/// source is read as 8 sequential row streams and each panel receives 8 consecutive rows of
/// `NR` (one contiguous run), instead of one `NR`-wide column strip of every row per panel.
/// Where the CPU has AVX2 the whole panels are copied with 8-lane loads and stores
/// (`x86::pack_rows`, bitwise the scalar copy): bf16 weights were widened one element at a
/// time before, and `128 × 2304 × 768` with bf16 B went from 79 to 86 GFLOP/s on a Zen 3 core
/// (GPT-2 124M bf16 prefill of 128 tokens 315 → 288 ms); f32 B is unchanged (84).
#[allow(clippy::too_many_arguments)]
pub fn pack_b<TB: FloatElement>(
    b: &MatRef<'_, TB>,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    nr: usize,
    dst: &mut [f32],
) {
    let panels = nc.div_ceil(nr);
    if b.col_stride != 1 || nc < nr {
        for (jp, panel) in dst.chunks_exact_mut(nr * kc).take(panels).enumerate() {
            let c0 = j0 + jp * nr;
            pack_b_panel(b, p0, kc, c0, nr.min(j0 + nc - c0), nr, panel);
        }
        return;
    }
    let full = nc / nr; // panels without an edge
    #[cfg(target_arch = "x86_64")]
    if full > 0 && kc > 0 && nr.is_multiple_of(8) && x86::available() && !scalar_pack() {
        // Every element read: rows p0 .. p0+kc, columns j0 .. j0+full·nr.
        assert!((p0 + kc - 1) * b.row_stride + j0 + full * nr <= b.data.len());
        assert!(dst.len() >= full * nr * kc);
        // SAFETY: the source range was checked above, `dst` holds `full` panels of kc × nr;
        // AVX2 and F16C are present (`x86::available`).
        unsafe {
            x86::pack_rows(
                b.data[p0 * b.row_stride + j0..].as_ptr(),
                b.row_stride,
                kc,
                full,
                nr,
                dst.as_mut_ptr(),
            )
        };
    } else {
        pack_rows_scalar(b, p0, kc, j0, full, nr, dst);
    }
    #[cfg(not(target_arch = "x86_64"))]
    pack_rows_scalar(b, p0, kc, j0, full, nr, dst);
    if full < panels {
        let c0 = j0 + full * nr;
        let panel = &mut dst[full * nr * kc..(full + 1) * nr * kc];
        pack_b_panel(b, p0, kc, c0, j0 + nc - c0, nr, panel);
    }
}

#[cfg(test)]
thread_local! {
    /// Tests force the scalar [`pack_rows_scalar`] with this (to compare it with the SIMD copy).
    static SCALAR_PACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
#[cfg(test)]
fn scalar_pack() -> bool {
    SCALAR_PACK.with(|c| c.get())
}
#[cfg(all(not(test), target_arch = "x86_64"))]
#[inline(always)]
fn scalar_pack() -> bool {
    false
}

/// The `full` whole panels of [`pack_b`] for a row-major B, in plain Rust: 8 depth rows at a
/// time, each row's runs of `NR` written to their panels, the same runs 8 rows further on hinted
/// into L1.
fn pack_rows_scalar<TB: FloatElement>(
    b: &MatRef<'_, TB>,
    p0: usize,
    kc: usize,
    j0: usize,
    full: usize,
    nr: usize,
    dst: &mut [f32],
) {
    const ROWS: usize = 8;
    for pb in (0..kc).step_by(ROWS) {
        let rows = ROWS.min(kc - pb);
        for jp in 0..full {
            let panel = &mut dst[jp * nr * kc..(jp + 1) * nr * kc];
            for p in pb..pb + rows {
                let s = (p0 + p) * b.row_stride + j0 + jp * nr;
                // The same run ROWS depth rows further on, for the next pass of this loop.
                if p + ROWS < kc {
                    let ahead = s + ROWS * b.row_stride;
                    prefetch_lines(&b.data[ahead..ahead + nr]);
                }
                let out = &mut panel[p * nr..p * nr + nr];
                match nr {
                    16 => convert_fixed::<TB, 16>(&b.data[s..s + 16], out),
                    32 => convert_fixed::<TB, 32>(&b.data[s..s + 32], out),
                    _ => convert_run(&b.data[s..s + nr], out),
                }
            }
        }
    }
}

/// [`convert_run`] for a run of exactly `N` elements (a fixed-size copy the compiler inlines).
#[inline(always)]
fn convert_fixed<TB: FloatElement, const N: usize>(src: &[TB], dst: &mut [f32]) {
    if TB::DTYPE == DType::F32 {
        let s: &[f32] = bytemuck::cast_slice(src);
        let s: &[f32; N] = s.try_into().expect("N elements");
        let d: &mut [f32; N] = dst.try_into().expect("N elements");
        *d = *s;
    } else {
        convert_run(src, dst);
    }
}

/// Hints every cache line of `data` into L1.
#[inline]
pub(crate) fn prefetch_lines<T>(data: &[T]) {
    let bytes = std::mem::size_of_val(data);
    let base = data.as_ptr() as *const i8;
    for off in (0..bytes).step_by(64) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint and never faults; `off` is inside `data` anyway.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(base.add(off));
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (base, off);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use kiln_tensor::{DType, FloatElement};
    use std::arch::x86_64::*;

    /// Whether [`transpose8x8`] can run (AVX2 and F16C, detected at run time).
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
    }

    /// Eight consecutive elements as f32 (exact widening for bf16 and f16).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8<TB: FloatElement>(p: *const TB) -> __m256 {
        // SAFETY: the caller's contract: 8 readable elements at p.
        unsafe {
            match TB::DTYPE {
                DType::F32 => _mm256_loadu_ps(p as *const f32),
                DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                    16,
                )),
                DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _ => _mm256_setr_ps(
                    (*p).to_f32(),
                    (*p.add(1)).to_f32(),
                    (*p.add(2)).to_f32(),
                    (*p.add(3)).to_f32(),
                    (*p.add(4)).to_f32(),
                    (*p.add(5)).to_f32(),
                    (*p.add(6)).to_f32(),
                    (*p.add(7)).to_f32(),
                ),
            }
        }
    }

    /// [`super::pack_rows_scalar`] with 8-lane loads and stores and no bounds checks: `full`
    /// panels of `kc × nr` from the row-major source at `src` (row stride `rs` elements), in
    /// the same order and with the same hints. The values are exact conversions, so the packed
    /// panels are bitwise those of the scalar copy.
    ///
    /// # Safety
    /// Rows `p < kc`, columns `j < full·nr` of the source are readable; `dst` holds
    /// `full·nr·kc` elements; `nr` is a multiple of 8; the CPU has AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn pack_rows<TB: FloatElement>(
        src: *const TB,
        rs: usize,
        kc: usize,
        full: usize,
        nr: usize,
        dst: *mut f32,
    ) {
        const ROWS: usize = 8;
        let line = 64 / std::mem::size_of::<TB>();
        // SAFETY (whole body): every read is at row p < kc, column < full·nr, every write at
        // panel jp < full, step p < kc, lane < nr (the contract above); hints never fault.
        unsafe {
            for pb in (0..kc).step_by(ROWS) {
                let rows = ROWS.min(kc - pb);
                for jp in 0..full {
                    let panel = dst.add(jp * nr * kc);
                    for p in pb..pb + rows {
                        let s = src.add(p * rs + jp * nr);
                        if p + ROWS < kc {
                            let ahead = s.wrapping_add(ROWS * rs);
                            for q in (0..nr).step_by(line) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(q) as *const i8);
                            }
                        }
                        let out = panel.add(p * nr);
                        for q in (0..nr).step_by(8) {
                            _mm256_storeu_ps(out.add(q), load8(s.add(q)));
                        }
                    }
                }
            }
        }
    }

    /// `panel[p·12 + i] = rows[i][p]` for `i < 12`, `p < kc` (the row-major A panel of the
    /// `12 × 32` kernel): eight depth steps at a time, rows 0..8 by [`transpose8x8`] and rows
    /// 8..12 by [`transpose4x8`], the last `kc mod 8` steps element by element. A copy, so
    /// bitwise the scalar interleave. Measured on a Zen 5 core: the scalar interleave was 9 % of a
    /// 256³ product.
    ///
    /// # Safety
    /// Each `rows[i]` has `kc` readable elements, `panel` `12·kc` writable ones; AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn interleave12(rows: [*const f32; 12], kc: usize, panel: *mut f32) {
        // SAFETY (whole body): reads at p < kc of each row, writes at p·12 + i < 12·kc.
        unsafe {
            let mut p = 0;
            while p + 8 <= kc {
                let out = panel.add(12 * p);
                transpose8x8::<f32>(std::array::from_fn(|i| rows[i].add(p)), out, 12);
                transpose4x8(std::array::from_fn(|i| rows[8 + i].add(p)), out.add(8), 12);
                p += 8;
            }
            while p < kc {
                for (i, r) in rows.iter().enumerate() {
                    *panel.add(12 * p + i) = *r.add(p);
                }
                p += 1;
            }
        }
    }

    /// `dst[q·nr + i] = src[i][q]` for `i < 4`, `q < 8` (four rows of eight become eight packed
    /// quads).
    ///
    /// # Safety
    /// Each `src[i]` has 8 readable f32; `dst` is writable at `q·nr + i` for `q < 8`, `i < 4`;
    /// AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn transpose4x8(src: [*const f32; 4], dst: *mut f32, nr: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            let r = src.map(|p| _mm256_loadu_ps(p));
            // [r0_0 r1_0 r0_1 r1_1 | r0_4 r1_4 r0_5 r1_5] and the 2, 3 | 6, 7 pairs.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            // Columns (0 | 4), (1 | 5), (2 | 6), (3 | 7) of the four rows.
            let u = [
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xee>(t0, t2),
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xee>(t1, t3),
            ];
            for (q, v) in u.iter().enumerate() {
                _mm_storeu_ps(dst.add(q * nr), _mm256_castps256_ps128(*v));
                _mm_storeu_ps(dst.add((q + 4) * nr), _mm256_extractf128_ps::<1>(*v));
            }
        }
    }

    /// `dst[q·nr + i] = src[i][q]` for `i, q < 8`: eight depth runs of eight columns become
    /// eight packed rows (unpack pairs, then quads, then swap 128-bit halves).
    ///
    /// # Safety
    /// Each `src[i]` has 8 readable elements; `dst` is writable at `q·nr + i` for `q, i < 8`;
    /// the CPU has AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn transpose8x8<TB: FloatElement>(src: [*const TB; 8], dst: *mut f32, nr: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            let r = src.map(|p| load8(p));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
            let rows = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (q, v) in rows.into_iter().enumerate() {
                _mm256_storeu_ps(dst.add(q * nr), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// The SIMD row copy of `pack_b` packs bitwise what the scalar copy packs: every dtype,
    /// odd depths, one to three whole panels with and without an edge panel, padded rows.
    fn simd_equals_scalar<TB: FloatElement>() {
        for &(kc, nc, nr, pad) in &[
            (1, 16, 16, 0),
            (7, 33, 16, 3),
            (9, 48, 16, 0),
            (33, 40, 8, 5),
            (17, 64, 32, 1),
            (64, 70, 32, 0),
        ] {
            let (p0, j0) = (2, 3);
            let rs = j0 + nc + pad;
            let data: Vec<TB> = (0..(p0 + kc) * rs)
                .map(|i| TB::from_f32(((i * 37 % 101) as f32 - 50.0) / 8.0))
                .collect();
            let b = MatRef {
                data: &data,
                rows: p0 + kc,
                cols: rs - pad,
                row_stride: rs,
                col_stride: 1,
            };
            let len = nc.div_ceil(nr) * nr * kc;
            let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            pack_b(&b, p0, kc, j0, nc, nr, &mut fast);
            SCALAR_PACK.with(|c| c.set(true));
            pack_b(&b, p0, kc, j0, nc, nr, &mut slow);
            SCALAR_PACK.with(|c| c.set(false));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "kc {kc} nc {nc} nr {nr}");
            assert!(fast.iter().all(|x| !x.is_nan()));
        }
    }

    /// The SIMD interleave of row-major A panels (MR = 12) packs bitwise what the scalar one
    /// packs: depths around its 8-step blocks, a partial last panel, row strides with gaps.
    #[test]
    fn a_panel_interleave_simd_equals_scalar() {
        for &(mc, kc, pad) in &[(12, 1, 0), (12, 7, 3), (24, 8, 0), (30, 17, 1), (36, 64, 5)] {
            let (i0, p0) = (1, 2);
            let rs = p0 + kc + pad;
            let data: Vec<f32> = (0..(i0 + mc) * rs)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0)
                .collect();
            let a = MatRef {
                data: &data,
                rows: i0 + mc,
                cols: rs - pad,
                row_stride: rs,
                col_stride: 1,
            };
            let len = mc.div_ceil(12) * 12 * kc;
            let (mut fast, mut slow) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            pack_a(&a, i0, mc, p0, kc, 12, &mut fast);
            SCALAR_PACK.with(|c| c.set(true));
            pack_a(&a, i0, mc, p0, kc, 12, &mut slow);
            SCALAR_PACK.with(|c| c.set(false));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "mc {mc} kc {kc}");
            assert!(fast.iter().all(|x| !x.is_nan()));
        }
    }

    #[test]
    fn row_pack_simd_equals_scalar() {
        simd_equals_scalar::<f32>();
        simd_equals_scalar::<bf16>();
        simd_equals_scalar::<f16>();
    }
}
