//! Batch normalisation (optionally followed by ReLU) as single passes over the
//! data, forward and backward, in place of candle's chain of broadcast ops. Train
//! mode normalises with the biased batch variance and hands the batch statistics
//! back for the running-statistics update; the gradient flows through the batch
//! mean and variance, as in PyTorch.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Per-channel mean and biased variance of one forward.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    /// Values per channel (N * H * W).
    pub count: usize,
}

fn dims(layout: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    match layout.dims() {
        &[n, c, h, w] => Ok((n, c, h * w)),
        &[n, c] => Ok((n, c, 1)),
        d => candle_core::bail!("{op}: expected [N, C, H, W] or [N, C], got {d:?}"),
    }
}

fn slice<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

/// Sums `f(value, position)` over channel `c`'s values, in f64.
fn channel_sum<T: Float>(x: &[T], (n, c, hw): (usize, usize, usize), ch: usize, f: impl Fn(f64, usize) -> f64) -> f64 {
    let mut total = 0.0;
    for i in 0..n {
        let base = (i * c + ch) * hw;
        let mut s = 0.0;
        for (k, v) in x[base..base + hw].iter().enumerate() {
            s += f(v.to_f64().unwrap(), base + k);
        }
        total += s;
    }
    total
}

fn batch_stats<T: Float + Sync>(x: &[T], d: (usize, usize, usize)) -> BatchStats {
    let count = d.0 * d.2;
    let (mean, var): (Vec<f64>, Vec<f64>) = (0..d.1)
        .into_par_iter()
        .map(|ch| {
            let mean = channel_sum(x, d, ch, |v, _| v) / count as f64;
            let var = channel_sum(x, d, ch, |v, _| (v - mean) * (v - mean)) / count as f64;
            (mean, var)
        })
        .unzip();
    BatchStats { mean, var, count }
}

/// `y = x * scale[c] + shift[c]`, then ReLU if asked, over planes in parallel.
fn affine<T: Float + Send + Sync>(
    x: &[T],
    d: (usize, usize, usize),
    scale: &[f64],
    shift: &[f64],
    relu: bool,
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d.2)
        .zip(x.par_chunks(d.2))
        .enumerate()
        .for_each(|(plane, (yo, xi))| {
            let ch = plane % d.1;
            let (s, b) = (T::from(scale[ch]).unwrap(), T::from(shift[ch]).unwrap());
            for (o, &v) in yo.iter_mut().zip(xi) {
                let r = v * s + b;
                *o = if relu && !(r > T::zero()) { T::zero() } else { r };
            }
        });
    y
}

fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap()).collect()
}

/// Runs `$body` with three f32 or three f64 slices.
macro_rules! three_floats {
    ($op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), |$a:ident, $b:ident, $c:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                let ($a, $b, $c) = (slice(a, $l1, $op)?, slice(b, $l2, $op)?, slice(c, $l3, $op)?);
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
                let ($a, $b, $c) = (slice(a, $l1, $op)?, slice(b, $l2, $op)?, slice(c, $l3, $op)?);
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: operands must all be f32 or all f64", $op),
        }
    };
}

/// Train-mode batch norm of (x, weight, bias), optionally with ReLU; the batch
/// statistics are left in `stats`.
#[derive(Debug, Clone)]
pub struct BatchNormTrain {
    pub eps: f64,
    pub relu: bool,
    pub stats: Arc<Mutex<Option<BatchStats>>>,
}

impl BatchNormTrain {
    fn forward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], b: &[T], d: (usize, usize, usize)) -> Vec<T> {
        let stats = batch_stats(x, d);
        let (w, b) = (to_f64(w), to_f64(b));
        let scale: Vec<f64> = (0..d.1).map(|c| w[c] / (stats.var[c] + self.eps).sqrt()).collect();
        let shift: Vec<f64> = (0..d.1).map(|c| b[c] - stats.mean[c] * scale[c]).collect();
        let y = affine(x, d, &scale, &shift, self.relu);
        *self.stats.lock().expect("stats lock") = Some(stats);
        y
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let y = three_floats!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, w, b| self
            .forward(x, w, b, d));
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Through the ReLU first: the gradient passes where the output is positive.
        let grad = if self.relu {
            y.apply_op2_no_bwd(&grad.contiguous()?, &ReluMask)?
        } else {
            grad.contiguous()?
        };
        let params = x.apply_op2_no_bwd(&grad, &BatchNormParamGrads { eps: self.eps })?;
        let grad_x = x.apply_op3_no_bwd(w, &grad, &BatchNormInputGrad { eps: self.eps })?;
        Ok((Some(grad_x), Some(params.get(0)?), Some(params.get(1)?)))
    }
}

