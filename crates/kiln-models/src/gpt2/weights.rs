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
use half::{bf16, f16};
use kiln_io::SafeTensors;
use kiln_nn::backend::{LinearWeight, WeightView};
use kiln_tensor::{convert, DType, Error, FloatElement, Result, Tensor};
use rayon::prelude::*;

/// One transformer block. Conv1D weights are `[in, out]`: as the checkpoint stores them, or
/// (16-bit weights, by default) the same matrix in column panels.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub ln_1_w: Vec<f32>,
    pub ln_1_b: Vec<f32>,
    /// `[C, 3C]`: queries, keys, values side by side.
    pub c_attn_w: LinearWeight,
    pub c_attn_b: Vec<f32>,
    /// `[C, C]`.
    pub attn_proj_w: LinearWeight,
    pub attn_proj_b: Vec<f32>,
    pub ln_2_w: Vec<f32>,
    pub ln_2_b: Vec<f32>,
    /// `[C, F]`.
    pub fc_w: LinearWeight,
    pub fc_b: Vec<f32>,
    /// `[F, C]`.
    pub mlp_proj_w: LinearWeight,
    pub mlp_proj_b: Vec<f32>,
}

/// A token table `[V, C]` (`wte`, or an untied `lm_head`) that also serves as the output
/// projection `[C, V]` of the logits.
#[derive(Debug, Clone)]
pub enum TokenTable {
    /// As the checkpoint stores it (zero-copy when the dtype is the file's).
    Stored(Tensor),
    /// The projection `[C, V]` in column panels (16-bit weights, the default): the logits of a
    /// decode step stream it; embedding rows are gathered from its columns.
    Panels(LinearWeight),
}

impl TokenTable {
    /// The table as `[V, C]` (for the embedding).
    pub fn rows_view(&self) -> Result<WeightView<'_>> {
        match self {
            TokenTable::Stored(t) => WeightView::from_tensor(t),
            TokenTable::Panels(p) => Ok(p.view()?.t()),
        }
    }

    /// The output projection `[C, V]` (the table transposed).
    pub fn projection_view(&self) -> Result<WeightView<'_>> {
        match self {
            TokenTable::Stored(t) => Ok(WeightView::from_tensor(t)?.t()),
            TokenTable::Panels(p) => p.view(),
        }
    }

    /// Bytes of the `V × C` elements.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            TokenTable::Stored(t) => t.size_in_bytes(),
            TokenTable::Panels(p) => p.size_in_bytes(),
        }
    }

    /// The tensor, when the table is kept as stored.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            TokenTable::Stored(t) => Some(t),
            TokenTable::Panels(_) => None,
        }
    }

    /// Whether the table borrows the checkpoint's bytes.
    pub fn is_borrowed(&self) -> bool {
        matches!(self, TokenTable::Stored(t) if t.is_borrowed())
    }
}

/// All weights of a GPT-2 language model.
#[derive(Debug, Clone)]
pub struct Gpt2Weights {
    /// Token embeddings `[V, C]`, also the tied output projection.
    pub wte: TokenTable,
    /// Position embeddings `[P, C]`.
    pub wpe: Tensor,
    pub blocks: Vec<BlockWeights>,
    pub ln_f_w: Vec<f32>,
    pub ln_f_b: Vec<f32>,
    /// An untied output projection `[V, C]`; `None` means tied to `wte`.
    pub lm_head: Option<TokenTable>,
    /// The dtype of the matrices in memory.
    pub dtype: DType,
}

/// Reads the tensors of one checkpoint, resolving the optional `transformer.` prefix.
struct Reader<'a> {
    st: &'a SafeTensors,
    dtype: DType,
    /// 16-bit linear weights in column panels.
    panels: bool,
}

