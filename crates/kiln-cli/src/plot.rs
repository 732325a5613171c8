//! A small, dependency-free PNG line-plot renderer for training curves (`RUN_DIR/losses.png`,
//! `RUN_DIR/loss.png`).
//!
//! Everything is drawn into an RGB8 buffer — axes with "nice" ticks (1, 2, 5 × 10^k; decades on
//! a log axis), light grid lines, numeric tick labels, a title, axis labels, a legend, and the
//! series as anti-aliased polylines — then encoded with `png` and written atomically. Text uses
//! the 5×7 bitmap font below (printable ASCII), scaled by an integer factor.
//!
//! Series may hold any number of points: each is reduced per pixel column to the first, lowest,
//! highest and last point of the column before drawing, which looks the same as drawing every
//! point. Points with a NaN or infinite coordinate (or `y <= 0` on a log axis) are skipped and
//! break the line; a point with no neighbour is drawn as a dot. An optional second y axis on the
//! right carries the `right` series (always linear).
use kiln_tensor::{Error, Result};
use std::path::Path;

/// One curve.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Legend text (an empty name is left out of the legend).
    pub name: String,
    pub color: [u8; 3],
    /// `(x, y)` points, drawn in this order.
    pub points: Vec<(f64, f64)>,
}

/// A plot: left-axis series, optional right-axis series, labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Series on the left y axis.
    pub series: Vec<Series>,
    /// Logarithmic left y axis.
    pub log_y: bool,
    /// Series on the right y axis (linear); no right axis when empty.
    pub right: Vec<Series>,
    pub right_label: String,
}

/// The 5×7 font: printable ASCII `' '..='~'`, one byte per row (top first), bit 4 = leftmost
/// column.
#[rustfmt::skip]
const FONT: [[u8; 7]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04], // '!'
    [0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00], // '"'
    [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A], // '#'
    [0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04], // '$'
    [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03], // '%'
    [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D], // '&'
    [0x04, 0x04, 0x04, 0x00, 0x00, 0x00, 0x00], // "'"
    [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02], // '('
    [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08], // ')'
    [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00], // '*'
    [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00], // '+'
    [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08], // ','
    [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00], // '-'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C], // '.'
    [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00], // '/'
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E], // '0'
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E], // '1'
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F], // '2'
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E], // '3'
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02], // '4'
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E], // '5'
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E], // '6'
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08], // '7'
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E], // '8'
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C], // '9'
    [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00], // ':'
    [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08], // ';'
    [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02], // '<'
    [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00], // '='
    [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08], // '>'
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04], // '?'
    [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E], // '@'
    [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11], // 'A'
    [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E], // 'B'
    [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E], // 'C'
    [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C], // 'D'
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F], // 'E'
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10], // 'F'
    [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F], // 'G'
    [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11], // 'H'
    [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E], // 'I'
    [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C], // 'J'
    [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11], // 'K'
    [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F], // 'L'
    [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11], // 'M'
    [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11], // 'N'
    [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], // 'O'
    [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10], // 'P'
    [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D], // 'Q'
    [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11], // 'R'
    [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E], // 'S'
    [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04], // 'T'
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], // 'U'
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04], // 'V'
    [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A], // 'W'
    [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11], // 'X'
    [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04], // 'Y'
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F], // 'Z'
    [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E], // '['
    [0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00], // '\\'
    [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E], // ']'
    [0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00], // '^'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F], // '_'
    [0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00], // '`'
    [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F], // 'a'
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E], // 'b'
    [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E], // 'c'
    [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F], // 'd'
    [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E], // 'e'
    [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08], // 'f'
    [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E], // 'g'
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11], // 'h'
    [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E], // 'i'
    [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C], // 'j'
    [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12], // 'k'
    [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E], // 'l'
    [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11], // 'm'
    [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11], // 'n'
    [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E], // 'o'
    [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10], // 'p'
    [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01], // 'q'
    [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10], // 'r'
    [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E], // 's'
    [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06], // 't'
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D], // 'u'
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04], // 'v'
    [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A], // 'w'
    [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11], // 'x'
    [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E], // 'y'
    [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F], // 'z'
    [0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02], // '{'
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04], // '|'
    [0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08], // '}'
    [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00], // '~'
];

