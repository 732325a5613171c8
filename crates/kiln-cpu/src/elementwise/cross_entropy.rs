//! Cross-entropy over a vocabulary fused with its softmax, forward and backward in one sweep.
//!
//! For each row `x` (`vocab` logits) with target `t`:
//!
//! ```text
//! m       = max_j x_j
//! s       = Σ_j e^(x_j − m)                      (f32, fixed order)
//! loss    = log s − (x_t − m)                    (= logsumexp(x) − x_t)
//! dx_j    = (e^(x_j − m) / s − [j = t]) · dscale (written over x: no probability tensor)
//! ```
//!
//! Three passes over the row (max; exponentials written in place and summed; scale and the
//! one-hot subtraction), all vectorised; a 50257-wide row (200 KB) stays in L2 between them.
//! Rows run in parallel on the current rayon pool, each row entirely on one task, and the sum
//! of a row has a fixed order (per-lane partial sums, then a fixed tree): results are bitwise
//! identical for any thread count.
//!
//! Numerics: a row holding `+∞` or NaN gives NaN (as PyTorch does); `−∞` logits have
//! probability 0 (and a loss of `+∞` when the target is one of them).
use crate::attention::vector::{best_isa, isa_ok, Vf32};
use crate::elementwise::activations::Isa;
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// Rows per parallel task: about 64 K logits, at least one row.
fn rows_per_task(vocab: usize) -> usize {
    (65536 / vocab.max(1)).max(1)
}

fn validate(
    logits: usize,
    rows: usize,
    vocab: usize,
    targets: &[u32],
    losses: usize,
) -> Result<()> {
    if vocab == 0 {
        return Err(Error::invalid("cross_entropy: vocab must be positive"));
    }
    match rows.checked_mul(vocab) {
        Some(n) if n == logits => {}
        _ => {
            return Err(Error::shape(
                "cross_entropy: logits",
                &[rows, vocab],
                &[logits],
            ))
        }
    }
    if targets.len() != rows {
        return Err(Error::shape(
            "cross_entropy: targets",
            &[rows],
            &[targets.len()],
        ));
    }
    if losses != rows {
        return Err(Error::shape("cross_entropy: losses", &[rows], &[losses]));
    }
    if let Some((r, &t)) = targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t as usize >= vocab)
    {
        return Err(Error::invalid(format!(
            "cross_entropy: target {t} of row {r} is out of range for a vocabulary of {vocab}"
        )));
    }
    Ok(())
}

fn usable(isa: Isa) -> Result<Isa> {
    if isa_ok(isa) {
        Ok(isa)
    } else {
        Err(Error::invalid(format!(
            "cross_entropy: kernel {isa:?} is not supported by this CPU"
        )))
    }
}

/// Loss and gradient in one sweep. `logits` `[rows, vocab]` row-major is overwritten by
/// `dlogits = (softmax(logits) − onehot(targets)) · dscale`; `losses[r] = logsumexp(logits_r) −
/// logits_r[targets[r]]` (`[rows]`). For a mean loss over `N` targets pass `dscale = 1/N`.
/// A target `≥ vocab` is an error and nothing is written.
pub fn cross_entropy_forward_backward(
    logits: &mut [f32],
    rows: usize,
    vocab: usize,
    targets: &[u32],
    dscale: f32,
    losses: &mut [f32],
) -> Result<()> {
    cross_entropy_forward_backward_with(best_isa(), logits, rows, vocab, targets, dscale, losses)
}

/// [`cross_entropy_forward_backward`] on a chosen path (tests force each one).
pub fn cross_entropy_forward_backward_with(
    isa: Isa,
    logits: &mut [f32],
    rows: usize,
    vocab: usize,
    targets: &[u32],
    dscale: f32,
    losses: &mut [f32],
) -> Result<()> {
    validate(logits.len(), rows, vocab, targets, losses.len())?;
    let isa = usable(isa)?;
    let per = rows_per_task(vocab);
    logits
        .par_chunks_mut(per * vocab)
        .zip(losses.par_chunks_mut(per).zip(targets.par_chunks(per)))
        .for_each(|(xc, (lc, tc))| {
            for ((x, loss), &t) in xc.chunks_mut(vocab).zip(lc.iter_mut()).zip(tc) {
                *loss = row(isa, x, t as usize, Some(dscale));
            }
        });
    Ok(())
}

