//! Sub-pixel decomposition of [`super::scatter`] (transposed-conv forward, conv input
//! gradient) for dilation 1: one implicit-GEMM correlation per output phase, no `col2im`.
//!
//! Along one axis (stride `s`, kernel `k`, padding `p`) image row `Y` receives patch row `oy`
//! through tap `ki` when `Y = oy·s − p + ki`. Write `Y + p = s·q + r` (`0 ≤ r < s`): the taps
//! that reach `Y` are `ki = r + s·t` (`t < T_r = ⌈(k − r)/s⌉`), each from patch row `oy = q − t`.
//! So the image rows of one **phase** `r` (every `s`-th row) are a plain stride-1 correlation of
//! the patch side with the `T_r` taps of that phase, reversed (`u = T_r − 1 − t`):
//!
//! ```text
//! big[Y = s·q + r − p] = Σ_u Σ_c W[c, ki = r + s·(T_r − 1 − u)] · small[c, q − (T_r − 1) + u]
//! ```
//!
//! In two dimensions the `sh·sw` phases `(ry, rx)` are independent GEMMs
//! `out_(ry,rx) [Cb/G, n·Ly·Lx] = W_(ry,rx) [Cb/G, Cs/G·Ty·Tx] · im2col(small)`, the weights of
//! every phase packed straight into the microkernel's panels in one pass per block of patch
//! channels ([`pack_phase_weights`]) and the patch matrix gathered panel by panel from the
//! padded patch side (implicit GEMM, as [`super::correlate`]). Stride 1 is one phase: the
//! correlation with the reversed kernel. Together they do exactly the
//! multiply-adds of `W_gᵀ · small` followed by `col2im` — nothing of the zero-inserted input —
//! but each image element is written once, by one dot product, instead of being scatter-added
//! from `kh·kw/(sh·sw)` rows of a stored patch matrix.
use super::implicit::{PatchTables, Patches};
use super::{with_scratch, ConvGeometry};
use crate::gemm::{
    blocked_c_supported, gemm_sources, gemm_sources_blocked, APanelSource, BlockedMatMut,
    GemmOptions, Isa, MatMut,
};
use kiln_tensor::{Error, Result};
use rayon::prelude::*;

/// The image rows (or columns) of one phase `r` along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Phase {
    /// `r`: the taps of the phase are `r + s·t`.
    r: usize,
    /// First image row of the phase (`s·q_min + r − p`); the phase is rows `first + s·i`.
    first: usize,
    /// Rows of the phase (0 when the image is shorter than its first row).
    len: usize,
    /// Taps of the phase, `T_r`.
    taps: usize,
    /// Patch row read by phase row 0 through tap `u = 0`: `q_min − (T_r − 1)` (negative reads
    /// fall in the padding).
    lo: isize,
}

/// The `s` phases of one axis: image length `big`, stride `s`, kernel `k`, padding `p`.
fn phases(big: usize, k: usize, s: usize, p: usize) -> Vec<Phase> {
    (0..s)
        .map(|r| {
            let taps = if r < k { (k - r).div_ceil(s) } else { 0 };
            // The first q with s·q + r − p ≥ 0.
            let q_min = if p >= r { (p - r).div_ceil(s) } else { 0 };
            let first = s * q_min + r - p;
            let len = if first < big {
                (big - 1 - first) / s + 1
            } else {
                0
            };
            Phase {
                r,
                first,
                len,
                taps,
                lo: q_min as isize - taps as isize + 1,
            }
        })
        .collect()
}

/// Zero rows to write before and after the patch side (length `small`) so that every phase's
/// reads are in bounds.
fn padding(phases: &[Phase], small: usize) -> (usize, usize) {
    let mut before = 0;
    let mut after = 0;
    for ph in phases.iter().filter(|ph| ph.len > 0 && ph.taps > 0) {
        before = before.max((-ph.lo).max(0) as usize);
        // Last read: phase row len − 1, tap taps − 1.
        let last = ph.lo + (ph.len + ph.taps) as isize - 2;
        after = after.max((last - small as isize + 1).max(0) as usize);
    }
    (before, after)
}

