//! The error type of dataset indexing, manifests and gallery files.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing dataset files.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: image: {message}")]
    Image { path: PathBuf, message: String },
    #[error(transparent)]
    File(#[from] reid_io::IoError),
}

impl DataError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// Bad content in `path`, with a message saying what was expected.
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;
