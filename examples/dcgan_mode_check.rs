use kiln_models::dcgan::data::{synthetic_batch, Range};
use kiln_models::dcgan::image::write_grid_png;
use kiln_models::dcgan::quality::swd_images;
use kiln_models::dcgan::Generator;
use kiln_models::gpt2::Rng;
use kiln_nn::backend::{download_all, Backend, CpuBackend};
use kiln_nn::layers::Mode;
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let be = CpuBackend::default();
    let mut g = Generator::load(
        &be,
        &std::path::Path::new(&dir).join("generator.safetensors"),
        None,
    )
    .unwrap();
    let n = 512;
    let mut real = vec![0f32; n * 3 * 64 * 64];
    synthetic_batch(12345, 0, n, 64, Range::MinusOneToOne, &mut real);
    let mut rng = Rng::new(9);
    let noise: Vec<f32> = (0..n * 100).map(|_| rng.next_normal() as f32).collect();
    for mode in [Mode::Eval, Mode::Train] {
        let mut out = vec![0f32; n * 3 * 64 * 64];
        for c in 0..n / 64 {
            let z = be.upload(&noise[c * 6400..(c + 1) * 6400]).unwrap();
            let img = g.forward(&be, &z, 64, mode).unwrap();
            let v = download_all(&be, img).unwrap();
            out[c * 64 * 12288..(c + 1) * 64 * 12288].copy_from_slice(&v[..64 * 12288]);
        }
        let swd = swd_images(&real, &out, n, n, 64, Range::MinusOneToOne).unwrap();
        println!("{mode:?}: swd {swd:.4}");
        write_grid_png(
            format!("/tmp/mode_{mode:?}.png").as_ref(),
            &out[..64 * 12288],
            64,
            64,
            Range::MinusOneToOne,
            None,
        )
        .unwrap();
    }
}
