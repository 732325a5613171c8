//! The op interface models are written against.
//!
//! A model (GPT-2, DCGAN in `kiln-models`) calls only the methods of [`Backend`]. Everything a
//! model computes on lives in the backend's own buffers ([`Backend::Buf`]): weights (uploaded
//! once, at load, straight from the memory map), activations, gradients, optimiser moments and
//! key/value caches ([`KvCache`]). Data crosses between the host and the device only through
//! the few methods that say so — [`Backend::upload`], [`Backend::upload_into`],
//! [`Backend::upload_matrix`], [`Backend::download`], the token ids an embedding reads, and the
//! scalars a loss or a mean returns — so a GPU backend moves the new token id in and the logits
//! out of a decode step, and the batch in and the losses out of a training step, nothing else.
//!
//! Buffers are flat arrays; every op is told its sizes (row counts, a [`ConvGeometry`], a
//! [`BnShape`]) and checks that each buffer is at least as long as those sizes need, returning an
//! error rather than reading out of bounds. A buffer may be longer than an op needs (scratch is
//! allocated once for the largest call and reused): ops read and write its first elements.
//!
//! Backends: [`CpuBackend`] (the kernels of `kiln-cpu`; weights borrowed from the memory map or
//! kept in column panels) and [`CountingBackend`] (the CPU backend behind opaque buffers, which
//! counts every host↔device transfer; tests use it to prove that a graph keeps its data on the
//! device). A GPU device implements the same trait with its own kernels.
mod counting;
mod cpu;
pub mod weights;

pub use counting::{CountingBackend, OpaqueBuf, Transfers};
pub use cpu::{CpuBackend, CpuBuf};
pub use kiln_cpu::conv::{Conv2dParams, ConvGeometry};
pub use kiln_cpu::elementwise::activations::Activation as Pointwise;
pub use kiln_cpu::norm::batch_norm::BnShape;
pub use weights::{LinearWeight, WeightData, WeightView};

use crate::optim::AdamConfig;
use kiln_tensor::{DType, Error, Result, Tensor};

/// What follows the matrix product in [`Backend::linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    /// GELU, tanh approximation: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluTanh,
}

/// The shapes of one [`Backend::linear`] product `y[m, n] = x[m, k] · W`.
///
/// `W` is `[k, n]` row-major, or, with `w_transposed`, the transpose of a row-major `[n, k]`
/// matrix (a PyTorch `nn.Linear` weight `[out, in]`, or GPT-2's token table `[V, C]` used as its
/// output projection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub w_transposed: bool,
    /// Every row of `y` must be bitwise the product of its row of `x` alone (a batched decode
    /// step whose sequences must not depend on each other); off, a backend may sum in another
    /// order for speed.
    pub rows_invariant: bool,
}

impl LinearDims {
    /// `x [m, k] · W [k, n]`.
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        LinearDims {
            m,
            k,
            n,
            w_transposed: false,
            rows_invariant: false,
        }
    }
    /// `x [m, k] · Wᵀ` with `W` stored `[n, k]`.
    pub fn transposed(m: usize, k: usize, n: usize) -> Self {
        LinearDims {
            w_transposed: true,
            ..Self::new(m, k, n)
        }
    }
    /// The same product with [`LinearDims::rows_invariant`] set to `on`.
    pub fn rows_invariant(self, on: bool) -> Self {
        LinearDims {
            rows_invariant: on,
            ..self
        }
    }

    /// Elements of `x`, `W` and `y`.
    pub fn lens(&self) -> Result<(usize, usize, usize)> {
        let mul = |a: usize, b: usize| {
            a.checked_mul(b)
                .ok_or_else(|| Error::invalid(format!("linear: {self:?} overflows")))
        };
        Ok((
            mul(self.m, self.k)?,
            mul(self.k, self.n)?,
            mul(self.m, self.n)?,
        ))
    }
}

/// How [`Backend::upload_matrix`] stores a weight matrix `[rows, cols]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixOptions {
    /// Element dtype on the device; `None` keeps the tensor's (zero-copy where the device can
    /// read the host's memory).
    pub dtype: Option<DType>,
    /// The products will read the matrix transposed (`x · Wᵀ`, [`LinearDims::transposed`]):
    /// a token table `[V, C]` that is also the output projection. A backend may lay it out for
    /// that use.
    pub used_transposed: bool,
    /// Allow a layout made for streaming (the CPU backend's column panels for 16-bit weights);
    /// false keeps the tensor's row-major layout.
    pub streaming_layout: bool,
}

