//! The training configuration: a TOML file (one per recipe under `configs/`),
//! overridable by `--set section.key=value`; the effective one is saved per run.
//! Every value is checked when the configuration is loaded, and an error names the
//! key and where its value came from.

use std::path::{Path, PathBuf};

use reid_model::{Arch, DeviceSpec, LossSettings};
use reid_ops::{Ops, Precision};
use reid_sampling::{Augment, InputSpec, Interpolation};
use serde::{Deserialize, Serialize};

use crate::optim::SgdConfig;
use crate::schedule::{Decay, ScheduleConfig};

/// `[data]`: which images and how they are batched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// The manifest (`reid index` output); `--manifest` overrides it.
    pub manifest: Option<PathBuf>,
    pub height: usize,
    pub width: usize,
    /// How images are resized to `height` x `width`: `bilinear` (torchreid's and
    /// BoT's) or `bicubic` (fast-reid's), with Pillow's filters.
    pub interpolation: Interpolation,
    /// How batches are drawn: `pairs` (the paper's) or `pk` (P identities x K
    /// images, verification on the pairs inside the batch).
    pub sampler: Sampler,
    /// Pairs per batch of the `pairs` sampler (the backbone sees twice as many
    /// images).
    pub batch_size: usize,
    /// Identities per batch of the `pk` sampler.
    pub p: usize,
    /// Images per identity of the `pk` sampler.
    pub k: usize,
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
            interpolation: Interpolation::Bilinear,
            sampler: Sampler::Pairs,
            batch_size: 32,
            p: 16,
            k: 4,
            pos_fraction: 0.5,
            prefetch: 4,
            workers: 0,
            skip_unreadable: false,
        }
    }
}

/// The batch sampler of `[data]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// One pair per training image, positive with probability `pos_fraction`.
    Pairs,
    /// P identities x K images, every identity once per epoch.
    Pk,
}

impl DataConfig {
    /// The network's input: size and resize filter.
    pub fn input(&self) -> InputSpec {
        InputSpec {
            height: self.height,
            width: self.width,
            interpolation: self.interpolation,
        }
    }

    /// Pairs per loader batch: `batch_size`, or P x K / 2 (a P x K batch is loaded
    /// as pairs of its first and second half).
    pub fn pairs_per_batch(&self) -> usize {
        match self.sampler {
            Sampler::Pairs => self.batch_size,
            Sampler::Pk => self.p * self.k / 2,
        }
    }
}

/// `[model]`: the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    pub arch: Arch,
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
            arch: "res2net50_26w_4s".parse().expect("a known architecture"),
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
    pub device: DeviceSpec,
    /// Log a `metrics.csv` row every this many steps.
    pub log_every: usize,
    /// Keep a numbered checkpoint every this many epochs (0: only `last`).
    pub checkpoint_every: usize,
    /// Validate (rank-1, mAP on query/gallery) every this many epochs (0: never).
    pub eval_every: usize,
    /// `f32`, or `bf16`: mixed precision (convolutions and matrix products in
    /// bf16; weights, optimiser state, batch-norm statistics and losses in f32).
    pub precision: Precision,
    /// Which implementation the ops run: `auto`, `fused`, `generic` or `as-cuda`
    /// (on the CPU, the op graph CUDA runs); see `reid train --help`.
    pub ops: Ops,
    /// TF32 tensor cores for f32 matrix products and convolutions on CUDA (on by
    /// default, as PyTorch does for convolutions).
    pub tf32: bool,
    /// Write the gradient norm each loss term contributes to the backbone to every
    /// `log_every`-th row of `metrics.csv` (one extra backward per term on those
    /// steps; the update still comes from one backward of the weighted sum).
    pub log_grad_norms: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 0,
            device: DeviceSpec::Cpu,
            log_every: 20,
            checkpoint_every: 10,
            eval_every: 0,
            precision: Precision::F32,
            ops: Ops::Auto,
            tf32: true,
            log_grad_norms: false,
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
    pub loss: LossSettings,
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
    #[error("{key} = {value} ({origin}): {requirement}")]
    Invalid {
        key: String,
        value: String,
        origin: String,
        requirement: String,
    },
    #[error("--resume {run}: {message}")]
    Resume { run: PathBuf, message: String },
}

