//! The demo: the whole pipeline on a generated dataset, no download: synth, index,
//! train res2net_tiny, extract, evaluate, report. Each stage reuses what a
//! previous run left when it is still valid: the dataset by its settings, the
//! manifest by the dataset, the run by its recipe and the manifest's hash, the
//! galleries by the checkpoint's and the manifest's hashes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use reid_data::{DatasetKind, IndexOptions, Manifest, SynthConfig};
use reid_eval::files::{evaluate_files, EvaluateOutcome, EvaluateRequest};
use reid_extract::{extract_split, ExtractOptions, Extracted};
use reid_model::DeviceSpec;
use reid_train::{Event, Outcome, Prepared, RunPaths, TrainConfig};

use crate::extract::ExtractRequest;
use crate::{PipelineError, Result};

/// The demo recipe, also in configs/demo.toml.
pub const DEMO_CONFIG: &str = include_str!("../../../configs/demo.toml");

/// How large a synthetic dataset the demo renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoSize {
    /// The demo's: trains in minutes on 2 cores.
    Demo,
    /// A few seconds of training, for tests.
    Tiny,
}

impl FromStr for DemoSize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "demo" => Ok(DemoSize::Demo),
            "tiny" => Ok(DemoSize::Tiny),
            other => Err(format!("unknown size '{other}' (demo or tiny)")),
        }
    }
}

impl fmt::Display for DemoSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DemoSize::Demo => "demo",
            DemoSize::Tiny => "tiny",
        })
    }
}

impl DemoSize {
    /// The generator settings of this size.
    pub fn dataset(self, seed: u64) -> SynthConfig {
        match self {
            DemoSize::Demo => SynthConfig::demo(seed),
            DemoSize::Tiny => SynthConfig {
                seed,
                cameras: 3,
                train_ids: 40,
                train_images: 200,
                test_ids: 12,
                query_images: 30,
                gallery_images: 60,
                distractors: 10,
                junk: 5,
                height: 128,
                width: 64,
                layout: Default::default(),
            },
        }
    }
}

/// What `reid demo` asks for.
#[derive(Debug, Clone)]
pub struct DemoRequest {
    /// Seed of the dataset and of training.
    pub seed: u64,
    /// A training recipe (default: the built-in `configs/demo.toml`).
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    /// The dataset folder.
    pub data: PathBuf,
    /// The folder of manifests, runs, features and reports.
    pub artifacts: PathBuf,
    /// The run's name (and its features' and report's folders).
    pub name: String,
    pub size: DemoSize,
    /// Average each image's features with its mirror image's.
    pub flip: bool,
    /// Where training and extraction run.
    pub device: DeviceSpec,
}

/// A stage's name, what happened and how long it took.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: &'static str,
    pub note: String,
    pub secs: f64,
}

/// Callbacks for what the demo reports as it goes.
pub struct DemoHooks<'a> {
    /// After each stage.
    pub stage: &'a mut dyn FnMut(&Stage),
    /// Training progress.
    pub train: &'a mut dyn FnMut(Event),
    /// A remark on a cache decision (a stale run replaced, say).
    pub note: &'a mut dyn FnMut(String),
    /// Images rendered so far.
    pub render: &'a (dyn Fn(usize) + Sync),
    /// Set to stop training cleanly (Ctrl-C).
    pub stop: Arc<AtomicBool>,
}

/// What the demo produced.
pub struct DemoOutcome {
    pub stages: Vec<Stage>,
    pub evaluation: EvaluateOutcome,
    pub total_secs: f64,
}

/// The paths the demo writes, from its request.
struct Layout {
    manifest: PathBuf,
    run: PathBuf,
    features: PathBuf,
    report: PathBuf,
}

impl DemoRequest {
    fn layout(&self) -> Layout {
        let a = &self.artifacts;
        Layout {
            manifest: a.join(format!("manifests/{}.parquet", self.name)),
            run: a.join(format!("runs/{}", self.name)),
            features: a.join(format!("features/{}", self.name)),
            report: a.join(format!("reports/{}", self.name)),
        }
    }

