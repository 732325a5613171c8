//! Our writer and reader against each other: every dtype, odd shapes, scalars, empty tensors,
//! non-contiguous views, metadata with escapes; atomic replacement; writer-side errors.
use kiln_io::{serialize, write_atomic, write_safetensors, LoadMode, SafeTensors};
use kiln_tensor::{bf16, f16, DType, Error, Tensor};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-st-rt-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tensor of `dtype` and `shape` filled with a simple pattern from `seed`.
fn pattern(dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let f = |i: usize| {
        ((i as u64).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 7.0 - 70.0
    };
    match dtype {
        DType::F32 => Tensor::from_vec((0..n).map(f).collect::<Vec<f32>>(), shape).unwrap(),
        DType::F16 => Tensor::from_vec(
            (0..n).map(|i| f16::from_f32(f(i))).collect::<Vec<_>>(),
            shape,
        )
        .unwrap(),
        DType::BF16 => Tensor::from_vec(
            (0..n).map(|i| bf16::from_f32(f(i))).collect::<Vec<_>>(),
            shape,
        )
        .unwrap(),
        DType::I64 => Tensor::from_vec(
            (0..n).map(|i| (f(i) * 1e9) as i64).collect::<Vec<_>>(),
            shape,
        )
        .unwrap(),
        DType::I32 => {
            Tensor::from_vec((0..n).map(|i| f(i) as i32).collect::<Vec<_>>(), shape).unwrap()
        }
        DType::U8 => {
            Tensor::from_vec((0..n).map(|i| f(i) as u8).collect::<Vec<_>>(), shape).unwrap()
        }
        DType::Bool => {
            let bytes: Vec<u8> = (0..n).map(|i| (f(i) > 0.0) as u8).collect();
            let t = Tensor::zeros(shape, DType::Bool).unwrap();
            let mut t = t;
            t.as_mut_slice::<u8>().unwrap().copy_from_slice(&bytes);
            t
        }
    }
}

fn same(a: &Tensor, b: &Tensor) {
    assert_eq!(a.dtype(), b.dtype());
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.contiguous().unwrap(), b.contiguous().unwrap());
    assert_eq!(a.as_bytes().unwrap(), b.as_bytes().unwrap());
}

