//! `reid evaluate`: CMC / mAP / mINP of query features against gallery features,
//! with `metrics.json`, pictures and `report.html` in the report folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use reid_data::gallery::Gallery;
use reid_eval::report::{
    draw_cmc, draw_ranked, draw_training_curves, read_training_log, write_html, CurveSeries, RankedRow, ReportPage,
};
use reid_eval::{Evaluator, Metric, Metrics, RerankParams};

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
}

fn read(path: &Path) -> Result<Gallery> {
    Gallery::read(path).with_context(|| format!("reading features {}", path.display()))
}

/// The report folder for a gallery file at `artifacts/features/<run>/<split>.safetensors`.
pub fn default_report_dir(gallery: &Path) -> PathBuf {
    PathBuf::from("artifacts/reports").join(run_label(gallery))
}

/// The name of the folder holding a gallery file (the run it came from).
fn run_label(gallery: &Path) -> String {
    gallery
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "default".into())
}

/// Refuses a query/gallery pair extracted with different checkpoints.
fn check_same_checkpoint(q: &Gallery, g: &Gallery, qp: &Path, gp: &Path) -> Result<()> {
    if let (Some(a), Some(b)) = (&q.meta.checkpoint_sha256, &g.meta.checkpoint_sha256) {
        if a != b {
            bail!(
                "{} and {} were extracted with different checkpoints (sha256 {}… vs {}…); extract both with the same one",
                qp.display(),
                gp.display(),
                &a[..a.len().min(12)],
                &b[..b.len().min(12)]
            );
        }
    }
    Ok(())
}

/// What one evaluation produced, for printing and for the demo.
pub struct EvaluateOutcome {
    /// The first (or only) run's metrics, as in `metrics.json`.
    pub metrics: Metrics,
    /// Every run's label and metrics, in the order given.
    pub runs: Vec<(String, Metrics)>,
    pub report: PathBuf,
    pub metrics_file: PathBuf,
}

/// The headline figures, fractions: rank-1, rank-5, rank-10, mAP, mINP.
fn headline(m: &Metrics) -> [f64; 5] {
    [m.rank1, m.rank5, m.rank10, m.map, m.minp]
}

/// One CSV row per run: its label, rank-1/5/10, mAP and mINP (fractions).
fn comparison_csv(runs: &[(String, Metrics)]) -> String {
    let mut csv = String::from("run,rank1,rank5,rank10,mAP,mINP\n");
    for (label, m) in runs {
        let [r1, r5, r10, map, minp] = headline(m);
        csv.push_str(&format!("{label},{r1:.6},{r5:.6},{r10:.6},{map:.6},{minp:.6}\n"));
    }
    csv
}

fn ranked_rows(
    evaluator: &Evaluator,
    query: &Gallery,
    gallery: &Gallery,
    count: usize,
    data_root: Option<&Path>,
) -> Result<Vec<RankedRow>> {
    let (Some(qpaths), Some(gpaths)) = (&query.meta.paths, &gallery.meta.paths) else {
        bail!("the feature files record no image paths; --ranked 0 skips the picture");
    };
    let root = |g: &Gallery| -> PathBuf {
        data_root
            .map(Path::to_path_buf)
            .or_else(|| g.meta.data_root.as_ref().map(PathBuf::from))
            .unwrap_or_default()
    };
    let (qroot, groot) = (root(query), root(gallery));
    // Evenly spread queries, so the picture is not all one identity.
    let step = (query.len() / count.max(1)).max(1);
    Ok((0..query.len())
        .step_by(step)
        .take(count)
        .map(|q| RankedRow {
            query: qroot.join(&qpaths[q]),
            matches: evaluator
                .top_matches(q, 10)
                .into_iter()
                .map(|(g, _)| (groot.join(&gpaths[g]), gallery.pids[g] == query.pids[q]))
                .collect(),
        })
        .collect())
}

