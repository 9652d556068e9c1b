//! One training step: forward of `cat[x1, x2]`, the weighted loss, one backward,
//! one SGD update.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use reid_model::model::is_head;
use reid_model::{LossSettings, PairLoss, PairTargets, ReidModel, Term};
use reid_sampling::PairBatch;

use crate::optim::Sgd;

/// The losses and accuracies of one step (from its forward, before the update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub loss_id1: f64,
    pub loss_id2: f64,
    pub loss_verif: f64,
    pub loss_triplet: f64,
    pub id_accuracy: f64,
    pub verif_accuracy: f64,
    /// The backbone gradient norms of the step, when asked for.
    pub grad_norms: Option<GradNorms>,
}

/// The norm of the gradient each weighted loss term puts on the backbone
/// (`|w * dL/dtheta|` over every backbone parameter), and of their sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradNorms {
    pub id1: f64,
    pub id2: f64,
    pub verif: f64,
    pub triplet: f64,
    pub total: f64,
}

/// How a step computes its loss, and what it measures besides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    pub weights: LossSettings,
    /// Dropout before each classifier.
    pub dropout: f64,
    /// The batch is P x K: verification on in-batch pairs, triplet loss.
    pub pk: bool,
    /// Compute [`GradNorms`] (one extra backward per loss term).
    pub grad_norms: bool,
}

impl StepSettings {
    /// The paper's loss on pair batches with `dropout`, no norms.
    pub fn pairs(weights: LossSettings, dropout: f64) -> Self {
        StepSettings {
            weights,
            dropout,
            pk: false,
            grad_norms: false,
        }
    }
}

/// Tensors of one pair batch on the model's device and dtype.
pub struct BatchTensors {
    pub x1: Tensor,
    pub x2: Tensor,
    pub targets: PairTargets,
}

