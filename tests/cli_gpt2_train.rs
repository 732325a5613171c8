//! `kiln gpt2 train` end to end: a tiny model overfits a short text, the run folder is a model
//! folder `kiln gpt2 generate` loads, `--resume` equals an uninterrupted run, 1 and 2 threads
//! give identical checkpoints, fixed batches from a safetensors file, and one `error:` line for
//! every broken input (nothing overwritten).
use kiln_io::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = kiln(args);
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kiln {args:?} failed: {se}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(!out.status.success(), "kiln {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("training "))
        .collect();
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

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kiln-gpt2-train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TEXT: &str = "To be, or not to be, that is the question:\n\
Whether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\n";

/// A small run's arguments into `out` on `data` (the tiny model, 2 sequences of 16 tokens).
fn args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "gpt2",
        "train",
        "--data",
        data,
        "--out",
        out,
        "--init",
        "tiny",
        "--steps",
        steps,
        "--batch",
        "2",
        "--seq",
        "16",
        "--lr",
        "3e-3",
        "--val-fraction",
        "0",
        "--eval-every",
        "1000",
        "--sample-every",
        "1000",
        "--sample-tokens",
        "8",
        "--checkpoint-every",
        "3",
        "--warmup",
        "2",
        "--quiet",
    ]
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

/// Rows of metrics.csv without the timing columns.
fn metrics(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(5).collect::<Vec<_>>().join(","))
        .collect()
}

