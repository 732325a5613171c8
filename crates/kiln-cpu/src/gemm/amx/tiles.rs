//! The AMX microkernel (inline `asm!`), its bit-for-bit software twin, and the peak probe.
//!
//! Tile palette 1, all eight tiles configured as 16 rows × 64 bytes:
//!
//! | tile | holds | layout |
//! |---|---|---|
//! | tmm0..tmm3 | C, a 2×2 grid of 16×16 f32 blocks (32×32 outputs) | row = 16 f32 |
//! | tmm4, tmm5 | A rows 0..16 and 16..32, 32 k each | row = 32 bf16 (k) |
//! | tmm6, tmm7 | B columns 0..16 and 16..32, 32 k each | row r = 16 pairs `(B[2r][j], B[2r+1][j])` |
//!
//! `tdpbf16ps C, A, B` computes, for each of the 16×16 outputs,
//! `C[m][n] += Σ_{r<16} A[m][2r]·B[2r][n] + A[m][2r+1]·B[2r+1][n]`, the products exact in f32
//! (bf16 has an 8-bit significand) and the sums in f32 (round to nearest even, denormals flushed).
//!
//! Packed operands are sequences of 64-byte [`Line`]s (one tile row each); one k-step of a
//! 32-row A panel or a 32-column B panel is 32 lines (2 KiB: tile 0's 16 rows, then tile 1's).
use super::detect::amx_support;
use bytemuck::{Pod, Zeroable};

/// One tile row: 64 bytes, 64-byte aligned (32 bf16, or 16 f32 reinterpreted).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub(crate) struct Line(pub [u16; 32]);

impl Line {
    pub const ZERO: Line = Line([0; 32]);
}

/// Lines per k-step of a packed 32-row (A) or 32-column (B) panel.
pub(crate) const LINES_PER_KSTEP: usize = 32;

/// The microkernel used to multiply packed panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileKernel {
    /// The AMX tile unit (`tdpbf16ps`); needs [`super::amx_available`].
    Amx,
    /// `vdpbf16ps` on zmm registers (AVX512-BF16 without AMX, e.g. AMD Zen 4/5): the same
    /// packed panels, two k per instruction (see `dot.rs`); needs [`super::bf16_dot_available`].
    Avx512Bf16,
    /// A safe software model of the same tile operations, in the same order. Runs anywhere
    /// (slowly): it lets the packing, blocking, edge and epilogue code be tested on machines
    /// without AMX, and is the reference the AMX kernel is checked against where AMX exists.
    Emulated,
}

