//! k-reciprocal re-ranking (Zhong et al., CVPR 2017), as torchreid computes it,
//! without any dense (query + gallery)^2 matrix: each row keeps only its nearest
//! neighbours and a sparse k-reciprocal encoding, and the final query-gallery
//! distances are produced block by block.
//!
//! With `d` the base distance over all query and gallery rows: the original
//! distance is `d^2` divided by its row maximum; `V[i]` weights the (expanded)
//! k1-reciprocal neighbours of i by `exp(-original)`, normalised; local query
//! expansion averages `V` over the k2 nearest rows; the Jaccard distance is
//! `1 - m / (2 - m)` with `m = sum_k min(V[i,k], V[j,k])`; and the final distance
//! is `(1 - lambda) * jaccard + lambda * original`.

use rayon::prelude::*;
use serde::Serialize;

use crate::distance::{distance_block, Metric, Prepared};

/// Re-ranking settings; torchreid's defaults are k1 = 20, k2 = 6, lambda = 0.3.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RerankParams {
    pub k1: usize,
    pub k2: usize,
    pub lambda: f32,
}

impl Default for RerankParams {
    fn default() -> Self {
        RerankParams {
            k1: 20,
            k2: 6,
            lambda: 0.3,
        }
    }
}

impl std::str::FromStr for RerankParams {
    type Err = String;
    /// Parses `K1,K2,LAMBDA`, e.g. `20,6,0.3`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let err = || format!("re-ranking settings '{s}' do not parse; expected K1,K2,LAMBDA such as 20,6,0.3");
        if parts.len() != 3 {
            return Err(err());
        }
        let p = RerankParams {
            k1: parts[0].parse().map_err(|_| err())?,
            k2: parts[1].parse().map_err(|_| err())?,
            lambda: parts[2].parse().map_err(|_| err())?,
        };
        if p.k1 == 0 || p.k2 == 0 || p.k2 > p.k1 + 1 || !(0.0..=1.0).contains(&p.lambda) {
            return Err(format!("{s}: need k1 >= 1, 1 <= k2 <= k1 + 1 and 0 <= lambda <= 1"));
        }
        Ok(p)
    }
}

/// A sparse row: (column, value), columns ascending.
type SparseRow = Vec<(u32, f32)>;

/// Everything needed to produce re-ranked query-gallery distances.
pub struct Reranker {
    all: Prepared,
    gallery: Prepared,
    num_query: usize,
    row_max: Vec<f32>,
    /// Local-query-expanded k-reciprocal encodings, one per row.
    v: Vec<SparseRow>,
    /// For each column, the rows whose encoding is non-zero there (ascending).
    inverted: Vec<Vec<u32>>,
    lambda: f32,
}

const BLOCK: usize = 32;

/// Rounds half to even, as numpy's `around` does.
fn round_half_even(x: f64) -> usize {
    x.round_ties_even() as usize
}

