//! `kiln inspect`: the table and JSON forms on the README's checkpoint, and one-line errors.
//! (Every file of the hostile corpus is run through the binary in tests/safetensors_bad.rs.)
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kiln")
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny.safetensors")
}

#[test]
fn table_lists_every_tensor_and_the_totals() {
    let out = kiln(&["inspect", "tests/data/tiny.safetensors"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty());
    let text = String::from_utf8(out.stdout).unwrap();
    let st = kiln_io::SafeTensors::open(tiny()).unwrap();
    assert!(text.starts_with(&format!(
        "tests/data/tiny.safetensors: {} tensors, {} bytes",
        st.len(),
        st.file_len()
    )));
    // One row per tensor: name, dtype, shape, bytes.
    for t in st.tensors() {
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(t.name.as_str()))
            .unwrap_or_else(|| panic!("no row for {}", t.name));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], t.dtype.safetensors_name(), "{row}");
        assert!(row.contains(&format!("{:?}", t.shape)), "{row}");
        assert_eq!(
            cells.last().unwrap().parse::<usize>().unwrap(),
            t.size_in_bytes(),
            "{row}"
        );
    }
    let params: usize = st.tensors().iter().map(|t| t.numel()).sum();
    let bytes: usize = st.tensors().iter().map(|t| t.size_in_bytes()).sum();
    assert!(
        text.contains(&format!("total: {params} parameters, {bytes} bytes")),
        "{text}"
    );
    assert!(text.contains("metadata: format = pt"), "{text}");
    // Hand-checked figures for the shipped file (see tests/fixtures/make_safetensors_fixtures.py).
    assert!(text.contains("wte.weight"));
    assert!(text.contains("h.0.attn.c_attn.weight"));
}

#[test]
fn json_form_is_machine_readable() {
    let out = kiln(&["inspect", "--json", "tests/data/tiny.safetensors"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let st = kiln_io::SafeTensors::open(tiny()).unwrap();
    assert_eq!(v["file"], "tests/data/tiny.safetensors");
    assert_eq!(v["file_bytes"].as_u64().unwrap() as usize, st.file_len());
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), st.len());
    let raw = std::fs::read(tiny()).unwrap();
    for (j, t) in tensors.iter().zip(st.tensors()) {
        assert_eq!(j["name"], t.name.as_str());
        assert_eq!(j["dtype"], t.dtype.safetensors_name());
        let shape: Vec<usize> = serde_json::from_value(j["shape"].clone()).unwrap();
        assert_eq!(shape, t.shape);
        assert_eq!(j["bytes"].as_u64().unwrap() as usize, t.size_in_bytes());
        // `offset` is the absolute position in the file.
        let off = j["offset"].as_u64().unwrap() as usize;
        assert_eq!(
            &raw[off..off + t.size_in_bytes()],
            st.tensor_bytes(&t.name).unwrap()
        );
    }
    let params: u64 = st.tensors().iter().map(|t| t.numel() as u64).sum();
    assert_eq!(v["total_params"].as_u64().unwrap(), params);
    assert_eq!(
        v["total_bytes"].as_u64().unwrap() as usize,
        st.header().data_len
    );
    assert_eq!(v["metadata"]["format"], "pt");
}

#[test]
fn empty_and_scalar_tensors_are_listed() {
    let out = kiln(&[
        "inspect",
        "--json",
        "tests/fixtures/safetensors/all_dtypes.safetensors",
    ]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let find = |n: &str| {
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(find("f32.scalar")["shape"], serde_json::json!([]));
    assert_eq!(find("f32.scalar")["bytes"], 4);
    assert_eq!(find("f32.empty3d")["shape"], serde_json::json!([3, 0, 2]));
    assert_eq!(find("f32.empty3d")["bytes"], 0);
    let out = kiln(&["inspect", "tests/fixtures/safetensors/empty.safetensors"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("total: 0 parameters, 0 bytes"));
}

#[test]
fn missing_file_is_one_error_line() {
    let out = kiln(&["inspect", "tests/data/no_such.safetensors"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: tests/data/no_such.safetensors: "),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn missing_argument_is_a_usage_error() {
    let out = kiln(&["inspect"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
