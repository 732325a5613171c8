//! Criterion benchmark: conv2d / conv_transpose2d forward and forward + backward on a few DCGAN
//! layers (batch 16 to keep a run short; `kiln bench conv2d --dcgan` and
//! `benches/compare/conv.py` measure batch 64 against PyTorch).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
    Conv2dParams, ConvGeometry,
};

fn fill(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / 16777216.0 - 0.5
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let batch = 16;
    // (name, transposed, in, out, size, kernel, stride, padding)
    let layers = [
        ("G1", true, 100, 512, 1, 4, 1, 0),
        ("G3", true, 256, 128, 8, 4, 2, 1),
        ("G5", true, 64, 3, 32, 4, 2, 1),
        ("D1", false, 3, 64, 64, 4, 2, 1),
        ("D2", false, 64, 128, 32, 4, 2, 1),
        ("D4", false, 256, 512, 8, 4, 2, 1),
    ];
    let mut group = c.benchmark_group("conv");
    group.sample_size(10);
    for (name, transposed, cin, cout, size, k, s, p) in layers {
        let params = Conv2dParams::new(s, p);
        let x_shape = [batch, cin, size, size];
        let g = if transposed {
            ConvGeometry::conv_transpose2d(x_shape, [cin, cout, k, k], &params).unwrap()
        } else {
            ConvGeometry::conv2d(x_shape, [cout, cin, k, k], &params).unwrap()
        };
        let x = fill(g.input_len(), 1);
        let w = fill(g.weight_len(), 2);
        let dy = fill(g.output_len(), 3);
        let mut y = vec![0f32; g.output_len()];
        let mut dx = vec![0f32; g.input_len()];
        let mut dw = vec![0f32; g.weight_len()];
        group.throughput(Throughput::Elements(g.flops() as u64));
        group.bench_function(format!("{name}/forward"), |b| {
            b.iter(|| {
                if transposed {
                    conv_transpose2d_forward(&g, &x, &w, None, &mut y).unwrap()
                } else {
                    conv2d_forward(&g, &x, &w, None, &mut y).unwrap()
                }
            })
        });
        group.throughput(Throughput::Elements(3 * g.flops() as u64));
        group.bench_function(format!("{name}/forward+backward"), |b| {
            b.iter(|| {
                if transposed {
                    conv_transpose2d_forward(&g, &x, &w, None, &mut y).unwrap();
                    conv_transpose2d_backward(&g, &x, &w, &dy, Some(&mut dx), Some(&mut dw), None)
                        .unwrap()
                } else {
                    conv2d_forward(&g, &x, &w, None, &mut y).unwrap();
                    conv2d_backward(&g, &x, &w, &dy, Some(&mut dx), Some(&mut dw), None).unwrap()
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