impl Reranker {
    /// Builds the encodings for queries `q` and gallery `g` (no junk rows).
    pub fn new(q: &Prepared, g: &Prepared, params: RerankParams) -> Self {
        let num_query = q.len();
        let mut all = q.clone();
        all.rows.extend_from_slice(&g.rows);
        all.sq_norms.extend_from_slice(&g.sq_norms);
        let n = all.len();
        let k1 = params.k1.min(n - 1);
        let keep = k1 + 1;

        // Nearest neighbours and row maxima of the squared distances.
        let blocks: Vec<(Vec<f32>, Vec<Vec<u32>>)> = (0..n.div_ceil(BLOCK))
            .into_par_iter()
            .map(|b| {
                let start = b * BLOCK;
                let rows = BLOCK.min(n - start);
                let mut d = vec![0.0f32; rows * n];
                distance_block(&all, start, &all, &mut d);
                let mut maxima = Vec::with_capacity(rows);
                let mut ranks = Vec::with_capacity(rows);
                let mut order: Vec<u32> = Vec::with_capacity(n);
                for row in d.chunks_exact_mut(n) {
                    row.iter_mut().for_each(|x| *x = *x * *x);
                    let max = row.iter().copied().fold(f32::MIN, f32::max);
                    row.iter_mut().for_each(|x| *x /= max);
                    maxima.push(max);
                    order.clear();
                    order.extend(0..n as u32);
                    let by = |a: &u32, b: &u32| row[*a as usize].total_cmp(&row[*b as usize]).then(a.cmp(b));
                    if keep < n {
                        order.select_nth_unstable_by(keep, by);
                        order.truncate(keep);
                    }
                    order.sort_by(by);
                    ranks.push(order.clone());
                }
                (maxima, ranks)
            })
            .collect();
        let mut row_max = Vec::with_capacity(n);
        let mut initial_rank: Vec<Vec<u32>> = Vec::with_capacity(n);
        for (m, r) in blocks {
            row_max.extend(m);
            initial_rank.extend(r);
        }

        let mut this = Reranker {
            all,
            gallery: g.clone(),
            num_query,
            row_max,
            v: Vec::new(),
            inverted: Vec::new(),
            lambda: params.lambda,
        };

        // k-reciprocal encodings.
        let half = round_half_even(k1 as f64 / 2.0);
        let reciprocal = |i: usize, k: usize| -> Vec<u32> {
            initial_rank[i][..=k]
                .iter()
                .copied()
                .filter(|&f| initial_rank[f as usize][..=k].contains(&(i as u32)))
                .collect()
        };
        let encodings: Vec<SparseRow> = (0..n)
            .into_par_iter()
            .map(|i| {
                let base = reciprocal(i, k1);
                let mut expanded = base.clone();
                for &c in &base {
                    let cand = reciprocal(c as usize, half);
                    let common = cand.iter().filter(|x| base.contains(x)).count();
                    if common as f64 > 2.0 / 3.0 * cand.len() as f64 {
                        expanded.extend_from_slice(&cand);
                    }
                }
                expanded.sort_unstable();
                expanded.dedup();
                let weights: Vec<f32> = expanded
                    .iter()
                    .map(|&j| (-this.original(i, j as usize)).exp())
                    .collect();
                let total: f32 = weights.iter().sum();
                expanded.into_iter().zip(weights).map(|(j, w)| (j, w / total)).collect()
            })
            .collect();

        // Local query expansion: average the encodings of the k2 nearest rows.
        let k2 = params.k2.min(keep);
        this.v = if k2 > 1 {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let mut merged: SparseRow = initial_rank[i][..k2]
                        .iter()
                        .flat_map(|&t| encodings[t as usize].iter().copied())
                        .collect();
                    merged.sort_by_key(|&(c, _)| c);
                    let mut out: SparseRow = Vec::with_capacity(merged.len());
                    for (c, w) in merged {
                        match out.last_mut() {
                            Some((lc, lw)) if *lc == c => *lw += w,
                            _ => out.push((c, w)),
                        }
                    }
                    out.iter_mut().for_each(|(_, w)| *w /= k2 as f32);
                    out
                })
                .collect()
        } else {
            encodings
        };
        let mut inverted = vec![Vec::new(); n];
        for (i, row) in this.v.iter().enumerate() {
            for &(c, _) in row {
                inverted[c as usize].push(i as u32);
            }
        }
        this.inverted = inverted;
        this
    }

    /// The original (squared, row-normalised) distance between rows i and j.
    fn original(&self, i: usize, j: usize) -> f32 {
        let dim = self.all.dim;
        let (a, b) = (
            &self.all.rows[i * dim..(i + 1) * dim],
            &self.all.rows[j * dim..(j + 1) * dim],
        );
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let d = match self.all.metric {
            Metric::Cosine => 1.0 - dot,
            Metric::Euclidean => self.all.sq_norms[i] + self.all.sq_norms[j] - 2.0 * dot,
        };
        d * d / self.row_max[i]
    }

    /// The value of row `r`'s encoding at column `c`.
    fn v_at(&self, r: usize, c: u32) -> f32 {
        let row = &self.v[r];
        row.binary_search_by_key(&c, |&(k, _)| k).map_or(0.0, |p| row[p].1)
    }

    /// Re-ranked distances from queries `q_start..` to every gallery row into `out`
    /// (row-major, `out.len() / num_gallery` rows).
    pub fn distance_block(&self, q_start: usize, out: &mut [f32]) {
        let ng = self.gallery.len();
        distance_block(&self.all, q_start, &self.gallery, out);
        let mut overlap = vec![0.0f32; ng];
        for (r, row) in out.chunks_exact_mut(ng).enumerate() {
            let i = q_start + r;
            overlap.iter_mut().for_each(|x| *x = 0.0);
            for &(c, w) in &self.v[i] {
                for &j in &self.inverted[c as usize] {
                    let j = j as usize;
                    if j >= self.num_query {
                        overlap[j - self.num_query] += w.min(self.v_at(j, c));
                    }
                }
            }
            for (d, m) in row.iter_mut().zip(&overlap) {
                let original = *d * *d / self.row_max[i];
                let jaccard = 1.0 - m / (2.0 - m);
                *d = jaccard * (1.0 - self.lambda) + original * self.lambda;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_are_refused() {
        assert_eq!("20,6,0.3".parse::<RerankParams>().unwrap(), RerankParams::default());
        assert!("20,6".parse::<RerankParams>().is_err());
        assert!("20,30,0.3".parse::<RerankParams>().is_err());
        assert!("20,6,1.5".parse::<RerankParams>().is_err());
    }

    #[test]
    fn numpy_rounding() {
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(10.0), 10);
    }
}