/// Loss only (validation): `losses[r] = logsumexp(logits_r) − logits_r[targets[r]]`;
/// `logits` `[rows, vocab]` is left as it is.
pub fn cross_entropy_forward(
    logits: &[f32],
    rows: usize,
    vocab: usize,
    targets: &[u32],
    losses: &mut [f32],
) -> Result<()> {
    cross_entropy_forward_with(best_isa(), logits, rows, vocab, targets, losses)
}

/// [`cross_entropy_forward`] on a chosen path (tests force each one).
pub fn cross_entropy_forward_with(
    isa: Isa,
    logits: &[f32],
    rows: usize,
    vocab: usize,
    targets: &[u32],
    losses: &mut [f32],
) -> Result<()> {
    validate(logits.len(), rows, vocab, targets, losses.len())?;
    let isa = usable(isa)?;
    let per = rows_per_task(vocab);
    logits
        .par_chunks(per * vocab)
        .zip(losses.par_chunks_mut(per).zip(targets.par_chunks(per)))
        .for_each(|(xc, (lc, tc))| {
            for ((x, loss), &t) in xc.chunks(vocab).zip(lc.iter_mut()).zip(tc) {
                *loss = row_loss(isa, x, t);
            }
        });
    Ok(())
}

/// One row, loss and (with `dscale`) the gradient in place. Returns the loss.
fn row(isa: Isa, x: &mut [f32], t: usize, dscale: Option<f32>) -> f32 {
    let xt = x[t];
    let m = row_max(isa, x);
    let n = x.len();
    // Pass 2: e_j = e^(x_j − m) written over x, summed.
    let p = x.as_mut_ptr();
    // SAFETY: `p` covers `n` floats of the exclusively borrowed row; source and destination
    // are the same element each time (in place).
    let s = unsafe { exp_sum(isa, p, n, m, p) };
    let loss = s.ln() - (xt - m);
    if let Some(ds) = dscale {
        // Pass 3: dx_j = e_j·(dscale/s), then the target's (e_t/s − 1)·dscale.
        let e_t = x[t];
        let f = ds / s;
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` passed `isa_ok`: the CPU has AVX2+FMA.
            Isa::Avx2 => unsafe { x86::scale_avx2(x, f) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` passed `isa_ok`: the CPU has AVX-512F, AVX2 and FMA.
            Isa::Avx512 => unsafe { x86::scale_avx512(x, f) },
            _ => x.iter_mut().for_each(|v| *v *= f),
        }
        x[t] = (e_t / s - 1.0) * ds;
    }
    loss
}

/// Loss of a read-only row: the same arithmetic as [`row`] (bitwise the same loss), without
/// storing the exponentials.
fn row_loss(isa: Isa, x: &[f32], t: u32) -> f32 {
    let m = row_max(isa, x);
    // SAFETY: `x` covers `x.len()` floats; a null destination means nothing is written.
    let s = unsafe { exp_sum(isa, x.as_ptr(), x.len(), m, std::ptr::null_mut()) };
    s.ln() - (x[t as usize] - m)
}

/// `Σ_j e^(src_j − m)` over `n` floats, also stored at `dst` unless it is null.
///
/// Safety: `src` is readable and (if not null) `dst` writable for `n` floats, nothing else
/// accesses them meanwhile (`dst == src` is allowed); `isa` passed [`isa_ok`].
unsafe fn exp_sum(isa: Isa, src: *const f32, n: usize, m: f32, dst: *mut f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::exp_sum_avx2(src, n, m, dst),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::exp_sum_avx512(src, n, m, dst),
        _ => {
            // The reference: `std`'s `exp`, summed left to right.
            let mut s = 0f32;
            for j in 0..n {
                let e = (*src.add(j) - m).exp();
                if !dst.is_null() {
                    *dst.add(j) = e;
                }
                s += e;
            }
            s
        }
    }
}

fn row_max(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` passed `isa_ok`: the CPU has AVX2+FMA.
        Isa::Avx2 => unsafe { x86::max_avx2(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` passed `isa_ok`: AVX-512F, AVX2 and FMA.
        Isa::Avx512 => unsafe { x86::max_avx512(x) },
        // NaN is skipped here; it reaches the sum (e^(NaN − m) = NaN) and so the loss.
        _ => x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)),
    }
}

/// Generic vector passes, instantiated per instruction set below.
mod generic {
    use super::Vf32;

