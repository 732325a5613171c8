//! NVRTC: finding the library, and compiling a kernel file to PTX or a cubin with the options
//! the runtime uses (the compile-check test calls the same [`compile`] with the same
//! [`options`]).
//!
//! cudarc opens NVRTC by bare name (`libnvrtc.so.13`). When the library is not on the loader's
//! path, [`ensure_loaded`] looks for it (in `$KILN_NVRTC_LIB_DIR`, then in the lib folder of
//! the `cuda-toolkit[nvrtc]` PyPI wheel inside likely virtual environments, then in the usual
//! CUDA toolkit folders) and loads it by full path with `RTLD_GLOBAL` together with
//! `libnvrtc-builtins`: the dynamic loader then answers cudarc's later `dlopen` with the
//! library already loaded.
use crate::error::CudaError;
use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What NVRTC produces from one kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// PTX for the virtual architecture `compute_XY` (`XY` = 10·major + minor); the driver
    /// compiles it for the device when it loads the module.
    Ptx(u32),
    /// A cubin for the real architecture `sm_XY`: ptxas runs inside NVRTC, and its report
    /// (registers, shared memory, spills) is in the log.
    Cubin(u32),
}

impl Target {
    /// The value of `--gpu-architecture`.
    pub fn arch_flag(self) -> String {
        match self {
            Target::Ptx(a) => format!("compute_{a}"),
            Target::Cubin(a) => format!("sm_{a}"),
        }
    }
}

/// The NVRTC options for `target`: exactly what the runtime passes.
pub fn options(target: Target) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", target.arch_flag()),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "-lineinfo".into(),
        "--ptxas-options=-v".into(),
        "--ptxas-options=--warn-on-spills".into(),
        "-DKILN_NVRTC=1".into(),
    ]
}

/// A compiled kernel file.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text (NUL-terminated) or cubin bytes.
    pub image: Vec<u8>,
    pub target: Target,
    pub options: Vec<String>,
    /// NVRTC's log: warnings, and for a cubin ptxas's resource report.
    pub log: String,
}

/// The library folder in use, once [`ensure_loaded`] succeeded (`None`: found by the loader
/// on its own path).
static LOADED: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();

/// The folders searched for `libnvrtc.so.13`, in order (existing ones only).
pub fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KILN_NVRTC_LIB_DIR") {
        dirs.push(PathBuf::from(d));
    }
    let mut venvs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        venvs.push(PathBuf::from(v));
    }
    // The repository (this crate is crates/kiln-cuda) and the current folder.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for root in [repo, PathBuf::from(".")] {
        for name in [
            ".venv",
            "venv",
            "target/nvrtc-venv",
            "target/cuda-carry/nvrtc",
        ] {
            venvs.push(root.join(name));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        venvs.push(PathBuf::from(home).join(".local"));
    }
    for v in venvs {
        // <venv>/lib/python3.X/site-packages/nvidia/cu13/lib, or a bare lib folder.
        dirs.push(v.join("lib"));
        if let Ok(rd) = std::fs::read_dir(v.join("lib")) {
            let mut pys: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("python3"))
                })
                .collect();
            pys.sort();
            for p in pys {
                dirs.push(p.join("site-packages/nvidia/cu13/lib"));
            }
        }
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda-13.0/lib64",
        "/usr/lib/x86_64-linux-gnu",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .filter(|d| d.join("libnvrtc.so.13").is_file())
        .collect()
}

/// Makes NVRTC loadable (see the module docs). Never panics; the error says where it looked.
pub fn ensure_loaded() -> Result<(), CudaError> {
    LOADED
        .get_or_init(load)
        .as_ref()
        .map(|_| ())
        .map_err(|e| CudaError::NoNvrtc(e.clone()))
}

/// The folder NVRTC was loaded from, when it was found by searching.
pub fn loaded_from() -> Option<PathBuf> {
    match LOADED.get() {
        Some(Ok(Some(p))) => Some(p.clone()),
        _ => None,
    }
}

fn load() -> Result<Option<PathBuf>, String> {
    let dirs = candidate_dirs();
    // An explicit folder wins over whatever the loader would find.
    let explicit = std::env::var_os("KILN_NVRTC_LIB_DIR").is_some();
    if !explicit {
        // SAFETY: `is_culib_present` only tries to dlopen the candidate names.
        if unsafe { sys::is_culib_present() } {
            return Ok(None);
        }
    }
    let mut tried = Vec::new();
    for dir in &dirs {
        match preload(dir) {
            Ok(()) => return Ok(Some(dir.clone())),
            Err(e) => tried.push(format!("{}: {e}", dir.display())),
        }
    }
    // SAFETY: as above.
    if explicit && unsafe { sys::is_culib_present() } {
        return Ok(None);
    }
    Err(format!(
        "libnvrtc.so.13 not found (set KILN_NVRTC_LIB_DIR to the folder that holds it, or \
         install the PyPI package `cuda-toolkit[nvrtc]==13.0.2` into .venv){}",
        if tried.is_empty() {
            String::new()
        } else {
            format!("; tried {}", tried.join("; "))
        }
    ))
}

