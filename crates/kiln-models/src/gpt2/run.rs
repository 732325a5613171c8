//! A GPT-2 training run: the token data (a text file or folder tokenized once and cached, or
//! fixed batches from a safetensors file), the learning-rate schedule, validation, samples, and
//! the run folder — a Hub-layout model folder (`config.json`, `model.safetensors`, `vocab.json`,
//! `merges.txt`) that `kiln gpt2 generate` and transformers load, plus
//! `training_state.safetensors` (the weights again, AdamW's moments, and as metadata the step,
//! the batch generator's state and the run's settings) from which `--resume` continues bit for
//! bit. Every file is written atomically; resuming reads only the training state, so a run
//! killed at any moment resumes from one consistent checkpoint.
use super::config::Gpt2Config;
use super::generate::{generate_ids, GenerateOptions, TextStream};
use super::init::layout;
use super::model::Gpt2Model;
use super::sampler::{Rng, SamplerConfig};
use super::train::{from_tensors, tensor_names, AdamW, Gpt2Trainer};
use crate::tokenizer::{Gpt2Tokenizer, GPT2_MERGES_TXT, GPT2_VOCAB_JSON};
use kiln_io::{write_atomic, write_safetensors, SafeTensors};
use kiln_nn::backend::{download_all, Backend};
use kiln_tensor::{DType, Error, Result, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File names in a run folder.
pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "training_state.safetensors";
/// The cached tokens of a text source.
pub const TOKENS_FILE: &str = "tokens.safetensors";
const STATE_KEY: &str = "kiln_gpt2_state";
/// The end-of-text token (between documents of a folder).
const EOT: u32 = 50256;

/// Where the training tokens come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextSource {
    /// A UTF-8 text file.
    File(PathBuf),
    /// Every `.txt` file of a folder (sorted), `<|endoftext|>` between them.
    Folder(PathBuf),
    /// Tensor `tokens` `[steps, batch, seq + 1]` (i64 or i32): step `i` takes slice `i`.
    Batches(PathBuf),
}

impl TextSource {
    /// A path ending in `.safetensors` is batches, a folder is a folder, anything else a file.
    pub fn parse(s: &str) -> TextSource {
        let p = PathBuf::from(s);
        if s.ends_with(".safetensors") {
            TextSource::Batches(p)
        } else if p.is_dir() {
            TextSource::Folder(p)
        } else {
            TextSource::File(p)
        }
    }
    fn describe(&self) -> String {
        match self {
            TextSource::File(p) | TextSource::Folder(p) | TextSource::Batches(p) => {
                p.display().to_string()
            }
        }
    }
}

/// The model a run starts from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A Hub-layout checkpoint folder (fine-tuning).
    Checkpoint(PathBuf),
    /// A new model of this shape, GPT-2's own init (`kiln gpt2 init`'s), from the run's seed.
    New(Gpt2Config),
}

/// Everything a run is made of.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data: TextSource,
    pub model: ModelSource,
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    /// Micro-batches per step.
    pub accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub adamw: AdamW,
    pub dropout: f32,
    pub val_fraction: f64,
    pub seed: u64,
}

/// The settings a resumed run must share with the run it continues.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Settings {
    data: String,
    batch: usize,
    seq: usize,
    accum: usize,
    lr: f64,
    min_lr: f64,
    warmup: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    grad_clip: f64,
    dropout: f32,
    val_fraction: f64,
    seed: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    version: u32,
    settings: Settings,
    config: Gpt2Config,
    step: u64,
    total_steps: u64,
    /// The batch generator's state, as decimal strings.
    rng: [String; 4],
}

/// The token data of a run.
enum Data {
    /// Random contiguous windows of the train split; the validation split is the tail.
    Text { train: Vec<u32>, val: Vec<u32> },
    /// `[steps, batch, seq + 1]`.
    Batches(Vec<u32>),
}

