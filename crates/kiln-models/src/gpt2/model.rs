//! The GPT-2 forward pass, written against [`kiln_nn::backend::Backend`].
//!
//! Notation: `T` new positions, width `C`, `H` heads of width `D = C/H`, MLP width `F = 4C`,
//! vocabulary `V`. Activations are row-major `[T, ·]` f32.
//!
//! ```text
//! x      = wte[ids] + wpe[pos0 .. pos0+T]                       [T, C]
//! for each block:
//!   qkv  = ln_1(x) · W_attn + b_attn                             [T, 3C]
//!   a    = causal_attention(q, [K_cache; k], [V_cache; v])       [T, C]
//!   x   += a · W_proj + b_proj
//!   h    = gelu_tanh(ln_2(x) · W_fc + b_fc)                      [T, F]
//!   x   += h · W_mproj + b_mproj
//! logits = ln_f(x) · wteᵀ                                        [T, V]
//! ```
//!
//! Prefill runs the whole prompt through this once (`pos0 = 0`); each decode step runs it for
//! one position (`T = 1`) and attends to the keys and values the cache keeps.
use super::config::Gpt2Config;
use super::weights::Gpt2Weights;
use kiln_nn::backend::{ensure_len, Activation, Backend, CpuBackend, KvCache, LinearDims};
use kiln_tensor::{Error, Result};

/// A GPT-2 language model: config, weights in the backend's memory, and the backend its ops
/// run on.
pub struct Gpt2Model<B: Backend = CpuBackend> {
    pub config: Gpt2Config,
    pub weights: Gpt2Weights<B>,
    backend: B,
}

impl<B: Backend> std::fmt::Debug for Gpt2Model<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2Model")
            .field("config", &self.config)
            .field("dtype", &self.weights.dtype)
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// Which positions [`Gpt2Model::forward`] computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last new position (`[V]`): what generation needs.
    Last,
    /// Every new position (`[T, V]`).
    All,
}

/// Scratch activations of one forward pass, in the backend's memory, grown to the largest call
/// and reused.
struct Scratch<B: Backend> {
    x: B::Buf,
    h: B::Buf,
    qkv: B::Buf,
    att: B::Buf,
    mlp: B::Buf,
    logits: B::Buf,
}

impl<B: Backend> Scratch<B> {
    fn new(be: &B) -> Result<Self> {
        Ok(Scratch {
            x: be.zeros(0)?,
            h: be.zeros(0)?,
            qkv: be.zeros(0)?,
            att: be.zeros(0)?,
            mlp: be.zeros(0)?,
            logits: be.zeros(0)?,
        })
    }

    /// Room for `rows` positions of width `c`, MLP width `f`, and `logit_rows` rows of `v`
    /// logits.
    fn ensure(
        &mut self,
        be: &B,
        rows: usize,
        c: usize,
        f: usize,
        logit_rows: usize,
        v: usize,
    ) -> Result<()> {
        ensure_len(be, &mut self.x, rows * c)?;
        ensure_len(be, &mut self.h, rows * c)?;
        ensure_len(be, &mut self.qkv, rows * 3 * c)?;
        ensure_len(be, &mut self.att, rows * c)?;
        ensure_len(be, &mut self.mlp, rows * f)?;
        ensure_len(be, &mut self.logits, logit_rows * v)
    }
}

/// The per-sequence state: one KV cache per layer plus scratch buffers reused across calls,
/// all in the backend's memory.
pub struct Gpt2State<B: Backend = CpuBackend> {
    caches: Vec<KvCache<B>>,
    scratch: Scratch<B>,
}

impl<B: Backend> Clone for Scratch<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        Scratch {
            x: self.x.clone(),
            h: self.h.clone(),
            qkv: self.qkv.clone(),
            att: self.att.clone(),
            mlp: self.mlp.clone(),
            logits: self.logits.clone(),
        }
    }
}

/// A copy of the sequence (its caches), where the backend's buffers can be cloned.
impl<B: Backend> Clone for Gpt2State<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        Gpt2State {
            caches: self.caches.clone(),
            scratch: self.scratch.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Gpt2State<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2State")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<B: Backend> Gpt2State<B> {
    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, |c| c.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Positions the caches can hold.
    pub fn capacity(&self) -> usize {
        self.caches.first().map_or(0, |c| c.capacity)
    }
    /// Forgets the sequence (keeps the memory).
    pub fn clear(&mut self) {
        self.caches.iter_mut().for_each(KvCache::clear);
    }
    /// Keeps only the first `len` positions (e.g. to re-run a decode step).
    pub fn truncate(&mut self, len: usize) {
        self.caches.iter_mut().for_each(|c| c.truncate(len));
    }
    /// Bytes held by the KV caches.
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(KvCache::size_in_bytes).sum()
    }
}

impl Gpt2Model<CpuBackend> {
    /// A model on the CPU backend. Checks that the weights match the config.
    pub fn new(config: Gpt2Config, weights: Gpt2Weights<CpuBackend>) -> Result<Self> {
        Self::with_backend(config, weights, CpuBackend::default())
    }
}

