//! Sample quality: the sliced Wasserstein distance (SWD) between two image sets.
//!
//! For sets `A = {a_i}` (`na` points) and `B = {b_j}` (`nb` points) in `R^dim` and unit
//! directions `u_1 … u_P` drawn uniformly on the sphere from a seeded generator:
//!
//! ```text
//! SWD(A, B) = (1/P) Σ_p W1( {<u_p, a_i>}_i , {<u_p, b_j>}_j )
//! W1(X, Y)  = ∫_0^1 |F_X^{-1}(t) − F_Y^{-1}(t)| dt
//! ```
//!
//! where `F^{-1}` is the quantile function of the empirical distribution (a step function). With
//! sorted samples `x_(1) <= … <= x_(na)` and `y_(1) <= … <= y_(nb)` the integral is a finite sum
//! over the merged breakpoints `i/na` and `j/nb` — exact for any `na`, `nb`; for `na = nb` it is
//! `(1/n) Σ_i |x_(i) − y_(i)|`. W1 (not W2) keeps the result in the units of the values: a set
//! shifted by a vector `v` is at distance `(1/P) Σ_p |<u_p, v>|` from the original.
//!
//! Everything accumulates in f64; projections run in parallel, each into its own slot, and the
//! mean is summed in projection order, so the result does not depend on the thread count.
use super::data::{Range, SplitMix64, STREAM_SWD};
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// Projections used by [`swd_images`].
pub const SWD_PROJECTIONS: usize = 128;
/// Seed of the directions used by [`swd_images`].
pub const SWD_SEED: u64 = 0x5EED_5EED;
/// [`swd_images`] compares images downsampled to this side.
pub const SWD_RESOLUTION: usize = 16;

/// Average pooling by `factor` (area downsampling): `[n, c, h, w]` -> `[n, c, h/factor,
/// w/factor]`, each output the mean of its `factor x factor` block.
///
/// # Panics
/// If `images.len() != n * c * h * w`, `factor` is 0, or `h` or `w` is not a multiple of
/// `factor`.
pub fn downsample_area(
    images: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    factor: usize,
) -> Vec<f32> {
    assert_eq!(images.len(), n * c * h * w, "downsample_area: length");
    assert!(
        factor > 0 && h.is_multiple_of(factor) && w.is_multiple_of(factor),
        "downsample_area: {h}x{w} is not divisible by {factor}"
    );
    let (oh, ow) = (h / factor, w / factor);
    let mut out = vec![0f32; n * c * oh * ow];
    if out.is_empty() {
        return out;
    }
    let scale = 1.0 / (factor * factor) as f32;
    out.par_chunks_mut(oh * ow)
        .zip(images.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = 0f32;
                    for y in oy * factor..(oy + 1) * factor {
                        let row = &src[y * w + ox * factor..y * w + (ox + 1) * factor];
                        sum += row.iter().sum::<f32>();
                    }
                    dst[oy * ow + ox] = sum * scale;
                }
            }
        });
    out
}

/// `projections` unit vectors in `R^dim` (`[projections, dim]`, row-major): Gaussian samples
/// from [`SplitMix64::keyed`]`(seed, STREAM_SWD, p)`, normalised.
pub fn random_directions(dim: usize, projections: usize, seed: u64) -> Vec<f64> {
    let mut dirs = vec![0f64; dim * projections];
    for (p, u) in dirs.chunks_exact_mut(dim.max(1)).enumerate() {
        let mut rng = SplitMix64::keyed(seed, STREAM_SWD, p as u64);
        loop {
            u.iter_mut().for_each(|v| *v = rng.normal());
            let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 1e-12 {
                u.iter_mut().for_each(|v| *v /= norm);
                break;
            }
        }
    }
    dirs
}

/// The exact 1-D Wasserstein-1 distance between the empirical distributions of two sorted,
/// non-empty samples: the integral of `|F_a^{-1}(t) − F_b^{-1}(t)|` over the merged breakpoints
/// `i/na`, `j/nb` (kept as integers `i·nb`, `j·na`, so ties are exact).
pub fn wasserstein1_sorted(a: &[f64], b: &[f64]) -> f64 {
    let (na, nb) = (a.len() as u128, b.len() as u128);
    assert!(na > 0 && nb > 0, "wasserstein1_sorted: empty sample");
    let (mut i, mut j) = (0usize, 0usize);
    let mut level = 0u128; // current quantile level, in units of 1 / (na·nb)
    let mut sum = 0f64;
    while i < a.len() && j < b.len() {
        let end_a = (i as u128 + 1) * nb;
        let end_b = (j as u128 + 1) * na;
        let end = end_a.min(end_b);
        sum += (end - level) as f64 * (a[i] - b[j]).abs();
        level = end;
        if end_a == end {
            i += 1;
        }
        if end_b == end {
            j += 1;
        }
    }
    sum / (na * nb) as f64
}

