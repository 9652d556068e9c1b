//! SGD with momentum, dampening, weight decay and Nesterov, updating exactly as
//! PyTorch's `torch.optim.SGD`, with parameter groups.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Optimiser settings (`[optim]` in a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Base learning rate (the schedule scales it).
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// Learning-rate multiplier of the backbone (heads get 1).
    pub backbone_lr_mult: f64,
    /// No weight decay on 1-d parameters: batch-norm weights and biases, biases.
    pub no_decay_bn_bias: bool,
}

impl Default for SgdConfig {
    /// The paper's: lr 0.05, momentum 0.9, weight decay 5e-4.
    fn default() -> Self {
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 5e-4,
            nesterov: false,
            backbone_lr_mult: 1.0,
            no_decay_bn_bias: false,
        }
    }
}

/// One trained parameter with its group settings and momentum buffer.
#[derive(Debug)]
pub struct SgdParam {
    pub name: String,
    pub var: Var,
    pub lr_mult: f64,
    pub weight_decay: f64,
    pub momentum_buffer: Option<Tensor>,
}

/// `torch.optim.SGD` over named parameters.
#[derive(Debug)]
pub struct Sgd {
    pub config: SgdConfig,
    pub params: Vec<SgdParam>,
}

impl Sgd {
    /// Groups `params` (name, variable) by `config`: heads are the parameters named
    /// `id_classifier.*` or `verif_classifier.*`.
    pub fn new(params: Vec<(String, Var)>, config: SgdConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let head = reid_model::model::is_head(&name);
                let one_d = var.rank() <= 1;
                SgdParam {
                    lr_mult: if head { 1.0 } else { config.backbone_lr_mult },
                    weight_decay: if config.no_decay_bn_bias && one_d {
                        0.0
                    } else {
                        config.weight_decay
                    },
                    name,
                    var,
                    momentum_buffer: None,
                }
            })
            .collect();
        Sgd { config, params }
    }

    /// One update with learning rate `lr` (before group multipliers). Parameters
    /// without a gradient are left alone, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let SgdConfig {
            momentum,
            dampening,
            nesterov,
            ..
        } = self.config;
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let param = p.var.as_tensor().detach();
            let mut d = grad.detach();
            if p.weight_decay != 0.0 {
                d = (d + (&param * p.weight_decay)?)?;
            }
            if momentum != 0.0 {
                let buf = match p.momentum_buffer.take() {
                    None => d.clone(),
                    Some(b) => ((b * momentum)? + (&d * (1.0 - dampening))?)?,
                };
                d = if nesterov {
                    (d + (&buf * momentum)?)?
                } else {
                    buf.clone()
                };
                p.momentum_buffer = Some(buf);
            }
            p.var.set(&(param - (d * (lr * p.lr_mult))?)?)?;
        }
        Ok(())
    }
}
