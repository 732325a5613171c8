//! `kiln bench … --device cuda`: the same benchmarks on a CUDA device (kiln-cuda's kernels),
//! with the same record fields. Times are device times (CUDA events around each call, median
//! of the repetitions); `threads` holds the device's multiprocessor count; the fractions are of
//! the device's dense f32 or bf16 peak computed from its properties (SMs × rate per SM per clock
//! × peak clock) or of the copy bandwidth measured here. Without a GPU every command fails with
//! one line `error: device: no CUDA device: …`.
use super::attention::AttentionArgs;
use super::conv::{ConvArgs, DCGAN_LAYERS};
use super::matmul::{layout_fields, Layout, MatmulArgs};
use super::peak::PeakArgs;
use super::{random_f32, BenchRecord};
use half::{bf16, f16};
use kiln_cpu::conv::{Conv2dParams, ConvGeometry};
use kiln_cuda::ops::attention::{
    attention_decode, attention_forward, AttentionOptions, DecodeLens, HeadsLayout, HeadsView,
    KvCacheLayout,
};
use kiln_cuda::ops::conv;
use kiln_cuda::ops::gemm::{gemm, GemmDims, GemmEpilogue};
use kiln_cuda::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Error, Result};

/// `--device`: `cpu` → None, `cuda` or `cuda:N` → Some(N).
pub fn parse_device(s: &str) -> Result<Option<usize>> {
    match s {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                Error::invalid(format!("--device must be cpu, cuda or cuda:N, not {s}"))
            }),
    }
}

fn open(ordinal: usize) -> Result<CudaDevice> {
    CudaDevice::new(ordinal)
}

