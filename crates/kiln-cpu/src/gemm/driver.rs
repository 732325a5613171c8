//! The BLIS loop nest around the microkernel, and its threading.
//!
//! ```text
//! for jc in 0..n step NC                      // B block columns      (L3)
//!   for pc in 0..k step KC                    // depth block
//!     pack_b(B[pc.., jc..]) → Bp  (KC × NC)   // shared by all threads, packed in parallel
//!     parallel for (ic, n-chunk) tasks        // rows step MC, columns split in NR panels
//!       pack_a(A[ic.., pc..]) → Ap (MC × KC)  // per thread  (L2; L3 when deep)
//!       macro_kernel: for jr step NR, for ir step MR: microkernel(Ap[ir], Bp[jr], C[ir, jr])
//! ```
//! The first depth block stores `alpha·AB + beta·C` (C not read when `beta == 0`), later ones
//! `alpha·AB + C`, and the last one applies the epilogue to the tile while it is in L1, so a
//! linear layer makes one pass over C. Work is split over M and N only — never K — and every
//! tile is computed the same way whoever computes it, so results are bitwise identical for any
//! thread count.
use super::blocking::Blocking;
use super::micro::{update, Bf16PanelMicroFn, Kernel, MAX_TILE};
use super::pack::{pack_a, pack_b};
use super::{apply_epilogue, apply_epilogue_row, Epilogue, MatRef};
use kiln_tensor::{AlignedBuffer, FloatElement};
use rayon::prelude::*;
use std::cell::RefCell;

/// Below this many flops (`2·m·n·k`) a product runs on the calling thread only: the fork/join
/// of the pool costs more than it gains (measured with `kiln bench matmul`, see docs/gemm.md).
pub const PARALLEL_FLOPS: usize = 1 << 21;

/// The destination C: a raw pointer so that tasks on different threads can write disjoint
/// tiles of one strided matrix. Element `(i, j)` is at `ptr + i·rs + (j / block)·bs +
/// (j % block)·cs`: one strided matrix when `block` is `usize::MAX`, otherwise column blocks of
/// `block` columns (a multiple of NR, so that no tile straddles two) `bs` apart.
#[derive(Clone, Copy)]
pub struct CPtr {
    pub ptr: *mut f32,
    pub rs: usize,
    pub cs: usize,
    pub block: usize,
    pub bs: usize,
}

impl CPtr {
    /// One strided matrix.
    pub fn strided(ptr: *mut f32, rs: usize, cs: usize) -> Self {
        CPtr {
            ptr,
            rs,
            cs,
            block: usize::MAX,
            bs: 0,
        }
    }

    /// The offset of element `(i, j)`.
    #[inline]
    fn offset(&self, i: usize, j: usize) -> usize {
        i * self.rs + (j / self.block) * self.bs + (j % self.block) * self.cs
    }
}
// SAFETY: a CPtr is only dereferenced inside tasks that own disjoint sets of C's elements
// (distinct (row-block, column-chunk) pairs of one product); the view was validated to lie
// inside its buffer and not to overlap itself.
unsafe impl Send for CPtr {}
// SAFETY: as above.
unsafe impl Sync for CPtr {}

thread_local! {
    /// Per-thread packed A block, reused across calls.
    static A_PACK: RefCell<AlignedBuffer> = RefCell::new(AlignedBuffer::zeroed(0));
    /// The calling thread's packed B block, reused across calls.
    static B_PACK: RefCell<AlignedBuffer> = RefCell::new(AlignedBuffer::zeroed(0));
    /// Per-thread packed B slab of the small-M path.
    static B_PANEL: RefCell<AlignedBuffer> = RefCell::new(AlignedBuffer::zeroed(0));
}

/// Takes a buffer of at least `len` f32 out of `slot` (growing it), for the caller to put back.
fn take_buffer(
    slot: &'static std::thread::LocalKey<RefCell<AlignedBuffer>>,
    len: usize,
) -> AlignedBuffer {
    let mut buf = slot.with(|s| std::mem::replace(&mut *s.borrow_mut(), AlignedBuffer::zeroed(0)));
    if buf.len() < len * 4 {
        buf = AlignedBuffer::zeroed(len * 4);
    }
    buf
}

fn put_buffer(slot: &'static std::thread::LocalKey<RefCell<AlignedBuffer>>, buf: AlignedBuffer) {
    slot.with(|s| {
        let mut cur = s.borrow_mut();
        if cur.len() < buf.len() {
            *cur = buf;
        }
    });
}

