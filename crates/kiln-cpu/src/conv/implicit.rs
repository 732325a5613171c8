//! Implicit GEMM: the patch matrix `im2col(big)` of one group of a chunk of images, never
//! stored. The GEMM asks for `KC × NR` panels of it and [`Patches`] gathers them straight from
//! the images, so the patch matrix (`Cb/G·kh·kw` times the pixel count, many times the image)
//! is neither written to memory nor read back.
//!
//! Rows are `(c, ki, kj)` (channel of the group, kernel tap), columns `(n, oy, ox)` (image of
//! the chunk, patch pixel), as in `im2col`:
//!
//! ```text
//! B[(c, ki, kj), (n, oy, ox)] = xp[n, g·Cb/G + c, oy·sh + ki·dh, ox·sw + kj·dw]
//!                             = xp[row_offset(c, ki, kj) + col_offset(n, oy, ox)]
//! ```
//!
//! where `xp` is the chunk's images with the padding written out as zeros (`[nb, Cb, Hb + 2ph,
//! Wb + 2pw]`, a copy only when there is padding), so every entry is one load and there is no
//! bounds test in the gather. The address splits into a row part and a column part, each
//! tabulated once per chunk; along a patch row consecutive columns step by `sw`.
use super::{gather, ConvGeometry};
use crate::gemm::PanelSource;

/// The chunk's images with their padding written out: `[nb, Cb, Hp, Wp]` with
/// `Hp = Hb + 2ph`, `Wp = Wb + 2pw`. For a convolution of stride 2 along the width each padded
/// plane is stored split by column parity instead, `[nb, Cb, 2, Hp, Wh]` (`Wh = ⌈Wp/2⌉`, the
/// even columns then the odd ones, an odd `Wp` leaving one zero at the end of the odd rows): a
/// patch row, which reads every other column, is then a contiguous run of one parity plane, so
/// the gather copies instead of keeping the even lanes of twice the data. The split is made
/// once per chunk here; the gather reads each image element `kh·kw/(sh·sw)` times. Measured on a
/// Zen 3 core, D2 of DCGAN forward: the gather 17.4 → 15.3 % of the microkernel's profile
/// samples (it waits on its scattered source lines more than on the shuffles).
pub(super) struct Padded {
    pub hp: usize,
    pub wp: usize,
    /// Columns of each parity plane when split (else 0).
    pub wh: usize,
}

impl Padded {
    pub fn new(g: &ConvGeometry) -> Padded {
        let (hp, wp) = (g.big[1] + 2 * g.padding[0], g.big[2] + 2 * g.padding[1]);
        let wh = if g.stride[1] == 2 { wp.div_ceil(2) } else { 0 };
        Padded { hp, wp, wh }
    }

    /// Whether the images can be used as they are (no padding, no split).
    pub fn is_identity(&self, g: &ConvGeometry) -> bool {
        g.padding == [0, 0] && self.wh == 0
    }

    /// Elements of one channel's padded plane (both parity planes when split).
    pub fn plane(&self) -> usize {
        if self.wh > 0 {
            2 * self.hp * self.wh
        } else {
            self.hp * self.wp
        }
    }

    /// Elements of `nb` padded images.
    pub fn len(&self, g: &ConvGeometry, nb: usize) -> usize {
        nb * g.big[0] * self.plane()
    }

    /// Scratch [`Padded::images`] needs for chunks of up to `nb` images (0 when the images are
    /// used as they are).
    pub fn scratch_len(&self, g: &ConvGeometry, nb: usize) -> usize {
        if self.is_identity(g) {
            0
        } else {
            self.len(g, nb)
        }
    }

    /// The images `xs` `[nb, Cb, Hb, Wb]` as padded images: `xs` itself when they need neither
    /// padding nor the split, otherwise their copy into `buf` (at least
    /// [`Padded::scratch_len`] elements).
    pub fn images<'a>(&self, g: &ConvGeometry, xs: &'a [f32], buf: &'a mut [f32]) -> &'a [f32] {
        if self.is_identity(g) {
            return xs;
        }
        let nb = xs.len() / (g.big[0] * g.big[1] * g.big[2]);
        let buf = &mut buf[..self.len(g, nb)];
        self.fill(g, xs, buf);
        buf
    }

