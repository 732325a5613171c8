//! `kiln dcgan sample|train`.
//!
//! A training run writes into its folder: `metrics.csv` (one row per step; the first columns are
//! `step,loss_d,loss_g,d_x,d_g_z1,d_g_z2`), `losses.png` (both losses and the quality figure,
//! redrawn as training goes), `samples/step-NNNNNN.png` (grids of one fixed noise batch), and
//! the checkpoint: `generator.safetensors`, `discriminator.safetensors` (PyTorch names) and
//! `training_state.safetensors` (what `--resume` reads).
use crate::bench::with_threads;
use crate::device::Device;
use crate::plot::{render_png, Plot, Series};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_io::{write_atomic, write_safetensors, SafeTensors};
use kiln_models::dcgan::data::Range;
use kiln_models::dcgan::image::write_grid_png;
use kiln_models::dcgan::run::{
    generate, DataSource, Length, Run, RunConfig, GENERATOR_FILE, SAMPLE_IMAGES, STATE_FILE,
};
use kiln_models::dcgan::train::{StepMetrics, TrainConfig};
use kiln_models::dcgan::{Arch, DiscriminatorSpec, Generator, GeneratorSpec, IMAGE_SIZE};
use kiln_models::gpt2::Rng;
use kiln_nn::backend::{Backend, CpuBackend};
use kiln_tensor::{Error, Result, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum DcganCommand {
    /// Images from a generator checkpoint: a PNG grid, and optionally the raw tensor.
    Sample(SampleArgs),
    /// Train a generator/discriminator pair (the PyTorch DCGAN example's loop).
    Train(TrainArgs),
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Generator checkpoint (safetensors with PyTorch `state_dict` names).
    #[arg(long)]
    pub generator: PathBuf,
    /// `dcgan` or `seed` (default: told from the checkpoint's names).
    #[arg(long)]
    pub arch: Option<String>,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    pub count: usize,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0, conflicts_with = "noise")]
    pub seed: u64,
    /// Noise from tensor `noise` `[N, nz, 1, 1]` (or `[N, nz]`) of a safetensors file.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// The PNG grid to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write tensor `images` `[N, 3, 64, 64]` f32 to this safetensors file.
    #[arg(long)]
    pub raw: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda", help = crate::device::HELP)]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// `synthetic` (built-in coloured shapes), a folder of PNG/JPEG images, or a safetensors
    /// file with tensor `images` `[N, 3, 64, 64]` (used in order, as stored).
    #[arg(long)]
    pub data: String,
    /// The run folder.
    #[arg(long)]
    pub out: PathBuf,
    /// `dcgan` (the PyTorch example) or `seed`.
    #[arg(long, default_value = "dcgan")]
    pub arch: String,
    /// Passes over the data set.
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<u64>,
    /// Training iterations (default 1000 when neither this nor --epochs is given).
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub beta1: f64,
    /// Seeds the initial weights, the noise, the data order and the sample noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Continue the run saved in --out (bit-identical to never having stopped).
    #[arg(long)]
    pub resume: bool,
    /// Start from DIR/generator.safetensors and DIR/discriminator.safetensors.
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Noise from tensor `noise` `[steps, batch, nz, 1, 1]`: slice i at step i.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Write a sample grid every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub sample_every: u64,
    /// Compute the quality figure (sliced Wasserstein distance to real images) every N steps
    /// (default: with each sample grid; 0 turns it off).
    #[arg(long)]
    pub quality_every: Option<u64>,
    /// Write the checkpoint every N steps (and at the end, and on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Generator width of a new `dcgan` run (ngf; 64 in the PyTorch example).
    #[arg(long)]
    pub ngf: Option<usize>,
    /// Discriminator width of a new `dcgan` run (ndf; 64 in the PyTorch example).
    #[arg(long)]
    pub ndf: Option<usize>,
    /// No progress bar (one summary line per sample grid instead).
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda", help = crate::device::HELP)]
    pub device: String,
}

pub fn run(cmd: DcganCommand) -> Result<()> {
    match cmd {
        DcganCommand::Sample(a) => {
            check_threads(a.threads)?;
            with_threads(a.threads, move || sample(a))?
        }
        DcganCommand::Train(a) => {
            check_threads(a.threads)?;
            with_threads(a.threads, move || train(a))?
        }
    }
}

