//! [`CudaBackend`]: kiln-nn's op interface ([`Backend`]) on a CUDA device (or on the CPU
//! emulator of one), every op a kiln-cuda kernel.
//!
//! Every buffer is device memory ([`DeviceBuf`]): weights (kept in their dtype — a bf16
//! checkpoint stays bf16 on the device, row-major as stored; a matrix uploaded to be used
//! transposed, GPT-2's token table `[V, C]`, is kept as its transpose `[C, V]`, so that the
//! decode step's logits product streams it row by row), activations, gradients, optimiser
//! moments and the KV caches. Data crosses between the host and the device only where the
//! trait says so: `upload*`, `download`, the token ids (and positions, targets) an op takes
//! from the host — one copy per call — and the scalar a loss, a mean or a sum of squares
//! returns (one small copy, the only synchronisation). Every other op only queues kernels on
//! the device's stream and returns.
//!
//! How each op maps to the kernels is in `docs/cuda.md` ("The CUDA backend"). Semantics that
//! differ between the kiln-cuda ops and the trait (overwrite vs accumulate) are adapted here:
//! a kernel that accumulates into a gradient the trait overwrites gets a zeroed buffer first;
//! a kernel that overwrites a gradient the trait accumulates writes into scratch that is then
//! added. Scratch comes from the device's small pool of buffers reused across calls (the stream
//! orders every use), so a decode step allocates nothing.
use crate::ops::attention::{
    attention_backward as cuda_attention_backward, attention_decode_batch, attention_forward,
    kv_cache_append, AttentionGrads, AttentionOptions, DecodeSeq, HeadsLayout, HeadsView,
    KvCacheLayout,
};
use crate::ops::gemm::{gemm_with, GemmDims, GemmEpilogue, GemmKernel, GemmStrides, GEMV_MAX_M};
use crate::ops::{
    conv as cuda_conv, elementwise as ew, embedding as emb, loss, norm, optim, reduce,
};
use crate::{CudaBuf, CudaDevice};
use half::{bf16, f16};
use kiln_nn::backend::{
    Activation, Backend, BnShape, BufInfo, ConvGeometry, Grads, KvCache, LinearDims, MatrixOptions,
    Pointwise, Transfers,
};
use kiln_nn::optim::AdamConfig;
use kiln_tensor::{DType, Error, Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

/// A buffer of [`CudaBackend`]: device memory, and for a weight matrix made by
/// [`Backend::upload_matrix`] its shape and layout.
#[derive(Debug)]
pub struct DeviceBuf {
    buf: CudaBuf,
    matrix: Option<Matrix>,
}

/// A weight matrix: the uploaded tensor's `[rows, cols]`, held row-major as it is, or as its
/// transpose `[cols, rows]` (row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl DeviceBuf {
    /// The device memory.
    pub fn cuda(&self) -> &CudaBuf {
        &self.buf
    }

    /// The shape and layout of a weight matrix.
    pub fn matrix(&self) -> Option<Matrix> {
        self.matrix
    }

    fn plain(buf: CudaBuf) -> Self {
        DeviceBuf { buf, matrix: None }
    }
}

/// Products of at most this many rows run on the decode kernel, a few rows per launch (see
/// `linear`): a batched decode step of up to this many sequences gives each sequence bitwise
/// its own result in every product (kiln-cpu's `INVARIANT_ROWS`).
pub const SMALL_ROWS: usize = 64;

/// kiln-nn's [`Backend`] on a [`CudaDevice`]. See the module docs.
pub struct CudaBackend {
    dev: CudaDevice,
    /// Host ↔ device transfers the trait's methods made (the same counts as kiln-nn's
    /// `CountingBackend`).
    to_device: AtomicUsize,
    to_device_elements: AtomicUsize,
    to_host: AtomicUsize,
    to_host_elements: AtomicUsize,
    /// The i32 buffer ids, positions and targets are uploaded into (grown, never shrunk).
    ids: Mutex<CudaBuf>,
    /// The result of a reduction that comes back to the host (and a check's verdict).
    scalar: Mutex<CudaBuf>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev.info().name)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::Device("CUDA backend: a lock was poisoned by a panic".into()))
}

/// `a·b` without overflow.
fn mul(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(format!("{what}: {a}·{b} overflows")))
}

/// An f32 buffer of at least `need` elements (a plain array, or an f32 matrix as stored).
fn f32_buf<'a>(b: &'a DeviceBuf, what: &str, need: usize) -> Result<&'a CudaBuf> {
    if b.matrix.is_some_and(|m| m.transposed) {
        return Err(Error::invalid(format!(
            "{what}: expected an f32 array, found a matrix laid out for products with its transpose"
        )));
    }
    if b.buf.dtype() != DType::F32 {
        return Err(Error::invalid(format!(
            "{what}: expected an f32 array, found a {} matrix",
            b.buf.dtype()
        )));
    }
    if b.buf.len() < need {
        return Err(Error::shape(what, &[need], &[b.buf.len()]));
    }
    Ok(&b.buf)
}

/// A writable f32 buffer of at least `need` elements (not a weight matrix).
fn f32_mut<'a>(b: &'a mut DeviceBuf, what: &str, need: usize) -> Result<&'a mut CudaBuf> {
    if b.matrix.is_some() || b.buf.dtype() != DType::F32 {
        return Err(Error::invalid(format!(
            "{what}: expected a writable f32 array, found a read-only {} matrix",
            b.buf.dtype()
        )));
    }
    if b.buf.len() < need {
        return Err(Error::shape(what, &[need], &[b.buf.len()]));
    }
    Ok(&mut b.buf)
}

fn i32s(v: &[u32], what: &str) -> Result<Vec<i32>> {
    v.iter()
        .map(|&x| {
            i32::try_from(x)
                .map_err(|_| Error::invalid(format!("{what}: {x} exceeds the kernels' range")))
        })
        .collect()
}

/// An embedding table `[rows, dim]`: row-major, or a matrix kept as its transpose.
fn table<'a>(b: &'a DeviceBuf, what: &str, dim: usize) -> Result<emb::TableView<'a>> {
    let bad = || Error::invalid(format!("embedding: {what} is not a [rows, {dim}] table"));
    match b.matrix {
        Some(m) if m.cols == dim && m.transposed => Ok(emb::TableView {
            buf: &b.buf,
            rows: m.rows,
            row_stride: 1,
            col_stride: m.rows,
        }),
        Some(m) if m.cols == dim => Ok(emb::TableView::row_major(&b.buf, m.rows, dim)),
        Some(_) => Err(bad()),
        None if dim > 0 && b.buf.len().is_multiple_of(dim) => {
            Ok(emb::TableView::row_major(&b.buf, b.buf.len() / dim, dim))
        }
        None => Err(bad()),
    }
}

