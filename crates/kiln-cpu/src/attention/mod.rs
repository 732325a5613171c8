//! Scaled dot-product attention: `O = softmax(scale · Q·Kᵀ + mask) · V`, fused and tiled.
//!
//! Public API (stable; layers and models call it):
//! * [`HeadsRef`] / [`HeadsMut`] — strided views of `[batch, heads, seq, head_dim]` tensors with a
//!   contiguous `head_dim`. The plain layout, the `[batch, seq, heads·head_dim]` layout and one
//!   third of GPT-2's fused QKV output `[batch, seq, 3·heads·head_dim]` are all views, not copies.
//! * [`attention_forward`] — attention of `q` (`Tq` queries) over `k`, `v` (`Tk` keys), with an
//!   optional causal mask aligned bottom-right: query `i` sees keys `j ≤ i + (Tk − Tq)`.
//! * [`KvCache`] — a preallocated per-layer key/value cache (f32, bf16 or f16 storage) with
//!   in-place [`KvCache::append`]; [`attention_cached`] runs a block of new queries (decode: one;
//!   chunked prefill: several) against it.
//!
//! The kernel never forms the `Tq × Tk` score matrix: every task owns one block of [`BLOCK_Q`]
//! query rows of one (batch, head) and streams key blocks of [`BLOCK_K`] through the online
//! softmax recurrence (see `docs/attention.md`). Memory beyond the inputs is a few tiles per
//! thread. Tasks are (batch, head, query block) triples run by rayon; each output row is
//! computed by exactly one task in a fixed order, so results are bitwise identical for any
//! thread count.
//!
//! Numerics: scores, running maxima and sums are f32; exponentials are taken as `2^x` of scores
//! pre-multiplied by `scale·log2(e)`. Masked positions contribute exactly zero. A query row that
//! sees no key at all (possible only with a causal mask when `Tq > Tk`) outputs zeros.
use kiln_tensor::{Error, FloatElement, Result};
use rayon::prelude::*;
use std::any::TypeId;

mod avx2;
mod cache;
mod scalar;
pub(crate) mod simd;

pub use cache::{attention_cached, KvCache};
pub use simd::Isa;

/// Query rows per task (and per tile of the scratch buffers).
pub const BLOCK_Q: usize = 64;
/// Keys per step of the online softmax.
pub const BLOCK_K: usize = 64;

/// A read-only strided view of a `[batch, heads, seq, head_dim]` tensor with `head_dim`
/// contiguous: element `(b, h, t, c)` is `data[b·stride_batch + h·stride_head + t·stride_seq + c]`.
#[derive(Clone, Copy, Debug)]
pub struct HeadsRef<'a, T> {
    pub data: &'a [T],
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub stride_batch: usize,
    pub stride_head: usize,
    pub stride_seq: usize,
}

/// A writable strided view of a `[batch, heads, seq, head_dim]` f32 tensor with `head_dim`
/// contiguous (same indexing as [`HeadsRef`]). Distinct `(b, h, t)` rows must not overlap.
#[derive(Debug)]
pub struct HeadsMut<'a> {
    pub data: &'a mut [f32],
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub stride_batch: usize,
    pub stride_head: usize,
    pub stride_seq: usize,
}

macro_rules! layout_constructors {
    ($slice:ty) => {
        /// Layout `[batch, heads, seq, head_dim]`, row-major.
        pub fn contiguous(
            data: $slice,
            batch: usize,
            heads: usize,
            seq: usize,
            head_dim: usize,
        ) -> Self {
            Self {
                data,
                batch,
                heads,
                seq,
                head_dim,
                stride_batch: heads * seq * head_dim,
                stride_head: seq * head_dim,
                stride_seq: head_dim,
            }
        }

        /// Layout `[batch, seq, heads, head_dim]` (that is `[batch, seq, heads·head_dim]`), the
        /// layout that feeds the output projection.
        pub fn seq_major(
            data: $slice,
            batch: usize,
            seq: usize,
            heads: usize,
            head_dim: usize,
        ) -> Self {
            Self {
                data,
                batch,
                heads,
                seq,
                head_dim,
                stride_batch: seq * heads * head_dim,
                stride_head: head_dim,
                stride_seq: heads * head_dim,
            }
        }
    };
}

