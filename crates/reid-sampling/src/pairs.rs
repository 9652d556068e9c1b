//! The samplers of training batches, both as lists of pairs for the loader:
//! - pairs: every training image once per epoch, in a seeded random order, paired
//!   with a positive (same identity) or a negative (another identity);
//! - P x K: batches of P identities with K images each, every identity once per
//!   epoch (see [`PairSampler::pk`]).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reid_io::seed::mix;

/// One training pair: indices into the training images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub first: usize,
    pub second: usize,
    /// Whether both show the same identity.
    pub same: bool,
}

/// How the batches of an epoch are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Strategy {
    /// One pair per training image, positive with probability `pos_fraction`.
    Pairs { pos_fraction: f64 },
    /// P identities x K images per batch.
    Identities { p: usize, k: usize },
}

/// Draws the pairs of each epoch from the training labels.
#[derive(Debug, Clone)]
pub struct PairSampler {
    labels: Vec<usize>,
    by_label: Vec<Vec<usize>>,
    strategy: Strategy,
    seed: u64,
}

/// Random stream ids, so that each use of the seed is independent.
const ORDER_STREAM: u64 = 11;
const PAIR_STREAM: u64 = 12;
const PK_ORDER_STREAM: u64 = 13;
const PK_BATCH_STREAM: u64 = 14;

fn group_by_label(labels: &[usize]) -> Vec<Vec<usize>> {
    let k = labels.iter().max().map_or(0, |m| m + 1);
    let mut by_label = vec![Vec::new(); k];
    for (i, &l) in labels.iter().enumerate() {
        by_label[l].push(i);
    }
    by_label
}

impl PairSampler {
    /// `labels[i]` is the training label of image i (0..K-1); `pos_fraction` the
    /// probability that a pair is positive.
    pub fn new(labels: Vec<usize>, pos_fraction: f64, seed: u64) -> Self {
        PairSampler {
            by_label: group_by_label(&labels),
            labels,
            strategy: Strategy::Pairs {
                pos_fraction: pos_fraction.clamp(0.0, 1.0),
            },
            seed,
        }
    }

    /// The P x K sampler: each batch holds `p` identities with `k` images each, laid
    /// out identity by identity and cut into the pairs (image j, image j + pk/2), so
    /// that the backbone's `cat[x1, x2]` is the batch in order. Identities are drawn
    /// so that each is seen once per epoch; the last batch is filled up with others.
    /// An identity with fewer than `k` images is drawn with replacement. Needs at
    /// least `p` identities and `p * k` even.
    pub fn pk(labels: Vec<usize>, p: usize, k: usize, seed: u64) -> Result<Self, String> {
        let by_label = group_by_label(&labels);
        let ids = by_label.iter().filter(|v| !v.is_empty()).count();
        if p < 2 || k < 2 || (p * k) % 2 == 1 {
            return Err(format!("P x K = {p} x {k}: needs P >= 2, K >= 2 and P * K even"));
        }
        if ids < p {
            return Err(format!("P = {p} identities per batch, but the training set has {ids}"));
        }
        Ok(PairSampler {
            labels,
            by_label,
            strategy: Strategy::Identities { p, k },
            seed,
        })
    }

    /// Pairs per batch of the P x K sampler (`p * k / 2`), or None for pairs.
    pub fn pairs_per_batch(&self) -> Option<usize> {
        match self.strategy {
            Strategy::Identities { p, k } => Some(p * k / 2),
            Strategy::Pairs { .. } => None,
        }
    }

    /// Number of pairs per epoch: one per training image, or P x K / 2 per batch
    /// of the P x K sampler.
    pub fn len(&self) -> usize {
        match self.strategy {
            Strategy::Pairs { .. } => self.labels.len(),
            Strategy::Identities { p, k } => self.identities().div_ceil(p) * (p * k / 2),
        }
    }

    fn identities(&self) -> usize {
        self.by_label.iter().filter(|v| !v.is_empty()).count()
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
        match self.strategy {
            Strategy::Pairs { pos_fraction } => self.pair_epoch(epoch, pos_fraction),
            Strategy::Identities { p, k } => self.pk_epoch(epoch, p, k),
        }
    }

