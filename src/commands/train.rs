//! `reid train`: the paper's three-loss siamese training.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use reid_data::{Manifest, Split};
use reid_extract::{embed_files, ExtractOptions};
use reid_model::ReidModel;
use reid_train::{Event, Outcome, TrainConfig, TrainData, Trainer};

use crate::progress;

#[derive(Args)]
pub struct TrainArgs {
    /// Manifest of the dataset (overrides data.manifest in the config).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Recipe (TOML); see configs/.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. --set optim.lr=0.01 --set schedule.epochs=60.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run folder (config.toml, checkpoints/, metrics.csv).
    #[arg(long, default_value = "artifacts/runs/default")]
    pub out: PathBuf,
    /// Continue the run in this folder from its last checkpoint, exactly.
    #[arg(long, value_name = "RUN")]
    pub resume: Option<PathBuf>,
    /// cpu, cuda or cuda:N (overrides run.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Stop after this many steps in all, saving `last` (for quick checks).
    #[arg(long)]
    pub max_steps: Option<u64>,
}

/// Features of one split with the identities and cameras the protocol needs.
struct SplitFeatures {
    features: Vec<f32>,
    pids: Vec<i64>,
    camids: Vec<i64>,
}

impl SplitFeatures {
    fn extract(
        model: &ReidModel,
        manifest: &Manifest,
        split: Split,
        image_size: (usize, usize),
    ) -> Result<Self, String> {
        let records: Vec<_> = manifest.split(split).collect();
        let paths: Vec<PathBuf> = records.iter().map(|r| manifest.image_path(r)).collect();
        let options = ExtractOptions {
            batch_size: 64,
            ..ExtractOptions::default()
        };
        let features = embed_files(model, image_size, &paths, &options, &|_| {}).map_err(|e| e.to_string())?;
        Ok(SplitFeatures {
            features,
            pids: records.iter().map(|r| r.pid).collect(),
            camids: records.iter().map(|r| r.camid).collect(),
        })
    }

    fn set(&self, dim: usize) -> reid_eval::FeatureSet<'_> {
        reid_eval::FeatureSet {
            features: &self.features,
            dim,
            pids: &self.pids,
            camids: &self.camids,
        }
    }
}

/// Rank-1 and mAP of `model` on the query/gallery split of `manifest`.
pub fn validate(model: &ReidModel, manifest: &Manifest, image_size: (usize, usize)) -> Result<(f64, f64), String> {
    let query = SplitFeatures::extract(model, manifest, Split::Query, image_size)?;
    let gallery = SplitFeatures::extract(model, manifest, Split::Gallery, image_size)?;
    let dim = model.config.arch.feature_dim();
    let m = reid_eval::evaluate(query.set(dim), gallery.set(dim), reid_eval::Metric::Cosine, None, 10)
        .map_err(|e| e.to_string())?
        .metrics;
    Ok((m.rank1, m.map))
}

fn manifest_path(args_manifest: Option<&Path>, config: &TrainConfig) -> Result<PathBuf> {
    match args_manifest
        .map(Path::to_path_buf)
        .or_else(|| config.data.manifest.clone())
    {
        Some(p) => Ok(p),
        None => bail!("no manifest: pass --manifest (made by `reid index`) or set data.manifest in the config"),
    }
}

/// Stops training cleanly on the first Ctrl-C, at once on the second.
fn interrupt_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving the last checkpoint (Ctrl-C again to quit at once)");
    });
    stop
}

/// Trains as `args` ask; returns the run folder.
pub fn train(args: TrainArgs) -> Result<PathBuf> {
    let stop = interrupt_flag();
    let (mut trainer, manifest) = match &args.resume {
        Some(run) => {
            let config = TrainConfig::load(Some(&run.join("config.toml")), &[])
                .with_context(|| format!("reading the run's config in {}", run.display()))?;
            let manifest_file = manifest_path(args.manifest.as_deref(), &config)?;
            let manifest = Manifest::read_parquet(&manifest_file)?;
            let trainer = Trainer::resume(run, TrainData::from_manifest(&manifest)?, stop)?;
            (trainer, manifest)
        }
        None => {
            let mut overrides = args.overrides.clone();
            if let Some(d) = &args.device {
                overrides.push(format!("run.device=\"{d}\""));
            }
            let mut config = TrainConfig::load(args.config.as_deref(), &overrides)?;
            let manifest_file = manifest_path(args.manifest.as_deref(), &config)?;
            config.data.manifest = Some(manifest_file.clone());
            let manifest = Manifest::read_parquet(&manifest_file)?;
            let trainer = Trainer::new(config, &args.out, TrainData::from_manifest(&manifest)?, stop)?;
            (trainer, manifest)
        }
    };
    trainer.max_steps = args.max_steps;
    let c = &trainer.config;
    println!(
        "training {} ({} classes) on {} pairs/batch at {}x{}, {} epochs, into {}",
        c.model.arch,
        trainer.model.config.num_classes,
        c.data.batch_size,
        c.data.height,
        c.data.width,
        c.schedule.epochs,
        trainer.paths.root.display()
    );
    let image_size = (c.data.height, c.data.width);
    let mut validation = |model: &ReidModel| validate(model, &manifest, image_size);
    let validate_fn: Option<&mut reid_train::trainer::Validate> = if c.run.eval_every > 0 {
        Some(&mut validation)
    } else {
        None
    };
    let epochs = c.schedule.epochs;
    let mut bar = progress::bar(0, "epoch");
    let outcome = trainer.run(
        &mut |event| match event {
            Event::EpochStart { epoch, batches, lr } => {
                bar = progress::bar(batches as u64, &format!("epoch {}/{epochs}", epoch + 1));
                tracing::debug!("epoch {epoch}: lr {lr:.2e}");
            }
            Event::Step { stats, .. } => {
                bar.inc(1);
                bar.set_message(format!("loss {:.3}", stats.loss));
            }
            Event::EpochEnd { epoch, mean, images_per_s } => {
                bar.finish_and_clear();
                println!(
                    "epoch {:>3}/{epochs}  loss {:.4} (id {:.3}/{:.3}, verif {:.3})  id acc {:.1}%  verif acc {:.1}%  {:.0} img/s",
                    epoch + 1,
                    mean.loss,
                    mean.loss_id1,
                    mean.loss_id2,
                    mean.loss_verif,
                    100.0 * mean.id_accuracy,
                    100.0 * mean.verif_accuracy,
                    images_per_s
                );
            }
            Event::Validation { rank1, map, .. } => println!("  validation: rank-1 {:.2}%  mAP {:.2}%", 100.0 * rank1, 100.0 * map),
            Event::Saved { path } => tracing::info!("saved {}", path.display()),
        },
        validate_fn,
    )?;
    let root = trainer.paths.root.clone();
    match outcome {
        Outcome::Finished => println!("done: {}", root.join("checkpoints/last.safetensors").display()),
        Outcome::Interrupted => println!("stopped; continue with: reid train --resume {}", root.display()),
    }
    Ok(root)
}

pub fn run(args: TrainArgs) -> Result<()> {
    train(args).map(|_| ())
}