impl<'a, T> HeadsRef<'a, T> {
    layout_constructors!(&'a [T]);

    /// Part `which` (0 = Q, 1 = K, 2 = V) of a fused QKV projection output laid out
    /// `[batch, seq, 3, heads, head_dim]` (GPT-2's `c_attn` output `[batch, seq, 3·heads·head_dim]`).
    /// Errors if `which > 2` or `data` is too short.
    pub fn fused_qkv(
        data: &'a [T],
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        which: usize,
    ) -> Result<Self> {
        let hd = heads * head_dim;
        if which > 2 {
            return Err(Error::invalid(format!(
                "attention: fused QKV part {which} (must be 0, 1 or 2)"
            )));
        }
        if data.len() < batch * seq * 3 * hd {
            return Err(Error::shape(
                "attention: fused QKV buffer",
                &[batch, seq, 3 * hd],
                &[data.len()],
            ));
        }
        let offset = (which * hd).min(data.len());
        Ok(HeadsRef {
            data: &data[offset..],
            batch,
            heads,
            seq,
            head_dim,
            stride_batch: seq * 3 * hd,
            stride_head: head_dim,
            stride_seq: 3 * hd,
        })
    }

    /// Checks that every element of the view is inside `data`.
    pub fn check(&self, name: &str) -> Result<()> {
        check_extent(
            name,
            self.data.len(),
            self.dims_strides(),
            self.head_dim,
            false,
        )
    }

    fn dims_strides(&self) -> [(usize, usize); 3] {
        [
            (self.batch, self.stride_batch),
            (self.heads, self.stride_head),
            (self.seq, self.stride_seq),
        ]
    }

    /// Offset of row `(b, h, t)`.
    #[inline(always)]
    fn offset(&self, b: usize, h: usize, t: usize) -> usize {
        b * self.stride_batch + h * self.stride_head + t * self.stride_seq
    }

    /// Row `(b, h, t)`: `head_dim` elements. Panics if out of range (validated views never are).
    #[inline(always)]
    pub fn row(&self, b: usize, h: usize, t: usize) -> &'a [T] {
        let o = self.offset(b, h, t);
        &self.data[o..o + self.head_dim]
    }
}

impl<'a> HeadsMut<'a> {
    layout_constructors!(&'a mut [f32]);

    /// Checks that every element is inside `data` and that distinct rows do not overlap.
    pub fn check(&self, name: &str) -> Result<()> {
        check_extent(
            name,
            self.data.len(),
            [
                (self.batch, self.stride_batch),
                (self.heads, self.stride_head),
                (self.seq, self.stride_seq),
            ],
            self.head_dim,
            true,
        )
    }

    /// A read-only view of the same elements.
    pub fn as_ref(&self) -> HeadsRef<'_, f32> {
        HeadsRef {
            data: self.data,
            batch: self.batch,
            heads: self.heads,
            seq: self.seq,
            head_dim: self.head_dim,
            stride_batch: self.stride_batch,
            stride_head: self.stride_head,
            stride_seq: self.stride_seq,
        }
    }
}

/// Bounds check of a strided 4-d view (last dim contiguous); with `injective`, also checks that
/// no two elements share an address (sorted by stride, every stride exceeds the span below it).
fn check_extent(
    name: &str,
    len: usize,
    dims: [(usize, usize); 3],
    head_dim: usize,
    injective: bool,
) -> Result<()> {
    if dims.iter().any(|&(n, _)| n == 0) || head_dim == 0 {
        return Ok(());
    }
    let mut last = Some(head_dim - 1);
    for &(n, s) in &dims {
        last = last.and_then(|l| (n - 1).checked_mul(s).and_then(|x| x.checked_add(l)));
    }
    match last {
        Some(l) if l < len => {}
        _ => {
            return Err(Error::invalid(format!(
                "attention: {name} view [batch {}, heads {}, seq {}, head_dim {head_dim}] \
                 (strides {}, {}, {}) exceeds its buffer of {len} elements",
                dims[0].0, dims[1].0, dims[2].0, dims[0].1, dims[1].1, dims[2].1
            )))
        }
    }
    if injective {
        let mut ds: Vec<(usize, usize)> = dims.iter().copied().filter(|&(n, _)| n > 1).collect();
        ds.sort_by_key(|&(_, s)| s);
        let mut span = head_dim; // elements covered by the dims below
        for (n, s) in ds {
            if s < span {
                return Err(Error::invalid(format!(
                    "attention: {name} view has overlapping rows (stride {s} < span {span})"
                )));
            }
            span = (n - 1) * s + span;
        }
    }
    Ok(())
}

