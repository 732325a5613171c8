//! The two generator/discriminator pairs, as layer chains on the op interface, and their
//! PyTorch `state_dict` checkpoints.
//!
//! `dcgan` (the PyTorch DCGAN example; `nz = 100`, `ngf = ndf = 64`, `nc = 3` by default):
//!
//! ```text
//! G: z [N, nz, 1, 1]
//!    ConvT(nz → 8ngf, k4 s1 p0) BN ReLU      [N, 8ngf, 4, 4]      main.0, main.1, main.2
//!    ConvT(→ 4ngf, k4 s2 p1) BN ReLU         [N, 4ngf, 8, 8]      main.3 … main.5
//!    ConvT(→ 2ngf, k4 s2 p1) BN ReLU         [N, 2ngf, 16, 16]    main.6 … main.8
//!    ConvT(→ ngf, k4 s2 p1) BN ReLU          [N, ngf, 32, 32]     main.9 … main.11
//!    ConvT(→ nc, k4 s2 p1) Tanh              [N, nc, 64, 64]      main.12, main.13
//! D: x [N, nc, 64, 64]
//!    Conv(nc → ndf, k4 s2 p1) LeakyReLU(0.2) [N, ndf, 32, 32]     main.0, main.1
//!    Conv(→ 2ndf) BN LeakyReLU               [N, 2ndf, 16, 16]    main.2 … main.4
//!    Conv(→ 4ndf) BN LeakyReLU               [N, 4ndf, 8, 8]      main.5 … main.7
//!    Conv(→ 8ndf) BN LeakyReLU               [N, 8ndf, 4, 4]      main.8 … main.10
//!    Conv(→ 1, k4 s1 p0) Sigmoid             [N, 1, 1, 1] → [N]   main.11, main.12
//! ```
//! no convolution biases. `seed` (a Keras-style pair; `c0, c1, c2 = 256, 128, 64`,
//! `d0, d1 = 64, 128` by default), with biases:
//! ```text
//! G: z [N, nz]  Linear(nz → 8·8·c0) ReLU Unflatten(c0, 8, 8)          0, 1, 2
//!    ConvT(c0 → c1, k5 s1 p2) ReLU           [N, c1, 8, 8]         3, 4
//!    ConvT(c1 → c1, k5 s2 p2 op1) ReLU       [N, c1, 16, 16]       5, 6
//!    ConvT(c1 → c2, k5 s2 p2 op1) ReLU       [N, c2, 32, 32]       7, 8
//!    ConvT(c2 → nc, k5 s2 p2 op1) Sigmoid    [N, nc, 64, 64]       9, 10
//! D: Conv(nc → d0, k5 s2 p2) ReLU            [N, d0, 32, 32]       0, 1
//!    Conv(d0 → d1, k5 s2 p2) ReLU            [N, d1, 16, 16]       2, 3
//!    Flatten, Linear(d1·16·16 → 1) Sigmoid   [N, 1] → [N]          4, 5, 6
//! ```
//! Checkpoints are safetensors files with PyTorch's names (`main.1.running_mean`,
//! `main.1.num_batches_tracked` as an i64 scalar, …; the `seed` chains are the modules
//! themselves, so their names have no prefix). Widths are read from the tensor shapes, so a
//! checkpoint of any width loads without flags; every tensor's shape is checked.
use crate::gpt2::Rng;
use kiln_io::{write_safetensors, SafeTensors};
use kiln_nn::backend::{download_all, Backend, Conv2dParams, Pointwise};
use kiln_nn::layers::{BatchNorm2d, Conv2d, Layer, Linear, Mode, Param, Sequential};
use kiln_tensor::{DType, Error, Result, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Image side of both architectures.
pub const IMAGE_SIZE: usize = 64;

/// Which pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Dcgan,
    Seed,
}

impl Arch {
    /// `"dcgan"` or `"seed"`.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "dcgan" => Some(Arch::Dcgan),
            "seed" => Some(Arch::Seed),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Dcgan => "dcgan",
            Arch::Seed => "seed",
        }
    }
    /// The `state_dict` name prefix of the layer chain.
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Dcgan => "main.",
            Arch::Seed => "",
        }
    }
    /// The generator's output range: Tanh gives [-1, 1], Sigmoid [0, 1].
    pub fn output_range(self) -> (f32, f32) {
        match self {
            Arch::Dcgan => (-1.0, 1.0),
            Arch::Seed => (0.0, 1.0),
        }
    }
    /// The noise shape of one sample as PyTorch feeds it: `[nz, 1, 1]` or `[nz]`.
    pub fn noise_dims(self, nz: usize) -> Vec<usize> {
        match self {
            Arch::Dcgan => vec![nz, 1, 1],
            Arch::Seed => vec![nz],
        }
    }
}

