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

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;
use serde::Serialize;

use crate::distance::{gemm_nt, Features, Metric, PANEL};

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

/// How the all-pairs pass is cut: rows per tile, and rows per strip of a tile's
/// diagonal block (each strip's GEMM starts at its own first column, so the work
/// below the diagonal is one strip's, not a tile's).
#[derive(Debug, Clone, Copy)]
struct Tiling {
    tile: usize,
    strip: usize,
}

impl Tiling {
    /// 1024-row tiles (a 77 MB tile at Market size) in 256-row strips.
    const DEFAULT: Tiling = Tiling { tile: 1024, strip: 256 };
}

/// Columns per task when a tile serves its columns.
const COLUMN_CHUNK: usize = 256;

/// Everything needed to produce re-ranked query-gallery distances.
pub struct Reranker {
    /// Gallery row of each kept gallery entry.
    kept: Vec<usize>,
    /// Columns of the gallery file.
    gallery_len: usize,
    /// Largest squared distance of each (query, then kept gallery) row.
    row_max: Vec<f32>,
    /// Squared query-gallery distances [Q, kept], from the all-pairs pass.
    query_gallery: Vec<f32>,
    /// Local-query-expanded k-reciprocal encodings, one per row.
    v: Vec<SparseRow>,
    /// For each column, the kept gallery entries whose encoding is non-zero
    /// there, with that value (entries ascending).
    inverted: Vec<SparseRow>,
    lambda: f32,
}

/// The rows re-ranking relates: the queries, then the kept gallery rows. The
/// gallery is read where it lies when nothing of it is junk; otherwise its kept
/// rows are gathered once (junk in the all-pairs pass would cost a GEMM share
/// twice its own).
struct Rows<'a> {
    num_query: usize,
    q_rows: &'a [f32],
    /// The kept gallery rows.
    g_rows: Cow<'a, [f32]>,
    dim: usize,
    /// The norm of every row, queries then kept gallery rows.
    norms: Vec<f64>,
    metric: Metric,
    /// 1 / norm of every row (cosine only).
    inverse_norms: Vec<f64>,
    tiling: Tiling,
}

/// One row of an all-pairs tile: row `i`'s values for the rows `j0..`, its own
/// state, and where its query-gallery part goes (empty for a gallery row).
struct TileRow<'t> {
    i: usize,
    j0: usize,
    values: &'t mut [f32],
    state: &'t mut Neighbours,
    qg: &'t mut [f32],
}

/// The results of the all-pairs pass.
struct AllPairs {
    /// Each row's `keep` nearest rows, nearest first, and their squared distances.
    initial_rank: Vec<Vec<u32>>,
    nearest_d2: Vec<Vec<f32>>,
    row_max: Vec<f32>,
    /// Squared query-gallery distances [Q, kept].
    query_gallery: Vec<f32>,
}

/// Rounds half to even, as numpy's `around` does.
fn round_half_even(x: f64) -> usize {
    x.round_ties_even() as usize
}

/// The `keep` nearest rows of one row (by (squared distance, index)) and the
/// largest squared distance, updated tile by tile.
#[derive(Clone)]
struct Neighbours {
    heap: std::collections::BinaryHeap<(Key, u32)>,
    max: f32,
    /// The heap's largest squared distance once it is full (+inf before).
    threshold: f32,
}

/// A squared distance ordered totally (for the heap).
#[derive(Clone, Copy, PartialEq)]
struct Key(f32);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Neighbours {
    fn new(keep: usize) -> Self {
        Neighbours {
            heap: std::collections::BinaryHeap::with_capacity(keep + 1),
            max: f32::MIN,
            threshold: f32::INFINITY,
        }
    }

