//! dtype conversions: all 65,536 f16 and bf16 bit patterns round trip through f32 (NaN stays NaN,
//! infinities and signed zeros kept), f32 → bf16 rounds to nearest even, and the bulk
//! conversions agree bit for bit with the scalar reference on every path this CPU can run
//! (scalar, AVX2+F16C, AVX-512F — each forced in turn) and for every tail length.
use half::{bf16, f16};
use kiln_tensor::convert::{self, Isa};
use kiln_tensor::{DType, FloatElement, Tensor};

fn all_f16() -> Vec<f16> {
    (0..=u16::MAX).map(f16::from_bits).collect()
}
fn all_bf16() -> Vec<bf16> {
    (0..=u16::MAX).map(bf16::from_bits).collect()
}

#[test]
fn every_f16_round_trips_through_f32_on_every_path() {
    let src = all_f16();
    for isa in Isa::available() {
        let mut wide = vec![0f32; src.len()];
        convert::f16_to_f32_with(isa, &src, &mut wide);
        let mut back = vec![f16::ZERO; src.len()];
        convert::f32_to_f16_with(isa, &wide, &mut back);
        for ((s, w), b) in src.iter().zip(&wide).zip(&back) {
            let tag = format!("{isa:?} f16 {:#06x}", s.to_bits());
            if s.is_nan() {
                assert!(w.is_nan() && b.is_nan(), "{tag}");
                assert_eq!(
                    w.to_bits() >> 31,
                    (s.to_bits() >> 15) as u32,
                    "{tag}: NaN sign"
                );
                assert_eq!(
                    b.to_bits() & 0x8000,
                    s.to_bits() & 0x8000,
                    "{tag}: NaN sign"
                );
            } else {
                // The bulk conversion equals the scalar one, and f16 → f32 → f16 is the identity.
                assert_eq!(w.to_bits(), s.to_f32().to_bits(), "{tag}");
                assert_eq!(
                    b.to_bits(),
                    s.to_bits(),
                    "{tag} -> {w} -> {:#06x}",
                    b.to_bits()
                );
            }
        }
    }
    assert_eq!(f16::from_bits(0x7c00).to_f32(), f32::INFINITY);
    assert_eq!(f16::from_bits(0xfc00).to_f32(), f32::NEG_INFINITY);
    assert_eq!(
        f16::from_bits(0x0001).to_f32(),
        2f32.powi(-24),
        "smallest subnormal"
    );
    assert_eq!(f16::from_bits(0x8000).to_f32().to_bits(), (-0f32).to_bits());
}

#[test]
fn every_bf16_round_trips_through_f32_on_every_path() {
    let src = all_bf16();
    for isa in Isa::available() {
        let mut wide = vec![0f32; src.len()];
        convert::bf16_to_f32_with(isa, &src, &mut wide);
        let mut back = vec![bf16::ZERO; src.len()];
        convert::f32_to_bf16_with(isa, &wide, &mut back);
        for ((s, w), b) in src.iter().zip(&wide).zip(&back) {
            let tag = format!("{isa:?} bf16 {:#06x}", s.to_bits());
            // bf16 → f32 is exact: the bf16 bits become the upper half of the f32.
            assert_eq!(w.to_bits(), (s.to_bits() as u32) << 16, "{tag}");
            assert_eq!(w.to_bits(), FloatElement::to_f32(*s).to_bits(), "{tag}");
            // `half` quiets signalling NaNs on the way; the bulk path keeps the bits.
            if !s.is_nan() {
                assert_eq!(w.to_bits(), s.to_f32().to_bits(), "{tag}");
            }
            if s.is_nan() {
                assert!(b.is_nan(), "{tag} -> {:#06x}", b.to_bits());
                assert_eq!(
                    b.to_bits() & 0x8000,
                    s.to_bits() & 0x8000,
                    "{tag}: NaN sign"
                );
            } else {
                assert_eq!(b.to_bits(), s.to_bits(), "{tag}");
            }
        }
    }
    assert_eq!(bf16::from_bits(0x7f80).to_f32(), f32::INFINITY);
    assert_eq!(bf16::from_bits(0xff80).to_f32(), f32::NEG_INFINITY);
}

