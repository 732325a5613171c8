//! bf16 × bf16 → f32 matrix multiply on AMX tiles: `C = alpha·bf16(A)·B + beta·C`, then the
//! epilogue.
//!
//! Shapes: A `[m, k]` (f32, rounded to bf16 while packing, or bf16), B `[k, n]` bf16, C `[m, n]`
//! f32; all three arbitrary strides. Products of two bf16 are exact in f32 and sums are f32, so
//! the only difference from an f64 product of the *bf16-rounded* operands is f32 summation
//! (and the hardware's flushing of denormals). Note that an f32 A is rounded to bf16: this is a
//! lower-precision product than [`crate::gemm::gemm`] with bf16 weights, which keeps A in f32.
//!
//! Structure (BLIS-like, sized for tiles):
//! * [`AmxPackedB`]: B packed once into 32-column panels of VNNI pairs (see `pack.rs`); weights
//!   reused every call should be packed once and passed to [`gemm_bf16_amx_packed`].
//! * A packed per call into 32-row panels of bf16 rows.
//! * Blocking: the k loop is cut into KC = 32·`kc_steps` blocks (a 32×KC A panel fills about
//!   2/3 of L1d), C into MC×NC blocks (the KC×NC B block about 1/4 of L2, MC×KC A about 1/8).
//!   One task = one MC×NC block of C; its f32 accumulator (thread-local, MC×NC) stays in L2.
//! * Microkernel: 32×32 of C in 4 tiles, 2 A tiles and 2 B tiles per k-step of 32 (`tiles.rs`).
//! * Epilogue: `c = epilogue(alpha·acc + beta·c)` written once per element after the last KC
//!   block, exactly as [`crate::gemm::reference_gemm`] orders it.
//! * Threads: rayon over tasks (blocks of M and N only). Every element's k summation order is
//!   fixed by KC (which depends only on the cache sizes), so results are bitwise identical for
//!   any thread count.
//!
//! Run-time selection: [`amx_available`] checks CPUID, XCR0 and asks Linux for the tile state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) once per process, and is false unless the process also
//! opted in with [`AMX_OPT_IN`]` = 1`: the tile kernel has so far only run as its software
//! model, never on AMX hardware, so a CPU with AMX uses the AVX512-BF16 kernel until it has been
//! validated there. Where it is false every entry point
//! that uses [`TileKernel::Amx`] returns an error (never an illegal instruction); a caller's
//! dispatch routes bf16 products here only when it is true, e.g.
//!
//! ```no_run
//! # use kiln_cpu::gemm::{amx, gemm, GemmOptions, MatRef, MatMut};
//! # use half::bf16;
//! # fn f(a: MatRef<f32>, b: MatRef<bf16>, c: MatMut) -> kiln_tensor::Result<()> {
//! let opts = GemmOptions::default();
//! if amx::amx_available() {
//!     amx::gemm_bf16_amx(a, b, c, &opts) // A rounded to bf16
//! } else {
//!     gemm(a, b, c, &opts) // A kept in f32
//! }
//! # }
//! ```
//!
//! [`TileKernel::Emulated`] runs the same driver with a software model of the tile kernel, so
//! the whole path is tested on machines without AMX.
use super::{
    apply_epilogue, apply_epilogue_row, Epilogue, GemmOptions, MatMut, MatRef, PanelMatrix,
};
use half::bf16;
use kiln_tensor::{Error, Result};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

mod detect;
mod dot;
mod pack;
mod tiles;

pub use detect::AMX_OPT_IN;
pub use pack::PackKernel;
pub use tiles::TileKernel;

use pack::{ksteps, pack_a_panel, pack_b_from_panel, pack_b_panels};
use tiles::{kernel_32x32, Line, TileSession, LINES_PER_KSTEP};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// Element types accepted for A: f32 (rounded to bf16, nearest even, while packing) or bf16.
pub trait AmxElement: bytemuck::Pod + Send + Sync + sealed::Sealed {
    #[doc(hidden)]
    const IS_F32: bool;
}
impl AmxElement for f32 {
    const IS_F32: bool = true;
}
impl AmxElement for bf16 {
    const IS_F32: bool = false;
}

