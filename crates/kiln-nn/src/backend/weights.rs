//! CPU-side weight matrices: a [`WeightView`] is a strided `[rows, cols]` view of f32/f16/bf16
//! data or a 16-bit [`PanelMatrix`]; a [`LinearWeight`] is how the CPU backend keeps a matrix
//! (a tensor as the checkpoint stores it, possibly borrowed from the memory map, or 16-bit
//! column panels).
use half::{bf16, f16};
use kiln_cpu::gemm::{MatRef, PanelMatrix};
use kiln_tensor::{DType, Error, Result, Tensor};

/// The elements of a weight matrix in one of the float storage dtypes: a plain slice (indexed
/// through the view's strides), or a 16-bit matrix in column panels ([`PanelMatrix`], indexed
/// as its row-major `[k, n]`: element `i` is `(i / n, i % n)`).
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    PanelsBF16(&'a PanelMatrix<bf16>),
    PanelsF16(&'a PanelMatrix<f16>),
}

impl WeightData<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(s) => s.len(),
            WeightData::F16(s) => s.len(),
            WeightData::BF16(s) => s.len(),
            WeightData::PanelsBF16(p) => p.rows() * p.cols(),
            WeightData::PanelsF16(p) => p.rows() * p.cols(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            WeightData::F32(_) => DType::F32,
            WeightData::F16(_) | WeightData::PanelsF16(_) => DType::F16,
            WeightData::BF16(_) | WeightData::PanelsBF16(_) => DType::BF16,
        }
    }
    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightData::F32(s) => s[i],
            WeightData::F16(s) => s[i].to_f32(),
            WeightData::BF16(s) => s[i].to_f32(),
            WeightData::PanelsBF16(p) => p.get(i / p.cols(), i % p.cols()),
            WeightData::PanelsF16(p) => p.get(i / p.cols(), i % p.cols()),
        }
    }

    /// The panel matrix's `(k, n)`, when the data is one.
    pub(crate) fn panel_dims(&self) -> Option<(usize, usize)> {
        match self {
            WeightData::PanelsBF16(p) => Some((p.rows(), p.cols())),
            WeightData::PanelsF16(p) => Some((p.rows(), p.cols())),
            _ => None,
        }
    }
}

/// A linear layer's weight `[in, out]` as a model keeps it: a tensor as the checkpoint stores
/// it (possibly borrowed from the memory map), or 16-bit weights laid out in column panels for
/// streaming (see `kiln_cpu::gemm::panels`: the M = 1 product of a decode step reads them as a
/// few long sequential streams).
#[derive(Clone, Debug)]
pub enum LinearWeight {
    Dense(Tensor),
    PanelsBF16(PanelMatrix<bf16>),
    PanelsF16(PanelMatrix<f16>),
}

impl LinearWeight {
    /// `t` (`[in, out]`, any float dtype) converted to `dtype` (bf16 or f16; other dtypes are
    /// an error) and laid out in column panels: one pass over `t`, in parallel over panels.
    pub fn panels(t: &Tensor, dtype: DType) -> Result<Self> {
        Self::from_view(WeightView::from_tensor(t)?, dtype)
    }

    /// The transpose of `t` (`[rows, cols]` → `[cols, rows]`) converted to `dtype` (bf16 or f16)
    /// in column panels: a token table `[V, C]` becomes its output projection `[C, V]`, each
    /// panel 32 contiguous rows of `t`.
    pub fn panels_of_transpose(t: &Tensor, dtype: DType) -> Result<Self> {
        Self::from_view(WeightView::from_tensor(t)?.t(), dtype)
    }

    /// The matrix `v` (a dense view, any strides) converted to `dtype` in column panels.
    fn from_view(v: WeightView<'_>, dtype: DType) -> Result<Self> {
        fn build<T: kiln_tensor::FloatElement>(v: &WeightView<'_>) -> Result<PanelMatrix<T>> {
            let (k, n, rs, cs) = (v.rows, v.cols, v.row_stride, v.col_stride);
            match v.data {
                WeightData::F32(d) => PanelMatrix::from_view(&MatRef::strided(d, k, n, rs, cs)),
                WeightData::F16(d) => PanelMatrix::from_view(&MatRef::strided(d, k, n, rs, cs)),
                WeightData::BF16(d) => PanelMatrix::from_view(&MatRef::strided(d, k, n, rs, cs)),
                _ => Err(Error::invalid("a tensor view is never a panel matrix")),
            }
        }
        match dtype {
            DType::BF16 => Ok(LinearWeight::PanelsBF16(build(&v)?)),
            DType::F16 => Ok(LinearWeight::PanelsF16(build(&v)?)),
            other => Err(Error::invalid(format!(
                "column panels hold bf16 or f16 weights, not {other}"
            ))),
        }
    }

