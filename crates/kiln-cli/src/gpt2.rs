//! `kiln gpt2 …`: generate, logits, tokenize, detokenize, init.
//!
//! Every subcommand takes a checkpoint folder as the Hub has it (`config.json`,
//! `model.safetensors`, `vocab.json`, `merges.txt`); `kiln gpt2 init` writes one with random
//! weights. Errors end the command with one `error:` line and exit status 1.
use crate::bench::with_threads;
use crate::device::Device;
use crate::request::{check_context, Sampling};
use clap::{Args, Subcommand};
use kiln_models::gpt2::{
    init_checkpoint, ContextPolicy, GenerateOptions, Generation, Gpt2, Gpt2Config, LoadOptions,
    MatmulPrecision,
};
use kiln_models::tokenizer::Gpt2Tokenizer;
use kiln_nn::backend::Backend;
use kiln_tensor::{DType, Error, Result, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum Gpt2Command {
    /// Generate text from a prompt, streaming it to stdout; timings go to stderr.
    Generate(GenerateArgs),
    /// Write the logits [T, vocab] (f32) and ids (i64) of one forward pass to a safetensors file.
    Logits(LogitsArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// Print the text of token ids.
    Detokenize(DetokenizeArgs),
    /// Write a randomly initialised checkpoint folder (Hub layout, tokenizer files included).
    Init(InitArgs),
    /// Train or fine-tune on text: AdamW, warmup + cosine schedule, validation, samples,
    /// checkpoints in the Hub layout, --resume.
    Train(crate::gpt2_train::TrainArgs),
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(
        long,
        conflicts_with_all = ["prompt_file", "batch_prompts"],
        required_unless_present_any = ["prompt_file", "batch_prompts"]
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file (UTF-8).
    #[arg(long, conflicts_with = "batch_prompts")]
    pub prompt_file: Option<PathBuf>,
    /// Generate for every line of this file (UTF-8, one prompt per line, empty lines skipped)
    /// in one batch: one decode step for all of them. Prints each prompt and its text when all
    /// are done (with --json, one object per prompt and line, with its `batch_index`).
    #[arg(long, value_name = "FILE")]
    pub batch_prompts: Option<PathBuf>,
    /// Most tokens to generate (generation also stops at <|endoftext|>).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature (sampling is used when this, --top-k or --top-p is given).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens (0 keeps all).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    /// Sample among the most likely tokens whose probabilities sum to p.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Penalty on tokens already in the text (1.0 = none; CTRL's rule).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f64,
    /// Seed of the sampler's random generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Always take the most likely token (the default unless a sampling option is given).
    #[arg(long)]
    pub greedy: bool,
    /// Weight dtype in memory: f32, bf16 or f16 (default: the checkpoint's, used without copy).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Arithmetic of products with bf16 weights: f32 (default: activations stay f32) or bf16
    /// (forwards of 16 or more tokens — a prompt's prefill, a batch of 16 or more prompts' decode
    /// step — round activations to bf16 and run on AMX or AVX512-BF16 where the CPU has them,
    /// as PyTorch's bf16 model does; a single sequence's decode steps stay f32).
    #[arg(long, value_name = "f32|bf16", default_value = "f32")]
    pub matmul_precision: String,
    /// Keep 16-bit linear weights as the checkpoint stores them (`[in, out]`, zero-copy when the
    /// dtype is the file's) instead of laying them out in column panels for decode.
    #[arg(long)]
    pub stored_layout: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object {prompt_ids, ids, text, load_ms, prefill_ms, decode_tokens_per_s, …}
    /// instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Treat `<|endoftext|>` in the prompt as the special token (id 50256).
    #[arg(long)]
    pub allow_special: bool,
    /// Drop the oldest prompt tokens when prompt + new tokens exceed the context (default: error).
    #[arg(long)]
    pub truncate: bool,
    /// If the model folder has no config.json, first write a random checkpoint of this size there
    /// (124M, 355M, 774M, 1558M or tiny), as `kiln gpt2 init` would.
    #[arg(long, value_name = "SIZE")]
    pub init_if_missing: Option<String>,
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda", help = crate::device::HELP)]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Text to run.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub prompt: Option<String>,
    /// Token ids to run, comma-separated.
    #[arg(long)]
    pub ids: Option<String>,
    /// Output safetensors file: `logits` [T, vocab] f32, `ids` [T] i64.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype in memory: f32, bf16 or f16 (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Arithmetic of products with bf16 weights: f32 (default) or bf16 (native bf16 arithmetic
    /// for a forward of 16 or more tokens where the CPU has it; see `generate --help`).
    #[arg(long, value_name = "f32|bf16", default_value = "f32")]
    pub matmul_precision: String,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Treat `<|endoftext|>` in the prompt as the special token.
    #[arg(long)]
    pub allow_special: bool,
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda", help = crate::device::HELP)]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Checkpoint folder (its vocab.json and merges.txt; GPT-2's own when it has none).
    #[arg(long)]
    pub model: PathBuf,
    /// The text.
    #[arg(long)]
    pub text: String,
    /// Treat `<|endoftext|>` as the special token.
    #[arg(long)]
    pub allow_special: bool,
}

#[derive(Args, Debug)]
pub struct DetokenizeArgs {
    /// Checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long)]
    pub ids: String,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Folder to write (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// 124M, 355M, 774M, 1558M or tiny.
    #[arg(long, default_value = "124M")]
    pub size: String,
    /// Dtype of the weights in the file: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: Gpt2Command) -> Result<()> {
    match cmd {
        Gpt2Command::Train(a) => {
            let threads = a.threads;
            check_threads(threads)?;
            with_threads(threads, move || crate::gpt2_train::run(a))?
        }
        Gpt2Command::Generate(a) => {
            let threads = a.threads;
            check_threads(threads)?;
            with_threads(threads, move || generate(a))?
        }
        Gpt2Command::Logits(a) => {
            let threads = a.threads;
            check_threads(threads)?;
            with_threads(threads, move || logits(a))?
        }
        Gpt2Command::Tokenize(a) => tokenize(a),
        Gpt2Command::Detokenize(a) => detokenize(a),
        Gpt2Command::Init(a) => init(a),
    }
}

fn check_threads(threads: Option<usize>) -> Result<()> {
    if threads == Some(0) {
        return Err(Error::invalid("--threads must be at least 1"));
    }
    Ok(())
}

/// Parses a `--dtype` value (f32, bf16, f16).
fn parse_precision(s: &str) -> Result<MatmulPrecision> {
    MatmulPrecision::parse(s)
        .ok_or_else(|| Error::invalid(format!("--matmul-precision `{s}`: expected f32 or bf16")))
}

fn parse_dtype(s: &str) -> Result<DType> {
    match DType::parse(s) {
        Some(d) if d.is_float() => Ok(d),
        _ => Err(Error::invalid(format!(
            "--dtype `{s}`: expected f32, bf16 or f16"
        ))),
    }
}

/// Parses `1,2,3` (spaces allowed).
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| Error::invalid(format!("--ids: `{p}` is not a token id")))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        return Err(Error::invalid("--ids: no token ids given"));
    }
    Ok(ids)
}

/// The tokenizer of a checkpoint folder: its vocab.json and merges.txt, or GPT-2's built-in
/// files when the folder has neither.
fn folder_tokenizer(dir: &Path) -> Result<Gpt2Tokenizer> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
        ));
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if vocab.exists() || merges.exists() {
        Gpt2Tokenizer::from_files(&vocab, &merges)
    } else {
        Gpt2Tokenizer::gpt2_default()
    }
}

