//! GPT-2 124M (random weights written to a temporary folder): one decode step after a
//! 128-token prompt, and the prefill of 128 tokens, with f32 and bf16 weights, on 1 and 2
//! threads.
//!
//! ```sh
//! cargo bench --bench gpt2
//! ```
//!
//! The side-by-side comparison with PyTorch is `benches/compare/gpt2.py`.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_io::SafeTensors;
use kiln_models::gpt2::{init_checkpoint, Gpt2Config, Gpt2Model, Gpt2Weights, Logits};
use kiln_nn::backend::CpuBackend;
use kiln_tensor::DType;
use std::time::Duration;

const PROMPT: usize = 128;

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("kiln-bench-gpt2-{}", std::process::id()));
    let cfg = Gpt2Config::preset("124M").unwrap();
    init_checkpoint(&dir, &cfg, DType::F32, 0).unwrap();
    let file = SafeTensors::open(dir.join("model.safetensors")).unwrap();
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 7919) % 50000).collect();

    for dtype in [DType::F32, DType::BF16] {
        let be = CpuBackend::default();
        let weights = Gpt2Weights::load(&be, &file, &cfg, dtype).unwrap();
        let streamed = weights.decode_bytes_per_token(&be);
        let model = Gpt2Model::new(cfg.clone(), weights).unwrap();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut g = c.benchmark_group(format!("gpt2_124M/{dtype}/threads={threads}"));
            g.sample_size(10)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(4));

            // One decode step at position 128: the weights stream from memory once.
            let mut state = model.new_state(PROMPT + 1).unwrap();
            let mut logits = Vec::new();
            pool.install(|| {
                model
                    .forward(&prompt, &mut state, Logits::Last, &mut logits)
                    .unwrap()
            });
            g.throughput(Throughput::Bytes(streamed as u64));
            g.bench_function("decode_step", |b| {
                b.iter(|| {
                    state.truncate(PROMPT);
                    pool.install(|| {
                        model
                            .forward(&[464], &mut state, Logits::Last, &mut logits)
                            .unwrap()
                    })
                })
            });

            // Prefill: the whole prompt in one pass, logits of the last position.
            g.throughput(Throughput::Elements(PROMPT as u64));
            g.bench_function("prefill_128", |b| {
                b.iter(|| {
                    state.clear();
                    pool.install(|| {
                        model
                            .forward(&prompt, &mut state, Logits::Last, &mut logits)
                            .unwrap()
                    })
                })
            });
            g.finish();
        }
    }
    drop(file);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