fn preload(dir: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // libnvrtc-builtins.so.13.X first (libnvrtc opens it by name when it compiles).
    let mut builtins: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so.13"))
        })
        .collect();
    builtins.sort();
    for b in builtins.iter().take(1) {
        // SAFETY: loading a shared library runs its initialisers; NVRTC's are trusted.
        let lib =
            unsafe { Library::open(Some(b), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
        std::mem::forget(lib); // stays loaded for the process
    }
    let main = dir.join("libnvrtc.so.13");
    // SAFETY: as above.
    let lib =
        unsafe { Library::open(Some(&main), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
    std::mem::forget(lib);
    // SAFETY: as above; now the bare name resolves to the loaded library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err("loaded by path, but not found by name afterwards".into())
    }
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), CudaError> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; the out-pointers are valid.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    check(r, "nvrtcVersion")?;
    Ok((major, minor))
}

/// The real architectures (`XY` of `sm_XY`) this NVRTC can compile cubins for.
pub fn supported_archs() -> Result<Vec<u32>, CudaError> {
    ensure_loaded()?;
    let mut n = 0;
    // SAFETY: NVRTC is loaded; the out-pointer is valid.
    check(
        unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) },
        "nvrtcGetNumSupportedArchs",
    )?;
    let mut archs = vec![0i32; n.max(0) as usize];
    // SAFETY: `archs` has room for the `n` entries NVRTC writes.
    check(
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) },
        "nvrtcGetSupportedArchs",
    )?;
    Ok(archs.into_iter().map(|a| a as u32).collect())
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<(), CudaError> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::NoNvrtc(format!("{what} failed: {r:?}")))
    }
}

/// Compiles the (already expanded, see [`crate::sources`]) source of `file` for `target`.
pub fn compile(file: &str, source: &str, target: Target) -> Result<Compiled, CudaError> {
    ensure_loaded()?;
    let options = options(target);
    let src = CString::new(source).map_err(|_| CudaError::Compile {
        file: file.into(),
        options: options.clone(),
        log: "source contains a NUL byte".into(),
    })?;
    let name = CString::new(file).unwrap_or_else(|_| CString::new("kernel.cu").expect("no NUL"));
    let prog = result::create_program(&src, Some(&name)).map_err(|e| CudaError::Compile {
        file: file.into(),
        options: options.clone(),
        log: format!("nvrtcCreateProgram: {e:?}"),
    })?;
    struct Prog(sys::nvrtcProgram);
    impl Drop for Prog {
        fn drop(&mut self) {
            // SAFETY: the program was created above and is destroyed once.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let prog = Prog(prog);
    // SAFETY: `prog` is a live program; the options are valid strings.
    let compiled = unsafe { result::compile_program(prog.0, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(|raw| {
            // SAFETY: NVRTC's log is NUL-terminated.
            unsafe { CStr::from_ptr(raw.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(CudaError::Compile {
            file: file.into(),
            options,
            log: format!("{e:?}\n{log}"),
        });
    }
    let image = match target {
        Target::Ptx(_) => {
            // SAFETY: the program compiled.
            let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| CudaError::Compile {
                file: file.into(),
                options: options.clone(),
                log: format!("nvrtcGetPTX: {e:?}"),
            })?;
            ptx.into_iter().map(|c| c as u8).collect()
        }
        Target::Cubin(_) => {
            let mut size = 0usize;
            // SAFETY: the program compiled for a real architecture; out-pointer valid.
            let r = unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) };
            check(r, "nvrtcGetCUBINSize")?;
            let mut bytes = vec![0u8; size];
            // SAFETY: `bytes` has the size NVRTC reported.
            let r = unsafe { sys::nvrtcGetCUBIN(prog.0, bytes.as_mut_ptr().cast()) };
            check(r, "nvrtcGetCUBIN")?;
            bytes
        }
    };
    Ok(Compiled {
        image,
        target,
        options,
        log,
    })
}

/// One kernel's resources, from ptxas's report in a cubin compile log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    /// Static shared memory, bytes.
    pub smem_bytes: u32,
    pub stack_frame_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Parses ptxas's `-v` report (the lines after "Compiling entry function 'NAME'").
pub fn parse_resources(log: &str) -> Vec<KernelResources> {
    fn num_before(line: &str, unit: &str) -> Option<u32> {
        let at = line.find(unit)?;
        line[..at].split_whitespace().last()?.parse().ok()
    }
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("stack frame") {
            k.stack_frame_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            k.registers = num_before(line, "registers").unwrap_or(0);
            k.smem_bytes = num_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// The log's warnings (lines NVRTC or ptxas mark as warnings).
pub fn warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.to_ascii_lowercase().contains("warning"))
        .map(|l| l.to_string())
        .collect()
}
