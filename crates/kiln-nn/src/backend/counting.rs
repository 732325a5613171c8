//! [`CountingBackend`]: the CPU backend behind opaque buffers, counting every transfer between
//! the host and the "device".
//!
//! Its buffers ([`OpaqueBuf`]) expose nothing: a graph written against [`Backend`] can only see
//! their contents through [`Backend::download`] (or a loss or mean returning a scalar), so the
//! counts it keeps ([`Transfers`]) are exactly what a GPU backend would move over the bus for the
//! same graph. Tests use it to show, for example, that a GPT-2 decode step uploads only the new
//! token id and downloads only the logits.
use super::cpu::{CpuBackend, CpuBuf};
use super::{
    Activation, Backend, BnShape, BufInfo, ConvGeometry, Grads, KvCache, LinearDims, MatrixOptions,
    Pointwise,
};
use crate::optim::AdamConfig;
use kiln_tensor::{Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A buffer of [`CountingBackend`]: nothing about it is visible outside the backend.
pub struct OpaqueBuf(CpuBuf);

/// Transfers counted so far: calls and 4-byte elements in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host → device calls (uploads, token ids).
    pub to_device: usize,
    /// Elements moved host → device (token ids and positions count one each).
    pub to_device_elements: usize,
    /// Device → host calls (downloads, returned scalars).
    pub to_host: usize,
    /// Elements moved device → host.
    pub to_host_elements: usize,
}

/// The CPU backend behind opaque buffers, counting transfers (see the module docs).
#[derive(Debug, Default)]
pub struct CountingBackend {
    inner: CpuBackend,
    to_device: AtomicUsize,
    to_device_elements: AtomicUsize,
    to_host: AtomicUsize,
    to_host_elements: AtomicUsize,
}

impl CountingBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counts so far.
    pub fn transfers(&self) -> Transfers {
        Transfers {
            to_device: self.to_device.load(Relaxed),
            to_device_elements: self.to_device_elements.load(Relaxed),
            to_host: self.to_host.load(Relaxed),
            to_host_elements: self.to_host_elements.load(Relaxed),
        }
    }

    /// Sets every count to zero.
    pub fn reset(&self) {
        for c in [
            &self.to_device,
            &self.to_device_elements,
            &self.to_host,
            &self.to_host_elements,
        ] {
            c.store(0, Relaxed);
        }
    }

    fn in_(&self, elements: usize) {
        self.to_device.fetch_add(1, Relaxed);
        self.to_device_elements.fetch_add(elements, Relaxed);
    }

    fn out(&self, elements: usize) {
        self.to_host.fetch_add(1, Relaxed);
        self.to_host_elements.fetch_add(elements, Relaxed);
    }
}

/// The inner buffers of a gradient set.
fn inner_grads<'a>(g: Grads<'a, CountingBackend>) -> Grads<'a, CpuBackend> {
    Grads {
        dx: g.dx.map(|b| &mut b.0),
        dw: g.dw.map(|b| &mut b.0),
        db: g.db.map(|b| &mut b.0),
        accumulate: g.accumulate,
    }
}

/// Runs `f` on CPU-backend caches holding the same buffers (moved out and back).
fn with_inner_caches<R>(
    caches: &mut [&mut KvCache<CountingBackend>],
    f: impl FnOnce(&mut [&mut KvCache<CpuBackend>]) -> R,
) -> R {
    let mut inner: Vec<KvCache<CpuBackend>> = caches
        .iter_mut()
        .map(|c| KvCache {
            n_head: c.n_head,
            head_dim: c.head_dim,
            capacity: c.capacity,
            len: c.len,
            k: std::mem::replace(&mut c.k.0, CpuBuf::F32(Vec::new())),
            v: std::mem::replace(&mut c.v.0, CpuBuf::F32(Vec::new())),
        })
        .collect();
    let r = {
        let mut refs: Vec<&mut KvCache<CpuBackend>> = inner.iter_mut().collect();
        f(&mut refs)
    };
    for (c, i) in caches.iter_mut().zip(inner) {
        c.len = i.len;
        c.k.0 = i.k;
        c.v.0 = i.v;
    }
    r
}

