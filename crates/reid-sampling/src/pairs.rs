//! The pair sampler: every training image once per epoch, in a seeded random order,
//! paired with a positive (same identity) or a negative (another identity).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reid_data::seed::mix;

/// One training pair: indices into the training images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub first: usize,
    pub second: usize,
    /// Whether both show the same identity.
    pub same: bool,
}

/// Draws the pairs of each epoch from the training labels.
#[derive(Debug, Clone)]
pub struct PairSampler {
    labels: Vec<usize>,
    by_label: Vec<Vec<usize>>,
    pos_fraction: f64,
    seed: u64,
}

/// Random stream ids, so that each use of the seed is independent.
const ORDER_STREAM: u64 = 11;
const PAIR_STREAM: u64 = 12;

impl PairSampler {
    /// `labels[i]` is the training label of image i (0..K-1); `pos_fraction` the
    /// probability that a pair is positive.
    pub fn new(labels: Vec<usize>, pos_fraction: f64, seed: u64) -> Self {
        let k = labels.iter().max().map_or(0, |m| m + 1);
        let mut by_label = vec![Vec::new(); k];
        for (i, &l) in labels.iter().enumerate() {
            by_label[l].push(i);
        }
        PairSampler {
            labels,
            by_label,
            pos_fraction: pos_fraction.clamp(0.0, 1.0),
            seed,
        }
    }

    /// Number of pairs per epoch (one per training image).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no training images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The label of image `i`.
    pub fn label(&self, i: usize) -> usize {
        self.labels[i]
    }

    /// The pairs of `epoch`, in training order; the same for the same (seed, epoch).
    pub fn epoch(&self, epoch: u64) -> Vec<Pair> {
        let mut order: Vec<usize> = (0..self.labels.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(self.seed, ORDER_STREAM, epoch)));
        order
            .into_iter()
            .enumerate()
            .map(|(k, first)| {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(self.seed, PAIR_STREAM, epoch), k as u64, 0));
                self.pair_for(first, &mut rng)
            })
            .collect()
    }

    fn pair_for(&self, first: usize, rng: &mut ChaCha8Rng) -> Pair {
        let label = self.labels[first];
        let only_one_identity = self.by_label.iter().filter(|v| !v.is_empty()).count() < 2;
        if only_one_identity || rng.gen_bool(self.pos_fraction) {
            let mates = &self.by_label[label];
            let second = if mates.len() > 1 {
                // A different image of the same identity.
                let pick = rng.gen_range(0..mates.len() - 1);
                let own = mates.iter().position(|&m| m == first).expect("image in its label list");
                mates[if pick >= own { pick + 1 } else { pick }]
            } else {
                first
            };
            return Pair {
                first,
                second,
                same: true,
            };
        }
        loop {
            let second = rng.gen_range(0..self.labels.len());
            if self.labels[second] != label {
                return Pair {
                    first,
                    second,
                    same: false,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<usize> {
        // Identity 3 has a single image.
        vec![0, 0, 1, 1, 1, 2, 2, 3, 0, 2]
    }

    #[test]
    fn every_image_once_per_epoch_in_a_seeded_order() {
        let s = PairSampler::new(labels(), 0.5, 9);
        let a = s.epoch(0);
        let mut firsts: Vec<usize> = a.iter().map(|p| p.first).collect();
        firsts.sort();
        assert_eq!(firsts, (0..10).collect::<Vec<_>>());
        assert_eq!(a, s.epoch(0));
        assert_ne!(a, s.epoch(1));
        assert_ne!(a, PairSampler::new(labels(), 0.5, 10).epoch(0));
    }

    #[test]
    fn pairs_are_labelled_right_and_single_image_identities_work() {
        let l = labels();
        let s = PairSampler::new(l.clone(), 0.5, 1);
        for e in 0..50 {
            for p in s.epoch(e) {
                assert_eq!(p.same, l[p.first] == l[p.second]);
                if p.same && l[p.first] != 3 {
                    assert_ne!(p.first, p.second, "a positive uses another image where one exists");
                }
            }
        }
        let lonely = s.epoch(0).into_iter().find(|p| p.first == 7).unwrap();
        assert!(lonely.second == 7 || !lonely.same);
    }

    #[test]
    fn the_positive_fraction_holds_within_sampling_error() {
        let n = 2000;
        let l: Vec<usize> = (0..n).map(|i| i % 100).collect();
        for frac in [0.2, 0.5] {
            let s = PairSampler::new(l.clone(), frac, 3);
            let positives: usize = (0..5).map(|e| s.epoch(e).iter().filter(|p| p.same).count()).sum();
            let expected = frac * 5.0 * n as f64;
            let sd = (5.0 * n as f64 * frac * (1.0 - frac)).sqrt();
            assert!(
                (positives as f64 - expected).abs() < 5.0 * sd,
                "{frac}: {positives} vs {expected}"
            );
        }
    }
}
