//! `kiln bench … --device cuda` and `kiln cuda …`: without a GPU every command fails with one
//! line `error: device: no CUDA device: …`; with one, the records carry the same fields as the
//! CPU benchmarks. Timings are not checked.
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

const COMMANDS: &[&[&str]] = &[
    &[
        "bench", "matmul", "--m", "33", "--n", "65", "--k", "17", "--reps", "3", "--device",
        "cuda", "--json",
    ],
    &[
        "bench", "matmul", "--m", "1", "--n", "65", "--k", "17", "--dtype", "bf16", "--reps", "3",
        "--device", "cuda", "--json",
    ],
    &[
        "bench",
        "attention",
        "--seq",
        "65",
        "--heads",
        "2",
        "--causal",
        "--min-ms",
        "10",
        "--device",
        "cuda",
        "--json",
    ],
    &[
        "bench",
        "attention",
        "--seq",
        "65",
        "--heads",
        "2",
        "--decode",
        "--kv-dtype",
        "bf16",
        "--min-ms",
        "10",
        "--device",
        "cuda",
        "--json",
    ],
    &[
        "bench",
        "conv2d",
        "--batch",
        "2",
        "--in",
        "3",
        "--out",
        "5",
        "--size",
        "9",
        "--min-time",
        "0.01",
        "--device",
        "cuda",
        "--json",
    ],
    &[
        "bench",
        "conv-transpose2d",
        "--batch",
        "2",
        "--in",
        "3",
        "--out",
        "5",
        "--size",
        "4",
        "--backward",
        "--min-time",
        "0.01",
        "--device",
        "cuda",
        "--json",
    ],
    &["bench", "peak", "--device", "cuda", "--json"],
];

#[test]
fn cuda_benchmarks_report_or_fail_cleanly() {
    let gpu = kiln(&["cuda", "info"]).status.success();
    for args in COMMANDS {
        let out = kiln(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !gpu {
            assert!(
                !out.status.success(),
                "kiln {args:?} should fail without a GPU"
            );
            assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
            assert!(
                stderr.starts_with("error: device: no CUDA device"),
                "{stderr}"
            );
            continue;
        }
        assert!(out.status.success(), "kiln {args:?}: {stderr}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let r: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            for k in [
                "op",
                "shape",
                "dtype",
                "threads",
                "median_ms",
                "peak_fraction",
            ] {
                assert!(r.get(k).is_some(), "{k} missing: {r}");
            }
            assert_eq!(r["device"], "cuda", "{r}");
        }
    }
    if !gpu {
        println!("SKIP cuda_benchmarks_report_or_fail_cleanly (GPU part): no CUDA device");
    }
}

#[test]
fn bad_device_is_one_error_line() {
    let out = kiln(&[
        "bench", "matmul", "--m", "1", "--n", "1", "--k", "1", "--device", "tpu",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        err.contains("--device must be cpu, cuda or cuda:N"),
        "{err}"
    );
}
