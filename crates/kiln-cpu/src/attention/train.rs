//! Causal self-attention for training, forward and backward, flash-style, on GPT-2's fused
//! projection layout.
//!
//! Layout: `qkv` `[batch·seq, 3C]` with row `b·seq + t`; queries in columns `0..C`, keys in
//! `C..2C`, values in `2C..3C`; head `h` at `h·D..(h+1)·D` of each third (`C = heads·D`).
//! `out` and `dout` `[batch·seq, C]` (head `h` at columns `h·D..`); `lse` `[batch, heads, seq]`.
//! Scores `s_ij = q_i·k_j/√D`, causal (query `i` sees keys `j ≤ i`).
//!
//! ```text
//! forward   P_ij  = exp(s_ij − lse_i),  lse_i = log Σ_{j≤i} exp(s_ij),  o_i = Σ_j P_ij v_j
//! backward  Dl_i  = dout_i·o_i
//!           dv_j  = Σ_i P_ij dout_i
//!           dP_ij = dout_i·v_j,   dS_ij = P_ij (dP_ij − Dl_i)
//!           dq_i  = Σ_j dS_ij k_j /√D,   dk_j = Σ_i dS_ij q_i /√D
//! ```
//!
//! Neither pass forms the `seq × seq` matrix. The forward streams key blocks of [`BLOCK_K`]
//! through the online-softmax recurrence for one block of [`BLOCK_Q`] queries (in `log2` units:
//! `Q` is packed transposed and pre-scaled by `log2(e)/√D`), and saves the log-sum-exp of each
//! row. The backward recomputes `P` tile by tile from `Q`, `K` and the saved log-sum-exp.
//!
//! Every product is one register-tiled kernel `out (+)= A·B` with `A` read through strides
//! (element `(r, k)` broadcast from `a[r·ars + k·aks]`, so `Pᵀ` and `dSᵀ` need no transposed
//! copy) and `B` rows read as vectors straight from `qkv` / `dout` (a zero-padded copy only when
//! `D` is not a multiple of 16). Per instruction set: AVX-512F (16 lanes, 6×64 tile), AVX2+FMA
//! (8 lanes, 6×16 tile), and the scalar reference; exponentials are the vector `2^x` of
//! [`super::vector`].
//!
//! Parallelism and determinism: the forward runs one task per (batch, head, query block), the
//! backward one task per (batch, head); inside a backward task key blocks run in order and,
//! for each, the query blocks from the diagonal on in order, so `dK`/`dV` of a key block sum
//! over query blocks in a fixed order and `dQ` of a query block sums over key blocks in a fixed
//! order. Every output element is written by exactly one task whose arithmetic does not depend
//! on which thread runs it: results are bitwise identical for any thread count.
use super::vector::{best_isa, isa_ok, Vf32};
use crate::elementwise::activations::Isa;
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// Query rows per tile.
pub const BLOCK_Q: usize = 64;
/// Keys per tile.
pub const BLOCK_K: usize = 64;
/// Column counts of every tile are padded to a multiple of this (the widest vector).
const PAD: usize = 16;

/// Validated sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
    /// `heads·d`.
    c: usize,
    /// `d` rounded up to a multiple of [`PAD`].
    dp: usize,
}

