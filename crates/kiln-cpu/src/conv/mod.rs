//! 2-D convolution and transposed convolution, forward and backward (NCHW, f32 compute).
//!
//! Both operators are described by one [`ConvGeometry`] that names the two sides of a
//! convolution instead of "input" and "output":
//!
//! * the **image side** `big` `[N, Cb, Hb, Wb]` — a conv's input, a transposed conv's output;
//! * the **patch side** `small` `[N, Cs, Hs, Ws]` — a conv's output, a transposed conv's input;
//! * the weight `[Cs, Cb/G, kh, kw]` — what PyTorch stores for both (`[C_out, C_in/G, kh, kw]`
//!   for `Conv2d`, `[C_in, C_out/G, kh, kw]` for `ConvTranspose2d`).
//!
//! One index map links them: patch pixel `(oy, ox)` and kernel tap `(ki, kj)` read image pixel
//! `(oy·sh − ph + ki·dh, ox·sw − pw + kj·dw)`. `im2col` gathers along that map into the patch
//! matrix `col[(c, ki, kj), (n, oy, ox)]` and `col2im` scatter-adds back along it; `col2im` is
//! the adjoint (transpose) of `im2col`. `im2col` is never stored: [`correlate`] and
//! [`weight_grad`] gather its GEMM panels straight from the images (implicit GEMM, in
//! `implicit.rs`); [`scatter`] stores the GEMM's `col` block and scatter-adds it with `col2im`,
//! or, without dilation, computes each output phase (every `s`-th row and column; the whole
//! image at stride 1) as its own stride-1 implicit GEMM with no `col2im` (`subpixel.rs`).
//! With them, three routines cover all six directions:
//!
//! | routine | math (per group g) | conv2d | conv_transpose2d |
//! |---|---|---|---|
//! | [`correlate`] | `small = W_g · im2col(big)` | forward | input gradient |
//! | [`scatter`] | `big = col2im(W_gᵀ · small)` | input gradient | forward |
//! | [`weight_grad`] | `dW_g = small · im2col(big)ᵀ` | weight gradient (x, dy) | weight gradient (dy, x) |
//!
//! The transposed conv never forms a zero-inserted input: its forward pass is exactly the input
//! gradient of the matching conv. Dedicated paths: dense (the kernel covers the whole image and
//! the patch side is 1×1: one plain product over the batch), pointwise (1×1, stride 1, no
//! padding: the image itself is the patch matrix, for the input gradient) and depthwise (one image and one patch channel per group:
//! direct loops over the same taps). Work is split over fixed chunks of images, independent of
//! the thread count; the weight gradient is reduced over fixed slices of the batch in slice
//! order, so results are bitwise identical for any number of threads.
mod implicit;
mod subpixel;

use crate::gemm::{
    blocked_c_supported, gemm, gemm_packed, gemm_panels, gemm_panels_blocked, BlockedMatMut,
    Epilogue, GemmOptions, MatMut, MatRef, PackedB,
};
use implicit::{Padded, PatchTables, Patches, PatchesT};
use kiln_tensor::{Error, FloatElement, Result};
use rayon::prelude::*;
use std::cell::Cell;

/// Hyper-parameters of a convolution (`[height, width]` pairs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    /// Transposed convolution only: extra rows/columns at the bottom/right of the output.
    /// Must be smaller than the stride or the dilation (as PyTorch requires).
    pub output_padding: [usize; 2],
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            output_padding: [0, 0],
        }
    }
}

impl Conv2dParams {
    /// Square stride and padding, no dilation, one group.
    pub fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams {
            stride: [stride, stride],
            padding: [padding, padding],
            ..Default::default()
        }
    }
}

/// The shapes of one convolution or transposed convolution (see the module docs for the
/// image side `big` and the patch side `small`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    /// `[Cb, Hb, Wb]`: a conv's input, a transposed conv's output.
    pub big: [usize; 3],
    /// `[Cs, Hs, Ws]`: a conv's output, a transposed conv's input.
    pub small: [usize; 3],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    /// True for a transposed convolution (input = `small`, output = `big`).
    pub transposed: bool,
}

fn positive(what: &str, v: &[usize]) -> Result<()> {
    if v.contains(&0) {
        return Err(Error::invalid(format!(
            "conv: {what} must be positive, got {v:?}"
        )));
    }
    Ok(())
}

impl ConvGeometry {
    /// A convolution of `x` `[N, C_in, H, W]` with a weight `[C_out, C_in/groups, kh, kw]`;
    /// output `[N, C_out, (H + 2p − d·(k−1) − 1)/s + 1, …]`.
    pub fn conv2d(x_shape: [usize; 4], w_shape: [usize; 4], p: &Conv2dParams) -> Result<Self> {
        let [n, ci, h, w] = x_shape;
        let [co, cig, kh, kw] = w_shape;
        check_common(x_shape, w_shape, p)?;
        if ci % p.groups != 0 || co % p.groups != 0 || cig * p.groups != ci {
            return Err(Error::invalid(format!(
                "conv2d: input channels {ci} and weight {w_shape:?} do not fit groups={}",
                p.groups
            )));
        }
        if p.output_padding != [0, 0] {
            return Err(Error::invalid(
                "conv2d: output_padding is for transposed convolution",
            ));
        }
        let out = |len: usize, k: usize, s: usize, pad: usize, d: usize| -> Result<usize> {
            let span = d * (k - 1) + 1;
            if len + 2 * pad < span {
                return Err(Error::invalid(format!(
                    "conv2d: kernel span {span} is larger than the padded input {}",
                    len + 2 * pad
                )));
            }
            Ok((len + 2 * pad - span) / s + 1)
        };
        let oh = out(h, kh, p.stride[0], p.padding[0], p.dilation[0])?;
        let ow = out(w, kw, p.stride[1], p.padding[1], p.dilation[1])?;
        Ok(ConvGeometry {
            batch: n,
            big: [ci, h, w],
            small: [co, oh, ow],
            kernel: [kh, kw],
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            groups: p.groups,
            transposed: false,
        })
    }

    /// A transposed convolution of `x` `[N, C_in, H, W]` with a weight
    /// `[C_in, C_out/groups, kh, kw]`; output `[N, C_out, (H−1)·s − 2p + d·(k−1) + op + 1, …]`.
    pub fn conv_transpose2d(
        x_shape: [usize; 4],
        w_shape: [usize; 4],
        p: &Conv2dParams,
    ) -> Result<Self> {
        let [n, ci, h, w] = x_shape;
        let [wci, cog, kh, kw] = w_shape;
        check_common(x_shape, w_shape, p)?;
        if wci != ci || ci % p.groups != 0 {
            return Err(Error::invalid(format!(
                "conv_transpose2d: input channels {ci} and weight {w_shape:?} do not fit groups={}",
                p.groups
            )));
        }
        for a in 0..2 {
            if p.output_padding[a] >= p.stride[a].max(p.dilation[a]) {
                return Err(Error::invalid(format!(
                    "conv_transpose2d: output_padding {:?} must be smaller than the stride {:?} or the dilation {:?}",
                    p.output_padding, p.stride, p.dilation
                )));
            }
        }
        let out = |len: usize, k: usize, s: usize, pad: usize, d: usize, op: usize| {
            let full = (len - 1) * s + d * (k - 1) + op + 1;
            if full <= 2 * pad {
                return Err(Error::invalid(format!(
                    "conv_transpose2d: padding {pad} leaves an empty output"
                )));
            }
            Ok(full - 2 * pad)
        };
        let oh = out(
            h,
            kh,
            p.stride[0],
            p.padding[0],
            p.dilation[0],
            p.output_padding[0],
        )?;
        let ow = out(
            w,
            kw,
            p.stride[1],
            p.padding[1],
            p.dilation[1],
            p.output_padding[1],
        )?;
        Ok(ConvGeometry {
            batch: n,
            big: [cog * p.groups, oh, ow],
            small: [ci, h, w],
            kernel: [kh, kw],
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            groups: p.groups,
            transposed: true,
        })
    }

