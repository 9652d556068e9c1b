//! SGD with momentum, dampening, weight decay and Nesterov, updating exactly as
//! PyTorch's `torch.optim.SGD`, with parameter groups.

use candle_core::backprop::GradStore;
use reid_ops::ledger::CountedContiguous;
use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor, Var};
use num_traits::Float;
use rayon::prelude::*;
use reid_ops::{Exec, Kernels, OpKind};
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
    /// The parameter's bf16 copy (convolution weights in bf16 precision): where
    /// the gradient reached it, the update reads that gradient; after each
    /// update it is rewritten from the parameter.
    pub copy: Option<Var>,
}

/// `torch.optim.SGD` over named parameters.
#[derive(Debug)]
pub struct Sgd {
    pub config: SgdConfig,
    pub params: Vec<SgdParam>,
    exec: Exec,
}

impl Sgd {
    /// Groups `params` (name, variable) by `config`: heads are the parameters named
    /// `id_classifier.*` or `verif_classifier.*`. The update runs as `exec` says.
    pub fn new(params: Vec<(String, Var)>, config: SgdConfig, exec: Exec) -> Self {
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
                    spare: (config.momentum != 0.0 && exec.kernels(OpKind::Sgd, var.as_tensor()) == Kernels::Fused)
                        .then(|| var.zeros_like().ok())
                        .flatten(),
                    name,
                    var,
                    momentum_buffer: None,
                    copy: None,
                }
            })
            .collect();
        Sgd { config, params, exec }
    }

    /// `Sgd::new` over `model`'s trainable variables and its plan, with the
    /// bf16 copies of its weights (bf16 precision), which the model keeps equal
    /// to its weights (see `ReidModel::refresh_weight_copies`) and each update
    /// rewrites.
    pub fn for_model(model: &reid_model::ReidModel, config: SgdConfig) -> Self {
        let mut sgd = Sgd::new(model.trainable_vars(), config, model.exec);
        let copies: std::collections::HashMap<_, _> = model.weight_copies().into_iter().collect();
        for p in &mut sgd.params {
            p.copy = copies.get(&p.var.id()).cloned();
        }
        sgd
    }

    /// One update with learning rate `lr` (before group multipliers). Parameters
    /// without a gradient are left alone, as PyTorch does. On the CPU each
    /// parameter is updated in place in one pass (parameter, momentum and bf16 copy together)
    /// where the plan fuses it; by tensor operations elsewhere. Both round the same
    /// operations in the same order, so they give the same bits.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let exec = self.exec;
        self.step_with(grads, lr, |t| exec.kernels(OpKind::Sgd, t))
    }

    /// [`Sgd::step`] with the implementation `kernels` picks for each parameter.
    fn step_with(&mut self, grads: &GradStore, lr: f64, kernels: impl Fn(&Tensor) -> Kernels) -> Result<()> {
        let config = self.config.clone();
        for p in &mut self.params {
            let of_copy = p.copy.as_ref().and_then(|c| grads.get(c.as_tensor()));
            let Some(grad) = of_copy.or_else(|| grads.get(p.var.as_tensor())) else {
                continue;
            };
            let rule = Rule::new(&config, p, lr);
            match kernels(p.var.as_tensor()) {
                // The pass writes the copy too.
                Kernels::Fused => rule.update_in_place(p, &grad.contiguous_counted()?)?,
                Kernels::Generic => {
                    rule.update_by_tensors(p, &reid_ops::ledger::cast(grad, p.var.dtype())?)?;
                    if let Some(copy) = &p.copy {
                        refresh(copy, &p.var)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Rewrites `copy` (bf16) from `var` (f32): one launch.
fn refresh(copy: &Var, var: &Var) -> Result<()> {
    reid_ops::mixed::write_bf16_copy(copy.as_tensor(), var.as_tensor())
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

    /// The update in place, one pass over the parameter, its gradient, its
    /// momentum buffer and its bf16 copy. The first buffer goes into the
    /// parameter's spare memory.
    fn update_in_place(&self, p: &mut SgdParam, grad: &Tensor) -> Result<()> {
        let param = p.var.as_tensor();
        let spare = p.spare.take();
        let buf = match (self.momentum, p.momentum_buffer.take()) {
            (0.0, _) => None,
            (_, Some(b)) => Some((b.contiguous_counted()?, false)),
            (_, None) => match spare {
                Some(s) => Some((s, true)),
                None => Some((reid_ops::ledger::made(1, param.zeros_like())?, true)),
            },
        };
        let update = InPlace {
            rule: *self,
            param,
            grad,
            buf: buf.as_ref().map(|(b, first)| (b, *first)),
        };
        match &p.copy {
            Some(copy) => copy.as_tensor().inplace_op1(&WithCopy(&update))?,
            None => update.run(None)?,
        }
        p.momentum_buffer = buf.map(|(b, _)| b);
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

/// One in-place update: the parameter, its gradient, and its momentum buffer
/// with whether it is new (it then becomes the decayed gradient).
struct InPlace<'a> {
    rule: Rule,
    param: &'a Tensor,
    grad: &'a Tensor,
    buf: Option<(&'a Tensor, bool)>,
}

impl InPlace<'_> {
    /// Runs [`Pass`] on the parameter, with the buffer's memory lent to it (see
    /// [`WithBuffer`]) and the copy's (`copy`, if any).
    fn run(&self, copy: Option<Lent<'_>>) -> Result<()> {
        match self.buf {
            None => self.param.inplace_op2(
                self.grad,
                &Pass {
                    rule: self.rule,
                    buf: None,
                    copy: copy.map(RefCell::new),
                },
            ),
            Some((buf, first)) => buf.inplace_op1(&WithBuffer {
                update: self,
                first,
                copy: RefCell::new(copy),
            }),
        }
    }
}

/// The update of a parameter that has a bf16 copy, run on the copy: it lends
/// the copy's memory to the [`Pass`], which writes it beside the parameter.
struct WithCopy<'a>(&'a InPlace<'a>);

impl InplaceOp1 for WithCopy<'_> {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(&self, copy: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("sgd-update: the bf16 copy must be contiguous");
        };
        self.0.run(Some(Lent::Cpu(copy, range)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, copy: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        self.0.run(Some(Lent::Cuda(copy, layout.clone())))
    }
}

/// The update of a parameter with a momentum buffer, run on the buffer: while
/// it holds the buffer's memory, it runs [`Pass`] on the parameter, which writes
/// both (on the CPU, or in one CUDA launch). (candle's in-place ops write only
/// the tensor they run on.)
struct WithBuffer<'a> {
    update: &'a InPlace<'a>,
    /// Whether the buffer is new: it becomes the decayed gradient.
    first: bool,
    /// The copy's memory, handed on to the pass.
    copy: RefCell<Option<Lent<'a>>>,
}

impl InplaceOp1 for WithBuffer<'_> {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(&self, buf: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("sgd-update: the momentum buffer must be contiguous");
        };
        let pass = Pass {
            rule: self.update.rule,
            buf: Some(Buffer {
                values: RefCell::new(Lent::Cpu(buf, range)),
                first: self.first,
            }),
            copy: self.copy.borrow_mut().take().map(RefCell::new),
        };
        self.update.param.inplace_op2(self.update.grad, &pass)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, buf: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        let pass = Pass {
            rule: self.update.rule,
            buf: Some(Buffer {
                values: RefCell::new(Lent::Cuda(buf, layout.clone())),
                first: self.first,
            }),
            copy: self.copy.borrow_mut().take().map(RefCell::new),
        };
        self.update.param.inplace_op2(self.update.grad, &pass)
    }
}

/// The memory of a momentum buffer or a bf16 copy: CPU values and their range,
/// or a CUDA storage and its layout.
enum Lent<'a> {
    Cpu(&'a mut CpuStorage, (usize, usize)),
    #[cfg(feature = "cuda")]
    Cuda(&'a mut candle_core::CudaStorage, Layout),
}

/// A momentum buffer's memory, lent to the [`Pass`] that updates it.
struct Buffer<'a> {
    values: RefCell<Lent<'a>>,
    first: bool,
}

/// The pass over one parameter: `p <- p - lr * direction`, with the buffer (if
/// any) updated beside it, `buf <- buf * momentum + (g + p * wd) * (1 - dampening)`
/// (the first buffer: `g + p * wd`), and the bf16 copy (if any) written from the
/// new `p`. Operand: the gradient.
struct Pass<'a> {
    rule: Rule,
    buf: Option<Buffer<'a>>,
    copy: Option<RefCell<Lent<'a>>>,
}

