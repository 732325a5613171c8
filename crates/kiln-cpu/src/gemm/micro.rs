//! Register-blocked microkernels: `C_tile = alpha·(A_panel · B_panel) + beta·C_tile` for one
//! `MR × NR` tile over a packed depth of `kc`.
//!
//! Every microkernel has the same contract ([`MicroFn`]):
//! * `a`: a packed A micro-panel, `kc × MR` (`a[p·MR + i]`), at least `kc·MR` elements;
//! * `b`: a packed B micro-panel, `kc × NR` (`b[p·NR + j]`), at least `kc·NR` elements;
//! * `c`: the tile origin; row `i` is the `NR` contiguous elements at `c + i·rs_c`;
//! * the accumulator `acc[i][j] = Σ_p a[p·MR+i]·b[p·NR+j]` is summed in order of `p` with one
//!   fused multiply-add per step, then stored as `alpha·acc` (when `beta == 0`, C is not read)
//!   or `alpha·acc + beta·c`, with the two products rounded separately and then added. Every
//!   path (SIMD or the scalar tile update in the driver) uses that same rounding sequence, so a
//!   C element's value does not depend on which tile or thread computed it.
use super::Isa;

/// One microkernel (contract in the module comment).
///
/// # Safety
/// `c` must be valid for writes — and reads when `beta != 0` — of `MR` rows of `NR` contiguous
/// f32 at row stride `rs_c`, and no other thread may access those elements during the call.
pub type MicroFn =
    unsafe fn(kc: usize, a: &[f32], b: &[f32], c: *mut f32, rs_c: usize, alpha: f32, beta: f32);

/// The bottom `rows` (`1 ≤ rows < MR`) rows of two horizontally adjacent full-width tiles at
/// once: `a` an A micro-panel (packed `kc × MR` as for [`MicroFn`], rows past `rows` unread),
/// `b` the two B micro-panels one after the other (`2·kc·NR`), `c[t]` tile t's origin. Each
/// element gets exactly the [`MicroFn`] arithmetic (bitwise the same value).
///
/// # Safety
/// Each `c[t]` must be valid for writes — and reads when `beta != 0` — of `rows` rows of `NR`
/// contiguous f32 at row stride `rs_c`, not accessed by another thread during the call.
#[allow(clippy::too_many_arguments)]
pub type EdgeFn = unsafe fn(
    rows: usize,
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: [*mut f32; 2],
    rs_c: usize,
    alpha: f32,
    beta: f32,
);

/// [`MicroFn`] with B read in place from bf16 column-panel rows (`PanelMatrix<bf16>`): step `p`
/// widens the 32 elements at `b + 32·p` (the panel's slot order) itself. Bitwise the packed
/// kernel on the widened panel.
///
/// # Safety
/// As [`MicroFn`]; also `b .. b + 32·kc` must be readable.
/// The first `rows` rows of the tile (all `NR` columns, or with `half` the first `NR/2`) from the
/// same packed panels, into `c` as [`MicroFn`] writes them (bitwise those rows and columns of
/// the whole kernel's tile).
#[allow(clippy::too_many_arguments)]
pub type RowsFn = unsafe fn(
    rows: usize,
    half: bool,
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
);

pub type Bf16PanelMicroFn =
    unsafe fn(kc: usize, a: &[f32], b: *const u16, c: *mut f32, rs_c: usize, alpha: f32, beta: f32);

/// A microkernel and its register tile.
#[derive(Clone, Copy)]
pub struct Kernel {
    pub isa: Isa,
    pub mr: usize,
    pub nr: usize,
    pub micro: MicroFn,
    /// A kernel for the rows left under the last whole tile, where the ISA has one.
    pub edge: Option<EdgeFn>,
    /// The same microkernel reading bf16 column panels in place (`NR = 32`), where the ISA has
    /// one: the small-M path then skips packing them.
    pub bf16_panel: Option<Bf16PanelMicroFn>,
    /// The left `NR/2` columns of the tile from the same packed panels, where the ISA has it:
    /// for an edge panel of at most `NR/2` columns (bitwise those columns of `micro`'s tile).
    pub half: Option<MicroFn>,
    /// The first rows of the tile, where the ISA has it: for the rows under the last whole tile
    /// when there is no [`Kernel::edge`] for them.
    pub rows: Option<RowsFn>,
}