/// True when this process can use AMX-BF16 tiles (CPU, OS and Linux permission all checked;
/// the answer is computed once and cached).
pub fn amx_available() -> bool {
    detect::amx_support().available
}

/// True when this CPU has AVX512-BF16 (`vdpbf16ps`), which [`TileKernel::Avx512Bf16`] uses.
pub fn bf16_dot_available() -> bool {
    dot::available()
}

/// The fastest kernel for bf16 × bf16 products on this machine: AMX tiles, else AVX512-BF16,
/// else `None` (no native bf16 arithmetic: bf16 weights are then better widened to f32).
pub fn best_native_kernel() -> Option<TileKernel> {
    if amx_available() {
        Some(TileKernel::Amx)
    } else if bf16_dot_available() {
        Some(TileKernel::Avx512Bf16)
    } else {
        None
    }
}

/// Measured `vdpbf16ps` throughput of one core, GFLOP/s. Errors without AVX512-BF16.
pub fn bf16_dot_peak_gflops_one_core() -> Result<f64> {
    dot::peak_gflops_one_core()
        .ok_or_else(|| Error::invalid("gemm bf16: AVX512-BF16 is not available on this CPU"))
}

impl TileKernel {
    /// `"amx"`, `"avx512bf16"` or `"emulated"` (as the benchmarks and `--json` outputs name it).
    pub fn name(self) -> &'static str {
        match self {
            TileKernel::Amx => "amx",
            TileKernel::Avx512Bf16 => "avx512bf16",
            TileKernel::Emulated => "emulated",
        }
    }

    /// Measured throughput of one core on this kernel's instruction, GFLOP/s (the ceiling its
    /// figures are divided by); an error where the CPU lacks it or for the software model.
    pub fn peak_gflops_one_core(self) -> Result<f64> {
        match self {
            TileKernel::Amx => amx_peak_gflops_one_core(),
            TileKernel::Avx512Bf16 => bf16_dot_peak_gflops_one_core(),
            TileKernel::Emulated => {
                Err(Error::invalid("gemm bf16: the software model has no peak"))
            }
        }
    }
}

/// Why AMX is unavailable, or `None` when it is available.
pub fn amx_unavailable_reason() -> Option<&'static str> {
    let s = detect::amx_support();
    (!s.available).then_some(s.reason)
}

/// Measured `tdpbf16ps` throughput of one core, GFLOP/s (the ceiling AMX figures are divided
/// by). Runs for a few milliseconds on the calling thread. Errors without AMX.
pub fn amx_peak_gflops_one_core() -> Result<f64> {
    tiles::peak_gflops_one_core().ok_or_else(unavailable_error)
}

fn unavailable_error() -> Error {
    Error::invalid(format!(
        "gemm amx: AMX-BF16 is not available: {}",
        detect::amx_support().reason
    ))
}

/// Which tile kernel and packer a product uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmxConfig {
    pub tiles: TileKernel,
    pub pack: PackKernel,
}

impl AmxConfig {
    /// AMX tiles with the best packer; an error where AMX is unavailable.
    pub fn hardware() -> Result<AmxConfig> {
        let cfg = AmxConfig {
            tiles: TileKernel::Amx,
            pack: PackKernel::best(),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The software tile model with the best packer (any machine).
    pub fn emulated() -> AmxConfig {
        AmxConfig {
            tiles: TileKernel::Emulated,
            pack: PackKernel::best(),
        }
    }

    /// The best native kernel ([`best_native_kernel`]) with the best packer; `None` where the
    /// CPU has neither AMX nor AVX512-BF16.
    pub fn native() -> Option<AmxConfig> {
        best_native_kernel().map(|tiles| AmxConfig {
            tiles,
            pack: PackKernel::best(),
        })
    }

    /// Errors when this machine cannot run the chosen kernels.
    pub fn check(&self) -> Result<()> {
        if self.tiles == TileKernel::Amx && !amx_available() {
            return Err(unavailable_error());
        }
        if self.tiles == TileKernel::Avx512Bf16 && !bf16_dot_available() {
            return Err(Error::invalid(
                "gemm bf16: the AVX512-BF16 kernel is not supported by this CPU",
            ));
        }
        self.pack.check()
    }
}

/// B `[k, n]` packed for the tile kernel: `n.div_ceil(32)` panels of 32 columns, each
/// `k.div_ceil(32)` k-steps of 32 VNNI rows (2 KiB per k-step), zero-padded. Size ≈ 2·k·n
/// bytes. Pack weights once and reuse them with [`gemm_bf16_amx_packed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmxPackedB {
    k: usize,
    n: usize,
    lines: Vec<Line>,
}

impl AmxPackedB {
    /// Packs a strided `[k, n]` bf16 matrix with the best packer.
    pub fn pack(b: MatRef<'_, bf16>) -> Result<AmxPackedB> {
        Self::pack_with(b, PackKernel::best())
    }

