//! The siamese re-ID network: one backbone shared by both branches, and the heads.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, ModuleT, Result, Tensor, TensorId, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::arch::Arch;
use crate::backbone::Backbone;
use crate::heads::{Heads, LossSettings, PairLoss, PairTargets, Through};
use crate::layers::Activation;
use crate::layers::BatchNorm;
use reid_ops::tape::TapedOutput;
use reid_ops::Exec;

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Stride of layer4: 2 as in timm, 1 as common in re-ID.
    pub last_stride: usize,
    /// Training identities K.
    pub num_classes: usize,
    /// A batch norm over the pooled feature (the "BNNeck" of Luo et al., 2019): both
    /// heads and retrieval then use the normalised feature. Off in the paper.
    pub bnneck: bool,
}

/// Backbone, optional neck and heads, their variables held in one [`VarMap`] under
/// timm's names (the neck as `neck.*`, heads as `id_classifier.*` and
/// `verif_classifier.*`).
pub struct ReidModel {
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub backbone: Backbone,
    /// The feature's batch norm when `config.bnneck`.
    pub neck: Option<BatchNorm>,
    pub heads: Heads,
    pub dtype: DType,
    pub device: Device,
    /// How it runs (see [`Exec`]), fixed when it is built.
    pub exec: Exec,
}

/// Whether a variable name is a batch-norm running statistic (never trained).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// Whether a variable belongs to the layers after the backbone (neck and heads),
/// which no pretrained backbone provides.
pub fn is_head(name: &str) -> bool {
    name.starts_with("id_classifier.") || name.starts_with("verif_classifier.") || name.starts_with("neck.")
}

impl ReidModel {
    /// Builds the model with fresh variables (see [`ReidModel::initialize`]) to
    /// run as `exec` says.
    pub fn new(config: ModelConfig, exec: Exec, dtype: DType, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let backbone = Backbone::new(config.arch, config.last_stride, exec, vb.clone())?;
        let neck = if config.bnneck {
            Some(BatchNorm::new(config.arch.feature_dim(), exec, vb.pp("neck"))?)
        } else {
            None
        };
        let heads = Heads::new(config.arch.feature_dim(), config.num_classes, exec, vb)?;
        Ok(ReidModel {
            config,
            varmap,
            backbone,
            neck,
            heads,
            dtype,
            device: device.clone(),
            exec,
        })
    }

