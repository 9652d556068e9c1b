//! CMC, mAP and mINP under the Market-1501 protocol, queries in parallel blocks.

use rayon::prelude::*;
use serde::Serialize;

use crate::distance::{distance_block, Metric, Prepared};
use crate::protocol::{rank_query, top_kept, QueryOutcome};
use crate::rerank::{RerankParams, Reranker};

/// Features with their identities and cameras, borrowed from a gallery file.
#[derive(Debug, Clone, Copy)]
pub struct FeatureSet<'a> {
    /// Row-major [n, dim].
    pub features: &'a [f32],
    pub dim: usize,
    pub pids: &'a [i64],
    pub camids: &'a [i64],
}

impl<'a> From<&'a reid_data::gallery::Gallery> for FeatureSet<'a> {
    fn from(g: &'a reid_data::gallery::Gallery) -> Self {
        FeatureSet {
            features: &g.features,
            dim: g.dim,
            pids: &g.pids,
            camids: &g.camids,
        }
    }
}

/// Why an evaluation cannot run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("query features are {query}-d but gallery features are {gallery}-d")]
    DimensionMismatch { query: usize, gallery: usize },
    #[error("the {0} set is empty")]
    Empty(&'static str),
    #[error("no query has a correct match in the gallery (other camera, same identity)")]
    NoValidQuery,
}

/// The summary written to `metrics.json`; all rates are fractions in [0, 1].
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub rank1: f64,
    pub rank5: f64,
    pub rank10: f64,
    /// CMC at ranks 1..=max_rank.
    pub cmc: Vec<f64>,
    #[serde(rename = "mAP")]
    pub map: f64,
    #[serde(rename = "mINP")]
    pub minp: f64,
    pub num_queries: usize,
    pub num_valid_queries: usize,
    /// Gallery entries ranked (junk removed).
    pub num_gallery: usize,
    pub num_junk_removed: usize,
    pub metric: Metric,
    pub rerank: Option<RerankParams>,
}

impl Metrics {
    /// The headline figures, fractions: rank-1, rank-5, rank-10, mAP, mINP.
    pub fn headline(&self) -> [f64; 5] {
        [self.rank1, self.rank5, self.rank10, self.map, self.minp]
    }
}

/// Metrics plus each query's outcome (`None` for queries without a valid match).
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub metrics: Metrics,
    pub outcomes: Vec<Option<QueryOutcome>>,
}

enum Distances {
    Plain { query: Prepared, gallery: Prepared },
    Reranked(Box<Reranker>),
}

/// Queries and a junk-free gallery, ready to be ranked.
pub struct Evaluator {
    distances: Distances,
    q_pids: Vec<i64>,
    q_cams: Vec<i64>,
    g_pids: Vec<i64>,
    g_cams: Vec<i64>,
    /// Gallery row in the original file of each ranked gallery row.
    gallery_rows: Vec<usize>,
    num_junk: usize,
    metric: Metric,
    rerank: Option<RerankParams>,
}

const QUERY_BLOCK: usize = 32;

impl Evaluator {
    /// Drops junk (pid -1) gallery rows and prepares distances; with `rerank` this
    /// builds the k-reciprocal encodings (the expensive part of re-ranking).
    pub fn new(
        query: FeatureSet,
        gallery: FeatureSet,
        metric: Metric,
        rerank: Option<RerankParams>,
    ) -> Result<Self, EvalError> {
        if query.dim != gallery.dim {
            return Err(EvalError::DimensionMismatch {
                query: query.dim,
                gallery: gallery.dim,
            });
        }
        if query.pids.is_empty() {
            return Err(EvalError::Empty("query"));
        }
        let gallery_rows: Vec<usize> = (0..gallery.pids.len()).filter(|&j| gallery.pids[j] != -1).collect();
        if gallery_rows.is_empty() {
            return Err(EvalError::Empty("gallery"));
        }
        let q = Prepared::new(metric, query.features, query.dim);
        let g = Prepared::from_rows(metric, gallery.features, gallery.dim, Some(&gallery_rows));
        let distances = match rerank {
            None => Distances::Plain { query: q, gallery: g },
            Some(p) => Distances::Reranked(Box::new(Reranker::new(&q, &g, p))),
        };
        Ok(Evaluator {
            distances,
            q_pids: query.pids.to_vec(),
            q_cams: query.camids.to_vec(),
            g_pids: gallery_rows.iter().map(|&j| gallery.pids[j]).collect(),
            g_cams: gallery_rows.iter().map(|&j| gallery.camids[j]).collect(),
            num_junk: gallery.pids.len() - gallery_rows.len(),
            gallery_rows,
            metric,
            rerank,
        })
    }