/// Hand-picked f32 bit patterns and their bf16 under round-to-nearest, ties-to-even.
#[test]
fn f32_to_bf16_rounds_to_nearest_even() {
    let cases: &[(u32, u16)] = &[
        (0x3F80_0000, 0x3F80), // 1.0 exact
        (0x3F80_7FFF, 0x3F80), // just below half an ulp: down
        (0x3F80_8000, 0x3F80), // tie, lower is even: down
        (0x3F80_8001, 0x3F81), // just above half: up
        (0x3F81_8000, 0x3F82), // tie, lower is odd: up to even
        (0x3F81_7FFF, 0x3F81),
        (0xBF80_8000, 0xBF80), // negative tie: magnitude to even
        (0xBF81_8000, 0xBF82),
        (0x7F7F_FFFF, 0x7F80), // f32::MAX rounds to +inf
        (0x7F7F_7FFF, 0x7F7F), // largest value that stays finite
        (0xFF7F_8000, 0xFF80), // -tie at the top: to -inf (even)
        (0x7F80_0000, 0x7F80), // +inf
        (0xFF80_0000, 0xFF80), // -inf
        (0x0000_8000, 0x0000), // subnormal tie down to even (zero)
        (0x0001_8000, 0x0002), // subnormal tie up to even
        (0x0000_8001, 0x0001),
        (0x8000_0000, 0x8000), // -0 kept
        (0x0080_0000, 0x0080), // smallest normal
        (0x007F_FFFF, 0x0080), // largest subnormal rounds up to smallest normal
    ];
    for &(x, want) in cases {
        let f = f32::from_bits(x);
        assert_eq!(convert::f32_to_bf16_one(f).to_bits(), want, "{x:#010x}");
        assert_eq!(
            bf16::from_f32(f).to_bits(),
            want,
            "half agrees on {x:#010x}"
        );
        assert_eq!(<bf16 as FloatElement>::from_f32(f).to_bits(), want);
    }
    // NaNs stay NaN (quiet), sign kept, including payloads only in the low 16 bits.
    for x in [
        0x7FC0_0000u32,
        0xFFC0_0000,
        0x7F80_0001,
        0xFF80_0001,
        0x7FFF_FFFF,
        0x7F80_FFFF,
    ] {
        let b = convert::f32_to_bf16_one(f32::from_bits(x));
        assert!(b.is_nan(), "{x:#010x} -> {:#06x}", b.to_bits());
        assert_eq!(b.to_bits() & 0x8000, (x >> 16) as u16 & 0x8000);
    }
}

/// The bulk f32 → bf16 conversion against `half`'s scalar one, on every bf16 rounding boundary
/// (each bf16 value plus offsets around half an ulp) and on pseudo-random bit patterns.
#[test]
fn f32_to_bf16_matches_half_everywhere() {
    let mut xs = Vec::with_capacity(65536 * 6 + (1 << 20));
    for hi in 0..=u16::MAX as u32 {
        for lo in [0u32, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
            xs.push(f32::from_bits((hi << 16) | lo));
        }
    }
    let mut s = 0x1234_5678_9abc_def0u64;
    for _ in 0..(1 << 20) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        xs.push(f32::from_bits(s as u32));
    }
    let mut scalar = vec![bf16::ZERO; xs.len()];
    convert::f32_to_bf16_with(Isa::Scalar, &xs, &mut scalar);
    for (x, o) in xs.iter().zip(&scalar) {
        let h = bf16::from_f32(*x);
        if x.is_nan() {
            assert!(o.is_nan() && h.is_nan(), "{:#010x}", x.to_bits());
        } else {
            assert_eq!(o.to_bits(), h.to_bits(), "{:#010x}", x.to_bits());
        }
    }
    // Every SIMD path gives the scalar path's bits exactly, NaNs included.
    for isa in Isa::available() {
        let mut ours = vec![bf16::ZERO; xs.len()];
        convert::f32_to_bf16_with(isa, &xs, &mut ours);
        let same = ours
            .iter()
            .zip(&scalar)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{isa:?} differs from the scalar path");
    }
    // And f32 → f16 on the same inputs, against `half`.
    let mut h_scalar = vec![f16::ZERO; xs.len()];
    convert::f32_to_f16_with(Isa::Scalar, &xs, &mut h_scalar);
    for isa in Isa::available() {
        let mut h = vec![f16::ZERO; xs.len()];
        convert::f32_to_f16_with(isa, &xs, &mut h);
        for ((x, a), b) in xs.iter().zip(&h).zip(&h_scalar) {
            if x.is_nan() {
                assert!(a.is_nan() && b.is_nan(), "{isa:?} {:#010x}", x.to_bits());
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} {:#010x}", x.to_bits());
                assert_eq!(b.to_bits(), f16::from_f32(*x).to_bits());
            }
        }
    }
}

