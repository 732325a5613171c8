//! Batch-invariant products of a few rows: a batched decode step, `Y [m, n] = X [m, k] · B`, with
//! every row of `Y` bitwise the M = 1 product of that row of `X` ([`super::gemv`],
//! [`super::PanelMatrix::gemv`]), for any `m ≤` [`super::INVARIANT_ROWS`] (products of more than [`super::FEW_ROWS`] rows
//! come here only with [`super::GemmOptions::rows_invariant`]) and any thread count, while
//! each tile of B is read from memory once for all `m` rows.
//!
//! The rule: an output element's value is fixed by the order of its floating-point operations,
//! never by which other rows share the product. The M = 1 paths form each element in one of
//! these orders ([`Chain`]), and the kernels here form it in the same order, only interleaved
//! with the other rows' elements:
//!
//! ```text
//! Fma        y = fma(x[p], B[p, j], y)            p = 0, 1, …, k-1, from y = 0
//!            (row-major B on the SIMD path, column panels on every path)
//! MulAdd     y = y + x[p]·B[p, j]                 the same order, two roundings per step
//!            (row-major B on the plain-Rust path)
//! FmaStreams four Fma chains over the depth runs [s·⌈k/4⌉, (s+1)·⌈k/4⌉), summed
//!            ((y0 + y1) + y2) + y3                 (the AVX2 depth-stream GEMV)
//! Dots       32-deep blocks into four 8-lane accumulators acc[q] (lane l: p = 32t + 8q + l),
//!            8-deep tail blocks into acc[0], the fixed tree ((a0 + a1) + (a2 + a3)) → 4 → 2 → 1,
//!            then the last k mod 8 elements by fma     (column-major B on the SIMD path)
//! DotMulAdd  y = y + x[p]·B[p, j]                 in order of p (column-major, plain Rust)
//! ```
//!
//! A lane of a 16-lane FMA is the same IEEE operation as a lane of an 8-lane one or a scalar
//! `mul_add`, so the AVX-512 kernels here equal the AVX2 and scalar M = 1 kernels bit for bit.
//!
//! Loop nest of the row-major and panel products (one column block of `W` columns per task):
//!
//! ```text
//! for each depth tile p0 .. p0 + R:                   B[p0 .. p0+R, j0 .. j0+W] read once
//!     widen the tile to f32 in column order (16-bit B, panels) or use it in place (f32)
//!     for each row i:  acc_i[j0 .. j0+W] ← chain step over the R depths   (acc in L1/L2)
//! ```
//!
//! and of the column-major product (`wteᵀ` of the logits): for each block of 64 columns (widened
//! once), for each group of four rows, for each pair of columns, the dot products of the group
//! with the pair, the accumulators in registers for the whole depth ([`col_dots`]).
use super::panels::{slot, PanelMatrix, PANEL};
use super::{Isa, MatRef};
use kiln_tensor::{DType, FloatElement};
use rayon::prelude::*;
use std::ops::Range;

/// Depth of one tile of B (rows of B read per pass over the batch rows).
const TILE_DEPTH: usize = 16;

/// Widest column block one task takes (a multiple of [`PANEL`]): a widened tile is
/// `TILE_DEPTH × 256` f32 = 16 KiB, inside L1.
const MAX_BLOCK: usize = 256;

/// B larger than this (bytes), or a product of more flops than [`super::driver::PARALLEL_FLOPS`],
/// is split among threads (by columns; each column's arithmetic does not depend on the split).
const PARALLEL_BYTES: usize = 256 << 10;

/// How the M = 1 path forms one output element (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    Fma,
    MulAdd,
    FmaStreams,
    Dots,
    DotMulAdd,
}

/// The kernel family that runs a chain here: AVX-512, AVX2 + FMA, or plain Rust.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Micro {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// `acc + x·b` (two roundings).
    Plain,
    /// `fma(x, b, acc)` in plain Rust (the panel kernels' scalar path).
    PlainFma,
}

impl Micro {
    /// The fastest kernels `isa` allows on this CPU for an FMA chain (`fma`; the same lanes, any
    /// width), or the plain `acc + x·b` chain.
    fn pick(isa: Isa, fma: bool) -> Micro {
        #[cfg(target_arch = "x86_64")]
        if fma && matches!(isa, Isa::Avx512 | Isa::Avx2) {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if isa == Isa::Avx512 && avx2 && is_x86_feature_detected!("avx512f") {
                return Micro::Avx512;
            }
            if avx2 {
                return Micro::Avx2;
            }
        }
        let _ = isa;
        if fma {
            Micro::PlainFma
        } else {
            Micro::Plain
        }
    }
}

