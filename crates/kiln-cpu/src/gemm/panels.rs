//! Column panels: a weight matrix laid out for streaming, the way a decode step reads it.
//!
//! A `k × n` matrix B is stored as `⌈n/32⌉` panels of [`PANEL`] = 32 columns, panel `q` holding
//! columns `32q .. 32q+32` as `k` contiguous rows of 32 elements (`[k, 32]`, the last panel
//! zero-padded): one 64-byte line per row for 16-bit weights. The M = 1 product then reads
//! every panel front to back and keeps its 32 outputs in registers for the whole depth:
//!
//! ```text
//! y[32q + j] = Σ_p x[p] · P_q[p, j]          (FMAs in order of p, from 0)
//! ```
//!
//! three panels at a time, i.e. three sequential streams per thread. The row-major `[k, n]`
//! layout a Conv1D checkpoint stores (read by [`super::gemv`]) gives one short stream per row
//! of a row group instead, and the hardware prefetcher runs out on 1.5 KiB rows: measured on a
//! Zen 3 core, GPT-2 124M's bf16 decode sequence of block weights 12–17 → 19–23 GB/s on one
//! thread (see `docs/gemm.md`).
//!
//! bf16 rows are stored in the order the AVX2 widening wants: within each half of 16 columns,
//! the 32-bit word `i` holds column `i` in its low and column `8 + i` in its high 16 bits, so
//! that a 16-bit shift gives columns `0..8` as f32 and masking the low half gives `8..16`, in
//! column order (one load, one shift, one AND per 16 weights; see [`slot`]). f16 and f32 rows
//! are in column order.
//!
//! Products with more rows take the same panels through the packed GEMM: a panel row is a
//! row-major run of B, so [`PanelMatrix`] is a [`PanelSource`] and packs what `pack_b` packs
//! from the dense matrix (bitwise the same products). Every output's arithmetic is independent
//! of how panels are split among threads, so results are bitwise identical for any thread count.
use super::driver::PanelSource;
use super::{GemmOptions, Isa, MatMut, MatRef};
use kiln_tensor::{AlignedBuffer, DType, Error, FloatElement, Result};
use rayon::prelude::*;
use std::marker::PhantomData;

/// Columns per panel.
pub const PANEL: usize = 32;

/// Panels read at once by one thread of the M = 1 product (sequential streams). Measured on a
/// Zen 3 core, GPT-2 124M's bf16 block weights (one thread): 1 stream 12–14, 2 streams
/// 17–19, 3 streams 19–23, 4 streams (16 accumulators: spills) 18–19 GB/s.
const STREAMS: usize = 3;

/// B larger than this (bytes) is split among threads (as [`super::gemv`]).
const PARALLEL_BYTES: usize = 256 << 10;

/// The position of column `j` (`0 ≤ j < 32`) inside a panel row of `dtype` elements.
///
/// bf16: column `16h + i` (`i < 8`) is element `16h + 2i`, column `16h + 8 + i` element
/// `16h + 2i + 1` (the even / odd 16-bit halves of eight 32-bit words). Others: `j`.
#[inline]
pub fn slot(dtype: DType, j: usize) -> usize {
    if dtype != DType::BF16 {
        return j;
    }
    let (h, r) = (j / 16, j % 16);
    16 * h + if r < 8 { 2 * r } else { 2 * (r - 8) + 1 }
}

/// A `k × n` matrix in column panels of `T` (f32, f16 or bf16), 64-byte aligned. See the
/// module documentation for the layout.
pub struct PanelMatrix<T: FloatElement> {
    k: usize,
    n: usize,
    data: AlignedBuffer,
    _elem: PhantomData<T>,
}

impl<T: FloatElement> Clone for PanelMatrix<T> {
    fn clone(&self) -> Self {
        PanelMatrix {
            k: self.k,
            n: self.n,
            data: self.data.clone(),
            _elem: PhantomData,
        }
    }
}

