//! Attention (`kernels/attention.cu`, `kernels/attention_tc.cu`): flash-style prefill (with the
//! row log-sum-exp for training), its backward, the KV-cache append and the decode step.
//!
//! Operands are strided views of `[batch, heads, seq, head_dim]` tensors with `head_dim`
//! contiguous ([`HeadsLayout`], kiln-cpu's `HeadsRef`): the plain layout, `[batch, seq, heads ·
//! head_dim]` and one third of GPT-2's fused qkv `[batch·seq, 3·heads·head_dim]` are views, not
//! copies. Causal masks are aligned bottom-right: query `i` of `Tq` sees keys `j ≤ i + (Tk − Tq)`.
use super::i32_arg;
use crate::device::{Arg, LaunchDims};
use crate::sources;
use crate::{CudaBuf, CudaDevice};
use kiln_tensor::{DType, Error, Result};

/// Where a `[batch, heads, seq, head_dim]` view lives in its buffer: element `(b, h, t, d)` is
/// `offset + b·stride_batch + h·stride_head + t·stride_seq + d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadsLayout {
    pub offset: usize,
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub stride_batch: usize,
    pub stride_head: usize,
    pub stride_seq: usize,
}

impl HeadsLayout {
    /// `[batch, heads, seq, head_dim]`, row-major.
    pub fn contiguous(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        HeadsLayout {
            offset: 0,
            batch,
            heads,
            seq,
            head_dim,
            stride_batch: heads * seq * head_dim,
            stride_head: seq * head_dim,
            stride_seq: head_dim,
        }
    }

    /// `[batch, seq, heads·head_dim]` (what feeds the output projection).
    pub fn seq_major(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        HeadsLayout {
            offset: 0,
            batch,
            heads,
            seq,
            head_dim,
            stride_batch: seq * heads * head_dim,
            stride_head: head_dim,
            stride_seq: heads * head_dim,
        }
    }

    /// Part `which` (0 = Q, 1 = K, 2 = V) of a fused projection `[batch·seq, 3·heads·head_dim]`
    /// (head `h` at columns `h·head_dim..` of each third).
    pub fn fused_qkv(
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        which: usize,
    ) -> Result<Self> {
        if which > 2 {
            return Err(Error::invalid(format!(
                "attention: fused QKV part {which} (must be 0, 1 or 2)"
            )));
        }
        let c = heads * head_dim;
        Ok(HeadsLayout {
            offset: which * c,
            batch,
            heads,
            seq,
            head_dim,
            stride_batch: seq * 3 * c,
            stride_head: head_dim,
            stride_seq: 3 * c,
        })
    }

    fn dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.seq, self.head_dim]
    }

    fn is_empty(&self) -> bool {
        self.dims().contains(&0)
    }

    /// Checks the view against a buffer of `len` elements; with `injective`, that distinct rows
    /// do not overlap (outputs).
    fn check(&self, name: &str, len: usize, injective: bool) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let dims = [
            (self.batch, self.stride_batch),
            (self.heads, self.stride_head),
            (self.seq, self.stride_seq),
        ];
        let mut last = Some(self.offset + self.head_dim - 1);
        for &(n, s) in &dims {
            last = last.and_then(|l| (n - 1).checked_mul(s).and_then(|x| x.checked_add(l)));
        }
        match last {
            Some(l) if l < len => {}
            _ => {
                return Err(Error::invalid(format!(
                    "attention: {name} view {:?} (strides {}, {}, {}, offset {}) exceeds its buffer of {len} elements",
                    self.dims(),
                    self.stride_batch,
                    self.stride_head,
                    self.stride_seq,
                    self.offset
                )))
            }
        }
        if injective {
            let mut ds: Vec<(usize, usize)> =
                dims.iter().copied().filter(|&(n, _)| n > 1).collect();
            ds.sort_by_key(|&(_, s)| s);
            let mut span = self.head_dim;
            for (n, s) in ds {
                if s < span {
                    return Err(Error::invalid(format!(
                        "attention: {name} view has overlapping rows (stride {s} < span {span})"
                    )));
                }
                span += (n - 1) * s;
            }
        }
        Ok(())
    }

    fn strides(&self) -> Arg<'static> {
        Arg::I64x3([
            self.stride_batch as i64,
            self.stride_head as i64,
            self.stride_seq as i64,
        ])
    }
}

