//! DCGAN data sets: a procedural "shapes" set, image folders, images from safetensors, and a
//! deterministic, resumable epoch shuffler.
//!
//! All images are planar RGB: one image is `[3, size, size]`, a batch `[n, 3, size, size]`,
//! values in the generator's [`Range`].
use super::image::{read_image, resize_center_crop};
use kiln_tensor::{DType, Error, Result};
use rayon::prelude::*;
use std::f32::consts::{PI, TAU};
use std::path::{Path, PathBuf};

/// The value range of images: the generator's output range, to which real data is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Range {
    /// [-1, 1], for a generator that ends in `tanh` (`dcgan`).
    MinusOneToOne,
    /// [0, 1], for a generator that ends in a sigmoid (`seed`).
    ZeroToOne,
}

impl Range {
    /// Maps `v` in [0, 1] to this range.
    #[inline]
    pub fn from_unit(self, v: f32) -> f32 {
        match self {
            Range::MinusOneToOne => v * 2.0 - 1.0,
            Range::ZeroToOne => v,
        }
    }

    /// Maps `v` in this range to [0, 1].
    #[inline]
    pub fn to_unit(self, v: f32) -> f32 {
        match self {
            Range::MinusOneToOne => (v + 1.0) * 0.5,
            Range::ZeroToOne => v,
        }
    }

