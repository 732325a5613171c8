//! GEMM against a naive f64 reference: every size 1..17 in every dimension, primes, the GPT-2
//! logits shape, transposed and strided operands, alpha/beta (beta = 0 ignores NaN in C), every
//! B dtype, every microkernel this CPU runs, epilogues, batches, and bitwise equality between
//! 1 and 2 threads.
//!
//! Tolerance. The reference reads exactly the values the kernel reads (f16/bf16 → f32 is exact,
//! so the B dtype changes the inputs, not the error) and sums in f64. An f32 dot product of
//! length K summed in any order is within `γ_K·Σ|a_p·b_p|`, `γ_K ≈ K·u`, `u = 2⁻²⁴`, of the exact
//! value; the K-blocked kernels add one rounding per depth block (≤ K of them), and the
//! `alpha·acc + beta·c` update three more. So per element:
//! `tol = (K + 4)·u·(|alpha|·Σ_p|a_p·b_p| + |beta·c|) + 2·u·|c|` (the last term: the bias add and
//! the rounding of the result to f32), plus, after GELU (slope ≤ 1.13, tanh within a few ulps),
//! `8·u·|gelu| + 1e-7`.
use half::{bf16, f16};
use kiln_cpu::gemm::{
    blocked_c_supported, gelu_tanh, gemm, gemm_batched, gemm_batched_with_isa, gemm_bf16_compute,
    gemm_packed, gemm_panels, gemm_panels_blocked, gemm_panels_with_isa, gemm_sources,
    gemm_sources_blocked, gemm_with_blocking, gemm_with_isa, APanelSource, BlockedMatMut, Epilogue,
    GemmOptions, Isa, MatMut, MatRef, PackedB, ViewPanels,
};
use kiln_tensor::FloatElement;

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// xorshift64*: deterministic inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lay {
    /// Row-major, with `pad` extra elements per row.
    Row(usize),
    /// Column-major (a transposed row-major matrix), with `pad` extra elements per column.
    Col(usize),
    /// Neither stride is 1.
    Strided,
}

/// `(row_stride, col_stride, buffer length)` of a `rows × cols` view laid out as `lay`.
fn strides(rows: usize, cols: usize, lay: Lay) -> (usize, usize, usize) {
    let (rs, cs) = match lay {
        Lay::Row(pad) => (cols + pad, 1),
        Lay::Col(pad) => (1, rows + pad),
        Lay::Strided => (2 * cols + 3, 2),
    };
    let len = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    };
    (rs, cs, len + 5)
}

fn random<T: FloatElement>(len: usize, rng: &mut Rng) -> Vec<T> {
    (0..len).map(|_| T::from_f32(rng.next())).collect()
}

#[derive(Clone, Copy, Debug)]
enum Epi {
    None,
    Bias,
    BiasGelu,
    Gelu,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    la: Lay,
    lb: Lay,
    lc: Lay,
    alpha: f32,
    beta: f32,
    epi: Epi,
}

impl Case {
    fn plain(m: usize, n: usize, k: usize) -> Case {
        Case {
            m,
            n,
            k,
            la: Lay::Row(0),
            lb: Lay::Row(0),
            lc: Lay::Row(0),
            alpha: 1.0,
            beta: 0.0,
            epi: Epi::None,
        }
    }
}

/// Runs `case` with B of type `TB` on `isa` and checks every element against the f64 reference.
/// Returns C's buffer (for bitwise comparisons).
fn check<TB: FloatElement>(isa: Option<Isa>, case: Case, seed: u64) -> Vec<f32> {
    let Case {
        m,
        n,
        k,
        la,
        lb,
        lc,
        alpha,
        beta,
        epi,
    } = case;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (ars, acs, alen) = strides(m, k, la);
    let (brs, bcs, blen) = strides(k, n, lb);
    let (crs, ccs, clen) = strides(m, n, lc);
    let a: Vec<f32> = random(alen, &mut rng);
    let b: Vec<TB> = random(blen, &mut rng);
    let mut c: Vec<f32> = random(clen, &mut rng);
    if beta == 0.0 {
        // beta = 0: C is write-only, NaN must not leak.
        for (i, v) in c.iter_mut().enumerate() {
            if i % 3 == 0 {
                *v = f32::NAN;
            }
        }
    }
    let c0 = c.clone();
    let bias: Vec<f32> = random(n, &mut rng);
    let epilogue = match epi {
        Epi::None => Epilogue::None,
        Epi::Bias => Epilogue::Bias(&bias),
        Epi::BiasGelu => Epilogue::BiasGelu(&bias),
        Epi::Gelu => Epilogue::Gelu,
    };
    let opts = GemmOptions {
        alpha,
        beta,
        epilogue,
        ..Default::default()
    };
    let av = MatRef::strided(&a, m, k, ars, acs);
    let bv = MatRef::strided(&b, k, n, brs, bcs);
    let cv = MatMut::strided(&mut c, m, n, crs, ccs);
    match isa {
        Some(isa) => gemm_with_isa(isa, av, bv, cv, &opts),
        None => gemm(av, bv, cv, &opts),
    }
    .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let mut touched = vec![false; clen];
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let t = a[i * ars + p * acs] as f64 * b[p * brs + j * bcs].to_f32() as f64;
                exact += t;
                mag += t.abs();
            }
            let at = i * crs + j * ccs;
            touched[at] = true;
            let old = if beta == 0.0 { 0.0 } else { c0[at] as f64 };
            let mut want = alpha as f64 * exact + beta as f64 * old;
            let mut tol =
                (k + 4) as f64 * U * (alpha.abs() as f64 * mag + (beta as f64 * old).abs());
            match epi {
                Epi::None => {}
                Epi::Bias => want += bias[j] as f64,
                Epi::BiasGelu => {
                    want = gelu_tanh((want + bias[j] as f64) as f32) as f64;
                    tol = tol * 1.13 + 8.0 * U * want.abs() + 1e-7;
                }
                Epi::Gelu => {
                    want = gelu_tanh(want as f32) as f64;
                    tol = tol * 1.13 + 8.0 * U * want.abs() + 1e-7;
                }
            }
            // The f32 result itself (and a bias add) is one or two more roundings of the value.
            tol += 2.0 * U * want.abs();
            let got = c[at] as f64;
            assert!(
                (got - want).abs() <= tol + 1e-30,
                "{isa:?} {} {case:?}: C[{i},{j}] = {got}, want {want} (tol {tol:e})",
                std::any::type_name::<TB>()
            );
        }
    }
    for (at, t) in touched.iter().enumerate() {
        if !t {
            assert!(
                c[at].to_bits() == c0[at].to_bits(),
                "{isa:?} {case:?}: element {at} outside C was written"
            );
        }
    }
    c
}