const GLYPH_W: usize = 5;
const GLYPH_H: usize = 7;
/// Advance per character and line height, in font pixels.
const CELL_W: usize = 6;
const CELL_H: usize = 8;

const WHITE: [u8; 3] = [255, 255, 255];
const TEXT: [u8; 3] = [20, 20, 20];
const FRAME: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [228, 228, 228];
const LEGEND_BORDER: [u8; 3] = [170, 170, 170];

/// The largest width or height accepted.
pub const MAX_SIDE: u32 = 16384;

fn glyph(c: char) -> &'static [u8; 7] {
    let code = c as u32;
    if (32..127).contains(&code) {
        &FONT[(code - 32) as usize]
    } else {
        &FONT[(b'?' - 32) as usize]
    }
}

/// Width in pixels of `text` at `scale` (no trailing gap).
fn text_width(text: &str, scale: usize) -> usize {
    let n = text.chars().count();
    if n == 0 {
        0
    } else {
        (n * CELL_W - 1) * scale
    }
}

// ---------------------------------------------------------------------------------------------
// Canvas
// ---------------------------------------------------------------------------------------------

struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            rgb: WHITE.repeat(width * height),
        }
    }

    /// Blends `color` over pixel `(x, y)` with opacity `alpha` in [0, 1]; outside is ignored.
    fn blend(&mut self, x: i64, y: i64, color: [u8; 3], alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || alpha <= 0.0 {
            return;
        }
        let o = (y as usize * self.width + x as usize) * 3;
        let a = alpha.min(1.0);
        for (dst, &src) in self.rgb[o..o + 3].iter_mut().zip(&color) {
            let old = *dst as f32;
            *dst = (old + (src as f32 - old) * a).round() as u8;
        }
    }

    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: [u8; 3]) {
        let (x0, y0) = (x.max(0), y.max(0));
        let x1 = (x + w).min(self.width as i64);
        let y1 = (y + h).min(self.height as i64);
        for yy in y0..y1 {
            for xx in x0..x1 {
                let o = (yy as usize * self.width + xx as usize) * 3;
                self.rgb[o..o + 3].copy_from_slice(&color);
            }
        }
    }

    /// Draws `text` with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: usize, color: [u8; 3]) {
        let s = scale as i64;
        for (i, ch) in text.chars().enumerate() {
            let g = glyph(ch);
            for (r, bits) in g.iter().enumerate() {
                for c in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - c)) != 0 {
                        let px = x + ((i * CELL_W + c) as i64) * s;
                        self.fill_rect(px, y + r as i64 * s, s, s, color);
                    }
                }
            }
        }
    }

    /// Draws `text` rotated 90° counter-clockwise (reading upwards); `(x, y)` is the top-left
    /// corner of its box, `GLYPH_H * scale` wide and `text_width` high.
    fn text_up(&mut self, x: i64, y: i64, text: &str, scale: usize, color: [u8; 3]) {
        let s = scale as i64;
        let len = text_width(text, scale) as i64;
        for (i, ch) in text.chars().enumerate() {
            let g = glyph(ch);
            for (r, bits) in g.iter().enumerate() {
                for c in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - c)) != 0 {
                        // Text coordinates (along, down) -> screen (down, up from the bottom).
                        let along = ((i * CELL_W + c) as i64) * s;
                        self.fill_rect(x + r as i64 * s, y + len - along - s, s, s, color);
                    }
                }
            }
        }
    }
}

/// Per-pixel coverage of one series, composited once so that overlapping segments of the same
/// line do not darken their joints.
struct Coverage {
    width: usize,
    height: usize,
    alpha: Vec<f32>,
    /// Clip rectangle in pixels: `[x0, x1) x [y0, y1)`.
    clip: (i64, i64, i64, i64),
    /// Bounding box of what was touched.
    dirty: (i64, i64, i64, i64),
}

impl Coverage {
    fn new(width: usize, height: usize, clip: (i64, i64, i64, i64)) -> Coverage {
        Coverage {
            width,
            height,
            alpha: vec![0.0; width * height],
            clip,
            dirty: (i64::MAX, i64::MAX, i64::MIN, i64::MIN),
        }
    }

