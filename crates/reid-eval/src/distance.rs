//! Query-gallery distances by matrix multiplication, exact where it matters.
//!
//! The features are used as they are (no normalised copy): one f32 GEMM per block
//! of queries against the whole gallery gives the dot products, with gemm's own
//! parallelism, so the gallery is packed once per block of hundreds of queries;
//! norms are summed in f64 and the distance formed in f64 before it is stored as
//! f32. Where the order of two entries could depend on the f32 rounding, the
//! caller recomputes their distances in f64 ([`Features::exact`]); the bound on the
//! rounding is [`Features::tolerance`].

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use serde::Serialize;

use crate::amx;

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

/// Unit roundoff of f32.
const U32: f64 = f32::EPSILON as f64 / 2.0;

/// Row-major features [n, dim] with their norms in f64.
#[derive(Debug, Clone, Copy)]
pub struct Features<'a> {
    pub rows: &'a [f32],
    pub dim: usize,
    /// L2 norm of each row, summed in f64.
    pub norms: &'a [f64],
}

/// The L2 norm of each row of `rows` [n, dim], summed in f64.
pub fn row_norms(rows: &[f32], dim: usize) -> Vec<f64> {
    rows.par_chunks_exact(dim.max(1))
        .map(|r| r.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt())
        .collect()
}

impl Features<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.norms.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.norms.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.dim..(i + 1) * self.dim]
    }

    /// The distance of row `i` to row `j` of `other` from a dot product `dot`.
    fn distance_of_dot(&self, metric: Metric, i: usize, other: &Features, j: usize, dot: f64) -> f64 {
        let (a, b) = (self.norms[i], other.norms[j]);
        match metric {
            Metric::Cosine => 1.0 - dot / (a * b).max(1e-300),
            Metric::Euclidean => a * a + b * b - 2.0 * dot,
        }
    }

    /// The distance of row `i` to row `j` of `other`, computed in f64 throughout.
    pub fn exact(&self, metric: Metric, i: usize, other: &Features, j: usize) -> f64 {
        self.distance_of_dot(metric, i, other, j, dot_f64(self.row(i), other.row(j)))
    }

    /// A bound on |stored distance - exact distance| for rows `i` and `j` of
    /// `other`: the f32 dot product is off by at most `dim * u * |q| |g|` (u the f32
    /// unit roundoff), and storing the distance as f32 adds one more rounding.
    pub fn tolerance(&self, metric: Metric, i: usize, other: &Features, j: usize) -> f64 {
        self.tolerance_for(metric, i, other.norms[j])
    }

    /// [`Features::tolerance`] for a row of norm `b`; with the largest norm of the
    /// other set, a bound over all its rows.
    pub fn tolerance_for(&self, metric: Metric, i: usize, b: f64) -> f64 {
        let a = self.norms[i];
        let gemm = 1.01 * (self.dim as f64 + 2.0) * U32;
        match metric {
            Metric::Cosine => gemm + 2.0 * 2.0 * U32,
            Metric::Euclidean => 2.0 * gemm * a * b + 4.0 * U32 * (a * a + b * b),
        }
    }

    /// Dot products of query rows `start..start + rows` with rows `from..from +
    /// cols` of `other`, into `out` [rows, cols], summed over [`SLICE`]s of the
    /// dimensions, one GEMM each (see [`Features::slice_tolerance`]).
    pub fn dot_tile(&self, start: usize, rows: usize, other: &Features, from: usize, cols: usize, out: &mut [f32]) {
        let dim = self.dim;
        let lhs = &self.rows[start * dim..(start + rows) * dim];
        let rhs = &other.rows[from * dim..(from + cols) * dim];
        for k0 in (0..dim).step_by(SLICE) {
            let k = SLICE.min(dim - k0);
            gemm_nt(rows, cols, k, out, cols, k0 > 0, &lhs[k0..], dim, &rhs[k0..], dim);
        }
    }

    /// The distance of query row `i` to row `j` of `other` from their dot product,
    /// formed in f64.
    pub fn distance_from_dot(&self, metric: Metric, i: usize, other: &Features, j: usize, dot: f32) -> f64 {
        self.distance_of_dot(metric, i, other, j, dot as f64)
    }

    /// A bound on |distance from the dot of [`Features::dot_tile`] - exact
    /// distance| for rows `i` and `j` of `other` (of norm `b`): every f32 addition
    /// chain is at most `SLICE + slices` long, so the dot is off by at most that
    /// many unit roundoffs times `|q| |g|`.
    pub fn slice_tolerance(&self, metric: Metric, i: usize, b: f64) -> f64 {
        let chain = SLICE.min(self.dim) + self.dim.div_ceil(SLICE) + 1;
        let gemm = 1.01 * chain as f64 * U32;
        let a = self.norms[i];
        match metric {
            Metric::Cosine => gemm + 2.0 * U32,
            Metric::Euclidean => 2.0 * gemm * a * b + 2.0 * U32 * (a * a + b * b),
        }
    }

    /// Distances from query rows `start..start + out.len() / other.len()` to every
    /// row of `other`, into `out` (row-major): one parallel GEMM, then the
    /// distances formed in f64 per row.
    pub fn distances(&self, metric: Metric, start: usize, other: &Features, out: &mut [f32]) {
        self.distances_range(metric, start, other, 0, out)
    }

    /// [`Features::distances`] to the rows `from..` of `other` only.
    pub fn distances_range(&self, metric: Metric, start: usize, other: &Features, from: usize, out: &mut [f32]) {
        let (dim, ng) = (self.dim, other.len() - from);
        assert_eq!(dim, other.dim, "feature dimensions differ");
        let bq = out.len() / ng.max(1);
        assert!(out.len() == bq * ng && start + bq <= self.len() && other.rows.len() >= (from + ng) * dim);
        let lhs = &self.rows[start * dim..(start + bq) * dim];
        // The gallery in panels, so that gemm's packing buffers stay small.
        for p0 in (0..ng).step_by(PANEL) {
            let width = PANEL.min(ng - p0);
            let rhs = &other.rows[(from + p0) * dim..(from + p0 + width) * dim];
            // Columns p0..p0 + width of `out` (bq x ng row-major, row stride ng).
            gemm_nt(bq, width, dim, &mut out[p0..], ng, false, lhs, dim, rhs, dim);
        }
        let inverse: Vec<f64> = other.norms[from..from + ng]
            .iter()
            .map(|n| 1.0 / n.max(1e-300))
            .collect();
        out.par_chunks_exact_mut(ng).enumerate().for_each(|(r, row)| {
            let i = start + r;
            match metric {
                Metric::Cosine => {
                    let iq = 1.0 / self.norms[i].max(1e-300);
                    for (d, ig) in row.iter_mut().zip(&inverse) {
                        *d = (1.0 - *d as f64 * iq * ig) as f32;
                    }
                }
                Metric::Euclidean => {
                    for (j, d) in row.iter_mut().enumerate() {
                        *d = self.distance_of_dot(metric, i, other, from + j, *d as f64) as f32;
                    }
                }
            }
        });
    }
}

