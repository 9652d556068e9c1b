//! The f32 group sums with AVX2: 8 positions of the 8 planes are loaded as 8
//! vectors and transposed, so that each vector holds one position of every
//! plane, and the chains advance a position at a time in vector lanes (lanes
//! 0-3 and 4-7 as two f64 vectors). Each lane does its plane's additions in the
//! scalar code's order, with the same roundings; positions past the last whole
//! block of 8 finish in scalar code.

use std::arch::x86_64::*;

use super::{Rows, LANES};

/// Two f64 vectors: lanes 0-3 and 4-7.
type Pair = [__m256d; 2];

/// Positions `at..at + 8` of the 8 rows, one vector per position.
#[inline(always)]
unsafe fn columns(r: &Rows<f32>, at: usize) -> [__m256; 8] {
    let mut v = [_mm256_setzero_ps(); 8];
    for (v, row) in v.iter_mut().zip(r) {
        *v = _mm256_loadu_ps(row[at..at + 8].as_ptr());
    }
    transpose(v)
}

/// The 8 x 8 transpose: out[j][k] = v[k][j].
#[inline(always)]
unsafe fn transpose(v: [__m256; 8]) -> [__m256; 8] {
    let mut t = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // u[0..4] from rows 0-3, u[4..8] from rows 4-7: positions 0-3 (and 4-7
    // in the upper halves) of four rows each.
    let mut u = [_mm256_setzero_ps(); 8];
    for h in [0, 4] {
        u[h] = _mm256_shuffle_ps::<0x44>(t[h], t[h + 2]);
        u[h + 1] = _mm256_shuffle_ps::<0xEE>(t[h], t[h + 2]);
        u[h + 2] = _mm256_shuffle_ps::<0x44>(t[h + 1], t[h + 3]);
        u[h + 3] = _mm256_shuffle_ps::<0xEE>(t[h + 1], t[h + 3]);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for j in 0..4 {
        out[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[j + 4]);
        out[j + 4] = _mm256_permute2f128_ps::<0x31>(u[j], u[j + 4]);
    }
    out
}

#[inline(always)]
unsafe fn widen(c: __m256) -> Pair {
    [
        _mm256_cvtps_pd(_mm256_castps256_ps128(c)),
        _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(c)),
    ]
}

#[inline(always)]
unsafe fn load(v: &[f64; LANES]) -> Pair {
    [_mm256_loadu_pd(v[..4].as_ptr()), _mm256_loadu_pd(v[4..].as_ptr())]
}

#[inline(always)]
unsafe fn store(p: Pair) -> [f64; LANES] {
    let mut out = [0.0; LANES];
    _mm256_storeu_pd(out[..4].as_mut_ptr(), p[0]);
    _mm256_storeu_pd(out[4..].as_mut_ptr(), p[1]);
    out
}

/// `acc[k] += (x - centre[k])^2` (or `+= x` without a centre) over each row,
/// from `acc` as given.
///
/// # Safety
/// The CPU must have AVX2; the rows must be of one length.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn sum(r: Rows<f32>, centre: Option<[f64; LANES]>, acc: [f64; LANES]) -> [f64; LANES] {
    let len = r[0].len();
    let (mut acc, m) = (load(&acc), load(&centre.unwrap_or([0.0; LANES])));
    for at in (0..len / 8 * 8).step_by(8) {
        for c in columns(&r, at) {
            let v = widen(c);
            for h in 0..2 {
                let term = match centre {
                    Some(_) => {
                        let d = _mm256_sub_pd(v[h], m[h]);
                        _mm256_mul_pd(d, d)
                    }
                    None => v[h],
                };
                acc[h] = _mm256_add_pd(acc[h], term);
            }
        }
    }
    let mut acc = store(acc);
    for (k, a) in acc.iter_mut().enumerate() {
        for &v in &r[k][len / 8 * 8..] {
            *a += match centre {
                Some(m) => (v as f64 - m[k]).powi(2),
                None => v as f64,
            };
        }
    }
    acc
}

/// The batch norm backward's sums over each row: `[sum(g (x - mean)), sum(g)]`,
/// with `g` zero where `relu` and `y <= 0`.
///
/// # Safety
/// The CPU must have AVX2; the rows must be of one length.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn grad([xs, ys, gs]: [Rows<f32>; 3], relu: bool, mean: [f64; LANES]) -> [[f64; 2]; LANES] {
    let len = xs[0].len();
    let zero = _mm256_setzero_ps();
    let (mut sgx, mut sg, m) = ([_mm256_setzero_pd(); 2], [_mm256_setzero_pd(); 2], load(&mean));
    for at in (0..len / 8 * 8).step_by(8) {
        let mut kept = [zero; 8];
        for k in 0..LANES {
            let g = _mm256_loadu_ps(gs[k][at..at + 8].as_ptr());
            let y = _mm256_loadu_ps(ys[k][at..at + 8].as_ptr());
            kept[k] = match relu {
                true => _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(y, zero), g),
                false => g,
            };
        }
        for (g, x) in transpose(kept).into_iter().zip(columns(&xs, at)) {
            let (g, x) = (widen(g), widen(x));
            for h in 0..2 {
                sg[h] = _mm256_add_pd(sg[h], g[h]);
                sgx[h] = _mm256_add_pd(sgx[h], _mm256_mul_pd(g[h], _mm256_sub_pd(x[h], m[h])));
            }
        }
    }
    let (mut sgx, mut sg) = (store(sgx), store(sg));
    let tail = len / 8 * 8..len;
    for k in 0..LANES {
        let (x, y, g) = (&xs[k][tail.clone()], &ys[k][tail.clone()], &gs[k][tail.clone()]);
        for ((&x, &y), &g) in x.iter().zip(y).zip(g) {
            let gm = if relu && y <= 0.0 { 0.0 } else { g as f64 };
            sg[k] += gm;
            sgx[k] += gm * (x as f64 - mean[k]);
        }
    }
    std::array::from_fn(|k| [sgx[k], sg[k]])
}
