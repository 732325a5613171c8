//! `kiln bench`: the JSON records other tools read (`op`, `shape`, `dtype`, `threads`,
//! `median_ms`, `gflops`, `peak_fraction`), the native bf16 products, and bad flags as one error
//! line. Timings are not checked (benchmarks, not tests).
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

fn records(args: &[&str]) -> Vec<serde_json::Value> {
    let out = kiln(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn one_error_line(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(!out.status.success(), "kiln {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn matmul_records() {
    let base = [
        "bench", "matmul", "--m", "7", "--n", "33", "--k", "13", "--reps", "1",
    ];
    for dtype in ["f32", "bf16", "f16"] {
        let mut args = base.to_vec();
        args.extend(["--dtype", dtype, "--threads", "1", "--json"]);
        let r = records(&args);
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(r["op"], "matmul");
        assert_eq!(r["shape"], serde_json::json!([7, 33, 13]));
        assert_eq!(r["dtype"], dtype);
        assert_eq!(r["threads"], 1);
        for k in ["median_ms", "gflops", "peak_fraction"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
    }
    // The native bf16 product where the CPU has one, else a clear error.
    let mut args = base.to_vec();
    args.extend(["--dtype", "bf16", "--matmul-precision", "bf16", "--json"]);
    if kiln::cpu::gemm::amx::best_native_kernel().is_some() {
        let r = &records(&args)[0];
        assert_eq!(r["matmul_precision"], "bf16");
        assert!(r["kernel"] == "amx" || r["kernel"] == "avx512bf16", "{r}");
        assert!(r["gflops"].as_f64().unwrap() > 0.0);
    } else {
        let err = one_error_line(&args);
        assert!(err.contains("AMX or AVX512-BF16"), "{err}");
    }
    let mut args = base.to_vec();
    args.extend(["--matmul-precision", "bf16"]);
    assert!(one_error_line(&args).contains("--dtype bf16"));
    let mut args = base.to_vec();
    args.extend(["--matmul-precision", "f64"]);
    assert!(one_error_line(&args).contains("--matmul-precision"));
    assert!(
        one_error_line(&["bench", "matmul", "--m", "0", "--n", "1", "--k", "1"])
            .contains("at least 1")
    );
}

#[test]
fn peak_records() {
    let r = records(&[
        "bench",
        "peak",
        "--seconds",
        "0.02",
        "--reps",
        "1",
        "--json",
    ]);
    let ops: Vec<&str> = r.iter().map(|x| x["op"].as_str().unwrap()).collect();
    assert!(ops.contains(&"fma") && ops.contains(&"triad"), "{ops:?}");
    let native = kiln::cpu::gemm::amx::best_native_kernel().is_some();
    assert_eq!(ops.contains(&"bf16_peak"), native, "{ops:?}");
    for x in &r {
        assert!(
            x["gflops"].as_f64().or(x["gbps"].as_f64()).unwrap() > 0.0,
            "{x}"
        );
    }
}
