//! The safetensors header: parsing and validation of untrusted bytes.
//!
//! A safetensors file is
//!
//! ```text
//! [u64 little-endian N] [N bytes of UTF-8 JSON header] [data section]
//! ```
//!
//! The header maps each tensor name to `{"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}`
//! (byte offsets relative to the start of the data section) and may carry one
//! `"__metadata__": {string: string}` entry.
//!
//! Everything here treats the file as hostile. The parser is written by hand on top of
//! `serde_json` values (not a derived struct) so that every defect gets its own message, and so
//! that duplicate keys — which `serde_json` would silently resolve to the last one — are caught.
//! The rules, each with its own error:
//!
//! * the file holds at least the 8-byte length; the length is at most [`MAX_HEADER_LEN`] and fits
//!   in the file;
//! * the header is UTF-8, valid JSON, an object, with no duplicate names;
//! * every tensor entry is an object with `dtype`, `shape` and `data_offsets`, a known dtype,
//!   a shape of non-negative integers whose product (and byte size) fits in `usize`,
//!   `data_offsets` = `[begin, end]` with `begin <= end`;
//! * `end - begin` = dtype size × number of elements;
//! * sorted by offset, the tensors tile the data section exactly: the first starts at 0, each
//!   starts where the previous ends (no overlap, no gap), and the last ends at the end of the file
//!   (no truncation, no trailing bytes).
use kiln_tensor::{DType, Error, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Largest header accepted, in bytes (100 MB). Real headers are kilobytes; a larger length field
/// is a corrupt or hostile file, and accepting it would let a file make us allocate gigabytes.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The name of the optional metadata entry in the header.
pub const METADATA_KEY: &str = "__metadata__";

/// One tensor as the header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Dimensions, outermost first; empty for a scalar.
    pub shape: Vec<usize>,
    /// `[begin, end)` in bytes, relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Number of elements (1 for a scalar). Cannot overflow: checked when parsed.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data: `end - begin`.
    pub fn size_in_bytes(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A parsed and validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The tensors in the order their data appears in the file (sorted by `data_offsets`; ties —
    /// only possible between empty tensors — keep header order).
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` entries (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Byte position of the data section in the file: `8 + N`.
    pub data_start: usize,
    /// Length of the data section: the sum of all tensor sizes.
    pub data_len: usize,
}

/// Builds the error for a defect in `path`.
pub(crate) fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::SafeTensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads and checks the 8-byte length field. `prefix` is the start of the file (at least the
/// first 8 bytes when the file has them); `file_len` its total size. Returns `N`.
pub fn parse_header_len(path: &Path, prefix: &[u8], file_len: u64) -> Result<usize> {
    if file_len == 0 {
        return Err(bad(path, "the file is empty"));
    }
    if file_len < 8 || prefix.len() < 8 {
        return Err(bad(
            path,
            format!("the file is {file_len} bytes, too short to hold the 8-byte header length"),
        ));
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(bad(
            path,
            format!("header length {n} is absurd (the limit is {MAX_HEADER_LEN} bytes)"),
        ));
    }
    if n > file_len - 8 {
        return Err(bad(
            path,
            format!(
                "header length {n} is larger than the file ({file_len} bytes, {} after the length field)",
                file_len - 8
            ),
        ));
    }
    if n == 0 {
        return Err(bad(path, "header length is 0: there is no JSON header"));
    }
    Ok(n as usize)
}

/// A JSON object as a list of entries in file order, so that duplicate keys stay visible (a
/// derived map would silently keep the last one). `V` is `Box<RawValue>` for the top level (the
/// entries are parsed one by one afterwards) and `Value` inside an entry.
struct Entries<V>(Vec<(String, V)>);

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Vis<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries<V>, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Vis(std::marker::PhantomData))
    }
}

/// The entries of the JSON object `raw`, or `None` if `raw` is not an object; a duplicate key
/// or a value that does not parse is an error.
fn object_entries(raw: &RawValue) -> Option<std::result::Result<Vec<(String, Value)>, String>> {
    if !raw.get().trim_start().starts_with('{') {
        return None;
    }
    let entries: Entries<Value> = match serde_json::from_str(raw.get()) {
        Ok(e) => e,
        Err(e) => {
            // The position serde_json gives is inside the entry, not the header: drop it.
            let msg = e.to_string();
            let msg = match msg.rfind(" at line ") {
                Some(i) => &msg[..i],
                None => &msg,
            };
            return Some(Err(format!("entry is not valid JSON: {msg}")));
        }
    };
    let mut seen = HashSet::new();
    for (k, _) in &entries.0 {
        if !seen.insert(k.as_str()) {
            return Some(Err(format!("duplicate key `{k}`")));
        }
    }
    Some(Ok(entries.0))
}

fn raw_kind(raw: &RawValue) -> String {
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(v) => json_kind(&v).to_string(),
        Err(e) => format!("not valid JSON ({e})"),
    }
}

/// Parses and validates the JSON header `json` (the `N` bytes after the length field) of a file
/// of `file_len` bytes. `path` only names the file in errors.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
    let data_start = 8 + json.len();
    let text = std::str::from_utf8(json).map_err(|e| {
        bad(
            path,
            format!(
                "header is not valid UTF-8 (at byte {} of the header)",
                e.valid_up_to()
            ),
        )
    })?;
    // One pass that keeps the entries as a list (values left raw). Only when it fails is the
    // header parsed again as a plain JSON value, to say what is wrong in the file's terms.
    let entries: Entries<Box<RawValue>> = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(first) => {
            let reason = match serde_json::from_str::<Value>(text) {
                Err(e) => format!("header is not valid JSON: {e}"),
                Ok(Value::Object(_)) => format!("header is not valid JSON: {first}"),
                Ok(v) => format!("header is {}, not a JSON object", json_kind(&v)),
            };
            return Err(bad(path, reason));
        }
    };

    let mut seen = HashSet::new();
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(bad(
                path,
                format!("duplicate tensor name `{name}` in the header"),
            ));
        }
        if name == METADATA_KEY {
            metadata = parse_metadata(path, &value)?;
            continue;
        }
        tensors.push(parse_entry(path, name, &value)?);
    }

    // Sort by position (stable: empty tensors at the same offset keep header order), then check
    // that the tensors tile the data section.
    tensors.sort_by_key(|t| t.data_offsets);
    let mut end = 0usize;
    let mut prev: Option<&TensorInfo> = None;
    for t in &tensors {
        let (b, e) = t.data_offsets;
        if b < end {
            let p = prev.expect("end > 0 implies a previous tensor");
            return Err(bad(
                path,
                format!(
                    "tensors `{}` (data_offsets [{}, {}]) and `{}` (data_offsets [{b}, {e}]) overlap",
                    p.name, p.data_offsets.0, p.data_offsets.1, t.name
                ),
            ));
        }
        if b > end {
            let msg = match prev {
                None => format!(
                    "gap in the data section: the first tensor `{}` starts at byte {b}, not 0",
                    t.name
                ),
                Some(p) => format!(
                    "gap in the data section: {} unused bytes between `{}` (ends at {end}) and `{}` (starts at {b})",
                    b - end,
                    p.name,
                    t.name
                ),
            };
            return Err(bad(path, msg));
        }
        end = e;
        prev = Some(t);
    }
    let available = file_len - data_start as u64;
    if (end as u64) > available {
        let last = prev.expect("end > 0 implies a tensor");
        return Err(bad(
            path,
            format!(
                "tensor `{}` is out of range (truncated file?): its data ends at byte {end} of the data section but the file holds only {available} bytes after the header",
                last.name
            ),
        ));
    }
    if (end as u64) < available {
        return Err(bad(
            path,
            format!(
                "the data section holds {available} bytes but the tensors account for only {end} ({} trailing bytes)",
                available - end as u64
            ),
        ));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
        data_len: end,
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_metadata(path: &Path, raw: &RawValue) -> Result<BTreeMap<String, String>> {
    let list = match object_entries(raw) {
        None => {
            return Err(bad(
                path,
                format!(
                    "`{METADATA_KEY}` is {}, not an object of strings",
                    raw_kind(raw)
                ),
            ))
        }
        Some(Err(e)) => return Err(bad(path, format!("`{METADATA_KEY}`: {e}"))),
        Some(Ok(list)) => list,
    };
    let mut out = BTreeMap::new();
    for (k, v) in list {
        let Value::String(s) = v else {
            return Err(bad(
                path,
                format!(
                    "`{METADATA_KEY}` key `{k}` holds {}, not a string",
                    json_kind(&v)
                ),
            ));
        };
        out.insert(k, s);
    }
    Ok(out)
}

fn parse_entry(path: &Path, name: String, raw: &RawValue) -> Result<TensorInfo> {
    let ctx = |msg: String| bad(path, format!("tensor `{name}`: {msg}"));
    let obj = match object_entries(raw) {
        None => {
            return Err(ctx(format!(
                "entry is {}, not an object with dtype, shape and data_offsets",
                raw_kind(raw)
            )))
        }
        Some(Err(e)) => return Err(ctx(e)),
        Some(Ok(list)) => list,
    };
    let get = |key: &str| {
        obj.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| ctx(format!("missing key `{key}`")))
    };

    let dtype_v = get("dtype")?;
    let Value::String(dtype_name) = dtype_v else {
        return Err(ctx(format!(
            "`dtype` is {}, not a string",
            json_kind(dtype_v)
        )));
    };
    let dtype = DType::from_safetensors_name(dtype_name).ok_or_else(|| {
        ctx(format!(
            "unknown dtype `{dtype_name}` (kiln reads F32, F16, BF16, I64, I32, U8, BOOL)"
        ))
    })?;

    let shape_v = get("shape")?;
    let Value::Array(dims) = shape_v else {
        return Err(ctx(format!(
            "`shape` is {}, not an array of non-negative integers",
            json_kind(shape_v)
        )));
    };
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims {
        match d.as_u64().and_then(|d| usize::try_from(d).ok()) {
            Some(d) => shape.push(d),
            None => {
                return Err(ctx(format!(
                    "`shape` entry {d} is not a non-negative integer that fits in usize"
                )))
            }
        }
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            ctx(format!(
                "shape {shape:?} has more elements than fit in usize (overflow)"
            ))
        })?;
    let need = numel.checked_mul(dtype.size_in_bytes()).ok_or_else(|| {
        ctx(format!(
            "shape {shape:?} of {} needs more bytes than fit in usize (overflow)",
            dtype.safetensors_name()
        ))
    })?;

    let off_v = get("data_offsets")?;
    let offsets: Option<Vec<usize>> = match off_v {
        Value::Array(a) if a.len() == 2 => a
            .iter()
            .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect(),
        _ => None,
    };
    let Some(offsets) = offsets else {
        return Err(ctx(format!(
            "`data_offsets` must be [begin, end] with two non-negative integers, found {off_v}"
        )));
    };
    let (b, e) = (offsets[0], offsets[1]);
    if b > e {
        return Err(ctx(format!(
            "data_offsets [{b}, {e}] end before they begin"
        )));
    }
    if e - b != need {
        return Err(ctx(format!(
            "data_offsets [{b}, {e}] hold {} bytes but {} {shape:?} needs {numel} × {} = {need} bytes",
            e - b,
            dtype.safetensors_name(),
            dtype.size_in_bytes()
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        data_offsets: (b, e),
    })
}

/// Parses a whole file held in memory: length field, header and the data-section bounds.
pub fn parse_file_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    let n = parse_header_len(path, bytes, bytes.len() as u64)?;
    parse_header(path, &bytes[8..8 + n], bytes.len() as u64)
}

/// A label for bytes that did not come from a file.
pub(crate) fn memory_path() -> PathBuf {
    PathBuf::from("<memory>")
}