impl MatrixOptions {
    /// Checks a weight matrix for [`Backend::upload_matrix`]: 2 dimensions, a float dtype, and
    /// a float dtype to keep it as. Returns `[rows, cols]` and that dtype.
    pub fn check(&self, t: &Tensor) -> Result<([usize; 2], DType)> {
        let [rows, cols] = match t.dims() {
            [r, c] => [*r, *c],
            d => {
                return Err(Error::invalid(format!(
                    "a weight matrix must have 2 dimensions, found {d:?}"
                )))
            }
        };
        if !t.dtype().is_float() {
            return Err(Error::invalid(format!(
                "a weight matrix must be f32, f16 or bf16, found {}",
                t.dtype()
            )));
        }
        let dtype = self.dtype.unwrap_or(t.dtype());
        if !dtype.is_float() {
            return Err(Error::invalid(format!(
                "a weight matrix can be kept as f32, f16 or bf16, not {dtype}"
            )));
        }
        Ok(([rows, cols], dtype))
    }
}

impl Default for MatrixOptions {
    fn default() -> Self {
        MatrixOptions {
            dtype: None,
            used_transposed: false,
            streaming_layout: true,
        }
    }
}

/// What a buffer holds, for reports and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufInfo {
    pub dtype: DType,
    /// Elements.
    pub len: usize,
    /// Bytes one full read of the buffer streams.
    pub bytes: usize,
    /// The buffer borrows the host memory it was made from (the checkpoint's memory map).
    pub borrowed: bool,
}

/// Where the gradients of [`Backend::linear_backward`], [`Backend::conv_backward`] and
/// [`Backend::batch_norm_backward`] go. `dx` is always overwritten; the parameter gradients
/// `dw` and `db` are overwritten, or added to with `accumulate` (PyTorch's `.grad`
/// accumulation across backward passes).
pub struct Grads<'a, B: Backend> {
    pub dx: Option<&'a mut B::Buf>,
    pub dw: Option<&'a mut B::Buf>,
    pub db: Option<&'a mut B::Buf>,
    pub accumulate: bool,
}

impl<B: Backend> Grads<'_, B> {
    /// No gradient at all.
    pub fn none() -> Self {
        Grads {
            dx: None,
            dw: None,
            db: None,
            accumulate: false,
        }
    }
}

/// Keys and values of one attention layer for one sequence, in the backend's memory.
///
/// `k` and `v` are `[n_head, capacity, head_dim]`; positions `0..len` are filled. Appending
/// beyond `capacity` is an error, never a reallocation.
pub struct KvCache<B: Backend> {
    pub n_head: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub len: usize,
    pub k: B::Buf,
    pub v: B::Buf,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `capacity` positions.
    pub fn new(be: &B, n_head: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        let n = n_head
            .checked_mul(head_dim)
            .and_then(|x| x.checked_mul(capacity))
            .ok_or_else(|| Error::Capacity("KV cache size overflows".into()))?;
        Ok(KvCache {
            n_head,
            head_dim,
            capacity,
            len: 0,
            k: be.zeros(n)?,
            v: be.zeros(n)?,
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
        2 * self.n_head * self.capacity * self.head_dim * 4
    }

    /// Checks that `t` more positions fit, before anything is written.
    pub fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::Capacity(format!(
                "KV cache full: {} positions held, {t} more do not fit in {}",
                self.len, self.capacity
            )));
        }
        Ok(())
    }
}

impl<B: Backend> Clone for KvCache<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        KvCache {
            k: self.k.clone(),
            v: self.v.clone(),
            ..*self
        }
    }
}

impl<B: Backend> std::fmt::Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("n_head", &self.n_head)
            .field("head_dim", &self.head_dim)
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .finish()
    }
}

/// The arithmetic of products with bf16 weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// Activations stay f32; bf16 weights are widened to f32 (exact) and every product is f32.
    #[default]
    F32,
    /// Products of at least `kiln_cpu::gemm::AMX_MIN_M` rows (a prompt's prefill, a batched
    /// decode step of that many sequences) round the activations to bf16 and run on the CPU's
    /// native bf16 arithmetic — AMX tiles, else AVX512-BF16 — with f32 sums, as PyTorch's bf16
    /// model does; fewer rows (a single sequence's decode step), and every product on a CPU with
    /// neither, are as [`MatmulPrecision::F32`]. f32 and f16 weights are unaffected.
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

