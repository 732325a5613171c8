//! A preallocated key/value cache for incremental decoding.
use super::{attention_forward, AttentionOptions, HeadsMut, HeadsRef};
use kiln_tensor::{Error, FloatElement, Result};

/// Keys and values of every layer, preallocated at creation:
/// per layer `[batch, heads, capacity, head_dim]` for K and the same for V, stored as `T`
/// (f32, bf16 or f16). New positions are written in place by [`KvCache::append`]; nothing is
/// reallocated or concatenated per token.
///
/// Each layer has its own length (a forward pass appends to layer 0, then layer 1, ...);
/// [`KvCache::len`] is the number of positions stored in every layer.
#[derive(Debug, Clone)]
pub struct KvCache<T: FloatElement> {
    layers: usize,
    batch: usize,
    heads: usize,
    head_dim: usize,
    capacity: usize,
    lens: Vec<usize>,
    k: Vec<T>,
    v: Vec<T>,
}

impl<T: FloatElement> KvCache<T> {
    /// A cache for `layers` layers of `[batch, heads, capacity, head_dim]` keys and values.
    /// Errors if the size overflows or any dimension is zero.
    pub fn new(
        layers: usize,
        batch: usize,
        heads: usize,
        capacity: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if [layers, batch, heads, capacity, head_dim].contains(&0) {
            return Err(Error::invalid(format!(
                "kv cache: every dimension must be positive (layers {layers}, batch {batch}, \
                 heads {heads}, capacity {capacity}, head_dim {head_dim})"
            )));
        }
        let n = [layers, batch, heads, capacity, head_dim]
            .iter()
            .try_fold(1usize, |a, &x| a.checked_mul(x))
            .ok_or_else(|| Error::invalid("kv cache: size overflows"))?;
        let zero = T::from_f32(0.0);
        Ok(KvCache {
            layers,
            batch,
            heads,
            head_dim,
            capacity,
            lens: vec![0; layers],
            k: vec![zero; n],
            v: vec![zero; n],
        })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn heads(&self) -> usize {
        self.heads
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Positions each layer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Positions stored in every layer (the minimum over layers).
    pub fn len(&self) -> usize {
        self.lens.iter().copied().min().unwrap_or(0)
    }
    /// Positions stored in `layer` (0 for a layer out of range).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets every position (the memory is kept).
    pub fn reset(&mut self) {
        self.lens.fill(0);
    }
    /// Keeps only the first `len` positions of every layer (e.g. to roll back a draft).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.lens {
            *l = (*l).min(len);
        }
    }

    fn layer_size(&self) -> usize {
        self.batch * self.heads * self.capacity * self.head_dim
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers {
            return Err(Error::invalid(format!(
                "kv cache: layer {layer} out of range (the cache has {} layers)",
                self.layers
            )));
        }
        Ok(())
    }

    /// Writes `k_new`, `v_new` (`[batch, heads, t_new, head_dim]`, any strides) at positions
    /// `layer_len(layer) ..` of `layer`, converting to `T`. Errors with [`Error::Capacity`] when
    /// the layer would exceed its capacity (nothing is written then).
    pub fn append(
        &mut self,
        layer: usize,
        k_new: HeadsRef<'_, f32>,
        v_new: HeadsRef<'_, f32>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let want = [self.batch, self.heads, k_new.seq, self.head_dim];
        for (name, x) in [("k", &k_new), ("v", &v_new)] {
            let got = [x.batch, x.heads, x.seq, x.head_dim];
            if got != want {
                return Err(Error::shape(
                    format!("kv cache append: {name}"),
                    &want,
                    &got,
                ));
            }
            x.check(name)?;
        }
        let t0 = self.lens[layer];
        let t_new = k_new.seq;
        if t0 + t_new > self.capacity {
            return Err(Error::Capacity(format!(
                "kv cache: layer {layer} holds {t0} of {} positions; cannot append {t_new} more",
                self.capacity
            )));
        }
        let base = layer * self.layer_size();
        let (d, cap, heads) = (self.head_dim, self.capacity, self.heads);
        for (dst_all, src) in [(&mut self.k, &k_new), (&mut self.v, &v_new)] {
            for b in 0..self.batch {
                for h in 0..heads {
                    for t in 0..t_new {
                        let at = base + ((b * heads + h) * cap + t0 + t) * d;
                        for (dst, &x) in dst_all[at..at + d].iter_mut().zip(src.row(b, h, t)) {
                            *dst = T::from_f32(x);
                        }
                    }
                }
            }
        }
        self.lens[layer] = t0 + t_new;
        Ok(())
    }

    /// The stored keys of `layer`: `[batch, heads, layer_len, head_dim]`.
    pub fn keys(&self, layer: usize) -> Result<HeadsRef<'_, T>> {
        self.check_layer(layer)?;
        Ok(self.view(&self.k, layer))
    }

    /// The stored values of `layer`: `[batch, heads, layer_len, head_dim]`.
    pub fn values(&self, layer: usize) -> Result<HeadsRef<'_, T>> {
        self.check_layer(layer)?;
        Ok(self.view(&self.v, layer))
    }

    fn view<'a>(&self, buf: &'a [T], layer: usize) -> HeadsRef<'a, T> {
        let ls = self.layer_size();
        HeadsRef {
            data: &buf[layer * ls..(layer + 1) * ls],
            batch: self.batch,
            heads: self.heads,
            seq: self.lens[layer],
            head_dim: self.head_dim,
            stride_batch: self.heads * self.capacity * self.head_dim,
            stride_head: self.capacity * self.head_dim,
            stride_seq: self.head_dim,
        }
    }
}

/// Attention of a block of new queries `q` (`[batch, heads, Tq, head_dim]`) over every key and
/// value stored in `layer` of `cache` (`Tk = cache.layer_len(layer)`, which should already
/// include the new positions: append first). With `opts.causal`, query `i` sees keys
/// `j ≤ i + (Tk − Tq)`, its own absolute position. Decode is `Tq = 1`; chunked prefill is
/// `Tq > 1`.
pub fn attention_cached<T: FloatElement>(
    q: HeadsRef<'_, f32>,
    cache: &KvCache<T>,
    layer: usize,
    out: HeadsMut<'_>,
    opts: AttentionOptions,
) -> Result<()> {
    let k = cache.keys(layer)?;
    let v = cache.values(layer)?;
    attention_forward(q, k, v, out, opts)
}
