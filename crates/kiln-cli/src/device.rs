//! `--device` of the model commands (`gpt2 generate`, `gpt2 train`, `dcgan sample|train`,
//! `bench dcgan`): where a model's weights, activations and ops live.
//!
//! `cpu` (the default) is kiln-nn's CPU backend; `cuda` (or `cuda:N`) is kiln-cuda's
//! `CudaBackend` on GPU N, every weight and activation resident on the GPU; `emulator` (not
//! listed in the help: for tests) is the same backend on kiln-cuda's CPU emulator of a GPU, so
//! that the GPU path of a command can run on a machine without one (slowly: small models only).
//! Without a GPU, `cuda` is the error `device: no CUDA device: …`.
use kiln_cuda::CudaBackend;
use kiln_tensor::{Error, Result};

/// Where a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    Emulator,
}

impl Device {
    /// `cpu`, `cuda`, `cuda:N` or `emulator`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "emulator" => Ok(Device::Emulator),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::invalid(format!("--device must be cpu, cuda or cuda:N, not `{s}`"))
                }),
        }
    }

    /// The CUDA backend of a `cuda` or `emulator` device (None for `cpu`).
    pub fn cuda_backend(self) -> Result<Option<CudaBackend>> {
        match self {
            Device::Cpu => Ok(None),
            Device::Cuda(n) => CudaBackend::new(n).map(Some),
            Device::Emulator => CudaBackend::emulator().map(Some),
        }
    }
}

/// The help text of `--device`.
pub const HELP: &str = "Where the model runs: cpu, or cuda (cuda:N for GPU N: every weight and \
                        activation stays on the GPU)";