#[test]
fn every_dtype_and_odd_shapes_round_trip_through_a_file() {
    let shapes: &[&[usize]] = &[
        &[],
        &[1],
        &[7],
        &[0],
        &[3, 0, 5],
        &[33, 1],
        &[2, 3, 5, 7],
        &[257],
    ];
    let mut tensors = Vec::new();
    for (k, &dtype) in DType::ALL.iter().enumerate() {
        for (j, shape) in shapes.iter().enumerate() {
            tensors.push((
                format!("{}.{j}", dtype.name()),
                pattern(dtype, shape, (k * 31 + j) as u64),
            ));
        }
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "note \"quoted\"".to_string(),
        "tab\there\nnewline ✓".to_string(),
    );
    let dir = tempdir("dtypes");
    let path = dir.join("all.safetensors");
    write_safetensors(&path, tensors.iter().map(|(n, t)| (n.as_str(), t)), &meta).unwrap();
    for mode in [LoadMode::Mmap, LoadMode::Read] {
        let st = SafeTensors::load(&path, mode).unwrap();
        assert_eq!(st.metadata(), &meta);
        assert_eq!(st.len(), tensors.len());
        for (name, t) in &tensors {
            let u = st.tensor(name).unwrap();
            same(t, &u);
            assert!(u.is_borrowed(), "{name}: written files are aligned");
        }
    }
    // Re-serialising what was read gives the same bytes.
    let st = SafeTensors::open(&path).unwrap();
    let again = serialize(
        st.load_all().unwrap().iter().map(|(n, t)| (n.as_str(), t)),
        st.metadata(),
    )
    .unwrap();
    assert!(again == std::fs::read(&path).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn non_contiguous_views_are_written_as_their_logical_elements() {
    let base = Tensor::from_vec((0..24).map(|x| x as f32).collect::<Vec<_>>(), [2, 3, 4]).unwrap();
    let views = [
        ("permuted", base.permute(&[2, 0, 1]).unwrap()),
        ("narrowed", base.narrow(2, 1, 2).unwrap()),
        (
            "broadcast",
            base.narrow(0, 1, 1)
                .unwrap()
                .broadcast_as([3, 2, 3, 4])
                .unwrap(),
        ),
        ("offset_contiguous", base.narrow(0, 1, 1).unwrap()),
    ];
    let bytes = serialize(views.iter().map(|(n, t)| (*n, t)), &BTreeMap::new()).unwrap();
    let st = SafeTensors::from_bytes(&bytes).unwrap();
    for (name, v) in &views {
        let u = st.tensor(name).unwrap();
        assert_eq!(u.dims(), v.dims());
        assert_eq!(
            u.to_vec::<f32>().unwrap(),
            v.to_vec::<f32>().unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        st.tensor("narrowed").unwrap().to_vec::<f32>().unwrap(),
        vec![1., 2., 5., 6., 9., 10., 13., 14., 17., 18., 21., 22.]
    );
}

#[test]
fn writer_rejects_duplicate_and_reserved_names() {
    let t = Tensor::zeros([2], DType::F32).unwrap();
    let e = serialize([("a", &t), ("a", &t)], &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("duplicate tensor name `a`"), "{e}");
    let e = serialize([("__metadata__", &t)], &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("cannot be a tensor name"), "{e}");
}

#[test]
fn atomic_write_replaces_whole_files_and_leaves_no_temporaries() {
    let dir = tempdir("atomic");
    let path = dir.join("m.safetensors");
    let a = pattern(DType::F32, &[1000], 1);
    let b = pattern(DType::F32, &[10], 2);
    write_safetensors(&path, [("w", &a)], &BTreeMap::new()).unwrap();
    let old = SafeTensors::open(&path).unwrap();
    let old_w = old.tensor("w").unwrap();
    // Replace the file while the old one is mapped: the map keeps the old contents (the rename
    // gives the path a new inode) and the new file is complete.
    write_safetensors(&path, [("w", &b)], &BTreeMap::new()).unwrap();
    same(&old_w, &a);
    same(&SafeTensors::open(&path).unwrap().tensor("w").unwrap(), &b);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary files left: {names:?}");

    // A failing writer leaves the existing file untouched and no temporary behind.
    let before = std::fs::read(&path).unwrap();
    let e = write_atomic(&path, |w| {
        use std::io::Write;
        w.write_all(b"partial")?;
        Err(std::io::Error::other("disk on fire"))
    })
    .unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("disk on fire"),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    // A folder that does not exist is an I/O error naming the path.
    let e = write_safetensors(
        dir.join("nope/x.safetensors"),
        [("w", &b)],
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope/x.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Random sets of tensors (random dtypes, ranks 0-4, sizes 0-6) survive serialise → parse.
    #[test]
    fn random_tensor_sets_round_trip(
        specs in prop::collection::vec((0usize..7, prop::collection::vec(0usize..7, 0..5), any::<u64>()), 0..8)
    ) {
        let tensors: Vec<(String, Tensor)> = specs
            .iter()
            .enumerate()
            .map(|(i, (d, shape, seed))| (format!("t{i}"), pattern(DType::ALL[*d], shape, *seed)))
            .collect();
        let bytes = serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), &BTreeMap::new()).unwrap();
        let st = SafeTensors::from_bytes(&bytes).unwrap();
        prop_assert_eq!(st.len(), tensors.len());
        for (name, t) in &tensors {
            let u = st.tensor(name).unwrap();
            prop_assert_eq!(u.dims(), t.dims());
            prop_assert_eq!(u.as_bytes().unwrap(), t.as_bytes().unwrap());
        }
    }
}
