//! The AMX bf16 GEMM path (`kiln_cpu::gemm::amx`) against a naive f64 reference.
//!
//! The reference multiplies the *bf16-rounded* operands in f64, so the only legitimate error is
//! f32 summation: k exact products (bf16·bf16 fits an f32 significand) summed in f32, then
//! `alpha·acc + beta·c` (three more roundings). With u = 2⁻²⁴ that is at most
//! (k + 3)·u·S where S = |alpha|·Σ|a·b| + |beta·c|; the tests allow twice that,
//! `tol = (k + 3)·2⁻²³·S`, plus 16 ulps of the result for the bias and GELU epilogues.
//!
//! Every configuration this machine runs is forced: the software tile model (any machine) with
//! the scalar and the AVX2 packer, the AVX512-BF16 kernel (`vdpbf16ps`) where the CPU has it,
//! and the AMX tiles where the CPU and OS provide them (tests that need AMX print
//! `SKIP <name>: no AMX` otherwise).
use half::bf16;
use kiln::cpu::gemm::amx::{
    amx_available, amx_peak_gflops_one_core, amx_unavailable_reason, best_native_kernel,
    bf16_dot_available, bf16_dot_peak_gflops_one_core, gemm_bf16_amx, gemm_bf16_amx_packed_with,
    gemm_bf16_amx_panels_with, gemm_bf16_amx_with, AmxConfig, AmxPackedB, PackKernel, TileKernel,
};
use kiln::cpu::gemm::{Epilogue, GemmOptions, MatMut, MatRef, PanelMatrix};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u32 << 30) as f32 - 1.0
    }
}

/// How a matrix is laid out in its buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lay {
    /// Row stride = cols, column stride 1.
    Row,
    /// Column-major (a transposed operand): row stride 1, column stride = rows.
    Col,
    /// Row stride cols·2 + 3, column stride 2 (gaps everywhere).
    Gap,
}

fn strides(lay: Lay, rows: usize, cols: usize) -> (usize, usize, usize) {
    match lay {
        Lay::Row => (cols, 1, rows * cols),
        Lay::Col => (1, rows, rows * cols),
        Lay::Gap => (
            2 * cols + 3,
            2,
            (rows - 1) * (2 * cols + 3) + 2 * (cols - 1) + 1,
        ),
    }
}

/// Buffer of `len` random values; returns it with the logical matrix element accessor strides.
fn random_buf(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.unit()).collect()
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
    epi: u8, // 0 none, 1 bias, 2 bias+gelu, 3 gelu
}

fn case(m: usize, n: usize, k: usize) -> Case {
    Case {
        m,
        n,
        k,
        la: Lay::Row,
        lb: Lay::Row,
        lc: Lay::Row,
        alpha: 1.0,
        beta: 0.0,
        epi: 0,
    }
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// Which variant of the API a run goes through.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    /// f32 A, strided B packed inside the call.
    F32,
    /// bf16 A (pre-rounded).
    Bf16A,
    /// f32 A, B packed beforehand.
    Packed,
}

