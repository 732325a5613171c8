//! conv2d / conv_transpose2d against a naive f64 direct convolution (forward and all three
//! gradients), finite-difference checks of the backward pass, and bitwise equality between 1
//! and 2 threads.
use half::{bf16, f16};
use kiln::cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
    Conv2dParams, ConvGeometry,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    cin: usize,
    cout: usize,
    hw: [usize; 2],
    k: [usize; 2],
    p: Conv2dParams,
}

fn params(s: [usize; 2], pad: [usize; 2], d: [usize; 2], g: usize, op: [usize; 2]) -> Conv2dParams {
    Conv2dParams {
        stride: s,
        padding: pad,
        dilation: d,
        groups: g,
        output_padding: op,
    }
}

/// Naive f64 references. Conv: y[n,o,oy,ox] = b[o] + Σ w[o,c,ki,kj]·x[n, g·cig+c, oy·s−p+ki·d, …].
/// Transposed conv: y[n, g·cog+o, ix·s−p+ki·d, …] += w[g·cig+c, o, ki, kj]·x[n, g·cig+c, ix, …].
/// Both written as one loop nest over (n, small pixel, tap, channels) that visits every
/// (image pixel, small pixel, weight) triple; forward and the three gradients accumulate from it.
struct Naive {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn naive(transposed: bool, g: &ConvGeometry, x: &[f32], w: &[f32], b: &[f32], dy: &[f32]) -> Naive {
    let [n, cb, hb, wb] = [g.batch, g.big[0], g.big[1], g.big[2]];
    let [cs, hs, ws] = g.small;
    let groups = g.groups;
    let (cbg, csg) = (cb / groups, cs / groups);
    let [kh, kw] = g.kernel;
    let big_len = n * cb * hb * wb;
    let small_len = n * cs * hs * ws;
    // Roles: conv: big = x, small = y; transposed: small = x, big = y.
    let mut out = vec![0f64; if transposed { big_len } else { small_len }];
    let mut dx = vec![0f64; x.len()];
    let mut dw = vec![0f64; w.len()];
    let oc = if transposed { cb } else { cs };
    let ohw = out.len() / n / oc;
    let mut db = vec![0f64; oc];
    for ni in 0..n {
        for o in 0..oc {
            for p in 0..ohw {
                out[(ni * oc + o) * ohw + p] = b[o] as f64;
                db[o] += dy[(ni * oc + o) * ohw + p] as f64;
            }
        }
    }
    for ni in 0..n {
        for grp in 0..groups {
            for so in 0..csg {
                let sc = grp * csg + so;
                for oy in 0..hs {
                    for ox in 0..ws {
                        let si = ((ni * cs + sc) * hs + oy) * ws + ox;
                        for bc_ in 0..cbg {
                            let bc = grp * cbg + bc_;
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let iy = (oy * g.stride[0] + ki * g.dilation[0]) as isize
                                        - g.padding[0] as isize;
                                    let ix = (ox * g.stride[1] + kj * g.dilation[1]) as isize
                                        - g.padding[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= hb as isize || ix >= wb as isize {
                                        continue;
                                    }
                                    let bi = ((ni * cb + bc) * hb + iy as usize) * wb + ix as usize;
                                    let wi = ((sc * cbg + bc_) * kh + ki) * kw + kj;
                                    let wv = w[wi] as f64;
                                    if transposed {
                                        // y = big, x = small
                                        out[bi] += wv * x[si] as f64;
                                        dx[si] += wv * dy[bi] as f64;
                                        dw[wi] += x[si] as f64 * dy[bi] as f64;
                                    } else {
                                        out[si] += wv * x[bi] as f64;
                                        dx[bi] += wv * dy[si] as f64;
                                        dw[wi] += x[bi] as f64 * dy[si] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Naive { y: out, dx, dw, db }
}

fn assert_close(what: &str, case: &Case, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what} length, {case:?}");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let err = (a as f64 - b).abs();
        assert!(
            err <= tol * (1.0 + b.abs()),
            "{what}[{i}]: got {a}, want {b} (err {err:e}) for {case:?}"
        );
    }
}

struct Run {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

fn run(transposed: bool, g: &ConvGeometry, x: &[f32], w: &[f32], b: &[f32], dy: &[f32]) -> Run {
    let mut y = vec![f32::NAN; g.output_len()];
    let mut dx = vec![f32::NAN; g.input_len()];
    let mut dw = vec![f32::NAN; g.weight_len()];
    let mut db = vec![f32::NAN; g.out_channels()];
    if transposed {
        conv_transpose2d_forward(g, x, w, Some(b), &mut y).unwrap();
        conv_transpose2d_backward(g, x, w, dy, Some(&mut dx), Some(&mut dw), Some(&mut db))
            .unwrap();
    } else {
        conv2d_forward(g, x, w, Some(b), &mut y).unwrap();
        conv2d_backward(g, x, w, dy, Some(&mut dx), Some(&mut dw), Some(&mut db)).unwrap();
    }
    Run { y, dx, dw, db }
}

fn try_geometry(transposed: bool, c: &Case) -> kiln::Result<ConvGeometry> {
    let x_shape = [c.n, c.cin, c.hw[0], c.hw[1]];
    if transposed {
        let w_shape = [c.cin, c.cout / c.p.groups, c.k[0], c.k[1]];
        ConvGeometry::conv_transpose2d(x_shape, w_shape, &c.p)
    } else {
        let w_shape = [c.cout, c.cin / c.p.groups, c.k[0], c.k[1]];
        ConvGeometry::conv2d(x_shape, w_shape, &c.p)
    }
}

fn geometry(transposed: bool, c: &Case) -> ConvGeometry {
    try_geometry(transposed, c).unwrap()
}

fn check_case(transposed: bool, c: &Case, seed: u64) {
    let g = geometry(transposed, c);
    let mut rng = Rng(seed);
    let x = rng.vec(g.input_len());
    let w = rng.vec(g.weight_len());
    let b = rng.vec(g.out_channels());
    let dy = rng.vec(g.output_len());
    let r = run(transposed, &g, &x, &w, &b, &dy);
    let want = naive(transposed, &g, &x, &w, &b, &dy);
    assert_close("y", c, &r.y, &want.y, 1e-5);
    assert_close("dx", c, &r.dx, &want.dx, 1e-5);
    assert_close("dw", c, &r.dw, &want.dw, 2e-5);
    assert_close("db", c, &r.db, &want.db, 1e-5);
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut add = |n, cin, cout, hw, k, p| {
        v.push(Case {
            n,
            cin,
            cout,
            hw,
            k,
            p,
        })
    };
    // (n, cin, cout, [h, w], [kh, kw], params(stride, padding, dilation, groups, output_padding))
    add(
        1,
        3,
        5,
        [7, 9],
        [3, 3],
        params([1, 1], [1, 1], [1, 1], 1, [0, 0]),
    );
    add(
        3,
        3,
        5,
        [7, 9],
        [3, 3],
        params([2, 2], [1, 1], [1, 1], 1, [1, 1]),
    );
    add(
        3,
        4,
        6,
        [9, 8],
        [4, 4],
        params([2, 2], [1, 1], [1, 1], 1, [0, 0]),
    );
    add(
        1,
        5,
        7,
        [6, 11],
        [5, 5],
        params([1, 2], [2, 0], [1, 1], 1, [0, 1]),
    );
    add(
        3,
        2,
        3,
        [13, 10],
        [7, 7],
        params([3, 2], [3, 3], [1, 1], 1, [2, 1]),
    );
    add(
        1,
        3,
        3,
        [8, 8],
        [1, 1],
        params([1, 1], [0, 0], [1, 1], 1, [0, 0]),
    );
    add(
        3,
        6,
        9,
        [5, 7],
        [1, 1],
        params([1, 1], [0, 0], [1, 1], 3, [0, 0]),
    );
    add(
        3,
        4,
        2,
        [5, 5],
        [1, 1],
        params([2, 2], [0, 0], [1, 1], 1, [1, 1]),
    );
    add(
        1,
        6,
        4,
        [9, 7],
        [3, 3],
        params([1, 1], [2, 2], [2, 2], 2, [1, 0]),
    );
    add(
        3,
        5,
        5,
        [9, 10],
        [3, 3],
        params([1, 1], [1, 1], [1, 1], 5, [0, 0]),
    ); // depthwise
    add(
        3,
        4,
        4,
        [11, 9],
        [5, 3],
        params([2, 1], [2, 1], [1, 2], 4, [1, 0]),
    ); // depthwise
    add(
        1,
        6,
        12,
        [8, 8],
        [3, 3],
        params([1, 1], [1, 1], [1, 1], 6, [0, 0]),
    ); // multiplier 2
    add(
        3,
        7,
        3,
        [10, 6],
        [4, 3],
        params([2, 3], [1, 0], [2, 1], 1, [1, 2]),
    );
    add(
        1,
        1,
        1,
        [1, 1],
        [1, 1],
        params([1, 1], [0, 0], [1, 1], 1, [0, 0]),
    );
    add(
        3,
        5,
        4,
        [1, 1],
        [4, 4],
        params([1, 1], [3, 3], [1, 1], 1, [0, 0]),
    );
    add(
        3,
        9,
        6,
        [4, 4],
        [4, 4],
        params([2, 2], [1, 1], [1, 1], 3, [1, 1]),
    );
    add(
        2,
        33,
        17,
        [5, 6],
        [3, 3],
        params([1, 1], [1, 1], [1, 1], 1, [0, 0]),
    );
    v
}

#[test]
fn conv2d_matches_naive_f64() {
    let mut ran = 0;
    for (i, c) in cases().iter().enumerate() {
        let c = Case {
            p: Conv2dParams {
                output_padding: [0, 0],
                ..c.p
            },
            ..*c
        };
        if try_geometry(false, &c).is_ok() {
            check_case(false, &c, 100 + i as u64);
            ran += 1;
        }
    }
    assert!(ran >= cases().len() - 2);
}

#[test]
fn conv_transpose2d_matches_naive_f64() {
    let mut ran = 0;
    for (i, c) in cases().iter().enumerate() {
        if try_geometry(true, c).is_ok() {
            check_case(true, c, 200 + i as u64);
            ran += 1;
        }
    }
    assert!(ran >= cases().len() - 2);
}

/// Shapes with at least 16 image channels per group, where the image side is made by output
/// phases (one stride-1 product per phase, no col2im; stride 1 is one phase): the
/// transposed-conv forward and the conv input gradient. Kernels that the stride divides and does not, a kernel shorter than
/// the stride, paddings beyond the kernel, output padding, groups, phase products whose
/// pixels are and are not a multiple of the microkernel's width.
#[test]
fn phase_route_matches_naive() {
    let mut ran = 0;
    for (i, (n, cin, cout, hw, k, p)) in [
        (
            2,
            20,
            18,
            [4, 4],
            [4, 4],
            params([2, 2], [1, 1], [1, 1], 1, [0, 0]),
        ),
        (
            3,
            17,
            16,
            [8, 8],
            [4, 4],
            params([2, 2], [1, 1], [1, 1], 1, [0, 0]),
        ),
        (
            2,
            16,
            19,
            [5, 7],
            [3, 3],
            params([2, 2], [1, 1], [1, 1], 1, [1, 0]),
        ),
        (
            1,
            18,
            17,
            [6, 5],
            [5, 4],
            params([3, 2], [2, 1], [1, 1], 1, [2, 1]),
        ),
        (
            2,
            32,
            34,
            [3, 4],
            [4, 4],
            params([2, 2], [0, 3], [1, 1], 2, [1, 1]),
        ),
        (
            2,
            16,
            16,
            [5, 5],
            [1, 1],
            params([2, 2], [0, 0], [1, 1], 1, [1, 1]),
        ),
        (
            5,
            24,
            16,
            [16, 16],
            [4, 4],
            params([2, 2], [1, 1], [1, 1], 1, [0, 0]),
        ),
        (
            2,
            17,
            20,
            [9, 7],
            [3, 3],
            params([1, 1], [1, 1], [1, 1], 1, [0, 0]),
        ),
        (
            3,
            16,
            16,
            [6, 6],
            [5, 3],
            params([1, 1], [2, 0], [1, 1], 1, [0, 0]),
        ),
        (
            2,
            32,
            32,
            [5, 5],
            [3, 3],
            params([1, 2], [0, 1], [1, 1], 2, [0, 1]),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let c = Case {
            n,
            cin,
            cout,
            hw,
            k,
            p,
        };
        if try_geometry(true, &c).is_ok() {
            check_case(true, &c, 300 + i as u64);
            ran += 1;
        }
        // The conv whose input gradient has these image channels (input = cout channels).
        let conv = Case {
            cin: cout,
            cout: cin,
            p: Conv2dParams {
                output_padding: [0, 0],
                ..p
            },
            ..c
        };
        if try_geometry(false, &conv).is_ok() {
            check_case(false, &conv, 400 + i as u64);
            ran += 1;
        }
    }
    assert!(ran >= 18, "{ran}");
}

#[test]
fn batched_chunks_match_naive() {
    // Small patch side: several images share one GEMM (images_per_chunk > 1), batch not a
    // multiple of the chunk.
    let c = Case {
        n: 7,
        cin: 6,
        cout: 10,
        hw: [4, 4],
        k: [4, 4],
        p: params([2, 2], [1, 1], [1, 1], 2, [0, 0]),
    };
    check_case(false, &c, 7);
    check_case(true, &c, 8);
    // Output planes of 16 and 32 positions (multiples of the AVX2 and portable kernels' NR): the
    // product writes the images' planes in place, as column blocks of C.
    for (hw, groups, seed) in [([8, 8], 1, 9), ([8, 16], 2, 10)] {
        let c = Case {
            n: 5,
            cin: 6,
            cout: 10,
            hw,
            k: [4, 4],
            p: params([2, 2], [1, 1], [1, 1], groups, [0, 0]),
        };
        check_case(false, &c, seed);
    }
}

/// The loss `L = Σ y·r` is linear in x and in w, so a central difference with a large step is
/// exact up to rounding: each gradient entry must equal (L(θ+h) − L(θ−h)) / 2h.
#[test]
fn finite_difference_gradients() {
    for transposed in [false, true] {
        let c = Case {
            n: 2,
            cin: 4,
            cout: 6,
            hw: [5, 6],
            k: [3, 4],
            p: params([2, 1], [1, 2], [1, 1], 2, [1, 0]),
        };
        let c = if transposed {
            c
        } else {
            Case {
                p: Conv2dParams {
                    output_padding: [0, 0],
                    ..c.p
                },
                ..c
            }
        };
        let g = geometry(transposed, &c);
        let mut rng = Rng(99);
        let x = rng.vec(g.input_len());
        let w = rng.vec(g.weight_len());
        let b = rng.vec(g.out_channels());
        let r = rng.vec(g.output_len());
        let grads = run(transposed, &g, &x, &w, &b, &r);
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let mut y = vec![0f32; g.output_len()];
            if transposed {
                conv_transpose2d_forward(&g, x, w, Some(b), &mut y).unwrap();
            } else {
                conv2d_forward(&g, x, w, Some(b), &mut y).unwrap();
            }
            y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let h = 0.5f32;
        let fd = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| {
            let mut p = v.to_vec();
            p[i] += h;
            let lp = f(&p);
            p[i] -= 2.0 * h;
            let lm = f(&p);
            (lp - lm) / (2.0 * h as f64)
        };
        for i in (0..x.len()).step_by(7) {
            let want = fd(&x, i, &|p| loss(p, &w, &b));
            assert!(
                (grads.dx[i] as f64 - want).abs() < 1e-3,
                "dx[{i}] {transposed}"
            );
        }
        for i in (0..w.len()).step_by(5) {
            let want = fd(&w, i, &|p| loss(&x, p, &b));
            assert!(
                (grads.dw[i] as f64 - want).abs() < 1e-3,
                "dw[{i}] {transposed}"
            );
        }
        for i in 0..b.len() {
            let want = fd(&b, i, &|p| loss(&x, &w, p));
            assert!(
                (grads.db[i] as f64 - want).abs() < 1e-3,
                "db[{i}] {transposed}"
            );
        }
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

#[test]
fn one_and_two_threads_bitwise_equal() {
    let shapes = [
        // DCGAN-like layers at a small batch, plus a depthwise and a pointwise case.
        (
            false,
            Case {
                n: 6,
                cin: 16,
                cout: 32,
                hw: [16, 16],
                k: [4, 4],
                p: Conv2dParams::new(2, 1),
            },
        ),
        (
            false,
            Case {
                n: 9,
                cin: 32,
                cout: 48,
                hw: [4, 4],
                k: [4, 4],
                p: Conv2dParams::new(2, 1),
            },
        ),
        (
            true,
            Case {
                n: 9,
                cin: 48,
                cout: 24,
                hw: [4, 4],
                k: [4, 4],
                p: Conv2dParams::new(2, 1),
            },
        ),
        (
            true,
            Case {
                n: 5,
                cin: 20,
                cout: 40,
                hw: [1, 1],
                k: [4, 4],
                p: Conv2dParams::new(1, 0),
            },
        ),
        (
            false,
            Case {
                n: 5,
                cin: 8,
                cout: 8,
                hw: [9, 9],
                k: [3, 3],
                p: params([1, 1], [1, 1], [1, 1], 8, [0, 0]),
            },
        ),
        (
            false,
            Case {
                n: 5,
                cin: 8,
                cout: 12,
                hw: [9, 9],
                k: [1, 1],
                p: Conv2dParams::new(1, 0),
            },
        ),
    ];
    for (transposed, c) in shapes {
        let g = geometry(transposed, &c);
        let mut rng = Rng(5);
        let x = rng.vec(g.input_len());
        let w = rng.vec(g.weight_len());
        let b = rng.vec(g.out_channels());
        let dy = rng.vec(g.output_len());
        let one = pool(1).install(|| run(transposed, &g, &x, &w, &b, &dy));
        let two = pool(2).install(|| run(transposed, &g, &x, &w, &b, &dy));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.y), bits(&two.y), "y {c:?}");
        assert_eq!(bits(&one.dx), bits(&two.dx), "dx {c:?}");
        assert_eq!(bits(&one.dw), bits(&two.dw), "dw {c:?}");
        assert_eq!(bits(&one.db), bits(&two.db), "db {c:?}");
    }
}

#[test]
fn half_precision_weights_are_converted_exactly() {
    let g = ConvGeometry::conv2d([2, 3, 8, 8], [5, 3, 3, 3], &Conv2dParams::new(1, 1)).unwrap();
    let mut rng = Rng(3);
    let x = rng.vec(g.input_len());
    let w = rng.vec(g.weight_len());
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut y_ref = vec![0f32; g.output_len()];
    let mut y = vec![0f32; g.output_len()];
    let w_from_h: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
    conv2d_forward(&g, &x, &w_from_h, None, &mut y_ref).unwrap();
    conv2d_forward(&g, &x, &wh, None, &mut y).unwrap();
    assert_eq!(y, y_ref);
    let w_from_b: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
    conv2d_forward(&g, &x, &w_from_b, None, &mut y_ref).unwrap();
    conv2d_forward(&g, &x, &wb, None, &mut y).unwrap();
    assert_eq!(y, y_ref);
}

#[test]
fn bad_shapes_are_errors() {
    let p = Conv2dParams::new(1, 0);
    assert!(ConvGeometry::conv2d([1, 3, 2, 2], [4, 3, 3, 3], &p).is_err()); // kernel too big
    assert!(ConvGeometry::conv2d([1, 3, 8, 8], [4, 2, 3, 3], &p).is_err()); // channels
    assert!(
        ConvGeometry::conv2d([1, 4, 8, 8], [4, 2, 3, 3], &Conv2dParams { groups: 3, ..p }).is_err()
    );
    assert!(ConvGeometry::conv2d(
        [1, 3, 8, 8],
        [4, 3, 3, 3],
        &Conv2dParams {
            stride: [0, 1],
            ..p
        }
    )
    .is_err());
    assert!(ConvGeometry::conv2d([0, 3, 8, 8], [4, 3, 3, 3], &p).is_err());
    let op = Conv2dParams {
        output_padding: [2, 0],
        stride: [2, 2],
        ..p
    };
    assert!(ConvGeometry::conv_transpose2d([1, 3, 4, 4], [3, 2, 3, 3], &op).is_err());
    assert!(
        ConvGeometry::conv_transpose2d([1, 3, 1, 1], [3, 2, 1, 1], &Conv2dParams::new(1, 1))
            .is_err()
    );
    let g = ConvGeometry::conv2d([1, 3, 8, 8], [4, 3, 3, 3], &p).unwrap();
    let x = vec![0f32; g.input_len()];
    let w = vec![0f32; g.weight_len()];
    let mut y = vec![0f32; g.output_len() - 1];
    assert!(conv2d_forward(&g, &x, &w, None, &mut y).is_err());
    let mut y = vec![0f32; g.output_len()];
    assert!(conv2d_forward(&g, &x, &w[1..], None, &mut y).is_err());
    assert!(conv2d_forward(&g, &x, &w, Some(&[0.0; 3]), &mut y).is_err());
    assert!(conv_transpose2d_forward(&g, &x, &w, None, &mut y).is_err()); // wrong operator
    assert_eq!(g.output_shape(), [1, 4, 6, 6]);
    let t =
        ConvGeometry::conv_transpose2d([2, 100, 1, 1], [100, 512, 4, 4], &Conv2dParams::new(1, 0))
            .unwrap();
    assert_eq!(t.output_shape(), [2, 512, 4, 4]);
    let t = ConvGeometry::conv_transpose2d(
        [2, 8, 5, 5],
        [8, 3, 4, 4],
        &Conv2dParams {
            output_padding: [1, 1],
            ..Conv2dParams::new(2, 1)
        },
    )
    .unwrap();
    assert_eq!(t.output_shape(), [2, 3, 11, 11]);
}