/// Median device seconds of `f` over `reps` timed calls after `warmup` untimed ones.
fn median_s(
    dev: &CudaDevice,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        t.push(dev.time(&mut f)?);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn upload_as(dev: &CudaDevice, dtype: DType, v: &[f32]) -> Result<CudaBuf> {
    match dtype {
        DType::BF16 => dev.upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        DType::F16 => dev.upload(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
        _ => dev.upload(v),
    }
}

/// Prints a record, adding `tflops` next to `gflops` (GPU rates read better in TFLOP/s).
fn emit(mut r: BenchRecord, json: bool) {
    if let Some(g) = r.gflops {
        r.extra.insert("tflops".into(), (g / 1e3).into());
    }
    r.print(json);
}

fn device_extra(dev: &CudaDevice) -> serde_json::Map<String, serde_json::Value> {
    let i = dev.info();
    let mut e = serde_json::Map::new();
    e.insert("device".into(), "cuda".into());
    e.insert("device_name".into(), i.name.clone().into());
    e.insert(
        "sm".into(),
        format!("{}{}", i.compute_capability.0, i.compute_capability.1).into(),
    );
    e
}

/// Copy bandwidth (read + write bytes per second) of a device-to-device copy of `bytes`.
pub fn copy_gbps(dev: &CudaDevice, bytes: usize) -> Result<f64> {
    let n = bytes / 4;
    let src = dev.zeros(DType::F32, n)?;
    let mut dst = dev.zeros(DType::F32, n)?;
    let s = median_s(dev, 2, 10, || dev.copy(&src, &mut dst))?;
    Ok(2.0 * (n * 4) as f64 / s / 1e9)
}

pub fn peak(args: &PeakArgs, ordinal: usize) -> Result<()> {
    let dev = open(ordinal)?;
    let i = dev.info().clone();
    let sms = i.multiprocessors as usize;
    let rec =
        |op: &str, dtype: &str, gflops: Option<f64>, gbps: Option<f64>, ms: f64, source: &str| {
            let mut extra = device_extra(&dev);
            extra.insert("source".into(), source.into());
            extra.insert("clock_mhz".into(), (i.clock_khz as f64 / 1e3).into());
            BenchRecord {
                op: op.into(),
                shape: serde_json::json!([sms]),
                dtype: dtype.into(),
                threads: sms,
                median_ms: ms,
                gflops,
                gbps,
                peak_fraction: 1.0,
                extra,
            }
        };
    let fma = rec(
        "fma",
        "f32",
        Some(i.peak_f32_flops() / 1e9),
        None,
        0.0,
        "properties",
    );
    emit(fma, args.json);
    let bf16 = rec(
        "bf16_peak",
        "bf16",
        Some(i.peak_bf16_flops() / 1e9),
        None,
        0.0,
        "properties",
    );
    emit(bf16, args.json);
    let bytes = 256 << 20;
    let gbps = copy_gbps(&dev, bytes)?;
    let mut r = rec(
        "copy",
        "f32",
        None,
        Some(gbps),
        2.0 * bytes as f64 / gbps / 1e6,
        "measured",
    );
    r.shape = serde_json::json!([bytes / 4]);
    r.extra.insert(
        "dram_gbps_theoretical".into(),
        (i.peak_dram_bytes_per_s() / 1e9).into(),
    );
    r.print(args.json);
    Ok(())
}

pub fn matmul(args: &MatmulArgs, ordinal: usize) -> Result<()> {
    let (m, n, k) = (args.m, args.n, args.k);
    if m == 0 || n == 0 || k == 0 {
        return Err(Error::invalid(
            "bench matmul: --m, --n and --k must be at least 1",
        ));
    }
    let layout = Layout::parse(&args.layout).ok_or_else(|| {
        Error::invalid(format!(
            "bench matmul: --layout must be nn, tn, nt, row or col, not {}",
            args.layout
        ))
    })?;
    let b_dtype = DType::parse(&args.dtype)
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            Error::invalid(format!(
                "bench matmul: --dtype must be f32, bf16 or f16, not {}",
                args.dtype
            ))
        })?;
    // --matmul-precision bf16: A and B both 16-bit, on the tensor cores.
    let a_dtype = match args.matmul_precision.as_str() {
        "f32" => DType::F32,
        "bf16" if b_dtype != DType::F32 => b_dtype,
        "bf16" => {
            return Err(Error::invalid(
                "bench matmul: --matmul-precision bf16 needs --dtype bf16 or f16",
            ))
        }
        other => {
            return Err(Error::invalid(format!(
                "bench matmul: --matmul-precision must be f32 or bf16, not {other}"
            )))
        }
    };
    let dev = open(ordinal)?;
    let a = upload_as(&dev, a_dtype, &random_f32(m * k, 1))?;
    let b = upload_as(&dev, b_dtype, &random_f32(k * n, 2))?;
    let mut c = dev.zeros(DType::F32, m * n)?;
    let dims = GemmDims {
        m,
        n,
        k,
        a_t: layout == Layout::Tn,
        b_t: layout == Layout::Nt,
    };
    let s = median_s(&dev, 2, args.reps.max(3), || {
        gemm(&dev, &a, &b, &mut c, dims, 1.0, 0.0, GemmEpilogue::None)
    })?;
    let i = dev.info();
    let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
    let peak = if a_dtype == DType::F32 {
        i.peak_f32_flops()
    } else {
        i.peak_bf16_flops()
    } / 1e9;
    let mut extra = device_extra(&dev);
    layout_fields(&mut extra, layout);
    extra.insert("peak_gflops".into(), peak.into());
    extra.insert(
        "matmul_precision".into(),
        args.matmul_precision.clone().into(),
    );
    let kernel = if a_dtype == DType::F32 && m <= kiln_cuda::ops::gemm::GEMV_MAX_M {
        "gemv"
    } else if a_dtype != DType::F32 {
        "tensor_core"
    } else {
        "tiled_f32"
    };
    extra.insert("kernel".into(), kernel.into());
    let (gbps, fraction) = if m == 1 {
        let bw = copy_gbps(&dev, 256 << 20)?;
        extra.insert("peak_gbps".into(), bw.into());
        extra.insert("gflops_m1".into(), gflops.into());
        let g = (k * n * b_dtype.size_in_bytes()) as f64 / s / 1e9;
        (Some(g), g / bw)
    } else {
        (None, gflops / peak)
    };
    emit(
        BenchRecord {
            op: "matmul".into(),
            shape: serde_json::json!([m, n, k]),
            dtype: b_dtype.name().into(),
            threads: i.multiprocessors as usize,
            median_ms: s * 1e3,
            gflops: if m == 1 { None } else { Some(gflops) },
            gbps,
            peak_fraction: fraction,
            extra,
        },
        args.json,
    );
    Ok(())
}

