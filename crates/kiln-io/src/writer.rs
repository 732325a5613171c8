//! Writing safetensors files, atomically.
//!
//! The layout matches what the reference `safetensors` package writes, byte for byte for the
//! same tensors and (at most one) metadata key: `__metadata__` first, then the tensors sorted by
//! dtype (I64, F32, I32, BF16, F16, U8, BOOL — element sizes never increase, so every tensor
//! starts at a multiple of its element size) and then by name; entries
//! `{"dtype":…,"shape":…,"data_offsets":[b,e]}`; the JSON padded with spaces to a multiple of 8
//! bytes so that the data section starts 8-byte aligned.
use crate::header::{bad, METADATA_KEY};
use kiln_tensor::{DType, Error, Result, Tensor};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Rank used to order tensors in the file, as the reference writer does (larger first).
fn dtype_rank(d: DType) -> u8 {
    match d {
        DType::I64 => 6,
        DType::F32 => 5,
        DType::I32 => 4,
        DType::BF16 => 3,
        DType::F16 => 2,
        DType::U8 => 1,
        DType::Bool => 0,
    }
}

/// A tensor prepared for writing: its name and contiguous bytes.
struct Prepared<'a> {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

/// The header bytes (length field included) and the tensors in file order.
fn prepare<'a, N, I>(
    path: &Path,
    tensors: I,
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<Prepared<'a>>)>
where
    N: AsRef<str>,
    I: IntoIterator<Item = (N, &'a Tensor)>,
{
    let mut seen = HashSet::new();
    let mut list = Vec::new();
    for (name, t) in tensors {
        let name = name.as_ref().to_string();
        if name == METADATA_KEY {
            return Err(bad(
                path,
                format!("`{METADATA_KEY}` cannot be a tensor name"),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(bad(path, format!("duplicate tensor name `{name}`")));
        }
        let bytes = if t.is_contiguous() {
            Cow::Borrowed(t.as_bytes()?)
        } else {
            Cow::Owned(t.contiguous()?.as_bytes()?.to_vec())
        };
        list.push(Prepared {
            name,
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
            bytes,
        });
    }
    list.sort_by(|a, b| {
        dtype_rank(b.dtype)
            .cmp(&dtype_rank(a.dtype))
            .then_with(|| a.name.cmp(&b.name))
    });

    // Build the JSON by hand so the key order is fixed; strings go through serde_json for escaping.
    let s = |x: &str| serde_json::to_string(x).expect("a string always serialises");
    let mut json = String::from("{");
    let mut first = true;
    let mut sep = |json: &mut String| {
        if !std::mem::replace(&mut first, false) {
            json.push(',');
        }
    };
    if !metadata.is_empty() {
        sep(&mut json);
        json.push_str(&s(METADATA_KEY));
        json.push_str(":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&s(k));
            json.push(':');
            json.push_str(&s(v));
        }
        json.push('}');
    }
    let mut offset = 0usize;
    for t in &list {
        let end = offset + t.bytes.len();
        sep(&mut json);
        let shape = t
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",");
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{shape}],\"data_offsets\":[{offset},{end}]}}",
            s(&t.name),
            t.dtype.safetensors_name()
        ));
        offset = end;
    }
    json.push('}');
    let mut header = json.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    Ok((out, list))
}

/// The bytes of a safetensors file holding `tensors` and `metadata` (in memory).
pub fn serialize<'a, N, I>(tensors: I, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>>
where
    N: AsRef<str>,
    I: IntoIterator<Item = (N, &'a Tensor)>,
{
    let (mut out, list) = prepare(Path::new("<memory>"), tensors, metadata)?;
    for t in &list {
        out.extend_from_slice(&t.bytes);
    }
    Ok(out)
}

/// Writes `tensors` (any layout; non-contiguous views are copied) and `metadata` to `path` as a
/// safetensors file, atomically (see [`write_atomic`]): readers see the old file or the whole
/// new one, never a partial write.
pub fn write_safetensors<'a, N, I>(
    path: impl AsRef<Path>,
    tensors: I,
    metadata: &BTreeMap<String, String>,
) -> Result<()>
where
    N: AsRef<str>,
    I: IntoIterator<Item = (N, &'a Tensor)>,
{
    let path = path.as_ref();
    let (header, list) = prepare(path, tensors, metadata)?;
    write_atomic(path, |w| {
        w.write_all(&header)?;
        for t in &list {
            w.write_all(&t.bytes)?;
        }
        Ok(())
    })
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a file atomically: `write` fills a temporary file in the same folder, which is then
/// flushed, fsynced and renamed over `path`; the folder is fsynced so the rename itself is
/// durable. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Make the rename durable. Some file systems cannot open or sync a folder; the data itself is
    // already on disk, so that is not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
