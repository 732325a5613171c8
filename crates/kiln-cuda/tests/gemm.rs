//! The products (`ops::gemm`) against an f64 reference: every layout, epilogue, alpha/beta,
//! odd sizes and strided views, for the f32 tiled kernel, the decode kernel and the tensor-core
//! kernel (whose mma.sync, ldmatrix and cp.async run on the emulator's models of them).
#![allow(clippy::needless_range_loop)]
mod common;
use common::{assert_close, emulators, gpu, values};
use half::{bf16, f16};
use kiln_cuda::ops::gemm::{gemm, gemm_with, GemmDims, GemmEpilogue, GemmKernel, GemmStrides};
use kiln_cuda::{CudaBuf, CudaDevice};
use kiln_tensor::DType;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    F32,
    Bf16,
    F16,
}

fn round(t: Ty, v: &[f32]) -> Vec<f32> {
    match t {
        Ty::F32 => v.to_vec(),
        Ty::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        Ty::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
    }
}

fn upload(dev: &CudaDevice, t: Ty, v: &[f32]) -> CudaBuf {
    match t {
        Ty::F32 => dev.upload(v).unwrap(),
        Ty::Bf16 => dev
            .upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
            .unwrap(),
        Ty::F16 => dev
            .upload(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>())
            .unwrap(),
    }
}

