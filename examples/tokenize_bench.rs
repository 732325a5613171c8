//! Encode throughput of the GPT-2 tokenizer on a text file, as one JSON object (used by
//! `benches/compare/tokenizer.py`, which runs the Python `tokenizers` library on the same text).
//!
//! ```text
//! cargo run --release --example tokenize_bench -- [CORPUS] [--iters N]
//! ```
//! `CORPUS` defaults to `tests/fixtures/tokenizer/bench_corpus.txt`. Reports the load time of the embedded
//! tokenizer, encode MB/s with a cold cache (a fresh tokenizer per run) and a warm one (the same tokenizer
//! again), warm encode of the text paragraph by paragraph (split at blank lines; how prompts arrive), decode
//! MB/s, the token count and an FNV-1a hash of the ids so the caller can check both sides agree. Each rate is
//! the median over the runs; `*_best_*` is the fastest run (less sensitive to other load on the machine).

use std::time::Instant;

use kiln_models::tokenizer::Gpt2Tokenizer;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut corpus = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer/bench_corpus.txt"
    )
    .to_string();
    let mut iters = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iters" => iters = args.next().ok_or("--iters needs a value")?.parse()?,
            _ => corpus = a,
        }
    }
    let text = std::fs::read_to_string(&corpus).map_err(|e| format!("{corpus}: {e}"))?;
    let mb = text.len() as f64 / 1e6;

    let t0 = Instant::now();
    let tok = Gpt2Tokenizer::gpt2_default()?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Cold: a fresh tokenizer (empty cache) per run; building it is not timed.
    let mut cold = Vec::new();
    for _ in 0..3 {
        let fresh = Gpt2Tokenizer::gpt2_default()?;
        let t = Instant::now();
        let ids = fresh.encode(&text);
        cold.push(mb / t.elapsed().as_secs_f64());
        std::hint::black_box(ids);
    }
    // Warm: the same tokenizer again and again.
    let ids = tok.encode(&text);
    let mut warm = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let again = tok.encode(&text);
        warm.push(mb / t.elapsed().as_secs_f64());
        assert_eq!(again.len(), ids.len());
    }
    // Paragraph by paragraph.
    let paras: Vec<&str> = text.split("\n\n").collect();
    let mut para = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let mut n = 0usize;
        for p in &paras {
            n += tok.encode(p).len();
        }
        para.push(mb / t.elapsed().as_secs_f64());
        std::hint::black_box(n);
    }
    // Decode throughput (bytes of text produced per second).
    let mut dec = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let s = tok.decode(&ids)?;
        dec.push(s.len() as f64 / 1e6 / t.elapsed().as_secs_f64());
    }

    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for id in &ids {
        for b in id.to_le_bytes() {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!(
        "{{\"corpus\": {:?}, \"bytes\": {}, \"tokens\": {}, \"ids_fnv1a\": \"{:016x}\", \"load_ms\": {:.1}, \
         \"cold_mb_s\": {:.2}, \"warm_mb_s\": {:.2}, \"warm_best_mb_s\": {:.2}, \"para_mb_s\": {:.2}, \
         \"para_best_mb_s\": {:.2}, \"paragraphs\": {}, \"decode_mb_s\": {:.1}}}",
        corpus,
        text.len(),
        ids.len(),
        hash,
        load_ms,
        median(cold),
        median(warm.clone()),
        best(&warm),
        median(para.clone()),
        best(&para),
        paras.len(),
        median(dec)
    );
    Ok(())
}
