//! General matrix multiply: `C = alpha·A·B + beta·C`, with an optional fused epilogue.
//!
//! Operands are strided matrix views ([`MatRef`], [`MatMut`]): a transposed operand is a stride
//! swap, never a copy by the caller. A is f32; B (the weights) may be f32, f16 or bf16 and is
//! converted to f32 while it is packed; accumulation is f32.
//!
//! Public API (stable; other kernels and models call it):
//! * [`gemm`] — one matrix product.
//! * [`gemm_batched`] — a batch of products with a stride per batch.
//! * [`gemm_with_isa`] — the same with a chosen microkernel (tests, benchmarks).
//! * [`gemm_bf16_compute`] — bf16 weights, routed to AMX tiles where the CPU has them.
//! * [`PackedB`], [`gemm_packed`] — B packed once and reused (weights used every call).
//! * [`PanelSource`], [`gemm_panels`] — a B that packs its own panels (implicit GEMM: conv
//!   patches gathered straight into the panel layout).
//!
//! Structure (BLIS, see `docs/gemm.md`): [`blocking`] derives `MC/KC/NC` from the cache sizes;
//! [`pack`] packs A and B panels (widening f16/bf16); [`micro`], [`avx2`], [`avx512`] are the
//! register-blocked microkernels; [`driver`] is the loop nest, the macro-kernel and the
//! threading; [`gemv`] is the M = 1 path; [`rows`] the batch-invariant path of a few rows.
use kiln_tensor::{DType, Error, FloatElement, Result};
use std::sync::OnceLock;

pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod blocking;
pub mod driver;
pub mod gemv;
pub mod micro;
pub mod pack;
pub mod panels;
pub mod rows;

pub use driver::{APanelSource, PanelSource, ViewPanels};
pub use panels::{gemm_panel_matrix, gemm_panel_matrix_with_isa, PanelMatrix};

/// An instruction set a microkernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F, `12 × 32` tile.
    Avx512,
    /// AVX2 + FMA, `6 × 16` tile.
    Avx2,
    /// `wide::f32x8`, `6 × 16` tile, no run-time detection needed.
    Portable,
    /// Plain Rust, `4 × 4` tile.
    Scalar,
}

impl Isa {
    /// All kernels, fastest first.
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Portable, Isa::Scalar];

    /// Whether this CPU runs it (detected at run time).
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => false,
            Isa::Portable | Isa::Scalar => true,
        }
    }

    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Every kernel this CPU runs.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// Lower-case name: `avx512`, `avx2`, `portable`, `scalar`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
            Isa::Scalar => "scalar",
        }
    }

    /// Parses [`Isa::name`].
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name() == s.to_ascii_lowercase())
    }

    /// The microkernel's `(MR, NR)`.
    pub fn tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (12, 32),
            Isa::Avx2 | Isa::Portable => (6, 16),
            Isa::Scalar => (micro::SCALAR_MR, micro::SCALAR_NR),
        }
    }

    /// The cache blocking used with this kernel on this machine.
    pub fn blocking(self) -> blocking::Blocking {
        let (mr, nr) = self.tile();
        blocking::Blocking::for_kernel(mr, nr, blocking::CacheSizes::detect())
    }
}

/// A read-only strided matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows × cols` matrix (row stride `cols`).
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// A view with explicit strides.
    pub fn strided(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
    /// The transpose (a stride swap).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
    /// Checks that every element is inside `data`.
    pub fn check(&self, name: &str) -> Result<()> {
        check_extent(
            name,
            self.data.len(),
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
        )
    }
}

/// A writable strided f32 matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatMut<'a> {
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    pub fn strided(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        MatMut {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
    pub fn check(&self, name: &str) -> Result<()> {
        check_extent(
            name,
            self.data.len(),
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
        )
    }
}

fn check_extent(
    name: &str,
    len: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)));
    match last {
        Some(l) if l < len => Ok(()),
        _ => Err(Error::invalid(format!(
            "gemm: {name} view {rows}x{cols} (strides {rs}, {cs}) exceeds its buffer of {len} elements"
        ))),
    }
}

/// What happens to each output element after `alpha·A·B + beta·C`.
#[derive(Clone, Copy, Debug, Default)]
pub enum Epilogue<'a> {
    #[default]
    None,
    /// `c[i][j] += bias[j]` (bias has `n` elements).
    Bias(&'a [f32]),
    /// `c[i][j] = gelu_tanh(c[i][j] + bias[j])`.
    BiasGelu(&'a [f32]),
    /// `c[i][j] = gelu_tanh(c[i][j])`.
    Gelu,
}

/// Options of one product.
#[derive(Clone, Copy, Debug)]
pub struct GemmOptions<'a> {
    pub alpha: f32,
    /// `beta == 0` means C is write-only: its previous contents (even NaN) are ignored.
    pub beta: f32,
    pub epilogue: Epilogue<'a>,
    /// Every row of C is bitwise the M = 1 product of its row of A (the batch invariance a
    /// batched decode step needs), for products of up to [`INVARIANT_ROWS`] rows; larger ones,
    /// and every product without it beyond [`FEW_ROWS`] rows, use the blocked GEMM, which is
    /// faster for compute-bound products (a prompt's prefill, training) but sums in another
    /// order.
    pub rows_invariant: bool,
}

