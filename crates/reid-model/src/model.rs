//! The siamese re-ID network: one backbone shared by both branches, and the heads.

use std::collections::HashMap;

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::arch::Arch;
use crate::backbone::Backbone;
use crate::heads::{Heads, LossWeights, PairLoss, PairTargets};

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Stride of layer4: 2 as in timm, 1 as common in re-ID.
    pub last_stride: usize,
    /// Training identities K.
    pub num_classes: usize,
}

/// Backbone and heads, their variables held in one [`VarMap`] under timm's names
/// (heads as `id_classifier.*` and `verif_classifier.*`).
pub struct ReidModel {
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub backbone: Backbone,
    pub heads: Heads,
    pub dtype: DType,
    pub device: Device,
}

/// Whether a variable name is a batch-norm running statistic (never trained).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// Whether a variable belongs to the heads rather than the backbone.
pub fn is_head(name: &str) -> bool {
    name.starts_with("id_classifier.") || name.starts_with("verif_classifier.")
}

impl ReidModel {
    /// Builds the model with fresh variables (see [`ReidModel::initialize`]).
    pub fn new(config: ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let backbone = Backbone::new(config.arch, config.last_stride, vb.clone())?;
        let heads = Heads::new(config.arch.feature_dim(), config.num_classes, vb)?;
        Ok(ReidModel {
            config,
            varmap,
            backbone,
            heads,
            dtype,
            device: device.clone(),
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
                let mut rng = ChaCha8Rng::seed_from_u64(crate::seed_for(seed, i as u64));
                let values: Vec<f64> = (0..n).map(|_| stdev * standard_normal(&mut rng)).collect();
                Tensor::from_vec(values, dims, &self.device)?.to_dtype(self.dtype)?
            };
            var.set(&value)?;
        }
        Ok(())
    }

    /// Pooled features `f` [N, C] of images [N, 3, H, W].
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.backbone.forward_t(x, train)
    }

    /// One training forward of B pairs: the backbone runs once on `cat[x1, x2]`, so
    /// batch statistics cover all 2B images; then the weighted three-term loss.
    pub fn pair_loss<R: Rng>(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        targets: &PairTargets,
        weights: LossWeights,
        dropout: f64,
        rng: &mut R,
    ) -> Result<PairLoss> {
        let x = Tensor::cat(&[x1, x2], 0)?;
        let f = self.features(&x, true)?;
        self.heads.pair_loss(&f, targets, weights, dropout, rng)
    }

    /// Every variable's current value by name, as f32 on the CPU (for saving).
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.named_vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect()
    }
}

/// A standard normal draw by Box-Muller.
fn standard_normal<R: Rng>(rng: &mut R) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
