//! Checkpoints: the weights under timm's names with the facts needed to rebuild the
//! model, and a sibling trainer-state file (momentum buffers, position, config) so
//! that `--resume` continues exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use reid_model::{Arch, ModelConfig, ReidModel, WeightError};

use crate::optim::Sgd;

/// Metadata keys stored in every checkpoint's header.
pub mod keys {
    pub const ARCH: &str = "reid.arch";
    pub const LAST_STRIDE: &str = "reid.last_stride";
    pub const NUM_CLASSES: &str = "reid.num_classes";
    /// "true" when the model has a neck (absent in older checkpoints: none).
    pub const BNNECK: &str = "reid.bnneck";
    pub const HEIGHT: &str = "reid.height";
    pub const WIDTH: &str = "reid.width";
    pub const EPOCH: &str = "reid.epoch";
    pub const STEP: &str = "reid.step";
    pub const NEXT_EPOCH: &str = "reid.next_epoch";
    pub const NEXT_BATCH: &str = "reid.next_batch";
    pub const CONFIG: &str = "reid.config";
}

/// Where training stands: the next batch to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: usize,
    pub batch: usize,
    /// Steps taken so far.
    pub step: u64,
}

/// What a checkpoint says about the model it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    pub model: ModelConfig,
    /// Network input (height, width).
    pub image_size: (usize, usize),
}

/// The paths of a run folder.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub root: PathBuf,
}

impl RunPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunPaths { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// `checkpoints/<name>.safetensors`
    pub fn checkpoint(&self, name: &str) -> PathBuf {
        self.checkpoints().join(format!("{name}.safetensors"))
    }
    /// The trainer state beside `last`.
    pub fn state(&self) -> PathBuf {
        self.checkpoints().join("last.state.safetensors")
    }
}

fn header_metadata(path: &Path) -> Result<HashMap<String, String>, WeightError> {
    let read_err = |m: String| WeightError::Read {
        path: path.to_path_buf(),
        message: m,
    };
    let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| read_err(e.to_string()))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Reads the model facts from a checkpoint written by [`save_model`].
pub fn read_info(path: &Path) -> Result<CheckpointInfo, WeightError> {
    let meta = header_metadata(path)?;
    let get = |k: &str| -> Result<&String, WeightError> {
        meta.get(k).ok_or_else(|| WeightError::Read {
            path: path.to_path_buf(),
            message: format!("no '{k}' metadata: not a reid checkpoint (write one with `reid train`)"),
        })
    };
    let num = |k: &str| -> Result<usize, WeightError> {
        get(k)?.parse().map_err(|_| WeightError::Read {
            path: path.to_path_buf(),
            message: format!("metadata '{k}' is not a number"),
        })
    };
    let arch: Arch = get(keys::ARCH)?.parse().map_err(|m: String| WeightError::Read {
        path: path.to_path_buf(),
        message: m,
    })?;
    Ok(CheckpointInfo {
        model: ModelConfig {
            arch,
            last_stride: num(keys::LAST_STRIDE)?,
            num_classes: num(keys::NUM_CLASSES)?,
            bnneck: meta.get(keys::BNNECK).is_some_and(|v| v == "true"),
        },
        image_size: (num(keys::HEIGHT)?, num(keys::WIDTH)?),
    })
}

/// A whole number stored under `key` in a header's metadata.
fn number(meta: &HashMap<String, String>, key: &str, path: &Path) -> Result<u64, WeightError> {
    meta.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| WeightError::Read {
            path: path.to_path_buf(),
            message: format!("no number '{key}' in the metadata"),
        })
}

/// The step a checkpoint was written at.
pub fn read_step(path: &Path) -> Result<u64, WeightError> {
    number(&header_metadata(path)?, keys::STEP, path)
}