    /// `[N, C, H, W]` of the operator's input.
    pub fn input_shape(&self) -> [usize; 4] {
        let s = if self.transposed {
            self.small
        } else {
            self.big
        };
        [self.batch, s[0], s[1], s[2]]
    }
    /// `[N, C, H, W]` of the operator's output.
    pub fn output_shape(&self) -> [usize; 4] {
        let s = if self.transposed {
            self.big
        } else {
            self.small
        };
        [self.batch, s[0], s[1], s[2]]
    }
    /// `[Cs, Cb/G, kh, kw]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.small[0],
            self.big[0] / self.groups,
            self.kernel[0],
            self.kernel[1],
        ]
    }
    pub fn input_len(&self) -> usize {
        self.input_shape().iter().product()
    }
    pub fn output_len(&self) -> usize {
        self.output_shape().iter().product()
    }
    pub fn weight_len(&self) -> usize {
        self.weight_shape().iter().product()
    }
    /// Channels of the operator's output (the length of its bias).
    pub fn out_channels(&self) -> usize {
        self.output_shape()[1]
    }
    /// Multiply-adds ×2 of the forward pass (the same count for each backward product).
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64
            * self.small[0] as f64
            * self.small_hw() as f64
            * self.k_group() as f64
    }

    fn big_hw(&self) -> usize {
        self.big[1] * self.big[2]
    }
    fn small_hw(&self) -> usize {
        self.small[1] * self.small[2]
    }
    /// Image channels per group.
    fn cbg(&self) -> usize {
        self.big[0] / self.groups
    }
    /// Patch channels per group.
    fn csg(&self) -> usize {
        self.small[0] / self.groups
    }
    fn taps_per_channel(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }
    /// Rows of the patch matrix of one group: `Cb/G · kh · kw`.
    fn k_group(&self) -> usize {
        self.cbg() * self.taps_per_channel()
    }
    /// 1×1 kernel, stride 1, no padding: the image is its own patch matrix.
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.padding == [0, 0]
            && self.big[1] == self.small[1]
            && self.big[2] == self.small[2]
    }
    /// The kernel covers the whole unpadded image and the patch side is 1×1 (DCGAN's first
    /// generator and last discriminator layer): the patch matrix of image n is the image itself,
    /// so the batch is one plain matrix product `[N, Cb·Hb·Wb] ↔ [N, Cs]`.
    fn dense(&self) -> bool {
        self.groups == 1
            && self.small[1] == 1
            && self.small[2] == 1
            && self.padding == [0, 0]
            && self.dilation == [1, 1]
            && self.kernel == [self.big[1], self.big[2]]
    }
    /// One image channel and one patch channel per group.
    fn depthwise(&self) -> bool {
        self.cbg() == 1 && self.csg() == 1
    }
    /// Images per work chunk: enough patch columns to feed the GEMM (at least 512 and at least
    /// the weight's rows) while the patch matrix stays under 16 MiB. Depends on the shapes only.
    fn images_per_chunk(&self) -> usize {
        const MIN_COLS: usize = 512;
        const COL_CAP: usize = 1 << 22;
        let hw = self.small_hw();
        let want = MIN_COLS.max(self.csg()).div_ceil(hw);
        let cap = (COL_CAP / (self.k_group() * hw)).max(1);
        want.min(cap).clamp(1, self.batch.max(1))
    }
}

impl ConvGeometry {
    /// Images per work chunk of the implicit-GEMM forward ([`correlate`]): no patch matrix is
    /// stored, so a chunk is as large as the output buffer cap allows (at least
    /// `IMPLICIT_MIN_COLS` columns); a larger GEMM packs its weight operand fewer times.
    fn images_per_chunk_implicit(&self) -> usize {
        const IMPLICIT_MIN_COLS: usize = 4096;
        const OUT_CAP: usize = 1 << 22;
        let hw = self.small_hw();
        let want = IMPLICIT_MIN_COLS.max(self.csg()).div_ceil(hw);
        let cap = (OUT_CAP / (self.csg() * hw)).max(1);
        want.min(cap).clamp(1, self.batch.max(1))
    }
}

