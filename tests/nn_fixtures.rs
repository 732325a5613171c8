//! Activations, binary cross-entropy and three Adam / AdamW steps against PyTorch.
mod conv_support;
use conv_support::{make, Fixtures};
use kiln::cpu::conv::Conv2dParams;
use kiln::cpu::elementwise::activations::{self, Activation, Isa};
use kiln::nn::backend::{Backend, CpuBackend, CpuBuf, Pointwise};
use kiln::nn::layers::{BatchNorm2d, Conv2d, Optimizer, Param};
use kiln::nn::loss::{bce_backward, bce_forward};
use kiln::nn::optim::{Adam, AdamConfig};

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

const ACTS: [(&str, Activation); 4] = [
    ("relu", Activation::Relu),
    ("leaky", Activation::LeakyRelu(0.2)),
    ("tanh", Activation::Tanh),
    ("sigmoid", Activation::Sigmoid),
];

#[test]
fn activations_match_pytorch_on_every_path() {
    let fx = Fixtures::load();
    let mut x = make(4001, 400, 12.0, 0.0);
    x.extend(floats(&fx.manifest["nn"]["act_extra"]));
    let dy = make(x.len(), 401, 1.0, 0.0);
    for (name, act) in ACTS {
        for isa in Isa::available() {
            let mut y = vec![0f32; x.len()];
            activations::forward_with(isa, act, &x, &mut y).unwrap();
            fx.check(&format!("act/{name}_y"), &y, 1e-6);
            let mut dx = vec![0f32; x.len()];
            activations::backward(act, &y, &dy, &mut dx).unwrap();
            // 1 − y² and y·(1 − y) amplify a one-ulp difference in y near saturation.
            fx.check(&format!("act/{name}_dx"), &dx, 1e-5);
        }
        // The backend's op (fastest path, chunked, in place or not) agrees with the explicit
        // path.
        let be = CpuBackend::default();
        let xb = be.upload(&x).unwrap();
        let mut yb = be.zeros(x.len()).unwrap();
        be.pointwise(act, &xb, &mut yb, x.len()).unwrap();
        let mut y2 = x.clone();
        activations::forward_inplace(act, &mut y2).unwrap();
        assert_eq!(yb.as_f32().unwrap(), &y2[..]);
        let mut xb = xb;
        be.pointwise_inplace(act, &mut xb, x.len()).unwrap();
        assert_eq!(xb.as_f32().unwrap(), &y2[..]);
    }
}

/// The SIMD paths agree with the scalar (std) path to a few ulp on a dense sweep.
#[test]
fn activation_simd_paths_match_scalar() {
    let x: Vec<f32> = (0..200_001)
        .map(|i| (i as f32 - 100_000.0) * 1e-3)
        .chain([
            1e-30,
            -1e-30,
            1e-6,
            f32::MIN_POSITIVE,
            100.0,
            -100.0,
            1e30,
            -1e30,
        ])
        .collect();
    for act in [Activation::Tanh, Activation::Sigmoid] {
        let mut want = vec![0f32; x.len()];
        activations::forward_with(Isa::Scalar, act, &x, &mut want).unwrap();
        for isa in Isa::available() {
            let mut got = vec![0f32; x.len()];
            activations::forward_with(isa, act, &x, &mut got).unwrap();
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 4.0 * f32::EPSILON * b.abs() + 1e-37,
                    "{act:?} {isa:?} x={}: {a} vs {b}",
                    x[i]
                );
            }
        }
    }
}

#[test]
fn activation_bad_input_is_an_error() {
    let mut y = [0f32; 3];
    assert!(activations::forward(Activation::Relu, &[0.0; 4], &mut y).is_err());
    assert!(activations::forward(Activation::LeakyRelu(-0.1), &[0.0; 3], &mut y).is_err());
    assert!(activations::backward(Activation::Tanh, &[0.0; 3], &[0.0; 2], &mut y).is_err());
}

