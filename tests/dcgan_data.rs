//! DCGAN data sets: the synthetic set (determinism, thread independence, range), image folders
//! (every PNG colour type, JPEG, recursion, broken files, torchvision/PIL resize semantics),
//! images from safetensors (and their errors), and the resumable shuffler.
use kiln::io::write_safetensors;
use kiln::models::dcgan::data::{
    load_images_safetensors, synthetic_batch, synthetic_image, Dataset, ImageFolder, Range,
    Shuffler,
};
use kiln::models::dcgan::image::{read_image, read_png_rgb, resize_center_crop};
use kiln::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/images")
}

/// A fresh temporary folder for one test.
fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-dcgan-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_png(
    path: &Path,
    (w, h): (u32, u32),
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
    palette: Option<(&[u8], &[u8])>,
) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(color);
    enc.set_depth(depth);
    if let Some((plte, trns)) = palette {
        enc.set_palette(plte.to_vec());
        enc.set_trns(trns.to_vec());
    }
    let mut writer = enc.write_header().unwrap();
    writer.write_image_data(data).unwrap();
    writer.finish().unwrap();
}

fn write_jpeg(path: &Path, (w, h): (u16, u16), color: jpeg_encoder::ColorType, data: &[u8]) {
    let enc = jpeg_encoder::Encoder::new_file(path, 95).unwrap();
    enc.encode(data, w, h, color).unwrap();
}

/// Planar `[3, s, s]` u8 from interleaved `[s, s, 3]`.
fn planar(rgb: &[u8], s: usize) -> Vec<u8> {
    let mut out = vec![0u8; 3 * s * s];
    for p in 0..s * s {
        for c in 0..3 {
            out[c * s * s + p] = rgb[p * 3 + c];
        }
    }
    out
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let mut max = 0u8;
    let mut sum = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = x.abs_diff(y);
        max = max.max(d);
        sum += d as f64;
    }
    (max, sum / a.len() as f64)
}

// ---------------------------------------------------------------------------------------------
// Synthetic set
// ---------------------------------------------------------------------------------------------

#[test]
fn synthetic_batch_is_per_image_and_thread_independent() {
    let (size, count) = (33, 7);
    let per = 3 * size * size;
    let run = |threads: usize, range: Range| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut out = vec![0f32; count * per];
        pool.install(|| synthetic_batch(42, 1000, count, size, range, &mut out));
        out
    };
    let one = run(1, Range::ZeroToOne);
    let two = run(2, Range::ZeroToOne);
    assert_eq!(one, two);
    for i in 0..count {
        let mut img = vec![0f32; per];
        synthetic_image(42, 1000 + i as u64, size, &mut img);
        assert_eq!(&one[i * per..(i + 1) * per], &img[..]);
    }
    let pm = run(2, Range::MinusOneToOne);
    for (a, b) in one.iter().zip(&pm) {
        assert_eq!(*b, a * 2.0 - 1.0);
    }
    assert!(pm.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(pm.iter().any(|&v| v < -0.5) && pm.iter().any(|&v| v > 0.5));
}

