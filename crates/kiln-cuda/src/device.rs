//! The device: discovery that never panics, a context and a stream, the module cache, buffers,
//! launches checked against the device's limits, and timing.
//!
//! A [`CudaDevice`] is either a real GPU (through cudarc's driver API) or the CPU emulator
//! ([`CudaDevice::emulator`], for tests: the same kernel files compiled by g++, see
//! `kernels/emu/emu.h`). Every op in [`crate::ops`] runs unchanged on both.
use crate::buffer::{CudaBuf, DeviceElement, Mem};
use crate::emu::{Emu, EmuModule, EmuOptions};
use crate::error::{driver, CudaError};
use crate::nvrtc::{self, Target};
use crate::sources::KernelFile;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, PushKernelArg};
use kiln_tensor::{DType, Error, Result, Tensor};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// What a device is and what it allows (from the driver's attributes).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub ordinal: usize,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100/H200.
    pub compute_capability: (u32, u32),
    pub multiprocessors: u32,
    pub max_threads_per_block: u32,
    pub max_block_dim: [u32; 3],
    pub max_grid_dim: [u32; 3],
    /// Shared memory a block gets without opting in (48 KiB).
    pub max_shared_per_block: u32,
    /// Shared memory a block may get after opting in (227 KiB on sm_90).
    pub max_shared_per_block_optin: u32,
    pub warp_size: u32,
    /// Peak SM clock, kHz.
    pub clock_khz: u32,
    /// Peak memory clock, kHz.
    pub memory_clock_khz: u32,
    pub memory_bus_width_bits: u32,
    pub total_memory_bytes: usize,
    /// True for the CPU emulator.
    pub emulated: bool,
}

impl DeviceInfo {
    /// `XY` of `sm_XY`.
    pub fn arch(&self) -> u32 {
        self.compute_capability.0 * 10 + self.compute_capability.1
    }

    /// Dense f32 FMA peak, FLOP/s: SMs × FP32 lanes per SM × 2 × clock.
    pub fn peak_f32_flops(&self) -> f64 {
        let lanes = match self.compute_capability {
            (8, 0) => 64.0, // A100: 64 FP32 lanes per SM
            (6, 0) => 64.0,
            _ => 128.0, // sm_70 counts 64 but is not a target; sm_86..sm_120: 128
        };
        self.multiprocessors as f64 * lanes * 2.0 * self.clock_khz as f64 * 1e3
    }

    /// Dense bf16/f16 tensor-core peak with f32 accumulation, FLOP/s: SMs × FLOP per SM per
    /// clock × clock. Per-SM rates: sm_80 2048, sm_90 4096 (reached by wgmma; mma.sync, which
    /// kiln uses, is measured below it), sm_86/89 512 (f32 accumulation on GeForce parts),
    /// sm_100 8192.
    pub fn peak_bf16_flops(&self) -> f64 {
        let per_sm_clk = match self.compute_capability {
            (8, 0) => 2048.0,
            (8, 7) => 1024.0,
            (8, _) => 512.0,
            (9, _) => 4096.0,
            (10, _) => 8192.0,
            (12, _) => 1024.0,
            _ => 1024.0,
        };
        self.multiprocessors as f64 * per_sm_clk * self.clock_khz as f64 * 1e3
    }

