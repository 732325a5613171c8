//! A training run: where the real batches and the noise come from, the pair with its
//! optimisers, the quality figure, and the training state that lets a run resume bit for bit.
//!
//! The run folder holds `generator.safetensors` and `discriminator.safetensors` (PyTorch's
//! `state_dict` names, running statistics and `num_batches_tracked` included) and
//! `training_state.safetensors`: both networks again, both optimisers' moments, and as metadata
//! the step counts, the noise generator's state, the data position and the run's settings.
//! Each file is written atomically (temporary file, then rename), and resuming reads only the
//! training state, so a run killed at any moment — even between two of the three writes —
//! resumes from one consistent checkpoint.
use super::data::{
    load_images_safetensors, synthetic_batch, Dataset, ImageFolder, Range, Shuffler,
};
use super::model::{
    Arch, Discriminator, DiscriminatorSpec, Generator, GeneratorSpec, StateSource, IMAGE_SIZE,
};
use super::quality::swd_images;
use super::train::{param_names, Gan, StepMetrics, TrainConfig};
use crate::gpt2::Rng;
use kiln_io::{write_safetensors, SafeTensors};
use kiln_nn::backend::{download_all, Backend};
use kiln_nn::layers::{Mode, Sequential};
use kiln_tensor::{DType, Error, Result, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Images in the synthetic set's epoch (it is procedural and unbounded; an epoch is this many).
pub const SYNTHETIC_EPOCH: usize = 50_000;
/// Images in each set the quality figure compares.
pub const QUALITY_IMAGES: usize = 512;
/// Images in a sample grid.
pub const SAMPLE_IMAGES: usize = 64;

/// File names inside a run folder.
pub const GENERATOR_FILE: &str = "generator.safetensors";
pub const DISCRIMINATOR_FILE: &str = "discriminator.safetensors";
pub const STATE_FILE: &str = "training_state.safetensors";
/// Metadata key of the training state.
const STATE_KEY: &str = "kiln_dcgan_state";

/// Where the real images come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// The built-in procedural shapes ([`super::data::synthetic_image`]), shuffled.
    Synthetic,
    /// A folder of PNG/JPEG images (resized and centre-cropped to 64), shuffled.
    Folder(PathBuf),
    /// Tensor `images` `[N, 3, 64, 64]` of a safetensors file, in order, as stored.
    Tensor(PathBuf),
}

impl DataSource {
    /// `synthetic`, a path ending in `.safetensors`, or a folder.
    pub fn parse(s: &str) -> DataSource {
        if s == "synthetic" {
            DataSource::Synthetic
        } else if s.ends_with(".safetensors") {
            DataSource::Tensor(PathBuf::from(s))
        } else {
            DataSource::Folder(PathBuf::from(s))
        }
    }

    /// How the source is written in the training state.
    pub fn describe(&self) -> String {
        match self {
            DataSource::Synthetic => "synthetic".into(),
            DataSource::Folder(p) | DataSource::Tensor(p) => p.display().to_string(),
        }
    }
}

/// How long a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    Steps(u64),
    /// Whole passes over the data set (`len / batch` steps each).
    Epochs(u64),
}

/// What a new run is made of.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub arch: Arch,
    pub data: DataSource,
    pub train: TrainConfig,
    pub length: Length,
    /// Seeds the initial weights, the noise, the data order and the sample noise.
    pub seed: u64,
    /// Start from `DIR/generator.safetensors` and `DIR/discriminator.safetensors`.
    pub init: Option<PathBuf>,
    /// Tensor `noise` `[steps, batch, nz(, 1, 1)]`: slice `i` is step `i`'s noise.
    pub noise: Option<PathBuf>,
    /// Widths of new networks (default: the architecture's).
    pub generator: Option<GeneratorSpec>,
    pub discriminator: Option<DiscriminatorSpec>,
}

impl RunConfig {
    /// The architecture's defaults on `data`.
    pub fn new(arch: Arch, data: DataSource) -> Self {
        RunConfig {
            arch,
            data,
            train: TrainConfig::default(),
            length: Length::Steps(1000),
            seed: 0,
            init: None,
            noise: None,
            generator: None,
            discriminator: None,
        }
    }
}

/// The order in which real images are taken.
#[derive(Clone, Debug)]
enum Order {
    Shuffled(Shuffler),
    /// The next image index (wrapping around).
    Sequential(u64),
}

/// The settings a resumed run must share with the run it continues.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Settings {
    arch: String,
    data: String,
    batch: usize,
    lr: f64,
    beta1: f64,
    seed: u64,
    noise: Option<String>,
}