    fn pk_epoch(&self, epoch: u64, p: usize, k: usize) -> Vec<Pair> {
        let mut ids: Vec<usize> = (0..self.by_label.len())
            .filter(|&l| !self.by_label[l].is_empty())
            .collect();
        ids.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(self.seed, PK_ORDER_STREAM, epoch)));
        let mut pairs = Vec::with_capacity(self.len());
        for (b, chunk) in ids.chunks(p).enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(self.seed, PK_BATCH_STREAM, epoch), b as u64, 0));
            let mut chosen = chunk.to_vec();
            while chosen.len() < p {
                let other = ids[rng.gen_range(0..ids.len())];
                if !chosen.contains(&other) {
                    chosen.push(other);
                }
            }
            let images: Vec<usize> = chosen
                .iter()
                .flat_map(|&id| {
                    let own = &self.by_label[id];
                    if own.len() >= k {
                        own.choose_multiple(&mut rng, k).copied().collect::<Vec<_>>()
                    } else {
                        (0..k).map(|_| own[rng.gen_range(0..own.len())]).collect()
                    }
                })
                .collect();
            let half = images.len() / 2;
            pairs.extend((0..half).map(|j| Pair {
                first: images[j],
                second: images[j + half],
                same: self.labels[images[j]] == self.labels[images[j + half]],
            }));
        }
        pairs
    }

    fn pair_epoch(&self, epoch: u64, pos_fraction: f64) -> Vec<Pair> {
        let mut order: Vec<usize> = (0..self.labels.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(self.seed, ORDER_STREAM, epoch)));
        order
            .into_iter()
            .enumerate()
            .map(|(k, first)| {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(self.seed, PAIR_STREAM, epoch), k as u64, 0));
                self.pair_for(first, pos_fraction, &mut rng)
            })
            .collect()
    }

    fn pair_for(&self, first: usize, pos_fraction: f64, rng: &mut ChaCha8Rng) -> Pair {
        let label = self.labels[first];
        let only_one_identity = self.by_label.iter().filter(|v| !v.is_empty()).count() < 2;
        if only_one_identity || rng.gen_bool(pos_fraction) {
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

    /// The images of each P x K batch, in `cat[x1, x2]` order.
    fn pk_batches(s: &PairSampler, epoch: u64) -> Vec<Vec<usize>> {
        let per = s.pairs_per_batch().unwrap();
        s.epoch(epoch)
            .chunks(per)
            .map(|c| c.iter().map(|p| p.first).chain(c.iter().map(|p| p.second)).collect())
            .collect()
    }

    #[test]
    fn pk_batches_hold_p_identities_of_k_images_and_cover_every_identity() {
        let l = labels(); // identities 0..=3; 3 has one image, 0 and 1 three, 2 three
        let s = PairSampler::pk(l.clone(), 3, 2, 5).unwrap();
        assert_eq!(s.len(), 2 * 3, "ceil(4 / 3) batches of 3 pairs");
        for e in 0..20 {
            let batches = pk_batches(&s, e);
            assert_eq!(batches.len(), 2);
            let mut seen = std::collections::BTreeSet::new();
            for b in &batches {
                assert_eq!(b.len(), 6);
                let ids: Vec<usize> = b.iter().map(|&i| l[i]).collect();
                for chunk in ids.chunks(2) {
                    assert_eq!(chunk[0], chunk[1], "K images of one identity in a row: {ids:?}");
                }
                let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
                assert_eq!(distinct.len(), 3, "P distinct identities: {ids:?}");
                seen.extend(ids);
            }
            assert_eq!(seen.len(), 4, "every identity once per epoch");
        }
        // Identity 3 (one image) is drawn with replacement; others without.
        let s = PairSampler::pk(l.clone(), 4, 3, 1).unwrap();
        let b = &pk_batches(&s, 0)[0];
        for chunk in b.chunks(3) {
            let distinct: std::collections::BTreeSet<_> = chunk.iter().collect();
            assert_eq!(distinct.len(), if l[chunk[0]] == 3 { 1 } else { 3 }, "{chunk:?}");
        }
        assert_eq!(pk_batches(&s, 3), pk_batches(&s, 3), "seeded");
        assert_ne!(pk_batches(&s, 3), pk_batches(&s, 4));
        assert!(PairSampler::pk(l.clone(), 5, 2, 1).unwrap_err().contains("has 4"));
        assert!(PairSampler::pk(l, 3, 3, 1).unwrap_err().contains("even"));
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