/// The learning rate at step `s` (1-based): linear warmup over `warmup` steps to `lr`, then
/// cosine decay to `min_lr` at the last step. `--warmup 0 --min-lr X --lr X` is constant.
pub fn learning_rate(s: u64, total: u64, lr: f64, min_lr: f64, warmup: u64) -> f64 {
    if s <= warmup {
        return lr * s as f64 / warmup.max(1) as f64;
    }
    if total <= warmup {
        return lr;
    }
    let progress = ((s - warmup) as f64 / (total - warmup) as f64).clamp(0.0, 1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Tokens of a text source, from the cache next to the run when it is still valid.
fn text_tokens(src: &TextSource, tok: &Gpt2Tokenizer, out: &Path) -> Result<Vec<u32>> {
    let files: Vec<PathBuf> = match src {
        TextSource::File(p) => vec![p.clone()],
        TextSource::Folder(d) => {
            let mut v: Vec<PathBuf> = std::fs::read_dir(d)
                .map_err(|e| Error::io(d, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("txt")))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(Error::invalid(format!(
                    "{}: no .txt files in this folder",
                    d.display()
                )));
            }
            v
        }
        TextSource::Batches(_) => unreachable!("batches are not text"),
    };
    // The cache is keyed by every file's path, size and modification time.
    let mut key = String::new();
    for f in &files {
        let m = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        // A device or pipe (`/dev/urandom`) would be read without end.
        if !m.is_file() {
            return Err(Error::invalid(format!(
                "{}: not a regular file",
                f.display()
            )));
        }
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        key.push_str(&format!("{}:{}:{mtime};", f.display(), m.len()));
    }
    let cache = out.join(TOKENS_FILE);
    if let Ok(st) = SafeTensors::open(&cache) {
        if st.metadata().get("source") == Some(&key) {
            if let Ok(t) = st.tensor("tokens") {
                if let Ok(v) = t.to_vec::<i32>() {
                    return Ok(v.into_iter().map(|x| x as u32).collect());
                }
            }
        }
    }
    let mut tokens = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::invalid(format!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                f.display(),
                e.utf8_error().valid_up_to()
            ))
        })?;
        if i > 0 {
            tokens.push(EOT);
        }
        tok.encode_into(&text, &mut tokens);
    }
    if tokens.len() < 2 {
        return Err(Error::invalid(format!(
            "{}: the text is empty (at least 2 tokens are needed)",
            src.describe()
        )));
    }
    let t = Tensor::from_vec(
        tokens.iter().map(|&x| x as i32).collect::<Vec<i32>>(),
        vec![tokens.len()],
    )?;
    let mut meta = BTreeMap::new();
    meta.insert("source".to_string(), key);
    write_safetensors(&cache, [("tokens", &t)], &meta)?;
    Ok(tokens)
}

/// Tensor `tokens` `[steps, batch, seq + 1]` of a batches file.
fn batch_tokens(path: &Path) -> Result<(Vec<u32>, [usize; 3])> {
    let st = SafeTensors::open(path)?;
    let t = st.tensor("tokens")?;
    let dims: [usize; 3] = t.dims().try_into().map_err(|_| {
        Error::invalid(format!(
            "{}: tensor `tokens` has shape {:?}, expected [steps, batch, seq + 1]",
            path.display(),
            t.dims()
        ))
    })?;
    if dims.contains(&0) || dims[2] < 2 {
        return Err(Error::invalid(format!(
            "{}: tensor `tokens` of shape {dims:?} holds no sequences of 2 or more tokens",
            path.display()
        )));
    }
    let v: Vec<i64> = match t.dtype() {
        DType::I64 => t.to_vec::<i64>()?,
        DType::I32 => t.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
        other => {
            return Err(Error::DTypeMismatch {
                context: format!("{}: tensor `tokens`", path.display()),
                expected: "i64 or i32".into(),
                found: other.to_string(),
            })
        }
    };
    if let Some(bad) = v.iter().find(|&&x| !(0..=u32::MAX as i64).contains(&x)) {
        return Err(Error::invalid(format!(
            "{}: token id {bad} is not a vocabulary index",
            path.display()
        )));
    }
    Ok((v.into_iter().map(|x| x as u32).collect(), dims))
}

/// Bytes training at `[b, t]` needs: weights, gradients, two moments, the training state's copy
/// when saving, and the activations of one micro-batch ([`activation_bytes`]).
pub fn training_bytes(cfg: &Gpt2Config, b: usize, t: usize) -> u64 {
    5 * 4 * cfg.num_params() as u64 + activation_bytes(cfg, b, t)
}

/// Bytes a step at `[b, t]` needs beyond the weights, gradients and moments: the activations
/// the backward pass keeps, the logits and the backward scratch (f32).
pub fn activation_bytes(cfg: &Gpt2Config, b: usize, t: usize) -> u64 {
    let (c, f, v, h, l) = (
        cfg.n_embd as u64,
        cfg.mlp_dim() as u64,
        cfg.vocab_size as u64,
        cfg.n_head as u64,
        cfg.n_layer as u64,
    );
    let n = (b * t) as u64;
    let per_layer = n * (8 * c + 2 * f + 4) + h * n;
    4 * (l * per_layer + n * (v + 4 * c + 2) + n * (8 * c + 2 * f))
}

