//! Loading and saving weights: local safetensors files and the Hugging Face hub
//! cache, with names and shapes checked before anything is set.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{Device, Tensor, Var};

use crate::model::{is_head, ReidModel};

/// Where weights come from: a local file, or `hf:OWNER/NAME[/FILE]` on the hub
/// (`FILE` defaults to `model.safetensors`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    File(PathBuf),
    Hub { repo: String, file: String },
}

impl FromStr for WeightSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("hf:") else {
            return Ok(WeightSource::File(PathBuf::from(s)));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() < 2 || parts[..2].iter().any(|p| p.is_empty()) {
            return Err(format!("'{s}': expected hf:OWNER/NAME or hf:OWNER/NAME/FILE"));
        }
        let file = if parts.len() > 2 {
            parts[2..].join("/")
        } else {
            "model.safetensors".into()
        };
        Ok(WeightSource::Hub {
            repo: format!("{}/{}", parts[0], parts[1]),
            file,
        })
    }
}

impl fmt::Display for WeightSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightSource::File(p) => write!(f, "{}", p.display()),
            WeightSource::Hub { repo, file } => write!(f, "hf:{repo}/{file}"),
        }
    }
}

/// Errors of weight loading.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: cannot write: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{path}: refusing to write a non-finite checkpoint: tensor '{tensor}' holds {value}; nothing was written")]
    NonFinite { path: PathBuf, tensor: String, value: f64 },
    #[error("{path}: the weights do not fit the model:\n{mismatch}")]
    Mismatch { path: PathBuf, mismatch: Mismatch },
    #[error("hf:{repo}/{file} is not in the hub cache ({cache}) and {why}; download it where there is network (e.g. `huggingface-cli download {repo} {file}`) or pass a local .safetensors path")]
    NotCached {
        repo: String,
        file: String,
        cache: PathBuf,
        why: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Missing, unexpected and mis-shaped tensors of a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mismatch {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, model shape, file shape)
    pub mis_shaped: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl Mismatch {
    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mis_shaped.is_empty()
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            let mut s = v.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 20 {
                s.push_str(&format!(", ... ({} in all)", v.len()));
            }
            s
        };
        if !self.missing.is_empty() {
            writeln!(f, "  missing ({}): {}", self.missing.len(), list(&self.missing))?;
        }
        if !self.unexpected.is_empty() {
            writeln!(
                f,
                "  unexpected ({}): {}",
                self.unexpected.len(),
                list(&self.unexpected)
            )?;
        }
        for (name, model, file) in &self.mis_shaped {
            writeln!(f, "  mis-shaped: {name}: model {model:?}, file {file:?}")?;
        }
        Ok(())
    }
}

/// Which of the model's variables a checkpoint must provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadScope {
    /// Backbone only (an ImageNet checkpoint); the heads keep their values and any
    /// head tensors in the file are ignored.
    Backbone,
    /// Backbone and heads (a `reid` checkpoint).
    Full,
}

/// Tensors in a checkpoint that are never loaded: ImageNet classifiers and
/// PyTorch's batch-norm counters.
fn ignored(name: &str) -> bool {
    name.starts_with("fc.") || name.ends_with("num_batches_tracked")
}

/// The local path of `source`: the file itself, or the hub cache entry (downloaded
/// first when it is missing, the network allows and `HF_HUB_OFFLINE` is not set).
pub fn resolve(source: &WeightSource) -> Result<PathBuf, WeightError> {
    match source {
        WeightSource::File(p) => Ok(p.clone()),
        WeightSource::Hub { repo, file } => {
            let cache = hf_hub::Cache::from_env();
            if let Some(path) = cache.model(repo.clone()).get(file) {
                return Ok(path);
            }
            let offline = std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
            let not_cached = |why: String| WeightError::NotCached {
                repo: repo.clone(),
                file: file.clone(),
                cache: cache.path().clone(),
                why,
            };
            if offline {
                return Err(not_cached("HF_HUB_OFFLINE is set".into()));
            }
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| not_cached(format!("the hub client failed: {e}")))?;
            api.model(repo.clone())
                .get(file)
                .map_err(|e| not_cached(format!("downloading failed: {e}")))
        }
    }
}

/// Reads every tensor of a safetensors file onto the CPU.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, WeightError> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| WeightError::Read {
        path: path.to_path_buf(),
        message: format!("{e}; expected a safetensors checkpoint"),
    })
}

