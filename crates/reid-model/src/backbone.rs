//! Res2Net and ResNet backbones with timm's structure and parameter names.
//! `f` is the global average pool of the last stage.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::arch::{Arch, BlockKind};
use crate::layers::{batch_norm, Activation, Conv, ConvBn, ConvSpec};
use reid_ops::pool::{avg_pool2d_with, Window};
use reid_ops::residual::add;
use reid_ops::tape;
use reid_ops::{Exec, OpKind};

/// timm's `Bottle2neck`: a 1x1 convolution split into `scale` groups; the first
/// `scale - 1` go through 3x3 convolutions, each after the previous group's output
/// is added (except in a stage's first block); the last group passes through (or is
/// average-pooled in a first block); a 1x1 convolution merges them.
#[derive(Debug, Clone)]
pub struct Bottle2neck {
    pub conv1: ConvBn,
    /// The `scale - 1` 3x3 convolutions (one when `scale` is 1).
    pub convs: Vec<ConvBn>,
    pub conv3: ConvBn,
    pub downsample: Option<ConvBn>,
    /// Channels of each group.
    pub width: usize,
    pub scale: usize,
    pub stride: usize,
    /// A stage's first block: groups are not chained and the last one is pooled.
    pub is_first: bool,
    exec: Exec,
}

impl Bottle2neck {
    pub fn new(
        inplanes: usize,
        planes: usize,
        stride: usize,
        scale: usize,
        base_width: usize,
        exec: Exec,
        vb: VarBuilder,
    ) -> Result<Self> {
        let width = planes * base_width / 64;
        let outplanes = planes * 4;
        let has_downsample = stride != 1 || inplanes != outplanes;
        let conv1 = ConvBn::new(
            Conv::new(ConvSpec::new(inplanes, width * scale, 1), exec, vb.pp("conv1"))?,
            batch_norm(width * scale, exec, vb.pp("bn1"))?,
        );
        let convs = (0..scale.max(2) - 1)
            .map(|i| {
                Ok(ConvBn::new(
                    Conv::new(
                        ConvSpec::new(width, width, 3).stride(stride),
                        exec,
                        vb.pp(format!("convs.{i}")),
                    )?,
                    batch_norm(width, exec, vb.pp(format!("bns.{i}")))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let conv3 = ConvBn::new(
            Conv::new(ConvSpec::new(width * scale, outplanes, 1), exec, vb.pp("conv3"))?,
            batch_norm(outplanes, exec, vb.pp("bn3"))?,
        );
        let downsample = has_downsample
            .then(|| -> Result<ConvBn> {
                Ok(ConvBn::new(
                    Conv::new(
                        ConvSpec::new(inplanes, outplanes, 1).stride(stride),
                        exec,
                        vb.pp("downsample.0"),
                    )?,
                    batch_norm(outplanes, exec, vb.pp("downsample.1"))?,
                ))
            })
            .transpose()?;
        Ok(Bottle2neck {
            conv1,
            convs,
            conv3,
            downsample,
            width,
            scale,
            stride,
            is_first: has_downsample,
            exec,
        })
    }

    /// Its convolutions, in order.
    pub fn convs(&self) -> impl Iterator<Item = &Conv> {
        let units = std::iter::once(&self.conv1).chain(&self.convs).chain([&self.conv3]);
        units.chain(&self.downsample).map(|u| &u.conv)
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let splits = self.conv1.forward_relu_split(x, self.width, self.scale, train)?;
        let mut splits = splits.into_iter();
        let mut pieces = Vec::with_capacity(self.scale);
        let mut previous: Option<Tensor> = None;
        for (conv, split) in self.convs.iter().zip(splits.by_ref()) {
            let input = match (&previous, self.is_first) {
                (Some(p), false) => add(p, &split)?,
                _ => split,
            };
            let y = conv.forward_t(&input, train, Activation::Relu)?;
            pieces.push(y.clone());
            previous = Some(y);
        }
        if let Some(last) = splits.next() {
            pieces.push(if self.is_first {
                let window = Window {
                    kernel: 3,
                    stride: self.stride,
                    padding: 1,
                };
                avg_pool2d_with(self.exec.kernels(OpKind::Pool, &last), &last, window)?
            } else {
                last
            });
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward_t(x, train, Activation::Identity)?,
            None => x.clone(),
        };
        let merged = self.conv3.conv.forward_cat(&pieces)?;
        self.conv3.bn.forward_add_relu(&merged, &shortcut, train)
    }
}

/// timm/torchvision's `Bottleneck`: 1x1, 3x3 (strided), 1x1, plus the shortcut.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    pub conv1: ConvBn,
    pub conv2: ConvBn,
    pub conv3: ConvBn,
    pub downsample: Option<ConvBn>,
}

impl Bottleneck {
    pub fn new(inplanes: usize, planes: usize, stride: usize, exec: Exec, vb: VarBuilder) -> Result<Self> {
        let outplanes = planes * 4;
        let downsample = (stride != 1 || inplanes != outplanes)
            .then(|| -> Result<ConvBn> {
                Ok(ConvBn::new(
                    Conv::new(
                        ConvSpec::new(inplanes, outplanes, 1).stride(stride),
                        exec,
                        vb.pp("downsample.0"),
                    )?,
                    batch_norm(outplanes, exec, vb.pp("downsample.1"))?,
                ))
            })
            .transpose()?;
        Ok(Bottleneck {
            conv1: ConvBn::new(
                Conv::new(ConvSpec::new(inplanes, planes, 1), exec, vb.pp("conv1"))?,
                batch_norm(planes, exec, vb.pp("bn1"))?,
            ),
            conv2: ConvBn::new(
                Conv::new(ConvSpec::new(planes, planes, 3).stride(stride), exec, vb.pp("conv2"))?,
                batch_norm(planes, exec, vb.pp("bn2"))?,
            ),
            conv3: ConvBn::new(
                Conv::new(ConvSpec::new(planes, outplanes, 1), exec, vb.pp("conv3"))?,
                batch_norm(outplanes, exec, vb.pp("bn3"))?,
            ),
            downsample,
        })
    }

    /// Its convolutions, in order.
    pub fn convs(&self) -> impl Iterator<Item = &Conv> {
        let units = [&self.conv1, &self.conv2, &self.conv3].into_iter();
        units.chain(&self.downsample).map(|u| &u.conv)
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv1.forward_t(x, train, Activation::Relu)?;
        let y = self.conv2.forward_t(&y, train, Activation::Relu)?;
        let shortcut = match &self.downsample {
            Some(d) => d.forward_t(x, train, Activation::Identity)?,
            None => x.clone(),
        };
        self.conv3.forward_add_relu(&y, &shortcut, train)
    }
}

/// One residual block of either kind.
#[derive(Debug, Clone)]
pub enum Block {
    Res2Net(Bottle2neck),
    ResNet(Bottleneck),
}

impl Block {
    /// Its convolutions, in order.
    pub fn convs(&self) -> Box<dyn Iterator<Item = &Conv> + '_> {
        match self {
            Block::Res2Net(b) => Box::new(b.convs()),
            Block::ResNet(b) => Box::new(b.convs()),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Block::Res2Net(b) => b.forward_t(x, train),
            Block::ResNet(b) => b.forward_t(x, train),
        }
    }
}

/// Stem (7x7/2 convolution, batch norm, ReLU, 3x3/2 max pool) and four stages.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub arch: Arch,
    /// The 7x7/2 convolution and its batch norm (`conv1`, `bn1`).
    pub stem: ConvBn,
    /// layer1..layer4, their blocks in order.
    pub stages: Vec<Vec<Block>>,
    exec: Exec,
}

impl Backbone {
    /// Builds `arch` with timm names under `vb`; `last_stride` is layer4's stride
    /// (2 as in timm, 1 as common in re-ID); its layers run as `exec` says.
    pub fn new(arch: Arch, last_stride: usize, exec: Exec, vb: VarBuilder) -> Result<Self> {
        let stem = ConvBn::new(
            Conv::new(ConvSpec::new(3, 64, 7).stride(2), exec, vb.pp("conv1"))?,
            batch_norm(64, exec, vb.pp("bn1"))?,
        );
        let mut inplanes = 64;
        let mut stages = Vec::with_capacity(4);
        for (s, (&blocks, &planes)) in arch.layers.iter().zip(&arch.planes).enumerate() {
            let stride = match s {
                0 => 1,
                3 => last_stride,
                _ => 2,
            };
            let vb_stage = vb.pp(format!("layer{}", s + 1));
            let mut stage = Vec::with_capacity(blocks);
            for b in 0..blocks {
                let block_stride = if b == 0 { stride } else { 1 };
                let vbb = vb_stage.pp(b.to_string());
                stage.push(match arch.block {
                    BlockKind::Res2Net { scale, base_width } => Block::Res2Net(Bottle2neck::new(
                        inplanes,
                        planes,
                        block_stride,
                        scale,
                        base_width,
                        exec,
                        vbb,
                    )?),
                    BlockKind::ResNet => Block::ResNet(Bottleneck::new(inplanes, planes, block_stride, exec, vbb)?),
                });
                inplanes = planes * 4;
            }
            stages.push(stage);
        }
        Ok(Backbone {
            arch,
            stem,
            stages,
            exec,
        })
    }

