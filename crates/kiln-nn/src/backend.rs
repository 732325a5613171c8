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
use kiln_cpu::gemm::{self, Epilogue, GemmOptions, MatMut, MatRef};
use kiln_tensor::{DType, Error, Result, Tensor};

/// The elements of a weight matrix in one of the float storage dtypes.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl WeightData<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(s) => s.len(),
            WeightData::F16(s) => s.len(),
            WeightData::BF16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            WeightData::F32(_) => DType::F32,
            WeightData::F16(_) => DType::F16,
            WeightData::BF16(_) => DType::BF16,
        }
    }
    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightData::F32(s) => s[i],
            WeightData::F16(s) => s[i].to_f32(),
            WeightData::BF16(s) => s[i].to_f32(),
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

    /// Row gather: `out[i, :] = table[ids[i], :]`, or `+=` when `accumulate`. `table` is
    /// `[rows, width]`, `out` is `[ids.len(), width]`.
    fn embedding(
        &self,
        ids: &[u32],
        table: WeightView<'_>,
        accumulate: bool,
        out: &mut [f32],
    ) -> Result<()>;

    /// `x = gelu_tanh(x)` element-wise.
    fn gelu(&self, x: &mut [f32]) -> Result<()>;

    /// Row-wise softmax over rows of `cols` elements, in place.
    fn softmax(&self, x: &mut [f32], cols: usize) -> Result<()>;
}

/// The CPU backend: every op runs a `kiln-cpu` kernel on the current rayon pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

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
        let epilogue = match (bias, act) {
            (None, Activation::None) => Epilogue::None,
            (Some(b), Activation::None) => Epilogue::Bias(b),
            (Some(b), Activation::GeluTanh) => Epilogue::BiasGelu(b),
            (None, Activation::GeluTanh) => Epilogue::Gelu,
        };
        let opts = GemmOptions {
            epilogue,
            ..Default::default()
        };
        let a = MatRef::row_major(x, m, k);
        let c = MatMut::row_major(y, m, n);
        let (rs, cs) = (w.row_stride, w.col_stride);
        match w.data {
            WeightData::F32(d) => gemm::gemm(a, MatRef::strided(d, k, n, rs, cs), c, &opts),
            WeightData::F16(d) => gemm::gemm(a, MatRef::strided(d, k, n, rs, cs), c, &opts),
            WeightData::BF16(d) => gemm::gemm(a, MatRef::strided(d, k, n, rs, cs), c, &opts),
        }
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
        if n == 0 || beta.len() != n || x.len() % n != 0 || y.len() != x.len() {
            return Err(Error::invalid(format!(
                "layer_norm: x has {} elements, y {}, gamma {}, beta {}",
                x.len(),
                y.len(),
                gamma.len(),
                beta.len()
            )));
        }
        cpu_ops::layer_norm(x, gamma, beta, eps, y);
        Ok(())
    }

    fn attention(&self, qkv: &[f32], t: usize, cache: &mut KvCache, out: &mut [f32]) -> Result<()> {
        let c = cache.n_head * cache.head_dim;
        if out.len() != t * c {
            return Err(Error::shape("attention: output", &[t, c], &[out.len()]));
        }
        cache.append_from_qkv(qkv, t)?;
        cpu_ops::attention(qkv, t, cache, out);
        Ok(())
    }

    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::shape("add", &[x.len()], &[y.len()]));
        }
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: WeightView<'_>,
        accumulate: bool,
        out: &mut [f32],
    ) -> Result<()> {
        let width = table.cols;
        table.check("embedding: table")?;
        if out.len() != ids.len() * width {
            return Err(Error::shape(
                "embedding: output",
                &[ids.len(), width],
                &[out.len()],
            ));
        }
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= table.rows {
                return Err(Error::invalid(format!(
                    "embedding: id {id} is outside the table of {} rows",
                    table.rows
                )));
            }
            let row = &mut out[i * width..(i + 1) * width];
            for (j, o) in row.iter_mut().enumerate() {
                let v = table.data.get(id * table.row_stride + j * table.col_stride);
                *o = if accumulate { *o + v } else { v };
            }
        }
        Ok(())
    }

    fn gelu(&self, x: &mut [f32]) -> Result<()> {
        x.iter_mut().for_each(|v| *v = gemm::gelu_tanh(*v));
        Ok(())
    }

    fn softmax(&self, x: &mut [f32], cols: usize) -> Result<()> {
        if cols == 0 || x.len() % cols != 0 {
            return Err(Error::invalid(format!(
                "softmax: {} elements are not rows of {cols}",
                x.len()
            )));
        }
        x.chunks_exact_mut(cols).for_each(cpu_ops::softmax_row);
        Ok(())
    }
}

/// Plain loops for the ops whose `kiln-cpu` kernels are not wired in.
mod cpu_ops {
    use super::KvCache;
    use rayon::prelude::*;

    /// `y = (x − μ)/√(σ² + eps)·γ + β` per row, μ and σ² over the row (biased).
    pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) {
        let n = gamma.len();
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(yr, xr)| {
                let mean = xr.iter().sum::<f32>() / n as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for j in 0..n {
                    yr[j] = (xr[j] - mean) * rstd * gamma[j] + beta[j];
                }
            });
    }

    pub fn softmax_row(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }

    /// Attention of the last `t` cached positions (already appended) against the cache.
    pub fn attention(qkv: &[f32], t: usize, cache: &KvCache, out: &mut [f32]) {
        let (h, d, cap) = (cache.n_head, cache.head_dim, cache.capacity);
        let c = h * d;
        let start = cache.len - t;
        let scale = 1.0 / (d as f32).sqrt();
        out.par_chunks_mut(c).enumerate().for_each(|(i, orow)| {
            let p = start + i;
            let mut s = vec![0f32; p + 1];
            for head in 0..h {
                let q = &qkv[i * 3 * c + head * d..i * 3 * c + (head + 1) * d];
                let kh = &cache.k[head * cap * d..];
                let vh = &cache.v[head * cap * d..];
                for (j, sj) in s.iter_mut().enumerate() {
                    let k = &kh[j * d..(j + 1) * d];
                    *sj = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                }
                softmax_row(&mut s);
                let o = &mut orow[head * d..(head + 1) * d];
                o.iter_mut().for_each(|v| *v = 0.0);
                for (j, &w) in s.iter().enumerate() {
                    let v = &vh[j * d..(j + 1) * d];
                    o.iter_mut().zip(v).for_each(|(a, b)| *a += w * b);
                }
            }
        });
    }
}