/// The widths of a generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratorSpec {
    pub arch: Arch,
    /// Noise length.
    pub nz: usize,
    /// Image channels.
    pub nc: usize,
    /// `dcgan`: `[8ngf, 4ngf, 2ngf, ngf]`; `seed`: `[c0, c1, c2, 0]`.
    pub widths: [usize; 4],
}

/// The widths of a discriminator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscriminatorSpec {
    pub arch: Arch,
    pub nc: usize,
    /// `dcgan`: `[ndf, 2ndf, 4ndf, 8ndf]`; `seed`: `[d0, d1, 0, 0]`.
    pub widths: [usize; 4],
}

impl GeneratorSpec {
    /// The default widths: `dcgan` nz 100, ngf 64, nc 3; `seed` nz 100, 256/128/64, nc 3.
    pub fn default_for(arch: Arch) -> Self {
        match arch {
            Arch::Dcgan => Self::dcgan(100, 64, 3),
            Arch::Seed => Self::seed(100, [256, 128, 64], 3),
        }
    }
    pub fn dcgan(nz: usize, ngf: usize, nc: usize) -> Self {
        GeneratorSpec {
            arch: Arch::Dcgan,
            nz,
            nc,
            widths: [8 * ngf, 4 * ngf, 2 * ngf, ngf],
        }
    }
    pub fn seed(nz: usize, c: [usize; 3], nc: usize) -> Self {
        GeneratorSpec {
            arch: Arch::Seed,
            nz,
            nc,
            widths: [c[0], c[1], c[2], 0],
        }
    }
}

impl GeneratorSpec {
    /// Parameters and per-image activation floats (each layer's output), from the widths alone:
    /// the memory estimate of [`crate::dcgan::memory_need`].
    pub fn sizes(&self) -> (u64, u64) {
        let [w0, w1, w2, w3] = self.widths.map(|w| w as u64);
        let (nz, nc) = (self.nz as u64, self.nc as u64);
        match self.arch {
            // ConvT k4: nz→w0 (4×4), w0→w1 (8×8), w1→w2 (16×16), w2→w3 (32×32), w3→nc (64×64).
            Arch::Dcgan => (
                16 * (nz * w0 + w0 * w1 + w1 * w2 + w2 * w3 + w3 * nc) + 2 * (w0 + w1 + w2 + w3),
                w0 * 16 + w1 * 64 + w2 * 256 + w3 * 1024 + nc * 4096,
            ),
            // Linear nz→64·w0, ConvT k5: w0→w1 (8×8), w1→w1 (16×16), w1→w2 (32×32), w2→nc (64×64).
            Arch::Seed => (
                nz * 64 * w0 + 25 * (w0 * w1 + w1 * w1 + w1 * w2 + w2 * nc),
                64 * w0 + w1 * 64 + w1 * 256 + w2 * 1024 + nc * 4096,
            ),
        }
    }
}

impl DiscriminatorSpec {
    /// Parameters and per-image activation floats, as [`GeneratorSpec::sizes`].
    pub fn sizes(&self) -> (u64, u64) {
        let [w0, w1, w2, w3] = self.widths.map(|w| w as u64);
        let nc = self.nc as u64;
        match self.arch {
            // Conv k4: nc→w0 (32×32), w0→w1 (16×16), w1→w2 (8×8), w2→w3 (4×4), w3→1.
            Arch::Dcgan => (
                16 * (nc * w0 + w0 * w1 + w1 * w2 + w2 * w3 + w3) + 2 * (w1 + w2 + w3),
                w0 * 1024 + w1 * 256 + w2 * 64 + w3 * 16 + 1,
            ),
            // Conv k5: nc→w0 (32×32), w0→w1 (16×16), Linear 256·w1→1.
            Arch::Seed => (
                25 * (nc * w0 + w0 * w1) + 256 * w1,
                w0 * 1024 + w1 * 256 + 1,
            ),
        }
    }
}