impl Pass<'_> {
    /// [`Pass::apply`] once the operands' sizes are checked.
    fn run<T: Float + Send + Sync>(&self, p: &mut [T], g: &[T], buf: Option<(&mut [T], bool)>) -> Result<()> {
        let same = g.len() == p.len() && buf.as_ref().is_none_or(|(b, _)| b.len() == p.len());
        if !same {
            candle_core::bail!("sgd-update: operand sizes differ");
        }
        self.apply(p, g, buf);
        Ok(())
    }

    /// Updates `p` (and `buf`, if there is one) from the gradient `g`.
    fn apply<T: Float + Send + Sync>(&self, p: &mut [T], g: &[T], buf: Option<(&mut [T], bool)>) {
        let r = self.rule;
        match buf {
            None => each(p, g, |p, g| r.stepped(p, r.decayed(g, p), T::zero())),
            Some((buf, first)) => each_with(p, g, buf, |p, g, b| {
                let d = r.decayed(g, p);
                let b = if first { d } else { r.momentum_of(b, d) };
                (r.stepped(p, d, b), b)
            }),
        }
    }
}

/// Elements per parallel task of a pass.
const CHUNK: usize = 1 << 16;

/// `dst[i] <- f(dst[i], a[i])`, in parallel chunks.
fn each<T: Float + Send + Sync>(dst: &mut [T], a: &[T], f: impl Fn(T, T) -> T + Sync) {
    dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(dst, a)| {
        for (d, &x) in dst.iter_mut().zip(a) {
            *d = f(*d, x);
        }
    });
}