impl<T: FloatElement> std::fmt::Debug for PanelMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PanelMatrix")
            .field("dtype", &T::DTYPE)
            .field("k", &self.k)
            .field("n", &self.n)
            .finish()
    }
}

impl<T: FloatElement> PanelMatrix<T> {
    /// `b` (`[k, n]`, any strides, f32/f16/bf16) converted to `T` (round to nearest even, as
    /// [`FloatElement::from_f32`]) and laid out in panels. A row-major `b` is read in runs of 32
    /// (one panel row each), in parallel over panels.
    pub fn from_view<S: FloatElement>(b: &MatRef<'_, S>) -> Result<Self> {
        b.check("B")?;
        let (k, n) = (b.rows, b.cols);
        let panels = n.div_ceil(PANEL);
        let bytes = panels
            .checked_mul(PANEL)
            .and_then(|v| v.checked_mul(k))
            .and_then(|v| v.checked_mul(std::mem::size_of::<T>()))
            .ok_or_else(|| Error::invalid("panel matrix too large"))?;
        let mut data = AlignedBuffer::zeroed(bytes);
        if k > 0 && n > 0 {
            let slots: [usize; PANEL] = std::array::from_fn(|j| slot(T::DTYPE, j));
            // A group of whole panels per task, filled row by row: each task reads a long run
            // of every source row (converted in one call) and writes whole panel rows.
            let per = panels.div_ceil(4 * rayon::current_num_threads()).max(1);
            let dst = data.as_mut_slice::<T>();
            if b.row_stride == 1 && b.col_stride != 1 {
                // Column-major (the transpose of a row-major table, `wteᵀ`): each panel is 32
                // contiguous source columns, converted whole and transposed into panel rows.
                dst.par_chunks_mut(k * PANEL)
                    .enumerate()
                    .for_each(|(q, panel)| {
                        let j0 = q * PANEL;
                        let w = PANEL.min(n - j0);
                        // The 32 columns converted whole, then transposed row by row.
                        let mut cols = vec![T::from_f32(0.0); w * k];
                        for (j, col) in cols.chunks_exact_mut(k).enumerate() {
                            let s = (j0 + j) * b.col_stride;
                            convert_into(&b.data[s..s + k], col);
                        }
                        let mut run = [T::from_f32(0.0); PANEL];
                        for (p, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                            for (j, r) in run.iter_mut().enumerate().take(w) {
                                *r = cols[j * k + p];
                            }
                            store_row(&run[..w], row, &slots);
                        }
                    });
                return Ok(PanelMatrix {
                    k,
                    n,
                    data,
                    _elem: PhantomData,
                });
            }
            dst.par_chunks_mut(per * k * PANEL)
                .enumerate()
                .for_each(|(g, group)| {
                    let j0 = g * per * PANEL;
                    let w = (per * PANEL).min(n - j0);
                    let mut run = vec![T::from_f32(0.0); w];
                    for p in 0..k {
                        if b.col_stride == 1 {
                            let s = p * b.row_stride + j0;
                            convert_into(&b.data[s..s + w], &mut run);
                        } else {
                            for (j, r) in run.iter_mut().enumerate() {
                                let v = b.data[p * b.row_stride + (j0 + j) * b.col_stride];
                                *r = T::from_f32(v.to_f32());
                            }
                        }
                        for (q, chunk) in run.chunks(PANEL).enumerate() {
                            let row = &mut group[q * k * PANEL + p * PANEL..][..PANEL];
                            store_row(chunk, row, &slots);
                        }
                    }
                });
        }
        Ok(PanelMatrix {
            k,
            n,
            data,
            _elem: PhantomData,
        })
    }

    /// Rows (`k`).
    pub fn rows(&self) -> usize {
        self.k
    }
    /// Columns (`n`).
    pub fn cols(&self) -> usize {
        self.n
    }
    /// Number of panels, `⌈n/32⌉`.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }
    /// Bytes held (padding included).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }
    /// Bytes of the `k × n` elements (what one product streams, padding aside).
    pub fn matrix_bytes(&self) -> usize {
        self.k * self.n * std::mem::size_of::<T>()
    }