/// The dot product of `a` and `b` in f64, in eight partial sums: with the widest
/// vectors the CPU has (the same additions in the same order on every path, so the
/// same bits; nothing is fused into an FMA).
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { dot_f64_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { dot_f64_avx2(a, b) };
        }
    }
    dot_f64_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f64_avx512(a: &[f32], b: &[f32]) -> f64 {
    dot_f64_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_f64_avx2(a: &[f32], b: &[f32]) -> f64 {
    dot_f64_portable(a, b)
}

/// [`dot_f64`] for any CPU, and the body of its vector versions.
#[inline(always)]
fn dot_f64_portable(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] as f64 * y[k] as f64;
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(&x, &y)| x as f64 * y as f64).sum();
    acc.iter().sum::<f64>() + tail
}

/// Appends to `out` the columns `c` (as u32) where `dots[c] * weights[c]`,
/// multiplied in f32, is not below `floor` (NaN products included): the entries
/// that may rank before a threshold, gathered without a branch per entry.
pub fn columns_at_least(dots: &[f32], weights: &[f32], floor: f32, out: &mut Vec<u32>) {
    assert_eq!(dots.len(), weights.len(), "one weight per dot product");
    assert!(dots.len() <= u32::MAX as usize);
    out.clear();
    // Room for every column, and for the whole last vector a compress writes.
    out.reserve(dots.len() + 16);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, and `out` has room for `dots.len() + 16`.
            unsafe { columns_at_least_avx512(dots, weights, floor, out) };
            return;
        }
    }
    columns_at_least_from(0, dots, weights, floor, out);
}

/// [`columns_at_least`] from column `c0` on, one column at a time (into the
/// reserved room: every column is written, the length grows by the test).
fn columns_at_least_from(c0: usize, dots: &[f32], weights: &[f32], floor: f32, out: &mut Vec<u32>) {
    let (len, room) = (out.len(), out.spare_capacity_mut());
    let mut kept = 0;
    for c in c0..dots.len() {
        room[kept].write(c as u32);
        kept += not_below(dots[c] * weights[c], floor) as usize;
    }
    // SAFETY: the first `kept` slots of the spare room were written.
    unsafe { out.set_len(len + kept) };
}

