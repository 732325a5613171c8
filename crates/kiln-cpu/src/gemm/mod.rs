//! General matrix multiply: `C = alpha·A·B + beta·C`, with an optional fused epilogue.
//!
//! Operands are strided matrix views ([`MatRef`], [`MatMut`]): a transposed operand is a stride
//! swap, never a copy by the caller. A is f32; B (the weights) may be f32, f16 or bf16 and is
//! converted to f32 while it is packed; accumulation is f32.
//!
//! Public API (stable; other kernels and models call it):
//! * [`gemm`] — one matrix product.
//! * [`gemm_batched`] — a batch of products with a stride per batch.
use kiln_tensor::{Error, FloatElement, Result};

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
}

impl Default for GemmOptions<'_> {
    fn default() -> Self {
        GemmOptions {
            alpha: 1.0,
            beta: 0.0,
            epilogue: Epilogue::None,
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
    validate(&a, &b, &c, opts)?;
    reference_gemm(a, b, c, opts);
    Ok(())
}

fn validate<TB>(
    a: &MatRef<'_, f32>,
    b: &MatRef<'_, TB>,
    c: &MatMut<'_>,
    opts: &GemmOptions<'_>,
) -> Result<()> {
    if a.cols != b.rows || a.rows != c.rows || b.cols != c.cols {
        return Err(Error::invalid(format!(
            "gemm: A is {}x{}, B is {}x{}, C is {}x{}",
            a.rows, a.cols, b.rows, b.cols, c.rows, c.cols
        )));
    }
    a.check("A")?;
    b.check("B")?;
    c.check("C")?;
    if let Epilogue::Bias(bias) | Epilogue::BiasGelu(bias) = opts.epilogue {
        if bias.len() != c.cols {
            return Err(Error::shape("gemm bias", &[c.cols], &[bias.len()]));
        }
    }
    Ok(())
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

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const S: f32 = 0.797_884_56; // sqrt(2/pi)
    0.5 * x * (1.0 + (S * (x + 0.044715 * x * x * x)).tanh())
}

/// A batch of products: for `b in 0..batch`, `C_b = alpha·A_b·B_b + beta·C_b`, where operand
/// `X_b` is the view `X` shifted by `b · batch_stride_x` elements (a stride of 0 broadcasts).
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
    let MatMut {
        data,
        rows,
        cols,
        row_stride,
        col_stride,
    } = c;
    for bi in 0..batch {
        let sa = bi * batch_stride_a;
        let sb = bi * batch_stride_b;
        let sc = bi * batch_stride_c;
        if sa > a.data.len() || sb > b.data.len() || sc > data.len() {
            return Err(Error::invalid(format!(
                "gemm_batched: batch {bi} starts outside an operand"
            )));
        }
        let av = MatRef {
            data: &a.data[sa..],
            ..a
        };
        let bv = MatRef {
            data: &b.data[sb..],
            ..b
        };
        let cv = MatMut {
            data: &mut data[sc..],
            rows,
            cols,
            row_stride,
            col_stride,
        };
        gemm(av, bv, cv, opts)?;
    }
    Ok(())
}
