//! `reid extract`: features of a split into a cached gallery file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use reid_data::Split;
use reid_extract::{extract_split, ExtractOptions, Extracted, SplitJob};
use reid_model::DeviceSpec;
use reid_train::TrainConfig;

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
    pub split: Vec<String>,
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
    /// Output folder [default: artifacts/features/<run>]; files are <split>.safetensors.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Recompute even when a matching gallery exists.
    #[arg(long)]
    pub force: bool,
}

/// Extracts as `args` ask; returns the gallery files written or reused.
pub fn extract(args: &ExtractArgs) -> Result<Vec<PathBuf>> {
    let (checkpoint, run_name, run_manifest) = match (&args.run, &args.checkpoint) {
        (Some(run), _) => {
            let config = TrainConfig::load(Some(&run.join("config.toml")), &[])
                .with_context(|| format!("reading the run's config in {}", run.display()))?;
            let name = run
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                reid_train::RunPaths::new(run).chosen_checkpoint(),
                name,
                config.data.manifest,
            )
        }
        (None, Some(c)) => {
            let name = c
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (c.clone(), name, None)
        }
        (None, None) => bail!("pass --run RUN or --checkpoint FILE"),
    };
    if !checkpoint.is_file() {
        bail!("{}: no checkpoint; train first (reid train)", checkpoint.display());
    }
    let Some(manifest) = args.manifest.clone().or(run_manifest) else {
        bail!("no manifest: pass --manifest (made by `reid index`)");
    };
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("artifacts/features").join(&run_name));
    let device = args.device.open()?;
    let mut written = Vec::new();
    for split in &args.split {
        let split: Split = split.parse().map_err(anyhow::Error::msg)?;
        let job = SplitJob {
            checkpoint: checkpoint.clone(),
            manifest: manifest.clone(),
            split,
            options: ExtractOptions {
                batch_size: args.batch,
                flip: args.flip,
                normalize: !args.no_normalize,
            },
            out: out_dir.join(format!("{split}.safetensors")),
            force: args.force,
        };
        let started = std::time::Instant::now();
        let bar = progress::bar(0, split.as_str());
        let outcome = extract_split(&job, &device, &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        match outcome {
            Extracted::Cached => println!("{}: cached (same checkpoint, manifest and settings)", job.out.display()),
            Extracted::Written { images } => {
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "{}: {images} images in {secs:.1}s ({:.0} img/s)",
                    job.out.display(),
                    images as f64 / secs
                );
            }
        }
        written.push(job.out);
    }
    Ok(written)
}

pub fn run(args: ExtractArgs) -> Result<()> {
    extract(&args).map(|_| ())
}