    /// Every variable by name, sorted (parameters and running statistics).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The trained parameters by name, sorted (running statistics excluded).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(n, _)| !is_running_stat(n))
            .collect()
    }

    /// Re-initialises every variable from `seed`, independently of thread count and
    /// of candle's unseeded generator: convolutions Kaiming-normal (fan-out, as timm),
    /// batch norm weight 1 / bias 0 / mean 0 / var 1, classifiers N(0, 0.001^2) with
    /// zero bias.
    pub fn initialize(&self, seed: u64) -> Result<()> {
        for (i, (name, var)) in self.named_vars().iter().enumerate() {
            let dims = var.dims().to_vec();
            let n = var.elem_count();
            let constant = |v: f64| Tensor::full(v, var.shape(), &self.device)?.to_dtype(self.dtype);
            let value = if name.ends_with("running_var") || (name.ends_with(".weight") && dims.len() == 1) {
                constant(1.0)?
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                constant(0.0)?
            } else {
                let stdev = if is_head(name) {
                    0.001
                } else {
                    let fan_out = dims[0] * dims[2..].iter().product::<usize>();
                    (2.0 / fan_out as f64).sqrt()
                };
                let mut rng =
                    ChaCha8Rng::seed_from_u64(reid_io::seed::mix(seed.wrapping_add(INIT_STREAM), i as u64, 0));
                let values: Vec<f64> = (0..n).map(|_| stdev * standard_normal(&mut rng)).collect();
                reid_ops::ledger::upload(values, dims, &self.device)?.to_dtype(self.dtype)?
            };
            var.set(&value)?;
        }
        self.refresh_weight_copies()
    }

    /// Features `f` [N, C] of images [N, 3, H, W], the ones retrieval uses: pooled,
    /// then through the neck when there is one.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.through_neck(&self.backbone.forward_t(x, train)?, train)
    }

    /// The neck's normalisation of pooled features [N, C] (identity without one).
    fn through_neck(&self, pooled: &Tensor, train: bool) -> Result<Tensor> {
        match &self.neck {
            Some(bn) => bn.forward_t(pooled, train, Activation::Identity),
            None => Ok(pooled.clone()),
        }
    }

    /// One training forward of B pairs: the backbone runs once on `cat[x1, x2]`, so
    /// batch statistics cover all 2B images; then the weighted three-term loss. With a
    /// neck, identification uses the normalised feature and verification the pooled
    /// one (as metric losses do in Luo et al.: unit-variance features would give
    /// `(f1 - f2)^2` a scale the verification classifier cannot start from).
    pub fn pair_loss<R: Rng>(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        targets: &PairTargets,
        weights: LossSettings,
        dropout: f64,
        rng: &mut R,
    ) -> Result<PairLoss> {
        let x = Self::both_sides(x1, x2)?;
        let forward = |rng: &mut R| {
            let pooled = self.backbone.forward_t(&x, true)?;
            let f = self.through_neck(&pooled, true)?;
            self.heads.pair_loss(&f, &pooled, targets, weights, dropout, rng)
        };
        if !self.exec.tape(&x) {
            return forward(rng);
        }
        let (loss, tape) = reid_ops::tape::record(|| forward(rng))?;
        Ok(loss.through(Through::Tape(Arc::new(tape))))
    }

    /// `cat[x1, x2]` along the batch.
    fn both_sides(x1: &Tensor, x2: &Tensor) -> Result<Tensor> {
        // On CUDA, one copy per side.
        reid_ops::ledger::made(2, Tensor::cat(&[x1, x2], 0))
    }

    /// One training forward of a P x K batch `cat[x1, x2]` (see
    /// [`Heads::batch_loss`]): verification on pairs formed inside the batch, and the
    /// triplet loss, both on the pooled feature.
    ///
    /// [`Heads::batch_loss`]: crate::heads::Heads::batch_loss
    pub fn batch_loss<R: Rng>(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        targets: &PairTargets,
        weights: LossSettings,
        dropout: f64,
        rng: &mut R,
    ) -> Result<PairLoss> {
        let (f, pooled, taped) = self.train_features(x1, x2)?;
        let loss = self.heads.batch_loss(&f, &pooled, targets, weights, dropout, rng)?;
        Ok(match taped {
            Some(taped) => loss.through(Through::Backbone(taped)),
            None => loss,
        })
    }

    /// Train-mode features of `cat[x1, x2]`: (through the neck, pooled), and the
    /// backbone's tape when it ran on one (see [`Exec::tape`]): its backward is
    /// then the tape's, candle's otherwise (the heads' on candle's graph: the
    /// P x K losses mine pairs and triplets with ops the tape does not have).
    fn train_features(&self, x1: &Tensor, x2: &Tensor) -> Result<(Tensor, Tensor, Option<Arc<TapedOutput>>)> {
        let x = Self::both_sides(x1, x2)?;
        if !self.exec.tape(&x) {
            let pooled = self.backbone.forward_t(&x, true)?;
            return Ok((self.through_neck(&pooled, true)?, pooled, None));
        }
        let taped = TapedOutput::record(|| self.backbone.forward_t(&x, true))?;
        let pooled = taped.leaf().clone();
        Ok((self.through_neck(&pooled, true)?, pooled, Some(Arc::new(taped))))
    }

    /// The bf16 copies of the convolutions' weights (bf16 precision only),
    /// each beside the id of the weight it copies (see [`Conv::bf16_copy`]).
    ///
    /// [`Conv::bf16_copy`]: crate::layers::Conv::bf16_copy
    pub fn weight_copies(&self) -> Vec<(TensorId, Var)> {
        let convs = self.backbone.convs();
        convs
            .filter_map(|c| c.bf16_copy().map(|v| (c.weight.id(), v.clone())))
            .collect()
    }

    /// Rewrites each bf16 copy from its weight (after the weights were set).
    pub fn refresh_weight_copies(&self) -> Result<()> {
        for conv in self.backbone.convs() {
            if let Some(copy) = conv.bf16_copy() {
                reid_ops::mixed::write_bf16_copy(copy.as_tensor(), &conv.weight)?;
            }
        }
        Ok(())
    }

    /// Every variable's current value by name, as f32 on the CPU (for saving).
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.named_vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect()
    }
}

/// Offsets the run seed for the initialisation draws (variable i draws from
/// `mix(seed + INIT_STREAM, i, 0)`).
const INIT_STREAM: u64 = 0x6A09_E667_F3BC_C909;

