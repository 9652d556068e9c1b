//! The checkpoint format: the model's tensors under timm's names (loadable by
//! timm with `strict=False`), with the facts needed to rebuild the model in the
//! safetensors header. Training adds its position there; see `reid-train`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use reid_io::input::{InputSpec, Interpolation};

use crate::arch::Arch;
use crate::model::{ModelConfig, ReidModel};
use crate::weights::{LoadScope, WeightError};
use reid_ops::Exec;

/// Metadata keys stored in every checkpoint's header.
pub mod keys {
    pub const ARCH: &str = "reid.arch";
    pub const LAST_STRIDE: &str = "reid.last_stride";
    pub const NUM_CLASSES: &str = "reid.num_classes";
    /// "true" when the model has a neck (absent in older checkpoints: none).
    pub const BNNECK: &str = "reid.bnneck";
    pub const HEIGHT: &str = "reid.height";
    pub const WIDTH: &str = "reid.width";
    /// The resize filter of the input (absent in older checkpoints: bilinear).
    pub const INTERPOLATION: &str = "reid.interpolation";
}

/// What a checkpoint says about the model it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointInfo {
    pub model: ModelConfig,
    /// The network's input: size and resize filter.
    pub input: InputSpec,
}

impl CheckpointInfo {
    /// The header entries that describe the model.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let c = self.model;
        BTreeMap::from([
            (keys::ARCH.to_string(), c.arch.name.to_string()),
            (keys::LAST_STRIDE.to_string(), c.last_stride.to_string()),
            (keys::NUM_CLASSES.to_string(), c.num_classes.to_string()),
            (keys::BNNECK.to_string(), c.bnneck.to_string()),
            (keys::HEIGHT.to_string(), self.input.height.to_string()),
            (keys::WIDTH.to_string(), self.input.width.to_string()),
            (keys::INTERPOLATION.to_string(), self.input.interpolation.to_string()),
        ])
    }
}

/// The header metadata of a checkpoint (read without loading its tensors).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, WeightError> {
    reid_io::tensor_file::read_metadata(path).map_err(|e| WeightError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A whole number stored under `key` in `meta`, the header of `path`.
pub fn number(meta: &BTreeMap<String, String>, key: &str, path: &Path) -> Result<u64, WeightError> {
    let value = meta.get(key).ok_or_else(|| WeightError::Read {
        path: path.to_path_buf(),
        message: format!("no '{key}' metadata: not a reid checkpoint (write one with `reid train`)"),
    })?;
    value.parse().map_err(|_| WeightError::Read {
        path: path.to_path_buf(),
        message: format!("metadata '{key}' = '{value}' is not a whole number"),
    })
}

/// Reads the model facts from a checkpoint written by [`save`].
pub fn read_info(path: &Path) -> Result<CheckpointInfo, WeightError> {
    let meta = read_metadata(path)?;
    let arch = meta.get(keys::ARCH).ok_or_else(|| WeightError::Read {
        path: path.to_path_buf(),
        message: format!(
            "no '{}' metadata: not a reid checkpoint (write one with `reid train`)",
            keys::ARCH
        ),
    })?;
    let arch: Arch = arch.parse().map_err(|m: String| WeightError::Read {
        path: path.to_path_buf(),
        message: m,
    })?;
    let num = |k: &str| number(&meta, k, path).map(|v| v as usize);
    let interpolation = match meta.get(keys::INTERPOLATION) {
        None => Interpolation::Bilinear,
        Some(v) => v.parse().map_err(|m: String| WeightError::Read {
            path: path.to_path_buf(),
            message: format!("metadata '{}': {m}", keys::INTERPOLATION),
        })?,
    };
    Ok(CheckpointInfo {
        model: ModelConfig {
            arch,
            last_stride: num(keys::LAST_STRIDE)?,
            num_classes: num(keys::NUM_CLASSES)?,
            bnneck: meta.get(keys::BNNECK).is_some_and(|v| v == "true"),
        },
        input: InputSpec {
            height: num(keys::HEIGHT)?,
            width: num(keys::WIDTH)?,
            interpolation,
        },
    })
}

/// Writes the model's tensors with its facts and `extra` header entries,
/// atomically; refuses (writing nothing) when any tensor is not finite.
pub fn save(
    model: &ReidModel,
    input: InputSpec,
    extra: &BTreeMap<String, String>,
    path: &Path,
) -> Result<(), WeightError> {
    let info = CheckpointInfo {
        model: model.config,
        input,
    };
    let mut meta = info.metadata();
    meta.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    model.save_weights(path, &meta)
}

/// Rebuilds the model a checkpoint describes, in f32 on `device` to run as `exec`
/// says, with its weights.
pub fn load(path: &Path, exec: Exec, device: &Device) -> Result<(ReidModel, CheckpointInfo), WeightError> {
    let info = read_info(path)?;
    let model = ReidModel::new(info.model, exec, DType::F32, device)?;
    model.load_weights(path, LoadScope::Full)?;
    Ok((model, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(bnneck: bool, seed: u64) -> ReidModel {
        let config = ModelConfig {
            arch: "res2net_tiny".parse().unwrap(),
            last_stride: 1,
            num_classes: 6,
            bnneck,
        };
        let m = ReidModel::new(config, Exec::default(), DType::F32, &Device::Cpu).unwrap();
        m.initialize(seed).unwrap();
        m
    }

    #[test]
    fn the_header_rebuilds_the_model_neck_included() {
        let dir = tempfile::tempdir().unwrap();
        for (bnneck, interpolation) in [(false, Interpolation::Bilinear), (true, Interpolation::Bicubic)] {
            let saved = model(bnneck, 1);
            let path = dir.path().join(format!("{bnneck}.safetensors"));
            let input = InputSpec {
                height: 64,
                width: 32,
                interpolation,
            };
            save(&saved, input, &BTreeMap::new(), &path).unwrap();
            let (loaded, info) = load(&path, Exec::default(), &Device::Cpu).unwrap();
            assert_eq!(info.model, saved.config);
            assert_eq!(info.input, input);
            let (a, b) = (saved.state_dict().unwrap(), loaded.state_dict().unwrap());
            assert_eq!(a.len(), b.len());
            assert_eq!(a.contains_key("neck.weight"), bnneck);
            for (name, t) in &a {
                let same = t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(same, "{name}");
            }
        }
    }

    #[test]
    fn identical_models_give_identical_bytes_and_a_non_finite_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let extra = BTreeMap::from([("reid.step".to_string(), "7".to_string())]);
        let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
        save(&model(true, 4), InputSpec::bilinear(64, 32), &extra, &a).unwrap();
        save(&model(true, 4), InputSpec::bilinear(64, 32), &extra, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(read_metadata(&a).unwrap()["reid.step"], "7");

        let m = model(false, 4);
        let (name, var) = m
            .named_vars()
            .into_iter()
            .find(|(n, _)| n.ends_with("bn3.weight"))
            .unwrap();
        let mut v: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        v[1] = f32::NAN;
        var.set(&candle_core::Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        let c = dir.path().join("c.safetensors");
        let err = save(&m, InputSpec::bilinear(64, 32), &extra, &c)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&name) && err.contains("NaN"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "nothing written");
    }
}
