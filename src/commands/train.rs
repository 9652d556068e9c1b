//! `reid train`: the paper's three-loss siamese training.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reid_model::DeviceSpec;
use reid_train::{Event, Launch, Outcome};

use crate::progress;
use crate::stop::StopSignals;

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
    /// Continue the run in this folder from its last checkpoint, exactly. With
    /// --set, --config or --device, only settings that keep the run exact may
    /// change (schedule.epochs, run.device, run.ops, run.log_every, run.eval_every,
    /// run.checkpoint_every, data.manifest, data.workers, data.prefetch); they are
    /// recorded in the run's config.toml.
    #[arg(long, value_name = "RUN")]
    pub resume: Option<PathBuf>,
    /// cpu, cuda or cuda:N (overrides run.device).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Stop after this many steps in all, saving `last` (for quick checks).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[command(flatten)]
    pub ops: super::OpsArg,
}

impl TrainArgs {
    /// The run these flags ask for.
    pub fn launch(&self) -> Result<Launch> {
        Ok(Launch {
            run_dir: self.resume.clone().unwrap_or_else(|| self.out.clone()),
            resume: self.resume.is_some(),
            manifest: self.manifest.clone(),
            config: self.config.clone(),
            overrides: self.overrides.clone(),
            device: self.device,
            ops: self.ops.get()?,
            max_steps: self.max_steps,
        })
    }
}

/// Prints one line per epoch and validation, with a progress bar in between.
pub fn printer(epochs: usize) -> impl FnMut(Event) {
    let mut bar = progress::bar(0, "epoch");
    move |event| match event {
        Event::EpochStart { epoch, batches, lr } => {
            bar = progress::bar(batches as u64, &format!("epoch {}/{epochs}", epoch + 1));
            tracing::debug!("epoch {epoch}: lr {lr:.2e}");
        }
        Event::Step { stats, .. } => {
            bar.inc(1);
            bar.set_message(format!("loss {:.3}", stats.loss));
        }
        Event::EpochEnd {
            epoch,
            mean,
            images_per_s,
        } => {
            bar.finish_and_clear();
            let triplet = match mean.loss_triplet {
                0.0 => String::new(),
                t => format!(", triplet {t:.3}"),
            };
            println!(
                "epoch {:>3}/{epochs}  loss {:.4} (id {:.3}/{:.3}, verif {:.3}{triplet})  id acc {:.1}%  verif acc {:.1}%  {:.0} img/s",
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
        Event::Validation { rank1, map, best, .. } => println!(
            "  validation: rank-1 {:.2}%  mAP {:.2}%{}",
            100.0 * rank1,
            100.0 * map,
            if best { "  (best so far, saved as best)" } else { "" }
        ),
        Event::Saved { path } => tracing::info!("saved {}", path.display()),
    }
}

/// Trains as `launch` asks; returns the run folder.
pub fn train(launch: &Launch) -> Result<PathBuf> {
    let signals = StopSignals::install()?;
    let mut prepared = launch.prepare(signals.flag.clone())?;
    for change in &prepared.changes {
        println!("resume: {change} (recorded in config.toml)");
    }
    let t = &prepared.trainer;
    let c = &t.config;
    println!(
        "training {} ({} classes) on {} pairs/batch at {}x{}, {} epochs, into {}",
        c.model.arch,
        t.model.config.num_classes,
        c.data.batch_size,
        c.data.height,
        c.data.width,
        c.schedule.epochs,
        t.paths.root.display()
    );
    let outcome = prepared.run(&mut printer(c.schedule.epochs))?;
    let root = prepared.trainer.paths.root.clone();
    match outcome {
        Outcome::Finished => println!("done: {}", root.join("checkpoints/last.safetensors").display()),
        Outcome::Interrupted => {
            println!("stopped; continue with: reid train --resume {}", root.display());
            // A signal is a failure to finish; --max-steps is a stop asked for.
            if let Some(stopped) = signals.received() {
                return Err(stopped.into());
            }
        }
    }
    Ok(root)
}

pub fn run(args: TrainArgs) -> Result<()> {
    train(&args.launch()?).map(|_| ())
}