    /// The stored elements, panel after panel.
    pub fn as_slice(&self) -> &[T] {
        self.data.as_slice::<T>()
    }

    /// Panel `q` (`[k, 32]`).
    fn panel(&self, q: usize) -> &[T] {
        &self.as_slice()[q * self.k * PANEL..(q + 1) * self.k * PANEL]
    }

    /// Element `(p, j)` as f32. Panics when out of range.
    pub fn get(&self, p: usize, j: usize) -> f32 {
        assert!(p < self.k && j < self.n, "panel matrix index out of range");
        let q = j / PANEL;
        self.panel(q)[p * PANEL + slot(T::DTYPE, j % PANEL)].to_f32()
    }

    /// Column `j` of B (`k` elements) as f32 into `out`: a gather at a stride of one panel row.
    /// Panics when `j` or `out`'s length is out of range.
    pub fn column(&self, j: usize, out: &mut [f32]) {
        assert!(
            j < self.n && out.len() == self.k,
            "panel column out of range"
        );
        let panel = self.panel(j / PANEL);
        let sl = slot(T::DTYPE, j % PANEL);
        for (o, row) in out.iter_mut().zip(panel.chunks_exact(PANEL)) {
            *o = row[sl].to_f32();
        }
    }

    /// `y = x·B` (`x` of length k, `y` of length n, overwritten), the M = 1 product: every
    /// `y[j]` is `Σ_p x[p]·B[p, j]` by FMAs in order of p from 0, bitwise the same for any thread
    /// count and on every path (SIMD or not).
    pub fn gemv(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<()> {
        if x.len() != self.k || y.len() != self.n {
            return Err(Error::invalid(format!(
                "panel gemv: x has {} elements, y {}, B is {}x{}",
                x.len(),
                y.len(),
                self.k,
                self.n
            )));
        }
        if self.n == 0 {
            return Ok(());
        }
        if self.k == 0 {
            y.fill(0.0);
            return Ok(());
        }
        let threads = if self.matrix_bytes() >= PARALLEL_BYTES {
            rayon::current_num_threads()
        } else {
            1
        };
        // One run of whole panels per thread (long runs stream best, as in `gemv`).
        let per = self.panels().div_ceil(threads).max(1);
        let run = |(ci, yc): (usize, &mut [f32])| self.gemv_run(isa, x, ci * per, yc);
        if threads > 1 {
            y.par_chunks_mut(per * PANEL).enumerate().for_each(run);
        } else {
            y.chunks_mut(per * PANEL).enumerate().for_each(run);
        }
        Ok(())
    }

    /// `yc = x·B[:, 32·q0 ..]` for the panels `q0 ..` that `yc` covers: groups of
    /// [`STREAMS`] panels spread over the run (`i`, `i + r/3`, `i + 2r/3`), then the rest one
    /// at a time.
    fn gemv_run(&self, isa: Isa, x: &[f32], q0: usize, yc: &mut [f32]) {
        let np = yc.len().div_ceil(PANEL);
        let kernel = Kernel::for_isa::<T>(isa);
        let third = np / STREAMS;
        let mut tmp = [[0f32; PANEL]; STREAMS];
        for i in 0..third {
            let qs: [usize; STREAMS] = std::array::from_fn(|s| i + s * third);
            kernel.run3(self.k, x, qs.map(|q| self.panel(q0 + q)), &mut tmp);
            for (s, &q) in qs.iter().enumerate() {
                let w = PANEL.min(yc.len() - q * PANEL);
                yc[q * PANEL..q * PANEL + w].copy_from_slice(&tmp[s][..w]);
            }
        }
        for q in STREAMS * third..np {
            kernel.run1(self.k, x, self.panel(q0 + q), &mut tmp[0]);
            let w = PANEL.min(yc.len() - q * PANEL);
            yc[q * PANEL..q * PANEL + w].copy_from_slice(&tmp[0][..w]);
        }
    }
}

impl<T: FloatElement> PanelSource for PanelMatrix<T> {
    fn bf16_panels(&self) -> Option<&[u16]> {
        (T::DTYPE == DType::BF16).then(|| bytemuck::cast_slice(self.as_slice()))
    }
    fn rows(&self) -> usize {
        self.k
    }
    fn cols(&self) -> usize {
        self.n
    }
    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        let tiles = nc.div_ceil(nr);
        let data = self.as_slice();
        let simd = cfg!(target_arch = "x86_64") && T::DTYPE == DType::BF16 && widen_ok();
        for (t, tile) in dst.chunks_exact_mut(kc * nr).take(tiles).enumerate() {
            let c0 = j0 + t * nr;
            // Whole, aligned runs of 16 columns inside the stored panels: widened 16 at a time
            // (padding columns of the last panel are stored zeros).
            if nr.is_multiple_of(16) && c0.is_multiple_of(16) && c0 + nr <= self.panels() * PANEL {
                for h in 0..nr / 16 {
                    let c = c0 + 16 * h;
                    let base = (c / PANEL) * self.k * PANEL + p0 * PANEL + c % PANEL;
                    let src = &data[base..base + (kc - 1) * PANEL + 16];
                    for (p, out) in tile.chunks_exact_mut(nr).enumerate() {
                        let s = &src[p * PANEL..p * PANEL + 16];
                        let o = &mut out[16 * h..16 * h + 16];
                        if simd {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: s and o have 16 elements; AVX2 checked above.
                            unsafe {
                                x86::widen16_bf16(s.as_ptr() as *const u16, o.as_mut_ptr())
                            };
                        } else {
                            widen16(s, o);
                        }
                    }
                }
                continue;
            }
            for (p, out) in tile.chunks_exact_mut(nr).enumerate() {
                for (j, o) in out.iter_mut().enumerate() {
                    let c = c0 + j;
                    *o = if c < self.n { self.get(p0 + p, c) } else { 0.0 };
                }
            }
        }
    }
}

