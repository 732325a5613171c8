//! Instruction-set selection and the vector `2^x` shared by attention, softmax and GELU.

/// A kernel family. [`Isa::detect`] picks the fastest one the CPU runs; tests force each
/// available one and compare it with [`Isa::Scalar`], the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust (the reference path; runs everywhere).
    Scalar,
    /// x86-64 AVX2 + FMA, 8 f32 lanes.
    Avx2,
}

impl Isa {
    /// Whether this CPU can run the kernel family.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => avx2_fma(),
        }
    }

    /// The fastest available family.
    pub fn detect() -> Isa {
        if avx2_fma() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Every family this CPU can run, reference first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }
}

fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// `2^x` on 8 lanes: `x = n + f` with `n = round(x)`, `|f| ≤ 1/2`, `2^f` by a degree-6
    /// Taylor polynomial of `e^(f·ln 2)` (relative error ≈ 1.2e-7), `2^n` built in the exponent
    /// bits. Lanes with `x < −126` (including −∞) give exactly 0; `x` is clamped at 127.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp2_ps(x: __m256) -> __m256 {
        const C1: f32 = std::f32::consts::LN_2;
        const C2: f32 = 0.240_226_5; // ln2^2/2
        const C3: f32 = 0.055_504_11; // ln2^3/6
        const C4: f32 = 0.009_618_129; // ln2^4/24
        const C5: f32 = 0.001_333_355_8; // ln2^5/120
        const C6: f32 = 0.000_154_035_3; // ln2^6/720
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-126.0));
        let xc = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-126.0)),
            _mm256_set1_ps(127.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
        let f = _mm256_sub_ps(xc, n);
        let mut p = _mm256_set1_ps(C6);
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C5));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C4));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C3));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C2));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C1));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
        let ni = _mm256_cvtps_epi32(n);
        let pow = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            ni,
            _mm256_set1_epi32(127),
        )));
        // NaN lanes fail `keep` too; let them through as NaN.
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let r = _mm256_and_ps(_mm256_mul_ps(p, pow), keep);
        _mm256_blendv_ps(r, x, nan)
    }

    /// Horizontal maximum of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn hmax_ps(x: __m256) -> f32 {
        let h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_max_ss(h, _mm_shuffle_ps::<0b01>(h, h));
        _mm_cvtss_f32(h)
    }

    /// Horizontal sum of 8 lanes (fixed order).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn hsum_ps(x: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h));
        _mm_cvtss_f32(h)
    }
}