/// `ys[i] = xs[i]·B` for `m = xs.len() / k` rows (`xs` `[m, k]` and `ys` `[m, n]` row-major),
/// B `k × n` with a unit row or column stride, each row bitwise its M = 1 product
/// ([`super::gemv::gemv`] with the same `isa`). Returns false, touching nothing, when B's layout
/// is one the M = 1 path does not stream.
pub fn rows_dense<TB: FloatElement>(
    isa: Isa,
    xs: &[f32],
    b: &MatRef<'_, TB>,
    ys: &mut [f32],
) -> bool {
    let (k, n) = (b.rows, b.cols);
    let Some(chain) = super::gemv::chain_of::<TB>(isa, k, n, b.row_stride, b.col_stride) else {
        return false;
    };
    let m = xs.len().checked_div(k).unwrap_or(0);
    debug_assert!(xs.len() == m * k && ys.len() == m * n);
    if k == 0 {
        ys.fill(0.0);
        return true;
    }
    let parallel = parallel(m, k, n, std::mem::size_of::<TB>());
    let src = Dense { b: *b };
    match chain {
        Chain::Fma | Chain::MulAdd => {
            let micro = Micro::pick(isa, chain == Chain::Fma);
            row_chains(micro, xs, m, &src, 0..k, ys, parallel);
        }
        Chain::FmaStreams => {
            // Four runs of the depth, each its own chain from zero (an empty run stays zero),
            // then ((y0 + y1) + y2) + y3, as the depth-stream GEMV sums them.
            let micro = Micro::pick(isa, true);
            let run = k.div_ceil(DEPTH_STREAMS);
            let mut parts = vec![vec![0f32; m * n]; DEPTH_STREAMS];
            for (s, part) in parts.iter_mut().enumerate() {
                let depth = (s * run).min(k)..((s + 1) * run).min(k);
                if !depth.is_empty() {
                    row_chains(micro, xs, m, &src, depth, part, parallel);
                }
            }
            for (e, y) in ys.iter_mut().enumerate() {
                *y = parts[1..].iter().fold(parts[0][e], |acc, p| acc + p[e]);
            }
        }
        Chain::Dots | Chain::DotMulAdd => {
            let micro = Micro::pick(isa, chain == Chain::Dots);
            col_dots(micro, xs, m, b, ys, parallel);
        }
    }
    true
}

/// The runs of the depth the AVX2 depth-stream GEMV reads side by side.
const DEPTH_STREAMS: usize = 4;

/// `ys[i] = xs[i]·B` for B in column panels, as [`rows_dense`]: each row bitwise its
/// [`PanelMatrix::gemv`] (an FMA chain in order of depth on every path).
pub fn rows_panels<T: FloatElement>(isa: Isa, xs: &[f32], b: &PanelMatrix<T>, ys: &mut [f32]) {
    let (k, n) = (b.rows(), b.cols());
    if k == 0 {
        ys.fill(0.0);
        return;
    }
    let m = xs.len() / k;
    debug_assert!(xs.len() == m * k && ys.len() == m * n);
    let parallel = parallel(m, k, n, std::mem::size_of::<T>());
    row_chains(
        Micro::pick(isa, true),
        xs,
        m,
        &Panels { b },
        0..k,
        ys,
        parallel,
    );
}

/// Whether a product is split among threads.
fn parallel(m: usize, k: usize, n: usize, elem: usize) -> bool {
    rayon::current_num_threads() > 1
        && (k * n * elem >= PARALLEL_BYTES || 2 * m * k * n >= super::driver::PARALLEL_FLOPS)
}

/// Column blocks: at most [`MAX_BLOCK`] wide, a multiple of [`PANEL`], and at least two per
/// thread when the product is split (narrower, down to one panel, for narrow B).
fn block_width(n: usize, parallel: bool) -> usize {
    let tasks = if parallel {
        2 * rayon::current_num_threads()
    } else {
        1
    };
    n.div_ceil(tasks)
        .next_multiple_of(PANEL)
        .clamp(PANEL, MAX_BLOCK)
}

