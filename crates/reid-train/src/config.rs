//! The training configuration: a TOML file (one per recipe under `configs/`),
//! overridable by `--set section.key=value`; the effective one is saved per run.

use std::path::{Path, PathBuf};

use reid_model::LossWeights;
use reid_sampling::Augment;
use serde::{Deserialize, Serialize};

use crate::optim::SgdConfig;
use crate::schedule::ScheduleConfig;

/// `[data]`: which images and how they are batched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// The manifest (`reid index` output); `--manifest` overrides it.
    pub manifest: Option<PathBuf>,
    pub height: usize,
    pub width: usize,
    /// Pairs per batch (the backbone sees twice as many images).
    pub batch_size: usize,
    /// Probability that a pair shows one identity.
    pub pos_fraction: f64,
    /// Batches decoded ahead.
    pub prefetch: usize,
    /// Decoding threads (0: all cores).
    pub workers: usize,
    /// Skip pairs with unreadable images instead of stopping.
    pub skip_unreadable: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            manifest: None,
            height: 256,
            width: 128,
            batch_size: 32,
            pos_fraction: 0.5,
            prefetch: 4,
            workers: 0,
            skip_unreadable: false,
        }
    }
}

/// `[model]`: the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    pub arch: String,
    pub last_stride: usize,
    /// Backbone weights: a .safetensors path or `hf:OWNER/NAME`; none (or `""`,
    /// e.g. `--set model.pretrained=`) trains from scratch.
    pub pretrained: Option<String>,
    /// Dropout before each classifier.
    pub dropout: f64,
    /// Batch norm over the pooled feature, used by both heads and for retrieval
    /// (not in the paper).
    pub bnneck: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            arch: "res2net50_26w_4s".into(),
            last_stride: 2,
            pretrained: None,
            dropout: 0.5,
            bnneck: false,
        }
    }
}

/// `[run]`: seed, device and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Log a `metrics.csv` row every this many steps.
    pub log_every: usize,
    /// Keep a numbered checkpoint every this many epochs (0: only `last`).
    pub checkpoint_every: usize,
    /// Validate (rank-1, mAP on query/gallery) every this many epochs (0: never).
    pub eval_every: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 0,
            device: "cpu".into(),
            log_every: 20,
            checkpoint_every: 10,
            eval_every: 0,
        }
    }
}

/// Everything a training run is made of.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub augment: Augment,
    pub model: ModelSection,
    pub loss: LossWeights,
    pub optim: SgdConfig,
    pub schedule: ScheduleConfig,
    pub run: RunConfig,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("--set {0}: expected section.key=value, e.g. optim.lr=0.01")]
    Override(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl TrainConfig {
    /// Reads a TOML file and applies `overrides` (`section.key=value`, the value in
    /// TOML syntax, bare words taken as strings).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                    path: p.to_path_buf(),
                    message: e.to_string(),
                })?;
                Self::parse(&text, p, overrides)
            }
            None => Self::parse("", Path::new("<defaults>"), overrides),
        }
    }

    /// Parses TOML `text` (read from `origin`, named in errors) with `overrides`.
    pub fn parse(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let file_err = |message: String| ConfigError::File {
            path: origin.to_path_buf(),
            message,
        };
        let mut value: toml::Value = toml::from_str(text).map_err(|e: toml::de::Error| file_err(e.to_string()))?;
        for o in overrides {
            let (key, raw) = o.split_once('=').ok_or_else(|| ConfigError::Override(o.clone()))?;
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let mut node = &mut value;
            let parts: Vec<&str> = key.trim().split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let table = node.as_table_mut().ok_or_else(|| ConfigError::Override(o.clone()))?;
                if i + 1 == parts.len() {
                    table.insert(part.to_string(), parsed.clone());
                    break;
                }
                node = table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
            }
        }
        let mut config: TrainConfig = value.try_into().map_err(|e: toml::de::Error| file_err(e.to_string()))?;
        if config.model.pretrained.as_deref().is_some_and(|s| s.trim().is_empty()) {
            config.model.pretrained = None;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would otherwise fail deep inside training.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.data.batch_size < 1 {
            return bad("data.batch_size must be at least 1".into());
        }
        if self.data.height < 32 || self.data.width < 16 {
            return bad(format!(
                "data.height x width {}x{} is too small (at least 32x16)",
                self.data.height, self.data.width
            ));
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return bad("model.dropout must be in [0, 1)".into());
        }
        if self.model.arch.parse::<reid_model::Arch>().is_err() {
            return bad(self.model.arch.parse::<reid_model::Arch>().unwrap_err());
        }
        if !matches!(self.model.last_stride, 1 | 2) {
            return bad("model.last_stride must be 1 or 2".into());
        }
        if self.schedule.epochs == 0 {
            return bad("schedule.epochs must be at least 1".into());
        }
        Ok(())
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_bad_keys_are_refused() {
        let c = TrainConfig::load(
            None,
            &[
                "optim.lr=0.01".into(),
                "model.arch=res2net_tiny".into(),
                "data.batch_size=8".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.model.arch, "res2net_tiny");
        assert_eq!(c.data.batch_size, 8);
        assert!(TrainConfig::load(None, &["optim.lrr=0.01".into()]).is_err());
        assert!(TrainConfig::load(None, &["model.arch=resnet7".into()]).is_err());
        assert!(TrainConfig::load(None, &["nonsense".into()]).is_err());
        let hub = TrainConfig::parse("[model]\npretrained = \"hf:x/y\"", Path::new("t"), &[]);
        assert_eq!(hub.unwrap().model.pretrained.as_deref(), Some("hf:x/y"));
        let none = TrainConfig::parse(
            "[model]\npretrained = \"hf:x/y\"",
            Path::new("t"),
            &["model.pretrained=".into()],
        );
        assert_eq!(none.unwrap().model.pretrained, None);
        let round = TrainConfig::load(None, &[]).unwrap();
        assert_eq!(toml::from_str::<TrainConfig>(&round.to_toml()).unwrap(), round);
    }
}
