//! Test support (a dev-dependency only): where the reference fixtures made with
//! PyTorch, timm and torchreid are (`tests/fixtures` of the repository, or the
//! folder named by `REID_FIXTURES`), and readers that fail the test on a bad
//! file. The harness that returns errors is `reid-parity`'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// Every folder under the fixture root (recursively) that holds all of `files`
/// (files or folders),
/// sorted. Panics when there is none.
pub fn folders_with(files: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, files: &[&str], out: &mut Vec<PathBuf>) {
        if files.iter().all(|f| dir.join(f).exists()) {
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

/// Reads every tensor of a safetensors file as f64 (floats and integers alike);
/// panics (failing the test) naming the file where it cannot.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    let all = reid_io::tensor_file::read_all_f64(path).unwrap_or_else(|e| panic!("{e}"));
    all.into_iter()
        .map(|(name, (shape, data))| (name, Tensor { shape, data }))
        .collect()
}

/// Reads a JSON file; panics naming it where it cannot.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