/// Tiles of a `k × n` B as f32 in column order.
trait Tiles: Sync {
    fn k(&self) -> usize;
    fn n(&self) -> usize;
    /// Rows `p0 .. p0 + r`, columns `j0 .. j0 + w` (`j0` a multiple of [`PANEL`]): a slice
    /// whose row `q` starts at `q·stride`, either into B itself or written into `scratch`
    /// (`r·w` elements).
    fn tile<'s>(
        &'s self,
        p0: usize,
        r: usize,
        j0: usize,
        w: usize,
        scratch: &'s mut [f32],
    ) -> (&'s [f32], usize);
    /// Hints the source of the tile at rows `p0 .. p0 + r`, columns `j0 .. j0 + w` into cache.
    fn prefetch(&self, p0: usize, r: usize, j0: usize, w: usize);
}

/// A row-major B (`col_stride == 1`, or one column).
struct Dense<'a, TB> {
    b: MatRef<'a, TB>,
}

impl<TB: FloatElement> Tiles for Dense<'_, TB> {
    fn k(&self) -> usize {
        self.b.rows
    }
    fn n(&self) -> usize {
        self.b.cols
    }
    fn tile<'s>(
        &'s self,
        p0: usize,
        r: usize,
        j0: usize,
        w: usize,
        scratch: &'s mut [f32],
    ) -> (&'s [f32], usize) {
        let b = &self.b;
        let (rs, cs) = (b.row_stride, b.col_stride);
        if TB::DTYPE == DType::F32 && (cs == 1 || w == 1) {
            // In place: f32 rows at stride rs.
            let data: &[f32] = bytemuck::cast_slice(b.data);
            let s = p0 * rs + j0 * cs;
            return (&data[s..s + (r - 1) * rs + w], rs);
        }
        for (q, row) in scratch.chunks_exact_mut(w).take(r).enumerate() {
            let s = (p0 + q) * rs + j0 * cs;
            if cs == 1 {
                super::pack::convert_run(&b.data[s..s + w], row);
            } else {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = b.data[s + j * cs].to_f32();
                }
            }
        }
        (&scratch[..r * w], w)
    }
    fn prefetch(&self, p0: usize, r: usize, j0: usize, w: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.b.col_stride == 1 {
            let elem = std::mem::size_of::<TB>();
            let start = self
                .b
                .data
                .as_ptr()
                .wrapping_add(p0 * self.b.row_stride + j0) as *const u8;
            x86::prefetch_rows(start, r, self.b.row_stride * elem, w * elem);
        }
        let _ = (p0, r, j0, w);
    }
}

/// B in column panels.
struct Panels<'a, T: FloatElement> {
    b: &'a PanelMatrix<T>,
}

impl<T: FloatElement> Tiles for Panels<'_, T> {
    fn k(&self) -> usize {
        self.b.rows()
    }
    fn n(&self) -> usize {
        self.b.cols()
    }
    fn tile<'s>(
        &'s self,
        p0: usize,
        r: usize,
        j0: usize,
        w: usize,
        scratch: &'s mut [f32],
    ) -> (&'s [f32], usize) {
        let (k, data) = (self.b.rows(), self.b.as_slice());
        debug_assert!(j0.is_multiple_of(PANEL));
        for c in (0..w).step_by(PANEL) {
            let q = (j0 + c) / PANEL;
            let wc = PANEL.min(w - c);
            let panel = &data[q * k * PANEL..(q + 1) * k * PANEL];
            for t in 0..r {
                let row = &panel[(p0 + t) * PANEL..(p0 + t + 1) * PANEL];
                let out = &mut scratch[t * w + c..t * w + c + wc];
                widen_panel_row(row, out);
            }
        }
        (&scratch[..r * w], w)
    }
    fn prefetch(&self, p0: usize, r: usize, j0: usize, w: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let (k, elem) = (self.b.rows(), std::mem::size_of::<T>());
            let data = self.b.as_slice().as_ptr();
            for c in (0..w).step_by(PANEL) {
                let q = (j0 + c) / PANEL;
                let start = data.wrapping_add(q * k * PANEL + p0 * PANEL) as *const u8;
                x86::prefetch_rows(start, 1, 0, r * PANEL * elem);
            }
        }
        let _ = (p0, r, j0, w);
    }
}

/// The first `out.len()` columns of one stored panel row (32 elements in [`slot`] order) as f32
/// in column order (exact).
fn widen_panel_row<T: FloatElement>(row: &[T], out: &mut [f32]) {
    if T::DTYPE != DType::BF16 {
        super::pack::convert_run(&row[..out.len()], out);
        return;
    }
    let s: &[u16] = bytemuck::cast_slice(row);
    if out.len() == PANEL {
        // Word i of each half: column i low, column 8 + i high.
        for h in 0..2 {
            for i in 0..8 {
                let word = (s[16 * h + 2 * i] as u32) | ((s[16 * h + 2 * i + 1] as u32) << 16);
                out[16 * h + i] = f32::from_bits(word << 16);
                out[16 * h + 8 + i] = f32::from_bits(word & 0xffff_0000);
            }
        }
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = f32::from_bits((s[slot(DType::BF16, j)] as u32) << 16);
    }
}