/// Runs one case and checks every element against the f64 reference; returns C's buffer.
fn run_case(cfg: &AmxConfig, cs: Case, via: Via, seed: u64) -> Vec<f32> {
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
    } = cs;
    let mut rng = Rng(seed);
    let (ars, acs, alen) = strides(la, m, k);
    let (brs, bcs, blen) = strides(lb, k, n);
    let (crs, ccs, clen) = strides(lc, m, n);
    let a = random_buf(&mut rng, alen);
    let b: Vec<bf16> = random_buf(&mut rng, blen)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let mut c = random_buf(&mut rng, clen);
    if beta == 0.0 {
        // beta = 0 must ignore C entirely, NaN included.
        c.iter_mut().step_by(3).for_each(|x| *x = f32::NAN);
    }
    let c0 = c.clone();
    let bias: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
    let epilogue = match epi {
        0 => Epilogue::None,
        1 => Epilogue::Bias(&bias),
        2 => Epilogue::BiasGelu(&bias),
        _ => Epilogue::Gelu,
    };
    let opts = GemmOptions {
        alpha,
        beta,
        epilogue,
        ..Default::default()
    };
    let av = MatRef::strided(&a[..], m, k, ars, acs);
    let bv = MatRef::strided(&b[..], k, n, brs, bcs);
    let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    {
        let cv = MatMut::strided(&mut c[..], m, n, crs, ccs);
        match via {
            Via::F32 => gemm_bf16_amx_with(cfg, av, bv, cv, &opts),
            Via::Bf16A => {
                let av16 = MatRef::strided(&a16[..], m, k, ars, acs);
                gemm_bf16_amx_with(cfg, av16, bv, cv, &opts)
            }
            Via::Packed => {
                let pb = AmxPackedB::pack_with(bv, cfg.pack).unwrap();
                gemm_bf16_amx_packed_with(cfg, av, &pb, cv, &opts)
            }
        }
        .unwrap_or_else(|e| panic!("{cfg:?} {cs:?}: {e}"));
    }
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let x = a16[i * ars + p * acs].to_f64() * b[p * brs + j * bcs].to_f64();
                dot += x;
                mag += x.abs();
            }
            let at = i * crs + j * ccs;
            let prev = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c0[at] as f64
            };
            let pre = alpha as f64 * dot + prev;
            let scale = alpha.abs() as f64 * mag + prev.abs();
            let mut tol = (k as f64 + 3.0) * f32::EPSILON as f64 * scale;
            let want = match epi {
                0 => pre,
                1 => pre + bias[j] as f64,
                2 => gelu64(pre + bias[j] as f64),
                _ => gelu64(pre),
            };
            if epi != 0 {
                tol = 1.2 * tol + 16.0 * f32::EPSILON as f64 * (pre.abs() + 1.0);
            }
            let got = c[at] as f64;
            assert!(
                (got - want).abs() <= tol,
                "{cfg:?} {via:?} {cs:?}: C[{i}][{j}] = {got}, want {want} (tol {tol:e})"
            );
        }
    }
    // Elements of C's buffer outside the view are untouched.
    if lc == Lay::Gap {
        let mut inside = vec![false; clen];
        for i in 0..m {
            for j in 0..n {
                inside[i * crs + j * ccs] = true;
            }
        }
        for (idx, &isin) in inside.iter().enumerate() {
            if !isin {
                assert_eq!(c[idx].to_bits(), c0[idx].to_bits(), "gap {idx} written");
            }
        }
    }
    c
}

/// Every configuration this machine runs.
fn configs() -> Vec<AmxConfig> {
    let mut v = vec![AmxConfig {
        tiles: TileKernel::Emulated,
        pack: PackKernel::Scalar,
    }];
    if PackKernel::Avx2.is_available() {
        v.push(AmxConfig {
            tiles: TileKernel::Emulated,
            pack: PackKernel::Avx2,
        });
    }
    if bf16_dot_available() {
        v.push(AmxConfig {
            tiles: TileKernel::Avx512Bf16,
            pack: PackKernel::best(),
        });
    }
    if amx_available() {
        v.push(AmxConfig::hardware().unwrap());
    }
    v
}

/// The fastest configuration: native bf16 arithmetic when present, else the software model.
fn best() -> AmxConfig {
    AmxConfig::native().unwrap_or_else(AmxConfig::emulated)
}

#[test]
fn every_dimension_1_to_33() {
    for cfg in configs() {
        for d in 1..=33 {
            run_case(&cfg, case(d, 17, 33), Via::F32, d as u64);
            run_case(&cfg, case(33, d, 17), Via::F32, 100 + d as u64);
            run_case(&cfg, case(17, 33, d), Via::F32, 200 + d as u64);
        }
        let sizes = [1, 2, 7, 15, 16, 17, 31, 32, 33];
        for &m in &sizes {
            for &n in &sizes {
                for &k in &sizes {
                    run_case(
                        &cfg,
                        case(m, n, k),
                        Via::F32,
                        (m * 10000 + n * 100 + k) as u64,
                    );
                }
            }
        }
    }
}

