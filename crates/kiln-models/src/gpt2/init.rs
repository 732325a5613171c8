//! A randomly initialised GPT-2 checkpoint folder in the Hub's layout, so that generation can
//! run at real size and speed without downloading weights.
//!
//! The init is GPT-2's own (OpenAI's `model.py`, which transformers follows for the matrices):
//! every matrix `N(0, 0.02)`, the residual projections (`attn.c_proj.weight`,
//! `mlp.c_proj.weight`) `N(0, 0.02/√(2·n_layer))`, `wte` `N(0, 0.02)`, `wpe` `N(0, 0.01)`,
//! biases 0, layer-norm gains 1 and biases 0.
//!
//! The random numbers come from xoshiro256** streams seeded per tensor and per block of 64 Ki
//! elements, so the file is the same for a given seed whatever the number of threads.
use super::config::Gpt2Config;
use super::sampler::Rng;
use crate::tokenizer::{GPT2_MERGES_TXT, GPT2_VOCAB_JSON};
use half::{bf16, f16};
use kiln_tensor::{DType, Error, Result, Tensor};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const CHUNK: usize = 1 << 16;

/// How a tensor is filled.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fill {
    Normal(f64),
    Const(f32),
}

/// The Hub's tensor names and shapes for `cfg`, with their init, in a fixed order.
pub(crate) fn layout(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>, Fill)> {
    let (c, f, v, p) = (cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size, cfg.n_positions);
    let std = 0.02;
    let resid = std / (2.0 * cfg.n_layer as f64).sqrt();
    let mut out = vec![
        ("wte.weight".to_string(), vec![v, c], Fill::Normal(std)),
        ("wpe.weight".to_string(), vec![p, c], Fill::Normal(0.01)),
    ];
    for l in 0..cfg.n_layer {
        let n = |s: &str| format!("h.{l}.{s}");
        out.extend([
            (n("ln_1.weight"), vec![c], Fill::Const(1.0)),
            (n("ln_1.bias"), vec![c], Fill::Const(0.0)),
            (n("attn.c_attn.weight"), vec![c, 3 * c], Fill::Normal(std)),
            (n("attn.c_attn.bias"), vec![3 * c], Fill::Const(0.0)),
            (n("attn.c_proj.weight"), vec![c, c], Fill::Normal(resid)),
            (n("attn.c_proj.bias"), vec![c], Fill::Const(0.0)),
            (n("ln_2.weight"), vec![c], Fill::Const(1.0)),
            (n("ln_2.bias"), vec![c], Fill::Const(0.0)),
            (n("mlp.c_fc.weight"), vec![c, f], Fill::Normal(std)),
            (n("mlp.c_fc.bias"), vec![f], Fill::Const(0.0)),
            (n("mlp.c_proj.weight"), vec![f, c], Fill::Normal(resid)),
            (n("mlp.c_proj.bias"), vec![c], Fill::Const(0.0)),
        ]);
    }
    out.push(("ln_f.weight".to_string(), vec![c], Fill::Const(1.0)));
    out.push(("ln_f.bias".to_string(), vec![c], Fill::Const(0.0)));
    out
}

/// The seed of the stream for block `chunk` of tensor `index`.
fn stream_seed(seed: u64, index: usize, chunk: usize) -> u64 {
    let mut r = Rng::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next_u64() ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// The f32 values of tensor `index` of the layout (shape `shape`, filled as `fill`).
pub(crate) fn fill_values(index: usize, shape: &[usize], fill: Fill, seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut vals = vec![0f32; n];
    match fill {
        Fill::Const(c) => vals.iter_mut().for_each(|v| *v = c),
        Fill::Normal(std) => vals
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(k, chunk)| {
                let mut rng = Rng::new(stream_seed(seed, index, k));
                chunk
                    .iter_mut()
                    .for_each(|v| *v = (rng.next_normal() * std) as f32);
            }),
    }
    vals
}

/// One tensor's values in `dtype`.
fn make_tensor(
    index: usize,
    shape: &[usize],
    fill: Fill,
    seed: u64,
    dtype: DType,
) -> Result<Tensor> {
    let vals = fill_values(index, shape, fill, seed);
    match dtype {
        DType::F32 => Tensor::from_vec(vals, shape.to_vec()),
        DType::BF16 => {
            let h: Vec<bf16> = vals.par_iter().map(|&x| bf16::from_f32(x)).collect();
            Tensor::from_vec(h, shape.to_vec())
        }
        DType::F16 => {
            let h: Vec<f16> = vals.par_iter().map(|&x| f16::from_f32(x)).collect();
            Tensor::from_vec(h, shape.to_vec())
        }
        other => Err(Error::invalid(format!(
            "a checkpoint dtype must be f32, f16 or bf16, not {other}"
        ))),
    }
}

/// Writes `file` atomically with `bytes`.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    kiln_io::write_atomic(path, |w| w.write_all(bytes))
}

/// Writes a random GPT-2 of shape `cfg` into `dir` (created if needed): `config.json`,
/// `model.safetensors` (weights in `dtype`, Hub names, `lm_head` tied), `vocab.json` and
/// `merges.txt`. Every file is written atomically.
pub fn init_checkpoint(dir: &Path, cfg: &Gpt2Config, dtype: DType, seed: u64) -> Result<()> {
    cfg.validate()?;
    if !dtype.is_float() {
        return Err(Error::invalid(format!(
            "a checkpoint dtype must be f32, f16 or bf16, not {dtype}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = layout(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, fill))| Ok((name, make_tensor(i, &shape, fill, seed, dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    kiln_io::write_safetensors(
        dir.join("model.safetensors"),
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        &meta,
    )?;
    drop(tensors);
    write_file(&dir.join("vocab.json"), GPT2_VOCAB_JSON)?;
    write_file(&dir.join("merges.txt"), GPT2_MERGES_TXT)?;
    // config.json last: a folder with a config is a complete folder.
    write_file(&dir.join("config.json"), cfg.to_json().as_bytes())?;
    Ok(())
}