impl Default for GemmOptions<'_> {
    fn default() -> Self {
        GemmOptions {
            alpha: 1.0,
            beta: 0.0,
            epilogue: Epilogue::None,
            rows_invariant: false,
        }
    }
}

/// `C = alpha·A·B + beta·C` then the epilogue. Shapes: A `[m, k]`, B `[k, n]`, C `[m, n]`.
///
/// Runs on the current rayon pool; results are bitwise identical for any thread count.
pub fn gemm<TB: FloatElement>(
    a: MatRef<'_, f32>,
    b: MatRef<'_, TB>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    gemm_with_isa(Isa::best(), a, b, c, opts)
}

/// B packed once into the microkernel's panel layout, as f32, for weights used in every call
/// (prefill): [`gemm_packed`] then skips packing (and widening bf16/f16) B.
///
/// Layout: for each depth block `pc` of `KC` rows, every panel of `NR` columns (zero-padded to
/// `n` rounded up to `NR`), each panel `kcur × NR` row-major — exactly what the per-call path
/// packs, so results are bitwise identical to [`gemm_with_isa`] with the same kernel.
#[derive(Clone, Debug)]
pub struct PackedB {
    isa: Isa,
    k: usize,
    n: usize,
    data: kiln_tensor::AlignedBuffer,
}

impl PackedB {
    /// Packs `b` (`[k, n]`, any strides, f32/f16/bf16) for the fastest kernel of this CPU.
    pub fn new<TB: FloatElement>(b: MatRef<'_, TB>) -> Result<PackedB> {
        PackedB::with_isa(Isa::best(), b)
    }

    /// Packs `b` for the kernel of `isa` (an error if this CPU cannot run it).
    pub fn with_isa<TB: FloatElement>(isa: Isa, b: MatRef<'_, TB>) -> Result<PackedB> {
        b.check("B")?;
        if !isa.is_available() {
            return Err(Error::invalid(format!(
                "gemm: the {} microkernel is not supported by this CPU",
                isa.name()
            )));
        }
        let (k, n) = (b.rows, b.cols);
        let (_, nr) = isa.tile();
        // The depth blocks `gemm_blis` will take (`Blocking::for_depth`).
        let kc = isa.blocking().for_depth(k).kc;
        let npad = n.next_multiple_of(nr);
        let len = k
            .checked_mul(npad)
            .and_then(|l| l.checked_mul(4))
            .ok_or_else(|| Error::invalid("gemm: packed B too large"))?;
        let mut data = kiln_tensor::AlignedBuffer::zeroed(len);
        if n > 0 {
            use rayon::prelude::*;
            let dst = data.as_mut_slice::<f32>();
            // One depth block per chunk (all kc rows but the last), each cut into ranges of
            // whole panels (one depth block, as at G2's 512 × 1024, was one thread's work).
            // The packed values are copies, the same however the work is cut.
            let panels = npad / nr;
            let per = panels.div_ceil(2 * rayon::current_num_threads()).max(1);
            dst.par_chunks_mut(kc * npad)
                .enumerate()
                .for_each(|(ib, blk)| {
                    let pc = ib * kc;
                    let kcur = kc.min(k - pc);
                    blk[..kcur * npad]
                        .par_chunks_mut(per * nr * kcur)
                        .enumerate()
                        .for_each(|(ir, part)| {
                            let j0 = ir * per * nr;
                            pack::pack_b(&b, pc, kcur, j0, (per * nr).min(n - j0), nr, part);
                        });
                });
        }
        Ok(PackedB { isa, k, n, data })
    }

    /// Rows of B (`k`).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Columns of B (`n`).
    pub fn n(&self) -> usize {
        self.n
    }
    /// The kernel it was packed for.
    pub fn isa(&self) -> Isa {
        self.isa
    }
    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }
}

