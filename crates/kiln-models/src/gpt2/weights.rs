//! GPT-2 weights from a safetensors file in the Hub's layout.
//!
//! Names are accepted with or without the `transformer.` prefix (the Hub file has none,
//! `save_pretrained` in transformers 5 writes it). The `h.N.attn.bias` / `attn.masked_bias`
//! mask buffers are ignored; `lm_head.weight` is used when present, otherwise the output
//! projection is tied to `wte`. Every tensor is checked: a missing one is an error naming it, a
//! mis-shaped one names it with the expected and found shape.
//!
//! The matrices are kept in the weight dtype asked for; when that is the file's dtype they are
//! views into the memory map (no copy). Layer-norm parameters and biases are small and are
//! converted to f32 once.
use super::config::Gpt2Config;
use kiln_io::SafeTensors;
use kiln_nn::backend::{Backend, MatrixOptions};
use kiln_tensor::{DType, Error, Result, Tensor};

/// One transformer block, in the backend's memory. Conv1D weights are `[in, out]` matrices
/// (as the checkpoint stores them, or — 16-bit weights on the CPU, by default — the same matrix
/// in column panels); layer-norm parameters and biases are f32 vectors.
pub struct BlockWeights<B: Backend> {
    pub ln_1_w: B::Buf,
    pub ln_1_b: B::Buf,
    /// `[C, 3C]`: queries, keys, values side by side.
    pub c_attn_w: B::Buf,
    pub c_attn_b: B::Buf,
    /// `[C, C]`.
    pub attn_proj_w: B::Buf,
    pub attn_proj_b: B::Buf,
    pub ln_2_w: B::Buf,
    pub ln_2_b: B::Buf,
    /// `[C, F]`.
    pub fc_w: B::Buf,
    pub fc_b: B::Buf,
    /// `[F, C]`.
    pub mlp_proj_w: B::Buf,
    pub mlp_proj_b: B::Buf,
}

impl<B: Backend> BlockWeights<B> {
    /// The four matrices.
    pub fn matrices(&self) -> [&B::Buf; 4] {
        [
            &self.c_attn_w,
            &self.attn_proj_w,
            &self.fc_w,
            &self.mlp_proj_w,
        ]
    }
}

/// All weights of a GPT-2 language model, in the backend's memory.
pub struct Gpt2Weights<B: Backend> {
    /// Token embeddings `[V, C]`, also the tied output projection (uploaded for use
    /// transposed: the CPU backend keeps 16-bit tables as the projection's column panels).
    pub wte: B::Buf,
    /// Position embeddings `[P, C]`.
    pub wpe: B::Buf,
    pub blocks: Vec<BlockWeights<B>>,
    pub ln_f_w: B::Buf,
    pub ln_f_b: B::Buf,
    /// An untied output projection `[V, C]`; `None` means tied to `wte`.
    pub lm_head: Option<B::Buf>,
    /// The dtype of the matrices in memory.
    pub dtype: DType,
}

/// Reads the tensors of one checkpoint into a backend, resolving the optional `transformer.`
/// prefix.
struct Reader<'a, B: Backend> {
    be: &'a B,
    st: &'a SafeTensors,
    dtype: DType,
    /// 16-bit linear weights in the backend's streaming layout (column panels on the CPU).
    panels: bool,
}

impl<B: Backend> Reader<'_, B> {
    fn resolve(&self, name: &str) -> Result<String> {
        if self.st.contains(name) {
            return Ok(name.to_string());
        }
        let prefixed = format!("transformer.{name}");
        if self.st.contains(&prefixed) {
            return Ok(prefixed);
        }
        Err(Error::MissingTensor {
            path: self.st.path().to_path_buf(),
            name: name.to_string(),
        })
    }

    /// The tensor `name` with its shape checked, still in the file's dtype.
    fn raw(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let full = self.resolve(name)?;
        let t = self.st.tensor(&full)?;
        let context = format!("{}: tensor `{full}`", self.st.path().display());
        t.expect_dims(&context, dims)?;
        if !t.dtype().is_float() {
            return Err(Error::DTypeMismatch {
                context,
                expected: "f32, f16 or bf16".into(),
                found: t.dtype().to_string(),
            });
        }
        Ok(t)
    }

    /// A matrix in the weight dtype (zero-copy on the CPU when that is the file's dtype); in
    /// the streaming layout when asked for, laid out for products with its transpose when
    /// `used_transposed`.
    fn matrix(&self, name: &str, dims: &[usize], used_transposed: bool) -> Result<B::Buf> {
        let opts = MatrixOptions {
            dtype: Some(self.dtype),
            used_transposed,
            streaming_layout: self.panels,
        };
        self.upload(name, dims, &opts)
    }

    /// A dense row-major matrix in the weight dtype (the position table).
    fn table(&self, name: &str, dims: &[usize]) -> Result<B::Buf> {
        let opts = MatrixOptions {
            dtype: Some(self.dtype),
            used_transposed: false,
            streaming_layout: false,
        };
        self.upload(name, dims, &opts)
    }

    /// Uploads matrix `name`. When the backend made its own copy (another dtype than the
    /// file's, or 16-bit weights laid out in the streaming layout), the file's pages it was read
    /// from are given back ([`SafeTensors::release`]): otherwise they stay resident beside the
    /// copy for as long as the map lives (GPT-2 124M in bf16 from an f32 file: 723 → 280 MiB).
    fn upload(&self, name: &str, dims: &[usize], opts: &MatrixOptions) -> Result<B::Buf> {
        let t = self.raw(name, dims)?;
        let buf = self.be.upload_matrix(&t, opts)?;
        let sixteen = matches!(self.dtype, DType::BF16 | DType::F16);
        if t.dtype() != self.dtype || (opts.streaming_layout && sixteen) {
            self.st.release(&self.resolve(name)?)?;
        }
        Ok(buf)
    }

    /// A vector converted to f32.
    fn vector(&self, name: &str, len: usize) -> Result<B::Buf> {
        self.be.upload(&self.raw(name, &[len])?.to_f32_vec()?)
    }
}

