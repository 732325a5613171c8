//! `kiln dcgan sample|train` end to end: samples equal PyTorch's generator, the run folder's
//! files, `--resume` equals an uninterrupted run, 1 and 2 threads give identical checkpoints,
//! `--init` and `--noise`, and one `error:` line for every broken input.
use kiln_io::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str], threads: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args);
    if let Some(t) = threads {
        c.args(["--threads", t]);
    }
    c.output().expect("the kiln binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = kiln(args, None);
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kiln {args:?} failed: {se}");
    se
}

/// Runs a command that must fail and returns its one `error:` line.
fn fails(args: &[&str]) -> String {
    let out = kiln(args, None);
    assert!(!out.status.success(), "kiln {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("warning:") && !l.starts_with("training "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "kiln {args:?}: expected one line, got {err:?}"
    );
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dcgan")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A temporary folder removed when dropped.
struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kiln-cli-dcgan-{tag}-{}", std::process::id()));
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

fn f32s(path: &Path, name: &str) -> Vec<f32> {
    SafeTensors::read(path)
        .unwrap()
        .tensor(name)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

#[test]
fn sample_with_pytorch_noise_equals_pytorch_images() {
    let tmp = Tmp::new("sample");
    for arch in ["dcgan", "seed"] {
        let grid = tmp.0.join(format!("{arch}.png"));
        let raw = tmp.0.join(format!("{arch}.safetensors"));
        let eval = fixture(&format!("{arch}_eval.safetensors"));
        ok(&[
            "dcgan",
            "sample",
            "--generator",
            s(&fixture(&format!("{arch}_G.safetensors"))),
            "--arch",
            arch,
            "--noise",
            s(&eval),
            "--out",
            s(&grid),
            "--raw",
            s(&raw),
        ]);
        let got = f32s(&raw, "images");
        let want = f32s(&eval, "images");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{arch}: off by {worst}");
        let png = std::fs::read(&grid).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
    // Seeded noise: the same seed gives the same images, another seed others.
    let a = tmp.0.join("a.safetensors");
    let b = tmp.0.join("b.safetensors");
    let c = tmp.0.join("c.safetensors");
    let g = fixture("dcgan_G.safetensors");
    for (seed, raw) in [("3", &a), ("3", &b), ("4", &c)] {
        ok(&[
            "dcgan",
            "sample",
            "--generator",
            s(&g),
            "--count",
            "5",
            "--seed",
            seed,
            "--out",
            s(&tmp.0.join("g.png")),
            "--raw",
            s(raw),
        ]);
    }
    assert_eq!(f32s(&a, "images"), f32s(&b, "images"));
    assert_ne!(f32s(&a, "images"), f32s(&c, "images"));
    assert_eq!(f32s(&a, "images").len(), 5 * 3 * 64 * 64);
}

/// The arguments of a small, quick training run into `out`.
fn train_args<'a>(out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "dcgan",
        "train",
        "--data",
        "synthetic",
        "--out",
        out,
        "--steps",
        steps,
        "--batch",
        "4",
        "--ngf",
        "4",
        "--ndf",
        "4",
        "--sample-every",
        "2",
        "--quality-every",
        "0",
        "--checkpoint-every",
        "2",
        "--seed",
        "7",
        "--quiet",
    ]
}

/// The checkpoint files of a run folder, byte for byte.
fn checkpoint(dir: &Path) -> Vec<Vec<u8>> {
    [
        "generator.safetensors",
        "discriminator.safetensors",
        "training_state.safetensors",
    ]
    .iter()
    .map(|f| std::fs::read(dir.join(f)).unwrap())
    .collect()
}

/// metrics.csv without the timing columns (images_per_s, elapsed_s).
fn metrics(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(9).collect::<Vec<_>>().join(","))
        .collect()
}