impl Dims {
    fn new(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Result<Dims> {
        if heads == 0 || head_dim == 0 {
            return Err(Error::invalid(format!(
                "attention: heads ({heads}) and head_dim ({head_dim}) must be positive"
            )));
        }
        let too_big = || Error::invalid("attention: sizes overflow");
        let c = heads.checked_mul(head_dim).ok_or_else(too_big)?;
        batch
            .checked_mul(seq)
            .and_then(|n| n.checked_mul(3 * c))
            .ok_or_else(too_big)?;
        Ok(Dims {
            batch,
            seq,
            heads,
            d: head_dim,
            c,
            dp: head_dim.div_ceil(PAD) * PAD,
        })
    }

    fn check(&self, name: &str, got: usize, want: &[usize]) -> Result<()> {
        if want.iter().product::<usize>() != got {
            return Err(Error::shape(format!("attention: {name}"), want, &[got]));
        }
        Ok(())
    }

    fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

fn usable(isa: Isa) -> Result<Isa> {
    if isa_ok(isa) {
        Ok(isa)
    } else {
        Err(Error::invalid(format!(
            "attention: kernel {isa:?} is not supported by this CPU"
        )))
    }
}

/// Causal attention forward for training: `out` `[batch·seq, C]` and `lse` `[batch, heads,
/// seq]` (`lse[b, h, i] = log Σ_{j≤i} exp(q_i·k_j/√D)`, natural log) from `qkv` `[batch·seq,
/// 3C]` (layout in the module docs). Parallel over (batch, head, query block) on the current
/// rayon pool; bitwise identical for any thread count.
#[allow(clippy::too_many_arguments)]
pub fn attention_train_forward(
    qkv: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    attention_train_forward_with(best_isa(), qkv, batch, seq, heads, head_dim, out, lse)
}

/// [`attention_train_forward`] on a chosen path (tests force each one; an unavailable path is
/// an error).
#[allow(clippy::too_many_arguments)]
pub fn attention_train_forward_with(
    isa: Isa,
    qkv: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let dims = Dims::new(batch, seq, heads, head_dim)?;
    dims.check("qkv", qkv.len(), &[batch * seq, 3 * dims.c])?;
    dims.check("out", out.len(), &[batch * seq, dims.c])?;
    dims.check("lse", lse.len(), &[batch, heads, seq])?;
    let isa = usable(isa)?;
    match isa {
        Isa::Scalar => forward::<Scalar>(qkv, dims, out, lse),
        Isa::Avx2 => forward::<Avx2>(qkv, dims, out, lse),
        Isa::Avx512 => forward::<Avx512>(qkv, dims, out, lse),
    }
    Ok(())
}

/// Causal attention backward: `dqkv` `[batch·seq, 3C]` (overwritten; `dQ`, `dK`, `dV` in the
/// column layout of `qkv`) from `qkv`, the forward's `out` and `lse`, and `dout` `[batch·seq,
/// C]`. Recomputes the probabilities tile by tile. Parallel over (batch, head) on the current
/// rayon pool; bitwise identical for any thread count.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    qkv: &[f32],
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    dqkv: &mut [f32],
) -> Result<()> {
    attention_backward_with(
        best_isa(),
        qkv,
        out,
        dout,
        lse,
        batch,
        seq,
        heads,
        head_dim,
        dqkv,
    )
}

/// [`attention_backward`] on a chosen path (tests force each one; an unavailable path is an
/// error).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with(
    isa: Isa,
    qkv: &[f32],
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    dqkv: &mut [f32],
) -> Result<()> {
    let dims = Dims::new(batch, seq, heads, head_dim)?;
    dims.check("qkv", qkv.len(), &[batch * seq, 3 * dims.c])?;
    dims.check("out", out.len(), &[batch * seq, dims.c])?;
    dims.check("dout", dout.len(), &[batch * seq, dims.c])?;
    dims.check("lse", lse.len(), &[batch, heads, seq])?;
    dims.check("dqkv", dqkv.len(), &[batch * seq, 3 * dims.c])?;
    let isa = usable(isa)?;
    let ins = BackwardInputs {
        qkv,
        out,
        dout,
        lse,
    };
    match isa {
        Isa::Scalar => backward::<Scalar>(&ins, dims, dqkv),
        Isa::Avx2 => backward::<Avx2>(&ins, dims, dqkv),
        Isa::Avx512 => backward::<Avx512>(&ins, dims, dqkv),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tile kernels
// ---------------------------------------------------------------------------------------------

/// Which `A` entries of a product are known to be zero (diagonal blocks of the causal mask):
/// the kernel skips them, which changes nothing but the time (`x + 0·y = x`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tri {
    /// No known zeros.
    Full,
    /// `a(r, k) = 0` for `k < r`: row `r` sums over `k ≥ r` only.
    KFrom,
    /// `a(r, k) = 0` for `k > r`: row `r` sums over `k ≤ r` only.
    KTo,
}

impl Tri {
    /// The range of `k` a tile of rows `r0..r1` needs (of `0..kc`).
    #[inline(always)]
    fn k_range(self, r0: usize, r1: usize, kc: usize) -> (usize, usize) {
        match self {
            Tri::Full => (0, kc),
            Tri::KFrom => (r0.min(kc), kc),
            Tri::KTo => (0, r1.min(kc)),
        }
    }
}

/// One product `out[r·ldo + c] (+)= Σ_{k<kc} a[r·ars + k·aks] · b[k·ldb + c]` for `r < m`,
/// `c < n` (`n` a multiple of [`PAD`]); with `acc` false, `out` is overwritten. `tri` names
/// entries of `A` known to be zero, which are skipped.
#[derive(Clone, Copy)]
struct Mm<'a> {
    m: usize,
    n: usize,
    kc: usize,
    a: &'a [f32],
    ars: usize,
    aks: usize,
    b: &'a [f32],
    ldb: usize,
    ldo: usize,
    acc: bool,
    tri: Tri,
}

impl Mm<'_> {
    /// Panics unless every element the product touches is inside its slice (callers build
    /// products from validated sizes; a failure here is a bug, never bad input).
    fn assert_bounds(&self, out: &[f32]) {
        assert!(self.n.is_multiple_of(PAD));
        if self.m == 0 || self.n == 0 {
            return;
        }
        assert!(out.len() >= (self.m - 1) * self.ldo + self.n);
        if self.kc > 0 {
            assert!(self.a.len() > (self.m - 1) * self.ars + (self.kc - 1) * self.aks);
            assert!(self.b.len() >= (self.kc - 1) * self.ldb + self.n);
        }
    }
}

