//! DCGAN against PyTorch (fixtures from `tests/fixtures/make_dcgan_fixtures.py`): eval-mode
//! generator and discriminator outputs from checkpoints PyTorch wrote, two full training
//! iterations (losses, D(x), D(G(z)) before and after the D step, every gradient, every
//! post-step parameter and batch-norm running statistic), checkpoints that round-trip with
//! PyTorch's names, and bad checkpoints.
use kiln_io::SafeTensors;
use kiln_models::dcgan::model::state_dict;
use kiln_models::dcgan::train::{param_names, Gan, TrainConfig};
use kiln_models::dcgan::{Arch, Discriminator, Generator};
use kiln_nn::backend::{download_all, Backend, CountingBackend, CpuBackend, Transfers};
use kiln_nn::layers::Mode;
use kiln_tensor::DType;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dcgan")
        .join(name)
}

struct Ref(SafeTensors);

impl Ref {
    fn load(name: &str) -> Self {
        Ref(SafeTensors::read(fixture(name)).unwrap())
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        self.0
            .tensor(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .to_f32_vec()
            .unwrap()
    }
    fn scalar(&self, name: &str) -> f32 {
        self.f32(name)[0]
    }
    fn i64(&self, name: &str) -> i64 {
        self.0.tensor(name).unwrap().to_vec::<i64>().unwrap()[0]
    }
}

/// Largest absolute difference, relative to the reference's largest magnitude (at least 1e-3,
/// so that tensors of tiny values are compared absolutely at that scale).
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: off by {e:.2e} (> {tol:.0e})");
}

#[test]
fn eval_outputs_match_pytorch_for_both_architectures() {
    let be = CpuBackend::default();
    for arch in ["dcgan", "seed"] {
        let mut g = Generator::load(&be, &fixture(&format!("{arch}_G.safetensors")), None).unwrap();
        let mut d =
            Discriminator::load(&be, &fixture(&format!("{arch}_D.safetensors")), None).unwrap();
        assert_eq!(g.spec.arch.name(), arch);
        let r = Ref::load(&format!("{arch}_eval.safetensors"));
        let noise = r.f32("noise");
        let n = noise.len() / g.spec.nz;
        let z = be.upload(&noise).unwrap();
        let img = g.forward(&be, &z, n, Mode::Eval).unwrap();
        let got = download_all(&be, img).unwrap();
        let want = r.f32("images");
        check(&format!("{arch} G eval"), &got[..want.len()], &want, 1e-4);
        let x = be.upload(&r.f32("d_input")).unwrap();
        let p = d.forward(&be, &x, n, Mode::Eval).unwrap();
        let got = download_all(&be, p).unwrap();
        let want = r.f32("d_output");
        check(&format!("{arch} D eval"), &got[..n], &want, 1e-4);
    }
}

/// Two iterations from PyTorch's initial weights, real batch and noise. f32 rounding differs
/// between the two engines' convolutions (summation order), so values agree to ~1e-6
/// relative; Adam's first steps move weights by about lr·sign(g), so the gradients are
/// compared too (they catch scale errors the weights would hide).
fn train_steps_match(arch: &str, threads: usize) {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(|| {
            let be = CpuBackend::default();
            let g = Generator::load(&be, &fixture(&format!("{arch}_G.safetensors")), None).unwrap();
            let d =
                Discriminator::load(&be, &fixture(&format!("{arch}_D.safetensors")), None).unwrap();
            let r = Ref::load(&format!("{arch}_train_step.safetensors"));
            let real = r.f32("real");
            let noise = r.f32("noise");
            let cfg = TrainConfig {
                batch: 4,
                ..Default::default()
            };
            let mut gan = Gan::new(&be, g, d, cfg).unwrap();
            let nl = gan.noise_len();
            for i in 1..=2 {
                let m = gan.step(&be, &real, &noise[(i - 1) * nl..i * nl]).unwrap();
                let s = |k: &str| r.scalar(&format!("step{i}.{k}"));
                for (name, got, want) in [
                    ("errD_real", m.loss_d_real, s("errD_real")),
                    ("errD_fake", m.loss_d_fake, s("errD_fake")),
                    ("errD", m.loss_d, s("errD")),
                    ("errG", m.loss_g, s("errG")),
                    ("D_x", m.d_x, s("D_x")),
                    ("D_G_z1", m.d_g_z1, s("D_G_z1")),
                    ("D_G_z2", m.d_g_z2, s("D_G_z2")),
                ] {
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{arch} step {i} {name}: {got} vs {want}"
                    );
                }
                let fake = download_all(&be, gan.g.net.output()).unwrap();
                let want = r.f32(&format!("step{i}.fake"));
                check(
                    &format!("{arch} step {i} fake"),
                    &fake[..want.len()],
                    &want,
                    1e-5,
                );
                // Gradients: D's (real + fake) as of its step; G's as of its step.
                for (which, net) in [("D", &gan.d.net), ("G", &gan.g.net)] {
                    let names = param_names(net);
                    let state = state_dict(&be, net).unwrap();
                    let _ = state;
                    for (name, layer_grad) in names.iter().zip(grads_of(&be, net)) {
                        let want = r.f32(&format!("step{i}.grad{which}.{name}"));
                        check(
                            &format!("{arch} step {i} grad{which}.{name}"),
                            &layer_grad,
                            &want,
                            2e-4,
                        );
                    }
                    // Every state-dict entry after the iteration.
                    for (name, t) in state_dict(&be, net).unwrap() {
                        let key = format!("step{i}.{which}.{name}");
                        if t.dtype() == DType::I64 {
                            assert_eq!(t.to_vec::<i64>().unwrap()[0], r.i64(&key), "{arch} {key}");
                        } else {
                            check(
                                &format!("{arch} {key}"),
                                &t.to_f32_vec().unwrap(),
                                &r.f32(&key),
                                1e-4,
                            );
                        }
                    }
                }
            }
        });
}