fn isas() -> Vec<Isa> {
    let v = Isa::available();
    assert!(v.contains(&Isa::Scalar) && v.contains(&Isa::Portable));
    v
}

#[test]
fn every_size_1_to_17() {
    for isa in isas() {
        for m in 1..=17 {
            for n in 1..=17 {
                for k in 1..=17 {
                    check::<f32>(
                        Some(isa),
                        Case::plain(m, n, k),
                        (m * 400 + n * 20 + k) as u64,
                    );
                }
            }
        }
    }
}

#[test]
fn every_dtype_and_layout_small() {
    let lays = [
        Lay::Row(0),
        Lay::Row(3),
        Lay::Col(0),
        Lay::Col(2),
        Lay::Strided,
    ];
    let mut seed = 1;
    for isa in isas() {
        for (m, n, k) in [
            (1, 9, 5),
            (5, 1, 7),
            (7, 13, 17),
            (13, 31, 7),
            (17, 16, 33),
            (6, 16, 300),
        ] {
            for la in lays {
                for lb in lays {
                    for lc in [Lay::Row(0), Lay::Row(1), Lay::Col(0), Lay::Strided] {
                        seed += 1;
                        let case = Case {
                            la,
                            lb,
                            lc,
                            ..Case::plain(m, n, k)
                        };
                        check::<f32>(Some(isa), case, seed);
                        check::<bf16>(Some(isa), case, seed);
                        check::<f16>(Some(isa), case, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn alpha_beta_and_epilogues() {
    let mut seed = 100;
    for isa in isas() {
        for (m, n, k) in [
            (1, 37, 19),
            (3, 5, 2),
            (13, 31, 7),
            (40, 70, 300),
            (1, 70, 1),
            (9, 1, 40),
        ] {
            for (alpha, beta) in [
                (1.0, 0.0),
                (-2.0, 0.0),
                (1.0, 1.0),
                (0.5, -1.5),
                (0.0, 0.25),
            ] {
                for epi in [Epi::None, Epi::Bias, Epi::BiasGelu, Epi::Gelu] {
                    for lc in [Lay::Row(0), Lay::Col(1)] {
                        seed += 1;
                        let case = Case {
                            alpha,
                            beta,
                            epi,
                            lc,
                            ..Case::plain(m, n, k)
                        };
                        check::<f32>(Some(isa), case, seed);
                        check::<bf16>(Some(isa), case, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn zero_depth_scales_c() {
    for isa in isas() {
        for beta in [0.0, 2.0] {
            let case = Case {
                beta,
                epi: Epi::Bias,
                ..Case::plain(3, 4, 0)
            };
            check::<f32>(Some(isa), case, 7);
        }
    }
}

/// Products a little taller than one A block (`MC` on L2 of 512 KiB - 1 MiB): all rows go in
/// one block with a shallower depth cut, several depth blocks deep.
#[test]
fn tall_rows_shallow_depth_cut() {
    let mut seed = 900;
    for isa in isas() {
        for (m, n, k) in [(300, 70, 1500), (260, 33, 2049), (435, 17, 1000)] {
            seed += 1;
            check::<f32>(Some(isa), Case::plain(m, n, k), seed);
            check::<bf16>(Some(isa), Case::plain(m, n, k), seed + 1000);
        }
    }
}

/// The general loop nest past the small-M range (m > 2.5·MC of the small-M nest): with the
/// deep blocking of the 12 × 32 kernel (`KC = 2048`, `MC = 516`, `NC = 4096` on a 1 MiB L2,
/// 32 MiB L3) `k = 3100` is two depth blocks, `m = 900` two row blocks and `n = 4130` two
/// column blocks; with the L2 rules of the other kernels, more of each. Every element against
/// the f64 reference, and one thread against two bitwise.
#[test]
fn general_nest_several_blocks_each_way() {
    let (p1, p2) = (pool(1), pool(2));
    for isa in isas() {
        for (case, seed) in [
            (Case::plain(900, 100, 3100), 1200),
            (Case::plain(900, 4130, 40), 1201),
            (
                Case {
                    beta: 0.5,
                    epi: Epi::BiasGelu,
                    ..Case::plain(1100, 70, 3300)
                },
                1202,
            ),
        ] {
            let one = p1.install(|| check::<f32>(Some(isa), case, seed));
            let two = p2.install(|| check::<f32>(Some(isa), case, seed));
            assert!(
                one.iter()
                    .zip(&two)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} {case:?}: 1 and 2 threads differ"
            );
        }
    }
}

#[test]
fn primes() {
    let mut seed = 500;
    for isa in isas() {
        let big = if isa == Isa::Scalar { 131 } else { 257 };
        for (m, n, k) in [
            (big, big, big),
            (7, big, 13),
            (31, 13, big),
            (big, 7, 31),
            (13, 31, 7),
        ] {
            for lb in [Lay::Row(0), Lay::Col(0)] {
                seed += 1;
                let case = Case {
                    lb,
                    la: if seed % 2 == 0 {
                        Lay::Row(0)
                    } else {
                        Lay::Col(1)
                    },
                    ..Case::plain(m, n, k)
                };
                check::<f32>(Some(isa), case, seed);
                check::<bf16>(Some(isa), case, seed + 1000);
                check::<f16>(Some(isa), case, seed + 2000);
            }
        }
    }
}

#[test]
fn gpt2_logits_decode_shape() {
    // 1 × 768 × 50257: logits = x·wteᵀ (B column-major) and a row-major B, f32 and bf16.
    for lb in [Lay::Col(0), Lay::Row(0)] {
        let case = Case {
            lb,
            ..Case::plain(1, 50257, 768)
        };
        check::<f32>(None, case, 3);
        check::<bf16>(None, case, 4);
    }
}

#[test]
fn gpt2_linear_shapes_f16_bf16() {
    for (m, n, k) in [
        (5, 2304, 768),
        (64, 3072, 768),
        (1, 768, 3072),
        (2, 768, 3072),
        (1, 768, 768),
        (1, 1023, 513),
    ] {
        let case = Case {
            epi: Epi::BiasGelu,
            ..Case::plain(m, n, k)
        };
        check::<bf16>(None, case, 11);
        check::<f16>(None, case, 12);
    }
}

fn pool(t: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .unwrap()
}

#[test]
fn one_and_two_threads_bitwise_equal() {
    let (p1, p2) = (pool(1), pool(2));
    let cases = [
        Case::plain(300, 200, 700),
        // Two row blocks of C (m > MC on every kernel here) made four on two threads.
        Case::plain(600, 130, 300),
        // All rows one A block with a shallower depth cut where L2 is 512 KiB - 1 MiB
        // (`Blocking::single_block`), a plain small-M product where it is larger.
        Case::plain(250, 130, 300),
        Case::plain(300, 70, 1500),
        Case {
            la: Lay::Col(0),
            lb: Lay::Col(3),
            beta: 0.5,
            epi: Epi::BiasGelu,
            ..Case::plain(131, 517, 300)
        },
        Case {
            lb: Lay::Col(0),
            ..Case::plain(1, 4099, 768)
        },
        Case::plain(1, 4099, 768),
        // Column-major GEMV: three streams per thread, a depth tail, w mod 3 = 1 per thread.
        Case {
            lb: Lay::Col(0),
            ..Case::plain(1, 1000, 131)
        },
        // Longer than the 16-bit GEMV's column block: blocks and a partial block per thread.
        Case::plain(1, 20011, 64),
        Case {
            lc: Lay::Col(0),
            ..Case::plain(2000, 1, 300)
        },
        Case::plain(7, 3001, 129),
        // Rows of at most 4 KiB, B of 1 MiB or more: the depth-stream GEMV, four runs of the
        // depth, two per thread (depth 1201: runs of 301, 301, 301 and 298 rows; 257: 65, 65,
        // 65, 62; a row stride wider than the rows).
        Case::plain(1, 768, 3072),
        Case::plain(1, 1024, 257),
        Case::plain(1, 1000, 1201),
        Case {
            lb: Lay::Row(5),
            ..Case::plain(1, 900, 1301)
        },
    ];
    for isa in isas() {
        for case in cases {
            let one = p1.install(|| check::<f32>(Some(isa), case, 9));
            let two = p2.install(|| check::<f32>(Some(isa), case, 9));
            assert!(
                one.iter()
                    .zip(&two)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} {case:?}: 1 and 2 threads differ"
            );
            let one = p1.install(|| check::<bf16>(Some(isa), case, 9));
            let two = p2.install(|| check::<bf16>(Some(isa), case, 9));
            assert!(one
                .iter()
                .zip(&two)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}

/// The operand layouts of a backward pass, without transposed copies: `tn` (A column-major, as
/// `Xᵀ` in `dW = Xᵀ·dY`) and `nt` (B column-major, as `Wᵀ` in `dX = dY·Wᵀ`, `colᵀ` in a conv
/// weight gradient), with padded columns (a view of a wider array), at odd sizes on both loop
/// nests: small-M products (`m` at most a few `MR`), taller ones past `MC` (the shallower depth
/// cut), the general nest with several row and depth blocks, and the deep, narrow weight
/// gradients of the DCGAN convolutions. Every kernel this CPU runs, f32 and 16-bit B, against
/// the f64 reference, one thread bitwise equal to two.
#[test]
fn transposed_operands_tn_nt() {
    let (p1, p2) = (pool(1), pool(2));
    let tn = |a_pad, b_pad| (Lay::Col(a_pad), Lay::Row(b_pad));
    let nt = |a_pad, b_pad| (Lay::Row(a_pad), Lay::Col(b_pad));
    let mut seed = 3000;
    for isa in isas() {
        let big = isa != Isa::Scalar;
        let mut cases = vec![
            ((7, 33, 13), tn(0, 0)),
            ((7, 33, 13), nt(3, 1)),
            ((13, 257, 31), tn(5, 2)),
            ((13, 257, 31), nt(0, 0)),
            ((257, 31, 129), tn(1, 0)),
            ((257, 31, 129), nt(0, 7)),
            ((1, 95, 300), tn(0, 0)),
            ((3, 95, 300), nt(0, 1)),
            ((37, 49, 1031), nt(0, 0)),
            // Fewer column panels than two per thread: the rows are split between tasks too.
            ((67, 20, 2001), nt(0, 0)),
            ((50, 9, 3001), tn(1, 0)),
        ];
        if big {
            cases.extend([
                ((131, 517, 300), tn(3, 0)),
                ((131, 517, 300), nt(1, 2)),
                // Past one A block: the shallower depth cut, then the general nest.
                ((401, 77, 1500), tn(0, 4)),
                ((401, 77, 1500), nt(0, 0)),
                ((901, 67, 3101), tn(2, 0)),
                ((901, 67, 3101), nt(0, 3)),
                // A DCGAN weight gradient: few rows, very deep (`dy · colᵀ`).
                ((67, 49, 4099), nt(0, 0)),
                ((67, 49, 4099), tn(0, 0)),
            ]);
        }
        for ((m, n, k), (la, lb)) in cases {
            seed += 1;
            let case = Case {
                la,
                lb,
                beta: if seed % 3 == 0 { 0.5 } else { 0.0 },
                ..Case::plain(m, n, k)
            };
            let one = p1.install(|| check::<f32>(Some(isa), case, seed));
            let two = p2.install(|| check::<f32>(Some(isa), case, seed));
            assert!(
                one.iter()
                    .zip(&two)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} {case:?}: 1 and 2 threads differ"
            );
            if m * n * k < 40_000_000 {
                check::<bf16>(Some(isa), case, seed + 100);
                check::<f16>(Some(isa), case, seed + 200);
            }
        }
    }
}

/// `gemm_with_blocking` (what `kiln bench matmul --blocking` measures) with blockings far from
/// this machine's: tiny blocks, many of each, both loop nests, every layout of A and B; every
/// element against the f64 reference.
#[test]
fn other_blockings_match_the_reference() {
    let mut rng = Rng(4242);
    for isa in isas() {
        let (mr, nr) = isa.tile();
        for spec in [
            "kc=64,mc=24,nc=64,small_kc=48,small_mc=12,slab=1",
            "kc=2048,mc=1024,nc=8192,small_kc=1024,small_mc=600,slab=16",
            "small_mc=8",
        ] {
            let blk = isa.blocking().with_overrides(spec, mr, nr).unwrap();
            for (m, n, k, la, lb) in [
                (37, 70, 301, Lay::Row(0), Lay::Row(0)),
                (131, 45, 200, Lay::Col(1), Lay::Row(0)),
                (29, 99, 157, Lay::Row(2), Lay::Col(0)),
            ] {
                let (ars, acs, alen) = strides(m, k, la);
                let (brs, bcs, blen) = strides(k, n, lb);
                let a: Vec<f32> = random(alen, &mut rng);
                let b: Vec<f32> = random(blen, &mut rng);
                let mut c = vec![f32::NAN; m * n];
                gemm_with_blocking(
                    isa,
                    blk,
                    MatRef::strided(&a, m, k, ars, acs),
                    MatRef::strided(&b, k, n, brs, bcs),
                    MatMut::row_major(&mut c, m, n),
                    &GemmOptions::default(),
                )
                .unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for p in 0..k {
                            let t = a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64;
                            exact += t;
                            mag += t.abs();
                        }
                        let tol = (k + 6) as f64 * U * mag;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= tol,
                            "{isa:?} {spec} {m}x{n}x{k}: C[{i},{j}] = {got}, want {exact}"
                        );
                    }
                }
            }
        }
    }
}

/// Batched products: folded into M (shared B), parallel over the batch (disjoint C), and a
/// broadcast A; each batch checked against a single-product call.
#[test]
fn batched_matches_single_products() {
    let (p1, p2) = (pool(1), pool(2));
    let mut rng = Rng(77);
    let (batch, m, n, k) = (5, 9, 33, 20);
    let a: Vec<f32> = random(batch * m * k, &mut rng);
    let b: Vec<f32> = random(batch * k * n, &mut rng);
    let bb: Vec<bf16> = random(batch * k * n, &mut rng);
    for isa in isas() {
        for (sa, sb) in [(m * k, 0), (m * k, k * n), (0, k * n)] {
            let run = |p: &rayon::ThreadPool| {
                let mut c = vec![f32::NAN; batch * m * n];
                p.install(|| {
                    gemm_batched_with_isa(
                        isa,
                        batch,
                        MatRef::row_major(&a, m, k),
                        sa,
                        MatRef::row_major(&b, k, n),
                        sb,
                        MatMut::row_major(&mut c, m, n),
                        m * n,
                        &GemmOptions::default(),
                    )
                })
                .unwrap();
                c
            };
            let (c1, c2) = (run(&p1), run(&p2));
            assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()));
            for bi in 0..batch {
                let mut want = vec![0f32; m * n];
                gemm_with_isa(
                    isa,
                    MatRef::row_major(&a[bi * sa..], m, k),
                    MatRef::row_major(&b[bi * sb..], k, n),
                    MatMut::row_major(&mut want, m, n),
                    &GemmOptions::default(),
                )
                .unwrap();
                let got = &c1[bi * m * n..(bi + 1) * m * n];
                for (x, y) in got.iter().zip(&want) {
                    let tol = (k + 4) as f32 * 1e-7 * (k as f32);
                    assert!((x - y).abs() <= tol, "{isa:?} batch {bi}: {x} vs {y}");
                }
            }
        }
        // bf16 B, strided batches (not foldable).
        let mut c = vec![0f32; batch * m * n];
        gemm_batched(
            batch,
            MatRef::row_major(&a, m, k),
            m * k,
            MatRef::row_major(&bb, k, n),
            k * n,
            MatMut::row_major(&mut c, m, n),
            m * n,
            &GemmOptions::default(),
        )
        .unwrap();
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| {
                            a[bi * m * k + i * k + p] as f64 * bb[bi * k * n + p * n + j].to_f64()
                        })
                        .sum();
                    let got = c[bi * m * n + i * n + j] as f64;
                    assert!((got - want).abs() <= (k + 4) as f64 * U * k as f64);
                }
            }
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let a = vec![0f32; 12];
    let b = vec![0f32; 12];
    let mut c = vec![0f32; 16];
    let o = GemmOptions::default();
    // Inner dimensions differ.
    assert!(gemm(
        MatRef::row_major(&a, 3, 4),
        MatRef::row_major(&b, 3, 4),
        MatMut::row_major(&mut c, 3, 4),
        &o
    )
    .is_err());
    // A view past its buffer.
    assert!(gemm(
        MatRef::row_major(&a, 4, 4),
        MatRef::row_major(&b, 4, 3),
        MatMut::row_major(&mut c, 4, 3),
        &o
    )
    .is_err());
    // C maps two elements to one address.
    assert!(gemm(
        MatRef::row_major(&a, 3, 4),
        MatRef::row_major(&b, 4, 3),
        MatMut::strided(&mut c, 3, 3, 1, 1),
        &o
    )
    .is_err());
    // Bias of the wrong length.
    let bias = [0f32; 2];
    let ob = GemmOptions {
        epilogue: Epilogue::Bias(&bias),
        ..Default::default()
    };
    assert!(gemm(
        MatRef::row_major(&a, 3, 4),
        MatRef::row_major(&b, 4, 3),
        MatMut::row_major(&mut c, 3, 3),
        &ob
    )
    .is_err());
    // A kernel this CPU cannot run is an error, not a crash.
    for isa in Isa::ALL {
        let r = gemm_with_isa(
            isa,
            MatRef::row_major(&a, 3, 4),
            MatRef::row_major(&b, 4, 3),
            MatMut::row_major(&mut c, 3, 3),
            &o,
        );
        assert_eq!(r.is_ok(), isa.is_available());
    }
    // Batch past the buffer.
    assert!(gemm_batched(
        3,
        MatRef::row_major(&a, 3, 4),
        12,
        MatRef::row_major(&b, 4, 3),
        0,
        MatMut::row_major(&mut c, 3, 3),
        9,
        &o
    )
    .is_err());
}

/// A B that packs its own panels (the implicit-GEMM entry point) gives bitwise the same C as
/// the per-call path, on both loop nests (m ≤ MC and m > MC), for every kernel and thread count.
#[test]
fn panel_source_matches_per_call_packing() {
    let (p1, p2) = (pool(1), pool(2));
    let mut rng = Rng(6);
    for isa in isas() {
        for &(m, n, k, col) in &[
            (7, 13, 5, false),
            (130, 77, 600, true),
            (1500, 70, 300, false),
            (2, 1000, 33, false),
        ] {
            let a: Vec<f32> = random(m * k, &mut rng);
            let b: Vec<f16> = random(k * n, &mut rng);
            let bias: Vec<f32> = random(n, &mut rng);
            let bv = if col {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            let opts = GemmOptions {
                epilogue: Epilogue::Bias(&bias),
                beta: 0.5,
                ..Default::default()
            };
            let c0: Vec<f32> = random(m * n, &mut rng);
            let mut want = c0.clone();
            p1.install(|| {
                gemm_with_isa(
                    isa,
                    MatRef::row_major(&a, m, k),
                    bv,
                    MatMut::row_major(&mut want, m, n),
                    &opts,
                )
            })
            .unwrap();
            for p in [&p1, &p2] {
                let mut got = c0.clone();
                p.install(|| {
                    gemm_panels_with_isa(
                        isa,
                        MatRef::row_major(&a, m, k),
                        &ViewPanels(bv),
                        MatMut::row_major(&mut got, m, n),
                        &opts,
                    )
                })
                .unwrap();
                for (x, y) in got.iter().zip(&want) {
                    assert_eq!(x.to_bits(), y.to_bits(), "{isa:?} {m}x{n}x{k}");
                }
            }
        }
    }
}

/// A column-blocked C (a convolution's `[N, C, HW]` output seen as `[C, N·HW]`) receives
/// bitwise what a plain C receives, on both loop nests and 1 and 2 threads; the padding between
/// rows and blocks is never written; overlapping or too-small layouts are errors.
#[test]
fn blocked_c_matches_plain_c() {
    let (p1, p2) = (pool(1), pool(2));
    let mut rng = Rng(16);
    for &(m, n, k, block) in &[(7, 288, 5, 96), (130, 224, 600, 96), (1500, 192, 300, 64)] {
        let a: Vec<f32> = random(m * k, &mut rng);
        let b: Vec<f32> = random(k * n, &mut rng);
        let bias: Vec<f32> = random(n, &mut rng);
        let bv = MatRef::row_major(&b, k, n);
        let opts = GemmOptions {
            epilogue: Epilogue::Bias(&bias),
            beta: 0.5,
            ..Default::default()
        };
        let c0: Vec<f32> = random(m * n, &mut rng);
        let mut want = c0.clone();
        gemm_panels(
            MatRef::row_major(&a, m, k),
            &ViewPanels(bv),
            MatMut::row_major(&mut want, m, n),
            &opts,
        )
        .unwrap();
        let (rs, blocks) = (block + 3, n.div_ceil(block));
        let bs = m * rs + 5;
        let at = |i: usize, j: usize| i * rs + (j / block) * bs + j % block;
        for p in [&p1, &p2] {
            let mut data = vec![f32::NAN; blocks * bs];
            for i in 0..m {
                for j in 0..n {
                    data[at(i, j)] = c0[i * n + j];
                }
            }
            let c = BlockedMatMut {
                data: &mut data,
                rows: m,
                cols: n,
                row_stride: rs,
                block,
                block_stride: bs,
            };
            let done = p
                .install(|| {
                    gemm_panels_blocked(MatRef::row_major(&a, m, k), &ViewPanels(bv), c, &opts)
                })
                .unwrap();
            assert!(done, "blocks of {block} suit every microkernel");
            for i in 0..m {
                for j in 0..n {
                    let (x, y) = (data[at(i, j)], want[i * n + j]);
                    assert_eq!(x.to_bits(), y.to_bits(), "{m}x{n}x{k} ({i}, {j})");
                    data[at(i, j)] = f32::NAN;
                }
            }
            assert!(data.iter().all(|v| v.is_nan()), "padding written");
        }
    }
    // Blocks that overlap each other, and a buffer one element short. Blocks of 32 columns
    // suit every microkernel (NR = 32 for AVX-512, 16 otherwise).
    assert!(blocked_c_supported(32));
    let (a, b) = (vec![1f32; 4 * 3], vec![1f32; 3 * 64]);
    let mut data = vec![0f32; 2 * 4 * 32];
    let bad = |data: &mut [f32], bs: usize| {
        let c = BlockedMatMut {
            data,
            rows: 4,
            cols: 64,
            row_stride: 32,
            block: 32,
            block_stride: bs,
        };
        gemm_panels_blocked(
            MatRef::row_major(&a, 4, 3),
            &ViewPanels(MatRef::row_major(&b, 3, 64)),
            c,
            &GemmOptions::default(),
        )
    };
    assert!(bad(&mut data, 96).is_err());
    assert!(bad(&mut data[..255], 128).is_err());
    assert!(bad(&mut data, 128).unwrap());
    assert!(data.iter().all(|&v| v == 3.0));
}

/// An A that packs its own panels (`pack_a` of a view), with or without the whole matrix
/// already packed for the driver to read in place.
struct ViewA<'a> {
    a: MatRef<'a, f32>,
    /// `pack_a(a, 0, m, 0, k, mr)` and its `mr`, when offered.
    whole: Option<(Vec<f32>, usize)>,
}

impl APanelSource for ViewA<'_> {
    fn rows(&self) -> usize {
        self.a.rows
    }
    fn cols(&self) -> usize {
        self.a.cols
    }
    fn pack(&self, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize, dst: &mut [f32]) {
        kiln_cpu::gemm::pack::pack_a(&self.a, i0, mc, p0, kc, mr, dst)
    }
    fn prepacked(&self, mr: usize) -> Option<&[f32]> {
        self.whole
            .as_ref()
            .filter(|(_, wmr)| *wmr == mr)
            .map(|(d, _)| d.as_slice())
    }
}

/// `gemm_sources[_blocked]` (A's panels from a source, packed per block or read in place from
/// a whole prepacked A) give bitwise the C of `gemm_panels` with a view: depths inside one
/// depth cut and beyond it, row counts inside one row block and beyond, 1 and 2 threads.
#[test]
fn a_panel_sources_match_views() {
    let (p1, p2) = (pool(1), pool(2));
    let mut rng = Rng(23);
    let mr = Isa::best().tile().0;
    for &(m, n, k) in &[
        (7, 40, 5),
        (256, 96, 512),
        (130, 224, 600),
        (1500, 64, 300),
        (33, 17, 2100),
    ] {
        let a: Vec<f32> = random(m * k, &mut rng);
        let b: Vec<f32> = random(k * n, &mut rng);
        let (av, bv) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
        let opts = GemmOptions {
            beta: 0.25,
            ..Default::default()
        };
        let c0: Vec<f32> = random(m * n, &mut rng);
        let mut whole = vec![0f32; m.div_ceil(mr) * mr * k];
        kiln_cpu::gemm::pack::pack_a(&av, 0, m, 0, k, mr, &mut whole);
        for p in [&p1, &p2] {
            let mut want = c0.clone();
            p.install(|| {
                gemm_panels(
                    av,
                    &ViewPanels(bv),
                    MatMut::row_major(&mut want, m, n),
                    &opts,
                )
            })
            .unwrap();
            for src in [
                ViewA { a: av, whole: None },
                ViewA {
                    a: av,
                    whole: Some((whole.clone(), mr)),
                },
            ] {
                let mut got = c0.clone();
                p.install(|| {
                    gemm_sources(
                        &src,
                        &ViewPanels(bv),
                        MatMut::row_major(&mut got, m, n),
                        &opts,
                    )
                })
                .unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{m}x{n}x{k}");
                // The same as column blocks of 16 (a multiple of every kernel's NR) when n is.
                if n % 32 == 0 {
                    let mut data = c0.clone();
                    let c = BlockedMatMut {
                        data: &mut data,
                        rows: m,
                        cols: n,
                        row_stride: n,
                        block: n,
                        block_stride: m * n,
                    };
                    let done = p
                        .install(|| gemm_sources_blocked(&src, &ViewPanels(bv), c, &opts))
                        .unwrap();
                    if done {
                        assert_eq!(bits(&data), bits(&want), "blocked {m}x{n}x{k}");
                    }
                }
            }
        }
    }
}

/// A pre-packed B gives bitwise the same C as packing per call, for every kernel, dtype, layout
/// and thread count.
#[test]
fn packed_b_matches_per_call_packing() {
    let (p1, p2) = (pool(1), pool(2));
    let mut rng = Rng(5);
    for isa in isas() {
        for &(m, n, k, col) in &[
            (7, 13, 5, false),
            (130, 77, 600, true),
            (64, 300, 257, false),
            (1, 50, 9, true),
            (300, 40, 300, false),
        ] {
            let a: Vec<f32> = random(m * k, &mut rng);
            let b: Vec<bf16> = random(k * n, &mut rng);
            let bias: Vec<f32> = random(n, &mut rng);
            let bv = if col {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            let opts = GemmOptions {
                epilogue: Epilogue::BiasGelu(&bias),
                ..Default::default()
            };
            let packed = PackedB::with_isa(isa, bv).unwrap();
            assert_eq!((packed.k(), packed.n()), (k, n));
            let mut want = vec![0f32; m * n];
            // The per-call path; up to FEW_ROWS rows take the GEMV-order path, so compare those
            // by tolerance.
            p1.install(|| {
                gemm_with_isa(
                    isa,
                    MatRef::row_major(&a, m, k),
                    bv,
                    MatMut::row_major(&mut want, m, n),
                    &opts,
                )
            })
            .unwrap();
            for p in [&p1, &p2] {
                let mut got = vec![f32::NAN; m * n];
                p.install(|| {
                    gemm_packed(
                        MatRef::row_major(&a, m, k),
                        &packed,
                        MatMut::row_major(&mut got, m, n),
                        &opts,
                    )
                })
                .unwrap();
                for (x, y) in got.iter().zip(&want) {
                    if m > kiln_cpu::gemm::FEW_ROWS {
                        assert_eq!(x.to_bits(), y.to_bits(), "{isa:?} {m}x{n}x{k}");
                    } else {
                        let tol = 1e-5 * (1.0 + y.abs()) * (k as f32).sqrt();
                        assert!((x - y).abs() <= tol, "{isa:?} {m}x{n}x{k}: {x} vs {y}");
                    }
                }
            }
        }
    }
    // Shape mismatch is an error.
    let b = vec![0f32; 12];
    let packed = PackedB::new(MatRef::row_major(&b, 3, 4)).unwrap();
    let a = vec![0f32; 8];
    let mut c = vec![0f32; 8];
    assert!(gemm_packed(
        MatRef::row_major(&a, 2, 4),
        &packed,
        MatMut::row_major(&mut c, 2, 4),
        &GemmOptions::default()
    )
    .is_err());
}

/// The bf16-compute entry point: on AMX machines A is rounded to bf16 (tolerance of a bf16
/// input: 2⁻⁸ relative per product), elsewhere it is the f32 path.
#[test]
fn bf16_compute_entry_point() {
    let mut rng = Rng(9);
    let (m, n, k) = (40, 70, 96);
    let a: Vec<f32> = random(m * k, &mut rng);
    let b: Vec<bf16> = random(k * n, &mut rng);
    let mut c = vec![0f32; m * n];
    gemm_bf16_compute(
        MatRef::row_major(&a, m, k),
        MatRef::row_major(&b, k, n),
        MatMut::row_major(&mut c, m, n),
        &GemmOptions::default(),
    )
    .unwrap();
    for i in 0..m {
        for j in 0..n {
            let (mut want, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let t = a[i * k + p] as f64 * b[p * n + j].to_f64();
                want += t;
                mag += t.abs();
            }
            let tol = (1.0 / 256.0 + (k + 4) as f64 * U) * mag;
            assert!((c[i * n + j] as f64 - want).abs() <= tol);
        }
    }
}

/// 2 to 4 rows stream B like the M = 1 path: every row of the product is bitwise the M = 1
/// product of that row, for both B layouts, 16-bit weights, the epilogue, beta, and any thread
/// count (a batched decode step gives each sequence exactly its own result).
#[test]
fn few_rows_equal_single_rows() {
    let (p1, p2) = (pool(1), pool(2));
    let mut rng = Rng(21);
    for isa in isas() {
        for &(m, n, k, col) in &[
            (2, 300, 70, false),
            (3, 9000, 64, true),
            (4, 20011, 33, false),
            // Short rows: the depth-stream GEMV, two runs of the depth per thread.
            (2, 768, 1531, false),
            (4, 1000, 1201, false),
        ] {
            let a: Vec<f32> = random(m * k, &mut rng);
            let b: Vec<bf16> = random(k * n, &mut rng);
            let bias: Vec<f32> = random(n, &mut rng);
            let c0: Vec<f32> = random(m * n, &mut rng);
            let bv = if col {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            for beta in [0.0, 0.5] {
                let opts = GemmOptions {
                    beta,
                    epilogue: Epilogue::BiasGelu(&bias),
                    ..Default::default()
                };
                let mut want = c0.clone();
                for i in 0..m {
                    p1.install(|| {
                        gemm_with_isa(
                            isa,
                            MatRef::row_major(&a[i * k..(i + 1) * k], 1, k),
                            bv,
                            MatMut::row_major(&mut want[i * n..(i + 1) * n], 1, n),
                            &opts,
                        )
                    })
                    .unwrap();
                }
                for p in [&p1, &p2] {
                    let mut got = c0.clone();
                    p.install(|| {
                        gemm_with_isa(
                            isa,
                            MatRef::row_major(&a, m, k),
                            bv,
                            MatMut::row_major(&mut got, m, n),
                            &opts,
                        )
                    })
                    .unwrap();
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{isa:?} {m}x{n}x{k} col {col} beta {beta}"
                    );
                }
            }
        }
    }
}

/// The M = 1 bf16 row-major kernels of the AVX-512 and AVX2 paths agree bit for bit (each output
/// is the same FMA chain in order of depth): widths around the AVX-512 kernel's 64-column blocks
/// (its `w mod 64` tail is the AVX2 kernel's) and depths around its 12-row groups, on 1 and 2
/// threads; and both match the f64 reference.
#[test]
fn gemv_bf16_rows_bitwise_equal_across_isas() {
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.is_available())
        .collect();
    let mut rng = Rng(77);
    for &(k, n) in &[
        (1, 64),
        (7, 63),
        (12, 65),
        (13, 128),
        (25, 130),
        (29, 1000),
        (768, 200),
        (100, 50000),
    ] {
        let a: Vec<f32> = random(k, &mut rng);
        let b: Vec<bf16> = random(k * n, &mut rng);
        let mut outs = Vec::new();
        for &isa in &isas {
            for threads in [1, 2] {
                let mut c = vec![0f32; n];
                pool(threads)
                    .install(|| {
                        gemm_with_isa(
                            isa,
                            MatRef::row_major(&a, 1, k),
                            MatRef::row_major(&b, k, n),
                            MatMut::row_major(&mut c, 1, n),
                            &GemmOptions::default(),
                        )
                    })
                    .unwrap();
                for (j, &got) in c.iter().enumerate() {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for p in 0..k {
                        let t = a[p] as f64 * b[p * n + j].to_f64();
                        want += t;
                        mag += t.abs();
                    }
                    let tol = (k + 4) as f64 * U * mag;
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{isa:?} {threads}t 1x{n}x{k}: y[{j}] = {got}, want {want}"
                    );
                }
                outs.push((isa, threads, c));
            }
        }
        for (isa, threads, c) in &outs[1..] {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(c),
                bits(&outs[0].2),
                "1x{n}x{k}: {isa:?} {threads}t differs from {:?} {}t",
                outs[0].0,
                outs[0].1
            );
        }
    }
}
