//! GPT-2 training: the forward pass over whole sequences that keeps what the backward pass
//! needs, the backward pass through every layer, and AdamW — written against
//! [`kiln_nn::backend::Backend`], so every device trains with this one graph.
//!
//! Notation as in [`super::model`]: batch `B`, sequence `T`, `N = B·T` rows, width `C`, `H`
//! heads of `D = C/H`, MLP width `F`, vocabulary `V`. Forward (per layer `l`, `x` the residual
//! stream entering it):
//!
//! ```text
//! x₀      = wte[ids] + wpe[0..T]                          (dropout)            [N, C]
//! ln1     = LN(x; γ1, β1)      (saves mean1, rstd1)
//! qkv     = ln1 · W_attn + b_attn                                              [N, 3C]
//! att     = causal_attention(qkv)   (saves lse [B, H, T])                      [N, C]
//! res2    = x + dropout(att · W_proj + b_proj)
//! ln2     = LN(res2; γ2, β2)
//! fch     = ln2 · W_fc + b_fc                                                  [N, F]
//! fchg    = gelu(fch)
//! res3    = res2 + dropout(fchg · W_mproj + b_mproj)        = x of layer l + 1
//! lnf     = LN(res3 of the last layer; γf, βf)
//! logits  = lnf · wteᵀ                                                         [N, V]
//! loss    = mean_i CE(softmax(logits_i), target_i)
//! ```
//!
//! Backward, from `dlogits = (softmax − onehot)/N` (written over the logits in place):
//!
//! ```text
//! dlnf  = dlogits · wte          dwte += dlogitsᵀ · lnf          (the tied head)
//! dx    = LN_backward(dlnf)                                      (dγf, dβf)
//! per layer, last first:   dres3 = dx
//!   dfchg = dres3' · W_mprojᵀ    dW_mproj += fchgᵀ·dres3'   db_mproj += Σ dres3'
//!   dfch  = gelu'(fch) ⊙ dfchg
//!   dln2  = dfch · W_fcᵀ         dW_fc += ln2ᵀ·dfch          db_fc += Σ dfch
//!   dres2 = dres3 + LN_backward(dln2)
//!   datt  = dres2' · W_projᵀ     dW_proj += attᵀ·dres2'      db_proj += Σ dres2'
//!   dqkv  = attention_backward(datt)
//!   dln1  = dqkv · W_attnᵀ       dW_attn += ln1ᵀ·dqkv        db_attn += Σ dqkv
//!   dx    = dres2 + LN_backward(dln1)
//! dwte[ids] += dx, dwpe[0..T] += dx                              (the embeddings)
//! ```
//! (`'` marks the gradient through the branch's dropout mask, when there is one.) Every
//! parameter gradient accumulates (`+=`), so micro-batches of one step add up; the step starts
//! by zeroing them. The token table's gradient is the sum of the head's and the embedding's.
//!
//! AdamW (decoupled weight decay on the matrices and embedding tables, none on biases and
//! layer-norm parameters, as nanoGPT), with global-norm clipping before the update.
use super::config::Gpt2Config;
use super::init::layout;
use super::model::Gpt2Model;
use super::weights::{BlockWeights, Gpt2Weights};
use kiln_nn::backend::{ensure_len, Activation, Backend, Grads, LinearDims};
use kiln_nn::optim::AdamConfig;
use kiln_tensor::{DType, Error, Result};

/// The per-layer activations the backward pass reads.
struct LayerActs<B: Backend> {
    ln1: B::Buf,
    ln1_mean: B::Buf,
    ln1_rstd: B::Buf,
    qkv: B::Buf,
    att: B::Buf,
    lse: B::Buf,
    res2: B::Buf,
    ln2: B::Buf,
    ln2_mean: B::Buf,
    ln2_rstd: B::Buf,
    fch: B::Buf,
    fchg: B::Buf,
    res3: B::Buf,
}