    /// Offers column `j` at squared distance `d2` (the caller keeps `max`, and
    /// tests `d2 <= threshold` first: most entries stop at that test).
    #[inline]
    fn admit(&mut self, keep: usize, j: u32, d2: f32) {
        let entry = (Key(d2), j);
        if self.heap.len() < keep {
            self.heap.push(entry);
        } else if entry < *self.heap.peek().expect("full heap") {
            self.heap.pop();
            self.heap.push(entry);
        } else {
            return;
        }
        if self.heap.len() == keep {
            self.threshold = self.heap.peek().expect("full heap").0 .0;
        }
    }

    /// Offers a run of columns `j0..` at squared distances `run`: one vector pass
    /// per group of [`LANES`] columns, which most groups stop at.
    #[inline(always)]
    fn offer_run(&mut self, keep: usize, j0: usize, run: &[f32]) {
        let mut lanes = [f32::MIN; LANES];
        for (g, group) in run.chunks(LANES).enumerate() {
            if !raise_and_test(
                group,
                &mut lanes[..group.len()],
                &[self.threshold; LANES][..group.len()],
            ) {
                continue;
            }
            for (c, &d2) in group.iter().enumerate() {
                if d2 <= self.threshold {
                    self.admit(keep, (j0 + g * LANES + c) as u32, d2);
                }
            }
        }
        self.max = lanes.iter().fold(self.max, |m, &x| m.max(x));
    }

    /// The kept rows, nearest first, and their squared distances.
    fn sorted(self) -> (Vec<u32>, Vec<f32>) {
        self.heap.into_sorted_vec().into_iter().map(|(d2, j)| (j, d2.0)).unzip()
    }
}

impl Reranker {
    /// Builds the encodings for queries `q` and the `kept` rows of gallery `g`.
    pub fn new(q: &Features, g: &Features, kept: &[usize], metric: Metric, params: RerankParams) -> Self {
        Self::with_tiling(q, g, kept, metric, params, Tiling::DEFAULT)
    }

    fn with_tiling(
        q: &Features,
        g: &Features,
        kept: &[usize],
        metric: Metric,
        params: RerankParams,
        tiling: Tiling,
    ) -> Self {
        let rows = Rows::new(q, g, kept, metric, tiling);
        let n = q.len() + kept.len();
        let keep = params.k1.min(n - 1) + 1;
        let all = rows.all_pairs(keep);
        let encodings = rows.encodings(&all, keep - 1);
        let v = expand(&encodings, &all.initial_rank, params.k2.min(keep));
        let mut inverted = vec![Vec::new(); n];
        for (i, row) in v.iter().enumerate().skip(q.len()) {
            for &(c, w) in row {
                inverted[c as usize].push(((i - q.len()) as u32, w));
            }
        }
        Reranker {
            kept: kept.to_vec(),
            gallery_len: g.len(),
            row_max: all.row_max,
            query_gallery: all.query_gallery,
            v,
            inverted,
            lambda: params.lambda,
        }
    }

    /// Re-ranked distances from queries `q_start..` to every gallery row into `out`
    /// (row-major, `out.len() / gallery_len` rows); junk columns get +inf.
    pub fn distance_block(&self, q_start: usize, out: &mut [f32]) {
        let (ng, nk) = (self.gallery_len, self.kept.len());
        out.par_chunks_exact_mut(ng).enumerate().for_each(|(r, row)| {
            let i = q_start + r;
            let mut overlap = vec![0.0f32; nk];
            for &(c, w) in &self.v[i] {
                for &(j, wj) in &self.inverted[c as usize] {
                    overlap[j as usize] += w.min(wj);
                }
            }
            row.iter_mut().for_each(|d| *d = f32::INFINITY);
            let squared = &self.query_gallery[i * nk..(i + 1) * nk];
            for ((&col, m), d2) in self.kept.iter().zip(&overlap).zip(squared) {
                let original = d2 / self.row_max[i];
                let jaccard = 1.0 - m / (2.0 - m);
                row[col] = jaccard * (1.0 - self.lambda) + original * self.lambda;
            }
        });
    }
}

