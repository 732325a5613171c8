//! kiln-cuda: kiln's second device.
//!
//! The kernels are kiln's own CUDA C, one concern per file in the top-level `kernels/` folder
//! (no cuBLAS, cuDNN or CUTLASS). They are embedded in this library, compiled at run time by
//! NVRTC (once per device and architecture, see [`CudaDevice`]'s module cache) and launched
//! through cudarc, so building kiln never needs a CUDA toolkit and never fails on a machine
//! without a GPU: [`CudaDevice::new`] then returns the error "no CUDA device: …".
//!
//! | module | what |
//! |---|---|
//! | [`device`] | [`CudaDevice`]: discovery, context and stream, limits, module cache, checked launches, timing |
//! | [`buffer`] | [`CudaBuf`]: device memory of f32, bf16, f16 or i32 elements |
//! | [`nvrtc`] | finding NVRTC, compiling a kernel file with the runtime's options, ptxas reports |
//! | [`sources`] | the embedded kernel files |
//! | [`cache`] | the on-disk cache of compiled kernel images (once per architecture, not per process) |
//! | [`ops`] | one function per op: validates sizes, picks the kernel, launches |
//! | [`backend`] | [`CudaBackend`]: kiln-nn's op interface on the device, so kiln's models run on it |
//! | [`emu`] | the CPU emulator device that tests run every kernel on (g++ + `kernels/emu/emu.h`) |
//!
//! The CPU backend (`kiln-cpu`) is the reference: every op here is tested against it, on the
//! emulator everywhere and on a GPU where there is one.
pub mod backend;
pub mod buffer;
pub mod cache;
pub mod device;
pub mod emu;
pub mod error;
pub mod nvrtc;
pub mod ops;
pub mod sources;

pub use backend::{CudaBackend, DeviceBuf};
pub use buffer::{CudaBuf, DeviceElement};
pub use device::{driver_present, Arg, CudaDevice, DeviceInfo, HostCopies, LaunchDims};
pub use emu::EmuOptions;
pub use error::{is_no_device, CudaError};
