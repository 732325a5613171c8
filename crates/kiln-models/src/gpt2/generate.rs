//! The library API: load a checkpoint folder, tokenize, generate with a callback per token.
//!
//! ```no_run
//! use kiln_models::gpt2::{Gpt2, GenerateOptions, LoadOptions};
//! let gpt2 = Gpt2::load("models/gpt2", &LoadOptions::default())?;
//! let out = gpt2.generate("What is the capital of France?", &GenerateOptions::default(), |_id, text| {
//!     print!("{text}");
//!     true // keep going
//! })?;
//! eprintln!("\n{} tokens, {:.1} tokens/s", out.ids.len(), out.decode_tokens_per_s());
//! # Ok::<(), kiln_tensor::Error>(())
//! ```
use super::config::Gpt2Config;
use super::model::{Gpt2Model, Gpt2State, Logits};
use super::sampler::{Sampler, SamplerConfig};
use super::weights::Gpt2Weights;
use crate::tokenizer::Gpt2Tokenizer;
use kiln_io::SafeTensors;
pub use kiln_nn::backend::MatmulPrecision;
use kiln_nn::backend::{Backend, CpuBackend};
use kiln_tensor::{DType, Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The end-of-text token of the GPT-2 vocabulary.
pub const EOT: u32 = 50256;

/// How a checkpoint folder is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of the weight matrices in memory; `None` keeps the checkpoint's (zero-copy).
    pub dtype: Option<DType>,
    /// Touch every page of the mapped weights while loading, so that the first forward pass does
    /// not pay the page faults (they count in the load time instead). Default true.
    pub prefault: bool,
    /// 16-bit linear weights laid out in column panels (a copy, made while converting), which a
    /// decode step streams faster than the checkpoint's `[in, out]` rows; false keeps them as
    /// stored (zero-copy when the dtype is the file's). Default true.
    pub panels: bool,
    /// Arithmetic of the products with bf16 weights ([`MatmulPrecision`]): `Bf16` runs a
    /// prompt's prefill on the CPU's native bf16 arithmetic (AMX or AVX512-BF16, activations
    /// rounded to bf16) where it has one. Default `F32`.
    pub matmul_precision: MatmulPrecision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            prefault: true,
            panels: true,
            matmul_precision: MatmulPrecision::F32,
        }
    }
}

/// What to do when the prompt plus the new tokens do not fit in `n_positions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextPolicy {
    /// Refuse with an error before running anything.
    #[default]
    Error,
    /// Drop the oldest prompt tokens so that prompt + `max_new_tokens` fit.
    TruncateLeft,
}

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampler: SamplerConfig,
    /// Stop when `<|endoftext|>` is produced (it is not added to the output).
    pub stop_at_eot: bool,
    pub context: ContextPolicy,
    /// Treat `<|endoftext|>` in the prompt text as the special token.
    pub allow_special: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampler: SamplerConfig::greedy(),
            stop_at_eot: true,
            context: ContextPolicy::Error,
            allow_special: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// `<|endoftext|>` was produced.
    EndOfText,
    /// The callback asked to stop.
    Callback,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The prompt as the model saw it (after truncation, if any).
    pub prompt_ids: Vec<u32>,
    /// The new tokens (without a final `<|endoftext|>`).
    pub ids: Vec<u32>,
    /// The new tokens decoded (invalid UTF-8 as U+FFFD).
    pub text: String,
    pub stop: StopReason,
    /// Time of the prompt's forward pass and the first token's choice.
    pub prefill_ms: f64,
    /// Time of the decode steps (every token after the first).
    pub decode_ms: f64,
    /// Number of decode steps (forward passes after the prefill).
    pub decode_steps: usize,
}

impl Generation {
    /// Decode steps per second (0 when there were none).
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_steps == 0 || self.decode_ms <= 0.0 {
            0.0
        } else {
            self.decode_steps as f64 / (self.decode_ms / 1e3)
        }
    }
}