#[test]
fn primes_and_257() {
    for cfg in configs() {
        for &(m, n, k) in &[
            (7, 13, 31),
            (13, 7, 257),
            (257, 31, 13),
            (31, 257, 7),
            (257, 257, 257),
            (64, 96, 1100), // several KC blocks
        ] {
            run_case(&cfg, case(m, n, k), Via::F32, (m + n + k) as u64);
        }
    }
}

#[test]
fn gpt2_shapes() {
    // One configuration each (the shapes are large for the software model).
    let cfg = best();
    run_case(&cfg, case(1, 50257, 768), Via::Packed, 1);
    run_case(&cfg, case(128, 2304, 768), Via::F32, 2);
}

#[test]
fn strided_and_transposed_operands() {
    let lays = [Lay::Row, Lay::Col, Lay::Gap];
    for cfg in configs() {
        for &la in &lays {
            for &lb in &lays {
                for &lc in &lays {
                    let cs = Case {
                        la,
                        lb,
                        lc,
                        ..case(19, 37, 45)
                    };
                    run_case(&cfg, cs, Via::F32, 7);
                    run_case(&cfg, cs, Via::Bf16A, 8);
                }
            }
        }
    }
}

#[test]
fn alpha_beta_and_epilogues() {
    for cfg in configs() {
        for &(alpha, beta) in &[
            (1.0, 0.0),
            (0.5, 0.0),
            (-1.25, 0.75),
            (2.0, 1.0),
            (0.0, -0.5),
        ] {
            for epi in 0..4 {
                let cs = Case {
                    alpha,
                    beta,
                    epi,
                    lc: Lay::Gap,
                    ..case(35, 40, 70)
                };
                run_case(&cfg, cs, Via::F32, 11);
            }
        }
        // k = 0: C = epilogue(beta·C).
        let cs = Case {
            beta: 0.5,
            epi: 1,
            ..case(5, 6, 0)
        };
        run_case(&cfg, cs, Via::F32, 12);
    }
}

#[test]
fn variants_and_packers_are_bitwise_equal() {
    for cfg in configs() {
        for cs in [case(45, 70, 90), case(1, 100, 64), case(64, 64, 1100)] {
            let x = run_case(&cfg, cs, Via::F32, 21);
            // A given as bf16 (the same rounding done by the caller) and B packed beforehand.
            let y = run_case(&cfg, cs, Via::Bf16A, 21);
            let z = run_case(&cfg, cs, Via::Packed, 21);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x), bits(&y), "{cfg:?} {cs:?} bf16 A");
            assert_eq!(bits(&x), bits(&z), "{cfg:?} {cs:?} packed B");
        }
    }
    // Repacking into a used buffer (larger, stale contents) equals packing afresh.
    let mut rng = Rng(99);
    let big: Vec<bf16> = (0..300 * 200).map(|_| bf16::from_f32(rng.unit())).collect();
    let small: Vec<bf16> = (0..45 * 70).map(|_| bf16::from_f32(rng.unit())).collect();
    let mut p = AmxPackedB::pack(MatRef::row_major(&big[..], 300, 200)).unwrap();
    p.repack(MatRef::row_major(&small[..], 45, 70)).unwrap();
    assert_eq!(
        p,
        AmxPackedB::pack(MatRef::row_major(&small[..], 45, 70)).unwrap()
    );
    assert_eq!((p.k(), p.n()), (45, 70));
    // The two packers feed the same tile kernel bit-identical panels.
    if PackKernel::Avx2.is_available() {
        for tiles in [
            TileKernel::Emulated,
            TileKernel::Avx512Bf16,
            TileKernel::Amx,
        ] {
            if (tiles == TileKernel::Amx && !amx_available())
                || (tiles == TileKernel::Avx512Bf16 && !bf16_dot_available())
            {
                continue;
            }
            let scalar = AmxConfig {
                tiles,
                pack: PackKernel::Scalar,
            };
            let avx2 = AmxConfig {
                tiles,
                pack: PackKernel::Avx2,
            };
            for lay in [Lay::Row, Lay::Col] {
                let cs = Case {
                    la: lay,
                    lb: lay,
                    ..case(50, 75, 100)
                };
                assert_eq!(
                    run_case(&scalar, cs, Via::F32, 5),
                    run_case(&avx2, cs, Via::F32, 5)
                );
            }
        }
    }
}