/// Keys that `--resume` may change: they decide how long and where the run goes
/// on, never what it computed so far.
pub const RESUMABLE_KEYS: [&str; 10] = [
    "schedule.epochs",
    "run.log_grad_norms",
    "run.device",
    "run.ops",
    "run.log_every",
    "run.eval_every",
    "run.checkpoint_every",
    "data.manifest",
    "data.workers",
    "data.prefetch",
];

/// Sets `key` (dotted) to `raw` (TOML syntax, bare words taken as strings) in `value`.
fn apply_override(value: &mut toml::Value, o: &str) -> Result<(), ConfigError> {
    let (key, raw) = o.split_once('=').ok_or_else(|| ConfigError::Override(o.into()))?;
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut node = value;
    for (i, part) in parts.iter().enumerate() {
        let table = node.as_table_mut().ok_or_else(|| ConfigError::Override(o.into()))?;
        if i + 1 == parts.len() {
            table.insert(part.to_string(), parsed);
            return Ok(());
        }
        node = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

/// The value at a dotted `key` of a TOML tree.
fn lookup<'a>(value: &'a toml::Value, key: &str) -> Option<&'a toml::Value> {
    key.split('.').try_fold(value, |v, part| v.get(part))
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

    /// Parses TOML `text` (read from `origin`, named in errors) with `overrides`,
    /// then checks every value.
    pub fn parse(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let file_err = |message: String| ConfigError::File {
            path: origin.to_path_buf(),
            message,
        };
        let file: toml::Value = toml::from_str(text).map_err(|e: toml::de::Error| file_err(e.to_string()))?;
        let mut value = file.clone();
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let mut config: TrainConfig = value.try_into().map_err(|e: toml::de::Error| {
            let from = if overrides.is_empty() {
                String::new()
            } else {
                format!(" (with --set {})", overrides.join(" --set "))
            };
            file_err(format!("{}{from}", e.to_string().trim_end()))
        })?;
        if config.model.pretrained.as_deref().is_some_and(|s| s.trim().is_empty()) {
            config.model.pretrained = None;
        }
        config.validate().map_err(|(key, requirement)| {
            let origin = Self::origin(key, &file, origin, overrides);
            ConfigError::Invalid {
                key: key.into(),
                value: config.value_of(key),
                origin,
                requirement,
            }
        })?;
        Ok(config)
    }

    /// Where `key`'s value came from: the last `--set` of it, the file, or the default.
    fn origin(key: &str, file: &toml::Value, path: &Path, overrides: &[String]) -> String {
        let set = overrides
            .iter()
            .rev()
            .find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key));
        match set {
            Some(o) => format!("from --set {o}"),
            None if lookup(file, key).is_some() => format!("from {}", path.display()),
            None => "the default".into(),
        }
    }

    /// The value of a dotted `key`, as TOML text (for messages).
    fn value_of(&self, key: &str) -> String {
        toml::Value::try_from(self)
            .ok()
            .and_then(|v| lookup(&v, key).map(|x| x.to_string()))
            .unwrap_or_else(|| "?".into())
    }

    /// The first setting that is out of range: (key, what it must be).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let (d, a, m, o, s, r) = (
            &self.data,
            &self.augment,
            &self.model,
            &self.optim,
            &self.schedule,
            &self.run,
        );
        let prob = |x: f64| (0.0..=1.0).contains(&x);
        let fraction = |x: f64| (0.0..1.0).contains(&x);
        let weight = |x: f64| x.is_finite() && x >= 0.0;
        let (l, pk) = (&self.loss, d.sampler == Sampler::Pk);
        let rules: [(&'static str, bool, &str); 24] = [
            ("data.height", d.height >= 32, "must be at least 32"),
            ("data.width", d.width >= 16, "must be at least 16"),
            ("data.batch_size", d.batch_size >= 1, "must be at least 1"),
            ("data.pos_fraction", prob(d.pos_fraction), "is a probability: in [0, 1]"),
            ("data.p", !pk || d.p >= 2, "must be at least 2 identities per batch"),
            (
                "data.k",
                !pk || (d.k >= 2 && (d.p * d.k) % 2 == 0),
                "must be at least 2, with P x K even",
            ),
            ("data.prefetch", d.prefetch >= 1, "must be at least 1"),
            ("augment.flip", prob(a.flip), "is a probability: in [0, 1]"),
            ("augment.erase", prob(a.erase), "is a probability: in [0, 1]"),
            (
                "augment.erase_area",
                a.erase_area[0] > 0.0 && a.erase_area[0] <= a.erase_area[1] && a.erase_area[1] <= 1.0,
                "is [min, max] of the erased fraction: 0 < min <= max <= 1",
            ),
            (
                "augment.erase_min_aspect",
                a.erase_min_aspect > 0.0 && a.erase_min_aspect <= 1.0,
                "must be in (0, 1] (the upper bound is its inverse)",
            ),
            ("augment.color_jitter", fraction(a.color_jitter), "must be in [0, 1)"),
            ("augment.scale_jitter", fraction(a.scale_jitter), "must be in [0, 1)"),
            ("model.last_stride", matches!(m.last_stride, 1 | 2), "must be 1 or 2"),
            ("model.dropout", fraction(m.dropout), "is a probability: in [0, 1)"),
            ("optim.lr", o.lr.is_finite() && o.lr > 0.0, "must be > 0"),
            ("optim.momentum", fraction(o.momentum), "must be in [0, 1)"),
            ("optim.dampening", prob(o.dampening), "must be in [0, 1]"),
            ("optim.weight_decay", weight(o.weight_decay), "must be >= 0"),
            ("optim.backbone_lr_mult", weight(o.backbone_lr_mult), "must be >= 0"),
            (
                "optim.nesterov",
                !o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0),
                "needs momentum > 0 and dampening 0 (as PyTorch)",
            ),
            ("schedule.epochs", s.epochs >= 1, "must be at least 1"),
            (
                "schedule.warmup_factor",
                s.warmup_factor > 0.0 && s.warmup_factor <= 1.0,
                "must be in (0, 1]",
            ),
            ("run.log_every", r.log_every >= 1, "must be at least 1"),
        ];
        let step_rules = [
            ("schedule.step_size", s.step_size >= 1, "must be at least 1"),
            ("schedule.gamma", s.gamma > 0.0 && s.gamma <= 1.0, "must be in (0, 1]"),
        ];
        let step_decay = s.decay == Decay::Step;
        rules
            .into_iter()
            .chain(loss_rules(l, pk))
            .chain(step_rules.into_iter().filter(|_| step_decay))
            .find(|(_, ok, _)| !ok)
            .map_or(Ok(()), |(key, _, need)| Err((key, need.to_string())))
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Every setting `other` changes in this configuration, as (key, `key: old -> new`).
    pub fn differences(&self, other: &TrainConfig) -> Vec<(String, String)> {
        let (old, new) = (
            toml::Value::try_from(self).expect("config serialises"),
            toml::Value::try_from(other).expect("config serialises"),
        );
        let keys: std::collections::BTreeSet<String> = [&old, &new]
            .into_iter()
            .flat_map(|v| v.as_table().into_iter().flatten())
            .flat_map(|(section, t)| {
                t.as_table()
                    .into_iter()
                    .flatten()
                    .map(move |(k, _)| format!("{section}.{k}"))
            })
            .collect();
        let show = |v: Option<&toml::Value>| v.map_or("(none)".to_string(), |v| v.to_string());
        keys.into_iter()
            .filter_map(|dotted| {
                let (before, after) = (lookup(&old, &dotted), lookup(&new, &dotted));
                let text = format!("{dotted}: {} -> {}", show(before), show(after));
                (before != after).then_some((dotted, text))
            })
            .collect()
    }

    /// Checks what `requested` changes in this (a run's saved) configuration: only
    /// [`RESUMABLE_KEYS`] may differ. Returns the changes as `key: old -> new`.
    pub fn resume_changes(&self, requested: &TrainConfig, run: &Path) -> Result<Vec<String>, ConfigError> {
        let (changes, refused): (Vec<_>, Vec<_>) = self
            .differences(requested)
            .into_iter()
            .partition(|(key, _)| RESUMABLE_KEYS.contains(&key.as_str()));
        let (changes, refused): (Vec<String>, Vec<String>) = (
            changes.into_iter().map(|(_, t)| t).collect(),
            refused.into_iter().map(|(_, t)| t).collect(),
        );
        if refused.is_empty() {
            return Ok(changes);
        }
        Err(ConfigError::Resume {
            run: run.to_path_buf(),
            message: format!(
                "cannot change {} of a run in progress (it would no longer continue exactly); --resume may change only {}; start a new run with --out for anything else",
                refused.join(", "),
                RESUMABLE_KEYS.join(", ")
            ),
        })
    }
}

