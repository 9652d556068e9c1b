//! Evaluating gallery files into a report folder: what `reid evaluate` does. One
//! or more query/gallery pairs are read, checked for the same checkpoint, ranked,
//! and written up as `metrics.json`, `cmc.png`, `ranked.png`, `training.png`,
//! `comparison.csv` (for several runs) and `report.html`.

use std::path::{Path, PathBuf};

use reid_data::gallery::Gallery;

use crate::evaluate::Timings;
use crate::report::{
    draw_cmc, draw_ranked, draw_training_curves, read_training_log, write_html, CurveSeries, RankedRow, ReportError,
    ReportPage,
};
use crate::{EvalError, Evaluator, Metric, Metrics, RerankParams};

/// What to evaluate and where to write the report.
#[derive(Debug, Clone)]
pub struct EvaluateRequest {
    /// (query file, gallery file) per run, in order.
    pub pairs: Vec<(PathBuf, PathBuf)>,
    pub metric: Metric,
    pub rerank: Option<RerankParams>,
    pub max_rank: usize,
    /// The report folder.
    pub out: PathBuf,
    /// Queries shown in ranked.png (0: no picture).
    pub ranked: usize,
    /// Root of the galleries' image paths (else the root they record).
    pub data_root: Option<PathBuf>,
    /// A training run whose `metrics.csv` is drawn as training curves.
    pub run: Option<PathBuf>,
    /// Draw the pictures and write `report.html` (else `metrics.json` only).
    pub pictures: bool,
}

/// What one evaluation produced.
pub struct EvaluateOutcome {
    /// Every run's label and metrics, in the order given; the first is the one
    /// `metrics.json` holds.
    pub runs: Vec<(String, Metrics)>,
    /// `report.html`, when pictures were asked for.
    pub report: Option<PathBuf>,
    pub metrics_file: PathBuf,
    /// Why `ranked.png` is missing, when it is.
    pub ranked_skipped: Option<String>,
    /// Where each run's evaluation spent its time.
    pub timings: Vec<Timings>,
}

/// Why an evaluation of files failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    Data(#[from] reid_data::DataError),
    #[error(transparent)]
    File(#[from] reid_io::IoError),
    #[error("evaluating {query} against {gallery}: {source}")]
    Eval {
        query: PathBuf,
        gallery: PathBuf,
        source: EvalError,
    },
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Pairs `--query` and `--gallery` files: one each per run, or one query for all.
pub fn pair_files(query: &[PathBuf], gallery: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    match (query.len(), gallery.len()) {
        (q, g) if q == g => Ok(query.iter().cloned().zip(gallery.iter().cloned()).collect()),
        (1, _) => Ok(gallery.iter().map(|g| (query[0].clone(), g.clone())).collect()),
        (q, g) => Err(format!(
            "{q} --query for {g} --gallery: give one query file, or one per gallery"
        )),
    }
}

/// The name of the folder holding a gallery file (the run it came from).
pub fn run_label(gallery: &Path) -> String {
    gallery
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "default".into())
}

/// One CSV row per run: its label, rank-1/5/10, mAP and mINP (fractions).
pub fn comparison_csv(runs: &[(String, Metrics)]) -> String {
    let mut csv = String::from("run,rank1,rank5,rank10,mAP,mINP\n");
    for (label, m) in runs {
        let [r1, r5, r10, map, minp] = m.headline();
        csv.push_str(&format!("{label},{r1:.6},{r5:.6},{r10:.6},{map:.6},{minp:.6}\n"));
    }
    csv
}