/// One panel row from up to 32 elements in column order: bf16 in [`slot`] order (a full row is
/// two 16-bit interleaves of its halves), others as they are.
#[inline]
fn store_row<T: FloatElement>(src: &[T], row: &mut [T], slots: &[usize; PANEL]) {
    if let (Ok(src), Ok(row)) = (
        <&[T; PANEL]>::try_from(src),
        <&mut [T; PANEL]>::try_from(&mut *row),
    ) {
        if T::DTYPE == DType::BF16 {
            for h in 0..2 {
                for i in 0..8 {
                    row[16 * h + 2 * i] = src[16 * h + i];
                    row[16 * h + 2 * i + 1] = src[16 * h + 8 + i];
                }
            }
        } else {
            *row = *src;
        }
        return;
    }
    for (&v, &sl) in src.iter().zip(slots) {
        row[sl] = v;
    }
}

/// Whether the AVX2 widening of bf16 panel rows runs on this CPU.
fn widen_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::widen_ok();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Sixteen stored elements of one half panel row (in [`slot`] order) as f32 in column order.
fn widen16<T: FloatElement>(src: &[T], dst: &mut [f32]) {
    if T::DTYPE == DType::BF16 {
        let s: &[u16] = bytemuck::cast_slice(src);
        for (r, d) in dst.iter_mut().enumerate().take(16) {
            *d = f32::from_bits((s[slot(DType::BF16, r)] as u32) << 16);
        }
        return;
    }
    super::pack::convert_run(&src[..16], &mut dst[..16]);
}