/// Every activation of one forward pass over `[B, T]`, and the backward pass's scratch.
struct Acts<B: Backend> {
    /// `(B, T)` the buffers are sized for.
    shape: (usize, usize),
    encoded: B::Buf,
    layers: Vec<LayerActs<B>>,
    lnf: B::Buf,
    lnf_mean: B::Buf,
    lnf_rstd: B::Buf,
    /// Logits `[N, V]`; after the loss, their gradient.
    logits: B::Buf,
    /// A projection's output before it joins the residual stream `[N, C]`.
    proj: B::Buf,
    // Backward scratch.
    dres: B::Buf,
    dtmp: B::Buf,
    dbranch: B::Buf,
    dln: B::Buf,
    datt: B::Buf,
    dqkv: B::Buf,
    dfchg: B::Buf,
    dfch: B::Buf,
}

impl<B: Backend> Acts<B> {
    fn new(be: &B, cfg: &Gpt2Config) -> Result<Self> {
        let z = || be.zeros(0);
        let layers = (0..cfg.n_layer)
            .map(|_| {
                Ok(LayerActs {
                    ln1: z()?,
                    ln1_mean: z()?,
                    ln1_rstd: z()?,
                    qkv: z()?,
                    att: z()?,
                    lse: z()?,
                    res2: z()?,
                    ln2: z()?,
                    ln2_mean: z()?,
                    ln2_rstd: z()?,
                    fch: z()?,
                    fchg: z()?,
                    res3: z()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Acts {
            shape: (0, 0),
            encoded: z()?,
            layers,
            lnf: z()?,
            lnf_mean: z()?,
            lnf_rstd: z()?,
            logits: z()?,
            proj: z()?,
            dres: z()?,
            dtmp: z()?,
            dbranch: z()?,
            dln: z()?,
            datt: z()?,
            dqkv: z()?,
            dfchg: z()?,
            dfch: z()?,
        })
    }

    /// Room for `[b, t]`.
    fn ensure(&mut self, be: &B, cfg: &Gpt2Config, b: usize, t: usize) -> Result<()> {
        if self.shape == (b, t) {
            return Ok(());
        }
        let (c, f, v, h) = (cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size, cfg.n_head);
        let n = b * t;
        for (buf, len) in [
            (&mut self.encoded, n * c),
            (&mut self.lnf, n * c),
            (&mut self.lnf_mean, n),
            (&mut self.lnf_rstd, n),
            (&mut self.logits, n * v),
            (&mut self.proj, n * c),
            (&mut self.dres, n * c),
            (&mut self.dtmp, n * c),
            (&mut self.dbranch, n * c),
            (&mut self.dln, n * c),
            (&mut self.datt, n * c),
            (&mut self.dqkv, n * 3 * c),
            (&mut self.dfchg, n * f),
            (&mut self.dfch, n * f),
        ] {
            ensure_len(be, buf, len)?;
        }
        for a in &mut self.layers {
            for (buf, len) in [
                (&mut a.ln1, n * c),
                (&mut a.ln1_mean, n),
                (&mut a.ln1_rstd, n),
                (&mut a.qkv, n * 3 * c),
                (&mut a.att, n * c),
                (&mut a.lse, b * h * t),
                (&mut a.res2, n * c),
                (&mut a.ln2, n * c),
                (&mut a.ln2_mean, n),
                (&mut a.ln2_rstd, n),
                (&mut a.fch, n * f),
                (&mut a.fchg, n * f),
                (&mut a.res3, n * c),
            ] {
                ensure_len(be, buf, len)?;
            }
        }
        self.shape = (b, t);
        Ok(())
    }
}

/// Optimiser hyper-parameters of one step (the learning rate comes from the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global-norm clipping threshold; 0 turns clipping off.
    pub grad_clip: f64,
}

impl Default for AdamW {
    /// nanoGPT's: β = (0.9, 0.95), eps 1e-8, weight decay 0.1, clipping at 1.0.
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// A GPT-2 with everything training needs, in the backend's memory: the model (its weights
/// trainable f32 buffers), the gradients, AdamW's moments, and the activations.
pub struct Gpt2Trainer<B: Backend> {
    pub model: Gpt2Model<B>,
    pub grads: Gpt2Weights<B>,
    /// AdamW's first and second moments, one buffer per parameter.
    pub m: Gpt2Weights<B>,
    pub v: Gpt2Weights<B>,
    /// Optimiser steps taken.
    pub step: u64,
    /// Dropout probability at the embeddings and on the residual branches (0: none).
    pub dropout: f32,
    acts: Acts<B>,
}

/// f32 zeros shaped like every parameter of `cfg`.
fn zeros_like<B: Backend>(be: &B, cfg: &Gpt2Config) -> Result<Gpt2Weights<B>> {
    from_tensors(be, cfg, |_, shape| Ok(vec![0.0; shape.iter().product()]))
}

/// Weights whose every tensor (in the checkpoint layout's order, Hub names) is an owned f32
/// buffer made from `f(name, shape)`.
pub fn from_tensors<B: Backend>(
    be: &B,
    cfg: &Gpt2Config,
    mut f: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>,
) -> Result<Gpt2Weights<B>> {
    let mut bufs = Vec::new();
    for (name, shape, _) in layout(cfg) {
        let v = f(&name, &shape)?;
        if v.len() != shape.iter().product::<usize>() {
            return Err(Error::shape(format!("tensor `{name}`"), &shape, &[v.len()]));
        }
        bufs.push(be.upload(&v)?);
    }
    let mut it = bufs.into_iter();
    let mut next = || it.next().expect("layout gives every tensor");
    let (wte, wpe) = (next(), next());
    let blocks = (0..cfg.n_layer)
        .map(|_| BlockWeights {
            ln_1_w: next(),
            ln_1_b: next(),
            c_attn_w: next(),
            c_attn_b: next(),
            attn_proj_w: next(),
            attn_proj_b: next(),
            ln_2_w: next(),
            ln_2_b: next(),
            fc_w: next(),
            fc_b: next(),
            mlp_proj_w: next(),
            mlp_proj_b: next(),
        })
        .collect();
    let (ln_f_w, ln_f_b) = (next(), next());
    Ok(Gpt2Weights {
        wte,
        wpe,
        blocks,
        ln_f_w,
        ln_f_b,
        lm_head: None,
        dtype: DType::F32,
    })
}

impl<B: Backend> Gpt2Weights<B> {
    /// Every tensor in the checkpoint layout's order (`wte`, `wpe`, each block's twelve,
    /// `ln_f`), as [`from_tensors`] builds them. The untied `lm_head`, if any, is not included.
    pub fn tensors(&self) -> Vec<&B::Buf> {
        let mut v = vec![&self.wte, &self.wpe];
        for b in &self.blocks {
            v.extend([
                &b.ln_1_w,
                &b.ln_1_b,
                &b.c_attn_w,
                &b.c_attn_b,
                &b.attn_proj_w,
                &b.attn_proj_b,
                &b.ln_2_w,
                &b.ln_2_b,
                &b.fc_w,
                &b.fc_b,
                &b.mlp_proj_w,
                &b.mlp_proj_b,
            ]);
        }
        v.extend([&self.ln_f_w, &self.ln_f_b]);
        v
    }

    /// [`Gpt2Weights::tensors`], writable.
    pub fn tensors_mut(&mut self) -> Vec<&mut B::Buf> {
        let mut v = vec![&mut self.wte, &mut self.wpe];
        for b in &mut self.blocks {
            v.extend([
                &mut b.ln_1_w,
                &mut b.ln_1_b,
                &mut b.c_attn_w,
                &mut b.c_attn_b,
                &mut b.attn_proj_w,
                &mut b.attn_proj_b,
                &mut b.ln_2_w,
                &mut b.ln_2_b,
                &mut b.fc_w,
                &mut b.fc_b,
                &mut b.mlp_proj_w,
                &mut b.mlp_proj_b,
            ]);
        }
        v.extend([&mut self.ln_f_w, &mut self.ln_f_b]);
        v
    }
}

/// The Hub names and shapes of every tensor, in [`Gpt2Weights::tensors`] order.
pub fn tensor_names(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    layout(cfg).into_iter().map(|(n, s, _)| (n, s)).collect()
}

/// Whether a tensor gets weight decay: matrices and embedding tables (two or more dimensions).
pub fn decays(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// A per-element seed for the dropout masks of one forward pass: step, micro-batch, site.
fn dropout_seed(base: u64, site: u64) -> u64 {
    base ^ site.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl<B: Backend> Gpt2Trainer<B> {
    /// A trainer for `model`, whose weights must be trainable f32 buffers (see
    /// [`from_tensors`]); gradients and moments start at zero.
    pub fn new(model: Gpt2Model<B>) -> Result<Self> {
        if model.weights.lm_head.is_some() {
            return Err(Error::invalid(
                "training needs the output projection tied to the token table (the checkpoint has \
                 a separate lm_head)",
            ));
        }
        let be = model.backend();
        let cfg = &model.config;
        for (t, (name, _)) in model.weights.tensors().iter().zip(tensor_names(cfg)) {
            let info = be.info(t);
            if info.dtype != DType::F32 || info.borrowed {
                return Err(Error::invalid(format!(
                    "training needs writable f32 weights; `{name}` is {} {}",
                    if info.borrowed { "borrowed" } else { "a" },
                    info.dtype
                )));
            }
        }
        Ok(Gpt2Trainer {
            grads: zeros_like(be, cfg)?,
            m: zeros_like(be, cfg)?,
            v: zeros_like(be, cfg)?,
            acts: Acts::new(be, cfg)?,
            step: 0,
            dropout: 0.0,
            model,
        })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.model.config
    }

    /// Sets every gradient to zero (the start of a step).
    pub fn zero_grads(&mut self) -> Result<()> {
        let be = self.model.backend();
        for g in self.grads.tensors_mut() {
            let n = be.info(g).len;
            be.fill(g, n, 0.0)?;
        }
        Ok(())
    }

    /// Checks a `[b, t + 1]` token batch and splits it into inputs, targets and positions.
    fn split(&self, tokens: &[u32], b: usize, t: usize) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        let cfg = &self.model.config;
        if b == 0 || t == 0 || tokens.len() != b * (t + 1) {
            return Err(Error::invalid(format!(
                "a batch of {} tokens is not [{b}, {t} + 1]",
                tokens.len()
            )));
        }
        if t > cfg.n_positions {
            return Err(Error::invalid(format!(
                "sequences of {t} tokens exceed the model's context of {} positions",
                cfg.n_positions
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                cfg.vocab_size
            )));
        }
        let mut ids = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for row in tokens.chunks_exact(t + 1) {
            ids.extend_from_slice(&row[..t]);
            targets.extend_from_slice(&row[1..]);
        }
        let positions = (0..b).flat_map(|_| 0..t as u32).collect();
        Ok((ids, targets, positions))
    }

    /// The forward pass over `tokens` `[b, t + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`),
    /// keeping every activation; returns the mean cross-entropy, the input ids and their
    /// positions. With `grad_scale`, the logits are replaced by `dloss/dlogits · grad_scale`
    /// (`dloss` of the mean over the `b·t` targets). `dropout_base` seeds the dropout masks.
    fn forward(
        &mut self,
        tokens: &[u32],
        b: usize,
        t: usize,
        grad_scale: Option<f32>,
        dropout_base: u64,
    ) -> Result<(f32, Vec<u32>, Vec<u32>)> {
        let (ids, targets, positions) = self.split(tokens, b, t)?;
        let dropout = self.dropout;
        let model = &self.model;
        let be = model.backend();
        let cfg = &model.config;
        let w = &model.weights;
        self.acts.ensure(be, cfg, b, t)?;
        let Acts {
            encoded,
            layers,
            lnf,
            lnf_mean,
            lnf_rstd,
            logits,
            proj,
            ..
        } = &mut self.acts;
        let (c, f, v, h) = (cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size, cfg.n_head);
        let n = b * t;
        let eps = cfg.layer_norm_epsilon;

        // x₀ = wte[ids] + wpe[positions]
        be.embedding(&ids, &positions, &w.wte, &w.wpe, c, encoded)?;
        if dropout > 0.0 {
            be.dropout(encoded, n * c, dropout, dropout_seed(dropout_base, 0))?;
        }
        for (l, blk) in w.blocks.iter().enumerate() {
            let (prev, cur) = layers.split_at_mut(l);
            let la = &mut cur[0];
            let x: &B::Buf = if l == 0 { encoded } else { &prev[l - 1].res3 };
            // ln1 = LN(x); qkv = ln1·W_attn + b_attn; att = causal attention
            be.layer_norm_train(
                x,
                &blk.ln_1_w,
                &blk.ln_1_b,
                &mut la.ln1,
                &mut la.ln1_mean,
                &mut la.ln1_rstd,
                n,
                c,
                eps,
            )?;
            let d = LinearDims::new(n, c, 3 * c);
            be.linear(
                &la.ln1,
                &blk.c_attn_w,
                Some(&blk.c_attn_b),
                &mut la.qkv,
                d,
                Activation::None,
            )?;
            be.attention_train(&la.qkv, &mut la.att, &mut la.lse, b, t, h, c / h)?;
            // res2 = x + dropout(att·W_proj + b_proj)
            let d = LinearDims::new(n, c, c);
            be.linear(
                &la.att,
                &blk.attn_proj_w,
                Some(&blk.attn_proj_b),
                proj,
                d,
                Activation::None,
            )?;
            if dropout > 0.0 {
                be.dropout(
                    proj,
                    n * c,
                    dropout,
                    dropout_seed(dropout_base, 1 + 2 * l as u64),
                )?;
            }
            be.copy(x, 0, &mut la.res2, 0, n * c)?;
            be.add(&mut la.res2, proj, n * c)?;
            // fchg = gelu(LN(res2)·W_fc + b_fc)
            be.layer_norm_train(
                &la.res2,
                &blk.ln_2_w,
                &blk.ln_2_b,
                &mut la.ln2,
                &mut la.ln2_mean,
                &mut la.ln2_rstd,
                n,
                c,
                eps,
            )?;
            let d = LinearDims::new(n, c, f);
            be.linear(
                &la.ln2,
                &blk.fc_w,
                Some(&blk.fc_b),
                &mut la.fch,
                d,
                Activation::None,
            )?;
            be.gelu_forward(&la.fch, &mut la.fchg, n * f)?;
            // res3 = res2 + dropout(fchg·W_mproj + b_mproj)
            let d = LinearDims::new(n, f, c);
            be.linear(
                &la.fchg,
                &blk.mlp_proj_w,
                Some(&blk.mlp_proj_b),
                proj,
                d,
                Activation::None,
            )?;
            if dropout > 0.0 {
                be.dropout(
                    proj,
                    n * c,
                    dropout,
                    dropout_seed(dropout_base, 2 + 2 * l as u64),
                )?;
            }
            be.copy(&la.res2, 0, &mut la.res3, 0, n * c)?;
            be.add(&mut la.res3, proj, n * c)?;
        }
        // logits = LN(x_L)·wteᵀ
        let last = &layers[cfg.n_layer - 1].res3;
        be.layer_norm_train(
            last, &w.ln_f_w, &w.ln_f_b, lnf, lnf_mean, lnf_rstd, n, c, eps,
        )?;
        be.linear(
            lnf,
            &w.wte,
            None,
            logits,
            LinearDims::transposed(n, c, v),
            Activation::None,
        )?;
        let dscale = grad_scale.map(|s| s / n as f32);
        let loss = be.cross_entropy(logits, &targets, n, v, dscale)?;
        Ok((loss, ids, positions))
    }

    /// The backward pass of the last [`Gpt2Trainer::forward`] (with a gradient scale), adding
    /// every parameter's gradient into [`Gpt2Trainer::grads`].
    fn backward(&mut self, ids: &[u32], positions: &[u32], dropout_base: u64) -> Result<()> {
        let dropout = self.dropout;
        let model = &self.model;
        let be = model.backend();
        let cfg = &model.config;
        let w = &model.weights;
        let g = &mut self.grads;
        let (b, t) = self.acts.shape;
        let Acts {
            encoded,
            layers,
            lnf,
            lnf_mean,
            lnf_rstd,
            logits,
            dres,
            dtmp,
            dbranch,
            dln,
            datt,
            dqkv,
            dfchg,
            dfch,
            ..
        } = &mut self.acts;
        let (c, f, v, h) = (cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size, cfg.n_head);
        let n = b * t;

        // The tied head: dlnf = dlogits·wte, dwte += dlogitsᵀ·lnf.
        be.linear_backward(
            lnf,
            &w.wte,
            logits,
            LinearDims::transposed(n, c, v),
            Grads {
                dx: Some(dln),
                dw: Some(&mut g.wte),
                db: None,
                accumulate: true,
            },
        )?;
        let last = &layers[cfg.n_layer - 1].res3;
        be.layer_norm_backward(
            last,
            &w.ln_f_w,
            lnf_mean,
            lnf_rstd,
            dln,
            n,
            c,
            Grads {
                dx: Some(dres),
                dw: Some(&mut g.ln_f_w),
                db: Some(&mut g.ln_f_b),
                accumulate: true,
            },
        )?;
        for l in (0..cfg.n_layer).rev() {
            let blk = &w.blocks[l];
            let gb = &mut g.blocks[l];
            let la = &layers[l];
            let x: &B::Buf = if l == 0 { encoded } else { &layers[l - 1].res3 };
            // dres holds ∂L/∂res3. The MLP branch: its gradient through the dropout mask.
            let dbr: &B::Buf = if dropout > 0.0 {
                be.copy(dres, 0, dbranch, 0, n * c)?;
                be.dropout_backward(
                    dbranch,
                    n * c,
                    dropout,
                    dropout_seed(dropout_base, 2 + 2 * l as u64),
                )?;
                dbranch
            } else {
                dres
            };
            be.linear_backward(
                &la.fchg,
                &blk.mlp_proj_w,
                dbr,
                LinearDims::new(n, f, c),
                Grads {
                    dx: Some(dfchg),
                    dw: Some(&mut gb.mlp_proj_w),
                    db: Some(&mut gb.mlp_proj_b),
                    accumulate: true,
                },
            )?;
            be.gelu_backward(&la.fch, dfchg, dfch, n * f)?;
            be.linear_backward(
                &la.ln2,
                &blk.fc_w,
                dfch,
                LinearDims::new(n, c, f),
                Grads {
                    dx: Some(dln),
                    dw: Some(&mut gb.fc_w),
                    db: Some(&mut gb.fc_b),
                    accumulate: true,
                },
            )?;
            be.layer_norm_backward(
                &la.res2,
                &blk.ln_2_w,
                &la.ln2_mean,
                &la.ln2_rstd,
                dln,
                n,
                c,
                Grads {
                    dx: Some(dtmp),
                    dw: Some(&mut gb.ln_2_w),
                    db: Some(&mut gb.ln_2_b),
                    accumulate: true,
                },
            )?;
            // dres = ∂L/∂res2 = ∂L/∂res3 + the LN branch's.
            be.add(dres, dtmp, n * c)?;
            // The attention branch.
            let dbr: &B::Buf = if dropout > 0.0 {
                be.copy(dres, 0, dbranch, 0, n * c)?;
                be.dropout_backward(
                    dbranch,
                    n * c,
                    dropout,
                    dropout_seed(dropout_base, 1 + 2 * l as u64),
                )?;
                dbranch
            } else {
                dres
            };
            be.linear_backward(
                &la.att,
                &blk.attn_proj_w,
                dbr,
                LinearDims::new(n, c, c),
                Grads {
                    dx: Some(datt),
                    dw: Some(&mut gb.attn_proj_w),
                    db: Some(&mut gb.attn_proj_b),
                    accumulate: true,
                },
            )?;
            be.attention_backward(&la.qkv, &la.att, datt, &la.lse, dqkv, b, t, h, c / h)?;
            be.linear_backward(
                &la.ln1,
                &blk.c_attn_w,
                dqkv,
                LinearDims::new(n, c, 3 * c),
                Grads {
                    dx: Some(dln),
                    dw: Some(&mut gb.c_attn_w),
                    db: Some(&mut gb.c_attn_b),
                    accumulate: true,
                },
            )?;
            be.layer_norm_backward(
                x,
                &blk.ln_1_w,
                &la.ln1_mean,
                &la.ln1_rstd,
                dln,
                n,
                c,
                Grads {
                    dx: Some(dtmp),
                    dw: Some(&mut gb.ln_1_w),
                    db: Some(&mut gb.ln_1_b),
                    accumulate: true,
                },
            )?;
            // dres = ∂L/∂x.
            be.add(dres, dtmp, n * c)?;
        }
        if dropout > 0.0 {
            be.dropout_backward(dres, n * c, dropout, dropout_seed(dropout_base, 0))?;
        }
        be.embedding_backward(ids, positions, dres, &mut g.wte, &mut g.wpe, c)
    }

    /// Forward and backward of one micro-batch `tokens` `[b, t + 1]`: the gradients of its mean
    /// loss times `grad_scale` (1/A for A micro-batches per step) are added to
    /// [`Gpt2Trainer::grads`]. Returns the micro-batch's mean loss. `dropout_base` seeds the
    /// dropout masks (it must differ between micro-batches and steps).
    pub fn forward_backward(
        &mut self,
        tokens: &[u32],
        b: usize,
        t: usize,
        grad_scale: f32,
        dropout_base: u64,
    ) -> Result<f32> {
        let (loss, ids, positions) = self.forward(tokens, b, t, Some(grad_scale), dropout_base)?;
        self.backward(&ids, &positions, dropout_base)?;
        Ok(loss)
    }

    /// The mean loss of `tokens` `[b, t + 1]` without gradients or dropout (validation).
    pub fn loss(&mut self, tokens: &[u32], b: usize, t: usize) -> Result<f32> {
        let p = self.dropout;
        self.dropout = 0.0;
        let r = self.forward(tokens, b, t, None, 0);
        self.dropout = p;
        Ok(r?.0)
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> Result<f32> {
        let be = self.model.backend();
        Ok(be.sum_squares(&self.grads.tensors())?.sqrt() as f32)
    }

    /// Clips the gradients to a global norm of `opt.grad_clip` (when > 0; PyTorch's
    /// `clip_grad_norm_`: scaled by `clip/(norm + 1e-6)` when that is below 1) and takes one
    /// AdamW step at learning rate `lr`. Returns the norm before clipping.
    pub fn step(&mut self, lr: f64, opt: &AdamW) -> Result<f32> {
        let norm = self.grad_norm()?;
        if !norm.is_finite() {
            return Err(Error::invalid(format!(
                "the gradient norm is {norm} at step {}: training diverged (try a lower --lr)",
                self.step + 1
            )));
        }
        let be = self.model.backend();
        if opt.grad_clip > 0.0 {
            let coef = opt.grad_clip / (norm as f64 + 1e-6);
            if coef < 1.0 {
                for g in self.grads.tensors_mut() {
                    let n = be.info(g).len;
                    be.scale(g, n, coef as f32)?;
                }
            }
        }
        let names = tensor_names(&self.model.config);
        let step = self.step + 1;
        let base = AdamConfig {
            lr,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.weight_decay,
            decoupled: true,
        };
        let plain = AdamConfig {
            weight_decay: 0.0,
            ..base
        };
        // Two groups, as nanoGPT: decay on matrices and tables, none on vectors.
        type Group<'a, B> = (
            Vec<&'a mut <B as Backend>::Buf>,
            Vec<&'a <B as Backend>::Buf>,
            Vec<&'a mut <B as Backend>::Buf>,
            Vec<&'a mut <B as Backend>::Buf>,
        );
        let (be, weights) = self.model.backend_and_weights_mut();
        let mut decay: Group<'_, B> = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut rest: Group<'_, B> = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((((p, gr), m), v), (_, shape)) in weights
            .tensors_mut()
            .into_iter()
            .zip(self.grads.tensors())
            .zip(self.m.tensors_mut())
            .zip(self.v.tensors_mut())
            .zip(&names)
        {
            let grp = if decays(shape) { &mut decay } else { &mut rest };
            grp.0.push(p);
            grp.1.push(gr);
            grp.2.push(m);
            grp.3.push(v);
        }
        be.adam(
            &base,
            step,
            &mut decay.0,
            &decay.1,
            &mut decay.2,
            &mut decay.3,
        )?;
        be.adam(&plain, step, &mut rest.0, &rest.1, &mut rest.2, &mut rest.3)?;
        self.step = step;
        Ok(norm)
    }
}