    /// The weight as a view for [`Backend::linear`].
    pub fn view(&self) -> Result<WeightView<'_>> {
        match self {
            LinearWeight::Dense(t) => WeightView::from_tensor(t),
            LinearWeight::PanelsBF16(p) => Ok(WeightView::panels(WeightData::PanelsBF16(p))),
            LinearWeight::PanelsF16(p) => Ok(WeightView::panels(WeightData::PanelsF16(p))),
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            LinearWeight::Dense(t) => match t.dims() {
                [r, c] => [*r, *c],
                _ => [0, 0],
            },
            LinearWeight::PanelsBF16(p) => [p.rows(), p.cols()],
            LinearWeight::PanelsF16(p) => [p.rows(), p.cols()],
        }
    }

    /// The element dtype.
    pub fn dtype(&self) -> DType {
        match self {
            LinearWeight::Dense(t) => t.dtype(),
            LinearWeight::PanelsBF16(_) => DType::BF16,
            LinearWeight::PanelsF16(_) => DType::F16,
        }
    }

    /// Bytes of the `in × out` elements: what one product streams.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.size_in_bytes(),
            LinearWeight::PanelsBF16(p) => p.matrix_bytes(),
            LinearWeight::PanelsF16(p) => p.matrix_bytes(),
        }
    }

    /// Whether the weight borrows the checkpoint's bytes (zero-copy).
    pub fn is_borrowed(&self) -> bool {
        matches!(self, LinearWeight::Dense(t) if t.is_borrowed())
    }

    /// The tensor, when the weight is kept as one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            LinearWeight::Dense(t) => Some(t),
            _ => None,
        }
    }
}

/// A strided weight matrix `[rows, cols]`: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
///
/// GPT-2's Conv1D weights are stored `[in, out]` row-major and are used as they are
/// ([`WeightView::row_major`]); the tied output projection `wteᵀ` is `row_major(wte, V, C).t()`.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub data: WeightData<'a>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> WeightView<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: WeightData<'a>, rows: usize, cols: usize) -> Self {
        WeightView {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A view of a panel matrix (`data` is [`WeightData::PanelsBF16`] or
    /// [`WeightData::PanelsF16`]) as its `[k, n]`; it can be used by [`Backend::linear`] as it is,
    /// not transposed.
    pub fn panels(data: WeightData<'a>) -> Self {
        let (k, n) = data.panel_dims().unwrap_or((0, 0));
        Self::row_major(data, k, n)
    }

    /// A view of a contiguous 2-D float tensor (no copy).
    pub fn from_tensor(t: &'a Tensor) -> Result<Self> {
        let (rows, cols) = match t.dims() {
            [r, c] => (*r, *c),
            d => {
                return Err(Error::invalid(format!(
                    "a weight matrix must have 2 dimensions, found {d:?}"
                )))
            }
        };
        let data = match t.dtype() {
            DType::F32 => WeightData::F32(t.as_slice::<f32>()?),
            DType::F16 => WeightData::F16(t.as_slice::<f16>()?),
            DType::BF16 => WeightData::BF16(t.as_slice::<bf16>()?),
            other => {
                return Err(Error::invalid(format!(
                    "a weight matrix must be f32, f16 or bf16, found {other}"
                )))
            }
        };
        Ok(Self::row_major(data, rows, cols))
    }

    /// The transpose (a stride swap).
    pub fn t(self) -> Self {
        WeightView {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Bytes one full read of the matrix streams from memory.
    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.cols * self.data.dtype().size_in_bytes()
    }

    /// Checks that every element lies inside the data.
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        if let Some((k, n)) = self.data.panel_dims() {
            if (self.rows, self.cols, self.row_stride, self.col_stride) != (k, n, n, 1) {
                return Err(Error::invalid(format!(
                    "{what}: a {k}x{n} panel matrix can only be used as it is (not transposed or \
                     re-strided)"
                )));
            }
            return Ok(());
        }
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|a| a.checked_add((self.cols - 1).checked_mul(self.col_stride)?));
        match last {
            Some(l) if l < self.data.len() => Ok(()),
            _ => Err(Error::invalid(format!(
                "{what}: a {}x{} view (strides {}, {}) exceeds its {} elements",
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
                self.data.len()
            ))),
        }
    }
}