/// The tile kernels of one instruction set.
trait Kern {
    /// The product described by `mm` into `out`.
    fn gemm(mm: &Mm<'_>, out: &mut [f32]);
    /// One online-softmax step, vertically, on the key-major score tile `st` (`st[j·ld + i]`
    /// for key `j < nk`, query lane `i < ncols`, `ncols` a multiple of [`PAD`]): `m'_i =
    /// max(m_i, max_j s_ji)`, `alpha_i = 2^(m_i − m'_i)`, `p_ji = 2^(s_ji − m'_i)` written over
    /// `st`, `l'_i = alpha_i·l_i + Σ_j p_ji`. A lane whose maximum is still −∞ keeps zeros.
    #[allow(clippy::too_many_arguments)]
    fn softmax_cols(
        st: &mut [f32],
        ld: usize,
        nk: usize,
        ncols: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    );
    /// `s_c = 2^(s_c·cl − lse2)` (`s.len()` a multiple of [`PAD`]).
    fn probs_row(s: &mut [f32], cl: f32, lse2: f32);
    /// `dp_c = p_c·(dp_c − dl)` (equal lengths, a multiple of [`PAD`]).
    fn ds_row(p: &[f32], dp: &mut [f32], dl: f32);
    /// Transposed copy: `dst[c·ld + j] = src[j·stride + c]·scale` for `j < n`, `c < d`, and
    /// zeros in columns `n..npad` of the first `d` rows of `dst`.
    #[allow(clippy::too_many_arguments)]
    fn pack_t(
        src: &[f32],
        stride: usize,
        n: usize,
        d: usize,
        scale: f32,
        dst: &mut [f32],
        ld: usize,
        npad: usize,
    ) {
        pack_t_bounds(src, stride, n, d, dst, ld, npad);
        for j in 0..n {
            for (cc, &x) in src[j * stride..j * stride + d].iter().enumerate() {
                dst[cc * ld + j] = x * scale;
            }
        }
        zero_pad_columns(dst, d, ld, n, npad);
    }
}

/// The bounds every `pack_t` relies on (a failure is a bug, never bad input).
fn pack_t_bounds(
    src: &[f32],
    stride: usize,
    n: usize,
    d: usize,
    dst: &[f32],
    ld: usize,
    npad: usize,
) {
    assert!(n <= npad && npad <= ld);
    if n > 0 && d > 0 {
        assert!(src.len() >= (n - 1) * stride + d);
    }
    if d > 0 {
        assert!(dst.len() >= (d - 1) * ld + npad);
    }
}

/// Zeros columns `n..npad` of rows `0..d` of `dst` (row length `ld`).
fn zero_pad_columns(dst: &mut [f32], d: usize, ld: usize, n: usize, npad: usize) {
    if n < npad {
        for cc in 0..d {
            dst[cc * ld + n..cc * ld + npad].fill(0.0);
        }
    }
}

/// The reference: plain loops, `std`'s `exp2`.
struct Scalar;

impl Kern for Scalar {
    fn gemm(mm: &Mm<'_>, out: &mut [f32]) {
        mm.assert_bounds(out);
        for r in 0..mm.m {
            let orow = &mut out[r * mm.ldo..r * mm.ldo + mm.n];
            if !mm.acc {
                orow.fill(0.0);
            }
            let (k0, k1) = mm.tri.k_range(r, r + 1, mm.kc);
            for k in k0..k1 {
                let av = mm.a[r * mm.ars + k * mm.aks];
                for (o, &bv) in orow.iter_mut().zip(&mm.b[k * mm.ldb..k * mm.ldb + mm.n]) {
                    *o += av * bv;
                }
            }
        }
    }

    fn softmax_cols(
        st: &mut [f32],
        ld: usize,
        nk: usize,
        ncols: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        for i in 0..ncols {
            let mut mb = f32::NEG_INFINITY;
            for j in 0..nk {
                mb = mb.max(st[j * ld + i]);
            }
            let m_new = m[i].max(mb);
            let ms = m_new.max(f32::MIN);
            let a = (m[i] - ms).exp2();
            let mut sum = 0f32;
            for j in 0..nk {
                let p = (st[j * ld + i] - ms).exp2();
                st[j * ld + i] = p;
                sum += p;
            }
            m[i] = m_new;
            l[i] = a * l[i] + sum;
            alpha[i] = a;
        }
    }

    fn probs_row(s: &mut [f32], cl: f32, lse2: f32) {
        for v in s {
            *v = (*v * cl - lse2).exp2();
        }
    }