#[derive(Clone, Copy, Debug)]
enum Epi {
    None,
    Bias,
    BiasGelu,
    Gelu,
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// Runs one product and compares it with the f64 reference.
#[allow(clippy::too_many_arguments)]
fn check(
    dev: &CudaDevice,
    (ta, tb): (Ty, Ty),
    d: GemmDims,
    (pad, align): (usize, usize),
    alpha: f32,
    beta: f32,
    epi: Epi,
    kernel: GemmKernel,
) {
    let (m, n, k) = (d.m, d.n, d.k);
    // Strided views: operands at an offset of `pad` elements, rows padded by `pad` and rounded
    // up to a multiple of `align`.
    let (ar, ac) = if d.a_t { (k, m) } else { (m, k) };
    let (br, bc) = if d.b_t { (n, k) } else { (k, n) };
    let ld = |cols: usize| (cols + pad).div_ceil(align) * align;
    let s = GemmStrides {
        a_offset: pad,
        lda: ld(ac),
        b_offset: pad,
        ldb: ld(bc),
        c_offset: pad,
        ldc: ld(n),
    };
    let a = round(ta, &values(pad + ar * s.lda, 1));
    let b = round(tb, &values(pad + br * s.ldb, 2));
    let c0 = values(pad + m * s.ldc, 3);
    let bias = values(n, 4);
    let at = |i: usize, p: usize| {
        a[s.a_offset + if d.a_t { p * s.lda + i } else { i * s.lda + p }] as f64
    };
    let bt = |p: usize, j: usize| {
        b[s.b_offset + if d.b_t { j * s.ldb + p } else { p * s.ldb + j }] as f64
    };
    let mut want = c0.clone();
    for i in 0..m {
        for j in 0..n {
            let acc: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            let idx = s.c_offset + i * s.ldc + j;
            let mut v = alpha as f64 * acc
                + if beta == 0.0 {
                    0.0
                } else {
                    beta as f64 * c0[idx] as f64
                };
            if matches!(epi, Epi::Bias | Epi::BiasGelu) {
                v += bias[j] as f64;
            }
            if matches!(epi, Epi::Gelu | Epi::BiasGelu) {
                v = gelu(v);
            }
            want[idx] = v as f32;
        }
    }
    let (ab, bb) = (upload(dev, ta, &a), upload(dev, tb, &b));
    let mut cb = dev.upload(&c0).unwrap();
    let biasb = dev.upload(&bias).unwrap();
    let e = match epi {
        Epi::None => GemmEpilogue::None,
        Epi::Bias => GemmEpilogue::Bias(&biasb),
        Epi::BiasGelu => GemmEpilogue::BiasGelu(&biasb),
        Epi::Gelu => GemmEpilogue::Gelu,
    };
    gemm_with(dev, &ab, &bb, &mut cb, d, s, alpha, beta, e, kernel)
        .unwrap_or_else(|e| panic!("{ta:?}×{tb:?} {d:?} {kernel:?}: {e}"));
    let got = dev.download::<f32>(&cb).unwrap();
    let what =
        format!("{ta:?}×{tb:?} {d:?} pad {pad}/{align} α {alpha} β {beta} {epi:?} {kernel:?}");
    // f32 accumulation over k terms of size ~1: error ~ k·ε.
    let tol = 1e-6 * (k as f32 + 8.0);
    assert_close(&what, &got, &want, tol, tol);
}

fn layouts(m: usize, n: usize, k: usize) -> Vec<GemmDims> {
    let mut v = Vec::new();
    for a_t in [false, true] {
        for b_t in [false, true] {
            v.push(GemmDims { m, n, k, a_t, b_t });
        }
    }
    v
}

fn tiled_cases(dev: &CudaDevice, (m, n, k): (usize, usize, usize)) {
    for d in layouts(m, n, k) {
        check(
            dev,
            (Ty::F32, Ty::F32),
            d,
            (0, 1),
            1.0,
            0.0,
            Epi::None,
            GemmKernel::Tiled,
        );
        check(
            dev,
            (Ty::F32, Ty::F32),
            d,
            (3, 1),
            1.5,
            0.5,
            Epi::BiasGelu,
            GemmKernel::Tiled,
        );
        check(
            dev,
            (Ty::F32, Ty::Bf16),
            d,
            (4, 1),
            1.0,
            1.0,
            Epi::Bias,
            GemmKernel::Tiled,
        );
        check(
            dev,
            (Ty::F32, Ty::F16),
            d,
            (1, 1),
            0.5,
            0.0,
            Epi::Gelu,
            GemmKernel::Tiled,
        );
        check(
            dev,
            (Ty::Bf16, Ty::Bf16),
            d,
            (5, 1),
            1.0,
            0.0,
            Epi::None,
            GemmKernel::Tiled,
        );
        check(
            dev,
            (Ty::F16, Ty::F16),
            d,
            (0, 1),
            1.0,
            0.25,
            Epi::Bias,
            GemmKernel::Tiled,
        );
    }
}

fn gemv_cases(dev: &CudaDevice, n: usize, ks: &[usize]) {
    for &k in ks {
        for m in [1, 3] {
            for b_t in [false, true] {
                let d = GemmDims {
                    m,
                    n,
                    k,
                    a_t: false,
                    b_t,
                };
                check(
                    dev,
                    (Ty::F32, Ty::F32),
                    d,
                    (0, 1),
                    1.0,
                    0.0,
                    Epi::None,
                    GemmKernel::Gemv,
                );
                check(
                    dev,
                    (Ty::F32, Ty::Bf16),
                    d,
                    (0, 1),
                    1.0,
                    1.0,
                    Epi::BiasGelu,
                    GemmKernel::Gemv,
                );
                check(
                    dev,
                    (Ty::F32, Ty::F16),
                    d,
                    (3, 1),
                    2.0,
                    0.5,
                    Epi::Bias,
                    GemmKernel::Gemv,
                );
                check(
                    dev,
                    (Ty::F32, Ty::Bf16),
                    d,
                    (8, 1),
                    1.0,
                    0.0,
                    Epi::Gelu,
                    GemmKernel::Gemv,
                );
            }
        }
    }
}

fn tensor_core_cases(dev: &CudaDevice, (m, n, k): (usize, usize, usize)) {
    for d in layouts(m, n, k) {
        // Offsets and row strides multiples of 8 (what cp.async needs); the sizes odd.
        check(
            dev,
            (Ty::Bf16, Ty::Bf16),
            d,
            (8, 8),
            1.0,
            0.0,
            Epi::None,
            GemmKernel::TensorCore,
        );
        check(
            dev,
            (Ty::F16, Ty::F16),
            d,
            (0, 8),
            1.5,
            0.5,
            Epi::BiasGelu,
            GemmKernel::TensorCore,
        );
    }
    // Dense, aligned shapes through `gemm`'s automatic choice.
    for d in layouts(m.div_ceil(8) * 8, n.div_ceil(8) * 8, k.div_ceil(8) * 8) {
        check(
            dev,
            (Ty::Bf16, Ty::Bf16),
            d,
            (0, 1),
            1.0,
            1.0,
            Epi::Bias,
            GemmKernel::Auto,
        );
    }
}

#[test]
fn emu_tiled_gemm_matches_reference() {
    for dev in emulators("emu_tiled_gemm_matches_reference") {
        tiled_cases(dev, (67, 45, 33));
        tiled_cases(dev, (130, 7, 9));
    }
}

#[test]
fn emu_gemv_matches_reference() {
    for dev in emulators("emu_gemv_matches_reference") {
        gemv_cases(dev, 37, &[40, 1001]);
        gemv_cases(dev, 300, &[17]);
    }
}

#[test]
fn emu_tensor_core_gemm_matches_reference() {
    if let Some(dev) = emulators("emu_tensor_core_gemm_matches_reference").first() {
        tensor_core_cases(dev, (67, 45, 33));
        tensor_core_cases(dev, (130, 136, 72));
    }
}

#[test]
fn emu_tensor_core_gemm_reverse_order() {
    if let Some(dev) = emulators("emu_tensor_core_gemm_reverse_order").get(1) {
        tensor_core_cases(dev, (40, 137, 50));
    }
}

#[test]
fn gemm_edge_cases_and_errors() {
    let mut devs: Vec<&CudaDevice> = emulators("gemm_edge_cases_and_errors");
    devs.extend(gpu("gemm_edge_cases_and_errors"));
    for dev in devs {
        // k = 0: C = beta·C, then the epilogue.
        let d = GemmDims {
            m: 3,
            n: 5,
            k: 0,
            a_t: false,
            b_t: false,
        };
        check(
            dev,
            (Ty::F32, Ty::F32),
            d,
            (0, 1),
            1.0,
            0.5,
            Epi::Bias,
            GemmKernel::Auto,
        );
        // Dtype and size errors.
        let a = dev.upload(&values(12, 1)).unwrap();
        let b16 = upload(dev, Ty::Bf16, &values(12, 2));
        let f16b = upload(dev, Ty::F16, &values(12, 2));
        let mut c = dev.zeros(DType::F32, 9).unwrap();
        let d = GemmDims {
            m: 3,
            n: 3,
            k: 4,
            a_t: false,
            b_t: false,
        };
        assert!(gemm(dev, &b16, &f16b, &mut c, d, 1.0, 0.0, GemmEpilogue::None).is_err());
        assert!(gemm(
            dev,
            &a,
            &b16,
            &mut c,
            GemmDims { k: 5, ..d },
            1.0,
            0.0,
            GemmEpilogue::None
        )
        .is_err());
        let mut c16 = upload(dev, Ty::Bf16, &values(9, 3));
        assert!(gemm(dev, &a, &a, &mut c16, d, 1.0, 0.0, GemmEpilogue::None).is_err());
        let short_bias = dev.zeros(DType::F32, 2).unwrap();
        assert!(gemm(
            dev,
            &a,
            &a,
            &mut c,
            d,
            1.0,
            0.0,
            GemmEpilogue::Bias(&short_bias)
        )
        .is_err());
        assert!(gemm_with(
            dev,
            &a,
            &a,
            &mut c,
            d,
            GemmStrides::dense(&d),
            1.0,
            0.0,
            GemmEpilogue::None,
            GemmKernel::TensorCore
        )
        .is_err());
        gemm(dev, &a, &a, &mut c, d, 1.0, 0.0, GemmEpilogue::None).unwrap();
    }
}

#[test]
fn gpu_gemm_matches_reference() {
    let Some(dev) = gpu("gpu_gemm_matches_reference") else {
        return;
    };
    tiled_cases(dev, (257, 129, 263));
    gemv_cases(dev, 769, &[768, 3073]);
    tensor_core_cases(dev, (257, 129, 263));
    tensor_core_cases(dev, (1024, 768, 3072));
}