/// The training state's metadata.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    version: u32,
    settings: Settings,
    step: u64,
    total_steps: u64,
    opt_g_step: u64,
    opt_d_step: u64,
    /// The noise generator's state, as decimal strings (JSON numbers lose 64-bit integers).
    rng: [String; 4],
    /// `[epoch, position]` of the shuffler, or `[position]` in order.
    order: Vec<u64>,
}

/// A training run in progress.
pub struct Run<B: Backend> {
    pub gan: Gan<B>,
    pub config: RunConfig,
    /// Steps taken so far.
    pub step: u64,
    /// Steps the run takes in all.
    pub total_steps: u64,
    data: Dataset,
    order: Order,
    rng: Rng,
    /// `[steps, batch, nz]` from `--noise`.
    noise_file: Option<Vec<f32>>,
    /// The sample grids' noise `[SAMPLE_IMAGES, nz]`.
    sample_noise: Vec<f32>,
    /// The real images the quality figure compares with, `[QUALITY_IMAGES, 3, 64, 64]`.
    quality_real: Vec<f32>,
    quality_n: usize,
    batch: Vec<f32>,
    noise: Vec<f32>,
}

/// Standard normal draws.
fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_normal() as f32).collect()
}

/// The data set of a source. A folder's broken files are reported through `warn`.
fn load_data(src: &DataSource, seed: u64, warn: &mut dyn FnMut(String)) -> Result<Dataset> {
    Ok(match src {
        DataSource::Synthetic => Dataset::Synthetic {
            seed,
            len: SYNTHETIC_EPOCH,
            size: IMAGE_SIZE,
        },
        DataSource::Folder(dir) => Dataset::Folder(ImageFolder::load(dir, IMAGE_SIZE, warn)?),
        DataSource::Tensor(path) => {
            let (images, n) = load_images_safetensors(path)?;
            Dataset::Tensor {
                images,
                n,
                size: IMAGE_SIZE,
            }
        }
    })
}

/// Reads `--noise`: `[steps, batch, nz]` or `[steps, batch, nz, 1, 1]`, at least `steps` slices.
fn load_noise(path: &Path, steps: u64, batch: usize, nz: usize) -> Result<Vec<f32>> {
    let st = SafeTensors::open(path)?;
    let t = st.tensor("noise").map_err(|e| match e {
        Error::MissingTensor { .. } => Error::invalid(format!(
            "{}: no tensor `noise` (expected [steps, {batch}, {nz}, 1, 1])",
            path.display()
        )),
        e => e,
    })?;
    let d = t.dims();
    let ok =
        matches!(d, [s, b, z] | [s, b, z, 1, 1] if *b == batch && *z == nz && *s as u64 >= steps);
    if !ok || !t.dtype().is_float() {
        return Err(Error::invalid(format!(
            "{}: tensor `noise` has shape {d:?} ({}), expected [{steps} or more, {batch}, {nz}, 1, 1] \
             (steps, batch, nz) as f32",
            path.display(),
            t.dtype()
        )));
    }
    t.to_f32_vec()
}

/// The real images of the quality figure: held-out synthetic images (another seed), or the
/// first images of the data set.
fn quality_set(data: &Dataset, seed: u64, range: Range) -> (Vec<f32>, usize) {
    let per = 3 * IMAGE_SIZE * IMAGE_SIZE;
    match data {
        Dataset::Synthetic { size, .. } => {
            let mut v = vec![0f32; QUALITY_IMAGES * per];
            synthetic_batch(
                seed ^ 0x5157_4a11_d0c4_e11e,
                0,
                QUALITY_IMAGES,
                *size,
                range,
                &mut v,
            );
            (v, QUALITY_IMAGES)
        }
        _ => {
            let n = data.len().min(QUALITY_IMAGES);
            let idx: Vec<usize> = Shuffler::permutation(data.len(), seed ^ 0x5157, 0)
                .into_iter()
                .take(n)
                .collect();
            let mut v = vec![0f32; n * per];
            data.batch(&idx, range, &mut v);
            (v, n)
        }
    }
}

fn range_of(arch: Arch) -> Range {
    match arch {
        Arch::Dcgan => Range::MinusOneToOne,
        Arch::Seed => Range::ZeroToOne,
    }
}