/// The rows of ranked.png: `count` queries spread over the set, with their top 10.
fn ranked_rows(
    evaluator: &Evaluator,
    query: &Gallery,
    gallery: &Gallery,
    count: usize,
    data_root: Option<&Path>,
) -> Result<Vec<RankedRow>, String> {
    let (Some(qpaths), Some(gpaths)) = (&query.meta.paths, &gallery.meta.paths) else {
        return Err("the feature files record no image paths".into());
    };
    let root = |g: &Gallery| -> PathBuf {
        data_root
            .map(Path::to_path_buf)
            .or_else(|| g.meta.data_root.as_ref().map(PathBuf::from))
            .unwrap_or_default()
    };
    let (qroot, groot) = (root(query), root(gallery));
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

/// Reads one query/gallery pair and checks that one checkpoint made both.
fn read_pair(qp: &Path, gp: &Path) -> Result<(Gallery, Gallery), FilesError> {
    let (query, gallery) = (Gallery::read(qp)?, Gallery::read(gp)?);
    query.check_checkpoint(qp, gallery.meta.checkpoint_sha256.as_deref(), gp)?;
    Ok((query, gallery))
}

/// Evaluates every pair of `request` and writes the report folder.
pub fn evaluate_files(request: &EvaluateRequest) -> Result<EvaluateOutcome, FilesError> {
    let out = &request.out;
    let mut runs: Vec<(String, Metrics)> = Vec::new();
    let mut pictures = vec![("cmc.png".to_string(), "Cumulative matching characteristic".to_string())];
    let (mut ranked_skipped, mut timings) = (None, Vec::new());
    for (i, (qp, gp)) in request.pairs.iter().enumerate() {
        let (query, gallery) = read_pair(qp, gp)?;
        let wrap = |source| FilesError::Eval {
            query: qp.clone(),
            gallery: gp.clone(),
            source,
        };
        let evaluator =
            Evaluator::new((&query).into(), (&gallery).into(), request.metric, request.rerank).map_err(wrap)?;
        let metrics = evaluator.run(request.max_rank).map_err(wrap)?;
        timings.push(metrics.timings);
        if i == 0 && request.ranked > 0 && request.pictures {
            let rows = ranked_rows(
                &evaluator,
                &query,
                &gallery,
                request.ranked,
                request.data_root.as_deref(),
            );
            match rows.and_then(|rows| draw_ranked(&out.join("ranked.png"), &rows).map_err(|e| e.to_string())) {
                Ok(()) => pictures.push((
                    "ranked.png".into(),
                    "Top-10 matches: green frames show the query's identity, red frames another one".into(),
                )),
                Err(why) => ranked_skipped = Some(why),
            }
        }
        runs.push((run_label(gp), metrics.metrics));
    }
    if !request.pictures {
        return write_outputs(out, &runs, None, ranked_skipped, timings);
    }
    let series: Vec<CurveSeries> = runs
        .iter()
        .map(|(label, m)| CurveSeries {
            label: label.clone(),
            cmc: m.cmc.clone(),
            rank1: m.rank1,
            map: m.map,
        })
        .collect();
    draw_cmc(&out.join("cmc.png"), &series)?;
    if let Some(run) = &request.run {
        draw_training_curves(&out.join("training.png"), &read_training_log(&run.join("metrics.csv"))?)?;
        pictures.push(("training.png".into(), format!("Training curves of {}", run.display())));
    }
    write_outputs(out, &runs, Some(pictures), ranked_skipped, timings)
}

/// `metrics.json` (the first run), `comparison.csv` (several runs) and, with
/// `pictures`, the page.
fn write_outputs(
    out: &Path,
    runs: &[(String, Metrics)],
    pictures: Option<Vec<(String, String)>>,
    ranked_skipped: Option<String>,
    timings: Vec<Timings>,
) -> Result<EvaluateOutcome, FilesError> {
    let metrics_file = out.join("metrics.json");
    let json = serde_json::to_string_pretty(&runs[0].1).expect("metrics serialise");
    reid_io::atomic::write_bytes_atomically(&metrics_file, json.as_bytes())?;
    if runs.len() > 1 {
        reid_io::atomic::write_bytes_atomically(&out.join("comparison.csv"), comparison_csv(runs).as_bytes())?;
    }
    let report = match pictures {
        None => None,
        Some(pictures) => {
            let page = ReportPage {
                title: format!("reid evaluation: {}", runs[0].0),
                runs: runs.iter().map(|(l, m)| (l.clone(), m)).collect(),
                pictures,
            };
            Some(write_html(out, &page)?)
        }
    };
    Ok(EvaluateOutcome {
        runs: runs.to_vec(),
        report,
        metrics_file,
        ranked_skipped,
        timings,
    })
}