    /// `(low, high)` of the range.
    pub fn bounds(self) -> (f32, f32) {
        match self {
            Range::MinusOneToOne => (-1.0, 1.0),
            Range::ZeroToOne => (0.0, 1.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Counter-based random numbers
// ---------------------------------------------------------------------------------------------

/// Streams of [`SplitMix64::keyed`], so that different users of one seed never share numbers.
pub const STREAM_SYNTHETIC: u64 = 1;
/// The stream of the epoch shuffler.
pub const STREAM_SHUFFLE: u64 = 2;
/// The stream of the SWD projection directions.
pub const STREAM_SWD: u64 = 3;

/// The splitmix64 finaliser: a bijective 64-bit mix.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: a small, fast generator whose state can be derived from a key in O(1), so the
/// numbers of image `i` or epoch `e` need no numbers before them.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator for item `index` of `stream` under `seed`.
    pub fn keyed(seed: u64, stream: u64, index: u64) -> Self {
        let k = mix64(seed ^ mix64(stream.wrapping_mul(Self::GAMMA) ^ mix64(index)));
        SplitMix64 { state: k }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        mix64(self.state)
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1) with 24 random bits.
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Uniform integer in [0, n), unbiased (Lemire's multiply with rejection). `n > 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = self.next_u64() as u128 * n as u128;
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// A standard normal sample (Box–Muller, one of the pair).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

// ---------------------------------------------------------------------------------------------
// The synthetic shapes set
// ---------------------------------------------------------------------------------------------

/// HSV (all in [0, 1], hue wrapping) to RGB.
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = (h - h.floor()) * 6.0;
    let sector = (h as usize).min(5);
    let f = h - sector as f32;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match sector {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// One shape of a synthetic image, in pixel units.
enum Shape {
    Circle {
        cx: f32,
        cy: f32,
        r: f32,
    },
    /// A rectangle of half extents `(hx, hy)` rotated by `angle` around its centre.
    Rect {
        cx: f32,
        cy: f32,
        hx: f32,
        hy: f32,
        cos: f32,
        sin: f32,
    },
    /// A triangle as three edge lines `n·p <= c` (unit normals pointing out).
    Triangle {
        edges: [(f32, f32, f32); 3],
    },
}

impl Shape {
    /// Signed distance from pixel position `(x, y)` to the shape's edge: negative inside.
    /// (For the triangle, the largest edge-line distance: exact inside and along the edges,
    /// which is all the anti-aliasing needs.)
    fn distance(&self, x: f32, y: f32) -> f32 {
        match *self {
            Shape::Circle { cx, cy, r } => ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() - r,
            Shape::Rect {
                cx,
                cy,
                hx,
                hy,
                cos,
                sin,
            } => {
                let (dx, dy) = (x - cx, y - cy);
                let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
                let (qx, qy) = (u.abs() - hx, v.abs() - hy);
                let outside = (qx.max(0.0).powi(2) + qy.max(0.0).powi(2)).sqrt();
                outside + qx.max(qy).min(0.0)
            }
            Shape::Triangle { edges } => edges
                .iter()
                .map(|&(nx, ny, c)| nx * x + ny * y - c)
                .fold(f32::NEG_INFINITY, f32::max),
        }
    }
}

/// Draws the parameters of shape `kind` (0 circle, 1 rectangle/square, 2 triangle) for an image
/// of `size` pixels.
fn random_shape(rng: &mut SplitMix64, kind: u64, s: f32) -> Shape {
    let cx = rng.uniform(0.22, 0.78) * s;
    let cy = rng.uniform(0.22, 0.78) * s;
    let r = rng.uniform(0.11, 0.26) * s;
    match kind {
        0 => Shape::Circle { cx, cy, r },
        1 => {
            let hx = r * rng.uniform(0.65, 1.0);
            // Half of the rectangles are squares.
            let hy = if rng.next_u64() & 1 == 0 {
                hx
            } else {
                r * rng.uniform(0.45, 1.0)
            };
            let angle = rng.uniform(0.0, PI / 2.0);
            Shape::Rect {
                cx,
                cy,
                hx,
                hy,
                cos: angle.cos(),
                sin: angle.sin(),
            }
        }
        _ => {
            let rot = rng.uniform(0.0, TAU);
            let corner = |k: f32, rng: &mut SplitMix64| {
                let a = rot + k * TAU / 3.0 + rng.uniform(-0.3, 0.3);
                (cx + r * 1.25 * a.cos(), cy + r * 1.25 * a.sin())
            };
            let v = [corner(0.0, rng), corner(1.0, rng), corner(2.0, rng)];
            // Corners go counter-clockwise in angle; with y pointing down that is clockwise on
            // screen, but the outward normal of edge (a -> b) is (dy, -dx) either way once the
            // orientation is fixed by the sign of the area.
            let area =
                (v[1].0 - v[0].0) * (v[2].1 - v[0].1) - (v[2].0 - v[0].0) * (v[1].1 - v[0].1);
            let sign = if area >= 0.0 { 1.0 } else { -1.0 };
            let edge = |a: (f32, f32), b: (f32, f32)| {
                let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                let len = (dx * dx + dy * dy).sqrt().max(1e-6);
                let (nx, ny) = (sign * dy / len, -sign * dx / len);
                (nx, ny, nx * a.0 + ny * a.1)
            };
            Shape::Triangle {
                edges: [edge(v[0], v[1]), edge(v[1], v[2]), edge(v[2], v[0])],
            }
        }
    }
}

/// Image `index` of the synthetic shapes set under `seed`: planar `[3, size, size]` in [0, 1],
/// written to `out`.
///
/// A muted two-colour linear gradient background (random direction) with 1–3 saturated, bright
/// shapes on top — filled circles, rectangles or squares (rotated), triangles — of random
/// position, size and colour, drawn in order with anti-aliased edges (coverage from the signed
/// distance of each pixel centre, one pixel wide). Deterministic in `(seed, index)`; any index
/// costs the same (counter-based splitmix64 numbers).
///
/// # Panics
/// If `out.len() != 3 * size * size`.
pub fn synthetic_image(seed: u64, index: u64, size: usize, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        3 * size * size,
        "synthetic_image: out must hold [3, {size}, {size}]"
    );
    let mut rng = SplitMix64::keyed(seed, STREAM_SYNTHETIC, index);
    let s = size as f32;

    // Background: two related muted colours and a gradient direction.
    let hue = rng.next_f32();
    let sat = rng.uniform(0.1, 0.45);
    let val = rng.uniform(0.15, 0.5);
    let bg0 = hsv(hue, sat, val);
    let bg1 = hsv(
        hue + rng.uniform(-0.1, 0.1),
        sat,
        (val + rng.uniform(-0.2, 0.2)).clamp(0.05, 0.6),
    );
    let angle = rng.uniform(0.0, TAU);
    let (gx, gy) = (angle.cos() / s.max(1.0), angle.sin() / s.max(1.0));

    // Shapes.
    let count = 1 + rng.below(3);
    let shapes: Vec<(Shape, [f32; 3])> = (0..count)
        .map(|_| {
            let kind = rng.below(3);
            let shape = random_shape(&mut rng, kind, s);
            let colour = hsv(
                rng.next_f32(),
                rng.uniform(0.55, 1.0),
                rng.uniform(0.7, 1.0),
            );
            (shape, colour)
        })
        .collect();

    let plane = size * size;
    for y in 0..size {
        for x in 0..size {
            // Pixel centre.
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let t = (0.5 + (px - 0.5 * s) * gx + (py - 0.5 * s) * gy).clamp(0.0, 1.0);
            let mut c = [0f32; 3];
            for k in 0..3 {
                c[k] = bg0[k] + (bg1[k] - bg0[k]) * t;
            }
            for (shape, colour) in &shapes {
                // Coverage of a one-pixel-wide edge: 1 inside, 0 outside, linear across it.
                let cover = (0.5 - shape.distance(px, py)).clamp(0.0, 1.0);
                if cover > 0.0 {
                    for k in 0..3 {
                        c[k] += (colour[k] - c[k]) * cover;
                    }
                }
            }
            for k in 0..3 {
                out[k * plane + y * size + x] = c[k].clamp(0.0, 1.0);
            }
        }
    }
}

/// Images `first_index..first_index + count` of the synthetic set into `out`
/// (`[count, 3, size, size]`, values in `range`). Parallel over images; every image is a pure
/// function of `(seed, index)`, so the result is bitwise the same for any thread count.
///
/// # Panics
/// If `out.len() != count * 3 * size * size`.
pub fn synthetic_batch(
    seed: u64,
    first_index: u64,
    count: usize,
    size: usize,
    range: Range,
    out: &mut [f32],
) {
    let per = 3 * size * size;
    assert_eq!(
        out.len(),
        count * per,
        "synthetic_batch: out must hold [{count}, 3, {size}, {size}]"
    );
    if per == 0 {
        return;
    }
    out.par_chunks_mut(per).enumerate().for_each(|(i, img)| {
        synthetic_image(seed, first_index + i as u64, size, img);
        if range != Range::ZeroToOne {
            img.iter_mut().for_each(|v| *v = range.from_unit(*v));
        }
    });
}

/// The synthetic images with the given indices (e.g. from a [`Shuffler`]) into `out`
/// (`[indices.len(), 3, size, size]`, values in `range`).
pub fn synthetic_gather(seed: u64, indices: &[usize], size: usize, range: Range, out: &mut [f32]) {
    let per = 3 * size * size;
    assert_eq!(
        out.len(),
        indices.len() * per,
        "synthetic_gather: out must hold [{}, 3, {size}, {size}]",
        indices.len()
    );
    if per == 0 {
        return;
    }
    out.par_chunks_mut(per)
        .zip(indices.par_iter())
        .for_each(|(img, &index)| {
            synthetic_image(seed, index as u64, size, img);
            if range != Range::ZeroToOne {
                img.iter_mut().for_each(|v| *v = range.from_unit(*v));
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Image folders
// ---------------------------------------------------------------------------------------------

/// The file extensions [`ImageFolder::load`] reads (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Every image file under `dir`, recursively. Folders that cannot be read are reported through
/// `warn` and skipped; symbolic links to folders are not followed (no cycles).
fn list_images(dir: &Path, out: &mut Vec<PathBuf>, warn: &mut dyn FnMut(String)) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            warn(format!("{}: skipped folder: {e}", dir.display()));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                warn(format!("{}: skipped an entry: {e}", dir.display()));
                continue;
            }
        };
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            list_images(&path, out, warn);
        } else if has_image_extension(&path)
            && (kind.is_file() || std::fs::metadata(&path).is_ok_and(|m| m.is_file()))
        {
            out.push(path);
        }
    }
}

/// A folder of images, decoded, resized and centre-cropped once, held as u8
/// `[n, 3, size, size]`.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    size: usize,
    pixels: Vec<u8>,
    paths: Vec<PathBuf>,
}

impl ImageFolder {
    /// Reads every `.png`, `.jpg` and `.jpeg` file (any case) under `dir` and its subfolders, in
    /// sorted path order, and prepares each as torchvision's
    /// `Compose([Resize(size), CenterCrop(size)])` does on a PIL image converted to RGB (see
    /// [`super::image::resize_center_crop`]). Decoding runs in parallel.
    ///
    /// A file that cannot be read or decoded is skipped and `warn` gets a message naming it.
    /// A missing folder, or one without a single decodable image, is an error naming the folder.
    pub fn load(dir: &Path, size: usize, warn: &mut dyn FnMut(String)) -> Result<ImageFolder> {
        if size == 0 {
            return Err(Error::invalid("image folder: size must be positive"));
        }
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::invalid(format!("{}: not a folder", dir.display())));
        }
        let mut paths = Vec::new();
        list_images(dir, &mut paths, warn);
        paths.sort();
        let decoded: Vec<Result<Vec<u8>>> = paths
            .par_iter()
            .map(|p| read_image(p).map(|img| resize_center_crop(&img, size)))
            .collect();
        let mut kept = Vec::with_capacity(paths.len());
        let mut pixels = Vec::with_capacity(paths.len() * 3 * size * size);
        for (path, result) in paths.into_iter().zip(decoded) {
            match result {
                Ok(img) => {
                    pixels.extend_from_slice(&img);
                    kept.push(path);
                }
                Err(e) => warn(format!("skipped image: {e}")),
            }
        }
        if kept.is_empty() {
            return Err(Error::invalid(format!(
                "{}: no decodable images (.png, .jpg, .jpeg) in this folder or its subfolders",
                dir.display()
            )));
        }
        Ok(ImageFolder {
            size,
            pixels,
            paths: kept,
        })
    }

    /// A set from u8 pixels `[n, 3, size, size]` (e.g. made in memory).
    pub fn from_pixels(size: usize, pixels: Vec<u8>) -> Result<ImageFolder> {
        let per = 3 * size * size;
        if per == 0 || pixels.is_empty() || !pixels.len().is_multiple_of(per) {
            return Err(Error::invalid(format!(
                "image set: {} bytes are not a whole number of [3, {size}, {size}] images",
                pixels.len()
            )));
        }
        Ok(ImageFolder {
            size,
            paths: Vec::new(),
            pixels,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / (3 * self.size * self.size)
    }

    /// Never true for a loaded folder (loading an empty folder is an error).
    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Side of the square images.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The files the images came from, in image order (empty for [`ImageFolder::from_pixels`]).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// All pixels, `[n, 3, size, size]`.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Image `i` as u8 `[3, size, size]`.
    pub fn image(&self, i: usize) -> &[u8] {
        let per = 3 * self.size * self.size;
        &self.pixels[i * per..(i + 1) * per]
    }

    /// The images `indices` into `out` (`[indices.len(), 3, size, size]`), each byte `v` as
    /// `range.from_unit(v / 255)`.
    ///
    /// # Panics
    /// If `out` has the wrong length or an index is out of bounds.
    pub fn batch(&self, indices: &[usize], range: Range, out: &mut [f32]) {
        let per = 3 * self.size * self.size;
        assert_eq!(
            out.len(),
            indices.len() * per,
            "ImageFolder::batch: out must hold [{}, 3, {s}, {s}]",
            indices.len(),
            s = self.size
        );
        let n = self.len();
        out.par_chunks_mut(per)
            .zip(indices.par_iter())
            .for_each(|(dst, &i)| {
                assert!(
                    i < n,
                    "ImageFolder::batch: index {i} out of range ({n} images)"
                );
                for (d, &v) in dst.iter_mut().zip(self.image(i)) {
                    *d = range.from_unit(v as f32 / 255.0);
                }
            });
    }
}

// ---------------------------------------------------------------------------------------------
// Images in a safetensors file
// ---------------------------------------------------------------------------------------------

/// The tensor [`load_images_safetensors`] reads.
pub const IMAGES_TENSOR: &str = "images";

/// Loads tensor `images`, `[N, 3, 64, 64]`, f32 or f16/bf16 (converted to f32). The values are
/// used as stored — already in the range the networks see (PyTorch's DCGAN example normalises
/// to [-1, 1]) — so a PyTorch run can be reproduced batch for batch. Returns `(values, N)`.
pub fn load_images_safetensors(path: &Path) -> Result<(Vec<f32>, usize)> {
    load_images_safetensors_sized(path, 64)
}

/// [`load_images_safetensors`] for `[N, 3, size, size]`.
///
/// Errors name the file and the tensor: a missing tensor, a shape other than
/// `[N, 3, size, size]` with `N >= 1`, a non-float dtype, or non-finite values.
pub fn load_images_safetensors_sized(path: &Path, size: usize) -> Result<(Vec<f32>, usize)> {
    let file = kiln_io::SafeTensors::open(path)?;
    let info = file.info(IMAGES_TENSOR)?;
    let context = format!("{}: tensor `{IMAGES_TENSOR}`", path.display());
    let dims = &info.shape;
    if dims.len() != 4 || dims[1..] != [3, size, size] || dims[0] == 0 {
        return Err(Error::invalid(format!(
            "{context}: expected shape [N, 3, {size}, {size}] with N >= 1, found {dims:?}"
        )));
    }
    if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::DTypeMismatch {
            context,
            expected: "f32, f16 or bf16".into(),
            found: info.dtype.to_string(),
        });
    }
    let n = dims[0];
    let values = file.tensor(IMAGES_TENSOR)?.to_f32_vec()?;
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "{context}: holds a non-finite value ({v})"
        )));
    }
    Ok((values, n))
}