/// Options of one attention call.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionOptions {
    /// Causal mask, aligned bottom-right: query `i` of `Tq` sees keys `j ≤ i + (Tk − Tq)`.
    pub causal: bool,
    /// Score scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Kernel to run; `None` picks the fastest this CPU supports. Tests force each one.
    pub isa: Option<Isa>,
}

impl AttentionOptions {
    /// Causal attention with the default scale.
    pub fn causal() -> Self {
        AttentionOptions {
            causal: true,
            ..Default::default()
        }
    }
}

/// `out = softmax(scale · q·kᵀ + mask) · v` for every (batch, head).
///
/// Shapes: `q` `[batch, heads, Tq, head_dim]` (f32), `k` and `v` `[batch, heads, Tk, head_dim]`
/// (f32, bf16 or f16, converted to f32 on the fly), `out` `[batch, heads, Tq, head_dim]`.
/// With `opts.causal`, query `i` sees keys `j ≤ i + (Tk − Tq)` (bottom-right alignment: for
/// `Tq == Tk` the usual lower triangle; for decode, `Tq == 1`, every key); a row that sees no
/// key outputs zeros. Runs on the current rayon pool; bitwise identical for any thread count.
pub fn attention_forward<T: FloatElement>(
    q: HeadsRef<'_, f32>,
    k: HeadsRef<'_, T>,
    v: HeadsRef<'_, T>,
    out: HeadsMut<'_>,
    opts: AttentionOptions,
) -> Result<()> {
    validate(&q, &k, &v, &out)?;
    let isa = match opts.isa {
        Some(isa) => {
            if !isa.is_available() {
                return Err(Error::invalid(format!(
                    "attention: kernel {isa:?} is not supported by this CPU"
                )));
            }
            isa
        }
        None => Isa::detect(),
    };
    let scale = opts.scale.unwrap_or(1.0 / (q.head_dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::invalid(format!(
            "attention: scale {scale} is not finite"
        )));
    }
    run(&q, &k, &v, out, opts.causal, scale, isa);
    Ok(())
}

fn validate<T>(
    q: &HeadsRef<'_, f32>,
    k: &HeadsRef<'_, T>,
    v: &HeadsRef<'_, T>,
    out: &HeadsMut<'_>,
) -> Result<()> {
    let qs = [q.batch, q.heads, q.seq, q.head_dim];
    let ks = [k.batch, k.heads, k.seq, k.head_dim];
    let vs = [v.batch, v.heads, v.seq, v.head_dim];
    let os = [out.batch, out.heads, out.seq, out.head_dim];
    if ks != vs {
        return Err(Error::shape("attention: v (must match k)", &ks, &vs));
    }
    if qs != os {
        return Err(Error::shape("attention: out (must match q)", &qs, &os));
    }
    if [q.batch, q.heads, q.head_dim] != [k.batch, k.heads, k.head_dim] {
        return Err(Error::invalid(format!(
            "attention: q is {qs:?} and k is {ks:?}: batch, heads and head_dim must agree"
        )));
    }
    q.check("q")?;
    k.check("k")?;
    v.check("v")?;
    out.check("out")?;
    Ok(())
}

/// Per-task scratch: the tiles of one query block (sizes independent of the sequence length).
struct Scratch {
    /// Kᵀ of one key block as f32: `[head_dim, BLOCK_K]`, zero-padded.
    kt: Vec<f32>,
    /// One key block of V converted to f32 (unused when V is f32): `[BLOCK_K, head_dim]`.
    vb: Vec<f32>,
    /// Scores, then probabilities: `[BLOCK_Q, BLOCK_K]`.
    s: Vec<f32>,
    /// Output accumulator: `[BLOCK_Q, head_dim]`.
    o: Vec<f32>,
    /// Running maximum (in `log2` units) and running sum per row.
    m: [f32; BLOCK_Q],
    l: [f32; BLOCK_Q],
    /// Rescale factor of the current step per row.
    alpha: [f32; BLOCK_Q],
}

