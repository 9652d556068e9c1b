//! Which splits to extract, from what: a trained run (its chosen checkpoint and
//! its manifest) or a checkpoint and a manifest given by hand.

use std::path::PathBuf;

use reid_data::Split;
use reid_extract::{ExtractOptions, SplitJob};
use reid_train::{RunPaths, TrainConfig};

use crate::{PipelineError, Result};

/// What `reid extract` asks for.
#[derive(Debug, Clone)]
pub struct ExtractRequest {
    /// A run folder: `best` (else `last`) and the run's manifest.
    pub run: Option<PathBuf>,
    /// A checkpoint written by `reid train` (instead of a run).
    pub checkpoint: Option<PathBuf>,
    /// The manifest (default: the run's).
    pub manifest: Option<PathBuf>,
    pub splits: Vec<Split>,
    pub options: ExtractOptions,
    /// Output folder (default: `artifacts/features/<run or checkpoint name>`).
    pub out: Option<PathBuf>,
    pub force: bool,
}

fn name_of(path: &std::path::Path, stem: bool) -> String {
    let n = if stem { path.file_stem() } else { path.file_name() };
    n.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

impl ExtractRequest {
    /// One job per split, each writing `<out>/<split>.safetensors`.
    pub fn jobs(&self) -> Result<Vec<SplitJob>> {
        let (checkpoint, name, run_manifest) = match (&self.run, &self.checkpoint) {
            (Some(run), _) => {
                let config = TrainConfig::load(Some(&RunPaths::new(run).config()), &[])?;
                (
                    RunPaths::new(run).chosen_checkpoint(),
                    name_of(run, false),
                    config.data.manifest,
                )
            }
            (None, Some(c)) => (c.clone(), name_of(c, true), None),
            (None, None) => return Err(PipelineError::Invalid("pass --run RUN or --checkpoint FILE".into())),
        };
        if !checkpoint.is_file() {
            return Err(PipelineError::Invalid(format!(
                "{}: no checkpoint; train first (reid train)",
                checkpoint.display()
            )));
        }
        let Some(manifest) = self.manifest.clone().or(run_manifest) else {
            return Err(PipelineError::Invalid(
                "no manifest: pass --manifest (made by `reid index`)".into(),
            ));
        };
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("artifacts/features").join(name));
        Ok(self
            .splits
            .iter()
            .map(|&split| SplitJob {
                checkpoint: checkpoint.clone(),
                manifest: manifest.clone(),
                split,
                options: self.options,
                out: out.join(format!("{split}.safetensors")),
                force: self.force,
            })
            .collect())
    }
}
