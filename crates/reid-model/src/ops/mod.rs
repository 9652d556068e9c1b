//! Operations candle 0.11 lacks or gets wrong for training, with their backward.

pub mod batch_norm;
pub mod channels;
pub mod conv;
pub mod pool;
pub mod residual;

use std::mem::MaybeUninit;

use rayon::prelude::*;

pub use channels::channel_slice;
pub use conv::conv2d;
pub use pool::{avg_pool2d, max_pool2d};
pub use residual::add_relu;

/// A vector of `len` values, each written by `fill` (given disjoint chunks of
/// `chunk` values and their index) before the vector exists: no zeroing pass.
pub(crate) fn filled_in_chunks<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: `fill` wrote every value of every chunk (its contract).
    unsafe { out.set_len(len) };
    out
}

/// Deterministic random tensors for the ops' tests.
#[cfg(test)]
pub(crate) mod test_tensors {
    use candle_core::{Device, Tensor};

    /// Uniform values in [-1, 1) as f64, from a seeded linear congruential stream.
    pub fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}