/// Where B's packed panels come from: packed per call from a strided view, pre-packed, or
/// gathered by a [`PanelSource`] (implicit GEMM).
pub enum BSource<'a, TB> {
    View(MatRef<'a, TB>),
    /// Panels packed per call by the source itself.
    Panels(&'a dyn PanelSource),
    /// Panels in the layout of [`super::PackedB`]: depth block `pc` (all of width `kc` but the
    /// last) holds every panel of `NR` columns, `n` rounded up to `NR` times its depth.
    Packed {
        data: &'a [f32],
        n: usize,
    },
}

impl<TB> BSource<'_, TB> {
    fn cols(&self) -> usize {
        match self {
            BSource::View(b) => b.cols,
            BSource::Panels(src) => src.cols(),
            BSource::Packed { n, .. } => *n,
        }
    }
}

/// A `k × n` B operand that is never stored as a matrix: it writes its own packed panels. This
/// is how a convolution feeds image patches straight into the GEMM (implicit GEMM) instead of
/// materialising the patch matrix first.
pub trait PanelSource: Sync {
    /// Rows (`k`).
    fn rows(&self) -> usize;
    /// Columns (`n`).
    fn cols(&self) -> usize;
    /// Writes rows `p0 .. p0+kc`, columns `j0 .. j0+nc` as `⌈nc/nr⌉` consecutive micro-panels
    /// of `kc × nr` in the layout of [`super::pack::pack_b`] (`panel[p·nr + j] = B[p0+p, c0+j]`),
    /// zero-filling columns past `n`. `dst` holds `⌈nc/nr⌉·nr·kc` elements.
    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]);

    /// The source's elements as bf16 column panels, if it is one ([`super::PanelMatrix`] of
    /// bf16: panel `q` holds rows `0..k` of 32 elements, in the panel's slot order, at
    /// `q·k·32`, the last panel zero-padded): a microkernel that widens such rows itself then
    /// reads them in place instead of the driver packing them.
    fn bf16_panels(&self) -> Option<&[u16]> {
        None
    }
}

/// An `m × k` A operand that writes its own packed panels: where A is a re-indexing of a stored
/// array (a transposed convolution's per-phase weights), packing straight from that array saves
/// laying A out as a matrix first.
pub trait APanelSource: Sync {
    /// Rows (`m`).
    fn rows(&self) -> usize;
    /// Columns (`k`).
    fn cols(&self) -> usize;
    /// Writes rows `i0 .. i0+mc`, depth `p0 .. p0+kc` as `⌈mc/mr⌉` consecutive micro-panels of
    /// `mr × kc` in the layout of [`super::pack::pack_a`] (`panel[p·mr + i] = A[r0+i, p0+p]`),
    /// zero-filling rows past `m`. `dst` holds `⌈mc/mr⌉·mr·kc` elements.
    fn pack(&self, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize, dst: &mut [f32]);

    /// The whole of A already packed for this `mr` (what `pack(0, m, 0, k, mr, ..)` would
    /// write), if the source has it: where the driver's depth cut is all of `k` it then reads
    /// these panels in place instead of packing.
    fn prepacked(&self, mr: usize) -> Option<&[f32]> {
        let _ = mr;
        None
    }
}

/// Where the driver gets A's panels.
#[derive(Clone, Copy)]
pub enum ASource<'a> {
    /// A strided view, packed by [`pack_a`].
    View(MatRef<'a, f32>),
    /// Panels packed by the source itself.
    Panels(&'a dyn APanelSource),
}

impl ASource<'_> {
    pub fn rows(&self) -> usize {
        match self {
            ASource::View(a) => a.rows,
            ASource::Panels(src) => src.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            ASource::View(a) => a.cols,
            ASource::Panels(src) => src.cols(),
        }
    }

    /// Rows `i0 .. i0+mc` (`i0` a multiple of `mr`) of a prepacked A whose depth is all in one
    /// block of `kc` (see [`APanelSource::prepacked`]).
    fn prepacked(&self, i0: usize, mc: usize, kc: usize, mr: usize) -> Option<&[f32]> {
        let ASource::Panels(src) = self else {
            return None;
        };
        if kc != src.cols() || !i0.is_multiple_of(mr) {
            return None;
        }
        let data = src.prepacked(mr)?;
        data.get(i0 * kc..(i0 + mc.div_ceil(mr) * mr) * kc)
    }

    /// Packs rows `i0 .. i0+mc`, depth `p0 .. p0+kc` into panels (a view or a panel source).
    fn pack(&self, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize, dst: &mut [f32]) {
        match self {
            ASource::View(a) => pack_a(a, i0, mc, p0, kc, mr, dst),
            ASource::Panels(src) => src.pack(i0, mc, p0, kc, mr, dst),
        }
    }
}

