//! The multi-task heads of the siamese network and its weighted loss.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use rand::Rng;

use crate::head_ops;
use crate::metric::{batch_hard_triplet, pairwise_distances, verification_pairs, Negatives, TripletMargin};
use reid_ops::ledger;
use reid_ops::tape::{Tape, TapedOutput};

/// A linear layer with `weight` ~ N(0, 0.001^2) and zero `bias`, the usual
/// initialisation of re-ID classifiers.
fn classifier(din: usize, dout: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (dout, din),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.001,
        },
    )?;
    let b = vb.get_with_hints(dout, "bias", candle_nn::Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// `linear(x)`, its matrix product in bf16 when `bf16` (mixed precision).
fn apply(linear: &Linear, x: &Tensor, bf16: bool) -> Result<Tensor> {
    let bias = linear.bias().expect("classifiers have a bias");
    head_ops::linear(x, linear.weight(), bias, bf16)
}

/// Inverted-dropout masks drawn from `rng`, so that a seeded run is repeatable
/// (candle's own dropout draws from an unseeded generator): several drawn in
/// order and uploaded at once, then applied in that order.
struct Masks(std::vec::IntoIter<Tensor>);

impl Masks {
    /// `count` masks shaped as `like` (of its dtype and device) for dropout
    /// probability `p`; none when `p` is 0.
    fn draw<R: Rng>(p: f64, count: usize, like: &Tensor, rng: &mut R) -> Result<Self> {
        if p <= 0.0 || count == 0 {
            return Ok(Masks(Vec::new().into_iter()));
        }
        let keep = 1.0 - p;
        let values: Vec<f32> = (0..count * like.elem_count())
            .map(|_| {
                if rng.gen::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let mut dims = vec![count];
        dims.extend_from_slice(like.dims());
        let all = ledger::upload(values, dims, like.device())?.to_dtype(like.dtype())?;
        let masks = (0..count).map(|i| all.get(i)).collect::<Result<Vec<_>>>()?;
        Ok(Masks(masks.into_iter()))
    }

    /// `x` times the next mask (`x` itself when there are none).
    fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        match self.0.next() {
            Some(mask) => head_ops::dropout(x, &mask),
            None => Ok(x.clone()),
        }
    }
}

/// Identification (`id_classifier`: f -> K identities) and verification
/// (`verif_classifier`: (f1 - f2)^2 -> 2, class 0 = same identity).
#[derive(Debug, Clone)]
pub struct Heads {
    pub id_classifier: Linear,
    pub verif_classifier: Linear,
    /// Matrix products in bf16 (mixed precision).
    bf16: bool,
}

impl Heads {
    /// Both classifiers under `vb`, their products in `exec`'s precision.
    pub fn new(feature_dim: usize, num_classes: usize, exec: reid_ops::Exec, vb: VarBuilder) -> Result<Self> {
        Ok(Heads {
            id_classifier: classifier(feature_dim, num_classes, vb.pp("id_classifier"))?,
            verif_classifier: classifier(feature_dim, 2, vb.pp("verif_classifier"))?,
            bf16: exec.bf16(),
        })
    }
}

/// The loss (the `[loss]` section of a config): the weights of its terms,
/// `id1 * id(f1) + id2 * id(f2) + verif * verif` plus `triplet * triplet`
/// (batch-hard, P x K batches only), the identification's label smoothing, the
/// triplet margin and how the verification's negatives are mined.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossSettings {
    pub id1: f64,
    pub id2: f64,
    pub verif: f64,
    /// Label smoothing of the identification losses (0 = plain cross-entropy, the
    /// paper's): the target puts `1 - e` on the label and `e` spread over all classes.
    pub id_label_smoothing: f64,
    /// Weight of the batch-hard triplet loss on the pooled feature (0: off, the
    /// paper's).
    pub triplet: f64,
    /// Its margin (0.3 as in BoT), or the soft margin.
    pub triplet_margin: TripletMargin,
    /// The negatives of the in-batch verification pairs of P x K batches.
    pub verif_negatives: Negatives,
}

impl Default for LossSettings {
    /// The paper's (0.5, 0.5, 1.0).
    fn default() -> Self {
        LossSettings {
            id1: 0.5,
            id2: 0.5,
            verif: 1.0,
            id_label_smoothing: 0.0,
            triplet: 0.0,
            triplet_margin: TripletMargin::Hard(0.3),
            verif_negatives: Negatives::Hard,
        }
    }
}

/// Labels of a batch of B pairs.
#[derive(Debug, Clone)]
pub struct PairTargets {
    /// Identity labels of the first images, [B] (u32 or i64).
    pub y1: Tensor,
    /// Identity labels of the second images, [B].
    pub y2: Tensor,
    /// 0 when the pair shows one identity, 1 otherwise, [B].
    pub same: Tensor,
}

/// A term of [`PairLoss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// The weighted sum of the others.
    Total,
    Id1,
    Id2,
    Verif,
    /// The triplet term (zero when its weight is 0).
    Triplet,
}

