//! The one error type of the engine. Every variant carries enough context (file, tensor name,
//! expected and found shapes) for a one-line message that tells a user what to fix.
use std::path::PathBuf;

/// Result alias used across all kiln crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of every kiln crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure, with the file it concerned.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file that is malformed, truncated or hostile.
    #[error("{path}: invalid safetensors file: {reason}")]
    SafeTensors { path: PathBuf, reason: String },
    /// A tensor that a model or caller needs is not in the file.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor has the wrong shape.
    #[error("{context}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        context: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor has the wrong dtype for an operation.
    #[error("{context}: expected dtype {expected}, found {found}")]
    DTypeMismatch {
        context: String,
        expected: String,
        found: String,
    },
    /// A layout operation (reshape, permute, narrow, broadcast, ...) that is not valid for this layout.
    #[error("layout: {0}")]
    Layout(String),
    /// An invalid argument to a kernel or a layer.
    #[error("{0}")]
    InvalidArgument(String),
    /// A configuration file (e.g. a model's config.json) that is missing fields or holds bad values.
    #[error("{path}: bad config: {reason}")]
    Config { path: PathBuf, reason: String },
    /// A capacity was exceeded: context length, KV-cache size, ...
    #[error("{0}")]
    Capacity(String),
    /// Text that is not what the tokenizer or a parser accepts.
    #[error("{0}")]
    Text(String),
    /// A device (GPU) is not present or failed.
    #[error("device: {0}")]
    Device(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// A [`Error::ShapeMismatch`].
    pub fn shape(context: impl Into<String>, expected: &[usize], found: &[usize]) -> Self {
        Error::ShapeMismatch {
            context: context.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }
    }
}