/// The `[cols, rows]` transpose of a row-major `[rows, cols]` array of `T` (cache-blocked).
fn transpose<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const B: usize = 64;
    let mut out = vec![T::default(); src.len()];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// The transpose of a 2-D float tensor `[rows, cols]`, in its dtype.
fn transposed_tensor(t: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    let t = t.contiguous()?;
    let shape = vec![cols, rows];
    match t.dtype() {
        DType::F32 => Tensor::from_vec(transpose(t.as_slice::<f32>()?, rows, cols), shape),
        DType::BF16 => Tensor::from_vec(transpose(t.as_slice::<bf16>()?, rows, cols), shape),
        DType::F16 => Tensor::from_vec(transpose(t.as_slice::<f16>()?, rows, cols), shape),
        d => Err(Error::invalid(format!("a weight matrix of {d}"))),
    }
}

impl CudaBackend {
    /// The backend on CUDA device `ordinal`. Without a driver or a GPU this is the error
    /// "no CUDA device: …" ([`crate::is_no_device`]); it never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::on(CudaDevice::new(ordinal)?)
    }

    /// The backend on the CPU emulator ([`CudaDevice::emulator`]): every kernel compiled by g++
    /// and run on the CPU, one OS-level fiber per CUDA thread. Slow; for tests on small models.
    pub fn emulator() -> Result<Self> {
        Self::on(CudaDevice::emulator()?)
    }

    /// The backend on an open device.
    pub fn on(dev: CudaDevice) -> Result<Self> {
        Ok(CudaBackend {
            ids: Mutex::new(dev.zeros(DType::I32, 0)?),
            scalar: Mutex::new(dev.zeros(DType::F32, 2)?),
            to_device: AtomicUsize::new(0),
            to_device_elements: AtomicUsize::new(0),
            to_host: AtomicUsize::new(0),
            to_host_elements: AtomicUsize::new(0),
            dev,
        })
    }

    /// The device the ops run on.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// The transfers made through the trait so far (the same counts as kiln-nn's
    /// `CountingBackend`: an upload of `n` values is one transfer of `n` elements; ids and
    /// positions count one element each; a returned scalar is one transfer of one element).
    pub fn transfers(&self) -> Transfers {
        Transfers {
            to_device: self.to_device.load(Relaxed),
            to_device_elements: self.to_device_elements.load(Relaxed),
            to_host: self.to_host.load(Relaxed),
            to_host_elements: self.to_host_elements.load(Relaxed),
        }
    }

    /// Sets the transfer counts to zero.
    pub fn reset_transfers(&self) {
        for c in [
            &self.to_device,
            &self.to_device_elements,
            &self.to_host,
            &self.to_host_elements,
        ] {
            c.store(0, Relaxed);
        }
    }

    /// Waits for every queued kernel (timing).
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn count_in(&self, elements: usize) {
        self.to_device.fetch_add(1, Relaxed);
        self.to_device_elements.fetch_add(elements, Relaxed);
    }

    fn count_out(&self, elements: usize) {
        self.to_host.fetch_add(1, Relaxed);
        self.to_host_elements.fetch_add(elements, Relaxed);
    }

    /// An f32 scratch buffer of at least `len` elements (contents unspecified), from the
    /// device's pool; give it back with [`CudaBackend::recycle`].
    fn scratch(&self, len: usize) -> Result<CudaBuf> {
        self.dev.scratch(len)
    }

    /// An f32 scratch buffer whose first `len` elements are zero.
    fn scratch_zeroed(&self, len: usize) -> Result<CudaBuf> {
        let mut b = self.scratch(len)?;
        ew::fill(&self.dev, &mut b, len, 0.0)?;
        Ok(b)
    }

    fn recycle(&self, buf: CudaBuf) {
        self.dev.recycle(buf)
    }

    /// Uploads `parts` one after another as i32 into the ids buffer (one copy), then runs `f`
    /// with it.
    fn with_ids<R>(&self, parts: &[&[u32]], f: impl FnOnce(&CudaBuf) -> Result<R>) -> Result<R> {
        let mut all = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            all.extend(i32s(p, "index")?);
        }
        self.count_in(all.len());
        let mut ids = lock(&self.ids)?;
        if ids.len() < all.len() {
            let rounded = all.len().checked_next_power_of_two().unwrap_or(all.len());
            *ids = self.dev.zeros(DType::I32, rounded.max(256))?;
        }
        self.dev.write(&mut ids, 0, &all)?;
        f(&ids)
    }

    /// `out = buf[offset..][..out.len()]` widened to f32.
    fn read_f32(&self, buf: &CudaBuf, offset: usize, out: &mut [f32]) -> Result<()> {
        match buf.dtype() {
            DType::F32 => self.dev.read(buf, offset, out),
            DType::BF16 => {
                let mut tmp = vec![bf16::ZERO; out.len()];
                self.dev.read(buf, offset, &mut tmp)?;
                kiln_tensor::convert::bf16_to_f32(&tmp, out);
                Ok(())
            }
            DType::F16 => {
                let mut tmp = vec![f16::ZERO; out.len()];
                self.dev.read(buf, offset, &mut tmp)?;
                kiln_tensor::convert::f16_to_f32(&tmp, out);
                Ok(())
            }
            other => Err(Error::invalid(format!("download: a {other} buffer"))),
        }
    }

    /// Runs `f`, which writes one f32 into the scalar buffer, and brings the value back.
    fn scalar(&self, f: impl FnOnce(&CudaDevice, &mut CudaBuf) -> Result<()>) -> Result<f32> {
        let mut s = lock(&self.scalar)?;
        f(&self.dev, &mut s)?;
        let mut v = [0f32];
        self.count_out(1);
        self.dev.read(&s, 0, &mut v)?;
        Ok(v[0])
    }

    /// Runs `f`, which writes a result and a check's verdict (elements 0 and 1 of the scalar
    /// buffer), and brings both back in one copy: the trait's one scalar.
    fn scalar_checked(
        &self,
        f: impl FnOnce(&CudaDevice, &mut CudaBuf) -> Result<()>,
    ) -> Result<(f32, f32)> {
        let mut s = lock(&self.scalar)?;
        f(&self.dev, &mut s)?;
        let mut v = [0f32; 2];
        self.count_out(1);
        self.dev.read(&s, 0, &mut v)?;
        Ok((v[0], v[1]))
    }

    /// The buffer a gradient-accumulating kernel adds a parameter gradient to: the caller's
    /// (zeroed first unless `accumulate`), or zeroed scratch held in `tmp` when there is none.
    fn zeroed_grad<'a>(
        &self,
        b: Option<&'a mut DeviceBuf>,
        tmp: &'a mut Option<CudaBuf>,
        what: &str,
        len: usize,
        accumulate: bool,
    ) -> Result<&'a mut CudaBuf> {
        Ok(match b {
            Some(b) => {
                let b = f32_mut(b, what, len)?;
                if !accumulate {
                    ew::fill(&self.dev, b, len, 0.0)?;
                }
                b
            }
            None => tmp.insert(self.scratch_zeroed(len)?),
        })
    }

    /// A parameter gradient from a kernel that overwrites its output: straight into `dst`, or,
    /// with `accumulate`, into scratch that is then added.
    fn grad_overwrite(
        &self,
        dst: Option<&mut DeviceBuf>,
        what: &str,
        len: usize,
        accumulate: bool,
        f: impl FnOnce(&mut CudaBuf) -> Result<()>,
    ) -> Result<()> {
        let Some(dst) = dst else { return Ok(()) };
        let dst = f32_mut(dst, what, len)?;
        if accumulate {
            let mut tmp = self.scratch(len)?;
            f(&mut tmp)?;
            let r = ew::add_inplace(&self.dev, dst, &tmp, len);
            self.recycle(tmp);
            r
        } else {
            f(dst)
        }
    }
}

