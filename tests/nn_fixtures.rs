//! Activations, binary cross-entropy and three Adam / AdamW steps against PyTorch.
mod conv_support;
use conv_support::{make, Fixtures};
use kiln::cpu::conv::Conv2dParams;
use kiln::cpu::elementwise::activations::{self, Activation, Isa};
use kiln::nn::layers::{ActivationLayer, BatchNorm2d, Conv2d};
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
        // The layer (fastest path, in-place variant) agrees with the explicit path.
        let mut layer = ActivationLayer::new(act);
        let y = layer.forward(&x).unwrap();
        let mut y2 = x.clone();
        activations::forward_inplace(act, &mut y2).unwrap();
        assert_eq!(y, y2);
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
/// three optimiser steps; losses, probabilities and every gradient compared at each step.
fn train(fx: &Fixtures, name: &str, config: AdamConfig) {
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
    let mut c1 = Conv2d::new(3, 4, [4, 4], Conv2dParams::new(2, 1), false).unwrap();
    c1.weight_mut().copy_from_slice(&arg("c1", 192));
    let mut bn = BatchNorm2d::new(4);
    let mut act = ActivationLayer::new(Activation::LeakyRelu(0.2));
    let mut c2 = Conv2d::new(4, 1, [4, 4], Conv2dParams::new(1, 0), true).unwrap();
    c2.weight_mut().copy_from_slice(&arg("c2", 64));
    c2.bias_mut().unwrap().copy_from_slice(&arg("c2_bias", 1));
    let mut sig = ActivationLayer::new(Activation::Sigmoid);
    let x = arg("x", 3 * 3 * 8 * 8);
    let target = floats(&a["target"]);
    let mut opt = Adam::new(config, &[192, 4, 4, 64, 1]).unwrap();
    for step in 0..3 {
        let (h, s1) = c1.forward(&x, [3, 3, 8, 8]).unwrap();
        let h = bn.forward(&h, s1).unwrap();
        let h = act.forward(&h).unwrap();
        let (h, _) = c2.forward(&h, s1).unwrap();
        let prob = sig.forward(&h).unwrap();
        let loss = bce_forward(&prob, &target).unwrap();
        fx.check(&format!("{name}/step{step}/loss"), &[loss], 1e-5);
        fx.check(&format!("{name}/step{step}/prob"), &prob, 1e-5);
        let mut d = vec![0f32; 3];
        bce_backward(&prob, &target, 1.0, &mut d).unwrap();
        let d = sig.backward(&d).unwrap();
        let d = c2.backward(&d).unwrap();
        let d = act.backward(&d).unwrap();
        let d = bn.backward(&d).unwrap();
        c1.backward(&d).unwrap();
        fx.check(&format!("{name}/step{step}/grad0"), c1.weight_grad(), 1e-4);
        fx.check(&format!("{name}/step{step}/grad1"), &bn.gamma_grad, 1e-4);
        fx.check(&format!("{name}/step{step}/grad2"), &bn.beta_grad, 1e-4);
        fx.check(&format!("{name}/step{step}/grad3"), c2.weight_grad(), 1e-4);
        fx.check(
            &format!("{name}/step{step}/grad4"),
            c2.bias_grad().unwrap(),
            1e-4,
        );
        let mut pg = c1.params_and_grads();
        pg.extend(bn.params_and_grads());
        pg.extend(c2.params_and_grads());
        let (mut params, grads): (Vec<&mut [f32]>, Vec<&[f32]>) = pg.into_iter().unzip();
        opt.step(&mut params, &grads).unwrap();
    }
    fx.check(&format!("{name}/final0"), c1.weight(), 1e-4);
    fx.check(&format!("{name}/final1"), &bn.gamma, 1e-4);
    fx.check(&format!("{name}/final2"), &bn.beta, 1e-4);
    fx.check(&format!("{name}/final3"), c2.weight(), 1e-4);
    fx.check(&format!("{name}/final4"), c2.bias().unwrap(), 1e-4);
    fx.check(&format!("{name}/running_mean"), &bn.running_mean, 1e-5);
    fx.check(&format!("{name}/running_var"), &bn.running_var, 1e-5);
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
    let mut opt = Adam::new(AdamConfig::adam(0.1), &[2, 3]).unwrap();
    let mut a = [0f32; 2];
    let mut b = [0f32; 4];
    assert!(opt
        .step(&mut [&mut a, &mut b], &[&[0.0; 2], &[0.0; 3]])
        .is_err());
    assert!(Adam::new(AdamConfig::adam(0.1).betas(1.0, 0.9), &[1]).is_err());
}
