//! Packing strided A and B into tile rows ([`Line`]s), zero-padded to whole tiles.
//!
//! * A panel `ip` (rows `32·ip .. 32·ip+32`), k-step `s`: line `s·32 + 16·t + r` holds row
//!   `32·ip + 16·t + r`, columns `k = 32·s .. 32·s+32`, as bf16 (f32 A is rounded to nearest
//!   even while packing).
//! * B panel `jp` (columns `32·jp .. 32·jp+32`), k-step `s`: line `s·32 + 16·t + r` holds, for
//!   `n = 0..16`, the pair `(B[32·s+2r][j], B[32·s+2r+1][j])` with `j = 32·jp + 16·t + n` — the
//!   "VNNI" layout `tdpbf16ps` expects.
//!
//! Rows, columns and k beyond the matrix are zeros, so the kernel never reads outside the
//! packed buffers and padding adds nothing to C. Each panel is packed by one function; the
//! AVX2 paths handle whole interior chunks of unit-stride operands and must match the scalar
//! path bit for bit (tested).
use super::tiles::{Line, LINES_PER_KSTEP};
use super::AmxElement;
use crate::gemm::MatRef;
use half::bf16;
use kiln_tensor::convert::f32_to_bf16_one;
use kiln_tensor::{Error, Result};

/// How panels are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackKernel {
    /// AVX2 conversion and interleaving for unit-stride chunks, scalar for the rest.
    Avx2,
    /// Element-by-element (the reference).
    Scalar,
}

impl PackKernel {
    /// The fastest packer this CPU runs.
    pub fn best() -> PackKernel {
        if Self::Avx2.is_available() {
            PackKernel::Avx2
        } else {
            PackKernel::Scalar
        }
    }

    /// Whether this CPU can run it.
    pub fn is_available(self) -> bool {
        match self {
            PackKernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            PackKernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            PackKernel::Avx2 => false,
        }
    }

    pub(crate) fn check(self) -> Result<()> {
        if self.is_available() {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "gemm amx: packing kernel {self:?} is not supported by this CPU"
            )))
        }
    }
}

/// Number of k-steps (32 each) covering `k`.
pub(crate) fn ksteps(k: usize) -> usize {
    k.div_ceil(32)
}

/// Packs A panel rows `i0 .. i0+32` into `dst` (`ksteps(a.cols)·32` lines).
pub(crate) fn pack_a_panel<TA: AmxElement>(
    a: &MatRef<'_, TA>,
    i0: usize,
    dst: &mut [Line],
    pack: PackKernel,
) {
    #[cfg(target_arch = "x86_64")]
    if pack == PackKernel::Avx2 {
        // SAFETY: `PackKernel::Avx2` reaches the packers only after `PackKernel::check` (or
        // `is_available`) confirmed AVX2.
        unsafe { pack_a_panel_avx2(a, i0, dst) };
        return;
    }
    let _ = pack;
    pack_a_panel_impl::<TA, false>(a, i0, dst)
}

/// The whole A panel loop compiled with AVX2, so the conversion inlines into it.
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_a_panel_avx2<TA: AmxElement>(a: &MatRef<'_, TA>, i0: usize, dst: &mut [Line]) {
    pack_a_panel_impl::<TA, true>(a, i0, dst)
}

