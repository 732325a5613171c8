//! BatchNorm2d against PyTorch: training forward and backward, running statistics after two
//! training steps (momentum 0.1, unbiased variance), eval forward and backward.
mod conv_support;
use conv_support::{make, usizes, Fixtures};
use kiln::cpu::norm::batch_norm::{batch_norm_eval_backward, BnShape};
use kiln::nn::backend::{download_all, Backend, CpuBackend};
use kiln::nn::layers::BatchNorm2d;

fn arg(fx: &Fixtures, key: &str, n: usize) -> Vec<f32> {
    let a = fx.manifest["nn"]["bn"][key].as_array().unwrap();
    make(
        n,
        a[0].as_u64().unwrap(),
        a[1].as_f64().unwrap() as f32,
        a[2].as_f64().unwrap() as f32,
    )
}

#[test]
fn batch_norm_matches_pytorch() {
    let be = CpuBackend::default();
    let fx = Fixtures::load();
    let shape: [usize; 4] = usizes(&fx.manifest["nn"]["bn"]["shape"])
        .try_into()
        .unwrap();
    let n: usize = shape.iter().product();
    let c = shape[1];
    let mut bn = BatchNorm2d::new(&be, c).unwrap();
    let gamma = arg(&fx, "gamma", c);
    bn.weight.set(&be, &gamma).unwrap();
    bn.bias.set(&be, &arg(&fx, "beta", c)).unwrap();
    let dy = be.upload(&arg(&fx, "dy", n)).unwrap();

    let x1 = be.upload(&arg(&fx, "x1", n)).unwrap();
    let mut y = be.zeros(n).unwrap();
    bn.forward_train(&be, &x1, shape, &mut y).unwrap();
    fx.check("bn/train_y", &download_all(&be, &y).unwrap(), 1e-5);
    let mut dx = be.zeros(n).unwrap();
    bn.backward(&be, &x1, shape, &dy, Some(&mut dx), false)
        .unwrap();
    fx.check("bn/train_dx", &download_all(&be, &dx).unwrap(), 1e-5);
    fx.check("bn/train_dgamma", &bn.weight.grads(&be).unwrap(), 1e-5);
    fx.check("bn/train_dbeta", &bn.bias.grads(&be).unwrap(), 1e-5);

    let x2 = be.upload(&arg(&fx, "x2", n)).unwrap();
    bn.forward_train(&be, &x2, shape, &mut y).unwrap();
    assert_eq!(bn.num_batches_tracked, 2);
    let (rm, rv) = bn.running_stats(&be).unwrap();
    fx.check("bn/running_mean", &rm, 1e-5);
    fx.check("bn/running_var", &rv, 1e-5);

    let x3h = arg(&fx, "x3", n);
    let x3 = be.upload(&x3h).unwrap();
    bn.forward_eval(&be, &x3, shape, &mut y).unwrap();
    fx.check("bn/eval_y", &download_all(&be, &y).unwrap(), 1e-5);
    assert_eq!(bn.num_batches_tracked, 2);
    // Eval-mode backward (a kernel of its own; models train in training mode).
    let s = BnShape {
        batch: shape[0],
        channels: c,
        hw: shape[2] * shape[3],
    };
    let (mut dx, mut dg, mut db) = (vec![0f32; n], vec![0f32; c], vec![0f32; c]);
    batch_norm_eval_backward(
        &s,
        &x3h,
        &download_all(&be, &dy).unwrap(),
        &gamma,
        &rm,
        &rv,
        bn.eps,
        &mut dx,
        &mut dg,
        &mut db,
    )
    .unwrap();
    fx.check("bn/eval_dx", &dx, 1e-5);
    fx.check("bn/eval_dgamma", &dg, 1e-5);
    fx.check("bn/eval_dbeta", &db, 1e-5);
}

#[test]
fn batch_norm_bad_input_is_an_error() {
    let be = CpuBackend::default();
    let mut bn = BatchNorm2d::new(&be, 3).unwrap();
    let x12 = be.zeros(12).unwrap();
    let mut y = be.zeros(12).unwrap();
    assert!(bn.forward_train(&be, &x12, [1, 4, 1, 3], &mut y).is_err()); // channel count
    let x11 = be.zeros(11).unwrap();
    assert!(bn.forward_train(&be, &x11, [1, 3, 2, 2], &mut y).is_err()); // length
    let x3 = be.zeros(3).unwrap();
    assert!(bn.forward_train(&be, &x3, [1, 3, 1, 1], &mut y).is_err()); // one value per channel
    assert!(bn.forward_eval(&be, &x3, [1, 3, 1, 1], &mut y).is_ok()); // fine in eval mode
}

#[test]
fn batch_norm_is_thread_count_invariant() {
    let shape = [5, 7, 9, 11];
    let n: usize = shape.iter().product();
    let x = make(n, 1, 3.0, 1.0);
    let dy = make(n, 2, 1.0, 0.0);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let be = CpuBackend::default();
                let mut bn = BatchNorm2d::new(&be, 7).unwrap();
                let (xb, dyb) = (be.upload(&x).unwrap(), be.upload(&dy).unwrap());
                let (mut y, mut dx) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
                bn.forward_train(&be, &xb, shape, &mut y).unwrap();
                bn.backward(&be, &xb, shape, &dyb, Some(&mut dx), false)
                    .unwrap();
                (
                    download_all(&be, &y).unwrap(),
                    download_all(&be, &dx).unwrap(),
                    bn.weight.grads(&be).unwrap(),
                    bn.running_stats(&be).unwrap().1,
                )
            })
    };
    assert_eq!(run(1), run(2));
}
