//! Shared helpers of the GPT-2 tests: the fixture folder, reference outputs, derived checkpoints.
#![allow(dead_code)]
use kiln_io::SafeTensors;
use kiln_tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `tests/fixtures/gpt2`: config.json and the bf16 checkpoint (Hub names, no prefix, with the
/// `attn.bias` buffers) made by `tests/fixtures/make_gpt2_fixtures.py`.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2")
}

/// The reference outputs of transformers.
pub struct Expected(SafeTensors);

impl Expected {
    pub fn load() -> Self {
        Expected(SafeTensors::read(fixture_dir().join("expected.safetensors")).unwrap())
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.0.tensor(name).unwrap().to_f32_vec().unwrap()
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.0
            .tensor(name)
            .unwrap()
            .to_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    }
    pub fn num_prompts(&self) -> usize {
        (0..)
            .take_while(|i| self.0.contains(&format!("p{i}.ids")))
            .count()
    }
}

/// How a derived checkpoint differs from the fixture.
#[derive(Default, Clone)]
pub struct Derive {
    /// Dtype of every tensor in the new file.
    pub dtype: Option<DType>,
    /// Add the `transformer.` prefix (as `save_pretrained` writes).
    pub prefix: bool,
    /// Leave the `attn.bias` buffers out.
    pub drop_buffers: bool,
    /// Leave this tensor (name without prefix) out.
    pub drop: Option<String>,
    /// Replace this tensor (name without prefix) by zeros of this shape.
    pub reshape: Option<(String, Vec<usize>)>,
    /// Write this config.json instead of the fixture's.
    pub config: Option<String>,
    /// Copy the repository's tokenizer files into the folder.
    pub tokenizer: bool,
}

/// A temporary folder that is removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kiln-gpt2-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a checkpoint folder derived from the fixture into a new temporary folder.
pub fn derive(tag: &str, d: &Derive) -> TempDir {
    let dir = TempDir::new(tag);
    let src = SafeTensors::open(fixture_dir().join("model.safetensors")).unwrap();
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in src.load_all().unwrap() {
        let is_buffer = name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias");
        if (is_buffer && d.drop_buffers) || d.drop.as_deref() == Some(name.as_str()) {
            continue;
        }
        let mut t = match d.dtype {
            Some(dt) => t.to_dtype(dt).unwrap(),
            None => t,
        };
        if let Some((n, shape)) = &d.reshape {
            if *n == name {
                t = Tensor::zeros(shape.clone(), t.dtype()).unwrap();
            }
        }
        let name = if d.prefix {
            format!("transformer.{name}")
        } else {
            name
        };
        out.push((name, t));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    kiln_io::write_safetensors(
        dir.path().join("model.safetensors"),
        out.iter().map(|(n, t)| (n.as_str(), t)),
        &meta,
    )
    .unwrap();
    let config = match &d.config {
        Some(c) => c.clone(),
        None => std::fs::read_to_string(fixture_dir().join("config.json")).unwrap(),
    };
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    if d.tokenizer {
        std::fs::write(
            dir.path().join("vocab.json"),
            kiln_models::tokenizer::GPT2_VOCAB_JSON,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("merges.txt"),
            kiln_models::tokenizer::GPT2_MERGES_TXT,
        )
        .unwrap();
    }
    dir
}

/// `max |a − b| / max |b|`: the error relative to the scale of the reference.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}
