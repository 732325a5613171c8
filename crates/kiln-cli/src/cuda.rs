//! `kiln cuda info|compile`: the CUDA device and its kernel cache.
//!
//! `info` prints what device 0 (or `--device N`) is and its limits; `compile` compiles every
//! kernel file for the given architectures into the kernel cache (`kiln_cuda::cache`; no GPU
//! needed, only NVRTC), so that a later run on a GPU of that architecture loads them instead of
//! compiling them.
use clap::{Args, Subcommand};
use kiln_cuda::nvrtc::Target;
use kiln_cuda::CudaDevice;
use kiln_tensor::{Error, Result};

#[derive(Subcommand, Debug)]
pub enum CudaCommand {
    /// The device's name, compute capability, limits and peak rates.
    Info(InfoArgs),
    /// Compile every kernel file into the kernel cache (no GPU needed).
    Compile(CompileArgs),
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// Real architectures (`XY` of `sm_XY`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "80,90")]
    pub arch: Vec<u32>,
    /// Cache folder (default: `$KILN_CUDA_CACHE`, else `~/.cache/kiln-cuda`).
    #[arg(long)]
    pub cache: Option<std::path::PathBuf>,
}

pub fn run(cmd: CudaCommand) -> Result<()> {
    match cmd {
        CudaCommand::Info(a) => {
            let dev = CudaDevice::new(a.device)?;
            let i = dev.info();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": i.name, "ordinal": i.ordinal,
                        "compute_capability": [i.compute_capability.0, i.compute_capability.1],
                        "multiprocessors": i.multiprocessors, "clock_mhz": i.clock_khz as f64 / 1e3,
                        "memory_gib": i.total_memory_bytes as f64 / (1u64 << 30) as f64,
                        "max_shared_per_block_optin": i.max_shared_per_block_optin,
                        "peak_f32_tflops": i.peak_f32_flops() / 1e12,
                        "peak_bf16_tflops": i.peak_bf16_flops() / 1e12,
                        "dram_gbps_theoretical": i.peak_dram_bytes_per_s() / 1e9,
                    })
                );
            } else {
                println!(
                    "{} (sm_{}), {} SMs at {:.0} MHz, {:.1} GiB; peaks: f32 {:.1} TFLOP/s, bf16 {:.1} TFLOP/s, DRAM {:.0} GB/s",
                    i.name,
                    i.arch(),
                    i.multiprocessors,
                    i.clock_khz as f64 / 1e3,
                    i.total_memory_bytes as f64 / (1u64 << 30) as f64,
                    i.peak_f32_flops() / 1e12,
                    i.peak_bf16_flops() / 1e12,
                    i.peak_dram_bytes_per_s() / 1e9
                );
            }
            Ok(())
        }
        CudaCommand::Compile(a) => {
            let dir = a
                .cache
                .clone()
                .or_else(kiln_cuda::cache::dir)
                .ok_or_else(|| Error::invalid("kiln cuda compile: the kernel cache is disabled"))?;
            for arch in &a.arch {
                for (file, cached, secs) in kiln_cuda::cache::fill(&dir, Target::Cubin(*arch))? {
                    println!(
                        "sm_{arch} {file:<18} {}",
                        if cached {
                            "cached".to_string()
                        } else {
                            format!("compiled in {secs:.1} s")
                        }
                    );
                }
            }
            println!("kernel cache: {}", dir.display());
            Ok(())
        }
    }
}
