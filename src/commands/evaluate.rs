//! `reid evaluate`: CMC / mAP / mINP of query features against gallery features.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use reid_data::gallery::Gallery;
use reid_eval::{Evaluator, Metric, RerankParams};

#[derive(Args)]
pub struct EvaluateArgs {
    /// Query features (a gallery file written by `reid extract`, or any safetensors
    /// file with features [N, D], pids [N], camids [N]).
    #[arg(long)]
    pub query: PathBuf,
    /// Gallery features, same format.
    #[arg(long)]
    pub gallery: PathBuf,
    /// Distance: cosine or euclidean (squared).
    #[arg(long, default_value = "cosine")]
    pub metric: Metric,
    /// k-reciprocal re-ranking, optionally with K1,K2,LAMBDA [default: 20,6,0.3].
    #[arg(long, num_args = 0..=1, default_missing_value = "20,6,0.3", value_name = "K1,K2,LAMBDA")]
    pub rerank: Option<RerankParams>,
    /// Longest rank of the CMC curve.
    #[arg(long, default_value_t = 50)]
    pub max_rank: usize,
    /// Report folder [default: artifacts/reports/<folder of the gallery file>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the metrics as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn read(path: &Path) -> Result<Gallery> {
    Gallery::read(path).with_context(|| format!("reading features {}", path.display()))
}

/// The report folder for a gallery file at `artifacts/features/<run>/<split>.safetensors`.
pub fn default_report_dir(gallery: &Path) -> PathBuf {
    let run = gallery
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "default".into());
    PathBuf::from("artifacts/reports").join(run)
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let query = read(&args.query)?;
    let gallery = read(&args.gallery)?;
    if let (Some(a), Some(b)) = (&query.meta.checkpoint_sha256, &gallery.meta.checkpoint_sha256) {
        if a != b {
            bail!(
                "{} and {} were extracted with different checkpoints (sha256 {}… vs {}…); extract both with the same one",
                args.query.display(),
                args.gallery.display(),
                &a[..a.len().min(12)],
                &b[..b.len().min(12)]
            );
        }
    }
    let evaluator = Evaluator::new((&query).into(), (&gallery).into(), args.metric, args.rerank)?;
    let evaluation = evaluator.run(args.max_rank)?;
    let m = &evaluation.metrics;
    let out = args.out.unwrap_or_else(|| default_report_dir(&args.gallery));
    let json = serde_json::to_string_pretty(m)?;
    reid_data::atomic::write_bytes_atomically(&out.join("metrics.json"), json.as_bytes())?;
    if args.json {
        println!("{json}");
    } else {
        println!(
            "{} queries ({} with a match) x {} gallery ({} junk removed), {}{}",
            m.num_queries,
            m.num_valid_queries,
            m.num_gallery,
            m.num_junk_removed,
            m.metric,
            if m.rerank.is_some() { " + re-ranking" } else { "" }
        );
        println!(
            "rank-1 {:.2}%  rank-5 {:.2}%  rank-10 {:.2}%  mAP {:.2}%  mINP {:.2}%",
            100.0 * m.rank1,
            100.0 * m.rank5,
            100.0 * m.rank10,
            100.0 * m.map,
            100.0 * m.minp
        );
        println!(
            "wrote {} in {:.2?}",
            out.join("metrics.json").display(),
            started.elapsed()
        );
    }
    Ok(())
}
