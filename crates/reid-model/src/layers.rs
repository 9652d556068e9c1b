//! The building blocks every backbone shares: bias-free convolution and batch norm
//! with timm's parameter names and PyTorch's settings.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, VarBuilder};

/// A bias-free 2-D convolution (`<name>.weight`, [out, in, k, k]).
#[derive(Debug, Clone)]
pub struct Conv {
    pub weight: Tensor,
    pub stride: usize,
    pub padding: usize,
}

impl Conv {
    /// A `kernel` x `kernel` convolution from `cin` to `cout` channels.
    pub fn new(cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let fan_out = cout * kernel * kernel;
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out as f64).sqrt(),
        };
        Ok(Conv {
            weight: vb.get_with_hints((cout, cin, kernel, kernel), "weight", init)?,
            stride,
            padding,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::conv2d(x, &self.weight, self.stride, self.padding)
    }
}

/// Batch norm with PyTorch's defaults: eps 1e-5, momentum 0.1, affine.
pub fn batch_norm(channels: usize, vb: VarBuilder) -> Result<BatchNorm> {
    candle_nn::batch_norm(
        channels,
        BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        },
        vb,
    )
}

/// Convolution then batch norm, the unit most layers are made of.
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub conv: Conv,
    pub bn: BatchNorm,
}

impl ConvBn {
    /// `conv` and `bn` under their own names in `vb` (e.g. `conv1` and `bn1`).
    pub fn new(conv: Conv, bn: BatchNorm) -> Self {
        ConvBn { conv, bn }
    }

    /// Convolution, batch norm (batch statistics when `train`), optional ReLU.
    pub fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let y = self.bn.forward_t(&self.conv.forward(x)?, train)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}