/// A [`PanelSource`] over a strided view: exactly [`pack_b`] (tests compare the two paths).
pub struct ViewPanels<'a, TB>(pub MatRef<'a, TB>);

impl<TB: FloatElement> PanelSource for ViewPanels<'_, TB> {
    fn rows(&self) -> usize {
        self.0.rows
    }
    fn cols(&self) -> usize {
        self.0.cols
    }
    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        pack_b(&self.0, p0, kc, j0, nc, nr, dst)
    }
}

impl<TB: FloatElement> BSource<'_, TB> {
    /// Packs rows `p0 .. p0+kc`, columns `j0 .. j0+nc` into panels (a view or a panel source).
    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        match self {
            BSource::View(b) => pack_b(b, p0, kc, j0, nc, nr, dst),
            BSource::Panels(src) => src.pack(p0, kc, j0, nc, nr, dst),
            BSource::Packed { .. } => unreachable!("pre-packed panels are never packed again"),
        }
    }
}

/// Everything a task needs about the product, shared read-only.
pub struct Product<'a, 'e, TB> {
    pub a: ASource<'a>,
    pub b: BSource<'a, TB>,
    pub c: CPtr,
    pub alpha: f32,
    pub beta: f32,
    pub epilogue: Epilogue<'e>,
}

/// `C = alpha·A·B + beta·C` then the epilogue, by the BLIS loop nest with `kern` and `blk`.
/// `threads == 1` keeps everything on the calling thread. `k` must be at least 1.
///
/// # Safety
/// `prod.c` must point at an `a.rows × b.cols` matrix (strides `rs`, `cs`) that lies inside one
/// live, exclusively borrowed buffer and does not overlap itself.
pub unsafe fn gemm_blis<TB: FloatElement>(
    kern: &Kernel,
    blk: Blocking,
    prod: &Product<'_, '_, TB>,
    threads: usize,
) {
    let (m, k, n) = (prod.a.rows(), prod.a.cols(), prod.b.cols());
    debug_assert!(k > 0);
    let (mr, nr) = (kern.mr, kern.nr);
    let packs_b = !matches!(prod.b, BSource::Packed { .. });
    if let Some(single) = blk.single_block(m, k).filter(|_| packs_b) {
        // SAFETY: the caller's contract, passed on.
        unsafe { gemm_small_m(kern, single, prod, threads) };
        return;
    }
    let blk = blk.for_depth(k);
    let nc = blk.nc.min(n.next_multiple_of(nr));
    let kc_max = blk.kc.min(k);
    let mut bpack = if packs_b {
        take_buffer(&B_PACK, nc * kc_max)
    } else {
        AlignedBuffer::zeroed(0)
    };
    // Row blocks: a multiple of the thread count when there are several, each a multiple of MR.
    // Two per thread when that leaves at least eight tiles of rows each: the tasks below are
    // then whole row blocks, where splitting fewer blocks by columns packed each A block once
    // per column chunk (256³ on two threads, Zen 3: 150–163 → 162–167 GFLOP/s).
    let mut mblocks = m.div_ceil(blk.mc);
    if threads > 1 {
        mblocks = mblocks.next_multiple_of(threads);
        if mblocks < 2 * threads && m >= 2 * threads * 8 * mr {
            mblocks = 2 * threads;
        }
    }
    let mc = m.div_ceil(mblocks).next_multiple_of(mr);
    let mblocks = m.div_ceil(mc);
    for jc in (0..n).step_by(nc) {
        let ncur = nc.min(n - jc);
        let panels = ncur.div_ceil(nr);
        // Column chunks so that there are at least two tasks per thread.
        let nsplit = if threads > 1 {
            (2 * threads).div_ceil(mblocks).min(panels).max(1)
        } else {
            1
        };
        for pc in (0..k).step_by(blk.kc) {
            let kcur = blk.kc.min(k - pc);
            let first = pc == 0;
            let last = pc + kcur == k;
            let bp: &[f32] = match &prod.b {
                BSource::Packed { data, n } => {
                    let start = pc * n.next_multiple_of(nr) + jc * kcur;
                    &data[start..start + panels * nr * kcur]
                }
                source => {
                    let bp = &mut bpack.as_mut_slice::<f32>()[..panels * nr * kcur];
                    // Each worker packs a contiguous range of panels.
                    let per = if threads > 1 {
                        panels.div_ceil(threads * 2)
                    } else {
                        panels
                    };
                    let pack = |(ci, dst): (usize, &mut [f32])| {
                        let c0 = jc + ci * per * nr;
                        source.pack(pc, kcur, c0, (per * nr).min(jc + ncur - c0), nr, dst);
                    };
                    if threads > 1 && panels > 1 {
                        bp.par_chunks_mut(per * nr * kcur)
                            .enumerate()
                            .for_each(pack);
                    } else {
                        bp.chunks_mut(per * nr * kcur).enumerate().for_each(pack);
                    }
                    bp
                }
            };
            let task = |t: usize| {
                let (ib, ns) = (t / nsplit, t % nsplit);
                let i0 = ib * mc;
                let mcur = mc.min(m - i0);
                let (p0, p1) = (ns * panels / nsplit, (ns + 1) * panels / nsplit);
                if p0 == p1 {
                    return;
                }
                let mut apack = None;
                let ap: &[f32] = match prod.a.prepacked(i0, mcur, kcur, mr) {
                    Some(pre) => pre,
                    None => {
                        let buf = apack.insert(take_buffer(&A_PACK, mc * kcur));
                        let ap = &mut buf.as_mut_slice::<f32>()[..mcur.div_ceil(mr) * mr * kcur];
                        prod.a.pack(i0, mcur, pc, kcur, mr, ap);
                        ap
                    }
                };
                let block = Block {
                    i0,
                    mcur,
                    j0: jc,
                    ncur,
                    p0,
                    p1,
                    kc: kcur,
                    beta: if first { prod.beta } else { 1.0 },
                    last,
                };
                // SAFETY: this task alone owns rows i0 .. i0+mcur, panels p0 .. p1 of C's
                // columns jc .. jc+ncur (tasks are distinct (ib, ns) pairs); the caller vouches
                // for the rest.
                unsafe { macro_kernel(kern, ap, bp, None, prod, &block) };
                if let Some(buf) = apack {
                    put_buffer(&A_PACK, buf);
                }
            };
            let tasks = mblocks * nsplit;
            if threads > 1 && tasks > 1 {
                (0..tasks).into_par_iter().for_each(task);
            } else {
                (0..tasks).for_each(task);
            }
        }
    }
    put_buffer(&B_PACK, bpack);
}