    /// Packs with a chosen packer (errors if this CPU cannot run it).
    pub fn pack_with(b: MatRef<'_, bf16>, pack: PackKernel) -> Result<AmxPackedB> {
        Self::pack_into(b, pack, Vec::new())
    }

    /// Packs into `lines` (reusing its memory; every line is overwritten).
    fn pack_into(b: MatRef<'_, bf16>, pack: PackKernel, lines: Vec<Line>) -> Result<AmxPackedB> {
        pack.check()?;
        b.check("B")?;
        let (k, n) = (b.rows, b.cols);
        // Groups of 8 panels: each B row pair is read as a 512-byte run.
        let work = |g: usize, dst: &mut [Line]| pack_b_panels(&b, 256 * g, dst, pack);
        Self::fill(k, n, 8, lines, work)
    }

    /// B `[k, n]` packed into `lines` (resized; every line overwritten) by `work(g, dst)`, which
    /// fills group `g` of `per_task` consecutive panels; groups run in parallel when B is large.
    fn fill(
        k: usize,
        n: usize,
        per_task: usize,
        lines: Vec<Line>,
        work: impl Fn(usize, &mut [Line]) + Sync,
    ) -> Result<AmxPackedB> {
        let panel = ksteps(k) * LINES_PER_KSTEP;
        let total = n
            .div_ceil(32)
            .checked_mul(panel)
            .filter(|&l| l.checked_mul(64).is_some())
            .ok_or_else(|| Error::invalid(format!("gemm amx: B {k}x{n} is too large to pack")))?;
        let mut lines = sized(lines, total);
        if panel > 0 {
            let group = per_task * panel;
            let work = |(g, dst): (usize, &mut [Line])| work(g, dst);
            if total >= PAR_MIN_PACK_LINES {
                lines.par_chunks_mut(group).enumerate().for_each(work);
            } else {
                lines.chunks_mut(group).enumerate().for_each(work);
            }
        }
        Ok(AmxPackedB { k, n, lines })
    }

    /// Packs a bf16 [`PanelMatrix`] (the column panels decode streams) with the best packer:
    /// the same lines as packing the dense matrix it holds (tested), one panel per task.
    pub fn pack_panels(p: &PanelMatrix<bf16>) -> Result<AmxPackedB> {
        Self::pack_panels_into(p, PackKernel::best(), Vec::new())
    }

    /// As [`AmxPackedB::pack_panels`] with a chosen packer.
    pub fn pack_panels_with(p: &PanelMatrix<bf16>, pack: PackKernel) -> Result<AmxPackedB> {
        Self::pack_panels_into(p, pack, Vec::new())
    }

    fn pack_panels_into(
        p: &PanelMatrix<bf16>,
        pack: PackKernel,
        lines: Vec<Line>,
    ) -> Result<AmxPackedB> {
        pack.check()?;
        let (k, n) = (p.rows(), p.cols());
        // Panel q of the matrix is 32·k contiguous elements; it becomes tile panel q.
        let src: &[u16] = bytemuck::cast_slice(p.as_slice());
        let work = |q: usize, dst: &mut [Line]| {
            pack_b_from_panel(&src[q * 32 * k..][..32 * k], k, dst, pack)
        };
        Self::fill(k, n, 1, lines, work)
    }