impl Backend for CountingBackend {
    type Buf = OpaqueBuf;

    fn name(&self) -> &'static str {
        "counting"
    }

    fn zeros(&self, len: usize) -> Result<OpaqueBuf> {
        self.inner.zeros(len).map(OpaqueBuf)
    }
    fn upload(&self, data: &[f32]) -> Result<OpaqueBuf> {
        self.in_(data.len());
        self.inner.upload(data).map(OpaqueBuf)
    }
    fn upload_into(&self, data: &[f32], dst: &mut OpaqueBuf, offset: usize) -> Result<()> {
        self.in_(data.len());
        self.inner.upload_into(data, &mut dst.0, offset)
    }
    fn download(&self, src: &OpaqueBuf, offset: usize, out: &mut [f32]) -> Result<()> {
        self.out(out.len());
        self.inner.download(&src.0, offset, out)
    }
    fn upload_matrix(&self, t: &Tensor, opts: &MatrixOptions) -> Result<OpaqueBuf> {
        self.in_(t.numel());
        self.inner.upload_matrix(t, opts).map(OpaqueBuf)
    }
    fn info(&self, buf: &OpaqueBuf) -> BufInfo {
        self.inner.info(&buf.0)
    }
    fn copy(
        &self,
        src: &OpaqueBuf,
        src_offset: usize,
        dst: &mut OpaqueBuf,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        self.inner
            .copy(&src.0, src_offset, &mut dst.0, dst_offset, len)
    }
    fn fill(&self, x: &mut OpaqueBuf, len: usize, value: f32) -> Result<()> {
        self.inner.fill(&mut x.0, len, value)
    }
    fn scale(&self, x: &mut OpaqueBuf, len: usize, s: f32) -> Result<()> {
        self.inner.scale(&mut x.0, len, s)
    }
    fn add(&self, x: &mut OpaqueBuf, y: &OpaqueBuf, len: usize) -> Result<()> {
        self.inner.add(&mut x.0, &y.0, len)
    }

    fn embedding(
        &self,
        ids: &[u32],
        positions: &[u32],
        tokens: &OpaqueBuf,
        pos_table: &OpaqueBuf,
        dim: usize,
        out: &mut OpaqueBuf,
    ) -> Result<()> {
        self.in_(ids.len() + positions.len());
        self.inner
            .embedding(ids, positions, &tokens.0, &pos_table.0, dim, &mut out.0)
    }
    fn linear(
        &self,
        x: &OpaqueBuf,
        w: &OpaqueBuf,
        bias: Option<&OpaqueBuf>,
        y: &mut OpaqueBuf,
        dims: LinearDims,
        act: Activation,
    ) -> Result<()> {
        self.inner
            .linear(&x.0, &w.0, bias.map(|b| &b.0), &mut y.0, dims, act)
    }
    fn linear_backward(
        &self,
        x: &OpaqueBuf,
        w: &OpaqueBuf,
        dy: &OpaqueBuf,
        dims: LinearDims,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        self.inner
            .linear_backward(&x.0, &w.0, &dy.0, dims, inner_grads(grads))
    }
    fn layer_norm(
        &self,
        x: &OpaqueBuf,
        gamma: &OpaqueBuf,
        beta: &OpaqueBuf,
        y: &mut OpaqueBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.inner
            .layer_norm(&x.0, &gamma.0, &beta.0, &mut y.0, rows, dim, eps)
    }
    fn attention(
        &self,
        qkv: &OpaqueBuf,
        t: usize,
        caches: &mut [&mut KvCache<Self>],
        out: &mut OpaqueBuf,
    ) -> Result<()> {
        with_inner_caches(caches, |inner| {
            self.inner.attention(&qkv.0, t, inner, &mut out.0)
        })
    }
    fn gelu(&self, x: &mut OpaqueBuf, len: usize) -> Result<()> {
        self.inner.gelu(&mut x.0, len)
    }
    fn softmax(&self, x: &mut OpaqueBuf, rows: usize, cols: usize) -> Result<()> {
        self.inner.softmax(&mut x.0, rows, cols)
    }

    fn layer_norm_train(
        &self,
        x: &OpaqueBuf,
        gamma: &OpaqueBuf,
        beta: &OpaqueBuf,
        y: &mut OpaqueBuf,
        mean: &mut OpaqueBuf,
        rstd: &mut OpaqueBuf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.inner.layer_norm_train(
            &x.0,
            &gamma.0,
            &beta.0,
            &mut y.0,
            &mut mean.0,
            &mut rstd.0,
            rows,
            dim,
            eps,
        )
    }
    fn layer_norm_backward(
        &self,
        x: &OpaqueBuf,
        gamma: &OpaqueBuf,
        mean: &OpaqueBuf,
        rstd: &OpaqueBuf,
        dy: &OpaqueBuf,
        rows: usize,
        dim: usize,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        self.inner.layer_norm_backward(
            &x.0,
            &gamma.0,
            &mean.0,
            &rstd.0,
            &dy.0,
            rows,
            dim,
            inner_grads(grads),
        )
    }
    fn gelu_forward(&self, x: &OpaqueBuf, y: &mut OpaqueBuf, len: usize) -> Result<()> {
        self.inner.gelu_forward(&x.0, &mut y.0, len)
    }
    fn gelu_backward(
        &self,
        x: &OpaqueBuf,
        dy: &OpaqueBuf,
        dx: &mut OpaqueBuf,
        len: usize,
    ) -> Result<()> {
        self.inner.gelu_backward(&x.0, &dy.0, &mut dx.0, len)
    }
    fn attention_train(
        &self,
        qkv: &OpaqueBuf,
        out: &mut OpaqueBuf,
        lse: &mut OpaqueBuf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.inner
            .attention_train(&qkv.0, &mut out.0, &mut lse.0, batch, seq, heads, head_dim)
    }
    fn attention_backward(
        &self,
        qkv: &OpaqueBuf,
        out: &OpaqueBuf,
        dout: &OpaqueBuf,
        lse: &OpaqueBuf,
        dqkv: &mut OpaqueBuf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.inner.attention_backward(
            &qkv.0,
            &out.0,
            &dout.0,
            &lse.0,
            &mut dqkv.0,
            batch,
            seq,
            heads,
            head_dim,
        )
    }
    fn cross_entropy(
        &self,
        logits: &mut OpaqueBuf,
        targets: &[u32],
        rows: usize,
        vocab: usize,
        dscale: Option<f32>,
    ) -> Result<f32> {
        self.in_(targets.len());
        self.out(1);
        self.inner
            .cross_entropy(&mut logits.0, targets, rows, vocab, dscale)
    }
    fn embedding_backward(
        &self,
        ids: &[u32],
        positions: &[u32],
        dout: &OpaqueBuf,
        dtokens: &mut OpaqueBuf,
        dpos: &mut OpaqueBuf,
        dim: usize,
    ) -> Result<()> {
        self.in_(ids.len() + positions.len());
        self.inner
            .embedding_backward(ids, positions, &dout.0, &mut dtokens.0, &mut dpos.0, dim)
    }
    fn sum_squares(&self, xs: &[&OpaqueBuf]) -> Result<f64> {
        self.out(1);
        let inner: Vec<&CpuBuf> = xs.iter().map(|b| &b.0).collect();
        self.inner.sum_squares(&inner)
    }
    fn dropout(&self, x: &mut OpaqueBuf, len: usize, p: f32, seed: u64) -> Result<()> {
        self.inner.dropout(&mut x.0, len, p, seed)
    }

    fn conv(
        &self,
        g: &ConvGeometry,
        x: &OpaqueBuf,
        w: &OpaqueBuf,
        bias: Option<&OpaqueBuf>,
        y: &mut OpaqueBuf,
    ) -> Result<()> {
        self.inner.conv(g, &x.0, &w.0, bias.map(|b| &b.0), &mut y.0)
    }
    fn conv_backward(
        &self,
        g: &ConvGeometry,
        x: &OpaqueBuf,
        w: &OpaqueBuf,
        dy: &OpaqueBuf,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        self.inner
            .conv_backward(g, &x.0, &w.0, &dy.0, inner_grads(grads))
    }
    fn batch_norm_train(
        &self,
        s: &BnShape,
        x: &OpaqueBuf,
        gamma: &OpaqueBuf,
        beta: &OpaqueBuf,
        running: Option<(&mut OpaqueBuf, &mut OpaqueBuf)>,
        momentum: f32,
        eps: f32,
        y: &mut OpaqueBuf,
        saved_mean: &mut OpaqueBuf,
        saved_rstd: &mut OpaqueBuf,
    ) -> Result<()> {
        self.inner.batch_norm_train(
            s,
            &x.0,
            &gamma.0,
            &beta.0,
            running.map(|(m, v)| (&mut m.0, &mut v.0)),
            momentum,
            eps,
            &mut y.0,
            &mut saved_mean.0,
            &mut saved_rstd.0,
        )
    }
    fn batch_norm_eval(
        &self,
        s: &BnShape,
        x: &OpaqueBuf,
        gamma: &OpaqueBuf,
        beta: &OpaqueBuf,
        running_mean: &OpaqueBuf,
        running_var: &OpaqueBuf,
        eps: f32,
        y: &mut OpaqueBuf,
    ) -> Result<()> {
        self.inner.batch_norm_eval(
            s,
            &x.0,
            &gamma.0,
            &beta.0,
            &running_mean.0,
            &running_var.0,
            eps,
            &mut y.0,
        )
    }
    fn batch_norm_backward(
        &self,
        s: &BnShape,
        x: &OpaqueBuf,
        dy: &OpaqueBuf,
        gamma: &OpaqueBuf,
        saved_mean: &OpaqueBuf,
        saved_rstd: &OpaqueBuf,
        grads: Grads<'_, Self>,
    ) -> Result<()> {
        self.inner.batch_norm_backward(
            s,
            &x.0,
            &dy.0,
            &gamma.0,
            &saved_mean.0,
            &saved_rstd.0,
            inner_grads(grads),
        )
    }
    fn pointwise(
        &self,
        act: Pointwise,
        x: &OpaqueBuf,
        y: &mut OpaqueBuf,
        len: usize,
    ) -> Result<()> {
        self.inner.pointwise(act, &x.0, &mut y.0, len)
    }
    fn pointwise_inplace(&self, act: Pointwise, y: &mut OpaqueBuf, len: usize) -> Result<()> {
        self.inner.pointwise_inplace(act, &mut y.0, len)
    }
    fn pointwise_backward(
        &self,
        act: Pointwise,
        y: &OpaqueBuf,
        dy: &OpaqueBuf,
        dx: &mut OpaqueBuf,
        len: usize,
    ) -> Result<()> {
        self.inner
            .pointwise_backward(act, &y.0, &dy.0, &mut dx.0, len)
    }
    fn bce(&self, p: &OpaqueBuf, target: &OpaqueBuf, len: usize) -> Result<f32> {
        self.out(1);
        self.inner.bce(&p.0, &target.0, len)
    }
    fn bce_backward(
        &self,
        p: &OpaqueBuf,
        target: &OpaqueBuf,
        dloss: f32,
        dp: &mut OpaqueBuf,
        len: usize,
    ) -> Result<()> {
        self.inner
            .bce_backward(&p.0, &target.0, dloss, &mut dp.0, len)
    }
    fn mean(&self, x: &OpaqueBuf, len: usize) -> Result<f32> {
        self.out(1);
        self.inner.mean(&x.0, len)
    }
    fn adam(
        &self,
        cfg: &AdamConfig,
        step: u64,
        params: &mut [&mut OpaqueBuf],
        grads: &[&OpaqueBuf],
        m: &mut [&mut OpaqueBuf],
        v: &mut [&mut OpaqueBuf],
    ) -> Result<()> {
        let mut p: Vec<&mut CpuBuf> = params.iter_mut().map(|b| &mut b.0).collect();
        let g: Vec<&CpuBuf> = grads.iter().map(|b| &b.0).collect();
        let mut m: Vec<&mut CpuBuf> = m.iter_mut().map(|b| &mut b.0).collect();
        let mut v: Vec<&mut CpuBuf> = v.iter_mut().map(|b| &mut b.0).collect();
        self.inner.adam(cfg, step, &mut p, &g, &mut m, &mut v)
    }
}