impl<B: Backend> Run<B> {
    /// A new run: data loaded, networks initialised (or taken from `config.init`).
    pub fn new(be: &B, config: RunConfig, warn: &mut dyn FnMut(String)) -> Result<Self> {
        let arch = config.arch;
        let data = load_data(&config.data, config.seed, warn)?;
        let batch = config.train.batch;
        if data.len() < batch {
            return Err(Error::invalid(format!(
                "the data set has {} images, fewer than one batch of {batch}",
                data.len()
            )));
        }
        let total_steps = match config.length {
            Length::Steps(s) => s,
            Length::Epochs(e) => e * (data.len() / batch) as u64,
        };
        let mut rng = Rng::new(config.seed);
        let (g, d) = match &config.init {
            Some(dir) => (
                Generator::load(be, &dir.join(GENERATOR_FILE), Some(arch))?,
                Discriminator::load(be, &dir.join(DISCRIMINATOR_FILE), Some(arch))?,
            ),
            None => {
                let gs = config
                    .generator
                    .unwrap_or_else(|| GeneratorSpec::default_for(arch));
                let ds = config
                    .discriminator
                    .unwrap_or_else(|| DiscriminatorSpec::default_for(arch));
                check_training_memory(&gs, &ds, batch)?;
                (
                    Generator::init(be, gs, &mut rng)?,
                    Discriminator::init(be, ds, &mut rng)?,
                )
            }
        };
        check_training_memory(&g.spec, &d.spec, batch)?;
        let order = match config.data {
            DataSource::Tensor(_) => Order::Sequential(0),
            _ => Order::Shuffled(Shuffler::new(data.len(), config.seed)),
        };
        Self::assemble(be, config, g, d, data, order, rng, 0, total_steps)
    }