impl<'a> Rows<'a> {
    fn new(q: &'a Features<'a>, g: &'a Features<'a>, kept: &[usize], metric: Metric, tiling: Tiling) -> Self {
        let g_rows = match kept.len() == g.len() {
            true => Cow::Borrowed(g.rows),
            false => {
                // Zeroed memory costs nothing until written; the rows are then
                // written (and the pages faulted in) by both threads.
                let mut rows = vec![0.0f32; kept.len() * g.dim];
                rows.par_chunks_exact_mut(g.dim.max(1))
                    .zip(kept)
                    .for_each(|(dst, &j)| dst.copy_from_slice(g.row(j)));
                Cow::Owned(rows)
            }
        };
        let norms: Vec<f64> = q
            .norms
            .iter()
            .copied()
            .chain(kept.iter().map(|&j| g.norms[j]))
            .collect();
        let inverse_norms = match metric {
            Metric::Cosine => norms.iter().map(|n| 1.0 / n.max(1e-300)).collect(),
            Metric::Euclidean => Vec::new(),
        };
        Rows {
            num_query: q.len(),
            q_rows: q.rows,
            g_rows,
            dim: q.dim,
            norms,
            metric,
            inverse_norms,
            tiling,
        }
    }

    /// Number of rows: queries and kept gallery rows.
    fn len(&self) -> usize {
        self.norms.len()
    }

    /// The rows from row `i` to the end of its set (queries or gallery).
    fn rows_from(&self, i: usize) -> &[f32] {
        match i.checked_sub(self.num_query) {
            None => &self.q_rows[i * self.dim..],
            Some(j) => &self.g_rows[j * self.dim..],
        }
    }

    /// Dot products of rows `i0..i0 + rows` with rows `i0..` into `out` [rows,
    /// len - i0], upper triangle only: row `i0 + r` holds the columns from the
    /// start of its strip on (what lies left of that is stale).
    fn dot_tile(&self, i0: usize, rows: usize, out: &mut [f32]) {
        let (width, strip) = (self.len() - i0, self.tiling.strip);
        self.dots(i0..i0 + rows, i0 + rows..self.len(), &mut out[rows..], width);
        for a in (0..rows).step_by(strip) {
            let b = (a + strip).min(rows);
            self.dots(i0 + a..i0 + b, i0 + a..i0 + rows, &mut out[a * width + a..], width);
        }
    }