/// Whether [`scatter`] takes `g` (the caller has handled the dense and depthwise shapes). It
/// needs dilation 1 and taps that overlap (not a 1×1 kernel at stride 1, where col2im is a plain
/// copy and the phase is the whole image: the direct product wins, 7.8 against 11.4 ms for
/// `64 → 64` on 32 × 32). Then the choice is between two GEMM shapes: the phases' `Cb/G` rows
/// deep `Cs/G·kh·kw/(sh·sw)`, each gathered patch panel used by `Cb/G` rows only, against
/// `W_gᵀ·small`'s `Cb/G·kh·kw` rows deep `Cs/G` plus the col2im. Measured on a Zen 3 core,
/// forward, phases / col2im time: with at least 64 image channels per group the phases win or
/// tie (G2–G4 of DCGAN 0.93–0.96, `512 → 64` on 8 × 8 0.99); with 16–32 they win while the patch
/// side has at most twice the image side's channels (`64 → 32` 0.94, `32 → 16` 0.94, k3 s1
/// `16 → 16` 0.65) and lose beyond (`64 → 16` 1.12, `128 → 24` 1.05, `256 → 32` 1.07, k3 s1
/// `64 → 16` 1.14); with fewer than 16 they lose by 30–60 % (`64 → 8`, `64 → 3`). Stride 1 is one
/// phase, the correlation with the reversed kernel.
pub(super) fn applies(g: &ConvGeometry) -> bool {
    let pointwise = g.kernel == [1, 1] && g.stride == [1, 1];
    let (cbg, csg) = (g.cbg(), g.csg());
    g.dilation == [1, 1] && !pointwise && cbg >= 16 && (cbg >= 64 || csg <= 2 * cbg)
}

/// Where a phase product lies in the chunk output: image `n`, channel `o` starts at
/// `at + n·image + o·channel` (its `Ly·Lx` pixels consecutive).
struct PhaseOut {
    at: usize,
    image: usize,
    channel: usize,
    /// Written by the GEMM as column blocks (`[nbc, Cb, Ly·Lx]`).
    blocked: bool,
}

/// One phase pair `(ry, rx)`: its product has `Ly·Lx` pixels per image and depth `Cs/G·Ty·Tx`.
struct Class {
    y: Phase,
    x: Phase,
}