impl<B: Backend> Gpt2Model<B> {
    /// A model whose ops run on `backend` (the weights must live in that backend's memory).
    pub fn with_backend(config: Gpt2Config, weights: Gpt2Weights<B>, backend: B) -> Result<Self> {
        config.validate()?;
        if weights.blocks.len() != config.n_layer {
            return Err(Error::invalid(format!(
                "the config has {} layers, the weights {}",
                config.n_layer,
                weights.blocks.len()
            )));
        }
        Ok(Gpt2Model {
            config,
            weights,
            backend,
        })
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend and the weights, the latter writable (an optimiser step).
    pub fn backend_and_weights_mut(&mut self) -> (&B, &mut Gpt2Weights<B>) {
        (&self.backend, &mut self.weights)
    }

    /// A state whose caches hold `capacity` positions (at most `n_positions`). The cache
    /// memory is allocated here, once; pages are touched only as positions are written.
    pub fn new_state(&self, capacity: usize) -> Result<Gpt2State<B>> {
        let cfg = &self.config;
        if capacity == 0 || capacity > cfg.n_positions {
            return Err(Error::Capacity(format!(
                "a KV cache of {capacity} positions: must be between 1 and n_positions ({})",
                cfg.n_positions
            )));
        }
        let be = &self.backend;
        let caches = (0..cfg.n_layer)
            .map(|_| KvCache::new(be, cfg.n_head, cfg.head_dim(), capacity))
            .collect::<Result<_>>()?;
        Ok(Gpt2State {
            caches,
            scratch: Scratch::new(be)?,
        })
    }

    /// Runs `ids` (the next `T` positions of the sequence `state` holds) through the model and
    /// writes logits to `logits`: `[V]` for [`Logits::Last`], `[T, V]` for [`Logits::All`].
    ///
    /// An empty `ids`, an id outside the vocabulary, or more positions than the cache or
    /// `n_positions` allow is an error and leaves `state` unchanged.
    pub fn forward(
        &self,
        ids: &[u32],
        state: &mut Gpt2State<B>,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        let (t, c, f, v) = (ids.len(), cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size);
        let pos0 = state.len();
        if t == 0 {
            return Err(Error::invalid("forward: no tokens to process"));
        }
        if pos0 + t > state.capacity() {
            return Err(Error::Capacity(format!(
                "{} positions (already {pos0} + {t} new) exceed the context of {} positions",
                pos0 + t,
                state.capacity()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= v) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {v} tokens"
            )));
        }
        let be = &self.backend;
        let w = &self.weights;
        let rows = match which {
            Logits::Last => 1,
            Logits::All => t,
        };
        let Gpt2State { caches, scratch: s } = state;
        s.ensure(be, t, c, f, rows, v)?;

        // x = wte[ids] + wpe[pos0 .. pos0 + T]
        let positions: Vec<u32> = (pos0..pos0 + t).map(|p| p as u32).collect();
        be.embedding(ids, &positions, &w.wte, &w.wpe, c, &mut s.x)?;

        self.blocks(s, t, false, |l, qkv, att| {
            be.attention(qkv, t, &mut [&mut caches[l]], att)
        })?;
        // logits = ln_f(x) · wteᵀ, for the rows asked for.
        let first = t - rows;
        if first > 0 {
            // Move the rows asked for to the front of h, then normalise them into x.
            be.copy(&s.x, first * c, &mut s.h, 0, rows * c)?;
            std::mem::swap(&mut s.x, &mut s.h);
        }
        self.head(s, rows, false, logits)
    }

    /// The transformer blocks over `rows` positions, `s.x` `[rows, C]` updated in place (`h`,
    /// `qkv`, `att`, `mlp` are scratch of `[rows, C]`, `[rows, 3C]`, `[rows, C]`, `[rows, F]`);
    /// `attend(layer, qkv, att)` runs layer `layer`'s attention against the right caches. With
    /// `invariant`, every row's products are bitwise those of the row alone (a batched decode
    /// step).
    fn blocks(
        &self,
        s: &mut Scratch<B>,
        rows: usize,
        invariant: bool,
        mut attend: impl FnMut(usize, &B::Buf, &mut B::Buf) -> Result<()>,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.config;
        let (c, f) = (cfg.n_embd, cfg.mlp_dim());
        let eps = cfg.layer_norm_epsilon;
        let Scratch {
            x,
            h,
            qkv,
            att,
            mlp,
            ..
        } = s;
        for (l, b) in self.weights.blocks.iter().enumerate() {
            // x += attn(ln_1(x)) · W_proj + b_proj
            be.layer_norm(x, &b.ln_1_w, &b.ln_1_b, h, rows, c, eps)?;
            let d = LinearDims::new(rows, c, 3 * c).rows_invariant(invariant);
            be.linear(h, &b.c_attn_w, Some(&b.c_attn_b), qkv, d, Activation::None)?;
            attend(l, qkv, att)?;
            let d = LinearDims::new(rows, c, c);
            be.linear(
                att,
                &b.attn_proj_w,
                Some(&b.attn_proj_b),
                h,
                d,
                Activation::None,
            )?;
            be.add(x, h, rows * c)?;
            // x += gelu(ln_2(x) · W_fc + b_fc) · W_mproj + b_mproj
            be.layer_norm(x, &b.ln_2_w, &b.ln_2_b, h, rows, c, eps)?;
            let d = LinearDims::new(rows, c, f).rows_invariant(invariant);
            be.linear(h, &b.fc_w, Some(&b.fc_b), mlp, d, Activation::GeluTanh)?;
            let d = LinearDims::new(rows, f, c);
            be.linear(
                mlp,
                &b.mlp_proj_w,
                Some(&b.mlp_proj_b),
                h,
                d,
                Activation::None,
            )?;
            be.add(x, h, rows * c)?;
        }
        Ok(())
    }

