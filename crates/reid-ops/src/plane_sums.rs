//! Batch norm's per-channel sums over the (n, c) planes of an [N, C, H*W]
//! tensor, in a fixed order: each plane is one serial chain of f64 additions in
//! value order, and the planes' sums are added per channel in plane order. The
//! result does not depend on the thread count or the vector width.
//!
//! Each addition of a chain waits for the one before it (about 4 cycles), so a
//! plane summed alone leaves the adders mostly idle. [`LANES`] planes are summed
//! side by side instead, each in its own chain, with the same additions in the
//! same order: the same bits, at a fraction of the time.

use std::any::TypeId;

use num_traits::Float;
use rayon::prelude::*;

use crate::with_widest_simd;

#[cfg(target_arch = "x86_64")]
mod columns;

/// Planes summed side by side.
pub(crate) const LANES: usize = 8;

/// Values per pass of the backward sums' ReLU mask.
const CHUNK: usize = 256;

/// One plane of each lane of a group, as slices of `hw` values.
pub(crate) type Rows<'a, T> = [&'a [T]; LANES];

/// The planes of group `g` in `x`: planes `g * LANES ..`, with the last plane
/// repeated where the group runs past the end (those lanes' sums are dropped).
#[inline(always)]
pub(crate) fn rows<T>(x: &[T], g: usize, hw: usize) -> Rows<'_, T> {
    rows_by(|p| &x[p * hw..(p + 1) * hw], g, x.len() / hw)
}

/// [`rows`] of a tensor of `planes` planes whose plane `p` is `plane(p)`.
#[inline(always)]
pub(crate) fn rows_by<'a, T>(plane: impl Fn(usize) -> &'a [T], g: usize, planes: usize) -> Rows<'a, T> {
    std::array::from_fn(|k| plane((g * LANES + k).min(planes - 1)))
}

/// Two sums per channel: `group(g)` returns the two serial sums of each plane
/// of group `g` (see [`rows`]); groups run in parallel, and their planes' sums
/// are added per channel in plane order.
pub(crate) fn per_channel(
    (n, c, _): (usize, usize, usize),
    group: impl Fn(usize) -> [[f64; 2]; LANES] + Sync,
) -> Vec<[f64; 2]> {
    let planes = n * c;
    let partial: Vec<[[f64; 2]; LANES]> = (0..planes.div_ceil(LANES)).into_par_iter().map(&group).collect();
    let mut out = vec![[0.0; 2]; c];
    for (p, v) in partial.iter().flatten().take(planes).enumerate() {
        out[p % c][0] += v[0];
        out[p % c][1] += v[1];
    }
    out
}

/// A per-lane value for the planes of group `g`, from their channels' values.
#[inline(always)]
pub(crate) fn per_lane(of_channel: &[f64], g: usize) -> [f64; LANES] {
    std::array::from_fn(|k| of_channel[(g * LANES + k) % of_channel.len()])
}

/// The rows as f32 rows, where `T` is f32.
fn as_f32<'a, T: 'static>(r: &Rows<'a, T>) -> Option<Rows<'a, f32>> {
    // SAFETY: T is f32.
    let cast = |s: &'a [T]| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) };
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| r.map(cast))
}

/// Each row's sum (`centre` None), or its sum of squares about `centre[k]`:
/// one chain per row from -0.0, as `Iterator::sum` adds.
pub(crate) fn sums<T: Float + 'static>(r: Rows<T>, centre: Option<[f64; LANES]>) -> [f64; LANES] {
    #[cfg(target_arch = "x86_64")]
    if let (Some(r), true) = (as_f32(&r), std::arch::is_x86_feature_detected!("avx2")) {
        // SAFETY: the CPU has AVX2; `rows` cuts rows of one length.
        return unsafe { columns::sum(r, centre, [-0.0; LANES]) };
    }
    let mut acc = [-0.0f64; LANES];
    with_widest_simd!(match centre {
        None => (0..r[0].len()).for_each(|i| (0..LANES).for_each(|k| acc[k] += r[k][i].to_f64().unwrap())),
        Some(m) =>
            (0..r[0].len()).for_each(|i| (0..LANES).for_each(|k| acc[k] += (r[k][i].to_f64().unwrap() - m[k]).powi(2))),
    });
    acc
}

/// The batch norm backward's sums over each row, `[sum(g (x - mean)), sum(g)]`,
/// where `g` is the gradient reaching the batch norm: zero where `relu` and the
/// output `y <= 0`.
pub(crate) fn grad_sums<T: Float + 'static>(xyg: [Rows<T>; 3], relu: bool, mean: [f64; LANES]) -> [[f64; 2]; LANES] {
    #[cfg(target_arch = "x86_64")]
    if let ([Some(x), Some(y), Some(g)], true) =
        (xyg.each_ref().map(as_f32), std::arch::is_x86_feature_detected!("avx2"))
    {
        // SAFETY: the CPU has AVX2; `rows` cuts rows of one length.
        return unsafe { columns::grad([x, y, g], relu, mean) };
    }
    with_widest_simd!(grad_sums_chunked(xyg, relu, mean))
}

