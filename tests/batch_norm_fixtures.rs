//! BatchNorm2d against PyTorch: training forward and backward, running statistics after two
//! training steps (momentum 0.1, unbiased variance), eval forward and backward.
mod conv_support;
use conv_support::{make, usizes, Fixtures};
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
    let fx = Fixtures::load();
    let shape: [usize; 4] = usizes(&fx.manifest["nn"]["bn"]["shape"])
        .try_into()
        .unwrap();
    let n: usize = shape.iter().product();
    let c = shape[1];
    let mut bn = BatchNorm2d::new(c);
    bn.gamma = arg(&fx, "gamma", c);
    bn.beta = arg(&fx, "beta", c);
    let dy = arg(&fx, "dy", n);

    let y1 = bn.forward(&arg(&fx, "x1", n), shape).unwrap();
    fx.check("bn/train_y", &y1, 1e-5);
    let dx = bn.backward(&dy).unwrap();
    fx.check("bn/train_dx", &dx, 1e-5);
    fx.check("bn/train_dgamma", &bn.gamma_grad, 1e-5);
    fx.check("bn/train_dbeta", &bn.beta_grad, 1e-5);

    bn.forward(&arg(&fx, "x2", n), shape).unwrap();
    assert_eq!(bn.num_batches_tracked, 2);
    fx.check("bn/running_mean", &bn.running_mean, 1e-5);
    fx.check("bn/running_var", &bn.running_var, 1e-5);

    bn.training = false;
    let y3 = bn.forward(&arg(&fx, "x3", n), shape).unwrap();
    fx.check("bn/eval_y", &y3, 1e-5);
    let dx3 = bn.backward(&dy).unwrap();
    fx.check("bn/eval_dx", &dx3, 1e-5);
    fx.check("bn/eval_dgamma", &bn.gamma_grad, 1e-5);
    fx.check("bn/eval_dbeta", &bn.beta_grad, 1e-5);
    assert_eq!(bn.num_batches_tracked, 2);
}

#[test]
fn batch_norm_bad_input_is_an_error() {
    let mut bn = BatchNorm2d::new(3);
    assert!(bn.backward(&[0.0; 12]).is_err());
    assert!(bn.forward(&[0.0; 12], [1, 4, 1, 3]).is_err()); // channel count
    assert!(bn.forward(&[0.0; 11], [1, 3, 2, 2]).is_err()); // length
    assert!(bn.forward(&[0.0; 3], [1, 3, 1, 1]).is_err()); // one value per channel
    bn.training = false;
    assert!(bn.forward(&[0.0; 3], [1, 3, 1, 1]).is_ok()); // fine in eval mode
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
                let mut bn = BatchNorm2d::new(7);
                let y = bn.forward(&x, shape).unwrap();
                let dx = bn.backward(&dy).unwrap();
                (y, dx, bn.gamma_grad.clone(), bn.running_var.clone())
            })
    };
    assert_eq!(run(1), run(2));
}