/// `dst[j] = T(src[j])` for one run: the SIMD converters where the pair has one, otherwise
/// element by element (round to nearest even either way).
fn convert_into<S: FloatElement, T: FloatElement>(src: &[S], dst: &mut [T]) {
    use kiln_tensor::convert;
    match (S::DTYPE, T::DTYPE) {
        (a, b) if a == b => dst.copy_from_slice(bytemuck::cast_slice(src)),
        (DType::F32, DType::BF16) => {
            convert::f32_to_bf16(bytemuck::cast_slice(src), bytemuck::cast_slice_mut(dst))
        }
        (DType::F32, DType::F16) => {
            convert::f32_to_f16(bytemuck::cast_slice(src), bytemuck::cast_slice_mut(dst))
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = T::from_f32(s.to_f32());
            }
        }
    }
}

/// The M = 1 panel kernels of one element type: AVX2 (when the CPU and `isa` allow) or plain
/// Rust, the same FMAs in the same order (bitwise equal).
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Simd(DType),
    Scalar,
}

impl Kernel {
    fn for_isa<T: FloatElement>(isa: Isa) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx2 | Isa::Avx512)
            && matches!(T::DTYPE, DType::F32 | DType::BF16 | DType::F16)
            && x86::kernels_ok()
        {
            return Kernel::Simd(T::DTYPE);
        }
        let _ = isa;
        Kernel::Scalar
    }

    /// `y[s][j] = Σ_p x[p]·P_s[p, j]` for three panels (`[k, 32]` each).
    fn run3<T: FloatElement>(
        self,
        k: usize,
        x: &[f32],
        p: [&[T]; STREAMS],
        y: &mut [[f32; PANEL]; STREAMS],
    ) {
        assert!(x.len() >= k && p.iter().all(|s| s.len() >= k * PANEL));
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: each panel has k rows of 32 elements and x has k (asserted above); the
            // CPU features were checked when the kernel was chosen.
            Kernel::Simd(dt) => unsafe {
                let ptrs = p.map(|s| s.as_ptr() as *const u8);
                let [y0, y1, y2] = y;
                let ys = [y0.as_mut_ptr(), y1.as_mut_ptr(), y2.as_mut_ptr()];
                x86::panels::<3>(dt, k, x.as_ptr(), ptrs, ys)
            },
            Kernel::Scalar => {
                for (s, ys) in y.iter_mut().enumerate() {
                    scalar_panel(k, x, p[s], ys);
                }
            }
        }
    }

    /// [`Kernel::run3`] for one panel.
    fn run1<T: FloatElement>(self, k: usize, x: &[f32], p: &[T], y: &mut [f32; PANEL]) {
        assert!(x.len() >= k && p.len() >= k * PANEL);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `run3`.
            Kernel::Simd(dt) => unsafe {
                x86::panels::<1>(
                    dt,
                    k,
                    x.as_ptr(),
                    [p.as_ptr() as *const u8],
                    [y.as_mut_ptr()],
                )
            },
            Kernel::Scalar => scalar_panel(k, x, p, y),
        }
    }
}

