//! The op interface models are written against.
//!
//! A model (GPT-2 in `kiln-models`) calls only the methods of [`Backend`]: a handful of ops over
//! plain f32 activation slices, weight views ([`WeightView`]: f32, f16 or bf16 with strides) and
//! a key/value cache ([`KvCache`]). [`CpuBackend`] implements them with the kernels of
//! `kiln-cpu`; a GPU device implements the same trait with its own kernels.
//!
//! Shapes are given by the slice lengths plus the few sizes each op needs; every method checks
//! them and returns an error rather than reading out of bounds.
use half::{bf16, f16};
use kiln_cpu::attention::{attention_forward, AttentionOptions, HeadsMut, HeadsRef};
use kiln_cpu::elementwise::add::add_inplace;
use kiln_cpu::elementwise::embedding::embedding_forward;
use kiln_cpu::elementwise::gelu::gelu_inplace;
use kiln_cpu::elementwise::softmax::softmax_rows_inplace;
use kiln_cpu::gemm::{self, Epilogue, GemmOptions, MatMut, MatRef, PanelMatrix};
use kiln_cpu::norm::layer_norm::layer_norm_forward;
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
    fn panel_dims(&self) -> Option<(usize, usize)> {
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
    fn check(&self, what: &str) -> Result<()> {
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

/// What follows the matrix product in [`Backend::linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    /// GELU, tanh approximation: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluTanh,
}

/// Keys and values of one attention layer for one sequence, in preallocated memory.
///
/// `k` and `v` are `[n_head, capacity, head_dim]`; positions `0..len` are filled. Appending
/// beyond `capacity` is an error, never a reallocation.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub n_head: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub len: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvCache {
    /// An empty cache for `capacity` positions.
    pub fn new(n_head: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        let n = n_head
            .checked_mul(head_dim)
            .and_then(|x| x.checked_mul(capacity))
            .ok_or_else(|| Error::Capacity("KV cache size overflows".into()))?;
        Ok(KvCache {
            n_head,
            head_dim,
            capacity,
            len: 0,
            k: vec![0.0; n],
            v: vec![0.0; n],
        })
    }

    /// Forgets every position (the memory is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps only the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by keys and values.
    pub fn size_in_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
    }

    /// Copies `t` new positions from the fused `qkv` rows `[t, 3·C]` (keys at columns `C..2C`,
    /// values at `2C..3C`, head `h` at `h·D..(h+1)·D` of each) into positions `len..len + t`.
    pub fn append_from_qkv(&mut self, qkv: &[f32], t: usize) -> Result<()> {
        let (h, d) = (self.n_head, self.head_dim);
        let c = h * d;
        if qkv.len() != t * 3 * c {
            return Err(Error::shape(
                "KV cache append: qkv",
                &[t, 3 * c],
                &[qkv.len()],
            ));
        }
        if self.len + t > self.capacity {
            return Err(Error::Capacity(format!(
                "KV cache full: {} positions held, {t} more do not fit in {}",
                self.len, self.capacity
            )));
        }
        for i in 0..t {
            let row = &qkv[i * 3 * c..(i + 1) * 3 * c];
            let pos = self.len + i;
            for head in 0..h {
                let dst = (head * self.capacity + pos) * d;
                self.k[dst..dst + d].copy_from_slice(&row[c + head * d..c + (head + 1) * d]);
                self.v[dst..dst + d]
                    .copy_from_slice(&row[2 * c + head * d..2 * c + (head + 1) * d]);
            }
        }
        self.len += t;
        Ok(())
    }
}

/// The ops a transformer forward pass needs. Activations are row-major f32 slices.
pub trait Backend: Send + Sync {
    /// A short name for messages (`cpu`, ...).
    fn name(&self) -> &'static str;

    /// `y[m, n] = act(x[m, k] · w[k, n] + bias[n])`; `x` is `[m, k]` row-major, `y` `[m, n]`.
    fn linear(
        &self,
        x: &[f32],
        m: usize,
        w: WeightView<'_>,
        bias: Option<&[f32]>,
        act: Activation,
        y: &mut [f32],
    ) -> Result<()>;

    /// Row-wise layer norm over rows of `gamma.len()` elements:
    /// `y = (x − mean) / √(var + eps) · gamma + beta` (biased variance).
    fn layer_norm(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
    ) -> Result<()>;