/// The A panel loop; `AVX2` selects the vector conversion for whole unit-stride chunks.
#[inline(always)]
fn pack_a_panel_impl<TA: AmxElement, const AVX2: bool>(
    a: &MatRef<'_, TA>,
    i0: usize,
    dst: &mut [Line],
) {
    let k = a.cols;
    let ks = ksteps(k);
    debug_assert_eq!(dst.len(), ks * LINES_PER_KSTEP);
    for rr in 0..32 {
        let i = i0 + rr;
        let slot = 16 * (rr / 16) + rr % 16; // = rr: tile rr/16, row rr%16
        for s in 0..ks {
            let line = &mut dst[s * LINES_PER_KSTEP + slot].0;
            if i >= a.rows {
                *line = [0; 32];
                continue;
            }
            let k0 = 32 * s;
            let full = k0 + 32 <= k && a.col_stride == 1;
            if TA::IS_F32 {
                let data: &[f32] = bytemuck::cast_slice(a.data);
                if full && AVX2 {
                    let start = i * a.row_stride + k0;
                    convert_32(&data[start..start + 32], line);
                } else {
                    for (e, v) in line.iter_mut().enumerate() {
                        let kk = k0 + e;
                        *v = if kk < k {
                            f32_to_bf16_one(data[i * a.row_stride + kk * a.col_stride]).to_bits()
                        } else {
                            0
                        };
                    }
                }
            } else {
                let data: &[u16] = bytemuck::cast_slice(a.data);
                if full {
                    let start = i * a.row_stride + k0;
                    line.copy_from_slice(&data[start..start + 32]);
                } else {
                    for (e, v) in line.iter_mut().enumerate() {
                        let kk = k0 + e;
                        *v = if kk < k {
                            data[i * a.row_stride + kk * a.col_stride]
                        } else {
                            0
                        };
                    }
                }
            }
        }
    }
}

/// Packs consecutive B panels starting at column `j0` (multiple of 32) into `dst`, which holds
/// a whole number of panels of `ksteps(b.rows)·32` lines each.
///
/// The loop runs over k outermost and across all the panels innermost, so each pair of B rows
/// is read as one contiguous run (`32·panels` columns) rather than 64 bytes per row per panel
/// (which costs a TLB miss per 64 bytes on wide matrices).
pub(crate) fn pack_b_panels(b: &MatRef<'_, bf16>, j0: usize, dst: &mut [Line], pack: PackKernel) {
    #[cfg(target_arch = "x86_64")]
    if pack == PackKernel::Avx2 {
        // SAFETY: as in `pack_a_panel`: AVX2 was confirmed before `PackKernel::Avx2` got here.
        unsafe { pack_b_panels_avx2(b, j0, dst) };
        return;
    }
    let _ = pack;
    pack_b_panels_impl::<false>(b, j0, dst)
}

/// The whole B packing loop compiled with AVX2, so the interleave inlines into it.
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_b_panels_avx2(b: &MatRef<'_, bf16>, j0: usize, dst: &mut [Line]) {
    pack_b_panels_impl::<true>(b, j0, dst)
}

/// The B packing loop; `AVX2` selects the vector interleave for whole unit-stride chunks.
#[inline(always)]
fn pack_b_panels_impl<const AVX2: bool>(b: &MatRef<'_, bf16>, j0: usize, dst: &mut [Line]) {
    let (k, n) = (b.rows, b.cols);
    let ks = ksteps(k);
    let panel = ks * LINES_PER_KSTEP;
    if panel == 0 {
        return;
    }
    debug_assert_eq!(dst.len() % panel, 0);
    let count = dst.len() / panel;
    let data: &[u16] = bytemuck::cast_slice(b.data);
    let at = |kk: usize, j: usize| -> u16 {
        if kk < k && j < n {
            data[kk * b.row_stride + j * b.col_stride]
        } else {
            0
        }
    };
    for s in 0..ks {
        for r in 0..16 {
            let k0 = 32 * s + 2 * r;
            for p in 0..count {
                for t in 0..2 {
                    let jt = j0 + 32 * p + 16 * t;
                    let line = &mut dst[p * panel + s * LINES_PER_KSTEP + 16 * t + r].0;
                    let full = k0 + 1 < k && jt + 16 <= n && b.col_stride == 1;
                    if full && AVX2 {
                        let r0 = k0 * b.row_stride + jt;
                        let r1 = (k0 + 1) * b.row_stride + jt;
                        interleave_16(&data[r0..r0 + 16], &data[r1..r1 + 16], line);
                    } else {
                        for nn in 0..16 {
                            line[2 * nn] = at(k0, jt + nn);
                            line[2 * nn + 1] = at(k0 + 1, jt + nn);
                        }
                    }
                }
            }
        }
    }
}

