//! Image I/O for DCGAN: PNG and JPEG decoding to RGB8, torchvision's `Resize(size)` +
//! `CenterCrop(size)`, and sample grids written as PNG.
//!
//! Layouts: decoded images are interleaved `[height, width, 3]` u8 ([`RgbImage`]); model-side
//! images are planar `[3, size, size]` (one image) or `[n, 3, size, size]` (a batch).
use super::data::Range;
use kiln_tensor::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Padding in pixels between the tiles of a grid and around it (torchvision's `make_grid`).
pub const GRID_PADDING: usize = 2;

/// The most pixels a decoded image may have (a guard against decompression bombs).
pub const MAX_PIXELS: usize = 1 << 28;

/// A decoded image: interleaved RGB8, `data` is `[height, width, 3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes a PNG or JPEG file held in `bytes` (the format is told by its signature, not by the
/// file name) to RGB8. Grey, grey + alpha, RGBA, 16-bit and palette images are converted the way
/// PIL's `Image.convert("RGB")` does: grey is replicated, 16-bit keeps its high byte, alpha is
/// dropped (not composited), a palette is expanded. Errors name `path`.
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<RgbImage> {
    let bad = |reason: String| Error::invalid(format!("{}: {reason}", path.display()));
    // Decoders are third-party code fed untrusted bytes: a panic inside one is turned into an
    // error for that file, never a crash of the caller.
    let decoded = std::panic::catch_unwind(|| {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            decode_png(bytes)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            decode_jpeg(bytes)
        } else {
            Err("not a PNG or JPEG file".to_string())
        }
    });
    match decoded {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(reason)) => Err(bad(reason)),
        Err(_) => Err(bad("the decoder failed on this file".into())),
    }
}

/// Reads and decodes a PNG or JPEG file (see [`decode_image`]).
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(path, &bytes)
}

fn check_dims(width: usize, height: usize) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("image has no pixels ({width}x{height})"));
    }
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(format!(
            "image too large ({width}x{height}; at most {MAX_PIXELS} pixels)"
        ));
    }
    Ok(())
}