    /// Turns a tile row's dot products into squared distances, offers them to the
    /// row's own state, and copies the last `qg.len()` of them (a query's gallery
    /// columns, or none) to `qg`: one pass while the row is in cache.
    fn finish_row(&self, row: TileRow, keep: usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { self.finish_row_avx512(row, keep) };
        }
        self.finish_row_portable(row, keep)
    }

    /// [`Rows::finish_row`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish_row_avx512(&self, row: TileRow, keep: usize) {
        self.finish_row_portable(row, keep)
    }

    #[inline(always)]
    fn finish_row_portable(
        &self,
        TileRow {
            i,
            j0,
            values,
            state,
            qg,
        }: TileRow,
        keep: usize,
    ) {
        self.form_squared(i, j0, values);
        state.offer_run(keep, j0, values);
        qg.copy_from_slice(&values[values.len() - qg.len()..]);
    }

    /// Dot products of rows `rows` with rows `cols` into `out` (row stride
    /// `width`): up to four GEMMs, query or gallery rows against query or gallery
    /// rows, in panels of [`PANEL`] columns.
    fn dots(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32], width: usize) {
        let (nq, dim) = (self.num_query, self.dim);
        let split = |r: &Range<usize>| [(r.start, r.end.min(nq)), (r.start.max(nq), r.end)];
        for (r0, r1) in split(&rows).into_iter().filter(|(a, b)| a < b) {
            for (c0, c1) in split(&cols).into_iter().filter(|(a, b)| a < b) {
                for p0 in (0..c1 - c0).step_by(PANEL) {
                    let n = PANEL.min(c1 - c0 - p0);
                    let at = (r0 - rows.start) * width + (c0 - cols.start) + p0;
                    let (l, r) = (self.rows_from(r0), self.rows_from(c0 + p0));
                    gemm_nt(r1 - r0, n, dim, &mut out[at..], width, false, l, dim, r, dim);
                }
            }
        }
    }

    /// Turns the dot products of row `i` with rows `j0..` into squared distances
    /// (formed in f64, squared in f32).
    #[inline(always)]
    fn form_squared(&self, i: usize, j0: usize, row: &mut [f32]) {
        match self.metric {
            Metric::Cosine => {
                let inverse = &self.inverse_norms[j0..];
                for (d, ig) in row.iter_mut().zip(inverse) {
                    let distance = (1.0 - *d as f64 * self.inverse_norms[i] * ig) as f32;
                    *d = distance * distance;
                }
            }
            Metric::Euclidean => {
                let a = self.norms[i];
                for (d, &b) in row.iter_mut().zip(&self.norms[j0..]) {
                    let distance = (a * a + b * b - 2.0 * *d as f64) as f32;
                    *d = distance * distance;
                }
            }
        }
    }

    /// One pass over the upper triangle of the all-pairs distances, tile by tile
    /// (each tile serves its rows and, transposed, its columns): every row's `keep`
    /// nearest rows and largest squared distance, and the query-gallery block.
    fn all_pairs(&self, keep: usize) -> AllPairs {
        let (n, nq) = (self.len(), self.num_query);
        let (ng, Tiling { tile: size, strip }) = (n - nq, self.tiling);
        let mut near = vec![Neighbours::new(keep); n];
        let mut query_gallery = vec![0.0f32; nq * ng];
        let mut tile = vec![0.0f32; size.min(n) * n];
        for i0 in (0..n).step_by(size) {
            let (rows, width) = (size.min(n - i0), n - i0);
            let block = &mut tile[..rows * width];
            self.dot_tile(i0, rows, block);
            // The query rows' gallery columns are kept; other rows keep nothing.
            let end = (i0 + rows).min(nq);
            let mut kept_parts: Vec<&mut [f32]> = query_gallery[i0.min(end) * ng..end * ng]
                .chunks_exact_mut(ng.max(1))
                .collect();
            kept_parts.resize_with(rows, Default::default);
            near[i0..i0 + rows]
                .par_iter_mut()
                .zip(block.par_chunks_exact_mut(width))
                .zip(kept_parts)
                .enumerate()
                .for_each(|(r, ((state, row), qg))| {
                    let from = r / strip * strip;
                    let values = &mut row[from..];
                    self.finish_row(
                        TileRow {
                            i: i0 + r,
                            j0: i0 + from,
                            values,
                            state,
                            qg,
                        },
                        keep,
                    );
                });
            let block = &*block;
            // The tile's own strips serve the columns of the strips after them.
            near[i0..i0 + rows]
                .par_chunks_mut(strip)
                .enumerate()
                .skip(1)
                .for_each(|(s, states)| serve_columns(states, keep, &block[..s * strip * width], width, s * strip, i0));
            near[i0 + rows..]
                .par_chunks_mut(COLUMN_CHUNK)
                .enumerate()
                .for_each(|(k, states)| serve_columns(states, keep, block, width, rows + k * COLUMN_CHUNK, i0));
        }
        let row_max = near.iter().map(|nb| nb.max).collect();
        let (initial_rank, nearest_d2) = near.into_par_iter().map(Neighbours::sorted).unzip();
        AllPairs {
            initial_rank,
            nearest_d2,
            row_max,
            query_gallery,
        }
    }

    /// The original (squared, row-normalised) distance between rows i and j.
    fn original(&self, i: usize, j: usize, row_max: f32) -> f32 {
        let (a, b) = (&self.rows_from(i)[..self.dim], &self.rows_from(j)[..self.dim]);
        // Sixteen partial sums, which the compiler vectorises.
        let mut acc = [0.0f32; 16];
        let (x, y) = (a.chunks_exact(16), b.chunks_exact(16));
        let tail: f32 = x.remainder().iter().zip(y.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in x.zip(y) {
            for k in 0..16 {
                acc[k] += x[k] * y[k];
            }
        }
        let dot = acc.iter().sum::<f32>() + tail;
        let (na, nb) = (self.norms[i], self.norms[j]);
        let d = match self.metric {
            Metric::Cosine => 1.0 - dot as f64 / (na * nb).max(1e-300),
            Metric::Euclidean => na * na + nb * nb - 2.0 * dot as f64,
        } as f32;
        d * d / row_max
    }

    /// The k-reciprocal encodings `V[i]`: the (expanded) k1-reciprocal neighbours
    /// of i weighted by `exp(-original)`, normalised. The distances to i's nearest
    /// rows come from the all-pairs pass; others are computed.
    fn encodings(&self, all: &AllPairs, k1: usize) -> Vec<SparseRow> {
        let (initial_rank, nearest_d2, row_max) = (&all.initial_rank, &all.nearest_d2, &all.row_max);
        let half = round_half_even(k1 as f64 / 2.0);
        let reciprocal = |i: usize, k: usize| -> Vec<u32> {
            initial_rank[i][..=k]
                .iter()
                .copied()
                .filter(|&f| initial_rank[f as usize][..=k].contains(&(i as u32)))
                .collect()
        };
        (0..initial_rank.len())
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
                    .map(|&j| {
                        let original = match initial_rank[i].iter().position(|&n| n == j) {
                            Some(p) => nearest_d2[i][p] / row_max[i],
                            None => self.original(i, j as usize, row_max[i]),
                        };
                        (-original).exp()
                    })
                    .collect();
                let total: f32 = weights.iter().sum();
                expanded.into_iter().zip(weights).map(|(j, w)| (j, w / total)).collect()
            })
            .collect()
    }
}