/// A read-only view: a buffer and where the tensor lives in it.
#[derive(Clone, Copy, Debug)]
pub struct HeadsView<'a> {
    pub buf: &'a CudaBuf,
    pub layout: HeadsLayout,
}

impl<'a> HeadsView<'a> {
    pub fn new(buf: &'a CudaBuf, layout: HeadsLayout) -> Self {
        HeadsView { buf, layout }
    }
}

/// Options of one attention call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    /// Causal mask, aligned bottom-right.
    pub causal: bool,
    /// Score scale; `None` means `1/√head_dim`.
    pub scale: Option<f32>,
}

impl AttentionOptions {
    pub fn causal() -> Self {
        AttentionOptions {
            causal: true,
            scale: None,
        }
    }
    fn scale(&self, d: usize) -> Result<f32> {
        let s = self.scale.unwrap_or(1.0 / (d as f32).sqrt());
        if !s.is_finite() {
            return Err(Error::invalid(format!(
                "attention: scale {s} is not finite"
            )));
        }
        Ok(s)
    }
}

const BQ: usize = 32;

fn dmax(d: usize) -> Result<usize> {
    match d {
        1..=64 => Ok(64),
        65..=128 => Ok(128),
        _ => Err(Error::invalid(format!(
            "attention: head_dim {d} (the kernels take 1..=128)"
        ))),
    }
}

fn tname(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        _ => "f16",
    }
}

fn check_shapes(q: &HeadsLayout, k: &HeadsLayout, v: &HeadsLayout, o: &HeadsLayout) -> Result<()> {
    if k.dims() != v.dims() {
        return Err(Error::shape(
            "attention: v (must match k)",
            &k.dims(),
            &v.dims(),
        ));
    }
    if q.batch != k.batch || q.heads != k.heads || q.head_dim != k.head_dim {
        return Err(Error::shape(
            "attention: k (batch, heads, head_dim must match q)",
            &[q.batch, q.heads, q.head_dim],
            &[k.batch, k.heads, k.head_dim],
        ));
    }
    if o.dims() != q.dims() {
        return Err(Error::shape(
            "attention: out (must match q)",
            &q.dims(),
            &o.dims(),
        ));
    }
    Ok(())
}

