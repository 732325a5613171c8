//! Implicit GEMM: the patch matrix `im2col(big)` of one group of a chunk of images, never
//! stored. The GEMM asks for `KC × NR` panels of it and [`Patches`] gathers them straight from
//! the images, so the patch matrix (`Cb/G·kh·kw` times the pixel count, many times the image)
//! is neither written to memory nor read back.
//!
//! Rows are `(c, ki, kj)` (channel of the group, kernel tap), columns `(n, oy, ox)` (image of
//! the chunk, patch pixel), as in `im2col`:
//!
//! ```text
//! B[(c, ki, kj), (n, oy, ox)] = xp[n, g·Cb/G + c, oy·sh + ki·dh, ox·sw + kj·dw]
//!                             = xp[row_offset(c, ki, kj) + col_offset(n, oy, ox)]
//! ```
//!
//! where `xp` is the chunk's images with the padding written out as zeros (`[nb, Cb, Hb + 2ph,
//! Wb + 2pw]`, a copy only when there is padding), so every entry is one load and there is no
//! bounds test in the gather. The address splits into a row part and a column part, each
//! tabulated once per chunk; along a patch row consecutive columns step by `sw`.
use super::{gather, ConvGeometry};
use crate::gemm::PanelSource;

/// The chunk's images with their padding written out: `[nb, Cb, Hp, Wp]` with
/// `Hp = Hb + 2ph`, `Wp = Wb + 2pw`.
pub(super) struct Padded {
    pub hp: usize,
    pub wp: usize,
}

impl Padded {
    pub fn new(g: &ConvGeometry) -> Padded {
        Padded {
            hp: g.big[1] + 2 * g.padding[0],
            wp: g.big[2] + 2 * g.padding[1],
        }
    }

    /// Whether the images can be used as they are (no padding).
    pub fn is_identity(&self, g: &ConvGeometry) -> bool {
        g.padding == [0, 0]
    }

    /// Elements of `nb` padded images.
    pub fn len(&self, g: &ConvGeometry, nb: usize) -> usize {
        nb * g.big[0] * self.hp * self.wp
    }

    /// Writes `nb` images `src` `[nb, Cb, Hb, Wb]` into `dst` `[nb, Cb, Hp, Wp]`, zero borders.
    pub fn fill(&self, g: &ConvGeometry, src: &[f32], dst: &mut [f32]) {
        let [_, hb, wb] = g.big;
        let [ph, pw] = g.padding;
        let (hp, wp) = (self.hp, self.wp);
        for (plane, img) in dst.chunks_exact_mut(hp * wp).zip(src.chunks_exact(hb * wb)) {
            plane[..ph * wp].fill(0.0);
            plane[(ph + hb) * wp..].fill(0.0);
            for (y, row) in img.chunks_exact(wb).enumerate() {
                let out = &mut plane[(ph + y) * wp..(ph + y + 1) * wp];
                out[..pw].fill(0.0);
                out[pw..pw + wb].copy_from_slice(row);
                out[pw + wb..].fill(0.0);
            }
        }
    }
}

/// The two address tables of [`Patches`] for a chunk of `nb` padded images (shared by the
/// groups: group `g`'s patches are the same tables over the images from channel `g·Cb/G` on).
pub(super) struct PatchTables {
    /// `c·Hp·Wp + ki·dh·Wp + kj·dw` for row `(c, ki, kj)`.
    row_offset: Vec<usize>,
    /// `n·Cb·Hp·Wp + oy·sh·Wp + ox·sw` for column `(n, oy, ox)`.
    col_offset: Vec<usize>,
    step: usize,
}