/// A convolution's weight (any float dtype, as stored).
fn conv_weight(w: &DeviceBuf) -> Result<&CudaBuf> {
    if w.matrix.is_some_and(|m| m.transposed) {
        return Err(Error::invalid(
            "conv: the weight is a matrix laid out for products with its transpose",
        ));
    }
    Ok(&w.buf)
}

/// The matrix `W` of a product (`[k, n]`, or `[n, k]` with `w_transposed`) and whether the
/// buffer holds it transposed — `[n, k]` row-major — for the GEMM's `b_t`.
fn weight<'a>(w: &'a DeviceBuf, d: &LinearDims, what: &str) -> Result<(&'a CudaBuf, bool)> {
    let stored = if d.w_transposed {
        [d.n, d.k]
    } else {
        [d.k, d.n]
    };
    let need = mul(what, d.k, d.n)?;
    if w.buf.len() < need {
        return Err(Error::shape(
            format!("{what}: weight"),
            &stored,
            &[w.buf.len()],
        ));
    }
    match w.matrix {
        Some(m) if [m.rows, m.cols] != stored => Err(Error::shape(
            format!("{what}: weight matrix"),
            &stored,
            &[m.rows, m.cols],
        )),
        // The buffer holds the tensor's transpose: a product with the tensor reads it
        // transposed, a product with the tensor's transpose reads it as it is.
        Some(m) if m.transposed => Ok((&w.buf, !d.w_transposed)),
        _ => Ok((&w.buf, d.w_transposed)),
    }
}

/// The fused qkv `[batch·seq, 3C]` part `which` as a heads view.
fn qkv_part(
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
    which: usize,
    offset: usize,
) -> Result<HeadsLayout> {
    let mut l = HeadsLayout::fused_qkv(batch, seq, heads, d, which)?;
    l.offset += offset;
    Ok(l)
}

impl Backend for CudaBackend {
    type Buf = DeviceBuf;