/// The rules of `[loss]` (`pk`: the batches are P x K).
fn loss_rules(l: &LossSettings, pk: bool) -> [(&'static str, bool, &'static str); 7] {
    let weight = |x: f64| x.is_finite() && x >= 0.0;
    let fraction = |x: f64| (0.0..1.0).contains(&x);
    [
        ("loss.id1", weight(l.id1), "must be a finite weight >= 0"),
        ("loss.id2", weight(l.id2), "must be a finite weight >= 0"),
        ("loss.verif", weight(l.verif), "must be a finite weight >= 0"),
        ("loss.triplet", weight(l.triplet), "must be a finite weight >= 0"),
        (
            "loss.triplet",
            l.triplet == 0.0 || pk,
            "needs data.sampler = \"pk\" (batches with positives and negatives)",
        ),
        (
            "loss.verif",
            l.id1 + l.id2 + l.verif + l.triplet > 0.0,
            "some loss weight must be > 0",
        ),
        (
            "loss.id_label_smoothing",
            fraction(l.id_label_smoothing),
            "must be in [0, 1)",
        ),
    ]
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
        assert_eq!(c.model.arch.name, "res2net_tiny");
        assert_eq!(c.data.batch_size, 8);
        assert!(TrainConfig::load(None, &["optim.lrr=0.01".into()]).is_err());
        assert!(TrainConfig::load(None, &["model.arch=resnet7".into()]).is_err());
        assert!(TrainConfig::load(None, &["run.device=gpu".into()]).is_err());
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

    #[test]
    fn out_of_range_values_name_the_key_and_where_they_came_from() {
        let cases = [
            ("optim.lr=-1", "optim.lr = -1"),
            ("optim.lr=nan", "optim.lr = nan"),
            ("augment.scale_jitter=1.5", "augment.scale_jitter = 1.5"),
            ("augment.erase_area=[0.5,0.1]", "augment.erase_area = [0.5, 0.1]"),
            ("augment.erase=1.2", "augment.erase = 1.2"),
            ("augment.erase_min_aspect=0", "augment.erase_min_aspect = 0"),
            ("optim.momentum=1", "optim.momentum = 1"),
            ("schedule.step_size=0", "schedule.step_size = 0"),
            ("schedule.epochs=0", "schedule.epochs = 0"),
            ("data.pos_fraction=2", "data.pos_fraction = 2"),
            ("loss.verif=-1", "loss.verif = -1"),
        ];
        for (set, want) in cases {
            let err = TrainConfig::load(None, &[set.into()]).unwrap_err().to_string();
            assert!(
                err.starts_with(want) && err.contains(&format!("from --set {set}")),
                "{set}: {err}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("recipe.toml");
        std::fs::write(&file, "[optim]\nlr = 0.0\n").unwrap();
        let err = TrainConfig::load(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("optim.lr") && err.contains("recipe.toml"), "{err}");
        // A later --set mends a bad file value.
        assert!(TrainConfig::load(Some(&file), &["optim.lr=0.1".into()]).is_ok());
        // Cosine decay has no step size to check.
        assert!(TrainConfig::load(None, &["schedule.decay=cosine".into(), "schedule.step_size=0".into()]).is_ok());
    }

    #[test]
    fn every_shipped_recipe_loads() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&configs).unwrap() {
            let path = entry.unwrap().path();
            TrainConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
        assert!(n >= 7);
    }

    #[test]
    fn resume_accepts_only_the_keys_that_keep_a_run_exact() {
        let saved = TrainConfig::load(None, &[]).unwrap();
        let run = Path::new("runs/x");
        let longer = TrainConfig::load(None, &["schedule.epochs=300".into(), "run.device=cuda".into()]).unwrap();
        let changes = saved.resume_changes(&longer, run).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(saved.resume_changes(&saved, run).unwrap().is_empty());
        let other_lr = TrainConfig::load(None, &["optim.lr=0.01".into()]).unwrap();
        let err = saved.resume_changes(&other_lr, run).unwrap_err().to_string();
        assert!(err.contains("optim.lr: 0.05 -> 0.01") && err.contains("--out"), "{err}");
    }
}
