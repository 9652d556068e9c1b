//! Metric learning inside a P x K batch: Euclidean distances, the batch-hard
//! triplet loss of Hermans et al. (2017) as BoT uses it, and the pairs that the
//! verification loss sees (every positive, and as many negatives).

use candle_core::{Result, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

/// The triplet margin: `max(0, d_ap - d_an + m)`, or the soft margin
/// `log(1 + exp(d_ap - d_an))`. In configs a number (0 meaning soft) or `"soft"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TripletMargin {
    Hard(f64),
    Soft,
}

impl serde::Serialize for TripletMargin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            TripletMargin::Hard(m) => s.serialize_f64(*m),
            TripletMargin::Soft => s.serialize_str("soft"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for TripletMargin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(0.0) => Ok(TripletMargin::Soft),
            Raw::Number(m) if m > 0.0 && m.is_finite() => Ok(TripletMargin::Hard(m)),
            Raw::Text(t) if t == "soft" => Ok(TripletMargin::Soft),
            _ => Err(serde::de::Error::custom(
                "a margin > 0, or 0 or \"soft\" for the soft margin",
            )),
        }
    }
}

/// Which negative pairs the in-batch verification loss takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Negatives {
    /// The closest pairs of different identities (by the pooled feature).
    Hard,
    /// Pairs of different identities drawn at random.
    Random,
}

/// Euclidean distances [N, N] between the rows of `x` [N, C]
/// (`sqrt(max(|a|^2 + |b|^2 - 2 a.b, 1e-12))`, as BoT computes them).
pub fn pairwise_distances(x: &Tensor) -> Result<Tensor> {
    let sq = x.sqr()?.sum_keepdim(1)?;
    let d2 = sq.broadcast_add(&sq.t()?)?.sub(&(x.matmul(&x.t()?)? * 2.0)?)?;
    d2.clamp(1e-12, f64::MAX)?.sqrt()
}

/// Entries `(i, j)` of the [N, N] matrix `m`, as a vector (differentiable).
fn entries(m: &Tensor, at: &[(usize, usize)]) -> Result<Tensor> {
    let n = m.dim(1)?;
    let flat: Vec<u32> = at.iter().map(|&(i, j)| (i * n + j) as u32).collect();
    m.flatten_all()?
        .index_select(&reid_ops::ledger::upload(flat, at.len(), m.device())?, 0)
}