    /// Theoretical DRAM bandwidth, bytes/s: 2 (double data rate) × memory clock × bus width.
    pub fn peak_dram_bytes_per_s(&self) -> f64 {
        2.0 * self.memory_clock_khz as f64 * 1e3 * self.memory_bus_width_bits as f64 / 8.0
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory, bytes.
    pub smem: u32,
}

impl LaunchDims {
    /// A 1-D launch of `blocks × threads`.
    pub fn linear(blocks: u32, threads: u32, smem: u32) -> Self {
        LaunchDims {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            smem,
        }
    }
}

/// One kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    /// A buffer's address.
    Buf(&'a CudaBuf),
    /// The address of element `offset` of a buffer (checked to be inside it).
    At(&'a CudaBuf, usize),
    I32(i32),
    U32(u32),
    F32(f32),
    I64(i64),
    /// Three i64 passed as one 24-byte struct (a view's strides: `struct View` in the kernels).
    I64x3([i64; 3]),
    /// Sixteen i32 passed as one 64-byte struct (a convolution's geometry: `struct ConvGeom`).
    I32x16([i32; 16]),
    /// A struct of up to [`MAX_BLOB_WORDS`] 8-byte words passed by value (a table of buffer
    /// addresses and lengths: `struct DecodeBatch` in `attention.cu`). Kernel parameters travel
    /// with the launch: no copy to the device.
    Blob(&'a [u64]),
}

/// The largest [`Arg::Blob`], in 8-byte words (1 KiB; CUDA allows 4 KiB of parameters).
pub const MAX_BLOB_WORDS: usize = 128;

pub(crate) enum Imp {
    Gpu(Gpu),
    Emu(Emu),
}

pub(crate) struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    target: Target,
}

struct GpuFunction {
    func: CudaFunction,
    max_threads: u32,
    static_smem: u32,
    /// The dynamic shared memory this function has been allowed (opt-in) so far.
    dyn_allowed: u32,
}

struct GpuModule {
    module: Arc<CudaModule>,
    functions: HashMap<String, GpuFunction>,
    log: String,
}

enum LoadedModule {
    Gpu(GpuModule),
    Emu(Arc<EmuModule>),
}

/// A CUDA device (or the CPU emulator of one) with its stream and compiled modules.
pub struct CudaDevice {
    pub(crate) imp: Imp,
    info: DeviceInfo,
    /// Compiled modules, keyed by a hash of (file, expanded source, options, target).
    modules: Mutex<HashMap<u64, LoadedModule>>,
    copies: CopyCounter,
    /// Free scratch buffers of the ops (K-slice partials of the decode product, reduction
    /// partials), reused instead of allocated per call.
    scratch: Mutex<Vec<CudaBuf>>,
}

/// Scratch buffers a device keeps for reuse: at most this many.
const SCRATCH_KEEP: usize = 16;

/// Copies between the host and the device made so far through [`CudaDevice`]'s `write`, `read`
/// and the methods built on them (uploads, downloads): calls and bytes in each direction.
/// Kernel parameters (launch arguments) are not copies and are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCopies {
    pub to_device: usize,
    pub to_device_bytes: usize,
    pub to_host: usize,
    pub to_host_bytes: usize,
}

#[derive(Default)]
struct CopyCounter {
    to_device: std::sync::atomic::AtomicUsize,
    to_device_bytes: std::sync::atomic::AtomicUsize,
    to_host: std::sync::atomic::AtomicUsize,
    to_host_bytes: std::sync::atomic::AtomicUsize,
}

impl CopyCounter {
    fn count_to_device(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.to_device.fetch_add(1, Relaxed);
        self.to_device_bytes.fetch_add(bytes, Relaxed);
    }
    fn count_to_host(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.to_host.fetch_add(1, Relaxed);
        self.to_host_bytes.fetch_add(bytes, Relaxed);
    }
    fn get(&self) -> HostCopies {
        use std::sync::atomic::Ordering::Relaxed;
        HostCopies {
            to_device: self.to_device.load(Relaxed),
            to_device_bytes: self.to_device_bytes.load(Relaxed),
            to_host: self.to_host.load(Relaxed),
            to_host_bytes: self.to_host_bytes.load(Relaxed),
        }
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .finish()
    }
}

/// Whether the CUDA driver library can be loaded at all (never panics).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library's candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaDevice {
    /// The number of CUDA devices; 0 when there is no driver or no GPU (never panics).
    pub fn count() -> usize {
        if !driver_present() {
            return 0;
        }
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }

    /// Opens device `ordinal`: a context, a stream, its limits. Without a driver library or a
    /// GPU this is the error "no CUDA device: …" (see [`crate::is_no_device`]); it never panics.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        Ok(Self::open(ordinal)?)
    }

    fn open(ordinal: usize) -> std::result::Result<CudaDevice, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDevice(
                "the NVIDIA driver library (libcuda.so) is not installed".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| CudaError::NoDevice(format!("the driver reports {e:?}")))?;
        if count <= 0 {
            return Err(CudaError::NoDevice("the driver reports no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, the driver reports {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::NoDevice(format!("opening device {ordinal}: {e:?}")))?;
        // One stream: kernels are ordered by it, so cudarc's per-buffer events are not needed.
        // SAFETY: every launch and copy of this device goes through `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| driver("creating a stream", e))?;
        let attr = |a: CUdevice_attribute| -> std::result::Result<u32, CudaError> {
            ctx.attribute(a)
                .map(|v| v.max(0) as u32)
                .map_err(|e| driver(format!("reading device attribute {a:?}"), e))
        };
        use CUdevice_attribute as A;
        let info = DeviceInfo {
            name: ctx.name().unwrap_or_else(|_| "CUDA device".into()),
            ordinal,
            compute_capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_threads_per_block: attr(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
            max_block_dim: [
                attr(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)?,
                attr(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)?,
                attr(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)?,
            ],
            max_grid_dim: [
                attr(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
                attr(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
                attr(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)?,
            ],
            max_shared_per_block: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
            max_shared_per_block_optin: attr(
                A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )?,
            warp_size: attr(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE)?,
            clock_khz: attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?,
            memory_clock_khz: attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?,
            memory_bus_width_bits: attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
            total_memory_bytes: ctx.total_mem().unwrap_or(0),
            emulated: false,
        };
        keep_pool_memory(&ctx);
        let target = pick_target(info.arch())?;
        Ok(CudaDevice {
            imp: Imp::Gpu(Gpu {
                ctx,
                stream,
                target,
            }),
            info,
            modules: Mutex::new(HashMap::new()),
            copies: CopyCounter::default(),
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// The CPU emulator with sm_90's limits: kernels compiled as C++ by g++ (or
    /// `$KILN_EMU_CXX`) and run one thread block at a time, one fiber per CUDA thread. Slow:
    /// for tests on small sizes. Errors if no C++ compiler is found.
    pub fn emulator() -> Result<CudaDevice> {
        Self::emulator_with(EmuOptions::default())
    }

    /// [`CudaDevice::emulator`] with options (e.g. threads run in reverse order).
    pub fn emulator_with(opts: EmuOptions) -> Result<CudaDevice> {
        let emu = Emu::new(opts)?;
        let info = DeviceInfo {
            name: format!(
                "kiln CPU emulator ({} thread order, sm_90 limits)",
                if opts.reverse { "reverse" } else { "forward" }
            ),
            ordinal: 0,
            compute_capability: (9, 0),
            multiprocessors: 132,
            max_threads_per_block: 1024,
            max_block_dim: [1024, 1024, 64],
            max_grid_dim: [i32::MAX as u32, 65535, 65535],
            max_shared_per_block: 48 * 1024,
            max_shared_per_block_optin: 227 * 1024,
            warp_size: 32,
            clock_khz: 1_980_000,
            memory_clock_khz: 2_619_000,
            memory_bus_width_bits: 5120,
            total_memory_bytes: 1 << 30,
            emulated: true,
        };
        Ok(CudaDevice {
            imp: Imp::Emu(emu),
            info,
            modules: Mutex::new(HashMap::new()),
            copies: CopyCounter::default(),
            scratch: Mutex::new(Vec::new()),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// True for the CPU emulator.
    pub fn is_emulated(&self) -> bool {
        self.info.emulated
    }

    /// The host↔device copies made so far (see [`HostCopies`]).
    pub fn host_copies(&self) -> HostCopies {
        self.copies.get()
    }

    /// Waits until every queued kernel and copy has finished.
    pub fn synchronize(&self) -> Result<()> {
        if let Imp::Gpu(g) = &self.imp {
            g.stream
                .synchronize()
                .map_err(|e| driver("synchronizing the stream", e))?;
        }
        Ok(())
    }

    // ---- buffers --------------------------------------------------------------------------

    /// A buffer of `len` elements of `dtype` (f32, bf16, f16 or i32), all bits zero.
    pub fn zeros(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        let bytes = byte_len(dtype, len)?;
        if bytes == 0 {
            return Ok(CudaBuf::new(Mem::Empty, 0, dtype));
        }
        let mem = match &self.imp {
            Imp::Gpu(g) => Mem::Gpu(
                g.stream
                    .alloc_zeros::<u8>(bytes.max(1))
                    .map_err(|e| driver(format!("allocating {bytes} bytes"), e))?,
            ),
            Imp::Emu(_) => Mem::Emu(crate::emu::HostMem::new(bytes, 0)?),
        };
        Ok(CudaBuf::new(mem, len, dtype))
    }

    /// A buffer whose contents are unspecified (the emulator fills it with NaN bytes).
    pub fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        let bytes = byte_len(dtype, len)?;
        if bytes == 0 {
            return Ok(CudaBuf::new(Mem::Empty, 0, dtype));
        }
        let mem = match &self.imp {
            Imp::Gpu(g) => Mem::Gpu(
                // SAFETY: the contents are documented as unspecified; u8 has no invalid values.
                unsafe { g.stream.alloc::<u8>(bytes.max(1)) }
                    .map_err(|e| driver(format!("allocating {bytes} bytes"), e))?,
            ),
            Imp::Emu(_) => Mem::Emu(crate::emu::HostMem::new(bytes, 0xFF)?),
        };
        Ok(CudaBuf::new(mem, len, dtype))
    }

    /// A scratch buffer of at least `len` f32 elements whose contents are unspecified, for a
    /// kernel that writes every element it later reads; give it back with
    /// [`CudaDevice::recycle`] once the kernels that use it are queued. Every launch and copy
    /// of a device is ordered on its one stream, so a buffer given back while its kernels are
    /// still queued is reused only by work queued after them.
    pub fn scratch(&self, len: usize) -> Result<CudaBuf> {
        if let Ok(mut pool) = self.scratch.lock() {
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(pool.swap_remove(i));
            }
        }
        let rounded = len.checked_next_power_of_two().unwrap_or(len).max(256);
        self.alloc(DType::F32, rounded)
    }

    /// Gives a buffer from [`CudaDevice::scratch`] back for reuse.
    pub fn recycle(&self, buf: CudaBuf) {
        if buf.dtype() != DType::F32 || buf.is_empty() {
            return;
        }
        if let Ok(mut pool) = self.scratch.lock() {
            if pool.len() < SCRATCH_KEEP {
                pool.push(buf);
            } else if let Some(i) = (0..pool.len()).min_by_key(|&i| pool[i].len()) {
                if pool[i].len() < buf.len() {
                    pool[i] = buf;
                }
            }
        }
    }

    /// A new buffer holding `data`.
    pub fn upload<T: DeviceElement>(&self, data: &[T]) -> Result<CudaBuf> {
        let mut buf = self.alloc(T::DTYPE, data.len())?;
        self.write(&mut buf, 0, data)?;
        Ok(buf)
    }

    /// A new buffer holding a float tensor's elements in its own dtype (f32, bf16 or f16),
    /// row-major; a contiguous tensor (also one borrowed from a memory map) is copied straight
    /// from its bytes.
    pub fn upload_tensor(&self, t: &Tensor) -> Result<CudaBuf> {
        let dtype = t.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::invalid(format!(
                "upload_tensor: dtype {dtype} is not a float storage type"
            )));
        }
        let owned;
        let t = if t.is_contiguous() {
            t
        } else {
            owned = t.contiguous()?;
            &owned
        };
        let bytes = t.as_bytes()?;
        let mut buf = self.alloc(dtype, t.numel())?;
        self.write_bytes(&mut buf, 0, bytes)?;
        Ok(buf)
    }

    /// Copies `data` into `buf` starting at element `offset`.
    pub fn write<T: DeviceElement>(
        &self,
        buf: &mut CudaBuf,
        offset: usize,
        data: &[T],
    ) -> Result<()> {
        buf.expect_dtype("write", T::DTYPE)?;
        self.write_bytes(buf, offset, bytemuck::cast_slice(data))
    }

    fn write_bytes(&self, buf: &mut CudaBuf, offset: usize, bytes: &[u8]) -> Result<()> {
        let es = buf.dtype().size_in_bytes();
        let start = offset * es;
        if offset > buf.len() || bytes.len() > (buf.len() - offset) * es {
            return Err(Error::invalid(format!(
                "write: {} bytes at element {offset} overrun a buffer of {} elements",
                bytes.len(),
                buf.len()
            )));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.copies.count_to_device(bytes.len());
        match (&self.imp, &mut buf.mem) {
            (Imp::Gpu(g), Mem::Gpu(s)) => {
                let mut view = s.slice_mut(start..start + bytes.len());
                g.stream
                    .memcpy_htod(bytes, &mut view)
                    .map_err(|e| driver("copying to the device", e))?;
            }
            (Imp::Emu(_), Mem::Emu(h)) => h.write(start, bytes),
            _ => {
                return Err(Error::invalid(
                    "write: the buffer belongs to another device",
                ))
            }
        }
        Ok(())
    }

    /// The buffer's elements (waits for the queued work first).
    pub fn download<T: DeviceElement>(&self, buf: &CudaBuf) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); buf.len()];
        self.read(buf, 0, &mut out)?;
        Ok(out)
    }

    /// The buffer's elements converted to f32 (f32, bf16 or f16 buffers).
    pub fn download_f32(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        match buf.dtype() {
            DType::F32 => self.download::<f32>(buf),
            DType::BF16 => Ok(self
                .download::<half::bf16>(buf)?
                .into_iter()
                .map(|v| v.to_f32())
                .collect()),
            DType::F16 => Ok(self
                .download::<half::f16>(buf)?
                .into_iter()
                .map(|v| v.to_f32())
                .collect()),
            d => Err(Error::invalid(format!("download_f32: a {d} buffer"))),
        }
    }

    /// Copies `out.len()` elements starting at element `offset` of `buf` into `out`.
    pub fn read<T: DeviceElement>(
        &self,
        buf: &CudaBuf,
        offset: usize,
        out: &mut [T],
    ) -> Result<()> {
        buf.expect_dtype("read", T::DTYPE)?;
        if offset > buf.len() || out.len() > buf.len() - offset {
            return Err(Error::invalid(format!(
                "read: {} elements at {offset} overrun a buffer of {} elements",
                out.len(),
                buf.len()
            )));
        }
        if out.is_empty() {
            return Ok(());
        }
        let es = buf.dtype().size_in_bytes();
        let start = offset * es;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.copies.count_to_host(bytes.len());
        match (&self.imp, &buf.mem) {
            (Imp::Gpu(g), Mem::Gpu(s)) => {
                let view = s.slice(start..start + bytes.len());
                g.stream
                    .memcpy_dtoh(&view, bytes)
                    .map_err(|e| driver("copying from the device", e))?;
                g.stream
                    .synchronize()
                    .map_err(|e| driver("synchronizing after a copy", e))?;
            }
            (Imp::Emu(_), Mem::Emu(h)) => h.read(start, bytes),
            _ => return Err(Error::invalid("read: the buffer belongs to another device")),
        }
        Ok(())
    }

    /// `dst[..src.len()] = src` on the device (same dtype).
    pub fn copy(&self, src: &CudaBuf, dst: &mut CudaBuf) -> Result<()> {
        self.copy_prefix(src, dst, src.len())
    }

    /// `dst[..n] = src[..n]` on the device (same dtype).
    pub fn copy_prefix(&self, src: &CudaBuf, dst: &mut CudaBuf, n: usize) -> Result<()> {
        self.copy_range(src, 0, dst, 0, n)
    }

    /// `dst[dst_offset..][..n] = src[src_offset..][..n]` on the device (same dtype; the two
    /// are distinct buffers, so the ranges never overlap).
    pub fn copy_range(
        &self,
        src: &CudaBuf,
        src_offset: usize,
        dst: &mut CudaBuf,
        dst_offset: usize,
        n: usize,
    ) -> Result<()> {
        let fits = |off: usize, len: usize| off.checked_add(n).is_some_and(|e| e <= len);
        if src.dtype() != dst.dtype()
            || !fits(src_offset, src.len())
            || !fits(dst_offset, dst.len())
        {
            return Err(Error::invalid(format!(
                "copy: {n} elements from element {src_offset} of {} {} into element {dst_offset} of {} {}",
                src.len(),
                src.dtype(),
                dst.len(),
                dst.dtype()
            )));
        }
        let es = src.dtype().size_in_bytes();
        let (so, dof, n) = (src_offset * es, dst_offset * es, n * es);
        if n == 0 {
            return Ok(());
        }
        match (&self.imp, &src.mem, &mut dst.mem) {
            (Imp::Gpu(g), Mem::Gpu(s), Mem::Gpu(d)) => {
                let sv = s.slice(so..so + n);
                let mut dv = d.slice_mut(dof..dof + n);
                g.stream
                    .memcpy_dtod(&sv, &mut dv)
                    .map_err(|e| driver("device-to-device copy", e))?;
            }
            (Imp::Emu(_), Mem::Emu(s), Mem::Emu(d)) => d.copy_from(s, so, dof, n),
            _ => return Err(Error::invalid("copy: the buffers belong to another device")),
        }
        Ok(())
    }

    /// Sets every element of `buf` to zero bits.
    pub fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        match (&self.imp, &mut buf.mem) {
            (Imp::Gpu(g), Mem::Gpu(s)) => {
                g.stream.memset_zeros(s).map_err(|e| driver("memset", e))?
            }
            (Imp::Emu(_), Mem::Emu(h)) => h.fill(0),
            (_, Mem::Empty) => {}
            _ => {
                return Err(Error::invalid(
                    "fill_zero: the buffer belongs to another device",
                ))
            }
        }
        Ok(())
    }

    // ---- timing ---------------------------------------------------------------------------

    /// Runs `f` (which queues work) and returns the device time it took, in seconds, measured
    /// with events on the stream. On the emulator: host wall time.
    pub fn time<F: FnMut() -> Result<()>>(&self, mut f: F) -> Result<f64> {
        match &self.imp {
            Imp::Gpu(g) => {
                use cudarc::driver::sys::CUevent_flags;
                g.ctx
                    .bind_to_thread()
                    .map_err(|e| driver("binding the context", e))?;
                let ev = || {
                    g.ctx
                        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| driver("creating an event", e))
                };
                let (start, end) = (ev()?, ev()?);
                start
                    .record(&g.stream)
                    .map_err(|e| driver("recording an event", e))?;
                f()?;
                end.record(&g.stream)
                    .map_err(|e| driver("recording an event", e))?;
                let ms = start
                    .elapsed_ms(&end)
                    .map_err(|e| driver("reading an event", e))?;
                Ok(ms as f64 * 1e-3)
            }
            Imp::Emu(_) => {
                let t = std::time::Instant::now();
                f()?;
                Ok(t.elapsed().as_secs_f64())
            }
        }
    }

    // ---- modules and launches -------------------------------------------------------------

    /// Compiles (once) and loads `file`; returns its compile log (ptxas report on a GPU).
    pub fn load(&self, file: &'static KernelFile) -> Result<String> {
        let mut mods = self.modules.lock().map_err(|_| poisoned())?;
        let key = self.module_key(file);
        self.ensure_module(&mut mods, key, file)?;
        Ok(match mods.get(&key) {
            Some(LoadedModule::Gpu(m)) => m.log.clone(),
            _ => String::new(),
        })
    }

    fn module_key(&self, file: &KernelFile) -> u64 {
        // In-process only: the file (a static) and what it is compiled for.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (file as *const KernelFile as usize).hash(&mut h);
        match &self.imp {
            Imp::Gpu(g) => g.target.hash(&mut h),
            Imp::Emu(e) => e.options().reverse.hash(&mut h),
        }
        h.finish()
    }

    fn ensure_module(
        &self,
        mods: &mut HashMap<u64, LoadedModule>,
        key: u64,
        file: &'static KernelFile,
    ) -> std::result::Result<(), CudaError> {
        if mods.contains_key(&key) {
            return Ok(());
        }
        let loaded = match &self.imp {
            Imp::Gpu(g) => {
                let img = crate::cache::compile(file, g.target)?;
                let ptx = match g.target {
                    Target::Cubin(_) => cudarc::nvrtc::Ptx::from_binary(img.bytes),
                    Target::Ptx(_) => cudarc::nvrtc::Ptx::from_src(
                        String::from_utf8_lossy(&img.bytes)
                            .trim_end_matches('\0')
                            .to_string(),
                    ),
                };
                let module = g
                    .ctx
                    .load_module(ptx)
                    .map_err(|e| driver(format!("loading module {}", file.name), e))?;
                if std::env::var_os("KILN_CUDA_VERBOSE").is_some() {
                    eprintln!(
                        "kiln-cuda: {} {} for {}:\n{}",
                        if img.from_cache {
                            "loaded cached"
                        } else {
                            "compiled"
                        },
                        file.name,
                        g.target.arch_flag(),
                        img.log
                    );
                }
                LoadedModule::Gpu(GpuModule {
                    module,
                    functions: HashMap::new(),
                    log: img.log,
                })
            }
            Imp::Emu(e) => LoadedModule::Emu(Arc::new(e.build(file)?)),
        };
        mods.insert(key, loaded);
        Ok(())
    }

    /// Launches `kernel` of `file` with `args` after checking `dims` against the device's and
    /// the function's limits. A grid with a zero dimension launches nothing.
    pub fn launch(
        &self,
        file: &'static KernelFile,
        kernel: &str,
        dims: LaunchDims,
        args: &[Arg<'_>],
    ) -> Result<()> {
        Ok(self.launch_inner(file, kernel, dims, args)?)
    }

    fn launch_inner(
        &self,
        file: &'static KernelFile,
        kernel: &str,
        dims: LaunchDims,
        args: &[Arg<'_>],
    ) -> std::result::Result<(), CudaError> {
        let fail = |reason: String| CudaError::Launch {
            kernel: kernel.to_string(),
            reason,
        };
        if dims.grid.contains(&0) {
            return Ok(());
        }
        let info = &self.info;
        for a in 0..3 {
            if dims.grid[a] > info.max_grid_dim[a] {
                return Err(fail(format!(
                    "grid {:?} exceeds the device's {:?}",
                    dims.grid, info.max_grid_dim
                )));
            }
            if dims.block[a] == 0 || dims.block[a] > info.max_block_dim[a] {
                return Err(fail(format!(
                    "block {:?} outside the device's 1..={:?}",
                    dims.block, info.max_block_dim
                )));
            }
        }
        let threads = dims.block.iter().map(|&b| b as u64).product::<u64>();
        if threads > info.max_threads_per_block as u64 {
            return Err(fail(format!(
                "{threads} threads per block, the device allows {}",
                info.max_threads_per_block
            )));
        }
        if dims.smem > info.max_shared_per_block_optin {
            return Err(fail(format!(
                "{} bytes of dynamic shared memory, the device allows {}",
                dims.smem, info.max_shared_per_block_optin
            )));
        }
        // Buffer arguments: element offsets inside their buffers; the device they belong to.
        for (i, a) in args.iter().enumerate() {
            if let Arg::At(b, off) = a {
                if *off > b.len() {
                    return Err(fail(format!(
                        "argument {i}: offset {off} past the end of a buffer of {} elements",
                        b.len()
                    )));
                }
            }
            if let Arg::Buf(b) | Arg::At(b, _) = a {
                let ok = matches!(
                    (&self.imp, &b.mem),
                    (Imp::Gpu(_), Mem::Gpu(_)) | (Imp::Emu(_), Mem::Emu(_)) | (_, Mem::Empty)
                );
                if !ok {
                    return Err(fail(format!("argument {i}: a buffer of another device")));
                }
            }
        }
        let mut mods = self
            .modules
            .lock()
            .map_err(|_| CudaError::Emulator("poisoned".into()))?;
        let key = self.module_key(file);
        self.ensure_module(&mut mods, key, file)?;
        match (&self.imp, mods.get_mut(&key)) {
            (Imp::Gpu(g), Some(LoadedModule::Gpu(m))) => {
                // Function attributes need the context current on this thread.
                g.ctx
                    .bind_to_thread()
                    .map_err(|e| driver(format!("kernel `{kernel}`: binding the context"), e))?;
                if !m.functions.contains_key(kernel) {
                    let func = m.module.load_function(kernel).map_err(|e| {
                        driver(format!("kernel `{kernel}` ({}): loading", file.name), e)
                    })?;
                    let max_threads = func
                        .get_attribute(
                            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
                        )
                        .map_err(|e| driver(format!("kernel `{kernel}`: attributes"), e))?
                        as u32;
                    let static_smem = func
                        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                        .map_err(|e| driver(format!("kernel `{kernel}`: attributes"), e))?
                        as u32;
                    m.functions.insert(
                        kernel.to_string(),
                        GpuFunction {
                            func,
                            max_threads,
                            static_smem,
                            dyn_allowed: info.max_shared_per_block.saturating_sub(static_smem),
                        },
                    );
                }
                let f = m.functions.get_mut(kernel).expect("inserted above");
                if threads > f.max_threads as u64 {
                    return Err(fail(format!(
                        "{threads} threads per block, its launch bounds allow {}",
                        f.max_threads
                    )));
                }
                let total_smem = f.static_smem as u64 + dims.smem as u64;
                if total_smem > info.max_shared_per_block_optin as u64 {
                    return Err(fail(format!(
                        "{} bytes of shared memory ({} static + {} dynamic), the device allows {}",
                        total_smem, f.static_smem, dims.smem, info.max_shared_per_block_optin
                    )));
                }
                if dims.smem > f.dyn_allowed {
                    f.func
                        .set_attribute(
                            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            dims.smem as i32,
                        )
                        .map_err(|e| {
                            driver(
                                format!(
                                    "kernel `{kernel}`: opting in to {} bytes of shared memory",
                                    dims.smem
                                ),
                                e,
                            )
                        })?;
                    f.dyn_allowed = dims.smem;
                }
                let func = f.func.clone();
                drop(mods);
                gpu_launch(g, &func, kernel, dims, args)
            }
            (Imp::Emu(e), Some(LoadedModule::Emu(m))) => {
                let m = m.clone();
                drop(mods);
                e.launch(&m, file, kernel, dims, args)
            }
            _ => Err(CudaError::Emulator("module cache out of step".into())),
        }
    }
}

fn gpu_launch(
    g: &Gpu,
    func: &CudaFunction,
    kernel: &str,
    dims: LaunchDims,
    args: &[Arg<'_>],
) -> std::result::Result<(), CudaError> {
    // Every argument as its bits: device addresses as u64, scalars as themselves.
    enum Val {
        U64(u64),
        I32(i32),
        U32(u32),
        F32(f32),
        I64(i64),
        I64x3([i64; 3]),
        I32x16([i32; 16]),
        Blob(Box<[u64; MAX_BLOB_WORDS]>),
    }
    let mut vals = Vec::with_capacity(args.len());
    for a in args {
        vals.push(match *a {
            Arg::Buf(b) => Val::U64(b.device_address(&g.stream)),
            Arg::At(b, off) => {
                Val::U64(b.device_address(&g.stream) + (off * b.dtype().size_in_bytes()) as u64)
            }
            Arg::I32(v) => Val::I32(v),
            Arg::U32(v) => Val::U32(v),
            Arg::F32(v) => Val::F32(v),
            Arg::I64(v) => Val::I64(v),
            Arg::I64x3(v) => Val::I64x3(v),
            Arg::I32x16(v) => Val::I32x16(v),
            Arg::Blob(words) => {
                if words.len() > MAX_BLOB_WORDS {
                    return Err(CudaError::Launch {
                        kernel: kernel.to_string(),
                        reason: format!("a parameter struct of {} words", words.len()),
                    });
                }
                let mut b = Box::new([0u64; MAX_BLOB_WORDS]);
                b[..words.len()].copy_from_slice(words);
                Val::Blob(b)
            }
        });
    }
    let mut builder = g.stream.launch_builder(func);
    for v in &vals {
        match v {
            Val::U64(x) => builder.arg(x),
            Val::I32(x) => builder.arg(x),
            Val::U32(x) => builder.arg(x),
            Val::F32(x) => builder.arg(x),
            Val::I64(x) => builder.arg(x),
            Val::I64x3(x) => builder.arg(x),
            Val::I32x16(x) => builder.arg(x),
            // The driver copies as many bytes as the kernel's parameter has from this address.
            Val::Blob(x) => builder.arg(&**x),
        };
    }
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (dims.grid[0], dims.grid[1], dims.grid[2]),
        block_dim: (dims.block[0], dims.block[1], dims.block[2]),
        shared_mem_bytes: dims.smem,
    };
    // SAFETY: the argument list matches the kernel's parameters (each op in `ops` passes them
    // in the order of the kernel's signature, checked by the emulator tests), buffers are live
    // device allocations of this context and their sizes were validated by the op.
    unsafe { builder.launch(cfg) }
        .map(|_| ())
        .map_err(|e| driver(format!("kernel `{kernel}`: launch"), e))?;
    // KILN_CUDA_SYNC: wait for every kernel, so that a fault is reported with its kernel's name
    // (otherwise it surfaces at the next synchronising call). For tests and debugging.
    if sync_each_launch() {
        g.stream
            .synchronize()
            .map_err(|e| driver(format!("kernel `{kernel}`: execution"), e))?;
    }
    Ok(())
}

fn sync_each_launch() -> bool {
    static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SYNC.get_or_init(|| std::env::var_os("KILN_CUDA_SYNC").is_some_and(|v| v != "0"))
}

/// Ops allocate small scratch buffers (stream-ordered, from the device's default memory pool);
/// letting the pool keep freed memory instead of returning it at every synchronisation makes
/// those allocations cheap. Best effort: a driver without pools is left as it is.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return;
    }
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: the out-pointer is valid; the device handle is the context's.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return;
    }
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the pool was just returned by the driver; the value points to a u64 as the
    // attribute requires.
    let _ = unsafe {
        sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
    };
}

fn pick_target(arch: u32) -> std::result::Result<Target, CudaError> {
    // Without NVRTC the kernel cache may still hold cubins for this architecture.
    let Ok(archs) = nvrtc::supported_archs() else {
        return Ok(Target::Cubin(arch));
    };
    if archs.contains(&arch) {
        return Ok(Target::Cubin(arch));
    }
    // A newer GPU than this NVRTC knows: PTX for the newest architecture it supports below it,
    // which the driver compiles when loading.
    archs
        .iter()
        .copied()
        .filter(|&a| a <= arch)
        .max()
        .map(Target::Ptx)
        .ok_or_else(|| {
            CudaError::NoDevice(format!(
                "NVRTC supports none of the architectures up to sm_{arch} (it knows {archs:?})"
            ))
        })
}

fn byte_len(dtype: DType, len: usize) -> Result<usize> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::I32) {
        return Err(Error::invalid(format!(
            "device buffers hold f32, bf16, f16 or i32 elements, not {dtype}"
        )));
    }
    len.checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| Error::invalid(format!("buffer of {len} {dtype} elements overflows")))
}

fn poisoned() -> Error {
    Error::Device("module cache lock poisoned by a panic".into())
}
