//! A run folder on disk: its paths, the training checkpoints (the model format of
//! `reid_model::checkpoint` plus the step they were taken at) and the trainer state
//! beside `last` (momentum buffers, position, best validation, config, manifest
//! hash), so that `--resume` continues exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use reid_io::input::InputSpec;
use reid_model::checkpoint::{number, read_metadata};
use reid_model::{ReidModel, WeightError};

use crate::optim::Sgd;

/// Header keys the trainer adds to checkpoints and writes in its state file.
pub mod keys {
    pub const EPOCH: &str = "reid.epoch";
    pub const STEP: &str = "reid.step";
    pub const NEXT_EPOCH: &str = "reid.next_epoch";
    pub const NEXT_BATCH: &str = "reid.next_batch";
    pub const CONFIG: &str = "reid.config";
    pub const MANIFEST_SHA256: &str = "reid.manifest_sha256";
    pub const BEST_RANK1: &str = "reid.best_rank1";
    pub const BEST_MAP: &str = "reid.best_map";
    pub const BEST_EPOCH: &str = "reid.best_epoch";
}

/// Where training stands: the next batch to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: usize,
    pub batch: usize,
    /// Steps taken so far.
    pub step: u64,
}

/// The best validation so far: what `checkpoints/best` holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Best {
    pub rank1: f64,
    pub map: f64,
    /// Epochs completed when it was reached.
    pub epoch: usize,
}

/// Everything besides the weights that a resumed run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerState {
    pub position: Position,
    pub best: Option<Best>,
    /// sha256 of the manifest the run trains on.
    pub manifest_sha256: String,
    /// The effective configuration, as TOML.
    pub config_toml: String,
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
    /// The state of the `last` being written: promoted to [`RunPaths::state`] once
    /// `last` is in place (see [`save_last`]).
    pub fn state_next(&self) -> PathBuf {
        self.checkpoints().join("last.state.next.safetensors")
    }
    /// The checkpoint a trained run is used through: `best` when validation kept
    /// one, else `last`.
    pub fn chosen_checkpoint(&self) -> PathBuf {
        let best = self.checkpoint("best");
        if best.is_file() {
            best
        } else {
            self.checkpoint("last")
        }
    }
}

/// Writes a training checkpoint: the model with the epoch and step it was taken at.
pub fn save_model(model: &ReidModel, input: InputSpec, at: Position, path: &Path) -> Result<(), WeightError> {
    let extra = BTreeMap::from([
        (keys::EPOCH.to_string(), at.epoch.to_string()),
        (keys::STEP.to_string(), at.step.to_string()),
    ]);
    reid_model::checkpoint::save(model, input, &extra, path)
}

/// The step a training checkpoint was written at.
pub fn read_step(path: &Path) -> Result<u64, WeightError> {
    number(&read_metadata(path)?, keys::STEP, path)
}

impl TrainerState {
    fn metadata(&self) -> BTreeMap<String, String> {
        let p = self.position;
        let mut meta = BTreeMap::from([
            (keys::NEXT_EPOCH.to_string(), p.epoch.to_string()),
            (keys::NEXT_BATCH.to_string(), p.batch.to_string()),
            (keys::STEP.to_string(), p.step.to_string()),
            (keys::CONFIG.to_string(), self.config_toml.clone()),
            (keys::MANIFEST_SHA256.to_string(), self.manifest_sha256.clone()),
        ]);
        if let Some(b) = self.best {
            // `{:?}` prints the shortest text that parses back to the same f64.
            meta.insert(keys::BEST_RANK1.to_string(), format!("{:?}", b.rank1));
            meta.insert(keys::BEST_MAP.to_string(), format!("{:?}", b.map));
            meta.insert(keys::BEST_EPOCH.to_string(), b.epoch.to_string());
        }
        meta
    }

    /// Reads a state file's header (not its momentum buffers).
    pub fn read(path: &Path) -> Result<Self, WeightError> {
        let meta = read_metadata(path)?;
        let num = |k: &str| number(&meta, k, path);
        let text = |k: &str| {
            meta.get(k).cloned().ok_or_else(|| WeightError::Read {
                path: path.to_path_buf(),
                message: format!("no '{k}' in the trainer state"),
            })
        };
        let real = |k: &str| -> Result<f64, WeightError> {
            text(k)?.parse().map_err(|_| WeightError::Read {
                path: path.to_path_buf(),
                message: format!("'{k}' is not a number"),
            })
        };
        let best = match meta.contains_key(keys::BEST_EPOCH) {
            false => None,
            true => Some(Best {
                rank1: real(keys::BEST_RANK1)?,
                map: real(keys::BEST_MAP)?,
                epoch: num(keys::BEST_EPOCH)? as usize,
            }),
        };
        Ok(TrainerState {
            position: Position {
                epoch: num(keys::NEXT_EPOCH)? as usize,
                batch: num(keys::NEXT_BATCH)? as usize,
                step: num(keys::STEP)?,
            },
            best,
            manifest_sha256: text(keys::MANIFEST_SHA256)?,
            config_toml: text(keys::CONFIG)?,
        })
    }