// ---------------------------------------------------------------------------------------------
// A data set of any source
// ---------------------------------------------------------------------------------------------

/// A training set: the synthetic shapes, an image folder, or images from safetensors.
#[derive(Debug, Clone)]
pub enum Dataset {
    /// Images `0..len` of the synthetic set under `seed`.
    Synthetic { seed: u64, len: usize, size: usize },
    /// A decoded image folder.
    Folder(ImageFolder),
    /// Images `[n, 3, size, size]` as the networks see them (from [`load_images_safetensors`]):
    /// used as stored, whatever the `range` asked for.
    Tensor {
        images: Vec<f32>,
        n: usize,
        size: usize,
    },
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            Dataset::Synthetic { len, .. } => *len,
            Dataset::Folder(f) => f.len(),
            Dataset::Tensor { n, .. } => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Side of the square images.
    pub fn size(&self) -> usize {
        match self {
            Dataset::Synthetic { size, .. } | Dataset::Tensor { size, .. } => *size,
            Dataset::Folder(f) => f.size(),
        }
    }

    /// The images `indices` into `out` (`[indices.len(), 3, size, size]`, values in `range`).
    ///
    /// # Panics
    /// If `out` has the wrong length or an index is out of bounds.
    pub fn batch(&self, indices: &[usize], range: Range, out: &mut [f32]) {
        let n = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            panic!("Dataset::batch: index {bad} out of range ({n} images)");
        }
        match self {
            Dataset::Synthetic { seed, size, .. } => {
                synthetic_gather(*seed, indices, *size, range, out)
            }
            Dataset::Folder(f) => f.batch(indices, range, out),
            Dataset::Tensor { images, size, .. } => {
                let per = 3 * size * size;
                assert_eq!(out.len(), indices.len() * per, "Dataset::batch: out length");
                out.par_chunks_mut(per)
                    .zip(indices.par_iter())
                    .for_each(|(dst, &i)| {
                        dst.copy_from_slice(&images[i * per..(i + 1) * per]);
                    });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The epoch shuffler
// ---------------------------------------------------------------------------------------------

/// A deterministic, resumable sampler of batches: each epoch is a Fisher–Yates permutation of
/// `0..n` drawn from `(seed, epoch)`, served in consecutive batches; when fewer than `batch`
/// indices remain, they are dropped and the next epoch starts (PyTorch's `DataLoader` with
/// `shuffle=True, drop_last=True`).
///
/// The whole state is `(epoch, position)` — `position` indices of `epoch` are used — so
/// `Shuffler::from_state(n, seed, s.state())` continues exactly where `s` is.
#[derive(Debug, Clone)]
pub struct Shuffler {
    n: usize,
    seed: u64,
    epoch: u64,
    position: u64,
    perm: Vec<usize>,
}

impl Shuffler {
    /// A shuffler at the start of epoch 0.
    pub fn new(n: usize, seed: u64) -> Shuffler {
        Shuffler {
            n,
            seed,
            epoch: 0,
            position: 0,
            perm: Self::permutation(n, seed, 0),
        }
    }

    /// A shuffler at `state = (epoch, position)`, as [`Shuffler::state`] returned it.
    /// Errors if `position > n`.
    pub fn from_state(n: usize, seed: u64, state: (u64, u64)) -> Result<Shuffler> {
        let (epoch, position) = state;
        if position > n as u64 {
            return Err(Error::invalid(format!(
                "shuffler state: position {position} is past the end of an epoch of {n} images"
            )));
        }
        Ok(Shuffler {
            n,
            seed,
            epoch,
            position,
            perm: Self::permutation(n, seed, epoch),
        })
    }

    /// The permutation of `0..n` for `epoch` under `seed` (Fisher–Yates from the top, with
    /// [`SplitMix64::keyed`]`(seed, STREAM_SHUFFLE, epoch)`).
    pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix64::keyed(seed, STREAM_SHUFFLE, epoch);
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        perm
    }

    /// `(epoch, position)`: the full state.
    pub fn state(&self) -> (u64, u64) {
        (self.epoch, self.position)
    }

    /// The epoch of the batch served last (0 before the first). The epoch changes lazily: after
    /// the last full batch of an epoch, `epoch()` still names it until the next call.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Full batches per epoch (`n / batch`, rounded down).
    pub fn batches_per_epoch(&self, batch: usize) -> usize {
        self.n.checked_div(batch).unwrap_or(0)
    }

    /// The next `batch` indices; errors if `batch` is 0 or larger than the data set.
    pub fn try_next_batch(&mut self, batch: usize) -> Result<Vec<usize>> {
        if batch == 0 || batch > self.n {
            return Err(Error::invalid(format!(
                "batch size {batch} does not fit a data set of {} images (need 1..={})",
                self.n, self.n
            )));
        }
        if self.position + batch as u64 > self.n as u64 {
            self.epoch += 1;
            self.position = 0;
            self.perm = Self::permutation(self.n, self.seed, self.epoch);
        }
        let start = self.position as usize;
        self.position += batch as u64;
        Ok(self.perm[start..start + batch].to_vec())
    }

    /// The next `batch` indices (drop-last semantics, see the type's docs).
    ///
    /// # Panics
    /// If `batch` is 0 or larger than the data set; check with [`Shuffler::try_next_batch`]
    /// where that is user input.
    pub fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        match self.try_next_batch(batch) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_round_trips() {
        for r in [Range::MinusOneToOne, Range::ZeroToOne] {
            for v in [0.0f32, 0.25, 0.5, 1.0] {
                assert_eq!(r.to_unit(r.from_unit(v)), v);
            }
        }
        assert_eq!(Range::MinusOneToOne.from_unit(0.0), -1.0);
        assert_eq!(Range::MinusOneToOne.from_unit(1.0), 1.0);
    }

    #[test]
    fn below_is_in_range_and_uniformish() {
        let mut rng = SplitMix64::new(7);
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[rng.below(6) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn normal_has_unit_moments() {
        let mut rng = SplitMix64::new(3);
        let xs: Vec<f64> = (0..100_000).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    #[test]
    fn synthetic_images_are_deterministic_and_distinct() {
        let size = 32;
        let mut a = vec![0f32; 3 * size * size];
        let mut b = a.clone();
        synthetic_image(1, 5, size, &mut a);
        synthetic_image(1, 5, size, &mut b);
        assert_eq!(a, b);
        synthetic_image(1, 6, size, &mut b);
        assert_ne!(a, b);
        synthetic_image(2, 5, size, &mut b);
        assert_ne!(a, b);
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn synthetic_images_have_shapes_and_soft_edges() {
        // Over many images: a good share of pixels differ clearly from the background, and some
        // pixels are partial (anti-aliased) mixes.
        let size = 64;
        let mut img = vec![0f32; 3 * size * size];
        let mut partial = 0usize;
        for i in 0..50 {
            synthetic_image(11, i, size, &mut img);
            let mut ch_max = 0f32;
            for p in 0..size * size {
                let (r, g, b) = (img[p], img[size * size + p], img[2 * size * size + p]);
                ch_max = ch_max.max(r.max(g).max(b));
            }
            // A bright shape is always present (value >= 0.7 at full coverage).
            assert!(ch_max >= 0.69, "image {i}: max {ch_max}");
            let row = &img[..size * size];
            partial += row
                .windows(2)
                .filter(|w| (w[0] - w[1]).abs() > 0.02 && (w[0] - w[1]).abs() < 0.3)
                .count();
        }
        assert!(partial > 100, "{partial}");
    }

    #[test]
    fn shuffler_permutations_are_permutations() {
        for n in [1usize, 2, 7, 33, 100] {
            let mut p = Shuffler::permutation(n, 9, 3);
            p.sort();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(
            Shuffler::permutation(50, 1, 0),
            Shuffler::permutation(50, 1, 1)
        );
        assert_ne!(
            Shuffler::permutation(50, 1, 0),
            Shuffler::permutation(50, 2, 0)
        );
    }

    #[test]
    fn shuffler_drops_the_last_partial_batch() {
        let mut s = Shuffler::new(10, 4);
        let e0 = Shuffler::permutation(10, 4, 0);
        let e1 = Shuffler::permutation(10, 4, 1);
        assert_eq!(s.next_batch(4), e0[0..4]);
        assert_eq!(s.next_batch(4), e0[4..8]);
        assert_eq!(s.state(), (0, 8));
        assert_eq!(s.next_batch(4), e1[0..4]);
        assert_eq!(s.state(), (1, 4));
        assert!(s.try_next_batch(11).is_err());
        assert!(s.try_next_batch(0).is_err());
        assert!(Shuffler::from_state(10, 4, (0, 11)).is_err());
    }
}
