//! Test support for the reference fixtures made with PyTorch, timm and torchreid
//! (`tests/fixtures` of the repository, or the folder named by `REID_FIXTURES`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};

/// The fixture root: `$REID_FIXTURES`, else the repository's `tests/fixtures`.
/// Panics (failing the test) when the folder does not exist: a missing fixture is a
/// failure, never a skip.
pub fn root() -> PathBuf {
    let root = match std::env::var_os("REID_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    };
    assert!(
        root.is_dir(),
        "fixture folder {} not found; set REID_FIXTURES to a folder of fixtures (see tests/fixtures/README.md)",
        root.display()
    );
    root
}

/// Every folder under the fixture root (recursively) that holds all of `files`,
/// sorted. Panics when there is none.
pub fn folders_with(files: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, files: &[&str], out: &mut Vec<PathBuf>) {
        if files.iter().all(|f| dir.join(f).is_file()) {
            out.push(dir.to_path_buf());
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), files, out);
                }
            }
        }
    }
    let root = root();
    let mut out = Vec::new();
    walk(&root, files, &mut out);
    out.sort();
    assert!(
        !out.is_empty(),
        "no fixture folder with {files:?} under {}",
        root.display()
    );
    out
}

/// A tensor read from a fixture file, converted to f64.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Reads every tensor of a safetensors file as f64 (floats and integers alike).
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let d = t.data();
            let data: Vec<f64> = match t.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I32 => d
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{}: {name}: unsupported dtype {other:?}", path.display()),
            };
            (
                name,
                Tensor {
                    shape: t.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |x - truth|
pub fn max_abs_diff(x: &[f64], truth: &[f64]) -> f64 {
    assert_eq!(x.len(), truth.len(), "length differs");
    x.iter().zip(truth).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

/// max |truth|
pub fn max_abs(truth: &[f64]) -> f64 {
    truth.iter().map(|v| v.abs()).fold(0.0, f64::max)
}

/// ||x - truth|| / ||truth||
pub fn rel_l2(x: &[f64], truth: &[f64]) -> f64 {
    assert_eq!(x.len(), truth.len(), "length differs");
    let num: f64 = x.iter().zip(truth).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = truth.iter().map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