fn checkpoint(dir: &Path) -> Vec<Vec<u8>> {
    ["model.safetensors", "training_state.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

#[test]
fn a_tiny_model_overfits_a_short_text_and_generates_it() {
    let tmp = Tmp::new("overfit");
    let data = tmp.0.join("text.txt");
    std::fs::write(&data, TEXT).unwrap();
    let out = tmp.0.join("run");
    ok(&args(s(&data), s(&out), "150"));
    let l = losses(&out);
    assert_eq!(l.len(), 150);
    assert!(l[0] > 9.0, "starts near ln(50257): {}", l[0]);
    let last = l.last().unwrap();
    assert!(*last < 0.1, "loss after 150 steps: {last}");
    // The header's first columns, the plot, the cached tokens, the model folder.
    let m = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(m.starts_with("step,loss,val_loss,lr,grad_norm,tokens_per_s"));
    for f in [
        "loss.png",
        "samples.txt",
        "tokens.safetensors",
        "config.json",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // `kiln gpt2 generate` loads the run folder and continues the text it has memorised.
    let text = ok(&[
        "gpt2",
        "generate",
        "--model",
        s(&out),
        "--prompt",
        "To be, or not",
        "--max-new-tokens",
        "12",
        "--greedy",
    ]);
    assert!(text.contains("to be, that is the question"), "{text:?}");
}

#[test]
fn resume_equals_an_uninterrupted_run_and_threads_do_not_matter() {
    let tmp = Tmp::new("resume");
    let data = tmp.0.join("text.txt");
    std::fs::write(&data, TEXT.repeat(4)).unwrap();
    let (whole, split, two) = (tmp.0.join("whole"), tmp.0.join("split"), tmp.0.join("two"));
    let mut a = args(s(&data), s(&whole), "6");
    a.extend(["--threads", "1", "--dropout", "0.1", "--accum", "2"]);
    ok(&a);
    let mut a = args(s(&data), s(&two), "6");
    a.extend(["--threads", "2", "--dropout", "0.1", "--accum", "2"]);
    ok(&a);
    // Interrupted after step 4 (the schedule still runs to 6), then resumed.
    let mut a = args(s(&data), s(&split), "6");
    a.extend([
        "--threads",
        "1",
        "--dropout",
        "0.1",
        "--accum",
        "2",
        "--stop-after",
        "4",
    ]);
    ok(&a);
    assert_eq!(metrics(&split).len(), 1 + 4);
    let mut a = args(s(&data), s(&split), "6");
    a.extend([
        "--threads",
        "1",
        "--dropout",
        "0.1",
        "--accum",
        "2",
        "--resume",
    ]);
    ok(&a);
    assert!(
        checkpoint(&whole) == checkpoint(&split),
        "resume: checkpoints differ"
    );
    assert_eq!(metrics(&whole), metrics(&split), "resume metrics");
    assert!(
        checkpoint(&whole) == checkpoint(&two),
        "1 vs 2 threads: checkpoints differ"
    );
    assert_eq!(metrics(&whole), metrics(&two), "1 vs 2 threads metrics");

    // Resuming with other settings, or starting over an existing run, is refused and leaves
    // the folder as it was.
    let before = checkpoint(&whole);
    let mut a = args(s(&data), s(&whole), "8");
    let i = a.iter().position(|x| *x == "--lr").unwrap();
    a[i + 1] = "1e-3";
    a.push("--resume");
    let e = fails(&a);
    assert!(e.contains("trained with"), "{e}");
    let e = fails(&args(s(&data), s(&whole), "8"));
    assert!(e.contains("--resume"), "{e}");
    // Resuming it as another model.
    let mut a = args(s(&data), s(&whole), "6");
    let i = a.iter().position(|x| *x == "tiny").unwrap();
    a[i] = "mini";
    a.push("--resume");
    let e = fails(&a);
    assert!(e.contains("another model"), "{e}");
    assert!(
        checkpoint(&whole) == before,
        "a refused command changed the run"
    );
}

/// `--data FILE.safetensors`: fixed batches `[steps, batch, seq + 1]`, in order, batch and
/// sequence length from the shape.
#[test]
fn fixed_batches_from_safetensors() {
    let tmp = Tmp::new("batches");
    let tokens: Vec<i64> = (0..3 * 2 * 9).map(|i| (i * 37 % 1000) as i64).collect();
    let t = kiln_tensor::Tensor::from_vec(tokens, vec![3, 2, 9]).unwrap();
    let file = tmp.0.join("tokens.safetensors");
    kiln_io::write_safetensors(&file, [("tokens", &t)], &Default::default()).unwrap();
    let out = tmp.0.join("run");
    ok(&[
        "gpt2",
        "train",
        "--data",
        s(&file),
        "--out",
        s(&out),
        "--init",
        "tiny",
        "--steps",
        "3",
        "--warmup",
        "0",
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-3",
        "--grad-clip",
        "0",
        "--quiet",
    ]);
    let m = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let rows: Vec<&str> = m.lines().skip(1).collect();
    assert_eq!(rows.len(), 3);
    // A constant learning rate; no validation.
    for r in &rows {
        let f: Vec<&str> = r.split(',').collect();
        assert_eq!(f[2], "");
        assert_eq!(f[3].parse::<f64>().unwrap(), 1e-3);
    }
    // More steps than the file holds.
    let e = fails(&[
        "gpt2",
        "train",
        "--data",
        s(&file),
        "--out",
        s(&tmp.0.join("r2")),
        "--init",
        "tiny",
        "--steps",
        "4",
        "--quiet",
    ]);
    assert!(e.contains("3 steps"), "{e}");
    let st = SafeTensors::read(out.join("model.safetensors")).unwrap();
    assert!(st.contains("wte.weight") && st.contains("h.1.mlp.c_proj.bias"));
}

#[test]
fn broken_inputs_give_one_error_line() {
    let tmp = Tmp::new("errors");
    let empty = tmp.0.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = fails(&args(s(&empty), s(&tmp.0.join("r1")), "2"));
    assert!(e.contains("empty"), "{e}");
    let binary = tmp.0.join("binary.txt");
    std::fs::write(&binary, [0x66u8, 0x6f, 0xff, 0xfe, 0x6f]).unwrap();
    let e = fails(&args(s(&binary), s(&tmp.0.join("r2")), "2"));
    assert!(e.contains("not UTF-8"), "{e}");
    let data = tmp.0.join("text.txt");
    std::fs::write(&data, TEXT.repeat(20)).unwrap();
    // --seq beyond the context of the tiny model (128 positions).
    let r3 = tmp.0.join("r3");
    let mut a = args(s(&data), s(&r3), "2");
    let i = a.iter().position(|x| *x == "--seq").unwrap();
    a[i + 1] = "129";
    let e = fails(&a);
    assert!(e.contains("129") && e.contains("128"), "{e}");
    // A batch that cannot fit in memory is refused before anything is allocated.
    let r4 = tmp.0.join("r4");
    let mut a = args(s(&data), s(&r4), "2");
    let i = a.iter().position(|x| *x == "--batch").unwrap();
    a[i + 1] = "100000000";
    let e = fails(&a);
    assert!(e.contains("GiB"), "{e}");
    // Missing data, missing model folder, neither --model nor --init.
    let e = fails(&args(
        s(&tmp.0.join("nowhere.txt")),
        s(&tmp.0.join("r5")),
        "2",
    ));
    assert!(e.contains("nowhere.txt"), "{e}");
    let e = fails(&[
        "gpt2",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&tmp.0.join("r6")),
        "--model",
        s(&tmp.0.join("nomodel")),
        "--quiet",
    ]);
    assert!(e.contains("nomodel"), "{e}");
    let e = fails(&[
        "gpt2",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&tmp.0.join("r7")),
    ]);
    assert!(e.contains("--init"), "{e}");
    // --resume of a folder without a run.
    let r8 = tmp.0.join("r8");
    let mut a = args(s(&data), s(&r8), "2");
    a.push("--resume");
    let e = fails(&a);
    assert!(e.contains("training_state.safetensors"), "{e}");
    // Negative numbers get the range errors, not flag-parsing ones.
    // A device is not a text file (reading /dev/urandom would never end).
    #[cfg(unix)]
    {
        let e = fails(&args("/dev/zero", s(&tmp.0.join("r10")), "2"));
        assert!(e.contains("not a regular file"), "{e}");
    }
    let r9 = tmp.0.join("r9");
    for (flag, value) in [("--lr", "-1"), ("--dropout", "-0.5"), ("--grad-clip", "-1")] {
        let mut a = args(s(&data), s(&r9), "2");
        match a.iter().position(|x| *x == flag) {
            Some(i) => a[i + 1] = value,
            None => a.extend([flag, value]),
        }
        let e = fails(&a);
        assert!(e.contains(flag) && e.contains(value), "{flag} {value}: {e}");
    }
}

/// The run folder holds exactly the tensors `GPT2LMHeadModel.from_pretrained` loads, with
/// transformers' shapes and dtypes, and a config with its values
/// (`tests/fixtures/gpt2_train/hf_layout.json`, written by transformers for the same config by
/// `tests/fixtures/make_gpt2_hf_layout.py`): names as the Hub's GPT-2 files spell them, without
/// the base-model prefix `transformer.` that `save_pretrained` adds and `from_pretrained` accepts
/// either way; `lm_head.weight` is tied to `wte.weight` and not stored, as `save_pretrained`
/// leaves it out. Needs no Python.
#[test]
fn run_folder_has_the_tensor_layout_transformers_loads() {
    let layout: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2_train/hf_layout.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let prefix = format!("{}.", layout["base_model_prefix"].as_str().unwrap());
    let tmp = Tmp::new("layout");
    let data = tmp.0.join("text.txt");
    std::fs::write(&data, TEXT).unwrap();
    let out = tmp.0.join("run");
    ok(&args(s(&data), s(&out), "1"));

    let st = SafeTensors::read(out.join("model.safetensors")).unwrap();
    let mut ours: Vec<String> = st.names().map(|n| format!("{prefix}{n}")).collect();
    ours.sort();
    let mut saved: Vec<String> = layout["saved_by_save_pretrained"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    saved.sort();
    assert_eq!(ours, saved, "tensor names");
    let state = layout["state_dict"].as_object().unwrap();
    for name in st.names() {
        let t = st.tensor(name).unwrap();
        let want = &state[&format!("{prefix}{name}")];
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), &shape[..], "{name}: shape");
        assert_eq!(
            t.dtype().to_string().to_ascii_uppercase(),
            want["dtype"].as_str().unwrap(),
            "{name}: dtype"
        );
    }
    // Every state_dict entry is stored or tied.
    for name in state.keys() {
        let tied = layout["tied"].as_array().unwrap().iter().any(|t| t == name);
        assert!(
            tied || saved.contains(name),
            "{name} neither stored nor tied"
        );
    }

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    for (key, want) in layout["config_keys"].as_object().unwrap() {
        let got = &config[key];
        match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(w)) => assert!((g - w).abs() <= 1e-12 * w.abs(), "{key}: {g} vs {w}"),
            _ => assert_eq!(got, want, "config.json {key}"),
        }
    }
    for file in ["vocab.json", "merges.txt"] {
        assert!(out.join(file).is_file(), "{file}");
    }
}

