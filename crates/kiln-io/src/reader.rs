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
    /// The map behind `bytes` when the file is memory-mapped (for [`SafeTensors::release`]).
    map: Option<Arc<memmap2::Mmap>>,
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

        let mut mapped = None;
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
                let map = Arc::new(map);
                mapped = Some(map.clone());
                map
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
        let mut st = Self::from_parts(path.to_path_buf(), bytes, Some(mode))?;
        st.map = mapped;
        Ok(st)
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
            map: None,
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

    /// Gives back this process's resident copy of tensor `name`'s pages when the file is
    /// memory-mapped (`madvise(MADV_DONTNEED)` on the pages its bytes occupy, including pages it
    /// shares with its neighbours). A model that converts a tensor on loading (f32 weights kept
    /// as bf16) calls this once the converted copy exists: otherwise every f32 page read for the
    /// conversion stays in the process's resident memory as long as the map lives (GPT-2 124M in
    /// bf16 from an f32 file peaked at 721 MiB, most of it the f32 pages).
    ///
    /// The bytes stay valid and readable: a later read (a tensor borrowing the map, a neighbour
    /// on a shared page) pages them in again from the file, with the same contents. Returns
    /// whether anything was released: `false` for a file read into memory or bytes given
    /// directly (those bytes are the only copy), and on platforms without `madvise`.
    pub fn release(&self, name: &str) -> Result<bool> {
        let t = self.info(name)?;
        let Some(map) = &self.map else {
            return Ok(false);
        };
        let (start, len) = (self.header.data_start + t.data_offsets.0, t.size_in_bytes());
        if len == 0 {
            return Ok(false);
        }
        #[cfg(unix)]
        {
            // SAFETY: the map is a read-only shared map of a regular file (`MmapOptions::map`,
            // `PROT_READ`, `MAP_SHARED`), never written through. Dropping its pages from this
            // process's page table changes no byte anyone can read: the next access faults the
            // same file contents back in. This relies on the file not being rewritten while it
            // is mapped, which the map itself already relies on (see `load`).
            unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                    .map_err(|e| Error::io(&self.path, e))?
            };
            Ok(true)
        }
        #[cfg(not(unix))]
        {
            let _ = (map, start);
            Ok(false)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Resident kB of the mapping that holds `addr` (Linux `/proc/self/smaps`), if found.
    #[cfg(target_os = "linux")]
    fn resident_kb(addr: usize) -> Option<usize> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(rest) = line.strip_prefix("Rss:") {
                    return rest.trim().trim_end_matches("kB").trim().parse().ok();
                }
            }
        }
        None
    }

    /// `release` drops a mapped tensor's resident pages and leaves every byte readable; it does
    /// nothing to bytes read into memory.
    #[test]
    fn release_drops_mapped_pages_and_keeps_the_bytes() {
        let big: Vec<f32> = (0..(2 << 20)).map(|i| (i % 977) as f32 * 0.5).collect();
        let small: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let tensors = [
            (
                "big",
                Tensor::from_vec(big.clone(), vec![2048, 1024]).unwrap(),
            ),
            ("small", Tensor::from_vec(small.clone(), vec![100]).unwrap()),
        ];
        let dir = std::env::temp_dir().join(format!("kiln-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        crate::write_safetensors(
            &path,
            tensors.iter().map(|(n, t)| (*n, t)),
            &BTreeMap::new(),
        )
        .unwrap();

        let st = SafeTensors::open(&path).unwrap();
        let bytes = st.tensor_bytes("big").unwrap();
        let sum: u64 = bytes.iter().map(|&b| b as u64).sum(); // touch every page
        #[cfg(target_os = "linux")]
        let before = resident_kb(bytes.as_ptr() as usize);
        assert!(st.release("big").unwrap());
        #[cfg(target_os = "linux")]
        if let (Some(before), Some(after)) = (before, resident_kb(bytes.as_ptr() as usize)) {
            assert!(before >= 8000, "{before} kB resident after reading 8 MiB");
            assert!(after + 7000 <= before, "{before} kB -> {after} kB");
        }
        // Still readable, same contents (paged in again from the file).
        let again: u64 = st
            .tensor_bytes("big")
            .unwrap()
            .iter()
            .map(|&b| b as u64)
            .sum();
        assert_eq!(sum, again);
        assert_eq!(st.tensor("big").unwrap().to_f32_vec().unwrap(), big);
        assert_eq!(st.tensor("small").unwrap().to_f32_vec().unwrap(), small);
        assert!(st.release("missing").is_err());

        let read = SafeTensors::read(&path).unwrap();
        assert!(!read.release("big").unwrap());
        assert_eq!(read.tensor("big").unwrap().to_f32_vec().unwrap(), big);
        drop(st);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
