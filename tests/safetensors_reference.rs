//! Files written by the reference `safetensors` package (tests/fixtures/make_safetensors_fixtures.py)
//! read through both load paths, compared element by element (bit patterns for floats) with the
//! manifest the script wrote; our writer reproduces the reference bytes exactly; misaligned
//! tensors are read correctly and copied, aligned ones borrowed.
use kiln_io::{serialize, write_safetensors, LoadMode, SafeTensors};
use kiln_tensor::{bf16, f16, DType, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/safetensors")
}

fn manifest() -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The tensor's elements as the manifest writes them: float bit patterns, integers.
fn values(t: &Tensor) -> Vec<i128> {
    match t.dtype() {
        DType::F32 => t
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as i128)
            .collect(),
        DType::F16 => t
            .to_vec::<f16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as i128)
            .collect(),
        DType::BF16 => t
            .to_vec::<bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as i128)
            .collect(),
        DType::I64 => t
            .to_vec::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as i128)
            .collect(),
        DType::I32 => t
            .to_vec::<i32>()
            .unwrap()
            .iter()
            .map(|&x| x as i128)
            .collect(),
        DType::U8 | DType::Bool => t
            .to_vec::<u8>()
            .unwrap()
            .iter()
            .map(|&x| x as i128)
            .collect(),
    }
}

fn check_file(file: &str, expect: &Value, mode: LoadMode) {
    let path = fixtures().join(file);
    let st = SafeTensors::load(&path, mode).unwrap();
    assert_eq!(st.mode(), Some(mode));
    assert_eq!(
        st.file_len() as u64,
        expect["file_len"].as_u64().unwrap(),
        "{file}"
    );
    assert_eq!(
        st.header().data_start as u64,
        expect["data_start"].as_u64().unwrap(),
        "{file}"
    );
    let meta: BTreeMap<String, String> =
        serde_json::from_value(expect["metadata"].clone()).unwrap();
    assert_eq!(st.metadata(), &meta, "{file}: metadata");
    let tensors = expect["tensors"].as_array().unwrap();
    assert_eq!(st.len(), tensors.len(), "{file}: tensor count");
    for e in tensors {
        let name = e["name"].as_str().unwrap();
        let info = st.info(name).unwrap();
        assert_eq!(
            info.dtype.safetensors_name(),
            e["dtype"].as_str().unwrap(),
            "{name}"
        );
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
        assert_eq!(info.shape, shape, "{name}");
        let off: Vec<usize> = serde_json::from_value(e["data_offsets"].clone()).unwrap();
        assert_eq!(info.data_offsets, (off[0], off[1]), "{name}");

        let t = st.tensor(name).unwrap();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), info.dtype);
        assert!(t.is_contiguous());
        let want: Vec<i128> = e["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                v.as_i64()
                    .map(|x| x as i128)
                    .unwrap_or_else(|| v.as_u64().unwrap() as i128)
            })
            .collect();
        assert_eq!(values(&t), want, "{file}: {name} values");
        // Aligned tensors are borrowed from the file's bytes; misaligned ones are copied.
        let aligned = e["aligned"].as_bool().unwrap();
        assert_eq!(
            t.is_borrowed(),
            aligned,
            "{file}: {name} borrowed vs aligned"
        );
        if aligned {
            let file_bytes = (**st.shared_bytes()).as_ref();
            let at = st.header().data_start + off[0];
            assert_eq!(
                t.as_bytes().unwrap().as_ptr(),
                file_bytes[at..].as_ptr(),
                "{name}: zero-copy"
            );
        }
    }
}

#[test]
fn python_files_read_through_mmap() {
    for (file, expect) in manifest() {
        check_file(&file, &expect, LoadMode::Mmap);
    }
}

#[test]
fn python_files_read_through_plain_read() {
    for (file, expect) in manifest() {
        check_file(&file, &expect, LoadMode::Read);
    }
}