/// `(dst[i], both[i]) <- f(dst[i], a[i], both[i])`, in parallel chunks.
fn each_with<T: Float + Send + Sync>(dst: &mut [T], a: &[T], both: &mut [T], f: impl Fn(T, T, T) -> (T, T) + Sync) {
    let chunks = dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK));
    chunks.zip(both.par_chunks_mut(CHUNK)).for_each(|((dst, a), both)| {
        for ((d, &x), b) in dst.iter_mut().zip(a).zip(both.iter_mut()) {
            (*d, *b) = f(*d, x, *b);
        }
    });
}

/// The contiguous values of `storage` as `T`, or an error naming `op`.
fn values<'a, T: candle_core::WithDType>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [T]> {
    reid_ops::contiguous(T::cpu_storage_as_slice(storage)?, layout, op)
}

impl InplaceOp2 for Pass<'_> {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(&self, param: &mut CpuStorage, param_l: &Layout, grad: &CpuStorage, grad_l: &Layout) -> Result<()> {
        let op = self.name();
        reid_ops::ledger::launched(1); // as CUDA's one kernel (sgd.cu)
        let Some((lo, hi)) = param_l.contiguous_offsets() else {
            candle_core::bail!("{op}: the updated tensor must be contiguous");
        };
        let mut lent = self.buf.as_ref().map(|b| (b.values.borrow_mut(), b.first));
        let mut buf = None;
        if let Some((values, first)) = lent.as_mut() {
            // Irrefutable in a build without CUDA.
            #[allow(irrefutable_let_patterns)]
            let Lent::Cpu(v, r) = &mut **values
            else {
                candle_core::bail!("{op}: a CPU parameter with a momentum buffer elsewhere");
            };
            buf = Some((&mut **v, *r, *first));
        }
        match (&mut *param, buf) {
            // A bf16 gradient (of a bf16 copy) is read widened, as the CUDA kernel does.
            (CpuStorage::F32(v), None) => self.run(&mut v[lo..hi], &reid_ops::mixed::widened(grad, grad_l, op)?, None),
            (CpuStorage::F32(v), Some((CpuStorage::F32(b), r, first))) => self.run(
                &mut v[lo..hi],
                &reid_ops::mixed::widened(grad, grad_l, op)?,
                Some((&mut b[r.0..r.1], first)),
            ),
            (CpuStorage::F64(v), None) => self.run(&mut v[lo..hi], values::<f64>(grad, grad_l, op)?, None),
            (CpuStorage::F64(v), Some((CpuStorage::F64(b), r, first))) => self.run(
                &mut v[lo..hi],
                values::<f64>(grad, grad_l, op)?,
                Some((&mut b[r.0..r.1], first)),
            ),
            _ => candle_core::bail!("{op}: f32 or f64 parameters only, with buffers of their dtype"),
        }?;
        match (self.copy.as_ref().map(|c| c.borrow_mut()), param) {
            (None, _) => Ok(()),
            (Some(mut copy), CpuStorage::F32(v)) => write_copy(&mut copy, &v[lo..hi], op),
            (Some(_), _) => candle_core::bail!("{op}: a bf16 copy of a parameter that is not f32"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        param: &mut candle_core::CudaStorage,
        param_l: &Layout,
        grad: &candle_core::CudaStorage,
        grad_l: &Layout,
    ) -> Result<()> {
        use reid_ops::sgd_cuda::{update, MomentumBuffer, SgdScalars};
        let r = self.rule;
        let scalars = SgdScalars {
            lr: r.lr,
            weight_decay: r.weight_decay,
            momentum: r.momentum,
            dampening: r.dampening,
            nesterov: r.nesterov,
        };
        let mut lent = self.buf.as_ref().map(|b| (b.values.borrow_mut(), b.first));
        let buf = match lent.as_mut() {
            None => None,
            Some((values, first)) => match &mut **values {
                Lent::Cuda(storage, layout) => Some(MomentumBuffer {
                    storage,
                    layout,
                    first: *first,
                }),
                Lent::Cpu(..) => candle_core::bail!("{}: a CUDA parameter with a CPU buffer", self.name()),
            },
        };
        let mut copy = self.copy.as_ref().map(|c| c.borrow_mut());
        let copy = match copy.as_deref_mut() {
            None => None,
            Some(Lent::Cuda(storage, layout)) => Some((&mut **storage, &*layout)),
            Some(Lent::Cpu(..)) => candle_core::bail!("{}: a CUDA parameter with a CPU copy", self.name()),
        };
        update((param, param_l), (grad, grad_l), buf, copy, &scalars)
    }
}