fn check_threads(threads: Option<usize>) -> Result<()> {
    if threads == Some(0) {
        return Err(Error::invalid("--threads must be at least 1"));
    }
    Ok(())
}

fn parse_arch(s: &str) -> Result<Arch> {
    Arch::parse(s).ok_or_else(|| Error::invalid(format!("--arch {s}: expected `dcgan` or `seed`")))
}

fn range_of(arch: Arch) -> Range {
    match arch {
        Arch::Dcgan => Range::MinusOneToOne,
        Arch::Seed => Range::ZeroToOne,
    }
}

/// Tensor `noise` of a sample's `--noise` file: `[N, nz, 1, 1]` or `[N, nz]`.
fn read_sample_noise(path: &Path, nz: usize) -> Result<Vec<f32>> {
    let st = SafeTensors::open(path)?;
    let t = st.tensor("noise")?;
    let ok = matches!(t.dims(), [n, z] | [n, z, 1, 1] if *z == nz && *n > 0);
    if !ok || !t.dtype().is_float() {
        return Err(Error::invalid(format!(
            "{}: tensor `noise` has shape {:?} ({}), expected [N, {nz}, 1, 1] or [N, {nz}]",
            path.display(),
            t.dims(),
            t.dtype()
        )));
    }
    check_sample_count(t.dims()[0], &format!("--noise {}", path.display()))?;
    t.to_f32_vec()
}

/// The most images one `kiln dcgan sample` writes: one grid of 128 × 128 images (8192 × 8192
/// pixels), 0.8 GB of f32 images in memory.
const MAX_SAMPLES: usize = 16384;

fn check_sample_count(n: usize, what: &str) -> Result<()> {
    if n > MAX_SAMPLES {
        return Err(Error::invalid(format!(
            "{what}: {n} images is more than one grid holds (at most {MAX_SAMPLES})"
        )));
    }
    Ok(())
}

fn sample(a: SampleArgs) -> Result<()> {
    match Device::parse(&a.device)?.cuda_backend()? {
        None => sample_on(&CpuBackend::default(), a),
        Some(be) => sample_on(&be, a),
    }
}

fn sample_on<B: Backend>(be: &B, a: SampleArgs) -> Result<()> {
    let arch = a.arch.as_deref().map(parse_arch).transpose()?;
    let start = Instant::now();
    let mut g = Generator::load(be, &a.generator, arch)?;
    let nz = g.spec.nz;
    let noise = match &a.noise {
        Some(p) => read_sample_noise(p, nz)?,
        None => {
            if a.count == 0 {
                return Err(Error::invalid("--count must be at least 1"));
            }
            check_sample_count(a.count, "--count")?;
            let mut rng = Rng::new(a.seed);
            (0..a.count * nz)
                .map(|_| rng.next_normal() as f32)
                .collect()
        }
    };
    let n = noise.len() / nz;
    let images = generate(be, &mut g, &noise, 64)?;
    let range = range_of(g.spec.arch);
    write_grid_png(&a.out, &images, n, IMAGE_SIZE, range, None)?;
    if let Some(raw) = &a.raw {
        let t = Tensor::from_vec(images, vec![n, g.spec.nc, IMAGE_SIZE, IMAGE_SIZE])?;
        write_safetensors(raw, [("images", &t)], &BTreeMap::new())?;
    }
    eprintln!(
        "{n} images from a {} generator (nz {nz}) in {:.0} ms -> {}",
        g.spec.arch.name(),
        start.elapsed().as_secs_f64() * 1e3,
        a.out.display()
    );
    Ok(())
}

/// The columns of `metrics.csv`.
const CSV_HEADER: &str =
    "step,loss_d,loss_g,d_x,d_g_z1,d_g_z2,loss_d_real,loss_d_fake,swd,images_per_s,elapsed_s";

/// One parsed row of `metrics.csv` (what the plot needs).
struct Row {
    step: u64,
    loss_d: f64,
    loss_g: f64,
    swd: Option<f64>,
    line: String,
}

fn parse_row(line: &str) -> Option<Row> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() < 9 {
        return None;
    }
    Some(Row {
        step: f[0].parse().ok()?,
        loss_d: f[1].parse().ok()?,
        loss_g: f[2].parse().ok()?,
        swd: f[8].parse().ok(),
        line: line.to_string(),
    })
}