impl Reader<'_> {
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

    /// A matrix in the weight dtype (zero-copy when that is the file's dtype).
    fn matrix(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        convert(&self.raw(name, dims)?, self.dtype)
    }

    /// A linear layer's weight: in column panels when asked for and the weight dtype is 16-bit
    /// (one conversion pass straight from the file's bytes), otherwise as [`Reader::matrix`].
    fn linear(&self, name: &str, dims: &[usize]) -> Result<LinearWeight> {
        if self.panels && matches!(self.dtype, DType::BF16 | DType::F16) {
            return LinearWeight::panels(&self.raw(name, dims)?, self.dtype);
        }
        Ok(LinearWeight::Dense(self.matrix(name, dims)?))
    }

    /// A token table `[V, C]`: its transpose in column panels when asked for and the weight
    /// dtype is 16-bit, otherwise as [`Reader::matrix`].
    fn table(&self, name: &str, dims: &[usize]) -> Result<TokenTable> {
        if self.panels && matches!(self.dtype, DType::BF16 | DType::F16) {
            let raw = self.raw(name, dims)?;
            return Ok(TokenTable::Panels(LinearWeight::panels_of_transpose(
                &raw, self.dtype,
            )?));
        }
        Ok(TokenTable::Stored(self.matrix(name, dims)?))
    }

    /// A vector converted to f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.raw(name, &[len])?.to_f32_vec()
    }
}

impl Gpt2Weights {
    /// Loads and checks every tensor `cfg` calls for; matrices end up in `dtype`
    /// (f32, f16 or bf16), 16-bit linear weights in column panels ([`Gpt2Weights::load_with`]).
    pub fn load(st: &SafeTensors, cfg: &Gpt2Config, dtype: DType) -> Result<Self> {
        Self::load_with(st, cfg, dtype, true)
    }

    /// [`Gpt2Weights::load`]; with `panels` false every matrix is kept as the file stores it
    /// (zero-copy when `dtype` is the file's).
    pub fn load_with(
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
        let r = Reader { st, dtype, panels };
        let (c, f, v, p) = (cfg.n_embd, cfg.mlp_dim(), cfg.vocab_size, cfg.n_positions);
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("h.{l}.{s}");
            blocks.push(BlockWeights {
                ln_1_w: r.vector(&n("ln_1.weight"), c)?,
                ln_1_b: r.vector(&n("ln_1.bias"), c)?,
                c_attn_w: r.linear(&n("attn.c_attn.weight"), &[c, 3 * c])?,
                c_attn_b: r.vector(&n("attn.c_attn.bias"), 3 * c)?,
                attn_proj_w: r.linear(&n("attn.c_proj.weight"), &[c, c])?,
                attn_proj_b: r.vector(&n("attn.c_proj.bias"), c)?,
                ln_2_w: r.vector(&n("ln_2.weight"), c)?,
                ln_2_b: r.vector(&n("ln_2.bias"), c)?,
                fc_w: r.linear(&n("mlp.c_fc.weight"), &[c, f])?,
                fc_b: r.vector(&n("mlp.c_fc.bias"), f)?,
                mlp_proj_w: r.linear(&n("mlp.c_proj.weight"), &[f, c])?,
                mlp_proj_b: r.vector(&n("mlp.c_proj.bias"), c)?,
            });
        }
        let lm_head = if st.contains("lm_head.weight") {
            Some(r.table("lm_head.weight", &[v, c])?)
        } else {
            None
        };
        Ok(Gpt2Weights {
            wte: r.table("wte.weight", &[v, c])?,
            wpe: r.matrix("wpe.weight", &[p, c])?,
            blocks,
            ln_f_w: r.vector("ln_f.weight", c)?,
            ln_f_b: r.vector("ln_f.bias", c)?,
            lm_head,
            dtype,
        })
    }

    /// The output projection's table `[V, C]` (lm_head, or wte when tied).
    pub fn lm_head(&self) -> &TokenTable {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Bytes of the matrices a decode step streams: every block matrix and the output
    /// projection (the embedding rows it gathers are negligible).
    pub fn decode_bytes_per_token(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.c_attn_w.size_in_bytes()
                    + b.attn_proj_w.size_in_bytes()
                    + b.fc_w.size_in_bytes()
                    + b.mlp_proj_w.size_in_bytes()
            })
            .sum();
        blocks + self.lm_head().size_in_bytes()
    }

    /// Every matrix kept as a tensor.
    fn all_matrices(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self.wte.as_tensor().into_iter().collect();
        v.push(&self.wpe);
        for b in &self.blocks {
            v.extend(
                [&b.c_attn_w, &b.attn_proj_w, &b.fc_w, &b.mlp_proj_w]
                    .into_iter()
                    .filter_map(LinearWeight::as_tensor),
            );
        }
        v.extend(self.lm_head.as_ref().and_then(TokenTable::as_tensor));
        v
    }

    /// Reads one byte of every 4 KiB page of the matrices that borrow the memory map, so that the
    /// OS maps them now (during loading) rather than during the first forward pass.
    pub fn prefault(&self) {
        const PAGE: usize = 4096;
        let touched: usize = self
            .all_matrices()
            .into_iter()
            .filter(|t| t.is_borrowed())
            .filter_map(|t| t.as_bytes().ok())
            .map(|bytes| {
                bytes
                    .par_chunks(PAGE * 64)
                    .map(|c| c.iter().step_by(PAGE).map(|&b| b as usize).sum::<usize>())
                    .sum::<usize>()
            })
            .sum();
        std::hint::black_box(touched);
    }

    /// True when every matrix borrows the file's bytes (zero-copy).
    pub fn is_zero_copy(&self) -> bool {
        self.wte.is_borrowed()
            && self.wpe.is_borrowed()
            && self.blocks.iter().all(|b| {
                b.c_attn_w.is_borrowed()
                    && b.attn_proj_w.is_borrowed()
                    && b.fc_w.is_borrowed()
                    && b.mlp_proj_w.is_borrowed()
            })
    }
}

