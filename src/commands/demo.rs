//! `reid demo`: the whole pipeline on a generated dataset, no download: synth,
//! index, train res2net_tiny, extract, evaluate, report. Each stage reuses what a
//! previous run left (dataset, manifest, trained run, galleries) and says so.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use reid_data::{DatasetKind, IndexOptions, Manifest, SynthConfig};
use reid_model::DeviceSpec;
use reid_train::{Outcome, Prepared, RunPaths, TrainConfig};

use crate::commands::{evaluate, extract, synth, train};

/// The demo recipe, also in configs/demo.toml.
const DEMO_CONFIG: &str = include_str!("../../configs/demo.toml");

#[derive(Args)]
pub struct DemoArgs {
    /// Seed of the dataset and of training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training recipe [default: configs/demo.toml, built in].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a training setting, e.g. --set schedule.epochs=4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Dataset folder.
    #[arg(long, default_value = "data/synthetic")]
    pub data: PathBuf,
    /// Folder for manifests, runs, features and reports.
    #[arg(long, default_value = "artifacts")]
    pub artifacts: PathBuf,
    /// Name of the run (and of its features and report folders).
    #[arg(long, default_value = "demo")]
    pub name: String,
    /// Synthetic dataset size: "demo" or "tiny" (a few seconds of training, for tests).
    #[arg(long, default_value = "demo")]
    pub size: String,
    /// Extract features without averaging each image with its mirror image.
    #[arg(long)]
    pub no_flip: bool,
}

/// A stage's name, what happened and how long it took.
struct Stage {
    name: &'static str,
    note: String,
    secs: f64,
}

fn tiny_dataset(seed: u64) -> SynthConfig {
    SynthConfig {
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
    }
}

/// What the demo's training stage finds in the run folder.
enum RunCache {
    /// The same recipe and data, trained to the end.
    Finished,
    /// The same recipe and data, cut off: resume it.
    Partial,
    /// No run, or one of another recipe or data (the reason given): train anew.
    Stale(Option<String>),
}