pub fn attention(a: &AttentionArgs, ordinal: usize) -> Result<()> {
    let (b, h, t, d) = (a.batch, a.heads, a.seq, a.head_dim);
    if b == 0 || h == 0 || t == 0 || d == 0 {
        return Err(Error::invalid(
            "bench attention: every size must be positive",
        ));
    }
    let kv = DType::parse(&a.kv_dtype)
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            Error::invalid(format!(
                "bench attention: kv dtype `{}` (f32, bf16 or f16)",
                a.kv_dtype
            ))
        })?;
    let dev = open(ordinal)?;
    let i = dev.info().clone();
    let mut extra = device_extra(&dev);
    let reps = ((a.min_ms / 50) as usize).clamp(3, 50);
    let (op, s, gflops, gbps, dtype) = if a.decode {
        let layout = KvCacheLayout {
            offset: 0,
            sequences: b,
            heads: h,
            capacity: t,
            head_dim: d,
        };
        let kc = upload_as(&dev, kv, &random_f32(b * h * t * d, 1))?;
        let vc = upload_as(&dev, kv, &random_f32(b * h * t * d, 2))?;
        let q = dev.upload(&random_f32(b * h * d, 3))?;
        let ql = HeadsLayout::contiguous(b, h, 1, d);
        let mut o = dev.zeros(DType::F32, b * h * d)?;
        let s = median_s(&dev, 3, reps, || {
            attention_decode(
                &dev,
                HeadsView::new(&q, ql),
                &kc,
                &vc,
                layout,
                DecodeLens::Uniform(t),
                (&mut o, ql),
                None,
            )
        })?;
        let bytes = 2.0 * (b * h * t * d * kv.size_in_bytes()) as f64;
        extra.insert("kv_bytes".into(), bytes.into());
        let bw = copy_gbps(&dev, 256 << 20)?;
        extra.insert("peak_gbps".into(), bw.into());
        (
            "attention_decode",
            s,
            None,
            Some(bytes / s / 1e9),
            format!("f32/kv:{}", kv.name()),
        )
    } else {
        // f32 kv: the f32 flash kernel (q f32); bf16/f16: q, k, v all 16-bit on the tensor cores.
        let q_dtype = if kv == DType::F32 { DType::F32 } else { kv };
        let l = HeadsLayout::contiguous(b, h, t, d);
        let q = upload_as(&dev, q_dtype, &random_f32(b * h * t * d, 1))?;
        let kb = upload_as(&dev, kv, &random_f32(b * h * t * d, 2))?;
        let vb = upload_as(&dev, kv, &random_f32(b * h * t * d, 3))?;
        let mut o = dev.zeros(DType::F32, b * h * t * d)?;
        let opts = AttentionOptions {
            causal: a.causal,
            scale: None,
        };
        let s = median_s(&dev, 2, reps, || {
            attention_forward(
                &dev,
                HeadsView::new(&q, l),
                HeadsView::new(&kb, l),
                HeadsView::new(&vb, l),
                (&mut o, l),
                None,
                opts,
            )
        })?;
        let pairs = if a.causal {
            (t * (t + 1) / 2) as f64
        } else {
            (t * t) as f64
        };
        let flops = 4.0 * (b * h * d) as f64 * pairs;
        let peak = if kv == DType::F32 {
            i.peak_f32_flops()
        } else {
            i.peak_bf16_flops()
        } / 1e9;
        extra.insert("peak_gflops".into(), peak.into());
        extra.insert(
            "kernel".into(),
            if kv == DType::F32 {
                "flash_f32"
            } else {
                "flash_tensor_core"
            }
            .into(),
        );
        let dtype = if kv == DType::F32 {
            "f32/kv:f32".to_string()
        } else {
            kv.name().to_string()
        };
        ("attention_prefill", s, Some(flops / s / 1e9), None, dtype)
    };
    let peak_fraction = match (gflops, gbps) {
        (Some(g), _) => g / extra["peak_gflops"].as_f64().unwrap_or(f64::INFINITY),
        (_, Some(bw)) => bw / extra["peak_gbps"].as_f64().unwrap_or(f64::INFINITY),
        _ => 0.0,
    };
    emit(
        BenchRecord {
            op: op.into(),
            shape: serde_json::json!({"batch": b, "heads": h, "seq": t, "head_dim": d, "causal": a.causal}),
            dtype,
            threads: i.multiprocessors as usize,
            median_ms: s * 1e3,
            gflops,
            gbps,
            peak_fraction,
            extra,
        },
        a.json,
    );
    Ok(())
}

