//! The error type of dataset indexing, manifests and gallery files.

use std::path::PathBuf;

use reid_io::IoError;

/// Everything that can go wrong while reading or writing dataset files: the
/// file errors every stage shares (I/O, bad content, safetensors), and the
/// formats only datasets have.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    File(#[from] IoError),
    #[error("{path}: parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: image: {message}")]
    Image { path: PathBuf, message: String },
}

impl DataError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError::io(path, source).into()
    }

    /// Bad content in `path`, with a message saying what was expected.
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        IoError::invalid(path, message).into()
    }
}

/// Result with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;