#[test]
fn resume_equals_an_uninterrupted_run_and_threads_do_not_matter() {
    let tmp = Tmp::new("resume");
    let whole = tmp.0.join("whole");
    let split = tmp.0.join("split");
    let two = tmp.0.join("two");
    let out = kiln(&train_args(s(&whole), "6"), Some("1"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kiln(&train_args(s(&two), "6"), Some("2"));
    assert!(out.status.success());
    // 3 steps (a checkpoint at step 2 and one at the end), then resume to 6.
    let out = kiln(&train_args(s(&split), "3"), Some("1"));
    assert!(out.status.success());
    let mut args = train_args(s(&split), "6");
    args.push("--resume");
    let out = kiln(&args, Some("1"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

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

    // The run folder: metrics with the documented first columns, one row per step, the plot,
    // sample grids every 2 steps and at the end.
    let m = std::fs::read_to_string(whole.join("metrics.csv")).unwrap();
    let mut lines = m.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("step,loss_d,loss_g,d_x,d_g_z1,d_g_z2"));
    let steps: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6"]);
    assert!(whole.join("losses.png").exists());
    for st in [2, 4, 6] {
        assert!(whole.join(format!("samples/step-{st:06}.png")).exists());
    }
    // The generator PyTorch would load: names of the dcgan example, widths from the flags.
    let g = SafeTensors::read(whole.join("generator.safetensors")).unwrap();
    assert_eq!(g.info("main.0.weight").unwrap().shape, vec![100, 32, 4, 4]);
    assert_eq!(
        g.tensor("main.1.num_batches_tracked")
            .unwrap()
            .to_vec::<i64>()
            .unwrap(),
        vec![6]
    );
    let d = SafeTensors::read(whole.join("discriminator.safetensors")).unwrap();
    assert_eq!(
        d.tensor("main.3.num_batches_tracked")
            .unwrap()
            .to_vec::<i64>()
            .unwrap(),
        vec![18]
    );

    // A finished run is not started again over itself.
    let e = fails(&train_args(s(&whole), "6"));
    assert!(e.contains("--resume"), "{e}");
    // Resuming with other settings is refused.
    let mut args = train_args(s(&whole), "8");
    args.extend(["--resume", "--lr", "1e-3"]);
    let e = fails(&args);
    assert!(e.contains("trained with"), "{e}");
}

/// `--init` from PyTorch's weights with `--noise` and `--data FILE.safetensors` reproduces the
/// PyTorch run's first iteration.
#[test]
fn init_noise_and_tensor_data_reproduce_pytorch() {
    let tmp = Tmp::new("init");
    let init = tmp.0.join("init");
    std::fs::create_dir_all(&init).unwrap();
    std::fs::copy(
        fixture("dcgan_G.safetensors"),
        init.join("generator.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture("dcgan_D.safetensors"),
        init.join("discriminator.safetensors"),
    )
    .unwrap();
    // The fixture's real batch and noise as the files the CLI reads.
    let r = SafeTensors::read(fixture("dcgan_train_step.safetensors")).unwrap();
    let real = r.tensor("real").unwrap();
    let noise = r.tensor("noise").unwrap();
    let data = tmp.0.join("real.safetensors");
    let noise_file = tmp.0.join("noise.safetensors");
    kiln_io::write_safetensors(&data, [("images", &real)], &Default::default()).unwrap();
    kiln_io::write_safetensors(&noise_file, [("noise", &noise)], &Default::default()).unwrap();
    let out = tmp.0.join("run");
    ok(&[
        "dcgan",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--init",
        s(&init),
        "--noise",
        s(&noise_file),
        "--steps",
        "2",
        "--batch",
        "4",
        "--quality-every",
        "0",
        "--quiet",
    ]);
    let m = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    for (i, line) in m.lines().skip(1).enumerate() {
        let f: Vec<f32> = line
            .split(',')
            .take(6)
            .map(|v| v.parse().unwrap())
            .collect();
        let want = |k: &str| {
            r.tensor(&format!("step{}.{k}", i + 1))
                .unwrap()
                .to_f32_vec()
                .unwrap()[0]
        };
        for (got, k) in f[1..]
            .iter()
            .zip(["errD", "errG", "D_x", "D_G_z1", "D_G_z2"])
        {
            assert!(
                (got - want(k)).abs() <= 1e-5 * want(k).abs().max(1.0),
                "step {} {k}: {got} vs {}",
                i + 1,
                want(k)
            );
        }
    }
    // Wrong noise shapes: batch, and too few steps.
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&tmp.0.join("bad1")),
        "--init",
        s(&init),
        "--noise",
        s(&noise_file),
        "--steps",
        "2",
        "--batch",
        "3",
        "--quiet",
    ]);
    assert!(e.contains("noise"), "{e}");
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&tmp.0.join("bad2")),
        "--init",
        s(&init),
        "--noise",
        s(&noise_file),
        "--steps",
        "3",
        "--batch",
        "4",
        "--quiet",
    ]);
    assert!(
        e.contains("noise") && e.contains("[2, 4, 100, 1, 1]"),
        "{e}"
    );
}