/// Writes `text` to stdout. A reader that closed the pipe (`kiln … | head`) ends the output
/// quietly, as other Unix tools do; other write errors are errors.
fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("<stdout>", e)),
        _ => Ok(()),
    }
}

fn read_prompt_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::Text(format!(
            "{}: the prompt file is not valid UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Peak resident memory of this process in MB (Linux `VmHWM`), if known.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The native bf16 kernel the prefill of bf16 weights runs on (`"amx"`, `"avx512bf16"`), or
/// `None` when the products are f32 (and on a GPU).
fn bf16_kernel<B: Backend>(gpt2: &Gpt2<B>) -> Option<&'static str> {
    let bf16 = gpt2.model.weights.dtype == DType::BF16;
    let cpu = gpt2.model.backend().name() == "cpu";
    if !cpu || !bf16 || gpt2.matmul_precision != MatmulPrecision::Bf16 {
        return None;
    }
    kiln_cpu::gemm::amx::best_native_kernel().map(|k| k.name())
}

/// The `--json` object of one generation.
fn generation_json<B: Backend>(gpt2: &Gpt2<B>, gen: &Generation) -> serde_json::Value {
    json!({
        "device": gpt2.model.backend().name(),
        "prompt_ids": gen.prompt_ids,
        "ids": gen.ids,
        "text": gen.text,
        "load_ms": gpt2.load_ms,
        "prefill_ms": gen.prefill_ms,
        "decode_tokens_per_s": gen.decode_tokens_per_s(),
        "decode_ms": gen.decode_ms,
        "decode_steps": gen.decode_steps,
        "load_to_first_token_ms": gpt2.load_ms + gen.prefill_ms,
        "stop": format!("{:?}", gen.stop),
        "dtype": gpt2.model.weights.dtype.name(),
        "matmul_precision": gpt2.matmul_precision.name(),
        "bf16_kernel": bf16_kernel(gpt2),
        "threads": rayon::current_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
    })
}

fn generate(a: GenerateArgs) -> Result<()> {
    let batch = match &a.batch_prompts {
        Some(f) => {
            let text = read_prompt_file(f)?;
            let lines: Vec<String> = text
                .lines()
                .map(|l| l.trim_end_matches('\r'))
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if lines.is_empty() {
                return Err(Error::invalid(format!(
                    "{}: no prompts (one per line)",
                    f.display()
                )));
            }
            Some(lines)
        }
        None => None,
    };
    let prompt = match (&a.prompt, &a.prompt_file, &batch) {
        (_, _, Some(_)) => String::new(),
        (Some(p), _, _) => p.clone(),
        (None, Some(f), _) => read_prompt_file(f)?,
        (None, None, None) => {
            return Err(Error::invalid(
                "give --prompt, --prompt-file or --batch-prompts",
            ))
        }
    };
    if batch.is_none() && prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty"));
    }
    let dtype = a.dtype.as_deref().map(parse_dtype).transpose()?;
    let device = Device::parse(&a.device)?;
    let precision = parse_precision(&a.matmul_precision)?;
    if device != Device::Cpu && precision != MatmulPrecision::F32 {
        return Err(Error::invalid(
            "--matmul-precision bf16 is for the CPU (on cuda, bf16 weights multiply f32 activations)",
        ));
    }
    // The same checks as `kiln serve` (crate::request), all before any output.
    let sampler = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        repetition_penalty: Some(a.repetition_penalty),
        seed: a.seed,
        greedy: a.greedy,
    }
    .config(true)?;
    // The device first: without one, nothing is written or loaded.
    let cuda = device.cuda_backend()?;
    if let Some(size) = &a.init_if_missing {
        if !a.model.join("config.json").exists() {
            let cfg = Gpt2Config::preset(size)?;
            eprintln!(
                "{}: no checkpoint there; writing a random GPT-2 {size} ({} parameters)",
                a.model.display(),
                cfg.num_params()
            );
            init_checkpoint(&a.model, &cfg, DType::F32, 0)?;
        }
    }
    let load = LoadOptions {
        dtype,
        panels: !a.stored_layout,
        matmul_precision: precision,
        ..Default::default()
    };
    let sampling = (batch, prompt, sampler);
    match cuda {
        None => generate_on(&a, Gpt2::load(&a.model, &load)?, sampling),
        Some(be) => generate_on(&a, Gpt2::load_on(&a.model, &load, be)?, sampling),
    }
}