/// The loop nest when all of M is one row block ([`Blocking::single_block`]: `m ≤ MC`, as in
/// GPT-2's prefill at M = 128, a conv layer's output channels, small batches; or up to about
/// `2.5·MC` rows with a shallower depth cut):
///
/// ```text
/// for pc in 0..k step KC
///   pack_a(A[.., pc..]) → Ap                     // once, on the calling thread, shared
///   parallel for task (a range of NR panels of C's columns; of rows too when narrow)
///     for each slab of the task's panels          // KC × SLAB·NR, about L2/4
///       pack_b(B[pc.., slab]) → Bs                // per thread, stays in L2
///       macro_kernel(Ap, Bs, C[.., slab])
/// ```
///
/// Each B panel is used only `⌈m/MR⌉` times here, so packing a whole `KC × NC` block (larger
/// than L2, shared by the threads) and reading it back from L3 costs a large part of the
/// arithmetic. Each task instead packs a slab that stays in its own L2 right before using it;
/// B's source is still read exactly once. Results are bitwise identical for any thread count;
/// where the depth cut is the general nest's (`m ≤ MC` and `k` within one depth block of both
/// nests, or a kernel whose two nests share `KC`) the packed values and kernel calls are those
/// of the general path, so they are also bitwise those of [`super::PackedB`]. With another cut
/// they differ from `PackedB`'s only in rounding (C is summed over other depth blocks).
///
/// # Safety
/// As [`gemm_blis`].
unsafe fn gemm_small_m<TB: FloatElement>(
    kern: &Kernel,
    blk: Blocking,
    prod: &Product<'_, '_, TB>,
    threads: usize,
) {
    let (m, k, n) = (prod.a.rows(), prod.a.cols(), prod.b.cols());
    let (mr, nr) = (kern.mr, kern.nr);
    let panels = n.div_ceil(nr);
    // Two tasks per thread (whole panels), so an uneven split costs less.
    let col_tasks = if threads > 1 {
        (2 * threads).min(panels)
    } else {
        1
    };
    // A product too narrow for that (fewer panels than two per thread: the weight gradient of a
    // convolution with 3 input channels is 48 columns) is split over its rows as well, in whole
    // MR panels; each task then packs its own copy of its few columns' B slab. Before, two
    // threads took one panel each of `64 × 48 × 4096` while A was packed on one of them.
    let row_panels = m.div_ceil(mr);
    let row_tasks = if threads > 1 && col_tasks < 2 * threads {
        (2 * threads).div_ceil(col_tasks).min(row_panels)
    } else {
        1
    };
    let tasks = col_tasks * row_tasks;
    let slab = blk.slab;
    // bf16 column panels read in place by a kernel that widens them itself: packing them would
    // only widen them into a copy (measured on a Zen 5 core: 10 % of GPT-2's bf16 prefill).
    let in_place = match (&prod.b, kern.bf16_panel) {
        (BSource::Panels(src), Some(micro)) if nr == PANEL_WIDTH => {
            src.bf16_panels().map(|data| PanelB {
                micro,
                data: data.as_ptr(),
                k,
                q0: 0,
                p0: 0,
            })
        }
        _ => None,
    };
    let mut apack = take_buffer(&A_PACK, m.div_ceil(mr) * mr * blk.kc.min(k));
    for pc in (0..k).step_by(blk.kc) {
        let kcur = blk.kc.min(k - pc);
        let (first, last) = (pc == 0, pc + kcur == k);
        let ap: &[f32] = match prod.a.prepacked(0, m, kcur, mr) {
            Some(pre) => pre,
            None => {
                let ap = &mut apack.as_mut_slice::<f32>()[..m.div_ceil(mr) * mr * kcur];
                if tasks > 1 && (m >= 8 * mr || row_tasks > 1) {
                    // Packed in parallel, a range of MR panels per worker (serial, packing a
                    // conv weight was a few % of a 2-thread product). The packed values are
                    // the same.
                    let per = m.div_ceil(mr).div_ceil(2 * threads) * mr;
                    ap.par_chunks_mut(per * kcur)
                        .enumerate()
                        .for_each(|(ci, dst)| {
                            let i0 = ci * per;
                            prod.a.pack(i0, per.min(m - i0), pc, kcur, mr, dst);
                        });
                } else {
                    prod.a.pack(0, m, pc, kcur, mr, ap);
                }
                ap
            }
        };
        let task = |t: usize| {
            let (ct, rt) = (t / row_tasks, t % row_tasks);
            let (p0, p1) = (ct * panels / col_tasks, (ct + 1) * panels / col_tasks);
            let r0 = rt * row_panels / row_tasks * mr;
            let r1 = ((rt + 1) * row_panels / row_tasks * mr).min(m);
            if p0 == p1 || r0 >= r1 {
                return;
            }
            // This task's rows of the packed A (whole MR panels from r0).
            let ap = &ap[r0 * kcur..r1.div_ceil(mr) * mr * kcur];
            // In-place panels need no slab buffer (`bp` stays empty).
            let slab_len = if in_place.is_some() {
                0
            } else {
                slab * nr * kcur
            };
            let mut bbuf = take_buffer(&B_PANEL, slab_len);
            for s0 in (p0..p1).step_by(slab) {
                let s1 = (s0 + slab).min(p1);
                let (j0, j1) = (s0 * nr, (s1 * nr).min(n));
                let panels = in_place.map(|d| PanelB {
                    q0: s0,
                    p0: pc,
                    ..d
                });
                let bp = &mut bbuf.as_mut_slice::<f32>()[..slab_len.min((s1 - s0) * nr * kcur)];
                if panels.is_none() {
                    prod.b.pack(pc, kcur, j0, j1 - j0, nr, bp);
                }
                let block = Block {
                    i0: r0,
                    mcur: r1 - r0,
                    j0,
                    ncur: j1 - j0,
                    p0: 0,
                    p1: s1 - s0,
                    kc: kcur,
                    beta: if first { prod.beta } else { 1.0 },
                    last,
                };
                // SAFETY: this task alone owns C's rows r0 .. r1 of the columns of panels
                // p0 .. p1 (tasks are disjoint (row range, panel range) pairs); the caller
                // vouches for the rest; in-place panels are whole panels of the source's buffer
                // (`PanelB`).
                unsafe { macro_kernel(kern, ap, bp, panels, prod, &block) };
            }
            put_buffer(&B_PANEL, bbuf);
        };
        if tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            task(0);
        }
    }
    put_buffer(&A_PACK, apack);
}