/// The lent bf16 `copy` written from the updated parameter `p`.
fn write_copy(copy: &mut Lent<'_>, p: &[f32], op: &str) -> Result<()> {
    // Irrefutable in a build without CUDA.
    #[allow(irrefutable_let_patterns)]
    let Lent::Cpu(CpuStorage::BF16(c), (a, b)) = copy
    else {
        candle_core::bail!("{op}: the copy must be a bf16 CPU tensor");
    };
    if *b - *a != p.len() {
        candle_core::bail!("{op}: the copy's size differs from the parameter's");
    }
    reid_ops::mixed::round_into(&mut c[*a..*b], p);
    Ok(())
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
        Sgd::new(params, config.clone(), Exec::default())
    }

    /// Gradients of `sum(param * x)` with `x` from `seed`: `x` itself.
    fn gradients(sgd: &Sgd, seed: u64) -> GradStore {
        gradients_of(sgd, seed, |p| p.var.as_tensor())
    }

    /// A parameter's bf16 copy.
    fn copy_of(p: &SgdParam) -> &Tensor {
        p.copy.as_ref().expect("a copy").as_tensor()
    }

    /// [`gradients`] through the tensor `of` each parameter.
    fn gradients_of(sgd: &Sgd, seed: u64, of: fn(&SgdParam) -> &Tensor) -> GradStore {
        let mut loss: Option<Tensor> = None;
        for (k, p) in sgd.params.iter().enumerate() {
            let t = of(p);
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

    #[test]
    fn a_bf16_copy_gives_its_gradient_and_is_written_with_the_update() {
        let with_copies = |mut sgd: Sgd| {
            for p in &mut sgd.params {
                let copy = p.var.as_tensor().to_dtype(DType::BF16).unwrap();
                p.copy = Some(Var::from_tensor(&copy).unwrap());
            }
            sgd
        };
        let momentum_off = SgdConfig {
            momentum: 0.0,
            ..SgdConfig::default()
        };
        for config in [SgdConfig::default(), momentum_off] {
            let mut fused = with_copies(optimiser(&config, DType::F32));
            let mut tensors = with_copies(optimiser(&config, DType::F32));
            for step in 0..3 {
                let grads = gradients_of(&fused, 10 * step, copy_of);
                assert_eq!(grads.get(copy_of(&fused.params[0])).unwrap().dtype(), DType::BF16);
                fused.step_with(&grads, 0.05, |_| Kernels::Fused).unwrap();
                let grads = gradients_of(&tensors, 10 * step, copy_of);
                tensors.step_with(&grads, 0.05, |_| Kernels::Generic).unwrap();
                assert_eq!(bits(&fused), bits(&tensors), "step {step}");
                for p in &fused.params {
                    let rounded = p.var.as_tensor().to_dtype(DType::BF16).unwrap();
                    let same = rounded.eq(copy_of(p)).unwrap().to_dtype(DType::F32).unwrap();
                    assert_eq!(same.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0, "{}", p.name);
                }
            }
            assert_ne!(
                bits(&fused),
                bits(&optimiser(&config, DType::F32)),
                "the parameters moved"
            );
        }
    }
}