impl PatchTables {
    pub fn new(g: &ConvGeometry, pad: &Padded, nb: usize) -> Self {
        let (hp, wp) = (pad.hp, pad.wp);
        let [kh, kw] = g.kernel;
        let [dh, dw] = g.dilation;
        let [sh, sw] = g.stride;
        let mut row_offset = Vec::with_capacity(g.cbg() * kh * kw);
        for c in 0..g.cbg() {
            for ki in 0..kh {
                for kj in 0..kw {
                    row_offset.push(c * hp * wp + ki * dh * wp + kj * dw);
                }
            }
        }
        let [_, hs, ws] = g.small;
        let mut col_offset = Vec::with_capacity(nb * hs * ws);
        for n in 0..nb {
            for oy in 0..hs {
                for ox in 0..ws {
                    col_offset.push(n * g.big[0] * hp * wp + oy * sh * wp + ox * sw);
                }
            }
        }
        PatchTables {
            row_offset,
            col_offset,
            step: sw,
        }
    }
}

/// `im2col` of one group of a chunk of padded images, as a GEMM B operand
/// `[Cb/G·kh·kw, nb·Hs·Ws]` (see the module docs).
pub(super) struct Patches<'a> {
    /// The padded images from the group's first channel on.
    pub xp: &'a [f32],
    pub tables: &'a PatchTables,
}

impl PanelSource for Patches<'_> {
    fn rows(&self) -> usize {
        self.tables.row_offset.len()
    }

    fn cols(&self) -> usize {
        self.tables.col_offset.len()
    }

    /// `panel[p·nr + j] = xp[row_offset[p0 + p] + col_offset[c0 + j]]`. The panel's columns are
    /// cut once into runs of equal step `sw` (a run ends with a patch row or an image); each
    /// depth row is then one strided gather per run.
    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        const MAX_NR: usize = 64;
        assert!(nr <= MAX_NR, "panel width {nr} above {MAX_NR}");
        let rows = &self.tables.row_offset[p0..p0 + kc];
        for (jp, panel) in dst
            .chunks_exact_mut(nr * kc)
            .take(nc.div_ceil(nr))
            .enumerate()
        {
            let c0 = j0 + jp * nr;
            let cols = &self.tables.col_offset[c0..c0 + nr.min(j0 + nc - c0)];
            // Runs (first column, length, column offset).
            let mut runs = [(0usize, 0usize, 0usize); MAX_NR];
            let mut count = 0;
            for (j, &off) in cols.iter().enumerate() {
                if count > 0 {
                    let (_, len, first) = runs[count - 1];
                    if first + len * self.tables.step == off {
                        runs[count - 1].1 += 1;
                        continue;
                    }
                }
                runs[count] = (j, 1, off);
                count += 1;
            }
            let runs = &runs[..count];
            for (out, &row) in panel.chunks_exact_mut(nr).zip(rows) {
                for &(start, len, off) in runs {
                    gather(
                        &mut out[start..start + len],
                        self.xp,
                        row + off,
                        self.tables.step,
                    );
                }
                out[cols.len()..].fill(0.0);
            }
        }
    }
}

/// The transposed patch matrix `im2col(big)ᵀ` `[nb·Hs·Ws, Cb/G·kh·kw]` of one group, as a GEMM B
/// operand: the weight gradient `dW_g = small_g · im2col(big_g)ᵀ` takes it with the pixels as the
/// depth. `panel[p·nr + j] = xp[col_offset[p0 + p] + row_offset[c0 + j]]`.
pub(super) struct PatchesT<'a> {
    /// The padded images from the group's first channel on.
    pub xp: &'a [f32],
    pub tables: &'a PatchTables,
}

impl PanelSource for PatchesT<'_> {
    fn rows(&self) -> usize {
        self.tables.col_offset.len()
    }

    fn cols(&self) -> usize {
        self.tables.row_offset.len()
    }

    fn pack(&self, p0: usize, kc: usize, j0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        let pixels = &self.tables.col_offset[p0..p0 + kc];
        for (jp, panel) in dst
            .chunks_exact_mut(nr * kc)
            .take(nc.div_ceil(nr))
            .enumerate()
        {
            let c0 = j0 + jp * nr;
            let taps = &self.tables.row_offset[c0..c0 + nr.min(j0 + nc - c0)];
            for (out, &pixel) in panel.chunks_exact_mut(nr).zip(pixels) {
                let src = &self.xp[pixel..];
                for (o, &t) in out.iter_mut().zip(taps) {
                    *o = src[t];
                }
                out[taps.len()..].fill(0.0);
            }
        }
    }
}