/// The reference panel product: `y[j] = Σ_p x[p]·P[p, j]`, one FMA per element in order of p.
fn scalar_panel<T: FloatElement>(k: usize, x: &[f32], panel: &[T], y: &mut [f32; PANEL]) {
    let slots: [usize; PANEL] = std::array::from_fn(|j| slot(T::DTYPE, j));
    let mut acc = [0f32; PANEL];
    for (p, row) in panel.chunks_exact(PANEL).take(k).enumerate() {
        for (a, &s) in acc.iter_mut().zip(&slots) {
            *a = x[p].mul_add(row[s].to_f32(), *a);
        }
    }
    *y = acc;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PANEL;
    use kiln_tensor::DType;
    use std::arch::x86_64::*;

    /// Whether the panel kernels (AVX2, FMA, F16C) run on this CPU.
    pub fn kernels_ok() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Whether [`widen16_bf16`] runs on this CPU.
    pub fn widen_ok() -> bool {
        is_x86_feature_detected!("avx2")
    }

    /// Sixteen bf16 in [`super::slot`] order at `s` as f32 in column order at `d`.
    ///
    /// # Safety
    /// `s` has 16 readable, `d` 16 writable elements; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn widen16_bf16(s: *const u16, d: *mut f32) {
        // SAFETY: the contract above.
        unsafe {
            let v = _mm256_loadu_si256(s as *const __m256i);
            _mm256_storeu_ps(d, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
            let hi = _mm256_and_si256(v, _mm256_set1_epi32(-65536));
            _mm256_storeu_ps(d.add(8), _mm256_castsi256_ps(hi));
        }
    }

    /// One panel row (32 elements at `p`) as four f32 vectors, columns `0..8, 8..16, 16..24,
    /// 24..32`.
    macro_rules! row32 {
        (f32, $p:expr) => {{
            let p = $p as *const f32;
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        }};
        (bf16, $p:expr) => {{
            let p = $p as *const __m256i;
            let m = _mm256_set1_epi32(-65536);
            let (a, b) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
            [
                _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                _mm256_castsi256_ps(_mm256_and_si256(a, m)),
                _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                _mm256_castsi256_ps(_mm256_and_si256(b, m)),
            ]
        }};
        (f16, $p:expr) => {{
            let p = $p as *const __m128i;
            [
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(2))),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(3))),
            ]
        }};
    }

    macro_rules! panel_kernel {
        ($name:ident, $t:tt, $elem:ty) => {
            /// `y[s][0..32] = Σ_p x[p]·P_s[p, 0..32]` for `S` panels read side by side: four
            /// accumulators per panel for the whole depth, FMAs in order of p.
            ///
            /// # Safety
            /// Each `p[s]` has `k` rows of 32 elements, `x` has `k`, each `y[s]` 32 writable;
            /// the CPU has AVX2, FMA and F16C.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const S: usize>(
                k: usize,
                x: *const f32,
                p: [*const u8; S],
                y: [*mut f32; S],
            ) {
                // SAFETY (whole body): rows p < k of every panel, the contract above.
                unsafe {
                    let p = p.map(|q| q as *const $elem);
                    let mut acc = [[_mm256_setzero_ps(); 4]; S];
                    for r in 0..k {
                        let xv = _mm256_set1_ps(*x.add(r));
                        for s in 0..S {
                            let v = row32!($t, p[s].add(r * PANEL));
                            for q in 0..4 {
                                acc[s][q] = _mm256_fmadd_ps(xv, v[q], acc[s][q]);
                            }
                        }
                    }
                    for s in 0..S {
                        for q in 0..4 {
                            _mm256_storeu_ps(y[s].add(8 * q), acc[s][q]);
                        }
                    }
                }
            }
        };
    }

    panel_kernel!(panels_f32, f32, f32);
    panel_kernel!(panels_bf16, bf16, u16);
    panel_kernel!(panels_f16, f16, u16);

    /// The kernel of `dt` for `S` panels.
    ///
    /// # Safety
    /// As the kernels: each `p[s]` has `k` rows of 32 elements of `dt`, `x` has `k`, each
    /// `y[s]` 32 writable; the CPU has AVX2, FMA and F16C.
    pub unsafe fn panels<const S: usize>(
        dt: DType,
        k: usize,
        x: *const f32,
        p: [*const u8; S],
        y: [*mut f32; S],
    ) {
        // SAFETY: the contract above, passed on.
        unsafe {
            match dt {
                DType::BF16 => panels_bf16::<S>(k, x, p, y),
                DType::F16 => panels_f16::<S>(k, x, p, y),
                _ => panels_f32::<S>(k, x, p, y),
            }
        }
    }
}

/// `C = alpha·A·B + beta·C` then the epilogue, B in column panels. Shapes: A `[m, k]`, C
/// `[m, n]`, any strides. One row goes through [`PanelMatrix::gemv`], up to
/// [`super::FEW_ROWS`] rows (or [`super::INVARIANT_ROWS`] with
/// [`super::GemmOptions::rows_invariant`]) through [`super::rows::rows_panels`] (each row bitwise its M = 1
/// result), more through the packed GEMM with the panels as the B source (bitwise what
/// [`super::gemm`] computes from the dense matrix). Bitwise identical for any thread count.
pub fn gemm_panel_matrix<T: FloatElement>(
    a: MatRef<'_, f32>,
    b: &PanelMatrix<T>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    gemm_panel_matrix_with_isa(Isa::best(), a, b, c, opts)
}

