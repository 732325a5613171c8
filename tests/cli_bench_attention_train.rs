//! `kiln bench attention --backward`: the training attention record keeps every field of the
//! other benchmarks (`op`, `shape`, `dtype`, `threads`, `median_ms`, `gflops`,
//! `peak_fraction`) and adds the forward/backward split; incompatible flags are one error line.
//! Timings are not checked (benchmarks, not tests).
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

#[test]
fn backward_record() {
    let out = kiln(&[
        "bench",
        "attention",
        "--backward",
        "--batch",
        "2",
        "--seq",
        "33",
        "--heads",
        "3",
        "--head-dim",
        "16",
        "--threads",
        "1",
        "--min-ms",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(r["op"], "attention_train");
    assert_eq!(
        r["shape"],
        serde_json::json!({"batch": 2, "heads": 3, "seq": 33, "head_dim": 16, "causal": true})
    );
    assert_eq!(r["dtype"], "f32");
    assert_eq!(r["threads"], 1);
    for k in [
        "median_ms",
        "gflops",
        "peak_fraction",
        "forward_ms",
        "backward_ms",
        "forward_gflops",
        "backward_gflops",
        "inference_ms",
        "peak_gflops",
    ] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    // gflops counts forward + 2.5 × forward flops over the forward + backward time.
    let fwd_flops = 4.0 * (2 * 3 * 16) as f64 * (33 * 34 / 2) as f64;
    let want = 3.5 * fwd_flops / r["median_ms"].as_f64().unwrap() / 1e6;
    assert!((r["gflops"].as_f64().unwrap() - want).abs() <= 1e-9 * want);
}

#[test]
fn backward_rejects_decode_and_narrow_kv() {
    for extra in [["--decode"].as_slice(), ["--kv-dtype", "bf16"].as_slice()] {
        let mut args = vec!["bench", "attention", "--backward", "--seq", "8"];
        args.extend_from_slice(extra);
        let out = kiln(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err:?}");
        assert!(err.starts_with("error: "), "{err}");
    }
}