/// Packs one 32-column panel of a bf16 [`PanelMatrix`](crate::gemm::PanelMatrix) (`panel`:
/// `k` rows of 32 elements in the panel's slot order, see [`crate::gemm::panels::slot`]) into
/// `dst` (`ksteps(k)·32` lines): the same lines [`pack_b_panels`] makes from the dense matrix.
///
/// In a panel row, the 32-bit word `i` of half `t` holds column `16t + i` in its low and
/// `16t + 8 + i` in its high 16 bits; so for the pair-row `(k0, k0+1)`, tile line words `0..8`
/// are the low halves of the two rows' words interleaved, words `8..16` the high halves.
pub(crate) fn pack_b_from_panel(panel: &[u16], k: usize, dst: &mut [Line], pack: PackKernel) {
    #[cfg(target_arch = "x86_64")]
    if pack == PackKernel::Avx2 {
        // SAFETY: as in `pack_a_panel`: AVX2 was confirmed before `PackKernel::Avx2` got here.
        unsafe { pack_b_from_panel_avx2(panel, k, dst) };
        return;
    }
    let _ = pack;
    pack_b_from_panel_impl::<false>(panel, k, dst)
}

/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_b_from_panel_avx2(panel: &[u16], k: usize, dst: &mut [Line]) {
    pack_b_from_panel_impl::<true>(panel, k, dst)
}

#[inline(always)]
fn pack_b_from_panel_impl<const AVX2: bool>(panel: &[u16], k: usize, dst: &mut [Line]) {
    use crate::gemm::panels::slot;
    use kiln_tensor::DType;
    assert!(panel.len() >= 32 * k && dst.len() >= ksteps(k) * LINES_PER_KSTEP);
    for s in 0..ksteps(k) {
        for r in 0..16 {
            let k0 = 32 * s + 2 * r;
            for t in 0..2 {
                let line = &mut dst[s * LINES_PER_KSTEP + 16 * t + r].0;
                if k0 + 1 < k && AVX2 {
                    let h0 = &panel[32 * k0 + 16 * t..][..16];
                    let h1 = &panel[32 * (k0 + 1) + 16 * t..][..16];
                    deinterleave_halves(h0, h1, line);
                } else {
                    for nn in 0..16 {
                        let at = |kk: usize| {
                            if kk < k {
                                panel[32 * kk + slot(DType::BF16, 16 * t + nn)]
                            } else {
                                0
                            }
                        };
                        line[2 * nn] = at(k0);
                        line[2 * nn + 1] = at(k0 + 1);
                    }
                }
            }
        }
    }
}

/// One tile line from the same half of two panel rows, with AVX2 (see [`pack_b_from_panel`]).
/// Only called from the AVX2-compiled loop.
#[inline(always)]
fn deinterleave_halves(h0: &[u16], h1: &[u16], dst: &mut [u16; 32]) {
    assert!(h0.len() == 16 && h1.len() == 16);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (see `convert_32`); `h0`, `h1` have 16 elements (asserted), `dst`
    // has 32.
    unsafe {
        use std::arch::x86_64::*;
        let x = _mm256_loadu_si256(h0.as_ptr() as *const __m256i);
        let y = _mm256_loadu_si256(h1.as_ptr() as *const __m256i);
        // Low halves: x's low 16 bits, y's low 16 bits moved up; high halves: x's moved down,
        // y's high 16 bits (blend takes odd 16-bit elements from the second operand).
        let lo = _mm256_blend_epi16::<0xAA>(x, _mm256_slli_epi32::<16>(y));
        let hi = _mm256_blend_epi16::<0xAA>(_mm256_srli_epi32::<16>(x), y);
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, lo);
        _mm256_storeu_si256(dst.as_mut_ptr().add(16) as *mut __m256i, hi);
    }
    #[cfg(not(target_arch = "x86_64"))]
    for i in 0..8 {
        dst[2 * i] = h0[2 * i];
        dst[2 * i + 1] = h1[2 * i];
        dst[16 + 2 * i] = h0[2 * i + 1];
        dst[16 + 2 * i + 1] = h1[2 * i + 1];
    }
}