    /// Packs `b` (any shape) into this object, reusing its memory: for weights that change
    /// between products (training), without a fresh allocation's page faults.
    pub fn repack(&mut self, b: MatRef<'_, bf16>) -> Result<()> {
        let lines = std::mem::take(&mut self.lines);
        *self = Self::pack_into(b, PackKernel::best(), lines)?;
        Ok(())
    }

    /// Rows of B (the inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of B.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held by the packed panels.
    pub fn size_bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

/// `C = alpha·bf16(A)·B + beta·C` then the epilogue, on AMX tiles. Shapes: A `[m, k]` (f32 or
/// bf16), B `[k, n]` bf16, C `[m, n]` f32; any strides. B is packed on every call (use
/// [`gemm_bf16_amx_packed`] for weights). Errors (never faults) where AMX is unavailable.
/// Bitwise identical for any rayon thread count.
pub fn gemm_bf16_amx<TA: AmxElement>(
    a: MatRef<'_, TA>,
    b: MatRef<'_, bf16>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    gemm_bf16_amx_with(&AmxConfig::hardware()?, a, b, c, opts)
}

/// As [`gemm_bf16_amx`] with B already packed.
pub fn gemm_bf16_amx_packed<TA: AmxElement>(
    a: MatRef<'_, TA>,
    b: &AmxPackedB,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    gemm_bf16_amx_packed_with(&AmxConfig::hardware()?, a, b, c, opts)
}

/// As [`gemm_bf16_amx`] with a chosen tile kernel and packer (tests force each one).
pub fn gemm_bf16_amx_with<TA: AmxElement>(
    cfg: &AmxConfig,
    a: MatRef<'_, TA>,
    b: MatRef<'_, bf16>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    cfg.check()?;
    check_shapes(&a, b.rows, b.cols, &c, opts)?;
    let packed = AmxPackedB::pack_into(b, cfg.pack, scratch_take(b_lines(b.rows, b.cols)))?;
    let result = gemm_bf16_amx_packed_with(cfg, a, &packed, c, opts);
    scratch_give(packed.lines);
    result
}

/// As [`gemm_bf16_amx_with`] with B a bf16 [`PanelMatrix`]: read in place by the AVX512-BF16
/// kernel (and the software model) when `k` is a multiple of 32, otherwise — and for AMX tiles —
/// packed from the panels on each call. Bitwise the product of the dense matrix either way.
pub fn gemm_bf16_amx_panels_with<TA: AmxElement>(
    cfg: &AmxConfig,
    a: MatRef<'_, TA>,
    b: &PanelMatrix<bf16>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    cfg.check()?;
    check_shapes(&a, b.rows(), b.cols(), &c, opts)?;
    // Kernels that read the panels directly need whole k-steps (rows past k would be the next
    // panel's); then nothing is packed.
    let k = b.rows();
    if cfg.tiles.reads_panels() && k > 0 && k.is_multiple_of(32) {
        if let Ok(rows) = bytemuck::try_cast_slice::<bf16, Line>(b.as_slice()) {
            let src = BLines {
                lines: rows,
                k,
                n: b.cols(),
                panel_rows: true,
            };
            return run(cfg, a, src, c, opts);
        }
    }
    let lines = scratch_take(b_lines(b.rows(), b.cols()));
    let packed = AmxPackedB::pack_panels_into(b, cfg.pack, lines)?;
    let result = gemm_bf16_amx_packed_with(cfg, a, &packed, c, opts);
    scratch_give(packed.lines);
    result
}

/// As [`gemm_bf16_amx_packed`] with a chosen tile kernel and packer.
pub fn gemm_bf16_amx_packed_with<TA: AmxElement>(
    cfg: &AmxConfig,
    a: MatRef<'_, TA>,
    b: &AmxPackedB,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    cfg.check()?;
    check_shapes(&a, b.k, b.n, &c, opts)?;
    let src = BLines {
        lines: &b.lines,
        k: b.k,
        n: b.n,
        panel_rows: false,
    };
    run(cfg, a, src, c, opts)
}

/// B as the tile kernels read it: `n.div_ceil(32)` panels of `ksteps(k)·32` lines each, packed
/// tile lines or (`panel_rows`, `k` a multiple of 32) the rows of bf16 column panels.
#[derive(Clone, Copy)]
struct BLines<'a> {
    lines: &'a [Line],
    k: usize,
    n: usize,
    panel_rows: bool,
}

fn check_shapes<TA>(
    a: &MatRef<'_, TA>,
    k: usize,
    n: usize,
    c: &MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    if a.cols != k || a.rows != c.rows || n != c.cols {
        return Err(Error::invalid(format!(
            "gemm amx: A is {}x{}, B is {}x{}, C is {}x{}",
            a.rows, a.cols, k, n, c.rows, c.cols
        )));
    }
    a.check("A")?;
    c.check("C")?;
    if let Epilogue::Bias(bias) | Epilogue::BiasGelu(bias) = opts.epilogue {
        if bias.len() != c.cols {
            return Err(Error::shape("gemm amx bias", &[c.cols], &[bias.len()]));
        }
    }
    Ok(())
}

/// Below this many packed lines (256 KiB), packing runs on the calling thread.
const PAR_MIN_PACK_LINES: usize = 4096;
/// Below this many flops, the product runs on the calling thread (about 2 µs of tile work).
const PAR_MIN_FLOPS: usize = 1 << 23;

/// Cache blocking, in units the kernel uses.
#[derive(Clone, Copy, Debug)]
struct Blocking {
    /// k-steps of 32 per KC block.
    kc_steps: usize,
    /// Rows of C per task (multiple of 32).
    mc: usize,
    /// Columns of C per task (multiple of 32).
    nc: usize,
}

/// KC from L1d (a 32×KC bf16 A panel ≈ 2/3 of it), NC and MC from L2 (the KC×NC B block ≈ 1/4,
/// the MC×KC A block ≈ 1/8). Sapphire Rapids (48 KiB, 2 MiB): KC = 512, NC = 512, MC = 256.
fn blocking() -> Blocking {
    let (l1, l2) = detect::cache_sizes();
    let kc_steps = (l1 * 2 / 3 / (32 * 2) / 32).clamp(2, 32);
    let kc_bytes = kc_steps * 32 * 2;
    let nc = (l2 / 4 / kc_bytes / 32 * 32).clamp(64, 4096);
    let mc = (l2 / 8 / kc_bytes / 32 * 32).clamp(32, 1024);
    Blocking { kc_steps, mc, nc }
}

/// C's base pointer and strides, shared by the tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct CPtr {
    p: *mut f32,
    rs: usize,
    cs: usize,
}
// SAFETY: tasks write disjoint sets of C elements (distinct (i, j) blocks of a view whose
// elements do not overlap — checked by `view_is_disjoint` before running tasks in parallel);
// the pointer outlives the tasks because `run` borrows C mutably until they finish.
unsafe impl Send for CPtr {}
// SAFETY: as above.
unsafe impl Sync for CPtr {}

