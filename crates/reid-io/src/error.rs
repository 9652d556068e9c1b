//! The error of reading and writing `reid`'s files.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing a file: each names it.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
}

impl IoError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError::Io {
            path: path.into(),
            source,
        }
    }

    /// Bad content in `path`, with a message saying what was expected.
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        IoError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result with [`IoError`].
pub type Result<T> = std::result::Result<T, IoError>;