fn decode_png(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits {
            bytes: MAX_PIXELS * 4,
        },
    );
    // Palette -> RGB(A), tRNS -> alpha, sub-byte grey -> 8 bit, 16 bit -> 8 bit (high byte).
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| format!("PNG: {e}"))?;
    let (width, height) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    check_dims(width, height)?;
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| "PNG: image too large".to_string())?;
    let mut buf = vec![0u8; len];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("PNG: {e}"))?;
    if frame.bit_depth != png::BitDepth::Eight {
        return Err(format!("PNG: unexpected bit depth {:?}", frame.bit_depth));
    }
    let samples = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("PNG: palette was not expanded".into()),
    };
    let stride = frame.line_size;
    if stride < width * samples || buf.len() < stride * (height - 1) + width * samples {
        return Err("PNG: short image data".into());
    }
    let mut data = Vec::with_capacity(width * height * 3);
    for row in buf.chunks(stride).take(height) {
        for px in row[..width * samples].chunks_exact(samples) {
            match samples {
                1 | 2 => data.extend_from_slice(&[px[0], px[0], px[0]]),
                _ => data.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    use zune_jpeg::zune_core::{
        bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions,
    };
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(1 << 16)
        .set_max_height(1 << 16);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder
        .decode_headers()
        .map_err(|e| format!("JPEG: {e:?}"))?;
    let info = decoder
        .info()
        .ok_or_else(|| "JPEG: no image header".to_string())?;
    let (width, height) = (info.width as usize, info.height as usize);
    check_dims(width, height)?;
    let pixels = decoder.decode().map_err(|e| format!("JPEG: {e:?}"))?;
    let data = if pixels.len() == width * height * 3 {
        pixels
    } else if pixels.len() == width * height {
        pixels.iter().flat_map(|&v| [v, v, v]).collect()
    } else {
        return Err(format!(
            "JPEG: decoder returned {} bytes for {width}x{height}",
            pixels.len()
        ));
    };
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// The size torchvision's `Resize(size)` gives an image of `width x height`: the shorter side
/// becomes `size`, the longer one `int(size * long / short)` (truncated, as Python's `int`).
pub fn resized_dims(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Filter taps of one output sample: the first input index and the normalised weights.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// The taps of PIL's bilinear resampling with antialiasing (what torchvision's `Resize` uses for
/// PIL images and, with `antialias=True`, for tensors): a triangle filter whose support is
/// widened by the scale factor when downsampling, so each output pixel averages the area it
/// covers. Output samples `first..first + count` of a resize from `in_size` to `out_size`.
fn taps(in_size: usize, out_size: usize, first: usize, count: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the triangle's support is 1 at scale 1
    (first..first + count)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // PIL truncates toward zero before clamping; for these values that is floor.
            let lo = ((center - support + 0.5).floor().max(0.0) as usize).min(in_size - 1);
            let hi = ((center + support + 0.5).floor() as usize).clamp(lo + 1, in_size);
            let mut weights: Vec<f64> = (lo..hi)
                .map(|j| {
                    let x = (j as f64 - center + 0.5) / filter_scale;
                    (1.0 - x.abs()).max(0.0)
                })
                .collect();
            let sum: f64 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            } else {
                // Cannot happen for a valid resize; fall back to the nearest sample.
                weights.iter_mut().for_each(|w| *w = 0.0);
                weights[0] = 1.0;
            }
            Taps {
                start: lo,
                weights: weights.into_iter().map(|w| w as f32).collect(),
            }
        })
        .collect()
}

/// torchvision's `CenterCrop` offset: `int(round((full - crop) / 2))` with Python's
/// round-half-to-even.
fn crop_offset(full: usize, crop: usize) -> usize {
    ((full - crop) as f64 / 2.0).round_ties_even() as usize
}

/// torchvision's `Resize(size)` then `CenterCrop(size)` (bilinear with antialiasing, i.e. area
/// averaging when shrinking): `img` (interleaved) -> planar u8 `[3, size, size]`.
///
/// Only the output pixels inside the crop are computed. Intermediate values stay in f32 (PIL
/// rounds to u8 between its horizontal and vertical passes, so results may differ from PIL by
/// one level).
pub fn resize_center_crop(img: &RgbImage, size: usize) -> Vec<u8> {
    assert!(size > 0, "resize_center_crop: size must be positive");
    let (rw, rh) = resized_dims(img.width, img.height, size);
    let (left, top) = (crop_offset(rw, size), crop_offset(rh, size));
    let tx = taps(img.width, rw, left, size);
    let ty = taps(img.height, rh, top, size);
    // Rows of the input the vertical taps reach.
    let row_lo = ty.first().map_or(0, |t| t.start);
    let row_hi = ty
        .iter()
        .map(|t| t.start + t.weights.len())
        .max()
        .unwrap_or(0);
    // Horizontal pass: tmp[r - row_lo][x][c], rows row_lo..row_hi, x over the crop.
    let mut tmp = vec![0f32; (row_hi - row_lo) * size * 3];
    for (r, out_row) in (row_lo..row_hi).zip(tmp.chunks_exact_mut(size * 3)) {
        let in_row = &img.data[r * img.width * 3..(r + 1) * img.width * 3];
        for (x, t) in tx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &w) in t.weights.iter().enumerate() {
                let p = &in_row[(t.start + k) * 3..(t.start + k) * 3 + 3];
                for c in 0..3 {
                    acc[c] += w * p[c] as f32;
                }
            }
            out_row[x * 3..x * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass into planar output.
    let mut out = vec![0u8; 3 * size * size];
    for (y, t) in ty.iter().enumerate() {
        for x in 0..size {
            let mut acc = [0f32; 3];
            for (k, &w) in t.weights.iter().enumerate() {
                let base = ((t.start + k - row_lo) * size + x) * 3;
                for c in 0..3 {
                    acc[c] += w * tmp[base + c];
                }
            }
            for c in 0..3 {
                out[c * size * size + y * size + x] = acc[c].round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// A value in [0, 1] as a byte: `round(v * 255)` after clamping; NaN becomes 0.
pub fn unit_to_u8(v: f32) -> u8 {
    if v >= 1.0 {
        255
    } else if v > 0.0 {
        (v * 255.0).round() as u8
    } else {
        0 // also NaN
    }
}

/// Encodes interleaved RGB8 `[height, width, 3]` as PNG into `w`.
pub fn encode_png_rgb8(
    w: &mut impl Write,
    width: usize,
    height: usize,
    rgb: &[u8],
) -> std::io::Result<()> {
    let (w32, h32) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(a), Ok(b)) if a > 0 && b > 0 && rgb.len() == width * height * 3 => (a, b),
        _ => {
            return Err(std::io::Error::other(format!(
                "cannot encode a {width}x{height} PNG from {} bytes",
                rgb.len()
            )))
        }
    };
    let mut encoder = png::Encoder::new(w, w32, h32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(rgb)
        .map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)
}

/// Writes interleaved RGB8 `[height, width, 3]` to `path` as a PNG, atomically.
pub fn write_png_rgb8(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    kiln_io::write_atomic(path, |w| encode_png_rgb8(w, width, height, rgb))
}

/// The layout of a grid of `n` tiles: `(cols, rows, width, height)` in pixels. `cols` defaults
/// to `ceil(sqrt(n))` and is capped at `n`.
pub fn grid_dims(n: usize, size: usize, cols: Option<usize>) -> (usize, usize, usize, usize) {
    let cols = cols
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as usize)
        .clamp(1, n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let step = size + GRID_PADDING;
    (
        cols,
        rows,
        cols * step + GRID_PADDING,
        rows * step + GRID_PADDING,
    )
}

/// Renders `images` (`[n, 3, size, size]`, values in `range`) as an interleaved RGB8 grid
/// (see [`write_grid_png`]); returns `(rgb, width, height)`.
pub fn render_grid(
    images: &[f32],
    n: usize,
    size: usize,
    range: Range,
    cols: Option<usize>,
) -> Result<(Vec<u8>, usize, usize)> {
    if n == 0 || size == 0 {
        return Err(Error::invalid(format!(
            "image grid: need at least one image of positive size (got n = {n}, size = {size})"
        )));
    }
    if cols == Some(0) {
        return Err(Error::invalid("image grid: cols must be positive"));
    }
    let plane = size * size;
    if images.len() != n * 3 * plane {
        return Err(Error::shape(
            "image grid",
            &[n, 3, size, size],
            &[images.len()],
        ));
    }
    let (cols, _rows, width, height) = grid_dims(n, size, cols);
    let mut rgb = vec![0u8; width * height * 3];
    for (k, img) in images.chunks_exact(3 * plane).enumerate() {
        let x0 = GRID_PADDING + (k % cols) * (size + GRID_PADDING);
        let y0 = GRID_PADDING + (k / cols) * (size + GRID_PADDING);
        for y in 0..size {
            for x in 0..size {
                let o = ((y0 + y) * width + x0 + x) * 3;
                for c in 0..3 {
                    rgb[o + c] = unit_to_u8(range.to_unit(img[c * plane + y * size + x]));
                }
            }
        }
    }
    Ok((rgb, width, height))
}

/// Writes `images` (`[n, 3, size, size]`, values in `range`) as an 8-bit RGB PNG grid:
/// `cols` tiles per row (default `ceil(sqrt(n))`), [`GRID_PADDING`] black pixels between tiles
/// and around the grid (torchvision's `make_grid`), each value mapped to [0, 1], clamped and
/// stored as `round(v * 255)`. The file is written atomically.
pub fn write_grid_png(
    path: &Path,
    images: &[f32],
    n: usize,
    size: usize,
    range: Range,
    cols: Option<usize>,
) -> Result<()> {
    let (rgb, width, height) = render_grid(images, n, size, range, cols)?;
    write_png_rgb8(path, width, height, &rgb)
}

/// Reads a PNG as interleaved RGB8: `(data [height, width, 3], width, height)`.
pub fn read_png_rgb(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err(Error::invalid(format!(
            "{}: not a PNG file",
            path.display()
        )));
    }
    let img = decode_image(path, &bytes)?;
    Ok((img.data, img.width, img.height))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(width: usize, height: usize, rgb: [u8; 3]) -> RgbImage {
        RgbImage {
            width,
            height,
            data: rgb.repeat(width * height),
        }
    }

    #[test]
    fn resized_dims_follow_torchvision() {
        assert_eq!(resized_dims(100, 50, 64), (128, 64));
        assert_eq!(resized_dims(50, 100, 64), (64, 128));
        assert_eq!(resized_dims(64, 64, 64), (64, 64));
        // int(64 * 333 / 100) = int(213.12) = 213
        assert_eq!(resized_dims(333, 100, 64), (213, 64));
        assert_eq!(resized_dims(3, 2, 64), (96, 64));
    }

    #[test]
    fn crop_offset_rounds_half_to_even() {
        assert_eq!(crop_offset(65, 64), 0); // round(0.5) = 0
        assert_eq!(crop_offset(67, 64), 2); // round(1.5) = 2
        assert_eq!(crop_offset(69, 64), 2); // round(2.5) = 2
        assert_eq!(crop_offset(128, 64), 32);
    }

    #[test]
    fn resize_keeps_a_constant_image_constant() {
        for (w, h) in [(64, 64), (200, 100), (7, 13), (1, 1), (640, 480)] {
            let out = resize_center_crop(&solid(w, h, [10, 128, 250]), 16);
            assert_eq!(out.len(), 3 * 256);
            assert!(out[..256].iter().all(|&v| v == 10), "{w}x{h}");
            assert!(out[256..512].iter().all(|&v| v == 128), "{w}x{h}");
            assert!(out[512..].iter().all(|&v| v == 250), "{w}x{h}");
        }
    }

    #[test]
    fn halving_averages_2x2_blocks() {
        // A 4x4 image with distinct 2x2 blocks, resized to 2x2: the triangle filter at scale 2
        // has taps (1/4, 3/4, 3/4, 1/4)/2 over four pixels; on blocks of equal values each
        // output is its block's value blended with its neighbours' by 1/8.
        let mut img = solid(4, 4, [0, 0, 0]);
        for y in 0..4 {
            for x in 0..4 {
                let v = if x < 2 { 0 } else { 200 };
                img.data[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3].copy_from_slice(&[v, v, v]);
            }
        }
        let out = resize_center_crop(&img, 2);
        // Left column: taps over x = 0..3 (clamped at 0): weights (3/4, 3/4, 1/4)/(7/4).
        let left = (200.0f32 * 0.25 / 1.75).round() as u8;
        assert_eq!(&out[..4], &[left, 200 - left, left, 200 - left]);
    }

    #[test]
    fn center_crop_takes_the_middle() {
        // 6 wide, 2 high, size 2: no resize of the short side, width 6 -> crop offset 2.
        let mut img = solid(6, 2, [0, 0, 0]);
        for y in 0..2 {
            for x in 0..6 {
                let v = (x * 40) as u8;
                img.data[(y * 6 + x) * 3..(y * 6 + x) * 3 + 3].copy_from_slice(&[v, v, v]);
            }
        }
        let out = resize_center_crop(&img, 2);
        assert_eq!(&out[..4], &[80, 120, 80, 120]);
    }

    #[test]
    fn unit_to_u8_rounds_and_clamps() {
        assert_eq!(unit_to_u8(0.0), 0);
        assert_eq!(unit_to_u8(1.0), 255);
        assert_eq!(unit_to_u8(-3.0), 0);
        assert_eq!(unit_to_u8(7.0), 255);
        assert_eq!(unit_to_u8(f32::NAN), 0);
        assert_eq!(unit_to_u8(0.5), 128); // 127.5 rounds up
        assert_eq!(unit_to_u8(1.0 / 255.0), 1);
    }

    #[test]
    fn grid_dims_default_to_a_square() {
        assert_eq!(grid_dims(64, 64, None), (8, 8, 8 * 66 + 2, 8 * 66 + 2));
        assert_eq!(grid_dims(5, 10, None), (3, 2, 3 * 12 + 2, 2 * 12 + 2));
        assert_eq!(grid_dims(1, 4, None), (1, 1, 8, 8));
        assert_eq!(grid_dims(3, 4, Some(10)), (3, 1, 20, 8));
    }

    #[test]
    fn grid_places_tiles_and_maps_the_range() {
        // Two 2x2 images in [-1, 1]: the first all -1 (black), the second all +1 (white).
        let mut images = vec![-1.0f32; 12];
        images.extend(vec![1.0f32; 12]);
        let (rgb, w, h) = render_grid(&images, 2, 2, Range::MinusOneToOne, None).unwrap();
        assert_eq!((w, h), (2 * 4 + 2, 6));
        let px = |x: usize, y: usize| &rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(px(2, 2), &[0, 0, 0]);
        assert_eq!(px(6, 2), &[255, 255, 255]);
        assert_eq!(px(7, 3), &[255, 255, 255]);
        assert_eq!(px(0, 0), &[0, 0, 0]); // padding
        assert!(render_grid(&images, 3, 2, Range::ZeroToOne, None).is_err());
        assert!(render_grid(&images, 2, 2, Range::ZeroToOne, Some(0)).is_err());
        assert!(render_grid(&[], 0, 2, Range::ZeroToOne, None).is_err());
    }

    #[test]
    fn decode_rejects_garbage() {
        let p = Path::new("x.png");
        assert!(decode_image(p, b"hello").is_err());
        assert!(decode_image(p, b"\x89PNG\r\n\x1a\nxxxx").is_err());
        assert!(decode_image(p, &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]).is_err());
        let msg = decode_image(p, b"").unwrap_err().to_string();
        assert!(msg.contains("x.png"), "{msg}");
    }
}