    /// Writes `nb` images `src` `[nb, Cb, Hb, Wb]` into `dst` (the layout above), zero borders.
    pub fn fill(&self, g: &ConvGeometry, src: &[f32], dst: &mut [f32]) {
        let [_, hb, wb] = g.big;
        let [ph, pw] = g.padding;
        let (hp, wp, wh) = (self.hp, self.wp, self.wh);
        // In parallel over planes: on its own this copy was 7 % of a 2-thread D4 forward.
        use rayon::prelude::*;
        let planes = dst
            .par_chunks_exact_mut(self.plane())
            .zip(src.par_chunks_exact(hb * wb))
            .with_min_len(16);
        // Each plane is zeroed whole, then its rows written: zeroing only the border slots of
        // each row took a `memset` call per slot run (a slot or two each with small paddings).
        // On D3 of DCGAN (16 × 16 images, 8 MB) that was 6.5 % of the forward.
        if wh == 0 {
            planes.for_each(|(plane, img)| {
                plane.fill(0.0);
                for (y, row) in img.chunks_exact(wb).enumerate() {
                    plane[(ph + y) * wp + pw..][..wb].copy_from_slice(row);
                }
            });
            return;
        }
        planes.for_each(|(plane, img)| {
            plane.fill(0.0);
            let (even, odd) = plane.split_at_mut(hp * wh);
            for (y, row) in img.chunks_exact(wb).enumerate() {
                let e = &mut even[(ph + y) * wh..][..wh];
                let o = &mut odd[(ph + y) * wh..][..wh];
                split_row(row, pw, e, o);
            }
        });
    }
}

/// One padded row split by column parity: padded column `X` (`pw` zeros, `row`, zeros) goes to
/// `even[X/2]` or `odd[X/2]`. Only the row's own columns are written: the border slots must
/// already be zero.
fn split_row(row: &[f32], pw: usize, even: &mut [f32], odd: &mut [f32]) {
    // Source column i is padded column pw + i; column pairs (i, i + 1) from an even i land in
    // the same slot of both planes when pw is even, else in odd[at] and even[at + 1].
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        while i + 16 <= row.len() {
            let at = (pw + i) / 2;
            let (first, second) = if pw.is_multiple_of(2) {
                (&mut even[at..at + 8], &mut odd[at..at + 8])
            } else {
                (&mut odd[at..at + 8], &mut even[at + 1..at + 9])
            };
            // SAFETY: 16 source and 8 + 8 destination elements (the slices above); AVX2 is
            // present (detected above).
            unsafe {
                x86::split16(
                    row[i..i + 16].as_ptr(),
                    first.as_mut_ptr(),
                    second.as_mut_ptr(),
                )
            };
            i += 16;
        }
    }
    for (j, &v) in row.iter().enumerate().skip(i) {
        let x = pw + j;
        if x.is_multiple_of(2) {
            even[x / 2] = v;
        } else {
            odd[x / 2] = v;
        }
    }
}

/// The two address tables of [`Patches`] for a chunk of `nb` padded images (shared by the
/// groups: group `g`'s patches are the same tables over the images from channel `g·Cb/G` on).
pub(super) struct PatchTables {
    /// `c·Hp·Wp + ki·dh·Wp + kj·dw` for row `(c, ki, kj)` (split: `c·2·Hp·Wh + ki·dh·Wh` plus
    /// the parity plane and half column of `kj·dw`).
    row_offset: Vec<usize>,
    /// `n·Cb·Hp·Wp + oy·sh·Wp + ox·sw` for column `(n, oy, ox)` (split: `Wh` and `ox`).
    col_offset: Vec<usize>,
    step: usize,
}

impl PatchTables {
    /// Tables made by the caller (increasing, as [`Patches`]' vector gathers rely on).
    pub fn from_offsets(row_offset: Vec<usize>, col_offset: Vec<usize>, step: usize) -> Self {
        debug_assert!(row_offset.windows(2).all(|w| w[0] <= w[1]));
        debug_assert!(col_offset.windows(2).all(|w| w[0] <= w[1]));
        PatchTables {
            row_offset,
            col_offset,
            step,
        }
    }