#[test]
fn bce_matches_pytorch() {
    let fx = Fixtures::load();
    let mut p = make(61, 500, 1.0, 0.0)
        .into_iter()
        .map(|v| v * 0.5 + 0.5)
        .collect::<Vec<_>>();
    p.extend(floats(&fx.manifest["nn"]["bce_p_extra"]));
    let mut t: Vec<f32> = make(61, 501, 1.0, 0.0)
        .into_iter()
        .map(|v| if v > 0.0 { 1.0 } else { 0.0 })
        .collect();
    t.extend(floats(&fx.manifest["nn"]["bce_t_extra"]));
    let loss = bce_forward(&p, &t).unwrap();
    fx.check("bce/loss", &[loss], 1e-6);
    let mut dp = vec![0f32; p.len()];
    bce_backward(&p, &t, 1.0, &mut dp).unwrap();
    fx.check("bce/dp", &dp, 1e-6);
    assert!(bce_forward(&[0.5, 1.5], &[0.0, 1.0]).is_err());
    assert!(bce_forward(&[0.5, f32::NAN], &[0.0, 1.0]).is_err());
    assert!(bce_forward(&[0.5], &[0.0, 1.0]).is_err());
}

/// conv(3→4, k4 s2 p1) → BN(4) → LeakyReLU(0.2) → conv(4→1, k4 s1 p0, bias) → sigmoid → BCE,
/// three optimiser steps; losses, probabilities and every gradient compared at each step. The
/// graph runs on the op interface (the CPU backend), as the models do.
fn train(fx: &Fixtures, name: &str, config: AdamConfig) {
    let be = CpuBackend::default();
    let a = &fx.manifest["nn"]["adam"];
    let arg = |k: &str, n: usize| {
        let v = a[k].as_array().unwrap();
        make(
            n,
            v[0].as_u64().unwrap(),
            v[1].as_f64().unwrap() as f32,
            0.0,
        )
    };
    let f32s = |b: &CpuBuf| b.as_f32().unwrap().to_vec();
    let mut c1 = Conv2d::new(&be, 3, 4, [4, 4], Conv2dParams::new(2, 1), false, false).unwrap();
    c1.weight.set(&be, &arg("c1", 192)).unwrap();
    let mut bn = BatchNorm2d::new(&be, 4).unwrap();
    let mut c2 = Conv2d::new(&be, 4, 1, [4, 4], Conv2dParams::new(1, 0), true, false).unwrap();
    c2.weight.set(&be, &arg("c2", 64)).unwrap();
    c2.bias
        .as_mut()
        .unwrap()
        .set(&be, &arg("c2_bias", 1))
        .unwrap();
    let leaky = Pointwise::LeakyRelu(0.2);
    let x = be.upload(&arg("x", 3 * 3 * 8 * 8)).unwrap();
    let target = be.upload(&floats(&a["target"])).unwrap();
    let mut opt = Optimizer::new(&be, config, &[192, 4, 4, 64, 1]).unwrap();
    let g1 = c1.geometry([3, 3, 8, 8]).unwrap();
    let s1 = g1.output_shape();
    let g2 = c2.geometry(s1).unwrap();
    let n1 = g1.output_len();
    let (mut h1, mut h2, mut h3) = (
        be.zeros(n1).unwrap(),
        be.zeros(n1).unwrap(),
        be.zeros(n1).unwrap(),
    );
    let (mut logit, mut prob) = (be.zeros(3).unwrap(), be.zeros(3).unwrap());
    let (mut d3, mut d2, mut d1) = (
        be.zeros(3).unwrap(),
        be.zeros(n1).unwrap(),
        be.zeros(n1).unwrap(),
    );
    for step in 0..3 {
        c1.forward(&be, &g1, &x, &mut h1).unwrap();
        bn.forward_train(&be, &h1, s1, &mut h2).unwrap();
        be.pointwise(leaky, &h2, &mut h3, n1).unwrap();
        c2.forward(&be, &g2, &h3, &mut logit).unwrap();
        be.pointwise(Pointwise::Sigmoid, &logit, &mut prob, 3)
            .unwrap();
        let loss = be.bce(&prob, &target, 3).unwrap();
        fx.check(&format!("{name}/step{step}/loss"), &[loss], 1e-5);
        fx.check(&format!("{name}/step{step}/prob"), &f32s(&prob), 1e-5);
        be.bce_backward(&prob, &target, 1.0, &mut d3, 3).unwrap();
        let mut dlogit = be.zeros(3).unwrap();
        be.pointwise_backward(Pointwise::Sigmoid, &prob, &d3, &mut dlogit, 3)
            .unwrap();
        c2.backward(&be, &g2, &h3, &dlogit, Some(&mut d2), false)
            .unwrap();
        be.pointwise_backward(leaky, &h3, &d2, &mut d1, n1).unwrap();
        bn.backward(&be, &h1, s1, &d1, Some(&mut d2), false)
            .unwrap();
        c1.backward(&be, &g1, &x, &d2, None, false).unwrap();
        fx.check(
            &format!("{name}/step{step}/grad0"),
            &f32s(&c1.weight.grad),
            1e-4,
        );
        fx.check(
            &format!("{name}/step{step}/grad1"),
            &f32s(&bn.weight.grad),
            1e-4,
        );
        fx.check(
            &format!("{name}/step{step}/grad2"),
            &f32s(&bn.bias.grad),
            1e-4,
        );
        fx.check(
            &format!("{name}/step{step}/grad3"),
            &f32s(&c2.weight.grad),
            1e-4,
        );
        fx.check(
            &format!("{name}/step{step}/grad4"),
            &f32s(&c2.bias.as_ref().unwrap().grad),
            1e-4,
        );
        let mut params: Vec<&mut Param<CpuBackend>> = c1.params_mut();
        params.extend(bn.params_mut());
        params.extend(c2.params_mut());
        opt.step(&be, &mut params).unwrap();
    }
    fx.check(&format!("{name}/final0"), &f32s(&c1.weight.value), 1e-4);
    fx.check(&format!("{name}/final1"), &f32s(&bn.weight.value), 1e-4);
    fx.check(&format!("{name}/final2"), &f32s(&bn.bias.value), 1e-4);
    fx.check(&format!("{name}/final3"), &f32s(&c2.weight.value), 1e-4);
    fx.check(
        &format!("{name}/final4"),
        &f32s(&c2.bias.as_ref().unwrap().value),
        1e-4,
    );
    let (rm, rv) = bn.running_stats(&be).unwrap();
    fx.check(&format!("{name}/running_mean"), &rm, 1e-5);
    fx.check(&format!("{name}/running_var"), &rv, 1e-5);
    assert_eq!(bn.num_batches_tracked, 3);
}