impl Scratch {
    fn new(d: usize) -> Self {
        Scratch {
            kt: vec![0.0; d * BLOCK_K],
            vb: vec![0.0; BLOCK_K * d],
            s: vec![0.0; BLOCK_Q * BLOCK_K],
            o: vec![0.0; BLOCK_Q * d],
            m: [f32::NEG_INFINITY; BLOCK_Q],
            l: [0.0; BLOCK_Q],
            alpha: [1.0; BLOCK_Q],
        }
    }
}

/// The output pointer shared by tasks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint rows (each (b, h, t) row belongs to exactly one task, and
// `HeadsMut::check` proved rows do not overlap); the pointer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The tile kernels one instruction set provides.
pub(crate) trait Tiles {
    /// `s[i·BLOCK_K + j] = c · Σ_c q_i[c]·kt[c·BLOCK_K + j]` for `i < rows`, `j < BLOCK_K`.
    fn scores(q_rows: &[&[f32]], kt: &[f32], d: usize, c: f32, s: &mut [f32]);
    /// Online-softmax step for row `i` with scores `s_i[..BLOCK_K]` (masked entries −∞):
    /// `m' = max(m, max_j s_ij)`, `alpha = 2^(m − m')`, `p_ij = 2^(s_ij − m')` (written over
    /// `s_i`), `l' = alpha·l + Σ_j p_ij`. Returns `(m', l', alpha)`.
    fn softmax_step(s_row: &mut [f32], m: f32, l: f32) -> (f32, f32, f32);
    /// `o_i = alpha_i·o_i + Σ_{j<nk} p_ij·v_j` for `i < rows` (`o` `[rows, d]`, `p` rows of
    /// stride `BLOCK_K`).
    fn accumulate(o: &mut [f32], alpha: &[f32], p: &[f32], v_rows: &[&[f32]], d: usize);
}

#[allow(clippy::too_many_arguments)]
fn run<T: FloatElement>(
    q: &HeadsRef<'_, f32>,
    k: &HeadsRef<'_, T>,
    v: &HeadsRef<'_, T>,
    out: HeadsMut<'_>,
    causal: bool,
    scale: f32,
    isa: Isa,
) {
    match isa {
        Isa::Scalar => run_with::<T, scalar::Scalar>(q, k, v, out, causal, scale),
        Isa::Avx2 => run_with::<T, avx2::Avx2>(q, k, v, out, causal, scale),
    }
}

fn run_with<T: FloatElement, K: Tiles>(
    q: &HeadsRef<'_, f32>,
    k: &HeadsRef<'_, T>,
    v: &HeadsRef<'_, T>,
    out: HeadsMut<'_>,
    causal: bool,
    scale: f32,
) {
    let (batch, heads, tq, tk, d) = (q.batch, q.heads, q.seq, k.seq, q.head_dim);
    if batch == 0 || heads == 0 || tq == 0 || d == 0 {
        return;
    }
    let nqb = tq.div_ceil(BLOCK_Q);
    let ntasks = batch * heads * nqb;
    let c = scale * std::f32::consts::LOG2_E;
    let (osb, osh, oss) = (out.stride_batch, out.stride_head, out.stride_seq);
    let optr = OutPtr(out.data.as_mut_ptr());
    (0..ntasks).into_par_iter().for_each_init(
        || Scratch::new(d),
        |sc, task| {
            let qb = task % nqb;
            let bh = task / nqb;
            let (b, h) = (bh / heads, bh % heads);
            let i0 = qb * BLOCK_Q;
            let i1 = (i0 + BLOCK_Q).min(tq);
            block::<T, K>(q, k, v, b, h, i0, i1, tk, causal, c, sc);
            // Write the finished rows: o_i / l_i, or zeros for a row that saw no key.
            for i in i0..i1 {
                let r = i - i0;
                let inv = if sc.l[r] > 0.0 { 1.0 / sc.l[r] } else { 0.0 };
                let off = b * osb + h * osh + i * oss;
                // SAFETY: `off .. off + d` is inside `out.data` (checked by `HeadsMut::check`)
                // and row (b, h, i) is written by this task only (rows do not overlap).
                let dst = unsafe { std::slice::from_raw_parts_mut(optr.get().add(off), d) };
                for (o, &a) in dst.iter_mut().zip(&sc.o[r * d..(r + 1) * d]) {
                    *o = a * inv;
                }
            }
        },
    );
}

