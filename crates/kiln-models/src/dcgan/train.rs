//! One training iteration of the PyTorch DCGAN example, step for step, on the op interface.
//!
//! With `D(x)` the discriminator's probability that `x` is real, `G(z)` the generator's image
//! of noise `z`, and BCE the mean binary cross-entropy:
//!
//! ```text
//! (1) D step:  errD_real = BCE(D(x), 1)         backward: ∇_θD errD_real        (D_x = mean D(x))
//!              fake = G(z)
//!              errD_fake = BCE(D(fake), 0)      backward: ∇_θD += ∇_θD errD_fake (D_G_z1 = mean)
//!              errD = errD_real + errD_fake     Adam step of θD
//! (2) G step:  errG = BCE(D(fake), 1)           backward through D (its θ untouched) into
//!                                               ∇_fake, then through G: ∇_θG   (D_G_z2 = mean)
//!              Adam step of θG
//! ```
//! Every module is in training mode: batch norm normalises with the batch's statistics and
//! updates its running statistics at each of D's three forward passes and G's one. `fake` is
//! not recomputed for the G step (PyTorch reuses it; `.detach()` only stops the D step's
//! gradient at it). Adam(lr, (β1, 0.999)) for both networks.
use super::model::{Arch, Discriminator, Generator};
use kiln_nn::backend::Backend;
use kiln_nn::layers::{Mode, Optimizer, Param};
use kiln_nn::optim::AdamConfig;
use kiln_tensor::{Error, Result};

/// Hyper-parameters of a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    pub batch: usize,
    pub lr: f64,
    pub beta1: f64,
}

impl Default for TrainConfig {
    /// The PyTorch example's: batch 64, lr 2e-4, β1 0.5.
    fn default() -> Self {
        TrainConfig {
            batch: 64,
            lr: 2e-4,
            beta1: 0.5,
        }
    }
}

impl TrainConfig {
    /// Adam(lr, (β1, 0.999)).
    pub fn adam(&self) -> AdamConfig {
        AdamConfig::adam(self.lr).betas(self.beta1, 0.999)
    }
}

/// What one iteration reports (the PyTorch example prints the first five).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    /// `errD = errD_real + errD_fake`.
    pub loss_d: f32,
    /// `errG`.
    pub loss_g: f32,
    /// Mean `D(x)` on the real batch.
    pub d_x: f32,
    /// Mean `D(G(z))` before the D step.
    pub d_g_z1: f32,
    /// Mean `D(G(z))` after the D step.
    pub d_g_z2: f32,
    pub loss_d_real: f32,
    pub loss_d_fake: f32,
}

/// A generator and a discriminator with their optimisers and the step's buffers, all in the
/// backend's memory.
pub struct Gan<B: Backend> {
    pub g: Generator<B>,
    pub d: Discriminator<B>,
    pub opt_g: Optimizer<B>,
    pub opt_d: Optimizer<B>,
    pub config: TrainConfig,
    /// The batch of real images `[B, nc, 64, 64]` and the noise `[B, nz]`.
    real: B::Buf,
    noise: B::Buf,
    /// Labels: all ones and all zeros `[B]`.
    ones: B::Buf,
    zeros: B::Buf,
    /// `∂L/∂D(·)` `[B]` and `∂errG/∂fake` `[B, nc, 64, 64]`.
    dprob: B::Buf,
    dfake: B::Buf,
}

impl<B: Backend> Gan<B> {
    /// A pair ready to train with fresh optimiser state. `g` and `d` must be of the same
    /// architecture and agree on the image channels.
    pub fn new(be: &B, g: Generator<B>, d: Discriminator<B>, config: TrainConfig) -> Result<Self> {
        if g.spec.arch != d.spec.arch || g.spec.nc != d.spec.nc {
            return Err(Error::invalid(format!(
                "generator ({} with {} channels) and discriminator ({} with {} channels) do not \
                 fit together",
                g.spec.arch.name(),
                g.spec.nc,
                d.spec.arch.name(),
                d.spec.nc
            )));
        }
        if config.batch < 2 {
            return Err(Error::invalid(format!(
                "batch {}: batch norm in training mode needs at least 2 images",
                config.batch
            )));
        }
        let (mut g, mut d) = (g, d);
        let opt_g = Optimizer::new(be, config.adam(), &g.net.param_sizes())?;
        let opt_d = Optimizer::new(be, config.adam(), &d.net.param_sizes())?;
        let b = config.batch;
        let image = g.image_len();
        Ok(Gan {
            real: be.zeros(b * image)?,
            noise: be.zeros(b * g.spec.nz)?,
            ones: be.upload(&vec![1.0; b])?,
            zeros: be.zeros(b)?,
            dprob: be.zeros(b)?,
            dfake: be.zeros(b * image)?,
            g,
            d,
            opt_g,
            opt_d,
            config,
        })
    }