/// Offers the rows `i0..` of a tile, whose squared distances are `block` (row-major,
/// `width` columns), to the column states `states`, which are the tile's columns
/// `c0..`: the rows are read in contiguous runs, maxima and thresholds kept in
/// arrays so that the common case (no admission) is a vectorised pass.
fn serve_columns(states: &mut [Neighbours], keep: usize, block: &[f32], width: usize, c0: usize, i0: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { serve_columns_avx512(states, keep, block, width, c0, i0) };
    }
    serve_columns_portable(states, keep, block, width, c0, i0)
}

/// [`serve_columns`] compiled for AVX-512 (16 lanes in one register).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn serve_columns_avx512(
    states: &mut [Neighbours],
    keep: usize,
    block: &[f32],
    width: usize,
    c0: usize,
    i0: usize,
) {
    serve_columns_portable(states, keep, block, width, c0, i0)
}

#[inline(always)]
fn serve_columns_portable(states: &mut [Neighbours], keep: usize, block: &[f32], width: usize, c0: usize, i0: usize) {
    let rows = block.len() / width;
    let mut max: Vec<f32> = states.iter().map(|s| s.max).collect();
    let mut threshold: Vec<f32> = states.iter().map(|s| s.threshold).collect();
    for r in 0..rows {
        let run = &block[r * width + c0..r * width + c0 + states.len()];
        for k0 in (0..run.len()).step_by(LANES) {
            let k1 = (k0 + LANES).min(run.len());
            if !raise_and_test(&run[k0..k1], &mut max[k0..k1], &threshold[k0..k1]) {
                continue;
            }
            for c in k0..k1 {
                if run[c] <= threshold[c] {
                    states[c].admit(keep, (i0 + r) as u32, run[c]);
                    threshold[c] = states[c].threshold;
                }
            }
        }
    }
    for (s, m) in states.iter_mut().zip(max) {
        s.max = m;
    }
}

/// Lanes of the vectorised scans.
const LANES: usize = 16;