/// [`gemm_panel_matrix`] with the microkernel of `isa` (an error if this CPU cannot run it).
pub fn gemm_panel_matrix_with_isa<T: FloatElement>(
    isa: Isa,
    a: MatRef<'_, f32>,
    b: &PanelMatrix<T>,
    mut c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    super::validate_dims(&a, b.k, b.n, &c, opts)?;
    if !isa.is_available() {
        return Err(Error::invalid(format!(
            "gemm: the {} microkernel is not supported by this CPU",
            isa.name()
        )));
    }
    let (m, k, n) = (a.rows, b.k, b.n);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if m <= super::rows_limit(opts) && k > 0 {
        let xs = super::rows_of(&a);
        if m == 1 && c.col_stride == 1 && opts.beta == 0.0 {
            // A decode step: the product straight into C's row (no buffer, no copy).
            let row = &mut c.data[..n];
            b.gemv(isa, &xs, row)?;
            super::finish_row(row, opts);
            return Ok(());
        }
        let mut ys = vec![0f32; m * n];
        if m == 1 {
            b.gemv(isa, &xs, &mut ys)?;
        } else {
            super::rows::rows_panels(isa, &xs, b, &mut ys);
        }
        super::store_rows(&ys, n, &mut c, opts);
        return Ok(());
    }
    super::gemm_panels_with_isa(isa, a, b, c, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn slots_are_a_permutation() {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut seen = [false; PANEL];
            for j in 0..PANEL {
                seen[slot(dt, j)] = true;
            }
            assert!(seen.iter().all(|&s| s), "{dt:?}");
        }
        // The widening: word i of a half holds columns i (low) and 8 + i (high).
        assert_eq!(slot(DType::BF16, 0), 0);
        assert_eq!(slot(DType::BF16, 8), 1);
        assert_eq!(slot(DType::BF16, 7), 14);
        assert_eq!(slot(DType::BF16, 15), 15);
        assert_eq!(slot(DType::BF16, 16), 16);
        assert_eq!(slot(DType::BF16, 24), 17);
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    }

    fn layout_roundtrip<T: FloatElement>() {
        for (k, n) in [(1, 1), (3, 31), (5, 32), (7, 33), (2, 100)] {
            let v = values(k * n, 3);
            let dense: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
            let pm = PanelMatrix::<T>::from_view(&MatRef::row_major(&dense, k, n)).unwrap();
            // And from a transposed (column-major) view of the same matrix.
            let tr: Vec<f32> = (0..n * k).map(|i| v[(i % k) * n + i / k]).collect();
            let pt = PanelMatrix::<T>::from_view(&MatRef::row_major(&tr, n, k).t()).unwrap();
            for p in 0..k {
                for j in 0..n {
                    let want = dense[p * n + j].to_f32();
                    assert_eq!(pm.get(p, j).to_bits(), want.to_bits(), "{k}x{n} ({p},{j})");
                    assert_eq!(pt.get(p, j).to_bits(), want.to_bits(), "transposed");
                }
            }
            // The padding columns of the last panel are stored zeros.
            let last = &pm.as_slice()[(pm.panels() - 1) * k * PANEL..];
            for row in last.chunks_exact(PANEL) {
                for j in (n - (pm.panels() - 1) * PANEL)..PANEL {
                    assert_eq!(row[slot(T::DTYPE, j)].to_f32(), 0.0, "padding {k}x{n}");
                }
            }
        }
    }

    #[test]
    fn layout_holds_every_element() {
        layout_roundtrip::<f32>();
        layout_roundtrip::<bf16>();
        layout_roundtrip::<f16>();
    }
}