/// The batch-hard triplet loss over `dist` [N, N] (whose values are `d`) with
/// `labels` [N]: for each anchor, its farthest positive (another row of its
/// identity) and its nearest negative; the mean over anchors that have a positive.
pub fn batch_hard_triplet(dist: &Tensor, d: &[Vec<f64>], labels: &[i64], margin: TripletMargin) -> Result<Tensor> {
    let (mut ap, mut an) = (Vec::new(), Vec::new());
    for (i, row) in d.iter().enumerate() {
        let pick = |same: bool, better: fn(f64, f64) -> bool| {
            (0..row.len())
                .filter(|&j| j != i && (labels[j] == labels[i]) == same)
                .reduce(|a, b| if better(row[b], row[a]) { b } else { a })
        };
        if let (Some(p), Some(n)) = (pick(true, |x, y| x > y), pick(false, |x, y| x < y)) {
            ap.push((i, p));
            an.push((i, n));
        }
    }
    if ap.is_empty() {
        candle_core::bail!("the triplet loss needs a batch with positives and negatives (use data.sampler = \"pk\")");
    }
    let gap = (entries(dist, &ap)? - entries(dist, &an)?)?;
    match margin {
        TripletMargin::Hard(m) => (gap + m)?.relu()?.mean_all(),
        // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), without overflow.
        TripletMargin::Soft => (gap.relu()? + (gap.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all(),
    }
}

/// The verification pairs of a batch: every pair of rows with one identity (label
/// 0), then as many pairs of different identities (label 1), the closest by the
/// distances `d` or drawn from `rng`. Returns (first rows, second rows, labels).
pub fn verification_pairs<R: Rng>(
    d: &[Vec<f64>],
    labels: &[i64],
    negatives: Negatives,
    rng: &mut R,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let n = labels.len();
    let all = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j)));
    let (pos, mut neg): (Vec<_>, Vec<_>) = all.partition(|&(i, j)| labels[i] == labels[j]);
    match negatives {
        // Stable: ties keep the order of (i, j).
        Negatives::Hard => neg.sort_by(|a, b| d[a.0][a.1].total_cmp(&d[b.0][b.1])),
        Negatives::Random => neg.shuffle(rng),
    }
    neg.truncate(pos.len());
    let (mut first, mut second, mut target) = (Vec::new(), Vec::new(), Vec::new());
    for (pairs, label) in [(&pos, 0u32), (&neg, 1u32)] {
        for &(i, j) in pairs.iter() {
            first.push(i as u32);
            second.push(j as u32);
            target.push(label);
        }
    }
    (first, second, target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn features() -> Tensor {
        // Two identities of two rows each, in 2-D.
        Tensor::new(&[[0.0f64, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], &Device::Cpu).unwrap()
    }

    #[test]
    fn the_batch_hard_triplet_loss_matches_a_hand_computed_case() {
        let labels = [0, 0, 1, 1];
        let d = pairwise_distances(&features()).unwrap();
        let dv: Vec<Vec<f64>> = d.to_vec2().unwrap();
        assert!((dv[0][1] - 5.0).abs() < 1e-9 && (dv[2][3] - 5f64.sqrt()).abs() < 1e-9);
        // Anchor: (hardest positive, hardest negative):
        // 0: d01 = 5, min(d02 = 1, d03 = 2) = 1     -> 5 - 1 = 4
        // 1: d10 = 5, min(d12 = sqrt 20, d13 = sqrt 13) -> 5 - sqrt 13
        // 2: d23 = sqrt 5, min(d20 = 1, d21 = sqrt 20) -> sqrt 5 - 1
        // 3: d32 = sqrt 5, min(d30 = 2, d31 = sqrt 13) -> sqrt 5 - 2
        let gaps = [4.0, 5.0 - 13f64.sqrt(), 5f64.sqrt() - 1.0, 5f64.sqrt() - 2.0];
        let value = |m| {
            batch_hard_triplet(&d, &dv, &labels, m)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let hard: f64 = gaps.iter().map(|g| (g + 0.3f64).max(0.0)).sum::<f64>() / 4.0;
        assert!((value(TripletMargin::Hard(0.3)) - hard).abs() < 1e-9);
        let soft: f64 = gaps.iter().map(|g| (1.0 + g.exp()).ln()).sum::<f64>() / 4.0;
        assert!((value(TripletMargin::Soft) - soft).abs() < 1e-9);
        // A margin that no gap reaches below zero: the loss is the mean gap + m.
        let gap_mean = gaps.iter().sum::<f64>() / 4.0;
        assert!((value(TripletMargin::Hard(3.0)) - (gap_mean + 3.0)).abs() < 1e-9);
    }

    #[test]
    fn the_triplet_gradient_matches_finite_differences() {
        let labels = [0, 0, 1, 1];
        for margin in [TripletMargin::Hard(0.3), TripletMargin::Soft] {
            let x = Var::from_tensor(&features()).unwrap();
            let loss = |t: &Tensor| {
                let d = pairwise_distances(t).unwrap();
                batch_hard_triplet(&d, &d.to_vec2().unwrap(), &labels, margin).unwrap()
            };
            let grads = loss(x.as_tensor()).backward().unwrap();
            let g: Vec<Vec<f64>> = grads.get(x.as_tensor()).unwrap().to_vec2().unwrap();
            let base: Vec<Vec<f64>> = features().to_vec2().unwrap();
            let h = 1e-6;
            for r in 0..4 {
                for c in 0..2 {
                    let shifted = |delta: f64| {
                        let mut v = base.clone();
                        v[r][c] += delta;
                        let t = Tensor::new(v, &Device::Cpu).unwrap();
                        loss(&t).to_scalar::<f64>().unwrap()
                    };
                    let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
                    assert!(
                        (numeric - g[r][c]).abs() < 1e-6,
                        "{margin:?} [{r},{c}]: {numeric} vs {}",
                        g[r][c]
                    );
                }
            }
        }
    }

    #[test]
    fn verification_takes_every_positive_and_as_many_hardest_negatives() {
        let labels = [0, 0, 1, 1];
        let d: Vec<Vec<f64>> = pairwise_distances(&features()).unwrap().to_vec2().unwrap();
        let mut rng = rand::rngs::mock::StepRng::new(0, 1);
        let (i, j, t) = verification_pairs(&d, &labels, Negatives::Hard, &mut rng);
        // Positives (0,1), (2,3); the two closest negatives: d02 = 1, d03 = 2.
        assert_eq!((i, j, t), (vec![0, 2, 0, 0], vec![1, 3, 2, 3], vec![0, 0, 1, 1]));
        let (i, j, t) = verification_pairs(&d, &labels, Negatives::Random, &mut rng);
        assert_eq!(t, vec![0, 0, 1, 1]);
        for (a, b) in i.iter().zip(&j).skip(2) {
            assert_ne!(labels[*a as usize], labels[*b as usize]);
        }
    }
}
