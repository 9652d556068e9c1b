//! `reid evaluate`: CMC / mAP / mINP of query features against gallery features,
//! with `metrics.json`, pictures and `report.html` in the report folder.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use reid_eval::files::{evaluate_files, pair_files, run_label, EvaluateOutcome, EvaluateRequest};
use reid_eval::{Metric, RerankParams};

#[derive(Args)]
pub struct EvaluateArgs {
    /// Query features (a gallery file written by `reid extract`, or any safetensors
    /// file with features [N, D], pids [N], camids [N]). Repeat to compare runs.
    #[arg(long, required = true)]
    pub query: Vec<PathBuf>,
    /// Gallery features, same format; one per --query (or one --query for all).
    #[arg(long, required = true)]
    pub gallery: Vec<PathBuf>,
    /// Distance: cosine or euclidean (squared).
    #[arg(long, default_value = "cosine")]
    pub metric: Metric,
    /// k-reciprocal re-ranking, optionally with K1,K2,LAMBDA [default: 20,6,0.3].
    #[arg(long, num_args = 0..=1, default_missing_value = "20,6,0.3", value_name = "K1,K2,LAMBDA")]
    pub rerank: Option<RerankParams>,
    /// Longest rank of the CMC curve.
    #[arg(long, default_value_t = 50)]
    pub max_rank: usize,
    /// Report folder [default: artifacts/reports/<folder of the first gallery file>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the metrics as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Queries shown with their top-10 in ranked.png (0: no picture).
    #[arg(long, default_value_t = 8)]
    pub ranked: usize,
    /// Dataset root the gallery files' image paths are relative to
    /// [default: the root recorded in the gallery file].
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// A training run whose metrics.csv is drawn as training curves.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Write metrics.json only: no pictures, no report.html.
    #[arg(long)]
    pub no_report: bool,
}

impl EvaluateArgs {
    /// The evaluation these flags ask for.
    pub fn request(&self) -> Result<EvaluateRequest> {
        let pairs = pair_files(&self.query, &self.gallery).map_err(anyhow::Error::msg)?;
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("artifacts/reports").join(run_label(&pairs[0].1)));
        Ok(EvaluateRequest {
            pairs,
            metric: self.metric,
            rerank: self.rerank,
            max_rank: self.max_rank,
            out,
            ranked: self.ranked,
            data_root: self.data_root.clone(),
            run: self.run.clone(),
            pictures: !self.no_report,
        })
    }
}

/// Prints the table of one or several runs.
fn print_table(outcome: &EvaluateOutcome) {
    let m = &outcome.runs[0].1;
    println!(
        "{} queries ({} with a match) x {} gallery ({} junk removed), {}{}",
        m.num_queries,
        m.num_valid_queries,
        m.num_gallery,
        m.num_junk_removed,
        m.metric,
        if m.rerank.is_some() { " + re-ranking" } else { "" }
    );
    if outcome.runs.len() == 1 {
        let [r1, r5, r10, map, minp] = m.headline().map(|v| 100.0 * v);
        println!("rank-1 {r1:.2}%  rank-5 {r5:.2}%  rank-10 {r10:.2}%  mAP {map:.2}%  mINP {minp:.2}%");
        return;
    }
    let width = outcome.runs.iter().map(|(l, _)| l.len()).max().unwrap_or(3).max(3);
    println!("{:width$}  rank-1  rank-5  rank-10     mAP    mINP", "run");
    for (label, m) in &outcome.runs {
        let [r1, r5, r10, map, minp] = m.headline().map(|v| 100.0 * v);
        println!("{label:width$}  {r1:5.2}%  {r5:5.2}%  {r10:6.2}%  {map:5.2}%  {minp:5.2}%");
    }
    println!(
        "(also in {})",
        outcome.metrics_file.with_file_name("comparison.csv").display()
    );
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let outcome = evaluate_files(&args.request()?)?;
    if let Some(why) = &outcome.ranked_skipped {
        tracing::warn!("no ranked.png: {why} (--ranked 0 skips the picture)");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome.runs[0].1)?);
        return Ok(());
    }
    print_table(&outcome);
    let report = outcome
        .report
        .as_ref()
        .map(|r| format!(" and {}", r.display()))
        .unwrap_or_default();
    println!(
        "wrote {}{report} in {:.2?}",
        outcome.metrics_file.display(),
        started.elapsed()
    );
    Ok(())
}