/// The row chains (Fma or MulAdd) of `m` rows over the depths `depth`, from zero, into `ys`
/// (`[m, n]`, overwritten): column blocks as tasks, each taking its depth tiles in order and
/// every row through each tile.
fn row_chains<S: Tiles>(
    micro: Micro,
    xs: &[f32],
    m: usize,
    src: &S,
    depth: Range<usize>,
    ys: &mut [f32],
    parallel: bool,
) {
    let (k, n) = (src.k(), src.n());
    let wb = block_width(n, parallel);
    let blocks = n.div_ceil(wb);
    let run = |bi: usize| -> Vec<f32> {
        let j0 = bi * wb;
        let w = wb.min(n - j0);
        let mut acc = vec![0f32; m * w];
        let mut scratch = vec![0f32; TILE_DEPTH * w];
        let mut p = depth.start;
        while p < depth.end {
            let r = TILE_DEPTH.min(depth.end - p);
            if p + r < depth.end {
                src.prefetch(p + r, TILE_DEPTH.min(depth.end - p - r), j0, w);
            }
            let (tile, ts) = src.tile(p, r, j0, w, &mut scratch);
            chain_tile(micro, xs, k, p, r, tile, ts, &mut acc, w);
            p += r;
        }
        acc
    };
    let parts: Vec<Vec<f32>> = if parallel && blocks > 1 {
        (0..blocks).into_par_iter().map(run).collect()
    } else {
        (0..blocks).map(run).collect()
    };
    for (bi, part) in parts.iter().enumerate() {
        let j0 = bi * wb;
        let w = wb.min(n - j0);
        for (i, a) in part.chunks_exact(w).enumerate() {
            ys[i * n + j0..i * n + j0 + w].copy_from_slice(a);
        }
    }
}

/// Rows of A per register block of the AVX-512 chain kernel (four 16-lane accumulators each,
/// 24 of the 32 registers) and of the AVX2 one (two 8-lane accumulators each).
const GROUP_512: usize = 6;
const GROUP_256: usize = 4;

/// One chain step over a tile for every row: `acc_i[j] ← acc_i[j] ⊕ x_i[p0 + q]·tile[q, j]` for
/// `q = 0 .. r` in order, `j < w`, tile row `q` at `q·ts`, `x_i` at `xs[i·k ..]`, `acc_i` at
/// `acc[i·w ..]`. [`Micro::Plain`] is the plain-Rust path's `acc + x·b` (two roundings), the
/// others FMAs.
#[allow(clippy::too_many_arguments)]
fn chain_tile(
    micro: Micro,
    xs: &[f32],
    k: usize,
    p0: usize,
    r: usize,
    tile: &[f32],
    ts: usize,
    acc: &mut [f32],
    w: usize,
) {
    let m = acc.len() / w;
    assert!(r > 0 && tile.len() >= (r - 1) * ts + w && xs.len() >= m * k && p0 + r <= k);
    match micro {
        #[cfg(target_arch = "x86_64")]
        Micro::Avx512 | Micro::Avx2 => {
            let group = if micro == Micro::Avx512 {
                GROUP_512
            } else {
                GROUP_256
            };
            let mut i = 0;
            while i < m {
                let g = group.min(m - i);
                let xp = |t: usize| xs[(i + t) * k + p0..].as_ptr();
                let ap = acc[i * w..].as_mut_ptr();
                macro_rules! run {
                    ($f:ident, $g:literal) => {{
                        let x: [*const f32; $g] = std::array::from_fn(xp);
                        let a: [*mut f32; $g] = std::array::from_fn(|t| ap.wrapping_add(t * w));
                        // SAFETY: rows i .. i+g of xs have r elements from p0 and of acc w
                        // elements (asserted above); tile rows q < r hold w elements at q·ts;
                        // `Micro::pick` checked the CPU features.
                        unsafe { x86::$f::<$g>(r, x, tile.as_ptr(), ts, a, w) }
                    }};
                }
                if micro == Micro::Avx512 {
                    match g {
                        6 => run!(chain_512, 6),
                        5 => run!(chain_512, 5),
                        4 => run!(chain_512, 4),
                        3 => run!(chain_512, 3),
                        2 => run!(chain_512, 2),
                        _ => run!(chain_512, 1),
                    }
                } else {
                    match g {
                        4 => run!(chain_256, 4),
                        3 => run!(chain_256, 3),
                        2 => run!(chain_256, 2),
                        _ => run!(chain_256, 1),
                    }
                }
                i += g;
            }
        }
        Micro::Plain | Micro::PlainFma => {
            for (i, a) in acc.chunks_exact_mut(w).enumerate() {
                let x = &xs[i * k + p0..i * k + p0 + r];
                for (q, &xq) in x.iter().enumerate() {
                    let row = &tile[q * ts..q * ts + w];
                    if micro == Micro::Plain {
                        for (a, &v) in a.iter_mut().zip(row) {
                            *a += xq * v;
                        }
                    } else {
                        for (a, &v) in a.iter_mut().zip(row) {
                            *a = xq.mul_add(v, *a);
                        }
                    }
                }
            }
        }
    }
}