impl<B: Backend> Gpt2Weights<B> {
    /// Loads and checks every tensor `cfg` calls for into `be`; matrices end up in `dtype`
    /// (f32, f16 or bf16), 16-bit linear weights in the backend's streaming layout
    /// ([`Gpt2Weights::load_with`]).
    pub fn load(be: &B, st: &SafeTensors, cfg: &Gpt2Config, dtype: DType) -> Result<Self> {
        Self::load_with(be, st, cfg, dtype, true)
    }

    /// [`Gpt2Weights::load`]; with `panels` false every matrix is kept as the file stores it
    /// (zero-copy on the CPU when `dtype` is the file's).
    pub fn load_with(
        be: &B,
        st: &SafeTensors,
        cfg: &Gpt2Config,
        dtype: DType,
        panels: bool,
    ) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::invalid(format!(
                "weight dtype must be f32, f16 or bf16, not {dtype}"
            )));
        }
        let r = Reader {
            be,
            st,
            dtype,
            panels,
        };
        let (c, f, v, p) = (cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size, cfg.n_positions);
        // The token table first: converting it reads the largest tensor (154 MB in f32 for
        // 124M), which then adds to the least converted memory.
        let wte = r.matrix("wte.weight", &[v, c], true)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("h.{l}.{s}");
            blocks.push(BlockWeights {
                ln_1_w: r.vector(&n("ln_1.weight"), c)?,
                ln_1_b: r.vector(&n("ln_1.bias"), c)?,
                c_attn_w: r.matrix(&n("attn.c_attn.weight"), &[c, 3 * c], false)?,
                c_attn_b: r.vector(&n("attn.c_attn.bias"), 3 * c)?,
                attn_proj_w: r.matrix(&n("attn.c_proj.weight"), &[c, c], false)?,
                attn_proj_b: r.vector(&n("attn.c_proj.bias"), c)?,
                ln_2_w: r.vector(&n("ln_2.weight"), c)?,
                ln_2_b: r.vector(&n("ln_2.bias"), c)?,
                fc_w: r.matrix(&n("mlp.c_fc.weight"), &[c, f], false)?,
                fc_b: r.vector(&n("mlp.c_fc.bias"), f)?,
                mlp_proj_w: r.matrix(&n("mlp.c_proj.weight"), &[f, c], false)?,
                mlp_proj_b: r.vector(&n("mlp.c_proj.bias"), c)?,
            });
        }
        let lm_head = if st.contains("lm_head.weight") {
            Some(r.matrix("lm_head.weight", &[v, c], true)?)
        } else {
            None
        };
        Ok(Gpt2Weights {
            wte,
            wpe: r.table("wpe.weight", &[p, c])?,
            blocks,
            ln_f_w: r.vector("ln_f.weight", c)?,
            ln_f_b: r.vector("ln_f.bias", c)?,
            lm_head,
            dtype,
        })
    }

    /// The output projection's table `[V, C]` (lm_head, or wte when tied).
    pub fn lm_head(&self) -> &B::Buf {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Bytes of the matrices a decode step streams: every block matrix and the output
    /// projection (the embedding rows it gathers are negligible).
    pub fn decode_bytes_per_token(&self, be: &B) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .flat_map(|b| b.matrices())
            .map(|m| be.info(m).bytes)
            .sum();
        blocks + be.info(self.lm_head()).bytes
    }

    /// Every matrix.
    fn all_matrices(&self) -> Vec<&B::Buf> {
        let mut v = vec![&self.wte, &self.wpe];
        for b in &self.blocks {
            v.extend(b.matrices());
        }
        v.extend(self.lm_head.as_ref());
        v
    }

    /// Makes the backend read the pages of every matrix borrowed from the memory map now
    /// (during loading) rather than during the first forward pass.
    pub fn prefault(&self, be: &B) {
        for m in self.all_matrices() {
            be.prefault(m);
        }
    }

    /// True when every matrix borrows the file's bytes (zero-copy).
    pub fn is_zero_copy(&self, be: &B) -> bool {
        self.all_matrices().iter().all(|m| be.info(m).borrowed)
    }
}