/// `big = col2im(W_gᵀ · small)` by phases (see the module docs). Shapes as [`super::scatter`].
pub(super) fn scatter(g: &ConvGeometry, small: &[f32], w: &[f32], big: &mut [f32]) -> Result<()> {
    let [cb, hb, wb] = g.big;
    let [cs, hs, ws] = g.small;
    let (cbg, csg, groups) = (g.cbg(), g.csg(), g.groups);
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let rows = phases(hb, kh, sh, g.padding[0]);
    let cols = phases(wb, kw, sw, g.padding[1]);
    let (top, bottom) = padding(&rows, hs);
    let (left, right) = padding(&cols, ws);
    let (hp, wp) = (top + hs + bottom, left + ws + right);
    let plane = hp * wp;

    // The phases with image rows, and each one's weights [G, Cb/G, Cs/G·Ty·Tx]:
    // W_(ry,rx)[g, o, (c, u, v)] = W[g·Csg + c, o, ry + sh·(Ty−1−u), rx + sw·(Tx−1−v)].
    let mut classes = Vec::new();
    // Image pixels no phase product writes (a phase without taps: kernel shorter than the stride).
    let mut untouched = false;
    for y in rows.iter().filter(|p| p.len > 0) {
        for x in cols.iter().filter(|p| p.len > 0) {
            if y.taps == 0 || x.taps == 0 {
                untouched = true;
                continue;
            }
            classes.push(Class { y: *y, x: *x });
        }
    }

    // Images per chunk: the smallest phase product at least CHUNK_MIN_COLS columns wide, the
    // chunk's output (its phase products, before they are spread) at most OUT_CAP elements.
    const CHUNK_MIN_COLS: usize = 4096;
    const OUT_CAP: usize = 1 << 22;
    let min_pixels = classes.iter().map(|c| c.y.len * c.x.len).min().unwrap_or(1);
    let per_image = cb * hb * wb;
    let nb = CHUNK_MIN_COLS
        .div_ceil(min_pixels)
        .min((OUT_CAP / per_image).max(1))
        .clamp(1, g.batch.max(1));
    let xp_len = if [hp, wp] == [hs, ws] {
        0
    } else {
        nb * cs * plane
    };
    let out_len = nb * per_image;

    if classes.is_empty() {
        big.fill(0.0);
        return Ok(());
    }
    // For each phase, the kernel tap of each (u, v) in order.
    let tap_of: Vec<Vec<usize>> = classes
        .iter()
        .map(|cl| {
            let (ty, tx) = (cl.y.taps, cl.x.taps);
            (0..ty * tx)
                .map(|t| {
                    let (u, v) = (t / tx, t % tx);
                    (cl.y.r + sh * (ty - 1 - u)) * kw + cl.x.r + sw * (tx - 1 - v)
                })
                .collect()
        })
        .collect();
    // Patch channels per block: one depth cut of the GEMM for these phase products.
    let max_taps = classes
        .iter()
        .map(|c| c.y.taps * c.x.taps)
        .max()
        .unwrap_or(1);
    let blocking = Isa::best().blocking();
    let kc = blocking
        .single_block(cbg, csg * max_taps)
        .unwrap_or_else(|| blocking.for_depth(csg * max_taps))
        .kc;
    let block = (kc / max_taps).clamp(1, csg);
    // The packed weights of one channel block, every phase: panels of the microkernel's rows.
    let mr = Isa::best().tile().0;
    let panels = cbg.div_ceil(mr);
    let taps_total: usize = classes.iter().map(|c| c.y.taps * c.x.taps).sum();
    let wpack_len = panels * mr * block * taps_total;
    big.par_chunks_mut(nb * per_image)
        .zip(small.par_chunks(nb * cs * hs * ws))
        .try_for_each(|(xs, ys)| {
            let nbc = ys.len() / (cs * hs * ws);
            with_scratch(xp_len + out_len + wpack_len, |scratch| -> Result<()> {
                let (xp, rest) = scratch.split_at_mut(xp_len);
                let (out, wpack) = rest.split_at_mut(out_len);
                // The patch side itself when no phase reads outside it, else a padded copy.
                let xp: &[f32] = if [hp, wp] == [hs, ws] {
                    ys
                } else {
                    let xp = &mut xp[..nbc * cs * plane];
                    fill_padded(ys, [hs, ws], [top, left], [hp, wp], xp);
                    xp
                };
                // Phase products one after the other, each `[nbc, Cb, Ly·Lx]` (straight
                // from the GEMM where it takes column blocks of Ly·Lx) or `[Cb, nbc·Ly·Lx]`.
                let mut at = 0;
                let mut starts = Vec::with_capacity(classes.len());
                for cl in &classes {
                    let pixels = cl.y.len * cl.x.len;
                    let n = nbc * pixels;
                    starts.push(if nbc > 1 && blocked_c_supported(pixels) {
                        PhaseOut {
                            at,
                            image: cb * pixels,
                            channel: pixels,
                            blocked: true,
                        }
                    } else {
                        PhaseOut {
                            at,
                            image: pixels,
                            channel: n,
                            blocked: false,
                        }
                    });
                    at += cb * n;
                }
                // Patch channels in blocks of one GEMM depth cut, every phase for one block
                // before the next (C accumulates over the blocks, β = 1 after the first):
                // the block's weights and patch planes are then read from memory once for
                // all the phases instead of once per phase. Each block is one cut of the
                // whole-depth product, so the sums are those of one call.
                for c0 in (0..csg).step_by(block) {
                    let chans = block.min(csg - c0);
                    let opts = GemmOptions {
                        beta: if c0 == 0 { 0.0 } else { 1.0 },
                        ..Default::default()
                    };
                    for grp in 0..groups {
                        let wpk = &mut wpack[..panels * mr * chans * taps_total];
                        pack_phase_weights(
                            &w[(grp * csg + c0) * cbg * kh * kw..],
                            cbg,
                            chans,
                            kh * kw,
                            &tap_of,
                            mr,
                            wpk,
                        );
                        let mut w_at = 0;
                        for ((cl, taps), st) in classes.iter().zip(&tap_of).zip(&starts) {
                            let (pixels, n) = (cl.y.len * cl.x.len, nbc * cl.y.len * cl.x.len);
                            let depth = chans * taps.len();
                            let a = PackedPhase {
                                data: &wpk[w_at..][..panels * mr * depth],
                                rows: cbg,
                                cols: depth,
                                mr,
                            };
                            w_at += panels * mr * depth;
                            let tables =
                                phase_tables(cl, chans, [top, left], [hp, wp], cs * plane, nbc);
                            let b = Patches {
                                xp: &xp[(grp * csg + c0) * plane..],
                                tables: &tables,
                            };
                            if st.blocked {
                                let c = BlockedMatMut {
                                    data: &mut out[st.at + grp * cbg * pixels..st.at + cb * n],
                                    rows: cbg,
                                    cols: n,
                                    row_stride: pixels,
                                    block: pixels,
                                    block_stride: cb * pixels,
                                };
                                if !gemm_sources_blocked(&a, &b, c, &opts)? {
                                    return Err(Error::invalid(
                                        "conv: the GEMM refused column blocks it said it takes",
                                    ));
                                }
                            } else {
                                let c = &mut out[st.at + grp * cbg * n..][..cbg * n];
                                gemm_sources(&a, &b, MatMut::row_major(c, cbg, n), &opts)?;
                            }
                        }
                    }
                }
                let out = &out[..at];
                // Spread the phase products into the images, one image per task.
                xs.par_chunks_mut(per_image)
                    .enumerate()
                    .for_each(|(img, x)| {
                        if untouched {
                            x.fill(0.0);
                        }
                        spread_image(g, &classes, &starts, out, img, x);
                    });
                Ok(())
            })
        })
}