    /// Causal self-attention of `t` new positions of one sequence.
    ///
    /// `qkv` is `[t, 3·C]` (queries, keys, values side by side, head `h` at columns
    /// `h·D..(h+1)·D` of each third). The new keys and values are appended to `cache`; then for
    /// the new position at absolute index `p = cache.len − t + i`,
    /// `out[i, h·D..] = softmax_j≤p(q·k_jᵀ / √D) · v_j` over the cached positions `j ≤ p`
    /// (the causal mask aligned bottom-right). `out` is `[t, C]`. Prefill is `t` = prompt
    /// length on an empty cache; a decode step is `t = 1`.
    fn attention(&self, qkv: &[f32], t: usize, cache: &mut KvCache, out: &mut [f32]) -> Result<()>;

    /// `x += y` element-wise.
    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()>;

    /// Token plus position embeddings: `out[i, :] = tokens[ids[i], :] + positions[pos_start + i, :]`.
    /// `tokens` is `[V, C]`, `positions` `[P, C]`, `out` `[ids.len(), C]`. An id ≥ V or a
    /// position ≥ P is an error.
    fn embedding(
        &self,
        ids: &[u32],
        tokens: WeightView<'_>,
        positions: WeightView<'_>,
        pos_start: usize,
        out: &mut [f32],
    ) -> Result<()>;

    /// `x = gelu_tanh(x)` element-wise.
    fn gelu(&self, x: &mut [f32]) -> Result<()>;

    /// Row-wise softmax over rows of `cols` elements, in place.
    fn softmax(&self, x: &mut [f32], cols: usize) -> Result<()>;
}

/// `out[t] = wte[ids[t]] + wpe[pos_start + t]` where the token table `[V, C]` is the transpose of
/// a `[C, V]` panel matrix (the tied output projection kept in column panels): each row is a
/// column gather. `positions` must be dense and row-major.
fn embedding_from_panels(
    ids: &[u32],
    tokens: WeightView<'_>,
    k: usize,
    n: usize,
    positions: WeightView<'_>,
    pos_start: usize,
    out: &mut [f32],
) -> Result<()> {
    if (
        tokens.rows,
        tokens.cols,
        tokens.row_stride,
        tokens.col_stride,
    ) != (n, k, 1, n)
    {
        return Err(Error::invalid(
            "embedding: a panel token table must be the transpose of its [C, V] panel matrix",
        ));
    }
    positions.check("embedding: position table")?;
    let dense = positions.col_stride == 1 && positions.row_stride == positions.cols;
    if positions.cols != k || !dense || positions.data.panel_dims().is_some() {
        return Err(Error::invalid(format!(
            "embedding: the position table must be a dense row-major [P, {k}]"
        )));
    }
    if out.len() != ids.len() * k {
        return Err(Error::shape(
            "embedding: out",
            &[ids.len(), k],
            &[out.len()],
        ));
    }
    for (t, (&id, o)) in ids.iter().zip(out.chunks_exact_mut(k.max(1))).enumerate() {
        let pos = pos_start + t;
        if id as usize >= n || pos >= positions.rows {
            return Err(Error::invalid(format!(
                "embedding: token {id} at position {pos} is outside the tables ({n} tokens, {} positions)",
                positions.rows
            )));
        }
        match tokens.data {
            WeightData::PanelsBF16(p) => p.column(id as usize, o),
            WeightData::PanelsF16(p) => p.column(id as usize, o),
            _ => unreachable!("checked to be panels"),
        }
        for (c, v) in o.iter_mut().enumerate() {
            *v += positions.data.get(pos * k + c);
        }
    }
    Ok(())
}

/// The CPU backend: every op runs a `kiln-cpu` kernel on the current rayon pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend {
    matmul_precision: MatmulPrecision,
}

/// The arithmetic of products with bf16 weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// Activations stay f32; bf16 weights are widened to f32 (exact) and every product is f32.
    #[default]
    F32,
    /// Products of at least [`gemm::AMX_MIN_M`] rows (a prompt's prefill, a batched decode step
    /// of that many sequences) round the activations to bf16 and run on the CPU's native bf16
    /// arithmetic — AMX tiles, else AVX512-BF16 — with f32 sums, as PyTorch's bf16 model does;
    /// fewer rows (a single sequence's decode step), and every product on a CPU with neither,
    /// are as [`MatmulPrecision::F32`]. f32 and f16 weights are unaffected.
    Bf16,
}