    fn ds_row(p: &[f32], dp: &mut [f32], dl: f32) {
        for (d, &pv) in dp.iter_mut().zip(p) {
            *d = pv * (*d - dl);
        }
    }
}

/// AVX2 + FMA (8 lanes). Only dispatched after `isa_ok(Isa::Avx2)`.
struct Avx2;
/// AVX-512F (16 lanes). Only dispatched after `isa_ok(Isa::Avx512)`.
struct Avx512;

macro_rules! simd_kern {
    ($name:ident, $isa:expr, $gemm:ident, $cols:ident, $probs:ident, $ds:ident) => {
        impl Kern for $name {
            fn gemm(mm: &Mm<'_>, out: &mut [f32]) {
                mm.assert_bounds(out);
                assert!(isa_ok($isa));
                if mm.m == 0 || mm.n == 0 {
                    return;
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU runs the instruction set (asserted); every element the
                // product reads or writes is inside its slice (`assert_bounds`), and `out`
                // is borrowed exclusively.
                unsafe {
                    x86::$gemm(
                        mm.m,
                        mm.n,
                        mm.kc,
                        mm.a.as_ptr(),
                        mm.ars,
                        mm.aks,
                        mm.b.as_ptr(),
                        mm.ldb,
                        out.as_mut_ptr(),
                        mm.ldo,
                        mm.acc,
                        mm.tri,
                    )
                }
                #[cfg(not(target_arch = "x86_64"))]
                Scalar::gemm(mm, out)
            }

            fn softmax_cols(
                st: &mut [f32],
                ld: usize,
                nk: usize,
                ncols: usize,
                m: &mut [f32],
                l: &mut [f32],
                alpha: &mut [f32],
            ) {
                assert!(isa_ok($isa) && ncols.is_multiple_of(PAD));
                assert!(m.len() >= ncols && l.len() >= ncols && alpha.len() >= ncols);
                assert!(nk == 0 || st.len() >= (nk - 1) * ld + ncols);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU runs the instruction set; the kernel touches `st[j·ld + i]`
                // for `j < nk`, `i < ncols` and the first `ncols` of `m`, `l`, `alpha`, all
                // inside the lengths asserted above.
                unsafe {
                    x86::$cols(
                        st.as_mut_ptr(),
                        ld,
                        nk,
                        ncols,
                        m.as_mut_ptr(),
                        l.as_mut_ptr(),
                        alpha.as_mut_ptr(),
                    )
                }
                #[cfg(not(target_arch = "x86_64"))]
                Scalar::softmax_cols(st, ld, nk, ncols, m, l, alpha)
            }

            fn probs_row(s: &mut [f32], cl: f32, lse2: f32) {
                assert!(isa_ok($isa) && s.len().is_multiple_of(PAD));
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU runs the instruction set; the kernel touches `s[..len]`.
                unsafe {
                    x86::$probs(s.as_mut_ptr(), s.len(), cl, lse2)
                }
                #[cfg(not(target_arch = "x86_64"))]
                Scalar::probs_row(s, cl, lse2)
            }

            fn pack_t(
                src: &[f32],
                stride: usize,
                n: usize,
                d: usize,
                scale: f32,
                dst: &mut [f32],
                ld: usize,
                npad: usize,
            ) {
                pack_t_bounds(src, stride, n, d, dst, ld, npad);
                assert!(isa_ok($isa));
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 present (both SIMD paths have it); reads `src[j·stride + c]`,
                // writes `dst[c·ld + j]` for `j < n`, `c < d`: inside the asserted bounds.
                unsafe {
                    crate::attention::vector::x86::transpose_scaled(
                        src.as_ptr(),
                        stride,
                        n,
                        d,
                        scale,
                        dst.as_mut_ptr(),
                        ld,
                    )
                }
                #[cfg(not(target_arch = "x86_64"))]
                for j in 0..n {
                    for cc in 0..d {
                        dst[cc * ld + j] = src[j * stride + cc] * scale;
                    }
                }
                zero_pad_columns(dst, d, ld, n, npad);
            }

            fn ds_row(p: &[f32], dp: &mut [f32], dl: f32) {
                assert!(isa_ok($isa) && dp.len().is_multiple_of(PAD) && p.len() >= dp.len());
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU runs the instruction set; reads `p[..n]`, writes `dp[..n]`
                // with `n = dp.len() ≤ p.len()`.
                unsafe {
                    x86::$ds(p.as_ptr(), dp.as_mut_ptr(), dp.len(), dl)
                }
                #[cfg(not(target_arch = "x86_64"))]
                Scalar::ds_row(p, dp, dl)
            }
        }
    };
}

simd_kern!(
    Avx2,
    Isa::Avx2,
    gemm_avx2,
    softmax_cols_avx2,
    probs_row_avx2,
    ds_row_avx2
);
simd_kern!(
    Avx512,
    Isa::Avx512,
    gemm_avx512,
    softmax_cols_avx512,
    probs_row_avx512,
    ds_row_avx512
);

/// The vector kernels, written once over [`Vf32`] and instantiated per instruction set.
#[allow(clippy::needless_range_loop)] // register tiles read best as acc[r][u]
mod generic {
    use super::{Tri, Vf32};

    /// Rows `0..R`, columns `0..NV·LANES` of the product (see `Mm`), accumulators in registers.
    ///
    /// Safety: the CPU runs `V`; `a[r·ars + k·aks]`, `b[k·ldb + c]`, `out[r·ldo + c]` valid for
    /// `r < R`, `k < kc`, `c < NV·LANES`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<V: Vf32, const R: usize, const NV: usize>(
        kc: usize,
        a: *const f32,
        ars: usize,
        aks: usize,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        acc: bool,
    ) {
        let w = V::LANES;
        let mut c = [[V::zero(); NV]; R];
        if acc {
            for r in 0..R {
                for u in 0..NV {
                    c[r][u] = V::load(out.add(r * ldo + u * w));
                }
            }
        }
        let (mut ap, mut bp) = (a, b);
        for _ in 0..kc {
            let mut bv = [V::zero(); NV];
            for u in 0..NV {
                bv[u] = V::load(bp.add(u * w));
            }
            for r in 0..R {
                let av = V::splat(*ap.add(r * ars));
                for u in 0..NV {
                    c[r][u] = V::fmadd(av, bv[u], c[r][u]);
                }
            }
            // Past the last step these may point outside the buffers; they are not read then.
            ap = ap.wrapping_add(aks);
            bp = bp.wrapping_add(ldb);
        }
        for r in 0..R {
            for u in 0..NV {
                c[r][u].store(out.add(r * ldo + u * w));
            }
        }
    }

    /// The whole product: column panels of `NV·LANES` (then `LANES`), rows six at a time.
    ///
    /// Safety: the CPU runs `V`; `n` a multiple of `LANES`; the bounds of `Mm::assert_bounds`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn gemm<V: Vf32, const NV: usize>(
        m: usize,
        n: usize,
        kc: usize,
        a: *const f32,
        ars: usize,
        aks: usize,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        acc: bool,
        tri: Tri,
    ) {
        let mut c0 = 0;
        while c0 < n {
            let wide = n - c0 >= NV * V::LANES;
            let bp = b.add(c0);
            let mut r0 = 0;
            while r0 < m {
                let rr = (m - r0).min(6);
                let (k0, k1) = tri.k_range(r0, r0 + rr, kc);
                // Offsets `k0·aks`, `k0·ldb` stay inside the operands (k0 < kc) or are unused
                // (k0 = kc: no step runs).
                let ap = a.add(r0 * ars).wrapping_add(k0 * aks);
                let bk = bp.wrapping_add(k0 * ldb);
                let op = out.add(r0 * ldo + c0);
                let nk = k1 - k0;
                macro_rules! go {
                    ($r:literal) => {
                        if wide {
                            tile::<V, $r, NV>(nk, ap, ars, aks, bk, ldb, op, ldo, acc)
                        } else {
                            tile::<V, $r, 1>(nk, ap, ars, aks, bk, ldb, op, ldo, acc)
                        }
                    };
                }
                match rr {
                    6 => go!(6),
                    5 => go!(5),
                    4 => go!(4),
                    3 => go!(3),
                    2 => go!(2),
                    _ => go!(1),
                }
                r0 += rr;
            }
            c0 += if wide { NV * V::LANES } else { V::LANES };
        }
    }

