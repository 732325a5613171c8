//! A mutation fuzzer for the safetensors reader that runs on the stable toolchain.
//!
//! ```sh
//! cargo run --release --example fuzz_safetensors -- [SECONDS] [SEED]
//! ```
//!
//! Mutates valid files (tests/fixtures/safetensors/*.safetensors, tests/data/tiny.safetensors)
//! with `kiln_io::fuzz::mutate` and checks `kiln_io::fuzz::exercise` on each: any panic is a
//! finding; its input is written to `fuzz/artifacts/stable-crash-<run>.safetensors` and the
//! program exits with status 1. Prints runs, accepted/rejected counts and time at the end.
//! (With a nightly toolchain, `cargo fuzz run safetensors_read` in `fuzz/` does the same with
//! coverage guidance.)
use kiln_io::fuzz::{exercise, mutate, Rng};
use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = Vec::new();
    for dir in ["tests/fixtures/safetensors", "tests/data"] {
        for e in std::fs::read_dir(root.join(dir)).expect("seed folder") {
            let p = e.expect("dir entry").path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                seeds.push(std::fs::read(&p).expect("seed file"));
            }
        }
    }
    seeds.sort();
    // Quiet panics: a finding is reported once, below, with its input saved.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let limit = Duration::from_secs(seconds);
    let (mut runs, mut accepted) = (0u64, 0u64);
    let mut pool: Vec<Vec<u8>> = seeds.clone();
    while start.elapsed() < limit {
        for _ in 0..256 {
            // Mutate a seed, or (a third of the time) a previously accepted mutant.
            let base = &pool[rng.below(pool.len())];
            let mut data = base.clone();
            mutate(&mut rng, &mut data);
            runs += 1;
            match std::panic::catch_unwind(|| exercise(&data)) {
                Ok(Ok(_)) => {
                    accepted += 1;
                    if pool.len() < 4096 && rng.below(3) == 0 {
                        pool.push(data);
                    }
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    let dir = root.join("fuzz/artifacts");
                    let _ = std::fs::create_dir_all(&dir);
                    let out = dir.join(format!("stable-crash-{runs}.safetensors"));
                    let _ = std::fs::write(&out, &data);
                    eprintln!(
                        "finding after {runs} runs: input saved to {}",
                        out.display()
                    );
                    std::process::exit(1);
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz_safetensors: {runs} runs in {secs:.0} s ({:.0}/s), {accepted} accepted, {} rejected, 0 findings (seed {seed})",
        runs as f64 / secs,
        runs - accepted
    );
}
