//! `--device` of the model commands. The GPU path runs here on kiln-cuda's CPU emulator
//! (`--device emulator`, a test value the help does not list): `kiln gpt2 generate --greedy`
//! gives the CPU's ids on the tiny fixture checkpoint, `kiln dcgan sample` the CPU's images
//! (within the rounding of differently ordered f32 sums), and a short `kiln dcgan train` runs.
//! Without a GPU, `--device cuda` is one line `error: …no CUDA device…` and a non-zero exit,
//! before anything is written.
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
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one `error:` line of a command that must fail.
fn fails(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(!out.status.success(), "kiln {args:?} should fail");
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

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A temporary folder removed when dropped.
struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kiln-cli-device-{tag}-{}", std::process::id()));
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

/// Whether the emulator can run here (a C++ compiler); otherwise the test prints SKIP.
fn emulator_available(test: &str) -> bool {
    if std::env::var_os("KILN_SKIP_EMU").is_some() {
        println!("SKIP {test}: KILN_SKIP_EMU is set");
        return false;
    }
    let ok = Command::new(std::env::var("KILN_EMU_CXX").unwrap_or_else(|_| "g++".into()))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: the emulator needs g++ under CI"
        );
        println!("SKIP {test}: no C++ compiler for the emulator");
    }
    ok
}

/// A GPU is present when `kiln cuda info` succeeds.
fn gpu_present() -> bool {
    kiln(&["cuda", "info"]).status.success()
}