/// `C = alpha·A·B + beta·C` then the epilogue, with B pre-packed ([`PackedB`]). Shapes: A
/// `[m, k]`, C `[m, n]`, any strides. Bitwise identical for any thread count.
pub fn gemm_packed(
    a: MatRef<'_, f32>,
    b: &PackedB,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    validate_dims(&a, b.k, b.n, &c, opts)?;
    let kern = micro::Kernel::for_isa(b.isa)
        .ok_or_else(|| Error::invalid("gemm: packed B's kernel is not supported by this CPU"))?;
    let (m, k, n) = (a.rows, b.k, b.n);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        scale_only(c, opts);
        return Ok(());
    }
    let blk = b.isa.blocking();
    let b: driver::BSource<'_, f32> = driver::BSource::Packed {
        data: b.data.as_slice::<f32>(),
        n,
    };
    run_blis(&kern, blk, a, b, c, opts);
    Ok(())
}

/// `C = alpha·A·B + beta·C` then the epilogue, with B written panel by panel by `b` (see
/// [`PanelSource`]). Shapes: A `[m, k]`, B `[k, n]` (`b.rows()`, `b.cols()`), C `[m, n]`, any
/// strides. The loop nest, blocking and kernel calls are those of [`gemm`], so for a source
/// that packs what `pack_b` would, results are bitwise identical to it, for any thread count.
pub fn gemm_panels(
    a: MatRef<'_, f32>,
    b: &dyn PanelSource,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    gemm_panels_with_isa(Isa::best(), a, b, c, opts)
}

/// [`gemm_panels`] with the microkernel of `isa` (an error if this CPU cannot run it).
pub fn gemm_panels_with_isa(
    isa: Isa,
    a: MatRef<'_, f32>,
    b: &dyn PanelSource,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    validate_dims(&a, b.rows(), b.cols(), &c, opts)?;
    panels_from(isa, driver::ASource::View(a), b, c, opts)
}

/// The product of [`gemm_panels_with_isa`] and [`gemm_sources`] once the operands are
/// validated: either kind of A, B from a panel source, a plain C.
fn panels_from(
    isa: Isa,
    a: driver::ASource<'_>,
    b: &dyn PanelSource,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    let Some(kern) = micro::Kernel::for_isa(isa) else {
        return Err(Error::invalid(format!(
            "gemm: the {} microkernel is not supported by this CPU",
            isa.name()
        )));
    };
    let (m, k, n) = (a.rows(), b.rows(), b.cols());
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        scale_only(c, opts);
        return Ok(());
    }
    let cp = driver::CPtr::strided(c.data.as_mut_ptr(), c.row_stride, c.col_stride);
    // SAFETY: the caller validated `c` to lie inside `c.data` and not to overlap itself, and
    // its exclusive borrow is held here for the whole call.
    unsafe {
        run_blis_into(
            &kern,
            isa.blocking(),
            a,
            driver::BSource::<f32>::Panels(b),
            cp,
            n,
            opts,
        )
    };
    Ok(())
}

/// A C `[rows, cols]` stored as column blocks: element `(i, j)` at
/// `data[i·row_stride + (j / block)·block_stride + j % block]`. A convolution's output
/// `[N, C, H·W]` is the GEMM's `[C, N·H·W]` this way (`block = H·W`, `row_stride = H·W`,
/// `block_stride = C·H·W`), so the product writes each image's planes in place.
pub struct BlockedMatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub block: usize,
    pub block_stride: usize,
}

/// Whether [`gemm_panels_blocked`] takes column blocks of `block` columns on this CPU (a
/// multiple of the fastest microkernel's NR, so that no tile straddles two blocks).
pub fn blocked_c_supported(block: usize) -> bool {
    micro::Kernel::for_isa(Isa::best()).is_some_and(|k| block > 0 && block.is_multiple_of(k.nr))
}