pub fn conv(args: &ConvArgs, transposed: bool, ordinal: usize) -> Result<()> {
    let dev = open(ordinal)?;
    if args.dcgan {
        for (name, t, cin, cout, size, k, s, p) in DCGAN_LAYERS {
            for backward in [false, true] {
                let a = ConvArgs {
                    in_channels: cin,
                    out_channels: cout,
                    size,
                    kernel: k,
                    stride: s,
                    padding: p,
                    backward,
                    ..args.clone()
                };
                emit(conv_one(&dev, &a, t, Some(name))?, args.json);
            }
        }
        return Ok(());
    }
    emit(conv_one(&dev, args, transposed, None)?, args.json);
    Ok(())
}

fn conv_one(
    dev: &CudaDevice,
    a: &ConvArgs,
    transposed: bool,
    layer: Option<&str>,
) -> Result<BenchRecord> {
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
    let x = dev.upload(&random_f32(g.input_len(), 1))?;
    let w = dev.upload(&random_f32(g.weight_len(), 2))?;
    let dy = dev.upload(&random_f32(g.output_len(), 3))?;
    let mut y = dev.zeros(DType::F32, g.output_len())?;
    let mut dx = dev.zeros(DType::F32, g.input_len())?;
    let mut dw = dev.zeros(DType::F32, g.weight_len())?;
    let reps = ((a.min_time * 20.0) as usize).clamp(3, 50);
    let s = median_s(dev, 2, reps, || {
        if transposed {
            conv::conv_transpose2d_forward(dev, &g, &x, &w, None, &mut y)?;
            if a.backward {
                conv::conv_transpose2d_backward(
                    dev,
                    &g,
                    &x,
                    &w,
                    &dy,
                    Some(&mut dx),
                    Some(&mut dw),
                    None,
                )?;
            }
        } else {
            conv::conv2d_forward(dev, &g, &x, &w, None, &mut y)?;
            if a.backward {
                conv::conv2d_backward(dev, &g, &x, &w, &dy, Some(&mut dx), Some(&mut dw), None)?;
            }
        }
        Ok(())
    })?;
    let flops = g.flops() * if a.backward { 3.0 } else { 1.0 };
    let gflops = flops / s / 1e9;
    let op = match (transposed, a.backward) {
        (false, false) => "conv2d",
        (false, true) => "conv2d+backward",
        (true, false) => "conv_transpose2d",
        (true, true) => "conv_transpose2d+backward",
    };
    let mut extra = device_extra(dev);
    if let Some(l) = layer {
        extra.insert("layer".into(), l.into());
    }
    let peak = dev.info().peak_f32_flops() / 1e9;
    extra.insert("peak_gflops".into(), peak.into());
    Ok(BenchRecord {
        op: op.into(),
        shape: serde_json::json!({
            "batch": a.batch, "in": a.in_channels, "out": a.out_channels, "size": a.size,
            "kernel": a.kernel, "stride": a.stride, "padding": a.padding,
            "out_size": g.output_shape()[2],
        }),
        dtype: "f32".into(),
        threads: dev.info().multiprocessors as usize,
        median_ms: s * 1e3,
        gflops: Some(gflops),
        gbps: None,
        peak_fraction: gflops / peak,
        extra,
    })
}
