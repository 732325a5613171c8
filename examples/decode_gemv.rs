//! The GEMV sequence of one GPT-2 124M decode step on weights far larger than the last-level
//! cache: per layer `x·W` for the four Conv1D weights (`[768, 2304]`, `[768, 768]`,
//! `[768, 3072]`, `[3072, 768]`, row-major, 12 layers), then the logits `x·wteᵀ`
//! (`wte` `[50257, 768]`). Prints the median GB/s of each kind of weight, the median step time
//! and, for scale, the rate of a plain sequential read of 64 MiB timed after each step.
//! `ONLY=i` replaces every layer weight by the i-th shape (to time one shape alone);
//! `LAYOUT=panels` lays every weight out in column panels first (`PanelMatrix`, the layout
//! `kiln gpt2` uses for 16-bit weights; `wteᵀ` as the `[768, 50257]` panel matrix), `LAYOUT=stored`
//! (the default) streams them as stored.
//!
//! ```sh
//! cargo run --release --example decode_gemv -- [f32|bf16|f16] [threads] [steps]
//! ```
use half::{bf16, f16};
use kiln::cpu::gemm::{gemm, gemm_panel_matrix, GemmOptions, MatMut, MatRef, PanelMatrix};
use kiln_tensor::FloatElement;
use std::time::Instant;

const LAYERS: usize = 12;
const ROW_SHAPES: [(usize, usize); 4] = [(768, 2304), (768, 768), (768, 3072), (3072, 768)];

fn run<TB: FloatElement>(steps: usize) {
    let fill = |len: usize, seed: u32| -> Vec<TB> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                TB::from_f32((s as f32 / u32::MAX as f32 - 0.5) * 0.04)
            })
            .collect()
    };
    let mut layers = Vec::new();
    let only: Option<usize> = std::env::var("ONLY").ok().and_then(|v| v.parse().ok());
    for l in 0..LAYERS {
        for (i, &(k, n)) in ROW_SHAPES.iter().enumerate() {
            let (k, n) = only.map_or((k, n), |o| ROW_SHAPES[o]);
            layers.push((k, n, fill(k * n, (l * 4 + i + 1) as u32)));
        }
    }
    let wte = fill(50257 * 768, 99);
    let panels = std::env::var("LAYOUT").is_ok_and(|v| v == "panels");
    let layer_panels: Vec<PanelMatrix<TB>> = if panels {
        layers
            .iter()
            .map(|(k, n, w)| PanelMatrix::from_view(&MatRef::row_major(w, *k, *n)).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    let wte_panels = panels
        .then(|| PanelMatrix::<TB>::from_view(&MatRef::row_major(&wte, 50257, 768).t()).unwrap());
    let x = vec![0.01f32; 3072];
    let rd = vec![1.0f32; 16 << 20];
    let mut y = vec![0f32; 50257];
    let opts = GemmOptions::default();
    // One warm-up step, then `steps` timed ones.
    let mut times: Vec<[f64; 7]> = Vec::new();
    for step in 0..=steps {
        let t_step = Instant::now();
        let mut kt = [0f64; 7];
        for (i, (k, n, w)) in layers.iter().enumerate() {
            let t = Instant::now();
            let (xr, yr) = (
                MatRef::row_major(&x[..*k], 1, *k),
                MatMut::row_major(&mut y[..*n], 1, *n),
            );
            match layer_panels.get(i) {
                Some(pm) => gemm_panel_matrix(xr, pm, yr, &opts),
                None => gemm(xr, MatRef::row_major(w, *k, *n), yr, &opts),
            }
            .unwrap();
            kt[i % 4] += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let (xr, yr) = (
            MatRef::row_major(&x[..768], 1, 768),
            MatMut::row_major(&mut y, 1, 50257),
        );
        match &wte_panels {
            Some(pm) => gemm_panel_matrix(xr, pm, yr, &opts),
            None => gemm(xr, MatRef::row_major(&wte, 50257, 768).t(), yr, &opts),
        }
        .unwrap();
        kt[4] += t.elapsed().as_secs_f64();
        kt[5] = t_step.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut acc = [0f32; 16];
        for c in rd.chunks_exact(16) {
            for i in 0..16 {
                acc[i] += c[i];
            }
        }
        std::hint::black_box(acc);
        kt[6] = t.elapsed().as_secs_f64();
        if step >= 1 {
            times.push(kt);
        }
    }
    let e = std::mem::size_of::<TB>() as f64;
    // Weight elements per kind, as laid out above (`ONLY` included).
    let mut elems = [0f64; 5];
    for (i, (k, n, _)) in layers.iter().enumerate() {
        elems[i % 4] += (k * n) as f64;
    }
    elems[4] = 50257.0 * 768.0;
    let all: f64 = elems.iter().sum();
    let med = |i: usize| {
        let mut c: Vec<f64> = times.iter().map(|r| r[i]).collect();
        c.sort_by(|a, b| a.partial_cmp(b).unwrap());
        c[c.len() / 2]
    };
    println!("GB/s:   qkv   proj     fc fcproj    wte | step ms  GB/s | sequential read");
    let mut line = String::from("    ");
    for (i, n) in elems.iter().enumerate() {
        line += &format!(" {:6.1}", n * e / med(i) / 1e9);
    }
    line += &format!(" | {:7.2} {:5.1}", med(5) * 1e3, all * e / med(5) / 1e9);
    line += &format!(" | read {:5.1}", (64u64 << 20) as f64 / med(6) / 1e9);
    println!("{line}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dtype = args.get(1).map(String::as_str).unwrap_or("bf16");
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    match dtype {
        "f32" => run::<f32>(steps),
        "f16" => run::<f16>(steps),
        _ => run::<bf16>(steps),
    }
}