/// The generation of `generate`, on the backend `gpt2` was loaded onto.
fn generate_on<B: Backend>(
    a: &GenerateArgs,
    gpt2: Gpt2<B>,
    (batch, prompt, sampler): (
        Option<Vec<String>>,
        String,
        kiln_models::gpt2::SamplerConfig,
    ),
) -> Result<()> {
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampler,
        stop_at_eot: true,
        context: if a.truncate {
            ContextPolicy::TruncateLeft
        } else {
            ContextPolicy::Error
        },
        allow_special: a.allow_special,
    };
    let n_pos = gpt2.model.config.n_positions;
    let fits = |ids: &[u32]| -> Result<()> {
        if a.truncate && !ids.is_empty() {
            return Ok(());
        }
        Ok(check_context(ids.len(), a.max_new_tokens, n_pos)?)
    };
    let mut out = std::io::stdout().lock();
    if let Some(prompts) = &batch {
        for (i, p) in prompts.iter().enumerate() {
            fits(&gpt2.encode(p, a.allow_special))
                .map_err(|e| Error::invalid(format!("prompt {i} (line {}): {e}", i + 1)))?;
        }
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let gens = gpt2.generate_batch(&refs, &opts, |_, _, _| true)?;
        let threads = rayon::current_num_threads();
        let dtype = gpt2.model.weights.dtype;
        let steps: usize = gens.iter().map(|g| g.decode_steps).sum();
        let decode_ms = gens.first().map_or(0.0, |g| g.decode_ms);
        let batch_rate = if decode_ms > 0.0 {
            steps as f64 / decode_ms * 1e3
        } else {
            0.0
        };
        for (i, (p, gen)) in prompts.iter().zip(&gens).enumerate() {
            if a.json {
                let mut obj = generation_json(&gpt2, gen);
                obj["batch_index"] = json!(i);
                obj["batch_decode_tokens_per_s"] = json!(batch_rate);
                let _ = writeln!(out, "{obj}");
            } else {
                let _ = writeln!(out, "{p}{}", gen.text);
            }
        }
        if !a.json {
            eprintln!(
                "load {:.0} ms · {} prompts · decode {steps} tokens in all, {batch_rate:.1} tokens/s · {} weights, {}",
                gpt2.load_ms,
                prompts.len(),
                dtype,
                where_(&gpt2, threads)
            );
        }
        return Ok(());
    }
    let prompt_ids = gpt2.encode(&prompt, a.allow_special);
    fits(&prompt_ids)?;
    if !a.json {
        let _ = out.write_all(prompt.as_bytes());
        let _ = out.flush();
    }
    let stream = !a.json;
    let gen = gpt2.generate_ids(&prompt_ids, &opts, |_, text| {
        if stream && !text.is_empty() {
            // A closed pipe stops the output, not the run.
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        true
    })?;
    let threads = rayon::current_num_threads();
    let dtype = gpt2.model.weights.dtype;
    if a.json {
        let obj = generation_json(&gpt2, &gen);
        let _ = writeln!(out, "{obj}");
    } else {
        let _ = writeln!(out);
        eprintln!(
            "load {:.0} ms · prefill {} tokens {:.1} ms · decode {} tokens {:.1} tokens/s · {} weights, {}",
            gpt2.load_ms,
            gen.prompt_ids.len(),
            gen.prefill_ms,
            gen.decode_steps,
            gen.decode_tokens_per_s(),
            dtype,
            where_(&gpt2, threads)
        );
    }
    Ok(())
}