/// Column-major B (column `j` contiguous at `j·col_stride`): the dot product of every row with
/// every column, each in the M = 1 kernel's order ([`Chain::Dots`] or [`Chain::DotMulAdd`]).
///
/// Loop nest of one block of [`COL_BLOCK`] columns (192 KiB of f32 at `k = 768`, held in L2):
///
/// ```text
/// for each group of rows (4 on AVX-512, 3 on AVX2):   x rows in L1
///     for each pair of columns in the block:           B from DRAM for the first group
///         the group's dot products with the pair        (software-prefetched), then from L2
/// ```
///
/// Measured on a Zen 4 core, `[16, 50257, 768]` (`wteᵀ`, one thread): pairs outer and no
/// prefetch 45.6 ms, this nest 27.1 ms (two threads: 22.5 → 11.3 ms); `[4, 50257, 768]`
/// 22.1 → 8.3 ms (the M = 1 product: 7.6 ms). Hints into L1 (`T0`) instead: 41.2 and 18.0 ms.
fn col_dots<TB: FloatElement>(
    micro: Micro,
    xs: &[f32],
    m: usize,
    b: &MatRef<'_, TB>,
    ys: &mut [f32],
    parallel: bool,
) {
    let (k, n, cs) = (b.rows, b.cols, b.col_stride);
    let blocks = n.div_ceil(COL_BLOCK);
    // B itself when it is f32 (its columns are used in place).
    let f32_data: Option<&[f32]> = (TB::DTYPE == DType::F32).then(|| bytemuck::cast_slice(b.data));
    let run = |bi: usize| -> Vec<f32> {
        let j0 = bi * COL_BLOCK;
        let w = COL_BLOCK.min(n - j0);
        let mut out = vec![0f32; m * w];
        // The block's columns as f32: in place (f32), or widened once for every row group.
        let widened: Vec<f32> = if f32_data.is_some() {
            Vec::new()
        } else {
            let mut cols = vec![0f32; w * k];
            for (c, dst) in cols.chunks_exact_mut(k).enumerate() {
                let s = (j0 + c) * cs;
                super::pack::convert_run(&b.data[s..s + k], dst);
            }
            cols
        };
        let column = |c: usize| -> &[f32] {
            match f32_data {
                Some(data) => &data[(j0 + c) * cs..(j0 + c) * cs + k],
                None => &widened[c * k..(c + 1) * k],
            }
        };
        let group = micro.dot_rows();
        let mut i = 0;
        while i < m {
            let rows = i..(i + group).min(m);
            let mut j = 0;
            while j < w {
                let pair = 2.min(w - j);
                let cols: [&[f32]; 2] = [column(j), column(j + pair - 1)];
                // The first group reads the block from memory: ask for the columns
                // PREFETCH_COLS ahead (hints only, so past B's end is harmless).
                let ahead = f32_data.filter(|_| i == 0).map(|data| {
                    data.as_ptr()
                        .wrapping_add((j0 + j + PREFETCH_COLS) * cs)
                        .cast::<u8>()
                });
                dots(
                    micro,
                    xs,
                    rows.clone(),
                    k,
                    &cols[..pair],
                    ahead,
                    cs,
                    |r, c, v| {
                        out[r * w + j + c] = v;
                    },
                );
                j += pair;
            }
            i = rows.end;
        }
        out
    };
    let parts: Vec<Vec<f32>> = if parallel && blocks > 1 {
        (0..blocks).into_par_iter().map(run).collect()
    } else {
        (0..blocks).map(run).collect()
    };
    for (bi, part) in parts.iter().enumerate() {
        let j0 = bi * COL_BLOCK;
        let w = COL_BLOCK.min(n - j0);
        for (i, o) in part.chunks_exact(w).enumerate() {
            ys[i * n + j0..i * n + j0 + w].copy_from_slice(o);
        }
    }
}