/// Bulk conversions for lengths that exercise vector bodies and scalar tails, against scalar
/// element-by-element conversions.
#[test]
fn bulk_conversions_handle_every_tail_length() {
    for isa in Isa::available() {
        for n in [0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 257, 1000] {
            let xs: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37 - 11.0).powi(3) / 3.0)
                .collect();
            let mut h = vec![f16::ZERO; n];
            convert::f32_to_f16_with(isa, &xs, &mut h);
            let mut b = vec![bf16::ZERO; n];
            convert::f32_to_bf16_with(isa, &xs, &mut b);
            let mut hw = vec![0f32; n];
            convert::f16_to_f32_with(isa, &h, &mut hw);
            let mut bw = vec![0f32; n];
            convert::bf16_to_f32_with(isa, &b, &mut bw);
            for i in 0..n {
                let tag = format!("{isa:?} n={n} i={i}");
                assert_eq!(h[i].to_bits(), f16::from_f32(xs[i]).to_bits(), "{tag}");
                assert_eq!(b[i].to_bits(), bf16::from_f32(xs[i]).to_bits(), "{tag}");
                assert_eq!(hw[i].to_bits(), h[i].to_f32().to_bits(), "{tag}");
                assert_eq!(bw[i].to_bits(), b[i].to_f32().to_bits(), "{tag}");
            }
        }
    }
}

#[test]
fn detection_picks_a_supported_path() {
    let best = Isa::detect();
    assert!(best.is_supported());
    assert!(Isa::available().contains(&best));
    assert!(Isa::available().contains(&Isa::Scalar));
    println!("conversion paths on this CPU: {:?}", Isa::available());
}

#[test]
fn tensor_to_dtype_converts_views() {
    let t = Tensor::from_vec(
        vec![1.0f32, 2.5, -3.0, 1e-8, 65520.0, f32::INFINITY],
        [2, 3],
    )
    .unwrap();
    let tt = t.transpose(0, 1).unwrap();
    let h = tt.to_dtype(DType::F16).unwrap();
    assert_eq!(h.dims(), &[3, 2]);
    let hv: Vec<u16> = h
        .to_vec::<f16>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let want: Vec<u16> = tt
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&x| f16::from_f32(x).to_bits())
        .collect();
    assert_eq!(hv, want);
    // 65520 is past f16::MAX (65504) by more than half an ulp: infinity.
    assert!(h.to_f32_vec().unwrap()[5].is_infinite());
    let b = tt.to_dtype(DType::BF16).unwrap();
    let back = b.to_dtype(DType::F32).unwrap();
    assert_eq!(
        back.to_vec::<f32>().unwrap(),
        vec![
            1.0,
            bf16::from_f32(1e-8).to_f32(),
            2.5,
            65536.0,
            -3.0,
            f32::INFINITY
        ]
    );
    // Same dtype and contiguous: shared, no copy.
    let same = t.to_dtype(DType::F32).unwrap();
    assert_eq!(
        same.as_bytes().unwrap().as_ptr(),
        t.as_bytes().unwrap().as_ptr()
    );
    // Integer conversions are refused with an error.
    assert!(Tensor::zeros([2], DType::I64)
        .unwrap()
        .to_dtype(DType::F32)
        .is_err());
    assert!(t.to_dtype(DType::U8).is_err());
}