impl DiscriminatorSpec {
    /// The default widths: `dcgan` ndf 64, nc 3; `seed` 64/128, nc 3.
    pub fn default_for(arch: Arch) -> Self {
        match arch {
            Arch::Dcgan => Self::dcgan(64, 3),
            Arch::Seed => Self::seed([64, 128], 3),
        }
    }
    pub fn dcgan(ndf: usize, nc: usize) -> Self {
        DiscriminatorSpec {
            arch: Arch::Dcgan,
            nc,
            widths: [ndf, 2 * ndf, 4 * ndf, 8 * ndf],
        }
    }
    pub fn seed(d: [usize; 2], nc: usize) -> Self {
        DiscriminatorSpec {
            arch: Arch::Seed,
            nc,
            widths: [d[0], d[1], 0, 0],
        }
    }
}

fn conv<B: Backend>(
    be: &B,
    cin: usize,
    cout: usize,
    k: usize,
    params: Conv2dParams,
    bias: bool,
    transposed: bool,
) -> Result<Layer<B>> {
    Ok(Layer::Conv(Conv2d::new(
        be,
        cin,
        cout,
        [k, k],
        params,
        bias,
        transposed,
    )?))
}

fn bn<B: Backend>(be: &B, c: usize) -> Result<Layer<B>> {
    Ok(Layer::BatchNorm(BatchNorm2d::new(be, c)?))
}

/// Stride 2, padding 2, output padding 1: the `seed` generator's upsampling step.
fn up5() -> Conv2dParams {
    Conv2dParams {
        output_padding: [1, 1],
        ..Conv2dParams::new(2, 2)
    }
}

/// The generator's layers (zero parameters).
fn generator_layers<B: Backend>(be: &B, s: &GeneratorSpec) -> Result<Vec<Layer<B>>> {
    let [w0, w1, w2, w3] = s.widths;
    let relu = || Layer::Act(Pointwise::Relu);
    Ok(match s.arch {
        Arch::Dcgan => vec![
            conv(be, s.nz, w0, 4, Conv2dParams::new(1, 0), false, true)?,
            bn(be, w0)?,
            relu(),
            conv(be, w0, w1, 4, Conv2dParams::new(2, 1), false, true)?,
            bn(be, w1)?,
            relu(),
            conv(be, w1, w2, 4, Conv2dParams::new(2, 1), false, true)?,
            bn(be, w2)?,
            relu(),
            conv(be, w2, w3, 4, Conv2dParams::new(2, 1), false, true)?,
            bn(be, w3)?,
            relu(),
            conv(be, w3, s.nc, 4, Conv2dParams::new(2, 1), false, true)?,
            Layer::Act(Pointwise::Tanh),
        ],
        Arch::Seed => vec![
            Layer::Linear(Linear::new(be, s.nz, 8 * 8 * w0, true)?),
            relu(),
            Layer::Unflatten([w0, 8, 8]),
            conv(be, w0, w1, 5, Conv2dParams::new(1, 2), true, true)?,
            relu(),
            conv(be, w1, w1, 5, up5(), true, true)?,
            relu(),
            conv(be, w1, w2, 5, up5(), true, true)?,
            relu(),
            conv(be, w2, s.nc, 5, up5(), true, true)?,
            Layer::Act(Pointwise::Sigmoid),
        ],
    })
}

/// The discriminator's layers (zero parameters).
fn discriminator_layers<B: Backend>(be: &B, s: &DiscriminatorSpec) -> Result<Vec<Layer<B>>> {
    let [w0, w1, w2, w3] = s.widths;
    let leaky = || Layer::Act(Pointwise::LeakyRelu(0.2));
    let relu = || Layer::Act(Pointwise::Relu);
    Ok(match s.arch {
        Arch::Dcgan => vec![
            conv(be, s.nc, w0, 4, Conv2dParams::new(2, 1), false, false)?,
            leaky(),
            conv(be, w0, w1, 4, Conv2dParams::new(2, 1), false, false)?,
            bn(be, w1)?,
            leaky(),
            conv(be, w1, w2, 4, Conv2dParams::new(2, 1), false, false)?,
            bn(be, w2)?,
            leaky(),
            conv(be, w2, w3, 4, Conv2dParams::new(2, 1), false, false)?,
            bn(be, w3)?,
            leaky(),
            conv(be, w3, 1, 4, Conv2dParams::new(1, 0), false, false)?,
            Layer::Act(Pointwise::Sigmoid),
        ],
        Arch::Seed => vec![
            conv(be, s.nc, w0, 5, Conv2dParams::new(2, 2), true, false)?,
            relu(),
            conv(be, w0, w1, 5, Conv2dParams::new(2, 2), true, false)?,
            relu(),
            Layer::Flatten,
            Layer::Linear(Linear::new(be, w1 * 16 * 16, 1, true)?),
            Layer::Act(Pointwise::Sigmoid),
        ],
    })
}

