//! Criterion benchmarks of the fused attention: causal prefill (batch 1, 12 heads, head_dim 64)
//! at T = 128, 512, 1024, and one KV-cache decode step over 1024 cached positions (f32 and
//! bf16 cache), each at 1 and 2 threads. `kiln bench attention` prints the same cases as
//! records; `benches/compare/attention.py` runs PyTorch next to it.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use kiln::cpu::attention::{
    attention_cached, attention_forward, AttentionOptions, HeadsMut, HeadsRef, KvCache,
};
use kiln::tensor::FloatElement;

fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

fn prefill(c: &mut Criterion) {
    let (h, d) = (12, 64);
    let mut g = c.benchmark_group("attention_prefill_causal_h12_d64");
    g.sample_size(10);
    for &t in &[128usize, 512, 1024] {
        let q = fill(h * t * d, 1);
        let k = fill(h * t * d, 2);
        let v = fill(h * t * d, 3);
        let mut out = vec![0f32; h * t * d];
        g.throughput(Throughput::Elements((4 * h * d * t * (t + 1) / 2) as u64));
        for threads in [1, 2] {
            let p = pool(threads);
            g.bench_with_input(
                BenchmarkId::new(format!("threads{threads}"), t),
                &t,
                |bch, _| {
                    bch.iter(|| {
                        p.install(|| {
                            attention_forward(
                                HeadsRef::contiguous(&q[..], 1, h, t, d),
                                HeadsRef::contiguous(&k[..], 1, h, t, d),
                                HeadsRef::contiguous(&v[..], 1, h, t, d),
                                HeadsMut::contiguous(&mut out, 1, h, t, d),
                                AttentionOptions::causal(),
                            )
                            .unwrap()
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

fn decode_case<T: FloatElement>(c: &mut Criterion, name: &str) {
    let (h, d, t) = (12, 64, 1024);
    let mut cache = KvCache::<T>::new(1, 1, h, t, d).unwrap();
    let k = fill(h * t * d, 1);
    let v = fill(h * t * d, 2);
    cache
        .append(
            0,
            HeadsRef::contiguous(&k[..], 1, h, t, d),
            HeadsRef::contiguous(&v[..], 1, h, t, d),
        )
        .unwrap();
    let q = fill(h * d, 3);
    let mut out = vec![0f32; h * d];
    let mut g = c.benchmark_group(format!("attention_decode_cache1024_{name}"));
    g.throughput(Throughput::Bytes(
        (2 * h * t * d * std::mem::size_of::<T>()) as u64,
    ));
    for threads in [1, 2] {
        let p = pool(threads);
        g.bench_function(format!("threads{threads}"), |bch| {
            bch.iter(|| {
                p.install(|| {
                    attention_cached(
                        HeadsRef::contiguous(&q[..], 1, h, 1, d),
                        &cache,
                        0,
                        HeadsMut::contiguous(&mut out, 1, h, 1, d),
                        AttentionOptions::causal(),
                    )
                    .unwrap()
                })
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    decode_case::<f32>(c, "f32");
    decode_case::<bf16>(c, "bf16");
}

criterion_group!(benches, prefill, decode);
criterion_main!(benches);
