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
//! * [`attention_train_forward`] / [`attention_backward`] — causal attention for training on
//!   GPT-2's fused QKV layout: forward with the log-sum-exp per row, and the flash-style
//!   backward that recomputes the probabilities from it (see `train.rs`).
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
mod train;
pub(crate) mod vector;

pub use cache::{attention_cached, KvCache};
pub use simd::Isa;
pub use train::{
    attention_backward, attention_backward_with, attention_train_forward,
    attention_train_forward_with,
};

/// Query rows per task (and per tile of the scratch buffers).
pub const BLOCK_Q: usize = 32;
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
            span += (n - 1) * s;
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
    /// The head dimension the buffers are sized for.
    d: usize,
    /// The query block scaled by `c = scale·log2 e`, transposed: `[head_dim, BLOCK_Q]`,
    /// columns past the block's rows zero.
    qt: Vec<f32>,
    /// The same, row-major `[BLOCK_Q, head_dim]` (for blocks of one or two queries).
    qs: Vec<f32>,
    /// One key block of K and of V converted to f32 (unused when K/V are f32):
    /// `[BLOCK_K, head_dim]` each.
    kb: Vec<f32>,
    vb: Vec<f32>,
    /// Transposed scores, then probabilities: `st[j·BLOCK_Q + i]` for key `j`, query `i`.
    st: Vec<f32>,
    /// Output accumulator: `[BLOCK_Q, head_dim]`.
    o: Vec<f32>,
    /// Running maximum (in `log2` units), running sum and this step's rescale factor per query.
    m: [f32; BLOCK_Q],
    l: [f32; BLOCK_Q],
    alpha: [f32; BLOCK_Q],
}

