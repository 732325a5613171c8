//! `kiln gpt2 generate` and `tokenize` as a new user meets them: a request is checked (the same
//! checks as `kiln serve`) before any output, a closed pipe ends the output quietly, and negative
//! numbers reach the range checks.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2")
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

/// Fails with one `error:` line and nothing on stdout; returns the line.
fn fails_quietly(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        out.stdout.is_empty(),
        "stdout before the error: {} bytes",
        out.stdout.len()
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn a_prompt_beyond_the_context_is_refused_before_any_output() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-long-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompt.txt");
    std::fs::write(&file, "the cat sat on the mat ".repeat(20_000)).unwrap();
    let model = fixture();
    let err = fails_quietly(&[
        "gpt2",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-file",
        file.to_str().unwrap(),
        "--max-new-tokens",
        "8",
    ]);
    // The numbers: the context, the prompt's tokens, the new ones.
    assert!(
        err.contains("128") && err.contains("+ 8 to generate"),
        "{err}"
    );
    // Within the context it runs (and --truncate keeps the last tokens that fit).
    let out = kiln(&[
        "gpt2",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-file",
        file.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--truncate",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A batch file with one prompt too long names it.
    let batch = dir.join("batch.txt");
    std::fs::write(&batch, format!("Hello\n{}\n", "word ".repeat(200))).unwrap();
    let err = fails_quietly(&[
        "gpt2",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--batch-prompts",
        batch.to_str().unwrap(),
    ]);
    assert!(err.contains("prompt 1 (line 2)"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sampling_flags_take_negative_numbers_to_their_range_checks() {
    let model = fixture();
    let m = model.to_str().unwrap();
    for (flag, value, needle) in [
        (
            "--temperature",
            "-1",
            "--temperature must be a finite number ≥ 0, got -1",
        ),
        ("--top-p", "-0.5", "--top-p must be in (0, 1], got -0.5"),
        ("--top-p", "0", "--top-p must be in (0, 1], got 0"),
        ("--top-k", "-3", "--top-k must be an integer ≥ 0"),
        (
            "--repetition-penalty",
            "-2",
            "--repetition-penalty must be a finite number > 0",
        ),
    ] {
        let err = fails_quietly(&[
            "gpt2", "generate", "--model", m, "--prompt", "Hi", flag, value,
        ]);
        assert!(err.contains(needle), "{flag} {value}: {err}");
    }
}

#[test]
fn a_closed_pipe_ends_tokenize_quietly() {
    let model = fixture();
    // About 150 KB of output: more than a pipe holds.
    let text = "the cat sat on the mat ".repeat(4_000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "gpt2",
            "tokenize",
            "--model",
            model.to_str().unwrap(),
            "--text",
            &text,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(head[0], b'[');
    drop(child.stdout.take()); // `| head -c 16`
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(err.is_empty(), "stderr: {err}");
    assert!(status.success(), "{status:?}");
}

/// `kiln serve` refuses a batch limit whose full-context KV caches cannot fit in memory, before
/// it listens.
#[test]
fn serve_refuses_a_batch_limit_beyond_memory() {
    let model = fixture();
    let e = fails_quietly(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--port",
        "0",
        "--max-batch",
        "100000000000",
    ]);
    assert!(
        e.contains("--max-batch") && e.contains("GiB are available"),
        "{e}"
    );
}