/// True when distinct (i, j) of a rows×cols view map to distinct elements.
fn view_is_disjoint(rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows <= 1 && cols <= 1 {
        return true;
    }
    if rows <= 1 {
        return cs >= 1;
    }
    if cols <= 1 {
        return rs >= 1;
    }
    let span = |stride: usize, count: usize| stride.checked_mul(count);
    (cs >= 1 && span(cs, cols).is_some_and(|w| rs >= w))
        || (rs >= 1 && span(rs, rows).is_some_and(|h| cs >= h))
}

/// Lines of a packed `[k, n]` B (saturating; the packer checks for overflow).
fn b_lines(k: usize, n: usize) -> usize {
    (ksteps(k) * LINES_PER_KSTEP).saturating_mul(n.div_ceil(32))
}

/// `v` resized to `len` lines. Lines it already holds keep their (stale) contents — the packers
/// overwrite every line — so a reused buffer costs no extra pass; new lines are zeros.
fn sized(mut v: Vec<Line>, len: usize) -> Vec<Line> {
    if v.len() >= len {
        v.truncate(len);
    } else if v.is_empty() {
        v = bytemuck::zeroed_vec(len);
    } else {
        v.resize(len, Line::ZERO);
    }
    v
}

/// Packing buffers kept between calls: a fresh multi-megabyte buffer costs a page fault per
/// 4 KiB on first touch (measured ≈ 3–5 µs per page on a virtual machine, more than the packing
/// itself), so the per-call paths reuse them. At most [`SCRATCH_MAX_BUFFERS`] buffers and
/// [`SCRATCH_MAX_BYTES`] are kept.
static SCRATCH: Mutex<Vec<Vec<Line>>> = Mutex::new(Vec::new());
const SCRATCH_MAX_BUFFERS: usize = 4;
const SCRATCH_MAX_BYTES: usize = 512 << 20;