impl BatchTensors {
    /// Moves a loader batch to `device` as `dtype` images [B, 3, height, width]:
    /// two uploads, the images of both sides and the three label vectors.
    pub fn new(batch: &PairBatch, height: usize, width: usize, dtype: DType, device: &Device) -> Result<Self> {
        let b = batch.len();
        let images = [&batch.x1[..], &batch.x2].concat();
        let images = reid_ops::ledger::upload(images, (2 * b, 3, height, width), device)?.to_dtype(dtype)?;
        let labels = [&batch.y1[..], &batch.y2, &batch.same].concat();
        let labels = reid_ops::ledger::upload(labels, (3, b), device)?;
        Ok(BatchTensors {
            x1: images.narrow(0, 0, b)?,
            x2: images.narrow(0, b, b)?,
            targets: PairTargets {
                y1: labels.get(0)?,
                y2: labels.get(1)?,
                same: labels.get(2)?,
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

/// The norm of the gradients in `grads` of the `backbone` parameters, times `weight`.
fn backbone_norm(backbone: &[Var], grads: &GradStore, weight: f64) -> Result<f64> {
    let mut sum = 0.0;
    for g in backbone.iter().filter_map(|v| grads.get(v.as_tensor())) {
        sum += reid_ops::ledger::read_scalar::<f64>(&g.to_dtype(DType::F64)?.sqr()?.sum_all()?)?;
    }
    Ok(weight * sum.sqrt())
}

/// The backbone's variables, with the bf16 copies of its weights (bf16
/// precision): a weight's gradient reaches it or its copy, never both.
fn backbone_vars(model: &ReidModel) -> Vec<Var> {
    let vars = model.trainable_vars().into_iter().filter(|(name, _)| !is_head(name));
    let copies = model.weight_copies().into_iter().map(|(_, copy)| copy);
    vars.map(|(_, v)| v).chain(copies).collect()
}

/// Each term's backbone gradient norm (id1, id2, verif, triplet), each from its
/// own backward of the same forward, run before [`PairLoss::backward`] consumes
/// the backbone's tape.
fn term_norms(backbone: &[Var], loss: &PairLoss, w: &LossSettings) -> Result<[f64; 4]> {
    let term = |t: Term, weight: f64| match weight {
        0.0 => Ok(0.0),
        _ => backbone_norm(backbone, &loss.term_backward(t)?, weight),
    };
    Ok([
        term(Term::Id1, w.id1)?,
        term(Term::Id2, w.id2)?,
        term(Term::Verif, w.verif)?,
        term(Term::Triplet, w.triplet)?,
    ])
}

/// Runs one step at learning rate `lr`; dropout masks come from `rng`. A
/// non-finite loss stops the step before the update. On the CPU the step runs on
/// a worker of rayon's global pool (see [`on_worker`]); on CUDA on this thread,
/// so that cuDNN's handles, plans and workspaces (kept per thread) are made once.
pub fn train_step<R: Rng + Send>(
    model: &ReidModel,
    optimizer: &mut Sgd,
    batch: &BatchTensors,
    settings: StepSettings,
    lr: f64,
    rng: &mut R,
) -> std::result::Result<StepStats, StepError> {
    if model.device.is_cuda() {
        return step_on_this_thread(model, optimizer, batch, settings, lr, rng);
    }
    on_worker(|| step_on_this_thread(model, optimizer, batch, settings, lr, rng))
}

/// Runs `f` on a worker of rayon's global pool (where it is, when already on
/// one). The hundreds of parallel operations of a step then start from a worker
/// as local jobs, instead of each being handed in from outside while the calling
/// thread sleeps: a `res2net_tiny` bench on 2 cores went from about 30,000 waits
/// to 4,000 per 30 steps, and from 147-196 to 207-215 images/s.
///
/// The worker may be in the middle of another step (rayon's work stealing, when
/// two steps run at once, as tests do): this one runs with that one's tape and
/// counts set aside.
fn on_worker<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let isolated = || reid_ops::tape::isolated(f);
    reid_ops::ledger::carried(isolated, |job| rayon::scope(|_| job()))
}

fn step_on_this_thread<R: Rng>(
    model: &ReidModel,
    optimizer: &mut Sgd,
    batch: &BatchTensors,
    settings: StepSettings,
    lr: f64,
    rng: &mut R,
) -> std::result::Result<StepStats, StepError> {
    let (x1, x2, t) = (&batch.x1, &batch.x2, &batch.targets);
    let (weights, dropout) = (settings.weights, settings.dropout);
    let loss = match settings.pk {
        true => model.batch_loss(x1, x2, t, weights, dropout, rng)?,
        false => model.pair_loss(x1, x2, t, weights, dropout, rng)?,
    };
    let values = loss.read()?;
    let mut stats = StepStats {
        loss: values.total,
        loss_id1: values.id1,
        loss_id2: values.id2,
        loss_verif: values.verif,
        loss_triplet: values.triplet,
        id_accuracy: values.id_accuracy,
        verif_accuracy: values.verif_accuracy,
        grad_norms: None,
    };
    if !stats.loss.is_finite() {
        return Err(StepError::NonFiniteLoss(stats));
    }
    let backbone = settings.grad_norms.then(|| backbone_vars(model));
    let terms = backbone.as_ref().map(|b| term_norms(b, &loss, &weights)).transpose()?;
    let grads = loss.backward()?;
    if let (Some([id1, id2, verif, triplet]), Some(backbone)) = (terms, &backbone) {
        let total = backbone_norm(backbone, &grads, 1.0)?;
        stats.grad_norms = Some(GradNorms {
            id1,
            id2,
            verif,
            triplet,
            total,
        });
    }
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
            loss_triplet: 0.0,
            id_accuracy: 0.0,
            verif_accuracy: 0.0,
            grad_norms: None,
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
        self.loss_triplet += o.loss_triplet;
        self.id_accuracy += o.id_accuracy;
        self.verif_accuracy += o.verif_accuracy;
        // Norms are not summed: the window keeps the latest measured.
        if o.grad_norms.is_some() {
            self.grad_norms = o.grad_norms;
        }
    }

    /// These sums divided by `n` steps.
    pub fn mean(&self, n: usize) -> StepStats {
        let n = n.max(1) as f64;
        StepStats {
            loss: self.loss / n,
            loss_id1: self.loss_id1 / n,
            loss_id2: self.loss_id2 / n,
            loss_verif: self.loss_verif / n,
            loss_triplet: self.loss_triplet / n,
            id_accuracy: self.id_accuracy / n,
            verif_accuracy: self.verif_accuracy / n,
            grad_norms: self.grad_norms,
        }
    }
}
