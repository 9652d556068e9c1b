//! Starting or resuming a run from what the user asked for: the configuration
//! file, `--set` overrides, device and manifest, checked against a run in
//! progress so that nothing asked for is silently ignored.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use reid_data::Manifest;
use reid_model::{DeviceSpec, ReidModel};

use crate::config::TrainConfig;
use crate::state::RunPaths;
use crate::trainer::{Event, Outcome, TrainData, TrainError, Trainer};

/// What `reid train` asks for.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Continue the run in `run_dir` instead of starting one there.
    pub resume: bool,
    /// The manifest (else the config's `data.manifest`).
    pub manifest: Option<PathBuf>,
    /// A recipe file (else the defaults, or the run's saved config on resume).
    pub config: Option<PathBuf>,
    /// `section.key=value` overrides.
    pub overrides: Vec<String>,
    /// Overrides `run.device`.
    pub device: Option<DeviceSpec>,
    /// Overrides `run.ops`.
    pub ops: Option<reid_ops::Ops>,
    /// Stop after this many steps in all (for quick checks).
    pub max_steps: Option<u64>,
}

/// A trainer ready to run, with its manifest and what a resume changed.
pub struct Prepared {
    pub trainer: Trainer,
    pub manifest: Manifest,
    /// `key: old -> new` for each setting a resume changed (recorded in config.toml).
    pub changes: Vec<String>,
}

impl Launch {
    /// The configuration asked for, on top of `base` (TOML text read from `origin`).
    fn requested(&self, base: &str, origin: &Path) -> Result<TrainConfig, TrainError> {
        let mut config = match &self.config {
            Some(path) => TrainConfig::load(Some(path), &self.overrides)?,
            None => TrainConfig::parse(base, origin, &self.overrides)?,
        };
        if let Some(d) = self.device {
            config.run.device = d;
        }
        if let Some(o) = self.ops {
            config.run.ops = o;
        }
        if let Some(m) = &self.manifest {
            config.data.manifest = Some(m.clone());
        }
        Ok(config)
    }

    /// The configuration to train with, and on resume the changes it makes to
    /// the run's saved one (refusing any that would break an exact continuation).
    pub fn config(&self) -> Result<(TrainConfig, Vec<String>), TrainError> {
        if !self.resume {
            return Ok((self.requested("", Path::new("<defaults>"))?, Vec::new()));
        }
        let saved_file = RunPaths::new(&self.run_dir).config();
        let text = std::fs::read_to_string(&saved_file).map_err(|e| TrainError::Io {
            path: saved_file.clone(),
            source: e,
        })?;
        let saved = TrainConfig::parse(&text, &saved_file, &[])?;
        let requested = self.requested(&text, &saved_file)?;
        let changes = saved.resume_changes(&requested, &self.run_dir)?;
        Ok((requested, changes))
    }

    /// Builds the trainer: a new run, or the run in progress with the changes
    /// `--resume` may make.
    pub fn prepare(&self, stop: Arc<AtomicBool>) -> Result<Prepared, TrainError> {
        let (config, changes) = self.config()?;
        let mut prepared = Prepared::new(config, &self.run_dir, self.resume, stop)?;
        prepared.trainer.max_steps = self.max_steps;
        prepared.changes = changes;
        Ok(prepared)
    }
}

impl Prepared {
    /// A trainer for `config` in `run_dir`: a new run, or (`resume`) the run there.
    pub fn new(config: TrainConfig, run_dir: &Path, resume: bool, stop: Arc<AtomicBool>) -> Result<Self, TrainError> {
        let Some(manifest_path) = config.data.manifest.clone() else {
            return Err(TrainError::Invalid(
                "no manifest: pass --manifest (made by `reid index`) or set data.manifest in the config".into(),
            ));
        };
        let (data, manifest) = TrainData::load(&manifest_path)?;
        let trainer = if resume {
            Trainer::resume(run_dir, config, data, stop)?
        } else {
            Trainer::new(config, run_dir, data, stop)?
        };
        Ok(Prepared {
            trainer,
            manifest,
            changes: Vec::new(),
        })
    }

    /// Runs the training, validating on the manifest's query and gallery split
    /// every `run.eval_every` epochs.
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<Outcome, TrainError> {
        let c = &self.trainer.config;
        let input = c.data.input();
        let manifest = &self.manifest;
        let mut validation = |model: &ReidModel| crate::validation::rank1_and_map(model, manifest, input);
        let validate: Option<&mut crate::trainer::Validate> = if c.run.eval_every > 0 {
            Some(&mut validation)
        } else {
            None
        };
        self.trainer.run(on_event, validate)
    }
}