/// `N threads` on the CPU, the device's name on a GPU.
fn where_<B: Backend>(gpt2: &Gpt2<B>, threads: usize) -> String {
    match gpt2.model.backend().name() {
        "cpu" => format!("{threads} threads"),
        other => other.to_string(),
    }
}

fn logits(a: LogitsArgs) -> Result<()> {
    let dtype = a.dtype.as_deref().map(parse_dtype).transpose()?;
    let device = Device::parse(&a.device)?;
    let precision = parse_precision(&a.matmul_precision)?;
    if device != Device::Cpu && precision != MatmulPrecision::F32 {
        return Err(Error::invalid(
            "--matmul-precision bf16 is for the CPU (on cuda, bf16 weights multiply f32 activations)",
        ));
    }
    let load = LoadOptions {
        dtype,
        matmul_precision: precision,
        ..Default::default()
    };
    match device.cuda_backend()? {
        None => logits_on(&a, Gpt2::load(&a.model, &load)?),
        Some(be) => logits_on(&a, Gpt2::load_on(&a.model, &load, be)?),
    }
}

fn logits_on<B: Backend>(a: &LogitsArgs, gpt2: Gpt2<B>) -> Result<()> {
    let ids = match (&a.prompt, &a.ids) {
        (Some(p), _) => {
            if p.is_empty() {
                return Err(Error::invalid("the prompt is empty"));
            }
            gpt2.encode(p, a.allow_special)
        }
        (None, Some(s)) => parse_ids(s)?,
        (None, None) => return Err(Error::invalid("give --prompt or --ids")),
    };
    let logits = gpt2.model.logits(&ids)?;
    let v = gpt2.model.config.vocab_size;
    let t_logits = Tensor::from_vec(logits, vec![ids.len(), v])?;
    let t_ids = Tensor::from_vec(
        ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        vec![ids.len()],
    )?;
    kiln_io::write_safetensors(
        &a.out,
        [("logits", &t_logits), ("ids", &t_ids)],
        &BTreeMap::new(),
    )?;
    eprintln!(
        "wrote {}: logits [{}, {v}], ids [{}]",
        a.out.display(),
        ids.len(),
        ids.len()
    );
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = folder_tokenizer(&a.model)?;
    let ids = tok.encode_with_special(&a.text, a.allow_special);
    print_out(&format!("{}\n", json!(ids)))
}

fn detokenize(a: DetokenizeArgs) -> Result<()> {
    let tok = folder_tokenizer(&a.model)?;
    let ids = parse_ids(&a.ids)?;
    let text = tok.decode(&ids)?;
    print_out(&format!("{text}\n"))
}

fn init(a: InitArgs) -> Result<()> {
    let cfg = Gpt2Config::preset(&a.size)?;
    let dtype = parse_dtype(&a.dtype)?;
    let start = Instant::now();
    init_checkpoint(&a.out, &cfg, dtype, a.seed)?;
    let bytes = std::fs::metadata(a.out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "wrote {}: GPT-2 {} ({} layers, {} heads, width {}), {} parameters, {dtype}, {:.0} MB, in {:.1} s",
        a.out.display(),
        a.size,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.num_params(),
        bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
