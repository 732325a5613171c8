//! `kiln bench conv2d|conv-transpose2d`: convolution forward, or forward + backward (input and
//! weight gradients), on NCHW f32; `--dcgan` runs every layer of the PyTorch DCGAN example.
use super::{median_ms, with_threads, BenchRecord};
use clap::Args;
use kiln_cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
    Conv2dParams, ConvGeometry,
};
use kiln_tensor::Result;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct ConvArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Input channels.
    #[arg(long = "in", default_value_t = 64)]
    pub in_channels: usize,
    /// Output channels.
    #[arg(long = "out", default_value_t = 128)]
    pub out_channels: usize,
    /// Input height and width.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    #[arg(long, default_value_t = 4)]
    pub kernel: usize,
    #[arg(long, default_value_t = 2)]
    pub stride: usize,
    #[arg(long, default_value_t = 1)]
    pub padding: usize,
    /// Time forward + backward (input and weight gradients) instead of forward alone.
    #[arg(long)]
    pub backward: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Every DCGAN layer (generator and discriminator), forward and forward + backward.
    #[arg(long)]
    pub dcgan: bool,
    /// Minimum measuring time per record, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub min_time: f64,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu (default), or cuda / cuda:N (kiln-cuda's kernels on that GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// One layer of the DCGAN example: (name, transposed, in, out, input size, kernel, stride, padding).
pub type DcganLayer = (&'static str, bool, usize, usize, usize, usize, usize, usize);

/// Every layer of the PyTorch DCGAN example (generator G1–G5, discriminator D1–D5).
pub const DCGAN_LAYERS: [DcganLayer; 10] = [
    ("G1", true, 100, 512, 1, 4, 1, 0),
    ("G2", true, 512, 256, 4, 4, 2, 1),
    ("G3", true, 256, 128, 8, 4, 2, 1),
    ("G4", true, 128, 64, 16, 4, 2, 1),
    ("G5", true, 64, 3, 32, 4, 2, 1),
    ("D1", false, 3, 64, 64, 4, 2, 1),
    ("D2", false, 64, 128, 32, 4, 2, 1),
    ("D3", false, 128, 256, 16, 4, 2, 1),
    ("D4", false, 256, 512, 8, 4, 2, 1),
    ("D5", false, 512, 1, 4, 4, 1, 0),
];

pub fn run(args: ConvArgs, transposed: bool) -> Result<()> {
    if args.dcgan {
        for (name, t, cin, cout, size, k, s, p) in DCGAN_LAYERS {
            let a = ConvArgs {
                in_channels: cin,
                out_channels: cout,
                size,
                kernel: k,
                stride: s,
                padding: p,
                ..args.clone()
            };
            for backward in [false, true] {
                one(
                    &ConvArgs {
                        backward,
                        ..a.clone()
                    },
                    t,
                    Some(name),
                )?
                .print(args.json);
            }
        }
        return Ok(());
    }
    one(&args, transposed, None)?.print(args.json);
    Ok(())
}

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

fn one(a: &ConvArgs, transposed: bool, layer: Option<&str>) -> Result<BenchRecord> {
    let p = Conv2dParams::new(a.stride, a.padding);
    let x_shape = [a.batch, a.in_channels, a.size, a.size];
    let g = if transposed {
        ConvGeometry::conv_transpose2d(
            x_shape,
            [a.in_channels, a.out_channels, a.kernel, a.kernel],
            &p,
        )?
    } else {
        ConvGeometry::conv2d(
            x_shape,
            [a.out_channels, a.in_channels, a.kernel, a.kernel],
            &p,
        )?
    };
    let x = fill(g.input_len(), 1);
    let w = fill(g.weight_len(), 2);
    let dy = fill(g.output_len(), 3);
    let mut y = vec![0f32; g.output_len()];
    let mut dx = vec![0f32; g.input_len()];
    let mut dw = vec![0f32; g.weight_len()];
    let threads = a.threads.unwrap_or_else(rayon::current_num_threads);
    let min_time = Duration::from_secs_f64(a.min_time.max(0.0));
    let ms = with_threads(a.threads, || -> Result<f64> {
        let mut err = Ok(());
        let ms = median_ms(1, 3, min_time, || {
            let r = if transposed {
                conv_transpose2d_forward(&g, &x, &w, None, &mut y).and_then(|_| {
                    if a.backward {
                        conv_transpose2d_backward(
                            &g,
                            &x,
                            &w,
                            &dy,
                            Some(&mut dx),
                            Some(&mut dw),
                            None,
                        )
                    } else {
                        Ok(())
                    }
                })
            } else {
                conv2d_forward(&g, &x, &w, None, &mut y).and_then(|_| {
                    if a.backward {
                        conv2d_backward(&g, &x, &w, &dy, Some(&mut dx), Some(&mut dw), None)
                    } else {
                        Ok(())
                    }
                })
            };
            if r.is_err() && err.is_ok() {
                err = r;
            }
        });
        err.map(|_| ms)
    })??;
    // Forward, input gradient and weight gradient are one product of equal size each.
    let flops = g.flops() * if a.backward { 3.0 } else { 1.0 };
    let gflops = flops / (ms * 1e-3) / 1e9;
    let op = match (transposed, a.backward) {
        (false, false) => "conv2d",
        (false, true) => "conv2d+backward",
        (true, false) => "conv_transpose2d",
        (true, true) => "conv_transpose2d+backward",
    };
    let mut extra = serde_json::Map::new();
    if let Some(l) = layer {
        extra.insert("layer".into(), l.into());
    }
    // The measured FP32 FMA ceiling for this thread count (`kiln bench peak`).
    let pk = kiln_cpu::peak::quick(threads);
    let peak = pk.fma_gflops(threads);
    extra.insert("peak_gflops".into(), peak.into());
    extra.insert("peak_isa".into(), pk.isa.into());
    Ok(BenchRecord {
        op: op.into(),
        shape: serde_json::json!({
            "batch": a.batch, "in": a.in_channels, "out": a.out_channels, "size": a.size,
            "kernel": a.kernel, "stride": a.stride, "padding": a.padding,
            "out_size": g.output_shape()[2],
        }),
        dtype: "f32".into(),
        threads,
        median_ms: ms,
        gflops: Some(gflops),
        gbps: None,
        peak_fraction: gflops / peak,
        extra,
    })
}
