//! The building blocks every backbone shares: bias-free convolution and batch norm
//! with timm's parameter names and PyTorch's settings.

use reid_ops::ledger::CountedContiguous;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::VarBuilder;

use reid_ops::batch_norm::{BatchNormAddRelu, BatchNormReluSplit, BatchNormTrain, ChannelAffine};
use reid_ops::channels::channel_slice_with;
use reid_ops::conv::{Conv2d, ConvCat};
use reid_ops::pool::{max_pool2d_with, Window};
use reid_ops::residual::add_relu_with;
use reid_ops::stem::{BatchNormReluMaxPool, Stem};
use reid_ops::tape::{self, Reads};
use reid_ops::{generic, Exec, Kernels, OpKind};

/// What follows a batch norm: nothing, or ReLU (fused into the same op).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
}

/// The shape of a bias-free square convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvSpec {
    /// A `kernel` x `kernel` convolution at stride 1, padded by `kernel / 2` (the
    /// output keeps the input's size), as every convolution of these backbones.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        ConvSpec {
            in_channels,
            out_channels,
            kernel,
            stride: 1,
            padding: kernel / 2,
        }
    }

    /// This convolution at `stride`.
    pub fn stride(self, stride: usize) -> Self {
        ConvSpec { stride, ..self }
    }
}

/// A bias-free 2-D convolution (`<name>.weight`, [out, in, k, k]). In bf16
/// precision it also holds a bf16 copy of its weight, which the convolution of
/// bf16 activations reads; the model rewrites it when it sets its weights, and
/// the optimiser after each update (see [`Conv::bf16_copy`]).
#[derive(Debug, Clone)]
pub struct Conv {
    pub weight: Tensor,
    pub stride: usize,
    pub padding: usize,
    copy: Option<Var>,
    exec: Exec,
}

impl Conv {
    /// The convolution `spec`, its weight under `vb` (He initialisation, fan-out),
    /// run as `exec` says.
    pub fn new(spec: ConvSpec, exec: Exec, vb: VarBuilder) -> Result<Self> {
        let ConvSpec {
            in_channels: cin,
            out_channels: cout,
            kernel,
            stride,
            padding,
        } = spec;
        let fan_out = cout * kernel * kernel;
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out as f64).sqrt(),
        };
        let weight = vb.get_with_hints((cout, cin, kernel, kernel), "weight", init)?;
        let copy = match exec.bf16() {
            true => Some(Var::from_tensor(&weight.to_dtype(DType::BF16)?)?),
            false => None,
        };
        Ok(Conv {
            weight,
            stride,
            padding,
            copy,
            exec,
        })
    }

    /// The bf16 copy of the weight (bf16 precision only): a gradient reaches it,
    /// not the weight, where the activations are bf16. It is the weight's value
    /// only after [`ReidModel`]'s own setters and the optimiser's update: a
    /// weight set by hand needs [`ReidModel::refresh_weight_copies`].
    ///
    /// [`ReidModel`]: crate::ReidModel
    /// [`ReidModel::refresh_weight_copies`]: crate::ReidModel::refresh_weight_copies
    pub fn bf16_copy(&self) -> Option<&Var> {
        self.copy.as_ref()
    }

    /// The convolution of `pieces` concatenated along the channels: a 1x1
    /// convolution on a tape, where the plan fuses it, reads the pieces where
    /// they are ([`ConvCat`]); otherwise the concatenation is made first.
    pub fn forward_cat(&self, pieces: &[Tensor]) -> Result<Tensor> {
        let Some(first) = pieces.first() else {
            candle_core::bail!("conv: no pieces to concatenate");
        };
        let direct = self.weight.dim(2)? == 1 && self.stride == 1 && self.padding == 0;
        let fused = self.exec.kernels(OpKind::TapeFused, first) == Kernels::Fused;
        if !(direct && fused && tape::recording()) {
            let merged = match pieces_on_tape(self.exec, first) {
                true => reid_ops::pieces::cat(pieces)?,
                false => tape::cat_channels(pieces)?,
            };
            return self.forward(&merged);
        }
        let pieces = pieces
            .iter()
            .map(|p| p.contiguous_counted())
            .collect::<Result<Vec<_>>>()?;
        let weight = self.weight.contiguous_counted()?;
        let mut inputs: Vec<(&Tensor, bool)> = pieces.iter().map(|p| (p, true)).collect();
        inputs.push((&weight, true));
        tape::op_any_inputs(&inputs, ConvCat, false)
    }
}