/// [`gemm_panels`] into a column-blocked C. Each element receives exactly the arithmetic of
/// [`gemm_panels`] into a plain matrix (bitwise), only stored elsewhere. Returns `Ok(false)`,
/// touching nothing, when [`blocked_c_supported`] says no for `block` (a tile would straddle two
/// blocks) or the depth is 0: the caller then multiplies into a plain matrix and copies.
pub fn gemm_panels_blocked(
    a: MatRef<'_, f32>,
    b: &dyn PanelSource,
    c: BlockedMatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<bool> {
    a.check("A")?;
    blocked_from(driver::ASource::View(a), b, c, opts)
}

/// [`gemm_panels_blocked`] with A's panels also written by a source ([`APanelSource`]).
pub fn gemm_sources_blocked(
    a: &dyn APanelSource,
    b: &dyn PanelSource,
    c: BlockedMatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<bool> {
    blocked_from(driver::ASource::Panels(a), b, c, opts)
}

/// [`gemm_panels`] with A's panels also written by a source ([`APanelSource`]): the loop nest,
/// blocking and kernel calls are those of [`gemm_panels`], so for a source that packs what
/// `pack_a` would, results are bitwise identical to it.
pub fn gemm_sources(
    a: &dyn APanelSource,
    b: &dyn PanelSource,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    validate_source_dims([a.rows(), a.cols()], b.rows(), b.cols(), &c, opts, None)?;
    panels_from(Isa::best(), driver::ASource::Panels(a), b, c, opts)
}

/// [`gemm_panels_blocked`] for either kind of A (a view has been checked by the caller).
fn blocked_from(
    a: driver::ASource<'_>,
    b: &dyn PanelSource,
    c: BlockedMatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<bool> {
    let isa = Isa::best();
    let Some(kern) = micro::Kernel::for_isa(isa) else {
        return Ok(false);
    };
    let (m, k, n) = (a.rows(), b.rows(), b.cols());
    if a.cols() != k || c.rows != m || c.cols != n {
        return Err(Error::invalid(format!(
            "gemm: A is {}x{}, B is {}x{}, C is {}x{}",
            m,
            a.cols(),
            k,
            n,
            c.rows,
            c.cols
        )));
    }
    let blocks = n.div_ceil(c.block.max(1));
    // Rows inside a block, blocks beyond each other: every element its own address.
    let disjoint = c.block >= 1
        && c.row_stride >= c.block.min(n)
        && (blocks <= 1 || c.block_stride >= m.saturating_mul(c.row_stride));
    if !disjoint {
        return Err(Error::invalid(format!(
            "gemm: blocked C {}x{} (row stride {}, blocks of {} at {}) maps two elements to one \
             address",
            c.rows, c.cols, c.row_stride, c.block, c.block_stride
        )));
    }
    if m == 0 || n == 0 {
        return Ok(true);
    }
    let last = (m - 1)
        .checked_mul(c.row_stride)
        .and_then(|r| {
            ((n - 1) / c.block)
                .checked_mul(c.block_stride)
                .map(|b| (r, b))
        })
        .and_then(|(r, b)| r.checked_add(b)?.checked_add((n - 1) % c.block));
    if last.is_none_or(|l| l >= c.data.len()) {
        return Err(Error::invalid(format!(
            "gemm: blocked C {}x{} does not fit its buffer of {}",
            c.rows,
            c.cols,
            c.data.len()
        )));
    }
    if let Epilogue::Bias(bias) | Epilogue::BiasGelu(bias) = opts.epilogue {
        if bias.len() != n {
            return Err(Error::shape("gemm bias", &[n], &[bias.len()]));
        }
    }
    if k == 0 || !blocked_c_supported(c.block) {
        return Ok(false);
    }
    let cp = driver::CPtr {
        ptr: c.data.as_mut_ptr(),
        rs: c.row_stride,
        cs: 1,
        block: c.block,
        bs: c.block_stride,
    };
    // SAFETY: every element (i, j) is inside `c.data` (the last one was checked) and has its own
    // address (checked above); the exclusive borrow of `c.data` is held for the whole call.
    unsafe {
        run_blis_into(
            &kern,
            isa.blocking(),
            a,
            driver::BSource::<f32>::Panels(b),
            cp,
            n,
            opts,
        )
    };
    Ok(true)
}

/// `C = beta·C` then the epilogue (a product with `k = 0`).
fn scale_only(c: MatMut<'_>, opts: &GemmOptions<'_>) {
    for i in 0..c.rows {
        for j in 0..c.cols {
            let at = i * c.row_stride + j * c.col_stride;
            let old = if opts.beta == 0.0 { 0.0 } else { c.data[at] };
            c.data[at] = apply_epilogue(
                micro::update(0.0, old, opts.alpha, opts.beta),
                j,
                &opts.epilogue,
            );
        }
    }
}

/// Smallest M routed to native bf16 arithmetic by [`gemm_bf16_compute`]: the bf16 driver packs
/// 32-row panels (AMX tiles are 16 rows); below this the f32 path — for M = 1 the GEMV path,
/// which streams bf16 B at memory bandwidth — is as fast and more precise.
pub const AMX_MIN_M: usize = 16;

/// `C = alpha·A·B + beta·C` then the epilogue, with bf16 weights, where bf16 *compute* is
/// acceptable: with `m ≥` [`AMX_MIN_M`] on a CPU with native bf16 arithmetic
/// ([`amx::best_native_kernel`]: AMX tiles, else AVX512-BF16 `vdpbf16ps`) the product rounds A
/// to bf16 and runs on it ([`amx::gemm_bf16_amx_with`]); otherwise it is [`gemm`] (A kept in
/// f32). Shapes and layouts as [`gemm`]. Bitwise identical for any thread count (every path
/// is), but the paths differ from each other by A's rounding and their summation order.
pub fn gemm_bf16_compute(
    a: MatRef<'_, f32>,
    b: MatRef<'_, half::bf16>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    match amx::AmxConfig::native() {
        Some(cfg) if a.rows >= AMX_MIN_M => amx::gemm_bf16_amx_with(&cfg, a, b, c, opts),
        _ => gemm(a, b, c, opts),
    }
}

/// [`gemm_bf16_compute`] with B in column panels: native bf16 arithmetic under the same
/// conditions ([`amx::gemm_bf16_amx_panels_with`]: the AVX512-BF16 kernel reads the panels in
/// place, AMX packs them), else [`panels::gemm_panel_matrix`].
pub fn gemm_bf16_compute_panels(
    a: MatRef<'_, f32>,
    b: &PanelMatrix<half::bf16>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    match amx::AmxConfig::native() {
        Some(cfg) if a.rows >= AMX_MIN_M => amx::gemm_bf16_amx_panels_with(&cfg, a, b, c, opts),
        _ => panels::gemm_panel_matrix(a, b, c, opts),
    }
}

/// [`gemm`] with the microkernel of `isa` (an error if this CPU cannot run it). The M = 1 path
/// uses AVX2 code for both `Avx512` and `Avx2` (it is bandwidth-bound), plain Rust otherwise.
pub fn gemm_with_isa<TB: FloatElement>(
    isa: Isa,
    a: MatRef<'_, f32>,
    b: MatRef<'_, TB>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    gemm_with_blocking(isa, isa.blocking(), a, b, c, opts)
}

/// [`gemm_with_isa`] with the cache blocking `blk` instead of this machine's rules (see
/// [`blocking::Blocking::with_overrides`]): for measuring blockings. The M = 1 and few-row paths
/// do not block and are unchanged.
pub fn gemm_with_blocking<TB: FloatElement>(
    isa: Isa,
    blk: blocking::Blocking,
    a: MatRef<'_, f32>,
    b: MatRef<'_, TB>,
    mut c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    validate(&a, &b, &c, opts)?;
    let Some(kern) = micro::Kernel::for_isa(isa) else {
        return Err(Error::invalid(format!(
            "gemm: the {} microkernel is not supported by this CPU",
            isa.name()
        )));
    };
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        scale_only(c, opts);
        return Ok(());
    }
    if m == 1 && gemm_m1(isa, &a, &b, &mut *c.data, c.col_stride, false, opts) {
        return Ok(());
    }
    if (2..=rows_limit(opts)).contains(&m) && gemm_few_rows(isa, &a, &b, &mut c, opts) {
        return Ok(());
    }
    if n == 1 && m > 1 && TB::DTYPE == DType::F32 {
        // C (m × 1) = A·b  ⇔  Cᵀ (1 × m) = bᵀ·Aᵀ: an M = 1 product with Aᵀ streamed as B.
        let bf: &[f32] = bytemuck::cast_slice(b.data);
        let bt = MatRef::strided(bf, 1, k, b.col_stride, b.row_stride);
        if gemm_m1(isa, &bt, &a.t(), &mut *c.data, c.row_stride, true, opts) {
            return Ok(());
        }
    }
    run_blis(&kern, blk, a, driver::BSource::View(b), c, opts);
    Ok(())
}

/// Runs the BLIS loop nest for a validated, non-empty product (`k ≥ 1`) on the current pool, on
/// one thread below [`driver::PARALLEL_FLOPS`].
fn run_blis<TB: FloatElement>(
    kern: &micro::Kernel,
    blk: blocking::Blocking,
    a: MatRef<'_, f32>,
    b: driver::BSource<'_, TB>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) {
    let cp = driver::CPtr::strided(c.data.as_mut_ptr(), c.row_stride, c.col_stride);
    // SAFETY: every caller validated `c` to lie inside `c.data` and not to overlap itself, and
    // its exclusive borrow is held here for the whole call.
    unsafe { run_blis_into(kern, blk, driver::ASource::View(a), b, cp, c.cols, opts) };
}

/// [`run_blis`] into C at `c` (`n` columns).
///
/// # Safety
/// Every element of the `a.rows × n` C that `c` describes lies inside one live, exclusively
/// borrowed buffer, at its own address.
unsafe fn run_blis_into<TB: FloatElement>(
    kern: &micro::Kernel,
    blk: blocking::Blocking,
    a: driver::ASource<'_>,
    b: driver::BSource<'_, TB>,
    c: driver::CPtr,
    n: usize,
    opts: &GemmOptions<'_>,
) {
    let (m, k) = (a.rows(), a.cols());
    let threads = if 2 * m * n * k < driver::PARALLEL_FLOPS {
        1
    } else {
        rayon::current_num_threads()
    };
    let prod = driver::Product {
        a,
        b,
        c,
        alpha: opts.alpha,
        beta: opts.beta,
        epilogue: opts.epilogue,
    };
    // SAFETY: the caller's contract, passed on.
    unsafe { driver::gemm_blis(kern, blk, &prod, threads) };
}

/// Up to this many rows of A, a product streams B like the M = 1 path ([`rows`]) instead of
/// packing it, and each row of C is bitwise the M = 1 product of that row of A: a batched decode
/// step of up to this many sequences gives every sequence exactly the logits it gets alone, and
/// reads each weight tile once for all of them (see `docs/gemm.md`, "Batch invariance").
pub const FEW_ROWS: usize = 4;

/// Most rows a product with [`GemmOptions::rows_invariant`] computes row by row in the M = 1
/// order (a batched decode step of up to this many sequences).
pub const INVARIANT_ROWS: usize = 64;

/// Products of up to this many rows take the row kernels ([`rows`]).
pub(crate) fn rows_limit(opts: &GemmOptions<'_>) -> usize {
    if opts.rows_invariant {
        INVARIANT_ROWS
    } else {
        FEW_ROWS
    }
}

/// `C = alpha·A·B + beta·C` then the epilogue for `2 ≤ m ≤ FEW_ROWS` by [`rows::rows_dense`]:
/// each row of C is bitwise the M = 1 result for that row of A. Returns false, touching nothing,
/// when B's layout is not one the GEMV path streams.
fn gemm_few_rows<TB: FloatElement>(
    isa: Isa,
    a: &MatRef<'_, f32>,
    b: &MatRef<'_, TB>,
    c: &mut MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> bool {
    let (m, n) = (a.rows, b.cols);
    let xs = rows_of(a);
    let mut ys = vec![0f32; m * n];
    if !rows::rows_dense(isa, &xs, b, &mut ys) {
        return false;
    }
    store_rows(&ys, n, c, opts);
    true
}

/// A `[m, k]` copied row-major and contiguous.
fn rows_of(a: &MatRef<'_, f32>) -> Vec<f32> {
    let (m, k) = (a.rows, a.cols);
    let mut xs = Vec::with_capacity(m * k);
    for i in 0..m {
        if a.col_stride == 1 {
            xs.extend_from_slice(&a.data[i * a.row_stride..i * a.row_stride + k]);
        } else {
            xs.extend((0..k).map(|p| a.data[i * a.row_stride + p * a.col_stride]));
        }
    }
    xs
}

/// Row `i` of C from the plain product row `ys[i·n ..][..n]`: `C[i, j] = alpha·y + beta·C[i, j]`,
/// then the epilogue, as the M = 1 path writes a row (scale, then the row epilogue, when C's row
/// is contiguous and not read).
fn store_rows(ys: &[f32], n: usize, c: &mut MatMut<'_>, opts: &GemmOptions<'_>) {
    for (i, y) in ys.chunks_exact(n).enumerate() {
        if c.col_stride == 1 && opts.beta == 0.0 {
            let row = &mut c.data[i * c.row_stride..i * c.row_stride + n];
            row.copy_from_slice(y);
            finish_row(row, opts);
        } else {
            for (j, &acc) in y.iter().enumerate() {
                let p = &mut c.data[i * c.row_stride + j * c.col_stride];
                let old = if opts.beta == 0.0 { 0.0 } else { *p };
                *p = apply_epilogue(
                    micro::update(acc, old, opts.alpha, opts.beta),
                    j,
                    &opts.epilogue,
                );
            }
        }
    }
}

/// `row = alpha·row`, then the row epilogue: a contiguous row of C holding the plain product,
/// finished as the M = 1 path finishes it (C not read).
fn finish_row(row: &mut [f32], opts: &GemmOptions<'_>) {
    if opts.alpha != 1.0 {
        row.iter_mut().for_each(|v| *v *= opts.alpha);
    }
    apply_epilogue_row(row, 0, &opts.epilogue);
}

/// The M = 1 product `c[j·cs] = alpha·(x·B)[j] + beta·c[j·cs]`, then the epilogue, for A a
/// `1 × k` row and B `k × n` with a unit row or column stride. Returns false, touching nothing,
/// when B's layout is not one the GEMV path streams. `transposed`: the product is `Cᵀ` of a
/// one-column C, so every element is in C's column 0 (for the bias).
#[allow(clippy::too_many_arguments)]
fn gemm_m1<TA: FloatElement, TB: FloatElement>(
    isa: Isa,
    a: &MatRef<'_, TA>,
    b: &MatRef<'_, TB>,
    c: &mut [f32],
    cs: usize,
    transposed: bool,
    opts: &GemmOptions<'_>,
) -> bool {
    let col = |j: usize| if transposed { 0 } else { j };
    let (k, n) = (b.rows, b.cols);
    if !(b.col_stride == 1 || b.row_stride == 1 || n == 1 || k == 1) {
        return false;
    }
    let x: Vec<f32> = (0..k).map(|p| a.data[p * a.col_stride].to_f32()).collect();
    let in_place = cs == 1 && opts.beta == 0.0;
    let mut tmp = Vec::new();
    let y: &mut [f32] = if in_place {
        &mut c[..n]
    } else {
        tmp.resize(n, 0.0);
        &mut tmp
    };
    if !gemv::gemv(isa, &x, b, y) {
        return false;
    }
    if in_place && !transposed {
        // A contiguous row, as a tile row of the blocked path.
        finish_row(&mut c[..n], opts);
    } else if in_place {
        for (j, v) in c[..n].iter_mut().enumerate() {
            *v = apply_epilogue(opts.alpha * *v, col(j), &opts.epilogue);
        }
    } else {
        for (j, &acc) in tmp.iter().enumerate() {
            let p = &mut c[j * cs];
            let old = if opts.beta == 0.0 { 0.0 } else { *p };
            *p = apply_epilogue(
                micro::update(acc, old, opts.alpha, opts.beta),
                col(j),
                &opts.epilogue,
            );
        }
    }
    true
}

fn validate<TB>(
    a: &MatRef<'_, f32>,
    b: &MatRef<'_, TB>,
    c: &MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    validate_dims(a, b.rows, b.cols, c, opts)?;
    b.check("B")
}

/// Checks shapes, A and C extents, C's self-overlap and the bias length (B has `k × n`).
fn validate_dims(
    a: &MatRef<'_, f32>,
    k: usize,
    n: usize,
    c: &MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    validate_source_dims([a.rows, a.cols], k, n, c, opts, Some(a))
}

/// [`validate_dims`] for an A of `a_dims` `[m, k]`, checked as a view when there is one.
fn validate_source_dims(
    [m, ka]: [usize; 2],
    k: usize,
    n: usize,
    c: &MatMut<'_>,
    opts: &GemmOptions<'_>,
    view: Option<&MatRef<'_, f32>>,
) -> Result<()> {
    if ka != k || m != c.rows || n != c.cols {
        return Err(Error::invalid(format!(
            "gemm: A is {}x{}, B is {}x{}, C is {}x{}",
            m, ka, k, n, c.rows, c.cols
        )));
    }
    if let Some(a) = view {
        a.check("A")?;
    }
    c.check("C")?;
    if !disjoint_elements(c.rows, c.cols, c.row_stride, c.col_stride) {
        return Err(Error::invalid(format!(
            "gemm: C view {}x{} (strides {}, {}) maps two elements to one address",
            c.rows, c.cols, c.row_stride, c.col_stride
        )));
    }
    if let Epilogue::Bias(bias) | Epilogue::BiasGelu(bias) = opts.epilogue {
        if bias.len() != c.cols {
            return Err(Error::shape("gemm bias", &[c.cols], &[bias.len()]));
        }
    }
    Ok(())
}

/// Whether a `rows × cols` view with these strides gives every element its own address (a
/// sufficient test: one stride steps over the whole extent of the other).
fn disjoint_elements(rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows <= 1 && cols <= 1 {
        return true;
    }
    if rows <= 1 {
        return cs >= 1;
    }
    if cols <= 1 {
        return rs >= 1;
    }
    (cs >= 1 && rs >= cols.saturating_mul(cs)) || (rs >= 1 && cs >= rows.saturating_mul(rs))
}

/// Straightforward triple loop (f32 accumulation, k innermost). The correctness reference for
/// the fast paths; also the fallback for tiny products.
pub fn reference_gemm<TB: FloatElement>(
    a: MatRef<'_, f32>,
    b: MatRef<'_, TB>,
    c: MatMut<'_>,
    opts: &GemmOptions<'_>,
) {
    for i in 0..c.rows {
        for j in 0..c.cols {
            let mut acc = 0f32;
            for p in 0..a.cols {
                acc += a.data[i * a.row_stride + p * a.col_stride]
                    * b.data[p * b.row_stride + j * b.col_stride].to_f32();
            }
            let at = i * c.row_stride + j * c.col_stride;
            let prev = if opts.beta == 0.0 {
                0.0
            } else {
                opts.beta * c.data[at]
            };
            c.data[at] = apply_epilogue(opts.alpha * acc + prev, j, &opts.epilogue);
        }
    }
}

/// The epilogue applied to one output element in column `j`.
#[inline(always)]
pub fn apply_epilogue(x: f32, j: usize, epilogue: &Epilogue<'_>) -> f32 {
    match *epilogue {
        Epilogue::None => x,
        Epilogue::Bias(b) => x + b[j],
        Epilogue::BiasGelu(b) => gelu_tanh(x + b[j]),
        Epilogue::Gelu => gelu_tanh(x),
    }
}

/// [`apply_epilogue`] on a contiguous run of C's row, columns `j0 .. j0 + row.len()`: the bias,
/// then the vectorised GELU over the run.
pub fn apply_epilogue_row(row: &mut [f32], j0: usize, epilogue: &Epilogue<'_>) {
    let n = row.len();
    if let Epilogue::Bias(b) | Epilogue::BiasGelu(b) = *epilogue {
        for (x, &bj) in row.iter_mut().zip(&b[j0..j0 + n]) {
            *x += bj;
        }
    }
    if matches!(epilogue, Epilogue::Gelu | Epilogue::BiasGelu(_)) {
        crate::elementwise::gelu::gelu_row_inplace(row);
    }
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    #[allow(clippy::excessive_precision)]
    const S: f32 = 0.797_884_56; // sqrt(2/pi)
    0.5 * x * (1.0 + (S * (x + 0.044715 * x * x * x)).tanh())
}

/// A batch of products: for `b in 0..batch`, `C_b = alpha·A_b·B_b + beta·C_b`, where operand
/// `X_b` is the view `X` shifted by `b · batch_stride_x` elements (a stride of 0 broadcasts).
///
/// When B is shared (`batch_stride_b == 0`) and the A and C batches follow each other row by
/// row, the batch is folded into M: one `batch·m × n` product. Otherwise, when the C batches
/// are disjoint, small products run in parallel over the batch.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched<TB: FloatElement>(
    batch: usize,
    a: MatRef<'_, f32>,
    batch_stride_a: usize,
    b: MatRef<'_, TB>,
    batch_stride_b: usize,
    c: MatMut<'_>,
    batch_stride_c: usize,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    gemm_batched_with_isa(
        Isa::best(),
        batch,
        a,
        batch_stride_a,
        b,
        batch_stride_b,
        c,
        batch_stride_c,
        opts,
    )
}

/// [`gemm_batched`] with the microkernel of `isa`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched_with_isa<TB: FloatElement>(
    isa: Isa,
    batch: usize,
    a: MatRef<'_, f32>,
    batch_stride_a: usize,
    b: MatRef<'_, TB>,
    batch_stride_b: usize,
    c: MatMut<'_>,
    batch_stride_c: usize,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    let MatMut {
        data,
        rows,
        cols,
        row_stride,
        col_stride,
    } = c;
    if batch == 0 {
        return Ok(());
    }
    for (name, len, stride) in [
        ("A", a.data.len(), batch_stride_a),
        ("B", b.data.len(), batch_stride_b),
        ("C", data.len(), batch_stride_c),
    ] {
        if (batch - 1).checked_mul(stride).is_none_or(|s| s > len) {
            return Err(Error::invalid(format!(
                "gemm_batched: batch {} of {name} starts outside its buffer",
                batch - 1
            )));
        }
    }
    // Fold the batch into M: A_b and C_b continue A_0 and C_0 row by row, B is shared.
    if batch > 1
        && batch_stride_b == 0
        && rows > 0
        && batch_stride_a == rows * a.row_stride
        && batch_stride_c == rows * row_stride
    {
        let af = MatRef {
            rows: batch * rows,
            ..a
        };
        let cf = MatMut {
            data,
            rows: batch * rows,
            cols,
            row_stride,
            col_stride,
        };
        return gemm_with_isa(isa, af, b, cf, opts);
    }
    let view = |bi: usize| {
        (
            MatRef {
                data: &a.data[bi * batch_stride_a..],
                ..a
            },
            MatRef {
                data: &b.data[bi * batch_stride_b..],
                ..b
            },
        )
    };
    let c_extent = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    };
    let flops = 2 * rows * cols * a.cols;
    if batch > 1
        && rayon::current_num_threads() > 1
        && batch_stride_c >= c_extent
        && c_extent > 0
        && flops < 64 * driver::PARALLEL_FLOPS
    {
        // Disjoint C batches: each chunk of `batch_stride_c` elements holds one C_b.
        use rayon::prelude::*;
        return data
            .par_chunks_mut(batch_stride_c)
            .take(batch)
            .enumerate()
            .try_for_each(|(bi, chunk)| {
                let (av, bv) = view(bi);
                let cv = MatMut {
                    data: chunk,
                    rows,
                    cols,
                    row_stride,
                    col_stride,
                };
                gemm_with_isa(isa, av, bv, cv, opts)
            });
    }
    for bi in 0..batch {
        let (av, bv) = view(bi);
        let cv = MatMut {
            data: &mut data[bi * batch_stride_c..],
            rows,
            cols,
            row_stride,
            col_stride,
        };
        gemm_with_isa(isa, av, bv, cv, opts)?;
    }
    Ok(())
}