    fn put(&mut self, x: i64, y: i64, a: f32) {
        let (x0, y0, x1, y1) = self.clip;
        if a <= 0.0 || x < x0 || y < y0 || x >= x1 || y >= y1 {
            return;
        }
        let o = y as usize * self.width + x as usize;
        if a > self.alpha[o] {
            self.alpha[o] = a.min(1.0);
            let d = &mut self.dirty;
            *d = (d.0.min(x), d.1.min(y), d.2.max(x + 1), d.3.max(y + 1));
        }
    }

    /// A segment of half width `hw` from `a` to `b` (continuous pixel coordinates: pixel
    /// `(i, j)` covers `[i, i+1) x [j, j+1)`). Coverage of a pixel is `hw + 0.5 - d`, clamped
    /// to [0, 1], with `d` the distance from its centre to the segment.
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), hw: f64) {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len2 = dx * dx + dy * dy;
        let reach = hw + 1.0;
        let dist = |px: f64, py: f64| {
            let t = if len2 > 0.0 {
                (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            ((px - a.0 - t * dx).powi(2) + (py - a.1 - t * dy).powi(2)).sqrt()
        };
        let cover = |d: f64| (hw + 0.5 - d).clamp(0.0, 1.0) as f32;
        // Walk the major axis; on each step only the pixels within `reach` of the line.
        let steep = dy.abs() > dx.abs();
        let (u0, u1) = if steep {
            (a.1.min(b.1), a.1.max(b.1))
        } else {
            (a.0.min(b.0), a.0.max(b.0))
        };
        let slope = if steep {
            if dy != 0.0 {
                dx / dy
            } else {
                0.0
            }
        } else if dx != 0.0 {
            dy / dx
        } else {
            0.0
        };
        let band = reach * (1.0 + slope * slope).sqrt() + 1.0;
        // Clip the walk to the coverage's clip rectangle.
        let (cx0, cy0, cx1, cy1) = self.clip;
        let (lo_u, hi_u) = if steep { (cy0, cy1) } else { (cx0, cx1) };
        let start = ((u0 - reach).floor() as i64).max(lo_u);
        let end = ((u1 + reach).ceil() as i64).min(hi_u);
        for u in start..end {
            let uc = u as f64 + 0.5;
            // The line's minor coordinate at this step (clamped to the segment's span).
            let v = if steep {
                a.0 + (uc.clamp(u0, u1) - a.1) * slope
            } else {
                a.1 + (uc.clamp(u0, u1) - a.0) * slope
            };
            let (lo_v, hi_v) = if steep { (cx0, cx1) } else { (cy0, cy1) };
            let v0 = ((v - band).floor() as i64).max(lo_v);
            let v1 = ((v + band).ceil() as i64).min(hi_v);
            for w in v0..v1 {
                let (x, y) = if steep { (w, u) } else { (u, w) };
                let c = cover(dist(x as f64 + 0.5, y as f64 + 0.5));
                self.put(x, y, c);
            }
        }
    }

    /// A filled dot of radius `r` centred at `p`.
    fn dot(&mut self, p: (f64, f64), r: f64) {
        let (x0, x1) = (
            (p.0 - r - 1.0).floor() as i64,
            (p.0 + r + 1.0).ceil() as i64,
        );
        let (y0, y1) = (
            (p.1 - r - 1.0).floor() as i64,
            (p.1 + r + 1.0).ceil() as i64,
        );
        for y in y0..y1 {
            for x in x0..x1 {
                let d = ((x as f64 + 0.5 - p.0).powi(2) + (y as f64 + 0.5 - p.1).powi(2)).sqrt();
                self.put(x, y, (r + 0.5 - d).clamp(0.0, 1.0) as f32);
            }
        }
    }

    /// Blends the coverage onto `canvas` in `color` and clears it.
    fn composite(&mut self, canvas: &mut Canvas, color: [u8; 3]) {
        let (x0, y0, x1, y1) = self.dirty;
        for y in y0.max(0)..y1.min(self.height as i64) {
            for x in x0.max(0)..x1.min(self.width as i64) {
                let o = y as usize * self.width + x as usize;
                let a = std::mem::take(&mut self.alpha[o]);
                canvas.blend(x, y, color, a);
            }
        }
        self.dirty = (i64::MAX, i64::MAX, i64::MIN, i64::MIN);
    }
}

// ---------------------------------------------------------------------------------------------
// Axes
// ---------------------------------------------------------------------------------------------

/// One axis: the shown interval, the tick positions and their labels. For a log axis, `lo` and
/// `hi` are the values (not their logarithms).
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    pub ticks: Vec<f64>,
    pub labels: Vec<String>,
}