    /// Every convolution, in order (the stem's first).
    pub fn convs(&self) -> impl Iterator<Item = &Conv> {
        let blocks = self.stages.iter().flatten();
        std::iter::once(&self.stem.conv).chain(blocks.flat_map(Block::convs))
    }

    /// The stem: 7x7/2 convolution, batch norm, ReLU, 3x3/2 max pool (one op in
    /// train mode on the CPU; see [`ConvBn::forward_relu_max_pool`]).
    fn stem_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let pool = Window {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        self.stem.forward_relu_max_pool(x, train, pool)
    }

    /// The outputs of layer1..layer4 for images `x` [N, 3, H, W].
    pub fn stage_outputs(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut y = self.stem_forward(x, train)?;
        let mut outputs = Vec::with_capacity(4);
        for stage in &self.stages {
            for block in stage {
                y = block.forward_t(&y, train)?;
            }
            outputs.push(y.clone());
        }
        Ok(outputs)
    }
}

impl ModuleT for Backbone {
    /// Pooled features `f` [N, C]. In bf16 precision the images are cast to
    /// bf16 once, and the last activations back once before pooling (see
    /// [`Exec::activations_of`]); the features have the images' dtype.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let activations = self.exec.activations_of(x);
        let mut y = self.stem_forward(&reid_ops::ledger::cast(x, activations)?, train)?;
        for stage in &self.stages {
            for block in stage {
                y = block.forward_t(&y, train)?;
            }
        }
        tape::spatial_mean(&tape::cast(&y, x.dtype())?)
    }
}
