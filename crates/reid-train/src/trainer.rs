//! The training loop: pair batches, one step each, logs, checkpoints, validation,
//! interruption and exact resume. A run that diverges, loses its loader or sees an
//! empty epoch stops with an error and keeps its last good checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use reid_data::{Manifest, Split};
use reid_io::seed::mix;
use reid_model::weights::{resolve, WeightSource};
use reid_model::{LoadScope, ModelConfig, ReidModel, WeightError};
use reid_ops::Exec;
use reid_sampling::{InputSpec, LoaderConfig, PairBatch, PairLoader, PairSampler};

use crate::config::{ConfigError, Sampler, TrainConfig};
use crate::finite::first_non_finite;
use crate::lock::RunLock;
use crate::log::MetricsLog;
use crate::optim::Sgd;
use crate::state::{load_momentum, recover_state, save_model, Best, Position, RunPaths, TrainerState};
use crate::step::{train_step, BatchTensors, StepError, StepSettings, StepStats};

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Data(#[from] reid_data::DataError),
    #[error(transparent)]
    File(#[from] reid_io::IoError),
    #[error(transparent)]
    Load(#[from] reid_sampling::LoadError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("epoch {epoch}, step {step}: {message}; the last good checkpoint is kept in {run}")]
    Step {
        epoch: usize,
        step: u64,
        message: String,
        run: PathBuf,
    },
    #[error("epoch {epoch}, step {step}: the run diverged: {what}. Lower optim.lr (now {lr}) or raise schedule.warmup_epochs (now {warmup}). Nothing non-finite was saved: {kept}")]
    Diverged {
        epoch: usize,
        step: u64,
        what: String,
        lr: f64,
        warmup: usize,
        /// What the run folder still holds.
        kept: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{run} is in use by process {pid}, which holds its lock; wait for it to end (or stop it) and run again (exit status 75)")]
    Busy { run: PathBuf, pid: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The training images of a manifest, with their labels.
#[derive(Debug, Clone)]
pub struct TrainData {
    pub paths: Arc<Vec<PathBuf>>,
    pub labels: Vec<usize>,
    pub num_classes: usize,
    /// sha256 of the manifest file: a resumed run must train on the same one.
    pub manifest_sha256: String,
}

impl TrainData {
    /// The training split of `manifest`, read from a file with this `sha256`.
    pub fn from_manifest(manifest: &Manifest, sha256: String) -> Result<Self, TrainError> {
        let records: Vec<_> = manifest.split(Split::Train).collect();
        if records.is_empty() {
            return Err(TrainError::Invalid("the manifest has no training images".into()));
        }
        Ok(TrainData {
            paths: Arc::new(records.iter().map(|r| manifest.image_path(r)).collect()),
            // Manifests are validated on read: every train row has a label >= 0.
            labels: records.iter().map(|r| r.label.unwrap_or(0) as usize).collect(),
            num_classes: manifest.num_classes(),
            manifest_sha256: sha256,
        })
    }

    /// Reads a manifest file and its training split.
    pub fn load(path: &Path) -> Result<(Self, Manifest), TrainError> {
        let manifest = Manifest::read_parquet(path)?;
        let sha = reid_data::gallery::sha256_file(path)?;
        Ok((Self::from_manifest(&manifest, sha)?, manifest))
    }
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    EpochStart {
        epoch: usize,
        batches: usize,
        lr: f64,
    },
    Step {
        position: Position,
        stats: StepStats,
        lr: f64,
    },
    EpochEnd {
        epoch: usize,
        mean: StepStats,
        images_per_s: f64,
    },
    Validation {
        epoch: usize,
        rank1: f64,
        map: f64,
        best: bool,
    },
    Saved {
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped on request; `last` holds the state to resume from.
    Interrupted,
}

/// A validation function: (rank-1, mAP) of the model on the query/gallery split.
pub type Validate<'a> = dyn FnMut(&ReidModel) -> Result<(f64, f64), String> + 'a;

/// A training run in a run folder.
pub struct Trainer {
    pub config: TrainConfig,
    pub paths: RunPaths,
    pub model: ReidModel,
    pub optimizer: Sgd,
    pub position: Position,
    /// The best validation so far (what `checkpoints/best` holds).
    pub best: Option<Best>,
    data: TrainData,
    stop: Arc<AtomicBool>,
    /// Stop (as if interrupted) once this many steps have been taken in all.
    pub max_steps: Option<u64>,
    /// This process's ownership of the run folder.
    _lock: RunLock,
}

const DROPOUT_STREAM: u64 = 31;

/// How one epoch ended.
enum EpochEnd {
    Done { mean: StepStats, images_per_s: f64 },
    Interrupted,
}

impl Trainer {
    /// Starts a new run in `run_dir` (which must not hold a run already).
    pub fn new(
        config: TrainConfig,
        run_dir: &Path,
        data: TrainData,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, TrainError> {
        let paths = RunPaths::new(run_dir);
        // A folder that exists may be another process's run: its lock first.
        let lock = run_dir.is_dir().then(|| RunLock::acquire(run_dir)).transpose()?;
        if paths.state().exists() || paths.checkpoint("last").exists() {
            return Err(TrainError::Invalid(format!(
                "{} already holds a run; continue it with --resume {0} or choose another --out",
                run_dir.display()
            )));
        }
        let model = build_model(&config, data.num_classes)?;
        model.initialize(config.run.seed)?;
        if let Some(source) = &config.model.pretrained {
            let source: WeightSource = source.parse().map_err(TrainError::Invalid)?;
            model.load_weights(&resolve(&source)?, LoadScope::Backbone)?;
            tracing::info!("backbone weights from {source}");
        }
        std::fs::create_dir_all(paths.checkpoints()).map_err(|e| TrainError::Io {
            path: paths.checkpoints(),
            source: e,
        })?;
        let lock = match lock {
            Some(lock) => lock,
            None => RunLock::acquire(run_dir)?,
        };
        reid_io::atomic::write_bytes_atomically(&paths.config(), config.to_toml().as_bytes())?;
        let optimizer = Sgd::for_model(&model, config.optim.clone());
        Ok(Trainer {
            config,
            paths,
            model,
            optimizer,
            position: Position::default(),
            best: None,
            data,
            stop,
            max_steps: None,
            _lock: lock,
        })
    }

    /// Continues the run in `run_dir` from its `last` checkpoint and trainer state.
    /// `config` is the run's saved configuration, or one that changes only what
    /// [`TrainConfig::resume_changes`] allows; it is saved as the run's.
    pub fn resume(
        run_dir: &Path,
        config: TrainConfig,
        data: TrainData,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, TrainError> {
        let paths = RunPaths::new(run_dir);
        let lock = match run_dir.is_dir() {
            true => RunLock::acquire(run_dir)?,
            false => {
                return Err(TrainError::Invalid(format!(
                    "{}: no such run folder",
                    run_dir.display()
                )))
            }
        };
        if !paths.checkpoint("last").exists() {
            return Err(TrainError::Invalid(format!(
                "{}: no checkpoint to resume from (the run did not finish an epoch); start it anew",
                paths.checkpoint("last").display()
            )));
        }
        for stale in reid_io::atomic::remove_stale_temporaries(&paths.checkpoints())? {
            tracing::info!("removed {}, left by a run killed while saving", stale.display());
        }
        let state = recover_state(&paths)?;
        if state.manifest_sha256 != data.manifest_sha256 {
            return Err(TrainError::Invalid(format!(
                "{}: the manifest is not the one the run started with (sha256 {:.12}… then, {:.12}… now); train on it in a new run",
                run_dir.display(),
                state.manifest_sha256,
                data.manifest_sha256
            )));
        }
        let model = build_model(&config, data.num_classes)?;
        model.load_weights(&paths.checkpoint("last"), LoadScope::Full)?;
        let mut optimizer = Sgd::for_model(&model, config.optim.clone());
        load_momentum(&mut optimizer, &paths.state())?;
        reid_io::atomic::write_bytes_atomically(&paths.config(), config.to_toml().as_bytes())?;
        let p = state.position;
        tracing::info!("resuming at epoch {}, batch {} (step {})", p.epoch, p.batch, p.step);
        Ok(Trainer {
            config,
            paths,
            model,
            optimizer,
            position: p,
            best: state.best,
            data,
            stop,
            max_steps: None,
            _lock: lock,
        })
    }

    fn loader_config(&self) -> LoaderConfig {
        let d = &self.config.data;
        LoaderConfig {
            batch_size: d.pairs_per_batch(),
            input: d.input(),
            augment: self.config.augment,
            prefetch: d.prefetch,
            threads: d.workers,
            skip_unreadable: d.skip_unreadable,
            drop_last: true,
            seed: self.config.run.seed,
        }
    }

    fn input(&self) -> InputSpec {
        self.config.data.input()
    }

    /// Writes `last` and the trainer state at position `next`.
    fn save_last(&self, next: Position) -> Result<(), TrainError> {
        let state = TrainerState {
            position: next,
            best: self.best,
            manifest_sha256: self.data.manifest_sha256.clone(),
            config_toml: self.config.to_toml(),
        };
        crate::state::save_last(&self.paths, &self.model, self.input(), &state, &self.optimizer)?;
        Ok(())
    }

    /// Stops the run when a parameter, a batch-norm statistic or a momentum buffer
    /// is no longer finite.
    fn check_finite(&self, epoch: usize) -> Result<(), TrainError> {
        let vars = self.model.named_vars();
        let momentum: Vec<(String, &candle_core::Tensor)> = self
            .optimizer
            .params
            .iter()
            .filter_map(|p| {
                p.momentum_buffer
                    .as_ref()
                    .map(|b| (format!("momentum of {}", p.name), b))
            })
            .collect();
        let all = vars
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_tensor()))
            .chain(momentum.iter().map(|(n, b)| (n.as_str(), *b)));
        match first_non_finite(all)? {
            None => Ok(()),
            Some((name, value)) => Err(self.diverged(epoch, format!("'{name}' holds {value} after the update"))),
        }
    }

    fn diverged(&self, epoch: usize, what: String) -> TrainError {
        let run = self.paths.root.display();
        let kept = match TrainerState::read(&self.paths.state()) {
            Ok(s) => format!(
                "{run}/checkpoints/last.safetensors holds the last good state (step {}), and `reid train --resume {run}` continues from it",
                s.position.step
            ),
            Err(_) => format!("{run} holds no checkpoint yet; start a new run"),
        };
        TrainError::Diverged {
            epoch: epoch + 1,
            step: self.position.step + 1,
            what,
            lr: self.config.optim.lr,
            warmup: self.config.schedule.warmup_epochs,
            kept,
        }
    }

    /// Trains until the last epoch, an interruption (`stop` set, or `max_steps`),
    /// or an error. `validate` runs every `run.eval_every` epochs.
    pub fn run(
        &mut self,
        on_event: &mut dyn FnMut(Event),
        mut validate: Option<&mut Validate>,
    ) -> Result<Outcome, TrainError> {
        let mut log = MetricsLog::open(&self.paths.metrics(), self.position.step)?;
        let sampler = Arc::new(self.sampler()?);
        let batches = reid_sampling::loader::batches_per_epoch(sampler.len(), &self.loader_config());
        if batches == 0 {
            return Err(TrainError::Invalid(format!(
                "{} training images make no full batch of {} pairs; lower data.batch_size",
                sampler.len(),
                self.config.data.pairs_per_batch()
            )));
        }
        for epoch in self.position.epoch..self.config.schedule.epochs {
            let lr = self.config.optim.lr * self.config.schedule.factor(epoch);
            on_event(Event::EpochStart { epoch, batches, lr });
            let (mean, images_per_s) = match self.train_epoch(epoch, lr, batches, &sampler, &mut log, on_event)? {
                EpochEnd::Interrupted => return Ok(Outcome::Interrupted),
                EpochEnd::Done { mean, images_per_s } => (mean, images_per_s),
            };
            self.position = Position {
                epoch: epoch + 1,
                batch: 0,
                step: self.position.step,
            };
            let val = self.validate_epoch(epoch, validate.as_deref_mut(), on_event)?;
            log.epoch(epoch, self.position.step, &mean, lr, images_per_s, val)?;
            on_event(Event::EpochEnd {
                epoch,
                mean,
                images_per_s,
            });
            self.save_epoch(epoch, on_event)?;
            if self.should_stop() && epoch + 1 < self.config.schedule.epochs {
                return Ok(Outcome::Interrupted);
            }
        }
        Ok(Outcome::Finished)
    }

    /// The batch sampler `[data]` asks for.
    fn sampler(&self) -> Result<PairSampler, TrainError> {
        let (d, labels, seed) = (&self.config.data, self.data.labels.clone(), self.config.run.seed);
        match d.sampler {
            Sampler::Pairs => Ok(PairSampler::new(labels, d.pos_fraction, seed)),
            Sampler::Pk => PairSampler::pk(labels, d.p, d.k, seed)
                .map_err(|m| TrainError::Invalid(format!("data.sampler = \"pk\": {m}; lower data.p"))),
        }
    }

    /// Whether to stop now: Ctrl-C, or `max_steps` reached.
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.max_steps.is_some_and(|m| self.position.step >= m)
    }

    /// Runs the batches of `epoch` from the current position.
    fn train_epoch(
        &mut self,
        epoch: usize,
        lr: f64,
        batches: usize,
        sampler: &Arc<PairSampler>,
        log: &mut MetricsLog,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<EpochEnd, TrainError> {
        let first = self.position.batch;
        let loader = PairLoader::start(
            self.data.paths.clone(),
            sampler.clone(),
            self.loader_config(),
            epoch as u64,
            first,
        );
        let (mut total, mut steps, mut images, mut seen) = (StepStats::default(), 0usize, 0usize, 0usize);
        let started = Instant::now();
        for batch in loader {
            let batch = batch?;
            seen += 1;
            if batch.is_empty() {
                continue;
            }
            let stats = self.step(epoch, lr, &batch)?;
            total.add(&stats);
            steps += 1;
            images += 2 * batch.len();
            on_event(Event::Step {
                position: self.position,
                stats,
                lr,
            });
            log.step(
                epoch,
                self.position.step,
                &stats,
                lr,
                2 * batch.len(),
                self.config.run.log_every,
            )?;
            // At an epoch's last batch the epoch ends first (its row, validation,
            // checkpoints); `run` stops right after.
            if batch.index + 1 < batches && self.should_stop() {
                self.save_last(self.position)?;
                on_event(Event::Saved {
                    path: self.paths.checkpoint("last"),
                });
                return Ok(EpochEnd::Interrupted);
            }
        }
        if seen != batches - first {
            return Err(TrainError::Invalid(format!(
                "epoch {}: the loader ended after {seen} of {} batches",
                epoch + 1,
                batches - first
            )));
        }
        if steps == 0 {
            return Err(TrainError::Invalid(format!(
                "epoch {}: no batch held a readable pair (all were skipped); the epoch is not counted",
                epoch + 1
            )));
        }
        Ok(EpochEnd::Done {
            mean: total.mean(steps),
            images_per_s: images as f64 / started.elapsed().as_secs_f64(),
        })
    }

    /// One training step on `batch`, with the checks that keep a run honest.
    fn step(&mut self, epoch: usize, lr: f64, batch: &PairBatch) -> Result<StepStats, TrainError> {
        let (h, w) = (self.config.data.height, self.config.data.width);
        let tensors = BatchTensors::new(batch, h, w, self.model.dtype, &self.model.device)?;
        let seed = mix(
            mix(self.config.run.seed, DROPOUT_STREAM, epoch as u64),
            batch.index as u64,
            0,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let c = &self.config;
        let settings = StepSettings {
            weights: c.loss,
            dropout: c.model.dropout,
            pk: c.data.sampler == Sampler::Pk,
            grad_norms: c.run.log_grad_norms && (self.position.step + 1).is_multiple_of(c.run.log_every.max(1) as u64),
        };
        let stats = match train_step(&self.model, &mut self.optimizer, &tensors, settings, lr, &mut rng) {
            Ok(stats) => stats,
            Err(StepError::NonFiniteLoss(s)) => return Err(self.diverged(epoch, format!("the loss is {}", s.loss))),
            Err(StepError::Candle(e)) => {
                return Err(TrainError::Step {
                    epoch: epoch + 1,
                    step: self.position.step + 1,
                    message: e.to_string(),
                    run: self.paths.root.clone(),
                })
            }
        };
        self.check_finite(epoch)?;
        self.position = Position {
            epoch,
            batch: batch.index + 1,
            step: self.position.step + 1,
        };
        Ok(stats)
    }

    /// Validates after `epoch` when it is due; keeps `best` on a better rank-1.
    fn validate_epoch(
        &mut self,
        epoch: usize,
        validate: Option<&mut Validate>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Option<(f64, f64)>, TrainError> {
        let every = self.config.run.eval_every;
        let due = every > 0 && ((epoch + 1).is_multiple_of(every) || epoch + 1 == self.config.schedule.epochs);
        let Some(v) = validate.filter(|_| due) else {
            return Ok(None);
        };
        let (rank1, map) = v(&self.model).map_err(TrainError::Invalid)?;
        let better = self.best.is_none_or(|b| rank1 > b.rank1);
        if better {
            save_model(&self.model, self.input(), self.position, &self.paths.checkpoint("best"))?;
            self.best = Some(Best {
                rank1,
                map,
                epoch: epoch + 1,
            });
        }
        on_event(Event::Validation {
            epoch,
            rank1,
            map,
            best: better,
        });
        Ok(Some((rank1, map)))
    }

    /// Saves a numbered checkpoint when one is due, then `last`, at an epoch's end:
    /// in this order, so that a run killed in between redoes the numbered one.
    fn save_epoch(&self, epoch: usize, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let keep = self.config.run.checkpoint_every;
        if keep > 0 && (epoch + 1).is_multiple_of(keep) {
            let numbered = self.paths.checkpoint(&format!("epoch-{:04}", epoch + 1));
            save_model(&self.model, self.input(), self.position, &numbered)?;
            on_event(Event::Saved { path: numbered });
        }
        self.save_last(self.position)
    }
}

fn build_model(config: &TrainConfig, num_classes: usize) -> Result<ReidModel, TrainError> {
    reid_ops::set_tf32(config.run.tf32);
    let model_config = ModelConfig {
        arch: config.model.arch,
        last_stride: config.model.last_stride,
        num_classes,
        bnneck: config.model.bnneck,
    };
    let device = config.run.device.open()?;
    let exec = Exec::new(config.run.ops, config.run.precision);
    exec.check(&device).map_err(TrainError::Invalid)?;
    Ok(ReidModel::new(model_config, exec, DType::F32, &device)?)
}