/// `out = softmax(scale·q·kᵀ + mask)·v` for every (batch, head); with `lse`
/// (`[batch, heads, Tq]` f32), each query row's log-sum-exp of the scaled scores is saved (what
/// [`attention_backward`] needs; −∞ for a row that sees no key).
///
/// Kernels: `q` f32 with `k`, `v` f32, bf16 or f16 (the same) → the f32 flash kernel
/// (head_dim ≤ 128); `q`, `k`, `v` all bf16 (or all f16), head_dim 64 or 128, strides and
/// offsets multiples of 8 → the tensor-core flash kernel. `out` is f32.
pub fn attention_forward(
    dev: &CudaDevice,
    q: HeadsView<'_>,
    k: HeadsView<'_>,
    v: HeadsView<'_>,
    out: (&mut CudaBuf, HeadsLayout),
    lse: Option<&mut CudaBuf>,
    opts: AttentionOptions,
) -> Result<()> {
    let (obuf, o) = out;
    check_shapes(&q.layout, &k.layout, &v.layout, &o)?;
    q.layout.check("q", q.buf.len(), false)?;
    k.layout.check("k", k.buf.len(), false)?;
    v.layout.check("v", v.buf.len(), false)?;
    o.check("out", obuf.len(), true)?;
    obuf.expect_dtype("attention out", DType::F32)?;
    if k.buf.dtype() != v.buf.dtype() {
        return Err(Error::invalid(format!(
            "attention: k is {} and v {}",
            k.buf.dtype(),
            v.buf.dtype()
        )));
    }
    let (b, h, tq, tk, d) = (
        q.layout.batch,
        q.layout.heads,
        q.layout.seq,
        k.layout.seq,
        q.layout.head_dim,
    );
    if let Some(l) = &lse {
        l.check("attention lse", DType::F32, b * h * tq)?;
    }
    if q.layout.is_empty() {
        return Ok(());
    }
    let scale = opts.scale(d)?;
    let lse_arg = match &lse {
        Some(l) => Arg::Buf(l),
        None => Arg::I64(0),
    };
    let (hh, tqa, tka) = (i32_arg("heads", h)?, i32_arg("Tq", tq)?, i32_arg("Tk", tk)?);
    let grid_y = u32::try_from(h).ok().filter(|&x| x <= 65535);
    let grid_z = u32::try_from(b).ok().filter(|&x| x <= 65535);
    let (Some(gy), Some(gz)) = (grid_y, grid_z) else {
        return Err(Error::invalid(format!(
            "attention: {b} batches × {h} heads exceed the grid"
        )));
    };
    match q.buf.dtype() {
        DType::F32 => {
            let dm = dmax(d)?;
            let smem = ((3 * 32 * (d + 1) + 32 * 33) * 4) as u32;
            dev.launch(
                &sources::ATTENTION,
                &format!("attn_fwd_f32_d{dm}_{}", tname(k.buf.dtype())),
                LaunchDims {
                    grid: [tq.div_ceil(BQ) as u32, gy, gz],
                    block: [128, 1, 1],
                    smem,
                },
                &[
                    Arg::At(q.buf, q.layout.offset),
                    q.layout.strides(),
                    Arg::At(k.buf, k.layout.offset),
                    k.layout.strides(),
                    Arg::At(v.buf, v.layout.offset),
                    v.layout.strides(),
                    Arg::At(obuf, o.offset),
                    o.strides(),
                    lse_arg,
                    Arg::I32(hh),
                    Arg::I32(tqa),
                    Arg::I32(tka),
                    Arg::I32(d as i32),
                    Arg::F32(scale),
                    Arg::I32(opts.causal as i32),
                ],
            )
        }
        DType::BF16 | DType::F16 => {
            if k.buf.dtype() != q.buf.dtype() {
                return Err(Error::invalid(format!(
                    "attention: the tensor-core kernel takes q, k, v of one type, got {} and {}",
                    q.buf.dtype(),
                    k.buf.dtype()
                )));
            }
            if d != 64 && d != 128 {
                return Err(Error::invalid(format!(
                    "attention: the tensor-core kernel takes head_dim 64 or 128, got {d}"
                )));
            }
            let aligned = [&q.layout, &k.layout, &v.layout].iter().all(|l| {
                [l.offset, l.stride_batch, l.stride_head, l.stride_seq]
                    .iter()
                    .all(|x| x.is_multiple_of(8))
            });
            if !aligned {
                return Err(Error::invalid(
                    "attention: the tensor-core kernel needs offsets and strides that are multiples of 8",
                ));
            }
            let smem = (5 * 64 * d * 2) as u32;
            dev.launch(
                &sources::ATTENTION_TC,
                &format!("flash_fwd_{}_d{d}", tname(q.buf.dtype())),
                LaunchDims {
                    grid: [tq.div_ceil(64) as u32, gy, gz],
                    block: [128, 1, 1],
                    smem,
                },
                &[
                    Arg::At(q.buf, q.layout.offset),
                    q.layout.strides(),
                    Arg::At(k.buf, k.layout.offset),
                    k.layout.strides(),
                    Arg::At(v.buf, v.layout.offset),
                    v.layout.strides(),
                    Arg::At(obuf, o.offset),
                    o.strides(),
                    lse_arg,
                    Arg::I32(hh),
                    Arg::I32(tqa),
                    Arg::I32(tka),
                    Arg::F32(scale),
                    Arg::I32(opts.causal as i32),
                ],
            )
        }
        other => Err(Error::invalid(format!("attention: q of {other}"))),
    }
}