/// Writes image `img` of the chunk's phase products `out` (phase `i` where `starts[i]` says)
/// into its place `x` `[Cb, Hb, Wb]`: phase `(ry, rx)` row `i`, column `j`
/// is image pixel `(first_y + sh·i, first_x + sw·j)`. With stride 2 along the width the two
/// phases of a row are interleaved in one pass; otherwise each phase is a strided copy.
#[allow(clippy::too_many_arguments)]
fn spread_image(
    g: &ConvGeometry,
    classes: &[Class],
    starts: &[PhaseOut],
    out: &[f32],
    img: usize,
    x: &mut [f32],
) {
    let [cb, hb, wb] = g.big;
    let [sh, sw] = g.stride;
    let phase_rows = |k: usize, o: usize| {
        let (ly, lx) = (classes[k].y.len, classes[k].x.len);
        let s = &starts[k];
        out[s.at + img * s.image + o * s.channel..][..ly * lx].chunks_exact(lx)
    };
    let mut k = 0;
    while k < classes.len() {
        let cl = &classes[k];
        // The even and odd columns of the same rows, from two consecutive phases.
        // (Phase r of the width starts at column 0 or 1 depending on the padding, so the
        // even columns may come from either of the two.)
        let pair = sw == 2
            && k + 1 < classes.len()
            && classes[k + 1].y == cl.y
            && cl.x.first + classes[k + 1].x.first == 1;
        let (ke, ko) = if cl.x.first == 0 {
            (k, k + 1)
        } else {
            (k + 1, k)
        };
        for o in 0..cb {
            let dst = &mut x[o * hb * wb..][..hb * wb];
            if pair {
                for (i, (even, odd)) in phase_rows(ke, o).zip(phase_rows(ko, o)).enumerate() {
                    let y = cl.y.first + sh * i;
                    interleave2(&mut dst[y * wb..][..wb], even, odd);
                }
            } else {
                for (i, row) in phase_rows(k, o).enumerate() {
                    let y = cl.y.first + sh * i;
                    let d = &mut dst[y * wb + cl.x.first..];
                    if sw == 1 {
                        d[..row.len()].copy_from_slice(row);
                    } else {
                        for (d, v) in d.iter_mut().step_by(sw).zip(row) {
                            *d = *v;
                        }
                    }
                }
            }
        }
        k += if pair { 2 } else { 1 };
    }
}