/// Largest `MR·NR` of any kernel (the driver's edge-tile buffer).
pub const MAX_TILE: usize = 12 * 32;

impl Kernel {
    /// The microkernel of `isa`, or `None` when this CPU cannot run it.
    pub fn for_isa(isa: Isa) -> Option<Kernel> {
        if !isa.is_available() {
            return None;
        }
        Some(match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Kernel {
                isa,
                mr: super::avx512::MR,
                nr: super::avx512::NR,
                micro: super::avx512::microkernel_avx512,
                edge: None,
                bf16_panel: Some(super::avx512::microkernel_avx512_bf16_panel),
                half: Some(super::avx512::microkernel_avx512_half),
                rows: Some(super::avx512::microkernel_avx512_rows),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Kernel {
                isa,
                mr: super::avx2::MR,
                nr: super::avx2::NR,
                micro: super::avx2::microkernel_avx2,
                edge: Some(super::avx2::edge_avx2),
                bf16_panel: None,
                half: None,
                rows: None,
            },
            Isa::Portable => Kernel {
                isa,
                mr: PORTABLE_MR,
                nr: PORTABLE_NR,
                micro: microkernel_portable,
                edge: None,
                bf16_panel: None,
                half: None,
                rows: None,
            },
            #[allow(unreachable_patterns)]
            _ => Kernel {
                isa: Isa::Scalar,
                mr: SCALAR_MR,
                nr: SCALAR_NR,
                micro: microkernel_scalar,
                edge: None,
                bf16_panel: None,
                half: None,
                rows: None,
            },
        })
    }
}

/// Rounding sequence of the tile update, shared by every kernel's scalar code.
#[inline(always)]
pub fn update(acc: f32, c: f32, alpha: f32, beta: f32) -> f32 {
    if beta == 0.0 {
        alpha * acc
    } else {
        alpha * acc + beta * c
    }
}

pub const SCALAR_MR: usize = 4;
pub const SCALAR_NR: usize = 4;

/// The scalar reference microkernel, 4 × 4, in plain Rust.
///
/// # Safety
/// See [`MicroFn`].
pub unsafe fn microkernel_scalar(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    const MR: usize = SCALAR_MR;
    const NR: usize = SCALAR_NR;
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] += ap[i] * bp[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            // SAFETY: (i, j) is inside the MR × NR tile the caller vouches for.
            unsafe {
                let p = c.add(i * rs_c + j);
                *p = update(v, if beta == 0.0 { 0.0 } else { *p }, alpha, beta);
            }
        }
    }
}

pub const PORTABLE_MR: usize = 6;
pub const PORTABLE_NR: usize = 16;

/// The portable microkernel, 6 × 16, on `wide::f32x8` (SSE/AVX/NEON as compiled, no run-time
/// detection needed).
///
/// # Safety
/// See [`MicroFn`].
pub unsafe fn microkernel_portable(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    rs_c: usize,
    alpha: f32,
    beta: f32,
) {
    use wide::f32x8;
    const MR: usize = PORTABLE_MR;
    let load = |s: &[f32]| f32x8::new(s[..8].try_into().expect("8 lanes"));
    let mut acc = [[f32x8::ZERO; 2]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(16)).take(kc) {
        let b0 = load(&bp[..8]);
        let b1 = load(&bp[8..]);
        for i in 0..MR {
            let ai = f32x8::splat(ap[i]);
            acc[i][0] = ai.mul_add(b0, acc[i][0]);
            acc[i][1] = ai.mul_add(b1, acc[i][1]);
        }
    }
    let va = f32x8::splat(alpha);
    let vb = f32x8::splat(beta);
    for (i, row) in acc.iter().enumerate() {
        for (h, v) in row.iter().enumerate() {
            // SAFETY: the 8 elements at (i, 8h) are inside the tile the caller vouches for.
            unsafe {
                let p = c.add(i * rs_c + 8 * h) as *mut [f32; 8];
                let out = if beta == 0.0 {
                    va * *v
                } else {
                    va * *v + vb * f32x8::new(p.read_unaligned())
                };
                p.write_unaligned(out.to_array());
            }
        }
    }
}
