//! Element-wise add (the residual connection). Its backward is the identity: the gradient of
//! `out` flows unchanged to both `a` and `b`.
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

const CHUNK: usize = 1 << 15;

/// `out[i] = a[i] + b[i]`; all three have the same length.
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
    if a.len() != b.len() || a.len() != out.len() {
        return Err(Error::invalid(format!(
            "add: lengths differ (a {}, b {}, out {})",
            a.len(),
            b.len(),
            out.len()
        )));
    }
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = x + y;
            }
        });
    Ok(())
}

/// `acc[i] += b[i]`; same length.
pub fn add_inplace(acc: &mut [f32], b: &[f32]) -> Result<()> {
    if acc.len() != b.len() {
        return Err(Error::invalid(format!(
            "add_inplace: lengths differ (acc {}, b {})",
            acc.len(),
            b.len()
        )));
    }
    acc.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, y)| {
            for (a, &y) in a.iter_mut().zip(y) {
                *a += y;
            }
        });
    Ok(())
}
