//! Where tensor bytes live.
//!
//! * [`AlignedBuffer`]: an owned, zero-initialised buffer whose start is 64-byte aligned (one
//!   AVX-512 register, one cache line). It is a `Vec` of 64-byte blocks, so no `unsafe` is needed
//!   to allocate, free or reinterpret it.
//! * Shared bytes: a range inside some reference-counted owner — in practice a memory map of a
//!   safetensors file, or one buffer the plain-read path filled. The owner stays alive as long as
//!   any tensor points into it, so loading a checkpoint copies nothing.
//!
//! Typed access (`&[f32]` over the bytes) requires the start to be aligned to the element size.
//! An owned buffer always is; a range inside a memory map is only when the file put it there
//! (safetensors does not promise alignment). [`Storage::shared`] therefore checks the address and
//! falls back to a one-time aligned copy of that tensor when it is misaligned; see
//! `Tensor::from_shared_bytes`.
use crate::{DType, Device, Element, Error, Result};
use std::sync::Arc;

/// One 64-byte, 64-byte-aligned block: the unit of [`AlignedBuffer`].
#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Block64([u8; 64]);

/// Owned bytes whose first byte is 64-byte aligned.
#[derive(Clone)]
pub struct AlignedBuffer {
    blocks: Vec<Block64>,
    len: usize,
}

impl AlignedBuffer {
    /// Alignment of the first byte, in bytes.
    pub const ALIGN: usize = 64;

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuffer {
            blocks: vec![Block64([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// A copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut buf = Self::zeroed(bytes.len());
        buf.as_bytes_mut().copy_from_slice(bytes);
        buf
    }

    /// A copy of `values` as raw bytes.
    pub fn from_slice<T: bytemuck::Pod>(values: &[T]) -> Self {
        Self::from_bytes(bytemuck::cast_slice(values))
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.blocks)[..self.len]
    }
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.blocks)[..self.len]
    }

    /// The bytes as `&[T]`; trailing bytes that do not fill a whole `T` are not included.
    pub fn as_slice<T: bytemuck::Pod>(&self) -> &[T] {
        let n = self.len / std::mem::size_of::<T>().max(1);
        &bytemuck::cast_slice::<Block64, T>(&self.blocks)[..n]
    }
    /// Mutable variant of [`AlignedBuffer::as_slice`].
    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        let n = self.len / std::mem::size_of::<T>().max(1);
        &mut bytemuck::cast_slice_mut::<Block64, T>(&mut self.blocks)[..n]
    }
}

impl AsRef<[u8]> for AlignedBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuffer({} bytes)", self.len)
    }
}

/// Anything that owns bytes that tensors can borrow: a memory map, an aligned buffer, ...
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// The bytes behind a tensor.
pub enum Storage {
    /// Owned, 64-byte aligned host memory.
    Cpu(AlignedBuffer),
    /// `len` bytes at `start` inside a shared owner (a memory-mapped file); read-only.
    /// Invariant: `start + len <= owner.len()` and `start` is aligned for the tensor's dtype.
    CpuShared {
        owner: SharedBytes,
        start: usize,
        len: usize,
    },
}

impl Storage {
    /// Borrowed bytes `start .. start + len` of `owner`, checked to be in range and aligned for
    /// `dtype`. Returns `Ok(None)` when the range is in bounds but misaligned, so the caller can
    /// decide to copy.
    pub fn shared(
        owner: SharedBytes,
        start: usize,
        len: usize,
        dtype: DType,
    ) -> Result<Option<Self>> {
        let total = (*owner).as_ref().len();
        if start.checked_add(len).is_none_or(|end| end > total) {
            return Err(Error::invalid(format!(
                "byte range {start}+{len} is outside a buffer of {total} bytes"
            )));
        }
        let addr = (*owner).as_ref()[start..].as_ptr() as usize;
        if !addr.is_multiple_of(dtype.size_in_bytes()) {
            return Ok(None);
        }
        Ok(Some(Storage::CpuShared { owner, start, len }))
    }

    /// The device this storage lives on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) | Storage::CpuShared { .. } => Device::Cpu,
        }
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Storage::Cpu(buf) => buf.as_bytes(),
            Storage::CpuShared { owner, start, len } => &(**owner).as_ref()[*start..*start + *len],
        }
    }

    /// Whether the bytes are borrowed from a shared owner (zero-copy) rather than owned.
    pub fn is_borrowed(&self) -> bool {
        matches!(self, Storage::CpuShared { .. })
    }

    /// Bytes as a typed slice. Errors (never panics) if the bytes are misaligned for `T` or their
    /// length is not a multiple of `size_of::<T>()`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        bytemuck::try_cast_slice(self.as_bytes()).map_err(|e| {
            Error::invalid(format!(
                "cannot view {} bytes as {}: {e:?}",
                self.as_bytes().len(),
                T::DTYPE
            ))
        })
    }

    /// Mutable typed bytes; only owned storage can be written.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        match self {
            Storage::Cpu(buf) => bytemuck::try_cast_slice_mut(buf.as_bytes_mut())
                .map_err(|e| Error::invalid(format!("cannot view bytes as {}: {e:?}", T::DTYPE))),
            Storage::CpuShared { .. } => Err(Error::invalid(
                "tensor is borrowed from a read-only memory map; copy it (contiguous_owned) before writing",
            )),
        }
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Cpu(b) => write!(f, "Cpu({} bytes)", b.len()),
            Storage::CpuShared { start, len, .. } => write!(f, "CpuShared({len} bytes at {start})"),
        }
    }
}