/// The values of a [`PairLoss`] on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossValues {
    pub total: f64,
    pub id1: f64,
    pub id2: f64,
    pub verif: f64,
    pub triplet: f64,
    /// Identification accuracy over all 2B images.
    pub id_accuracy: f64,
    /// Verification accuracy over the B pairs.
    pub verif_accuracy: f64,
}

/// The loss terms, their weighted total and the accuracies of one batch.
///
/// The terms' tensors are not handed out: where the backbone ran on a tape,
/// candle's graph of a term stops at the backbone's output, so candle's own
/// `backward` of it would give the backbone no gradient. The gradients come
/// from [`PairLoss::backward`] (or [`PairLoss::term_backward`]), which continue
/// through the tape.
#[derive(Debug, Clone)]
pub struct PairLoss {
    total: Tensor,
    id1: Tensor,
    id2: Tensor,
    verif: Tensor,
    triplet: Tensor,
    /// The right identifications of f1 and f2, and the right verifications.
    right: [Right; 3],
    /// Where the backward goes.
    through: Through,
}

/// Where a loss's backward goes (see [`reid_ops::tape`]).
#[derive(Debug, Clone)]
pub(crate) enum Through {
    /// candle's graph, all of it.
    Graph,
    /// candle's graph of the heads, then the backbone's tape from its output's
    /// gradient.
    Backbone(Arc<TapedOutput>),
    /// The tape of the whole forward, heads included: no candle backward.
    Tape(Arc<Tape>),
}

impl PairLoss {
    /// This loss with its backward going `through`.
    pub(crate) fn through(self, through: Through) -> Self {
        PairLoss { through, ..self }
    }

    /// The gradients of `t` (one of this loss's tensors) from `through`.
    fn gradients(t: &Tensor, through: Through) -> Result<GradStore> {
        let tape = match through {
            Through::Tape(tape) => tape,
            Through::Graph => {
                ledger::graph_backward(t);
                return t.backward();
            }
            Through::Backbone(taped) => {
                ledger::graph_backward(t);
                let mut store = t.backward()?;
                match Arc::try_unwrap(taped) {
                    Ok(taped) => taped.backward(&mut store)?,
                    Err(shared) => shared.backward_kept(&mut store)?,
                }
                return Ok(store);
            }
        };
        let mut store = GradStore::default();
        let ones = ledger::made(1, t.ones_like())?;
        match Arc::try_unwrap(tape) {
            Ok(tape) => tape.backward(t, ones, &mut store)?,
            Err(shared) => shared.backward_kept(t, ones, &mut store)?,
        }
        Ok(store)
    }

    fn tensor(&self, term: Term) -> &Tensor {
        match term {
            Term::Total => &self.total,
            Term::Id1 => &self.id1,
            Term::Id2 => &self.id2,
            Term::Verif => &self.verif,
            Term::Triplet => &self.triplet,
        }
    }

    /// The value of `term` (a read from the device).
    pub fn value(&self, term: Term) -> Result<f64> {
        ledger::read_scalar(&self.tensor(term).to_dtype(DType::F64)?)
    }