#[test]
fn one_and_two_threads_bitwise_equal() {
    let pool = |t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    };
    let (p1, p2) = (pool(1), pool(2));
    let mut cfgs = vec![AmxConfig::emulated()];
    cfgs.extend(AmxConfig::native());
    for cfg in cfgs {
        for cs in [case(130, 300, 600), case(300, 70, 1100)] {
            let one = p1.install(|| run_case(&cfg, cs, Via::F32, 3));
            let two = p2.install(|| run_case(&cfg, cs, Via::F32, 3));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&two), "{cfg:?} {cs:?}");
        }
    }
}

/// The AMX tile kernel has never run on AMX hardware: without the opt-in variable it must be
/// unreachable on every CPU (detection false, no dispatcher picks it, the hardware
/// configuration is an error). A CPU with AMX then takes the AVX512-BF16 kernel.
#[test]
fn amx_unreachable_without_opt_in() {
    if std::env::var_os(kiln::cpu::gemm::amx::AMX_OPT_IN).is_some() {
        println!("SKIP amx_unreachable_without_opt_in: the process opted in");
        return;
    }
    assert!(!amx_available());
    assert!(amx_unavailable_reason().is_some());
    assert_ne!(best_native_kernel(), Some(TileKernel::Amx));
    assert!(AmxConfig::native().is_none_or(|c| c.tiles != TileKernel::Amx));
    assert!(AmxConfig::hardware().is_err());
    let cfg = AmxConfig {
        tiles: TileKernel::Amx,
        pack: AmxConfig::emulated().pack,
    };
    assert!(cfg.check().is_err());
}

#[test]
fn amx_hardware_matches_software_model() {
    if !amx_available() {
        println!("SKIP amx_hardware_matches_software_model: no AMX");
        return;
    }
    // Same packed operands, same summation order: the hardware and the model should agree
    // (denormals aside, which these inputs do not produce); checked to the reference tolerance
    // by run_case and reported here if not bit-identical.
    let hw = AmxConfig::hardware().unwrap();
    let sw = AmxConfig {
        tiles: TileKernel::Emulated,
        pack: hw.pack,
    };
    let cs = case(96, 96, 640);
    let x = run_case(&hw, cs, Via::F32, 9);
    let y = run_case(&sw, cs, Via::F32, 9);
    let differing = x
        .iter()
        .zip(&y)
        .filter(|(p, q)| p.to_bits() != q.to_bits())
        .count();
    println!(
        "amx vs model: {differing} of {} elements differ in the last bits",
        x.len()
    );
}