/// Turns a stream of token byte strings into text, holding back an incomplete UTF-8 sequence
/// until the bytes that finish it arrive (a token may end in the middle of a character).
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds `bytes` and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..good]).expect("checked valid"),
                    );
                    match e.error_len() {
                        // Invalid bytes: one U+FFFD, then carry on after them.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + n);
                        }
                        // An incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// The text still held back (an unfinished sequence comes out as U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// A loaded GPT-2: model, tokenizer and how long loading took.
pub struct Gpt2<B: Backend = CpuBackend> {
    pub model: Gpt2Model<B>,
    pub tokenizer: Gpt2Tokenizer,
    /// Folder it was loaded from.
    pub dir: PathBuf,
    pub load_ms: f64,
    /// The precision the model's bf16-weight products were asked to use.
    pub matmul_precision: MatmulPrecision,
}

impl<B: Backend> std::fmt::Debug for Gpt2<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2")
            .field("dir", &self.dir)
            .field("model", &self.model)
            .field("load_ms", &self.load_ms)
            .finish()
    }
}

impl Gpt2<CpuBackend> {
    /// Loads a folder as the Hub has it: `config.json`, `model.safetensors`, `vocab.json` and
    /// `merges.txt` (when the last two are absent, the GPT-2 tokenizer built into kiln is used),
    /// onto the CPU backend.
    pub fn load(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let backend = CpuBackend::with_matmul_precision(opts.matmul_precision);
        Self::load_on(dir, opts, backend)
    }
}

impl<B: Backend> Gpt2<B> {
    /// [`Gpt2::load`] onto `backend`: every weight is uploaded once, here.
    pub fn load_on(dir: impl AsRef<Path>, opts: &LoadOptions, backend: B) -> Result<Self> {
        let start = Instant::now();
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let tokenizer = load_tokenizer(dir, &config)?;
        let file = SafeTensors::open(dir.join("model.safetensors"))?;
        let dtype = match opts.dtype {
            Some(d) => d,
            None => checkpoint_dtype(&file)?,
        };
        let weights = Gpt2Weights::load_with(&backend, &file, &config, dtype, opts.panels)?;
        // Zero-copy tensors keep the map alive through their storage; converted ones do not need
        // it, and closing it here returns its pages when nothing borrows them.
        drop(file);
        if opts.prefault {
            weights.prefault(&backend);
        }
        let model = Gpt2Model::with_backend(config, weights, backend)?;
        Ok(Gpt2 {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
            load_ms: start.elapsed().as_secs_f64() * 1e3,
            matmul_precision: opts.matmul_precision,
        })
    }

    /// Token ids of `text`; with `allow_special`, `<|endoftext|>` is the special token.
    pub fn encode(&self, text: &str, allow_special: bool) -> Vec<u32> {
        self.tokenizer.encode_with_special(text, allow_special)
    }

    /// Text of `ids` (invalid UTF-8 as U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    /// Tokenizes `prompt` and generates; `on_token(id, text)` is called for every new token with
    /// the text it completes (possibly empty, when the token ends inside a UTF-8 character) and
    /// returns `false` to stop.
    pub fn generate(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        let ids = self.encode(prompt, opts.allow_special);
        self.generate_ids(&ids, opts, on_token)
    }