    /// Every term and both accuracies, in one read from the device.
    pub fn read(&self) -> Result<LossValues> {
        let [r1, r2, rv] = &self.right;
        let all = [
            &self.total,
            &self.id1,
            &self.id2,
            &self.verif,
            &self.triplet,
            &r1.count,
            &r2.count,
            &rv.count,
        ];
        let all = all
            .iter()
            .map(|t| ledger::cast(t, DType::F64))
            .collect::<Result<Vec<_>>>()?;
        // On CUDA, one copy per value.
        let v: Vec<f64> = ledger::read(&ledger::made(all.len() as u64, Tensor::stack(&all, 0))?)?;
        let fraction = |right: f64, r: &Right| right / r.of as f64;
        Ok(LossValues {
            total: v[0],
            id1: v[1],
            id2: v[2],
            verif: v[3],
            triplet: v[4],
            id_accuracy: (fraction(v[5], r1) + fraction(v[6], r2)) / 2.0,
            verif_accuracy: fraction(v[7], rv),
        })
    }

    /// The gradients of the total for every variable: through the tape of the
    /// whole forward where it ran on one, else candle's backward through the
    /// heads, then the backbone's tape if it ran on one (the tape is consumed
    /// unless this loss was cloned).
    pub fn backward(self) -> Result<GradStore> {
        Self::gradients(&self.total, self.through)
    }

    /// The gradients of `term` for every variable, keeping the tapes for the
    /// other terms and [`PairLoss::backward`].
    pub fn term_backward(&self, term: Term) -> Result<GradStore> {
        Self::gradients(self.tensor(term), self.through.clone())
    }
}

/// How many of `of` predictions were right (the count a scalar on the device).
#[derive(Debug, Clone)]
struct Right {
    count: Tensor,
    of: usize,
}

/// The rows of `logits` whose largest value is at the target.
fn accuracy(logits: &Tensor, targets: &Tensor) -> Result<Right> {
    let predicted = ledger::made(1, logits.argmax(D::Minus1))?;
    let targets = ledger::cast(targets, DType::U32)?;
    let right = ledger::made(1, ledger::made(1, predicted.eq(&targets))?.to_dtype(DType::F64))?;
    let count = ledger::made(1, right.sum_all())?;
    Ok(Right {
        count,
        of: targets.elem_count(),
    })
}

/// Mean cross-entropy of `logits` [B, K] against `targets` [B] with label
/// smoothing `e`: `(1 - e) * nll + e * mean over classes of -log p`.
fn smoothed_cross_entropy(logits: &Tensor, targets: &Tensor, e: f64) -> Result<Tensor> {
    head_ops::cross_entropy(logits, targets, e)
}

/// The identification terms of a batch `cat[x1, x2]`: (id1, id2, accuracy).
struct Identification {
    id1: Tensor,
    id2: Tensor,
    right: [Right; 2],
}

impl Heads {
    /// Identification of both halves of `f`, through the next two of `masks`.
    fn identification(
        &self,
        f: &Tensor,
        targets: &PairTargets,
        weights: &LossSettings,
        masks: &mut Masks,
    ) -> Result<Identification> {
        let (f1, f2) = head_ops::halves(f)?;
        let logits1 = apply(&self.id_classifier, &masks.apply(&f1)?, self.bf16)?;
        let logits2 = apply(&self.id_classifier, &masks.apply(&f2)?, self.bf16)?;
        Ok(Identification {
            id1: smoothed_cross_entropy(&logits1, &targets.y1, weights.id_label_smoothing)?,
            id2: smoothed_cross_entropy(&logits2, &targets.y2, weights.id_label_smoothing)?,
            right: [accuracy(&logits1, &targets.y1)?, accuracy(&logits2, &targets.y2)?],
        })
    }

    /// The verification loss and accuracy of pairs `(a, b)` with labels `same`.
    /// (through the next of `masks`).
    fn verification(&self, a: &Tensor, b: &Tensor, same: &Tensor, masks: &mut Masks) -> Result<(Tensor, Right)> {
        let square = head_ops::squared_difference(a, b)?;
        let logits = apply(&self.verif_classifier, &masks.apply(&square)?, self.bf16)?;
        Ok((smoothed_cross_entropy(&logits, same, 0.0)?, accuracy(&logits, same)?))
    }

    /// The terms and their weighted total.
    fn combine(
        id: Identification,
        (verif, verif_right): (Tensor, Right),
        triplet: Tensor,
        w: &LossSettings,
    ) -> Result<PairLoss> {
        let mut terms = vec![&id.id1, &id.id2, &verif];
        let mut weights = vec![w.id1, w.id2, w.verif];
        if w.triplet != 0.0 {
            terms.push(&triplet);
            weights.push(w.triplet);
        }
        let total = head_ops::weighted_sum(&terms, &weights)?;
        Ok(PairLoss {
            total,
            id1: id.id1,
            id2: id.id2,
            verif,
            triplet,
            right: {
                let [r1, r2] = id.right;
                [r1, r2, verif_right]
            },
            through: Through::Graph,
        })
    }