    pub fn new(g: &ConvGeometry, pad: &Padded, nb: usize) -> Self {
        let (hp, plane) = (pad.hp, pad.plane());
        let [kh, kw] = g.kernel;
        let [dh, dw] = g.dilation;
        let [sh, sw] = g.stride;
        // Padded column X = ox·sw + kj·dw. Split by parity (sw = 2): X/2 = ox + ⌊kj·dw/2⌋ in
        // the plane of parity kj·dw mod 2, rows Wh apart; else X in one plane, rows Wp apart.
        let (width, step) = if pad.wh > 0 {
            (pad.wh, 1)
        } else {
            (pad.wp, sw)
        };
        let tap_col = |d: usize| {
            if pad.wh > 0 {
                (d % 2) * hp * pad.wh + d / 2
            } else {
                d
            }
        };
        let mut row_offset = Vec::with_capacity(g.cbg() * kh * kw);
        for c in 0..g.cbg() {
            for ki in 0..kh {
                for kj in 0..kw {
                    row_offset.push(c * plane + ki * dh * width + tap_col(kj * dw));
                }
            }
        }
        let [_, hs, ws] = g.small;
        let mut col_offset = Vec::with_capacity(nb * hs * ws);
        for n in 0..nb {
            for oy in 0..hs {
                for ox in 0..ws {
                    col_offset.push(n * g.big[0] * plane + oy * sh * width + ox * step);
                }
            }
        }
        PatchTables {
            row_offset,
            col_offset,
            step,
        }
    }
}

/// `im2col` of one group of a chunk of padded images, as a GEMM B operand
/// `[Cb/G·kh·kw, nb·Hs·Ws]` (see the module docs).
pub(super) struct Patches<'a> {
    /// The padded images from the group's first channel on.
    pub xp: &'a [f32],
    pub tables: &'a PatchTables,
}

impl PanelSource for Patches<'_> {
    fn rows(&self) -> usize {
        self.tables.row_offset.len()
    }

    fn cols(&self) -> usize {
        self.tables.col_offset.len()
    }

    /// `panel[p·nr + j] = xp[row_offset[p0 + p] + col_offset[c0 + j]]`. The panel's columns are
    /// cut once into runs of equal step `sw` (a run ends with a patch row or an image); each
    /// depth row is then one strided gather per run.
    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        let simd = Simd::detect();
        #[cfg(not(target_arch = "x86_64"))]
        let simd = Simd::None;
        self.pack_with(p0, kc, j0, nc, nr, dst, simd)
    }
}

impl Patches<'_> {
    /// [`PanelSource::pack`] with the row loop `simd` names (the CPU must have it); `Simd::None`
    /// is the scalar gathers, the reference the others are tested against.
    #[allow(clippy::too_many_arguments)]
    fn pack_with(
        &self,
        p0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
        simd: Simd,
    ) {
        let step = self.tables.step;
        let rows = &self.tables.row_offset[p0..p0 + kc];
        let panels = nc.div_ceil(nr);
        assert!(dst.len() >= panels * nr * kc);
        // Cut every panel's columns into runs of equal step (a run ends with a patch row, an
        // image or a panel), once for the whole call.
        let mut runs: Vec<Run> = Vec::with_capacity(2 * panels);
        for (j, &off) in self.tables.col_offset[j0..j0 + nc].iter().enumerate() {
            let (panel, col) = (j / nr, j % nr);
            if let Some(r) = runs.last_mut() {
                if r.panel == panel && r.off + r.len * step == off {
                    r.len += 1;
                    continue;
                }
            }
            runs.push(Run {
                at: panel * nr * kc + col,
                len: 1,
                off,
                panel,
            });
        }
        // The edge panel's columns past n are zeros.
        let edge =
            (!nc.is_multiple_of(nr)).then(|| ((panels - 1) * nr * kc + nc % nr, nr - nc % nr));
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        #[cfg(target_arch = "x86_64")]
        if simd != Simd::None {
            // The tables are increasing, so the last depth row and the largest run end bound
            // every index read.
            let last_row = rows.last().copied().unwrap_or(0);
            let last_col = runs
                .iter()
                .map(|r| r.off + step * (r.len - 1))
                .max()
                .unwrap_or(0);
            assert!(last_row + last_col < self.xp.len());
            // SAFETY: the instructions of `simd` are present (the caller's word); every index
            // read is at most last_row + last_col (asserted in bounds); every write is inside
            // the panels of `dst` (its length asserted above, runs built from columns < nc).
            unsafe {
                match simd {
                    Simd::Avx512 => x86::pack_depth_rows(dst, nr, rows, &runs, edge, self.xp, step),
                    _ => x86::pack_depth_rows_avx2(dst, nr, rows, &runs, edge, self.xp, step),
                }
            };
            return;
        }
        for (p, &row) in rows.iter().enumerate() {
            for r in &runs {
                let at = r.at + p * nr;
                gather(&mut dst[at..at + r.len], self.xp, row + r.off, step);
            }
            if let Some((at, len)) = edge {
                dst[at + p * nr..][..len].fill(0.0);
            }
        }
    }
}

