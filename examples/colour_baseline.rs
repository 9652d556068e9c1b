//! A colour-histogram baseline: what a network must beat on a dataset.
//!
//! Each image's central half (columns w/4..3w/4, where the person stands) becomes
//! 4 horizontal stripes x 3 channels x 16 bins, each stripe's histogram
//! L1-normalised and square-rooted (Hellinger), compared by cosine distance under
//! the usual protocol.
//!
//! `cargo run --release --example colour_baseline -- artifacts/manifests/market1501.parquet`

use anyhow::{Context, Result};
use rayon::prelude::*;
use reid_data::{Manifest, Split};
use reid_eval::{evaluate, FeatureSet, Metric};

const STRIPES: usize = 4;
const BINS: usize = 16;
const DIM: usize = STRIPES * 3 * BINS;

fn histogram(path: &std::path::Path) -> Result<Vec<f32>> {
    let img = image::open(path)
        .with_context(|| format!("decoding {}", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let mut hist = vec![0f32; DIM];
    for (x, y, p) in img.enumerate_pixels() {
        if x < w / 4 || x >= 3 * w / 4 {
            continue;
        }
        let stripe = (y as usize * STRIPES / h as usize).min(STRIPES - 1);
        for c in 0..3 {
            hist[(stripe * 3 + c) * BINS + p[c] as usize * BINS / 256] += 1.0;
        }
    }
    let per_stripe = (w / 2 * h) as f32 / STRIPES as f32 * 3.0;
    hist.iter_mut().for_each(|v| *v = (*v / per_stripe).sqrt());
    Ok(hist)
}

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "artifacts/manifests/market1501.parquet".into());
    let manifest = Manifest::read_parquet(path.as_ref())?;
    let set = |split: Split| -> Result<(Vec<f32>, Vec<i64>, Vec<i64>)> {
        let records: Vec<_> = manifest.split(split).collect();
        let feats: Vec<Vec<f32>> = records
            .par_iter()
            .map(|r| histogram(&manifest.image_path(r)))
            .collect::<Result<_>>()?;
        Ok((
            feats.concat(),
            records.iter().map(|r| r.pid).collect(),
            records.iter().map(|r| r.camid).collect(),
        ))
    };
    let (qf, qp, qc) = set(Split::Query)?;
    let (gf, gp, gc) = set(Split::Gallery)?;
    let q = FeatureSet {
        features: &qf,
        dim: DIM,
        pids: &qp,
        camids: &qc,
    };
    let g = FeatureSet {
        features: &gf,
        dim: DIM,
        pids: &gp,
        camids: &gc,
    };
    let m = evaluate(q, g, Metric::Cosine, None, 50)?.metrics;
    println!(
        "colour histogram baseline on {path}: rank-1 {:.1}%  rank-5 {:.1}%  mAP {:.1}%  ({} queries, {} gallery)",
        100.0 * m.rank1,
        100.0 * m.rank5,
        100.0 * m.map,
        m.num_valid_queries,
        m.num_gallery
    );
    Ok(())
}