/// Evaluates as `args` ask and writes the report folder.
pub fn evaluate(args: &EvaluateArgs) -> Result<EvaluateOutcome> {
    let pairs: Vec<(PathBuf, PathBuf)> = match (args.query.len(), args.gallery.len()) {
        (q, g) if q == g => args.query.iter().cloned().zip(args.gallery.iter().cloned()).collect(),
        (1, _) => args
            .gallery
            .iter()
            .map(|g| (args.query[0].clone(), g.clone()))
            .collect(),
        (q, g) => bail!("{q} --query for {g} --gallery: give one query file, or one per gallery"),
    };
    let out = args.out.clone().unwrap_or_else(|| default_report_dir(&pairs[0].1));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut results: Vec<(String, Metrics)> = Vec::new();
    let mut pictures = Vec::new();
    for (i, (qp, gp)) in pairs.iter().enumerate() {
        let (query, gallery) = (read(qp)?, read(gp)?);
        check_same_checkpoint(&query, &gallery, qp, gp)?;
        let evaluator = Evaluator::new((&query).into(), (&gallery).into(), args.metric, args.rerank)
            .with_context(|| format!("evaluating {} against {}", qp.display(), gp.display()))?;
        let metrics = evaluator.run(args.max_rank)?.metrics;
        if i == 0 && args.ranked > 0 {
            let rows = ranked_rows(&evaluator, &query, &gallery, args.ranked, args.data_root.as_deref());
            match rows.and_then(|rows| Ok(draw_ranked(&out.join("ranked.png"), &rows)?)) {
                Ok(()) => pictures.push((
                    "ranked.png".to_string(),
                    "Top-10 matches: green frames show the query's identity, red frames another one".to_string(),
                )),
                Err(e) => tracing::warn!("no ranked.png: {e:#}"),
            }
        }
        results.push((run_label(gp), metrics));
    }
    let series: Vec<CurveSeries> = results
        .iter()
        .map(|(label, m)| CurveSeries {
            label: label.clone(),
            cmc: m.cmc.clone(),
            rank1: m.rank1,
            map: m.map,
        })
        .collect();
    draw_cmc(&out.join("cmc.png"), &series)?;
    pictures.insert(
        0,
        ("cmc.png".to_string(), "Cumulative matching characteristic".to_string()),
    );
    if let Some(run) = &args.run {
        let log = read_training_log(&run.join("metrics.csv"))?;
        draw_training_curves(&out.join("training.png"), &log)?;
        pictures.push((
            "training.png".to_string(),
            format!("Training curves of {}", run.display()),
        ));
    }
    let metrics = results[0].1.clone();
    let json = serde_json::to_string_pretty(&metrics)?;
    let metrics_file = out.join("metrics.json");
    reid_data::atomic::write_bytes_atomically(&metrics_file, json.as_bytes())?;
    let page = ReportPage {
        title: format!("reid evaluation: {}", results[0].0),
        runs: results.iter().map(|(l, m)| (l.clone(), m)).collect(),
        pictures,
    };
    let report = write_html(&out, &page)?;
    if results.len() > 1 {
        reid_data::atomic::write_bytes_atomically(&out.join("comparison.csv"), comparison_csv(&results).as_bytes())?;
    }
    Ok(EvaluateOutcome {
        metrics,
        runs: results,
        report,
        metrics_file,
    })
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let outcome = evaluate(&args)?;
    let m = &outcome.metrics;
    if args.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!(
        "{} queries ({} with a match) x {} gallery ({} junk removed), {}{}",
        m.num_queries,
        m.num_valid_queries,
        m.num_gallery,
        m.num_junk_removed,
        m.metric,
        if m.rerank.is_some() { " + re-ranking" } else { "" }
    );
    if outcome.runs.len() > 1 {
        let width = outcome.runs.iter().map(|(l, _)| l.len()).max().unwrap_or(3).max(3);
        println!("{:width$}  rank-1  rank-5  rank-10     mAP    mINP", "run");
        for (label, m) in &outcome.runs {
            let [r1, r5, r10, map, minp] = headline(m).map(|v| 100.0 * v);
            println!("{label:width$}  {r1:5.2}%  {r5:5.2}%  {r10:6.2}%  {map:5.2}%  {minp:5.2}%");
        }
        println!(
            "(also in {})",
            outcome.report.with_file_name("comparison.csv").display()
        );
    } else {
        let [r1, r5, r10, map, minp] = headline(m).map(|v| 100.0 * v);
        println!("rank-1 {r1:.2}%  rank-5 {r5:.2}%  rank-10 {r10:.2}%  mAP {map:.2}%  mINP {minp:.2}%");
    }
    println!(
        "wrote {} and {} in {:.2?}",
        outcome.metrics_file.display(),
        outcome.report.display(),
        started.elapsed()
    );
    Ok(())
}
