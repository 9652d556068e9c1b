//! CMC, mAP and mINP under the Market-1501 protocol, queries in parallel blocks.

use rayon::prelude::*;
use serde::Serialize;

use std::time::Instant;

use crate::distance::{query_block, row_norms, DotKernel, Features, Metric};
use crate::protocol::{rank_query, top_kept, QueryOutcome, QueryRanker, Scores};
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
    /// 1 / |g| of each gallery row (cosine distances by multiplication).
    g_inverse_norms: Vec<f64>,
    /// The same in f32, for the quick test of which entries can rank before a
    /// query's last match.
    g_inverse_norms_f32: Vec<f32>,
    /// How the exact ranking forms dot products (f32 under re-ranking, which
    /// does not use them).
    dots: DotKernel,
    rerank: Option<Box<Reranker>>,
    num_junk: usize,
    metric: Metric,
    rerank_params: Option<RerankParams>,
}

/// Queries per block of the exact ranking (their rankers are kept while the
/// gallery streams past in panels; the gallery is packed once per block): twice
/// as many on AMX.
const EXACT_QUERY_BLOCK: usize = 2048;

/// Gallery rows per panel of the exact ranking (the tile of dot products is 16
/// MiB; 8192 rows measured 15% slower at Market size, no faster at MSMT17 size).
const GALLERY_PANEL: usize = 2048;

/// A query's correct matches: (exact distance, gallery row).
type Positives = Vec<(f64, usize)>;