    /// See `Kern::softmax_cols`. Safety: the CPU runs `V`; the bounds asserted there.
    #[inline(always)]
    pub(super) unsafe fn softmax_cols<V: Vf32>(
        st: *mut f32,
        ld: usize,
        nk: usize,
        ncols: usize,
        m: *mut f32,
        l: *mut f32,
        alpha: *mut f32,
    ) {
        let w = V::LANES;
        let mut i0 = 0;
        while i0 < ncols {
            let sp = st.add(i0);
            let mut mx = [V::splat(f32::NEG_INFINITY); 2];
            for j in 0..nk {
                mx[j & 1] = V::max(mx[j & 1], V::load(sp.add(j * ld)));
            }
            let m_old = V::load(m.add(i0));
            let m_new = V::max(m_old, V::max(mx[0], mx[1]));
            // A lane still at −∞ subtracts f32::MIN instead: its p and alpha are exactly 0.
            let ms = V::max(m_new, V::splat(f32::MIN));
            let a = V::exp2(V::sub(m_old, ms));
            let mut sum = [V::zero(); 2];
            for j in 0..nk {
                let p = sp.add(j * ld);
                let e = V::exp2(V::sub(V::load(p), ms));
                e.store(p);
                sum[j & 1] = V::add(sum[j & 1], e);
            }
            let lp = l.add(i0);
            V::fmadd(a, V::load(lp), V::add(sum[0], sum[1])).store(lp);
            m_new.store(m.add(i0));
            a.store(alpha.add(i0));
            i0 += w;
        }
    }

    /// See `Kern::probs_row`. Safety: the CPU runs `V`; `s` valid for `n` (a multiple of
    /// `LANES`) floats.
    #[inline(always)]
    pub(super) unsafe fn probs_row<V: Vf32>(s: *mut f32, n: usize, cl: f32, lse2: f32) {
        let (c, sh) = (V::splat(cl), V::splat(-lse2));
        for i in (0..n).step_by(V::LANES) {
            let p = s.add(i);
            V::exp2(V::fmadd(V::load(p), c, sh)).store(p);
        }
    }