fn check_set(name: &str, x: &[f32], dim: usize) -> Result<usize> {
    if x.is_empty() || !x.len().is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "sliced Wasserstein: set {name} has {} values, not a positive multiple of dim {dim}",
            x.len()
        )));
    }
    if let Some(v) = x.iter().find(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "sliced Wasserstein: set {name} holds a non-finite value ({v})"
        )));
    }
    Ok(x.len() / dim)
}

/// The sliced Wasserstein-1 distance between point sets `a` (`[na, dim]`) and `b`
/// (`[nb, dim]`): the mean over `projections` random unit directions (from `seed`) of the exact
/// 1-D W1 between the projected sets (see the module docs). Symmetric, 0 for identical sets,
/// in the units of the values.
///
/// Errors for `dim == 0`, `projections == 0`, an empty set, a length that is not a multiple of
/// `dim`, or a non-finite value.
pub fn sliced_wasserstein(
    a: &[f32],
    b: &[f32],
    dim: usize,
    projections: usize,
    seed: u64,
) -> Result<f64> {
    if dim == 0 || projections == 0 {
        return Err(Error::invalid(format!(
            "sliced Wasserstein: dim ({dim}) and projections ({projections}) must be positive"
        )));
    }
    check_set("a", a, dim)?;
    check_set("b", b, dim)?;
    let dirs = random_directions(dim, projections, seed);
    let project = |x: &[f32], u: &[f64]| -> Vec<f64> {
        let mut p: Vec<f64> = x
            .chunks_exact(dim)
            .map(|row| row.iter().zip(u).map(|(&v, &d)| v as f64 * d).sum())
            .collect();
        p.sort_unstable_by(f64::total_cmp);
        p
    };
    let per_projection: Vec<f64> = dirs
        .par_chunks_exact(dim)
        .map(|u| wasserstein1_sorted(&project(a, u), &project(b, u)))
        .collect();
    Ok(per_projection.iter().sum::<f64>() / projections as f64)
}