/// Sets `vars` from the safetensors file at `path`. Every variable must be in the
/// file with its shape; every tensor of the file must be a variable unless
/// `ignore(name)`. All of it is checked first: on any mismatch nothing is changed
/// and the error lists the missing, unexpected and mis-shaped tensors.
pub fn load_into(vars: &[(String, Var)], path: &Path, ignore: impl Fn(&str) -> bool) -> Result<(), WeightError> {
    let tensors = read_safetensors(path)?;
    let mut mismatch = Mismatch::default();
    for (name, var) in vars {
        match tensors.get(name) {
            None => mismatch.missing.push(name.clone()),
            Some(t) if t.dims() != var.dims() => {
                mismatch
                    .mis_shaped
                    .push((name.clone(), var.dims().to_vec(), t.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    mismatch.unexpected = tensors
        .keys()
        .filter(|n| !ignore(n) && !known.contains(n.as_str()))
        .cloned()
        .collect();
    mismatch.unexpected.sort();
    if !mismatch.is_empty() {
        return Err(WeightError::Mismatch {
            path: path.to_path_buf(),
            mismatch,
        });
    }
    for (name, var) in vars {
        var.set(&tensors[name].to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

impl ReidModel {
    /// Sets the model's variables from `path` (see [`load_into`]). ImageNet `fc.*`
    /// and `num_batches_tracked` tensors are ignored, and with
    /// [`LoadScope::Backbone`] so are the heads.
    pub fn load_weights(&self, path: &Path, scope: LoadScope) -> Result<(), WeightError> {
        let backbone_only = scope == LoadScope::Backbone;
        let vars: Vec<(String, Var)> = self
            .named_vars()
            .into_iter()
            .filter(|(n, _)| !(backbone_only && is_head(n)))
            .collect();
        load_into(&vars, path, |n| ignored(n) || (backbone_only && is_head(n)))?;
        Ok(self.refresh_weight_copies()?)
    }

    /// Writes every variable as f32 under timm's names (heads as `id_classifier.*`,
    /// `verif_classifier.*`), atomically, with `metadata` in the header.
    pub fn save_weights(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<(), WeightError> {
        write_safetensors(path, &self.state_dict()?, metadata)
    }
}

/// The little-endian bytes of a tensor (f64 kept as f64, anything else as f32);
/// an error naming `name` when a value is NaN or infinite.
fn finite_bytes(name: &str, t: &Tensor, path: &Path) -> Result<(Vec<u8>, safetensors::Dtype), WeightError> {
    let non_finite = |v: f64| WeightError::NonFinite {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        value: v,
    };
    if t.dtype() == candle_core::DType::F64 {
        let v: Vec<f64> = reid_ops::ledger::read(t)?;
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            return Err(non_finite(*bad));
        }
        Ok((
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            safetensors::Dtype::F64,
        ))
    } else {
        let v: Vec<f32> = reid_ops::ledger::read(&t.to_dtype(candle_core::DType::F32)?)?;
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            return Err(non_finite(*bad as f64));
        }
        Ok((
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            safetensors::Dtype::F32,
        ))
    }
}

/// Writes `tensors` (f64 kept as f64, anything else as f32) to a safetensors file,
/// atomically and byte for byte reproducibly, with `metadata` in the header.
/// Refuses, writing nothing, when any value is not finite.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), WeightError> {
    let write_err = |e: String| WeightError::Write {
        path: path.to_path_buf(),
        message: e,
    };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data = names
        .iter()
        .map(|n| {
            let t = &tensors[*n];
            let (bytes, dtype) = finite_bytes(n, t, path)?;
            Ok(((*n).clone(), bytes, t.dims().to_vec(), dtype))
        })
        .collect::<Result<Vec<_>, WeightError>>()?;
    let views = data
        .iter()
        .map(|(n, bytes, shape, dtype)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| write_err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    reid_io::tensor_file::write(path, views, metadata).map_err(|e| write_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            "hf:timm/res2net50_26w_4s.in1k".parse::<WeightSource>().unwrap(),
            WeightSource::Hub {
                repo: "timm/res2net50_26w_4s.in1k".into(),
                file: "model.safetensors".into()
            }
        );
        assert_eq!(
            "hf:a/b/sub/w.safetensors".parse::<WeightSource>().unwrap(),
            WeightSource::Hub {
                repo: "a/b".into(),
                file: "sub/w.safetensors".into()
            }
        );
        assert_eq!(
            "x.safetensors".parse::<WeightSource>().unwrap(),
            WeightSource::File("x.safetensors".into())
        );
        assert!("hf:onlyname".parse::<WeightSource>().is_err());
    }
}