impl Scratch {
    fn new(d: usize) -> Self {
        Scratch {
            d,
            qt: vec![0.0; d * BLOCK_Q],
            qs: vec![0.0; BLOCK_Q * d],
            kb: vec![0.0; BLOCK_K * d],
            vb: vec![0.0; BLOCK_K * d],
            st: vec![0.0; BLOCK_K * BLOCK_Q],
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

/// The tile kernels one instruction set provides. Probabilities and scores live in `st` with
/// element (key `j`, query `i`) at `st[j·sj + i·si]`: key-major (`sj = BLOCK_Q`, `si = 1`) after
/// [`Tiles::scores`], query-major (`sj = 1`, `si = BLOCK_K`) after [`Tiles::scores_dot`].
pub(crate) trait Tiles {
    /// Key-major `st[j·BLOCK_Q + i] = Σ_c qt[c·BLOCK_Q + i]·k_j[c]` for `j < k_rows.len()`,
    /// `i < ncols` (`qt` `[d, BLOCK_Q]`; `ncols` a multiple of 8, at most `BLOCK_Q`).
    fn scores(qt: &[f32], k_rows: &[&[f32]], d: usize, ncols: usize, st: &mut [f32]);
    /// Query-major `st[i·BLOCK_K + j] = q_i·k_j` for a few queries from row-major `qs`
    /// (`[rows, d]`), as dot products.
    fn scores_dot(qs: &[f32], rows: usize, k_rows: &[&[f32]], d: usize, st: &mut [f32]);
    /// One online-softmax step for queries `i < ncols` over keys `j < nk` (masked scores are
    /// −∞): `m'_i = max(m_i, max_j s_ji)`, `alpha_i = 2^(m_i − m'_i)`, `p_ji = 2^(s_ji − m'_i)`
    /// (written over `st`), `l'_i = alpha_i·l_i + Σ_j p_ji`. A query with `m'_i = −∞` (no
    /// visible key yet) uses 0 in place of `m'_i`, which keeps its state at zero.
    #[allow(clippy::too_many_arguments)]
    fn softmax(
        st: &mut [f32],
        sj: usize,
        si: usize,
        nk: usize,
        ncols: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    );
    /// `o_i = alpha_i·o_i + Σ_{j<nk} p_ji·v_j` for `i < alpha.len()` (`o` `[rows, d]`).
    fn accumulate(
        o: &mut [f32],
        alpha: &[f32],
        p: &[f32],
        sj: usize,
        si: usize,
        v_rows: &[&[f32]],
        d: usize,
    );
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
    (0..ntasks).into_par_iter().for_each(|task| {
        with_scratch(d, |sc| {
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
        })
    });
}

thread_local! {
    /// Each worker thread keeps its scratch tiles between tasks and calls.
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's scratch for head dimension `d` (made or regrown on demand).
fn with_scratch<R>(d: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            if slot.as_ref().is_none_or(|s| s.d != d) {
                *slot = Some(Scratch::new(d));
            }
            f(slot.as_mut().expect("scratch was just made"))
        }
        // Re-entered on this thread (not expected): use a private scratch.
        Err(_) => f(&mut Scratch::new(d)),
    })
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
    let ncols = rows.div_ceil(8) * 8;
    let few = rows <= 2;
    let shift = tk as isize - q.seq as isize; // query i sees keys j <= i + shift
                                              // Keys this block can see at all.
    let kend = if causal {
        ((i1 as isize + shift).max(0) as usize).min(tk)
    } else {
        tk
    };
    sc.m[..ncols].fill(f32::NEG_INFINITY);
    sc.l[..ncols].fill(0.0);
    sc.o[..rows * d].fill(0.0);
    // Q scaled by c: row-major for a few queries, else transposed (zero columns past `rows`).
    if few {
        for r in 0..rows {
            for (dst, &x) in sc.qs[r * d..(r + 1) * d]
                .iter_mut()
                .zip(q.row(b, h, i0 + r))
            {
                *dst = x * c;
            }
        }
    } else {
        for r in 0..ncols {
            if r < rows {
                for (cc, &x) in q.row(b, h, i0 + r).iter().enumerate() {
                    sc.qt[cc * BLOCK_Q + r] = x * c;
                }
            } else {
                for cc in 0..d {
                    sc.qt[cc * BLOCK_Q + r] = 0.0;
                }
            }
        }
    }
    let k_is_f32 = TypeId::of::<T>() == TypeId::of::<f32>();
    let mut j0 = 0;
    while j0 < kend {
        let nk = (kend - j0).min(BLOCK_K);
        let mut k_rows: [&[f32]; BLOCK_K] = [&[]; BLOCK_K];
        let mut v_rows: [&[f32]; BLOCK_K] = [&[]; BLOCK_K];
        if k_is_f32 {
            for j in 0..nk {
                k_rows[j] = as_f32(k.row(b, h, j0 + j));
                v_rows[j] = as_f32(v.row(b, h, j0 + j));
            }
        } else {
            for j in 0..nk {
                let (kd, vd) = (
                    &mut sc.kb[j * d..(j + 1) * d],
                    &mut sc.vb[j * d..(j + 1) * d],
                );
                for (dst, &x) in kd.iter_mut().zip(k.row(b, h, j0 + j)) {
                    *dst = x.to_f32();
                }
                for (dst, &x) in vd.iter_mut().zip(v.row(b, h, j0 + j)) {
                    *dst = x.to_f32();
                }
            }
            for j in 0..nk {
                k_rows[j] = &sc.kb[j * d..(j + 1) * d];
                v_rows[j] = &sc.vb[j * d..(j + 1) * d];
            }
        }
        let (k_rows, v_rows) = (&k_rows[..nk], &v_rows[..nk]);
        let (width, sj, si) = if few {
            K::scores_dot(&sc.qs, rows, k_rows, d, &mut sc.st);
            (rows, 1, BLOCK_K)
        } else {
            K::scores(&sc.qt, k_rows, d, ncols, &mut sc.st);
            (ncols, BLOCK_Q, 1)
        };
        // Causal mask: key j0+j is hidden from queries i0+i with i < j0 + j − shift − i0.
        if causal {
            for j in 0..nk {
                let cut = ((j0 + j) as isize - shift - i0 as isize).clamp(0, width as isize);
                for i in 0..cut as usize {
                    sc.st[j * sj + i * si] = f32::NEG_INFINITY;
                }
            }
        }
        K::softmax(
            &mut sc.st,
            sj,
            si,
            nk,
            width,
            &mut sc.m,
            &mut sc.l,
            &mut sc.alpha,
        );
        K::accumulate(
            &mut sc.o[..rows * d],
            &sc.alpha[..rows],
            &sc.st,
            sj,
            si,
            v_rows,
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