/// Whether `x` is not below `floor`: greater, equal or unordered (NaN).
#[inline(always)]
fn not_below(x: f32, floor: f32) -> bool {
    x.partial_cmp(&floor) != Some(std::cmp::Ordering::Less)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns_at_least_avx512(dots: &[f32], weights: &[f32], floor: f32, out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    let n = dots.len();
    let bound = _mm512_set1_ps(floor);
    let step = _mm512_set1_epi32(16);
    let mut columns = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let (mut c, mut len) = (0, out.len());
    while c + 16 <= n {
        let d = _mm512_loadu_ps(dots.as_ptr().add(c));
        let w = _mm512_loadu_ps(weights.as_ptr().add(c));
        // Not less than, unordered: a NaN product is kept, as in the scalar test.
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(_mm512_mul_ps(d, w), bound);
        // Compressed in a register, then stored whole (a compressing store to
        // memory is slow on some CPUs); `out` has room for 16 past its length.
        let packed = _mm512_maskz_compress_epi32(keep, columns);
        _mm512_storeu_si512(out.as_mut_ptr().add(len) as *mut _, packed);
        len += keep.count_ones() as usize;
        columns = _mm512_add_epi32(columns, step);
        c += 16;
    }
    out.set_len(len);
    columns_at_least_from(c, dots, weights, floor, out);
}

/// How the exact ranking forms its dot products: an f32 GEMM per [`SLICE`] of the
/// dimensions, or bf16 parts on AMX tiles ([`crate::amx`]) where the CPU has them
/// and every norm lies in their range. Each comes with its own error bound.
#[derive(Debug, Clone)]
pub enum DotKernel {
    F32,
    Amx(amx::Bounds),
}

/// A block of queries as a [`DotKernel`] takes them.
pub enum QueryBlock {
    /// Rows `start..start + rows` of the queries, read in place.
    F32 {
        start: usize,
        rows: usize,
    },
    Amx(amx::Strips),
}

impl DotKernel {
    /// AMX where this process can use it and the norms of `q` and `g` allow it.
    pub fn for_features(q: &Features, g: &Features) -> Self {
        let (lo, hi) = amx::NORM_RANGE;
        let in_range = |f: &&Features| f.norms.iter().all(|n| (lo..=hi).contains(n));
        if amx::usable() && [q, g].iter().all(in_range) {
            DotKernel::Amx(amx::Bounds::new(q.rows, g.rows, q.dim))
        } else {
            DotKernel::F32
        }
    }

    /// Query rows `start..start + rows` of `q`, packed where this kernel packs them.
    pub fn queries(&self, q: &Features, start: usize, rows: usize) -> QueryBlock {
        match self {
            DotKernel::F32 => QueryBlock::F32 { start, rows },
            DotKernel::Amx(_) => {
                QueryBlock::Amx(amx::Strips::new(&q.rows[start * q.dim..(start + rows) * q.dim], q.dim))
            }
        }
    }

    /// Dot products of a block of queries of `q` with rows `from..from + cols` of
    /// `g`, into `out` [rows, cols] (see [`Features::dot_tile`]).
    pub fn tile(&self, block: &QueryBlock, q: &Features, g: &Features, from: usize, cols: usize, out: &mut [f32]) {
        match block {
            QueryBlock::F32 { start, rows } => q.dot_tile(*start, *rows, g, from, cols, out),
            QueryBlock::Amx(strips) => amx::dot_tile(strips, &g.rows[from * g.dim..(from + cols) * g.dim], out),
        }
    }

    /// A bound on |distance from this kernel's dot - exact distance| of query `i`
    /// and gallery row `j` (of norm `b`); with `None` for `j` and the largest
    /// gallery norm for `b`, over every gallery row.
    pub fn tolerance(&self, q: &Features, metric: Metric, i: usize, j: Option<usize>, b: f64) -> f64 {
        let bounds = match self {
            DotKernel::F32 => return q.slice_tolerance(metric, i, b),
            DotKernel::Amx(bounds) => bounds,
        };
        let a = q.norms[i];
        let dot = bounds.dot(i, a, j, b);
        match metric {
            Metric::Cosine => dot / (a * b).max(1e-300) + 2.0 * U32,
            Metric::Euclidean => 2.0 * dot + 2.0 * U32 * (a * a + b * b),
        }
    }
}

/// Gallery rows per GEMM call.
pub(crate) const PANEL: usize = 8192;

/// Depth of one GEMM of [`Features::dot_tile`]: the dot products are summed over
/// slices of this many dimensions, each slice by its own GEMM, so that no chain of
/// f32 additions is longer than a slice plus the number of slices (the error
/// bound is proportional to that length, not to the whole dimension).
pub const SLICE: usize = 256;

/// f32 GEMM into `out` (bq x n, row stride `ld`) of `lhs` (bq x k, row stride
/// `lda`) by the transpose of `rhs` (n x k, row stride `ldb`); with `accumulate`,
/// added to `out` (gemm sums the product in registers from zero, then adds it to
/// the destination once: one more rounding per call, not a longer chain).
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(
    bq: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: &[f32],
    lda: usize,
    rhs: &[f32],
    ldb: usize,
) {
    if bq == 0 || n == 0 {
        return;
    }
    assert!(out.len() >= (bq - 1) * ld + n && lhs.len() >= (bq - 1) * lda + k && rhs.len() >= (n - 1) * ldb + k);
    // SAFETY: the asserts bound every index the strides describe.
    unsafe {
        gemm::gemm(
            bq,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            lda as isize,
            rhs.as_ptr(),
            ldb as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// Queries per GEMM: as many as keep the block of distances under 64 MiB (the
/// gallery is packed once per block), between 32 and 1024.
pub fn query_block(gallery: usize) -> usize {
    ((64 << 20) / (4 * gallery.max(1))).clamp(32, 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_of_the_f64_dot_gives_the_same_bits() {
        let a: Vec<f32> = (0..2051).map(|i| ((i * 37) % 101) as f32 / 7.0 - 6.5).collect();
        let b: Vec<f32> = (0..2051).map(|i| ((i * 53) % 97) as f32 / 3.0 - 15.0).collect();
        let want = dot_f64_portable(&a, &b);
        let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((want - exact).abs() < 1e-9 * exact.abs());
        assert_eq!(dot_f64(&a, &b).to_bits(), want.to_bits());
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                assert_eq!(unsafe { dot_f64_avx2(&a, &b) }.to_bits(), want.to_bits());
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert_eq!(unsafe { dot_f64_avx512(&a, &b) }.to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn every_path_gathers_the_columns_at_least_the_floor() {
        // Lengths around the vector width, NaN and infinite products, ties.
        for n in [0, 1, 15, 16, 17, 40, 333] {
            let dots: Vec<f32> = (0..n).map(|i| ((i * 29) % 23) as f32 / 4.0 - 2.0).collect();
            let mut weights: Vec<f32> = (0..n).map(|i| 1.0 + (i % 3) as f32 / 2.0).collect();
            if n > 17 {
                weights[3] = f32::NAN;
                weights[17] = f32::INFINITY;
            }
            let floor = 0.75;
            let want: Vec<u32> = (0..n as u32)
                .filter(|&c| {
                    let x = dots[c as usize] * weights[c as usize];
                    x >= floor || x.is_nan()
                })
                .collect();
            let mut got = vec![99];
            columns_at_least(&dots, &weights, floor, &mut got);
            assert_eq!(got, want, "n = {n}");
            let mut portable = Vec::with_capacity(n + 16);
            columns_at_least_from(0, &dots, &weights, floor, &mut portable);
            assert_eq!(portable, want, "portable, n = {n}");
        }
    }

    #[test]
    fn gemm_distances_match_f64_within_their_tolerance() {
        let dim = 67;
        let q: Vec<f32> = (0..5 * dim).map(|i| ((i * 7) % 11) as f32 - 4.0).collect();
        let g: Vec<f32> = (0..9 * dim).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        let (qn, gn) = (row_norms(&q, dim), row_norms(&g, dim));
        let (qf, gf) = (
            Features {
                rows: &q,
                dim,
                norms: &qn,
            },
            Features {
                rows: &g,
                dim,
                norms: &gn,
            },
        );
        for metric in [Metric::Cosine, Metric::Euclidean] {
            let mut out = vec![0.0; 3 * 9];
            qf.distances(metric, 2, &gf, &mut out);
            for i in 0..3 {
                for j in 0..9 {
                    let a = &q[(i + 2) * dim..(i + 3) * dim];
                    let b = &g[j * dim..(j + 1) * dim];
                    let want = match metric {
                        Metric::Cosine => {
                            let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                            1.0 - dot / (qn[i + 2] * gn[j])
                        }
                        Metric::Euclidean => a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum(),
                    };
                    let exact = qf.exact(metric, i + 2, &gf, j);
                    assert!((exact - want).abs() < 1e-9 * want.abs().max(1.0), "{metric} exact");
                    let tol = qf.tolerance(metric, i + 2, &gf, j);
                    assert!((out[i * 9 + j] as f64 - exact).abs() <= tol, "{metric} {i} {j}");
                }
            }
        }
    }
}
