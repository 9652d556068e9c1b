//! The file primitives every stage of `reid` shares, below both the data and the
//! model crates: atomic writes, safetensors files with deterministic bytes (and
//! a reader that checks them), memory-mapped feature values, and the seed mixer
//! of every random stream.

pub mod atomic;
pub mod error;
pub mod feature_data;
pub mod seed;
pub mod tensor_file;

pub use error::{IoError, Result};