/// `dst[2j] = even[j]`, `dst[2j + 1] = odd[j]` (`dst` is `even` and `odd` together; `even` may
/// be one longer).
fn interleave2(dst: &mut [f32], even: &[f32], odd: &[f32]) {
    // Four pairs at a time as fixed arrays (one unpack-low/high and two stores), then the rest.
    let quads = odd.len() / 4;
    for ((d, e), o) in dst
        .chunks_exact_mut(8)
        .zip(even.chunks_exact(4))
        .zip(odd.chunks_exact(4))
    {
        let d: &mut [f32; 8] = d.try_into().expect("chunks of 8");
        *d = [e[0], o[0], e[1], o[1], e[2], o[2], e[3], o[3]];
    }
    for j in 4 * quads..odd.len() {
        dst[2 * j] = even[j];
        dst[2 * j + 1] = odd[j];
    }
    if even.len() > odd.len() {
        dst[2 * odd.len()] = even[odd.len()];
    }
}

/// Packs the weights of every phase for one group and one block of `chans` patch channels in
/// one pass over the stored weight, each phase as the GEMM's A `[Cb/G, chans·Ty·Tx]` in the
/// microkernel's panel layout (`⌈Cb/G / mr⌉` panels of `mr × depth`, depth `(c, u, v)`):
///
/// ```text
/// A_(ry,rx)[o, (c, u, v)] = W[g·Csg + c0 + c, o, ry + sh·(Ty−1−u), rx + sw·(Tx−1−v)]
/// ```
///
/// `w` starts at the block's first channel (`[chans, Cb/G, kh·kw]`), `taps[q]` lists phase `q`'s
/// kernel taps in `(u, v)` order, and phase `q`'s panels follow phase `q − 1`'s in `dst`. Each
/// `(c, o)` row of `kh·kw` taps (one cache line for a 4 × 4 kernel) is read once for all
/// phases; packing each phase by itself read every weight line once per phase.
#[allow(clippy::too_many_arguments)]
fn pack_phase_weights(
    w: &[f32],
    cbg: usize,
    chans: usize,
    kk: usize,
    taps: &[Vec<usize>],
    mr: usize,
    dst: &mut [f32],
) {
    let panels = cbg.div_ceil(mr);
    // Each panel of each phase, grouped by panel so that a task owns one panel of every phase.
    let mut by_panel: Vec<Vec<&mut [f32]>> = (0..panels).map(|_| Vec::new()).collect();
    let mut rest = dst;
    for t in taps {
        let (region, tail) = std::mem::take(&mut rest).split_at_mut(panels * mr * chans * t.len());
        rest = tail;
        for (ip, panel) in region.chunks_exact_mut(mr * chans * t.len()).enumerate() {
            by_panel[ip].push(panel);
        }
    }
    // Rows past Cb/G are zeros.
    if let Some(last) = by_panel.last_mut().filter(|_| !cbg.is_multiple_of(mr)) {
        last.iter_mut().for_each(|p| p.fill(0.0));
    }
    // A task per range of panels; channel by channel, its rows of one channel are consecutive
    // weights (read in order), written as one run of T·mr per phase and panel.
    let per_task = panels.div_ceil(2 * rayon::current_num_threads()).max(4);
    by_panel
        .par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(ti, task_panels)| {
            let p0 = ti * per_task;
            let rows = (cbg - p0 * mr).min(task_panels.len() * mr);
            for c in 0..chans {
                let src = &w[(c * cbg + p0 * mr) * kk..][..rows * kk];
                for (phase_panels, panel_rows) in task_panels.iter_mut().zip(src.chunks(mr * kk)) {
                    for (panel, t) in phase_panels.iter_mut().zip(taps) {
                        // Depth (c, j) of row i: panel[(c·T + j)·mr + i].
                        let run = &mut panel[c * t.len() * mr..][..t.len() * mr];
                        match mr {
                            6 if panel_rows.len() == 6 * kk => {
                                gather_run::<6>(panel_rows, kk, t, run)
                            }
                            12 if panel_rows.len() == 12 * kk => {
                                gather_run::<12>(panel_rows, kk, t, run)
                            }
                            _ => {
                                for (i, row_taps) in panel_rows.chunks_exact(kk).enumerate() {
                                    for (j, &tap) in t.iter().enumerate() {
                                        run[j * mr + i] = row_taps[tap];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// `run[j·MR + i] = rows[i·kk + taps[j]]`: one full panel's `MR` rows of `kk` weights, the
/// phase's taps of each, row index fastest (the panel layout). Fixed `MR` so the row loop is
/// unrolled and its bounds are checked once per tap.
fn gather_run<const MR: usize>(rows: &[f32], kk: usize, taps: &[usize], run: &mut [f32]) {
    let rows = &rows[..MR * kk];
    for (&tap, out) in taps.iter().zip(run.chunks_exact_mut(MR)) {
        let col = &rows[tap..=tap + (MR - 1) * kk];
        let out: &mut [f32; MR] = out.try_into().expect("chunks of MR");
        for (i, o) in out.iter_mut().enumerate() {
            *o = col[i * kk];
        }
    }
}

/// One phase's weights as packed by [`pack_phase_weights`]: the GEMM reads the panels in place
/// where its depth cut is the whole depth (as the channel blocks are chosen), else copies.
struct PackedPhase<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    mr: usize,
}

impl APanelSource for PackedPhase<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    /// A cut the whole-depth panels do not serve in place: element by element from them.
    fn pack(&self, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize, dst: &mut [f32]) {
        let (pmr, cols) = (self.mr, self.cols);
        for (ip, panel) in dst
            .chunks_exact_mut(mr * kc)
            .take(mc.div_ceil(mr))
            .enumerate()
        {
            for (p, out) in panel.chunks_exact_mut(mr).enumerate() {
                for (i, o) in out.iter_mut().enumerate() {
                    let r = i0 + ip * mr + i;
                    *o = if r < (i0 + mc).min(self.rows) {
                        self.data[r / pmr * pmr * cols + (p0 + p) * pmr + r % pmr]
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    fn prepacked(&self, mr: usize) -> Option<&[f32]> {
        (mr == self.mr).then_some(self.data)
    }
}

/// The patch address tables of phase `cl`, `csg` patch channels deep, over `nb` padded
/// patch-side images (`[nb, Cs, hp, wp]`, `image` elements apart, the patch side starting at
/// row `top`, column `left`): row `(c, u, v)` → `c·hp·wp + u·wp + v`, column `(n, i, j)` →
/// `n·image + (lo_y + top + i)·wp + lo_x + left + j`.
fn phase_tables(
    cl: &Class,
    csg: usize,
    [top, left]: [usize; 2],
    [hp, wp]: [usize; 2],
    image: usize,
    nb: usize,
) -> PatchTables {
    let mut row_offset = Vec::with_capacity(csg * cl.y.taps * cl.x.taps);
    for c in 0..csg {
        for u in 0..cl.y.taps {
            for v in 0..cl.x.taps {
                row_offset.push(c * hp * wp + u * wp + v);
            }
        }
    }
    // In bounds by construction of the padding: lo + before ≥ 0.
    let y0 = (cl.y.lo + top as isize) as usize;
    let x0 = (cl.x.lo + left as isize) as usize;
    let mut col_offset = Vec::with_capacity(nb * cl.y.len * cl.x.len);
    for n in 0..nb {
        for i in 0..cl.y.len {
            for j in 0..cl.x.len {
                col_offset.push(n * image + (y0 + i) * wp + x0 + j);
            }
        }
    }
    PatchTables::from_offsets(row_offset, col_offset, 1)
}

/// `src` `[planes, h, w]` into `dst` `[planes, hp, wp]` at row `top`, column `left`, zeros
/// around, in parallel over planes.
fn fill_padded(
    src: &[f32],
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    [hp, wp]: [usize; 2],
    dst: &mut [f32],
) {
    dst.par_chunks_exact_mut(hp * wp)
        .zip(src.par_chunks_exact(h * w))
        .with_min_len(16)
        .for_each(|(plane, img)| {
            plane.fill(0.0);
            for (y, row) in img.chunks_exact(w).enumerate() {
                plane[(top + y) * wp + left..][..w].copy_from_slice(row);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::{pack_phase_weights, padding, phases, PackedPhase, Phase};
    use crate::gemm::APanelSource;

    /// The one-pass packing of every phase's weights is, phase by phase, the panel layout of the
    /// definition `A[o, (c, t)] = w[(c·Cb + o)·kk + taps[t]]` (rows past Cb zero), for row counts
    /// on and off a multiple of MR; and a `PackedPhase` asked for any sub-block (the copy path,
    /// for a depth cut shorter than the whole depth) returns those panels' values.
    #[test]
    fn phase_weights_pack_as_defined() {
        let kk = 16;
        let taps: Vec<Vec<usize>> = vec![vec![15, 13, 7, 5], vec![14, 12], vec![11], vec![0, 2, 8]];
        for (cbg, chans, mr) in [
            (13usize, 5usize, 6usize),
            (12, 3, 6),
            (25, 4, 12),
            (1, 2, 6),
        ] {
            let w: Vec<f32> = (0..chans * cbg * kk).map(|i| i as f32).collect();
            let panels = cbg.div_ceil(mr);
            let total: usize = taps.iter().map(|t| panels * mr * chans * t.len()).sum();
            let mut dst = vec![f32::NAN; total];
            pack_phase_weights(&w, cbg, chans, kk, &taps, mr, &mut dst);
            let mut at = 0;
            for t in &taps {
                let depth = chans * t.len();
                let data = &dst[at..at + panels * mr * depth];
                at += data.len();
                let a = |o: usize, p: usize| {
                    if o < cbg {
                        w[((p / t.len()) * cbg + o) * kk + t[p % t.len()]]
                    } else {
                        0.0
                    }
                };
                for o in 0..panels * mr {
                    for p in 0..depth {
                        assert_eq!(data[(o / mr) * mr * depth + p * mr + o % mr], a(o, p));
                    }
                }
                let src = PackedPhase {
                    data,
                    rows: cbg,
                    cols: depth,
                    mr,
                };
                assert_eq!(src.prepacked(mr), Some(data));
                assert_eq!(src.prepacked(mr + 1), None);
                // Any block, packed for this MR or another one.
                for (i0, mc, p0, kc, pmr) in [
                    (0, cbg, 0, depth, mr),
                    (mr, cbg.saturating_sub(mr), 1, depth - 1, mr),
                    (0, cbg, 2.min(depth - 1), 1, 4),
                ] {
                    if mc == 0 {
                        continue;
                    }
                    let mut got = vec![f32::NAN; mc.div_ceil(pmr) * pmr * kc];
                    src.pack(i0, mc, p0, kc, pmr, &mut got);
                    for r in 0..mc.div_ceil(pmr) * pmr {
                        for p in 0..kc {
                            let want = if r < mc { a(i0 + r, p0 + p) } else { 0.0 };
                            assert_eq!(got[(r / pmr) * pmr * kc + p * pmr + r % pmr], want);
                        }
                    }
                }
            }
        }
    }

    /// `interleave2` for every length pair it is given (equal, even one longer).
    #[test]
    fn interleave2_matches_definition() {
        for odd_len in 0..20 {
            for extra in [0, 1] {
                let even: Vec<f32> = (0..odd_len + extra).map(|i| (2 * i) as f32).collect();
                let odd: Vec<f32> = (0..odd_len).map(|i| (2 * i + 1) as f32).collect();
                let mut dst = vec![f32::NAN; even.len() + odd.len()];
                super::interleave2(&mut dst, &even, &odd);
                assert!(
                    dst.iter().enumerate().all(|(i, &v)| v == i as f32),
                    "{odd_len} {extra}"
                );
            }
        }
    }

    /// The phases of every axis partition the image rows, and every tap of every row is a
    /// `(ki, oy)` pair of the index map `Y = oy·s − p + ki` with `oy` inside the padded range.
    #[test]
    fn phases_partition_the_rows() {
        for big in 1..12 {
            for k in 1..7 {
                for s in 1..5 {
                    for p in 0..6 {
                        let ph = phases(big, k, s, p);
                        let mut seen = vec![0; big];
                        for Phase { first, len, .. } in &ph {
                            for i in 0..*len {
                                seen[first + s * i] += 1;
                            }
                        }
                        assert!(seen.iter().all(|&c| c == 1), "{big} {k} {s} {p}");
                        let small = (big + 2 * p).saturating_sub(k) / s + 1;
                        let (before, after) = padding(&ph, small);
                        for f in &ph {
                            for i in 0..f.len {
                                let y = f.first + s * i;
                                for u in 0..f.taps {
                                    let ki = f.r + s * (f.taps - 1 - u);
                                    let oy = f.lo + (i + u) as isize;
                                    assert!(oy >= -(before as isize));
                                    assert!(oy < (small + after) as isize);
                                    assert_eq!(
                                        oy * s as isize - p as isize + ki as isize,
                                        y as isize
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
