//! SGD with momentum, dampening, weight decay and Nesterov, updating exactly as
//! PyTorch's `torch.optim.SGD`, with parameter groups.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor, Var};
use num_traits::Float;
use rayon::prelude::*;
use reid_model::ops::Kernels;
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
    /// Memory for the first momentum buffer, taken before training allocates its
    /// activations (in-place updates only): buffers made at the first step land
    /// between them and raised the peak of a Res2Net-50 step by 6%.
    spare: Option<Tensor>,
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
                    // A failed allocation here is tried again at the first step,
                    // where its error is returned.
                    spare: (config.momentum != 0.0 && Kernels::for_tensor(var.as_tensor()) == Kernels::Fused)
                        .then(|| var.zeros_like().ok())
                        .flatten(),
                    name,
                    var,
                    momentum_buffer: None,
                }
            })
            .collect();
        Sgd { config, params }
    }

    /// One update with learning rate `lr` (before group multipliers). Parameters
    /// without a gradient are left alone, as PyTorch does. On the CPU each
    /// parameter is updated in place in two passes (momentum, then parameter);
    /// elsewhere (and under `REID_OPS=generic`) by tensor operations. Both round
    /// the same operations in the same order, so they give the same bits.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_with(grads, lr, Kernels::for_tensor)
    }

    /// [`Sgd::step`] with the implementation `kernels` picks for each parameter.
    fn step_with(&mut self, grads: &GradStore, lr: f64, kernels: impl Fn(&Tensor) -> Kernels) -> Result<()> {
        let config = self.config.clone();
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let rule = Rule::new(&config, p, lr);
            match kernels(p.var.as_tensor()) {
                Kernels::Fused => rule.update_in_place(p, &grad.contiguous()?)?,
                Kernels::Generic => rule.update_by_tensors(p, grad)?,
            }
        }
        Ok(())
    }
}

/// The update of one parameter: PyTorch's SGD with this group's settings.
#[derive(Debug, Clone, Copy)]
struct Rule {
    lr: f64,
    weight_decay: f64,
    momentum: f64,
    dampening: f64,
    nesterov: bool,
}

impl Rule {
    fn new(config: &SgdConfig, p: &SgdParam, lr: f64) -> Self {
        Rule {
            lr: lr * p.lr_mult,
            weight_decay: p.weight_decay,
            momentum: config.momentum,
            dampening: config.dampening,
            nesterov: config.nesterov,
        }
    }

    /// The update as tensor operations (any device).
    fn update_by_tensors(&self, p: &mut SgdParam, grad: &Tensor) -> Result<()> {
        let param = p.var.as_tensor().detach();
        let mut d = grad.detach();
        if self.weight_decay != 0.0 {
            d = (d + (&param * self.weight_decay)?)?;
        }
        if self.momentum != 0.0 {
            let buf = match p.momentum_buffer.take() {
                None => d.clone(),
                Some(b) => ((b * self.momentum)? + (&d * (1.0 - self.dampening))?)?,
            };
            d = if self.nesterov {
                (d + (&buf * self.momentum)?)?
            } else {
                buf.clone()
            };
            p.momentum_buffer = Some(buf);
        }
        p.var.set(&(param - (d * self.lr)?)?)
    }

    /// The update in place: the momentum buffer, then the parameter, each in one
    /// pass. The first buffer goes into the parameter's spare memory.
    fn update_in_place(&self, p: &mut SgdParam, grad: &Tensor) -> Result<()> {
        let param = p.var.as_tensor();
        let spare = p.spare.take();
        if self.momentum == 0.0 {
            // The step is the gradient with decay: `grad` fills both operand places.
            return param.inplace_op3(grad, grad, &Pass(*self, PassKind::Param));
        }
        let (buf, kind) = match p.momentum_buffer.take() {
            Some(b) => (b.contiguous()?, PassKind::Momentum),
            None => match spare {
                Some(s) => (s, PassKind::FirstMomentum),
                None => (param.zeros_like()?, PassKind::FirstMomentum),
            },
        };
        buf.inplace_op3(grad, param, &Pass(*self, kind))?;
        param.inplace_op3(grad, &buf, &Pass(*self, PassKind::Param))?;
        p.momentum_buffer = Some(buf);
        Ok(())
    }

    /// The gradient with weight decay, `g + p * wd` (as candle's affine rounds it).
    #[inline(always)]
    fn decayed<T: Float>(&self, g: T, p: T) -> T {
        if self.weight_decay != 0.0 {
            g + (p * T::from(self.weight_decay).expect("float") + T::zero())
        } else {
            g
        }
    }

    /// `b * momentum + d * (1 - dampening)`.
    #[inline(always)]
    fn momentum_of<T: Float>(&self, b: T, d: T) -> T {
        let m = T::from(self.momentum).expect("float");
        let keep = T::from(1.0 - self.dampening).expect("float");
        (b * m + T::zero()) + (d * keep + T::zero())
    }

    /// The new parameter from the decayed gradient `d` and the new buffer `b`.
    #[inline(always)]
    fn stepped<T: Float>(&self, p: T, d: T, b: T) -> T {
        let direction = match (self.momentum != 0.0, self.nesterov) {
            (false, _) => d,
            (true, false) => b,
            (true, true) => d + (b * T::from(self.momentum).expect("float") + T::zero()),
        };
        p - (direction * T::from(self.lr).expect("float") + T::zero())
    }
}

/// One pass of the in-place update over a tensor and two operands.
#[derive(Debug, Clone, Copy)]
enum PassKind {
    /// `buf <- g + p * wd` (the first buffer); operands (grad, param).
    FirstMomentum,
    /// `buf <- buf * momentum + (g + p * wd) * (1 - dampening)`; operands (grad, param).
    Momentum,
    /// `p <- p - lr * direction`; operands (grad, buffer).
    Param,
}

