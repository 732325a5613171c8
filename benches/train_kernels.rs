//! Criterion benchmarks of the training kernels at GPT-2 124M shapes (12 heads, head_dim 64):
//! the causal attention forward (with log-sum-exp) and forward + backward at batch·seq = 4×64
//! and 1×1024, and the fused cross-entropy over the 50257-token vocabulary for 256 rows, each
//! at 1 and 2 threads. Throughput counts the attention forward as
//! `4·B·H·D·T(T+1)/2` flops and the backward as 2.5× that (`kiln bench attention --backward`
//! uses the same convention).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::cpu::attention::{attention_backward, attention_train_forward};
use kiln::cpu::elementwise::cross_entropy::cross_entropy_forward_backward;

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

fn attention(c: &mut Criterion) {
    let (h, d) = (12, 64);
    let mut g = c.benchmark_group("attention_train_causal_h12_d64");
    g.sample_size(10);
    for &(b, t) in &[(4usize, 64usize), (1, 1024)] {
        let cc = h * d;
        let qkv = fill(b * t * 3 * cc, 1);
        let dout = fill(b * t * cc, 2);
        let mut out = vec![0f32; b * t * cc];
        let mut lse = vec![0f32; b * h * t];
        let mut dqkv = vec![0f32; b * t * 3 * cc];
        let fwd_flops = 4 * b * h * d * t * (t + 1) / 2;
        for threads in [1, 2] {
            let p = pool(threads);
            let id = format!("b{b}_t{t}");
            g.throughput(Throughput::Elements(fwd_flops as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("forward_threads{threads}"), &id),
                &id,
                |bch, _| {
                    bch.iter(|| {
                        p.install(|| {
                            attention_train_forward(&qkv, b, t, h, d, &mut out, &mut lse).unwrap()
                        })
                    })
                },
            );
            g.throughput(Throughput::Elements((fwd_flops as f64 * 3.5) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("forward_backward_threads{threads}"), &id),
                &id,
                |bch, _| {
                    bch.iter(|| {
                        p.install(|| {
                            attention_train_forward(&qkv, b, t, h, d, &mut out, &mut lse).unwrap();
                            attention_backward(&qkv, &out, &dout, &lse, b, t, h, d, &mut dqkv)
                                .unwrap()
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

fn cross_entropy(c: &mut Criterion) {
    let (rows, vocab) = (256usize, 50257usize);
    let logits = fill(rows * vocab, 3);
    let targets: Vec<u32> = (0..rows).map(|r| (r * 7919 % vocab) as u32).collect();
    let mut work = logits.clone();
    let mut losses = vec![0f32; rows];
    let mut g = c.benchmark_group("cross_entropy_fused_v50257");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((2 * rows * vocab * 4) as u64));
    for threads in [1, 2] {
        let p = pool(threads);
        g.bench_function(format!("rows{rows}_threads{threads}"), |bch| {
            bch.iter(|| {
                work.copy_from_slice(&logits);
                p.install(|| {
                    cross_entropy_forward_backward(
                        &mut work,
                        rows,
                        vocab,
                        &targets,
                        1.0 / rows as f32,
                        &mut losses,
                    )
                    .unwrap()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, attention, cross_entropy);
criterion_main!(benches);