/// `t` in `dtype`: `t` itself (sharing the map) when the dtype matches, otherwise one
/// conversion straight from the source bytes into a new buffer, in parallel blocks (no f32
/// intermediate copy of the whole tensor).
fn convert(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return t.contiguous();
    }
    /// Converts `src` block by block, `f(src_block, dst_block, f32 scratch)`, into a new
    /// aligned buffer (written once, no intermediate vector).
    fn run<S: FloatElement, D: FloatElement>(
        src: &[S],
        shape: Vec<usize>,
        f: fn(&[S], &mut [D], &mut [f32]),
    ) -> Result<Tensor> {
        const BLOCK: usize = 1 << 12;
        let mut out = Tensor::zeros(shape, D::DTYPE)?;
        out.as_mut_slice::<D>()?
            .par_chunks_mut(BLOCK)
            .zip(src.par_chunks(BLOCK))
            .for_each(|(d, s)| {
                let mut tmp = [0f32; BLOCK];
                f(s, d, &mut tmp[..s.len()]);
            });
        Ok(out)
    }
    let t = t.contiguous()?;
    let shape = t.dims().to_vec();
    match (t.dtype(), dtype) {
        (DType::F32, DType::BF16) => {
            run::<f32, bf16>(t.as_slice()?, shape, |s, d, _| convert::f32_to_bf16(s, d))
        }
        (DType::F32, DType::F16) => {
            run::<f32, f16>(t.as_slice()?, shape, |s, d, _| convert::f32_to_f16(s, d))
        }
        (DType::BF16, DType::F32) => {
            run::<bf16, f32>(t.as_slice()?, shape, |s, d, _| convert::bf16_to_f32(s, d))
        }
        (DType::F16, DType::F32) => {
            run::<f16, f32>(t.as_slice()?, shape, |s, d, _| convert::f16_to_f32(s, d))
        }
        (DType::BF16, DType::F16) => run::<bf16, f16>(t.as_slice()?, shape, |s, d, f| {
            convert::bf16_to_f32(s, f);
            convert::f32_to_f16(f, d)
        }),
        (DType::F16, DType::BF16) => run::<f16, bf16>(t.as_slice()?, shape, |s, d, f| {
            convert::f16_to_f32(s, f);
            convert::f32_to_bf16(f, d)
        }),
        _ => t.to_dtype(dtype),
    }
}

/// A weight view of a contiguous 2-D tensor.
pub(crate) fn view(t: &Tensor) -> Result<WeightView<'_>> {
    WeightView::from_tensor(t)
}
