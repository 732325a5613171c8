//! Batch invariance of the few-rows path (`kiln_cpu::gemm::rows`): a product of `2 ≤ m ≤
//! INVARIANT_ROWS` rows gives every row bitwise the M = 1 product of that row — for every B layout a
//! decode step uses (f32/bf16/f16 row-major, column-major `wteᵀ`, column panels), every ISA path,
//! odd sizes, the depth-stream GEMV's four runs, the epilogue and beta, on 1 and 2 threads — and
//! stays within the f64 reference's tolerance.
use half::{bf16, f16};
use kiln_cpu::gemm::{
    gemm_panel_matrix_with_isa, gemm_with_isa, Epilogue, GemmOptions, Isa, MatMut, MatRef,
    PanelMatrix, INVARIANT_ROWS,
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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    RowMajor,
    ColMajor,
    Panels,
}

/// `C = A·B` (then `opts`) with `isa`, for B `k × n` given row-major in `b`, in `layout`.
#[allow(clippy::too_many_arguments)]
fn product<T: FloatElement>(
    isa: Isa,
    layout: Layout,
    a: &[f32],
    m: usize,
    b: &[T],
    bt: &[T],
    pm: &PanelMatrix<T>,
    k: usize,
    n: usize,
    c: &mut [f32],
    opts: &GemmOptions<'_>,
) {
    let av = MatRef::row_major(a, m, k);
    let cv = MatMut::row_major(c, m, n);
    match layout {
        Layout::RowMajor => gemm_with_isa(isa, av, MatRef::row_major(b, k, n), cv, opts),
        Layout::ColMajor => gemm_with_isa(isa, av, MatRef::row_major(bt, n, k).t(), cv, opts),
        Layout::Panels => gemm_panel_matrix_with_isa(isa, av, pm, cv, opts),
    }
    .unwrap();
}

fn case<T: FloatElement>(k: usize, n: usize, ms: &[usize], isas: &[Isa], layouts: &[Layout]) {
    let b: Vec<T> = values(k * n, (k * 31 + n) as u64)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let bt: Vec<T> = (0..n * k).map(|e| b[(e % k) * n + e / k]).collect();
    let pm = PanelMatrix::<T>::from_view(&MatRef::row_major(&b, k, n)).unwrap();
    let mmax = *ms.iter().max().unwrap();
    let a = values(mmax * k, k as u64 + 5);
    let bias = values(n, 3);
    let c0 = values(mmax * n, 9);
    let (p1, p2) = (pool(1), pool(2));
    for &isa in isas {
        for &layout in layouts {
            for (beta, epilogue) in [(0.0, Epilogue::None), (0.5, Epilogue::BiasGelu(&bias))] {
                let opts = GemmOptions {
                    beta,
                    epilogue,
                    rows_invariant: true,
                    ..Default::default()
                };
                // Each row alone (M = 1), on one thread.
                let mut alone = c0.clone();
                for i in 0..mmax {
                    p1.install(|| {
                        product(
                            isa,
                            layout,
                            &a[i * k..(i + 1) * k],
                            1,
                            &b,
                            &bt,
                            &pm,
                            k,
                            n,
                            &mut alone[i * n..(i + 1) * n],
                            &opts,
                        )
                    });
                }
                for &m in ms {
                    for p in [&p1, &p2] {
                        let mut c = c0[..m * n].to_vec();
                        p.install(|| {
                            product(
                                isa,
                                layout,
                                &a[..m * k],
                                m,
                                &b,
                                &bt,
                                &pm,
                                k,
                                n,
                                &mut c,
                                &opts,
                            )
                        });
                        let ctx = format!(
                            "{:?} {isa:?} {layout:?} {m}x{k}x{n} beta {beta} {} threads",
                            T::DTYPE,
                            p.current_num_threads()
                        );
                        assert_eq!(bits(&c), bits(&alone[..m * n]), "{ctx}");
                    }
                }
                // And the plain products against f64 (beta 0, no epilogue).
                if beta == 0.0 {
                    for (e, &got) in alone.iter().enumerate() {
                        let (i, j) = (e / n, e % n);
                        let (mut want, mut mag) = (0f64, 0f64);
                        for p in 0..k {
                            let t = a[i * k + p] as f64 * b[p * n + j].to_f32() as f64;
                            want += t;
                            mag += t.abs();
                        }
                        let tol = (k + 4) as f64 * U * mag + 1e-30;
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "{:?} {isa:?} {layout:?} 1x{k}x{n} [{i}, {j}]: {got} vs {want}",
                            T::DTYPE
                        );
                    }
                }
            }
        }
    }
}

const ALL: [Layout; 3] = [Layout::RowMajor, Layout::ColMajor, Layout::Panels];

#[test]
fn few_rows_are_bitwise_their_single_rows_f32() {
    let isas = Isa::available();
    for &(k, n) in &[(1, 7), (7, 33), (33, 100), (40, 257), (257, 31)] {
        case::<f32>(k, n, &[2, 3, 5, 17], &isas, &ALL);
    }
}

#[test]
fn few_rows_are_bitwise_their_single_rows_bf16() {
    let isas = Isa::available();
    for &(k, n) in &[(1, 7), (7, 33), (33, 100), (40, 257), (257, 31)] {
        case::<bf16>(k, n, &[2, 3, 5, 17], &isas, &ALL);
    }
}

#[test]
fn few_rows_are_bitwise_their_single_rows_f16() {
    let isas = Isa::available();
    for &(k, n) in &[(7, 33), (40, 257), (257, 31)] {
        case::<f16>(k, n, &[2, 5, 17], &isas, &ALL);
    }
}

/// Decode-sized products (GPT-2 shapes, split among threads) at the batch sizes a server runs,
/// up to [`INVARIANT_ROWS`], on the SIMD paths.
#[test]
fn decode_shapes_up_to_the_row_limit() {
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.is_available())
        .collect();
    case::<f32>(768, 2304, &[4, 16, INVARIANT_ROWS], &isas, &ALL);
    case::<bf16>(3072, 768, &[16, 33], &isas, &ALL);
    // wteᵀ-like: many columns, column-major (the logits).
    case::<f32>(
        96,
        5003,
        &[16, 64],
        &isas,
        &[Layout::ColMajor, Layout::Panels],
    );
}

/// The AVX2 depth-stream GEMV (short rows of a large B: four runs of the depth summed) has its
/// batched twin.
#[test]
fn depth_streams_are_batch_invariant() {
    if !Isa::Avx2.is_available() {
        eprintln!("SKIP depth_streams_are_batch_invariant: no AVX2");
        return;
    }
    case::<f32>(1531, 768, &[2, 16], &[Isa::Avx2], &[Layout::RowMajor]);
    case::<bf16>(2051, 1000, &[3, 16], &[Isa::Avx2], &[Layout::RowMajor]);
}
