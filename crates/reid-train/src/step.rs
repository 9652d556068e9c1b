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

/// Runs one step at learning rate `lr`; dropout masks come from `rng`.
pub fn train_step<R: Rng>(
    model: &ReidModel,
    optimizer: &mut Sgd,
    batch: &BatchTensors,
    weights: LossWeights,
    dropout: f64,
    lr: f64,
    rng: &mut R,
) -> Result<StepStats> {
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
        candle_core::bail!(
            "the loss is {} (id1 {}, id2 {}, verif {})",
            stats.loss,
            stats.loss_id1,
            stats.loss_id2,
            stats.loss_verif
        );
    }
    let grads = loss.total.backward()?;
    optimizer.step(&grads, lr)?;
    Ok(stats)
}
