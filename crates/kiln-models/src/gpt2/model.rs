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
use super::weights::{view, Gpt2Weights};
use kiln_nn::backend::{Activation, Backend, CpuBackend, KvCache};
use kiln_tensor::{Error, Result};

/// A GPT-2 language model: config, weights and the backend its ops run on.
pub struct Gpt2Model {
    pub config: Gpt2Config,
    pub weights: Gpt2Weights,
    backend: Box<dyn Backend>,
}

impl std::fmt::Debug for Gpt2Model {
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

/// The per-sequence state: one KV cache per layer plus scratch buffers reused across calls.
#[derive(Debug, Clone)]
pub struct Gpt2State {
    caches: Vec<KvCache>,
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    mlp: Vec<f32>,
}

impl Gpt2State {
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

/// Grows `v` to at least `n` elements (never shrinks) and returns its first `n`.
fn scratch(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

impl Gpt2Model {
    /// A model on the CPU backend. Checks that the weights match the config.
    pub fn new(config: Gpt2Config, weights: Gpt2Weights) -> Result<Self> {
        Self::with_backend(config, weights, Box::new(CpuBackend::default()))
    }

    /// A model whose ops run on `backend`.
    pub fn with_backend(
        config: Gpt2Config,
        weights: Gpt2Weights,
        backend: Box<dyn Backend>,
    ) -> Result<Self> {
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

    /// A state whose caches hold `capacity` positions (at most `n_positions`). The cache
    /// memory is allocated here, once; pages are touched only as positions are written.
    pub fn new_state(&self, capacity: usize) -> Result<Gpt2State> {
        let cfg = &self.config;
        if capacity == 0 || capacity > cfg.n_positions {
            return Err(Error::Capacity(format!(
                "a KV cache of {capacity} positions: must be between 1 and n_positions ({})",
                cfg.n_positions
            )));
        }
        let caches = (0..cfg.n_layer)
            .map(|_| KvCache::new(cfg.n_head, cfg.head_dim(), capacity))
            .collect::<Result<_>>()?;
        Ok(Gpt2State {
            caches,
            x: Vec::new(),
            h: Vec::new(),
            qkv: Vec::new(),
            att: Vec::new(),
            mlp: Vec::new(),
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
        state: &mut Gpt2State,
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
        let be = &*self.backend;
        let w = &self.weights;
        let Gpt2State {
            caches,
            x,
            h,
            qkv,
            att,
            mlp,
        } = state;
        let x = scratch(x, t * c);
        let h = scratch(h, t * c);
        let qkv = scratch(qkv, t * 3 * c);
        let att = scratch(att, t * c);
        let mlp = scratch(mlp, t * f);

        // x = wte[ids] + wpe[pos0 .. pos0 + T]
        be.embedding(ids, w.wte.rows_view()?, view(&w.wpe)?, pos0, x)?;

        self.blocks(x, h, qkv, att, mlp, t, |l, qkv, att| {
            be.attention(qkv, t, &mut caches[l], att)
        })?;
        // logits = ln_f(x) · wteᵀ, for the rows asked for.
        let rows = match which {
            Logits::Last => 1,
            Logits::All => t,
        };
        let first = t - rows;
        self.head(&x[first * c..], &mut h[..rows * c], rows, logits)?;
        Ok(())
    }

    /// The transformer blocks over `rows` positions, `x` `[rows, C]` updated in place (`h`,
    /// `qkv`, `att`, `mlp` are scratch of `[rows, C]`, `[rows, 3C]`, `[rows, C]`, `[rows, F]`);
    /// `attend(layer, qkv, att)` runs layer `layer`'s attention against the right caches.
    #[allow(clippy::too_many_arguments)]
    fn blocks(
        &self,
        x: &mut [f32],
        h: &mut [f32],
        qkv: &mut [f32],
        att: &mut [f32],
        mlp: &mut [f32],
        rows: usize,
        mut attend: impl FnMut(usize, &[f32], &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let be = &*self.backend;
        let eps = self.config.layer_norm_epsilon;
        for (l, b) in self.weights.blocks.iter().enumerate() {
            // x += attn(ln_1(x)) · W_proj + b_proj
            be.layer_norm(x, &b.ln_1_w, &b.ln_1_b, eps, h)?;
            be.linear(
                h,
                rows,
                b.c_attn_w.view()?,
                Some(&b.c_attn_b),
                Activation::None,
                qkv,
            )?;
            attend(l, qkv, att)?;
            be.linear(
                att,
                rows,
                b.attn_proj_w.view()?,
                Some(&b.attn_proj_b),
                Activation::None,
                h,
            )?;
            be.add(x, h)?;
            // x += gelu(ln_2(x) · W_fc + b_fc) · W_mproj + b_mproj
            be.layer_norm(x, &b.ln_2_w, &b.ln_2_b, eps, h)?;
            be.linear(
                h,
                rows,
                b.fc_w.view()?,
                Some(&b.fc_b),
                Activation::GeluTanh,
                mlp,
            )?;
            be.linear(
                mlp,
                rows,
                b.mlp_proj_w.view()?,
                Some(&b.mlp_proj_b),
                Activation::None,
                h,
            )?;
            be.add(x, h)?;
        }
        Ok(())
    }

    /// `logits [rows, V] = ln_f(xs) · wteᵀ` for `xs` `[rows, C]` (`hs` scratch of the same size).
    fn head(&self, xs: &[f32], hs: &mut [f32], rows: usize, logits: &mut Vec<f32>) -> Result<()> {
        let be = &*self.backend;
        let w = &self.weights;
        be.layer_norm(xs, &w.ln_f_w, &w.ln_f_b, self.config.layer_norm_epsilon, hs)?;
        logits.clear();
        logits.resize(rows * self.config.vocab_size, 0.0);
        be.linear(
            hs,
            rows,
            w.lm_head().projection_view()?,
            None,
            Activation::None,
            logits,
        )
    }

    /// One decode step for `B` sequences at once: `ids[b]` is the next token of the sequence
    /// `states[b]` holds (each at its own position). Writes logits `[B, V]`.
    ///
    /// The linear layers run as `[B, C]` products, so the weights are streamed from memory once
    /// for all `B` sequences instead of once per sequence (decode is bound by those bytes); the
    /// attention runs per sequence on its own cache. An empty batch, a length mismatch, an id
    /// outside the vocabulary or a full cache is an error and leaves every state unchanged.
    pub fn forward_batch(
        &self,
        ids: &[u32],
        states: &mut [&mut Gpt2State],
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
        let be = &*self.backend;
        let w = &self.weights;
        let mut x = vec![0f32; bsz * c];
        let mut h = vec![0f32; bsz * c];
        let mut qkv = vec![0f32; bsz * 3 * c];
        let mut att = vec![0f32; bsz * c];
        let mut mlp = vec![0f32; bsz * f];

        // x[b] = wte[ids[b]] + wpe[pos_b]
        for (b, s) in states.iter().enumerate() {
            be.embedding(
                &ids[b..b + 1],
                w.wte.rows_view()?,
                view(&w.wpe)?,
                s.len(),
                &mut x[b * c..(b + 1) * c],
            )?;
        }
        self.blocks(
            &mut x,
            &mut h,
            &mut qkv,
            &mut att,
            &mut mlp,
            bsz,
            |l, qkv, att| {
                // Each sequence attends over its own cache.
                for (b, s) in states.iter_mut().enumerate() {
                    be.attention(
                        &qkv[b * 3 * c..(b + 1) * 3 * c],
                        1,
                        &mut s.caches[l],
                        &mut att[b * c..(b + 1) * c],
                    )?;
                }
                Ok(())
            },
        )?;
        self.head(&x, &mut h, bsz, logits)?;
        Ok(())
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
