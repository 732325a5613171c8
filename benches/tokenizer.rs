//! GPT-2 tokenizer throughput (encode and decode MB/s) on `tests/fixtures/tokenizer/bench_corpus.txt`.
//! The same text is run through the Python `tokenizers` library by `benches/compare/tokenizer.py`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kiln_models::tokenizer::{pretokenize, Gpt2Tokenizer};

fn corpus() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer/bench_corpus.txt"
    );
    std::fs::read_to_string(path).expect("bench corpus")
}

fn bench_tokenizer(c: &mut Criterion) {
    let text = corpus();
    let tok = Gpt2Tokenizer::gpt2_default().expect("tokenizer");
    let ids = tok.encode(&text);

    let mut g = c.benchmark_group("tokenizer");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("encode_warm_cache", |b| {
        b.iter(|| black_box(tok.encode(black_box(&text))))
    });
    g.bench_function("encode_cold_cache", |b| {
        b.iter_batched(
            || Gpt2Tokenizer::gpt2_default().expect("tokenizer"),
            |fresh| black_box(fresh.encode(black_box(&text))),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("pretokenize", |b| {
        b.iter(|| black_box(pretokenize::pieces(black_box(&text)).count()))
    });
    g.bench_function("decode", |b| {
        b.iter(|| black_box(tok.decode(black_box(&ids)).expect("decode")))
    });
    g.finish();

    let mut g = c.benchmark_group("tokenizer_load");
    g.sample_size(10);
    g.bench_function("gpt2_default", |b| {
        b.iter(|| black_box(Gpt2Tokenizer::gpt2_default().expect("tokenizer")))
    });
    g.finish();
}

criterion_group!(benches, bench_tokenizer);
criterion_main!(benches);