/// A kept buffer of at least `len` lines (the smallest such), or an empty one.
fn scratch_take(len: usize) -> Vec<Line> {
    let Ok(mut pool) = SCRATCH.lock() else {
        return Vec::new();
    };
    let best = (0..pool.len())
        .filter(|&i| pool[i].len() >= len)
        .min_by_key(|&i| pool[i].len());
    match best {
        Some(i) => pool.swap_remove(i),
        None => Vec::new(),
    }
}

/// Returns a buffer to the pool, dropping the smallest ones beyond the limits.
fn scratch_give(v: Vec<Line>) {
    if v.is_empty() {
        return;
    }
    let Ok(mut pool) = SCRATCH.lock() else {
        return;
    };
    pool.push(v);
    pool.sort_by_key(|b| std::cmp::Reverse(b.len()));
    let mut bytes = 0;
    pool.retain(|b| {
        let size = b.len() * 64;
        let keep = bytes + size <= SCRATCH_MAX_BYTES;
        bytes += if keep { size } else { 0 };
        keep
    });
    pool.truncate(SCRATCH_MAX_BUFFERS);
}

thread_local! {
    /// Each thread's f32 accumulator for one MC×NC task (kept between calls).
    static ACC: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

fn run<TA: AmxElement>(
    cfg: &AmxConfig,
    a: MatRef<'_, TA>,
    b: BLines<'_>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    let (m, n, k) = (a.rows, b.n, b.k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let ks = ksteps(k);
    let panel = ks * LINES_PER_KSTEP;
    let mp = m.div_ceil(32);
    let too_large = || Error::invalid(format!("gemm amx: A {m}x{k} is too large to pack"));
    let total = mp
        .checked_mul(panel)
        .filter(|&l| l.checked_mul(64).is_some())
        .ok_or_else(too_large)?;

    // Pack A: 32-row panels of bf16.
    let mut pa = sized(scratch_take(total), total);
    if panel > 0 {
        let work = |(ip, dst): (usize, &mut [Line])| pack_a_panel(&a, 32 * ip, dst, cfg.pack);
        if total >= PAR_MIN_PACK_LINES {
            pa.par_chunks_mut(panel).enumerate().for_each(work);
        } else {
            pa.chunks_mut(panel).enumerate().for_each(work);
        }
    }

    // Tasks: MC×NC blocks of C, N-major so consecutive tasks share a B block. Smaller blocks
    // when there are too few tasks to keep the threads busy (does not change any result).
    let threads = rayon::current_num_threads();
    let Blocking {
        kc_steps,
        mut mc,
        mut nc,
    } = blocking();
    let count = |mc: usize, nc: usize| m.div_ceil(mc) * n.div_ceil(nc);
    while count(mc, nc) < 4 * threads && nc > 64 {
        nc = (nc / 2).div_ceil(32) * 32;
    }
    while count(mc, nc) < 4 * threads && mc > 32 {
        mc = (mc / 2).div_ceil(32) * 32;
    }
    let m_blocks = m.div_ceil(mc);
    let tasks = m_blocks * n.div_ceil(nc);

    let cp = CPtr {
        p: c.data.as_mut_ptr(),
        rs: c.row_stride,
        cs: c.col_stride,
    };
    let task = |t: usize| {
        let (ic, jc) = ((t % m_blocks) * mc, (t / m_blocks) * nc);
        let (mcur, ncur) = (mc.min(m - ic), nc.min(n - jc));
        let (mpanels, npanels) = (mcur.div_ceil(32), ncur.div_ceil(32));
        let ldc = 32 * npanels;
        ACC.with_borrow_mut(|acc_lines| {
            let need = 32 * mpanels * ldc / 16;
            if acc_lines.len() < need {
                *acc_lines = bytemuck::zeroed_vec(need);
            }
            let acc: &mut [f32] = bytemuck::cast_slice_mut(&mut acc_lines[..need]);
            if ks == 0 {
                acc.fill(0.0);
            } else {
                let session = TileSession::begin(cfg.tiles);
                for s0 in (0..ks).step_by(kc_steps) {
                    let nks = kc_steps.min(ks - s0);
                    let (lo, hi) = (s0 * LINES_PER_KSTEP, (s0 + nks) * LINES_PER_KSTEP);
                    for ir in 0..mpanels {
                        let ap = &pa[(ic / 32 + ir) * panel..][lo..hi];
                        for jr in 0..npanels {
                            let bp = &b.lines[(jc / 32 + jr) * panel..][lo..hi];
                            let cb = &mut acc[32 * ir * ldc + 32 * jr..];
                            let panel_rows = b.panel_rows;
                            kernel_32x32(&session, ap, bp, panel_rows, nks, cb, ldc, s0 > 0);
                        }
                    }
                }
            }
            write_back(cp, acc, ldc, ic, jc, mcur, ncur, opts);
        });
    };
    let parallel = threads > 1
        && tasks > 1
        && view_is_disjoint(c.rows, c.cols, c.row_stride, c.col_stride)
        && m.saturating_mul(n).saturating_mul(k).saturating_mul(2) >= PAR_MIN_FLOPS;
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    scratch_give(pa);
    Ok(())
}

/// `C[ic+i][jc+j] = epilogue(alpha·acc[i][j] + beta·C[ic+i][jc+j])` for the task's block
/// (`beta == 0` ignores C's previous contents, even NaN).
#[allow(clippy::too_many_arguments)]
fn write_back(
    cp: CPtr,
    acc: &[f32],
    ldc: usize,
    ic: usize,
    jc: usize,
    mcur: usize,
    ncur: usize,
    opts: &GemmOptions<'_>,
) {
    let (alpha, beta, epi) = (opts.alpha, opts.beta, &opts.epilogue);
    for i in 0..mcur {
        let arow = &acc[i * ldc..i * ldc + ncur];
        let base = (ic + i) * cp.rs + jc * cp.cs;
        if cp.cs == 1 {
            // C was validated (`MatMut::check`) and no other task or borrow touches this block.
            // SAFETY: elements (ic+i, jc..jc+ncur) lie inside C's buffer and, with unit column
            // stride, are this contiguous run, owned by this task while `run` executes.
            let crow = unsafe { std::slice::from_raw_parts_mut(cp.p.add(base), ncur) };
            if beta == 0.0 {
                for (cv, &av) in crow.iter_mut().zip(arow) {
                    *cv = alpha * av;
                }
            } else {
                for (cv, &av) in crow.iter_mut().zip(arow) {
                    *cv = alpha * av + beta * *cv;
                }
            }
            // Bias, then the vectorised GELU over the run (as the f32 driver's epilogue).
            apply_epilogue_row(crow, jc, epi);
        } else {
            for (j, &av) in arow.iter().enumerate() {
                // SAFETY: as above, element (ic+i, jc+j) of the validated view, written by
                // this task only.
                unsafe {
                    let p = cp.p.add(base + j * cp.cs);
                    let prev = if beta == 0.0 { 0.0 } else { beta * *p };
                    *p = apply_epilogue(alpha * av + prev, jc + j, epi);
                }
            }
        }
    }
}
