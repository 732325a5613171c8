//! AVX-512F and AVX2 (+F16C) bodies of the bulk dtype conversions in [`crate::convert`].
//!
//! Each function converts the largest prefix that fills whole vectors and returns its length; the
//! caller finishes the tail with the scalar reference. The caller guarantees (by run-time
//! detection) that the CPU has the features a function is compiled for.
//!
//! * bf16 → f32: widen each u16 to u32 and shift left by 16 (exact).
//! * f32 → bf16: `(bits + 0x7fff + ((bits >> 16) & 1)) >> 16` (round to nearest, ties to even),
//!   and for NaN lanes `(bits >> 16) | 0x0040` (quiet NaN, sign kept) — the scalar formula of
//!   `convert::f32_to_bf16_one`, lane by lane.
//! * f16 ⇄ f32: the hardware conversions (`vcvtph2ps`, `vcvtps2ph` with round-to-nearest-even).
#![cfg(target_arch = "x86_64")]
use half::{bf16, f16};
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn bf16_to_f32_avx512(src: &[bf16], dst: &mut [f32]) -> usize {
    let n = src.len().min(dst.len()) / 16 * 16;
    let (s, d) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
            let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            _mm512_storeu_si512(d.add(i) as *mut _, w);
        }
        i += 16;
    }
    n
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn f32_to_bf16_avx512(src: &[f32], dst: &mut [bf16]) -> usize {
    let n = src.len().min(dst.len()) / 16 * 16;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr() as *mut u16);
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let x = _mm512_loadu_ps(s.add(i));
            let bits = _mm512_castps_si512(x);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
            let nan = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x0040));
            let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let r = _mm512_mask_blend_epi32(is_nan, rounded, nan);
            _mm256_storeu_si256(d.add(i) as *mut __m256i, _mm512_cvtepi32_epi16(r));
        }
        i += 16;
    }
    n
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn f16_to_f32_avx512(src: &[f16], dst: &mut [f32]) -> usize {
    let n = src.len().min(dst.len()) / 16 * 16;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
            _mm512_storeu_ps(d.add(i), _mm512_cvtph_ps(h));
        }
        i += 16;
    }
    n
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn f32_to_f16_avx512(src: &[f32], dst: &mut [f16]) -> usize {
    let n = src.len().min(dst.len()) / 16 * 16;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let x = _mm512_loadu_ps(s.add(i));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            _mm256_storeu_si256(d.add(i) as *mut __m256i, h);
        }
        i += 16;
    }
    n
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn bf16_to_f32_avx2(src: &[bf16], dst: &mut [f32]) -> usize {
    let n = src.len().min(dst.len()) / 8 * 8;
    let (s, d) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(s.add(i) as *const __m128i);
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            _mm256_storeu_si256(d.add(i) as *mut __m256i, w);
        }
        i += 8;
    }
    n
}

/// Eight f32 lanes to eight bf16 values in the low 16 bits of each 32-bit lane.
#[target_feature(enable = "avx2")]
fn bf16_lanes_avx2(x: __m256) -> __m256i {
    let bits = _mm256_castps_si256(x);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
    let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x0040));
    let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    _mm256_blendv_epi8(rounded, nan, is_nan)
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn f32_to_bf16_avx2(src: &[f32], dst: &mut [bf16]) -> usize {
    let n = src.len().min(dst.len()) / 16 * 16;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr() as *mut u16);
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let lo = bf16_lanes_avx2(_mm256_loadu_ps(s.add(i)));
            let hi = bf16_lanes_avx2(_mm256_loadu_ps(s.add(i + 8)));
            // Every lane is ≤ 0xffff, so unsigned saturation is exact. packus works per
            // 128-bit half: [lo0-3 hi0-3 | lo4-7 hi4-7]; the permute restores the order.
            let packed = _mm256_packus_epi32(lo, hi);
            let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
            _mm256_storeu_si256(d.add(i) as *mut __m256i, ordered);
        }
        i += 16;
    }
    n
}

/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) -> usize {
    let n = src.len().min(dst.len()) / 8 * 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(s.add(i) as *const __m128i);
            _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    n
}

/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [f16]) -> usize {
    let n = src.len().min(dst.len()) / 8 * 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 8 <= n <= both lengths; unaligned loads and stores.
        unsafe {
            let x = _mm256_loadu_ps(s.add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(d.add(i) as *mut __m128i, h);
        }
        i += 8;
    }
    n
}