/// A training run in progress.
pub struct TrainRun<B: Backend> {
    pub trainer: Gpt2Trainer<B>,
    pub tokenizer: Gpt2Tokenizer,
    pub options: TrainOptions,
    pub total_steps: u64,
    data: Data,
    rng: Rng,
}

impl<B: Backend> TrainRun<B> {
    /// Starts a run into `out` (which must not hold another run), or continues the one saved
    /// there with `resume`.
    pub fn start(be: B, mut opts: TrainOptions, out: &Path, resume: bool) -> Result<Self> {
        if opts.batch == 0 || opts.seq == 0 || opts.accum == 0 {
            return Err(Error::invalid(
                "--batch, --seq and --accum must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&opts.dropout) {
            return Err(Error::invalid(format!(
                "--dropout {} must be in [0, 1)",
                opts.dropout
            )));
        }
        if !(0.0..1.0).contains(&opts.val_fraction) {
            return Err(Error::invalid(format!(
                "--val-fraction {} must be in [0, 1)",
                opts.val_fraction
            )));
        }
        if !(opts.lr >= 0.0 && opts.lr.is_finite()) {
            return Err(Error::invalid(format!(
                "--lr {} must be finite and ≥ 0",
                opts.lr
            )));
        }
        if !(opts.min_lr >= 0.0 && opts.min_lr.is_finite()) {
            return Err(Error::invalid(format!(
                "--min-lr {} must be finite and ≥ 0",
                opts.min_lr
            )));
        }
        let state_path = out.join(STATE_FILE);
        if out.exists() && !out.is_dir() {
            return Err(Error::invalid(format!(
                "--out {}: not a folder",
                out.display()
            )));
        }
        if !resume && (state_path.exists() || out.join(MODEL_FILE).exists()) {
            return Err(Error::invalid(format!(
                "{} already holds a model: pass --resume to continue its run, or choose another \
                 --out (nothing was overwritten)",
                out.display()
            )));
        }
        if resume && !state_path.exists() {
            return Err(Error::invalid(format!(
                "--resume: {} has no {STATE_FILE} (not a run folder, or no checkpoint yet)",
                out.display()
            )));
        }
        // The model's config and tokenizer.
        let saved = if resume {
            Some(read_saved(&state_path)?)
        } else {
            None
        };
        if let Some(s) = &saved {
            // The model asked for must be the one the run trains.
            let asked = match &opts.model {
                ModelSource::New(cfg) => Some(cfg.clone()),
                ModelSource::Checkpoint(dir) if dir.as_path() != out => {
                    Some(Gpt2Config::from_file(&dir.join(CONFIG_FILE))?)
                }
                ModelSource::Checkpoint(_) => None,
            };
            if let Some(cfg) = asked {
                let shape =
                    |c: &Gpt2Config| (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size);
                if shape(&cfg) != shape(&s.config) {
                    return Err(Error::invalid(format!(
                        "--resume: {} holds a run of another model ({} layers, width {}), not                          the one asked for ({} layers, width {}); nothing was changed",
                        out.display(),
                        s.config.n_layer,
                        s.config.n_embd,
                        cfg.n_layer,
                        cfg.n_embd
                    )));
                }
            }
        }
        let (config, tokenizer) = match (&saved, &opts.model) {
            (Some(s), _) => (s.config.clone(), load_tokenizer(out)?),
            (None, ModelSource::Checkpoint(dir)) => {
                let cfg = Gpt2Config::from_file(&dir.join(CONFIG_FILE))?;
                (cfg, load_tokenizer(dir)?)
            }
            (None, ModelSource::New(cfg)) => (cfg.clone(), Gpt2Tokenizer::gpt2_default()?),
        };
        config.validate()?;
        // The data.
        let data = match &opts.data {
            TextSource::Batches(p) => {
                let (tokens, [steps, b, t1]) = batch_tokens(p)?;
                opts.batch = b;
                opts.seq = t1 - 1;
                opts.accum = 1;
                if (steps as u64) < opts.steps {
                    return Err(Error::invalid(format!(
                        "{}: tensor `tokens` holds {steps} steps, fewer than --steps {}",
                        p.display(),
                        opts.steps
                    )));
                }
                Data::Batches(tokens)
            }
            src => {
                std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
                let tokens = text_tokens(src, &tokenizer, out)?;
                let n_val = (tokens.len() as f64 * opts.val_fraction) as usize;
                let split = tokens.len() - n_val;
                if split < opts.seq + 1 {
                    return Err(Error::invalid(format!(
                        "{}: {} training tokens are fewer than one sequence of --seq {} + 1",
                        src.describe(),
                        split,
                        opts.seq
                    )));
                }
                Data::Text {
                    train: tokens[..split].to_vec(),
                    val: tokens[split..].to_vec(),
                }
            }
        };
        if opts.seq > config.n_positions {
            return Err(Error::invalid(format!(
                "--seq {} exceeds the model's context of {} positions",
                opts.seq, config.n_positions
            )));
        }
        if let Some(&bad) = match &data {
            Data::Text { train, .. } => train.iter().find(|&&x| x as usize >= config.vocab_size),
            Data::Batches(v) => v.iter().find(|&&x| x as usize >= config.vocab_size),
        } {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                config.vocab_size
            )));
        }
        crate::memory::check(
            training_bytes(&config, opts.batch, opts.seq),
            &format!("a step of --batch {} × --seq {}", opts.batch, opts.seq),
            "use a smaller batch with --accum, or a shorter --seq",
        )?;
        // The weights.
        let settings = settings_of(&opts);
        let (weights, rng, step, moments) = match &saved {
            Some(s) => {
                if s.settings != settings {
                    return Err(Error::invalid(format!(
                        "--resume: {} was trained with {:?}, not {:?}",
                        out.display(),
                        s.settings,
                        settings
                    )));
                }
                let st = SafeTensors::open(&state_path)?;
                let w = from_tensors(&be, &config, |name, shape| {
                    read_f32(&st, &format!("model.{name}"), shape)
                })?;
                let rng = Rng::from_state(parse_rng(&s.rng, &state_path)?);
                (w, rng, s.step, Some(st))
            }
            None => {
                let w = match &opts.model {
                    ModelSource::Checkpoint(dir) => {
                        let st = SafeTensors::open(dir.join(MODEL_FILE))?;
                        if st.contains("lm_head.weight") {
                            return Err(Error::invalid(format!(
                                "{}: training needs the output projection tied to `wte` (the \
                                 file has a separate lm_head.weight)",
                                dir.display()
                            )));
                        }
                        from_tensors(&be, &config, |name, shape| {
                            let full = if st.contains(name) {
                                name.to_string()
                            } else {
                                format!("transformer.{name}")
                            };
                            read_f32(&st, &full, shape)
                        })?
                    }
                    ModelSource::New(cfg) => new_weights(&be, cfg, opts.seed)?,
                };
                (w, Rng::new(opts.seed ^ 0x0dd5_eed5), 0, None)
            }
        };
        let model = Gpt2Model::with_backend(config.clone(), weights, be)?;
        let mut trainer = Gpt2Trainer::new(model)?;
        trainer.dropout = opts.dropout;
        trainer.step = step;
        if let Some(st) = moments {
            let names = tensor_names(&config);
            let be = trainer.model.backend();
            for (kind, bufs) in [
                ("m", trainer.m.tensors_mut()),
                ("v", trainer.v.tensors_mut()),
            ] {
                for ((name, shape), buf) in names.iter().zip(bufs) {
                    let vals = read_f32(&st, &format!("adam.{kind}.{name}"), shape)?;
                    be.upload_into(&vals, buf, 0)?;
                }
            }
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let total_steps = opts.steps;
        Ok(TrainRun {
            trainer,
            tokenizer,
            options: opts,
            total_steps,
            data,
            rng,
        })
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.trainer.step
    }

