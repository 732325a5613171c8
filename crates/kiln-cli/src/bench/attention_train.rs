//! `kiln bench attention --backward`: the training attention (causal, GPT-2's fused QKV layout
//! `[batch·seq, 3·heads·head_dim]`), forward with log-sum-exp then backward.
//!
//! `median_ms` is one forward plus one backward. Flop convention: the forward counts
//! `F = 4·batch·heads·head_dim·seq·(seq+1)/2` (two products over the causal pairs, as the
//! prefill figure does) and the backward `2.5·F` (five products instead of two: recomputed
//! scores, dP, dV, dK, dQ), so `gflops = 3.5·F / median_ms`. The separate medians
//! `forward_ms` and `backward_ms` come with `forward_gflops` (`F`) and `backward_gflops`
//! (`2.5·F`), and `inference_ms` is the inference kernel (`attention_forward`, causal) on the
//! same shape for comparison.
use super::attention::{insert_cpu_ms, peak_rss_mib, process_cpu_s, AttentionArgs};
use super::{median_ms, random_f32, with_threads, BenchRecord};
use kiln_cpu::attention::{
    attention_backward, attention_forward, attention_train_forward, AttentionOptions, HeadsMut,
    HeadsRef,
};
use kiln_tensor::{Error, Result};
use std::time::Duration;

pub fn run(a: &AttentionArgs) -> Result<()> {
    if a.decode {
        return Err(Error::invalid(
            "bench attention: --backward measures training attention; it excludes --decode",
        ));
    }
    if a.kv_dtype != "f32" {
        return Err(Error::invalid(
            "bench attention: --backward runs on f32 only (--kv-dtype f32)",
        ));
    }
    let (b, h, t, d) = (a.batch, a.heads, a.seq, a.head_dim);
    let c = h * d;
    let threads = a.threads.unwrap_or_else(super::default_threads);
    let min_time = Duration::from_millis(a.min_ms);
    let qkv = random_f32(b * t * 3 * c, 1);
    let dout = random_f32(b * t * c, 2);
    let mut out = vec![0f32; b * t * c];
    let mut lse = vec![0f32; b * h * t];
    let mut dqkv = vec![0f32; b * t * 3 * c];
    let mut inf = vec![0f32; b * t * c];
    let mut extra = serde_json::Map::new();
    let (ms, fwd_ms, bwd_ms, inf_ms) = with_threads(Some(threads), || -> Result<_> {
        attention_train_forward(&qkv, b, t, h, d, &mut out, &mut lse)?;
        attention_backward(&qkv, &out, &dout, &lse, b, t, h, d, &mut dqkv)?;
        let fwd = median_ms(1, 3, min_time, || {
            attention_train_forward(&qkv, b, t, h, d, &mut out, &mut lse).expect("forward")
        });
        let bwd = median_ms(1, 3, min_time, || {
            attention_backward(&qkv, &out, &dout, &lse, b, t, h, d, &mut dqkv).expect("backward")
        });
        let mut calls = 0usize;
        let cpu0 = process_cpu_s();
        let both = median_ms(1, 3, min_time, || {
            calls += 1;
            attention_train_forward(&qkv, b, t, h, d, &mut out, &mut lse).expect("forward");
            attention_backward(&qkv, &out, &dout, &lse, b, t, h, d, &mut dqkv).expect("backward");
        });
        insert_cpu_ms(&mut extra, cpu0, calls);
        let view = |part| HeadsRef::fused_qkv(&qkv, b, t, h, d, part);
        let (qv, kv, vv) = (view(0)?, view(1)?, view(2)?);
        let inf_ms = median_ms(1, 3, min_time, || {
            attention_forward(
                qv,
                kv,
                vv,
                HeadsMut::seq_major(&mut inf, b, t, h, d),
                AttentionOptions::causal(),
            )
            .expect("inference attention")
        });
        Ok((both, fwd, bwd, inf_ms))
    })??;
    let fwd_flops = 4.0 * (b * h * d) as f64 * (t * (t + 1) / 2) as f64;
    let flops = 3.5 * fwd_flops;
    let gflops = flops / ms / 1e6;
    extra.insert("forward_ms".into(), fwd_ms.into());
    extra.insert("backward_ms".into(), bwd_ms.into());
    extra.insert("forward_gflops".into(), (fwd_flops / fwd_ms / 1e6).into());
    extra.insert(
        "backward_gflops".into(),
        (2.5 * fwd_flops / bwd_ms / 1e6).into(),
    );
    extra.insert("backward_over_forward".into(), (bwd_ms / fwd_ms).into());
    extra.insert("inference_ms".into(), inf_ms.into());
    extra.insert(
        "flops_convention".into(),
        "forward 4*B*H*D*T(T+1)/2, backward 2.5x forward".into(),
    );
    let io_bytes = 4.0 * (2 * b * t * 3 * c + 3 * b * t * c + b * h * t) as f64;
    extra.insert("io_mib".into(), (io_bytes / (1u64 << 20) as f64).into());
    if let Some(rss) = peak_rss_mib() {
        extra.insert("peak_rss_mib".into(), rss.into());
    }
    let pk = kiln_cpu::peak::quick(threads);
    extra.insert("peak_gflops".into(), pk.fma_gflops(threads).into());
    extra.insert("peak_gbps".into(), pk.gbps(threads).into());
    BenchRecord {
        op: "attention_train".into(),
        shape: serde_json::json!({"batch": b, "heads": h, "seq": t, "head_dim": d, "causal": true}),
        dtype: "f32".into(),
        threads,
        median_ms: ms,
        gflops: Some(gflops),
        gbps: None,
        peak_fraction: gflops / pk.fma_gflops(threads),
        extra,
    }
    .print(a.json);
    Ok(())
}
