//! What the step tests share: a small pair batch of random images.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use reid_model::PairTargets;
use reid_train::BatchTensors;

/// Four pairs of 64 x 32 images, values uniform in [-1, 1) drawn from `seed`,
/// two of them of one identity, of six identities in all.
pub fn batch(seed: u64) -> BatchTensors {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut images = || {
        let v: Vec<f32> = (0..4 * 3 * 64 * 32).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, (4, 3, 64, 32), &Device::Cpu).unwrap()
    };
    let labels = |v: [i64; 4]| Tensor::new(&v, &Device::Cpu).unwrap();
    BatchTensors {
        x1: images(),
        x2: images(),
        targets: PairTargets {
            y1: labels([0, 1, 2, 3]),
            y2: labels([0, 4, 2, 5]),
            same: labels([0, 1, 0, 1]),
        },
    }
}