#[test]
fn three_adam_steps_match_pytorch() {
    let fx = Fixtures::load();
    let a = &fx.manifest["nn"]["adam"];
    let lr = a["lr"].as_f64().unwrap();
    let betas: Vec<f64> = a["betas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let cfg = AdamConfig::adam(lr).betas(betas[0], betas[1]);
    train(&fx, "adam", cfg);
    let wd = a["adamw_weight_decay"].as_f64().unwrap();
    train(
        &fx,
        "adamw",
        AdamConfig::adamw(lr, wd).betas(betas[0], betas[1]),
    );
}

#[test]
fn adam_bad_input_is_an_error() {
    let be = CpuBackend::default();
    assert!(Optimizer::new(&be, AdamConfig::adam(0.1).betas(1.0, 0.9), &[1]).is_err());
    let mut opt = Optimizer::new(&be, AdamConfig::adam(0.1), &[2, 3]).unwrap();
    let mut a = Param::zeros(&be, &[2]).unwrap();
    let mut b = Param::zeros(&be, &[4]).unwrap();
    assert!(opt.step(&be, &mut [&mut a]).is_err());
    assert!(opt.step(&be, &mut [&mut a, &mut b]).is_err());
    let mut opt = Adam::new(AdamConfig::adam(0.1), &[2, 3]).unwrap();
    let mut a = [0f32; 2];
    let mut b = [0f32; 4];
    assert!(opt
        .step(&mut [&mut a, &mut b], &[&[0.0; 2], &[0.0; 3]])
        .is_err());
    assert!(Adam::new(AdamConfig::adam(0.1).betas(1.0, 0.9), &[1]).is_err());
}