/// The SWD between a real and a generated image set as kiln reports it: both
/// (`[n_real, 3, size, size]` and `[n_fake, 3, size, size]`, values in `range`) are mapped to
/// [0, 1], area-downsampled to [`SWD_RESOLUTION`]² (64 -> 16: 4x4 blocks), and compared with
/// [`sliced_wasserstein`] over the 768 values of each image, [`SWD_PROJECTIONS`] directions,
/// seed [`SWD_SEED`].
///
/// `size` must be a positive multiple of [`SWD_RESOLUTION`].
pub fn swd_images(
    real: &[f32],
    fake: &[f32],
    n_real: usize,
    n_fake: usize,
    size: usize,
    range: Range,
) -> Result<f64> {
    if size == 0 || !size.is_multiple_of(SWD_RESOLUTION) {
        return Err(Error::invalid(format!(
            "SWD: image size {size} is not a positive multiple of {SWD_RESOLUTION}"
        )));
    }
    let per = 3 * size * size;
    if n_real == 0 || n_fake == 0 {
        return Err(Error::invalid("SWD: both image sets must be non-empty"));
    }
    if real.len() != n_real * per {
        return Err(Error::shape(
            "SWD real images",
            &[n_real, 3, size, size],
            &[real.len()],
        ));
    }
    if fake.len() != n_fake * per {
        return Err(Error::shape(
            "SWD fake images",
            &[n_fake, 3, size, size],
            &[fake.len()],
        ));
    }
    let factor = size / SWD_RESOLUTION;
    let prepare = |x: &[f32], n: usize| {
        let unit: Vec<f32> = x.par_iter().map(|&v| range.to_unit(v)).collect();
        downsample_area(&unit, n, 3, size, size, factor)
    };
    let dim = 3 * SWD_RESOLUTION * SWD_RESOLUTION;
    sliced_wasserstein(
        &prepare(real, n_real),
        &prepare(fake, n_fake),
        dim,
        SWD_PROJECTIONS,
        SWD_SEED,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_set(n: usize, dim: usize, mean: f32, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n * dim).map(|_| mean + rng.normal() as f32).collect()
    }

    #[test]
    fn downsample_averages_blocks() {
        // One 1-channel 4x4 image, factor 2.
        let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let out = downsample_area(&img, 1, 1, 4, 4, 2);
        assert_eq!(out, vec![2.5, 4.5, 10.5, 12.5]);
        assert_eq!(downsample_area(&img, 1, 1, 4, 4, 1), img);
        assert_eq!(downsample_area(&img, 1, 1, 4, 4, 4), vec![7.5]);
    }

    #[test]
    fn w1_sorted_exact_cases() {
        assert_eq!(wasserstein1_sorted(&[0.0, 1.0], &[0.0, 1.0]), 0.0);
        assert_eq!(wasserstein1_sorted(&[0.0, 1.0], &[2.0, 3.0]), 2.0);
        // {0, 1} vs {0.5}: half the mass moves 0.5 each way.
        assert_eq!(wasserstein1_sorted(&[0.0, 1.0], &[0.5]), 0.5);
        // {0, 1, 2} vs {0, 2}: levels 0..1/3 -> 0, 1/3..1/2 -> |1-0|, 1/2..2/3 -> |1-2|,
        // 2/3..1 -> 0: total 1/6 + 1/6 = 1/3.
        let w = wasserstein1_sorted(&[0.0, 1.0, 2.0], &[0.0, 2.0]);
        assert!((w - 1.0 / 3.0).abs() < 1e-15, "{w}");
        // Symmetric.
        assert_eq!(w, wasserstein1_sorted(&[0.0, 2.0], &[0.0, 1.0, 2.0]));
    }

    #[test]
    fn directions_are_unit_and_seeded() {
        let d = random_directions(5, 4, 1);
        for u in d.chunks(5) {
            let n: f64 = u.iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-12);
        }
        assert_eq!(d, random_directions(5, 4, 1));
        assert_ne!(d, random_directions(5, 4, 2));
    }

    #[test]
    fn identical_sets_are_at_zero() {
        let a = gaussian_set(50, 8, 0.0, 1);
        assert_eq!(sliced_wasserstein(&a, &a, 8, 32, 5).unwrap(), 0.0);
    }

    #[test]
    fn a_shift_gives_the_projected_shift() {
        let dim = 6;
        let a = gaussian_set(40, dim, 0.0, 2);
        let shift: Vec<f32> = (0..dim).map(|d| 0.25 * d as f32 - 0.5).collect();
        let b: Vec<f32> = a
            .chunks(dim)
            .flat_map(|row| row.iter().zip(&shift).map(|(v, s)| v + s))
            .collect();
        let (p, seed) = (64, 9);
        let dirs = random_directions(dim, p, seed);
        let expected = dirs
            .chunks(dim)
            .map(|u| {
                u.iter()
                    .zip(&shift)
                    .map(|(a, &b)| a * b as f64)
                    .sum::<f64>()
                    .abs()
            })
            .sum::<f64>()
            / p as f64;
        let got = sliced_wasserstein(&a, &b, dim, p, seed).unwrap();
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // In one dimension every direction is ±1: the distance is the shift itself.
        let x: Vec<f32> = (0..30).map(|v| v as f32 * 0.1).collect();
        let y: Vec<f32> = x.iter().map(|v| v + 0.75).collect();
        let d = sliced_wasserstein(&x, &y, 1, 3, 0).unwrap();
        assert!((d - 0.75).abs() < 1e-6, "{d}");
    }

    #[test]
    fn symmetric_and_decreasing_with_closer_sets() {
        let dim = 10;
        let a = gaussian_set(200, dim, 0.0, 3);
        let mut last = f64::INFINITY;
        for mean in [2.0f32, 1.0, 0.5, 0.25] {
            let b = gaussian_set(150, dim, mean, 4);
            let ab = sliced_wasserstein(&a, &b, dim, 64, 1).unwrap();
            let ba = sliced_wasserstein(&b, &a, dim, 64, 1).unwrap();
            assert_eq!(ab, ba);
            assert!(ab < last, "{ab} !< {last}");
            last = ab;
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = vec![0f32; 12];
        assert!(sliced_wasserstein(&a, &a, 0, 4, 0).is_err());
        assert!(sliced_wasserstein(&a, &a, 5, 4, 0).is_err());
        assert!(sliced_wasserstein(&a, &a, 4, 0, 0).is_err());
        assert!(sliced_wasserstein(&[], &a, 4, 4, 0).is_err());
        assert!(sliced_wasserstein(&[f32::NAN; 4], &a, 4, 4, 0).is_err());
        assert!(swd_images(&a, &a, 1, 1, 2, Range::ZeroToOne).is_err());
    }

    #[test]
    fn swd_images_ignores_the_range_convention() {
        let size = 16;
        let per = 3 * size * size;
        let mut rng = SplitMix64::new(1);
        let unit_a: Vec<f32> = (0..3 * per).map(|_| rng.next_f32()).collect();
        let unit_b: Vec<f32> = (0..2 * per).map(|_| rng.next_f32()).collect();
        let pm = |x: &[f32]| x.iter().map(|&v| v * 2.0 - 1.0).collect::<Vec<_>>();
        let d01 = swd_images(&unit_a, &unit_b, 3, 2, size, Range::ZeroToOne).unwrap();
        let d11 = swd_images(&pm(&unit_a), &pm(&unit_b), 3, 2, size, Range::MinusOneToOne).unwrap();
        assert!((d01 - d11).abs() < 1e-6 * d01.max(1.0), "{d01} {d11}");
        assert!(d01 > 0.0);
    }
}
