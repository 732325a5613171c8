//! Writes a grid of real training images — the built-in synthetic set, or an image folder — to
//! see what a DCGAN run is shown: `cargo run --release --example dcgan_real_grid -- OUT.png
//! [synthetic|DIR] [SEED]`.
use kiln_models::dcgan::data::{synthetic_batch, ImageFolder, Range};
use kiln_models::dcgan::image::write_grid_png;

fn main() -> kiln_tensor::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).map(String::as_str).unwrap_or("real.png");
    let src = args.get(2).map(String::as_str).unwrap_or("synthetic");
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let n = 64;
    let mut images = vec![0f32; n * 3 * 64 * 64];
    if src == "synthetic" {
        synthetic_batch(seed, 0, n, 64, Range::ZeroToOne, &mut images);
    } else {
        let folder = ImageFolder::load(src.as_ref(), 64, &mut |m| eprintln!("warning: {m}"))?;
        let k = folder.len().min(n);
        let idx: Vec<usize> = (0..k).collect();
        images.truncate(k * 3 * 64 * 64);
        folder.batch(&idx, Range::ZeroToOne, &mut images);
    }
    let k = images.len() / (3 * 64 * 64);
    write_grid_png(out.as_ref(), &images, k, 64, Range::ZeroToOne, None)
}