    pub fn done(&self) -> bool {
        self.trainer.step >= self.total_steps
    }

    /// Tokens per step: `accum · batch · seq`.
    pub fn tokens_per_step(&self) -> usize {
        self.options.accum * self.options.batch * self.options.seq
    }

    /// Tokens of the train and validation splits (0 and 0 for fixed batches).
    pub fn split_sizes(&self) -> (usize, usize) {
        match &self.data {
            Data::Text { train, val } => (train.len(), val.len()),
            Data::Batches(_) => (0, 0),
        }
    }

    /// The next micro-batch `[batch, seq + 1]`.
    fn next_batch(&mut self, step: u64, micro: usize) -> Vec<u32> {
        let (b, t) = (self.options.batch, self.options.seq);
        match &self.data {
            Data::Batches(all) => {
                let per = b * (t + 1);
                let i = step as usize;
                let _ = micro;
                all[i * per..(i + 1) * per].to_vec()
            }
            Data::Text { train, .. } => {
                let span = (train.len() - t) as u64;
                let mut out = Vec::with_capacity(b * (t + 1));
                for _ in 0..b {
                    let start = (self.rng.next_u64() % span) as usize;
                    out.extend_from_slice(&train[start..start + t + 1]);
                }
                out
            }
        }
    }

    /// One optimiser step: `accum` micro-batches forward and backward, clipping, AdamW at the
    /// scheduled rate. Returns `(mean loss, lr, grad norm before clipping)`.
    pub fn train_step(&mut self) -> Result<(f32, f64, f32)> {
        let step = self.trainer.step; // 0-based index of this step
        let o = self.options.clone();
        let lr = learning_rate(step + 1, self.total_steps, o.lr, o.min_lr, o.warmup);
        self.trainer.zero_grads()?;
        let mut loss = 0f64;
        for micro in 0..o.accum {
            let tokens = self.next_batch(step, micro);
            let seed = o.seed ^ (step << 8 | micro as u64).wrapping_mul(0xA24B_AED4_963E_E407);
            let l = self.trainer.forward_backward(
                &tokens,
                o.batch,
                o.seq,
                1.0 / o.accum as f32,
                seed,
            )?;
            loss += l as f64;
        }
        let norm = self.trainer.step(lr, &o.adamw)?;
        Ok(((loss / o.accum as f64) as f32, lr, norm))
    }