impl MatmulPrecision {
    /// `"f32"` or `"bf16"`.
    pub fn parse(s: &str) -> Option<MatmulPrecision> {
        match s {
            "f32" => Some(MatmulPrecision::F32),
            "bf16" => Some(MatmulPrecision::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

impl CpuBackend {
    /// A backend whose bf16-weight products use `precision`.
    pub fn with_matmul_precision(precision: MatmulPrecision) -> CpuBackend {
        CpuBackend {
            matmul_precision: precision,
        }
    }

    pub fn matmul_precision(&self) -> MatmulPrecision {
        self.matmul_precision
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn linear(
        &self,
        x: &[f32],
        m: usize,
        w: WeightView<'_>,
        bias: Option<&[f32]>,
        act: Activation,
        y: &mut [f32],
    ) -> Result<()> {
        let (k, n) = (w.rows, w.cols);
        if x.len() != m * k {
            return Err(Error::shape("linear: input", &[m, k], &[x.len()]));
        }
        if y.len() != m * n {
            return Err(Error::shape("linear: output", &[m, n], &[y.len()]));
        }
        w.check("linear: weight")?;
        // Bias and GELU ride in the GEMM's epilogue: one pass over y.
        let gelu = act == Activation::GeluTanh;
        let epilogue = match (bias, gelu) {
            (None, false) => Epilogue::None,
            (None, true) => Epilogue::Gelu,
            (Some(b), false) => Epilogue::Bias(b),
            (Some(b), true) => Epilogue::BiasGelu(b),
        };
        let opts = GemmOptions {
            epilogue,
            ..Default::default()
        };
        let a = MatRef::row_major(x, m, k);
        let c = MatMut::row_major(y, m, n);
        let (rs, cs) = (w.row_stride, w.col_stride);
        let bf16_products = self.matmul_precision == MatmulPrecision::Bf16;
        match w.data {
            WeightData::F32(d) => gemm::gemm(a, MatRef::strided(d, k, n, rs, cs), c, &opts),
            WeightData::F16(d) => gemm::gemm(a, MatRef::strided(d, k, n, rs, cs), c, &opts),
            WeightData::BF16(d) if bf16_products => {
                gemm::gemm_bf16_compute(a, MatRef::strided(d, k, n, rs, cs), c, &opts)
            }
            WeightData::BF16(d) => gemm::gemm(a, MatRef::strided(d, k, n, rs, cs), c, &opts),
            WeightData::PanelsBF16(p) if bf16_products => {
                gemm::gemm_bf16_compute_panels(a, p, c, &opts)
            }
            WeightData::PanelsBF16(p) => gemm::gemm_panel_matrix(a, p, c, &opts),
            WeightData::PanelsF16(p) => gemm::gemm_panel_matrix(a, p, c, &opts),
        }?;
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
    ) -> Result<()> {
        let n = gamma.len();
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(Error::invalid(format!(
                "layer_norm: {} elements are not rows of {n}",
                x.len()
            )));
        }
        layer_norm_forward(x, gamma, beta, x.len() / n, n, eps, y, None, None)
    }

    fn attention(&self, qkv: &[f32], t: usize, cache: &mut KvCache, out: &mut [f32]) -> Result<()> {
        let (h, d, cap) = (cache.n_head, cache.head_dim, cache.capacity);
        if out.len() != t * h * d {
            return Err(Error::shape("attention: output", &[t, h * d], &[out.len()]));
        }
        cache.append_from_qkv(qkv, t)?;
        // The new queries, read in place from the fused projection; keys and values from the
        // cache, `[1, H, len, D]` with a head stride of `capacity·D`.
        let q = HeadsRef::fused_qkv(qkv, 1, t, h, d, 0)?;
        let cached = |data| HeadsRef {
            data,
            batch: 1,
            heads: h,
            seq: cache.len,
            head_dim: d,
            stride_batch: h * cap * d,
            stride_head: cap * d,
            stride_seq: d,
        };
        let o = HeadsMut::seq_major(out, 1, t, h, d);
        attention_forward(
            q,
            cached(&cache.k[..]),
            cached(&cache.v[..]),
            o,
            AttentionOptions::causal(),
        )
    }

    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()> {
        add_inplace(x, y)
    }

    fn embedding(
        &self,
        ids: &[u32],
        tokens: WeightView<'_>,
        positions: WeightView<'_>,
        pos_start: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let dim = tokens.cols;
        if let Some((k, n)) = tokens.data.panel_dims() {
            return embedding_from_panels(ids, tokens, k, n, positions, pos_start, out);
        }
        tokens.check("embedding: token table")?;
        positions.check("embedding: position table")?;
        if positions.cols != dim {
            return Err(Error::shape(
                "embedding: position table",
                &[positions.rows, dim],
                &[positions.rows, positions.cols],
            ));
        }
        let dense = |w: &WeightView<'_>| w.col_stride == 1 && w.row_stride == w.cols;
        if !(dense(&tokens) && dense(&positions)) {
            return Err(Error::invalid("embedding: tables must be row-major"));
        }
        let (n, t) = (ids.len(), tokens.rows * dim);
        let p = positions.rows * dim;
        match (tokens.data, positions.data) {
            (WeightData::F32(a), WeightData::F32(b)) => {
                embedding_forward(ids, n, &a[..t], &b[..p], pos_start, dim, out)
            }
            (WeightData::BF16(a), WeightData::BF16(b)) => {
                embedding_forward(ids, n, &a[..t], &b[..p], pos_start, dim, out)
            }
            (WeightData::F16(a), WeightData::F16(b)) => {
                embedding_forward(ids, n, &a[..t], &b[..p], pos_start, dim, out)
            }
            _ => Err(Error::invalid(
                "embedding: token and position tables must have the same dtype",
            )),
        }
    }

    fn gelu(&self, x: &mut [f32]) -> Result<()> {
        gelu_inplace(x);
        Ok(())
    }

    fn softmax(&self, x: &mut [f32], cols: usize) -> Result<()> {
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(Error::invalid(format!(
                "softmax: {} elements are not rows of {cols}",
                x.len()
            )));
        }
        softmax_rows_inplace(x, x.len() / cols, cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.max(1);
        (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    }

    /// A `[V, C]` token table held as its transpose in column panels embeds exactly as the
    /// dense table, and serves as the output projection `[C, V]` of `linear`.
    #[test]
    fn panel_token_table_embeds_and_projects_as_the_dense_one() {
        let (v, c, p) = (70, 24, 9);
        let wte: Vec<bf16> = table(v, c, 3).into_iter().map(bf16::from_f32).collect();
        let wpe: Vec<bf16> = table(p, c, 4).into_iter().map(bf16::from_f32).collect();
        let t = Tensor::from_slice(&wte, vec![v, c]).unwrap();
        let panels = LinearWeight::panels_of_transpose(&t, DType::BF16).unwrap();
        assert_eq!(panels.dims(), [c, v]);
        let dense_rows = WeightView::row_major(WeightData::BF16(&wte), v, c);
        let pos = WeightView::row_major(WeightData::BF16(&wpe), p, c);
        let ids = [0u32, 69, 5, 31, 32, 64];
        let be = CpuBackend::default();
        let mut want = vec![0f32; ids.len() * c];
        be.embedding(&ids, dense_rows, pos, 2, &mut want).unwrap();
        let mut got = vec![f32::NAN; ids.len() * c];
        be.embedding(&ids, panels.view().unwrap().t(), pos, 2, &mut got)
            .unwrap();
        assert_eq!(got, want);
        // Out of range: token, position; a panel table not transposed.
        assert!(be
            .embedding(&[70], panels.view().unwrap().t(), pos, 0, &mut got[..c])
            .is_err());
        assert!(be
            .embedding(&[1], panels.view().unwrap().t(), pos, 9, &mut got[..c])
            .is_err());
        assert!(be
            .embedding(&[1], panels.view().unwrap(), pos, 0, &mut got[..c])
            .is_err());
        // The projection: x·wteᵀ from panels equals the dense transposed view.
        let x = table(3, c, 5);
        let mut a = vec![0f32; 3 * v];
        let mut b = vec![0f32; 3 * v];
        be.linear(&x, 3, dense_rows.t(), None, Activation::None, &mut a)
            .unwrap();
        be.linear(
            &x,
            3,
            panels.view().unwrap(),
            None,
            Activation::None,
            &mut b,
        )
        .unwrap();
        for (g, w) in b.iter().zip(&a) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
        // A transposed panel view is refused by linear.
        assert!(be
            .linear(
                &x[..v],
                1,
                panels.view().unwrap().t(),
                None,
                Activation::None,
                &mut b[..c]
            )
            .is_err());
    }
}