/// Whether Res2Net's pieces of tensors like `t` are cut and concatenated by one
/// op each on the tape ([`reid_ops::pieces`]) under `exec`.
fn pieces_on_tape(exec: Exec, t: &Tensor) -> bool {
    tape::recording() && exec.kernels(OpKind::Pieces, t) == Kernels::Fused
}

impl Module for Conv {
    /// The convolution, in bf16 under mixed precision (see [`Exec::bf16`]):
    /// of bf16 activations with the weight's bf16 copy, else of f32 operands
    /// cast to bf16 and back.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (DType::BF16, Some(copy)) = (x.dtype(), &self.copy) {
            let kernels = self.exec.kernels(OpKind::Conv, x);
            return reid_ops::conv::conv2d_with(kernels, x, copy.as_tensor(), self.stride, self.padding);
        }
        reid_ops::in_compute_precision(self.exec.bf16(), &[x, &self.weight], |t| {
            let kernels = self.exec.kernels(OpKind::Conv, &t[0]);
            reid_ops::conv::conv2d_with(kernels, &t[0], &t[1], self.stride, self.padding)
        })
    }
}

/// Batch norm with PyTorch's settings (eps 1e-5, momentum 0.1, affine) and timm's
/// names (`weight`, `bias`, `running_mean`, `running_var`). Where the plan fuses
/// it, it runs as the ops of [`reid_ops::batch_norm`], ReLU included when asked;
/// elsewhere through candle's own batch norm.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    generic: candle_nn::BatchNorm,
    exec: Exec,
}