/// The 64-byte operand of `ldtilecfg`.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Palette 1, tiles 0..8 all 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
static TILE_CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Tile configuration for the current thread, released on drop (also on unwinding).
///
/// Each task that runs [`kernel_32x32`] holds one; nothing else may use the tiles on this thread
/// while it lives (the task body makes no rayon calls, so no other task interleaves).
pub(crate) struct TileSession {
    kernel: TileKernel,
    /// Not `Send`/`Sync`: the configuration belongs to the thread that made it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl TileSession {
    /// Configures the tiles when `kernel` is [`TileKernel::Amx`] (which the caller has checked
    /// to be available); a no-op for the emulated kernel.
    pub fn begin(kernel: TileKernel) -> TileSession {
        #[cfg(target_arch = "x86_64")]
        if kernel == TileKernel::Amx {
            assert!(amx_support().available, "AMX tile session without AMX");
            // SAFETY: AMX-TILE is present, the OS enabled and granted the tile state (checked
            // just above); `TILE_CONFIG` is a valid 64-byte palette-1 configuration that lives
            // for the whole program.
            unsafe {
                std::arch::asm!(
                    "ldtilecfg [{cfg}]",
                    cfg = in(reg) &TILE_CONFIG as *const TileConfig,
                    options(nostack, readonly, preserves_flags),
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = amx_support;
        TileSession {
            kernel,
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == TileKernel::Amx {
            // SAFETY: tiles were configured by `begin` on this thread (a session is never sent
            // to another thread: it is created and dropped inside one task); `tilerelease`
            // returns the tile state to its initial state and touches no memory.
            unsafe {
                std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
            }
        }
    }
}

/// One 32×32 block of C over `ksteps` k-steps of 32:
/// `C[0..32][0..32] = (accumulate ? C : 0) + A_panel · B_panel`.
///
/// * `a`: `ksteps·32` lines of a packed A panel (see the module doc);
/// * `b`: `ksteps·32` lines of a packed B panel, or with `panel_rows` (only for kernels whose
///   [`TileKernel::reads_panels`] is true) `ksteps·32` rows of a bf16 column panel
///   ([`crate::gemm::PanelMatrix`], one 64-byte line per row) — bitwise the result of packing
///   those rows ([`super::pack`]) first;
/// * `c`: f32, row `i` at `c[i·ldc .. i·ldc + 32]`, so `c.len() ≥ 31·ldc + 32`.
///
/// The session's kernel runs it; an AMX session has configured the tiles on this thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kernel_32x32(
    session: &TileSession,
    a: &[Line],
    b: &[Line],
    panel_rows: bool,
    ksteps: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let need = ksteps * LINES_PER_KSTEP;
    assert!(a.len() >= need && b.len() >= need && ldc >= 32 && c.len() >= 31 * ldc + 32);
    match session.kernel {
        TileKernel::Emulated if panel_rows => {
            // The model: pack each k-step's 32 panel rows, then the packed kernel.
            let mut lines = [Line::ZERO; LINES_PER_KSTEP];
            for s in 0..ksteps {
                let rows: &[u16] = bytemuck::cast_slice(&b[s * LINES_PER_KSTEP..][..32]);
                super::pack::pack_b_from_panel(rows, 32, &mut lines, super::PackKernel::Scalar);
                let a_step = &a[s * LINES_PER_KSTEP..];
                emulated_32x32(a_step, &lines, 1, c, ldc, accumulate || s > 0);
            }
            if ksteps == 0 {
                emulated_32x32(a, b, 0, c, ldc, accumulate);
            }
        }
        TileKernel::Emulated => emulated_32x32(a, b, ksteps, c, ldc, accumulate),
        TileKernel::Avx512Bf16 => {
            assert!(
                super::dot::available(),
                "AVX512-BF16 kernel without AVX512-BF16"
            );
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX512-BF16/F/BW are present (asserted); the operand lengths are asserted
            // above, which is the kernel's whole contract.
            unsafe {
                if panel_rows {
                    super::dot::dpbf16_32x32::<true>(a, b, ksteps, c, ldc, accumulate)
                } else {
                    super::dot::dpbf16_32x32::<false>(a, b, ksteps, c, ldc, accumulate)
                }
            };
        }
        TileKernel::Amx if panel_rows => panic!("AMX tiles read packed B only"),
        TileKernel::Amx => {
            if ksteps == 0 {
                if !accumulate {
                    for row in c.chunks_mut(ldc).take(32) {
                        row[..32].fill(0.0);
                    }
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            // The session configured tiles 0..8 as 16×64 B on this thread (AMX present); `a`
            // and `b` hold `ksteps·32` lines each and `c` 32 rows at `ldc` (asserted above).
            // SAFETY: the loop reads lines [0, ksteps·32) of a and b (64-byte stride) and the
            // C tiles rows 0..32 of 32 f32 at stride `ldc`, all inside them; `ksteps ≥ 1`.
            unsafe {
                amx_32x32(
                    a.as_ptr(),
                    b.as_ptr(),
                    ksteps,
                    c.as_mut_ptr(),
                    ldc * 4,
                    accumulate,
                )
            };
        }
    }
}

impl TileKernel {
    /// Whether [`kernel_32x32`] takes B straight from column panels (`panel_rows`): the
    /// AVX512-BF16 kernel and the software model; AMX tiles need the packed layout.
    pub(crate) fn reads_panels(self) -> bool {
        matches!(self, TileKernel::Avx512Bf16 | TileKernel::Emulated)
    }
}

/// The AMX loop. Per k-step: load A tiles (tmm4, tmm5) and B tiles (tmm6, tmm7), then four
/// `tdpbf16ps` into the C tiles tmm0..tmm3 (C00 = A0·B0, C01 = A0·B1, C10 = A1·B0, C11 = A1·B1).
///
/// # Safety
/// Tiles configured with `TILE_CONFIG` on this thread; `a`, `b` valid for `ksteps·2048` bytes;
/// `c` valid for 32 rows of 128 bytes at stride `ldc_bytes`; `ksteps ≥ 1`.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
unsafe fn amx_32x32(
    a: *const Line,
    b: *const Line,
    ksteps: usize,
    c: *mut f32,
    ldc_bytes: usize,
    accumulate: bool,
) {
    // SAFETY: `c + 16 rows` stays inside the C block the caller vouches for.
    let c1 = unsafe { c.byte_add(16 * ldc_bytes) };
    // SAFETY: see the function's contract; all tile registers are used only inside this block.
    unsafe {
        std::arch::asm!(
            "test {acc}, {acc}",
            "jz 2f",
            "tileloadd tmm0, [{c0} + {ldc}*1]",
            "tileloadd tmm1, [{c0} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{c1} + {ldc}*1]",
            "tileloadd tmm3, [{c1} + {ldc}*1 + 64]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "3:",
            "tileloadd tmm4, [{a} + {s64}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
            "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {n}",
            "jnz 3b",
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c0} + {ldc}*1 + 64], tmm1",
            "tilestored [{c1} + {ldc}*1], tmm2",
            "tilestored [{c1} + {ldc}*1 + 64], tmm3",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            n = inout(reg) ksteps => _,
            c0 = in(reg) c,
            c1 = in(reg) c1,
            ldc = in(reg) ldc_bytes,
            s64 = in(reg) 64usize,
            acc = in(reg) accumulate as usize,
            options(nostack),
        );
    }
}

/// The software model of [`amx_32x32`]: same operands, same per-element summation order
/// (k = 0, 1, …, 31 within a k-step, k-steps in order), f32 arithmetic. Differs from the
/// hardware only on denormals, which the hardware flushes to zero.
fn emulated_32x32(
    a: &[Line],
    b: &[Line],
    ksteps: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let widen = |x: u16| f32::from_bits((x as u32) << 16);
    let mut acc = [[0f32; 32]; 32];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(&c[i * ldc..i * ldc + 32]);
        }
    }
    let mut af = [[0f32; 32]; 32]; // [row m][k]
    let mut bf = [[0f32; 32]; 32]; // [k][column n]
    for s in 0..ksteps {
        let at = &a[s * LINES_PER_KSTEP..(s + 1) * LINES_PER_KSTEP];
        let bt = &b[s * LINES_PER_KSTEP..(s + 1) * LINES_PER_KSTEP];
        for (m, row) in af.iter_mut().enumerate() {
            for (kk, v) in row.iter_mut().enumerate() {
                *v = widen(at[m].0[kk]);
            }
        }
        for (t, tile) in bt.chunks_exact(16).enumerate() {
            for (r, line) in tile.iter().enumerate() {
                for nn in 0..16 {
                    bf[2 * r][16 * t + nn] = widen(line.0[2 * nn]);
                    bf[2 * r + 1][16 * t + nn] = widen(line.0[2 * nn + 1]);
                }
            }
        }
        for (arow, crow) in af.iter().zip(acc.iter_mut()) {
            for (&av, brow) in arow.iter().zip(bf.iter()) {
                for (cv, &bv) in crow.iter_mut().zip(brow.iter()) {
                    *cv += av * bv;
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        c[i * ldc..i * ldc + 32].copy_from_slice(row);
    }
}

/// `tdpbf16ps` throughput of one core in GFLOP/s (16·16·32·2 flops per instruction), measured
/// on the calling thread with six independent accumulator tiles so latency is hidden; the best
/// of several timed runs. `None` without AMX.
pub(crate) fn peak_gflops_one_core() -> Option<f64> {
    if !amx_support().available {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        const ITERS: usize = 1 << 15;
        const FLOPS_PER_ITER: f64 = 6.0 * 16.0 * 16.0 * 32.0 * 2.0;
        let run = || {
            let t = std::time::Instant::now();
            // SAFETY: AMX is available (checked above); the block configures the tiles,
            // uses them only inside itself and releases them; the only memory it reads is the
            // static 64-byte configuration.
            unsafe {
                std::arch::asm!(
                    "ldtilecfg [{cfg}]",
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "tilezero tmm4",
                    "tilezero tmm5",
                    "tilezero tmm6",
                    "tilezero tmm7",
                    "2:",
                    "tdpbf16ps tmm0, tmm6, tmm7",
                    "tdpbf16ps tmm1, tmm6, tmm7",
                    "tdpbf16ps tmm2, tmm6, tmm7",
                    "tdpbf16ps tmm3, tmm6, tmm7",
                    "tdpbf16ps tmm4, tmm6, tmm7",
                    "tdpbf16ps tmm5, tmm6, tmm7",
                    "dec {n}",
                    "jnz 2b",
                    "tilerelease",
                    cfg = in(reg) &TILE_CONFIG as *const TileConfig,
                    n = inout(reg) ITERS => _,
                    options(nostack, readonly),
                );
            }
            t.elapsed().as_secs_f64()
        };
        run(); // warm-up (power licence, first-use state allocation)
        let best = (0..15).map(|_| run()).fold(f64::INFINITY, f64::min);
        Some(ITERS as f64 * FLOPS_PER_ITER / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}
