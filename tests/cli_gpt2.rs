//! `kiln gpt2 …` end to end: generate (text and JSON), logits, tokenize, detokenize, init, and
//! one `error:` line with a non-zero exit for every broken input.
mod gpt2_common;

use gpt2_common::{derive, fixture_dir, rel_err, Derive, Expected, TempDir};
use kiln_io::SafeTensors;
use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

fn ok(args: &[&str]) -> (String, String) {
    let out = kiln(args);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "kiln {args:?} failed: {se}");
    (so, se)
}

/// Runs a command that must fail and returns its one `error:` line.
fn fails(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(!out.status.success(), "kiln {args:?} should fail");
    assert!(out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("error"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "kiln {args:?}: expected one line, got {err:?}"
    );
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_json_equals_transformers_greedy() {
    let exp = Expected::load();
    let dir = fixture_dir();
    let (stdout, _) = ok(&[
        "gpt2",
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "20",
        "--greedy",
        "--dtype",
        "f32",
        "--threads",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    assert_eq!(ids("prompt_ids"), exp.ids("p0.ids"));
    assert_eq!(ids("ids"), exp.ids("p0.greedy"));
    for k in ["load_ms", "prefill_ms", "decode_tokens_per_s"] {
        assert!(v[k].as_f64().unwrap() >= 0.0, "{k}");
    }
    assert!(v["text"].is_string());
    // Streaming text: the prompt, then the same continuation; timings on stderr.
    let (text, err) = ok(&[
        "gpt2",
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "20",
        "--threads",
        "1",
    ]);
    assert_eq!(
        text.trim_end_matches('\n'),
        format!(
            "What is the capital of France?{}",
            v["text"].as_str().unwrap()
        )
    );
    assert!(err.contains("prefill") && err.contains("tokens/s"), "{err}");
}

#[test]
fn prompt_file_and_special_tokens() {
    let exp = Expected::load();
    let tmp = TempDir::new("cli-prompt");
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, "<|endoftext|>The").unwrap();
    let (stdout, _) = ok(&[
        "gpt2",
        "generate",
        "--model",
        s(&fixture_dir()),
        "--prompt-file",
        s(&file),
        "--allow-special",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let got: Vec<u64> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let want: Vec<u64> = exp.ids("p3.ids").iter().map(|&x| x as u64).collect();
    assert_eq!(got, want);
    // Invalid UTF-8 in a prompt file.
    std::fs::write(&file, b"caf\xe9 au lait").unwrap();
    let e = fails(&[
        "gpt2",
        "generate",
        "--model",
        s(&fixture_dir()),
        "--prompt-file",
        s(&file),
    ]);
    assert!(
        e.contains("not valid UTF-8") && e.contains("offset 3"),
        "{e}"
    );
}

#[test]
fn logits_file_matches_transformers() {
    let exp = Expected::load();
    let tmp = TempDir::new("cli-logits");
    let out = tmp.path().join("logits.safetensors");
    let ids: Vec<String> = exp.ids("p0.ids").iter().map(|i| i.to_string()).collect();
    let ids = ids.join(",");
    let fx = fixture_dir();
    for args in [
        vec!["--ids", ids.as_str()],
        vec!["--prompt", "What is the capital of France?"],
    ] {
        let mut cmd = vec![
            "gpt2",
            "logits",
            "--model",
            s(&fx),
            "--dtype",
            "f32",
            "--out",
            s(&out),
        ];
        cmd.extend(args);
        ok(&cmd);
        let st = SafeTensors::open(&out).unwrap();
        let l = st.tensor("logits").unwrap();
        assert_eq!(l.dims(), &[7, 50257]);
        let e = rel_err(&l.to_f32_vec().unwrap(), &exp.f32("p0.logits"));
        assert!(e < 1e-4, "{e}");
        let got: Vec<i64> = st.tensor("ids").unwrap().to_vec::<i64>().unwrap();
        let want: Vec<i64> = exp.ids("p0.ids").iter().map(|&x| x as i64).collect();
        assert_eq!(got, want);
    }
}

#[test]
fn tokenize_and_detokenize() {
    let dir = fixture_dir();
    let (stdout, _) = ok(&[
        "gpt2",
        "tokenize",
        "--model",
        s(&dir),
        "--text",
        "What is the capital of France?",
    ]);
    assert_eq!(stdout.trim(), "[2061,318,262,3139,286,4881,30]");
    let (stdout, _) = ok(&[
        "gpt2",
        "tokenize",
        "--model",
        s(&dir),
        "--text",
        "<|endoftext|>",
        "--allow-special",
    ]);
    assert_eq!(stdout.trim(), "[50256]");
    let (stdout, _) = ok(&[
        "gpt2",
        "detokenize",
        "--model",
        s(&dir),
        "--ids",
        "2061, 318,262,3139,286,4881,30",
    ]);
    assert_eq!(stdout, "What is the capital of France?\n");
    let e = fails(&["gpt2", "detokenize", "--model", s(&dir), "--ids", "1,x"]);
    assert!(e.contains("`x`"), "{e}");
    let e = fails(&["gpt2", "detokenize", "--model", s(&dir), "--ids", "99999"]);
    assert!(e.contains("99999"), "{e}");
}

#[test]
fn init_writes_a_loadable_hub_folder() {
    let tmp = TempDir::new("cli-init");
    let dir = tmp.path().join("tiny");
    let (_, err) = ok(&[
        "gpt2",
        "init",
        "--out",
        s(&dir),
        "--size",
        "tiny",
        "--seed",
        "3",
    ]);
    assert!(err.contains("parameters"), "{err}");
    for f in [
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let st = SafeTensors::open(dir.join("model.safetensors")).unwrap();
    assert!(st.contains("h.1.mlp.c_proj.weight") && !st.contains("lm_head.weight"));
    // Init statistics: N(0, 0.02), residual projections 0.02/√(2·2) = 0.01, wpe 0.01.
    let std = |name: &str| {
        let v = st.tensor(name).unwrap().to_f32_vec().unwrap();
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    assert!((std("wte.weight") - 0.02).abs() < 0.0005);
    assert!((std("h.0.mlp.c_fc.weight") - 0.02).abs() < 0.001);
    assert!((std("h.0.attn.c_proj.weight") - 0.01).abs() < 0.001);
    assert!((std("wpe.weight") - 0.01).abs() < 0.0005);
    assert_eq!(
        st.tensor("h.0.ln_1.weight").unwrap().to_f32_vec().unwrap(),
        vec![1.0; 64]
    );
    // The same seed writes the same bytes.
    let again = tmp.path().join("again");
    ok(&[
        "gpt2",
        "init",
        "--out",
        s(&again),
        "--size",
        "tiny",
        "--seed",
        "3",
    ]);
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
    // It generates, in its own dtype and in bf16.
    for dtype in ["f32", "bf16"] {
        let (stdout, _) = ok(&[
            "gpt2",
            "generate",
            "--model",
            s(&dir),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
            "--dtype",
            dtype,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["dtype"], dtype);
    }
    // --init-if-missing writes the folder on first use only.
    let lazy = tmp.path().join("lazy");
    for _ in 0..2 {
        ok(&[
            "gpt2",
            "generate",
            "--model",
            s(&lazy),
            "--init-if-missing",
            "tiny",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ]);
    }
    assert!(lazy.join("config.json").is_file());
    // A bf16 file.
    let b = tmp.path().join("bf16");
    ok(&[
        "gpt2",
        "init",
        "--out",
        s(&b),
        "--size",
        "tiny",
        "--dtype",
        "bf16",
    ]);
    let st = SafeTensors::open(b.join("model.safetensors")).unwrap();
    assert_eq!(
        st.info("wte.weight").unwrap().dtype,
        kiln_tensor::DType::BF16
    );
}

#[test]
fn broken_inputs_print_one_error_line() {
    let fx = fixture_dir();
    let gen = |model: &str, prompt: &str, extra: &[&str]| {
        let mut v = vec!["gpt2", "generate", "--model", model, "--prompt", prompt];
        v.extend_from_slice(extra);
        fails(&v)
    };
    let e = gen(s(&fx), "", &[]);
    assert!(e.contains("empty"), "{e}");
    let e = gen("/nonexistent/model", "Hi", &[]);
    assert!(e.contains("/nonexistent/model"), "{e}");
    // 150 tokens of prompt against 128 positions.
    let long = "a ".repeat(150);
    let e = gen(s(&fx), &long, &[]);
    assert!(e.contains("context of 128"), "{e}");
    // … unless truncation is asked for.
    ok(&[
        "gpt2",
        "generate",
        "--model",
        s(&fx),
        "--prompt",
        &long,
        "--truncate",
        "--max-new-tokens",
        "3",
    ]);
    let e = gen(s(&fx), "Hi", &["--dtype", "i8"]);
    assert!(e.contains("--dtype"), "{e}");
    let e = gen(s(&fx), "Hi", &["--top-p", "1.5"]);
    assert!(e.contains("top-p"), "{e}");
    let missing = derive(
        "cli-missing",
        &Derive {
            drop: Some("ln_f.bias".into()),
            ..Default::default()
        },
    );
    let e = gen(s(missing.path()), "Hi", &[]);
    assert!(e.contains("missing tensor `ln_f.bias`"), "{e}");
    let shape = derive(
        "cli-shape",
        &Derive {
            reshape: Some(("wte.weight".into(), vec![50257, 32])),
            ..Default::default()
        },
    );
    let e = gen(s(shape.path()), "Hi", &[]);
    assert!(
        e.contains("expected shape [50257, 64], found [50257, 32]"),
        "{e}"
    );
    let badcfg = derive(
        "cli-cfg",
        &Derive {
            config: Some("{\"n_layer\": 2,".into()),
            ..Default::default()
        },
    );
    let e = gen(s(badcfg.path()), "Hi", &[]);
    assert!(e.contains("config.json: bad config"), "{e}");
    let e = fails(&["gpt2", "init", "--out", "/tmp/kiln-never", "--size", "13B"]);
    assert!(e.contains("13B"), "{e}");
}

/// `--batch-prompts FILE`: one JSON object per prompt, each with the ids a single `--prompt`
/// run gives; an empty file is one error line.
#[test]
fn batch_prompts_equal_single_runs() {
    let dir = fixture_dir();
    let tmp = TempDir::new("batch");
    let file = tmp.path().join("prompts.txt");
    let prompts = [
        "What is the capital of France?",
        "Hello",
        "Once upon a time",
    ];
    std::fs::write(
        &file,
        format!("{}\r\n{}\n\n{}\n", prompts[0], prompts[1], prompts[2]),
    )
    .unwrap();
    let (stdout, _) = ok(&[
        "gpt2",
        "generate",
        "--model",
        s(&dir),
        "--batch-prompts",
        s(&file),
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, (p, obj)) in prompts.iter().zip(&lines).enumerate() {
        assert_eq!(obj["batch_index"], i);
        let (single, _) = ok(&[
            "gpt2",
            "generate",
            "--model",
            s(&dir),
            "--prompt",
            p,
            "--max-new-tokens",
            "8",
            "--json",
        ]);
        let single: serde_json::Value = serde_json::from_str(single.trim()).unwrap();
        assert_eq!(obj["ids"], single["ids"], "prompt {i}");
        assert_eq!(obj["prompt_ids"], single["prompt_ids"]);
        assert_eq!(obj["text"], single["text"]);
    }
    // Text mode: each prompt followed by its text, one per line.
    let (text, _) = ok(&[
        "gpt2",
        "generate",
        "--model",
        s(&dir),
        "--batch-prompts",
        s(&file),
        "--max-new-tokens",
        "8",
    ]);
    for (p, obj) in prompts.iter().zip(&lines) {
        assert!(text.contains(&format!("{p}{}", obj["text"].as_str().unwrap())));
    }
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let err = fails(&[
        "gpt2",
        "generate",
        "--model",
        s(&dir),
        "--batch-prompts",
        s(&empty),
    ]);
    assert!(err.contains("no prompts"), "{err}");
}

/// `--matmul-precision bf16`: generation runs and reports the precision and the native kernel it
/// used (`null` for f32 products or a CPU without AMX / AVX512-BF16); an unknown value is one
/// error line.
#[test]
fn matmul_precision_flag() {
    let dir = fixture_dir();
    let prompt = LONG_PROMPT;
    for precision in ["f32", "bf16"] {
        let (stdout, _) = ok(&[
            "gpt2",
            "generate",
            "--model",
            s(&dir),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "4",
            "--greedy",
            "--matmul-precision",
            precision,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["matmul_precision"], precision);
        assert_eq!(v["dtype"], "bf16");
        assert_eq!(v["ids"].as_array().unwrap().len(), 4);
        let kernel = &v["bf16_kernel"];
        if precision == "f32" || kiln::cpu::gemm::amx::best_native_kernel().is_none() {
            assert!(kernel.is_null(), "{kernel}");
        } else {
            assert!(kernel == "amx" || kernel == "avx512bf16", "{kernel}");
        }
    }
    let err = fails(&[
        "gpt2",
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "x",
        "--matmul-precision",
        "f16",
    ]);
    assert!(err.contains("--matmul-precision"), "{err}");
    let out = std::env::temp_dir().join(format!("kiln-mp-{}.safetensors", std::process::id()));
    ok(&[
        "gpt2",
        "logits",
        "--model",
        s(&dir),
        "--prompt",
        prompt,
        "--matmul-precision",
        "bf16",
        "--out",
        s(&out),
    ]);
    assert!(out.exists());
    std::fs::remove_file(&out).ok();
}

/// A prompt of well over 16 tokens, so the prefill takes the native bf16 products.
const LONG_PROMPT: &str = "In 1869, the Suez Canal opened. It links the Mediterranean Sea to the \
     Red Sea, and ships no longer had to sail around Africa.";