    /// The training recipe: the built-in demo one (or `config`), this seed, the
    /// overrides, and the demo's manifest.
    pub fn train_config(&self) -> Result<TrainConfig> {
        let mut overrides = vec![format!("run.seed={}", self.seed)];
        overrides.extend(self.overrides.iter().cloned());
        let mut config = match &self.config {
            Some(p) => TrainConfig::load(Some(p), &overrides)?,
            None => TrainConfig::parse(DEMO_CONFIG, Path::new("configs/demo.toml"), &overrides)?,
        };
        config.data.manifest = Some(self.layout().manifest);
        config.run.device = self.device;
        Ok(config)
    }
}

/// Runs `f` as stage `name`, timing it and reporting it.
fn timed(
    stages: &mut Vec<Stage>,
    report: &mut dyn FnMut(&Stage),
    name: &'static str,
    f: impl FnOnce() -> Result<String>,
) -> Result<()> {
    let t = Instant::now();
    let note = f()?;
    let stage = Stage {
        name,
        note,
        secs: t.elapsed().as_secs_f64(),
    };
    report(&stage);
    stages.push(stage);
    Ok(())
}

/// Runs the demo's stages in order; see the module documentation.
pub fn run_demo(request: &DemoRequest, hooks: DemoHooks) -> Result<DemoOutcome> {
    let total = Instant::now();
    let paths = request.layout();
    let config = request.train_config()?;
    let (mut stages, report) = (Vec::new(), hooks.stage);
    let mut generated = false;
    timed(&mut stages, report, "synth", || {
        let (note, fresh) = synth_stage(request, hooks.render)?;
        generated = fresh;
        Ok(note)
    })?;
    timed(&mut stages, report, "index", || {
        index_stage(&request.data, &paths.manifest, generated)
    })?;
    timed(&mut stages, report, "train", || {
        train_stage(&paths.run, &config, generated, hooks.stop, (hooks.train, hooks.note))
    })?;
    timed(&mut stages, report, "extract", || extract_stage(request, &paths))?;
    let mut evaluation = None;
    timed(&mut stages, report, "evaluate", || {
        evaluation = Some(evaluate_stage(&paths)?);
        Ok(format!("report in {}", paths.report.display()))
    })?;
    Ok(DemoOutcome {
        stages,
        evaluation: evaluation.expect("the evaluate stage ran"),
        total_secs: total.elapsed().as_secs_f64(),
    })
}

/// Renders the dataset unless the folder holds it already; (note, generated).
fn synth_stage(request: &DemoRequest, render: &(dyn Fn(usize) + Sync)) -> Result<(String, bool)> {
    let cfg = request.size.dataset(request.seed);
    let data = &request.data;
    Ok(if reid_data::synth::ensure(&cfg, data, render)? {
        (
            format!("rendered {} images into {}", cfg.total_images(), data.display()),
            true,
        )
    } else {
        (format!("cached: {} already holds this dataset", data.display()), false)
    })
}

/// Indexes the dataset unless a manifest of it exists.
fn index_stage(data: &Path, manifest: &Path, regenerated: bool) -> Result<String> {
    if !regenerated && Manifest::read_parquet(manifest).is_ok() {
        return Ok(format!("cached: {}", manifest.display()));
    }
    let root = std::path::absolute(data).unwrap_or(data.to_path_buf());
    let report = DatasetKind::Market1501
        .layout()
        .index(&root, &IndexOptions::default())?;
    report.manifest.write_parquet(manifest)?;
    let s = report.manifest.summary();
    Ok(format!(
        "{} train / {} query / {} gallery images -> {}",
        s[0].images,
        s[1].images,
        s[2].images,
        manifest.display()
    ))
}

/// What the training stage finds in the run folder.
enum RunCache {
    /// The same recipe and data, trained to the end.
    Finished,
    /// The same recipe and data, cut off: resume it.
    Partial,
    /// No run, or one of another recipe or data (the reason given): train anew.
    Stale(Option<String>),
}