    /// Generates from prompt ids; see [`Gpt2::generate`].
    pub fn generate_ids(
        &self,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Generation> {
        let gens =
            self.generate_batch_of_ids(&[prompt_ids], opts, |_, id, text| on_token(id, text))?;
        gens.into_iter()
            .next()
            .ok_or_else(|| Error::invalid("generation returned no result"))
    }
}

impl<B: Backend> Gpt2<B> {
    /// Tokenizes and generates for several prompts at once (batched decode, see
    /// [`generate_batch_ids`]); `on_token(seq, id, text)` is called for every new token of
    /// sequence `seq` with the text it completes, and returns `false` to stop that sequence.
    /// The results are in the order of `prompts`.
    pub fn generate_batch(
        &self,
        prompts: &[&str],
        opts: &GenerateOptions,
        on_token: impl FnMut(usize, u32, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::invalid(format!("prompt {i} is empty")));
        }
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.encode(p, opts.allow_special))
            .collect();
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        self.generate_batch_of_ids(&refs, opts, on_token)
    }

    /// [`generate_batch_ids`] with each sequence's tokens turned into text as they come
    /// (a per-sequence [`TextStream`]); what is held back at the end is reported with id
    /// `u32::MAX`.
    fn generate_batch_of_ids(
        &self,
        prompts: &[&[u32]],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        let mut streams = vec![TextStream::default(); prompts.len()];
        let mut texts = vec![String::new(); prompts.len()];
        let mut gens = generate_batch_ids(&self.model, prompts, opts, |b, id| {
            let bytes = self.tokenizer.decode_bytes(&[id])?;
            let piece = streams[b].push(&bytes);
            texts[b].push_str(&piece);
            Ok(on_token(b, id, &piece))
        })?;
        for (b, g) in gens.iter_mut().enumerate() {
            let rest = streams[b].finish();
            if !rest.is_empty() {
                on_token(b, u32::MAX, &rest);
                texts[b].push_str(&rest);
            }
            g.text = std::mem::take(&mut texts[b]);
        }
        Ok(gens)
    }
}

/// The dtype of the checkpoint's matrices (that of `wte.weight`).
pub fn checkpoint_dtype(file: &SafeTensors) -> Result<DType> {
    let name = if file.contains("wte.weight") {
        "wte.weight"
    } else {
        "transformer.wte.weight"
    };
    Ok(file.info(name)?.dtype)
}

/// The folder's tokenizer, or the built-in GPT-2 one when the folder has none.
fn load_tokenizer(dir: &Path, config: &Gpt2Config) -> Result<Gpt2Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let tok = if vocab.exists() || merges.exists() {
        Gpt2Tokenizer::from_files(&vocab, &merges)?
    } else {
        Gpt2Tokenizer::gpt2_default()?
    };
    if tok.vocab_size() > config.vocab_size {
        return Err(Error::Config {
            path: dir.join("config.json"),
            reason: format!(
                "vocab_size {} is smaller than the tokenizer's {} tokens",
                config.vocab_size,
                tok.vocab_size()
            ),
        });
    }
    Ok(tok)
}

/// The generation loop on ids: prefill the prompt in one pass, then one decode step per token,
/// calling `on_token(id)` after each choice (`Ok(false)` stops). It is [`generate_batch_ids`]
/// with a batch of one.
pub fn generate_ids<B: Backend>(
    model: &Gpt2Model<B>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    let gens = generate_batch_ids(model, &[prompt_ids], opts, |_, id| on_token(id))?;
    gens.into_iter()
        .next()
        .ok_or_else(|| Error::invalid("generation returned no result"))
}

/// The prompt as the model will see it: an error when it is empty, or when prompt + new tokens
/// do not fit in `n_positions` under [`ContextPolicy::Error`]; the last tokens that fit under
/// [`ContextPolicy::TruncateLeft`].
fn fit_prompt<'a, B: Backend>(
    model: &Gpt2Model<B>,
    prompt_ids: &'a [u32],
    opts: &GenerateOptions,
) -> Result<&'a [u32]> {
    let n_pos = model.config.n_positions;
    if prompt_ids.is_empty() {
        return Err(Error::invalid("the prompt is empty"));
    }
    let mut prompt = prompt_ids;
    // The last new token is never fed back, so prompt + max_new - 1 positions are needed.
    let need = prompt.len() + opts.max_new_tokens.saturating_sub(1);
    if need > n_pos {
        match opts.context {
            ContextPolicy::Error => {
                return Err(Error::Capacity(format!(
                    "the prompt ({} tokens) plus {} new tokens exceed the model's context of {n_pos} positions \
                     (use fewer new tokens, a shorter prompt, or truncation)",
                    prompt.len(),
                    opts.max_new_tokens
                )))
            }
            ContextPolicy::TruncateLeft => {
                let keep = n_pos.saturating_sub(opts.max_new_tokens.saturating_sub(1));
                if keep == 0 {
                    return Err(Error::Capacity(format!(
                        "{} new tokens do not fit in the model's context of {n_pos} positions",
                        opts.max_new_tokens
                    )));
                }
                prompt = &prompt[prompt.len() - keep..];
            }
        }
    }
    Ok(prompt)
}