/// The rows of an existing `metrics.csv` up to `step` (a resumed run rewrites the file with
/// them: rows after the checkpoint are trained again).
fn read_rows(path: &Path, step: u64) -> Vec<Row> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(parse_row)
        .filter(|r| r.step <= step)
        .collect()
}

fn write_rows(path: &Path, rows: &[Row]) -> Result<()> {
    write_atomic(path, |w| {
        writeln!(w, "{CSV_HEADER}")?;
        for r in rows {
            writeln!(w, "{}", r.line)?;
        }
        Ok(())
    })
}

fn plot(path: &Path, rows: &[Row]) -> Result<()> {
    let pts = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| f(r).map(|v| (r.step as f64, v)))
            .collect()
    };
    let p = Plot {
        title: "DCGAN training".into(),
        x_label: "step".into(),
        y_label: "BCE loss".into(),
        series: vec![
            Series {
                name: "loss_d".into(),
                color: [214, 39, 40],
                points: pts(&|r| Some(r.loss_d)),
            },
            Series {
                name: "loss_g".into(),
                color: [31, 119, 180],
                points: pts(&|r| Some(r.loss_g)),
            },
        ],
        log_y: false,
        right: vec![Series {
            name: "SWD to real (lower is better)".into(),
            color: [44, 160, 44],
            points: pts(&|r| r.swd),
        }],
        right_label: "sliced Wasserstein distance".into(),
    };
    render_png(&p, 960, 540, path)
}

fn train(a: TrainArgs) -> Result<()> {
    match Device::parse(&a.device)?.cuda_backend()? {
        None => train_on(&CpuBackend::default(), a),
        Some(be) => train_on(&be, a),
    }
}

