//! A short, bounded mutation-fuzzing run over the reader (the long runs use the cargo-fuzz
//! target in fuzz/ or `cargo run --release --example fuzz_safetensors -- SECONDS`).
//!
//! Valid files (the reference fixtures and the README's checkpoint) are mutated — bit flips,
//! truncation, length-field rewrites, edits of numbers and keys inside the header, span
//! duplication — and each result must give `Ok` or `Err`, never a panic; accepted files must be
//! fully readable and survive a write/read round trip (see `kiln_io::fuzz::exercise`).
use kiln_io::fuzz::{exercise, mutate, Rng};
use std::path::Path;

fn seeds() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["tests/fixtures/safetensors", "tests/data"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                out.push(std::fs::read(&p).unwrap());
            }
        }
    }
    out.sort();
    assert!(out.len() >= 5);
    out
}

#[test]
fn seeds_are_accepted() {
    for s in seeds() {
        exercise(&s).expect("every seed is a valid file");
    }
}

#[test]
fn bounded_mutation_run_never_panics() {
    let seeds = seeds();
    let mut rng = Rng::new(0x6b69_6c6e);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    const RUNS: usize = 20_000;
    for run in 0..RUNS {
        let mut data = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut data);
        match std::panic::catch_unwind(|| exercise(&data)) {
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(_)) => rejected += 1,
            Err(_) => panic!(
                "run {run}: the reader panicked on {} bytes: {:?}",
                data.len(),
                &data[..data.len().min(256)]
            ),
        }
    }
    assert_eq!(accepted + rejected, RUNS);
    // The mutator must reach both outcomes, or it is not testing much.
    assert!(
        accepted > 100 && rejected > 100,
        "accepted {accepted}, rejected {rejected}"
    );
}