impl Axis {
    /// Position of `v` in [0, 1] along the axis (outside for values outside); `None` for a
    /// value a log axis cannot show.
    pub fn fraction(&self, v: f64) -> Option<f64> {
        if !v.is_finite() {
            return None;
        }
        if self.log {
            if v <= 0.0 {
                return None;
            }
            let (l0, l1) = (self.lo.log10(), self.hi.log10());
            Some((v.log10() - l0) / (l1 - l0))
        } else {
            Some((v - self.lo) / (self.hi - self.lo))
        }
    }
}

/// A step of 1, 2 or 5 times a power of ten, near `span / target`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = span / target.max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// `(lo, hi)` widened when degenerate (all values equal, or none).
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi > lo {
        return (lo, hi);
    }
    let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
    (lo - d, hi + d)
}

/// Decimal digits needed to print every value of `values` exactly enough (at most 9).
fn decimals_for(values: &[f64]) -> usize {
    (0..=9)
        .find(|&d| {
            let p = 10f64.powi(d as i32);
            values.iter().all(|v| {
                let s = v * p;
                (s - s.round()).abs() < 1e-6 * s.abs().max(1.0)
            })
        })
        .unwrap_or(9)
}

/// `v` in short scientific notation: `2.5e-5`, `1e6`.
fn format_sci(v: f64) -> String {
    let s = format!("{v:.3e}");
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let mant = if mant.contains('.') {
        mant.trim_end_matches('0').trim_end_matches('.')
    } else {
        mant
    };
    format!("{mant}e{exp}")
}

/// Labels for linear ticks, with a common number of decimals (scientific notation for very
/// large or small magnitudes).
fn linear_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let big = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
    if big >= 1e6 || step < 1e-4 {
        return ticks
            .iter()
            .map(|&v| {
                if v.abs() < step * 1e-9 {
                    "0".to_string()
                } else {
                    format_sci(v)
                }
            })
            .collect();
    }
    let d = decimals_for(ticks);
    ticks
        .iter()
        .map(|&v| {
            let s = format!("{:.*}", d, v);
            // No "-0".
            if s.trim_start_matches('-')
                .chars()
                .all(|c| c == '0' || c == '.')
            {
                s.trim_start_matches('-').to_string()
            } else {
                s
            }
        })
        .collect()
}

/// A linear axis over the data interval `[lo, hi]`, padded by `pad` of its span on each side,
/// with about `target` ticks at multiples of a nice step.
fn linear_axis(lo: f64, hi: f64, pad: f64, target: f64) -> Axis {
    let (lo, hi) = widen(lo, hi);
    let span = hi - lo;
    let (lo, hi) = (lo - pad * span, hi + pad * span);
    let step = nice_step(hi - lo, target);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks: Vec<f64> = (first..=last).map(|k| k as f64 * step).collect();
    let labels = linear_labels(&ticks, step);
    Axis {
        lo,
        hi,
        log: false,
        ticks,
        labels,
    }
}

