//! `reid demo`: the whole pipeline on a generated dataset, no download (see
//! `reid_pipeline::demo`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reid_model::DeviceSpec;
use reid_pipeline::demo::{run_demo, DemoHooks, DemoRequest, DemoSize, Stage};

use crate::commands::train;
use crate::progress;
use crate::stop::StopSignals;

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
    /// Synthetic dataset size: demo, or tiny (a few seconds of training, for tests).
    #[arg(long, default_value = "demo")]
    pub size: DemoSize,
    /// Extract features without averaging each image with its mirror image.
    #[arg(long)]
    pub no_flip: bool,
    /// cpu, cuda or cuda:N (training and extraction).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let request = DemoRequest {
        seed: args.seed,
        config: args.config,
        overrides: args.overrides,
        data: args.data,
        artifacts: args.artifacts,
        name: args.name,
        size: args.size,
        flip: !args.no_flip,
        device: args.device,
    };
    let epochs = request.train_config()?.schedule.epochs;
    let signals = StopSignals::install()?;
    let bar = progress::bar(request.size.dataset(request.seed).total_images() as u64, "rendering");
    let hooks = DemoHooks {
        stage: &mut |s: &Stage| println!("[{}] {}", s.name, s.note),
        train: &mut train::printer(epochs),
        note: &mut |n| println!("[train] {n}"),
        render: &|n| bar.set_position(n as u64),
        stop: signals.flag.clone(),
    };
    let outcome = match run_demo(&request, hooks) {
        Ok(outcome) => outcome,
        Err(e) => {
            return Err(match signals.received() {
                Some(stopped) => anyhow::Error::new(stopped).context(e.to_string()),
                None => e.into(),
            })
        }
    };
    bar.finish_and_clear();
    println!("\n{:<10} {:>9}  ", "stage", "time");
    for s in &outcome.stages {
        println!("{:<10} {:>8.1}s  {}", s.name, s.secs, s.note);
    }
    println!("{:<10} {:>8.1}s\n", "total", outcome.total_secs);
    let [r1, r5, r10, map, _] = outcome.evaluation.runs[0].1.headline().map(|v| 100.0 * v);
    println!("| rank-1 | rank-5 | rank-10 | mAP |\n| ---: | ---: | ---: | ---: |");
    println!("| {r1:.2}% | {r5:.2}% | {r10:.2}% | {map:.2}% |\n");
    println!("metrics: {}", outcome.evaluation.metrics_file.display());
    if let Some(report) = &outcome.evaluation.report {
        println!("report:  {}", report.display());
    }
    Ok(())
}