fn json_ids(stdout: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn gpt2_greedy_generation_on_the_device_gives_the_cpu_ids() {
    if !emulator_available("gpt2 generate --device emulator") {
        return;
    }
    let model = repo("tests/fixtures/gpt2");
    let base = [
        "gpt2",
        "generate",
        "--model",
        s(&model),
        "--prompt",
        // The fixture's first prompt: its greedy steps have top-two margins of at least 0.02
        // (tests/fixtures/gpt2), far above the two paths' rounding differences.
        "What is the capital of France?",
        "--max-new-tokens",
        "8",
        "--greedy",
        "--json",
    ];
    let cpu = ok(&[&base[..], &["--device", "cpu"]].concat());
    let dev = ok(&[&base[..], &["--device", "emulator"]].concat());
    assert_eq!(json_ids(&dev), json_ids(&cpu));
    let v: serde_json::Value = serde_json::from_str(dev.trim()).unwrap();
    assert_eq!(v["device"], "cuda-emulator");
    // A batch of prompts: one batched decode step for all of them, the same ids.
    let tmp = Tmp::new("batch");
    let prompts = tmp.0.join("prompts.txt");
    std::fs::write(
        &prompts,
        "What is the capital of France?\nHello, world! The quick brown fox jumps over the lazy dog.\n",
    )
    .unwrap();
    let batch = [
        "gpt2",
        "generate",
        "--model",
        s(&model),
        "--batch-prompts",
        s(&prompts),
        "--max-new-tokens",
        "4",
        "--greedy",
        "--json",
    ];
    let cpu = ok(&[&batch[..], &["--device", "cpu"]].concat());
    let dev = ok(&[&batch[..], &["--device", "emulator"]].concat());
    let ids = |out: &str| out.lines().map(json_ids).collect::<Vec<_>>();
    assert_eq!(ids(&dev), ids(&cpu));
}

#[test]
fn dcgan_samples_on_the_device_match_the_cpu() {
    if !emulator_available("dcgan sample --device emulator") {
        return;
    }
    let tmp = Tmp::new("sample");
    let g = repo("tests/fixtures/dcgan/dcgan_G.safetensors");
    let run = |device: &str| -> Vec<f32> {
        let raw = tmp.0.join(format!("{device}.safetensors"));
        let png = tmp.0.join(format!("{device}.png"));
        ok(&[
            "dcgan",
            "sample",
            "--generator",
            s(&g),
            "--count",
            "5",
            "--seed",
            "3",
            "--out",
            s(&png),
            "--raw",
            s(&raw),
            "--device",
            device,
        ]);
        assert!(png.exists());
        SafeTensors::read(&raw)
            .unwrap()
            .tensor("images")
            .unwrap()
            .to_f32_vec()
            .unwrap()
    };
    let (cpu, dev) = (run("cpu"), run("emulator"));
    assert_eq!(cpu.len(), 5 * 3 * 64 * 64);
    // Five transposed convolutions with batch norm (eval) and tanh: f32 sums of up to 1024
    // products in another order; the images are in [-1, 1].
    for (i, (a, b)) in dev.iter().zip(&cpu).enumerate() {
        assert!((a - b).abs() <= 1e-5, "pixel {i}: {a} vs {b}");
    }
}

#[test]
fn dcgan_training_runs_on_the_device() {
    if !emulator_available("dcgan train --device emulator") {
        return;
    }
    let tmp = Tmp::new("train");
    let out = tmp.0.join("run");
    let o = kiln(&[
        "dcgan",
        "train",
        "--data",
        "synthetic",
        "--out",
        s(&out),
        "--steps",
        "1",
        "--batch",
        "2",
        "--ngf",
        "4",
        "--ndf",
        "4",
        "--quiet",
        "--quality-every",
        "0",
        "--device",
        "emulator",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(out.join("generator.safetensors").exists());
}

#[test]
fn without_a_gpu_device_cuda_is_one_error_line() {
    if gpu_present() {
        println!("SKIP without a GPU: a GPU is present");
        return;
    }
    let tmp = Tmp::new("nogpu");
    let g = repo("tests/fixtures/dcgan/dcgan_G.safetensors");
    let model = tmp.0.join("model");
    let png = tmp.0.join("x.png");
    let run = tmp.0.join("run");
    let gpt2 = repo("tests/fixtures/gpt2");
    for args in [
        vec![
            "gpt2",
            "generate",
            "--model",
            s(&model),
            "--init-if-missing",
            "tiny",
            "--prompt",
            "Hi",
            "--device",
            "cuda",
        ],
        vec![
            "gpt2",
            "generate",
            "--model",
            s(&gpt2),
            "--prompt",
            "Hi",
            "--device",
            "cuda:1",
        ],
        vec![
            "dcgan",
            "sample",
            "--generator",
            s(&g),
            "--out",
            s(&png),
            "--device",
            "cuda",
        ],
        vec![
            "dcgan",
            "train",
            "--data",
            "synthetic",
            "--out",
            s(&run),
            "--steps",
            "1",
            "--device",
            "cuda",
        ],
        vec![
            "gpt2",
            "train",
            "--data",
            s(&gpt2.join("config.json")),
            "--init",
            "tiny",
            "--out",
            s(&run),
            "--steps",
            "1",
            "--device",
            "cuda",
        ],
        vec!["bench", "dcgan", "--train", "--device", "cuda"],
    ] {
        let line = fails(&args);
        assert!(line.contains("no CUDA device"), "{args:?}: {line}");
    }
    // Nothing was written: the device is opened first.
    assert!(!model.exists() && !png.exists() && !run.exists());
}

#[test]
fn a_bad_device_is_one_error_line() {
    let g = repo("tests/fixtures/dcgan/dcgan_G.safetensors");
    let line = fails(&[
        "dcgan",
        "sample",
        "--generator",
        s(&g),
        "--out",
        "/nonexistent/x.png",
        "--device",
        "tpu",
    ]);
    assert!(line.contains("--device"), "{line}");
    let line = fails(&[
        "gpt2",
        "generate",
        "--model",
        s(&repo("tests/fixtures/gpt2")),
        "--prompt",
        "Hi",
        "--device",
        "cuda",
        "--matmul-precision",
        "bf16",
    ]);
    assert!(line.contains("--matmul-precision"), "{line}");
}
