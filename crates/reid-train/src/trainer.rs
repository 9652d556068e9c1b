//! The training loop: pair batches, one step each, logs, checkpoints, validation,
//! interruption and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use reid_data::seed::mix;
use reid_data::{Manifest, Split};
use reid_model::weights::{resolve, WeightSource};
use reid_model::{LoadScope, ModelConfig, ReidModel, WeightError};
use reid_sampling::{LoaderConfig, PairLoader, PairSampler};

use crate::checkpoint::{load_state, save_model, save_state, Position, RunPaths};
use crate::config::{ConfigError, TrainConfig};
use crate::optim::Sgd;
use crate::step::{train_step, BatchTensors, StepStats};

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
    Decode(#[from] reid_sampling::DecodeError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("epoch {epoch}, step {step}: {message}; the last good checkpoint is kept in {run}")]
    Step {
        epoch: usize,
        step: u64,
        message: String,
        run: PathBuf,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The training images of a manifest, with their labels.
#[derive(Debug, Clone)]
pub struct TrainData {
    pub paths: Arc<Vec<PathBuf>>,
    pub labels: Vec<usize>,
    pub num_classes: usize,
}

impl TrainData {
    pub fn from_manifest(manifest: &Manifest) -> Result<Self, TrainError> {
        let records: Vec<_> = manifest.split(Split::Train).collect();
        if records.is_empty() {
            return Err(TrainError::Invalid("the manifest has no training images".into()));
        }
        Ok(TrainData {
            paths: Arc::new(records.iter().map(|r| manifest.image_path(r)).collect()),
            labels: records
                .iter()
                .map(|r| r.label.expect("train rows have labels") as usize)
                .collect(),
            num_classes: manifest.num_classes(),
        })
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
    data: TrainData,
    stop: Arc<AtomicBool>,
    /// Stop (as if interrupted) once this many steps have been taken in all.
    pub max_steps: Option<u64>,
    best_rank1: f64,
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, TrainError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Device::new_cuda(n)?),
            None => Err(TrainError::Invalid(format!(
                "unknown device '{other}' (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}

const DROPOUT_STREAM: u64 = 31;
const CSV_HEADER: &str = "kind,epoch,step,lr,loss_id1,loss_id2,loss_verif,loss,id_acc,verif_acc,images_per_s,rank1,mAP";

impl Trainer {
    /// Starts a new run in `run_dir` (which must not hold a run already).
    pub fn new(
        config: TrainConfig,
        run_dir: &Path,
        data: TrainData,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, TrainError> {
        let paths = RunPaths::new(run_dir);
        if paths.state().exists() {
            return Err(TrainError::Invalid(format!(
                "{} already holds a run; continue it with --resume {0} or choose another --out",
                run_dir.display()
            )));
        }
        let device = parse_device(&config.run.device)?;
        let model = build_model(&config, data.num_classes, &device)?;
        model.initialize(config.run.seed)?;
        if let Some(source) = &config.model.pretrained {
            let source: WeightSource = source.parse().map_err(TrainError::Invalid)?;
            let path = resolve(&source)?;
            model.load_weights(&path, LoadScope::Backbone)?;
            tracing::info!("backbone weights from {source}");
        }
        std::fs::create_dir_all(paths.checkpoints()).map_err(|e| TrainError::Io {
            path: paths.checkpoints(),
            source: e,
        })?;
        reid_data::atomic::write_bytes_atomically(&paths.config(), config.to_toml().as_bytes())?;
        let optimizer = Sgd::new(model.trainable_vars(), config.optim.clone());
        Ok(Trainer {
            config,
            paths,
            model,
            optimizer,
            position: Position::default(),
            data,
            stop,
            max_steps: None,
            best_rank1: f64::NEG_INFINITY,
        })
    }

    /// Continues the run in `run_dir` from its `last` checkpoint and trainer state,
    /// with the configuration saved there.
    pub fn resume(run_dir: &Path, data: TrainData, stop: Arc<AtomicBool>) -> Result<Self, TrainError> {
        let paths = RunPaths::new(run_dir);
        if !paths.state().exists() {
            return Err(TrainError::Invalid(format!(
                "{}: no trainer state to resume from",
                paths.state().display()
            )));
        }
        let config = TrainConfig::load(Some(&paths.config()), &[])?;
        let device = parse_device(&config.run.device)?;
        let model = build_model(&config, data.num_classes, &device)?;
        model.load_weights(&paths.checkpoint("last"), LoadScope::Full)?;
        let mut optimizer = Sgd::new(model.trainable_vars(), config.optim.clone());
        let position = load_state(&mut optimizer, &paths.state())?;
        let weights_step = crate::checkpoint::read_step(&paths.checkpoint("last"))?;
        if weights_step != position.step {
            return Err(TrainError::Invalid(format!(
                "{}: weights of step {weights_step} but trainer state of step {}; the run was cut off while saving",
                paths.checkpoints().display(),
                position.step
            )));
        }
        tracing::info!(
            "resuming at epoch {}, batch {} (step {})",
            position.epoch,
            position.batch,
            position.step
        );
        Ok(Trainer {
            config,
            paths,
            model,
            optimizer,
            position,
            data,
            stop,
            max_steps: None,
            best_rank1: f64::NEG_INFINITY,
        })
    }

    fn loader_config(&self) -> LoaderConfig {
        let d = &self.config.data;
        LoaderConfig {
            batch_size: d.batch_size,
            height: d.height,
            width: d.width,
            augment: self.config.augment,
            prefetch: d.prefetch,
            threads: d.workers,
            skip_unreadable: d.skip_unreadable,
            drop_last: true,
            seed: self.config.run.seed,
        }
    }

    fn save_last(&self, next: Position) -> Result<(), TrainError> {
        let size = (self.config.data.height, self.config.data.width);
        // Both files record the step; `resume` refuses a pair that disagrees (a
        // crash between the two writes).
        save_model(&self.model, size, next, &self.paths.checkpoint("last"))?;
        save_state(&self.optimizer, next, &self.config.to_toml(), &self.paths.state())?;
        Ok(())
    }

    fn csv_row(
        &self,
        file: &mut std::fs::File,
        kind: &str,
        epoch: usize,
        stats: Option<(&StepStats, f64, f64)>,
        val: Option<(f64, f64)>,
    ) -> Result<(), TrainError> {
        let mut row = format!("{kind},{epoch},{}", self.position.step);
        match stats {
            Some((s, lr, ips)) => row.push_str(&format!(
                ",{lr:.6e},{:.6},{:.6},{:.6},{:.6},{:.4},{:.4},{ips:.1}",
                s.loss_id1, s.loss_id2, s.loss_verif, s.loss, s.id_accuracy, s.verif_accuracy
            )),
            None => row.push_str(",,,,,,,,"),
        }
        match val {
            Some((r1, map)) => row.push_str(&format!(",{r1:.4},{map:.4}")),
            None => row.push_str(",,"),
        }
        writeln!(file, "{row}")
            .and_then(|_| file.flush())
            .map_err(|e| TrainError::Io {
                path: self.paths.metrics(),
                source: e,
            })
    }

    /// Trains until the last epoch, an interruption (`stop` set, or `max_steps`),
    /// or an error. `validate` runs every `run.eval_every` epochs.
    pub fn run(
        &mut self,
        on_event: &mut dyn FnMut(Event),
        mut validate: Option<&mut Validate>,
    ) -> Result<Outcome, TrainError> {
        let metrics = self.paths.metrics();
        let fresh = !metrics.exists();
        let mut csv = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics)
            .map_err(|e| TrainError::Io {
                path: metrics.clone(),
                source: e,
            })?;
        if fresh {
            writeln!(csv, "{CSV_HEADER}").map_err(|e| TrainError::Io {
                path: metrics.clone(),
                source: e,
            })?;
        }
        let sampler = Arc::new(PairSampler::new(
            self.data.labels.clone(),
            self.config.data.pos_fraction,
            self.config.run.seed,
        ));
        let loader_cfg = self.loader_config();
        let batches = reid_sampling::loader::batches_per_epoch(sampler.len(), &loader_cfg);
        if batches == 0 {
            return Err(TrainError::Invalid(format!(
                "{} training images make no full batch of {} pairs; lower data.batch_size",
                sampler.len(),
                loader_cfg.batch_size
            )));
        }
        let (h, w) = (self.config.data.height, self.config.data.width);
        let log_every = self.config.run.log_every.max(1) as u64;
        for epoch in self.position.epoch..self.config.schedule.epochs {
            let lr = self.config.optim.lr * self.config.schedule.factor(epoch);
            on_event(Event::EpochStart { epoch, batches, lr });
            let loader = PairLoader::start(
                self.data.paths.clone(),
                sampler.clone(),
                loader_cfg.clone(),
                epoch as u64,
                self.position.batch,
            );
            let (mut window, mut window_n, mut window_images, mut window_start) =
                (StepStats::default(), 0usize, 0usize, Instant::now());
            let (mut total, mut total_n, mut total_images, epoch_start) =
                (StepStats::default(), 0usize, 0usize, Instant::now());
            for batch in loader {
                let batch = batch?;
                if batch.is_empty() {
                    continue;
                }
                let tensors = BatchTensors::new(&batch, h, w, self.model.dtype, &self.model.device)?;
                let mut rng = ChaCha8Rng::seed_from_u64(mix(
                    mix(self.config.run.seed, DROPOUT_STREAM, epoch as u64),
                    batch.index as u64,
                    0,
                ));
                let stats = train_step(
                    &self.model,
                    &mut self.optimizer,
                    &tensors,
                    self.config.loss,
                    self.config.model.dropout,
                    lr,
                    &mut rng,
                )
                .map_err(|e| TrainError::Step {
                    epoch,
                    step: self.position.step,
                    message: e.to_string(),
                    run: self.paths.root.clone(),
                })?;
                self.position = Position {
                    epoch,
                    batch: batch.index + 1,
                    step: self.position.step + 1,
                };
                window.add(&stats);
                total.add(&stats);
                window_n += 1;
                total_n += 1;
                window_images += 2 * batch.len();
                total_images += 2 * batch.len();
                on_event(Event::Step {
                    position: self.position,
                    stats,
                    lr,
                });
                if self.position.step.is_multiple_of(log_every) {
                    let ips = window_images as f64 / window_start.elapsed().as_secs_f64();
                    self.csv_row(&mut csv, "step", epoch, Some((&window.mean(window_n), lr, ips)), None)?;
                    (window, window_n, window_images, window_start) = (StepStats::default(), 0, 0, Instant::now());
                }
                let interrupted =
                    self.stop.load(Ordering::SeqCst) || self.max_steps.is_some_and(|m| self.position.step >= m);
                if interrupted {
                    self.save_last(self.position)?;
                    on_event(Event::Saved {
                        path: self.paths.checkpoint("last"),
                    });
                    return Ok(Outcome::Interrupted);
                }
            }
            let ips = total_images as f64 / epoch_start.elapsed().as_secs_f64();
            let mean = total.mean(total_n.max(1));
            self.position = Position {
                epoch: epoch + 1,
                batch: 0,
                step: self.position.step,
            };
            let mut val = None;
            let every = self.config.run.eval_every;
            if let Some(v) = validate
                .as_mut()
                .filter(|_| every > 0 && ((epoch + 1) % every == 0 || epoch + 1 == self.config.schedule.epochs))
            {
                let (rank1, map) = v(&self.model).map_err(TrainError::Invalid)?;
                on_event(Event::Validation { epoch, rank1, map });
                val = Some((rank1, map));
                if rank1 > self.best_rank1 {
                    self.best_rank1 = rank1;
                    save_model(&self.model, (h, w), self.position, &self.paths.checkpoint("best"))?;
                }
            }
            self.csv_row(&mut csv, "epoch", epoch, Some((&mean, lr, ips)), val)?;
            on_event(Event::EpochEnd {
                epoch,
                mean,
                images_per_s: ips,
            });
            self.save_last(self.position)?;
            let keep = self.config.run.checkpoint_every;
            if keep > 0 && (epoch + 1) % keep == 0 {
                let numbered = self.paths.checkpoint(&format!("epoch-{:04}", epoch + 1));
                save_model(&self.model, (h, w), self.position, &numbered)?;
                on_event(Event::Saved { path: numbered });
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(Outcome::Interrupted);
            }
        }
        Ok(Outcome::Finished)
    }
}

fn build_model(config: &TrainConfig, num_classes: usize, device: &Device) -> Result<ReidModel, TrainError> {
    let arch = config.model.arch.parse().map_err(TrainError::Invalid)?;
    let model_config = ModelConfig {
        arch,
        last_stride: config.model.last_stride,
        num_classes,
        bnneck: config.model.bnneck,
    };
    Ok(ReidModel::new(model_config, DType::F32, device)?)
}

impl Default for StepStats {
    fn default() -> Self {
        StepStats {
            loss: 0.0,
            loss_id1: 0.0,
            loss_id2: 0.0,
            loss_verif: 0.0,
            id_accuracy: 0.0,
            verif_accuracy: 0.0,
        }
    }
}

impl StepStats {
    fn add(&mut self, o: &StepStats) {
        self.loss += o.loss;
        self.loss_id1 += o.loss_id1;
        self.loss_id2 += o.loss_id2;
        self.loss_verif += o.loss_verif;
        self.id_accuracy += o.id_accuracy;
        self.verif_accuracy += o.verif_accuracy;
    }

    fn mean(&self, n: usize) -> StepStats {
        let n = n.max(1) as f64;
        StepStats {
            loss: self.loss / n,
            loss_id1: self.loss_id1 / n,
            loss_id2: self.loss_id2 / n,
            loss_verif: self.loss_verif / n,
            id_accuracy: self.id_accuracy / n,
            verif_accuracy: self.verif_accuracy / n,
        }
    }
}
