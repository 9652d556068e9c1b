//! Query-gallery distances by matrix multiplication.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// How two features are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// `1 - cos(q, g)`.
    Cosine,
    /// Squared euclidean `|q|^2 + |g|^2 - 2 q.g` (ranks as euclidean does).
    Euclidean,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::Cosine => "cosine",
            Metric::Euclidean => "euclidean",
        })
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(Metric::Cosine),
            "euclidean" => Ok(Metric::Euclidean),
            o => Err(format!("unknown metric '{o}' (expected cosine or euclidean)")),
        }
    }
}

/// Row-major features made ready for one metric: L2-normalised rows for cosine,
/// rows with their squared norms for euclidean.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub metric: Metric,
    pub dim: usize,
    pub rows: Vec<f32>,
    pub sq_norms: Vec<f32>,
}

impl Prepared {
    /// Prepares `features` ([n, dim], row-major) for `metric`.
    pub fn new(metric: Metric, features: &[f32], dim: usize) -> Self {
        Self::from_rows(metric, features, dim, None)
    }

    /// Prepares the rows `which` of `features` (all rows when `None`), copying
    /// only those.
    pub fn from_rows(metric: Metric, features: &[f32], dim: usize, which: Option<&[usize]>) -> Self {
        let mut rows = match which {
            None => features.to_vec(),
            Some(idx) => {
                let mut r = Vec::with_capacity(idx.len() * dim);
                for &i in idx {
                    r.extend_from_slice(&features[i * dim..(i + 1) * dim]);
                }
                r
            }
        };
        let mut sq_norms: Vec<f32> = rows.chunks_exact(dim).map(|r| r.iter().map(|x| x * x).sum()).collect();
        if metric == Metric::Cosine {
            for (row, sq) in rows.chunks_exact_mut(dim).zip(sq_norms.iter_mut()) {
                let scale = 1.0 / sq.sqrt().max(1e-12);
                row.iter_mut().for_each(|x| *x *= scale);
                *sq = 1.0;
            }
        }
        Prepared {
            metric,
            dim,
            rows,
            sq_norms,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.sq_norms.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.sq_norms.is_empty()
    }
}

/// Writes the distances from query rows `q_start..q_start + out.len() / g.len()` of
/// `q` to every row of `g` into `out` (row-major). Single-threaded: callers run
/// blocks in parallel.
pub fn distance_block(q: &Prepared, q_start: usize, g: &Prepared, out: &mut [f32]) {
    let (dim, ng) = (q.dim, g.len());
    assert_eq!(dim, g.dim, "feature dimensions differ");
    let bq = out.len() / ng.max(1);
    let lhs = &q.rows[q_start * dim..(q_start + bq) * dim];
    // SAFETY: the strides describe `lhs` as bq x dim row-major, `g.rows` read as
    // its transpose dim x ng, and `out` as bq x ng row-major; all lengths checked.
    assert_eq!(out.len(), bq * ng);
    assert!(g.rows.len() >= ng * dim);
    unsafe {
        gemm::gemm(
            bq,
            ng,
            dim,
            out.as_mut_ptr(),
            1,
            ng as isize,
            false,
            lhs.as_ptr(),
            1,
            dim as isize,
            g.rows.as_ptr(),
            dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    match q.metric {
        Metric::Cosine => out.iter_mut().for_each(|d| *d = 1.0 - *d),
        Metric::Euclidean => {
            for (r, row) in out.chunks_exact_mut(ng).enumerate() {
                let qn = q.sq_norms[q_start + r];
                for (d, gn) in row.iter_mut().zip(&g.sq_norms) {
                    *d = qn + gn - 2.0 * *d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_distances_match_direct_formulas() {
        let dim = 5;
        let q: Vec<f32> = (0..3 * dim).map(|i| ((i * 7) % 11) as f32 - 4.0).collect();
        let g: Vec<f32> = (0..4 * dim).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        for metric in [Metric::Cosine, Metric::Euclidean] {
            let (pq, pg) = (Prepared::new(metric, &q, dim), Prepared::new(metric, &g, dim));
            let mut out = vec![0.0; 2 * 4];
            distance_block(&pq, 1, &pg, &mut out);
            for i in 0..2 {
                for j in 0..4 {
                    let a = &q[(i + 1) * dim..(i + 2) * dim];
                    let b = &g[j * dim..(j + 1) * dim];
                    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                    let na: f32 = a.iter().map(|x| x * x).sum();
                    let nb: f32 = b.iter().map(|x| x * x).sum();
                    let want = match metric {
                        Metric::Cosine => 1.0 - dot / (na.sqrt() * nb.sqrt()),
                        Metric::Euclidean => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
                    };
                    assert!((out[i * 4 + j] - want).abs() < 1e-4, "{metric} {i} {j}");
                }
            }
        }
    }
}