/// Columns per bf16 panel of [`PanelSource::bf16_panels`].
const PANEL_WIDTH: usize = 32;

/// bf16 column panels read in place: panel `q0 + jp` of the slab at depth `p0` is the `kc` rows
/// at `data + ((q0 + jp)·k + p0)·32`, multiplied by `micro`.
#[derive(Clone, Copy)]
struct PanelB {
    micro: Bf16PanelMicroFn,
    data: *const u16,
    k: usize,
    q0: usize,
    p0: usize,
}
// SAFETY: a read-only view of the source's panels (borrowed for the whole product through
// `prod.b`), shared by the tasks, which only read it.
unsafe impl Send for PanelB {}
// SAFETY: as above.
unsafe impl Sync for PanelB {}

/// One task's share of a (jc, pc) iteration.
struct Block {
    i0: usize,
    mcur: usize,
    j0: usize,
    ncur: usize,
    /// Panel range (of NR columns) inside the packed B block.
    p0: usize,
    p1: usize,
    kc: usize,
    beta: f32,
    last: bool,
}

/// The two loops around the microkernel: for each B micro-panel (kept in L1), for each A
/// micro-panel of the packed block, one `MR × NR` tile. Edge tiles and C with a non-unit column
/// stride go through a local tile buffer and the same rounding sequence ([`update`]).
///
/// # Safety
/// The tiles of `blk` must be this caller's alone, inside the C that `prod.c` points at.
unsafe fn macro_kernel<TB>(
    kern: &Kernel,
    ap: &[f32],
    bp: &[f32],
    panels: Option<PanelB>,
    prod: &Product<'_, '_, TB>,
    blk: &Block,
) {
    let (mr, nr, kc) = (kern.mr, kern.nr, blk.kc);
    let c = prod.c;
    let mut tile = [0f32; MAX_TILE];
    let has_epilogue = blk.last && !matches!(prod.epilogue, Epilogue::None);
    // The epilogue on one finished tile (rows × cols at `corigin`, first column `j`).
    let finish = |corigin: *mut f32, nrows: usize, ncols: usize, j: usize| {
        if !has_epilogue {
            return;
        }
        for ii in 0..nrows {
            if c.cs == 1 {
                let start = corigin.wrapping_add(ii * c.rs);
                // SAFETY: row ii of this task's tile holds `ncols` contiguous elements
                // (cs == 1) inside C's buffer, and no other task touches this tile.
                let row = unsafe { std::slice::from_raw_parts_mut(start, ncols) };
                apply_epilogue_row(row, j, &prod.epilogue);
            } else {
                for jj in 0..ncols {
                    // SAFETY: as above.
                    unsafe {
                        let p = corigin.add(ii * c.rs + jj * c.cs);
                        *p = apply_epilogue(*p, j + jj, &prod.epilogue);
                    }
                }
            }
        }
    };
    // Whether the rows under the last whole tile of panels `jp` and `jp + 1` go through the
    // edge kernel together (both full width, contiguous rows, pairs counted from `p0`).
    let pair = |jp: usize| {
        kern.edge.is_some()
            && panels.is_none()
            && c.cs == 1
            && (jp - blk.p0).is_multiple_of(2)
            && jp + 1 < blk.p1
            && (jp + 2) * nr <= blk.ncur
    };
    for jp in blk.p0..blk.p1 {
        let jt = jp * nr; // column offset inside the block
        let ncols = nr.min(blk.ncur - jt);
        // The packed micro-panel, or with in-place panels (then `bp` is empty) panel jp's rows
        // at depth p0.
        let in_place = panels.map(|d| {
            (
                d.micro,
                d.data.wrapping_add(((d.q0 + jp) * d.k + d.p0) * 32),
            )
        });
        // No software hint for the next B micro-panel: the panels are read in address order,
        // which the hardware prefetcher follows. Hinting the next panel into L2 a slice per
        // microkernel call (as this loop once did) measured on a Zen 3 core, interleaved: G2
        // of DCGAN forward (48-row products, 8 calls per panel) 53.5–55.3 → 52.4–52.8 ms on one
        // thread, 29.0–29.3 → 27.6–27.8 on two; `128 × 2304 × 768` 86.7 → 87.4–88.6 GFLOP/s;
        // 1024³ and 2048³ within ±2 % either way.
        for (ip, apanel) in ap.chunks_exact(mr * kc).enumerate() {
            let it = ip * mr;
            let nrows = mr.min(blk.mcur - it);
            let (i, j) = (blk.i0 + it, blk.j0 + jt);
            // SAFETY: (i, j) is this task's tile; offsets stay inside C's buffer (`j` is a
            // multiple of NR, so with column blocks the tile lies inside one block).
            let corigin = unsafe { c.ptr.add(c.offset(i, j)) };
            if nrows < mr && jp > blk.p0 && pair(jp - 1) {
                continue; // done with the previous panel's
            }
            if let Some(edge) = kern.edge.filter(|_| nrows < mr && pair(jp)) {
                // SAFETY: (i, j + NR) is the next tile of this task's, inside C's buffer.
                let cnext = unsafe { c.ptr.add(c.offset(i, j + nr)) };
                let b2 = &bp[jp * nr * kc..(jp + 2) * nr * kc];
                // SAFETY: rows i .. i+nrows of both full-width tiles (contiguous rows, cs == 1)
                // belong to this task; the panels hold kc steps.
                unsafe {
                    edge(
                        nrows,
                        kc,
                        apanel,
                        b2,
                        [corigin, cnext],
                        c.rs,
                        prod.alpha,
                        blk.beta,
                    )
                };
                finish(corigin, nrows, nr, j);
                finish(cnext, nrows, nr, j + nr);
                continue;
            }
            // SAFETY (both calls): `dst` is this task's tile (a full tile with contiguous rows
            // of C, or the local buffer of MR·NR ≤ MAX_TILE at row stride NR); in-place panel
            // rows p0 .. p0+kc of a whole panel lie inside the source's buffer.
            let run = |dst: *mut f32, rs: usize, alpha: f32, beta: f32| unsafe {
                match in_place {
                    Some((f, rows)) => f(kc, apanel, rows, dst, rs, alpha, beta),
                    None => {
                        let bpanel = &bp[jp * nr * kc..(jp + 1) * nr * kc];
                        (kern.micro)(kc, apanel, bpanel, dst, rs, alpha, beta)
                    }
                }
            };
            if nrows == mr && ncols == nr && c.cs == 1 {
                run(corigin, c.rs, prod.alpha, blk.beta);
            } else {
                // Rows under the last whole tile, or an edge panel of at most NR/2 columns:
                // only those rows, or the left half of the tile, are computed (the same FMAs
                // for those elements, less work) where the kernel has such variants.
                let narrow = 2 * ncols <= nr;
                let bpanel = || &bp[jp * nr * kc..(jp + 1) * nr * kc];
                match (kern.rows, kern.half) {
                    // SAFETY: the local tile holds MR rows of NR columns; the packed panels
                    // hold kc steps.
                    (Some(rows), _) if nrows < mr && in_place.is_none() => unsafe {
                        rows(
                            nrows,
                            narrow,
                            kc,
                            apanel,
                            bpanel(),
                            tile.as_mut_ptr(),
                            nr,
                            1.0,
                            0.0,
                        )
                    },
                    // SAFETY: as above; the half-width kernel writes only the tile's left
                    // NR/2 columns.
                    (_, Some(half)) if narrow && in_place.is_none() => unsafe {
                        half(kc, apanel, bpanel(), tile.as_mut_ptr(), nr, 1.0, 0.0)
                    },
                    _ => run(tile.as_mut_ptr(), nr, 1.0, 0.0),
                }
                for ii in 0..nrows {
                    for jj in 0..ncols {
                        // SAFETY: (i+ii, j+jj) is inside the matrix and this task's tile.
                        unsafe {
                            let p = corigin.add(ii * c.rs + jj * c.cs);
                            let old = if blk.beta == 0.0 { 0.0 } else { *p };
                            *p = update(tile[ii * nr + jj], old, prod.alpha, blk.beta);
                        }
                    }
                }
            }
            finish(corigin, nrows, ncols, j);
        }
    }
}