/// A log axis over positive data `[lo, hi]`: ticks at decades (every k-th when there are many),
/// with 2× and 5× when the range spans few decades, or linear ticks when it spans less than
/// two tick marks' worth.
fn log_axis(lo: f64, hi: f64, target: f64) -> Axis {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > 0.0 {
        (lo, hi)
    } else {
        (1.0, 10.0)
    };
    let (mut l0, mut l1) = (lo.log10(), hi.log10());
    if l1 - l0 < 1e-9 {
        l0 -= 0.5;
        l1 += 0.5;
    }
    let pad = 0.05 * (l1 - l0);
    let (l0, l1) = (l0 - pad, l1 + pad);
    let (d0, d1) = (l0.floor() as i64, l1.ceil() as i64);
    let decades = (d1 - d0).max(1);
    let every = ((decades as f64 / target).ceil() as i64).max(1);
    let mut ticks: Vec<f64> = (d0..=d1)
        .filter(|k| k.rem_euclid(every) == 0)
        .map(|k| 10f64.powi(k as i32))
        .filter(|&v| v.log10() >= l0 - 1e-12 && v.log10() <= l1 + 1e-12)
        .collect();
    if decades <= 3 {
        for k in d0..=d1 {
            for m in [2.0, 5.0] {
                let v = m * 10f64.powi(k as i32);
                if v.log10() >= l0 && v.log10() <= l1 {
                    ticks.push(v);
                }
            }
        }
        ticks.sort_by(f64::total_cmp);
    }
    let (vlo, vhi) = (10f64.powf(l0), 10f64.powf(l1));
    if ticks.len() < 2 {
        // Less than a factor of ~2.5 between the ends: nice linear values on the log scale.
        let step = nice_step(vhi - vlo, target.min(5.0));
        let first = (vlo / step).ceil() as i64;
        let last = (vhi / step).floor() as i64;
        ticks = (first..=last)
            .map(|k| k as f64 * step)
            .filter(|&v| v > 0.0)
            .collect();
        let labels = linear_labels(&ticks, step);
        return Axis {
            lo: vlo,
            hi: vhi,
            log: true,
            ticks,
            labels,
        };
    }
    let labels = ticks
        .iter()
        .map(|&v| {
            if (1e-3..1e6).contains(&v) {
                let d = decimals_for(&[v]);
                format!("{:.*}", d, v)
            } else {
                format_sci(v)
            }
        })
        .collect();
    Axis {
        lo: vlo,
        hi: vhi,
        log: true,
        ticks,
        labels,
    }
}

/// Where the plot area lies in the image and how data map into it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Plot area in pixels: `[left, right) x [top, bottom)`.
    pub left: usize,
    pub top: usize,
    pub right: usize,
    pub bottom: usize,
    pub x: Axis,
    pub y: Axis,
    /// The right y axis, when there are right series.
    pub y_right: Option<Axis>,
}

impl Frame {
    fn map(&self, y_axis: &Axis, x: f64, y: f64) -> Option<(f64, f64)> {
        let fx = self.x.fraction(x)?;
        let fy = y_axis.fraction(y)?;
        let (l, r) = (self.left as f64, self.right as f64);
        let (t, b) = (self.top as f64, self.bottom as f64);
        Some((l + fx * (r - l), b - fy * (b - t)))
    }

    /// Continuous pixel position of a left-axis data point (pixel `(i, j)` covers
    /// `[i, i+1) x [j, j+1)`); `None` for a point the axes cannot show.
    pub fn to_pixel(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        self.map(&self.y, x, y)
    }

    /// As [`Frame::to_pixel`] for a right-axis point.
    pub fn to_pixel_right(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        self.map(self.y_right.as_ref()?, x, y)
    }
}

/// A rendered plot: interleaved RGB8 `[height, width, 3]` and its frame.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    pub frame: Frame,
    /// The legend box `(x, y, width, height)` in pixels, when one was drawn.
    pub legend: Option<(usize, usize, usize, usize)>,
}