    fn name(&self) -> &'static str {
        if self.dev.is_emulated() {
            "cuda-emulator"
        } else {
            "cuda"
        }
    }

    // ---- memory and transfers ----

    fn zeros(&self, len: usize) -> Result<DeviceBuf> {
        Ok(DeviceBuf::plain(self.dev.zeros(DType::F32, len)?))
    }

    fn upload(&self, data: &[f32]) -> Result<DeviceBuf> {
        self.count_in(data.len());
        Ok(DeviceBuf::plain(self.dev.upload(data)?))
    }

    fn upload_into(&self, data: &[f32], dst: &mut DeviceBuf, offset: usize) -> Result<()> {
        let len = dst.buf.len();
        let d = f32_mut(dst, "upload", len)?;
        if offset.checked_add(data.len()).is_none_or(|e| e > len) {
            return Err(Error::invalid(format!(
                "upload: {} elements at offset {offset} exceed a buffer of {len}",
                data.len()
            )));
        }
        self.count_in(data.len());
        self.dev.write(d, offset, data)
    }

    fn download(&self, src: &DeviceBuf, offset: usize, out: &mut [f32]) -> Result<()> {
        let len = src.buf.len();
        if offset.checked_add(out.len()).is_none_or(|e| e > len) {
            return Err(Error::invalid(format!(
                "download: {} elements at offset {offset} exceed a buffer of {len}",
                out.len()
            )));
        }
        self.count_out(out.len());
        if let Some(m) = src.matrix.filter(|m| m.transposed) {
            // Element i of the tensor [rows, cols] is element (i % cols)·rows + i / cols here.
            let mut all = vec![0f32; len];
            self.read_f32(&src.buf, 0, &mut all)?;
            for (o, i) in out.iter_mut().zip(offset..) {
                *o = all[(i % m.cols) * m.rows + i / m.cols];
            }
            return Ok(());
        }
        self.read_f32(&src.buf, offset, out)
    }

    fn upload_matrix(&self, t: &Tensor, opts: &MatrixOptions) -> Result<DeviceBuf> {
        let ([rows, cols], dtype) = opts.check(t)?;
        // A matrix the products use transposed (GPT-2's token table [V, C] as the output
        // projection) is kept as its transpose [C, V] in the streaming layout: the decode
        // step's product then reads it as x·W with W row-major (the decode kernel's coalesced
        // [k, n] path), and an embedding reads its columns. Otherwise row-major as stored.
        let transposed = opts.used_transposed && opts.streaming_layout;
        let owned;
        let t = if transposed {
            owned = transposed_tensor(t, rows, cols)?;
            &owned
        } else {
            t
        };
        self.count_in(t.numel());
        let buf = match (t.dtype(), dtype) {
            (a, b) if a == b => self.dev.upload_tensor(t)?,
            // One conversion on the device (round to nearest even, as the CPU's).
            (DType::F32, DType::BF16 | DType::F16) | (DType::BF16 | DType::F16, DType::F32) => {
                let src = self.dev.upload_tensor(t)?;
                let mut dst = self.dev.alloc(dtype, t.numel())?;
                ew::cast(&self.dev, &src, &mut dst, t.numel())?;
                dst
            }
            _ => self.dev.upload_tensor(&t.to_dtype(dtype)?)?,
        };
        Ok(DeviceBuf {
            buf,
            matrix: Some(Matrix {
                rows,
                cols,
                transposed,
            }),
        })
    }

    fn info(&self, buf: &DeviceBuf) -> BufInfo {
        BufInfo {
            dtype: buf.buf.dtype(),
            len: buf.buf.len(),
            bytes: buf.buf.size_in_bytes(),
            borrowed: false,
        }
    }

    fn copy(
        &self,
        src: &DeviceBuf,
        src_offset: usize,
        dst: &mut DeviceBuf,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        let need = |o: usize| {
            o.checked_add(len)
                .ok_or_else(|| Error::invalid("copy: offset + length overflows"))
        };
        let s = f32_buf(src, "copy: source", need(src_offset)?)?;
        let d = f32_mut(dst, "copy: destination", need(dst_offset)?)?;
        self.dev.copy_range(s, src_offset, d, dst_offset, len)
    }

    fn fill(&self, x: &mut DeviceBuf, len: usize, value: f32) -> Result<()> {
        ew::fill(&self.dev, f32_mut(x, "fill", len)?, len, value)
    }

    fn scale(&self, x: &mut DeviceBuf, len: usize, s: f32) -> Result<()> {
        ew::scale(&self.dev, f32_mut(x, "scale", len)?, len, s)
    }

    fn add(&self, x: &mut DeviceBuf, y: &DeviceBuf, len: usize) -> Result<()> {
        let y = f32_buf(y, "add: y", len)?;
        ew::add_inplace(&self.dev, f32_mut(x, "add: x", len)?, y, len)
    }

    // ---- transformer ops ----

    fn embedding(
        &self,
        ids: &[u32],
        positions: &[u32],
        tokens: &DeviceBuf,
        pos_table: &DeviceBuf,
        dim: usize,
        out: &mut DeviceBuf,
    ) -> Result<()> {
        if ids.len() != positions.len() {
            return Err(Error::invalid(format!(
                "embedding: {} ids and {} positions",
                ids.len(),
                positions.len()
            )));
        }
        let tok = table(tokens, "the token table", dim)?;
        let pos = table(pos_table, "the position table", dim)?;
        let (vocab, npos) = (tok.rows, pos.rows);
        for (&id, &p) in ids.iter().zip(positions) {
            if id as usize >= vocab {
                return Err(Error::invalid(format!(
                    "embedding: token id {id} is not below the vocabulary size {vocab}"
                )));
            }
            if p as usize >= npos {
                return Err(Error::Capacity(format!(
                    "embedding: position {p} exceeds the {npos} learned positions"
                )));
            }
        }
        let n = ids.len();
        let out = f32_mut(out, "embedding: out", mul("embedding", n, dim)?)?;
        if n == 0 || dim == 0 {
            return Ok(());
        }
        self.with_ids(&[ids, positions], |idpos| {
            emb::embedding_gather(&self.dev, idpos, n, tok, pos, dim, out)
        })
    }

    fn linear(
        &self,
        x: &DeviceBuf,
        w: &DeviceBuf,
        bias: Option<&DeviceBuf>,
        y: &mut DeviceBuf,
        d: LinearDims,
        act: Activation,
    ) -> Result<()> {
        let (xl, _, yl) = d.lens()?;
        let x = f32_buf(x, "linear: input", xl)?;
        let (w, b_t) = weight(w, &d, "linear")?;
        let bias = bias.map(|b| f32_buf(b, "linear: bias", d.n)).transpose()?;
        let y = f32_mut(y, "linear: output", yl)?;
        let epilogue = match (bias, act) {
            (None, Activation::None) => GemmEpilogue::None,
            (None, Activation::GeluTanh) => GemmEpilogue::Gelu,
            (Some(b), Activation::None) => GemmEpilogue::Bias(b),
            (Some(b), Activation::GeluTanh) => GemmEpilogue::BiasGelu(b),
        };
        let dims = |m: usize| GemmDims {
            m,
            n: d.n,
            k: d.k,
            a_t: false,
            b_t,
        };
        // Up to SMALL_ROWS rows (a decode step, a short prompt), and any number of rows of a
        // row-invariant product, run on the decode kernel (gemv), GEMV_MAX_M rows per launch:
        // it streams the weight once per launch, spreads over the whole GPU even for one row
        // (the tiled kernel would have n/128 blocks), and its rows never depend on each other,
        // so every row is bitwise what it is alone.
        let (chunk, kernel) = if d.rows_invariant || d.m <= SMALL_ROWS {
            (GEMV_MAX_M, GemmKernel::Gemv)
        } else {
            (d.m.max(1), GemmKernel::Auto)
        };
        let mut r0 = 0;
        while r0 < d.m {
            let rows = chunk.min(d.m - r0);
            let g = dims(rows);
            let mut s = GemmStrides::dense(&g);
            s.a_offset = r0 * d.k;
            s.c_offset = r0 * d.n;
            gemm_with(&self.dev, x, w, y, g, s, 1.0, 0.0, epilogue, kernel)?;
            r0 += rows;
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        x: &DeviceBuf,
        w: &DeviceBuf,
        dy: &DeviceBuf,
        d: LinearDims,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        let (xl, wl, yl) = d.lens()?;
        let (m, k, n) = (d.m, d.k, d.n);
        let dy = f32_buf(dy, "linear backward: dy", yl)?;
        let beta = if grads.accumulate { 1.0 } else { 0.0 };
        if let Some(dx) = grads.dx {
            // dx [m, k] = dy [m, n] · Wᵀ: W stored [k, n] is read transposed; stored [n, k]
            // (a transposed weight) as it is.
            let (wb, w_t) = weight(w, &d, "linear backward")?;
            let dx = f32_mut(dx, "linear backward: dx", xl)?;
            let g = GemmDims {
                m,
                n: k,
                k: n,
                a_t: false,
                b_t: !w_t,
            };
            gemm_with(
                &self.dev,
                dy,
                wb,
                dx,
                g,
                GemmStrides::dense(&g),
                1.0,
                0.0,
                GemmEpilogue::None,
                GemmKernel::Auto,
            )?;
        }
        if let Some(dw) = grads.dw {
            let x = f32_buf(x, "linear backward: x", xl)?;
            let dw = f32_mut(dw, "linear backward: dW", wl)?;
            let (a, b, g) = if d.w_transposed {
                // dW [n, k] = dyᵀ [n, m] · x [m, k]
                (
                    dy,
                    x,
                    GemmDims {
                        m: n,
                        n: k,
                        k: m,
                        a_t: true,
                        b_t: false,
                    },
                )
            } else {
                // dW [k, n] = xᵀ [k, m] · dy [m, n]
                (
                    x,
                    dy,
                    GemmDims {
                        m: k,
                        n,
                        k: m,
                        a_t: true,
                        b_t: false,
                    },
                )
            };
            gemm_with(
                &self.dev,
                a,
                b,
                dw,
                g,
                GemmStrides::dense(&g),
                1.0,
                beta,
                GemmEpilogue::None,
                GemmKernel::Auto,
            )?;
        }
        if let Some(db) = grads.db {
            // db [n] (+)= Σ_m dy
            let db = f32_mut(db, "linear backward: db", n)?;
            reduce::column_sums(&self.dev, dy, m, n, db, grads.accumulate)?;
        }
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &DeviceBuf,
        gamma: &DeviceBuf,
        beta: &DeviceBuf,
        y: &mut DeviceBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let n = mul("layer_norm", rows, dim)?;
        norm::layer_norm_forward(
            &self.dev,
            f32_buf(x, "layer_norm: x", n)?,
            f32_buf(gamma, "layer_norm: gamma", dim)?,
            f32_buf(beta, "layer_norm: beta", dim)?,
            rows,
            dim,
            eps,
            f32_mut(y, "layer_norm: y", n)?,
            None,
            None,
        )
    }

    fn attention(
        &self,
        qkv: &DeviceBuf,
        t: usize,
        caches: &mut [&mut KvCache<Self>],
        out: &mut DeviceBuf,
    ) -> Result<()> {
        let Some(first) = caches.first() else {
            return Ok(());
        };
        let (h, d) = (first.n_head, first.head_dim);
        let c = mul("attention", h, d)?;
        let s = caches.len();
        if caches.iter().any(|k| (k.n_head, k.head_dim) != (h, d)) {
            return Err(Error::invalid(
                "attention: every cache of a batch must have the same heads and head width",
            ));
        }
        for cache in caches.iter() {
            cache.check_room(t)?;
        }
        let rows = mul("attention", s, t)?;
        let qkv = f32_buf(
            qkv,
            "attention: qkv",
            mul("attention", rows, mul("attention", 3, c)?)?,
        )?;
        let out = f32_mut(out, "attention: out", mul("attention", rows, c)?)?;
        for cache in caches.iter_mut() {
            let cache_len = mul("attention", c, cache.capacity)?;
            f32_mut(&mut cache.k, "KV cache keys", cache_len)?;
            f32_mut(&mut cache.v, "KV cache values", cache_len)?;
        }
        if t == 0 || c == 0 {
            return Ok(());
        }
        if t == 1 {
            // A decode step: every sequence's append and attention in one launch.
            let mut seqs: Vec<DecodeSeq<'_>> = caches
                .iter_mut()
                .map(|cache| DecodeSeq {
                    len: cache.len,
                    capacity: cache.capacity,
                    k: &mut cache.k.buf,
                    v: &mut cache.v.buf,
                })
                .collect();
            attention_decode_batch(&self.dev, qkv, &mut seqs, h, d, out, None)?;
            for cache in caches.iter_mut() {
                cache.len += 1;
            }
            return Ok(());
        }
        // Prefill: per sequence, append the t new keys and values to its cache, then the flash
        // kernel from the t queries over the cache's len + t positions (causal, bottom-right).
        for (i, cache) in caches.iter_mut().enumerate() {
            let (row0, cap) = (i * t * 3 * c, cache.capacity);
            let layout = KvCacheLayout {
                offset: 0,
                sequences: 1,
                heads: h,
                capacity: cap,
                head_dim: d,
            };
            let len0 = cache.len;
            for (which, buf) in [(1, &mut cache.k.buf), (2, &mut cache.v.buf)] {
                let src = HeadsView::new(qkv, qkv_part(1, t, h, d, which, row0)?);
                kv_cache_append(&self.dev, src, buf, layout, len0)?;
            }
            let len = len0 + t;
            let cached = HeadsLayout {
                offset: 0,
                batch: 1,
                heads: h,
                seq: len,
                head_dim: d,
                stride_batch: h * cap * d,
                stride_head: cap * d,
                stride_seq: d,
            };
            let mut o = HeadsLayout::seq_major(1, t, h, d);
            o.offset = i * t * c;
            attention_forward(
                &self.dev,
                HeadsView::new(qkv, qkv_part(1, t, h, d, 0, row0)?),
                HeadsView::new(&cache.k.buf, cached),
                HeadsView::new(&cache.v.buf, cached),
                (&mut *out, o),
                None,
                AttentionOptions::causal(),
            )?;
            cache.len = len;
        }
        Ok(())
    }

    fn gelu(&self, x: &mut DeviceBuf, len: usize) -> Result<()> {
        ew::gelu_inplace(&self.dev, f32_mut(x, "gelu", len)?, len)
    }

    fn softmax(&self, x: &mut DeviceBuf, rows: usize, cols: usize) -> Result<()> {
        let n = mul("softmax", rows, cols)?;
        let x = f32_mut(x, "softmax", n)?;
        if n == 0 {
            return Ok(());
        }
        crate::ops::softmax::softmax_rows_inplace(&self.dev, x, rows, cols)
    }

    // ---- transformer training ----

    fn layer_norm_train(
        &self,
        x: &DeviceBuf,
        gamma: &DeviceBuf,
        beta: &DeviceBuf,
        y: &mut DeviceBuf,
        mean: &mut DeviceBuf,
        rstd: &mut DeviceBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let n = mul("layer_norm", rows, dim)?;
        norm::layer_norm_forward(
            &self.dev,
            f32_buf(x, "layer_norm: x", n)?,
            f32_buf(gamma, "layer_norm: gamma", dim)?,
            f32_buf(beta, "layer_norm: beta", dim)?,
            rows,
            dim,
            eps,
            f32_mut(y, "layer_norm: y", n)?,
            Some(f32_mut(mean, "layer_norm: mean", rows)?),
            Some(f32_mut(rstd, "layer_norm: rstd", rows)?),
        )
    }

    fn layer_norm_backward(
        &self,
        x: &DeviceBuf,
        gamma: &DeviceBuf,
        mean: &DeviceBuf,
        rstd: &DeviceBuf,
        dy: &DeviceBuf,
        rows: usize,
        dim: usize,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        let n = mul("layer_norm", rows, dim)?;
        let x = f32_buf(x, "layer_norm backward: x", n)?;
        let gamma = f32_buf(gamma, "layer_norm backward: gamma", dim)?;
        let mean = f32_buf(mean, "layer_norm backward: mean", rows)?;
        let rstd = f32_buf(rstd, "layer_norm backward: rstd", rows)?;
        let dy = f32_buf(dy, "layer_norm backward: dy", n)?;
        let Grads {
            dx,
            dw,
            db,
            accumulate,
        } = grads;
        // The kernels accumulate into dx, dgamma and dbeta: the trait overwrites dx (and the
        // parameter gradients without `accumulate`), so those start from zero; a gradient the
        // caller does not want goes to zeroed scratch.
        let (mut dx_tmp, mut dg_tmp, mut db_tmp) = (None, None, None);
        let dxb: &mut CudaBuf = match dx {
            Some(b) => {
                let b = f32_mut(b, "layer_norm backward: dx", n)?;
                ew::fill(&self.dev, b, n, 0.0)?;
                b
            }
            None => dx_tmp.insert(self.scratch_zeroed(n)?),
        };
        let dgb = self.zeroed_grad(
            dw,
            &mut dg_tmp,
            "layer_norm backward: dgamma",
            dim,
            accumulate,
        )?;
        let dbb = self.zeroed_grad(
            db,
            &mut db_tmp,
            "layer_norm backward: dbeta",
            dim,
            accumulate,
        )?;
        let r = norm::layer_norm_backward(
            &self.dev, dy, x, gamma, mean, rstd, rows, dim, dxb, dgb, dbb,
        );
        for t in [dx_tmp, dg_tmp, db_tmp].into_iter().flatten() {
            self.recycle(t);
        }
        r
    }

    fn gelu_forward(&self, x: &DeviceBuf, y: &mut DeviceBuf, len: usize) -> Result<()> {
        ew::gelu_forward(
            &self.dev,
            f32_buf(x, "gelu: x", len)?,
            f32_mut(y, "gelu: y", len)?,
            len,
        )
    }

    fn gelu_backward(
        &self,
        x: &DeviceBuf,
        dy: &DeviceBuf,
        dx: &mut DeviceBuf,
        len: usize,
    ) -> Result<()> {
        let x = f32_buf(x, "gelu backward: x", len)?;
        let dy = f32_buf(dy, "gelu backward: dy", len)?;
        let dx = f32_mut(dx, "gelu backward: dx", len)?;
        // The kernel accumulates; the trait overwrites.
        ew::fill(&self.dev, dx, len, 0.0)?;
        ew::gelu_backward(&self.dev, x, dy, dx, len)
    }

    fn attention_train(
        &self,
        qkv: &DeviceBuf,
        out: &mut DeviceBuf,
        lse: &mut DeviceBuf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let c = mul("attention", heads, head_dim)?;
        let rows = mul("attention", batch, seq)?;
        let qkv = f32_buf(
            qkv,
            "attention: qkv",
            mul("attention", rows, mul("attention", 3, c)?)?,
        )?;
        let out = f32_mut(out, "attention: out", mul("attention", rows, c)?)?;
        let lse = f32_mut(lse, "attention: lse", mul("attention", batch * heads, seq)?)?;
        let part = |w| HeadsLayout::fused_qkv(batch, seq, heads, head_dim, w);
        attention_forward(
            &self.dev,
            HeadsView::new(qkv, part(0)?),
            HeadsView::new(qkv, part(1)?),
            HeadsView::new(qkv, part(2)?),
            (out, HeadsLayout::seq_major(batch, seq, heads, head_dim)),
            Some(lse),
            AttentionOptions::causal(),
        )
    }

    fn attention_backward(
        &self,
        qkv: &DeviceBuf,
        out: &DeviceBuf,
        dout: &DeviceBuf,
        lse: &DeviceBuf,
        dqkv: &mut DeviceBuf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let c = mul("attention", heads, head_dim)?;
        let rows = mul("attention", batch, seq)?;
        let n = mul("attention", rows, c)?;
        let n3 = mul("attention", n, 3)?;
        let nl = mul("attention", rows, heads)?;
        let qkv = f32_buf(qkv, "attention backward: qkv", n3)?;
        let out = f32_buf(out, "attention backward: out", n)?;
        let dout = f32_buf(dout, "attention backward: dout", n)?;
        let lse = f32_buf(lse, "attention backward: lse", nl)?;
        let dqkv = f32_mut(dqkv, "attention backward: dqkv", n3)?;
        let part = |w| HeadsLayout::fused_qkv(batch, seq, heads, head_dim, w);
        let o = HeadsLayout::seq_major(batch, seq, heads, head_dim);
        cuda_attention_backward(
            &self.dev,
            HeadsView::new(qkv, part(0)?),
            HeadsView::new(qkv, part(1)?),
            HeadsView::new(qkv, part(2)?),
            HeadsView::new(out, o),
            HeadsView::new(dout, o),
            lse,
            AttentionGrads::FusedQkv(dqkv),
            AttentionOptions::causal(),
        )
    }

    fn cross_entropy(
        &self,
        logits: &mut DeviceBuf,
        targets: &[u32],
        rows: usize,
        vocab: usize,
        dscale: Option<f32>,
    ) -> Result<f32> {
        if targets.len() != rows || rows == 0 {
            return Err(Error::invalid(format!(
                "cross_entropy: {} targets for {rows} rows (at least one)",
                targets.len()
            )));
        }
        if vocab == 0 {
            return Err(Error::invalid("cross_entropy: vocab must be positive"));
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
        let logits = f32_mut(
            logits,
            "cross_entropy: logits",
            mul("cross_entropy", rows, vocab)?,
        )?;
        let mut losses = self.scratch(rows)?;
        let r = self.with_ids(&[targets], |t| match dscale {
            Some(d) => loss::cross_entropy_backward_inplace(
                &self.dev,
                logits,
                t,
                rows,
                vocab,
                d,
                Some(&mut losses),
            ),
            None => loss::cross_entropy_forward(&self.dev, logits, t, rows, vocab, &mut losses),
        });
        let sum = r.and_then(|_| self.scalar(|dev, s| reduce::sum(dev, &losses, rows, s)));
        self.recycle(losses);
        Ok((sum? as f64 / rows as f64) as f32)
    }

    fn embedding_backward(
        &self,
        ids: &[u32],
        positions: &[u32],
        dout: &DeviceBuf,
        dtokens: &mut DeviceBuf,
        dpos: &mut DeviceBuf,
        dim: usize,
    ) -> Result<()> {
        if ids.len() != positions.len() || dim == 0 {
            return Err(Error::invalid(format!(
                "embedding backward: {} ids, {} positions, width {dim}",
                ids.len(),
                positions.len()
            )));
        }
        let n = ids.len();
        let dout = f32_buf(dout, "embedding backward: dout", mul("embedding", n, dim)?)?;
        let (tl, pl) = (dtokens.buf.len(), dpos.buf.len());
        let dtokens = f32_mut(dtokens, "embedding backward: table", tl)?;
        let dpos = f32_mut(dpos, "embedding backward: table", pl)?;
        for (name, len, idx) in [("tokens", tl, ids), ("positions", pl, positions)] {
            let rows = len / dim;
            if let Some(&bad) = idx.iter().find(|&&i| i as usize >= rows) {
                return Err(Error::invalid(format!(
                    "embedding backward: {name} index {bad} outside a table of {rows} rows"
                )));
            }
        }
        if n == 0 {
            return Ok(());
        }
        // Tables whose length is not a multiple of dim: the whole rows only.
        self.with_ids(&[ids, positions], |idpos| {
            emb::embedding_backward_rows(&self.dev, idpos, 0, n, dout, dtokens, dim)?;
            emb::embedding_backward_rows(&self.dev, idpos, n, n, dout, dpos, dim)
        })
    }

    fn sum_squares(&self, xs: &[&DeviceBuf]) -> Result<f64> {
        if xs.is_empty() {
            return Ok(0.0);
        }
        let bufs = xs
            .iter()
            .map(|b| f32_buf(b, "sum_squares", b.buf.len()))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.scalar(|dev, s| reduce::sum_squares(dev, &bufs, s))? as f64)
    }

    fn dropout(&self, x: &mut DeviceBuf, len: usize, p: f32, seed: u64) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(format!(
                "dropout: p = {p} must be in [0, 1)"
            )));
        }
        ew::dropout(&self.dev, f32_mut(x, "dropout", len)?, len, p, seed)
    }

    // ---- convolutional nets ----

    fn conv(
        &self,
        g: &ConvGeometry,
        x: &DeviceBuf,
        w: &DeviceBuf,
        bias: Option<&DeviceBuf>,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let x = f32_buf(x, "conv: x", g.input_len())?;
        let bias = bias
            .map(|b| f32_buf(b, "conv: bias", g.out_channels()))
            .transpose()?;
        let y = f32_mut(y, "conv: y", g.output_len())?;
        if g.transposed {
            cuda_conv::conv_transpose2d_forward(&self.dev, g, x, conv_weight(w)?, bias, y)
        } else {
            cuda_conv::conv2d_forward(&self.dev, g, x, conv_weight(w)?, bias, y)
        }
    }

    fn conv_backward(
        &self,
        g: &ConvGeometry,
        x: &DeviceBuf,
        w: &DeviceBuf,
        dy: &DeviceBuf,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        let x = f32_buf(x, "conv backward: x", g.input_len())?;
        let dy = f32_buf(dy, "conv backward: dy", g.output_len())?;
        let w = conv_weight(w)?;
        let Grads {
            dx,
            dw,
            db,
            accumulate,
        } = grads;
        let run = |dx: Option<&mut CudaBuf>,
                   dw: Option<&mut CudaBuf>,
                   db: Option<&mut CudaBuf>|
         -> Result<()> {
            if g.transposed {
                cuda_conv::conv_transpose2d_backward(&self.dev, g, x, w, dy, dx, dw, db)
            } else {
                cuda_conv::conv2d_backward(&self.dev, g, x, w, dy, dx, dw, db)
            }
        };
        // dx is always overwritten; the kernels overwrite dw and db too.
        if let Some(dx) = dx {
            run(
                Some(f32_mut(dx, "conv backward: dx", g.input_len())?),
                None,
                None,
            )?;
        }
        self.grad_overwrite(dw, "conv backward: dw", g.weight_len(), accumulate, |b| {
            run(None, Some(b), None)
        })?;
        self.grad_overwrite(db, "conv backward: db", g.out_channels(), accumulate, |b| {
            run(None, None, Some(b))
        })
    }

    fn batch_norm_train(
        &self,
        s: &BnShape,
        x: &DeviceBuf,
        gamma: &DeviceBuf,
        beta: &DeviceBuf,
        running: Option<(&mut DeviceBuf, &mut DeviceBuf)>,
        momentum: f32,
        eps: f32,
        y: &mut DeviceBuf,
        saved_mean: &mut DeviceBuf,
        saved_rstd: &mut DeviceBuf,
    ) -> Result<()> {
        let c = s.channels;
        let running = match running {
            Some((m, v)) => Some((
                f32_mut(m, "batch_norm: running_mean", c)?,
                f32_mut(v, "batch_norm: running_var", c)?,
            )),
            None => None,
        };
        norm::batch_norm_train_forward(
            &self.dev,
            s,
            f32_buf(x, "batch_norm: x", s.len())?,
            f32_buf(gamma, "batch_norm: gamma", c)?,
            f32_buf(beta, "batch_norm: beta", c)?,
            eps,
            momentum,
            running,
            f32_mut(y, "batch_norm: y", s.len())?,
            f32_mut(saved_mean, "batch_norm: saved mean", c)?,
            f32_mut(saved_rstd, "batch_norm: saved rstd", c)?,
        )
    }

    fn batch_norm_eval(
        &self,
        s: &BnShape,
        x: &DeviceBuf,
        gamma: &DeviceBuf,
        beta: &DeviceBuf,
        running_mean: &DeviceBuf,
        running_var: &DeviceBuf,
        eps: f32,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let c = s.channels;
        norm::batch_norm_eval_forward(
            &self.dev,
            s,
            f32_buf(x, "batch_norm: x", s.len())?,
            f32_buf(gamma, "batch_norm: gamma", c)?,
            f32_buf(beta, "batch_norm: beta", c)?,
            f32_buf(running_mean, "batch_norm: running_mean", c)?,
            f32_buf(running_var, "batch_norm: running_var", c)?,
            eps,
            f32_mut(y, "batch_norm: y", s.len())?,
        )
    }

    fn batch_norm_backward(
        &self,
        s: &BnShape,
        x: &DeviceBuf,
        dy: &DeviceBuf,
        gamma: &DeviceBuf,
        saved_mean: &DeviceBuf,
        saved_rstd: &DeviceBuf,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        let c = s.channels;
        let x = f32_buf(x, "batch_norm backward: x", s.len())?;
        let dy = f32_buf(dy, "batch_norm backward: dy", s.len())?;
        let gamma = f32_buf(gamma, "batch_norm backward: gamma", c)?;
        let mean = f32_buf(saved_mean, "batch_norm backward: saved mean", c)?;
        let rstd = f32_buf(saved_rstd, "batch_norm backward: saved rstd", c)?;
        let Grads {
            dx,
            dw,
            db,
            accumulate,
        } = grads;
        // The kernel writes all three (overwriting): scratch for the ones not wanted, and for
        // parameter gradients that accumulate (added afterwards).
        let (mut dx_tmp, mut dg_tmp, mut db_tmp) = (None, None, None);
        let dxb: &mut CudaBuf = match dx {
            Some(b) => f32_mut(b, "batch_norm backward: dx", s.len())?,
            None => dx_tmp.insert(self.scratch(s.len())?),
        };
        let (mut dw, mut db) = (dw, db);
        let r = (|| -> Result<()> {
            let dgb: &mut CudaBuf = match dw.as_deref_mut() {
                Some(b) if !accumulate => f32_mut(b, "batch_norm backward: dgamma", c)?,
                _ => dg_tmp.insert(self.scratch(c)?),
            };
            let dbb: &mut CudaBuf = match db.as_deref_mut() {
                Some(b) if !accumulate => f32_mut(b, "batch_norm backward: dbeta", c)?,
                _ => db_tmp.insert(self.scratch(c)?),
            };
            norm::batch_norm_train_backward(&self.dev, s, x, dy, gamma, mean, rstd, dxb, dgb, dbb)?;
            if accumulate {
                for (dst, tmp, what) in [
                    (dw, &dg_tmp, "batch_norm backward: dgamma"),
                    (db, &db_tmp, "batch_norm backward: dbeta"),
                ] {
                    if let (Some(dst), Some(tmp)) = (dst, tmp) {
                        ew::add_inplace(&self.dev, f32_mut(dst, what, c)?, tmp, c)?;
                    }
                }
            }
            Ok(())
        })();
        for t in [dx_tmp, dg_tmp, db_tmp].into_iter().flatten() {
            self.recycle(t);
        }
        r
    }

    fn pointwise(
        &self,
        act: Pointwise,
        x: &DeviceBuf,
        y: &mut DeviceBuf,
        len: usize,
    ) -> Result<()> {
        ew::activation_forward(
            &self.dev,
            act,
            f32_buf(x, "activation: x", len)?,
            f32_mut(y, "activation: y", len)?,
            len,
        )
    }

    fn pointwise_inplace(&self, act: Pointwise, y: &mut DeviceBuf, len: usize) -> Result<()> {
        ew::activation_inplace(&self.dev, act, f32_mut(y, "activation: y", len)?, len)
    }

    fn pointwise_backward(
        &self,
        act: Pointwise,
        y: &DeviceBuf,
        dy: &DeviceBuf,
        dx: &mut DeviceBuf,
        len: usize,
    ) -> Result<()> {
        ew::activation_backward(
            &self.dev,
            act,
            f32_buf(y, "activation backward: y", len)?,
            f32_buf(dy, "activation backward: dy", len)?,
            f32_mut(dx, "activation backward: dx", len)?,
            len,
        )
    }

    fn bce(&self, p: &DeviceBuf, target: &DeviceBuf, len: usize) -> Result<f32> {
        let p = f32_buf(p, "bce: p", len)?;
        let t = f32_buf(target, "bce: target", len)?;
        // The loss and the number of inputs that are not probabilities, back in one copy.
        let (loss, outside) = self.scalar_checked(|dev, s| {
            loss::bce_forward(dev, p, t, len, s)?;
            reduce::count_outside(dev, p, len, 0.0, 1.0, s, 1)
        })?;
        if outside != 0.0 {
            return Err(Error::invalid(format!(
                "binary_cross_entropy: every input must be a probability in [0, 1], found {outside} \
                 that are not"
            )));
        }
        Ok(loss)
    }

    fn bce_backward(
        &self,
        p: &DeviceBuf,
        target: &DeviceBuf,
        dloss: f32,
        dp: &mut DeviceBuf,
        len: usize,
    ) -> Result<()> {
        loss::bce_backward(
            &self.dev,
            f32_buf(p, "bce: p", len)?,
            f32_buf(target, "bce: target", len)?,
            len,
            dloss,
            f32_mut(dp, "bce: dp", len)?,
        )
    }

    fn mean(&self, x: &DeviceBuf, len: usize) -> Result<f32> {
        if len == 0 {
            return Err(Error::invalid("mean of no elements"));
        }
        let x = f32_buf(x, "mean", len)?;
        let sum = self.scalar(|dev, s| reduce::sum(dev, x, len, s))?;
        Ok((sum as f64 / len as f64) as f32)
    }

    fn adam(
        &self,
        cfg: &AdamConfig,
        step: u64,
        params: &mut [&mut DeviceBuf],
        grads: &[&DeviceBuf],
        m: &mut [&mut DeviceBuf],
        v: &mut [&mut DeviceBuf],
    ) -> Result<()> {
        let n = params.len();
        if grads.len() != n || m.len() != n || v.len() != n {
            return Err(Error::invalid(format!(
                "adam: {n} parameters, {} gradients, {} and {} moments",
                grads.len(),
                m.len(),
                v.len()
            )));
        }
        if step == 0 || step > i32::MAX as u64 {
            return Err(Error::invalid(format!("adam: step {step} out of range")));
        }
        let p = optim::AdamParams {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            decoupled: cfg.decoupled,
        };
        for i in 0..n {
            let len = params[i].buf.len();
            let g = f32_buf(grads[i], "adam: gradient", len)?;
            let mi = f32_mut(m[i], "adam: m", len)?;
            let vi = f32_mut(v[i], "adam: v", len)?;
            let pi = f32_mut(params[i], "adam: parameter", len)?;
            if len > 0 {
                optim::adam_step(&self.dev, &p, step, pi, g, mi, vi, len)?;
            }
        }
        Ok(())
    }
}