#[test]
fn synthetic_images_vary() {
    // Distinct images, and the mean colour varies between them.
    let size = 64;
    let per = 3 * size * size;
    let n = 32;
    let mut out = vec![0f32; n * per];
    synthetic_batch(7, 0, n, size, Range::ZeroToOne, &mut out);
    let means: Vec<f32> = out
        .chunks(per)
        .map(|img| img.iter().sum::<f32>() / per as f32)
        .collect();
    let lo = means.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = means.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    assert!(hi - lo > 0.1, "{lo} {hi}");
    for i in 1..n {
        assert_ne!(&out[..per], &out[i * per..(i + 1) * per]);
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding and resizing against PIL
// ---------------------------------------------------------------------------------------------

#[test]
fn resize_and_crop_match_pil() {
    for (name, sizes) in [
        ("noise", &[16, 64][..]),
        ("tall", &[16, 64, 80]),
        ("wide", &[64]),
    ] {
        let src = read_image(&data_dir().join(format!("resize_{name}.png"))).unwrap();
        for &size in sizes {
            let (want, w, h) =
                read_png_rgb(&data_dir().join(format!("resize_{name}_{size}.png"))).unwrap();
            assert_eq!((w, h), (size, size));
            let got = resize_center_crop(&src, size);
            let (max, mean) = max_abs_diff(&got, &planar(&want, size));
            // PIL rounds to u8 between its two passes; kiln keeps f32.
            assert!(
                max <= 1 && mean < 0.5,
                "{name} {size}: max {max} mean {mean}"
            );
        }
    }
}

#[test]
fn jpeg_decodes_like_libjpeg() {
    for name in ["photo.jpg", "grey.jpg"] {
        let img = read_image(&data_dir().join(name)).unwrap();
        let (want, w, h) = read_png_rgb(&data_dir().join(format!("{name}.png"))).unwrap();
        assert_eq!((img.width, img.height), (w, h));
        let (max, mean) = max_abs_diff(&img.data, &want);
        assert!(max <= 4 && mean < 0.75, "{name}: max {max} mean {mean}");
    }
}

// ---------------------------------------------------------------------------------------------
// Image folders
// ---------------------------------------------------------------------------------------------

/// A folder with PNGs of every colour type, JPEGs, a subfolder, a broken PNG, a text file
/// named .jpg and a non-image file. Returns the folder and the expected (sorted) image files.
fn make_folder(dir: &Path) -> Vec<PathBuf> {
    use png::{BitDepth as D, ColorType as C};
    let sub = dir.join("sub/deeper");
    std::fs::create_dir_all(&sub).unwrap();
    // a_rgb.png: solid (10, 200, 30), 100x50.
    write_png(
        &dir.join("a_rgb.png"),
        (100, 50),
        C::Rgb,
        D::Eight,
        &[10, 200, 30].repeat(5000),
        None,
    );
    // b_grey.png: grey 77, 30x40.
    write_png(
        &dir.join("b_grey.png"),
        (30, 40),
        C::Grayscale,
        D::Eight,
        &[77; 1200],
        None,
    );
    // c_grey_alpha.png: grey 150, alpha 0 (alpha is dropped, not composited).
    write_png(
        &dir.join("c_grey_alpha.png"),
        (8, 8),
        C::GrayscaleAlpha,
        D::Eight,
        &[150, 0].repeat(64),
        None,
    );
    // d_rgba16.PNG (upper case): 16-bit RGBA, (0x1234, 0xABCD, 0xFF00, 0x8000) -> high bytes.
    let px16 = [0x12, 0x34, 0xAB, 0xCD, 0xFF, 0x00, 0x80, 0x00];
    write_png(
        &dir.join("d_rgba16.PNG"),
        (9, 7),
        C::Rgba,
        D::Sixteen,
        &px16.repeat(63),
        None,
    );
    // e_palette.png: 4-bit palette, all index 1 = (5, 6, 7), with a tRNS chunk.
    let plte = [255, 0, 0, 5, 6, 7];
    write_png(
        &dir.join("e_palette.png"),
        (6, 5),
        C::Indexed,
        D::Four,
        &[0x11; 15],
        Some((&plte, &[255, 128])),
    );
    // f_bits.png: 1-bit grey, all white.
    write_png(
        &dir.join("f_bits.png"),
        (16, 4),
        C::Grayscale,
        D::One,
        &[0xFF; 8],
        None,
    );
    // g_photo.jpg: RGB JPEG, solid (200, 100, 50), 70x90.
    write_jpeg(
        &dir.join("g_photo.jpg"),
        (70, 90),
        jpeg_encoder::ColorType::Rgb,
        &[200, 100, 50].repeat(70 * 90),
    );
    // h_grey.JPEG: greyscale JPEG, solid 60.
    write_jpeg(
        &dir.join("h_grey.JPEG"),
        (20, 20),
        jpeg_encoder::ColorType::Luma,
        &[60; 400],
    );
    // sub/deeper/z.png: a real image further down.
    std::fs::copy(data_dir().join("resize_tall.png"), sub.join("z.png")).unwrap();
    // Broken and non-image files.
    let good = std::fs::read(dir.join("a_rgb.png")).unwrap();
    std::fs::write(dir.join("broken.png"), &good[..good.len() / 2]).unwrap();
    std::fs::write(dir.join("sub/not_really.jpg"), b"this is text").unwrap();
    std::fs::write(dir.join("notes.txt"), b"not an image").unwrap();
    let mut paths: Vec<PathBuf> = [
        "a_rgb.png",
        "b_grey.png",
        "c_grey_alpha.png",
        "d_rgba16.PNG",
        "e_palette.png",
        "f_bits.png",
        "g_photo.jpg",
        "h_grey.JPEG",
        "sub/deeper/z.png",
    ]
    .iter()
    .map(|p| dir.join(p))
    .collect();
    paths.sort();
    paths
}

#[test]
fn image_folder_loads_every_colour_type() {
    let dir = tempdir("folder");
    let expected = make_folder(&dir);
    let mut warnings = Vec::new();
    let size = 16;
    let folder = ImageFolder::load(&dir, size, &mut |w| warnings.push(w)).unwrap();
    assert_eq!(folder.len(), expected.len());
    assert_eq!(folder.paths(), &expected[..]);
    assert_eq!(folder.size(), size);
    // Exactly the two broken files are reported, by name.
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.iter().any(|w| w.contains("broken.png")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("not_really.jpg")),
        "{warnings:?}"
    );

    let plane = size * size;
    let solid = |i: usize, rgb: [u8; 3], tol: u8| {
        let img = folder.image(i);
        for c in 0..3 {
            for &v in &img[c * plane..(c + 1) * plane] {
                assert!(
                    v.abs_diff(rgb[c]) <= tol,
                    "{:?} channel {c}: {v} vs {rgb:?}",
                    folder.paths()[i]
                );
            }
        }
    };
    solid(0, [10, 200, 30], 0);
    solid(1, [77, 77, 77], 0);
    solid(2, [150, 150, 150], 0);
    solid(3, [0x12, 0xAB, 0xFF], 0);
    solid(4, [5, 6, 7], 0);
    solid(5, [255, 255, 255], 0);
    solid(6, [200, 100, 50], 3);
    solid(7, [60, 60, 60], 2);
    // The deep image is the resize of its source.
    let src = read_image(&data_dir().join("resize_tall.png")).unwrap();
    assert_eq!(folder.image(8), &resize_center_crop(&src, size)[..]);

    // batch: u8 -> v / 255 in the range, in index order.
    let mut out = vec![0f32; 2 * 3 * plane];
    folder.batch(&[1, 0], Range::MinusOneToOne, &mut out);
    assert_eq!(out[0], 77.0 / 255.0 * 2.0 - 1.0);
    assert_eq!(out[3 * plane], 10.0 / 255.0 * 2.0 - 1.0);
    folder.batch(&[0, 0], Range::ZeroToOne, &mut out);
    assert_eq!(out[plane], 200.0 / 255.0);

    // Decoding in parallel gives the same bytes as one thread.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let single = pool
        .install(|| ImageFolder::load(&dir, size, &mut |_| {}))
        .unwrap();
    assert_eq!(single.pixels(), folder.pixels());

    // As a Dataset.
    let ds = Dataset::Folder(folder);
    assert_eq!(ds.len(), expected.len());
    assert_eq!(ds.size(), size);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_folder_errors_name_the_folder() {
    let dir = tempdir("errors");
    let missing = dir.join("does-not-exist");
    let e = ImageFolder::load(&missing, 64, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("does-not-exist"), "{e}");

    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    std::fs::write(empty.join("readme.txt"), b"hi").unwrap();
    std::fs::write(empty.join("sub/bad.png"), b"not a png").unwrap();
    let mut warnings = Vec::new();
    let e = ImageFolder::load(&empty, 64, &mut |w| warnings.push(w))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("empty") && e.contains("no decodable images"),
        "{e}"
    );
    assert_eq!(warnings.len(), 1);

    let file = dir.join("file.png");
    std::fs::write(&file, b"x").unwrap();
    let e = ImageFolder::load(&file, 64, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("file.png") && e.contains("not a folder"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Images from safetensors
// ---------------------------------------------------------------------------------------------

#[test]
fn safetensors_images_load_and_convert() {
    let dir = tempdir("st");
    let n = 2;
    let values: Vec<f32> = (0..n * 3 * 64 * 64)
        .map(|i| (i % 256) as f32 / 255.0)
        .collect();
    let path = dir.join("images.safetensors");
    let t = Tensor::from_vec(values.clone(), [n, 3, 64, 64]).unwrap();
    write_safetensors(&path, [("images", &t)], &BTreeMap::new()).unwrap();
    let (got, count) = load_images_safetensors(&path).unwrap();
    assert_eq!(count, n);
    assert_eq!(got, values);

    // f16 is converted.
    let half: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
    let t16 = Tensor::from_vec(half.clone(), [n, 3, 64, 64]).unwrap();
    let p16 = dir.join("f16.safetensors");
    write_safetensors(&p16, [("images", &t16)], &BTreeMap::new()).unwrap();
    let (got16, _) = load_images_safetensors(&p16).unwrap();
    assert!(got16.iter().zip(&half).all(|(a, b)| *a == b.to_f32()));

    // As a Dataset: values are used as stored (they are what the networks see).
    let ds = Dataset::Tensor {
        images: got,
        n,
        size: 64,
    };
    let mut out = vec![0f32; 3 * 64 * 64];
    ds.batch(&[1], Range::MinusOneToOne, &mut out);
    assert_eq!(out[..], values[3 * 64 * 64..]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn safetensors_image_errors_name_file_tensor_and_shapes() {
    let dir = tempdir("st-errors");
    let write = |name: &str, tensor_name: &str, t: &Tensor| {
        let p = dir.join(name);
        write_safetensors(&p, [(tensor_name, t)], &BTreeMap::new()).unwrap();
        p
    };
    let small = Tensor::from_vec(vec![0.5f32; 2 * 3 * 32 * 32], [2, 3, 32, 32]).unwrap();

    let p = write("other.safetensors", "pictures", &small);
    let e = load_images_safetensors(&p).unwrap_err().to_string();
    assert!(
        e.contains("other.safetensors") && e.contains("images"),
        "{e}"
    );

    let p = write("shape.safetensors", "images", &small);
    let e = load_images_safetensors(&p).unwrap_err().to_string();
    assert!(
        e.contains("shape.safetensors") && e.contains("`images`"),
        "{e}"
    );
    assert!(
        e.contains("[N, 3, 64, 64]") && e.contains("[2, 3, 32, 32]"),
        "{e}"
    );

    let ints = Tensor::from_vec(vec![0i64; 3 * 64 * 64], [1, 3, 64, 64]).unwrap();
    let p = write("ints.safetensors", "images", &ints);
    let e = load_images_safetensors(&p).unwrap_err().to_string();
    assert!(e.contains("ints.safetensors") && e.contains("i64"), "{e}");

    let nan = Tensor::from_vec(vec![f32::NAN; 3 * 64 * 64], [1, 3, 64, 64]).unwrap();
    let p = write("nan.safetensors", "images", &nan);
    let e = load_images_safetensors(&p).unwrap_err().to_string();
    assert!(
        e.contains("nan.safetensors") && e.contains("non-finite"),
        "{e}"
    );

    let e = load_images_safetensors(&dir.join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Shuffler
// ---------------------------------------------------------------------------------------------

#[test]
fn shuffler_is_deterministic_and_resumes_exactly() {
    let (n, seed, batch) = (103, 77, 8);
    let mut a = Shuffler::new(n, seed);
    let mut b = Shuffler::new(n, seed);
    let first: Vec<Vec<usize>> = (0..40).map(|_| a.next_batch(batch)).collect();
    let again: Vec<Vec<usize>> = (0..40).map(|_| b.next_batch(batch)).collect();
    assert_eq!(first, again);

    // Resume from a saved state at every point of the run.
    let mut reference = Shuffler::new(n, seed);
    for _ in 0..37 {
        let state = reference.state();
        let mut resumed = Shuffler::from_state(n, seed, state).unwrap();
        let mut cont = reference.clone();
        for _ in 0..30 {
            assert_eq!(resumed.next_batch(batch), cont.next_batch(batch));
        }
        assert_eq!(resumed.state(), cont.state());
        reference.next_batch(batch);
    }

    // Drop-last: 12 full batches per epoch, each epoch's indices distinct.
    let mut s = Shuffler::new(n, seed);
    assert_eq!(s.batches_per_epoch(batch), 12);
    for epoch in 0..3 {
        let mut seen = Vec::new();
        for _ in 0..12 {
            seen.extend(s.next_batch(batch));
            assert_eq!(s.epoch(), epoch);
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 96);
        assert!(seen.iter().all(|&i| i < n));
    }
    // A different seed gives a different order; a different batch size on resume still works.
    assert_ne!(Shuffler::new(n, seed + 1).next_batch(batch), first[0]);
    let mut r = Shuffler::from_state(n, seed, (0, 8)).unwrap();
    assert_eq!(r.next_batch(4), Shuffler::permutation(n, seed, 0)[8..12]);
}

#[test]
fn shuffler_rejects_bad_batches_and_states() {
    let mut s = Shuffler::new(5, 0);
    assert!(s.try_next_batch(6).is_err());
    assert!(s.try_next_batch(0).is_err());
    assert_eq!(s.try_next_batch(5).unwrap().len(), 5);
    assert!(Shuffler::from_state(5, 0, (3, 6)).is_err());
    assert!(Shuffler::new(0, 0).try_next_batch(1).is_err());
}

#[test]
fn synthetic_dataset_serves_the_indices() {
    let ds = Dataset::Synthetic {
        seed: 5,
        len: 1000,
        size: 16,
    };
    let per = 3 * 16 * 16;
    let mut out = vec![0f32; 2 * per];
    ds.batch(&[7, 3], Range::ZeroToOne, &mut out);
    let mut want = vec![0f32; per];
    synthetic_image(5, 7, 16, &mut want);
    assert_eq!(&out[..per], &want[..]);
    synthetic_image(5, 3, 16, &mut want);
    assert_eq!(&out[per..], &want[..]);
}