/// `grad * (y > 0)` from (y, grad).
#[derive(Debug, Clone, Copy)]
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn mask<T: Float + Send + Sync>(y: &[T], g: &[T]) -> Vec<T> {
            let mut out = vec![T::zero(); g.len()];
            out.par_chunks_mut(4096)
                .zip(y.par_chunks(4096).zip(g.par_chunks(4096)))
                .for_each(|(o, (y, g))| {
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                        *o = if y > T::zero() { g } else { T::zero() };
                    }
                });
            out
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(mask(slice(y, l1, self.name())?, slice(g, l2, self.name())?))
            }
            (CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(mask(slice(y, l1, self.name())?, slice(g, l2, self.name())?))
            }
            _ => candle_core::bail!("relu-mask: f32 or f64 operands of one dtype expected"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Per channel: sum(grad * x_hat) and sum(grad), as a [2, C] tensor, from (x, grad).
#[derive(Debug, Clone, Copy)]
struct BatchNormParamGrads {
    eps: f64,
}

fn param_grads<T: Float + Send + Sync>(
    x: &[T],
    g: &[T],
    d: (usize, usize, usize),
    eps: f64,
) -> (Vec<f64>, Vec<f64>, BatchStats) {
    let stats = batch_stats(x, d);
    let (sum_gx, sum_g): (Vec<f64>, Vec<f64>) = (0..d.1)
        .into_par_iter()
        .map(|ch| {
            let (mean, invstd) = (stats.mean[ch], 1.0 / (stats.var[ch] + eps).sqrt());
            let sum_g = channel_sum(g, d, ch, |v, _| v);
            let sum_gx = channel_sum(g, d, ch, |v, at| v * (x[at].to_f64().unwrap() - mean) * invstd);
            (sum_gx, sum_g)
        })
        .unzip();
    (sum_gx, sum_g, stats)
}

impl CustomOp2 for BatchNormParamGrads {
    fn name(&self) -> &'static str {
        "batch-norm-param-grads"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let (a, b, _) = param_grads(slice(x, l1, self.name())?, slice(g, l2, self.name())?, d, self.eps);
                CpuStorage::F32(a.into_iter().chain(b).map(|v| v as f32).collect())
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                let (a, b, _) = param_grads(slice(x, l1, self.name())?, slice(g, l2, self.name())?, d, self.eps);
                CpuStorage::F64(a.into_iter().chain(b).collect())
            }
            _ => candle_core::bail!("{}: f32 or f64 operands of one dtype expected", self.name()),
        };
        Ok((out, Shape::from((2, d.1))))
    }
}

/// The input gradient of train-mode batch norm from (x, weight, grad):
/// `w * invstd / n * (n * g - sum(g) - x_hat * sum(g * x_hat))`.
#[derive(Debug, Clone, Copy)]
struct BatchNormInputGrad {
    eps: f64,
}

impl BatchNormInputGrad {
    fn backward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], g: &[T], d: (usize, usize, usize)) -> Vec<T> {
        let (sum_gx, sum_g, stats) = param_grads(x, g, d, self.eps);
        let n = stats.count as f64;
        let w = to_f64(w);
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(d.2)
            .zip(x.par_chunks(d.2).zip(g.par_chunks(d.2)))
            .enumerate()
            .for_each(|(plane, (o, (xs, gs)))| {
                let ch = plane % d.1;
                let invstd = 1.0 / (stats.var[ch] + self.eps).sqrt();
                let (mean, k) = (stats.mean[ch], w[ch] * invstd / n);
                let (a, b) = (sum_g[ch], sum_gx[ch]);
                for ((o, &xv), &gv) in o.iter_mut().zip(xs).zip(gs) {
                    let xhat = (xv.to_f64().unwrap() - mean) * invstd;
                    *o = T::from(k * (n * gv.to_f64().unwrap() - a - xhat * b)).unwrap();
                }
            });
        out
    }
}

impl CustomOp3 for BatchNormInputGrad {
    fn name(&self) -> &'static str {
        "batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let out = three_floats!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, w, g| self
            .backward(x, w, g, d));
        Ok((out, l1.shape().clone()))
    }
}

/// Eval-mode batch norm as `x * scale[c] + shift[c]` (then ReLU if asked), from
/// (x, scale, shift). No backward: eval mode is not trained through.
#[derive(Debug, Clone, Copy)]
pub struct ChannelAffine {
    pub relu: bool,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let y = three_floats!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, s, b| affine(
            x,
            d,
            &to_f64(s),
            &to_f64(b),
            self.relu
        ));
        Ok((y, l1.shape().clone()))
    }
}
