//! Layer normalisation over the last dimension, forward and backward.
//!
//! For each row `x` of `dim` elements:
//! `mean = Σx/dim`, `var = Σ(x − mean)²/dim` (biased), `rstd = 1/√(var + eps)`,
//! `n = (x − mean)·rstd`, `out = n·weight + bias`.
//!
//! Rows are independent and split across rayon tasks; the weight and bias gradients are summed
//! per fixed chunk of [`ROWS_PER_CHUNK`] rows and the chunk sums added in chunk order, so every
//! result is bitwise identical for any thread count.
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// Rows per parallel task (fixed, independent of the thread count).
pub const ROWS_PER_CHUNK: usize = 16;

/// `Σ x_i` with 8 independent lanes (fixed order; the compiler vectorises it).
#[inline]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in it.remainder() {
        s += v;
    }
    s
}

/// `Σ (x_i − m)²` with 8 lanes.
#[inline]
fn sumsq8(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - m) * (v - m);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in it.remainder() {
        s += (v - m) * (v - m);
    }
    s
}

/// `Σ a_i·b_i` with 8 lanes.
#[inline]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ia = a.chunks_exact(8);
    let mut ib = b.chunks_exact(8);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
        s += x * y;
    }
    s
}

fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::shape(format!("layer_norm: {name}"), &[want], &[got]));
    }
    Ok(())
}

/// Forward. Shapes: `x`, `out` `[rows, dim]` row-major; `weight`, `bias` `[dim]`; optional
/// `mean`, `rstd` `[rows]` receive each row's mean and `1/√(var + eps)` (what the backward needs).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    dim: usize,
    eps: f32,
    out: &mut [f32],
    mean: Option<&mut [f32]>,
    rstd: Option<&mut [f32]>,
) -> Result<()> {
    let n = rows
        .checked_mul(dim)
        .ok_or_else(|| Error::invalid("layer_norm: rows·dim overflows"))?;
    check_len("x", x.len(), n)?;
    check_len("out", out.len(), n)?;
    check_len("weight", weight.len(), dim)?;
    check_len("bias", bias.len(), dim)?;
    if let Some(m) = &mean {
        check_len("mean", m.len(), rows)?;
    }
    if let Some(r) = &rstd {
        check_len("rstd", r.len(), rows)?;
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(format!(
            "layer_norm: eps {eps} must be finite and ≥ 0"
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let mut stats = vec![(0f32, 0f32); rows];
    out.par_chunks_mut(ROWS_PER_CHUNK * dim)
        .zip(x.par_chunks(ROWS_PER_CHUNK * dim))
        .zip(stats.par_chunks_mut(ROWS_PER_CHUNK))
        .for_each(|((oc, xc), sc)| {
            for ((o, xr), st) in oc.chunks_mut(dim).zip(xc.chunks(dim)).zip(sc.iter_mut()) {
                let m = sum8(xr) / dim as f32;
                let var = sumsq8(xr, m) / dim as f32;
                let rs = 1.0 / (var + eps).sqrt();
                // out = (x − mean)·rstd·w + b
                for (((ov, &xv), &w), &bb) in o.iter_mut().zip(xr).zip(weight).zip(bias) {
                    *ov = (xv - m) * rs * w + bb;
                }
                *st = (m, rs);
            }
        });
    if let Some(mo) = mean {
        for (d, s) in mo.iter_mut().zip(&stats) {
            *d = s.0;
        }
    }
    if let Some(ro) = rstd {
        for (d, s) in ro.iter_mut().zip(&stats) {
            *d = s.1;
        }
    }
    Ok(())
}

/// Backward. Accumulates (`+=`) into `dx` `[rows, dim]`, `dweight` and `dbias` `[dim]`; zero
/// them first for a plain gradient. `mean`, `rstd` `[rows]` are the forward's.
///
/// With `n = (x − mean)·rstd` and `g = weight·dout`:
/// `dx += (g − mean(g) − n·mean(g·n))·rstd`, `dweight += Σ_rows dout·n`, `dbias += Σ_rows dout`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    dout: &[f32],
    x: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    rows: usize,
    dim: usize,
    dx: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
) -> Result<()> {
    let n = rows
        .checked_mul(dim)
        .ok_or_else(|| Error::invalid("layer_norm: rows·dim overflows"))?;
    check_len("dout", dout.len(), n)?;
    check_len("x", x.len(), n)?;
    check_len("dx", dx.len(), n)?;
    check_len("weight", weight.len(), dim)?;
    check_len("dweight", dweight.len(), dim)?;
    check_len("dbias", dbias.len(), dim)?;
    check_len("mean", mean.len(), rows)?;
    check_len("rstd", rstd.len(), rows)?;
    if n == 0 {
        return Ok(());
    }
    let chunk = ROWS_PER_CHUNK * dim;
    let nchunks = rows.div_ceil(ROWS_PER_CHUNK);
    // Per chunk: partial dweight (first dim) and dbias (second dim).
    let mut partial = vec![0f32; nchunks * 2 * dim];
    dx.par_chunks_mut(chunk)
        .zip(partial.par_chunks_mut(2 * dim))
        .enumerate()
        .for_each(|(ci, (dxc, pc))| {
            let r0 = ci * ROWS_PER_CHUNK;
            let (pw, pb) = pc.split_at_mut(dim);
            let mut g = vec![0f32; dim];
            let mut nrm = vec![0f32; dim];
            for (r, dxr) in dxc.chunks_mut(dim).enumerate() {
                let row = r0 + r;
                let xr = &x[row * dim..(row + 1) * dim];
                let dr = &dout[row * dim..(row + 1) * dim];
                let (m, rs) = (mean[row], rstd[row]);
                for ((((gv, nv), &xv), &dv), &w) in
                    g.iter_mut().zip(nrm.iter_mut()).zip(xr).zip(dr).zip(weight)
                {
                    *nv = (xv - m) * rs;
                    *gv = w * dv;
                }
                let g_mean = sum8(&g) / dim as f32;
                let gn_mean = dot8(&g, &nrm) / dim as f32;
                for (((dxv, &gv), &nv), (pwv, (pbv, &dv))) in dxr
                    .iter_mut()
                    .zip(&g)
                    .zip(&nrm)
                    .zip(pw.iter_mut().zip(pb.iter_mut().zip(dr)))
                {
                    *dxv += (gv - g_mean - nv * gn_mean) * rs;
                    *pwv += dv * nv;
                    *pbv += dv;
                }
            }
        });
    // Sum the chunk partials in chunk order (parallel over columns).
    const COLS: usize = 64;
    dweight
        .par_chunks_mut(COLS)
        .zip(dbias.par_chunks_mut(COLS))
        .enumerate()
        .for_each(|(k, (dw, db))| {
            let c0 = k * COLS;
            for pc in partial.chunks(2 * dim) {
                for (j, (w, b)) in dw.iter_mut().zip(db.iter_mut()).enumerate() {
                    *w += pc[c0 + j];
                    *b += pc[dim + c0 + j];
                }
            }
        });
    Ok(())
}