    /// See `Kern::ds_row`. Safety: the CPU runs `V`; `p`, `dp` valid for `n` (a multiple of
    /// `LANES`) floats.
    #[inline(always)]
    pub(super) unsafe fn ds_row<V: Vf32>(p: *const f32, dp: *mut f32, n: usize, dl: f32) {
        let d = V::splat(dl);
        for i in (0..n).step_by(V::LANES) {
            let q = dp.add(i);
            V::mul(V::load(p.add(i)), V::sub(V::load(q), d)).store(q);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
mod x86 {
    //! Entry points: each enables one instruction set and inlines the generic kernel.
    //! Safety (all): the CPU has the enabled features, and the generic kernel's contract holds.
    use super::{generic, Tri};
    use crate::attention::vector::x86::{F32x16, F32x8};

    macro_rules! entries {
        ($feat:literal, $v:ty, $nv:literal, $gemm:ident, $cols:ident, $probs:ident, $ds:ident) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $gemm(
                m: usize,
                n: usize,
                kc: usize,
                a: *const f32,
                ars: usize,
                aks: usize,
                b: *const f32,
                ldb: usize,
                out: *mut f32,
                ldo: usize,
                acc: bool,
                tri: Tri,
            ) {
                generic::gemm::<$v, $nv>(m, n, kc, a, ars, aks, b, ldb, out, ldo, acc, tri)
            }
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $cols(
                st: *mut f32,
                ld: usize,
                nk: usize,
                ncols: usize,
                m: *mut f32,
                l: *mut f32,
                alpha: *mut f32,
            ) {
                generic::softmax_cols::<$v>(st, ld, nk, ncols, m, l, alpha)
            }
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $probs(s: *mut f32, n: usize, cl: f32, lse2: f32) {
                generic::probs_row::<$v>(s, n, cl, lse2)
            }
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $ds(p: *const f32, dp: *mut f32, n: usize, dl: f32) {
                generic::ds_row::<$v>(p, dp, n, dl)
            }
        };
    }

    entries!(
        "avx2,fma",
        F32x8,
        2,
        gemm_avx2,
        softmax_cols_avx2,
        probs_row_avx2,
        ds_row_avx2
    );
    entries!(
        "avx512f,avx2,fma",
        F32x16,
        4,
        gemm_avx512,
        softmax_cols_avx512,
        probs_row_avx512,
        ds_row_avx512
    );
}

// ---------------------------------------------------------------------------------------------
// Scratch and shared output pointers
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// Each worker thread keeps one scratch buffer between tasks and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer grown to at least `len` floats (contents are
/// whatever the last task left: callers initialise what they read).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered on this thread (not expected): a private buffer.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Splits `buf` into consecutive slices of the given lengths.
fn carve<const N: usize>(mut buf: &mut [f32], lens: [usize; N]) -> [&mut [f32]; N] {
    lens.map(|n| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        buf = tail;
        head
    })
}

/// An output buffer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);
// SAFETY: tasks write disjoint elements (documented at each use) and the buffer outlives the
// parallel loop that uses the pointer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn new(s: &mut [f32]) -> Self {
        SharedOut(s.as_mut_ptr(), s.len())
    }

    /// `n` elements from `off`.
    ///
    /// Safety: no other live reference covers `off..off + n` (callers hand each element to
    /// exactly one task).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, off: usize, n: usize) -> &mut [f32] {
        assert!(off + n <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(off), n)
    }
}

/// Rows of one head inside a bigger buffer: row `t` starts at `data[t·stride]`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
}

impl<'a> Rows<'a> {
    /// Everything from row `t` on (its row and those after it).
    fn from(&self, t: usize) -> &'a [f32] {
        &self.data[t * self.stride..]
    }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

fn forward<K: Kern>(qkv: &[f32], dims: Dims, out: &mut [f32], lse: &mut [f32]) {
    let Dims {
        seq,
        heads,
        d,
        c,
        dp,
        ..
    } = dims;
    if dims.tokens() == 0 {
        return;
    }
    let nqb = seq.div_ceil(BLOCK_Q);
    let ntasks = dims.batch * heads * nqb;
    let cl = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let (out_s, lse_s) = (SharedOut::new(out), SharedOut::new(lse));
    let scratch_len = d * BLOCK_Q + BLOCK_K * BLOCK_Q + BLOCK_Q * dp + BLOCK_K * dp + 3 * BLOCK_Q;
    (0..ntasks).into_par_iter().for_each(|task| {
        let (bh, qb) = (task / nqb, task % nqb);
        let (b, h) = (bh / heads, bh % heads);
        let i0 = qb * BLOCK_Q;
        let nq = (seq - i0).min(BLOCK_Q);
        let nqp = nq.div_ceil(PAD) * PAD;
        let base = b * seq * 3 * c + h * d;
        let q = Rows {
            data: &qkv[base..],
            stride: 3 * c,
        };
        let k = Rows {
            data: &qkv[base + c..],
            stride: 3 * c,
        };
        let v = Rows {
            data: &qkv[base + 2 * c..],
            stride: 3 * c,
        };
        with_scratch(scratch_len, |buf| {
            let [qt, st, o, vpad, m, l, alpha] = carve(
                buf,
                [
                    d * BLOCK_Q,
                    BLOCK_K * BLOCK_Q,
                    BLOCK_Q * dp,
                    BLOCK_K * dp,
                    BLOCK_Q,
                    BLOCK_Q,
                    BLOCK_Q,
                ],
            );
            // Qᵀ scaled by log2(e)/√D: qt[c·BLOCK_Q + r], lanes past the block zero.
            K::pack_t(q.from(i0), q.stride, nq, d, cl, qt, BLOCK_Q, nqp);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            o[..nq * dp].fill(0.0);
            let kend = i0 + nq; // causal: the block's last query sees keys < kend
            let mut j0 = 0;
            while j0 < kend {
                let nk = (kend - j0).min(BLOCK_K);
                // Sᵀ = K·(c·Q)ᵀ: st[j·BLOCK_Q + i].
                K::gemm(
                    &Mm {
                        m: nk,
                        n: nqp,
                        kc: d,
                        a: k.from(j0),
                        ars: 3 * c,
                        aks: 1,
                        b: qt,
                        ldb: BLOCK_Q,
                        ldo: BLOCK_Q,
                        acc: false,
                        tri: Tri::Full,
                    },
                    st,
                );
                // Causal mask: key j0+j is hidden from queries i0+i < j0+j.
                if j0 + nk > i0 + 1 {
                    for j in 0..nk {
                        let cut = (j0 + j).saturating_sub(i0).min(nqp);
                        st[j * BLOCK_Q..j * BLOCK_Q + cut].fill(f32::NEG_INFINITY);
                    }
                }
                K::softmax_cols(st, BLOCK_Q, nk, nqp, m, l, alpha);
                // O = alpha·O + P·V, P read transposed from st.
                for r in 0..nq {
                    let a = alpha[r];
                    o[r * dp..(r + 1) * dp].iter_mut().for_each(|x| *x *= a);
                }
                let (vb, ldv) = if d == dp {
                    (v.from(j0), 3 * c)
                } else {
                    for j in 0..nk {
                        vpad[j * dp..j * dp + d].copy_from_slice(&v.from(j0 + j)[..d]);
                        vpad[j * dp + d..(j + 1) * dp].fill(0.0);
                    }
                    (&vpad[..], dp)
                };
                K::gemm(
                    &Mm {
                        m: nq,
                        n: dp,
                        kc: nk,
                        a: st,
                        ars: 1,
                        aks: BLOCK_Q,
                        b: vb,
                        ldb: ldv,
                        ldo: dp,
                        acc: true,
                        tri: if j0 == i0 { Tri::KTo } else { Tri::Full },
                    },
                    o,
                );
                j0 += nk;
            }
            // Finish: o_i / l_i and lse_i = (m_i + log2 l_i)·ln 2.
            for r in 0..nq {
                let inv = 1.0 / l[r];
                let row = b * seq + i0 + r;
                // SAFETY: row (b, i0 + r), columns h·D..(h+1)·D of `out` belong to this task
                // only (tasks are distinct (b, h, query block) triples).
                let dst = unsafe { out_s.slice(row * c + h * d, d) };
                for (x, &a) in dst.iter_mut().zip(&o[r * dp..r * dp + d]) {
                    *x = a * inv;
                }
                // SAFETY: lse[b, h, i0 + r] belongs to this task only (as above).
                let le = unsafe { lse_s.slice((b * heads + h) * seq + i0 + r, 1) };
                le[0] = (m[r] + l[r].log2()) * std::f32::consts::LN_2;
            }
        })
    });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

struct BackwardInputs<'a> {
    qkv: &'a [f32],
    out: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
}