/// PyTorch's batch-norm epsilon.
pub const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm {
    /// Batch norm of `channels` under `vb`, run as `exec` says.
    pub fn new(channels: usize, exec: Exec, vb: VarBuilder) -> Result<Self> {
        let running_mean = vb.get_with_hints(channels, "running_mean", candle_nn::Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", candle_nn::Init::Const(1.0))?;
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        let generic = candle_nn::BatchNorm::new_with_momentum(
            channels,
            running_mean.clone(),
            running_var.clone(),
            weight.clone(),
            bias.clone(),
            BN_EPS,
            BN_MOMENTUM,
        )?;
        Ok(BatchNorm {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            generic,
            exec,
        })
    }

    /// Normalises `x` ([N, C, H, W] or [N, C]) with batch statistics (updating the
    /// running ones) when `train`, else with the running statistics; then `then`.
    pub fn forward_t(&self, x: &Tensor, train: bool, then: Activation) -> Result<Tensor> {
        self.forward_with(self.kernels(x), x, train, then)
    }

    /// The fused ops where the plan has them for `x`, else candle-nn's batch norm.
    fn kernels(&self, x: &Tensor) -> Kernels {
        self.exec.kernels(OpKind::BatchNorm, x)
    }

    /// Whether the tape-only fused op of `x` runs: in train mode while a tape
    /// records, where the plan fuses it.
    fn tape_fused(&self, x: &Tensor, train: bool) -> bool {
        train && tape::recording() && self.exec.kernels(OpKind::TapeFused, x) == Kernels::Fused
    }

    /// [`BatchNorm::forward_t`] with the given kernels.
    pub fn forward_with(&self, kernels: Kernels, x: &Tensor, train: bool, then: Activation) -> Result<Tensor> {
        let relu = then == Activation::Relu;
        match (kernels, train) {
            (Kernels::Generic, _) => {
                let y = self.generic.forward_t(x, train)?;
                if relu {
                    generic::relu(&y)
                } else {
                    Ok(y)
                }
            }
            (Kernels::Fused, true) => self.train_fused(&x.contiguous_counted()?, relu),
            (Kernels::Fused, false) => {
                let scale = (&self.weight / (self.running_var.as_tensor() + BN_EPS)?.sqrt()?)?;
                let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
                x.contiguous_counted()?
                    .apply_op3_no_bwd(&scale, &shift, &ChannelAffine { relu })
            }
        }
    }

    /// The fused train-mode op, then the running-statistics update from the batch
    /// statistics it computed.
    fn train_fused(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let op = self.train_op(relu);
        // Without ReLU the backward reads no output (and the residual sum after it
        // frees it).
        let reads = if relu { Reads::ALL } else { Reads::INPUTS };
        let y = tape::op3(x, &self.weight, &self.bias, op.clone(), reads)?;
        self.update_running(&op, x)?;
        Ok(y)
    }

    /// `relu(bn(x) + r)`, the end of a residual block: one op while a tape
    /// records in train mode (on the CPU and CUDA), batch norm then
    /// [`add_relu`] otherwise.
    pub fn forward_add_relu(&self, x: &Tensor, r: &Tensor, train: bool) -> Result<Tensor> {
        let fused = self.exec.kernels(OpKind::BatchNormAddRelu, x) == Kernels::Fused;
        if !(train && fused && tape::recording()) {
            let kernels = self.exec.kernels(OpKind::AddRelu, x);
            return add_relu_with(kernels, &self.forward_t(x, train, Activation::Identity)?, r);
        }
        let (x, r) = (x.contiguous_counted()?, r.contiguous_counted()?);
        let op = BatchNormAddRelu {
            bn: self.train_op(false),
        };
        let [rx, rw, rb, rr] = BatchNormAddRelu::READS;
        let inputs = [(&x, rx), (&self.weight, rw), (&self.bias, rb), (&r, rr)];
        let y = tape::op_any_inputs(&inputs, op.clone(), true)?;
        self.update_running(&op.bn, &x)?;
        Ok(y)
    }

    /// Batch norm and ReLU, the output cut into `count` pieces of `width`
    /// channels (a Res2Net block's split): one op while a tape records (train
    /// mode on the CPU), batch norm then [`tape::split_channels`] otherwise.
    pub fn forward_relu_split(&self, x: &Tensor, width: usize, count: usize, train: bool) -> Result<Vec<Tensor>> {
        if !self.tape_fused(x, train) {
            let y = self.forward_t(x, train, Activation::Relu)?;
            if pieces_on_tape(self.exec, &y) {
                return reid_ops::pieces::split(&y, width, count);
            }
            let kernels = self.exec.kernels(OpKind::ChannelSlice, &y);
            let slice = |x: &Tensor, start, len| channel_slice_with(kernels, x, start, len);
            return tape::split_channels(&y, width, count, slice);
        }
        let x = x.contiguous_counted()?;
        let op = BatchNormReluSplit {
            bn: self.train_op(true),
            width,
            count,
        };
        let [rx, rw, rb] = BatchNormReluSplit::READS;
        let inputs = [(&x, rx), (&self.weight, rw), (&self.bias, rb)];
        let pieces = tape::op_any_outputs(&inputs, op.clone(), true)?;
        self.update_running(&op.bn, &x)?;
        Ok(pieces)
    }

    /// Batch norm, ReLU, then max pooling with `window` (the stem): one fused op
    /// in train mode where the plan fuses it, the separate ops otherwise.
    pub fn forward_relu_max_pool(&self, x: &Tensor, train: bool, window: Window) -> Result<Tensor> {
        if train && self.exec.kernels(OpKind::TapeFused, x) == Kernels::Fused {
            let x = x.contiguous_counted()?;
            let op = BatchNormReluMaxPool::new(self.train_op(true), window);
            let y = tape::op3(&x, &self.weight, &self.bias, op.clone(), Reads::ALL)?;
            self.update_running(&op.bn, &x)?;
            return Ok(y);
        }
        let y = self.forward_t(x, train, Activation::Relu)?;
        max_pool2d_with(self.exec.kernels(OpKind::Pool, &y), &y, window)
    }

    fn train_op(&self, relu: bool) -> BatchNormTrain {
        BatchNormTrain {
            eps: BN_EPS,
            relu,
            stats: Arc::new(Mutex::new(None)),
        }
    }

    /// The running statistics moved towards the batch statistics that `op`'s
    /// forward on `x` computed (unbiased variance, as PyTorch).
    fn update_running(&self, op: &BatchNormTrain, x: &Tensor) -> Result<()> {
        let (mean, var) = (self.running_mean.as_tensor(), self.running_var.as_tensor());
        if mean.dtype() != x.dtype() && (mean.dtype(), x.dtype()) != (DType::F32, DType::BF16) {
            candle_core::bail!(
                "batch norm: running statistics of {:?} for {:?} inputs",
                mean.dtype(),
                x.dtype()
            );
        }
        reid_ops::batch_norm::update_running(mean, var, &op.saved_stats(), BN_MOMENTUM)
    }

    /// The learned scale and shift (`weight`, `bias`).
    pub fn affine(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// The running mean and variance.
    pub fn running_stats(&self) -> (&Tensor, &Tensor) {
        (self.running_mean.as_tensor(), self.running_var.as_tensor())
    }
}

/// Batch norm with PyTorch's defaults under `vb` (`<name>.weight`, ...), run as
/// `exec` says.
pub fn batch_norm(channels: usize, exec: Exec, vb: VarBuilder) -> Result<BatchNorm> {
    BatchNorm::new(channels, exec, vb)
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

    /// Convolution, batch norm, ReLU and max pooling with `window` (the stem):
    /// one op in train mode where the plan fuses it, for f32 or f64 images that
    /// need no gradient in f32 precision; the batch norm, ReLU and pool as one op
    /// for other inputs in train mode; separate ops otherwise.
    pub fn forward_relu_max_pool(&self, x: &Tensor, train: bool, window: Window) -> Result<Tensor> {
        let exec = self.bn.exec;
        let whole = train
            && exec.kernels(OpKind::TapeFused, x) == Kernels::Fused
            && !x.track_op()
            && !exec.bf16()
            && matches!(x.dtype(), DType::F32 | DType::F64);
        if !whole {
            return self.bn.forward_relu_max_pool(&self.conv.forward(x)?, train, window);
        }
        let conv = Conv2d {
            stride: self.conv.stride,
            padding: self.conv.padding,
        };
        let rest = BatchNormReluMaxPool::new(self.bn.train_op(true), window);
        let op = Stem::new(conv, x.contiguous_counted()?, rest);
        let weight = self.conv.weight.contiguous_counted()?;
        let y = tape::op3(&weight, &self.bn.weight, &self.bn.bias, op.clone(), Reads::INPUTS)?;
        self.bn.update_running(&op.rest.bn, &y)?;
        Ok(y)
    }

    /// Convolution, batch norm (batch statistics when `train`), then `then`.
    pub fn forward_t(&self, x: &Tensor, train: bool, then: Activation) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, train, then)
    }

    /// Convolution, then [`BatchNorm::forward_relu_split`].
    pub fn forward_relu_split(&self, x: &Tensor, width: usize, count: usize, train: bool) -> Result<Vec<Tensor>> {
        self.bn.forward_relu_split(&self.conv.forward(x)?, width, count, train)
    }

    /// `relu(bn(conv(x)) + r)`, as [`BatchNorm::forward_add_relu`].
    pub fn forward_add_relu(&self, x: &Tensor, r: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_add_relu(&self.conv.forward(x)?, r, train)
    }
}