/// Columns per block of the column-major product (two threads take many each: 50257 columns
/// of the logits).
const COL_BLOCK: usize = 64;

/// How far ahead (in columns) the first row group prefetches B.
const PREFETCH_COLS: usize = 16;

impl Micro {
    /// Rows that one call of the column dot kernel takes.
    fn dot_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Micro::Avx512 => 4,
            #[cfg(target_arch = "x86_64")]
            Micro::Avx2 => 3,
            Micro::Plain | Micro::PlainFma => 1,
        }
    }
}

/// The dot products of the rows `rows` of `xs` (`[m, k]`, at most [`Micro::dot_rows`] of them)
/// with one or two columns (`k` f32 each), reported as `put(row, column, value)`. `ahead`, when
/// given, is prefetched as two columns `cs` elements apart while the dots run (AVX-512 only).
#[allow(clippy::too_many_arguments)]
fn dots(
    micro: Micro,
    xs: &[f32],
    rows: Range<usize>,
    k: usize,
    cols: &[&[f32]],
    ahead: Option<*const u8>,
    cs: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    assert!(
        xs.len() >= rows.end * k
            && cols.iter().all(|c| c.len() >= k)
            && cols.len() <= 2
            && rows.len() <= micro.dot_rows()
    );
    match micro {
        #[cfg(target_arch = "x86_64")]
        Micro::Avx512 => {
            let (i, g) = (rows.start, rows.len());
            let x: [*const f32; 4] = std::array::from_fn(|t| xs[(i + t.min(g - 1)) * k..].as_ptr());
            let c = [cols[0].as_ptr(), cols[cols.len() - 1].as_ptr()];
            // SAFETY: rows i .. i+g of xs and every column have k elements (asserted above);
            // `Micro::pick` checked AVX-512F, AVX2 and FMA; prefetches never fault.
            let v = unsafe {
                match ahead {
                    Some(a) => x86::dots_512::<true>(k, x, g, c, [a, a.wrapping_add(cs * 4)]),
                    None => x86::dots_512::<false>(k, x, g, c, [std::ptr::null(); 2]),
                }
            };
            for (t, row) in v.iter().enumerate().take(g) {
                for (c, &val) in row.iter().enumerate().take(cols.len()) {
                    put(i + t, c, val);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Micro::Avx2 => {
            // No hints here: on the AVX2 kernel (measured with `--isa avx2` on a Zen 4 core)
            // neither whole-column T0 nor per-block T1 hints beat the hardware prefetcher.
            let (i, g) = (rows.start, rows.len());
            for (c, col) in cols.iter().enumerate() {
                let x: [*const f32; 3] =
                    std::array::from_fn(|t| xs[(i + t.min(g - 1)) * k..].as_ptr());
                // SAFETY: as above, with AVX2 and FMA checked.
                let v = unsafe { x86::dots_256(k, x, col.as_ptr()) };
                for (t, &val) in v.iter().enumerate().take(g) {
                    put(i + t, c, val);
                }
            }
        }
        Micro::Plain | Micro::PlainFma => {
            let _ = (ahead, cs);
            for (c, col) in cols.iter().enumerate() {
                for i in rows.clone() {
                    let mut acc = 0f32;
                    for (&x, &v) in xs[i * k..(i + 1) * k].iter().zip(&col[..k]) {
                        acc += x * v;
                    }
                    put(i, c, acc);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Register blocks indexed by row and column read best as index loops.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    /// `acc[t][j] = fma(x[t][q], b[q·bs + j], acc[t][j])` for `q < r` in order, `j < w`, for
    /// the `G` rows `t` at once: 64 columns (four 16-lane registers per row) at a time, each
    /// tile row loaded once into registers for all `G` rows, then 16 columns at a time, the last
    /// `w mod 16` masked. Each element's FMAs are those of the M = 1 chain, in its order.
    ///
    /// # Safety
    /// Each `x[t]` has `r`, each `acc[t]` `w` elements; rows `q < r` of `b` have `w` readable
    /// elements at `q·bs`; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn chain_512<const G: usize>(
        r: usize,
        x: [*const f32; G],
        b: *const f32,
        bs: usize,
        acc: [*mut f32; G],
        w: usize,
    ) {
        // SAFETY (whole body): accesses at q < r, j < w (masked past w), the contract above.
        unsafe {
            let mut j = 0;
            while j + 64 <= w {
                let mut a = [[_mm512_setzero_ps(); 4]; G];
                for t in 0..G {
                    for c in 0..4 {
                        a[t][c] = _mm512_loadu_ps(acc[t].add(j + 16 * c));
                    }
                }
                for q in 0..r {
                    let row = b.add(q * bs + j);
                    let bv = [
                        _mm512_loadu_ps(row),
                        _mm512_loadu_ps(row.add(16)),
                        _mm512_loadu_ps(row.add(32)),
                        _mm512_loadu_ps(row.add(48)),
                    ];
                    for t in 0..G {
                        let xv = _mm512_set1_ps(*x[t].add(q));
                        for c in 0..4 {
                            a[t][c] = _mm512_fmadd_ps(xv, bv[c], a[t][c]);
                        }
                    }
                }
                for t in 0..G {
                    for c in 0..4 {
                        _mm512_storeu_ps(acc[t].add(j + 16 * c), a[t][c]);
                    }
                }
                j += 64;
            }
            while j < w {
                let left = w - j;
                let mask: __mmask16 = if left >= 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                let mut a = [_mm512_setzero_ps(); G];
                for t in 0..G {
                    a[t] = _mm512_maskz_loadu_ps(mask, acc[t].add(j));
                }
                for q in 0..r {
                    let v = _mm512_maskz_loadu_ps(mask, b.add(q * bs + j));
                    for t in 0..G {
                        a[t] = _mm512_fmadd_ps(_mm512_set1_ps(*x[t].add(q)), v, a[t]);
                    }
                }
                for t in 0..G {
                    _mm512_mask_storeu_ps(acc[t].add(j), mask, a[t]);
                }
                j += 16;
            }
        }
    }

    /// [`chain_512`] on AVX2: 16 columns (two 8-lane registers per row) at a time, then 8, the
    /// last `w mod 8` by scalar FMA.
    ///
    /// # Safety
    /// As [`chain_512`], with AVX2 and FMA instead of AVX-512F.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chain_256<const G: usize>(
        r: usize,
        x: [*const f32; G],
        b: *const f32,
        bs: usize,
        acc: [*mut f32; G],
        w: usize,
    ) {
        // SAFETY (whole body): accesses at q < r, j < w, the contract above.
        unsafe {
            let mut j = 0;
            while j + 16 <= w {
                let mut a = [[_mm256_setzero_ps(); 2]; G];
                for t in 0..G {
                    for c in 0..2 {
                        a[t][c] = _mm256_loadu_ps(acc[t].add(j + 8 * c));
                    }
                }
                for q in 0..r {
                    let row = b.add(q * bs + j);
                    let bv = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
                    for t in 0..G {
                        let xv = _mm256_set1_ps(*x[t].add(q));
                        for c in 0..2 {
                            a[t][c] = _mm256_fmadd_ps(xv, bv[c], a[t][c]);
                        }
                    }
                }
                for t in 0..G {
                    for c in 0..2 {
                        _mm256_storeu_ps(acc[t].add(j + 8 * c), a[t][c]);
                    }
                }
                j += 16;
            }
            while j + 8 <= w {
                for t in 0..G {
                    let mut a = _mm256_loadu_ps(acc[t].add(j));
                    for q in 0..r {
                        let v = _mm256_loadu_ps(b.add(q * bs + j));
                        a = _mm256_fmadd_ps(_mm256_set1_ps(*x[t].add(q)), v, a);
                    }
                    _mm256_storeu_ps(acc[t].add(j), a);
                }
                j += 8;
            }
            while j < w {
                for t in 0..G {
                    let mut a = *acc[t].add(j);
                    for q in 0..r {
                        a = (*x[t].add(q)).mul_add(*b.add(q * bs + j), a);
                    }
                    *acc[t].add(j) = a;
                }
                j += 1;
            }
        }
    }

    /// Prefetch hints for `rows` rows of `bytes` bytes each, `stride` bytes apart, from `p`
    /// (a hint only: never faults, whatever the address).
    #[inline]
    pub fn prefetch_rows(p: *const u8, rows: usize, stride: usize, bytes: usize) {
        for q in 0..rows {
            let row = p.wrapping_add(q * stride);
            let mut o = 0;
            while o < bytes {
                // SAFETY: prefetch is a hint and does not fault.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(o) as *const i8) };
                o += 64;
            }
        }
    }

    /// The end of the M = 1 column dot product from its four 8-lane accumulators after the
    /// 32-deep blocks (depth `p` reached): 8-deep blocks into `acc[0]`, the fixed tree, then
    /// the last elements by scalar FMA — exactly `dots_*` of the GEMV.
    ///
    /// # Safety
    /// `x` and `col` have `k` elements; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn finish_dot(
        mut acc: [__m256; 4],
        mut p: usize,
        k: usize,
        x: *const f32,
        col: *const f32,
    ) -> f32 {
        // SAFETY (whole body): accesses at p < k.
        unsafe {
            while p + 8 <= k {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(x.add(p)),
                    _mm256_loadu_ps(col.add(p)),
                    acc[0],
                );
                p += 8;
            }
            let t = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            let mut v = _mm_cvtss_f32(h);
            for q in p..k {
                v = (*x.add(q)).mul_add(*col.add(q), v);
            }
            v
        }
    }

    /// The column dot products of up to four rows (`x[t]`, `t < g`; unused slots repeat a row)
    /// with two columns, [`super::Chain::Dots`]: per 32-deep block, each (row, column) pair keeps
    /// its accumulators 0‖1 and 2‖3 in two 16-lane registers (the lanes of the M = 1 kernel's
    /// four 8-lane ones), then [`finish_dot`]. Returns `[row][column]`.
    ///
    /// # Safety
    /// Every `x[t]` and column has `k` elements; the CPU has AVX-512F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn dots_512<const PREFETCH: bool>(
        k: usize,
        x: [*const f32; 4],
        g: usize,
        cols: [*const f32; 2],
        ahead: [*const u8; 2],
    ) -> [[f32; 2]; 4] {
        // SAFETY (whole body): accesses at p < k; prefetches are hints and never fault.
        unsafe {
            let mut lo = [[_mm512_setzero_ps(); 2]; 4];
            let mut hi = [[_mm512_setzero_ps(); 2]; 4];
            let mut p = 0;
            while p + 32 <= k {
                if PREFETCH {
                    for c in ahead {
                        let line = c.wrapping_add(4 * p) as *const i8;
                        _mm_prefetch::<_MM_HINT_T1>(line);
                        _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(64));
                    }
                }
                let b0 = [
                    _mm512_loadu_ps(cols[0].add(p)),
                    _mm512_loadu_ps(cols[1].add(p)),
                ];
                let b1 = [
                    _mm512_loadu_ps(cols[0].add(p + 16)),
                    _mm512_loadu_ps(cols[1].add(p + 16)),
                ];
                for t in 0..4 {
                    let x0 = _mm512_loadu_ps(x[t].add(p));
                    let x1 = _mm512_loadu_ps(x[t].add(p + 16));
                    for c in 0..2 {
                        lo[t][c] = _mm512_fmadd_ps(x0, b0[c], lo[t][c]);
                        hi[t][c] = _mm512_fmadd_ps(x1, b1[c], hi[t][c]);
                    }
                }
                p += 32;
            }
            let mut out = [[0f32; 2]; 4];
            for t in 0..g {
                for c in 0..2 {
                    let acc = [
                        _mm512_castps512_ps256(lo[t][c]),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lo[t][c]))),
                        _mm512_castps512_ps256(hi[t][c]),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(hi[t][c]))),
                    ];
                    out[t][c] = finish_dot(acc, p, k, x[t], cols[c]);
                }
            }
            out
        }
    }

    /// The column dot products of up to three rows with one column on AVX2: four 8-lane
    /// accumulators per row, as the M = 1 kernel, then [`finish_dot`].
    ///
    /// # Safety
    /// Every `x[t]` and `col` have `k` elements; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_256(k: usize, x: [*const f32; 3], col: *const f32) -> [f32; 3] {
        // SAFETY (whole body): accesses at p < k.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 4]; 3];
            let mut p = 0;
            while p + 32 <= k {
                for q in 0..4 {
                    let o = p + 8 * q;
                    let bv = _mm256_loadu_ps(col.add(o));
                    for t in 0..3 {
                        acc[t][q] = _mm256_fmadd_ps(_mm256_loadu_ps(x[t].add(o)), bv, acc[t][q]);
                    }
                }
                p += 32;
            }
            let mut out = [0f32; 3];
            for t in 0..3 {
                out[t] = finish_dot(acc[t], p, k, x[t], col);
            }
            out
        }
    }
}