/// transformers loads the run folder and computes the same logits: run when `KILN_TEST_PYTHON`
/// names a Python with `torch` and `transformers` (`tests/gpt2_train_hf/check_hf_load.py`).
#[test]
fn transformers_loads_the_run_folder() {
    let Ok(python) = std::env::var("KILN_TEST_PYTHON") else {
        println!("SKIP transformers_loads_the_run_folder: KILN_TEST_PYTHON is not set");
        return;
    };
    let has = Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has {
        println!("SKIP transformers_loads_the_run_folder: {python} has no torch/transformers");
        return;
    }
    let tmp = Tmp::new("hf");
    let data = tmp.0.join("text.txt");
    std::fs::write(&data, TEXT).unwrap();
    let out = tmp.0.join("run");
    ok(&args(s(&data), s(&out), "3"));
    let logits = tmp.0.join("logits.safetensors");
    ok(&[
        "gpt2",
        "logits",
        "--model",
        s(&out),
        "--prompt",
        "To be, or not to be",
        "--out",
        s(&logits),
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gpt2_train_hf/check_hf_load.py");
    let r = Command::new(&python)
        .arg(script)
        .arg(&out)
        .arg(&logits)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && so.contains("OK"),
        "{so}{}",
        String::from_utf8_lossy(&r.stderr)
    );
}