/// Compares the run in `run_dir` with the recipe and the manifest asked for.
fn run_cache(run_dir: &Path, config: &TrainConfig, manifest: &Path) -> Result<RunCache> {
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
fn train_stage(run_dir: &Path, manifest: &Path, config: &TrainConfig, regenerated: bool) -> Result<String> {
    let cache = if regenerated {
        RunCache::Stale(run_dir.exists().then(|| "the dataset was regenerated".into()))
    } else {
        run_cache(run_dir, config, manifest)?
    };
    let resume = match cache {
        RunCache::Finished => {
            return Ok(format!(
                "cached: {} finished {} epochs",
                run_dir.display(),
                config.schedule.epochs
            ))
        }
        RunCache::Partial => true,
        RunCache::Stale(why) => {
            if let Some(why) = why {
                println!("[train] {} is stale: {why}; training anew", run_dir.display());
                std::fs::remove_dir_all(run_dir)
                    .with_context(|| format!("removing the stale run {}", run_dir.display()))?;
            }
            false
        }
    };
    let mut prepared = Prepared::new(config.clone(), run_dir, resume, train::interrupt_flag())?;
    if prepared.run(&mut train::printer(config.schedule.epochs))? == Outcome::Interrupted {
        anyhow::bail!("interrupted; `reid demo` again resumes the run");
    }
    let verb = if resume { "resumed and finished" } else { "trained" };
    Ok(format!(
        "{verb} {} epochs into {}",
        config.schedule.epochs,
        run_dir.display()
    ))
}

pub fn run(args: DemoArgs) -> Result<()> {
    let total = Instant::now();
    let mut stages = Vec::new();
    let mut timed = |name: &'static str, f: &mut dyn FnMut() -> Result<String>| -> Result<()> {
        let t = Instant::now();
        let note = f()?;
        println!("[{name}] {note}");
        stages.push(Stage {
            name,
            note,
            secs: t.elapsed().as_secs_f64(),
        });
        Ok(())
    };

    // 1. The dataset.
    let data_cfg = match args.size.as_str() {
        "demo" => SynthConfig::demo(args.seed),
        "tiny" => tiny_dataset(args.seed),
        other => anyhow::bail!("unknown --size '{other}' (demo or tiny)"),
    };
    let mut generated = false;
    timed("synth", &mut || {
        generated = synth::ensure(&data_cfg, &args.data)?;
        Ok(if generated {
            format!(
                "rendered {} images into {}",
                data_cfg.total_images(),
                args.data.display()
            )
        } else {
            format!("cached: {} already holds this dataset", args.data.display())
        })
    })?;

    // 2. The manifest.
    let manifest_path = args.artifacts.join(format!("manifests/{}.parquet", args.name));
    timed("index", &mut || {
        if !generated && Manifest::read_parquet(&manifest_path).is_ok() {
            return Ok(format!("cached: {}", manifest_path.display()));
        }
        let root = std::path::absolute(&args.data).unwrap_or(args.data.clone());
        let report = DatasetKind::Market1501
            .layout()
            .index(&root, &IndexOptions::default())?;
        report.manifest.write_parquet(&manifest_path)?;
        let s = report.manifest.summary();
        Ok(format!(
            "{} train / {} query / {} gallery images -> {}",
            s[0].images,
            s[1].images,
            s[2].images,
            manifest_path.display()
        ))
    })?;

    // 3. Training (resumed if cut off, skipped if complete, redone if the recipe
    // or the data changed).
    let run_dir = args.artifacts.join(format!("runs/{}", args.name));
    let mut overrides = vec![format!("run.seed={}", args.seed)];
    overrides.extend(args.overrides.iter().cloned());
    let mut config = match &args.config {
        Some(p) => TrainConfig::load(Some(p), &overrides)?,
        None => TrainConfig::parse(DEMO_CONFIG, Path::new("configs/demo.toml"), &overrides)?,
    };
    config.data.manifest = Some(manifest_path.clone());
    timed("train", &mut || {
        train_stage(&run_dir, &manifest_path, &config, generated)
    })?;

    // 4. Features (cached by checkpoint and manifest hashes).
    let features = args.artifacts.join(format!("features/{}", args.name));
    timed("extract", &mut || {
        let files = extract::extract(&extract::ExtractArgs {
            run: Some(run_dir.clone()),
            checkpoint: None,
            manifest: Some(manifest_path.clone()),
            split: vec!["query".into(), "gallery".into()],
            flip: !args.no_flip,
            no_normalize: false,
            batch: 64,
            device: DeviceSpec::Cpu,
            out: Some(features.clone()),
            force: false,
        })?;
        Ok(format!("{} gallery files in {}", files.len(), features.display()))
    })?;

    // 5. Evaluation and report.
    let reports = args.artifacts.join(format!("reports/{}", args.name));
    let mut outcome = None;
    timed("evaluate", &mut || {
        let o = evaluate::evaluate(&evaluate::EvaluateArgs {
            query: vec![features.join("query.safetensors")],
            gallery: vec![features.join("gallery.safetensors")],
            metric: reid_eval::Metric::Cosine,
            rerank: None,
            max_rank: 50,
            out: Some(reports.clone()),
            json: false,
            ranked: 8,
            data_root: None,
            run: Some(run_dir.clone()),
        })?;
        let note = format!("report in {}", reports.display());
        outcome = Some(o);
        Ok(note)
    })?;
    let o = outcome.expect("evaluation ran");
    let m = &o.metrics;

    println!();
    println!("{:<10} {:>9}  ", "stage", "time");
    for s in &stages {
        println!("{:<10} {:>8.1}s  {}", s.name, s.secs, s.note);
    }
    println!("{:<10} {:>8.1}s", "total", total.elapsed().as_secs_f64());
    println!();
    println!("| rank-1 | rank-5 | rank-10 | mAP |");
    println!("| ---: | ---: | ---: | ---: |");
    println!(
        "| {:.2}% | {:.2}% | {:.2}% | {:.2}% |",
        100.0 * m.rank1,
        100.0 * m.rank5,
        100.0 * m.rank10,
        100.0 * m.map
    );
    println!();
    println!("metrics: {}", o.metrics_file.display());
    println!("report:  {}", o.report.display());
    Ok(())
}