    /// Writes the state with the optimiser's momentum buffers, atomically;
    /// refuses (writing nothing) when a buffer is not finite.
    pub fn save(&self, optimizer: &Sgd, path: &Path) -> Result<(), WeightError> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for p in &optimizer.params {
            if let Some(b) = &p.momentum_buffer {
                tensors.insert(format!("momentum.{}", p.name), b.to_device(&Device::Cpu)?);
            }
        }
        reid_model::weights::write_safetensors(path, &tensors, &self.metadata())
    }
}

/// Writes `last` and its trainer state so that a crash at any point leaves a
/// matching pair: the state goes to [`RunPaths::state_next`] first, then the
/// weights replace `last`, then the state is renamed into place.
/// [`recover_state`] finishes an interrupted save.
pub fn save_last(
    paths: &RunPaths,
    model: &ReidModel,
    input: InputSpec,
    state: &TrainerState,
    optimizer: &Sgd,
) -> Result<(), WeightError> {
    state.save(optimizer, &paths.state_next())?;
    save_model(model, input, state.position, &paths.checkpoint("last"))?;
    let io = |e: std::io::Error| WeightError::Write {
        path: paths.state(),
        message: e.to_string(),
    };
    std::fs::rename(paths.state_next(), paths.state()).map_err(io)?;
    std::fs::File::open(paths.checkpoints())
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// The trainer state that matches `last`, finishing a save that a crash cut
/// off (promoting the pending state, or dropping a stale one).
pub fn recover_state(paths: &RunPaths) -> Result<TrainerState, WeightError> {
    let weights_step = read_step(&paths.checkpoint("last"))?;
    let current = TrainerState::read(&paths.state());
    if current.as_ref().is_ok_and(|s| s.position.step == weights_step) {
        let _ = std::fs::remove_file(paths.state_next());
        return current;
    }
    match TrainerState::read(&paths.state_next()) {
        Ok(next) if next.position.step == weights_step => {
            std::fs::rename(paths.state_next(), paths.state()).map_err(|e| WeightError::Write {
                path: paths.state(),
                message: e.to_string(),
            })?;
            Ok(next)
        }
        _ => Err(WeightError::Read {
            path: paths.checkpoints(),
            message: format!("no trainer state of step {weights_step}, the step of last.safetensors; the run cannot continue exactly"),
        }),
    }
}

/// Restores the momentum buffers of `optimizer` from a state file.
pub fn load_momentum(optimizer: &mut Sgd, path: &Path) -> Result<(), WeightError> {
    let tensors = reid_model::weights::read_safetensors(path)?;
    for p in &mut optimizer.params {
        p.momentum_buffer = match tensors.get(&format!("momentum.{}", p.name)) {
            Some(t) => Some(t.to_dtype(p.var.dtype())?.to_device(p.var.device())?),
            None => None,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_at(step: u64) -> TrainerState {
        TrainerState {
            position: Position {
                epoch: 1,
                batch: 0,
                step,
            },
            best: None,
            manifest_sha256: "m".into(),
            config_toml: String::new(),
        }
    }

    #[test]
    fn a_save_cut_off_at_any_point_leaves_a_pair_that_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths::new(dir.path());
        std::fs::create_dir_all(paths.checkpoints()).unwrap();
        let config = reid_model::ModelConfig {
            arch: "res2net_tiny".parse().unwrap(),
            last_stride: 2,
            num_classes: 3,
            bnneck: false,
        };
        let model = ReidModel::new(config, reid_ops::Exec::default(), candle_core::DType::F32, &Device::Cpu).unwrap();
        let sgd = Sgd::new(Vec::new(), crate::SgdConfig::default(), reid_ops::Exec::default());
        save_last(&paths, &model, InputSpec::bilinear(64, 32), &state_at(5), &sgd).unwrap();
        assert_eq!(recover_state(&paths).unwrap().position.step, 5);
        // Cut off after the pending state was written: it is stale and dropped.
        state_at(6).save(&sgd, &paths.state_next()).unwrap();
        assert_eq!(recover_state(&paths).unwrap().position.step, 5);
        assert!(!paths.state_next().exists());
        // Cut off after the weights were replaced: the pending state is promoted.
        state_at(6).save(&sgd, &paths.state_next()).unwrap();
        save_model(
            &model,
            InputSpec::bilinear(64, 32),
            state_at(6).position,
            &paths.checkpoint("last"),
        )
        .unwrap();
        assert_eq!(recover_state(&paths).unwrap().position.step, 6);
        assert_eq!(TrainerState::read(&paths.state()).unwrap().position.step, 6);
        // Weights with no state of their step cannot continue.
        save_model(
            &model,
            InputSpec::bilinear(64, 32),
            state_at(7).position,
            &paths.checkpoint("last"),
        )
        .unwrap();
        assert!(recover_state(&paths).unwrap_err().to_string().contains("step 7"));
    }

    #[test]
    fn the_state_header_round_trips_with_and_without_a_best() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let sgd = Sgd::new(Vec::new(), crate::SgdConfig::default(), reid_ops::Exec::default());
        for best in [
            None,
            Some(Best {
                rank1: 0.1 + 0.2,
                map: 1.0 / 3.0,
                epoch: 4,
            }),
        ] {
            let state = TrainerState {
                position: Position {
                    epoch: 3,
                    batch: 2,
                    step: 99,
                },
                best,
                manifest_sha256: "ab".into(),
                config_toml: "[run]\nseed = 1\n".into(),
            };
            state.save(&sgd, &path).unwrap();
            assert_eq!(TrainerState::read(&path).unwrap(), state);
        }
    }
}