/// A [`PassKind`] with the rule it applies.
struct Pass(Rule, PassKind);

impl Pass {
    /// Writes every value of `dst` from itself and the same values of `a` and `b`.
    fn apply<T: Float + Send + Sync>(&self, dst: &mut [T], a: &[T], b: &[T]) {
        let r = self.0;
        match self.1 {
            PassKind::FirstMomentum => each(dst, a, b, |_, g, p| r.decayed(g, p)),
            PassKind::Momentum => each(dst, a, b, |buf, g, p| r.momentum_of(buf, r.decayed(g, p))),
            PassKind::Param => each(dst, a, b, |p, g, buf| r.stepped(p, r.decayed(g, p), buf)),
        }
    }
}

/// Elements per parallel task of a pass.
const CHUNK: usize = 1 << 16;

/// `dst[i] <- f(dst[i], a[i], b[i])`, in parallel chunks.
fn each<T: Float + Send + Sync>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T, T) -> T + Sync) {
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(k, chunk)| {
        let (a, b) = (&a[k * CHUNK..], &b[k * CHUNK..]);
        for ((d, &x), &y) in chunk.iter_mut().zip(a).zip(b) {
            *d = f(*d, x, y);
        }
    });
}

/// The contiguous values of `storage` as `T`, or an error naming `op`.
fn values<'a, T: candle_core::WithDType>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [T]> {
    reid_model::ops::contiguous(T::cpu_storage_as_slice(storage)?, layout, op)
}

impl InplaceOp3 for Pass {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<()> {
        let op = self.name();
        let Some((lo, hi)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("{op}: the updated tensor must be contiguous");
        };
        let sizes = |a: usize, b: usize| match a == hi - lo && b == hi - lo {
            true => Ok(()),
            false => Err(candle_core::Error::Msg(format!("{op}: operand sizes differ"))),
        };
        match dst {
            CpuStorage::F32(d) => {
                let (a, b) = (values::<f32>(a, a_l, op)?, values::<f32>(b, b_l, op)?);
                sizes(a.len(), b.len())?;
                self.apply(&mut d[lo..hi], a, b);
            }
            CpuStorage::F64(d) => {
                let (a, b) = (values::<f64>(a, a_l, op)?, values::<f64>(b, b_l, op)?);
                sizes(a.len(), b.len())?;
                self.apply(&mut d[lo..hi], a, b);
            }
            _ => candle_core::bail!("{op}: only f32 and f64 parameters are supported"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Values spread over [-1, 1) from a seeded linear congruential stream.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// An optimiser over a weight [3, 5] (`id_classifier.weight`, a head) and a
    /// bias [7] (backbone, 1-d), both of `dtype`.
    fn optimiser(config: &SgdConfig, dtype: DType) -> Sgd {
        let var = |n: usize, shape: &[usize], seed| {
            let t = Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        let params = vec![
            ("id_classifier.weight".to_string(), var(15, &[3, 5], 1)),
            ("layer1.0.bn1.bias".to_string(), var(7, &[7], 2)),
        ];
        Sgd::new(params, config.clone())
    }

    /// Gradients of `sum(param * x)` with `x` from `seed`: `x` itself.
    fn gradients(sgd: &Sgd, seed: u64) -> GradStore {
        let mut loss: Option<Tensor> = None;
        for (k, p) in sgd.params.iter().enumerate() {
            let t = p.var.as_tensor();
            let x = Tensor::from_vec(values(t.elem_count(), seed + k as u64), t.dims(), &Device::Cpu).unwrap();
            let term = (t * x.to_dtype(t.dtype()).unwrap()).unwrap().sum_all().unwrap();
            loss = Some(match loss {
                None => term,
                Some(l) => (l + term).unwrap(),
            });
        }
        loss.unwrap().backward().unwrap()
    }

    fn bits(sgd: &Sgd) -> Vec<u64> {
        let mut out = Vec::new();
        for p in &sgd.params {
            let mut tensors = vec![p.var.as_tensor().clone()];
            tensors.extend(p.momentum_buffer.clone());
            for t in tensors {
                let v: Vec<f64> = t
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                out.extend(v.iter().map(|x| x.to_bits()));
            }
        }
        out
    }

    #[test]
    fn the_in_place_update_gives_the_bits_of_the_tensor_operations() {
        let configs = [
            SgdConfig::default(),
            SgdConfig {
                nesterov: true,
                backbone_lr_mult: 0.1,
                no_decay_bn_bias: true,
                ..SgdConfig::default()
            },
            SgdConfig {
                dampening: 0.1,
                weight_decay: 0.0,
                ..SgdConfig::default()
            },
            SgdConfig {
                momentum: 0.0,
                ..SgdConfig::default()
            },
        ];
        for (c, config) in configs.iter().enumerate() {
            for dtype in [DType::F32, DType::F64] {
                let (mut fused, mut tensors) = (optimiser(config, dtype), optimiser(config, dtype));
                for step in 0..3 {
                    let lr = 0.05 / (step + 1) as f64;
                    fused
                        .step_with(&gradients(&fused, 10 * step), lr, |_| Kernels::Fused)
                        .unwrap();
                    tensors
                        .step_with(&gradients(&tensors, 10 * step), lr, |_| Kernels::Generic)
                        .unwrap();
                    assert_eq!(bits(&fused), bits(&tensors), "config {c}, {dtype:?}, step {step}");
                }
                let moved = bits(&fused) != bits(&optimiser(config, dtype));
                assert!(moved, "config {c}: the parameters did not move");
            }
        }
    }
}
