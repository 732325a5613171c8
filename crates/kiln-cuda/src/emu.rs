//! The CPU emulator device: each kernel file compiled as C++ by g++ together with
//! `kernels/emu/emu.h` into a shared library (cached on disk by content hash), loaded with
//! `dlopen`, and launched through its `kiln_emu_launch` entry point with the same arguments a
//! GPU launch gets. Buffers live in host memory with guard zones on both sides: a kernel that
//! writes outside an argument fails its launch, one that reads outside reads NaN.
use crate::device::{Arg, LaunchDims};
use crate::error::CudaError;
use crate::sources::{self, KernelFile};
use std::alloc::Layout;
use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void, CString};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::Command;

const EMU_H: &str = include_str!("../../../kernels/emu/emu.h");

/// How the emulator runs kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EmuOptions {
    /// Run a block's threads (and the grid's blocks) in reverse order between barriers: with
    /// the forward order, this exposes missing barriers in both directions.
    pub reverse: bool,
}

pub(crate) struct Emu {
    opts: EmuOptions,
    cxx: String,
    cache: PathBuf,
}

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const c_uint,
    *const c_uint,
    c_uint,
    *mut *mut c_void,
    c_uint,
    *mut c_char,
    c_ulong,
) -> c_int;

pub(crate) struct EmuModule {
    _lib: libloading::Library,
    launch: LaunchFn,
}

/// The g++ flags of every emulator build.
const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O1",
    "-g0",
    "-fPIC",
    "-shared",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
    "-Wno-unused-function",
];

impl Emu {
    pub(crate) fn new(opts: EmuOptions) -> kiln_tensor::Result<Emu> {
        let cxx = std::env::var("KILN_EMU_CXX").unwrap_or_else(|_| "g++".into());
        let ok = Command::new(&cxx)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(
                CudaError::Emulator(format!("no C++ compiler `{cxx}` (set KILN_EMU_CXX)")).into(),
            );
        }
        let cache = std::env::var_os("KILN_EMU_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("kiln-emu"));
        Ok(Emu { opts, cxx, cache })
    }

    pub(crate) fn options(&self) -> EmuOptions {
        self.opts
    }

