//! The hostile-file corpus in tests/data/bad (made by tests/fixtures/make_bad_safetensors.py):
//! every file is rejected, through both the memory-map and the plain-read path and from memory,
//! with an `Error::SafeTensors` whose message names the defect — never a panic. `kiln inspect`
//! turns each into exactly one `error:` line on stderr and exit status 1.
use kiln_io::{LoadMode, SafeTensors};
use kiln_tensor::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

/// File stem → a fragment the error message must contain.
const EXPECTED: &[(&str, &str)] = &[
    ("empty_file", "the file is empty"),
    (
        "shorter_than_length_field",
        "too short to hold the 8-byte header length",
    ),
    ("header_length_zero", "header length is 0"),
    (
        "header_length_larger_than_file",
        "header length 1000 is larger than the file",
    ),
    (
        "header_length_absurd",
        "header length 1099511627776 is absurd",
    ),
    ("header_length_u64_max", "is absurd"),
    ("header_invalid_utf8", "header is not valid UTF-8"),
    ("header_invalid_json", "header is not valid JSON"),
    (
        "header_trailing_garbage",
        "header is not valid JSON: trailing characters",
    ),
    (
        "header_not_an_object",
        "header is an array, not a JSON object",
    ),
    ("header_deeply_nested", "recursion limit exceeded"),
    (
        "header_number_out_of_range",
        "tensor `a`: entry is not valid JSON: number out of range",
    ),
    (
        "entry_not_an_object",
        "tensor `a`: entry is a number, not an object",
    ),
    ("missing_dtype", "tensor `a`: missing key `dtype`"),
    ("missing_shape", "tensor `a`: missing key `shape`"),
    (
        "missing_data_offsets",
        "tensor `a`: missing key `data_offsets`",
    ),
    ("unknown_dtype", "tensor `a`: unknown dtype `F64`"),
    (
        "dtype_not_a_string",
        "tensor `a`: `dtype` is a number, not a string",
    ),
    (
        "shape_negative",
        "`shape` entry -1 is not a non-negative integer",
    ),
    (
        "shape_not_integer",
        "`shape` entry 2.5 is not a non-negative integer",
    ),
    ("shape_not_an_array", "`shape` is a string, not an array"),
    (
        "shape_numel_overflow",
        "has more elements than fit in usize (overflow)",
    ),
    (
        "shape_bytes_overflow",
        "needs more bytes than fit in usize (overflow)",
    ),
    (
        "shape_dim_beyond_u64",
        "is not a non-negative integer that fits in usize",
    ),
    (
        "data_offsets_one_number",
        "`data_offsets` must be [begin, end]",
    ),
    (
        "data_offsets_reversed",
        "data_offsets [8, 0] end before they begin",
    ),
    (
        "data_offsets_negative",
        "`data_offsets` must be [begin, end]",
    ),
    (
        "byte_length_mismatch",
        "data_offsets [0, 20] hold 20 bytes but F32 [2, 3] needs 6 × 4 = 24 bytes",
    ),
    ("offsets_out_of_range", "tensor `a` is out of range"),
    (
        "offsets_overlap",
        "tensors `a` (data_offsets [0, 16]) and `b` (data_offsets [8, 24]) overlap",
    ),
    (
        "offsets_gap",
        "gap in the data section: 4 unused bytes between `a` (ends at 16) and `b` (starts at 20)",
    ),
    (
        "offsets_first_not_at_zero",
        "the first tensor `a` starts at byte 4, not 0",
    ),
    (
        "data_longer_than_tensors",
        "the data section holds 12 bytes but the tensors account for only 8 (4 trailing bytes)",
    ),
    (
        "truncated_data",
        "tensor `b` is out of range (truncated file?)",
    ),
    ("duplicate_tensor_names", "duplicate tensor name `a`"),
    ("duplicate_metadata", "duplicate tensor name `__metadata__`"),
    (
        "duplicate_metadata_key",
        "`__metadata__`: duplicate key `k`",
    ),
    ("duplicate_entry_key", "tensor `a`: duplicate key `dtype`"),
    (
        "metadata_value_not_a_string",
        "`__metadata__` key `k` holds a number, not a string",
    ),
    (
        "metadata_not_an_object",
        "`__metadata__` is an array, not an object",
    ),
];

fn bad_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad")
}

fn corpus() -> Vec<(String, PathBuf)> {
    let mut files: Vec<_> = std::fs::read_dir(bad_dir())
        .expect("tests/data/bad exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    files.sort();
    files
}

fn expected(stem: &str) -> &'static str {
    EXPECTED
        .iter()
        .find(|(s, _)| *s == stem)
        .unwrap_or_else(|| {
            panic!("tests/data/bad/{stem}.safetensors has no expected message in EXPECTED")
        })
        .1
}

#[test]
fn corpus_and_table_match() {
    let files = corpus();
    assert_eq!(
        files.len(),
        EXPECTED.len(),
        "one table entry per corpus file"
    );
    for (stem, _) in &files {
        expected(stem);
    }
}

fn check(stem: &str, path: &Path, result: kiln_tensor::Result<SafeTensors>, how: &str) {
    match result {
        Ok(_) => panic!("{stem} ({how}): accepted a broken file"),
        Err(Error::SafeTensors { path: p, reason }) => {
            let want = expected(stem);
            assert!(
                reason.contains(want),
                "{stem} ({how}): message {reason:?} does not contain {want:?}"
            );
            if how != "memory" {
                assert_eq!(p, path, "{stem}: the error names the file");
            }
        }
        Err(other) => panic!("{stem} ({how}): wrong error kind: {other:?}"),
    }
}

#[test]
fn every_bad_file_is_rejected_with_a_precise_message() {
    for (stem, path) in corpus() {
        check(
            &stem,
            &path,
            SafeTensors::load(&path, LoadMode::Mmap),
            "mmap",
        );
        check(
            &stem,
            &path,
            SafeTensors::load(&path, LoadMode::Read),
            "read",
        );
        let bytes = std::fs::read(&path).unwrap();
        check(&stem, &path, SafeTensors::from_bytes(&bytes), "memory");
    }
}

#[test]
fn error_display_is_one_line_naming_the_file() {
    for (stem, path) in corpus() {
        let e = SafeTensors::open(&path).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{stem}: multi-line message {e:?}");
        assert!(e.starts_with(&path.display().to_string()), "{stem}: {e}");
        assert!(e.contains("invalid safetensors file"), "{stem}: {e}");
    }
}

#[test]
fn missing_file_and_directory_are_io_errors() {
    let e = SafeTensors::open(bad_dir().join("no_such_file.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    let e = SafeTensors::open(bad_dir()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

#[test]
fn cli_prints_one_error_line_and_exits_1() {
    for (stem, path) in corpus() {
        for json in [false, true] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
            cmd.arg("inspect").arg(&path);
            if json {
                cmd.arg("--json");
            }
            let out = cmd.output().expect("run kiln");
            assert_eq!(out.status.code(), Some(1), "{stem}: exit status");
            assert!(out.stdout.is_empty(), "{stem}: nothing on stdout");
            let err = String::from_utf8(out.stderr).expect("UTF-8 stderr");
            let lines: Vec<&str> = err.lines().collect();
            assert_eq!(lines.len(), 1, "{stem}: stderr {err:?}");
            assert!(lines[0].starts_with("error: "), "{stem}: {err:?}");
            assert!(lines[0].contains(expected(&stem)), "{stem}: {err:?}");
            assert!(!err.contains("panicked"), "{stem}: {err:?}");
        }
    }
}