/// A standard normal draw by Box-Muller.
fn standard_normal<R: Rng>(rng: &mut R) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::Term;

    fn tiny(bnneck: bool) -> ReidModel {
        let config = ModelConfig {
            arch: "res2net_tiny".parse().unwrap(),
            last_stride: 2,
            num_classes: 5,
            bnneck,
        };
        let m = ReidModel::new(config, Exec::default(), DType::F64, &Device::Cpu).unwrap();
        m.initialize(3).unwrap();
        m
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn the_neck_standardises_identification_features_and_leaves_verification_pooled() {
        let (plain, necked) = (tiny(false), tiny(true));
        let names: Vec<String> = necked.named_vars().into_iter().map(|(n, _)| n).collect();
        for n in ["neck.weight", "neck.bias", "neck.running_mean", "neck.running_var"] {
            assert!(names.contains(&n.to_string()) && is_head(n), "{n}");
        }
        // Same backbone and heads in both models.
        let necked_vars: HashMap<String, Var> = necked.named_vars().into_iter().collect();
        for (n, v) in plain.named_vars() {
            necked_vars[&n].set(v.as_tensor()).unwrap();
        }

        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let x: Vec<f64> = (0..8 * 3 * 32 * 16).map(|_| standard_normal(&mut rng)).collect();
        let x = Tensor::from_vec(x, (8, 3, 32, 16), &Device::Cpu).unwrap();
        let f = necked.features(&x, true).unwrap();
        let mean = f.mean(0).unwrap();
        let var = f.broadcast_sub(&mean).unwrap().sqr().unwrap().mean(0).unwrap();
        let max_abs = |t: &Tensor| t.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(max_abs(&mean) < 1e-9, "batch mean of the necked feature is zero");
        assert!(max_abs(&(var - 1.0).unwrap()) < 1e-3, "and its batch variance one");
        let running: Vec<f64> = necked_vars["neck.running_mean"].as_tensor().to_vec1().unwrap();
        assert!(
            running.iter().any(|v| *v != 0.0),
            "a training forward moves the running mean"
        );

        let targets = PairTargets {
            y1: Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap(),
            y2: Tensor::new(&[0u32, 4, 2, 1], &Device::Cpu).unwrap(),
            same: Tensor::new(&[0u32, 1, 0, 1], &Device::Cpu).unwrap(),
        };
        let (x1, x2) = (x.narrow(0, 0, 4).unwrap(), x.narrow(0, 4, 4).unwrap());
        let loss = |m: &ReidModel| {
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            m.pair_loss(&x1, &x2, &targets, LossSettings::default(), 0.0, &mut rng)
                .unwrap()
        };
        let (a, b) = (loss(&plain), loss(&necked));
        assert!((a.value(Term::Verif).unwrap() - b.value(Term::Verif).unwrap()).abs() < 1e-12);
        assert!((a.value(Term::Id1).unwrap() - b.value(Term::Id1).unwrap()).abs() > 1e-6);
    }

    #[test]
    fn one_backward_of_the_weighted_sum_equals_the_weighted_separate_gradients() {
        // The paper back-propagates each loss on its own and adds the gradients
        // with weights 0.5, 0.5 and 1; one backward of the weighted sum must agree.
        let m = tiny(true);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x: Vec<f64> = (0..8 * 3 * 32 * 16).map(|_| standard_normal(&mut rng)).collect();
        let x = Tensor::from_vec(x, (8, 3, 32, 16), &Device::Cpu).unwrap();
        let targets = PairTargets {
            y1: Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap(),
            y2: Tensor::new(&[0u32, 4, 2, 1], &Device::Cpu).unwrap(),
            same: Tensor::new(&[0u32, 1, 0, 1], &Device::Cpu).unwrap(),
        };
        let (x1, x2) = (x.narrow(0, 0, 4).unwrap(), x.narrow(0, 4, 4).unwrap());
        let loss = m
            .pair_loss(&x1, &x2, &targets, LossSettings::default(), 0.5, &mut rng)
            .unwrap();
        let grads = |t: Term| loss.term_backward(t).unwrap();
        let (total, id1, id2, verif) = (
            grads(Term::Total),
            grads(Term::Id1),
            grads(Term::Id2),
            grads(Term::Verif),
        );
        let mut checked = 0;
        for (name, var) in m.named_vars() {
            let Some(want) = total.get(var.as_tensor()) else {
                continue;
            };
            let part = |g: &candle_core::backprop::GradStore| match g.get(var.as_tensor()) {
                Some(t) => t.clone(),
                None => want.zeros_like().unwrap(),
            };
            let sum = ((part(&id1) * 0.5).unwrap() + (part(&id2) * 0.5).unwrap() + part(&verif)).unwrap();
            let diff = (sum - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(scalar(&diff) <= 1e-10, "{name}: off by {}", scalar(&diff));
            checked += 1;
        }
        assert!(
            checked > 50,
            "gradients of the backbone and heads were compared ({checked})"
        );
    }
}
