//! Compiles every `kernels/*.cu` with NVRTC — to PTX and to sm_80 and sm_90 cubins, with
//! exactly the options the runtime uses — and fails on any error, warning, register spill or
//! local-memory stack frame.
//! Prints each kernel's registers, shared memory and stack frame.
//!
//! NVRTC is found as the runtime finds it (`KILN_NVRTC_LIB_DIR`, then `.venv` and other likely
//! places, see `kiln_cuda::nvrtc`). Without it the test prints SKIP, except with `CI` set,
//! where a missing NVRTC fails it.
use kiln_cuda::nvrtc::{self, Target};
use kiln_cuda::sources;
use std::path::Path;

#[test]
fn every_kernel_file_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(|s| s.to_string()))
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = sources::ALL.iter().map(|f| f.name.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "kiln_cuda::sources must embed every kernels/*.cu"
    );
    for f in sources::ALL {
        assert!(
            !sources::kernel_names(f.text).is_empty(),
            "{} defines no extern \"C\" __global__ kernel",
            f.name
        );
    }
}

#[test]
fn every_kernel_compiles_without_warnings_or_spills() {
    if let Err(e) = nvrtc::ensure_loaded() {
        if std::env::var_os("CI").is_some() {
            panic!("NVRTC is required under CI: {e}");
        }
        println!("SKIP every_kernel_compiles_without_warnings_or_spills: {e}");
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    println!(
        "NVRTC {major}.{minor} from {}",
        nvrtc::loaded_from().map_or("the loader's path".into(), |p| p.display().to_string())
    );
    let targets = [
        Target::Ptx(80),
        Target::Ptx(90),
        Target::Cubin(80),
        Target::Cubin(90),
    ];
    let jobs: Vec<(&sources::KernelFile, Target)> = sources::ALL
        .iter()
        .flat_map(|f| targets.iter().map(move |&t| (*f, t)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(file, target)) = jobs.get(i) else {
                    break;
                };
                let src = sources::expand(file);
                let t = std::time::Instant::now();
                let r = nvrtc::compile(file.name, &src, target);
                results
                    .lock()
                    .unwrap()
                    .push((i, file.name, target, r, t.elapsed()));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    let mut failures = Vec::new();
    println!(
        "{:<22} {:<34} {:>6} {:>5} {:>8} {:>6} {:>6}",
        "file", "kernel", "arch", "regs", "smem", "stack", "spills"
    );
    for (_, name, target, r, took) in &results {
        match r {
            Err(e) => failures.push(format!("{name} for {}: {e}", target.arch_flag())),
            Ok(c) => {
                for w in nvrtc::warnings(&c.log) {
                    failures.push(format!("{name} for {}: {w}", target.arch_flag()));
                }
                if let Target::Cubin(_) = target {
                    let res = nvrtc::parse_resources(&c.log);
                    if res.is_empty() {
                        failures.push(format!("{name}: no ptxas report in the log:\n{}", c.log));
                    }
                    for k in res {
                        println!(
                            "{:<22} {:<34} {:>6} {:>5} {:>8} {:>6} {:>3}/{:<3}",
                            name,
                            k.name,
                            target.arch_flag(),
                            k.registers,
                            k.smem_bytes,
                            k.stack_frame_bytes,
                            k.spill_stores,
                            k.spill_loads
                        );
                        if k.stack_frame_bytes > 0 {
                            failures.push(format!(
                                "{name}: kernel {} keeps {} bytes in local memory on {} (a register array indexed by a loop that is not unrolled?)",
                                k.name,
                                k.stack_frame_bytes,
                                target.arch_flag()
                            ));
                        }
                        if k.spill_stores > 0 || k.spill_loads > 0 {
                            failures.push(format!(
                                "{name}: kernel {} spills registers on {} ({} bytes stored, {} loaded)",
                                k.name,
                                target.arch_flag(),
                                k.spill_stores,
                                k.spill_loads
                            ));
                        }
                    }
                } else {
                    println!(
                        "{:<22} {:<34} {:>6} compiled in {:.0} ms",
                        name,
                        "(PTX)",
                        target.arch_flag(),
                        took.as_secs_f64() * 1e3
                    );
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC compile check failed:\n{}",
        failures.join("\n")
    );
}

/// The on-disk kernel cache: a second compile of the same file comes from the cache, with the
/// same bytes and the ptxas log.
#[test]
fn kernel_cache_round_trip() {
    if let Err(e) = nvrtc::ensure_loaded() {
        if std::env::var_os("CI").is_some() {
            panic!("NVRTC is required under CI: {e}");
        }
        println!("SKIP kernel_cache_round_trip: {e}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-cuda-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first =
        kiln_cuda::cache::compile_in(Some(&dir), &sources::PROBE, Target::Cubin(90)).unwrap();
    assert!(!first.from_cache);
    let second =
        kiln_cuda::cache::compile_in(Some(&dir), &sources::PROBE, Target::Cubin(90)).unwrap();
    assert!(second.from_cache);
    assert_eq!(first.bytes, second.bytes);
    assert_eq!(first.log, second.log);
    assert!(!nvrtc::parse_resources(&second.log).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
