//! The re-ID network as ONNX nodes: every convolution with its batch norm folded
//! in, the blocks as timm computes them, then pooling, the neck and the optional
//! L2 normalisation. Node and initialiser names follow timm's parameter names.

use candle_core::Tensor;
use reid_model::backbone::{Block, Bottle2neck, Bottleneck};
use reid_model::layers::{BatchNorm, ConvBn, BN_EPS};
use reid_model::ReidModel;

use crate::graph::{Attr, GraphBuilder};
use crate::ExportError;

/// The clamp of the feature norm, as `reid extract` (`f / max(|f|, 1e-12)`).
const NORM_EPS: f32 = 1e-12;

fn values(t: &Tensor, name: &str) -> Result<Vec<f64>, ExportError> {
    let v: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
        return Err(ExportError::NonFinite {
            tensor: name.to_string(),
            value: *bad as f64,
        });
    }
    Ok(v.into_iter().map(f64::from).collect())
}

/// The batch norm as `y = scale * x + shift` per channel, in f64.
fn bn_affine(bn: &BatchNorm, name: &str) -> Result<(Vec<f64>, Vec<f64>), ExportError> {
    let (weight, bias) = bn.affine();
    let (mean, var) = bn.running_stats();
    let (w, b) = (
        values(weight, &format!("{name}.weight"))?,
        values(bias, &format!("{name}.bias"))?,
    );
    let (m, v) = (
        values(mean, &format!("{name}.running_mean"))?,
        values(var, &format!("{name}.running_var"))?,
    );
    if let Some(bad) = v.iter().find(|x| **x < 0.0) {
        return Err(ExportError::Invalid(format!(
            "'{name}.running_var' holds {bad}, a negative variance: the checkpoint is damaged"
        )));
    }
    let scale: Vec<f64> = w.iter().zip(&v).map(|(w, v)| w / (v + BN_EPS).sqrt()).collect();
    let shift = b.iter().zip(&m).zip(&scale).map(|((b, m), s)| b - m * s).collect();
    Ok((scale, shift))
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Emits the network's nodes into a graph.
pub struct Emitter<'a> {
    pub g: &'a mut GraphBuilder,
}

