//! A small f32 vector abstraction over AVX2+FMA (8 lanes) and AVX-512F (16 lanes) for the
//! training kernels (attention forward/backward, fused cross-entropy).
//!
//! Kernels are written once, generically over [`Vf32`], as `#[inline(always)]` functions, and
//! instantiated inside a `#[target_feature]` entry function per instruction set: inlined there,
//! every intrinsic compiles with that instruction set enabled. The methods are `unsafe` because
//! they are only sound where the CPU has the instruction set (checked at run time by
//! [`Isa::available`](crate::elementwise::activations::Isa::available) before any entry
//! function is called) and, for loads and stores, where the pointer covers `LANES` floats.
#![allow(clippy::missing_safety_doc)]

use crate::elementwise::activations::Isa;

/// Whether the training kernels can run `isa` here (their AVX-512 path also uses AVX2 and FMA,
/// which every AVX-512 CPU has). Detected once per process.
pub(crate) fn isa_ok(isa: Isa) -> bool {
    static HAS: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    let (avx2, avx512) = *HAS.get_or_init(|| {
        let avail = Isa::available();
        let avx2 = avail.contains(&Isa::Avx2);
        (avx2, avx2 && avail.contains(&Isa::Avx512))
    });
    match isa {
        Isa::Scalar => true,
        Isa::Avx2 => avx2,
        Isa::Avx512 => avx512,
    }
}

/// The fastest path [`isa_ok`] accepts (detected once per process).
pub(crate) fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|&i| isa_ok(i))
            .unwrap_or(Isa::Scalar)
    })
}

