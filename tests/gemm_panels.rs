//! B in column panels (`PanelMatrix`): the M = 1 product is the ordered FMA chain of every
//! column (bitwise, on every path and thread count), up to `FEW_ROWS` rows are bitwise their single-row
//! products, more rows are bitwise the packed GEMM of the dense matrix; everything against a
//! naive f64 reference with the tolerance of `tests/gemm.rs`
//! (`(K + 4)·u·(|alpha|·Σ_p|a_p·b_p| + |beta·c|) + 2·u·|c|`, plus `8·u·|gelu| + 1e-7` after GELU).
use half::{bf16, f16};
use kiln_cpu::gemm::{
    gemm_panel_matrix, gemm_panel_matrix_with_isa, gemm_with_isa, Epilogue, GemmOptions, Isa,
    MatMut, MatRef, PanelMatrix,
};
use kiln_tensor::FloatElement;

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn pool(t: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The kernels this CPU runs (the panel GEMV has an AVX2 path and a plain one).
fn isas() -> Vec<Isa> {
    Isa::available()
}

/// `y[j] = Σ_p x[p]·B[p, j]` as one FMA per element in order of p, from 0.
fn fma_chain<T: FloatElement>(x: &[f32], b: &[T], k: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| (0..k).fold(0f32, |acc, p| x[p].mul_add(b[p * n + j].to_f32(), acc)))
        .collect()
}