fn backward<K: Kern>(ins: &BackwardInputs<'_>, dims: Dims, dqkv: &mut [f32]) {
    if dims.tokens() == 0 {
        return;
    }
    let ntasks = dims.batch * dims.heads;
    let shared = SharedOut::new(dqkv);
    (0..ntasks).into_par_iter().for_each(|task| {
        backward_head::<K>(ins, dims, task / dims.heads, task % dims.heads, shared)
    });
}

/// The backward of head `h` of sequence `b`: key blocks in order; for each, the query blocks
/// from the diagonal on in order.
fn backward_head<K: Kern>(
    ins: &BackwardInputs<'_>,
    dims: Dims,
    b: usize,
    h: usize,
    dqkv: SharedOut,
) {
    let Dims {
        seq,
        heads,
        d,
        c,
        dp,
        ..
    } = dims;
    let inv_sqrt_d = 1.0 / (d as f32).sqrt();
    let cl = std::f32::consts::LOG2_E * inv_sqrt_d;
    let base3 = b * seq * 3 * c + h * d;
    let base1 = b * seq * c + h * d;
    let rows3 = |off: usize| Rows {
        data: &ins.qkv[base3 + off..],
        stride: 3 * c,
    };
    let (q_in, k_in, v) = (rows3(0), rows3(c), rows3(2 * c));
    let o = Rows {
        data: &ins.out[base1..],
        stride: c,
    };
    let do_in = Rows {
        data: &ins.dout[base1..],
        stride: c,
    };
    let padded = d != dp;
    let pad_len = if padded { 3 * seq * dp } else { 0 };
    let scratch_len =
        2 * d * BLOCK_K + 2 * BLOCK_Q * BLOCK_K + 2 * BLOCK_K * dp + seq * dp + 2 * seq + pad_len;
    with_scratch(scratch_len, |buf| {
        let [kt, vt, s, dpb, dk, dv, dq, dl, lse2, pads] = carve(
            buf,
            [
                d * BLOCK_K,
                d * BLOCK_K,
                BLOCK_Q * BLOCK_K,
                BLOCK_Q * BLOCK_K,
                BLOCK_K * dp,
                BLOCK_K * dp,
                seq * dp,
                seq,
                seq,
                pad_len,
            ],
        );
        // Dl_i = dout_i·o_i (eight partial sums, fixed order); lse in log2 units.
        for i in 0..seq {
            let (x, y) = (&do_in.from(i)[..d], &o.from(i)[..d]);
            let mut acc = [0f32; 8];
            let mut ch = x.chunks_exact(8).zip(y.chunks_exact(8));
            for (xa, ya) in &mut ch {
                for u in 0..8 {
                    acc[u] += xa[u] * ya[u];
                }
            }
            let mut sum =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for cc in d / 8 * 8..d {
                sum += x[cc] * y[cc];
            }
            dl[i] = sum;
            lse2[i] = ins.lse[(b * heads + h) * seq + i] * std::f32::consts::LOG2_E;
        }
        dq.fill(0.0);
        // Rows used as the streamed (vector) operand need `dp` readable columns: when D is
        // not a multiple of 16, zero-padded copies of Q, K and dout.
        let (q, k, dout) = if padded {
            let [qp, kp, dop] = carve(pads, [seq * dp, seq * dp, seq * dp]);
            for (src, dst) in [(&q_in, &mut *qp), (&k_in, &mut *kp), (&do_in, &mut *dop)] {
                for t in 0..seq {
                    dst[t * dp..t * dp + d].copy_from_slice(&src.from(t)[..d]);
                    dst[t * dp + d..(t + 1) * dp].fill(0.0);
                }
            }
            let r = |data| Rows { data, stride: dp };
            (r(&*qp), r(&*kp), r(&*dop))
        } else {
            (q_in, k_in, do_in)
        };
        let mut j0 = 0;
        while j0 < seq {
            let nk = (seq - j0).min(BLOCK_K);
            let nkp = nk.div_ceil(PAD) * PAD;
            // Kᵀ and Vᵀ of the key block, zero past nk: kt[c·BLOCK_K + j].
            K::pack_t(k_in.from(j0), k_in.stride, nk, d, 1.0, kt, BLOCK_K, nkp);
            K::pack_t(v.from(j0), v.stride, nk, d, 1.0, vt, BLOCK_K, nkp);
            dk[..nk * dp].fill(0.0);
            dv[..nk * dp].fill(0.0);
            let mut i0 = j0;
            while i0 < seq {
                let nq = (seq - i0).min(BLOCK_Q);
                // In the diagonal block, P and dS are zero above the diagonal.
                let diag = i0 == j0;
                let diag_from = if diag { Tri::KFrom } else { Tri::Full };
                // S = Q·Kᵀ (raw scores, unscaled): s[i·BLOCK_K + j].
                K::gemm(
                    &Mm {
                        m: nq,
                        n: nkp,
                        kc: d,
                        a: q.from(i0),
                        ars: q.stride,
                        aks: 1,
                        b: kt,
                        ldb: BLOCK_K,
                        ldo: BLOCK_K,
                        acc: false,
                        tri: Tri::Full,
                    },
                    s,
                );
                // P = 2^(S·log2(e)/√D − lse2), zero where key > query or past the block.
                for r in 0..nq {
                    let row = &mut s[r * BLOCK_K..r * BLOCK_K + nkp];
                    K::probs_row(row, cl, lse2[i0 + r]);
                    let visible = (i0 + r + 1 - j0).min(nk);
                    row[visible..].fill(0.0);
                }
                // dV += Pᵀ·dout.
                K::gemm(
                    &Mm {
                        m: nk,
                        n: dp,
                        kc: nq,
                        a: s,
                        ars: 1,
                        aks: BLOCK_K,
                        b: dout.from(i0),
                        ldb: dout.stride,
                        ldo: dp,
                        acc: true,
                        tri: diag_from,
                    },
                    dv,
                );
                // dP = dout·Vᵀ.
                K::gemm(
                    &Mm {
                        m: nq,
                        n: nkp,
                        kc: d,
                        a: do_in.from(i0),
                        ars: c,
                        aks: 1,
                        b: vt,
                        ldb: BLOCK_K,
                        ldo: BLOCK_K,
                        acc: false,
                        tri: Tri::Full,
                    },
                    dpb,
                );
                // dS = P ⊙ (dP − Dl).
                for r in 0..nq {
                    let o = r * BLOCK_K;
                    K::ds_row(&s[o..o + nkp], &mut dpb[o..o + nkp], dl[i0 + r]);
                }
                // dK += dSᵀ·Q;  dQ += dS·K.
                K::gemm(
                    &Mm {
                        m: nk,
                        n: dp,
                        kc: nq,
                        a: dpb,
                        ars: 1,
                        aks: BLOCK_K,
                        b: q.from(i0),
                        ldb: q.stride,
                        ldo: dp,
                        acc: true,
                        tri: diag_from,
                    },
                    dk,
                );
                K::gemm(
                    &Mm {
                        m: nq,
                        n: dp,
                        kc: nk,
                        a: dpb,
                        ars: BLOCK_K,
                        aks: 1,
                        b: k.from(j0),
                        ldb: k.stride,
                        ldo: dp,
                        acc: true,
                        tri: if diag { Tri::KTo } else { Tri::Full },
                    },
                    &mut dq[i0 * dp..],
                );
                i0 += nq;
            }
            // Write dK·(1/√D) and dV of the key block.
            for j in 0..nk {
                let row = (b * seq + j0 + j) * 3 * c + h * d;
                // SAFETY: columns h·D.. of the K and V thirds of row (b, j0 + j) belong to
                // task (b, h) only.
                let dst = unsafe { dqkv.slice(row + c, d) };
                for (x, &g) in dst.iter_mut().zip(&dk[j * dp..j * dp + d]) {
                    *x = g * inv_sqrt_d;
                }
                // SAFETY: as above.
                let dst = unsafe { dqkv.slice(row + 2 * c, d) };
                dst.copy_from_slice(&dv[j * dp..j * dp + d]);
            }
            j0 += nk;
        }
        for i in 0..seq {
            // SAFETY: columns h·D.. of the Q third of row (b, i) belong to task (b, h) only.
            let dst = unsafe { dqkv.slice((b * seq + i) * 3 * c + h * d, d) };
            for (x, &g) in dst.iter_mut().zip(&dq[i * dp..i * dp + d]) {
                *x = g * inv_sqrt_d;
            }
        }
    })
}