#[test]
fn bad_input_is_an_error() {
    let cfg = AmxConfig::emulated();
    let a = [0f32; 6];
    let b = [bf16::ZERO; 6];
    let mut c = [0f32; 4];
    let opts = GemmOptions::default();
    // Inner dimensions disagree.
    let r = gemm_bf16_amx_with(
        &cfg,
        MatRef::row_major(&a[..], 2, 3),
        MatRef::row_major(&b[..], 2, 3),
        MatMut::row_major(&mut c[..], 2, 2),
        &opts,
    );
    assert!(r.is_err());
    // A view that runs past its buffer.
    let r = gemm_bf16_amx_with(
        &cfg,
        MatRef::strided(&a[..], 2, 3, 4, 1),
        MatRef::row_major(&b[..], 3, 2),
        MatMut::row_major(&mut c[..], 2, 2),
        &opts,
    );
    assert!(r.is_err());
    // Bias of the wrong length.
    let bias = [0f32; 3];
    let r = gemm_bf16_amx_with(
        &cfg,
        MatRef::row_major(&a[..], 2, 3),
        MatRef::row_major(&b[..], 3, 2),
        MatMut::row_major(&mut c[..], 2, 2),
        &GemmOptions {
            epilogue: Epilogue::Bias(&bias),
            ..opts
        },
    );
    assert!(r.is_err());
    // Packed B of the wrong shape.
    let pb = AmxPackedB::pack(MatRef::row_major(&b[..], 2, 3)).unwrap();
    let r = gemm_bf16_amx_packed_with(
        &cfg,
        MatRef::row_major(&a[..], 2, 3),
        &pb,
        MatMut::row_major(&mut c[..], 2, 2),
        &opts,
    );
    assert!(r.is_err());
    // The hardware path without AMX is an error, not a fault.
    if !amx_available() {
        let r = gemm_bf16_amx(
            MatRef::row_major(&a[..], 2, 3),
            MatRef::row_major(&b[..], 3, 2),
            MatMut::row_major(&mut c[..], 2, 2),
            &opts,
        );
        assert!(r.is_err());
        assert!(amx_peak_gflops_one_core().is_err());
        println!("SKIP bad_input_is_an_error (AMX part): no AMX");
    }
}

/// B packed from a bf16 panel matrix (the decode layout) gives the same tile lines as B packed
/// from the dense matrix, and products through the panels (packed, or read in place where k is
/// a multiple of 32) are bitwise the dense products; for odd and padded sizes, both packers, the
/// software model and the native kernel.
#[test]
fn panel_matrix_packs_like_the_dense_matrix() {
    let mut rng = Rng(31);
    // k a multiple of 32 (32, 64, 96, 768): kernels that can read the panels in place do.
    for &(k, n) in &[
        (1, 1),
        (7, 33),
        (33, 7),
        (32, 33),
        (64, 64),
        (96, 257),
        (257, 100),
        (768, 70),
        (95, 257),
    ] {
        let b: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(rng.unit())).collect();
        let dense = MatRef::row_major(&b[..], k, n);
        let panels = PanelMatrix::<bf16>::from_view(&dense).unwrap();
        let mut packers = vec![PackKernel::Scalar];
        if PackKernel::Avx2.is_available() {
            packers.push(PackKernel::Avx2);
        }
        for pack in packers {
            assert_eq!(
                AmxPackedB::pack_panels_with(&panels, pack).unwrap(),
                AmxPackedB::pack_with(dense, PackKernel::Scalar).unwrap(),
                "k {k} n {n} {pack:?}"
            );
        }
        for cfg in [AmxConfig::emulated()]
            .into_iter()
            .chain(AmxConfig::native())
        {
            let m = 37;
            let a: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let opts = GemmOptions {
                epilogue: Epilogue::BiasGelu(&bias),
                ..Default::default()
            };
            let (mut x, mut y) = (vec![0f32; m * n], vec![0f32; m * n]);
            let av = MatRef::row_major(&a[..], m, k);
            gemm_bf16_amx_with(&cfg, av, dense, MatMut::row_major(&mut x, m, n), &opts).unwrap();
            gemm_bf16_amx_panels_with(&cfg, av, &panels, MatMut::row_major(&mut y, m, n), &opts)
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x), bits(&y), "{cfg:?} k {k} n {n}");
        }
    }
}

#[test]
fn bf16_dot_peak_probe() {
    if !bf16_dot_available() {
        println!("SKIP bf16_dot_peak_probe: no AVX512-BF16");
        assert!(bf16_dot_peak_gflops_one_core().is_err());
        return;
    }
    let g = bf16_dot_peak_gflops_one_core().unwrap();
    // 64 flops per instruction: anything from one instruction per few cycles to several per
    // cycle at a few GHz.
    assert!(g > 10.0 && g < 5000.0, "{g}");
}