#[test]
fn misaligned_file_really_has_misaligned_tensors() {
    let m = manifest();
    let mis = &m["misaligned.safetensors"]["tensors"];
    let flags: Vec<bool> = mis
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["aligned"].as_bool().unwrap())
        .collect();
    assert!(
        flags.iter().any(|&a| a) && flags.iter().any(|&a| !a),
        "{flags:?}"
    );
    let st = SafeTensors::open(fixtures().join("misaligned.safetensors")).unwrap();
    assert_eq!(st.header().data_start % 2, 1);
    // The copied tensor behaves like any other: values, views, conversion.
    let d = st.tensor("d.f32").unwrap();
    assert!(!d.is_borrowed());
    assert_eq!(d.to_vec::<f32>().unwrap(), vec![7.0, -8.5]);
    let i = st.tensor("i.f32").unwrap();
    assert!(!i.is_borrowed());
    assert_eq!(
        i.transpose(0, 1).unwrap().to_vec::<f32>().unwrap(),
        vec![1.0, 3.0, 2.0, 4.0]
    );
    let e = st.tensor("e.i64").unwrap();
    assert_eq!(e.to_vec::<i64>().unwrap(), vec![-(1i64 << 40), 1i64 << 62]);
    let b = st.tensor("b.f32").unwrap();
    assert!(b.is_borrowed());
    assert_eq!(b.to_vec::<f32>().unwrap(), vec![1.5, -2.0, 3.25, 1e-3]);
}

/// Our writer, given the tensors the reference wrote, reproduces its file byte for byte (for the
/// files whose metadata order is deterministic: at most one key).
#[test]
fn writer_reproduces_reference_bytes() {
    for file in [
        "all_dtypes.safetensors",
        "no_metadata.safetensors",
        "empty.safetensors",
    ] {
        let path = fixtures().join(file);
        let original = std::fs::read(&path).unwrap();
        let st = SafeTensors::open(&path).unwrap();
        let tensors = st.load_all().unwrap();
        let ours = serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), st.metadata()).unwrap();
        assert!(
            ours == original,
            "{file}: writer output differs from the reference file"
        );

        // The same through the atomic file writer, with the tensors given in reverse order.
        let dir = tempdir(file);
        let out = dir.join("copy.safetensors");
        write_safetensors(
            &out,
            tensors.iter().rev().map(|(n, t)| (n.as_str(), t)),
            st.metadata(),
        )
        .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == original,
            "{file}: written file differs"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Files with several metadata keys (the reference writes them in random order) and with
/// misaligned data re-serialise to a canonical file with the same contents, all tensors aligned.
#[test]
fn writer_round_trips_other_files_with_equal_contents() {
    for file in ["metadata_many.safetensors", "misaligned.safetensors"] {
        let st = SafeTensors::open(fixtures().join(file)).unwrap();
        let tensors = st.load_all().unwrap();
        let bytes = serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), st.metadata()).unwrap();
        let back = SafeTensors::from_bytes(&bytes).unwrap();
        assert_eq!(back.metadata(), st.metadata());
        assert_eq!(back.header().data_start % 8, 0);
        for (name, t) in &tensors {
            let u = back.tensor(name).unwrap();
            assert!(u.is_borrowed(), "{name}: the writer aligns every tensor");
            assert_eq!(u.dims(), t.dims());
            assert_eq!(
                u.as_bytes().unwrap(),
                t.as_bytes().unwrap(),
                "{file}: {name}"
            );
        }
        // A second round trip is byte-identical (the canonical form is a fixed point).
        let again = serialize(
            back.load_all()
                .unwrap()
                .iter()
                .map(|(n, t)| (n.as_str(), t)),
            back.metadata(),
        )
        .unwrap();
        assert!(again == bytes, "{file}: second round trip differs");
    }
}

#[test]
fn tensors_outlive_the_reader() {
    let t = {
        let st = SafeTensors::open(fixtures().join("no_metadata.safetensors")).unwrap();
        st.tensor("weight").unwrap()
    };
    // The map is kept alive by the tensor's reference count.
    assert!(t.is_borrowed());
    assert_eq!(t.dims(), &[4, 3]);
    assert_eq!(t.to_vec::<f32>().unwrap().len(), 12);
    let e = SafeTensors::open(fixtures().join("no_metadata.safetensors"))
        .unwrap()
        .tensor("nope")
        .unwrap_err();
    assert!(e.to_string().contains("missing tensor `nope`"), "{e}");
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-st-ref-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