fn finite_bounds<'a>(
    series: impl Iterator<Item = &'a Series>,
    coord: impl Fn(&(f64, f64)) -> f64,
    accept: impl Fn(&(f64, f64)) -> bool,
) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in series {
        for p in s.points.iter().filter(|p| accept(p)) {
            let v = coord(p);
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    (lo, hi)
}

/// The pixel-space polylines of a series after per-column decimation: runs of consecutive
/// drawable points (a non-drawable point ends a run).
fn polylines(
    points: &[(f64, f64)],
    map: impl Fn(f64, f64) -> Option<(f64, f64)>,
) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut run: Vec<(f64, f64)> = Vec::new();
    // The current column group: first, min-y, max-y, last (with their order of arrival).
    struct Group {
        col: i64,
        first: (usize, (f64, f64)),
        min: (usize, (f64, f64)),
        max: (usize, (f64, f64)),
        last: (usize, (f64, f64)),
    }
    let flush = |g: &Group, run: &mut Vec<(f64, f64)>| {
        let mut pts = [g.first, g.min, g.max, g.last];
        pts.sort_by_key(|p| p.0);
        let mut prev = usize::MAX;
        for (i, p) in pts {
            if i != prev {
                run.push(p);
                prev = i;
            }
        }
    };
    let mut group: Option<Group> = None;
    for (i, &(x, y)) in points.iter().enumerate() {
        match map(x, y) {
            Some(p) => {
                let col = p.0.floor() as i64;
                match &mut group {
                    Some(g) if g.col == col => {
                        if p.1 < g.min.1 .1 {
                            g.min = (i, p);
                        }
                        if p.1 > g.max.1 .1 {
                            g.max = (i, p);
                        }
                        g.last = (i, p);
                    }
                    _ => {
                        if let Some(g) = group.take() {
                            flush(&g, &mut run);
                        }
                        group = Some(Group {
                            col,
                            first: (i, p),
                            min: (i, p),
                            max: (i, p),
                            last: (i, p),
                        });
                    }
                }
            }
            None => {
                if let Some(g) = group.take() {
                    flush(&g, &mut run);
                }
                if !run.is_empty() {
                    runs.push(std::mem::take(&mut run));
                }
            }
        }
    }
    if let Some(g) = group.take() {
        flush(&g, &mut run);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// Renders `plot` into an RGB8 buffer of `width x height` pixels.
pub fn render(plot: &Plot, width: u32, height: u32) -> Result<Rendered> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::invalid(format!(
            "plot: size {width}x{height} is not within 1..={MAX_SIDE} on each side"
        )));
    }
    let (w, h) = (width as usize, height as usize);
    let s = ((w.min(h) + 50) / 250).max(1); // text scale: 1 up to 449 px, 2 up to 699, ...
    let m = 4 * s; // margin unit
    let tick = 2 * s + 1;
    let line_h = CELL_H * s;
    let hw = (0.75 * s as f64).max(1.0); // half line width

    let log_y = plot.log_y;
    let all = || plot.series.iter().chain(plot.right.iter());
    let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let (x_lo, x_hi) = finite_bounds(all(), |p| p.0, finite);
    let (yl_lo, yl_hi) = finite_bounds(
        plot.series.iter(),
        |p| p.1,
        |p| finite(p) && (!log_y || p.1 > 0.0),
    );
    let has_right = !plot.right.is_empty();
    let (yr_lo, yr_hi) = finite_bounds(plot.right.iter(), |p| p.1, finite);

    // Tick counts follow the size of the plot area; estimate it before the margins are known.
    let y_target = (h as f64 / (line_h as f64 * 4.0)).clamp(2.0, 10.0);
    let y_axis = if log_y {
        log_axis(yl_lo, yl_hi, y_target)
    } else {
        linear_axis(yl_lo, yl_hi, 0.05, y_target)
    };
    let y_right = has_right.then(|| linear_axis(yr_lo, yr_hi, 0.05, y_target));

    // Margins.
    let label_w = |a: &Axis| a.labels.iter().map(|l| text_width(l, s)).max().unwrap_or(0);
    let top = if plot.title.is_empty() {
        2 * m
    } else {
        m + line_h + m
    };
    let left =
        m + if plot.y_label.is_empty() {
            0
        } else {
            GLYPH_H * s + m
        } + label_w(&y_axis)
            + m
            + tick;
    let right_margin = match &y_right {
        Some(a) => {
            tick + m
                + label_w(a)
                + m
                + if plot.right_label.is_empty() {
                    0
                } else {
                    GLYPH_H * s + m
                }
        }
        None => 3 * m,
    };
    let bottom_margin = tick
        + m
        + line_h
        + if plot.x_label.is_empty() {
            m
        } else {
            m + line_h + m
        };
    if left + right_margin + 16 > w || top + bottom_margin + 16 > h {
        return Err(Error::invalid(format!(
            "plot: {width}x{height} is too small for the axes and labels"
        )));
    }
    let (right, bottom) = (w - right_margin, h - bottom_margin);
    let x_target =
        ((right - left) as f64 / (text_width("0.0000", s) as f64 * 1.8)).clamp(2.0, 10.0);
    let x_axis = linear_axis(x_lo, x_hi, 0.0, x_target);
    let frame = Frame {
        left,
        top,
        right,
        bottom,
        x: x_axis,
        y: y_axis,
        y_right,
    };

    let mut canvas = Canvas::new(w, h);
    let (l, t, r, b) = (left as i64, top as i64, right as i64, bottom as i64);

    // Grid lines, then the frame.
    for &v in &frame.x.ticks {
        if let Some(f) = frame.x.fraction(v) {
            let px = (l as f64 + f * (r - l) as f64).floor() as i64;
            if px > l && px < r - 1 {
                canvas.fill_rect(px, t, 1, b - t, GRID);
            }
        }
    }
    for &v in &frame.y.ticks {
        if let Some(f) = frame.y.fraction(v) {
            let py = (b as f64 - f * (b - t) as f64).floor() as i64;
            if py > t && py < b - 1 {
                canvas.fill_rect(l, py, r - l, 1, GRID);
            }
        }
    }

    // Series: left axis first, then right; each composited once.
    let mut cov = Coverage::new(w, h, (l, t, r, b));
    let mut all_runs: Vec<Vec<Vec<(f64, f64)>>> = Vec::new();
    let mut colors = Vec::new();
    for (series, on_right) in plot
        .series
        .iter()
        .map(|s| (s, false))
        .chain(plot.right.iter().map(|s| (s, true)))
    {
        let runs = polylines(&series.points, |x, y| {
            if on_right {
                frame.to_pixel_right(x, y)
            } else {
                frame.to_pixel(x, y)
            }
        });
        all_runs.push(runs);
        colors.push(series.color);
    }
    for (runs, &color) in all_runs.iter().zip(&colors) {
        for run in runs {
            if run.len() == 1 {
                cov.dot(run[0], hw + 1.5);
            } else {
                for pair in run.windows(2) {
                    cov.segment(pair[0], pair[1], hw);
                }
            }
        }
        cov.composite(&mut canvas, color);
    }

    // Frame and ticks.
    canvas.fill_rect(l, t, r - l, 1, FRAME);
    canvas.fill_rect(l, b - 1, r - l, 1, FRAME);
    canvas.fill_rect(l, t, 1, b - t, FRAME);
    canvas.fill_rect(r - 1, t, 1, b - t, FRAME);
    let tick_i = tick as i64;
    for (v, label) in frame.x.ticks.iter().zip(&frame.x.labels) {
        if let Some(f) = frame.x.fraction(*v) {
            let px = ((l as f64 + f * (r - l) as f64).floor() as i64).min(r - 1);
            canvas.fill_rect(px, b, 1, tick_i, FRAME);
            let tw = text_width(label, s) as i64;
            let tx = (px - tw / 2).clamp(0, w as i64 - tw);
            canvas.text(tx, b + tick_i + m as i64, label, s, TEXT);
        }
    }
    let text_h = (GLYPH_H * s) as i64;
    for (v, label) in frame.y.ticks.iter().zip(&frame.y.labels) {
        if let Some(f) = frame.y.fraction(*v) {
            let py = ((b as f64 - f * (b - t) as f64).floor() as i64).min(b - 1);
            canvas.fill_rect(l - tick_i, py, tick_i, 1, FRAME);
            let tw = text_width(label, s) as i64;
            canvas.text(l - tick_i - m as i64 - tw, py - text_h / 2, label, s, TEXT);
        }
    }
    if let Some(axis) = &frame.y_right {
        for (v, label) in axis.ticks.iter().zip(&axis.labels) {
            if let Some(f) = axis.fraction(*v) {
                let py = ((b as f64 - f * (b - t) as f64).floor() as i64).min(b - 1);
                canvas.fill_rect(r, py, tick_i, 1, FRAME);
                canvas.text(r + tick_i + m as i64, py - text_h / 2, label, s, TEXT);
            }
        }
    }

    // Title and axis labels.
    let mi = m as i64;
    if !plot.title.is_empty() {
        let tw = text_width(&plot.title, s) as i64;
        let cx = (l + r) / 2;
        canvas.text(
            (cx - tw / 2).clamp(0, (w as i64 - tw).max(0)),
            mi,
            &plot.title,
            s,
            TEXT,
        );
    }
    if !plot.x_label.is_empty() {
        let tw = text_width(&plot.x_label, s) as i64;
        let y = b + tick_i + mi + line_h as i64 + mi;
        canvas.text(((l + r) / 2 - tw / 2).max(0), y, &plot.x_label, s, TEXT);
    }
    if !plot.y_label.is_empty() {
        let th = text_width(&plot.y_label, s) as i64;
        canvas.text_up(mi, ((t + b) / 2 - th / 2).max(0), &plot.y_label, s, TEXT);
    }
    if has_right && !plot.right_label.is_empty() {
        let th = text_width(&plot.right_label, s) as i64;
        let x = w as i64 - mi - text_h;
        canvas.text_up(x, ((t + b) / 2 - th / 2).max(0), &plot.right_label, s, TEXT);
    }

    // Legend, in the corner of the plot area with the fewest drawn points under it.
    let entries: Vec<(String, [u8; 3])> = plot
        .series
        .iter()
        .map(|s| (s.name.clone(), s.color))
        .chain(plot.right.iter().map(|s| {
            let name = if s.name.is_empty() {
                String::new()
            } else {
                format!("{} (right)", s.name)
            };
            (name, s.color)
        }))
        .filter(|(n, _)| !n.is_empty())
        .collect();
    let mut legend = None;
    if !entries.is_empty() {
        let swatch = 5 * m as i64;
        let row_h = line_h as i64 + s as i64 * 2;
        let name_w = entries
            .iter()
            .map(|(n, _)| text_width(n, s))
            .max()
            .unwrap_or(0) as i64;
        let bw = mi + swatch + mi + name_w + mi;
        let bh = mi + row_h * entries.len() as i64 + mi / 2;
        if bw + 2 * mi <= r - l && bh + 2 * mi <= b - t {
            let corners = [
                (r - mi - bw, t + mi),
                (l + mi, t + mi),
                (r - mi - bw, b - mi - bh),
                (l + mi, b - mi - bh),
            ];
            // Drawn curve pixels under a candidate box (everything but background and grid).
            let covered = |(x0, y0): (i64, i64)| {
                let mut count = 0usize;
                for y in y0.max(0)..(y0 + bh).min(h as i64) {
                    for x in x0.max(0)..(x0 + bw).min(w as i64) {
                        let o = (y as usize * w + x as usize) * 3;
                        let p = [canvas.rgb[o], canvas.rgb[o + 1], canvas.rgb[o + 2]];
                        if p != WHITE && p != GRID {
                            count += 1;
                        }
                    }
                }
                count
            };
            let (bx, by) = corners
                .iter()
                .copied()
                .min_by_key(|&c| covered(c))
                .unwrap_or(corners[0]);
            legend = Some((bx as usize, by as usize, bw as usize, bh as usize));
            canvas.fill_rect(bx, by, bw, bh, LEGEND_BORDER);
            canvas.fill_rect(bx + 1, by + 1, bw - 2, bh - 2, WHITE);
            for (k, (name, color)) in entries.iter().enumerate() {
                let y = by + mi + row_h * k as i64;
                let mid = y + text_h / 2;
                canvas.fill_rect(
                    bx + mi,
                    mid - (hw.round() as i64).max(1),
                    swatch,
                    2 * (hw.round() as i64).max(1),
                    *color,
                );
                canvas.text(bx + mi + swatch + mi, y, name, s, TEXT);
            }
        }
    }

    Ok(Rendered {
        width: w,
        height: h,
        rgb: canvas.rgb,
        frame,
        legend,
    })
}

/// Encodes interleaved RGB8 as a PNG into `out`.
fn encode_png(
    out: &mut impl std::io::Write,
    width: u32,
    height: u32,
    rgb: &[u8],
) -> std::io::Result<()> {
    let mut encoder = png::Encoder::new(out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(rgb)
        .map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)
}

/// Renders `plot` at `width x height` and writes it to `path` as an RGB PNG, atomically.
pub fn render_png(plot: &Plot, width: u32, height: u32, path: &Path) -> Result<()> {
    let img = render(plot, width, height)?;
    kiln_io::write_atomic(path, |w| encode_png(w, width, height, &img.rgb))
}