/// An f32 SIMD vector.
pub(crate) trait Vf32: Copy {
    /// Number of f32 lanes.
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a·b + c` with one rounding.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    /// `2^x`: degree-6 polynomial of the fraction, `2^n` built in the exponent bits. Lanes with
    /// `x < −126` (−∞ included) give exactly 0; `x` is clamped at 127; NaN stays NaN.
    unsafe fn exp2(x: Self) -> Self;
    /// `e^x` (Cephes `expf`: `x = n·ln2 + r` with `ln2` split in two, degree-6 polynomial in
    /// `r`); lanes with `x < −87.3` (−∞ included) give exactly 0; NaN stays NaN.
    unsafe fn exp(x: Self) -> Self;
    /// Horizontal sum in a fixed order (halves added pairwise).
    unsafe fn hsum(self) -> f32;
    /// Horizontal maximum.
    unsafe fn hmax(self) -> f32;
}

// Polynomial coefficients of 2^f = e^(f·ln2) on |f| ≤ 1/2 (Taylor, relative error ≈ 1.2e-7).
const P2: [f32; 6] = [
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
];
// Cephes expf: e^r − 1 − r ≈ r²·P(r) on |r| ≤ ln2/2.
const PE: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Vf32, LN2_HI, LN2_LO, P2, PE};
    use std::arch::x86_64::*;

    /// `dst[c·ld + j] = src[j·stride + c]·scale` for `j < n`, `c < d`: 8×8 blocks transposed
    /// in registers, scalar edges.
    ///
    /// Safety: AVX2 present; `src` readable at `j·stride + c` and `dst` writable at `c·ld + j`
    /// for every `j < n`, `c < d`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn transpose_scaled(
        src: *const f32,
        stride: usize,
        n: usize,
        d: usize,
        scale: f32,
        dst: *mut f32,
        ld: usize,
    ) {
        let (n8, d8) = (n / 8 * 8, d / 8 * 8);
        let sc = _mm256_set1_ps(scale);
        for j0 in (0..n8).step_by(8) {
            for c0 in (0..d8).step_by(8) {
                let r: [__m256; 8] =
                    std::array::from_fn(|k| _mm256_loadu_ps(src.add((j0 + k) * stride + c0)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let o = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (k, v) in o.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((c0 + k) * ld + j0), _mm256_mul_ps(*v, sc));
                }
            }
            for c in d8..d {
                for j in j0..j0 + 8 {
                    *dst.add(c * ld + j) = *src.add(j * stride + c) * scale;
                }
            }
        }
        for j in n8..n {
            for c in 0..d {
                *dst.add(c * ld + j) = *src.add(j * stride + c) * scale;
            }
        }
    }

    /// 8 lanes, AVX2 + FMA.
    #[derive(Clone, Copy)]
    pub(crate) struct F32x8(__m256);
    /// 16 lanes, AVX-512F.
    #[derive(Clone, Copy)]
    pub(crate) struct F32x16(__m512);

    impl Vf32 for F32x8 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            F32x8(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            F32x8(_mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            F32x8(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            F32x8(_mm256_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            F32x8(_mm256_add_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            F32x8(_mm256_sub_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            F32x8(_mm256_mul_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            F32x8(_mm256_max_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn exp2(x: Self) -> Self {
            let x = x.0;
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-126.0));
            let xc = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(-126.0)),
                _mm256_set1_ps(127.0),
            );
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
            let f = _mm256_sub_ps(xc, n);
            let mut p = _mm256_set1_ps(P2[5]);
            for &c in P2[..5].iter().rev() {
                p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
            }
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
            let pow = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            )));
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
            let r = _mm256_and_ps(_mm256_mul_ps(p, pow), keep);
            F32x8(_mm256_blendv_ps(r, x, nan))
        }
        #[inline(always)]
        unsafe fn exp(x: Self) -> Self {
            let x = x.0;
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.3));
            let xc = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
                _mm256_set1_ps(88.7),
            );
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(PE[0]);
            for &c in &PE[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let p = _mm256_add_ps(
                _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            // n ∈ [−126, 128]: 2^n as 2^(n/2)·2^(n − n/2), both normal floats.
            let ni = _mm256_cvtps_epi32(n);
            let h = _mm256_srai_epi32::<1>(ni);
            let bias = _mm256_set1_epi32(127);
            let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(h, bias)));
            let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_sub_epi32(ni, h),
                bias,
            )));
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
            let v = _mm256_and_ps(_mm256_mul_ps(_mm256_mul_ps(p, s1), s2), keep);
            F32x8(_mm256_blendv_ps(v, x, nan))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let x = self.0;
            let h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h));
            _mm_cvtss_f32(h)
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            let x = self.0;
            let h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_max_ss(h, _mm_shuffle_ps::<0b01>(h, h));
            _mm_cvtss_f32(h)
        }
    }

    impl Vf32 for F32x16 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            F32x16(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            F32x16(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            F32x16(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
            F32x16(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            F32x16(_mm512_add_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            F32x16(_mm512_sub_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            F32x16(_mm512_mul_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            F32x16(_mm512_max_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn exp2(x: Self) -> Self {
            let x = x.0;
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-126.0));
            let xc = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(-126.0)),
                _mm512_set1_ps(127.0),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
            let f = _mm512_sub_ps(xc, n);
            let mut p = _mm512_set1_ps(P2[5]);
            for &c in P2[..5].iter().rev() {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
            }
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
            let pow = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            )));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let r = _mm512_maskz_mul_ps(keep, p, pow);
            F32x16(_mm512_mask_blend_ps(nan, r, x))
        }
        #[inline(always)]
        unsafe fn exp(x: Self) -> Self {
            let x = x.0;
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.3));
            let xc = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
                _mm512_set1_ps(88.7),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(PE[0]);
            for &c in &PE[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let p = _mm512_add_ps(
                _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            let ni = _mm512_cvtps_epi32(n);
            let h = _mm512_srai_epi32::<1>(ni);
            let bias = _mm512_set1_epi32(127);
            let s1 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(h, bias)));
            let s2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_sub_epi32(ni, h),
                bias,
            )));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let v = _mm512_maskz_mul_ps(keep, _mm512_mul_ps(p, s1), s2);
            F32x16(_mm512_mask_blend_ps(nan, v, x))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let x = self.0;
            let lo = _mm512_castps512_ps256(x);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
            F32x8(_mm256_add_ps(lo, hi)).hsum()
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            let x = self.0;
            let lo = _mm512_castps512_ps256(x);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
            F32x8(_mm256_max_ps(lo, hi)).hmax()
        }
    }
}