fn gemv_case<T: FloatElement>() {
    for k in [1, 7, 33, 257, 768] {
        for n in [1, 7, 31, 32, 33, 100, 257, 2304] {
            let b: Vec<T> = values(k * n, (k * 131 + n) as u64)
                .into_iter()
                .map(T::from_f32)
                .collect();
            let x = values(k, k as u64 + 7);
            let pm = PanelMatrix::<T>::from_view(&MatRef::row_major(&b, k, n)).unwrap();
            let want = fma_chain(&x, &b, k, n);
            for isa in isas() {
                for t in [1, 2] {
                    let mut y = vec![f32::NAN; n];
                    pool(t).install(|| pm.gemv(isa, &x, &mut y)).unwrap();
                    assert_eq!(
                        bits(&y),
                        bits(&want),
                        "{:?} {k}x{n} {} {t} threads",
                        T::DTYPE,
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn gemv_is_the_ordered_fma_chain_every_dtype_isa_and_thread_count() {
    gemv_case::<f32>();
    gemv_case::<bf16>();
    gemv_case::<f16>();
}

/// f64 reference of `alpha·A·B + beta·C` then the epilogue, and the tolerance per element.
#[allow(clippy::too_many_arguments)]
fn reference<T: FloatElement>(
    a: &[f32],
    b: &[T],
    c0: &[f32],
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    beta: f32,
    bias: Option<&[f32]>,
    gelu: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut want = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let v = a[i * k + p] as f64 * b[p * n + j].to_f32() as f64;
                s += v;
                mag += v.abs();
            }
            let c = if beta == 0.0 {
                0.0
            } else {
                c0[i * n + j] as f64
            };
            let mut r = alpha as f64 * s + beta as f64 * c;
            if let Some(bias) = bias {
                r += bias[j] as f64;
            }
            let mut t = (k as f64 + 4.0) * U * (alpha.abs() as f64 * mag + (beta as f64 * c).abs())
                + 2.0 * U * r.abs();
            if gelu {
                r = gelu64(r);
                t = 1.13 * t + 8.0 * U * r.abs() + 1e-7;
            }
            want[i * n + j] = r;
            tol[i * n + j] = t;
        }
    }
    (want, tol)
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` in f64.
fn gelu64(x: f64) -> f64 {
    let s = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (s * (x + 0.044715 * x * x * x)).tanh())
}

fn gemm_case<T: FloatElement>() {
    let cases: &[(usize, usize, usize)] = &[
        (2, 7, 33),
        (3, 33, 100),
        (4, 257, 31),
        (5, 17, 64),
        (7, 64, 257),
        (33, 100, 48),
        (128, 768, 96),
    ];
    for &(m, k, n) in cases {
        let b: Vec<T> = values(k * n, (m * k + n) as u64)
            .into_iter()
            .map(T::from_f32)
            .collect();
        let a = values(m * k, m as u64 + 3);
        let c0 = values(m * n, n as u64 + 11);
        let bias = values(n, 5);
        let pm = PanelMatrix::<T>::from_view(&MatRef::row_major(&b, k, n)).unwrap();
        for (alpha, beta, with_bias, gelu) in [
            (1.0, 0.0, false, false),
            (1.0, 0.0, true, true),
            (0.5, 1.5, true, false),
        ] {
            let epilogue = match (with_bias, gelu) {
                (false, false) => Epilogue::None,
                (false, true) => Epilogue::Gelu,
                (true, false) => Epilogue::Bias(&bias),
                (true, true) => Epilogue::BiasGelu(&bias),
            };
            let opts = GemmOptions {
                alpha,
                beta,
                epilogue,
                ..Default::default()
            };
            let (want, tol) = reference(
                &a,
                &b,
                &c0,
                m,
                k,
                n,
                alpha,
                beta,
                with_bias.then_some(&bias[..]),
                gelu,
            );
            for isa in isas() {
                let mut outs = Vec::new();
                for t in [1, 2] {
                    let mut c = c0.clone();
                    pool(t)
                        .install(|| {
                            gemm_panel_matrix_with_isa(
                                isa,
                                MatRef::row_major(&a, m, k),
                                &pm,
                                MatMut::row_major(&mut c, m, n),
                                &opts,
                            )
                        })
                        .unwrap();
                    outs.push(c);
                }
                let ctx = format!("{:?} {m}x{k}x{n} {} a{alpha} b{beta}", T::DTYPE, isa.name());
                assert_eq!(bits(&outs[0]), bits(&outs[1]), "{ctx}: 1 vs 2 threads");
                let c = &outs[0];
                for e in 0..m * n {
                    let err = (c[e] as f64 - want[e]).abs();
                    assert!(
                        err <= tol[e],
                        "{ctx} [{e}]: {} vs {} (tol {:.2e})",
                        c[e],
                        want[e],
                        tol[e]
                    );
                }
                if m <= kiln_cpu::gemm::FEW_ROWS {
                    // Each row is bitwise the M = 1 product of that row.
                    for i in 0..m {
                        let mut row = c0[i * n..(i + 1) * n].to_vec();
                        gemm_panel_matrix_with_isa(
                            isa,
                            MatRef::row_major(&a[i * k..(i + 1) * k], 1, k),
                            &pm,
                            MatMut::row_major(&mut row, 1, n),
                            &opts,
                        )
                        .unwrap();
                        assert_eq!(bits(&row), bits(&c[i * n..(i + 1) * n]), "{ctx} row {i}");
                    }
                } else {
                    // The packed GEMM of the dense matrix, bitwise.
                    let mut dense = c0.clone();
                    gemm_with_isa(
                        isa,
                        MatRef::row_major(&a, m, k),
                        MatRef::row_major(&b, k, n),
                        MatMut::row_major(&mut dense, m, n),
                        &opts,
                    )
                    .unwrap();
                    assert_eq!(bits(c), bits(&dense), "{ctx}: against the dense GEMM");
                }
            }
        }
    }
}

#[test]
fn products_match_reference_and_dense_gemm() {
    gemm_case::<f32>();
    gemm_case::<bf16>();
    gemm_case::<f16>();
}

#[test]
fn strided_a_and_c() {
    let (m, k, n) = (6, 40, 70);
    let b: Vec<bf16> = values(k * n, 9).into_iter().map(bf16::from_f32).collect();
    let pm = PanelMatrix::<bf16>::from_view(&MatRef::row_major(&b, k, n)).unwrap();
    // A column-major (a transposed view), C with padded rows.
    let at = values(k * m, 4);
    let a = MatRef::row_major(&at, k, m).t();
    let mut c = vec![0f32; m * (n + 3)];
    gemm_panel_matrix(
        a,
        &pm,
        MatMut::strided(&mut c, m, n, n + 3, 1),
        &GemmOptions::default(),
    )
    .unwrap();
    let mut dense = vec![0f32; m * n];
    gemm_with_isa(
        Isa::best(),
        a,
        MatRef::row_major(&b, k, n),
        MatMut::row_major(&mut dense, m, n),
        &GemmOptions::default(),
    )
    .unwrap();
    for i in 0..m {
        assert_eq!(
            bits(&c[i * (n + 3)..i * (n + 3) + n]),
            bits(&dense[i * n..(i + 1) * n])
        );
    }
    // A strided B source converts the same values as a row-major one.
    let bt: Vec<f32> = (0..n * k)
        .map(|e| b[(e % k) * n + e / k].to_f32())
        .collect();
    let pt = PanelMatrix::<bf16>::from_view(&MatRef::row_major(&bt, n, k).t()).unwrap();
    assert_eq!(pt.as_slice(), pm.as_slice());
}

#[test]
fn bad_shapes_are_errors() {
    let b = vec![0f32; 12];
    let pm = PanelMatrix::<f32>::from_view(&MatRef::row_major(&b, 3, 4)).unwrap();
    let a = vec![0f32; 6];
    let mut c = vec![0f32; 8];
    // A is 2x3 but C is 2x4 with a wrong A width.
    assert!(gemm_panel_matrix(
        MatRef::row_major(&a, 3, 2),
        &pm,
        MatMut::row_major(&mut c, 3, 4),
        &GemmOptions::default()
    )
    .is_err());
    let mut y = vec![0f32; 5];
    assert!(pm.gemv(Isa::best(), &[0.0; 3], &mut y).is_err());
    assert!(pm.gemv(Isa::best(), &[0.0; 2], &mut y[..4]).is_err());
    // A view that runs past its data.
    assert!(PanelMatrix::<bf16>::from_view(&MatRef::row_major(&b, 4, 4)).is_err());
}