/// Streams all visible key blocks through one query block `[i0, i1)` of head (b, h); leaves the
/// unnormalised output in `sc.o` and the running sums in `sc.l`.
#[allow(clippy::too_many_arguments)]
fn block<T: FloatElement, K: Tiles>(
    q: &HeadsRef<'_, f32>,
    k: &HeadsRef<'_, T>,
    v: &HeadsRef<'_, T>,
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    tk: usize,
    causal: bool,
    c: f32,
    sc: &mut Scratch,
) {
    let d = q.head_dim;
    let rows = i1 - i0;
    let shift = tk as isize - q.seq as isize; // query i sees keys j <= i + shift
                                              // Keys this block can see at all.
    let kend = if causal {
        ((i1 as isize - 1 + shift + 1).max(0) as usize).min(tk)
    } else {
        tk
    };
    sc.m[..rows].fill(f32::NEG_INFINITY);
    sc.l[..rows].fill(0.0);
    sc.o[..rows * d].fill(0.0);
    let mut q_rows: [&[f32]; BLOCK_Q] = [&[]; BLOCK_Q];
    for (r, i) in (i0..i1).enumerate() {
        q_rows[r] = q.row(b, h, i);
    }
    let q_rows = &q_rows[..rows];
    let v_is_f32 = TypeId::of::<T>() == TypeId::of::<f32>();
    let mut j0 = 0;
    while j0 < kend {
        let nk = (kend - j0).min(BLOCK_K);
        // Pack Kᵀ (zero-padded to BLOCK_K columns) as f32.
        for j in 0..BLOCK_K {
            if j < nk {
                let kr = k.row(b, h, j0 + j);
                for (cc, &x) in kr.iter().enumerate() {
                    sc.kt[cc * BLOCK_K + j] = x.to_f32();
                }
            } else {
                for cc in 0..d {
                    sc.kt[cc * BLOCK_K + j] = 0.0;
                }
            }
        }
        K::scores(q_rows, &sc.kt, d, c, &mut sc.s);
        // Mask: padding columns, and (causal) keys after each query's own position.
        for r in 0..rows {
            let visible = if causal {
                ((i0 + r) as isize + shift + 1 - j0 as isize).clamp(0, nk as isize) as usize
            } else {
                nk
            };
            let srow = &mut sc.s[r * BLOCK_K..(r + 1) * BLOCK_K];
            if visible == 0 {
                // This row sees nothing in this block: leave its state unchanged.
                srow.fill(0.0);
                sc.alpha[r] = 1.0;
                continue;
            }
            srow[visible..].fill(f32::NEG_INFINITY);
            let (m, l, alpha) = K::softmax_step(srow, sc.m[r], sc.l[r]);
            srow[visible..].fill(0.0);
            sc.m[r] = m;
            sc.l[r] = l;
            sc.alpha[r] = alpha;
        }
        // V rows of this block as f32 slices.
        let mut v_rows: [&[f32]; BLOCK_K] = [&[]; BLOCK_K];
        if v_is_f32 {
            for j in 0..nk {
                v_rows[j] = as_f32(v.row(b, h, j0 + j));
            }
        } else {
            for j in 0..nk {
                for (dst, &x) in sc.vb[j * d..(j + 1) * d]
                    .iter_mut()
                    .zip(v.row(b, h, j0 + j))
                {
                    *dst = x.to_f32();
                }
            }
            for j in 0..nk {
                v_rows[j] = &sc.vb[j * d..(j + 1) * d];
            }
        }
        K::accumulate(
            &mut sc.o[..rows * d],
            &sc.alpha[..rows],
            &sc.s,
            &v_rows[..nk],
            d,
        );
        j0 += nk;
    }
}

/// `&[T]` as `&[f32]` when `T` is f32.
#[inline(always)]
fn as_f32<T: FloatElement>(x: &[T]) -> &[f32] {
    debug_assert_eq!(TypeId::of::<T>(), TypeId::of::<f32>());
    bytemuck::cast_slice(x)
}