/// The ops a model needs, on one device. See the module docs for the buffer rules.
///
/// Shapes are stated per method; "at least" lengths are checked and the first elements used.
pub trait Backend: Send + Sync + Sized {
    /// A flat array in the device's memory: f32 for activations, gradients and optimiser state;
    /// any float dtype and layout for a weight matrix made by [`Backend::upload_matrix`].
    type Buf: Send + Sync;

    /// A short name for messages (`cpu`, `cuda`, ...).
    fn name(&self) -> &'static str;

    // ---- memory and transfers ----

    /// A new f32 buffer of `len` zeros (no host data crosses).
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A new f32 buffer holding `data` (host → device).
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Writes `data` into `dst[offset..offset + data.len()]` (host → device).
    fn upload_into(&self, data: &[f32], dst: &mut Self::Buf, offset: usize) -> Result<()>;
    /// Reads `src[offset..offset + out.len()]` into `out` (device → host), widening a 16-bit
    /// buffer to f32.
    fn download(&self, src: &Self::Buf, offset: usize, out: &mut [f32]) -> Result<()>;
    /// A 2-D weight tensor `[rows, cols]` (f32, f16 or bf16, possibly borrowed from a memory
    /// map) as a device matrix for products, embeddings and downloads (host → device).
    fn upload_matrix(&self, t: &Tensor, opts: &MatrixOptions) -> Result<Self::Buf>;
    /// dtype, length, bytes of a buffer.
    fn info(&self, buf: &Self::Buf) -> BufInfo;
    /// Makes the device read every page of a buffer borrowed from host memory now (the CPU
    /// backend touches the memory map's pages so that the first forward pass does not pay the
    /// page faults). Default: nothing.
    fn prefault(&self, _buf: &Self::Buf) {}
    /// `dst[dst_offset..][..len] = src[src_offset..][..len]` on the device (f32 buffers).
    fn copy(
        &self,
        src: &Self::Buf,
        src_offset: usize,
        dst: &mut Self::Buf,
        dst_offset: usize,
        len: usize,
    ) -> Result<()>;
    /// `x[..len] = value`.
    fn fill(&self, x: &mut Self::Buf, len: usize, value: f32) -> Result<()>;
    /// `x[..len] *= s`.
    fn scale(&self, x: &mut Self::Buf, len: usize, s: f32) -> Result<()>;
    /// `x[..len] += y[..len]`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;

    // ---- transformer ops ----

    /// `out[i, :] = tokens[ids[i], :] + pos_table[positions[i], :]` for `i < ids.len()`: `tokens`
    /// `[V, dim]` (a matrix uploaded with `used_transposed` may be kept as its transpose),
    /// `pos_table` `[P, dim]`, `out` `[ids.len(), dim]`. The ids and positions come from the
    /// host. An id ≥ V or a position ≥ P is an error.
    fn embedding(
        &self,
        ids: &[u32],
        positions: &[u32],
        tokens: &Self::Buf,
        pos_table: &Self::Buf,
        dim: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `y[m, n] = act(x[m, k] · W + bias[n])` (`W` as [`LinearDims`] says).
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        y: &mut Self::Buf,
        dims: LinearDims,
        act: Activation,
    ) -> Result<()>;