    /// Puts the pieces together (new and resumed runs alike).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        be: &B,
        config: RunConfig,
        g: Generator<B>,
        d: Discriminator<B>,
        data: Dataset,
        order: Order,
        rng: Rng,
        step: u64,
        total_steps: u64,
    ) -> Result<Self> {
        let nz = g.spec.nz;
        let gan = Gan::new(be, g, d, config.train)?;
        let noise_file = match &config.noise {
            Some(p) => Some(load_noise(p, total_steps, config.train.batch, nz)?),
            None => None,
        };
        let mut sample_rng = Rng::new(config.seed ^ 0x00fe_edba_c4ed);
        let sample_noise = normals(&mut sample_rng, SAMPLE_IMAGES * nz);
        let (quality_real, quality_n) = quality_set(&data, config.seed, range_of(config.arch));
        Ok(Run {
            batch: vec![0.0; gan.batch_len()],
            noise: vec![0.0; gan.noise_len()],
            gan,
            config,
            step,
            total_steps,
            data,
            order,
            rng,
            noise_file,
            sample_noise,
            quality_real,
            quality_n,
        })
    }

    pub fn arch(&self) -> Arch {
        self.config.arch
    }

    /// Whether every step has been taken.
    pub fn done(&self) -> bool {
        self.step >= self.total_steps
    }

    /// Images in the data set.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// One training iteration on the next real batch and noise.
    pub fn step(&mut self, be: &B) -> Result<StepMetrics> {
        let b = self.config.train.batch;
        let indices: Vec<usize> = match &mut self.order {
            Order::Shuffled(s) => s.try_next_batch(b)?,
            Order::Sequential(pos) => {
                let n = self.data.len() as u64;
                let idx = (0..b as u64).map(|i| ((*pos + i) % n) as usize).collect();
                *pos = (*pos + b as u64) % n;
                idx
            }
        };
        self.data
            .batch(&indices, range_of(self.config.arch), &mut self.batch);
        match &self.noise_file {
            Some(all) => {
                let len = self.noise.len();
                let at = self.step as usize * len;
                self.noise.copy_from_slice(&all[at..at + len]);
            }
            None => {
                for v in &mut self.noise {
                    *v = self.rng.next_normal() as f32;
                }
            }
        }
        let m = self.gan.step(be, &self.batch, &self.noise)?;
        self.step += 1;
        Ok(m)
    }

    /// The generator's images of the fixed sample noise (eval mode), `[64, 3, 64, 64]`.
    pub fn samples(&mut self, be: &B) -> Result<Vec<f32>> {
        generate(
            be,
            &mut self.gan.g,
            &self.sample_noise,
            self.config.train.batch,
        )
    }

    /// The quality figure: the sliced Wasserstein distance between real images and as many
    /// generated ones (eval mode, noise from a generator of its own), downsampled to 16×16.
    /// Lower is better; see `docs/dcgan.md`.
    pub fn quality(&mut self, be: &B) -> Result<f64> {
        let nz = self.gan.g.spec.nz;
        let mut rng = Rng::new(self.config.seed ^ 0x0051_4a11_7e57);
        let noise = normals(&mut rng, self.quality_n * nz);
        let fake = generate(be, &mut self.gan.g, &noise, self.config.train.batch.max(64))?;
        swd_images(
            &self.quality_real,
            &fake,
            self.quality_n,
            self.quality_n,
            IMAGE_SIZE,
            range_of(self.config.arch),
        )
    }

    /// Writes the training state, then the generator and the discriminator, into `dir`.
    pub fn save(&mut self, be: &B, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (which, net) in [("G", &self.gan.g.net), ("D", &self.gan.d.net)] {
            for (name, t) in super::model::state_dict(be, net)? {
                tensors.push((format!("{which}.{name}"), t));
            }
        }
        for (which, net, opt) in [
            ("G", &self.gan.g.net, &self.gan.opt_g),
            ("D", &self.gan.d.net, &self.gan.opt_d),
        ] {
            let shapes = param_shapes(net);
            for ((name, shape), (m, v)) in param_names(net)
                .into_iter()
                .zip(shapes)
                .zip(opt.m.iter().zip(&opt.v))
            {
                for (kind, buf) in [("m", m), ("v", v)] {
                    let mut vals = download_all(be, buf)?;
                    vals.truncate(shape.iter().product());
                    tensors.push((
                        format!("opt_{which}.{kind}.{name}"),
                        Tensor::from_vec(vals, shape.clone())?,
                    ));
                }
            }
        }
        let s = self.rng.state();
        let saved = Saved {
            version: 1,
            settings: self.settings(),
            step: self.step,
            total_steps: self.total_steps,
            opt_g_step: self.gan.opt_g.step,
            opt_d_step: self.gan.opt_d.step,
            rng: s.map(|x| x.to_string()),
            order: match &self.order {
                Order::Shuffled(sh) => {
                    let (e, p) = sh.state();
                    vec![e, p]
                }
                Order::Sequential(p) => vec![*p],
            },
        };
        let mut meta = BTreeMap::new();
        meta.insert(
            STATE_KEY.to_string(),
            serde_json::to_string(&saved).map_err(|e| Error::invalid(e.to_string()))?,
        );
        write_safetensors(
            dir.join(STATE_FILE),
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            &meta,
        )?;
        self.gan.g.save(be, &dir.join(GENERATOR_FILE))?;
        self.gan.d.save(be, &dir.join(DISCRIMINATOR_FILE))?;
        Ok(())
    }

    fn settings(&self) -> Settings {
        let c = &self.config;
        Settings {
            arch: c.arch.name().into(),
            data: c.data.describe(),
            batch: c.train.batch,
            lr: c.train.lr,
            beta1: c.train.beta1,
            seed: c.seed,
            noise: c.noise.as_ref().map(|p| p.display().to_string()),
        }
    }

    /// Continues the run saved in `dir`. `config` must describe the same run (architecture,
    /// data, batch, learning rate, β1, seed, noise file); its length may differ (to train
    /// longer); its `init` and widths are ignored (the saved networks are used).
    pub fn resume(
        be: &B,
        dir: &Path,
        config: RunConfig,
        warn: &mut dyn FnMut(String),
    ) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Err(Error::invalid(format!(
                "--resume: {} has no {STATE_FILE} (not a run folder, or no checkpoint yet)",
                dir.display()
            )));
        }
        let st = SafeTensors::open(&path)?;
        let saved: Saved = st
            .metadata()
            .get(STATE_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{}: not a DCGAN training state (no readable `{STATE_KEY}` metadata)",
                    path.display()
                ))
            })?;
        let arch = Arch::parse(&saved.settings.arch).ok_or_else(|| {
            Error::invalid(format!(
                "{}: unknown architecture `{}`",
                path.display(),
                saved.settings.arch
            ))
        })?;
        let mut config = config;
        config.arch = arch;
        let data = load_data(&config.data, config.seed, warn)?;
        let probe = Settings {
            arch: arch.name().into(),
            data: config.data.describe(),
            batch: config.train.batch,
            lr: config.train.lr,
            beta1: config.train.beta1,
            seed: config.seed,
            noise: config.noise.as_ref().map(|p| p.display().to_string()),
        };
        if probe != saved.settings {
            return Err(Error::invalid(format!(
                "--resume: {} was trained with {:?}, not {:?}",
                dir.display(),
                saved.settings,
                probe
            )));
        }
        // The networks, from the state file's copies (names prefixed `G.` / `D.`).
        let g = Generator::from_state(
            be,
            &StateSource {
                st: &st,
                prefix: "G.",
            },
            Some(arch),
        )?;
        let d = Discriminator::from_state(
            be,
            &StateSource {
                st: &st,
                prefix: "D.",
            },
            Some(arch),
        )?;
        let total_steps = match config.length {
            Length::Steps(s) => s,
            Length::Epochs(e) => e * (data.len() / config.train.batch) as u64,
        };
        let rng = Rng::from_state(parse_rng(&saved.rng, &path)?);
        let order = match (&config.data, saved.order.as_slice()) {
            (DataSource::Tensor(_), [p]) => Order::Sequential(*p),
            (DataSource::Tensor(_), _) => return Err(bad_state(&path, "data position")),
            (_, [e, p]) => {
                Order::Shuffled(Shuffler::from_state(data.len(), config.seed, (*e, *p))?)
            }
            _ => return Err(bad_state(&path, "data position")),
        };
        let mut run = Self::assemble(be, config, g, d, data, order, rng, saved.step, total_steps)?;
        // The optimisers' moments and step counts.
        for (which, net, opt) in [
            ("G", &mut run.gan.g.net, &mut run.gan.opt_g),
            ("D", &mut run.gan.d.net, &mut run.gan.opt_d),
        ] {
            let shapes = param_shapes(net);
            for ((name, shape), (m, v)) in param_names(net)
                .into_iter()
                .zip(shapes)
                .zip(opt.m.iter_mut().zip(opt.v.iter_mut()))
            {
                for (kind, buf) in [("m", m), ("v", v)] {
                    let key = format!("opt_{which}.{kind}.{name}");
                    let t = st.tensor(&key)?;
                    t.expect_dims(&format!("{}: tensor `{key}`", path.display()), &shape)?;
                    if t.dtype() != DType::F32 {
                        return Err(bad_state(&path, &key));
                    }
                    be.upload_into(&t.to_f32_vec()?, buf, 0)?;
                }
            }
        }
        run.gan.opt_g.step = saved.opt_g_step;
        run.gan.opt_d.step = saved.opt_d_step;
        Ok(run)
    }
}