/// Where the backward pass writes dQ, dK, dV.
#[allow(clippy::large_enum_variant)] // a few words on the stack, passed once per call
pub enum AttentionGrads<'a> {
    /// Three buffers, each with its layout (the shapes of q, k, v).
    Separate {
        dq: (&'a mut CudaBuf, HeadsLayout),
        dk: (&'a mut CudaBuf, HeadsLayout),
        dv: (&'a mut CudaBuf, HeadsLayout),
    },
    /// One buffer in the fused qkv layout `[batch·seq, 3·heads·head_dim]` (the gradient of
    /// GPT-2's `c_attn` output).
    FusedQkv(&'a mut CudaBuf),
}

/// The backward pass of [`attention_forward`] (f32, head_dim ≤ 128), flash-style: scores are
/// recomputed tile by tile from q, k and the saved `lse`; nothing of size Tq×Tk is stored.
/// `out` is the forward output O and `dout` its gradient (`[batch, heads, Tq, head_dim]`
/// views). dQ, dK, dV are overwritten; every element is computed by one thread (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dev: &CudaDevice,
    q: HeadsView<'_>,
    k: HeadsView<'_>,
    v: HeadsView<'_>,
    out: HeadsView<'_>,
    dout: HeadsView<'_>,
    lse: &CudaBuf,
    grads: AttentionGrads<'_>,
    opts: AttentionOptions,
) -> Result<()> {
    check_shapes(&q.layout, &k.layout, &v.layout, &out.layout)?;
    if dout.layout.dims() != q.layout.dims() {
        return Err(Error::shape(
            "attention: dout (must match q)",
            &q.layout.dims(),
            &dout.layout.dims(),
        ));
    }
    for (name, x) in [
        ("q", &q),
        ("k", &k),
        ("v", &v),
        ("out", &out),
        ("dout", &dout),
    ] {
        x.buf
            .expect_dtype(&format!("attention backward {name}"), DType::F32)?;
        x.layout.check(name, x.buf.len(), false)?;
    }
    let (b, h, tq, tk, d) = (
        q.layout.batch,
        q.layout.heads,
        q.layout.seq,
        k.layout.seq,
        q.layout.head_dim,
    );
    lse.check("attention lse", DType::F32, b * h * tq)?;
    let (dqb, dql, dkb, dkl, dvb, dvl): (
        &CudaBuf,
        HeadsLayout,
        &CudaBuf,
        HeadsLayout,
        &CudaBuf,
        HeadsLayout,
    ) = match grads {
        AttentionGrads::Separate { dq, dk, dv } => {
            for (name, (buf, l), want) in [
                ("dq", &dq, &q.layout),
                ("dk", &dk, &k.layout),
                ("dv", &dv, &v.layout),
            ] {
                if l.dims() != want.dims() {
                    return Err(Error::shape(
                        format!("attention: {name}"),
                        &want.dims(),
                        &l.dims(),
                    ));
                }
                buf.expect_dtype(&format!("attention {name}"), DType::F32)?;
                l.check(name, buf.len(), true)?;
            }
            (dq.0, dq.1, dk.0, dk.1, dv.0, dv.1)
        }
        AttentionGrads::FusedQkv(buf) => {
            if tq != tk {
                return Err(Error::invalid(
                    "attention: a fused dqkv needs as many queries as keys",
                ));
            }
            buf.expect_dtype("attention dqkv", DType::F32)?;
            let ls: Vec<HeadsLayout> = (0..3)
                .map(|w| HeadsLayout::fused_qkv(b, tq, h, d, w))
                .collect::<Result<_>>()?;
            for (w, l) in ls.iter().enumerate() {
                l.check(["dq", "dk", "dv"][w], buf.len(), true)?;
            }
            let buf: &CudaBuf = buf;
            (buf, ls[0], buf, ls[1], buf, ls[2])
        }
    };
    if q.layout.is_empty() || tk == 0 {
        return Ok(());
    }
    let dm = dmax(d)?;
    let scale = opts.scale(d)?;
    let (hh, tqa, tka) = (i32_arg("heads", h)?, i32_arg("Tq", tq)?, i32_arg("Tk", tk)?);
    let rows = b * h * tq;
    let delta = dev.alloc(DType::F32, rows)?;
    dev.launch(
        &sources::ATTENTION,
        "attn_bwd_delta",
        LaunchDims::linear(rows.div_ceil(8) as u32, 256, 0),
        &[
            Arg::At(out.buf, out.layout.offset),
            out.layout.strides(),
            Arg::At(dout.buf, dout.layout.offset),
            dout.layout.strides(),
            Arg::Buf(&delta),
            Arg::I32(hh),
            Arg::I32(tqa),
            Arg::I32(d as i32),
            Arg::I64(rows as i64),
        ],
    )?;
    let common = [
        Arg::At(q.buf, q.layout.offset),
        q.layout.strides(),
        Arg::At(k.buf, k.layout.offset),
        k.layout.strides(),
        Arg::At(v.buf, v.layout.offset),
        v.layout.strides(),
        Arg::At(dout.buf, dout.layout.offset),
        dout.layout.strides(),
        Arg::Buf(lse),
        Arg::Buf(&delta),
    ];
    let tail = [
        Arg::I32(hh),
        Arg::I32(tqa),
        Arg::I32(tka),
        Arg::I32(d as i32),
        Arg::F32(scale),
        Arg::I32(opts.causal as i32),
    ];
    let dkdv_smem = ((4 * 32 * (d + 1) + 2 * 32 * 33 + 64) * 4) as u32;
    let mut args = common.to_vec();
    args.extend([
        Arg::At(dkb, dkl.offset),
        dkl.strides(),
        Arg::At(dvb, dvl.offset),
        dvl.strides(),
    ]);
    args.extend(tail);
    dev.launch(
        &sources::ATTENTION,
        &format!("attn_bwd_dkdv_f32_d{dm}"),
        LaunchDims {
            grid: [tk.div_ceil(32) as u32, h as u32, b as u32],
            block: [128, 1, 1],
            smem: dkdv_smem,
        },
        &args,
    )?;
    let dq_smem = ((4 * 32 * (d + 1) + 32 * 33) * 4) as u32;
    let mut args = common.to_vec();
    args.extend([Arg::At(dqb, dql.offset), dql.strides()]);
    args.extend(tail);
    dev.launch(
        &sources::ATTENTION,
        &format!("attn_bwd_dq_f32_d{dm}"),
        LaunchDims {
            grid: [tq.div_ceil(32) as u32, h as u32, b as u32],
            block: [128, 1, 1],
            smem: dq_smem,
        },
        &args,
    )
}

/// A KV cache for one layer: keys (or values) of `sequences` sequences laid out
/// `[sequences, heads, capacity, head_dim]` starting at element `offset` of a buffer
/// (f32, bf16 or f16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheLayout {
    pub offset: usize,
    pub sequences: usize,
    pub heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl KvCacheLayout {
    fn len(&self) -> usize {
        self.sequences * self.heads * self.capacity * self.head_dim
    }
    fn check(&self, name: &str, buf: &CudaBuf) -> Result<()> {
        if self.offset + self.len() > buf.len() {
            return Err(Error::invalid(format!(
                "kv cache: {name} {self:?} exceeds its buffer of {} elements",
                buf.len()
            )));
        }
        if !matches!(buf.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::invalid(format!(
                "kv cache: {name} of {}",
                buf.dtype()
            )));
        }
        Ok(())
    }
}

/// `cache[s, h, pos + t, :] = src[s, h, t, :]` for the `src.seq` new positions of every
/// sequence (f32 source, converted to the cache's type). Errors past the capacity.
pub fn kv_cache_append(
    dev: &CudaDevice,
    src: HeadsView<'_>,
    cache: &mut CudaBuf,
    layout: KvCacheLayout,
    pos: usize,
) -> Result<()> {
    let s = &src.layout;
    src.buf.expect_dtype("kv_cache_append src", DType::F32)?;
    s.check("src", src.buf.len(), false)?;
    layout.check("cache", cache)?;
    if s.batch != layout.sequences || s.heads != layout.heads || s.head_dim != layout.head_dim {
        return Err(Error::shape(
            "kv_cache_append: src (sequences, heads, head_dim of the cache)",
            &[layout.sequences, layout.heads, layout.head_dim],
            &[s.batch, s.heads, s.head_dim],
        ));
    }
    if pos + s.seq > layout.capacity {
        return Err(Error::Capacity(format!(
            "kv cache: positions {pos}..{} exceed the capacity {}",
            pos + s.seq,
            layout.capacity
        )));
    }
    if s.is_empty() {
        return Ok(());
    }
    let rows = s.batch * s.heads * s.seq;
    dev.launch(
        &sources::ATTENTION,
        &format!("kv_append_{}", tname(cache.dtype())),
        LaunchDims::linear(
            i32_arg("rows", rows)? as u32,
            super::row_threads(s.head_dim, 128),
            0,
        ),
        &[
            Arg::At(src.buf, s.offset),
            s.strides(),
            Arg::At(cache, layout.offset),
            Arg::I32(i32_arg("heads", s.heads)?),
            Arg::I32(i32_arg("seq", s.seq)?),
            Arg::I32(i32_arg("capacity", layout.capacity)?),
            Arg::I32(i32_arg("head_dim", s.head_dim)?),
            Arg::I32(i32_arg("pos", pos)?),
        ],
    )
}

/// How many cached positions each sequence attends to in a decode step.
#[derive(Clone, Copy, Debug)]
pub enum DecodeLens<'a> {
    /// The same length for every sequence.
    Uniform(usize),
    /// One length per sequence (i32 `[sequences]`, each ≤ capacity; checked by the caller).
    PerSequence(&'a CudaBuf),
}

/// One decode step: for every sequence `s` and head `h`,
/// `out[s, h] = softmax(scale·q[s, h]·K[s, h, :len]ᵀ)·V[s, h, :len]` over the cache (`q` and
/// `out` are `[sequences, heads, 1, head_dim]` f32 views; `k`, `v` caches of one dtype).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    dev: &CudaDevice,
    q: HeadsView<'_>,
    k_cache: &CudaBuf,
    v_cache: &CudaBuf,
    layout: KvCacheLayout,
    lens: DecodeLens<'_>,
    out: (&mut CudaBuf, HeadsLayout),
    scale: Option<f32>,
) -> Result<()> {
    let (obuf, o) = out;
    let ql = &q.layout;
    q.buf.expect_dtype("attention_decode q", DType::F32)?;
    obuf.expect_dtype("attention_decode out", DType::F32)?;
    ql.check("q", q.buf.len(), false)?;
    o.check("out", obuf.len(), true)?;
    layout.check("k cache", k_cache)?;
    layout.check("v cache", v_cache)?;
    if k_cache.dtype() != v_cache.dtype() {
        return Err(Error::invalid(
            "attention_decode: k and v caches of different types",
        ));
    }
    let want = [layout.sequences, layout.heads, 1, layout.head_dim];
    if ql.dims() != want || o.dims() != want {
        return Err(Error::shape(
            "attention_decode: q and out",
            &want,
            &ql.dims(),
        ));
    }
    let d = layout.head_dim;
    let dm = dmax(d)?;
    let scale = AttentionOptions {
        causal: false,
        scale,
    }
    .scale(d)?;
    let (lens_arg, len) = match lens {
        DecodeLens::Uniform(n) => {
            if n > layout.capacity {
                return Err(Error::Capacity(format!(
                    "attention_decode: length {n} exceeds the capacity {}",
                    layout.capacity
                )));
            }
            (Arg::I64(0), n)
        }
        DecodeLens::PerSequence(b) => {
            b.check("attention_decode lens", DType::I32, layout.sequences)?;
            (Arg::Buf(b), 0)
        }
    };
    if ql.is_empty() {
        return Ok(());
    }
    let (Ok(gx), Ok(gy)) = (u16::try_from(layout.heads), u16::try_from(layout.sequences)) else {
        return Err(Error::invalid(
            "attention_decode: too many heads or sequences for one launch",
        ));
    };
    dev.launch(
        &sources::ATTENTION,
        &format!("attn_decode_d{dm}_{}", tname(k_cache.dtype())),
        LaunchDims {
            grid: [gx as u32, gy as u32, 1],
            block: [128, 1, 1],
            smem: 0,
        },
        &[
            Arg::At(q.buf, ql.offset),
            ql.strides(),
            Arg::At(k_cache, layout.offset),
            Arg::At(v_cache, layout.offset),
            Arg::At(obuf, o.offset),
            o.strides(),
            lens_arg,
            Arg::I32(i32_arg("len", len)?),
            Arg::I32(i32_arg("heads", layout.heads)?),
            Arg::I32(i32_arg("capacity", layout.capacity)?),
            Arg::I32(d as i32),
            Arg::F32(scale),
        ],
    )
}

