//! Token + position embedding gather (GPT-2's `wte[id] + wpe[pos]`), forward and backward.
use kiln_tensor::{Error, FloatElement, Result};
use rayon::prelude::*;

fn check<T>(
    ids: &[u32],
    seq: usize,
    wte: &[T],
    wpe: &[T],
    pos_start: usize,
    dim: usize,
) -> Result<(usize, usize)> {
    if dim == 0 || !wte.len().is_multiple_of(dim) || !wpe.len().is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "embedding: tables of {} and {} elements are not [rows, {dim}]",
            wte.len(),
            wpe.len()
        )));
    }
    if seq == 0 || !ids.len().is_multiple_of(seq) {
        return Err(Error::invalid(format!(
            "embedding: {} ids are not [batch, {seq}]",
            ids.len()
        )));
    }
    let vocab = wte.len() / dim;
    let npos = wpe.len() / dim;
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(Error::invalid(format!(
            "embedding: token id {id} at index {i} is not below the vocabulary size {vocab}"
        )));
    }
    if pos_start + seq > npos {
        return Err(Error::Capacity(format!(
            "embedding: positions {pos_start}..{} exceed the {npos} learned positions",
            pos_start + seq
        )));
    }
    Ok((vocab, npos))
}

/// `out[b, t, :] = wte[ids[b, t], :] + wpe[pos_start + t, :]`.
///
/// Shapes: `ids` `[batch, seq]`, `wte` `[vocab, dim]`, `wpe` `[n_positions, dim]` (f32, bf16 or
/// f16), `out` `[batch, seq, dim]` f32. Errors on an id ≥ vocab (with [`Error::InvalidArgument`])
/// or a position ≥ n_positions (with [`Error::Capacity`]).
pub fn embedding_forward<T: FloatElement>(
    ids: &[u32],
    seq: usize,
    wte: &[T],
    wpe: &[T],
    pos_start: usize,
    dim: usize,
    out: &mut [f32],
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    check(ids, seq, wte, wpe, pos_start, dim)?;
    if out.len() != ids.len() * dim {
        return Err(Error::shape(
            "embedding: out",
            &[ids.len(), dim],
            &[out.len()],
        ));
    }
    out.par_chunks_mut(dim).enumerate().for_each(|(n, o)| {
        let id = ids[n] as usize;
        let p = pos_start + n % seq;
        let e = &wte[id * dim..(id + 1) * dim];
        let q = &wpe[p * dim..(p + 1) * dim];
        for ((o, &a), &b) in o.iter_mut().zip(e).zip(q) {
            *o = a.to_f32() + b.to_f32();
        }
    });
    Ok(())
}

/// Backward: `dwte[ids[b, t], :] += dout[b, t, :]`, `dwpe[pos_start + t, :] += dout[b, t, :]`
/// (accumulates, tokens in order). `dwte` `[vocab, dim]`, `dwpe` `[n_positions, dim]`,
/// `dout` `[batch, seq, dim]`, all f32. Sequential, so the order per element is fixed.
pub fn embedding_backward(
    ids: &[u32],
    seq: usize,
    dout: &[f32],
    pos_start: usize,
    dim: usize,
    dwte: &mut [f32],
    dwpe: &mut [f32],
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    check(ids, seq, dwte, dwpe, pos_start, dim)?;
    if dout.len() != ids.len() * dim {
        return Err(Error::shape(
            "embedding: dout",
            &[ids.len(), dim],
            &[dout.len()],
        ));
    }
    for (n, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let p = pos_start + n % seq;
        let g = &dout[n * dim..(n + 1) * dim];
        for (w, &x) in dwte[id * dim..(id + 1) * dim].iter_mut().zip(g) {
            *w += x;
        }
        for (w, &x) in dwpe[p * dim..(p + 1) * dim].iter_mut().zip(g) {
            *w += x;
        }
    }
    Ok(())
}