    /// The mean loss over (up to) `batches` fixed windows of the validation split; `None` when
    /// there is no validation split.
    pub fn val_loss(&mut self, batches: usize) -> Result<Option<f32>> {
        let (b, t) = (self.options.batch, self.options.seq);
        let Data::Text { val, .. } = &self.data else {
            return Ok(None);
        };
        if val.len() < t + 1 {
            return Ok(None);
        }
        // Non-overlapping windows from the start of the split, the same every time.
        let windows = ((val.len() - 1) / t).min(batches * b).max(1);
        let mut tokens = Vec::new();
        for w in 0..windows {
            tokens.extend_from_slice(&val[w * t..w * t + t + 1]);
        }
        let mut total = 0f64;
        let mut count = 0usize;
        for chunk in tokens.chunks(b * (t + 1)) {
            let rows = chunk.len() / (t + 1);
            total += self.trainer.loss(chunk, rows, t)? as f64 * rows as f64;
            count += rows;
        }
        Ok(Some((total / count as f64) as f32))
    }

    /// A continuation of `prompt` from the current weights (greedy when `temperature` is 0).
    pub fn sample(
        &self,
        prompt: &str,
        max_new: usize,
        temperature: f32,
        seed: u64,
    ) -> Result<String> {
        let model = &self.trainer.model;
        let mut ids = self.tokenizer.encode_with_special(prompt, true);
        if ids.is_empty() {
            ids.push(EOT);
        }
        let n = model.config.n_positions;
        if ids.len() >= n {
            ids.drain(..ids.len() + 1 - n);
        }
        let opts = GenerateOptions {
            max_new_tokens: max_new.min(n - ids.len()),
            sampler: if temperature > 0.0 {
                SamplerConfig {
                    greedy: false,
                    temperature,
                    top_k: 40,
                    seed,
                    ..SamplerConfig::greedy()
                }
            } else {
                SamplerConfig::greedy()
            },
            stop_at_eot: true,
            ..GenerateOptions::default()
        };
        let mut stream = TextStream::default();
        let mut text = String::new();
        generate_ids(model, &ids, &opts, |id| {
            let bytes = self.tokenizer.decode_bytes(&[id])?;
            text.push_str(&stream.push(&bytes));
            Ok(true)
        })?;
        text.push_str(&stream.finish());
        Ok(text)
    }