    /// Backward of `y = x · W + b` from `dy [m, n]`: `dx [m, k] = dy · Wᵀ`,
    /// `dW = xᵀ · dy` (`[k, n]`; `[n, k]` = `dyᵀ · x` for a transposed `W`), `db [n] = Σ_m dy`.
    fn linear_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dims: LinearDims,
        grads: Grads<'_, Self>,
    ) -> Result<()>;

    /// Row-wise layer norm of `x [rows, dim]`:
    /// `y = (x − mean) / √(var + eps) · gamma + beta` (biased variance).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        y: &mut Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()>;

    /// Causal self-attention of `t` new positions for each of `caches.len()` sequences.
    ///
    /// `qkv` is `[S·t, 3·C]` (the `t` rows of sequence `s` at rows `s·t..`; queries, keys and
    /// values side by side, head `h` at columns `h·D..(h+1)·D` of each third). The new keys and
    /// values of sequence `s` are appended to `caches[s]`; then for its new position at absolute
    /// index `p = len − t + i`, `out[s·t + i, h·D..] = softmax_j≤p(q·k_jᵀ / √D) · v_j` over that
    /// cache's positions `j ≤ p` (the causal mask aligned bottom-right). `out` is `[S·t, C]`.
    /// Prefill is one sequence with `t` = prompt length; a batched decode step is `S` sequences
    /// with `t = 1`. A full cache is an error before anything is written.
    fn attention(
        &self,
        qkv: &Self::Buf,
        t: usize,
        caches: &mut [&mut KvCache<Self>],
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `x[..len] = gelu_tanh(x[..len])`.
    fn gelu(&self, x: &mut Self::Buf, len: usize) -> Result<()>;

    /// Row-wise softmax of `x [rows, cols]`, in place.
    fn softmax(&self, x: &mut Self::Buf, rows: usize, cols: usize) -> Result<()>;

    // ---- transformer training ----

    /// [`Backend::layer_norm`] that also saves each row's `mean` and `rstd = 1/√(var + eps)`
    /// (`[rows]` each) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_train(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()>;

    /// Backward of [`Backend::layer_norm_train`] from `dy [rows, dim]`: with `x̂ = (x − mean)·rstd`
    /// and `g = gamma·dy`, `dx = (g − mean(g) − x̂·mean(g·x̂))·rstd`, `dgamma` (as `dw`)
    /// `= Σ_rows dy·x̂`, `dbeta` (as `db`) `= Σ_rows dy`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        dy: &Self::Buf,
        rows: usize,
        dim: usize,
        grads: Grads<'_, Self>,
    ) -> Result<()>;

    /// `y[..len] = gelu_tanh(x[..len])` (`x` kept for the backward pass).
    fn gelu_forward(&self, x: &Self::Buf, y: &mut Self::Buf, len: usize) -> Result<()>;

    /// `dx[..len] = gelu_tanh'(x)·dy`.
    fn gelu_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        len: usize,
    ) -> Result<()>;

    /// Causal self-attention of `batch` whole sequences of `seq` positions, for training:
    /// `qkv [batch·seq, 3·C]` (as [`Backend::attention`] lays it out, `C = heads·head_dim`) →
    /// `out [batch·seq, C]`, and each query row's log-sum-exp of its scaled scores
    /// `lse [batch, heads, seq]` for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn attention_train(
        &self,
        qkv: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Backward of [`Backend::attention_train`] from `dout [batch·seq, C]`: `dqkv [batch·seq,
    /// 3·C]` (overwritten), recomputing the probabilities from `qkv` and `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        qkv: &Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        lse: &Self::Buf,
        dqkv: &mut Self::Buf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Mean cross-entropy of the softmax of `logits [rows, vocab]` against `targets` (host ids,
    /// one per row); comes back to the host. With `dscale`, each row of `logits` is overwritten
    /// by `(softmax − onehot(target))·dscale` — the gradient, in place, with no separate
    /// probability tensor.
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf,
        targets: &[u32],
        rows: usize,
        vocab: usize,
        dscale: Option<f32>,
    ) -> Result<f32>;

    /// Backward of [`Backend::embedding`]: `dtokens[ids[i]] += dout[i]`,
    /// `dpos[positions[i]] += dout[i]` (accumulates, rows in order).
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        ids: &[u32],
        positions: &[u32],
        dout: &Self::Buf,
        dtokens: &mut Self::Buf,
        dpos: &mut Self::Buf,
        dim: usize,
    ) -> Result<()>;

    /// `Σ x²` over every element of every buffer (in order, f64 sums): one scalar back to the
    /// host. The global gradient norm is its square root.
    fn sum_squares(&self, xs: &[&Self::Buf]) -> Result<f64>;

    /// Inverted dropout in place: each element of `x[..len]` is zeroed with probability `p` and
    /// the others scaled by `1/(1 − p)`; the mask is a pure function of `(seed, element)`, so
    /// [`Backend::dropout_backward`] with the same seed applies the same mask.
    fn dropout(&self, x: &mut Self::Buf, len: usize, p: f32, seed: u64) -> Result<()>;

    /// The gradient of [`Backend::dropout`]: the same mask and scale applied to `dy` in place.
    fn dropout_backward(&self, dy: &mut Self::Buf, len: usize, p: f32, seed: u64) -> Result<()> {
        self.dropout(dy, len, p, seed)
    }

    // ---- convolutional nets ----

    /// A convolution (`g.transposed` false: `x` is the image side `[N, Cb, Hb, Wb]`, `y` the
    /// patch side) or a transposed convolution (true: `x` the patch side, `y` the image side),
    /// `w` `[Cs, Cb/G, kh, kw]` (PyTorch's layout for both), `bias` `[C_out]`.
    fn conv(
        &self,
        g: &ConvGeometry,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of [`Backend::conv`] from `dy` (the output's shape): `dx` (the input's shape),
    /// `dw` (the weight's), `db` `[C_out]`.
    fn conv_backward(
        &self,
        g: &ConvGeometry,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        grads: Grads<'_, Self>,
    ) -> Result<()>;

    /// Training-mode batch norm of `x [N, C, HW]`: normalises with the batch statistics
    /// (biased variance), saves each channel's `mean` and `rstd = 1/√(var + eps)` for the
    /// backward pass, and updates the running statistics (`r ← (1 − momentum)·r +
    /// momentum·stat`, unbiased variance) when given.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train(
        &self,
        s: &BnShape,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running: Option<(&mut Self::Buf, &mut Self::Buf)>,
        momentum: f32,
        eps: f32,
        y: &mut Self::Buf,
        saved_mean: &mut Self::Buf,
        saved_rstd: &mut Self::Buf,
    ) -> Result<()>;

    /// Eval-mode batch norm: `y = gamma·(x − running_mean)/√(running_var + eps) + beta`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_eval(
        &self,
        s: &BnShape,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        eps: f32,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of [`Backend::batch_norm_train`] from `dy`: `dx`, `dgamma` (as `dw`), `dbeta`
    /// (as `db`).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        s: &BnShape,
        x: &Self::Buf,
        dy: &Self::Buf,
        gamma: &Self::Buf,
        saved_mean: &Self::Buf,
        saved_rstd: &Self::Buf,
        grads: Grads<'_, Self>,
    ) -> Result<()>;

    /// `y[..len] = f(x[..len])` for a point-wise activation.
    fn pointwise(&self, act: Pointwise, x: &Self::Buf, y: &mut Self::Buf, len: usize)
        -> Result<()>;

    /// `y[..len] = f(y[..len])` in place.
    fn pointwise_inplace(&self, act: Pointwise, y: &mut Self::Buf, len: usize) -> Result<()>;

    /// `dx[..len] = dy · f'` from the forward output `y`.
    fn pointwise_backward(
        &self,
        act: Pointwise,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        len: usize,
    ) -> Result<()>;

    /// Mean binary cross-entropy of probabilities `p[..len]` against `target[..len]`, each log
    /// clamped at −100 (PyTorch's `binary_cross_entropy`); the loss comes back to the host.
    fn bce(&self, p: &Self::Buf, target: &Self::Buf, len: usize) -> Result<f32>;

    /// `dp[..len] = dloss · ∂L/∂p` of [`Backend::bce`].
    fn bce_backward(
        &self,
        p: &Self::Buf,
        target: &Self::Buf,
        dloss: f32,
        dp: &mut Self::Buf,
        len: usize,
    ) -> Result<()>;

    /// The mean of `x[..len]` (comes back to the host).
    fn mean(&self, x: &Self::Buf, len: usize) -> Result<f32>;

    /// One Adam / AdamW update (step number `step ≥ 1`) of every parameter from its gradient,
    /// with the moments `m`, `v` (one buffer each per parameter, same lengths), in PyTorch's
    /// order (see [`crate::optim`]).
    fn adam(
        &self,
        cfg: &AdamConfig,
        step: u64,
        params: &mut [&mut Self::Buf],
        grads: &[&Self::Buf],
        m: &mut [&mut Self::Buf],
        v: &mut [&mut Self::Buf],
    ) -> Result<()>;
}

/// `buf` read back whole as host f32 values.
pub fn download_all<B: Backend>(be: &B, buf: &B::Buf) -> Result<Vec<f32>> {
    let mut out = vec![0f32; be.info(buf).len];
    be.download(buf, 0, &mut out)?;
    Ok(out)
}

/// Grows `buf` to at least `len` elements (a new zeroed buffer when it is shorter; never
/// shrinks). Scratch kept across calls uses this.
pub fn ensure_len<B: Backend>(be: &B, buf: &mut B::Buf, len: usize) -> Result<()> {
    if be.info(buf).len < len {
        *buf = be.zeros(len)?;
    }
    Ok(())
}