/// Compares the run in `run_dir` with the recipe (and its manifest) asked for.
fn run_cache(run_dir: &Path, config: &TrainConfig) -> Result<RunCache> {
    let paths = RunPaths::new(run_dir);
    let Ok(state) = reid_train::recover_state(&paths) else {
        return Ok(RunCache::Stale(
            run_dir.exists().then(|| "it holds no finished epoch".into()),
        ));
    };
    let saved = TrainConfig::load(Some(&paths.config()), &[])?;
    let changed: Vec<String> = saved.differences(config).into_iter().map(|(_, t)| t).collect();
    if !changed.is_empty() {
        return Ok(RunCache::Stale(Some(format!(
            "the recipe changed ({})",
            changed.join(", ")
        ))));
    }
    let manifest = config.data.manifest.as_deref().expect("the demo sets its manifest");
    if state.manifest_sha256 != reid_data::gallery::sha256_file(manifest)? {
        return Ok(RunCache::Stale(Some("the dataset changed".into())));
    }
    Ok(if state.position.epoch >= config.schedule.epochs {
        RunCache::Finished
    } else {
        RunCache::Partial
    })
}

/// Trains the demo run unless an identical one is finished (then it is reused).
fn train_stage(
    run_dir: &Path,
    config: &TrainConfig,
    regenerated: bool,
    stop: Arc<AtomicBool>,
    (on_event, note): (&mut dyn FnMut(Event), &mut dyn FnMut(String)),
) -> Result<String> {
    let cache = if regenerated {
        RunCache::Stale(run_dir.exists().then(|| "the dataset was regenerated".into()))
    } else {
        run_cache(run_dir, config)?
    };
    let epochs = config.schedule.epochs;
    let resume = match cache {
        RunCache::Finished => return Ok(format!("cached: {} finished {epochs} epochs", run_dir.display())),
        RunCache::Partial => true,
        RunCache::Stale(why) => {
            if let Some(why) = why {
                note(format!("{} is stale: {why}; training anew", run_dir.display()));
                std::fs::remove_dir_all(run_dir).map_err(|e| reid_data::DataError::io(run_dir, e))?;
            }
            false
        }
    };
    let mut prepared = Prepared::new(config.clone(), run_dir, resume, stop)?;
    if prepared.run(on_event)? == Outcome::Interrupted {
        return Err(PipelineError::Invalid(
            "interrupted; `reid demo` again resumes the run".into(),
        ));
    }
    let verb = if resume { "resumed and finished" } else { "trained" };
    Ok(format!("{verb} {epochs} epochs into {}", run_dir.display()))
}

/// Extracts query and gallery features (cached by checkpoint and manifest hashes).
fn extract_stage(request: &DemoRequest, paths: &Layout) -> Result<String> {
    let jobs = ExtractRequest {
        run: Some(paths.run.clone()),
        checkpoint: None,
        manifest: Some(paths.manifest.clone()),
        splits: vec![reid_data::Split::Query, reid_data::Split::Gallery],
        options: ExtractOptions {
            batch_size: 64,
            flip: request.flip,
            normalize: true,
            ..ExtractOptions::default()
        },
        out: Some(paths.features.clone()),
        force: false,
    }
    .jobs()?;
    let device = request.device.open()?;
    let notes: Vec<String> = jobs
        .iter()
        .map(|job| {
            Ok(match extract_split(job, &device, &|_, _| {})? {
                Extracted::Cached => format!("{}: cached (same checkpoint, manifest and settings)", job.out.display()),
                Extracted::Written { images } => format!("{}: {images} images", job.out.display()),
            })
        })
        .collect::<Result<_>>()?;
    Ok(notes.join("; "))
}

/// Evaluates the features and writes the report with the training curves.
fn evaluate_stage(paths: &Layout) -> Result<EvaluateOutcome> {
    let request = EvaluateRequest {
        pairs: vec![(
            paths.features.join("query.safetensors"),
            paths.features.join("gallery.safetensors"),
        )],
        metric: reid_eval::Metric::Cosine,
        rerank: None,
        max_rank: 50,
        out: paths.report.clone(),
        ranked: 8,
        data_root: None,
        run: Some(paths.run.clone()),
        pictures: true,
    };
    Ok(evaluate_files(&request)?)
}
