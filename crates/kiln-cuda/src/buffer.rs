//! Device buffers: the storage of activations, gradients, parameters, optimizer moments
//! (f32), weights (f32, bf16 or f16) and token ids (i32).
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use kiln_tensor::{DType, Error, Result};

/// Host element types a buffer can be uploaded from and downloaded to.
pub trait DeviceElement: bytemuck::Pod + Send + Sync {
    const DTYPE: DType;
}
impl DeviceElement for f32 {
    const DTYPE: DType = DType::F32;
}
impl DeviceElement for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl DeviceElement for half::f16 {
    const DTYPE: DType = DType::F16;
}
/// Token ids (kernels read them as unsigned 32-bit values).
impl DeviceElement for u32 {
    const DTYPE: DType = DType::I32;
}
impl DeviceElement for i32 {
    const DTYPE: DType = DType::I32;
}

pub(crate) enum Mem {
    Gpu(CudaSlice<u8>),
    Emu(crate::emu::HostMem),
    /// A buffer of no elements: nothing allocated (scratch that has not grown yet costs no
    /// allocation and no driver call).
    Empty,
}

/// A buffer of `len` elements of one dtype in device memory (or in the emulator's memory).
/// Created by [`crate::CudaDevice`]'s `zeros`, `alloc`, `upload` and `upload_tensor`.
pub struct CudaBuf {
    pub(crate) mem: Mem,
    len: usize,
    dtype: DType,
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} × {})", self.len, self.dtype)
    }
}

impl CudaBuf {
    pub(crate) fn new(mem: Mem, len: usize, dtype: DType) -> Self {
        CudaBuf { mem, len, dtype }
    }
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes of the elements.
    pub fn size_in_bytes(&self) -> usize {
        self.len * self.dtype.size_in_bytes()
    }

    pub(crate) fn expect_dtype(&self, what: &str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::DTypeMismatch {
                context: what.to_string(),
                expected: dtype.to_string(),
                found: self.dtype.to_string(),
            });
        }
        Ok(())
    }

    /// Checks that the buffer has dtype `dtype` and at least `need` elements.
    pub(crate) fn check(&self, what: &str, dtype: DType, need: usize) -> Result<()> {
        self.expect_dtype(what, dtype)?;
        self.check_len(what, need)
    }

    /// Checks that the buffer has at least `need` elements.
    pub(crate) fn check_len(&self, what: &str, need: usize) -> Result<()> {
        if self.len < need {
            return Err(Error::invalid(format!(
                "{what}: buffer of {} elements, the sizes need {need}",
                self.len
            )));
        }
        Ok(())
    }

    /// The address of element 0 on `dev` (for tables of addresses passed to kernels).
    pub(crate) fn device_address_for(&self, dev: &crate::CudaDevice) -> u64 {
        match &dev.imp {
            crate::device::Imp::Gpu(g) => self.device_address(&g.stream),
            crate::device::Imp::Emu(_) => self.device_address_unchecked(),
        }
    }

    fn device_address_unchecked(&self) -> u64 {
        match &self.mem {
            Mem::Emu(h) => h.addr() as u64,
            _ => 0,
        }
    }

    /// An error unless the buffer lives on `dev` (or is empty).
    pub(crate) fn expect_device(&self, dev: &crate::CudaDevice, what: &str) -> Result<()> {
        let ok = matches!(
            (&dev.imp, &self.mem),
            (crate::device::Imp::Gpu(_), Mem::Gpu(_))
                | (crate::device::Imp::Emu(_), Mem::Emu(_))
                | (_, Mem::Empty)
        );
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{what}: a buffer of another device"
            )))
        }
    }

    /// False when a kernel wrote outside the buffer (the emulator's guard zones; always true on
    /// a GPU).
    pub(crate) fn guards_intact(&self) -> bool {
        match &self.mem {
            Mem::Emu(h) => h.guards_intact(),
            _ => true,
        }
    }

    pub(crate) fn device_address(&self, stream: &CudaStream) -> u64 {
        match &self.mem {
            Mem::Gpu(s) => {
                let (ptr, _sync) = s.device_ptr(stream);
                ptr
            }
            Mem::Emu(h) => h.addr() as u64,
            Mem::Empty => 0,
        }
    }
}