impl Emitter<'_> {
    /// A convolution with `bn` folded into its weight and bias, then ReLU if `relu`.
    /// `conv` and `bn` are the timm names of the two layers.
    fn conv_bn(&mut self, x: &str, unit: &ConvBn, conv: &str, bn: &str, relu: bool) -> Result<String, ExportError> {
        let (scale, shift) = bn_affine(&unit.bn, bn)?;
        let dims = unit.conv.weight.dims().to_vec();
        let w = values(&unit.conv.weight, &format!("{conv}.weight"))?;
        let per_out = w.len() / dims[0];
        let folded: Vec<f32> = w
            .chunks(per_out)
            .zip(&scale)
            .flat_map(|(row, s)| row.iter().map(move |v| (v * s) as f32))
            .collect();
        let weight = self.g.initializer(&format!("{conv}.weight"), &dims, &folded);
        let bias = self.g.initializer(&format!("{conv}.bias"), &[dims[0]], &to_f32(&shift));
        let (k, s, p) = (dims[2] as i64, unit.conv.stride as i64, unit.conv.padding as i64);
        let y = self.g.node(
            "Conv",
            conv,
            &[x, &weight, &bias],
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![s, s])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
            ],
        );
        Ok(if relu {
            self.relu(&y, &format!("{conv}.relu"))
        } else {
            y
        })
    }

    fn relu(&mut self, x: &str, name: &str) -> String {
        self.g.node("Relu", name, &[x], &[])
    }

    fn pool(&mut self, op: &str, x: &str, name: &str, stride: usize) -> String {
        let s = stride as i64;
        let mut attrs = vec![
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("strides", Attr::Ints(vec![s, s])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1])),
        ];
        if op == "AveragePool" {
            // PyTorch's AvgPool2d counts the padded zeros (ONNX's default does not).
            attrs.push(("count_include_pad", Attr::Int(1)));
        }
        self.g.node(op, name, &[x], &attrs)
    }

    /// The shortcut of a block: its downsampling convolution, or `x` itself.
    fn shortcut(&mut self, x: &str, downsample: &Option<ConvBn>, name: &str) -> Result<String, ExportError> {
        match downsample {
            Some(d) => self.conv_bn(
                x,
                d,
                &format!("{name}.downsample.0"),
                &format!("{name}.downsample.1"),
                false,
            ),
            None => Ok(x.to_string()),
        }
    }

    /// timm's `Bottle2neck`, as [`Bottle2neck::forward_t`] computes it.
    fn bottle2neck(&mut self, x: &str, b: &Bottle2neck, name: &str) -> Result<String, ExportError> {
        let out = self.conv_bn(x, &b.conv1, &format!("{name}.conv1"), &format!("{name}.bn1"), true)?;
        let sizes = self
            .g
            .int_initializer(&format!("{name}.split"), &vec![b.width as i64; b.scale]);
        let groups = self.g.node_n(
            "Split",
            &format!("{name}.split"),
            &[&out, &sizes],
            &[("axis", Attr::Int(1))],
            b.scale,
        );
        let mut pieces = Vec::with_capacity(b.scale);
        let mut previous: Option<String> = None;
        for (i, conv) in b.convs.iter().enumerate() {
            let input = match (&previous, b.is_first) {
                (Some(p), false) => self.g.node("Add", &format!("{name}.add{i}"), &[p, &groups[i]], &[]),
                _ => groups[i].clone(),
            };
            let y = self.conv_bn(
                &input,
                conv,
                &format!("{name}.convs.{i}"),
                &format!("{name}.bns.{i}"),
                true,
            )?;
            pieces.push(y.clone());
            previous = Some(y);
        }
        if b.scale > 1 {
            let last = &groups[b.scale - 1];
            pieces.push(if b.is_first {
                self.pool("AveragePool", last, &format!("{name}.pool"), b.stride)
            } else {
                last.clone()
            });
        }
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let merged = self
            .g
            .node("Concat", &format!("{name}.cat"), &refs, &[("axis", Attr::Int(1))]);
        let merged = self.conv_bn(
            &merged,
            &b.conv3,
            &format!("{name}.conv3"),
            &format!("{name}.bn3"),
            false,
        )?;
        let shortcut = self.shortcut(x, &b.downsample, name)?;
        let sum = self
            .g
            .node("Add", &format!("{name}.residual"), &[&merged, &shortcut], &[]);
        Ok(self.relu(&sum, &format!("{name}.relu")))
    }

    /// timm's `Bottleneck`.
    fn bottleneck(&mut self, x: &str, b: &Bottleneck, name: &str) -> Result<String, ExportError> {
        let y = self.conv_bn(x, &b.conv1, &format!("{name}.conv1"), &format!("{name}.bn1"), true)?;
        let y = self.conv_bn(&y, &b.conv2, &format!("{name}.conv2"), &format!("{name}.bn2"), true)?;
        let y = self.conv_bn(&y, &b.conv3, &format!("{name}.conv3"), &format!("{name}.bn3"), false)?;
        let shortcut = self.shortcut(x, &b.downsample, name)?;
        let sum = self.g.node("Add", &format!("{name}.residual"), &[&y, &shortcut], &[]);
        Ok(self.relu(&sum, &format!("{name}.relu")))
    }

    /// Images `x` [N, 3, H, W] to pooled features [N, C].
    pub fn backbone(&mut self, x: &str, model: &ReidModel) -> Result<String, ExportError> {
        let bb = &model.backbone;
        let stem = self.conv_bn(x, &bb.stem, "conv1", "bn1", true)?;
        let mut y = self.pool("MaxPool", &stem, "maxpool", 2);
        for (s, stage) in bb.stages.iter().enumerate() {
            for (i, block) in stage.iter().enumerate() {
                let name = format!("layer{}.{i}", s + 1);
                y = match block {
                    Block::Res2Net(b) => self.bottle2neck(&y, b, &name)?,
                    Block::ResNet(b) => self.bottleneck(&y, b, &name)?,
                };
            }
        }
        let pooled = self.g.node("GlobalAveragePool", "global_pool", &[&y], &[]);
        Ok(self.g.node("Flatten", "flatten", &[&pooled], &[("axis", Attr::Int(1))]))
    }

    /// The neck's batch norm as a per-channel scale and shift.
    pub fn neck(&mut self, f: &str, bn: &BatchNorm) -> Result<String, ExportError> {
        let (scale, shift) = bn_affine(bn, "neck")?;
        let c = scale.len();
        let scale = self.g.initializer("neck.scale", &[1, c], &to_f32(&scale));
        let shift = self.g.initializer("neck.shift", &[1, c], &to_f32(&shift));
        let y = self.g.node("Mul", "neck.mul", &[f, &scale], &[]);
        Ok(self.g.node("Add", "neck.add", &[&y, &shift], &[]))
    }

    /// `f / max(||f||, 1e-12)` over each row.
    pub fn l2_normalize(&mut self, f: &str) -> String {
        let axes = self.g.int_initializer("normalize.axes", &[1]);
        let eps = self.g.initializer("normalize.eps", &[], &[NORM_EPS]);
        let sq = self.g.node("Mul", "normalize.square", &[f, f], &[]);
        let sum = self.g.node(
            "ReduceSum",
            "normalize.sum",
            &[&sq, &axes],
            &[("keepdims", Attr::Int(1))],
        );
        let norm = self.g.node("Sqrt", "normalize.sqrt", &[&sum], &[]);
        let norm = self.g.node("Max", "normalize.clamp", &[&norm, &eps], &[]);
        self.g.node("Div", "normalize.div", &[f, &norm], &[])
    }
}