    /// Builds (or finds in the cache) and loads the shared library of `file`.
    pub(crate) fn build(&self, file: &KernelFile) -> Result<EmuModule, CudaError> {
        let text = sources::expand(file);
        let mut driver = String::from("#include \"emu.h\"\n");
        driver.push_str(&text);
        driver.push_str("\nKILN_EMU_TABLE_BEGIN\n");
        for name in sources::kernel_names(file.text) {
            driver.push_str(&format!("KILN_EMU_KERNEL({name})\n"));
        }
        driver.push_str("KILN_EMU_TABLE_END\n");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (EMU_H, &driver, CXX_FLAGS, &self.cxx).hash(&mut h);
        let stem = file.name.trim_end_matches(".cu");
        let dir = self.cache.join(format!("{stem}-{:016x}", h.finish()));
        let so = dir.join("module.so");
        if !so.is_file() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| CudaError::Emulator(format!("{}: {e}", dir.display())))?;
            let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id())
                .replace(|c: char| !c.is_ascii_alphanumeric(), "");
            let write = |name: &str, body: &str| -> Result<(), CudaError> {
                std::fs::write(dir.join(name), body)
                    .map_err(|e| CudaError::Emulator(format!("{}: {e}", dir.display())))
            };
            write("emu.h", EMU_H)?;
            let cpp = format!("driver-{tag}.cpp");
            write(&cpp, &driver)?;
            let tmp = dir.join(format!("module-{tag}.so"));
            let out = Command::new(&self.cxx)
                .args(CXX_FLAGS)
                .arg("-o")
                .arg(&tmp)
                .arg(dir.join(&cpp))
                .output()
                .map_err(|e| CudaError::Emulator(format!("running {}: {e}", self.cxx)))?;
            if !out.status.success() {
                return Err(CudaError::Emulator(format!(
                    "g++ failed on {} ({}):\n{}",
                    file.name,
                    dir.join(&cpp).display(),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            std::fs::rename(&tmp, &so)
                .map_err(|e| CudaError::Emulator(format!("{}: {e}", so.display())))?;
            let _ = std::fs::remove_file(dir.join(&cpp));
        }
        // SAFETY: the library was built from kiln's own sources by the code above; loading it
        // runs no initialisers beyond the C++ runtime's.
        let lib = unsafe { libloading::Library::new(&so) }
            .map_err(|e| CudaError::Emulator(format!("loading {}: {e}", so.display())))?;
        // SAFETY: `kiln_emu_launch` is defined by KILN_EMU_TABLE_END with this signature.
        let launch: LaunchFn = unsafe { lib.get::<LaunchFn>(b"kiln_emu_launch\0") }
            .map(|s| *s)
            .map_err(|e| CudaError::Emulator(format!("{}: {e}", so.display())))?;
        Ok(EmuModule { _lib: lib, launch })
    }

    pub(crate) fn launch(
        &self,
        m: &EmuModule,
        file: &KernelFile,
        kernel: &str,
        dims: LaunchDims,
        args: &[Arg<'_>],
    ) -> Result<(), CudaError> {
        // Every argument in a 64-byte slot (little-endian, so an i32 is read from its first 4
        // bytes; struct arguments fill the slot's start).
        let mut vals: Vec<Vec<u64>> = args
            .iter()
            .map(|a| {
                let words = match a {
                    Arg::Blob(b) => b.len().max(8),
                    _ => 8,
                };
                let mut slot = vec![0u64; words];
                match *a {
                    Arg::Buf(b) => slot[0] = emu_addr(b) as u64,
                    Arg::At(b, off) => {
                        slot[0] = (emu_addr(b) + off * b.dtype().size_in_bytes()) as u64
                    }
                    Arg::I32(v) => slot[0] = v as u32 as u64,
                    Arg::U32(v) => slot[0] = v as u64,
                    Arg::F32(v) => slot[0] = v.to_bits() as u64,
                    Arg::I64(v) => slot[0] = v as u64,
                    Arg::I64x3(v) => {
                        for (s, x) in slot.iter_mut().zip(v) {
                            *s = x as u64;
                        }
                    }
                    Arg::I32x16(v) => {
                        for (s, pair) in slot.iter_mut().zip(v.chunks(2)) {
                            *s = (pair[0] as u32 as u64) | ((pair[1] as u32 as u64) << 32);
                        }
                    }
                    Arg::Blob(b) => slot[..b.len()].copy_from_slice(b),
                }
                slot
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        let name = CString::new(kernel)
            .map_err(|_| CudaError::Emulator(format!("bad kernel name {kernel:?}")))?;
        let mut err = vec![0 as c_char; 1024];
        let flags: c_uint = if self.opts.reverse { 1 } else { 0 };
        // SAFETY: the entry point takes the kernel's arguments as an array of pointers to
        // their values (as cuLaunchKernel does); `vals` and `ptrs` outlive the call; buffer
        // addresses point into live host allocations whose sizes the op validated.
        let rc = unsafe {
            (m.launch)(
                name.as_ptr(),
                dims.grid.as_ptr(),
                dims.block.as_ptr(),
                dims.smem,
                ptrs.as_mut_ptr(),
                flags,
                err.as_mut_ptr(),
                err.len() as c_ulong,
            )
        };
        if rc != 0 {
            // SAFETY: the entry point wrote a NUL-terminated message into `err`.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(CudaError::Emulator(format!(
                "kernel `{kernel}` ({}): {msg}",
                file.name
            )));
        }
        for (i, a) in args.iter().enumerate() {
            if let Arg::Buf(b) | Arg::At(b, _) = a {
                if let crate::buffer::Mem::Emu(h) = &b.mem {
                    if !h.guards_intact() {
                        return Err(CudaError::Emulator(format!(
                            "kernel `{kernel}` ({}): wrote outside argument {i} (a buffer of {} {} elements)",
                            file.name,
                            b.len(),
                            b.dtype()
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

fn emu_addr(b: &crate::CudaBuf) -> usize {
    match &b.mem {
        crate::buffer::Mem::Emu(h) => h.addr(),
        crate::buffer::Mem::Gpu(_) => 0, // rejected by the launch checks
        crate::buffer::Mem::Empty => 0,
    }
}

/// Host memory standing in for a device allocation: 256-byte aligned, with guard zones of
/// 0xFF bytes (NaN in every float type) before and after.
pub(crate) struct HostMem {
    base: *mut u8,
    bytes: usize,
    layout: Layout,
}

// SAFETY: HostMem owns its allocation; like device memory, it is written only by kernels the
// caller launches (through `&mut CudaBuf` outputs) or by the explicit copy methods.
unsafe impl Send for HostMem {}
// SAFETY: as above.
unsafe impl Sync for HostMem {}

const GUARD_BEFORE: usize = 256;
const GUARD_AFTER: usize = 4096;

impl HostMem {
    pub(crate) fn new(bytes: usize, fill: u8) -> kiln_tensor::Result<HostMem> {
        let body = bytes.div_ceil(256) * 256;
        let total = GUARD_BEFORE + body + GUARD_AFTER;
        let layout = Layout::from_size_align(total, 256)
            .map_err(|e| kiln_tensor::Error::invalid(format!("emulator allocation: {e}")))?;
        // SAFETY: `layout` has a non-zero size.
        let base = unsafe { std::alloc::alloc(layout) };
        if base.is_null() {
            return Err(kiln_tensor::Error::Device(format!(
                "emulator: cannot allocate {bytes} bytes"
            )));
        }
        // SAFETY: `base` points to `total` writable bytes.
        unsafe {
            std::ptr::write_bytes(base, 0xFF, total);
            std::ptr::write_bytes(base.add(GUARD_BEFORE), fill, bytes);
        }
        Ok(HostMem {
            base,
            bytes,
            layout,
        })
    }

    pub(crate) fn addr(&self) -> usize {
        self.base as usize + GUARD_BEFORE
    }

    pub(crate) fn write(&self, start: usize, src: &[u8]) {
        assert!(start + src.len() <= self.bytes);
        // SAFETY: the range is inside the allocation (asserted); no kernel runs during a copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.base.add(GUARD_BEFORE + start),
                src.len(),
            )
        }
    }

    pub(crate) fn read(&self, start: usize, dst: &mut [u8]) {
        assert!(start + dst.len() <= self.bytes);
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add(GUARD_BEFORE + start),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// `self[dst_at..][..n] = src[src_at..][..n]` (bytes).
    pub(crate) fn copy_from(&self, src: &HostMem, src_at: usize, dst_at: usize, n: usize) {
        assert!(dst_at + n <= self.bytes && src_at + n <= src.bytes);
        // SAFETY: both ranges are inside their allocations (asserted); distinct allocations
        // never overlap (a buffer cannot be both the `&` source and the `&mut` destination).
        unsafe {
            std::ptr::copy(
                src.base.add(GUARD_BEFORE + src_at),
                self.base.add(GUARD_BEFORE + dst_at),
                n,
            )
        }
    }

    pub(crate) fn fill(&self, v: u8) {
        // SAFETY: the range is the allocation's body.
        unsafe { std::ptr::write_bytes(self.base.add(GUARD_BEFORE), v, self.bytes) }
    }

    pub(crate) fn guards_intact(&self) -> bool {
        let total = self.layout.size();
        // SAFETY: reads inside the allocation.
        let all = unsafe { std::slice::from_raw_parts(self.base, total) };
        all[..GUARD_BEFORE].iter().all(|&b| b == 0xFF)
            && all[GUARD_BEFORE + self.bytes..].iter().all(|&b| b == 0xFF)
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.base, self.layout) }
    }
}
