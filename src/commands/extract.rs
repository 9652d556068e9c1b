//! `reid extract`: features of a split into a cached gallery file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reid_data::Split;
use reid_extract::{extract_split, ExtractOptions, Extracted};
use reid_model::{DeviceSpec, Precision};
use reid_pipeline::extract::ExtractRequest;

use crate::progress;

#[derive(Args)]
pub struct ExtractArgs {
    /// Run folder: takes checkpoints/best (else last) and the run's manifest.
    #[arg(long, conflicts_with = "checkpoint")]
    pub run: Option<PathBuf>,
    /// A checkpoint written by `reid train`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Manifest (default: the run's).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Splits to extract.
    #[arg(long, value_delimiter = ',', default_value = "query,gallery")]
    pub split: Vec<Split>,
    /// Average each image's features with its mirror image's.
    #[arg(long)]
    pub flip: bool,
    /// Keep raw features (default: L2-normalised).
    #[arg(long)]
    pub no_normalize: bool,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32, or bf16 (mixed precision: convolutions and matrix products in bf16;
    /// the features are f32 either way, and the gallery records which).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Output folder [default: artifacts/features/<run>]; files are <split>.safetensors.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Recompute even when a matching gallery exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ExtractArgs) -> Result<()> {
    let jobs = ExtractRequest {
        run: args.run,
        checkpoint: args.checkpoint,
        manifest: args.manifest,
        splits: args.split,
        options: ExtractOptions {
            batch_size: args.batch.max(1),
            flip: args.flip,
            normalize: !args.no_normalize,
            precision: args.precision,
        },
        out: args.out,
        force: args.force,
    }
    .jobs()?;
    let device = args.device.open()?;
    for job in &jobs {
        let started = std::time::Instant::now();
        let bar = progress::bar(0, job.split.as_str());
        let outcome = extract_split(job, &device, &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        match outcome {
            Extracted::Cached => println!("{}: cached (same checkpoint, manifest and settings)", job.out.display()),
            Extracted::Written { images } => {
                let secs = started.elapsed().as_secs_f64();
                let rate = images as f64 / secs;
                println!("{}: {images} images in {secs:.1}s ({rate:.0} img/s)", job.out.display());
            }
        }
    }
    Ok(())
}