/// Which row loop packs [`Patches`]: the scalar gathers, or a vector loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Simd {
    None,
    Avx2,
    Avx512,
}

/// A run of one panel's columns whose image offsets step by `sw`: depth row `p` of it is
/// `dst[at + p·nr ..][..len] = xp[row_offset[p] + off + sw·i]`.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// Offset of the run's first column in the packed block (depth row 0).
    at: usize,
    len: usize,
    /// Column offset of its first column.
    off: usize,
    panel: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    impl Simd {
        /// The widest row loop this CPU runs (detected at run time).
        pub fn detect() -> Simd {
            if is_x86_feature_detected!("avx512f") {
                Simd::Avx512
            } else if is_x86_feature_detected!("avx2") {
                Simd::Avx2
            } else {
                Simd::None
            }
        }
    }

    /// The low `n` lanes (`n ≤ 16`).
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// [`super::Patches::pack`]'s loops with 16-lane loads: a unit-step run is a (masked)
    /// copy; a step-2 run reads 32 consecutive floats and keeps the even lanes with one
    /// `vpermt2ps` (16 outputs for three instructions). Other steps go element by element.
    /// Depth rows are the outer loop, so the image is read in order (channel by channel), each
    /// plane once per tap while it sits in L1.
    ///
    /// # Safety
    /// The CPU has AVX-512F; for every row `r` of `rows` and run, the indices
    /// `r + off + step·i` (`i < len`) are inside `xp`; `dst` holds every `at + p·nr + len` and
    /// the edge's `at + p·nr + len` (`p < rows.len()`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_depth_rows(
        dst: &mut [f32],
        nr: usize,
        rows: &[usize],
        runs: &[super::Run],
        edge: Option<(usize, usize)>,
        xp: &[f32],
        step: usize,
    ) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let body = |out: *mut f32, start: usize, len: usize| {
            let src = xp.as_ptr().wrapping_add(start);
            // SAFETY (whole block): reads are inside the run's source span or, for whole
            // vectors, inside xp (checked); writes are out[..len] (inside dst).
            unsafe {
                let mut i = 0;
                match step {
                    1 => {
                        while i < len {
                            let m = lanes(len - i);
                            let v = _mm512_maskz_loadu_ps(m, src.wrapping_add(i));
                            _mm512_mask_storeu_ps(out.add(i), m, v);
                            i += 16;
                        }
                    }
                    2 => {
                        while i < len {
                            let n = (len - i).min(16);
                            let need = 2 * n - 1; // source floats of these n outputs
                            let (lo, hi) = if start + 2 * i + 32 <= xp.len() {
                                // Whole vectors: the common case (a masked load costs
                                // more, even with every lane enabled).
                                (
                                    _mm512_loadu_ps(src.wrapping_add(2 * i)),
                                    _mm512_loadu_ps(src.wrapping_add(2 * i + 16)),
                                )
                            } else {
                                (
                                    _mm512_maskz_loadu_ps(lanes(need), src.wrapping_add(2 * i)),
                                    _mm512_maskz_loadu_ps(
                                        lanes(need.saturating_sub(16)),
                                        src.wrapping_add(2 * i + 16),
                                    ),
                                )
                            };
                            let v = _mm512_permutex2var_ps(lo, even, hi);
                            _mm512_mask_storeu_ps(out.add(i), lanes(n), v);
                            i += 16;
                        }
                    }
                    _ => {
                        for i in 0..len {
                            *out.add(i) = *src.add(i * step);
                        }
                    }
                }
            }
        };
        // SAFETY: the contract above is for_each_run_row's; `body` writes only out[..len].
        unsafe { for_each_run_row(dst, nr, rows, runs, edge, xp.as_ptr(), step, body) };
    }

    /// The loop both row loops share: for each depth row `p` and run, `body(out, start, len)`
    /// fills `out[..len]` (`dst[at + p·nr ..]`) from the image at `xp[row_offset[p] + off ..]`
    /// (`start` is that index, the run's elements `step` apart); then the edge columns of the
    /// row are zeroed. Before each run, the span the same run reads [`HINT_ROWS_AHEAD`] depth
    /// rows later is hinted into L1.
    ///
    /// # Safety
    /// `dst` holds every `at + p·nr + len` and the edge's `at + p·nr + len`
    /// (`p < rows.len()`); `body` writes only `out[..len]`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn for_each_run_row(
        dst: &mut [f32],
        nr: usize,
        rows: &[usize],
        runs: &[super::Run],
        edge: Option<(usize, usize)>,
        xp: *const f32,
        step: usize,
        mut body: impl FnMut(*mut f32, usize, usize),
    ) {
        let base = dst.as_mut_ptr();
        for (p, &row) in rows.iter().enumerate() {
            let next = rows.get(p + HINT_ROWS_AHEAD).copied();
            for r in runs {
                if let Some(next) = next {
                    // The span this run reads HINT_ROWS_AHEAD depth rows on (a hint never
                    // faults, whatever the address).
                    let a = xp.wrapping_add(next + r.off) as *const i8;
                    for o in (0..((r.len - 1) * step + 1) * 4).step_by(64) {
                        // SAFETY: a prefetch only; it reads nothing into the program.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(o)) };
                    }
                }
                // SAFETY: at + p·nr + len is inside dst (the contract).
                body(unsafe { base.add(r.at + p * nr) }, row + r.off, r.len);
            }
            if let Some((at, len)) = edge {
                // SAFETY: the edge columns of depth row p are inside dst (the contract).
                unsafe { std::ptr::write_bytes(base.add(at + p * nr), 0, len) };
            }
        }
    }

    /// [`pack_depth_rows_avx2`] when every run has the same length `L` of 4, 8 or 16 and unit
    /// step, so that the 16-column panels are cut into equal runs: patch rows of 4, 8, 16 or 32
    /// pixels (D4, D3, D2 and D1 of DCGAN). Each run of each depth row is then one to two vector
    /// copies, with the span eight depth rows on hinted, and none of the general loop's
    /// per-run bookkeeping (no edge: every panel is full when its runs are). Measured on a Zen 3
    /// core, one thread, forward, three interleaved pairs: D1 6.3–6.4 → 5.7 ms, D2
    /// 50.1–51.1 → 47.7–48.0, D3 49.3–49.7 → 46.6–47.4, D4 (after the 4-lane remainder of the
    /// general loop, 49.9) 46.1–46.8.
    ///
    /// # Safety
    /// The CPU has AVX2; every run has `len == L`; for every row `r` of `rows` and run,
    /// `r + off + L − 1` is inside `xp`; `dst` holds every `at + nr·p + L` (`p < rows.len()`).
    #[target_feature(enable = "avx2")]
    unsafe fn pack_equal_runs<const L: usize>(
        dst: &mut [f32],
        nr: usize,
        rows: &[usize],
        runs: &[super::Run],
        xp: &[f32],
    ) {
        let (base, src) = (dst.as_mut_ptr(), xp.as_ptr());
        for (p, &row) in rows.iter().enumerate() {
            let next = rows.get(p + HINT_ROWS_AHEAD).copied();
            for r in runs {
                // SAFETY: reads xp[row + off ..][..L] and writes dst[at + nr·p ..][..L], both
                // inside their slices (the contract); a prefetch reads nothing into the program.
                unsafe {
                    if let Some(next) = next {
                        _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(next + r.off) as *const i8);
                    }
                    let s = src.add(row + r.off);
                    let d = base.add(r.at + p * nr);
                    match L {
                        4 => _mm_storeu_ps(d, _mm_loadu_ps(s)),
                        8 => _mm256_storeu_ps(d, _mm256_loadu_ps(s)),
                        _ => {
                            _mm256_storeu_ps(d, _mm256_loadu_ps(s));
                            _mm256_storeu_ps(d.add(8), _mm256_loadu_ps(s.add(8)));
                        }
                    }
                }
            }
        }
    }

    /// `first[t] = src[2t]`, `second[t] = src[2t + 1]` for `t < 8`.
    ///
    /// # Safety
    /// `src` has 16 readable elements, `first` and `second` 8 writable ones; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn split16(src: *const f32, first: *mut f32, second: *mut f32) {
        // SAFETY: the contract above.
        unsafe {
            let lo = _mm256_loadu_ps(src);
            let hi = _mm256_loadu_ps(src.add(8));
            // [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6] (and the odd ones), then the 64-bit pairs in
            // the order 0, 2, 1, 3.
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
            let order = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            _mm256_storeu_ps(first, order(e));
            _mm256_storeu_ps(second, order(o));
        }
    }

    /// Depth rows ahead whose sources [`for_each_run_row`] hints. A depth row is one (channel,
    /// kernel row, kernel column) of the patch; eight on is two kernel rows down for a 4 × 4
    /// kernel, input rows the hardware prefetcher does not see coming (each run a short piece of
    /// a different image row). Measured on a Zen 3 core, D2 of DCGAN (`64 → 128`, 32 × 32, k4
    /// s2, batch 64) forward, one thread, five interleaved runs: 55.6 → 53.8 ms (4 rows ahead:
    /// 54.4; 16 and 32: no better than none).
    const HINT_ROWS_AHEAD: usize = 8;

    /// [`pack_depth_rows`] with 8-lane AVX2 vectors: a unit-step run is a copy; a step-2 run
    /// reads 16 consecutive floats and keeps the even lanes with one `shufps` and one
    /// `vpermpd` (8 outputs). A remainder of 4 or more takes one 4-lane vector, the last 0–3
    /// elements go one by one, as does a read that would pass the end of `xp`. Other steps go
    /// element by element. (A `maskstore` for the remainder is slow on Zen 3: with it the
    /// 4-wide patch rows of D4 of DCGAN, `256 → 512` on 8 × 8, made the forward 55.0 ms on one
    /// core against 50.2 with the 4-lane copy.)
    ///
    /// # Safety
    /// As [`pack_depth_rows`], with AVX2 for AVX-512F.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_depth_rows_avx2(
        dst: &mut [f32],
        nr: usize,
        rows: &[usize],
        runs: &[super::Run],
        edge: Option<(usize, usize)>,
        xp: &[f32],
        step: usize,
    ) {
        // Runs of one length (whole panels, no edge): the plain copies of [`pack_equal_runs`].
        let len = runs.first().map_or(0, |r| r.len);
        if step == 1 && edge.is_none() && runs.iter().all(|r| r.len == len) {
            // SAFETY: every run has length `len`; the rest is this function's contract.
            unsafe {
                match len {
                    4 => return pack_equal_runs::<4>(dst, nr, rows, runs, xp),
                    8 => return pack_equal_runs::<8>(dst, nr, rows, runs, xp),
                    16 => return pack_equal_runs::<16>(dst, nr, rows, runs, xp),
                    _ => {}
                }
            }
        }
        let body = |out: *mut f32, start: usize, len: usize| {
            let src = xp.as_ptr().wrapping_add(start);
            // SAFETY (whole block): vector reads are whole vectors inside xp (checked
            // against its length) and element reads are inside the run's source span;
            // writes are out[..len] (inside dst), partial vectors masked.
            unsafe {
                let mut i = 0;
                match step {
                    1 => {
                        while i + 8 <= len && start + i + 8 <= xp.len() {
                            _mm256_storeu_ps(out.add(i), _mm256_loadu_ps(src.add(i)));
                            i += 8;
                        }
                        if i + 4 <= len && start + i + 4 <= xp.len() {
                            _mm_storeu_ps(out.add(i), _mm_loadu_ps(src.add(i)));
                            i += 4;
                        }
                    }
                    2 => {
                        while i + 8 <= len && start + 2 * i + 16 <= xp.len() {
                            let lo = _mm256_loadu_ps(src.add(2 * i));
                            let hi = _mm256_loadu_ps(src.add(2 * i + 8));
                            // [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6], then the 64-bit pairs
                            // in the order 0, 2, 1, 3.
                            let e = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
                            let v = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(
                                _mm256_castps_pd(e),
                            ));
                            _mm256_storeu_ps(out.add(i), v);
                            i += 8;
                        }
                        if i + 4 <= len && start + 2 * i + 8 <= xp.len() {
                            let lo = _mm_loadu_ps(src.add(2 * i));
                            let hi = _mm_loadu_ps(src.add(2 * i + 4));
                            let e = _mm_shuffle_ps::<0b10_00_10_00>(lo, hi);
                            _mm_storeu_ps(out.add(i), e);
                            i += 4;
                        }
                    }
                    _ => {}
                }
                while i < len {
                    *out.add(i) = *src.add(i * step);
                    i += 1;
                }
            }
        };
        // SAFETY: the contract above is for_each_run_row's; `body` writes only out[..len].
        unsafe { for_each_run_row(dst, nr, rows, runs, edge, xp.as_ptr(), step, body) };
    }
}

