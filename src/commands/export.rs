//! `reid export`: a checkpoint as an ONNX file for trackers and inference runtimes.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use reid_export::{export, ExportOptions};
use reid_train::RunPaths;

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint written by `reid train`.
    #[arg(long, conflicts_with = "run")]
    pub checkpoint: Option<PathBuf>,
    /// Run folder: exports checkpoints/best (else last).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// The ONNX file to write (atomically; nothing is written on failure).
    #[arg(long)]
    pub out: PathBuf,
    /// ONNX opset of the graph (13 to 21).
    #[arg(long, default_value_t = 17)]
    pub opset: i64,
    /// Output the raw features (default: L2-normalised, as `reid extract`).
    #[arg(long)]
    pub no_normalize: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let checkpoint = match (&args.checkpoint, &args.run) {
        (Some(c), _) => c.clone(),
        (None, Some(run)) => RunPaths::new(run).chosen_checkpoint(),
        (None, None) => bail!("pass --checkpoint FILE or --run RUN"),
    };
    if !checkpoint.is_file() {
        bail!("{}: no checkpoint; train first (reid train)", checkpoint.display());
    }
    let options = ExportOptions {
        opset: args.opset,
        normalize: !args.no_normalize,
    };
    let done = export(&checkpoint, &options, &args.out)?;
    let (h, w) = (done.info.input.height, done.info.input.width);
    println!(
        "{}: {} from {}, images [N, 3, {h}, {w}] -> features [N, {}]{}, opset {}, {} nodes, {:.1} MB",
        done.path.display(),
        done.info.model.arch,
        checkpoint.display(),
        done.feature_dim,
        if options.normalize { " (L2-normalised)" } else { "" },
        options.opset,
        done.nodes,
        done.bytes as f64 / 1e6
    );
    Ok(())
}