/// 32 f32 → 32 bf16 bits (round to nearest even, NaN kept quiet) with AVX2.
/// Only called from the AVX2-compiled packing loops.
#[inline(always)]
fn convert_32(src: &[f32], dst: &mut [u16; 32]) {
    assert_eq!(src.len(), 32);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (only the `AVX2 = true` loops, which run inside the
    // `#[target_feature(enable = "avx2")]` wrappers, call this); `src` has 32 elements
    // (asserted), `dst` 32.
    unsafe {
        convert_32_avx2(src.as_ptr(), dst.as_mut_ptr())
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_one(s).to_bits();
    }
}

/// # Safety
/// AVX2 present; `src` readable for 32 f32, `dst` writable for 32 u16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn convert_32_avx2(src: *const f32, dst: *mut u16) {
    use std::arch::x86_64::*;
    // bf16 bits of 8 f32s in the low halves of 8 i32 lanes:
    // NaN → (x >> 16) | 0x40, else (x + 0x7fff + ((x >> 16) & 1)) >> 16.
    let cvt8 = |x: __m256i| -> __m256i {
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(x, bias));
        let abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7fff_ffff));
        let is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x40));
        _mm256_blendv_epi8(rounded, quiet, is_nan)
    };
    // SAFETY: the four 32-byte loads cover src[0..32]; the two stores cover dst[0..32].
    unsafe {
        let x0 = cvt8(_mm256_loadu_si256(src as *const __m256i));
        let x1 = cvt8(_mm256_loadu_si256(src.add(8) as *const __m256i));
        let x2 = cvt8(_mm256_loadu_si256(src.add(16) as *const __m256i));
        let x3 = cvt8(_mm256_loadu_si256(src.add(24) as *const __m256i));
        // packus works per 128-bit lane: [x0 lo, x1 lo, x0 hi, x1 hi] → reorder the 64-bit
        // quarters to [x0 lo, x0 hi, x1 lo, x1 hi]. Values are < 2^16, so no saturation.
        let p01 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(x0, x1));
        let p23 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(x2, x3));
        _mm256_storeu_si256(dst as *mut __m256i, p01);
        _mm256_storeu_si256(dst.add(16) as *mut __m256i, p23);
    }
}

/// `dst[2n] = r0[n]`, `dst[2n+1] = r1[n]` for n < 16, with AVX2.
/// Only called from the AVX2-compiled packing loops.
#[inline(always)]
fn interleave_16(r0: &[u16], r1: &[u16], dst: &mut [u16; 32]) {
    assert!(r0.len() == 16 && r1.len() == 16);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (see `convert_32`); `r0`, `r1` have 16 elements (asserted), `dst`
    // has 32.
    unsafe {
        interleave_16_avx2(r0.as_ptr(), r1.as_ptr(), dst.as_mut_ptr())
    }
    #[cfg(not(target_arch = "x86_64"))]
    for nn in 0..16 {
        dst[2 * nn] = r0[nn];
        dst[2 * nn + 1] = r1[nn];
    }
}