/// Initialises every parameter as the architecture's reference does: `dcgan` as the PyTorch
/// example's `weights_init` (convolution weights N(0, 0.02), batch-norm weights N(1, 0.02),
/// biases 0); `seed` as PyTorch's default layer init (weights and biases U(−b, b) with
/// `b = 1/√fan_in`, `fan_in` = weight.size(1)·kh·kw).
fn init_params<B: Backend>(
    be: &B,
    net: &mut Sequential<B>,
    arch: Arch,
    rng: &mut Rng,
) -> Result<()> {
    let normal = |rng: &mut Rng, n: usize, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (mean + std * rng.next_normal()) as f32)
            .collect()
    };
    let uniform = |rng: &mut Rng, n: usize, b: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * rng.next_f64() - 1.0) * b) as f32)
            .collect()
    };
    for layer in &mut net.layers {
        match (layer, arch) {
            (Layer::Conv(c), Arch::Dcgan) => {
                let n = c.weight.len();
                c.weight.set(be, &normal(rng, n, 0.0, 0.02))?;
            }
            (Layer::BatchNorm(b), _) => {
                let n = b.channels;
                b.weight.set(be, &normal(rng, n, 1.0, 0.02))?;
                b.bias.set(be, &vec![0.0; n])?;
            }
            (Layer::Conv(c), Arch::Seed) => {
                let s = &c.weight.shape;
                let bound = 1.0 / ((s[1] * s[2] * s[3]) as f64).sqrt();
                let n = c.weight.len();
                c.weight.set(be, &uniform(rng, n, bound))?;
                if let Some(b) = c.bias.as_mut() {
                    let n = b.len();
                    b.set(be, &uniform(rng, n, bound))?;
                }
            }
            (Layer::Linear(l), _) => {
                let bound = 1.0 / (l.in_features as f64).sqrt();
                let n = l.weight.len();
                l.weight.set(be, &uniform(rng, n, bound))?;
                if let Some(b) = l.bias.as_mut() {
                    let n = b.len();
                    b.set(be, &uniform(rng, n, bound))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A generator: noise `[N, nz, 1, 1]` (or `[N, nz]`) → images `[N, nc, 64, 64]`.
pub struct Generator<B: Backend> {
    pub spec: GeneratorSpec,
    pub net: Sequential<B>,
}

/// A discriminator: images `[N, nc, 64, 64]` → probabilities `[N]` that each is real.
pub struct Discriminator<B: Backend> {
    pub spec: DiscriminatorSpec,
    pub net: Sequential<B>,
}

impl<B: Backend> Generator<B> {
    /// A generator of `spec` with zero parameters.
    pub fn new(be: &B, spec: GeneratorSpec) -> Result<Self> {
        let net = Sequential::new(be, generator_layers(be, &spec)?, spec.arch.prefix())?;
        Ok(Generator { spec, net })
    }

    /// A generator initialised as the architecture's reference does, from `rng`.
    pub fn init(be: &B, spec: GeneratorSpec, rng: &mut Rng) -> Result<Self> {
        let mut g = Self::new(be, spec)?;
        init_params(be, &mut g.net, spec.arch, rng)?;
        Ok(g)
    }

    /// Images of the noise `z` (`n` samples of `nz`): the output buffer holds `[n, nc, 64, 64]`.
    pub fn forward(&mut self, be: &B, z: &B::Buf, n: usize, mode: Mode) -> Result<&B::Buf> {
        self.net.forward(be, z, [n, self.spec.nz, 1, 1], mode)?;
        Ok(self.net.output())
    }

    /// Elements of one output image.
    pub fn image_len(&self) -> usize {
        self.spec.nc * IMAGE_SIZE * IMAGE_SIZE
    }

    /// Loads a checkpoint (PyTorch names; widths from the shapes). `arch` checks the file is of
    /// that architecture; `None` tells it from the names.
    pub fn load(be: &B, path: &Path, arch: Option<Arch>) -> Result<Self> {
        let st = SafeTensors::open(path)?;
        Self::from_state(be, &StateSource::file(&st), arch)
    }

    /// [`Generator::load`] from tensors already open.
    pub fn from_state(be: &B, st: &StateSource<'_>, arch: Option<Arch>) -> Result<Self> {
        let arch = detect_arch(st, arch)?;
        let spec = generator_spec(st, arch)?;
        let mut g = Self::new(be, spec)?;
        load_state(be, &mut g.net, st)?;
        Ok(g)
    }

    /// Writes the `state_dict` atomically.
    pub fn save(&self, be: &B, path: &Path) -> Result<()> {
        save_state(be, &self.net, path)
    }
}

impl<B: Backend> Discriminator<B> {
    /// A discriminator of `spec` with zero parameters.
    pub fn new(be: &B, spec: DiscriminatorSpec) -> Result<Self> {
        let net = Sequential::new(be, discriminator_layers(be, &spec)?, spec.arch.prefix())?;
        Ok(Discriminator { spec, net })
    }

    /// A discriminator initialised as the architecture's reference does, from `rng`.
    pub fn init(be: &B, spec: DiscriminatorSpec, rng: &mut Rng) -> Result<Self> {
        let mut d = Self::new(be, spec)?;
        init_params(be, &mut d.net, spec.arch, rng)?;
        Ok(d)
    }

    /// Probabilities `[n]` for the images `x` `[n, nc, 64, 64]`.
    pub fn forward(&mut self, be: &B, x: &B::Buf, n: usize, mode: Mode) -> Result<&B::Buf> {
        self.net
            .forward(be, x, [n, self.spec.nc, IMAGE_SIZE, IMAGE_SIZE], mode)?;
        Ok(self.net.output())
    }

    /// Loads a checkpoint (see [`Generator::load`]).
    pub fn load(be: &B, path: &Path, arch: Option<Arch>) -> Result<Self> {
        let st = SafeTensors::open(path)?;
        Self::from_state(be, &StateSource::file(&st), arch)
    }

    /// [`Discriminator::load`] from tensors already open.
    pub fn from_state(be: &B, st: &StateSource<'_>, arch: Option<Arch>) -> Result<Self> {
        let arch = detect_arch(st, arch)?;
        let spec = discriminator_spec(st, arch)?;
        let mut d = Self::new(be, spec)?;
        load_state(be, &mut d.net, st)?;
        Ok(d)
    }

    /// Writes the `state_dict` atomically.
    pub fn save(&self, be: &B, path: &Path) -> Result<()> {
        save_state(be, &self.net, path)
    }
}

/// The tensors of one network in a safetensors file: those whose names start with `prefix`
/// (empty for a checkpoint of its own; `G.` / `D.` inside a training state).
#[derive(Clone, Copy)]
pub struct StateSource<'a> {
    pub st: &'a SafeTensors,
    pub prefix: &'a str,
}

impl<'a> StateSource<'a> {
    /// A whole file.
    pub fn file(st: &'a SafeTensors) -> Self {
        StateSource { st, prefix: "" }
    }
    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    fn contains(&self, name: &str) -> bool {
        self.st.contains(&self.full(name))
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.st.info(&self.full(name))?.shape.clone())
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.st.tensor(&self.full(name))
    }
    /// Names under the prefix, without it.
    fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.st.names().filter_map(|n| n.strip_prefix(self.prefix))
    }
    fn path(&self) -> String {
        self.st.path().display().to_string()
    }
}

/// The architecture of a checkpoint: `main.*` names are `dcgan`, bare indices `seed`.
fn detect_arch(st: &StateSource<'_>, want: Option<Arch>) -> Result<Arch> {
    let found = if st.contains("main.0.weight") {
        Arch::Dcgan
    } else if st.contains("0.weight") {
        Arch::Seed
    } else {
        return Err(Error::invalid(format!(
            "{}: not a DCGAN checkpoint (neither `main.0.weight` nor `0.weight`)",
            st.path()
        )));
    };
    match want {
        Some(a) if a != found => Err(Error::invalid(format!(
            "{}: a `{}` checkpoint, not `{}`",
            st.path(),
            found.name(),
            a.name()
        ))),
        _ => Ok(found),
    }
}

/// Dimension `i` of a tensor of rank `rank`, or an error naming it.
fn dim(st: &StateSource<'_>, name: &str, rank: usize, i: usize) -> Result<usize> {
    let d = st.shape(name)?;
    if d.len() != rank || d.contains(&0) {
        return Err(Error::invalid(format!(
            "{}: tensor `{name}` has shape {d:?}, expected {rank} non-zero dimensions",
            st.path()
        )));
    }
    Ok(d[i])
}

fn generator_spec(st: &StateSource<'_>, arch: Arch) -> Result<GeneratorSpec> {
    Ok(match arch {
        Arch::Dcgan => {
            // main.0.weight [nz, 8ngf, 4, 4], main.12.weight [ngf, nc, 4, 4]
            let nz = dim(st, "main.0.weight", 4, 0)?;
            let w0 = dim(st, "main.0.weight", 4, 1)?;
            let nc = dim(st, "main.12.weight", 4, 1)?;
            if w0 % 8 != 0 {
                return Err(Error::invalid(format!(
                    "{}: `main.0.weight` has {w0} output channels, not 8·ngf",
                    st.path()
                )));
            }
            GeneratorSpec::dcgan(nz, w0 / 8, nc)
        }
        Arch::Seed => {
            // 0.weight [8·8·c0, nz], 3.weight [c0, c1, 5, 5], 7.weight [c1, c2, 5, 5],
            // 9.weight [c2, nc, 5, 5]
            let nz = dim(st, "0.weight", 2, 1)?;
            let c0 = dim(st, "3.weight", 4, 0)?;
            let c1 = dim(st, "3.weight", 4, 1)?;
            let c2 = dim(st, "7.weight", 4, 1)?;
            let nc = dim(st, "9.weight", 4, 1)?;
            GeneratorSpec::seed(nz, [c0, c1, c2], nc)
        }
    })
}

fn discriminator_spec(st: &StateSource<'_>, arch: Arch) -> Result<DiscriminatorSpec> {
    Ok(match arch {
        Arch::Dcgan => {
            // main.0.weight [ndf, nc, 4, 4]
            let ndf = dim(st, "main.0.weight", 4, 0)?;
            let nc = dim(st, "main.0.weight", 4, 1)?;
            DiscriminatorSpec::dcgan(ndf, nc)
        }
        Arch::Seed => {
            // 0.weight [d0, nc, 5, 5], 2.weight [d1, d0, 5, 5]
            let d0 = dim(st, "0.weight", 4, 0)?;
            let nc = dim(st, "0.weight", 4, 1)?;
            let d1 = dim(st, "2.weight", 4, 0)?;
            DiscriminatorSpec::seed([d0, d1], nc)
        }
    })
}

/// What a layer contributes to the `state_dict`, in PyTorch's order.
enum Entry<'a, B: Backend> {
    Param(&'a Param<B>),
    Buffer(&'a B::Buf, usize),
    Count(i64),
}

fn entries<B: Backend>(net: &Sequential<B>) -> Vec<(String, Entry<'_, B>)> {
    let mut v = Vec::new();
    for (i, layer) in net.layers.iter().enumerate() {
        let name = |s: &str| format!("{}{i}.{s}", net.prefix);
        match layer {
            Layer::Conv(c) => {
                v.push((name("weight"), Entry::Param(&c.weight)));
                if let Some(b) = &c.bias {
                    v.push((name("bias"), Entry::Param(b)));
                }
            }
            Layer::Linear(l) => {
                v.push((name("weight"), Entry::Param(&l.weight)));
                if let Some(b) = &l.bias {
                    v.push((name("bias"), Entry::Param(b)));
                }
            }
            Layer::BatchNorm(b) => {
                v.push((name("weight"), Entry::Param(&b.weight)));
                v.push((name("bias"), Entry::Param(&b.bias)));
                v.push((
                    name("running_mean"),
                    Entry::Buffer(&b.running_mean, b.channels),
                ));
                v.push((
                    name("running_var"),
                    Entry::Buffer(&b.running_var, b.channels),
                ));
                v.push((
                    name("num_batches_tracked"),
                    Entry::Count(b.num_batches_tracked),
                ));
            }
            _ => {}
        }
    }
    v
}

/// The `state_dict` as host tensors (names in PyTorch's order).
pub fn state_dict<B: Backend>(be: &B, net: &Sequential<B>) -> Result<Vec<(String, Tensor)>> {
    entries(net)
        .into_iter()
        .map(|(name, e)| {
            let t = match e {
                Entry::Param(p) => Tensor::from_vec(p.values(be)?, p.shape.clone())?,
                Entry::Buffer(b, n) => {
                    let mut v = download_all(be, b)?;
                    v.truncate(n);
                    Tensor::from_vec(v, vec![n])?
                }
                Entry::Count(c) => Tensor::from_vec(vec![c], Vec::<usize>::new())?,
            };
            Ok((name, t))
        })
        .collect()
}

/// Writes `net`'s `state_dict` to `path` atomically.
pub fn save_state<B: Backend>(be: &B, net: &Sequential<B>, path: &Path) -> Result<()> {
    let tensors = state_dict(be, net)?;
    write_safetensors(
        path,
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        &BTreeMap::new(),
    )
}

/// Loads every `state_dict` entry of `net` from `st`, checking names, shapes and dtypes (f32,
/// f16 or bf16 floats; `num_batches_tracked` an integer scalar). Extra tensors are an error,
/// as PyTorch's `load_state_dict(strict=True)`.
pub fn load_state<B: Backend>(be: &B, net: &mut Sequential<B>, st: &StateSource<'_>) -> Result<()> {
    let path = st.path();
    let expected: Vec<String> = entries(net).into_iter().map(|(n, _)| n).collect();
    if let Some(extra) = st.names().find(|n| !expected.iter().any(|e| e == n)) {
        return Err(Error::invalid(format!(
            "{path}: unexpected tensor `{extra}` for this architecture"
        )));
    }
    let floats = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = st.tensor(name)?;
        t.expect_dims(&format!("{path}: tensor `{name}`"), shape)?;
        if !t.dtype().is_float() {
            return Err(Error::DTypeMismatch {
                context: format!("{path}: tensor `{name}`"),
                expected: "f32, f16 or bf16".into(),
                found: t.dtype().to_string(),
            });
        }
        t.to_f32_vec()
    };
    let prefix = net.prefix.clone();
    for (i, layer) in net.layers.iter_mut().enumerate() {
        let name = |s: &str| format!("{prefix}{i}.{s}");
        let load = |p: &mut Param<B>, n: &str| -> Result<()> {
            let shape = p.shape.clone();
            p.set(be, &floats(&name(n), &shape)?)
        };
        match layer {
            Layer::Conv(c) => {
                load(&mut c.weight, "weight")?;
                if let Some(b) = c.bias.as_mut() {
                    load(b, "bias")?;
                }
            }
            Layer::Linear(l) => {
                load(&mut l.weight, "weight")?;
                if let Some(b) = l.bias.as_mut() {
                    load(b, "bias")?;
                }
            }
            Layer::BatchNorm(b) => {
                let c = b.channels;
                load(&mut b.weight, "weight")?;
                load(&mut b.bias, "bias")?;
                let rm = floats(&name("running_mean"), &[c])?;
                let rv = floats(&name("running_var"), &[c])?;
                be.upload_into(&rm, &mut b.running_mean, 0)?;
                be.upload_into(&rv, &mut b.running_var, 0)?;
                let n = name("num_batches_tracked");
                let t = st.tensor(&n)?;
                if t.numel() != 1 || t.dims().len() > 1 {
                    return Err(Error::invalid(format!(
                        "{path}: tensor `{n}` must be a scalar, found shape {:?}",
                        t.dims()
                    )));
                }
                b.num_batches_tracked = match t.dtype() {
                    DType::I64 => t.to_vec::<i64>()?[0],
                    DType::I32 => t.to_vec::<i32>()?[0] as i64,
                    other => {
                        return Err(Error::DTypeMismatch {
                            context: format!("{path}: tensor `{n}`"),
                            expected: "i64".into(),
                            found: other.to_string(),
                        })
                    }
                };
            }
            _ => {}
        }
    }
    Ok(())
}