/// Sequences one [`attention_decode_batch`] launch takes (`DEC_BATCH_MAX` in attention.cu).
pub const DECODE_BATCH_MAX: usize = 32;

/// One sequence of a batched decode step: its layer's key and value caches, each
/// `[heads, capacity, head_dim]` from element 0 (f32, bf16 or f16, the same for all; each
/// sequence its own capacity), and its length before the step.
pub struct DecodeSeq<'a> {
    pub k: &'a mut CudaBuf,
    pub v: &'a mut CudaBuf,
    pub capacity: usize,
    pub len: usize,
}

/// One decode step of `seqs.len()` sequences whose caches are separate buffers, one launch per
/// [`DECODE_BATCH_MAX`] sequences: for sequence `s` (row `s` of the fused `qkv` `[S, 3·heads·
/// head_dim]`), its new key and value are appended at position `len` of its caches, then
/// `out[s, h·D..] = softmax(scale·q·K[..len + 1]ᵀ)·V[..len + 1]` for every head `h` (`out`
/// `[S, heads·head_dim]` f32). The caches' addresses, lengths and capacities travel as kernel
/// parameters (no copy to the device). A full cache is an error before anything is launched.
pub fn attention_decode_batch(
    dev: &CudaDevice,
    qkv: &CudaBuf,
    seqs: &mut [DecodeSeq<'_>],
    heads: usize,
    head_dim: usize,
    out: &mut CudaBuf,
    scale: Option<f32>,
) -> Result<()> {
    let what = "attention_decode_batch";
    let s = seqs.len();
    let c = super::mul(what, heads, head_dim)?;
    let rows = super::mul(what, s, c)?;
    qkv.check(
        "attention_decode_batch qkv",
        DType::F32,
        super::mul(what, rows, 3)?,
    )?;
    out.check("attention_decode_batch out", DType::F32, rows)?;
    let Some(first) = seqs.first() else {
        return Ok(());
    };
    let dtype = first.k.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::invalid(format!("kv cache of {dtype}")));
    }
    for (i, q) in seqs.iter().enumerate() {
        let cache_len = super::mul("kv cache", c, q.capacity)?;
        for (name, b) in [("keys", &*q.k), ("values", &*q.v)] {
            b.check(
                &format!("attention_decode_batch: sequence {i}'s {name}"),
                dtype,
                cache_len,
            )?;
            b.expect_device(dev, "attention_decode_batch: a KV cache")?;
        }
        if q.len >= q.capacity {
            return Err(Error::Capacity(format!(
                "kv cache: sequence {i} holds {} of {} positions, one more does not fit",
                q.len, q.capacity
            )));
        }
        i32_arg("capacity", q.capacity)?;
    }
    if c == 0 {
        return Ok(());
    }
    let dm = dmax(head_dim)?;
    let scale = AttentionOptions {
        causal: false,
        scale,
    }
    .scale(head_dim)?;
    let h = u16::try_from(heads)
        .map_err(|_| Error::invalid("attention_decode_batch: too many heads"))?;
    let kernel = format!("attn_decode_batch_d{dm}_{}", tname(dtype));
    const M: usize = DECODE_BATCH_MAX;
    for (chunk_index, chunk) in seqs.chunks(M).enumerate() {
        let first_row = chunk_index * M;
        // struct DecodeBatch { u64 k[32]; u64 v[32]; int len[32]; int cap[32]; }: 96 words.
        // The caches are reached through these addresses, not as launch arguments, so the
        // launch's own checks do not see them: they were checked above.
        let mut table = [0u64; 3 * M];
        for (i, q) in chunk.iter().enumerate() {
            table[i] = q.k.device_address_for(dev);
            table[M + i] = q.v.device_address_for(dev);
            let (len, cap) = (q.len as u64 + 1, q.capacity as u64);
            table[2 * M + i / 2] |= len << (32 * (i % 2));
            table[2 * M + M / 2 + i / 2] |= cap << (32 * (i % 2));
        }
        dev.launch(
            &sources::ATTENTION,
            &kernel,
            LaunchDims {
                grid: [h as u32, chunk.len() as u32, 1],
                block: [128, 1, 1],
                smem: 0,
            },
            &[
                Arg::At(qkv, first_row * 3 * c),
                Arg::Blob(&table),
                Arg::At(out, first_row * c),
                Arg::I32(i32_arg("heads", heads)?),
                Arg::I32(i32_arg("head_dim", head_dim)?),
                Arg::F32(scale),
            ],
        )?;
        if chunk
            .iter()
            .any(|q| !q.k.guards_intact() || !q.v.guards_intact())
        {
            return Err(crate::CudaError::Emulator(format!(
                "kernel `{kernel}`: wrote outside a KV cache"
            ))
            .into());
        }
    }
    Ok(())
}
