//! Token + position embedding (`kernels/embedding.cu`), as kiln-cpu's
//! `elementwise::embedding`.
use super::{i32_arg, mul, row_threads};
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Error, Result};

const EMB_ROWS: usize = 64;

/// Checks host-side token ids before they are uploaded: every id below `vocab`.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(Error::invalid(format!(
            "embedding: token id {id} at index {i} is not below the vocabulary size {vocab}"
        )));
    }
    Ok(())
}

fn shape(
    n_tokens: usize,
    seq: usize,
    wte_len: usize,
    wpe_len: usize,
    pos_start: usize,
    dim: usize,
) -> Result<(usize, usize)> {
    if dim == 0 || !wte_len.is_multiple_of(dim) || !wpe_len.is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "embedding: tables of {wte_len} and {wpe_len} elements are not [rows, {dim}]"
        )));
    }
    if seq == 0 || !n_tokens.is_multiple_of(seq) {
        return Err(Error::invalid(format!(
            "embedding: {n_tokens} ids are not [batch, {seq}]"
        )));
    }
    let (vocab, npos) = (wte_len / dim, wpe_len / dim);
    if pos_start + seq > npos {
        return Err(Error::Capacity(format!(
            "embedding: positions {pos_start}..{} exceed the {npos} learned positions",
            pos_start + seq
        )));
    }
    Ok((vocab, npos))
}

/// `out[n, :] = wte[ids[n], :] + wpe[pos_start + n mod seq, :]` for the `n_tokens` ids (i32,
/// `[batch, seq]`); `wte` `[vocab, dim]`, `wpe` `[n_positions, dim]` in f32, bf16 or f16 (the
/// same dtype), `out` `[n_tokens, dim]` f32. Ids are not checked on the device (an id ≥ vocab
/// gives a NaN row): check them with [`check_ids`] before uploading.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    dev: &CudaDevice,
    ids: &CudaBuf,
    n_tokens: usize,
    seq: usize,
    wte: &CudaBuf,
    wpe: &CudaBuf,
    pos_start: usize,
    dim: usize,
    out: &mut CudaBuf,
) -> Result<()> {
    if n_tokens == 0 {
        return Ok(());
    }
    let (vocab, _) = shape(n_tokens, seq, wte.len(), wpe.len(), pos_start, dim)?;
    ids.check("embedding ids", DType::I32, n_tokens)?;
    out.check(
        "embedding out",
        DType::F32,
        mul("embedding", n_tokens, dim)?,
    )?;
    if wte.dtype() != wpe.dtype() {
        return Err(Error::invalid(format!(
            "embedding: wte is {} and wpe {}",
            wte.dtype(),
            wpe.dtype()
        )));
    }
    let kernel = match wte.dtype() {
        DType::F32 => "embedding_forward_f32",
        DType::BF16 => "embedding_forward_bf16",
        DType::F16 => "embedding_forward_f16",
        d => return Err(Error::invalid(format!("embedding: tables of {d}"))),
    };
    dev.launch(
        &sources::EMBEDDING,
        kernel,
        LaunchDims::linear(
            i32_arg("n_tokens", n_tokens)? as u32,
            row_threads(dim, 256),
            0,
        ),
        &[
            Arg::Buf(ids),
            Arg::Buf(wte),
            Arg::Buf(wpe),
            Arg::Buf(out),
            Arg::I32(n_tokens as i32),
            Arg::I32(i32_arg("seq", seq)?),
            Arg::I32(i32_arg("pos_start", pos_start)?),
            Arg::I32(i32_arg("dim", dim)?),
            Arg::I32(i32_arg("vocab", vocab)?),
        ],
    )
}

/// Backward: `dwte[ids[n], :] += dout[n, :]`, `dwpe[pos_start + n mod seq, :] += dout[n, :]`
/// (accumulates; every table row gets its tokens in token order: deterministic, and bitwise
/// kiln-cpu's result). `dwte` `[vocab, dim]`, `dwpe` `[n_positions, dim]`, `dout`
/// `[n_tokens, dim]`, all f32.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward(
    dev: &CudaDevice,
    ids: &CudaBuf,
    n_tokens: usize,
    seq: usize,
    dout: &CudaBuf,
    pos_start: usize,
    dim: usize,
    dwte: &mut CudaBuf,
    dwpe: &mut CudaBuf,
) -> Result<()> {
    if n_tokens == 0 {
        return Ok(());
    }
    let (vocab, _) = shape(n_tokens, seq, dwte.len(), dwpe.len(), pos_start, dim)?;
    ids.check("embedding ids", DType::I32, n_tokens)?;
    dout.check(
        "embedding dout",
        DType::F32,
        mul("embedding", n_tokens, dim)?,
    )?;
    dwte.expect_dtype("embedding dwte", DType::F32)?;
    dwpe.expect_dtype("embedding dwpe", DType::F32)?;
    let (nt, d) = (i32_arg("n_tokens", n_tokens)?, i32_arg("dim", dim)?);
    dev.launch(
        &sources::EMBEDDING,
        "embedding_backward_wte",
        LaunchDims::linear(vocab.div_ceil(EMB_ROWS) as u32, 256, 0),
        &[
            Arg::Buf(ids),
            Arg::Buf(dout),
            Arg::Buf(dwte),
            Arg::I32(nt),
            Arg::I32(i32_arg("vocab", vocab)?),
            Arg::I32(d),
        ],
    )?;
    dev.launch(
        &sources::EMBEDDING,
        "embedding_backward_wpe",
        LaunchDims::linear(i32_arg("seq", seq)? as u32, row_threads(dim, 256), 0),
        &[
            Arg::Buf(dout),
            Arg::Buf(dwpe),
            Arg::I32(nt),
            Arg::I32(seq as i32),
            Arg::I32(i32_arg("pos_start", pos_start)?),
            Arg::I32(d),
        ],
    )
}

