//! Device errors. They convert into [`kiln_tensor::Error::Device`], which is what every public
//! function returns, so a caller sees one error type; the message names the kernel and carries
//! the NVRTC log or the driver's error code.
use std::fmt;

/// What went wrong on (or while looking for) a CUDA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaError {
    /// No usable device: no driver library, no GPU, or a bad ordinal.
    NoDevice(String),
    /// NVRTC (`libnvrtc.so`) could not be found or loaded.
    NoNvrtc(String),
    /// NVRTC rejected a kernel file; `log` is its full compile log.
    Compile {
        file: String,
        options: Vec<String>,
        log: String,
    },
    /// A driver call failed (`error` is the `CUresult` name).
    Driver { context: String, error: String },
    /// A launch that does not fit the device's limits (grid, block, shared memory).
    Launch { kernel: String, reason: String },
    /// The CPU emulator failed to build or run a kernel.
    Emulator(String),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NoDevice(why) => write!(f, "no CUDA device: {why}"),
            CudaError::NoNvrtc(why) => write!(f, "NVRTC is not available: {why}"),
            CudaError::Compile { file, options, log } => write!(
                f,
                "NVRTC failed to compile {file} (options: {}):\n{}",
                options.join(" "),
                log.trim_end()
            ),
            CudaError::Driver { context, error } => write!(f, "{context}: {error}"),
            CudaError::Launch { kernel, reason } => {
                write!(
                    f,
                    "kernel `{kernel}`: launch does not fit the device: {reason}"
                )
            }
            CudaError::Emulator(why) => write!(f, "emulator: {why}"),
        }
    }
}

impl std::error::Error for CudaError {}

impl From<CudaError> for kiln_tensor::Error {
    fn from(e: CudaError) -> Self {
        kiln_tensor::Error::Device(e.to_string())
    }
}

/// A driver error in `context` (e.g. "kernel `softmax_rows`: launch").
pub(crate) fn driver(context: impl Into<String>, e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver {
        context: context.into(),
        error: format!("{e:?}"),
    }
}

/// True when `e` is the "no CUDA device" error (no driver, no GPU): what a caller that may run
/// without a GPU checks before it reports a failure.
pub fn is_no_device(e: &kiln_tensor::Error) -> bool {
    matches!(e, kiln_tensor::Error::Device(m) if m.starts_with("no CUDA device"))
}