/// Gradients of a chain's parameters, in `param_names` order.
fn grads_of(be: &CpuBackend, net: &kiln_nn::layers::Sequential<CpuBackend>) -> Vec<Vec<f32>> {
    use kiln_nn::layers::Layer;
    let mut v = Vec::new();
    for layer in &net.layers {
        match layer {
            Layer::Conv(c) => {
                v.push(c.weight.grads(be).unwrap());
                if let Some(b) = &c.bias {
                    v.push(b.grads(be).unwrap());
                }
            }
            Layer::Linear(l) => {
                v.push(l.weight.grads(be).unwrap());
                if let Some(b) = &l.bias {
                    v.push(b.grads(be).unwrap());
                }
            }
            Layer::BatchNorm(b) => {
                v.push(b.weight.grads(be).unwrap());
                v.push(b.bias.grads(be).unwrap());
            }
            _ => {}
        }
    }
    v
}

#[test]
fn training_iterations_match_pytorch_dcgan() {
    train_steps_match("dcgan", 1);
    train_steps_match("dcgan", 2);
}

#[test]
fn training_iterations_match_pytorch_seed() {
    train_steps_match("seed", 2);
}

/// A training step on the counting backend moves only the batch and the noise in and the
/// scalars out.
#[test]
fn training_step_moves_only_the_batch_in_and_the_scalars_out() {
    let be = CountingBackend::new();
    let g = Generator::load(&be, &fixture("dcgan_G.safetensors"), None).unwrap();
    let d = Discriminator::load(&be, &fixture("dcgan_D.safetensors"), None).unwrap();
    let cfg = TrainConfig {
        batch: 4,
        ..Default::default()
    };
    let mut gan = Gan::new(&be, g, d, cfg).unwrap();
    let r = Ref::load("dcgan_train_step.safetensors");
    let (real, noise) = (r.f32("real"), r.f32("noise"));
    for i in 0..2 {
        be.reset();
        let nl = gan.noise_len();
        gan.step(&be, &real, &noise[i * nl..(i + 1) * nl]).unwrap();
        // In: the real batch and the noise. Out: errD_real, D_x, errD_fake, D_G_z1, errG,
        // D_G_z2.
        assert_eq!(
            be.transfers(),
            Transfers {
                to_device: 2,
                to_device_elements: real.len() + nl,
                to_host: 6,
                to_host_elements: 6,
            }
        );
    }
    // And the CPU backend's step gives the same numbers bit for bit.
    let cpu = CpuBackend::default();
    let g = Generator::load(&cpu, &fixture("dcgan_G.safetensors"), None).unwrap();
    let d = Discriminator::load(&cpu, &fixture("dcgan_D.safetensors"), None).unwrap();
    let mut gan2 = Gan::new(&cpu, g, d, cfg).unwrap();
    let nl = gan2.noise_len();
    let m1 = gan2.step(&cpu, &real, &noise[..nl]).unwrap();
    let be = CountingBackend::new();
    let g = Generator::load(&be, &fixture("dcgan_G.safetensors"), None).unwrap();
    let d = Discriminator::load(&be, &fixture("dcgan_D.safetensors"), None).unwrap();
    let mut gan3 = Gan::new(&be, g, d, cfg).unwrap();
    let m2 = gan3.step(&be, &real, &noise[..nl]).unwrap();
    assert_eq!(m1, m2);
}

/// Our checkpoints carry exactly PyTorch's names, dtypes and shapes (what
/// `load_state_dict(strict=True)` checks), and load back to the same values.
#[test]
fn checkpoints_round_trip_with_pytorch_names() {
    let be = CpuBackend::default();
    let dir = std::env::temp_dir().join(format!("kiln-dcgan-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for arch in ["dcgan", "seed"] {
        for which in ["G", "D"] {
            let src = fixture(&format!("{arch}_{which}.safetensors"));
            let out = dir.join(format!("{arch}_{which}.safetensors"));
            if which == "G" {
                Generator::load(&be, &src, Arch::parse(arch))
                    .unwrap()
                    .save(&be, &out)
                    .unwrap();
            } else {
                Discriminator::load(&be, &src, Arch::parse(arch))
                    .unwrap()
                    .save(&be, &out)
                    .unwrap();
            }
            let (a, b) = (
                SafeTensors::read(&src).unwrap(),
                SafeTensors::read(&out).unwrap(),
            );
            let mut na: Vec<&str> = a.names().collect();
            let mut nb: Vec<&str> = b.names().collect();
            na.sort();
            nb.sort();
            assert_eq!(na, nb, "{arch} {which}: names");
            for n in na {
                let (ta, tb) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
                assert_eq!(ta.dtype(), tb.dtype(), "{arch} {which} {n}: dtype");
                assert_eq!(ta.dims(), tb.dims(), "{arch} {which} {n}: shape");
                assert_eq!(ta.as_bytes().unwrap(), tb.as_bytes().unwrap(), "{n}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