/// Raises `max[k]` to `run[k]` (squared distances) and tells whether some
/// `run[k] <= threshold[k]`: one vector pass for a whole group of [`LANES`].
#[inline(always)]
fn raise_and_test(run: &[f32], max: &mut [f32], threshold: &[f32]) -> bool {
    if let (Ok(d), Ok(m), Ok(t)) = (
        <&[f32; LANES]>::try_from(run),
        <&mut [f32; LANES]>::try_from(&mut *max),
        <&[f32; LANES]>::try_from(threshold),
    ) {
        let mut hit = [false; LANES];
        for k in 0..LANES {
            m[k] = m[k].max(d[k]);
            hit[k] = d[k] <= t[k];
        }
        return hit.iter().any(|&h| h);
    }
    let mut hit = false;
    for ((d, m), t) in run.iter().zip(max).zip(threshold) {
        *m = m.max(*d);
        hit |= d <= t;
    }
    hit
}

/// Local query expansion: each encoding averaged over its row's k2 nearest rows.
fn expand(encodings: &[SparseRow], initial_rank: &[Vec<u32>], k2: usize) -> Vec<SparseRow> {
    if k2 <= 1 {
        return encodings.to_vec();
    }
    initial_rank
        .par_iter()
        .map(|near| {
            let mut merged: SparseRow = near[..k2]
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::row_norms;

    #[test]
    fn settings_parse_and_bad_ones_are_refused() {
        assert_eq!("20,6,0.3".parse::<RerankParams>().unwrap(), RerankParams::default());
        assert!("20,6".parse::<RerankParams>().is_err());
        assert!("20,30,0.3".parse::<RerankParams>().is_err());
        assert!("20,6,1.5".parse::<RerankParams>().is_err());
    }

    /// Distances of every query (gallery order) from a re-ranker cut as `tiling`.
    fn reranked(q: &Features, g: &Features, kept: &[usize], metric: Metric, tiling: Tiling) -> Vec<f32> {
        let r = Reranker::with_tiling(q, g, kept, metric, RerankParams::default(), tiling);
        let mut out = vec![0.0; q.len() * g.len()];
        r.distance_block(0, &mut out);
        out
    }

    #[test]
    fn every_tiling_gives_the_same_distances_up_to_rounding() {
        // 37 queries and 90 gallery rows, some junk, in 8 dimensions.
        let dim = 8;
        let value = |i: usize| {
            // splitmix64: well-spread values, so no two distances are near a tie.
            let mut x = (i as u64).wrapping_add(0x9e3779b97f4a7c15);
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
            ((x ^ (x >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 6.0 - 3.0
        };
        let qf: Vec<f32> = (0..37 * dim).map(value).collect();
        let gf: Vec<f32> = (0..90 * dim).map(|i| value(i + 5000)).collect();
        let (qn, gn) = (row_norms(&qf, dim), row_norms(&gf, dim));
        let q = Features {
            rows: &qf,
            dim,
            norms: &qn,
        };
        let g = Features {
            rows: &gf,
            dim,
            norms: &gn,
        };
        let all: Vec<usize> = (0..90).collect();
        let some: Vec<usize> = (0..90).filter(|j| j % 7 != 3).collect();
        for metric in [Metric::Cosine, Metric::Euclidean] {
            for kept in [&all, &some] {
                // One tile holding everything in one strip: the plainest cut.
                let want = reranked(&q, &g, kept, metric, Tiling { tile: 200, strip: 200 });
                assert!(want.iter().filter(|d| d.is_finite()).count() == 37 * kept.len());
                for (tile, strip) in [(1024, 256), (200, 5), (16, 5), (10, 10), (7, 3), (40, 1)] {
                    let got = reranked(&q, &g, kept, metric, Tiling { tile, strip });
                    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    // GEMMs of other shapes round differently (an ulp or so); a
                    // misplaced or missed entry moves distances by far more.
                    assert!(
                        diff <= 1e-6,
                        "{metric}, {} kept, tiles of {tile} in strips of {strip}: {diff}",
                        kept.len()
                    );
                }
            }
        }
    }

    #[test]
    fn numpy_rounding() {
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(10.0), 10);
    }
}
