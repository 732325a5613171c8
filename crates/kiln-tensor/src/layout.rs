//! Shapes, strides and offsets: how a tensor's logical indices map onto its storage.
//!
//! A [`Layout`] says that element `[i0, i1, …]` lives at storage element
//! `offset + Σ i_d · strides[d]` (strides and offset in elements, not bytes). Views — reshape of
//! contiguous data, permute/transpose, narrow, broadcast — only change the layout, never the data.
use crate::{Error, Result};
use std::fmt;

/// The dimensions of a tensor, outermost first.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    /// Number of elements; 1 for a scalar (rank 0). Panics on overflow; use
    /// [`Shape::checked_numel`] for shapes that come from untrusted input.
    pub fn numel(&self) -> usize {
        self.checked_numel()
            .expect("shape element count overflows usize")
    }
    /// Number of elements, or `None` when the product overflows `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        self.0.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
    /// Row-major (C order) strides for this shape.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.0.len()];
        let mut s = 1usize;
        for d in (0..self.0.len()).rev() {
            strides[d] = s;
            s = s.saturating_mul(self.0[d]);
        }
        strides
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

/// Shape, strides (elements) and offset (elements) of a view into a storage buffer.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Layout {
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// A row-major layout starting at element 0.
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }

    /// A layout with explicit strides and offset. The caller (or [`Layout::required_len`] checked
    /// against the storage) guarantees that every index lands inside the buffer.
    pub fn new(shape: impl Into<Shape>, strides: Vec<usize>, offset: usize) -> Result<Self> {
        let shape = shape.into();
        if strides.len() != shape.rank() {
            return Err(Error::Layout(format!(
                "{} strides for a rank-{} shape {}",
                strides.len(),
                shape.rank(),
                shape
            )));
        }
        if shape.checked_numel().is_none() {
            return Err(Error::Layout(format!(
                "shape {shape} has more elements than fit in usize"
            )));
        }
        Ok(Layout {
            shape,
            strides,
            offset,
        })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// One past the largest storage index this layout touches (the storage must hold at least
    /// this many elements); `offset` for an empty tensor. `None` on overflow.
    pub fn required_len(&self) -> Option<usize> {
        if self.shape.dims().contains(&0) {
            return Some(self.offset);
        }
        let mut last = self.offset;
        for (&d, &s) in self.shape.dims().iter().zip(&self.strides) {
            last = last.checked_add((d - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }

    /// True when the elements are laid out row-major without gaps (offset may be non-zero).
    /// Dimensions of size 1 may have any stride.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.dims().iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// Storage index of a logical index. Panics when `index` has the wrong rank or is out of
    /// bounds (a caller bug).
    pub fn index_of(&self, index: &[usize]) -> usize {
        assert_eq!(index.len(), self.rank(), "index rank mismatch");
        let mut at = self.offset;
        for ((&i, &d), &s) in index.iter().zip(self.shape.dims()).zip(&self.strides) {
            assert!(i < d, "index {i} out of bounds for dimension of size {d}");
            at += i * s;
        }
        at
    }

    /// Reinterprets a contiguous layout with a new shape of the same element count.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Layout> {
        let shape = shape.into();
        if shape.checked_numel() != Some(self.numel()) {
            return Err(Error::Layout(format!(
                "cannot reshape {} ({} elements) to {}",
                self.shape,
                self.numel(),
                shape
            )));
        }
        if !self.is_contiguous() {
            return Err(Error::Layout(format!(
                "cannot reshape a non-contiguous view of shape {} (strides {:?}) without a copy; call contiguous() first",
                self.shape, self.strides
            )));
        }
        let strides = shape.contiguous_strides();
        Ok(Layout {
            shape,
            strides,
            offset: self.offset,
        })
    }

    /// Reorders dimensions: output dimension `i` is input dimension `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::Layout(format!(
                "{perm:?} is not a permutation of {rank} dimensions"
            )));
        }
        let dims = perm.iter().map(|&p| self.dims()[p]).collect::<Vec<_>>();
        let strides = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(Layout {
            shape: Shape(dims),
            strides,
            offset: self.offset,
        })
    }

    /// Swaps two dimensions.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Layout> {
        let rank = self.rank();
        if a >= rank || b >= rank {
            return Err(Error::Layout(format!(
                "transpose({a}, {b}) on a rank-{rank} tensor"
            )));
        }
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Keeps indices `start .. start + len` of dimension `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        let Some(&size) = self.dims().get(dim) else {
            return Err(Error::Layout(format!(
                "narrow on dimension {dim} of a rank-{} tensor",
                self.rank()
            )));
        };
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::Layout(format!(
                "narrow({dim}, {start}, {len}) out of range for size {size}"
            )));
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        let offset = if len == 0 {
            self.offset
        } else {
            self.offset + start * self.strides[dim]
        };
        Ok(Layout {
            shape: Shape(dims),
            strides: self.strides.clone(),
            offset,
        })
    }

    /// Broadcasts to `shape` (NumPy rules: align trailing dimensions; a size-1 or missing
    /// dimension repeats with stride 0).
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Layout> {
        let shape = shape.into();
        let rank = shape.rank();
        if rank < self.rank() {
            return Err(Error::Layout(format!(
                "cannot broadcast {} to the lower-rank shape {}",
                self.shape, shape
            )));
        }
        if shape.checked_numel().is_none() {
            return Err(Error::Layout(format!(
                "cannot broadcast to {shape}: more elements than fit in usize"
            )));
        }
        let lead = rank - self.rank();
        let mut strides = vec![0; rank];
        for d in 0..self.rank() {
            let (from, to) = (self.dims()[d], shape.dims()[lead + d]);
            strides[lead + d] = if from == to {
                self.strides[d]
            } else if from == 1 {
                0
            } else {
                return Err(Error::Layout(format!(
                    "cannot broadcast {} to {}",
                    self.shape, shape
                )));
            };
        }
        Ok(Layout {
            shape,
            strides,
            offset: self.offset,
        })
    }

    /// Iterates over the storage indices of all elements in row-major logical order.
    pub fn storage_indices(&self) -> StorageIndices<'_> {
        StorageIndices {
            layout: self,
            index: vec![0; self.rank()],
            next: if self.numel() == 0 {
                None
            } else {
                Some(self.offset)
            },
        }
    }
}

/// Iterator returned by [`Layout::storage_indices`].
pub struct StorageIndices<'a> {
    layout: &'a Layout,
    index: Vec<usize>,
    next: Option<usize>,
}

impl Iterator for StorageIndices<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let current = self.next?;
        // Advance like an odometer, innermost dimension first.
        let dims = self.layout.dims();
        let strides = self.layout.strides();
        let mut at = current;
        let mut d = dims.len();
        loop {
            if d == 0 {
                self.next = None;
                break;
            }
            d -= 1;
            self.index[d] += 1;
            at += strides[d];
            if self.index[d] < dims[d] {
                self.next = Some(at);
                break;
            }
            at -= strides[d] * self.index[d];
            self.index[d] = 0;
        }
        Some(current)
    }
}