    pub fn arch(&self) -> Arch {
        self.g.spec.arch
    }

    /// Elements of one real batch: `[B, nc, 64, 64]`.
    pub fn batch_len(&self) -> usize {
        self.config.batch * self.g.image_len()
    }

    /// Elements of one noise batch: `[B, nz]`.
    pub fn noise_len(&self) -> usize {
        self.config.batch * self.g.spec.nz
    }

    /// One iteration on the real batch `real` `[B, nc, 64, 64]` with noise `noise` `[B, nz]`
    /// (both from the host: the only data that goes in; the metrics are the only data that
    /// comes out).
    pub fn step(&mut self, be: &B, real: &[f32], noise: &[f32]) -> Result<StepMetrics> {
        let b = self.config.batch;
        if real.len() != self.batch_len() {
            return Err(Error::shape(
                "real batch",
                &[b, self.g.spec.nc, 64, 64],
                &[real.len()],
            ));
        }
        if noise.len() != self.noise_len() {
            return Err(Error::shape("noise", &[b, self.g.spec.nz], &[noise.len()]));
        }
        be.upload_into(real, &mut self.real, 0)?;
        be.upload_into(noise, &mut self.noise, 0)?;
        let Gan {
            g,
            d,
            opt_g,
            opt_d,
            real,
            noise,
            ones,
            zeros,
            dprob,
            dfake,
            ..
        } = self;

        // (1) D step. errD_real = BCE(D(x), 1).
        let p = d.forward(be, real, b, Mode::Train)?;
        let loss_d_real = be.bce(p, ones, b)?;
        let d_x = be.mean(p, b)?;
        be.bce_backward(p, ones, 1.0, dprob, b)?;
        d.net.backward(be, real, dprob, None, true, false)?;

        // errD_fake = BCE(D(G(z)), 0), gradients added to the real batch's.
        let fake = g.forward(be, noise, b, Mode::Train)?;
        let p = d.forward(be, fake, b, Mode::Train)?;
        let loss_d_fake = be.bce(p, zeros, b)?;
        let d_g_z1 = be.mean(p, b)?;
        be.bce_backward(p, zeros, 1.0, dprob, b)?;
        d.net.backward(be, fake, dprob, None, true, true)?;
        opt_d.step(be, &mut d.net.params_mut())?;

        // (2) G step. errG = BCE(D(G(z)), 1) through the updated D.
        let fake = g.net.output();
        let p = d.forward(be, fake, b, Mode::Train)?;
        let loss_g = be.bce(p, ones, b)?;
        let d_g_z2 = be.mean(p, b)?;
        be.bce_backward(p, ones, 1.0, dprob, b)?;
        d.net.backward(be, fake, dprob, Some(dfake), false, false)?;
        g.net.backward(be, noise, dfake, None, true, false)?;
        opt_g.step(be, &mut g.net.params_mut())?;

        Ok(StepMetrics {
            loss_d: loss_d_real + loss_d_fake,
            loss_g,
            d_x,
            d_g_z1,
            d_g_z2,
            loss_d_real,
            loss_d_fake,
        })
    }

    /// Every parameter of G then D, in `state_dict` order, with their names.
    pub fn named_params(&mut self) -> Vec<(String, &mut Param<B>)> {
        let mut v = Vec::new();
        for (which, net) in [("G", &mut self.g.net), ("D", &mut self.d.net)] {
            let names = param_names(net);
            v.extend(
                names
                    .into_iter()
                    .map(|n| format!("{which}.{n}"))
                    .zip(net.params_mut()),
            );
        }
        v
    }
}

/// The `state_dict` names of a chain's parameters, in [`kiln_nn::layers::Sequential::params_mut`]
/// order.
pub fn param_names<B: Backend>(net: &kiln_nn::layers::Sequential<B>) -> Vec<String> {
    use kiln_nn::layers::Layer;
    let mut v = Vec::new();
    for (i, layer) in net.layers.iter().enumerate() {
        let p = format!("{}{i}", net.prefix);
        match layer {
            Layer::Conv(c) => {
                v.push(format!("{p}.weight"));
                if c.bias.is_some() {
                    v.push(format!("{p}.bias"));
                }
            }
            Layer::Linear(l) => {
                v.push(format!("{p}.weight"));
                if l.bias.is_some() {
                    v.push(format!("{p}.bias"));
                }
            }
            Layer::BatchNorm(_) => {
                v.push(format!("{p}.weight"));
                v.push(format!("{p}.bias"));
            }
            _ => {}
        }
    }
    v
}