    fn fill(&self, q_start: usize, out: &mut [f32]) {
        match &self.distances {
            Distances::Plain { query, gallery } => distance_block(query, q_start, gallery, out),
            Distances::Reranked(r) => r.distance_block(q_start, out),
        }
    }

    /// Ranks every query and sums CMC (ranks 1..=max_rank), mAP and mINP.
    pub fn run(&self, max_rank: usize) -> Result<Evaluation, EvalError> {
        let (nq, ng) = (self.q_pids.len(), self.g_pids.len());
        let outcomes: Vec<Option<QueryOutcome>> = (0..nq.div_ceil(QUERY_BLOCK))
            .into_par_iter()
            .flat_map_iter(|b| {
                let start = b * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(nq - start);
                let mut d = vec![0.0f32; rows * ng];
                self.fill(start, &mut d);
                d.chunks_exact(ng)
                    .enumerate()
                    .map(|(r, row)| {
                        rank_query(
                            row,
                            self.q_pids[start + r],
                            self.q_cams[start + r],
                            &self.g_pids,
                            &self.g_cams,
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let valid: Vec<&QueryOutcome> = outcomes.iter().flatten().collect();
        if valid.is_empty() {
            return Err(EvalError::NoValidQuery);
        }
        let n = valid.len() as f64;
        let max_rank = max_rank.min(ng).max(1);
        let mut cmc = vec![0.0f64; max_rank];
        for o in &valid {
            for c in cmc.iter_mut().skip(o.first_hit()) {
                *c += 1.0;
            }
        }
        cmc.iter_mut().for_each(|c| *c /= n);
        let at = |k: usize| cmc[(k - 1).min(max_rank - 1)];
        let metrics = Metrics {
            rank1: at(1),
            rank5: at(5),
            rank10: at(10),
            map: valid.iter().map(|o| o.average_precision()).sum::<f64>() / n,
            minp: valid.iter().map(|o| o.inverse_negative_penalty()).sum::<f64>() / n,
            cmc,
            num_queries: nq,
            num_valid_queries: valid.len(),
            num_gallery: ng,
            num_junk_removed: self.num_junk,
            metric: self.metric,
            rerank: self.rerank,
        };
        Ok(Evaluation { metrics, outcomes })
    }

    /// The `top` best gallery matches of query `q` that the protocol keeps, as rows
    /// of the original gallery file, with their distances, best first.
    pub fn top_matches(&self, q: usize, top: usize) -> Vec<(usize, f32)> {
        let mut d = vec![0.0f32; self.g_pids.len()];
        self.fill(q, &mut d);
        top_kept(&d, self.q_pids[q], self.q_cams[q], &self.g_pids, &self.g_cams, top)
            .into_iter()
            .map(|j| (self.gallery_rows[j], d[j]))
            .collect()
    }
}

/// Evaluates in one call: [`Evaluator::new`] then [`Evaluator::run`].
pub fn evaluate(
    query: FeatureSet,
    gallery: FeatureSet,
    metric: Metric,
    rerank: Option<RerankParams>,
    max_rank: usize,
) -> Result<Evaluation, EvalError> {
    Evaluator::new(query, gallery, metric, rerank)?.run(max_rank)
}
