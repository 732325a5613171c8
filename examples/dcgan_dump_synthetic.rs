//! Writes `N` images of the built-in synthetic set as tensor `images` `[N, 3, 64, 64]` in
//! [-1, 1] (the `dcgan` generator's range) to a safetensors file, for training a peer on the
//! same data: `cargo run --release --example dcgan_dump_synthetic -- OUT.safetensors N [SEED]`.
use kiln_models::dcgan::data::{synthetic_batch, Range};
use kiln_tensor::Tensor;

fn main() -> kiln_tensor::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("synthetic.safetensors");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut images = vec![0f32; n * 3 * 64 * 64];
    synthetic_batch(seed, 0, n, 64, Range::MinusOneToOne, &mut images);
    let t = Tensor::from_vec(images, vec![n, 3, 64, 64])?;
    kiln_io::write_safetensors(out, [("images", &t)], &Default::default())
}