/// # Safety
/// AVX2 present; `r0`, `r1` readable for 16 u16; `dst` writable for 32 u16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn interleave_16_avx2(r0: *const u16, r1: *const u16, dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: two 32-byte loads of r0[0..16] and r1[0..16], two 32-byte stores to dst[0..32].
    unsafe {
        let x = _mm256_loadu_si256(r0 as *const __m256i);
        let y = _mm256_loadu_si256(r1 as *const __m256i);
        // unpack works per 128-bit lane: lo = pairs 0..4 | 8..12, hi = pairs 4..8 | 12..16.
        let lo = _mm256_unpacklo_epi16(x, y);
        let hi = _mm256_unpackhi_epi16(x, y);
        _mm256_storeu_si256(
            dst as *mut __m256i,
            _mm256_permute2x128_si256::<0x20>(lo, hi),
        );
        _mm256_storeu_si256(
            dst.add(16) as *mut __m256i,
            _mm256_permute2x128_si256::<0x31>(lo, hi),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 32) as u32
    }

    #[test]
    fn avx2_packing_matches_scalar_bitwise() {
        if !PackKernel::Avx2.is_available() {
            println!("SKIP avx2_packing_matches_scalar_bitwise: no AVX2");
            return;
        }
        let mut seed = 7u64;
        for &(m, k) in &[(1, 1), (33, 64), (40, 95), (64, 128), (5, 257)] {
            // Random bit patterns (NaN, inf, denormals, rounding ties included) plus exact ties.
            let mut a: Vec<f32> = (0..m * k).map(|_| f32::from_bits(lcg(&mut seed))).collect();
            a[0] = f32::from_bits(0x3f80_8000); // tie, round down to even
            if a.len() > 1 {
                a[1] = f32::from_bits(0x3f81_8000); // tie, round up to even
            }
            let av = MatRef::row_major(&a[..], m, k);
            for ip in 0..m.div_ceil(32) {
                let mut s = vec![Line::ZERO; ksteps(k) * 32];
                let mut v = s.clone();
                pack_a_panel(&av, 32 * ip, &mut s, PackKernel::Scalar);
                pack_a_panel(&av, 32 * ip, &mut v, PackKernel::Avx2);
                assert_eq!(s, v, "A {m}x{k} panel {ip}");
            }
            let b: Vec<bf16> = (0..m * k)
                .map(|_| bf16::from_bits(lcg(&mut seed) as u16))
                .collect();
            let bv = MatRef::row_major(&b[..], k, m);
            for jp in 0..m.div_ceil(32) {
                let mut s = vec![Line::ZERO; ksteps(k) * 32];
                let mut v = s.clone();
                pack_b_panels(&bv, 32 * jp, &mut s, PackKernel::Scalar);
                pack_b_panels(&bv, 32 * jp, &mut v, PackKernel::Avx2);
                assert_eq!(s, v, "B {k}x{m} panel {jp}");
            }
            // Several panels in one call equal the panels packed one by one.
            let np = m.div_ceil(32);
            let mut all = vec![Line::ZERO; np * ksteps(k) * 32];
            pack_b_panels(&bv, 0, &mut all, PackKernel::Avx2);
            for (jp, chunk) in all.chunks(ksteps(k) * 32).enumerate() {
                let mut one = vec![Line::ZERO; ksteps(k) * 32];
                pack_b_panels(&bv, 32 * jp, &mut one, PackKernel::Scalar);
                assert_eq!(chunk, &one[..], "B {k}x{m} group, panel {jp}");
            }
        }
    }

    #[test]
    fn scalar_packing_layout() {
        // A 3×40 of small integers (exact in bf16): row i, column k lands at line 32·(k/32) + i.
        let (m, k) = (3, 40);
        let a: Vec<f32> = (0..m * k).map(|x| (x % 7) as f32).collect();
        let av = MatRef::row_major(&a[..], m, k);
        let mut p = vec![Line::ZERO; ksteps(k) * 32];
        pack_a_panel(&av, 0, &mut p, PackKernel::Scalar);
        for s in 0..2 {
            for rr in 0..32 {
                for e in 0..32 {
                    let (i, kk) = (rr, 32 * s + e);
                    let want = if i < m && kk < k { a[i * k + kk] } else { 0.0 };
                    let got = f32::from_bits((p[s * 32 + rr].0[e] as u32) << 16);
                    assert_eq!(got, want);
                }
            }
        }
        // B 5×20 (k × n): VNNI pairs.
        let (k, n) = (5, 20);
        let b: Vec<bf16> = (0..k * n).map(|x| bf16::from_f32((x % 9) as f32)).collect();
        let bv = MatRef::row_major(&b[..], k, n);
        let mut q = vec![Line::ZERO; 32];
        pack_b_panels(&bv, 0, &mut q, PackKernel::Scalar);
        for t in 0..2 {
            for r in 0..16 {
                for nn in 0..16 {
                    for e in 0..2 {
                        let (kk, j) = (2 * r + e, 16 * t + nn);
                        let want = if kk < k && j < n {
                            b[kk * n + j]
                        } else {
                            bf16::ZERO
                        };
                        assert_eq!(q[16 * t + r].0[2 * nn + e], want.to_bits());
                    }
                }
            }
        }
    }
}
