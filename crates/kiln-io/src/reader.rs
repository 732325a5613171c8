//! Reading safetensors files: memory-mapped (zero-copy) or with one plain read.
use crate::header::{bad, memory_path, parse_file_bytes, parse_header_len, Header, TensorInfo};
use kiln_tensor::storage::{AlignedBuffer, SharedBytes};
use kiln_tensor::{Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How [`SafeTensors::load`] gets the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadMode {
    /// Map the file into memory. Opening reads only the header; tensor bytes are paged in by the
    /// OS when first touched and tensors borrow them without copying.
    #[default]
    Mmap,
    /// Read the whole file into one 64-byte-aligned buffer with `std::fs` (for file systems
    /// where mapping is slow or unsafe: network mounts, FUSE, files that may be rewritten).
    /// Tensors then borrow that buffer, again without a further copy.
    Read,
}

/// An open safetensors file: the validated header plus the bytes, shared by reference counting
/// with every tensor taken from it.
///
/// ```no_run
/// let st = kiln_io::SafeTensors::open("model.safetensors")?;
/// let w = st.tensor("wte.weight")?; // zero-copy view into the map
/// # Ok::<(), kiln_tensor::Error>(())
/// ```
pub struct SafeTensors {
    path: PathBuf,
    header: Header,
    bytes: SharedBytes,
    mode: Option<LoadMode>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors")
            .field("path", &self.path)
            .field("tensors", &self.header.tensors.len())
            .field("data_start", &self.header.data_start)
            .field("data_len", &self.header.data_len)
            .field("mode", &self.mode)
            .finish()
    }
}

impl SafeTensors {
    /// Opens `path` with a memory map ([`LoadMode::Mmap`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::load(path, LoadMode::Mmap)
    }

    /// Reads `path` into memory ([`LoadMode::Read`]).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        Self::load(path, LoadMode::Read)
    }

    /// Opens `path` the way `mode` says.
    pub fn load(path: impl AsRef<Path>, mode: LoadMode) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(bad(path, "not a regular file"));
        }
        let file_len = meta.len();
        // Check the length field before mapping or allocating anything.
        let mut prefix = [0u8; 8];
        let got = read_up_to(&mut file, &mut prefix).map_err(|e| Error::io(path, e))?;
        parse_header_len(path, &prefix[..got], file_len)?;
        let len = usize::try_from(file_len).map_err(|_| {
            bad(
                path,
                format!("file of {file_len} bytes does not fit in memory"),
            )
        })?;

        let bytes: SharedBytes = match mode {
            LoadMode::Mmap => {
                // As with every memory-mapped loader, the file must not be truncated or rewritten
                // by another process while mapped (`LoadMode::Read` where that cannot be promised).
                // SAFETY: the map is read-only, only handed out as `&[u8]`; kiln replaces files
                // only by atomic rename, which leaves an existing map's inode untouched.
                let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file) }
                    .map_err(|e| Error::io(path, e))?;
                if map.len() != len {
                    return Err(bad(path, "the file changed size while it was being opened"));
                }
                Arc::new(map)
            }
            LoadMode::Read => {
                let mut buf = AlignedBuffer::zeroed(len);
                buf.as_bytes_mut()[..8].copy_from_slice(&prefix);
                file.read_exact(&mut buf.as_bytes_mut()[8..]).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        bad(path, "the file shrank while it was being read")
                    } else {
                        Error::io(path, e)
                    }
                })?;
                Arc::new(buf)
            }
        };
        Self::from_parts(path.to_path_buf(), bytes, Some(mode))
    }

    /// Parses a file held in memory (copied once into an aligned buffer).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_shared(Arc::new(AlignedBuffer::from_bytes(bytes)), memory_path())
    }

    /// Parses a file whose bytes are already in a shared owner; `path` names it in errors.
    pub fn from_shared(bytes: SharedBytes, path: impl Into<PathBuf>) -> Result<Self> {
        Self::from_parts(path.into(), bytes, None)
    }

    fn from_parts(path: PathBuf, bytes: SharedBytes, mode: Option<LoadMode>) -> Result<Self> {
        let header = parse_file_bytes(&path, (*bytes).as_ref())?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafeTensors {
            path,
            header,
            bytes,
            mode,
            index,
        })
    }

    /// The file this came from (`<memory>` for [`SafeTensors::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// How the bytes were loaded; `None` for bytes given directly.
    pub fn mode(&self) -> Option<LoadMode> {
        self.mode
    }
    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }
    /// Tensor names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.header.tensors.iter().map(|t| t.name.as_str())
    }
    pub fn len(&self) -> usize {
        self.header.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.header.tensors.is_empty()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    /// The `__metadata__` entries.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }
    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> usize {
        (*self.bytes).as_ref().len()
    }
    /// The shared owner of the file's bytes (the map or the buffer).
    pub fn shared_bytes(&self) -> &SharedBytes {
        &self.bytes
    }

    /// The header entry of `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.index
            .get(name)
            .map(|&i| &self.header.tensors[i])
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// The raw little-endian bytes of `name` (no copy).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info(name)?;
        let start = self.header.data_start + t.data_offsets.0;
        Ok(&(*self.bytes).as_ref()[start..start + t.size_in_bytes()])
    }

    /// Tensor `name` as a contiguous [`Tensor`] that borrows the file's bytes (zero-copy).
    ///
    /// If the file placed the tensor at an address that is not a multiple of its element size
    /// (safetensors does not promise alignment), that one tensor is copied into an aligned buffer
    /// instead; [`Tensor::is_borrowed`] tells which happened.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.info(name)?;
        self.tensor_of(t)
    }

    fn tensor_of(&self, t: &TensorInfo) -> Result<Tensor> {
        let start = self.header.data_start + t.data_offsets.0;
        Tensor::from_shared_bytes(
            self.bytes.clone(),
            start,
            t.size_in_bytes(),
            t.dtype,
            t.shape.clone(),
        )
        .map_err(|e| bad(&self.path, format!("tensor `{}`: {e}", t.name)))
    }

    /// Every tensor, in file order.
    pub fn load_all(&self) -> Result<Vec<(String, Tensor)>> {
        self.header
            .tensors
            .iter()
            .map(|t| Ok((t.name.clone(), self.tensor_of(t)?)))
            .collect()
    }

    /// Sum over tensors of their element counts.
    pub fn total_params(&self) -> u128 {
        self.header.tensors.iter().map(|t| t.numel() as u128).sum()
    }
}

/// Reads until `buf` is full or the file ends; returns the number of bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
