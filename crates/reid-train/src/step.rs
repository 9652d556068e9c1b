//! One training step: forward of `cat[x1, x2]`, the weighted loss, one backward,
//! one SGD update.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use reid_model::{LossWeights, PairTargets, ReidModel};
use reid_sampling::PairBatch;

use crate::optim::Sgd;

/// The losses and accuracies of one step (from its forward, before the update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub loss_id1: f64,
    pub loss_id2: f64,
    pub loss_verif: f64,
    pub id_accuracy: f64,
    pub verif_accuracy: f64,
}

/// Tensors of one pair batch on the model's device and dtype.
pub struct BatchTensors {
    pub x1: Tensor,
    pub x2: Tensor,
    pub targets: PairTargets,
}

impl BatchTensors {
    /// Moves a loader batch to `device` as `dtype` images [B, 3, height, width].
    pub fn new(batch: &PairBatch, height: usize, width: usize, dtype: DType, device: &Device) -> Result<Self> {
        let b = batch.len();
        let images = |v: &[f32]| Tensor::from_slice(v, (b, 3, height, width), device)?.to_dtype(dtype);
        let labels = |v: &[i64]| Tensor::from_slice(v, b, device);
        Ok(BatchTensors {
            x1: images(&batch.x1)?,
            x2: images(&batch.x2)?,
            targets: PairTargets {
                y1: labels(&batch.y1)?,
                y2: labels(&batch.y2)?,
                same: labels(&batch.same)?,
            },
        })
    }
}

/// Why a step did not update the model.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The forward gave a NaN or infinite loss; nothing was updated.
    #[error("the loss is {} (id1 {}, id2 {}, verif {})", .0.loss, .0.loss_id1, .0.loss_id2, .0.loss_verif)]
    NonFiniteLoss(StepStats),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Runs one step at learning rate `lr`; dropout masks come from `rng`. A
/// non-finite loss stops the step before the update.
pub fn train_step<R: Rng>(
    model: &ReidModel,
    optimizer: &mut Sgd,
    batch: &BatchTensors,
    weights: LossWeights,
    dropout: f64,
    lr: f64,
    rng: &mut R,
) -> std::result::Result<StepStats, StepError> {
    let loss = model.pair_loss(&batch.x1, &batch.x2, &batch.targets, weights, dropout, rng)?;
    let scalar = |t: &Tensor| t.to_dtype(DType::F64)?.to_scalar::<f64>();
    let stats = StepStats {
        loss: scalar(&loss.total)?,
        loss_id1: scalar(&loss.id1)?,
        loss_id2: scalar(&loss.id2)?,
        loss_verif: scalar(&loss.verif)?,
        id_accuracy: loss.id_accuracy,
        verif_accuracy: loss.verif_accuracy,
    };
    if !stats.loss.is_finite() {
        return Err(StepError::NonFiniteLoss(stats));
    }
    let grads = loss.total.backward()?;
    optimizer.step(&grads, lr)?;
    Ok(stats)
}

impl Default for StepStats {
    fn default() -> Self {
        StepStats {
            loss: 0.0,
            loss_id1: 0.0,
            loss_id2: 0.0,
            loss_verif: 0.0,
            id_accuracy: 0.0,
            verif_accuracy: 0.0,
        }
    }
}

impl StepStats {
    /// Adds `o` term by term (for means over steps).
    pub fn add(&mut self, o: &StepStats) {
        self.loss += o.loss;
        self.loss_id1 += o.loss_id1;
        self.loss_id2 += o.loss_id2;
        self.loss_verif += o.loss_verif;
        self.id_accuracy += o.id_accuracy;
        self.verif_accuracy += o.verif_accuracy;
    }

    /// These sums divided by `n` steps.
    pub fn mean(&self, n: usize) -> StepStats {
        let n = n.max(1) as f64;
        StepStats {
            loss: self.loss / n,
            loss_id1: self.loss_id1 / n,
            loss_id2: self.loss_id2 / n,
            loss_verif: self.loss_verif / n,
            id_accuracy: self.id_accuracy / n,
            verif_accuracy: self.verif_accuracy / n,
        }
    }
}