/// Generation for several prompts at once (batched decode): each prompt is prefilled on its
/// own, then every unfinished sequence takes its next step in one
/// [`Gpt2Model::forward_batch`], so the weights are read once per step for the whole batch.
/// Each sequence has its own sampler built from `opts.sampler` (the same seed), and products of
/// up to `gemm::INVARIANT_ROWS` rows give each row bitwise its own result (the batched step's
/// products are row-invariant), so a sequence's tokens are
/// those of generating it alone (beyond that batch size, up to the rounding of the blocked
/// products). `on_token(seq, id)`
/// is called after each choice; `Ok(false)` stops that sequence. `decode_ms` of every result is
/// the wall time of the shared decode loop, so the batch produces the sum of their
/// `decode_steps` in that time.
pub fn generate_batch_ids<B: Backend>(
    model: &Gpt2Model<B>,
    prompts: &[&[u32]],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<bool>,
) -> Result<Vec<Generation>> {
    let fitted = prompts
        .iter()
        .map(|p| fit_prompt(model, p, opts))
        .collect::<Result<Vec<_>>>()?;
    let mut gens: Vec<Generation> = fitted
        .iter()
        .map(|p| Generation {
            prompt_ids: p.to_vec(),
            ids: Vec::new(),
            text: String::new(),
            stop: StopReason::MaxTokens,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            decode_steps: 0,
        })
        .collect();
    if opts.max_new_tokens == 0 || prompts.is_empty() {
        return Ok(gens);
    }
    let mut samplers = Vec::with_capacity(prompts.len());
    let mut states = Vec::with_capacity(prompts.len());
    let mut histories: Vec<Vec<u32>> = fitted.iter().map(|p| p.to_vec()).collect();
    let mut next = Vec::with_capacity(prompts.len());
    let mut logits = Vec::new();
    for (g, p) in gens.iter_mut().zip(&fitted) {
        let mut sampler = Sampler::new(opts.sampler.clone())?;
        let mut state = model.new_state(p.len() + opts.max_new_tokens - 1)?;
        let t0 = Instant::now();
        model.forward(p, &mut state, Logits::Last, &mut logits)?;
        next.push(sampler.sample(&mut logits, &histories[states.len()])?);
        g.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        samplers.push(sampler);
        states.push(state);
    }
    let v = model.config.vocab_size;
    let mut active: Vec<bool> = vec![true; prompts.len()];
    let t1 = Instant::now();
    loop {
        // Record each active sequence's choice; drop the finished ones.
        for b in 0..prompts.len() {
            if !active[b] {
                continue;
            }
            let id = next[b];
            if opts.stop_at_eot && id == EOT {
                gens[b].stop = StopReason::EndOfText;
                active[b] = false;
                continue;
            }
            gens[b].ids.push(id);
            histories[b].push(id);
            if !on_token(b, id)? {
                gens[b].stop = StopReason::Callback;
                active[b] = false;
            } else if gens[b].ids.len() == opts.max_new_tokens {
                active[b] = false;
            }
        }
        let live: Vec<usize> = (0..prompts.len()).filter(|&b| active[b]).collect();
        if live.is_empty() {
            break;
        }
        let ids: Vec<u32> = live.iter().map(|&b| next[b]).collect();
        let mut batch: Vec<&mut Gpt2State<B>> = states
            .iter_mut()
            .enumerate()
            .filter(|(b, _)| active[*b])
            .map(|(_, s)| s)
            .collect();
        model.forward_batch(&ids, &mut batch, &mut logits)?;
        for (row, &b) in live.iter().enumerate() {
            gens[b].decode_steps += 1;
            let l = &mut logits[row * v..(row + 1) * v];
            next[b] = samplers[b].sample(l, &histories[b])?;
        }
    }
    let decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    for g in &mut gens {
        g.decode_ms = decode_ms;
    }
    Ok(gens)
}