    /// The loss of a pair batch from the features of `cat[x1, x2]`, [2B, C] each:
    /// `f` for identification, `g` for verification (the same tensor in the paper).
    /// `dropout` is the probability before each classifier, with its three masks
    /// (all [B, C]) from `rng`, uploaded at once.
    pub fn pair_loss<R: Rng>(
        &self,
        f: &Tensor,
        g: &Tensor,
        targets: &PairTargets,
        weights: LossSettings,
        p_dropout: f64,
        rng: &mut R,
    ) -> Result<PairLoss> {
        let (g1, g2) = head_ops::halves(g)?;
        let mut masks = Masks::draw(p_dropout, 3, &g1, rng)?;
        let id = self.identification(f, targets, &weights, &mut masks)?;
        let (verif, verif_accuracy) = self.verification(&g1, &g2, &targets.same, &mut masks)?;
        let triplet = ledger::made(1, Tensor::zeros((), f.dtype(), f.device()))?;
        Self::combine(id, (verif, verif_accuracy), triplet, &weights)
    }

    /// The loss of a P x K batch `cat[x1, x2]`: identification of every image as in
    /// [`Heads::pair_loss`]; verification on the pairs formed inside the batch
    /// (every positive, as many negatives: [`verification_pairs`]); and the
    /// batch-hard triplet loss on `g` when its weight is not 0.
    pub fn batch_loss<R: Rng>(
        &self,
        f: &Tensor,
        g: &Tensor,
        targets: &PairTargets,
        weights: LossSettings,
        p_dropout: f64,
        rng: &mut R,
    ) -> Result<PairLoss> {
        let labels: Vec<i64> = ledger::read(&Tensor::cat(&[&targets.y1, &targets.y2], 0)?.to_dtype(DType::I64)?)?;
        let half = f.narrow(0, 0, f.dim(0)? / 2)?;
        let id = self.identification(f, targets, &weights, &mut Masks::draw(p_dropout, 2, &half, rng)?)?;
        let dist = pairwise_distances(g)?;
        let n = dist.dim(0)?;
        let flat: Vec<f64> = ledger::read(&dist.to_dtype(DType::F64)?)?;
        let values: Vec<Vec<f64>> = flat.chunks(n.max(1)).map(<[f64]>::to_vec).collect();
        let (first, second, same) = verification_pairs(&values, &labels, weights.verif_negatives, rng);
        let rows = |v: Vec<u32>| ledger::upload(v.clone(), v.len(), g.device());
        let same = rows(same)?;
        let (a, b) = (g.index_select(&rows(first)?, 0)?, g.index_select(&rows(second)?, 0)?);
        let mut masks = Masks::draw(p_dropout, 1, &a, rng)?;
        let (verif, verif_accuracy) = self.verification(&a, &b, &same, &mut masks)?;
        let triplet = if weights.triplet == 0.0 {
            Tensor::zeros((), f.dtype(), f.device())?
        } else {
            batch_hard_triplet(&dist, &values, &labels, weights.triplet_margin)?
        };
        Self::combine(id, (verif, verif_accuracy), triplet, &weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn label_smoothing_mixes_the_label_with_the_uniform_target() {
        let logits = Tensor::new(&[[2.0f64, 0.5, -1.0], [0.1, 0.2, 0.3]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let value = |e: f64| {
            smoothed_cross_entropy(&logits, &targets, e)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        // By hand: -log p for each row and class.
        let rows = [[2.0f64, 0.5, -1.0], [0.1, 0.2, 0.3]];
        let nll: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                let lse = r.iter().map(|v| v.exp()).sum::<f64>().ln();
                r.iter().map(|v| lse - v).collect()
            })
            .collect();
        let plain = (nll[0][0] + nll[1][2]) / 2.0;
        let uniform = nll.iter().flatten().sum::<f64>() / 6.0;
        assert!((value(0.0) - plain).abs() < 1e-12);
        assert!((value(0.1) - (0.9 * plain + 0.1 * uniform)).abs() < 1e-12);
    }
}