    /// Maximum of `x` (a NaN may be skipped: it reaches the sum). Safety: the CPU runs `V`.
    #[inline(always)]
    pub(super) unsafe fn max<V: Vf32>(x: &[f32]) -> f32 {
        let n = x.len();
        let w = V::LANES;
        let p = x.as_ptr();
        let mut acc = [V::splat(f32::NEG_INFINITY); 4];
        let mut i = 0;
        while i + 4 * w <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = V::max(*a, V::load(p.add(i + u * w)));
            }
            i += 4 * w;
        }
        while i + w <= n {
            acc[0] = V::max(acc[0], V::load(p.add(i)));
            i += w;
        }
        let m = V::max(V::max(acc[0], acc[1]), V::max(acc[2], acc[3])).hmax();
        x[i..].iter().fold(m, |a, &v| a.max(v))
    }

    /// `Σ_j e^(src_j − m)`, stored at `dst` with `STORE`: four vector accumulators combined
    /// `(a0 + a1) + (a2 + a3)`, the lanes in a fixed tree, then the tail (one −∞-padded
    /// vector) in order.
    ///
    /// Safety: the CPU runs `V`; `src` readable, `dst` (with `STORE`) writable for `n` floats.
    #[inline(always)]
    pub(super) unsafe fn exp_sum<V: Vf32, const STORE: bool>(
        src: *const f32,
        n: usize,
        m: f32,
        dst: *mut f32,
    ) -> f32 {
        let w = V::LANES;
        let store = STORE;
        let mv = V::splat(m);
        let mut acc = [V::zero(); 4];
        let mut i = 0;
        while i + 4 * w <= n {
            for (u, a) in acc.iter_mut().enumerate() {
                let e = V::exp(V::sub(V::load(src.add(i + u * w)), mv));
                if store {
                    e.store(dst.add(i + u * w));
                }
                *a = V::add(*a, e);
            }
            i += 4 * w;
        }
        while i + w <= n {
            let e = V::exp(V::sub(V::load(src.add(i)), mv));
            if store {
                e.store(dst.add(i));
            }
            acc[0] = V::add(acc[0], e);
            i += w;
        }
        let mut s = V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3])).hsum();
        if i < n {
            let mut buf = [f32::NEG_INFINITY; 16];
            for (k, b) in buf[..n - i].iter_mut().enumerate() {
                *b = *src.add(i + k);
            }
            V::exp(V::sub(V::load(buf.as_ptr()), mv)).store(buf.as_mut_ptr());
            for (k, &e) in buf[..n - i].iter().enumerate() {
                if store {
                    *dst.add(i + k) = e;
                }
                s += e;
            }
        }
        s
    }

    /// `x_j *= f`. Safety: the CPU runs `V`.
    #[inline(always)]
    pub(super) unsafe fn scale<V: Vf32>(x: &mut [f32], f: f32) {
        let n = x.len();
        let w = V::LANES;
        let p = x.as_mut_ptr();
        let fv = V::splat(f);
        let mut i = 0;
        while i + w <= n {
            V::mul(V::load(p.add(i)), fv).store(p.add(i));
            i += w;
        }
        for v in &mut x[i..] {
            *v *= f;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::generic;
    use crate::attention::vector::x86::{F32x16, F32x8};

    // Each entry enables one instruction set and inlines the generic pass.
    // Safety (all): the CPU has the enabled features.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max_avx2(x: &[f32]) -> f32 {
        generic::max::<F32x8>(x)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn max_avx512(x: &[f32]) -> f32 {
        generic::max::<F32x16>(x)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum_avx2(src: *const f32, n: usize, m: f32, dst: *mut f32) -> f32 {
        if dst.is_null() {
            generic::exp_sum::<F32x8, false>(src, n, m, dst)
        } else {
            generic::exp_sum::<F32x8, true>(src, n, m, dst)
        }
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn exp_sum_avx512(src: *const f32, n: usize, m: f32, dst: *mut f32) -> f32 {
        if dst.is_null() {
            generic::exp_sum::<F32x16, false>(src, n, m, dst)
        } else {
            generic::exp_sum::<F32x16, true>(src, n, m, dst)
        }
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale_avx2(x: &mut [f32], f: f32) {
        generic::scale::<F32x8>(x, f)
    }
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn scale_avx512(x: &mut [f32], f: f32) {
        generic::scale::<F32x16>(x, f)
    }
}