/// Writes the model's weights with its facts and the position.
pub fn save_model(
    model: &ReidModel,
    image_size: (usize, usize),
    position: Position,
    path: &Path,
) -> Result<(), WeightError> {
    let c = model.config;
    let meta = HashMap::from([
        (keys::ARCH.to_string(), c.arch.name.to_string()),
        (keys::LAST_STRIDE.to_string(), c.last_stride.to_string()),
        (keys::NUM_CLASSES.to_string(), c.num_classes.to_string()),
        (keys::BNNECK.to_string(), c.bnneck.to_string()),
        (keys::HEIGHT.to_string(), image_size.0.to_string()),
        (keys::WIDTH.to_string(), image_size.1.to_string()),
        (keys::EPOCH.to_string(), position.epoch.to_string()),
        (keys::STEP.to_string(), position.step.to_string()),
    ]);
    model.save_weights(path, Some(meta))
}

/// Writes the optimiser's momentum buffers, the position to resume at and the
/// config, atomically.
pub fn save_state(optimizer: &Sgd, next: Position, config_toml: &str, path: &Path) -> Result<(), WeightError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for p in &optimizer.params {
        if let Some(b) = &p.momentum_buffer {
            tensors.insert(format!("momentum.{}", p.name), b.to_device(&Device::Cpu)?);
        }
    }
    let meta = HashMap::from([
        (keys::NEXT_EPOCH.to_string(), next.epoch.to_string()),
        (keys::NEXT_BATCH.to_string(), next.batch.to_string()),
        (keys::STEP.to_string(), next.step.to_string()),
        (keys::CONFIG.to_string(), config_toml.to_string()),
    ]);
    reid_model::weights::write_safetensors(path, &tensors, Some(meta))
}

/// The position recorded in a trainer-state file: where the run would resume.
pub fn read_position(path: &Path) -> Result<Position, WeightError> {
    let meta = header_metadata(path)?;
    Ok(Position {
        epoch: number(&meta, keys::NEXT_EPOCH, path)? as usize,
        batch: number(&meta, keys::NEXT_BATCH, path)? as usize,
        step: number(&meta, keys::STEP, path)?,
    })
}

/// Restores momentum buffers from a state file and returns the position to resume at.
pub fn load_state(optimizer: &mut Sgd, path: &Path) -> Result<Position, WeightError> {
    let meta = header_metadata(path)?;
    let num = |k: &str| -> Result<u64, WeightError> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| WeightError::Read {
                path: path.to_path_buf(),
                message: format!("no '{k}' in the trainer state"),
            })
    };
    let position = Position {
        epoch: num(keys::NEXT_EPOCH)? as usize,
        batch: num(keys::NEXT_BATCH)? as usize,
        step: num(keys::STEP)?,
    };
    let tensors = reid_model::weights::read_safetensors(path)?;
    for p in &mut optimizer.params {
        p.momentum_buffer = match tensors.get(&format!("momentum.{}", p.name)) {
            Some(t) => Some(t.to_dtype(p.var.dtype())?.to_device(p.var.device())?),
            None => None,
        };
    }
    Ok(position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use reid_model::LoadScope;

    fn model(bnneck: bool, seed: u64) -> ReidModel {
        let config = ModelConfig {
            arch: "res2net_tiny".parse().unwrap(),
            last_stride: 1,
            num_classes: 6,
            bnneck,
        };
        let m = ReidModel::new(config, DType::F32, &Device::Cpu).unwrap();
        m.initialize(seed).unwrap();
        m
    }

    #[test]
    fn the_header_rebuilds_the_model_neck_included() {
        let dir = tempfile::tempdir().unwrap();
        for bnneck in [false, true] {
            let saved = model(bnneck, 1);
            let path = dir.path().join(format!("{bnneck}.safetensors"));
            save_model(&saved, (64, 32), Position::default(), &path).unwrap();
            let info = read_info(&path).unwrap();
            assert_eq!(info.model, saved.config);
            assert_eq!(info.image_size, (64, 32));
            let loaded = model(info.model.bnneck, 2);
            loaded.load_weights(&path, LoadScope::Full).unwrap();
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
}