/// The transposed patch matrix `im2col(big)ᵀ` `[nb·Hs·Ws, Cb/G·kh·kw]` of one group, as a GEMM B
/// operand: the weight gradient `dW_g = small_g · im2col(big_g)ᵀ` takes it with the pixels as the
/// depth. `panel[p·nr + j] = xp[col_offset[p0 + p] + row_offset[c0 + j]]`.
pub(super) struct PatchesT<'a> {
    /// The padded images from the group's first channel on.
    pub xp: &'a [f32],
    pub tables: &'a PatchTables,
}

impl PanelSource for PatchesT<'_> {
    fn rows(&self) -> usize {
        self.tables.col_offset.len()
    }

    fn cols(&self) -> usize {
        self.tables.row_offset.len()
    }

    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        let pixels = &self.tables.col_offset[p0..p0 + kc];
        for (jp, panel) in dst
            .chunks_exact_mut(nr * kc)
            .take(nc.div_ceil(nr))
            .enumerate()
        {
            let c0 = j0 + jp * nr;
            let taps = &self.tables.row_offset[c0..c0 + nr.min(j0 + nc - c0)];
            for (out, &pixel) in panel.chunks_exact_mut(nr).zip(pixels) {
                let src = &self.xp[pixel..];
                for (o, &t) in out.iter_mut().zip(taps) {
                    *o = src[t];
                }
                out[taps.len()..].fill(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{Conv2dParams, ConvGeometry};

    /// The patch matrix read through the padded images (split by column parity for stride 2,
    /// odd and even widths and paddings) is `im2col` of the plain images: the image element or
    /// a zero outside it.
    #[test]
    fn patches_are_im2col() {
        for &(c, h, w, k, s, p, nb) in &[
            (2, 7, 9, 3, 2, 1, 2),
            (3, 8, 8, 4, 2, 1, 1),
            (2, 6, 11, 4, 2, 2, 2),
            (1, 5, 16, 3, 2, 0, 1),
            (2, 9, 13, 3, 1, 1, 1),
            (1, 10, 19, 5, 3, 2, 1),
        ] {
            let g = ConvGeometry::conv2d([nb, c, h, w], [4, c, k, k], &Conv2dParams::new(s, p))
                .unwrap();
            let pad = Padded::new(&g);
            assert_eq!(pad.wh > 0, s == 2);
            let x: Vec<f32> = (0..nb * c * h * w).map(|i| i as f32 + 1.0).collect();
            let mut buf = vec![f32::NAN; pad.scratch_len(&g, nb)];
            let xp = pad.images(&g, &x, &mut buf);
            let tables = PatchTables::new(&g, &pad, nb);
            let src = Patches {
                xp,
                tables: &tables,
            };
            let (kk, n) = (src.rows(), src.cols());
            let mut got = vec![f32::NAN; n.div_ceil(16) * 16 * kk];
            src.pack_with(0, kk, 0, n, 16, &mut got, Simd::None);
            let [_, hs, ws] = g.small;
            for (r, (ci, ki, kj)) in (0..c)
                .flat_map(|ci| (0..k).flat_map(move |ki| (0..k).map(move |kj| (ci, ki, kj))))
                .enumerate()
            {
                for col in 0..n {
                    let (ni, oy, ox) = (col / (hs * ws), col / ws % hs, col % ws);
                    let (iy, ix) = (
                        (oy * s + ki) as isize - p as isize,
                        (ox * s + kj) as isize - p as isize,
                    );
                    let want = if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                        0.0
                    } else {
                        x[((ni * c + ci) * h + iy as usize) * w + ix as usize]
                    };
                    let at = (col / 16) * 16 * kk + r * 16 + col % 16;
                    assert_eq!(
                        got[at], want,
                        "{c}x{h}x{w} k{k} s{s} p{p}: row {r} col {col}"
                    );
                }
            }
        }
    }

    /// The AVX2 and AVX-512 gathers pack exactly what the scalar gathers pack, for unit, 2 and 3 steps,
    /// padded and unpadded, runs that end inside a panel, and edge panels.
    #[test]
    fn simd_pack_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        let loops: Vec<Simd> = match Simd::detect() {
            Simd::Avx512 => vec![Simd::Avx2, Simd::Avx512],
            Simd::Avx2 => vec![Simd::Avx2],
            Simd::None => {
                eprintln!("skipped: no AVX2 on this CPU");
                return;
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let loops: Vec<Simd> = Vec::new();
        for &(c, h, w, k, s, p, nb) in &[
            (3, 9, 13, 3, 1, 1, 2),
            (4, 16, 16, 4, 2, 1, 3),
            (2, 17, 33, 5, 2, 2, 1),
            (2, 11, 10, 3, 3, 0, 2),
            (1, 7, 7, 1, 1, 0, 1),
            // Patch rows 4, 6, 7 and 12 wide: the 4-lane copy and the 0–3 tails after it.
            (3, 8, 8, 4, 2, 1, 2),
            (2, 12, 12, 3, 2, 1, 2),
            (2, 13, 13, 3, 2, 1, 1),
            (2, 12, 12, 3, 1, 1, 1),
            // Patch rows of 16 and 32 (whole panel runs) and 8 (two runs a panel).
            (2, 32, 32, 4, 2, 1, 2),
            (2, 8, 64, 4, 2, 1, 1),
            (3, 16, 16, 4, 2, 1, 2),
        ] {
            let g = ConvGeometry::conv2d([nb, c, h, w], [5, c, k, k], &Conv2dParams::new(s, p))
                .unwrap();
            let pad = Padded::new(&g);
            let x: Vec<f32> = (0..nb * c * h * w).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut xp = vec![f32::NAN; pad.len(&g, nb)];
            pad.fill(&g, &x, &mut xp);
            let tables = PatchTables::new(&g, &pad, nb);
            let src = Patches {
                xp: &xp,
                tables: &tables,
            };
            let (kk, n) = (src.rows(), src.cols());
            for nr in [16, 32] {
                for (p0, kc) in [(0, kk), (kk / 2, kk - kk / 2)] {
                    for (j0, nc) in [(0, n), (3, n - 3)] {
                        let len = nc.div_ceil(nr) * nr * kc;
                        let mut a = vec![7.0; len];
                        src.pack_with(p0, kc, j0, nc, nr, &mut a, Simd::None);
                        for &simd in &loops {
                            let mut b = vec![9.0; len];
                            src.pack_with(p0, kc, j0, nc, nr, &mut b, simd);
                            assert_eq!(a, b, "{simd:?} {g:?} nr {nr} p0 {p0} j0 {j0}");
                        }
                    }
                }
            }
        }
    }
}
