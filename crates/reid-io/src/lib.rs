//! The file primitives every stage of `reid` shares, below both the data and the
//! model crates: atomic writes, safetensors files with deterministic bytes (and
//! a reader that checks them), memory-mapped feature values, the seed mixer
//! of every random stream, and the input convention the files record.

pub mod atomic;
pub mod error;
pub mod feature_data;
pub mod input;
pub mod seed;
pub mod tensor_file;

pub use error::{IoError, Result};
pub use input::{InputSpec, Interpolation};