fn check_common(x_shape: [usize; 4], w_shape: [usize; 4], p: &Conv2dParams) -> Result<()> {
    positive("input shape", &x_shape)?;
    positive("weight shape", &w_shape)?;
    positive("stride", &p.stride)?;
    positive("dilation", &p.dilation)?;
    positive("groups", &[p.groups])?;
    Ok(())
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(format!(
            "conv: {what} has {got} elements, expected {want}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The index map: one kernel tap (ki, kj) reads image pixel (oy·sh + iy0, ox·sw + ix0) for patch
// pixels oy ∈ [oy_lo, oy_hi), ox ∈ [ox_lo, ox_hi); all other patch pixels see padding (zero).

#[derive(Clone, Copy, Debug)]
struct Tap {
    oy: (usize, usize),
    ox: (usize, usize),
    iy0: isize,
    ix0: isize,
}

/// Patch positions `o ∈ [lo, hi)` whose image position `o·s + off` lies in `[0, in_len)`.
fn tap_range(off: isize, s: usize, out_len: usize, in_len: usize) -> (usize, usize) {
    let lo = if off >= 0 {
        0
    } else {
        (off.unsigned_abs()).div_ceil(s)
    };
    let last = in_len as isize - 1 - off; // o·s ≤ last
    let hi = if last < 0 {
        0
    } else {
        (last as usize / s + 1).min(out_len)
    };
    (lo.min(hi), hi)
}

fn taps(g: &ConvGeometry) -> Vec<Tap> {
    let [kh, kw] = g.kernel;
    let mut v = Vec::with_capacity(kh * kw);
    for ki in 0..kh {
        for kj in 0..kw {
            let iy0 = (ki * g.dilation[0]) as isize - g.padding[0] as isize;
            let ix0 = (kj * g.dilation[1]) as isize - g.padding[1] as isize;
            v.push(Tap {
                oy: tap_range(iy0, g.stride[0], g.small[1], g.big[1]),
                ox: tap_range(ix0, g.stride[1], g.small[2], g.big[2]),
                iy0,
                ix0,
            });
        }
    }
    v
}

/// Calls `f(patch_start, image_start, len)` for every row segment of tap `t` inside one image
/// plane: patch pixels `patch_start .. patch_start+len` (consecutive) meet image pixels
/// `image_start, image_start + sw, …`. This is the one index map shared by all kernels below.
#[inline]
fn for_each_segment(g: &ConvGeometry, t: &Tap, mut f: impl FnMut(usize, usize, usize)) {
    let (ox_lo, ox_hi) = t.ox;
    if ox_lo >= ox_hi {
        return;
    }
    let ws = g.small[2];
    let wb = g.big[2];
    for oy in t.oy.0..t.oy.1 {
        let iy = (oy * g.stride[0]) as isize + t.iy0;
        let ix = (ox_lo * g.stride[1]) as isize + t.ix0;
        // In range by construction of the tap ranges.
        let image_start = iy as usize * wb + ix as usize;
        f(oy * ws + ox_lo, image_start, ox_hi - ox_lo);
    }
}

/// `dst[i] = src[start + i·step]`.
#[inline(always)]
fn gather(dst: &mut [f32], src: &[f32], start: usize, step: usize) {
    let len = dst.len();
    match (len, step) {
        (0, _) => {}
        (1, _) => dst[0] = src[start],
        (_, 1) => dst.copy_from_slice(&src[start..start + len]),
        (_, 2) => {
            // Pairs, so that the compiler emits an interleaved (shuffled) vector load.
            let s = &src[start..start + 2 * len - 1];
            let (last, body) = dst.split_last_mut().expect("len ≥ 2");
            for (d, pair) in body.iter_mut().zip(s.chunks_exact(2)) {
                *d = pair[0];
            }
            *last = s[2 * len - 2];
        }
        _ => {
            let s = &src[start..=start + step * (len - 1)];
            for (i, d) in dst.iter_mut().enumerate() {
                *d = s[i * step];
            }
        }
    }
}

/// `dst[start + i·step] += src[i]` — the adjoint of [`gather`].
#[inline(always)]
fn scatter_add(src: &[f32], dst: &mut [f32], start: usize, step: usize) {
    let len = src.len();
    if len == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if step == 2 && len >= 8 && is_x86_feature_detected!("avx2") {
        // The element after the last target (an odd lane, written back unchanged) lets every
        // block of eight use whole vectors when dst has it.
        let end = (start + 2 * len).min(dst.len());
        assert!(start + 2 * len - 1 <= dst.len());
        // SAFETY: dst[start ..] holds at least 2·len − 1 elements (asserted above; `end` is
        // checked inside); AVX2 is present.
        unsafe { x86::scatter_add_step2(src, &mut dst[start..end]) };
        return;
    }
    let d = &mut dst[start..=start + step * (len - 1)];
    if step == 1 {
        for (d, s) in d.iter_mut().zip(src) {
            *d += *s;
        }
    } else if step == 2 {
        let (last, body) = src.split_last().expect("len ≥ 1");
        for (pair, s) in d.chunks_exact_mut(2).zip(body) {
            pair[0] += *s;
        }
        d[2 * len - 2] += *last;
    } else {
        for (i, s) in src.iter().enumerate() {
            d[i * step] += *s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `d[2i] += src[i]` for `i < src.len()`, eight at a time: the eight sources are spread to
    /// the even lanes of two vectors (`unpack` + `permute2f128`), added to sixteen destination
    /// elements, and blended back so the odd lanes keep their values. Each even element gets the
    /// one addition of the scalar loop (bitwise the same). When `d` ends at the last even
    /// target (no odd element after it), the last block writes its second vector under a mask
    /// (slow on some cores, so only there).
    ///
    /// # Safety
    /// `d.len() ≥ 2·src.len() − 1`, `src.len() ≥ 1`; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn scatter_add_step2(src: &[f32], d: &mut [f32]) {
        let len = src.len();
        assert!(len >= 1 && d.len() > 2 * (len - 1));
        let (s, dp) = (src.as_ptr(), d.as_mut_ptr());
        // Lanes 0..7 of the second vector when it holds d[2i+8 .. 2i+15] only.
        let seven = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0);
        let mut i = 0;
        while i + 8 <= len {
            // SAFETY: src[i .. i+8] is inside src; d[2i .. 2i+15] is inside d (2i + 14 ≤
            // 2(len − 1)), and d[2i + 15] too when 2i + 16 ≤ d.len() (else the masked store).
            unsafe {
                let v = _mm256_loadu_ps(s.add(i));
                let lo = _mm256_unpacklo_ps(v, v); // s0 s0 s1 s1 | s4 s4 s5 s5
                let hi = _mm256_unpackhi_ps(v, v); // s2 s2 s3 s3 | s6 s6 s7 s7
                let a = _mm256_permute2f128_ps(lo, hi, 0x20); // s0 s0 s1 s1 s2 s2 s3 s3
                let b = _mm256_permute2f128_ps(lo, hi, 0x31); // s4 s4 … s7 s7
                let p0 = dp.add(2 * i);
                let d0 = _mm256_loadu_ps(p0);
                _mm256_storeu_ps(p0, _mm256_blend_ps(d0, _mm256_add_ps(d0, a), 0b0101_0101));
                let p1 = p0.add(8);
                if 2 * i + 16 <= d.len() {
                    let d1 = _mm256_loadu_ps(p1);
                    _mm256_storeu_ps(p1, _mm256_blend_ps(d1, _mm256_add_ps(d1, b), 0b0101_0101));
                } else {
                    let d1 = _mm256_maskload_ps(p1, seven);
                    let out = _mm256_blend_ps(d1, _mm256_add_ps(d1, b), 0b0101_0101);
                    _mm256_maskstore_ps(p1, seven, out);
                }
            }
            i += 8;
        }
        while i < len {
            d[2 * i] += src[i];
            i += 1;
        }
    }
}

/// Below this patch width, segments are too short for per-segment loops: col2im sums into a
/// column-residue-split scratch plane instead ([`NarrowCol2im`]), or at most
/// [`TABLE_MAX_WIDTH`] wide through a per-tap table of image pixels. Measured on a Zen 3 core,
/// interleaved, DCGAN forward: G3 (8 × 8 input) 54.7–55.7 → 53.6–53.9 ms on one thread and
/// 28.6–29.0 → 27.5–27.9 on two with the split plane instead of the table; G2 (4 × 4) 51.5–52.0
/// → 52.8–53.3 and 27.1–27.6 → 27.8–28.1, so 4-wide patches keep the table. Against the
/// segments' AVX2 step-2 scatter-add, three interleaved pairs: G4 (16 × 16) 59.8–60.9 →
/// 58.8–59.4 ms on one thread and 31.4–31.5 → 30.7–30.8 on two; G5 (32 × 32) even, so wider
/// patches keep the segments.
const NARROW_MAX_WIDTH: usize = 16;

/// The widest patches whose col2im goes through [`tap_table`].
const TABLE_MAX_WIDTH: usize = 4;

/// `table[t·Hs·Ws + p]` = image pixel read by tap `t` at patch pixel `p`, or `Hb·Wb` (a zero
/// slot) where the tap falls in the padding. Built from [`for_each_segment`].
fn tap_table(g: &ConvGeometry, taps: &[Tap]) -> Option<Vec<u32>> {
    let (bhw, shw) = (g.big_hw(), g.small_hw());
    if g.small[2] > TABLE_MAX_WIDTH || bhw >= u32::MAX as usize {
        return None;
    }
    let mut table = vec![bhw as u32; taps.len() * shw];
    for (t, tap) in taps.iter().enumerate() {
        let row = &mut table[t * shw..(t + 1) * shw];
        for_each_segment(g, tap, |p, i, len| {
            for (k, e) in row[p..p + len].iter_mut().enumerate() {
                *e = (i + k * g.stride[1]) as u32;
            }
        });
    }
    Some(table)
}

/// How [`col2im`] adds a patch matrix back for one geometry.
enum Col2im {
    /// Per-tap table of image pixels (patches at most [`TABLE_MAX_WIDTH`] wide).
    Table(Vec<u32>),
    /// Residue-split scratch rows (at most [`NARROW_MAX_WIDTH`] wide).
    Narrow(NarrowCol2im),
    /// One strided scatter-add per patch row segment.
    Segments,
}

impl Col2im {
    fn new(g: &ConvGeometry, taps: &[Tap]) -> Col2im {
        if let Some(table) = tap_table(g, taps) {
            return Col2im::Table(table);
        }
        NarrowCol2im::new(g).map_or(Col2im::Segments, Col2im::Narrow)
    }
}

/// The scratch layout of col2im for narrow patches (`Ws ≤ NARROW_MAX_WIDTH`): an image plane
/// `[Hb, Wb]` split by column residue mod `sw`, `[Hb, sw, lo + ⌈Wb/sw⌉ + hi]`, with `lo` and
/// `hi` margin slots on both sides of each residue row. Tap `(ki, kj)` sends patch row `oy`,
/// column `ox` to image column `X = ox·sw + kj·dw − pw`: residue `X mod sw` is the same for the
/// whole tap and `⌊X/sw⌋ = ox + ⌊(kj·dw − pw)/sw⌋`, so each (tap, patch row) is one contiguous
/// run added at a shifted offset, whatever falls outside the image landing in the margins.
/// Every scratch element receives its taps in tap order, as in the plane itself.
struct NarrowCol2im {
    /// Residue row width, margins included.
    width: usize,
    lo: usize,
    /// Per tap: (first image row minus `ph`, as `ki·dh − ph`; residue; slot of patch column 0).
    taps: Vec<(isize, usize, usize)>,
}

impl NarrowCol2im {
    fn new(g: &ConvGeometry) -> Option<NarrowCol2im> {
        if g.small[2] > NARROW_MAX_WIDTH {
            return None;
        }
        let [kh, kw] = g.kernel;
        let [dh, dw] = g.dilation;
        let [ph, pw] = g.padding;
        let sw = g.stride[1];
        let lo = pw.div_ceil(sw);
        let inner = g.big[2].div_ceil(sw);
        // The last patch column of the rightmost tap: ⌊((Ws − 1)·sw + (kw − 1)·dw)/sw⌋.
        let hi = (((g.small[2] - 1) * sw + (kw - 1) * dw) / sw + 1).saturating_sub(inner);
        let mut taps = Vec::with_capacity(kh * kw);
        for ki in 0..kh {
            for kj in 0..kw {
                let x0 = (kj * dw) as isize - pw as isize; // image column of patch column 0
                let residue = x0.rem_euclid(sw as isize) as usize;
                let slot = (lo as isize + x0.div_euclid(sw as isize)) as usize;
                taps.push(((ki * dh) as isize - ph as isize, residue, slot));
            }
        }
        Some(NarrowCol2im {
            width: lo + inner + hi,
            lo,
            taps,
        })
    }

    /// Scratch elements per image plane.
    fn len(&self, g: &ConvGeometry) -> usize {
        g.big[1] * g.stride[1] * self.width
    }

    /// `img[c] += col2im(col rows c·taps ..)` for `channels` channels through `ext` (at least
    /// [`NarrowCol2im::len`] elements).
    #[allow(clippy::too_many_arguments)]
    fn spread(
        &self,
        g: &ConvGeometry,
        channels: usize,
        col: &[f32],
        ld: usize,
        off: usize,
        img: &mut [f32],
        ext: &mut [f32],
    ) {
        let [hb, wb] = [g.big[1], g.big[2]];
        let [hs, ws] = [g.small[1], g.small[2]];
        let (sh, sw, width) = (g.stride[0], g.stride[1], self.width);
        let ext = &mut ext[..self.len(g)];
        for c in 0..channels {
            ext.fill(0.0);
            for (t, &(y0, residue, slot)) in self.taps.iter().enumerate() {
                let row = &col[(c * self.taps.len() + t) * ld + off..][..hs * ws];
                for (oy, src) in row.chunks_exact(ws).enumerate() {
                    // Image row Y = oy·sh + ki·dh − ph; rows outside the image are padding.
                    let y = (oy * sh) as isize + y0;
                    if y < 0 || y >= hb as isize {
                        continue;
                    }
                    let at = (y as usize * sw + residue) * width + slot;
                    for (e, v) in ext[at..at + ws].iter_mut().zip(src) {
                        *e += *v;
                    }
                }
            }
            let plane = &mut img[c * hb * wb..(c + 1) * hb * wb];
            // Image column X = r + x·sw takes slot lo + x of residue row r.
            for (y, out) in plane.chunks_exact_mut(wb).enumerate() {
                for r in 0..sw.min(wb) {
                    let src = &ext[(y * sw + r) * width + self.lo..];
                    for (d, e) in out[r..].iter_mut().step_by(sw).zip(src) {
                        *d += *e;
                    }
                }
            }
        }
    }
}

/// col2im: the adjoint of im2col — every patch-matrix entry is added back to the image pixel
/// it was gathered from, for `channels` channels (patch rows `c·taps + t`, image planes `c`).
/// `img` must be zeroed (or hold what the sum should start from).
#[allow(clippy::too_many_arguments)]
fn col2im(
    g: &ConvGeometry,
    taps: &[Tap],
    how: &Col2im,
    channels: usize,
    col: &[f32],
    ld: usize,
    off: usize,
    img: &mut [f32],
) {
    let (bhw, shw) = (g.big_hw(), g.small_hw());
    match how {
        Col2im::Table(table) => {
            let mut ext = vec![0f32; bhw + 1]; // the padding slot collects what falls outside
            for c in 0..channels {
                ext.fill(0.0);
                for (t, idx) in table.chunks_exact(shw).enumerate() {
                    let row = &col[(c * taps.len() + t) * ld + off..][..shw];
                    for (v, &i) in row.iter().zip(idx) {
                        ext[i as usize] += *v;
                    }
                }
                for (d, e) in img[c * bhw..(c + 1) * bhw].iter_mut().zip(&ext) {
                    *d += *e;
                }
            }
            return;
        }
        Col2im::Narrow(narrow) => {
            thread_local! {
                static EXT: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
            }
            let mut ext = EXT.with(|e| e.take());
            ext.resize(ext.len().max(narrow.len(g)), 0.0);
            narrow.spread(g, channels, col, ld, off, img, &mut ext);
            EXT.with(|e| e.set(ext));
            return;
        }
        Col2im::Segments => {}
    }
    for c in 0..channels {
        let plane = &mut img[c * bhw..(c + 1) * bhw];
        for (t, tap) in taps.iter().enumerate() {
            let row = &col[(c * taps.len() + t) * ld + off..][..shw];
            for_each_segment(g, tap, |p, i, len| {
                scatter_add(&row[p..p + len], plane, i, g.stride[1])
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch buffers, reused across calls: a few per thread, since a task waiting inside a nested
// parallel loop can run another task of the same kind on its thread (rayon's work stealing),
// which then takes a second buffer instead of allocating (and zeroing) a new one every call.

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers kept per thread.
const SCRATCH_KEPT: usize = 4;

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        let mut kept = s.borrow_mut();
        if kept.len() < SCRATCH_KEPT {
            kept.push(buf);
        }
    });
    r
}

/// The weights as f32: borrowed when they already are, otherwise converted once with the bulk
/// (SIMD) conversions of kiln-tensor.
fn weights_f32<W: FloatElement>(w: &[W]) -> std::borrow::Cow<'_, [f32]> {
    use kiln_tensor::{convert, DType};
    match W::DTYPE {
        DType::F32 => std::borrow::Cow::Borrowed(bytemuck::cast_slice(w)),
        DType::BF16 => {
            let mut out = vec![0f32; w.len()];
            convert::bf16_to_f32(bytemuck::cast_slice(w), &mut out);
            std::borrow::Cow::Owned(out)
        }
        DType::F16 => {
            let mut out = vec![0f32; w.len()];
            convert::f16_to_f32(bytemuck::cast_slice(w), &mut out);
            std::borrow::Cow::Owned(out)
        }
        _ => std::borrow::Cow::Owned(w.iter().map(|v| v.to_f32()).collect()),
    }
}

/// Copies group `grp`'s channels of `nb` consecutive images `src` `[nb, C, hw]` into the matrix
/// `dst` `[C/G, nb·hw]` (images side by side).
fn gather_group(
    src: &[f32],
    nb: usize,
    c: usize,
    cg: usize,
    grp: usize,
    hw: usize,
    dst: &mut [f32],
) {
    let ld = nb * hw;
    // In parallel over the rows of `dst` (one channel of every image each).
    dst[..cg * ld]
        .par_chunks_mut(ld)
        .enumerate()
        .for_each(|(k, row)| {
            for n in 0..nb {
                row[n * hw..][..hw].copy_from_slice(&src[(n * c + grp * cg + k) * hw..][..hw]);
            }
        });
}

/// The inverse of [`gather_group`]: `dst[n, grp·cg + k, :] = src[k, n·hw ..]`.
fn spread_group(
    src: &[f32],
    nb: usize,
    c: usize,
    cg: usize,
    grp: usize,
    hw: usize,
    dst: &mut [f32],
) {
    let ld = nb * hw;
    // In parallel over images (each writes its own output image).
    dst[..nb * c * hw]
        .par_chunks_mut(c * hw)
        .enumerate()
        .for_each(|(n, img)| {
            for k in 0..cg {
                img[(grp * cg + k) * hw..][..hw].copy_from_slice(&src[k * ld + n * hw..][..hw]);
            }
        });
}

/// `out[n, c, :] += bias[c]` for `out` `[n, channels, hw]`.
fn add_channel_bias(out: &mut [f32], channels: usize, hw: usize, bias: &[f32]) {
    for (i, plane) in out.chunks_mut(hw).enumerate() {
        let b = bias[i % channels];
        for v in plane {
            *v += b;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The three core routines.

/// `small[n, g·Csg + o, :] = W_g[o, :] · im2col(big[n, group g])` (+ `bias[o]`).
///
/// `big` `[N, Cb, Hb, Wb]`, `w` `[Cs, Cb/G, kh, kw]`, `small` `[N, Cs, Hs, Ws]` (overwritten).
/// Conv forward; transposed-conv input gradient.
pub fn correlate(
    g: &ConvGeometry,
    big: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    small: &mut [f32],
) -> Result<()> {
    let (bhw, shw) = (g.big_hw(), g.small_hw());
    let (cb, cs, cbg, csg, kg) = (g.big[0], g.small[0], g.cbg(), g.csg(), g.k_group());
    let taps = taps(g);
    if g.depthwise() {
        // small[n, c] = Σ_t w[c, t] · shift_t(big[n, c])
        small.par_chunks_mut(shw).enumerate().for_each(|(nc, out)| {
            let c = nc % cs;
            let plane = &big[(nc / cs * cb + c) * bhw..][..bhw];
            out.fill(bias.map_or(0.0, |b| b[c]));
            for (t, tap) in taps.iter().enumerate() {
                let wt = w[c * taps.len() + t];
                for_each_segment(g, tap, |p, i, len| {
                    for (o, x) in out[p..p + len]
                        .iter_mut()
                        .zip(plane[i..].iter().step_by(g.stride[1]))
                    {
                        *o += wt * *x;
                    }
                });
            }
        });
        return Ok(());
    }
    if g.dense() {
        // small [N, Cs] = big [N, K] · Wᵀ (+ bias per column)
        let a = MatRef::row_major(big, g.batch, kg);
        let b = MatRef::row_major(w, cs, kg).t();
        let opts = GemmOptions {
            epilogue: bias.map_or(Epilogue::None, Epilogue::Bias),
            ..Default::default()
        };
        return gemm(a, b, MatMut::row_major(small, g.batch, cs), &opts);
    }
    // Implicit GEMM: the patch matrix is gathered panel by panel from the (padded) images.
    let nb = g.images_per_chunk_implicit();
    let pad = Padded::new(g);
    let xp_len = pad.scratch_len(g, nb);
    // Several images per chunk: the product goes straight into the images' planes (column
    // blocks of HW, one per image, C·HW apart) where the GEMM takes such blocks; else into
    // `tmp` and a copy.
    let in_place = blocked_c_supported(shw);
    let tmp_len = if nb == 1 || in_place {
        0
    } else {
        csg * nb * shw
    };
    let plane = pad.plane();
    small
        .par_chunks_mut(nb * cs * shw)
        .zip(big.par_chunks(nb * cb * bhw))
        .try_for_each(|(ys, xs)| {
            let nbc = ys.len() / (cs * shw);
            let m = nbc * shw;
            let tables = PatchTables::new(g, &pad, nbc);
            with_scratch(xp_len + tmp_len, |scratch| -> Result<()> {
                let (xp, tmp) = scratch.split_at_mut(xp_len);
                let xp = pad.images(g, xs, xp);
                for grp in 0..g.groups {
                    let b = Patches {
                        xp: &xp[grp * cbg * plane..],
                        tables: &tables,
                    };
                    let a = MatRef::row_major(&w[grp * csg * kg..][..csg * kg], csg, kg);
                    if nbc == 1 {
                        let c =
                            MatMut::row_major(&mut ys[grp * csg * shw..][..csg * shw], csg, shw);
                        gemm_panels(a, &b, c, &GemmOptions::default())?;
                    } else if in_place {
                        let c = BlockedMatMut {
                            data: &mut ys[grp * csg * shw..],
                            rows: csg,
                            cols: m,
                            row_stride: shw,
                            block: shw,
                            block_stride: cs * shw,
                        };
                        if !gemm_panels_blocked(a, &b, c, &GemmOptions::default())? {
                            return Err(Error::invalid(
                                "conv2d: the GEMM refused output planes it said it takes",
                            ));
                        }
                    } else {
                        let t = &mut tmp[..csg * m];
                        let c = MatMut::row_major(t, csg, m);
                        gemm_panels(a, &b, c, &GemmOptions::default())?;
                        spread_group(t, nbc, cs, csg, grp, shw, ys);
                    }
                }
                if let Some(bias) = bias {
                    add_channel_bias(ys, cs, shw, bias);
                }
                Ok(())
            })
        })
}

/// `big[n, group g] = col2im(W_gᵀ · small[n, g·Csg ..])` — the adjoint of [`correlate`].
///
/// `small` `[N, Cs, Hs, Ws]`, `w` `[Cs, Cb/G, kh, kw]`, `big` `[N, Cb, Hb, Wb]` (overwritten).
/// Conv input gradient; transposed-conv forward.
pub fn scatter(g: &ConvGeometry, small: &[f32], w: &[f32], big: &mut [f32]) -> Result<()> {
    scatter_by(g, small, w, big, true)
}

/// [`scatter`], by output phases ([`subpixel`]) where they apply and `phases` allows, else by
/// `W_gᵀ·small` and `col2im` (the route tests compare the phases against).
fn scatter_by(
    g: &ConvGeometry,
    small: &[f32],
    w: &[f32],
    big: &mut [f32],
    phases: bool,
) -> Result<()> {
    let (bhw, shw) = (g.big_hw(), g.small_hw());
    let (cb, cs, cbg, csg, kg) = (g.big[0], g.small[0], g.cbg(), g.csg(), g.k_group());
    let taps = taps(g);
    if g.depthwise() {
        // big[n, c] = Σ_t w[c, t] · shift_tᵀ(small[n, c])
        big.par_chunks_mut(bhw).enumerate().for_each(|(nc, plane)| {
            let c = nc % cb;
            let src = &small[(nc / cb * cs + c) * shw..][..shw];
            plane.fill(0.0);
            for (t, tap) in taps.iter().enumerate() {
                let wt = w[c * taps.len() + t];
                for_each_segment(g, tap, |p, i, len| {
                    for (o, s) in plane[i..]
                        .iter_mut()
                        .step_by(g.stride[1])
                        .zip(&src[p..p + len])
                    {
                        *o += wt * *s;
                    }
                });
            }
        });
        return Ok(());
    }
    if g.dense() {
        // big [N, K] = small [N, Cs] · W [Cs, K]
        let a = MatRef::row_major(small, g.batch, cs);
        let b = MatRef::row_major(w, cs, kg);
        return gemm(
            a,
            b,
            MatMut::row_major(big, g.batch, kg),
            &GemmOptions::default(),
        );
    }
    if phases && subpixel::applies(g) {
        return subpixel::scatter(g, small, w, big);
    }
    let nb = g.images_per_chunk();
    let how = Col2im::new(g, &taps);
    let direct = nb == 1 && g.pointwise();
    let m = nb * shw;
    // One slice of the patch matrix at a time (below), for a whole chunk and for the last one.
    let slice_len = |m: usize| col_chunk_channels(taps.len(), m, cbg) * taps.len() * m;
    let last_m = (g.batch - (g.batch - 1) / nb * nb) * shw;
    let col_len = if direct {
        0
    } else {
        slice_len(m).max(slice_len(last_m))
    };
    let tmp_len = if nb == 1 { 0 } else { csg * m };
    big.par_chunks_mut(nb * cb * bhw)
        .zip(small.par_chunks(nb * cs * shw))
        .try_for_each(|(xs, ys)| {
            let nbc = ys.len() / (cs * shw);
            let m = nbc * shw;
            with_scratch(col_len + tmp_len, |scratch| -> Result<()> {
                let (col, tmp) = scratch.split_at_mut(col_len);
                // A chunk of several images is spread back one image per task: with the whole
                // batch in one chunk (G2: 64 images of 4 × 4) the col2im passes and the zeroing
                // would otherwise run on one thread while the GEMM runs on all.
                if !direct {
                    xs.par_chunks_mut(cb * bhw).for_each(|x| x.fill(0.0));
                }
                for grp in 0..g.groups {
                    // A = W_gᵀ [kg, csg] (a stride swap of the stored weight).
                    let a = MatRef::row_major(&w[grp * csg * kg..][..csg * kg], csg, kg).t();
                    let b = if nbc == 1 {
                        MatRef::row_major(&ys[grp * csg * shw..][..csg * shw], csg, shw)
                    } else {
                        gather_group(ys, nbc, cs, csg, grp, shw, tmp);
                        MatRef::row_major(&tmp[..csg * m], csg, m)
                    };
                    if direct {
                        let c =
                            MatMut::row_major(&mut xs[grp * cbg * bhw..][..cbg * bhw], cbg, bhw);
                        gemm(a, b, c, &GemmOptions::default())?;
                    } else {
                        // The patch matrix `W_gᵀ·small` is made a few channels (their `ntaps`
                        // rows each) at a time, against B packed once, and spread back while
                        // that slice is in L2 instead of after the whole 2 MB product. Each row
                        // is computed as in one whole product (the kernel's arithmetic per
                        // element does not depend on the rows around it), so results are
                        // unchanged. Measured with the AVX2 step-2 scatter and the fixed-size
                        // A-panel copies, G4 (128→64, 16×16, batch 64) forward on a Zen 3 core,
                        // five interleaved pairs: median 102.7 → 95.4 ms.
                        let packed = PackedB::new(b)?;
                        let ntaps = taps.len();
                        let ch = col_chunk_channels(ntaps, m, cbg);
                        for c0 in (0..cbg).step_by(ch) {
                            let chans = ch.min(cbg - c0);
                            let rows = chans * ntaps;
                            let a_rows = MatRef::strided(
                                &w[grp * csg * kg + c0 * ntaps..],
                                rows,
                                csg,
                                1,
                                kg,
                            );
                            let col = &mut col[..rows * m];
                            gemm_packed(
                                a_rows,
                                &packed,
                                MatMut::row_major(col, rows, m),
                                &GemmOptions::default(),
                            )?;
                            let spread = |n: usize, x: &mut [f32]| {
                                let img = &mut x[(grp * cbg + c0) * bhw..][..chans * bhw];
                                col2im(g, &taps, &how, chans, col, m, n * shw, img);
                            };
                            let images = xs.par_chunks_mut(cb * bhw).take(nbc);
                            images.enumerate().for_each(|(n, x)| spread(n, x));
                        }
                    }
                }
                Ok(())
            })
        })
}

/// Channels per slice of the patch matrix in [`scatter`]: a slice (`channels·ntaps` rows of `m`)
/// of about a quarter of L2, rounded to a whole number of the microkernel's MR rows when a few
/// channels allow it (no part-filled tiles in the middle of the product).
fn col_chunk_channels(ntaps: usize, m: usize, cbg: usize) -> usize {
    let l2 = crate::gemm::blocking::CacheSizes::detect().l2;
    let mut ch = (l2 / 4 / (ntaps * m * 4).max(1)).max(1);
    let (mr, _) = crate::gemm::Isa::best().tile();
    let unit = mr / gcd(mr, ntaps);
    if ch >= unit {
        ch -= ch % unit;
    }
    ch.min(cbg).max(1)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `dW_g = Σ_n small[n, g·Csg ..] · im2col(big[n, group g])ᵀ` — the weight gradient of
/// [`correlate`] (and of [`scatter`], with the roles of `small` as the upstream gradient or
/// the input exchanged by the caller).
///
/// `big` `[N, Cb, Hb, Wb]`, `small` `[N, Cs, Hs, Ws]`, `dw` `[Cs, Cb/G, kh, kw]` (overwritten).
/// The batch is cut into at most 4 fixed slices; each accumulates its images in order and the
/// slice partials are added in slice order, so the sum is the same for any thread count.
pub fn weight_grad(g: &ConvGeometry, big: &[f32], small: &[f32], dw: &mut [f32]) -> Result<()> {
    const MAX_SLICES: usize = 4;
    let (bhw, shw) = (g.big_hw(), g.small_hw());
    let (cb, cs, cbg, csg, kg) = (g.big[0], g.small[0], g.cbg(), g.csg(), g.k_group());
    let taps = taps(g);
    if g.depthwise() {
        // dw[c, t] = Σ_n Σ_p small[n, c, p] · shift_t(big[n, c])[p]
        let kk = taps.len();
        dw.par_chunks_mut(kk).enumerate().for_each(|(c, dwc)| {
            for (t, tap) in taps.iter().enumerate() {
                let mut acc = 0f32;
                for n in 0..g.batch {
                    let plane = &big[(n * cb + c) * bhw..][..bhw];
                    let dy = &small[(n * cs + c) * shw..][..shw];
                    for_each_segment(g, tap, |p, i, len| {
                        for (d, x) in dy[p..p + len]
                            .iter()
                            .zip(plane[i..].iter().step_by(g.stride[1]))
                        {
                            acc += *d * *x;
                        }
                    });
                }
                dwc[t] = acc;
            }
        });
        return Ok(());
    }
    if g.dense() {
        // dW [Cs, K] = small [N, Cs]ᵀ · big [N, K]
        let a = MatRef::row_major(small, g.batch, cs).t();
        let b = MatRef::row_major(big, g.batch, kg);
        return gemm(a, b, MatMut::row_major(dw, cs, kg), &GemmOptions::default());
    }
    // Implicit GEMM: the transposed patch matrix is gathered panel by panel from the (padded)
    // images, with the chunk's pixels as the depth.
    let nb = g.images_per_chunk_implicit();
    let chunks = g.batch.div_ceil(nb);
    let slices = chunks.min(MAX_SLICES);
    let pad = Padded::new(g);
    let xp_len = pad.scratch_len(g, nb);
    let tmp_len = if nb == 1 { 0 } else { csg * nb * shw };
    let plane = pad.plane();
    let wlen = dw.len();
    // Slice s accumulates chunks [s·chunks/slices, (s+1)·chunks/slices) into `part`.
    let run_slice = |s: usize, part: &mut [f32]| -> Result<()> {
        let (c0, c1) = (s * chunks / slices, (s + 1) * chunks / slices);
        for (ci, chunk) in (c0..c1).enumerate() {
            let n0 = chunk * nb;
            let nbc = nb.min(g.batch - n0);
            let m = nbc * shw;
            let xs = &big[n0 * cb * bhw..][..nbc * cb * bhw];
            let ys = &small[n0 * cs * shw..][..nbc * cs * shw];
            let tables = PatchTables::new(g, &pad, nbc);
            with_scratch(xp_len + tmp_len, |scratch| -> Result<()> {
                let (xp, tmp) = scratch.split_at_mut(xp_len);
                let xp = pad.images(g, xs, xp);
                for grp in 0..g.groups {
                    let bt = PatchesT {
                        xp: &xp[grp * cbg * plane..],
                        tables: &tables,
                    };
                    let a = if nbc == 1 {
                        MatRef::row_major(&ys[grp * csg * shw..][..csg * shw], csg, shw)
                    } else {
                        gather_group(ys, nbc, cs, csg, grp, shw, tmp);
                        MatRef::row_major(&tmp[..csg * m], csg, m)
                    };
                    let c = MatMut::row_major(&mut part[grp * csg * kg..][..csg * kg], csg, kg);
                    let opts = GemmOptions {
                        beta: if ci == 0 { 0.0 } else { 1.0 },
                        ..Default::default()
                    };
                    gemm_panels(a, &bt, c, &opts)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    };
    // Slice 0 writes into dw itself, the others into partials added afterwards in slice order.
    let (first, rest) = rayon::join(
        || run_slice(0, dw),
        || {
            (1..slices)
                .into_par_iter()
                .map(|s| {
                    let mut part = vec![0f32; wlen];
                    run_slice(s, &mut part).map(|_| part)
                })
                .collect::<Vec<Result<Vec<f32>>>>()
        },
    );
    first?;
    for p in rest {
        let p = p?;
        dw.par_chunks_mut(4096)
            .zip(p.par_chunks(4096))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += *s));
    }
    Ok(())
}

/// `db[c] = Σ_n Σ_p dy[n, c, p]` for `dy` `[N, C, hw]` (f64 accumulation, fixed order).
pub fn bias_grad(dy: &[f32], batch: usize, channels: usize, hw: usize, db: &mut [f32]) {
    db.par_iter_mut().enumerate().for_each(|(c, d)| {
        let mut acc = 0f64;
        for n in 0..batch {
            let plane = &dy[(n * channels + c) * hw..][..hw];
            let mut lanes = [0f32; 8];
            let mut it = plane.chunks_exact(8);
            for ch in &mut it {
                for (l, v) in lanes.iter_mut().zip(ch) {
                    *l += *v;
                }
            }
            let mut s: f64 = lanes.iter().map(|&l| l as f64).sum();
            s += it.remainder().iter().map(|&v| v as f64).sum::<f64>();
            acc += s;
        }
        *d = acc as f32;
    });
}

// ---------------------------------------------------------------------------------------------
// The public operators: compositions of the three routines.

fn check_bias(g: &ConvGeometry, bias: Option<&[f32]>) -> Result<()> {
    if let Some(b) = bias {
        check_len("bias", b.len(), g.out_channels())?;
    }
    Ok(())
}

/// Conv2d forward: `y = W ⋆ x + b` with `x` `[N, C_in, H, W]`, `w` `[C_out, C_in/G, kh, kw]`
/// (f32, f16 or bf16; converted to f32 once), `bias` `[C_out]`, `y` `[N, C_out, OH, OW]`.
pub fn conv2d_forward<W: FloatElement>(
    g: &ConvGeometry,
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check_op(g, false, x.len(), w.len(), y.len())?;
    check_bias(g, bias)?;
    correlate(g, x, &weights_f32(w), bias, y)
}

/// Conv2d backward from the output gradient `dy` `[N, C_out, OH, OW]`:
/// `dx = col2im(Wᵀ·dy)` (a transposed conv of `dy`), `dw = dy · im2col(x)ᵀ`,
/// `db = Σ dy` over batch and pixels. Each requested gradient is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward<W: FloatElement>(
    g: &ConvGeometry,
    x: &[f32],
    w: &[W],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) -> Result<()> {
    check_op(g, false, x.len(), w.len(), dy.len())?;
    if let Some(dx) = dx {
        check_len("dx", dx.len(), g.input_len())?;
        scatter(g, dy, &weights_f32(w), dx)?;
    }
    if let Some(dw) = dw {
        check_len("dw", dw.len(), g.weight_len())?;
        weight_grad(g, x, dy, dw)?;
    }
    if let Some(db) = db {
        check_len("db", db.len(), g.out_channels())?;
        bias_grad(dy, g.batch, g.small[0], g.small_hw(), db);
    }
    Ok(())
}

/// ConvTranspose2d forward: `y = col2im(Wᵀ·x) + b` — the input gradient of the matching conv.
/// `x` `[N, C_in, H, W]`, `w` `[C_in, C_out/G, kh, kw]`, `bias` `[C_out]`,
/// `y` `[N, C_out, OH, OW]` with `OH = (H−1)·s − 2p + d·(k−1) + output_padding + 1`.
pub fn conv_transpose2d_forward<W: FloatElement>(
    g: &ConvGeometry,
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check_op(g, true, x.len(), w.len(), y.len())?;
    check_bias(g, bias)?;
    scatter(g, x, &weights_f32(w), y)?;
    if let Some(b) = bias {
        y.par_chunks_mut(g.big[0] * g.big_hw())
            .for_each(|img| add_channel_bias(img, g.big[0], g.big_hw(), b));
    }
    Ok(())
}

/// ConvTranspose2d backward from `dy` `[N, C_out, OH, OW]`: `dx = W ⋆ dy` (a conv of `dy`),
/// `dw = x · im2col(dy)ᵀ`, `db = Σ dy`. Each requested gradient is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward<W: FloatElement>(
    g: &ConvGeometry,
    x: &[f32],
    w: &[W],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) -> Result<()> {
    check_op(g, true, x.len(), w.len(), dy.len())?;
    if let Some(dx) = dx {
        check_len("dx", dx.len(), g.input_len())?;
        correlate(g, dy, &weights_f32(w), None, dx)?;
    }
    if let Some(dw) = dw {
        check_len("dw", dw.len(), g.weight_len())?;
        weight_grad(g, dy, x, dw)?;
    }
    if let Some(db) = db {
        check_len("db", db.len(), g.out_channels())?;
        bias_grad(dy, g.batch, g.big[0], g.big_hw(), db);
    }
    Ok(())
}

fn check_op(g: &ConvGeometry, transposed: bool, x: usize, w: usize, y: usize) -> Result<()> {
    if g.transposed != transposed {
        return Err(Error::invalid(format!(
            "conv: geometry is for a {} convolution",
            if g.transposed { "transposed" } else { "plain" }
        )));
    }
    check_len("input", x, g.input_len())?;
    check_len("weight", w, g.weight_len())?;
    check_len("output", y, g.output_len())
}

#[cfg(test)]
mod tests {
    use super::{col2im, tap_table, taps, Col2im, Conv2dParams, ConvGeometry, NarrowCol2im};
    use super::{scatter_add, scatter_by, subpixel};

    /// xorshift32: uniform values in [-0.5, 0.5), deterministic from `seed`.
    fn uniform(mut state: u32) -> impl FnMut() -> f32 {
        move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        }
    }

    /// The narrow col2im (residue-split scratch rows) and the table one are bitwise the
    /// per-segment col2im into a zeroed plane: every pixel receives its taps in the same order. Strides 1–3, dilations,
    /// paddings up to beyond the kernel's reach, output paddings, odd sizes.
    #[test]
    fn narrow_col2im_matches_segments() {
        let mut next = uniform(0x9e37_79b9);
        let mut cases = 0;
        for (h, w) in [(1, 1), (4, 4), (3, 7), (8, 8), (5, 2), (2, 13), (16, 16)] {
            for k in [1, 3, 4, 5] {
                for s in [1, 2, 3] {
                    for d in [1, 2] {
                        for pad in [0, 1, 2, 4] {
                            let p = Conv2dParams {
                                stride: [s, s],
                                padding: [pad, pad.min(2)],
                                dilation: [d, 1],
                                groups: 1,
                                output_padding: [(s - 1).min(1), 0],
                            };
                            let Ok(g) =
                                ConvGeometry::conv_transpose2d([1, 2, h, w], [2, 3, k, k], &p)
                            else {
                                continue;
                            };
                            let Some(narrow) = NarrowCol2im::new(&g) else {
                                continue;
                            };
                            let t = taps(&g);
                            let (chans, shw) = (g.big[0], g.small[1] * g.small[2]);
                            let ld = shw + 3;
                            let col: Vec<f32> =
                                (0..chans * t.len() * ld + 1).map(|_| next()).collect();
                            let bhw = g.big[1] * g.big[2];
                            let (mut want, mut got) =
                                (vec![0f32; chans * bhw], vec![0f32; chans * bhw]);
                            col2im(&g, &t, &Col2im::Segments, chans, &col, ld, 1, &mut want);
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            let mut hows = vec![Col2im::Narrow(narrow)];
                            hows.extend(tap_table(&g, &t).map(Col2im::Table));
                            for how in &hows {
                                got.fill(0.0);
                                col2im(&g, &t, how, chans, &col, ld, 1, &mut got);
                                assert_eq!(
                                    bits(&got),
                                    bits(&want),
                                    "{h}x{w} k{k} s{s} d{d} p{pad}"
                                );
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 100, "{cases}");
    }

    /// The output-phase route of `scatter` equals the `W_gᵀ·small` + col2im route (up to the
    /// rounding of a different summation order) for any channel count, stride 1–3 (the route
    /// itself takes stride 1 too), kernels the stride divides and does not, kernels shorter than
    /// the stride, paddings beyond the kernel, output paddings, groups and odd sizes.
    #[test]
    fn phase_route_matches_col2im_route() {
        let mut next = uniform(0x1234_5677);
        let mut cases = 0;
        for (n, h, w) in [(1, 1, 1), (2, 4, 4), (3, 3, 7), (1, 5, 2), (2, 6, 6)] {
            for (kh, kw) in [(1, 1), (2, 3), (3, 3), (4, 4), (5, 4)] {
                for s in [1, 2, 3] {
                    for pad in [0, 1, 3] {
                        for (groups, cpg) in [(1, 3), (2, 2)] {
                            let p = Conv2dParams {
                                stride: [s, s.min(2)],
                                padding: [pad, pad.min(1)],
                                dilation: [1, 1],
                                groups,
                                output_padding: [(s - 1).min(1), 0],
                            };
                            let cs = groups * (cpg + 1);
                            let Ok(g) = ConvGeometry::conv_transpose2d(
                                [n, cs, h, w],
                                [cs, cpg, kh, kw],
                                &p,
                            ) else {
                                continue;
                            };
                            let small: Vec<f32> = (0..g.input_len()).map(|_| next()).collect();
                            let wt: Vec<f32> = (0..g.weight_len()).map(|_| next()).collect();
                            let mut want = vec![f32::NAN; g.output_len()];
                            let mut got = vec![f32::NAN; g.output_len()];
                            scatter_by(&g, &small, &wt, &mut want, false).unwrap();
                            subpixel::scatter(&g, &small, &wt, &mut got).unwrap();
                            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                    "{n}x{h}x{w} k{kh}x{kw} s{s} p{pad} g{groups} at {i}: {a} vs {b}"
                                );
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 200, "{cases}");
    }

    /// The AVX2 step-2 scatter-add is bitwise the scalar loop (signed zeros included), for every
    /// length around its block of eight, offsets, and destinations of every end.
    #[test]
    fn scatter_add_step2_matches_scalar() {
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            match state % 7 {
                0 => -0.0,
                1 => 0.0,
                _ => (state as f32 / u32::MAX as f32 - 0.5) * 3.0,
            }
        };
        for len in 1..=41 {
            // Destinations that go on past the last target, end right after it, or end on it
            // (the masked last block).
            for (start, extra) in [(0, 3), (1, 0), (5, 1), (0, 0), (3, 0), (2, 1)] {
                let src: Vec<f32> = (0..len).map(|_| next()).collect();
                let dst: Vec<f32> = (0..start + 2 * len - 1 + extra).map(|_| next()).collect();
                let mut want = dst.clone();
                for (i, s) in src.iter().enumerate() {
                    want[start + 2 * i] += *s;
                }
                let mut got = dst.clone();
                scatter_add(&src, &mut got, start, 2);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "len {len} start {start}"
                );
            }
        }
    }
}
