//! CMC, mAP and mINP under the Market-1501 protocol, queries in parallel blocks.

use rayon::prelude::*;
use serde::Serialize;

use std::time::Instant;

use crate::distance::{query_block, row_norms, Features, Metric};
use crate::protocol::{rank_query, top_kept, QueryOutcome, Scores};
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
    pub timings: Timings,
}

/// Queries and a gallery (junk included: the protocol skips it), ready to be
/// ranked. Borrows the features: nothing the size of the gallery is copied.
pub struct Evaluator<'a> {
    query: FeatureSet<'a>,
    gallery: FeatureSet<'a>,
    q_norms: Vec<f64>,
    g_norms: Vec<f64>,
    rerank: Option<Box<Reranker>>,
    num_junk: usize,
    metric: Metric,
    rerank_params: Option<RerankParams>,
}

/// Seconds spent in the parts of [`Evaluator::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// The GEMMs and the forming of distances.
    pub distances_s: f64,
    /// Ranking and the metrics.
    pub ranking_s: f64,
}

impl<'a> Evaluator<'a> {
    /// Checks the sets and computes the norms; with `rerank` this builds the
    /// k-reciprocal encodings (the expensive part of re-ranking).
    pub fn new(
        query: FeatureSet<'a>,
        gallery: FeatureSet<'a>,
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
        let num_junk = gallery.pids.iter().filter(|&&p| p == -1).count();
        if num_junk == gallery.pids.len() {
            return Err(EvalError::Empty("gallery"));
        }
        let q_norms = row_norms(query.features, query.dim);
        let g_norms = row_norms(gallery.features, gallery.dim);
        let mut this = Evaluator {
            query,
            gallery,
            q_norms,
            g_norms,
            rerank: None,
            num_junk,
            metric,
            rerank_params: rerank,
        };
        if let Some(p) = rerank {
            let r = Reranker::new(&this.q_features(), &this.g_features(), &this.kept(), metric, p);
            this.rerank = Some(Box::new(r));
        }
        Ok(this)
    }

    fn q_features(&self) -> Features<'_> {
        Features {
            rows: self.query.features,
            dim: self.query.dim,
            norms: &self.q_norms,
        }
    }

    fn g_features(&self) -> Features<'_> {
        Features {
            rows: self.gallery.features,
            dim: self.gallery.dim,
            norms: &self.g_norms,
        }
    }

    /// The gallery rows that are not junk.
    fn kept(&self) -> Vec<usize> {
        (0..self.gallery.pids.len())
            .filter(|&j| self.gallery.pids[j] != -1)
            .collect()
    }

    /// Distances of queries `start..` to every gallery row into `out`.
    fn fill(&self, start: usize, out: &mut [f32]) {
        match &self.rerank {
            None => self.q_features().distances(self.metric, start, &self.g_features(), out),
            Some(r) => r.distance_block(start, out),
        }
    }

    /// Ranks the queries of one block whose distances are in `d`.
    fn rank_block(&self, start: usize, d: &[f32]) -> Vec<Option<QueryOutcome>> {
        let (q, g, metric) = (self.q_features(), self.g_features(), self.metric);
        let ng = g.len();
        let exact_possible = self.rerank.is_none();
        d.par_chunks_exact(ng)
            .enumerate()
            .map(|(r, row)| {
                let i = start + r;
                let exact = |j: usize| q.exact(metric, i, &g, j);
                let tolerance = |j: usize| q.tolerance(metric, i, &g, j);
                let scores = match exact_possible {
                    true => Scores {
                        dist: row,
                        exact: &exact,
                        tolerance: &tolerance,
                    },
                    false => Scores::exact_as_given(row),
                };
                rank_query(
                    &scores,
                    self.query.pids[i],
                    self.query.camids[i],
                    self.gallery.pids,
                    self.gallery.camids,
                )
            })
            .collect()
    }

    /// Ranks every query and sums CMC (ranks 1..=max_rank), mAP and mINP.
    pub fn run(&self, max_rank: usize) -> Result<Evaluation, EvalError> {
        let (nq, ng) = (self.query.pids.len(), self.gallery.pids.len());
        let block = query_block(ng);
        let mut timings = Timings::default();
        let mut outcomes = Vec::with_capacity(nq);
        let mut d = vec![0.0f32; block.min(nq) * ng];
        for start in (0..nq).step_by(block) {
            let rows = block.min(nq - start);
            let t = Instant::now();
            self.fill(start, &mut d[..rows * ng]);
            timings.distances_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            outcomes.extend(self.rank_block(start, &d[..rows * ng]));
            timings.ranking_s += t.elapsed().as_secs_f64();
        }
        let metrics = self.summarise(&outcomes, max_rank)?;
        Ok(Evaluation {
            metrics,
            outcomes,
            timings,
        })
    }

    /// CMC, mAP and mINP over the queries with a valid match.
    fn summarise(&self, outcomes: &[Option<QueryOutcome>], max_rank: usize) -> Result<Metrics, EvalError> {
        let valid: Vec<&QueryOutcome> = outcomes.iter().flatten().collect();
        if valid.is_empty() {
            return Err(EvalError::NoValidQuery);
        }
        let n = valid.len() as f64;
        let ng = self.gallery.pids.len() - self.num_junk;
        let max_rank = max_rank.min(ng).max(1);
        let mut cmc = vec![0.0f64; max_rank];
        for o in &valid {
            for c in cmc.iter_mut().skip(o.first_hit()) {
                *c += 1.0;
            }
        }
        cmc.iter_mut().for_each(|c| *c /= n);
        let at = |k: usize| cmc[(k - 1).min(max_rank - 1)];
        Ok(Metrics {
            rank1: at(1),
            rank5: at(5),
            rank10: at(10),
            map: valid.iter().map(|o| o.average_precision()).sum::<f64>() / n,
            minp: valid.iter().map(|o| o.inverse_negative_penalty()).sum::<f64>() / n,
            cmc,
            num_queries: outcomes.len(),
            num_valid_queries: valid.len(),
            num_gallery: ng,
            num_junk_removed: self.num_junk,
            metric: self.metric,
            rerank: self.rerank_params,
        })
    }

    /// The `top` best gallery matches of query `q` that the protocol keeps, as rows
    /// of the gallery file, with their distances, best first.
    pub fn top_matches(&self, q: usize, top: usize) -> Vec<(usize, f32)> {
        let mut d = vec![0.0f32; self.gallery.pids.len()];
        self.fill(q, &mut d);
        top_kept(
            &d,
            self.query.pids[q],
            self.query.camids[q],
            self.gallery.pids,
            self.gallery.camids,
            top,
        )
        .into_iter()
        .map(|j| (j, d[j]))
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