/// [`grad_sums`] in plain code: the mask a chunk at a time (vector selects),
/// then the chains.
#[inline(always)]
fn grad_sums_chunked<T: Float>([xs, ys, gs]: [Rows<T>; 3], relu: bool, mean: [f64; LANES]) -> [[f64; 2]; LANES] {
    let hw = xs[0].len();
    let (mut sgx, mut sg) = ([0.0f64; LANES], [0.0f64; LANES]);
    let mut kept = [[T::zero(); CHUNK]; LANES];
    for start in (0..hw).step_by(CHUNK) {
        let len = CHUNK.min(hw - start);
        for k in 0..LANES {
            let (g, y) = (&gs[k][start..start + len], &ys[k][start..start + len]);
            for ((o, &gv), &yv) in kept[k][..len].iter_mut().zip(g).zip(y) {
                *o = if relu && yv <= T::zero() { T::zero() } else { gv };
            }
        }
        for i in 0..len {
            for k in 0..LANES {
                let gm = kept[k][i].to_f64().unwrap();
                sg[k] += gm;
                sgx[k] += gm * (xs[k][start + i].to_f64().unwrap() - mean[k]);
            }
        }
    }
    std::array::from_fn(|k| [sgx[k], sg[k]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grouped chains against one chain per plane, on planes of odd sizes whose
    /// count is no multiple of LANES: the same bits.
    #[test]
    fn planes_side_by_side_give_the_bits_of_one_at_a_time() {
        for (n, c, hw) in [(3, 5, 7), (2, 8, 33), (1, 3, 1), (4, 9, 300)] {
            let x: Vec<f64> = (0..n * c * hw)
                .map(|i| ((i * 7919) % 1013) as f64 / 7.0 - 70.0)
                .collect();
            let want = {
                let mut out = vec![[0.0; 2]; c];
                for (p, plane) in x.chunks(hw).enumerate() {
                    out[p % c][0] += plane.iter().sum::<f64>();
                    out[p % c][1] += plane.iter().map(|v| v * 1.25).sum::<f64>();
                }
                out
            };
            let got = per_channel((n, c, hw), |g| {
                let r = rows(&x, g, hw);
                let mut acc = [[-0.0; 2]; LANES];
                for (a, row) in acc.iter_mut().zip(r) {
                    for &v in row {
                        a[0] += v;
                        a[1] += v * 1.25;
                    }
                }
                acc
            });
            let bits = |v: &[[f64; 2]]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{n}x{c}x{hw}");
        }
    }

    /// f32 rows, with a NaN, negative zeros and exact zeros among them.
    fn rows_f32(len: usize, seed: usize) -> Vec<Vec<f32>> {
        (0..LANES)
            .map(|k| {
                let mut r: Vec<f32> = (0..len)
                    .map(|i| (((i + 31 * k) * 7919 + seed) % 1013) as f32 / 300.0 - 1.5)
                    .collect();
                if len > 5 {
                    // At places that differ between the seeds of x, y and g.
                    r[(seed + 2) % len] = -0.0;
                    r[(len - seed) % len] = 0.0;
                    r[(len / 2 + seed) % len] = if k == 2 { f32::NAN } else { 1.0 };
                }
                r
            })
            .collect()
    }

    fn r(v: &[Vec<f32>]) -> Rows<'_, f32> {
        std::array::from_fn(|k| &v[k][..])
    }

    /// The AVX2 path (where the CPU has it) against the plain chains, over
    /// lengths around its blocks of 8: the same bits, NaN included.
    #[test]
    fn the_transposed_f32_sums_give_the_bits_of_the_plain_chains() {
        for len in [1, 7, 8, 9, 16, 61, 300] {
            let (x, y, g) = (rows_f32(len, 1), rows_f32(len, 2), rows_f32(len, 3));
            let m: [f64; LANES] = std::array::from_fn(|k| k as f64 * 0.1 - 0.3);
            let plain_sum = |c: Option<[f64; LANES]>| -> [f64; LANES] {
                std::array::from_fn(|k| match c {
                    None => x[k].iter().map(|&v| v as f64).sum(),
                    Some(m) => x[k].iter().map(|&v| (v as f64 - m[k]).powi(2)).sum(),
                })
            };
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for c in [None, Some(m)] {
                assert_eq!(bits(&sums(r(&x), c)), bits(&plain_sum(c)), "len {len}, {c:?}");
            }
            for relu in [false, true] {
                let got = grad_sums([r(&x), r(&y), r(&g)], relu, m);
                let want = grad_sums_chunked([r(&x), r(&y), r(&g)], relu, m);
                assert_eq!(
                    bits(got.as_flattened()),
                    bits(want.as_flattened()),
                    "len {len}, relu {relu}"
                );
            }
        }
    }
}
