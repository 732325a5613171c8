//! The on-disk cache of compiled kernel images, so that each kernel file is compiled once per
//! architecture and options — not once per process. A file is keyed by a stable 64-bit FNV-1a
//! hash of (file name, expanded source, NVRTC options, target), so a cache filled on any machine
//! with the same NVRTC (e.g. by `kiln cuda compile` on a machine without a GPU) serves a GPU
//! machine as it is; a machine with a warm cache does not even need NVRTC.
//!
//! Folder: `$KILN_CUDA_CACHE` (`off` disables the cache), else `$XDG_CACHE_HOME/kiln-cuda`,
//! else `$HOME/.cache/kiln-cuda`. Files are written atomically (temp file + rename).
use crate::error::CudaError;
use crate::nvrtc::{self, Target};
use crate::sources::{self, KernelFile};
use std::path::PathBuf;

/// The cache folder, or None when disabled or no folder can be named.
pub fn dir() -> Option<PathBuf> {
    match std::env::var_os("KILN_CUDA_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(|d| PathBuf::from(d).join("kiln-cuda"))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln-cuda"))
            }),
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff; // separator
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache file name (without extension) of `file` compiled for `target`.
pub fn key(file: &KernelFile, target: Target) -> String {
    let src = sources::expand(file);
    let opts = nvrtc::options(target).join("\n");
    let h = fnv1a(&[
        file.name.as_bytes(),
        src.as_bytes(),
        opts.as_bytes(),
        target.arch_flag().as_bytes(),
    ]);
    format!(
        "{}-{}-{h:016x}",
        file.name.trim_end_matches(".cu"),
        target.arch_flag()
    )
}

/// A compiled image: from the cache, or compiled now (and then stored in the cache).
pub struct Image {
    pub bytes: Vec<u8>,
    /// NVRTC's log (ptxas report), empty when the cache held no log.
    pub log: String,
    pub from_cache: bool,
}

/// `file` compiled for `target`, through the cache (at [`dir`]).
pub fn compile(file: &KernelFile, target: Target) -> Result<Image, CudaError> {
    compile_in(dir().as_deref(), file, target)
}

/// `file` compiled for `target`, through the cache at `dir` (None: no cache).
pub fn compile_in(
    dir: Option<&std::path::Path>,
    file: &KernelFile,
    target: Target,
) -> Result<Image, CudaError> {
    let ext = match target {
        Target::Ptx(_) => "ptx",
        Target::Cubin(_) => "cubin",
    };
    let name = key(file, target);
    if let Some(d) = &dir {
        let path = d.join(format!("{name}.{ext}"));
        if let Ok(bytes) = std::fs::read(&path) {
            if !bytes.is_empty() {
                let log =
                    std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default();
                return Ok(Image {
                    bytes,
                    log,
                    from_cache: true,
                });
            }
        }
    }
    let c = nvrtc::compile(file.name, &sources::expand(file), target).map_err(|e| match e {
        CudaError::NoNvrtc(why) => CudaError::NoNvrtc(format!(
            "{why}; and {} for {} is not in the kernel cache {}",
            file.name,
            target.arch_flag(),
            dir.as_ref()
                .map_or("(disabled)".into(), |d| d.display().to_string())
        )),
        other => other,
    })?;
    if let Some(d) = &dir {
        // A cache that cannot be written is not an error: the image is still good.
        let _ = store(d, &name, ext, &c.image, &c.log);
    }
    Ok(Image {
        bytes: c.image,
        log: c.log,
        from_cache: false,
    })
}

fn store(
    d: &std::path::Path,
    name: &str,
    ext: &str,
    image: &[u8],
    log: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(d)?;
    let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id())
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
    for (suffix, bytes) in [("log", log.as_bytes()), (ext, image)] {
        let tmp = d.join(format!("{name}.{suffix}.tmp{tag}"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, d.join(format!("{name}.{suffix}")))?;
    }
    Ok(())
}

/// Compiles every kernel file for `target` into the cache at `dir` (what `kiln cuda compile`
/// runs): per file, its name, whether it was already cached, and the seconds it took.
pub fn fill(
    dir: &std::path::Path,
    target: Target,
) -> Result<Vec<(&'static str, bool, f64)>, CudaError> {
    let mut out = Vec::new();
    for f in sources::ALL {
        let t = std::time::Instant::now();
        let img = compile_in(Some(dir), f, target)?;
        out.push((f.name, img.from_cache, t.elapsed().as_secs_f64()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(fnv1a(&[b"a"]), fnv1a(&[b"a"]));
        assert_ne!(fnv1a(&[b"ab", b""]), fnv1a(&[b"a", b"b"]));
        let k80 = key(&sources::PROBE, Target::Cubin(80));
        let k90 = key(&sources::PROBE, Target::Cubin(90));
        assert_ne!(k80, k90);
        assert!(k90.starts_with("probe-sm_90-"), "{k90}");
    }
}