    /// Writes the checkpoint into `out`: the training state first, then the model folder's
    /// files (`model.safetensors` last but for `config.json`).
    pub fn save(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let be = self.trainer.model.backend();
        let cfg = &self.trainer.model.config;
        let names = tensor_names(cfg);
        let to_tensor = |buf: &B::Buf, shape: &[usize]| -> Result<Tensor> {
            let mut v = download_all(be, buf)?;
            v.truncate(shape.iter().product());
            Tensor::from_vec(v, shape.to_vec())
        };
        let weights: Vec<(String, Tensor)> = names
            .iter()
            .zip(self.trainer.model.weights.tensors())
            .map(|((n, s), b)| Ok((n.clone(), to_tensor(b, s)?)))
            .collect::<Result<_>>()?;
        let mut state: Vec<(String, Tensor)> = weights
            .iter()
            .map(|(n, t)| (format!("model.{n}"), t.clone()))
            .collect();
        for (kind, bufs) in [
            ("m", self.trainer.m.tensors()),
            ("v", self.trainer.v.tensors()),
        ] {
            for ((n, s), b) in names.iter().zip(bufs) {
                state.push((format!("adam.{kind}.{n}"), to_tensor(b, s)?));
            }
        }
        let saved = Saved {
            version: 1,
            settings: settings_of(&self.options),
            config: cfg.clone(),
            step: self.trainer.step,
            total_steps: self.total_steps,
            rng: self.rng.state().map(|x| x.to_string()),
        };
        let mut meta = BTreeMap::new();
        meta.insert(
            STATE_KEY.to_string(),
            serde_json::to_string(&saved).map_err(|e| Error::invalid(e.to_string()))?,
        );
        write_safetensors(
            out.join(STATE_FILE),
            state.iter().map(|(n, t)| (n.as_str(), t)),
            &meta,
        )?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors(
            out.join(MODEL_FILE),
            weights.iter().map(|(n, t)| (n.as_str(), t)),
            &meta,
        )?;
        write_atomic(out.join("vocab.json"), |w| w.write_all(GPT2_VOCAB_JSON))?;
        write_atomic(out.join("merges.txt"), |w| w.write_all(GPT2_MERGES_TXT))?;
        write_atomic(out.join(CONFIG_FILE), |w| {
            w.write_all(cfg.to_json().as_bytes())
        })?;
        Ok(())
    }
}

fn settings_of(o: &TrainOptions) -> Settings {
    Settings {
        data: o.data.describe(),
        batch: o.batch,
        seq: o.seq,
        accum: o.accum,
        lr: o.lr,
        min_lr: o.min_lr,
        warmup: o.warmup,
        beta1: o.adamw.beta1,
        beta2: o.adamw.beta2,
        eps: o.adamw.eps,
        weight_decay: o.adamw.weight_decay,
        grad_clip: o.adamw.grad_clip,
        dropout: o.dropout,
        val_fraction: o.val_fraction,
        seed: o.seed,
    }
}

fn read_saved(path: &Path) -> Result<Saved> {
    let st = SafeTensors::open(path)?;
    st.metadata()
        .get(STATE_KEY)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| {
            Error::invalid(format!(
                "{}: not a GPT-2 training state (no readable `{STATE_KEY}` metadata)",
                path.display()
            ))
        })
}

fn parse_rng(s: &[String; 4], path: &Path) -> Result<[u64; 4]> {
    let mut out = [0u64; 4];
    for (o, v) in out.iter_mut().zip(s) {
        *o = v.parse().map_err(|_| {
            Error::invalid(format!("{}: corrupt training state (rng)", path.display()))
        })?;
    }
    Ok(out)
}

/// Tensor `name` as f32, its shape checked.
fn read_f32(st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st.tensor(name)?;
    t.expect_dims(&format!("{}: tensor `{name}`", st.path().display()), shape)?;
    t.to_f32_vec()
}

/// The folder's tokenizer, or the built-in GPT-2 one.
fn load_tokenizer(dir: &Path) -> Result<Gpt2Tokenizer> {
    let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if v.exists() || m.exists() {
        Gpt2Tokenizer::from_files(&v, &m)
    } else {
        Gpt2Tokenizer::gpt2_default()
    }
}

/// GPT-2's own init for `cfg` (as `kiln gpt2 init` writes it) as trainable weights.
fn new_weights<B: Backend>(
    be: &B,
    cfg: &Gpt2Config,
    seed: u64,
) -> Result<super::weights::Gpt2Weights<B>> {
    let fills = layout(cfg);
    let mut i = 0;
    from_tensors(be, cfg, |_, shape| {
        let (_, _, fill) = &fills[i];
        let v = super::init::fill_values(i, shape, *fill, seed);
        i += 1;
        Ok(v)
    })
}
