//! Point-wise activations, forward and backward: ReLU, LeakyReLU(slope), Tanh, Sigmoid.
//!
//! | activation | forward `y = f(x)` | backward `dx = dy · f'(x)`, from the saved output `y` |
//! |---|---|---|
//! | ReLU | `max(x, 0)` | `dy · [y > 0]` |
//! | LeakyReLU(a), a ≥ 0 | `x > 0 ? x : a·x` | `dy · (y > 0 ? 1 : a)` |
//! | Tanh | `tanh(x)` | `dy · (1 − y²)` |
//! | Sigmoid | `1 / (1 + e^{−x})` | `dy · y · (1 − y)` |
//!
//! Every backward works from the forward *output* (what a layer keeps anyway); for LeakyReLU that
//! needs a slope ≥ 0 so that `y > 0 ⇔ x > 0`.
//!
//! Paths: [`Isa::Scalar`] uses `std`'s `tanh`/`exp` and is the reference; [`Isa::Avx2`] and
//! [`Isa::Avx512`] compile the same branch-free loop (a Cephes-style polynomial `exp`) with those
//! instruction sets enabled, chosen at run time. They agree with the scalar path to a few ulp.
use kiln_tensor::{Error, Result};

/// A point-wise activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Relu,
    /// Negative slope (PyTorch's default is 0.01; DCGAN uses 0.2).
    LeakyRelu(f32),
    Tanh,
    Sigmoid,
}

/// An instruction-set path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The paths this machine can run, fastest last.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }
    /// The fastest available path.
    pub fn best() -> Isa {
        *Isa::available().last().expect("scalar is always available")
    }
}

fn check(act: Activation, lens: &[usize]) -> Result<()> {
    if lens.iter().any(|&l| l != lens[0]) {
        return Err(Error::invalid(format!(
            "{act:?}: operand lengths differ: {lens:?}"
        )));
    }
    if let Activation::LeakyRelu(a) = act {
        if a.is_nan() || a < 0.0 {
            return Err(Error::invalid(format!(
                "LeakyRelu: slope {a} must be ≥ 0 (the backward pass works from the output)"
            )));
        }
    }
    Ok(())
}

/// `y = f(x)` (`x` and `y` of equal length), on the fastest path.
pub fn forward(act: Activation, x: &[f32], y: &mut [f32]) -> Result<()> {
    forward_with(Isa::best(), act, x, y)
}

/// `y = f(y)` in place.
pub fn forward_inplace(act: Activation, y: &mut [f32]) -> Result<()> {
    check(act, &[y.len()])?;
    // Chunks keep the copy in L1.
    let mut tmp = [0f32; 256];
    for c in y.chunks_mut(256) {
        let t = &mut tmp[..c.len()];
        t.copy_from_slice(c);
        dispatch_forward(Isa::best(), act, t, c);
    }
    Ok(())
}

/// `dx = dy · f'` from the saved forward output `y`, on the fastest path.
pub fn backward(act: Activation, y: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    check(act, &[y.len(), dy.len(), dx.len()])?;
    match act {
        Activation::Relu => zip3(y, dy, dx, |y, g| if y > 0.0 { g } else { 0.0 }),
        Activation::LeakyRelu(a) => zip3(y, dy, dx, |y, g| if y > 0.0 { g } else { a * g }),
        Activation::Tanh => zip3(y, dy, dx, |y, g| g * (1.0 - y * y)),
        Activation::Sigmoid => zip3(y, dy, dx, |y, g| g * (y * (1.0 - y))),
    }
    Ok(())
}

#[inline(always)]
fn zip3(y: &[f32], dy: &[f32], dx: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
        *d = f(y, g);
    }
}

/// [`forward`] on a chosen path (tests force each one). An unavailable path is an error.
pub fn forward_with(isa: Isa, act: Activation, x: &[f32], y: &mut [f32]) -> Result<()> {
    check(act, &[x.len(), y.len()])?;
    if !Isa::available().contains(&isa) {
        return Err(Error::invalid(format!(
            "{isa:?} is not available on this CPU"
        )));
    }
    dispatch_forward(isa, act, x, y);
    Ok(())
}

fn dispatch_forward(isa: Isa, act: Activation, x: &[f32], y: &mut [f32]) {
    match (act, isa) {
        (Activation::Relu, _) => x.iter().zip(y).for_each(|(x, y)| *y = x.max(0.0)),
        (Activation::LeakyRelu(a), _) => x
            .iter()
            .zip(y)
            .for_each(|(&x, y)| *y = if x > 0.0 { x } else { a * x }),
        (Activation::Tanh, Isa::Scalar) => x.iter().zip(y).for_each(|(x, y)| *y = x.tanh()),
        (Activation::Sigmoid, Isa::Scalar) => x
            .iter()
            .zip(y)
            .for_each(|(x, y)| *y = 1.0 / (1.0 + (-x).exp())),
        #[cfg(target_arch = "x86_64")]
        (Activation::Tanh | Activation::Sigmoid, Isa::Avx2) => {
            // SAFETY: Isa::Avx2 is only dispatched after `available()` detected AVX2 and FMA.
            unsafe { simd_avx2(act == Activation::Tanh, x, y) }
        }
        #[cfg(target_arch = "x86_64")]
        (Activation::Tanh | Activation::Sigmoid, Isa::Avx512) => {
            // SAFETY: Isa::Avx512 is only dispatched after `available()` detected AVX-512F.
            unsafe { simd_avx512(act == Activation::Tanh, x, y) }
        }
        #[allow(unreachable_patterns)]
        (Activation::Tanh | Activation::Sigmoid, _) => portable(act == Activation::Tanh, x, y),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn simd_avx2(tanh: bool, x: &[f32], y: &mut [f32]) {
    portable(tanh, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn simd_avx512(tanh: bool, x: &[f32], y: &mut [f32]) {
    portable(tanh, x, y)
}

/// The branch-free loop the SIMD paths compile (it vectorises under any instruction set).
#[inline(always)]
fn portable(tanh: bool, x: &[f32], y: &mut [f32]) {
    if tanh {
        for (x, y) in x.iter().zip(y.iter_mut()) {
            *y = tanh_poly(*x);
        }
    } else {
        for (x, y) in x.iter().zip(y.iter_mut()) {
            *y = 1.0 / (1.0 + exp_poly(-*x));
        }
    }
}

/// `e^x` for f32 (Cephes `expf`): `x = n·ln2 + r`, `|r| ≤ ln2/2`, degree-6 polynomial in `r`,
/// times `2^n` built from exponent bits. Input clamped to `[−87.3, 88.7]`; relative error ≈ 2 ulp.
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r * r, r) + 1.0;
    // n ∈ [−126, 128]: split 2^n = 2^(n/2)·2^(n−n/2) so both factors are normal floats.
    let ni = n as i32;
    let h = ni >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - h + 127) as u32) << 23);
    p * s1 * s2
}

/// `tanh(x) = sign(x)·(1 − e)/(1 + e)` with `e = e^{−2|x|}`; an odd Taylor polynomial below
/// `|x| < 0.0625`, where `1 − e` would cancel.
#[inline(always)]
pub fn tanh_poly(x: f32) -> f32 {
    let a = x.abs();
    let e = exp_poly(-2.0 * a);
    let big = (1.0 - e) / (1.0 + e);
    let x2 = x * x;
    // x − x³/3 + 2x⁵/15 − 17x⁷/315
    let small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))));
    let t = if a < 0.0625 { small } else { big };
    t.copysign(x)
}
