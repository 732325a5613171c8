//! Element types and conversions between them.
//!
//! Floating-point compute is f32; f16 and bf16 are storage formats converted to f32 on the fly (in
//! packing routines) or in bulk with [`convert`]. The integer dtypes exist so that every tensor a
//! checkpoint carries (token ids, step counters, masks) can be loaded and inspected.
use half::{bf16, f16};
use std::fmt;

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
    I32,
    U8,
    /// One byte per element, 0 or 1 (as safetensors stores `BOOL`).
    Bool,
}

impl DType {
    /// All dtypes, in a stable order.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// True for f32, f16 and bf16.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The name safetensors uses in its header (`F32`, `BF16`, ...).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Parses a safetensors dtype name; `None` for dtypes kiln does not handle.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        Some(match name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    /// Parses a user-facing name (`f32`, `bf16`, `f16`, ...), case-insensitive.
    pub fn parse(name: &str) -> Option<DType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => DType::F32,
            "f16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "i64" | "int64" => DType::I64,
            "i32" | "int32" => DType::I32,
            "u8" | "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// Lower-case name: `f32`, `f16`, `bf16`, `i64`, `i32`, `u8`, `bool`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that is the in-memory representation of a [`DType`].
///
/// `Bool` tensors are read as `u8`, so `u8` maps to [`DType::U8`] and bool tensors are accepted
/// wherever `u8` is asked for (see [`Element::accepts`]).
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + 'static {
    const DTYPE: DType;
    /// Whether a tensor of `dtype` can be viewed as a slice of `Self`.
    fn accepts(dtype: DType) -> bool {
        dtype == Self::DTYPE
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
    fn accepts(dtype: DType) -> bool {
        matches!(dtype, DType::U8 | DType::Bool)
    }
}

/// A float storage type that converts to and from f32 (f32 itself, f16, bf16).
///
/// Conversions round to nearest, ties to even; NaN stays NaN and infinities stay infinite.
pub trait FloatElement: Element + Copy {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl FloatElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl FloatElement for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl FloatElement for bf16 {
    /// Exact: a bf16 is the upper half of an f32.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Bulk conversions between float storage types.
///
/// Each conversion has a scalar reference path and SIMD paths (AVX-512F; AVX2 with F16C for f16)
/// chosen at run time: [`convert::Isa::detect`] picks the best the CPU has, and the `*_with`
/// variants let tests force each path. All paths give bit-identical results: round to nearest,
/// ties to even; NaN stays NaN (sign kept); infinities and signed zeros kept.
pub mod convert {
    use super::*;

    /// An instruction-set path for the bulk conversions.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Isa {
        /// Plain Rust, one element at a time: the reference.
        Scalar,
        /// AVX2 (and F16C for f16), 8 lanes.
        Avx2,
        /// AVX-512F, 16 lanes.
        Avx512,
    }

    impl Isa {
        /// Whether this CPU can run the path.
        pub fn is_supported(self) -> bool {
            match self {
                Isa::Scalar => true,
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("f16c")
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                #[cfg(not(target_arch = "x86_64"))]
                _ => false,
            }
        }
        /// The fastest supported path.
        pub fn detect() -> Isa {
            [Isa::Avx512, Isa::Avx2]
                .into_iter()
                .find(|i| i.is_supported())
                .unwrap_or(Isa::Scalar)
        }
        /// Every path this CPU can run (for tests).
        pub fn available() -> Vec<Isa> {
            [Isa::Scalar, Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|i| i.is_supported())
                .collect()
        }
        /// `self` if supported, otherwise the scalar path.
        fn checked(self) -> Isa {
            if self.is_supported() {
                self
            } else {
                Isa::Scalar
            }
        }
    }

    /// `dst[i] = src[i] as f32` (exact). Panics if the lengths differ (a caller bug, not a data
    /// error).
    pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        f16_to_f32_with(Isa::detect(), src, dst)
    }
    /// [`f16_to_f32`] on a given path (the scalar path when `isa` is not supported).
    pub fn f16_to_f32_with(isa: Isa, src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "f16_to_f32: length mismatch");
        let done = match isa.checked() {
            Isa::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX-512F at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx512 => unsafe { crate::convert_simd::f16_to_f32_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX2 and F16C at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx2 => unsafe { crate::convert_simd::f16_to_f32_f16c(src, dst) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => 0,
        };
        for (d, s) in dst[done..].iter_mut().zip(&src[done..]) {
            *d = s.to_f32();
        }
    }

    /// `dst[i] = f16(src[i])`, round to nearest even.
    pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        f32_to_f16_with(Isa::detect(), src, dst)
    }
    /// [`f32_to_f16`] on a given path (the scalar path when `isa` is not supported).
    pub fn f32_to_f16_with(isa: Isa, src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len(), "f32_to_f16: length mismatch");
        let done = match isa.checked() {
            Isa::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX-512F at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx512 => unsafe { crate::convert_simd::f32_to_f16_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX2 and F16C at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx2 => unsafe { crate::convert_simd::f32_to_f16_f16c(src, dst) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => 0,
        };
        for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
            *d = f16::from_f32(s);
        }
    }

    /// `dst[i] = src[i] as f32` (exact: the bf16 bits become the upper half of the f32).
    pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
        bf16_to_f32_with(Isa::detect(), src, dst)
    }
    /// [`bf16_to_f32`] on a given path (the scalar path when `isa` is not supported).
    pub fn bf16_to_f32_with(isa: Isa, src: &[bf16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "bf16_to_f32: length mismatch");
        let done = match isa.checked() {
            Isa::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX-512F at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx512 => unsafe { crate::convert_simd::bf16_to_f32_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX2 at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx2 => unsafe { crate::convert_simd::bf16_to_f32_avx2(src, dst) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => 0,
        };
        for (d, s) in dst[done..].iter_mut().zip(&src[done..]) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }

    /// `dst[i] = bf16(src[i])`, round to nearest even, NaN kept as a quiet NaN.
    pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
        f32_to_bf16_with(Isa::detect(), src, dst)
    }
    /// [`f32_to_bf16`] on a given path (the scalar path when `isa` is not supported).
    pub fn f32_to_bf16_with(isa: Isa, src: &[f32], dst: &mut [bf16]) {
        assert_eq!(src.len(), dst.len(), "f32_to_bf16: length mismatch");
        let done = match isa.checked() {
            Isa::Scalar => 0,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX-512F at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx512 => unsafe { crate::convert_simd::f32_to_bf16_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX2 at run time; the kernel reads and writes
            // only within `src` and `dst`, whose lengths are equal (asserted above).
            Isa::Avx2 => unsafe { crate::convert_simd::f32_to_bf16_avx2(src, dst) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => 0,
        };
        for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
            *d = f32_to_bf16_one(s);
        }
    }

    /// One f32 to bf16, round to nearest even; written branch-light so the loop above vectorises.
    #[inline(always)]
    pub fn f32_to_bf16_one(x: f32) -> bf16 {
        let bits = x.to_bits();
        if x.is_nan() {
            // Keep sign and make sure the payload stays non-zero (quiet NaN).
            return bf16::from_bits(((bits >> 16) as u16) | 0x0040);
        }
        // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit.
        let lsb = (bits >> 16) & 1;
        bf16::from_bits((bits.wrapping_add(0x7fff + lsb) >> 16) as u16)
    }
}
