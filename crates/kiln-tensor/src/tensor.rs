//! [`Tensor`]: a dtype, a layout and reference-counted storage.
//!
//! Cloning a tensor and taking views (reshape, permute, transpose, narrow, broadcast) share the
//! storage; only [`Tensor::contiguous`] (when the layout is not already contiguous) and
//! [`Tensor::to_dtype`] copy.
use crate::dtype::{convert, FloatElement};
use crate::storage::{AlignedBuffer, SharedBytes, Storage};
use crate::{DType, Device, Element, Error, Layout, Result, Shape};
use half::{bf16, f16};
use std::sync::Arc;

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", self.layout.shape())
            .field("strides", &self.layout.strides())
            .field("offset", &self.layout.offset())
            .field("storage", &*self.storage)
            .finish()
    }
}

impl Tensor {
    /// Checks that `layout` stays inside `storage` and builds the tensor.
    pub fn from_parts(storage: Arc<Storage>, layout: Layout, dtype: DType) -> Result<Self> {
        let elems = storage.as_bytes().len() / dtype.size_in_bytes();
        match layout.required_len() {
            Some(need) if need <= elems => Ok(Tensor {
                storage,
                layout,
                dtype,
            }),
            _ => Err(Error::Layout(format!(
                "layout {:?} (strides {:?}, offset {}) does not fit a storage of {elems} {} elements",
                layout.dims(),
                layout.strides(),
                layout.offset(),
                dtype
            ))),
        }
    }