fn train_on<B: Backend>(be: &B, a: TrainArgs) -> Result<()> {
    let arch = parse_arch(&a.arch)?;
    if a.batch < 2 {
        return Err(Error::invalid(
            "--batch must be at least 2 (batch norm needs it)",
        ));
    }
    if !(a.lr > 0.0 && a.lr.is_finite() && (0.0..1.0).contains(&a.beta1)) {
        return Err(Error::invalid(format!(
            "--lr {} must be positive and --beta1 {} in [0, 1)",
            a.lr, a.beta1
        )));
    }
    if a.sample_every == 0 || a.checkpoint_every == 0 {
        return Err(Error::invalid(
            "--sample-every and --checkpoint-every must be at least 1",
        ));
    }
    let length = match (a.steps, a.epochs) {
        (Some(s), _) => Length::Steps(s),
        (None, Some(e)) => Length::Epochs(e),
        (None, None) => Length::Steps(1000),
    };
    let mut config = RunConfig::new(arch, DataSource::parse(&a.data));
    config.train = TrainConfig {
        batch: a.batch,
        lr: a.lr,
        beta1: a.beta1,
    };
    config.length = length;
    config.seed = a.seed;
    config.init = a.init.clone();
    config.noise = a.noise.clone();
    if a.ngf.is_some() || a.ndf.is_some() {
        if arch != Arch::Dcgan {
            return Err(Error::invalid("--ngf and --ndf apply to --arch dcgan"));
        }
        let (ngf, ndf) = (a.ngf.unwrap_or(64), a.ndf.unwrap_or(64));
        if ngf == 0 || ndf == 0 {
            return Err(Error::invalid("--ngf and --ndf must be at least 1"));
        }
        config.generator = Some(GeneratorSpec::dcgan(100, ngf, 3));
        config.discriminator = Some(DiscriminatorSpec::dcgan(ndf, 3));
    }
    let out = a.out.clone();
    let mut warn = |m: String| eprintln!("warning: {m}");
    let mut run = if a.resume {
        Run::resume(be, &out, config, &mut warn)?
    } else {
        if out.join(STATE_FILE).exists() || out.join(GENERATOR_FILE).exists() {
            return Err(Error::invalid(format!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                out.display()
            )));
        }
        Run::new(be, config, &mut warn)?
    };
    std::fs::create_dir_all(out.join("samples")).map_err(|e| Error::io(&out, e))?;
    let csv = out.join("metrics.csv");
    let mut rows = read_rows(&csv, run.step);
    write_rows(&csv, &rows)?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv)
        .map_err(|e| Error::io(&csv, e))?;

    // Ctrl-C / SIGTERM: finish the step, write the checkpoint, stop.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }

    let quality_every = a.quality_every.unwrap_or(a.sample_every);
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(run.total_steps);
        b.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
                .map_err(|e| Error::invalid(e.to_string()))?
                .progress_chars("=> "),
        );
        b.set_position(run.step);
        b
    };
    eprintln!(
        "training {} on {} ({} images), batch {}, {} steps, {} -> {}",
        arch.name(),
        run.config.data.describe(),
        run.data_len(),
        a.batch,
        run.total_steps,
        match be.name() {
            "cpu" => format!("{} threads", rayon::current_num_threads()),
            device => device.to_string(),
        },
        out.display()
    );
    let start = Instant::now();
    let mut last_plot = Instant::now();
    let mut rate = 0.0;
    while !run.done() {
        let t = Instant::now();
        let m: StepMetrics = run.step(be)?;
        let dt = t.elapsed().as_secs_f64();
        let ips = a.batch as f64 / dt.max(1e-9);
        rate = if rate == 0.0 {
            ips
        } else {
            0.9 * rate + 0.1 * ips
        };
        let step = run.step;
        let last = run.done();
        let swd = if quality_every > 0 && (step % quality_every == 0 || last) {
            Some(run.quality(be)?)
        } else {
            None
        };
        if !(m.loss_d.is_finite() && m.loss_g.is_finite()) {
            bar.abandon();
            return Err(Error::invalid(format!(
                "training diverged at step {step}: loss_d {}, loss_g {} (try a lower --lr)",
                m.loss_d, m.loss_g
            )));
        }
        let line = format!(
            "{step},{},{},{},{},{},{},{},{},{ips:.2},{:.3}",
            m.loss_d,
            m.loss_g,
            m.d_x,
            m.d_g_z1,
            m.d_g_z2,
            m.loss_d_real,
            m.loss_d_fake,
            swd.map(|v| format!("{v:.6}")).unwrap_or_default(),
            start.elapsed().as_secs_f64()
        );
        writeln!(file, "{line}").map_err(|e| Error::io(&csv, e))?;
        rows.extend(parse_row(&line));
        bar.set_position(step);
        bar.set_message(format!(
            "loss_d {:.3} loss_g {:.3} D(x) {:.3} D(G(z)) {:.3}/{:.3} {rate:.1} img/s{}",
            m.loss_d,
            m.loss_g,
            m.d_x,
            m.d_g_z1,
            m.d_g_z2,
            swd.map(|v| format!(" swd {v:.4}")).unwrap_or_default()
        ));
        let stopping = stop.load(Ordering::SeqCst);
        if step % a.sample_every == 0 || last || stopping {
            let images = run.samples(be)?;
            let path = out.join("samples").join(format!("step-{step:06}.png"));
            write_grid_png(
                &path,
                &images,
                SAMPLE_IMAGES,
                IMAGE_SIZE,
                range_of(arch),
                None,
            )?;
            if a.quiet {
                eprintln!(
                    "step {step}: loss_d {:.4} loss_g {:.4} D(x) {:.4} D(G(z)) {:.4}/{:.4}{}",
                    m.loss_d,
                    m.loss_g,
                    m.d_x,
                    m.d_g_z1,
                    m.d_g_z2,
                    swd.map(|v| format!(" swd {v:.4}")).unwrap_or_default()
                );
            }
        }
        if swd.is_some() || last || stopping || last_plot.elapsed().as_secs() >= 10 {
            plot(&out.join("losses.png"), &rows)?;
            last_plot = Instant::now();
        }
        if step % a.checkpoint_every == 0 || last || stopping {
            file.flush().map_err(|e| Error::io(&csv, e))?;
            run.save(be, &out)?;
        }
        if stopping && !last {
            bar.abandon();
            eprintln!(
                "stopped at step {step}; checkpoint written. Continue with the same command and --resume."
            );
            return Ok(());
        }
    }
    bar.finish();
    eprintln!(
        "done: {} steps in {:.1} s -> {}",
        run.step,
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
