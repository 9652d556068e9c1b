//! Reading the reference fixtures (safetensors of float64 truth and JSON
//! metadata made with PyTorch, timm and torchreid), every failure an error that
//! names the file and, for a missing tensor, the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{ParityError, Result};

/// A tensor of a reference file, in f64.
#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// The tensors of one reference file.
#[derive(Debug, Clone)]
pub struct Reference {
    path: PathBuf,
    pub tensors: BTreeMap<String, RefTensor>,
}

impl Reference {
    /// Reads every tensor of `path` (floats and integers alike, as f64).
    pub fn read(path: &Path) -> Result<Self> {
        let tensors = reid_io::tensor_file::read_all_f64(path).map_err(|e| missing_or(path, e.into()))?;
        let tensors = tensors
            .into_iter()
            .map(|(name, (shape, data))| (name, RefTensor { shape, data }))
            .collect();
        Ok(Reference {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// Tensor `key`; an error naming the file and the key where it is absent.
    pub fn get(&self, key: &str) -> Result<&RefTensor> {
        self.tensors.get(key).ok_or_else(|| ParityError::Fixture {
            path: self.path.clone(),
            message: format!("no '{key}' tensor; regenerate the fixture (tests/fixtures/README.md)"),
        })
    }
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| missing_or(path, reid_io::IoError::io(path, e).into()))?;
    serde_json::from_str(&text).map_err(|e| ParityError::Fixture {
        path: path.to_path_buf(),
        message: format!("not JSON: {e}"),
    })
}

/// "missing" where `path` does not exist (the usual case of a partial fixture
/// folder), else `error`.
fn missing_or(path: &Path, error: ParityError) -> ParityError {
    match path.exists() {
        false => ParityError::Fixture {
            path: path.to_path_buf(),
            message: "missing from the fixture folder (copy the repository's tests/fixtures)".into(),
        },
        true => error,
    }
}

/// max |x - truth|
pub fn max_abs_diff(x: &[f64], truth: &[f64]) -> f64 {
    x.iter().zip(truth).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

/// max |truth|
pub fn max_abs(truth: &[f64]) -> f64 {
    truth.iter().map(|v| v.abs()).fold(0.0, f64::max)
}

/// ||x - truth|| / ||truth|| (||x - truth|| where the truth is all zeros).
pub fn rel_l2(x: &[f64], truth: &[f64]) -> f64 {
    let num: f64 = x.iter().zip(truth).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = truth.iter().map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