fn table_name(d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => Err(Error::invalid(format!("embedding: a table of {d}"))),
    }
}

/// An embedding table in a buffer: `rows` rows of `dim` elements, element `(r, c)` at
/// `r·row_stride + c·col_stride` (row-major: `dim`, 1; a table kept as its transpose
/// `[dim, rows]`: 1, `rows`).
#[derive(Clone, Copy, Debug)]
pub struct TableView<'a> {
    pub buf: &'a CudaBuf,
    pub rows: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> TableView<'a> {
    /// A row-major `[len / dim, dim]` table.
    pub fn row_major(buf: &'a CudaBuf, rows: usize, dim: usize) -> Self {
        TableView {
            buf,
            rows,
            row_stride: dim,
            col_stride: 1,
        }
    }

    fn check(&self, what: &str, dim: usize) -> Result<()> {
        table_name(self.buf.dtype())?;
        if self.rows == 0 || dim == 0 {
            return Ok(());
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|a| a.checked_add((dim - 1).checked_mul(self.col_stride)?));
        match last {
            Some(l) if l < self.buf.len() => Ok(()),
            _ => Err(Error::invalid(format!(
                "embedding: the {what} view ({} rows of {dim}, strides {}, {}) exceeds its buffer of {} elements",
                self.rows,
                self.row_stride,
                self.col_stride,
                self.buf.len()
            ))),
        }
    }
}

/// `out[n, :] = wte[ids[n], :] + wpe[pos[n], :]` for the `n_tokens` tokens, each at its own
/// position: `idpos` (i32) holds the ids then the positions (`[ids…, positions…]`, one
/// upload). The tables are f32, bf16 or f16 (each its own) with any strides ([`TableView`]);
/// `out` `[n_tokens, dim]` f32. Ids and positions are not checked on the device: check them on
/// the host (every id below `wte.rows`, every position below `wpe.rows`) before uploading.
pub fn embedding_gather(
    dev: &CudaDevice,
    idpos: &CudaBuf,
    n_tokens: usize,
    wte: TableView<'_>,
    wpe: TableView<'_>,
    dim: usize,
    out: &mut CudaBuf,
) -> Result<()> {
    if n_tokens == 0 || dim == 0 {
        return Ok(());
    }
    wte.check("token table", dim)?;
    wpe.check("position table", dim)?;
    idpos.check(
        "embedding ids and positions",
        DType::I32,
        mul("embedding", 2, n_tokens)?,
    )?;
    out.check(
        "embedding out",
        DType::F32,
        mul("embedding", n_tokens, dim)?,
    )?;
    let kernel = format!(
        "embedding_gather_{}_{}",
        table_name(wte.buf.dtype())?,
        table_name(wpe.buf.dtype())?
    );
    dev.launch(
        &sources::EMBEDDING,
        &kernel,
        LaunchDims::linear(
            i32_arg("n_tokens", n_tokens)? as u32,
            row_threads(dim, 256),
            0,
        ),
        &[
            Arg::Buf(idpos),
            Arg::At(idpos, n_tokens),
            Arg::Buf(wte.buf),
            Arg::I64(wte.row_stride as i64),
            Arg::I64(wte.col_stride as i64),
            Arg::Buf(wpe.buf),
            Arg::I64(wpe.row_stride as i64),
            Arg::I64(wpe.col_stride as i64),
            Arg::Buf(out),
            Arg::I32(i32_arg("dim", dim)?),
        ],
    )
}

/// `table[rows_of[i], :] += dout[i, :]` for the `n` indices at element `offset` of `rows_of`
/// (i32), every table row receiving its tokens in index order (deterministic, bitwise the CPU's
/// sequential loop): the token table's gradient (`rows_of` = ids) or the position table's
/// (`rows_of` = positions). `table` `[rows, dim]`, `dout` `[n, dim]`, f32. Indices are checked
/// on the host (an index ≥ rows is skipped by the kernel).
pub fn embedding_backward_rows(
    dev: &CudaDevice,
    rows_of: &CudaBuf,
    offset: usize,
    n: usize,
    dout: &CudaBuf,
    table: &mut CudaBuf,
    dim: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if dim == 0 || !table.len().is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "embedding backward: a table of {} elements is not [rows, {dim}]",
            table.len()
        )));
    }
    rows_of.check("embedding indices", DType::I32, offset + n)?;
    dout.check("embedding dout", DType::F32, mul("embedding", n, dim)?)?;
    table.expect_dtype("embedding table gradient", DType::F32)?;
    let rows = table.len() / dim;
    dev.launch(
        &sources::EMBEDDING,
        "embedding_backward_wte",
        LaunchDims::linear(rows.div_ceil(EMB_ROWS) as u32, 256, 0),
        &[
            Arg::At(rows_of, offset),
            Arg::Buf(dout),
            Arg::Buf(table),
            Arg::I32(i32_arg("n_tokens", n)?),
            Arg::I32(i32_arg("rows", rows)?),
            Arg::I32(i32_arg("dim", dim)?),
        ],
    )
}