#[test]
fn broken_inputs_give_one_error_line() {
    let tmp = Tmp::new("errors");
    let grid = tmp.0.join("g.png");
    // A truncated checkpoint.
    let bytes = std::fs::read(fixture("dcgan_G.safetensors")).unwrap();
    let cut = tmp.0.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["dcgan", "sample", "--generator", s(&cut), "--out", s(&grid)]);
    assert!(e.contains("cut.safetensors"), "{e}");
    // A mis-shaped checkpoint: one tensor of the wrong shape.
    let st = SafeTensors::read(fixture("dcgan_G.safetensors")).unwrap();
    let mut tensors: Vec<(String, kiln_tensor::Tensor)> = st
        .names()
        .map(|n| (n.to_string(), st.tensor(n).unwrap()))
        .collect();
    for (n, t) in tensors.iter_mut() {
        if n == "main.4.weight" {
            *t = kiln_tensor::Tensor::from_vec(vec![1f32; 7], vec![7]).unwrap();
        }
    }
    let bad = tmp.0.join("shape.safetensors");
    kiln_io::write_safetensors(
        &bad,
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        &Default::default(),
    )
    .unwrap();
    let e = fails(&["dcgan", "sample", "--generator", s(&bad), "--out", s(&grid)]);
    assert!(e.contains("main.4.weight"), "{e}");
    // The wrong architecture.
    let e = fails(&[
        "dcgan",
        "sample",
        "--generator",
        s(&fixture("seed_G.safetensors")),
        "--arch",
        "dcgan",
        "--out",
        s(&grid),
    ]);
    assert!(e.contains("seed"), "{e}");
    // Not a DCGAN checkpoint at all.
    let e = fails(&[
        "dcgan",
        "sample",
        "--generator",
        s(&fixture("dcgan_eval.safetensors")),
        "--out",
        s(&grid),
    ]);
    assert!(e.contains("not a DCGAN checkpoint"), "{e}");
    // Sample noise of the wrong width.
    let n = kiln_tensor::Tensor::from_vec(vec![0f32; 2 * 7], vec![2, 7]).unwrap();
    let nf = tmp.0.join("noise.safetensors");
    kiln_io::write_safetensors(&nf, [("noise", &n)], &Default::default()).unwrap();
    let e = fails(&[
        "dcgan",
        "sample",
        "--generator",
        s(&fixture("dcgan_G.safetensors")),
        "--noise",
        s(&nf),
        "--out",
        s(&grid),
    ]);
    assert!(e.contains("[2, 7]"), "{e}");
    // An empty image folder, a missing one.
    let empty = tmp.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not an image").unwrap();
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        s(&empty),
        "--out",
        s(&tmp.0.join("r1")),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(e.contains("empty"), "{e}");
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        s(&tmp.0.join("nowhere")),
        "--out",
        s(&tmp.0.join("r2")),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(e.contains("nowhere"), "{e}");
    // --resume of a folder that holds no run; a bad --arch.
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        "synthetic",
        "--out",
        s(&empty),
        "--steps",
        "1",
        "--resume",
        "--quiet",
    ]);
    assert!(e.contains("training_state.safetensors"), "{e}");
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        "synthetic",
        "--out",
        s(&tmp.0.join("r3")),
        "--arch",
        "vae",
        "--quiet",
    ]);
    assert!(e.contains("vae"), "{e}");
    // More images than one grid holds: refused before anything is allocated.
    let e = fails(&[
        "dcgan",
        "sample",
        "--generator",
        s(&fixture("dcgan_G.safetensors")),
        "--count",
        "100000000",
        "--out",
        s(&grid),
    ]);
    assert!(e.contains("100000000") && e.contains("at most"), "{e}");
    // A negative learning rate gets the range error, not a flag-parsing one.
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        "synthetic",
        "--out",
        s(&tmp.0.join("r4")),
        "--lr",
        "-1",
        "--quiet",
    ]);
    assert!(e.contains("--lr -1 must be positive"), "{e}");
    // Networks or batches that cannot fit in memory are refused before anything is allocated.
    let e = fails(&[
        "dcgan",
        "train",
        "--data",
        "synthetic",
        "--out",
        s(&tmp.0.join("r5")),
        "--ngf",
        "100000",
        "--quiet",
    ]);
    assert!(e.contains("GiB are available"), "{e}");
    assert!(!tmp.0.join("r5").join("generator.safetensors").exists());
    let e = fails(&["bench", "dcgan", "--batch", "1000000", "--train"]);
    assert!(e.contains("GiB are available"), "{e}");
    let e = fails(&["bench", "gpt2-train", "--size", "124M", "--batch", "100000"]);
    assert!(e.contains("GiB are available"), "{e}");
}
