//! Opening a safetensors checkpoint: time to open and read one tensor for a 50 MB and a 500 MB
//! file (made here, in a temporary folder, with the same number of tensors), and resident memory
//! after opening.
//!
//! With a memory map, opening reads only the 8-byte length and the JSON header; tensor bytes are
//! paged in when first touched. So open time depends on the header (the number of tensors), not on
//! the file size, and resident memory after open grows only by the pages actually read. The plain
//! read path (`LoadMode::Read`) is measured alongside for contrast: it copies the whole file.
//!
//! ```sh
//! cargo bench --bench safetensors_open
//! ```
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kiln_io::{write_safetensors, LoadMode, SafeTensors};
use kiln_tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Tensors per checkpoint (the same for both sizes, so the headers are the same size).
const TENSORS: usize = 64;

/// Writes a checkpoint of about `mb` MB: `TENSORS - 1` f32 matrices `[rows, 1024]` plus a small
/// `bias` vector `[1024]`, the tensor that is read.
fn make_checkpoint(dir: &Path, mb: usize) -> PathBuf {
    let path = dir.join(format!("ckpt_{mb}mb.safetensors"));
    let rows = mb * 1_000_000 / 4 / 1024 / (TENSORS - 1);
    let mut tensors = Vec::new();
    for i in 0..TENSORS - 1 {
        let mut t = Tensor::zeros([rows, 1024], DType::F32).expect("alloc");
        // Non-zero contents, so no layer of the system can treat the data as sparse.
        for (j, x) in t
            .as_mut_slice::<f32>()
            .expect("owned")
            .iter_mut()
            .enumerate()
        {
            *x = (i * 31 + j % 977) as f32;
        }
        tensors.push((format!("layer.{i:02}.weight"), t));
    }
    let bias: Vec<f32> = (0..1024).map(|i| i as f32 * 0.5).collect();
    tensors.push(("bias".into(), Tensor::from_vec(bias, [1024]).expect("bias")));
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&path, tensors.iter().map(|(n, t)| (n.as_str(), t)), &meta).expect("write");
    path
}

/// `VmRSS` and `RssFile` of this process in kB (Linux), or 0 when unavailable.
fn rss_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssFile:"))
}

/// Open the file and read every element of one tensor.
fn open_and_read_one(path: &Path, mode: LoadMode) -> f32 {
    let st = SafeTensors::load(path, mode).expect("open");
    let t = st.tensor("bias").expect("bias");
    t.as_slice::<f32>().expect("f32").iter().sum()
}

fn median_us(mut f: impl FnMut(), reps: usize) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[reps / 2]
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("kiln-bench-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let small = make_checkpoint(&dir, 50);
    let large = make_checkpoint(&dir, 500);
    let size = |p: &Path| std::fs::metadata(p).expect("stat").len();

    // Resident memory after opening the large file and reading one tensor.
    let (rss0, file0) = rss_kb();
    let st = SafeTensors::open(&large).expect("open");
    let (rss1, file1) = rss_kb();
    let bias_sum: f32 = st
        .tensor("bias")
        .expect("bias")
        .as_slice::<f32>()
        .expect("f32")
        .iter()
        .sum();
    let (rss2, file2) = rss_kb();
    println!(
        "safetensors_open: {} MB file, {} tensors; VmRSS before open {rss0} kB, after open {rss1} kB (+{} kB), after reading one tensor {rss2} kB (+{} kB); RssFile {file0} -> {file1} -> {file2} kB (bias sum {bias_sum})",
        size(&large) / 1_000_000,
        st.len(),
        rss1.saturating_sub(rss0),
        rss2.saturating_sub(rss0),
    );
    drop(st);

    // A plain median as a one-line summary next to criterion's figures.
    let m_small = median_us(
        || {
            black_box(open_and_read_one(&small, LoadMode::Mmap));
        },
        201,
    );
    let m_large = median_us(
        || {
            black_box(open_and_read_one(&large, LoadMode::Mmap));
        },
        201,
    );
    println!(
        "safetensors_open: mmap open + read one tensor, median of 201: {} MB {m_small:.1} us, {} MB {m_large:.1} us, ratio {:.2}",
        size(&small) / 1_000_000,
        size(&large) / 1_000_000,
        m_large / m_small
    );

    let mut g = c.benchmark_group("safetensors_open");
    for (label, path) in [("50MB", &small), ("500MB", &large)] {
        g.bench_with_input(BenchmarkId::new("mmap_open", label), path, |b, p| {
            b.iter(|| black_box(SafeTensors::open(p).expect("open").len()))
        });
        g.bench_with_input(
            BenchmarkId::new("mmap_open_read_one", label),
            path,
            |b, p| b.iter(|| black_box(open_and_read_one(p, LoadMode::Mmap))),
        );
    }
    g.finish();

    // The plain read path copies the whole file: its time grows with the size.
    let mut g = c.benchmark_group("safetensors_read_plain");
    g.sample_size(10);
    for (label, path) in [("50MB", &small), ("500MB", &large)] {
        g.bench_with_input(
            BenchmarkId::new("read_open_read_one", label),
            path,
            |b, p| b.iter(|| black_box(open_and_read_one(p, LoadMode::Read))),
        );
    }
    g.finish();

    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