    /// `logits [rows, V] = ln_f(x) · wteᵀ` for the first `rows` rows of `s.x` (through `s.h`),
    /// downloaded into `out`.
    fn head(
        &self,
        s: &mut Scratch<B>,
        rows: usize,
        invariant: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let be = &self.backend;
        let w = &self.weights;
        let cfg = &self.config;
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        be.layer_norm(
            &s.x,
            &w.ln_f_w,
            &w.ln_f_b,
            &mut s.h,
            rows,
            c,
            cfg.layer_norm_epsilon,
        )?;
        let d = LinearDims::transposed(rows, c, v).rows_invariant(invariant);
        be.linear(&s.h, w.lm_head(), None, &mut s.logits, d, Activation::None)?;
        out.clear();
        out.resize(rows * v, 0.0);
        be.download(&s.logits, 0, out)
    }

    /// One decode step for `B` sequences at once: `ids[b]` is the next token of the sequence
    /// `states[b]` holds (each at its own position). Writes logits `[B, V]`.
    ///
    /// The linear layers run as `[B, C]` products, so the weights are streamed from memory once
    /// for all `B` sequences instead of once per sequence (decode is bound by those bytes); the
    /// attention runs per sequence on its own cache. The products are row-invariant
    /// ([`LinearDims::rows_invariant`]): up to `kiln_cpu::gemm::INVARIANT_ROWS` sequences, each
    /// sequence's logits are bitwise those of its own [`Gpt2Model::forward`] step. An empty batch, a length mismatch, an id
    /// outside the vocabulary or a full cache is an error and leaves every state unchanged.
    pub fn forward_batch(
        &self,
        ids: &[u32],
        states: &mut [&mut Gpt2State<B>],
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        let (bsz, c, f, v) = (ids.len(), cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size);
        if bsz == 0 || states.len() != bsz {
            return Err(Error::invalid(format!(
                "forward_batch: {bsz} tokens for {} sequences (one token per sequence, at least one)",
                states.len()
            )));
        }
        for (s, &id) in states.iter().zip(ids) {
            if s.len() + 1 > s.capacity() {
                return Err(Error::Capacity(format!(
                    "{} positions exceed the context of {} positions",
                    s.len() + 1,
                    s.capacity()
                )));
            }
            if id as usize >= v {
                return Err(Error::invalid(format!(
                    "token id {id} is outside the vocabulary of {v} tokens"
                )));
            }
        }
        let be = &self.backend;
        let w = &self.weights;
        // The batch's activations live in the first sequence's scratch.
        let (first, rest) = states.split_first_mut().expect("checked non-empty");
        let mut s = std::mem::replace(&mut first.scratch, Scratch::new(be)?);
        let result = (|| {
            s.ensure(be, bsz, c, f, bsz, v)?;
            // x[b] = wte[ids[b]] + wpe[pos_b]
            let positions: Vec<u32> = std::iter::once(&**first)
                .chain(rest.iter().map(|s| &**s))
                .map(|st| st.len() as u32)
                .collect();
            be.embedding(ids, &positions, &w.wte, &w.wpe, c, &mut s.x)?;
            self.blocks(&mut s, bsz, true, |l, qkv, att| {
                // Each sequence attends over its own cache.
                let mut caches: Vec<&mut KvCache<B>> = std::iter::once(&mut first.caches[l])
                    .chain(rest.iter_mut().map(|st| &mut st.caches[l]))
                    .collect();
                be.attention(qkv, 1, &mut caches, att)
            })?;
            self.head(&mut s, bsz, true, logits)
        })();
        first.scratch = s;
        result
    }

    /// Logits `[T, V]` of every position of `ids`, in one pass on a fresh state.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::invalid("logits of an empty sequence"));
        }
        if ids.len() > self.config.n_positions {
            return Err(Error::Capacity(format!(
                "{} tokens exceed the model's context of {} positions",
                ids.len(),
                self.config.n_positions
            )));
        }
        let mut state = self.new_state(ids.len())?;
        let mut out = Vec::new();
        self.forward(ids, &mut state, Logits::All, &mut out)?;
        Ok(out)
    }
}
