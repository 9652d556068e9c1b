//! `reid index`: a dataset folder to a parquet manifest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use reid_data::{DatasetKind, IndexOptions};

#[derive(Args)]
pub struct IndexArgs {
    /// Dataset layout: market1501, dukemtmc-reid, msmt17 (V1 or V2) or csv.
    #[arg(long)]
    pub dataset: DatasetKind,
    /// The dataset folder or its parent (for csv: the CSV file, or a folder holding dataset.csv).
    #[arg(long)]
    pub root: PathBuf,
    /// Output manifest [default: artifacts/manifests/<dataset>.parquet].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip and count unparsable names, cameras out of range and duplicates instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// MSMT17: add the images of list_val.txt to train (torchreid's combineall).
    #[arg(long)]
    pub merge_val: bool,
}

pub fn run(args: IndexArgs) -> Result<()> {
    let kind = args.dataset;
    if args.merge_val && kind != DatasetKind::Msmt17 {
        anyhow::bail!("--merge-val applies to --dataset msmt17 only (the other layouts have no val list)");
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("artifacts/manifests/{}.parquet", kind.as_str())));
    let root = std::path::absolute(&args.root).unwrap_or(args.root.clone());
    let started = std::time::Instant::now();
    let report = kind.layout().index(
        &root,
        &IndexOptions {
            skip_invalid: args.skip_invalid,
            merge_val: args.merge_val,
        },
    )?;
    let manifest = &report.manifest;
    println!("{} at {}", manifest.dataset, manifest.root.display());
    println!("{:<8} {:>8} {:>11} {:>8}", "split", "images", "identities", "cameras");
    for s in manifest.summary() {
        println!(
            "{:<8} {:>8} {:>11} {:>8}",
            s.split.as_str(),
            s.images,
            s.identities,
            s.cameras
        );
    }
    println!(
        "training classes: {}; skipped {} non-image files, {} invalid entries",
        manifest.num_classes(),
        report.skipped_non_images,
        report.skipped_invalid.len()
    );
    for message in report.skipped_invalid.iter().take(10) {
        tracing::warn!("skipped {message}");
    }
    if report.skipped_invalid.len() > 10 {
        tracing::warn!("... and {} more", report.skipped_invalid.len() - 10);
    }
    manifest
        .write_parquet(&out)
        .with_context(|| format!("writing the manifest {}", out.display()))?;
    println!("wrote {} in {:.2?}", out.display(), started.elapsed());
    Ok(())
}