fn bad_state(path: &Path, what: &str) -> Error {
    Error::invalid(format!(
        "{}: corrupt training state ({what})",
        path.display()
    ))
}

fn parse_rng(s: &[String; 4], path: &Path) -> Result<[u64; 4]> {
    let mut out = [0u64; 4];
    for (o, v) in out.iter_mut().zip(s) {
        *o = v.parse().map_err(|_| bad_state(path, "noise generator"))?;
    }
    Ok(out)
}

/// Shapes of a chain's parameters, in [`param_names`] order.
fn param_shapes<B: Backend>(net: &Sequential<B>) -> Vec<Vec<usize>> {
    use kiln_nn::layers::Layer;
    let mut v = Vec::new();
    for layer in &net.layers {
        match layer {
            Layer::Conv(c) => {
                v.push(c.weight.shape.clone());
                v.extend(c.bias.as_ref().map(|b| b.shape.clone()));
            }
            Layer::Linear(l) => {
                v.push(l.weight.shape.clone());
                v.extend(l.bias.as_ref().map(|b| b.shape.clone()));
            }
            Layer::BatchNorm(b) => {
                v.push(b.weight.shape.clone());
                v.push(b.bias.shape.clone());
            }
            _ => {}
        }
    }
    v
}

/// The generator's images (eval mode) of `noise` (`[n, nz]`), `chunk` samples at a time:
/// `[n, nc, 64, 64]`.
pub fn generate<B: Backend>(
    be: &B,
    g: &mut Generator<B>,
    noise: &[f32],
    chunk: usize,
) -> Result<Vec<f32>> {
    let nz = g.spec.nz;
    if nz == 0 || !noise.len().is_multiple_of(nz) {
        return Err(Error::invalid(format!(
            "noise of {} values is not [n, {nz}]",
            noise.len()
        )));
    }
    let n = noise.len() / nz;
    let per = g.image_len();
    let mut out = vec![0f32; n * per];
    let chunk = chunk.max(1);
    let mut at = 0;
    while at < n {
        let k = chunk.min(n - at);
        let z = be.upload(&noise[at * nz..(at + k) * nz])?;
        let img = g.forward(be, &z, k, Mode::Eval)?;
        be.download(img, 0, &mut out[at * per..(at + k) * per])?;
        at += k;
    }
    Ok(out)
}

/// Refuses a training run whose networks and activations at `batch` cannot fit in memory.
pub fn check_training_memory(g: &GeneratorSpec, d: &DiscriminatorSpec, batch: usize) -> Result<()> {
    crate::memory::check(
        super::memory_need(g, Some(d), batch),
        &format!(
            "training at batch {batch} (generator widths {:?}, discriminator widths {:?})",
            g.widths, d.widths
        ),
        "use a smaller --batch or narrower networks",
    )
}