    /// A contiguous tensor that takes ownership of `data` (copied once into aligned memory).
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_slice(&data, shape)
    }

    /// A contiguous tensor holding a copy of `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if shape.checked_numel() != Some(data.len()) {
            return Err(Error::invalid(format!(
                "{} values do not fill shape {}",
                data.len(),
                shape
            )));
        }
        let storage = Storage::Cpu(AlignedBuffer::from_slice(data));
        Self::from_parts(Arc::new(storage), Layout::contiguous(shape), T::DTYPE)
    }

    /// A contiguous tensor of zeros (all-zero bytes: 0.0 for floats, 0 / false otherwise).
    pub fn zeros(shape: impl Into<Shape>, dtype: DType) -> Result<Self> {
        let shape = shape.into();
        let bytes = shape
            .checked_numel()
            .and_then(|n| n.checked_mul(dtype.size_in_bytes()))
            .ok_or_else(|| Error::invalid(format!("shape {shape} is too large")))?;
        let storage = Storage::Cpu(AlignedBuffer::zeroed(bytes));
        Self::from_parts(Arc::new(storage), Layout::contiguous(shape), dtype)
    }

    /// A contiguous tensor over `len` bytes at `start` of a shared owner (usually a memory map).
    ///
    /// Zero-copy when the bytes are aligned for `dtype`; otherwise the bytes are copied once into
    /// an aligned buffer (safetensors does not promise aligned offsets). [`Tensor::is_borrowed`]
    /// tells which happened.
    pub fn from_shared_bytes(
        owner: SharedBytes,
        start: usize,
        len: usize,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> Result<Self> {
        let shape = shape.into();
        let expected = shape
            .checked_numel()
            .and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        if expected != Some(len) {
            return Err(Error::invalid(format!(
                "{len} bytes do not hold a {dtype} tensor of shape {shape}"
            )));
        }
        let storage = match Storage::shared(owner.clone(), start, len, dtype)? {
            Some(s) => s,
            None => Storage::Cpu(AlignedBuffer::from_bytes(
                &(*owner).as_ref()[start..start + len],
            )),
        };
        Self::from_parts(Arc::new(storage), Layout::contiguous(shape), dtype)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn shape(&self) -> &Shape {
        self.layout.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.layout.dims()
    }
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }
    pub fn device(&self) -> Device {
        self.storage.device()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }
    /// True when the bytes are borrowed from a memory map (zero-copy) rather than owned.
    pub fn is_borrowed(&self) -> bool {
        self.storage.is_borrowed()
    }
    /// Size in bytes of the logical elements (not of the whole storage).
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// Checks the dims, with `context` naming the tensor in the error.
    pub fn expect_dims(&self, context: &str, dims: &[usize]) -> Result<()> {
        if self.dims() == dims {
            Ok(())
        } else {
            Err(Error::shape(context, dims, self.dims()))
        }
    }

    fn check_type<T: Element>(&self) -> Result<()> {
        if T::accepts(self.dtype) {
            Ok(())
        } else {
            Err(Error::DTypeMismatch {
                context: "typed tensor access".into(),
                expected: T::DTYPE.to_string(),
                found: self.dtype.to_string(),
            })
        }
    }

    /// The raw bytes of a contiguous tensor (its logical elements only, little-endian).
    /// Errors for non-contiguous views.
    pub fn as_bytes(&self) -> Result<&[u8]> {
        if !self.is_contiguous() {
            return Err(Error::Layout(
                "as_bytes on a non-contiguous view; call contiguous() first".into(),
            ));
        }
        let es = self.dtype.size_in_bytes();
        let start = self.layout.offset() * es;
        Ok(&self.storage.as_bytes()[start..start + self.numel() * es])
    }

    /// The whole storage as a typed slice; index it with [`Tensor::layout`] (offset and strides).
    pub fn storage_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_type::<T>()?;
        self.storage.as_slice::<T>()
    }

    /// The elements of a contiguous tensor, in row-major order. Errors for non-contiguous views.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if !self.is_contiguous() {
            return Err(Error::Layout(
                "as_slice on a non-contiguous view; call contiguous() first".into(),
            ));
        }
        let all = self.storage_slice::<T>()?;
        let start = self.layout.offset();
        Ok(&all[start..start + self.numel()])
    }

    /// Mutable elements of a contiguous tensor whose storage is owned and not shared with another
    /// tensor (copy-on-write is explicit: call [`Tensor::contiguous_owned`] first).
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_type::<T>()?;
        if !self.is_contiguous() {
            return Err(Error::Layout(
                "as_mut_slice on a non-contiguous view".into(),
            ));
        }
        let (start, n) = (self.layout.offset(), self.numel());
        let storage = Arc::get_mut(&mut self.storage).ok_or_else(|| {
            Error::invalid("tensor storage is shared with another tensor; copy it before writing")
        })?;
        Ok(&mut storage.as_mut_slice::<T>()?[start..start + n])
    }

    /// The elements in row-major logical order, copied.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let all = self.storage_slice::<T>()?;
        if self.is_contiguous() {
            let start = self.layout.offset();
            return Ok(all[start..start + self.numel()].to_vec());
        }
        Ok(self.layout.storage_indices().map(|i| all[i]).collect())
    }

    /// The elements converted to f32, in row-major logical order (float dtypes only).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_vec::<f32>(),
            DType::F16 => self.to_f32_vec_from::<f16>(),
            DType::BF16 => self.to_f32_vec_from::<bf16>(),
            other => Err(Error::DTypeMismatch {
                context: "to_f32_vec".into(),
                expected: "a float dtype".into(),
                found: other.to_string(),
            }),
        }
    }

    fn to_f32_vec_from<T: FloatElement>(&self) -> Result<Vec<f32>> {
        let src = self.contiguous()?;
        let src = src.as_slice::<T>()?;
        let mut out = vec![0f32; src.len()];
        match T::DTYPE {
            DType::F16 => convert::f16_to_f32(bytemuck::cast_slice(src), &mut out),
            DType::BF16 => convert::bf16_to_f32(bytemuck::cast_slice(src), &mut out),
            _ => out.iter_mut().zip(src).for_each(|(o, &s)| *o = s.to_f32()),
        }
        Ok(out)
    }

    fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor {
            storage: self.storage.clone(),
            layout,
            dtype: self.dtype,
        }
    }

    /// A view with a new shape; the tensor must be contiguous.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.reshape(shape)?))
    }
    /// A view with dimensions reordered (output dim `i` is input dim `perm[i]`).
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.permute(perm)?))
    }
    /// A view with two dimensions swapped.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.transpose(a, b)?))
    }
    /// A view of indices `start .. start + len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.narrow(dim, start, len)?))
    }
    /// A view broadcast to `shape` (stride 0 along repeated dimensions).
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.broadcast_as(shape)?))
    }

    /// `self` when already contiguous (shares storage), otherwise a contiguous copy.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        self.copy_contiguous()
    }

    /// A contiguous copy in owned memory that no other tensor shares (so it can be written).
    pub fn contiguous_owned(&self) -> Result<Tensor> {
        self.copy_contiguous()
    }

    fn copy_contiguous(&self) -> Result<Tensor> {
        let bytes = self.storage.as_bytes();
        let es = self.dtype.size_in_bytes();
        let mut out = AlignedBuffer::zeroed(self.numel() * es);
        let dst = out.as_bytes_mut();
        if self.is_contiguous() {
            let start = self.layout.offset() * es;
            dst.copy_from_slice(&bytes[start..start + self.numel() * es]);
        } else {
            for (k, i) in self.layout.storage_indices().enumerate() {
                dst[k * es..(k + 1) * es].copy_from_slice(&bytes[i * es..(i + 1) * es]);
            }
        }
        Self::from_parts(
            Arc::new(Storage::Cpu(out)),
            Layout::contiguous(self.shape().clone()),
            self.dtype,
        )
    }

    /// A contiguous copy converted to `dtype`; float ⇄ float only (f32, f16, bf16). Returns
    /// `self` (shared) when the dtype already matches and the tensor is contiguous.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return self.contiguous();
        }
        if !dtype.is_float() || !self.dtype.is_float() {
            return Err(Error::invalid(format!(
                "conversion from {} to {dtype} is not supported",
                self.dtype
            )));
        }
        let f = self.to_f32_vec()?;
        let shape = self.shape().clone();
        match dtype {
            DType::F32 => Tensor::from_vec(f, shape),
            DType::F16 => {
                let mut out = vec![f16::ZERO; f.len()];
                convert::f32_to_f16(&f, &mut out);
                Tensor::from_vec(out, shape)
            }
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; f.len()];
                convert::f32_to_bf16(&f, &mut out);
                Tensor::from_vec(out, shape)
            }
            _ => unreachable!("checked above"),
        }
    }
}