/// Seconds spent in the parts of [`Evaluator::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// The GEMMs and the forming of distances.
    pub distances_s: f64,
    /// Ranking and the metrics.
    pub ranking_s: f64,
    /// Whether the exact ranking's dot products ran on AMX tiles.
    pub amx: bool,
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
        let g_inverse_norms: Vec<f64> = g_norms.iter().map(|n| 1.0 / n.max(1e-300)).collect();
        let g_inverse_norms_f32 = g_inverse_norms.iter().map(|&n| n as f32).collect();
        let mut this = Evaluator {
            query,
            gallery,
            q_norms,
            g_norms,
            g_inverse_norms,
            g_inverse_norms_f32,
            dots: DotKernel::F32,
            rerank: None,
            num_junk,
            metric,
            rerank_params: rerank,
        };
        match rerank {
            None => this.dots = DotKernel::for_features(&this.q_features(), &this.g_features()),
            Some(p) => {
                let r = Reranker::new(&this.q_features(), &this.g_features(), &this.kept(), metric, p);
                this.rerank = Some(Box::new(r));
            }
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

    /// Ranks re-ranked distances, block of queries by block (re-ranking's own
    /// distances are not rescored: they are not distances of the features).
    fn run_reranked(&self, timings: &mut Timings) -> Vec<Option<QueryOutcome>> {
        let (nq, ng) = (self.query.pids.len(), self.gallery.pids.len());
        let block = query_block(ng);
        let mut outcomes = Vec::with_capacity(nq);
        let mut d = vec![0.0f32; block.min(nq) * ng];
        for start in (0..nq).step_by(block) {
            let rows = block.min(nq - start);
            let t = Instant::now();
            self.fill(start, &mut d[..rows * ng]);
            timings.distances_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            outcomes.par_extend(d[..rows * ng].par_chunks_exact(ng).enumerate().map(|(r, row)| {
                let (pid, cam) = (self.query.pids[start + r], self.query.camids[start + r]);
                rank_query(
                    &Scores::exact_as_given(row),
                    pid,
                    cam,
                    self.gallery.pids,
                    self.gallery.camids,
                )
            }));
            timings.ranking_s += t.elapsed().as_secs_f64();
        }
        outcomes
    }

    /// The exact distances of every query to its correct matches: per identity,
    /// each gallery row of it is read once for all the queries of the identity.
    fn positive_distances(&self) -> Vec<Positives> {
        let (q, g, metric) = (self.q_features(), self.g_features(), self.metric);
        let mut rows_of: std::collections::HashMap<i64, Vec<usize>> = Default::default();
        for (j, &pid) in self.gallery.pids.iter().enumerate().filter(|(_, &p)| p != -1) {
            rows_of.entry(pid).or_default().push(j);
        }
        let mut queries_of: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for (i, &pid) in self.query.pids.iter().enumerate() {
            queries_of.entry(pid).or_default().push(i);
        }
        let groups: Vec<(&i64, &Vec<usize>)> = queries_of.iter().collect();
        let per_group: Vec<Vec<(usize, Positives)>> = groups
            .par_iter()
            .map(|(pid, queries)| {
                let mut found: Vec<Positives> = vec![Vec::new(); queries.len()];
                for &j in rows_of.get(pid).map_or(&[][..], |v| &v[..]) {
                    for (k, &i) in queries.iter().enumerate() {
                        if self.gallery.camids[j] != self.query.camids[i] {
                            found[k].push((q.exact(metric, i, &g, j), j));
                        }
                    }
                }
                queries.iter().copied().zip(found).collect()
            })
            .collect();
        let mut out = vec![Vec::new(); self.query.pids.len()];
        for (i, positives) in per_group.into_iter().flatten() {
            out[i] = positives;
        }
        out
    }

    /// Ranks every query against the gallery panel by panel: the dot products of a
    /// block of queries with a panel of the gallery (one GEMM per slice of the
    /// dimensions), then every query of the block places the panel's entries.
    fn run_exact(&self, timings: &mut Timings) -> Vec<Option<QueryOutcome>> {
        let (q, g, metric) = (self.q_features(), self.g_features(), self.metric);
        let (nq, ng) = (self.query.pids.len(), self.gallery.pids.len());
        let g_max = g.norms.iter().copied().fold(0.0, f64::max);
        let mut tile = Vec::new();
        let mut outcomes = Vec::with_capacity(nq);
        let t = Instant::now();
        let mut positives = self.positive_distances();
        timings.ranking_s += t.elapsed().as_secs_f64();
        // On AMX each panel is split and packed once per block: larger blocks.
        let block_rows = match self.dots {
            DotKernel::F32 => EXACT_QUERY_BLOCK,
            DotKernel::Amx(_) => 2 * EXACT_QUERY_BLOCK,
        };
        for start in (0..nq).step_by(block_rows) {
            let rows = block_rows.min(nq - start);
            let mut rankers: Vec<Option<QueryRanker>> = (start..start + rows)
                .map(|i| {
                    let tol = self.dots.tolerance(&q, metric, i, None, g_max);
                    QueryRanker::new(self.query.pids[i], std::mem::take(&mut positives[i]), tol)
                })
                .collect();
            let t = Instant::now();
            let block = self.dots.queries(&q, start, rows);
            timings.distances_s += t.elapsed().as_secs_f64();
            for p0 in (0..ng).step_by(GALLERY_PANEL) {
                let cols = GALLERY_PANEL.min(ng - p0);
                let t = Instant::now();
                tile.resize(rows * cols, 0.0);
                self.dots.tile(&block, &q, &g, p0, cols, &mut tile);
                timings.distances_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let place = |near: &mut Vec<u32>, (r, ranker): (usize, &mut Option<QueryRanker>)| {
                    if let Some(ranker) = ranker {
                        self.place_panel(ranker, start + r, p0, &tile[r * cols..(r + 1) * cols], near);
                    }
                };
                rankers.par_iter_mut().enumerate().for_each_init(Vec::new, place);
                timings.ranking_s += t.elapsed().as_secs_f64();
            }
            outcomes.extend(rankers.into_iter().map(|r| r.map(QueryRanker::finish)));
        }
        outcomes
    }

    /// Places the gallery entries `p0..` of one panel, whose dot products with query
    /// `i` are `dots`, in its ranking; `near` is room for the columns to place.
    fn place_panel(&self, ranker: &mut QueryRanker, i: usize, p0: usize, dots: &[f32], near: &mut Vec<u32>) {
        let (q, g, metric) = (self.q_features(), self.g_features(), self.metric);
        let tolerance = |j: usize| self.dots.tolerance(&q, metric, i, Some(j), g.norms[j]);
        let exact = |j: usize| q.exact(metric, i, &g, j);
        let pids = &self.gallery.pids[p0..p0 + dots.len()];
        match metric {
            Metric::Cosine => {
                let inv = &self.g_inverse_norms[p0..p0 + dots.len()];
                let iq = 1.0 / self.q_norms[i].max(1e-300);
                // Most entries rank after every match: 1 - dot |g|^-1 |q|^-1 > skip,
                // i.e. dot |g|^-1 < (1 - skip) |q|. That test in f32, with a margin
                // far above its rounding (a few f32 roundoffs of |q|), keeps every
                // entry that the exact test in f64 below can keep.
                let floor = (1.0 - ranker.skip_above() - 1e-6) / iq;
                let inv_f32 = &self.g_inverse_norms_f32[p0..p0 + dots.len()];
                crate::distance::columns_at_least(dots, inv_f32, floor as f32, near);
                for &c in near.iter() {
                    let c = c as usize;
                    let a = 1.0 - dots[c] as f64 * iq * inv[c];
                    ranker.place(p0 + c, pids[c], a, &tolerance, &exact);
                }
            }
            Metric::Euclidean => {
                for (c, (&dot, &pid)) in dots.iter().zip(pids).enumerate() {
                    let a = q.distance_from_dot(metric, i, &g, p0 + c, dot);
                    ranker.place(p0 + c, pid, a, &tolerance, &exact);
                }
            }
        }
    }

    /// Ranks every query and sums CMC (ranks 1..=max_rank), mAP and mINP.
    pub fn run(&self, max_rank: usize) -> Result<Evaluation, EvalError> {
        let mut timings = Timings {
            amx: matches!(self.dots, DotKernel::Amx(_)),
            ..Timings::default()
        };
        let outcomes = match self.rerank {
            Some(_) => self.run_reranked(&mut timings),
            None => self.run_exact(&mut timings),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no dependency needed for a test).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, m: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % m
        }

        fn unit(&mut self) -> f32 {
            self.below(1 << 24) as f32 / (1 << 24) as f32 - 0.5
        }
    }

    /// The ranking by sorting float64 distances (ties by gallery order), junk and
    /// same-camera matches left out: the definition the evaluator must meet.
    fn by_float64(q: FeatureSet, g: FeatureSet, metric: Metric) -> Vec<Option<Vec<usize>>> {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
        fn row<'a>(s: &FeatureSet<'a>, i: usize) -> &'a [f32] {
            &s.features[i * s.dim..(i + 1) * s.dim]
        }
        (0..q.pids.len())
            .map(|i| {
                let a = row(&q, i);
                let na = dot(a, a).sqrt();
                let mut kept: Vec<(f64, usize)> = (0..g.pids.len())
                    .filter(|&j| g.pids[j] != -1 && !(g.pids[j] == q.pids[i] && g.camids[j] == q.camids[i]))
                    .map(|j| {
                        let b = row(&g, j);
                        let nb = dot(b, b).sqrt();
                        let d = match metric {
                            Metric::Cosine => 1.0 - dot(a, b) / (na * nb),
                            Metric::Euclidean => na * na + nb * nb - 2.0 * dot(a, b),
                        };
                        (d, j)
                    })
                    .collect();
                kept.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
                let hits: Vec<usize> = (0..kept.len()).filter(|&r| g.pids[kept[r].1] == q.pids[i]).collect();
                (!hits.is_empty()).then_some(hits)
            })
            .collect()
    }

    /// Identities, cameras and features where each gallery row is a query row plus
    /// noise of relative size `noise`: with `noise` small, a query's copies lie far
    /// closer together than the f32 rounding of a dot product, and the f32 order of
    /// them is noise. (Not much below 1e-3: cosine distances are then ~1e-12 apart
    /// by ~1e-15, which float64 dot products summed in two orders do not resolve.)
    fn case(nq: usize, ng: usize, dim: usize, noise: f32, seed: u64) -> (Vec<f32>, Vec<f32>, [Vec<i64>; 4]) {
        let mut r = Lcg(seed);
        let q: Vec<f32> = (0..nq * dim).map(|_| r.unit()).collect();
        let (qp, qc): (Vec<i64>, Vec<i64>) = (0..nq).map(|i| (i as i64 % 7, r.below(3) as i64)).unzip();
        let mut g = Vec::with_capacity(ng * dim);
        let (mut gp, mut gc) = (Vec::new(), Vec::new());
        for _ in 0..ng {
            let src = r.below(nq as u64) as usize;
            g.extend(
                q[src * dim..(src + 1) * dim]
                    .iter()
                    .map(|&x| x * (1.0 + noise * r.unit())),
            );
            // A tenth are junk, a fifth belong to someone else than their source.
            gp.push(match r.below(10) {
                0 => -1,
                1 | 2 => r.below(9) as i64,
                _ => qp[src],
            });
            gc.push(r.below(3) as i64);
        }
        (q, g, [qp, qc, gp, gc])
    }

    fn check(nq: usize, ng: usize, dim: usize, noise: f32, seed: u64) {
        let (qf, gf, [qp, qc, gp, gc]) = case(nq, ng, dim, noise, seed);
        let q = FeatureSet {
            features: &qf,
            dim,
            pids: &qp,
            camids: &qc,
        };
        let g = FeatureSet {
            features: &gf,
            dim,
            pids: &gp,
            camids: &gc,
        };
        for metric in [Metric::Cosine, Metric::Euclidean] {
            let got = evaluate(q, g, metric, None, 10).unwrap();
            let got: Vec<Option<Vec<usize>>> = got.outcomes.into_iter().map(|o| o.map(|o| o.hit_ranks)).collect();
            let want = by_float64(q, g, metric);
            let differ = (0..nq).filter(|&i| got[i] != want[i]).count();
            assert_eq!(
                differ, 0,
                "{metric}, noise {noise}: {differ} of {nq} queries rank unlike float64"
            );
        }
    }

    #[test]
    fn rankings_equal_those_of_float64_distances_at_near_ties() {
        // A query's copies ~1e-7 apart, the f32 error bound ~1e-5: the f32 order
        // of the copies is noise, and every one of them is rescored.
        check(40, 600, 96, 1e-3, 1);
        // Across the slices of the dimension (256) and a panel boundary of the gallery.
        check(12, GALLERY_PANEL + 300, 300, 1e-3, 2);
    }

    #[test]
    fn a_negative_equal_to_the_last_match_ranks_by_gallery_order() {
        // The last match's distance is where entries start to be left out: a
        // negative at exactly that distance still counts when it comes first.
        let q = [1.0f32, 2.0, -0.5, 0.25];
        let (near, far) = ([0.9f32, 2.1, -0.4, 0.3], [-1.0f32, 0.5, 2.0, -3.0]);
        for (gallery, pids, want) in [
            ([near, near, far].concat(), [3, 1, 1], 1),
            ([near, near, far].concat(), [1, 3, 1], 0),
        ] {
            let set = |features, pids, camids| FeatureSet {
                features,
                dim: 4,
                pids,
                camids,
            };
            for metric in [Metric::Cosine, Metric::Euclidean] {
                let e = evaluate(set(&q, &[1], &[0]), set(&gallery, &pids, &[1, 1, 1]), metric, None, 3).unwrap();
                let hits = &e.outcomes[0].as_ref().unwrap().hit_ranks;
                assert_eq!(hits[0], want, "{metric}, pids {pids:?}");
            }
        }
    }

    #[test]
    fn rankings_equal_those_of_float64_distances_across_query_blocks() {
        // Past the AMX blocks' end too (twice as long as the f32 GEMM's).
        check(2 * EXACT_QUERY_BLOCK + 20, 50, 8, 1e-3, 3);
    }
}
