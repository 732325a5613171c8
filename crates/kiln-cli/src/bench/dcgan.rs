//! `kiln bench dcgan`: the generator's forward pass (eval mode) or, with `--train`, one full
//! training iteration of the PyTorch DCGAN example (D on a real and a fake batch, D step, G
//! step), on random weights and data. `--device cuda` runs it on the GPU (kiln-cuda's
//! `CudaBackend`: every weight, activation, gradient and moment on the device; the step's six
//! scalars are its only copies back); times are wall-clock per iteration, the GPU's work
//! finished (a training step ends with its scalars; a forward pass is followed by a
//! synchronisation).
use super::{median_ms, random_f32, with_threads, BenchRecord};
use crate::device::Device;
use clap::Args;
use kiln_models::dcgan::train::{Gan, TrainConfig};
use kiln_models::dcgan::{Arch, Discriminator, DiscriminatorSpec, Generator, GeneratorSpec};
use kiln_models::gpt2::Rng;
use kiln_nn::backend::{Backend, CpuBackend};
use kiln_nn::layers::{Layer, Mode, Sequential};
use kiln_tensor::{Error, Result};
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct DcganBenchArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// `dcgan` (the PyTorch example) or `seed`.
    #[arg(long, default_value = "dcgan")]
    pub arch: String,
    /// Time one training iteration instead of the generator's forward pass.
    #[arg(long)]
    pub train: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Minimum measuring time, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub min_time: f64,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda", help = crate::device::HELP)]
    pub device: String,
}

/// Multiply-adds ×2 of every convolution and linear layer's forward pass for `input`.
fn forward_flops<B: Backend>(be: &B, net: &mut Sequential<B>, input: [usize; 4]) -> Result<f64> {
    net.prepare(be, input)?;
    let mut shape = input;
    let mut flops = 0.0;
    for layer in &net.layers {
        match layer {
            Layer::Conv(c) => {
                let g = c.geometry(shape)?;
                flops += g.flops();
                shape = g.output_shape();
            }
            Layer::Linear(l) => {
                flops += 2.0 * (shape[0] * l.in_features * l.out_features) as f64;
                shape = [shape[0], l.out_features, 1, 1];
            }
            Layer::Unflatten(chw) => shape = [shape[0], chw[0], chw[1], chw[2]],
            Layer::Flatten => shape = [shape[0], shape[1] * shape[2] * shape[3], 1, 1],
            _ => {}
        }
    }
    Ok(flops)
}

/// Peak resident memory of this process so far, in MiB (`VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: DcganBenchArgs) -> Result<()> {
    let arch = Arch::parse(&args.arch).ok_or_else(|| {
        Error::invalid(format!("--arch {}: expected `dcgan` or `seed`", args.arch))
    })?;
    if args.batch < 2 {
        return Err(Error::invalid("--batch must be at least 2"));
    }
    let threads = args.threads.unwrap_or_else(super::default_threads);
    let device = Device::parse(&args.device)?;
    let record = with_threads(Some(threads), || -> Result<BenchRecord> {
        match device.cuda_backend()? {
            None => {
                let peak = kiln_cpu::peak::quick(threads).fma_gflops(threads);
                bench_on(
                    &CpuBackend::default(),
                    &args,
                    arch,
                    threads,
                    peak,
                    || Ok(()),
                )
            }
            Some(be) => {
                let info = be.device().info().clone();
                let mut r = bench_on(
                    &be,
                    &args,
                    arch,
                    info.multiprocessors as usize,
                    info.peak_f32_flops() / 1e9,
                    || be.synchronize(),
                )?;
                r.extra.insert("device".into(), be.name().into());
                r.extra
                    .insert("device_name".into(), info.name.clone().into());
                r.extra
                    .insert("tflops".into(), (r.gflops.unwrap_or(0.0) / 1e3).into());
                Ok(r)
            }
        }
    })??;
    record.print(args.json);
    Ok(())
}

/// The benchmark on one backend: `threads` is what the record reports (the CPU's threads, the
/// GPU's multiprocessors), `peak` the f32 GFLOP/s its fraction is of, `sync` waits for the
/// device's queued work.
fn bench_on<B: Backend>(
    be: &B,
    args: &DcganBenchArgs,
    arch: Arch,
    threads: usize,
    peak: f64,
    sync: impl Fn() -> Result<()>,
) -> Result<BenchRecord> {
    let mut rng = Rng::new(1);
    let b = args.batch;
    let (gs, ds) = (
        GeneratorSpec::default_for(arch),
        DiscriminatorSpec::default_for(arch),
    );
    kiln_models::memory::check(
        kiln_models::dcgan::memory_need(&gs, args.train.then_some(&ds), b),
        &format!("bench dcgan at --batch {b}"),
        "use a smaller --batch",
    )?;
    let mut g = Generator::init(be, GeneratorSpec::default_for(arch), &mut rng)?;
    let mut d = Discriminator::init(be, DiscriminatorSpec::default_for(arch), &mut rng)?;
    let nz = g.spec.nz;
    let g_flops = forward_flops(be, &mut g.net, [b, nz, 1, 1])?;
    let d_flops = forward_flops(be, &mut d.net, [b, d.spec.nc, 64, 64])?;
    let min_time = Duration::from_secs_f64(args.min_time);
    let (op, ms, flops) = if args.train {
        let mut gan = Gan::new(
            be,
            g,
            d,
            TrainConfig {
                batch: b,
                ..Default::default()
            },
        )?;
        let real = random_f32(gan.batch_len(), 2);
        let noise = random_f32(gan.noise_len(), 3);
        let mut err = None;
        let ms = median_ms(1, 3, min_time, || {
            if let Err(e) = gan.step(be, &real, &noise) {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        // G: forward + both gradients (3×); D: three forwards, two full backward passes
        // (2× each), one input-gradient pass (1×).
        ("dcgan_train_step", ms, 3.0 * g_flops + 8.0 * d_flops)
    } else {
        let z = be.upload(&random_f32(b * nz, 4))?;
        let mut err = None;
        let ms = median_ms(1, 3, min_time, || {
            if let Err(e) = g.forward(be, &z, b, Mode::Eval).and_then(|_| sync()) {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        ("dcgan_generate", ms, g_flops)
    };
    let gflops = flops / (ms * 1e6);
    let mut extra = serde_json::Map::new();
    extra.insert("arch".into(), arch.name().into());
    extra.insert("batch".into(), b.into());
    extra.insert("images_per_s".into(), (b as f64 / (ms / 1e3)).into());
    if let Some(rss) = peak_rss_mib() {
        extra.insert("peak_rss_mib".into(), rss.into());
    }
    Ok(BenchRecord {
        op: op.into(),
        shape: serde_json::json!([b, 3, 64, 64]),
        dtype: "f32".into(),
        threads,
        median_ms: ms,
        gflops: Some(gflops),
        gbps: None,
        peak_fraction: gflops / peak,
        extra,
    })
}
