//! Batch normalisation (optionally followed by ReLU) as single passes over the
//! data, forward and backward, in place of candle's chain of broadcast ops. Train
//! mode normalises with the biased batch variance and hands the batch statistics
//! back, as a tensor on the device, for the running-statistics update; the
//! gradient flows through the batch mean and variance, as in PyTorch. The forward
//! keeps its statistics in the op, so the backward is two passes: the per-channel
//! sums, then the input gradient. Nothing is read back to the host on any device:
//! statistics, scale and shift and the backward's sums stay where they are made.

mod add_relu;
mod running;
mod split;

use crate::ledger::CountedContiguous;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;

#[cfg(feature = "cuda")]
use super::batch_norm_cuda as cuda;
use super::filled_in_chunks;
use super::plane_sums::{grad_sums, per_channel, per_lane, rows, rows_by, sums};
use crate::with_widest_simd;
pub use add_relu::BatchNormAddRelu;
#[cfg(feature = "cuda")]
use candle_core::{
    cuda_backend::cudarc::driver::{CudaSlice, CudaView},
    cuda_backend::CudaDevice,
    CudaStorage,
};
pub use running::update_running;
pub use split::BatchNormReluSplit;

/// Per-channel mean and biased variance of one forward, on the host (the CPU
/// kernels').
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    /// Values per channel (N * H * W).
    pub count: usize,
}

impl BatchStats {
    /// Per channel: `1 / sqrt(var + eps)`.
    fn invstd(&self, eps: f64) -> Vec<f64> {
        self.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
    }
}

/// (N, C, H*W) of an [N, C, H, W] or [N, C] layout.
fn dims(layout: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    match layout.dims() {
        &[n, c, h, w] => Ok((n, c, h * w)),
        &[n, c] => Ok((n, c, 1)),
        d => candle_core::bail!("{op}: expected [N, C, H, W] or [N, C], got {d:?}"),
    }
}

fn batch_stats<T: Float + Sync + 'static>(x: &[T], (n, c, hw): (usize, usize, usize)) -> BatchStats {
    let count = n * hw;
    let total = per_channel((n, c, hw), |g| sums(rows(x, g, hw), None).map(|s| [s, 0.0]));
    let mean: Vec<f64> = total.iter().map(|s| s[0] / count as f64).collect();
    let sq = per_channel((n, c, hw), |g| {
        sums(rows(x, g, hw), Some(per_lane(&mean, g))).map(|s| [s, 0.0])
    });
    let var = sq.iter().map(|s| s[0] / count as f64).collect();
    BatchStats { mean, var, count }
}

/// `y = x * scale[c] + shift[c]`, then ReLU if asked, over planes in parallel.
fn affine<T: Float + Send + Sync>(
    x: &[T],
    (n, c, hw): (usize, usize, usize),
    scale: &[f64],
    shift: &[f64],
    relu: bool,
) -> Vec<T> {
    affine_planes(x, (n * c, c, hw), |p| p, scale, shift, relu)
}

/// [`affine`] into `planes` planes, plane `q` from x's plane `source(q)`.
fn affine_planes<T: Float + Send + Sync>(
    x: &[T],
    (planes, c, hw): (usize, usize, usize),
    source: impl Fn(usize) -> usize + Sync,
    scale: &[f64],
    shift: &[f64],
    relu: bool,
) -> Vec<T> {
    // SAFETY: every value of each plane is written by the loop over it.
    unsafe {
        filled_in_chunks(planes * hw, hw, |q, yo| {
            let plane = source(q);
            let ch = plane % c;
            let (s, b) = (T::from(scale[ch]).unwrap(), T::from(shift[ch]).unwrap());
            with_widest_simd!({
                for (o, &v) in yo.iter_mut().zip(&x[plane * hw..(plane + 1) * hw]) {
                    let r = v * s + b;
                    o.write(if relu && r <= T::zero() { T::zero() } else { r });
                }
            })
        })
    }
}

fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap()).collect()
}

/// The values of a CPU tensor as f64 (no transfer: an error on other devices).
pub(crate) fn cpu_f64(t: &Tensor, op: &str) -> Result<Vec<f64>> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("{op}: expected a CPU tensor");
    };
    Ok(match s {
        CpuStorage::F32(v) => to_f64(super::contiguous(v, l, op)?),
        CpuStorage::F64(v) => super::contiguous(v, l, op)?.to_vec(),
        _ => candle_core::bail!("{op}: only f32 and f64 are supported"),
    })
}

/// The batch statistics one forward left: on the host where the CPU computed
/// them, and always as [mean; biased variance], a [2, C] f64 tensor on the
/// forward's device.
#[derive(Debug, Clone)]
pub struct SavedStats {
    pub host: Option<BatchStats>,
    pub tensor: Tensor,
    /// Values per channel (N * H * W).
    pub count: usize,
}

impl SavedStats {
    /// Statistics computed on the CPU.
    fn from_host(stats: BatchStats) -> Result<Self> {
        let c = stats.mean.len();
        let values = [&stats.mean[..], &stats.var].concat();
        let tensor = super::cpu_result(values, (2, c), &candle_core::Device::Cpu)?;
        Ok(SavedStats {
            count: stats.count,
            host: Some(stats),
            tensor,
        })
    }

    /// The host statistics, which the CPU kernels read.
    pub(crate) fn host(&self, op: &str) -> Result<&BatchStats> {
        match &self.host {
            Some(s) => Ok(s),
            None => candle_core::bail!("{op}: the batch statistics are on another device"),
        }
    }
}

/// Train-mode batch norm of (x, weight, bias), optionally with ReLU; the batch
/// statistics are left in `stats` (for the running update and the backward).
#[derive(Debug, Clone)]
pub struct BatchNormTrain {
    pub eps: f64,
    pub relu: bool,
    pub stats: Arc<Mutex<Option<SavedStats>>>,
}

impl BatchNormTrain {
    pub(crate) fn forward<T: Float + Send + Sync + 'static>(
        &self,
        x: &[T],
        w: &[T],
        b: &[T],
        d: (usize, usize, usize),
    ) -> Vec<T> {
        let (scale, shift) = self.normalise_batch(x, w, b, d);
        affine(x, d, &scale, &shift, self.relu)
    }

    /// The batch statistics of `x` (left in `stats`) and the per-channel scale
    /// and shift they give with weight `w` and bias `b`.
    pub(crate) fn normalise_batch<T: Float + Send + Sync + 'static>(
        &self,
        x: &[T],
        w: &[T],
        b: &[T],
        d: (usize, usize, usize),
    ) -> (Vec<f64>, Vec<f64>) {
        let stats = batch_stats(x, d);
        let scale_shift = self.scale_shift(&stats, &to_f64(w), &to_f64(b));
        let saved = SavedStats::from_host(stats).expect("a CPU tensor of 2C values");
        *self.stats.lock().expect("stats lock") = Some(saved);
        scale_shift
    }

    /// The batch statistics the last forward left.
    pub fn saved_stats(&self) -> SavedStats {
        self.stats.lock().expect("stats lock").clone().expect("the forward ran")
    }

    /// Per channel: `weight / sqrt(var + eps)` and `bias - mean * scale`.
    fn scale_shift(&self, stats: &BatchStats, w: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let scale: Vec<f64> = (0..w.len()).map(|c| w[c] / (stats.var[c] + self.eps).sqrt()).collect();
        let shift = (0..w.len()).map(|c| b[c] - stats.mean[c] * scale[c]).collect();
        (scale, shift)
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward<T: cuda::Activations>(
        &self,
        dev: &CudaDevice,
        x: &CudaView<T>,
        [w, b]: [&CudaView<T::Param>; 2],
        d: (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let ss = self.cuda_normalise(dev, x, [w, b], d)?;
        cuda::affine(dev, x, d, &ss, self.relu)
    }

    /// The batch statistics of x, left in `stats`, and [scale; shift] from
    /// them and (w, b), on CUDA: one launch.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_normalise<T: cuda::Activations>(
        &self,
        dev: &CudaDevice,
        x: &CudaView<T>,
        [w, b]: [&CudaView<T::Param>; 2],
        d: (usize, usize, usize),
    ) -> Result<CudaSlice<f64>> {
        let (stats, ss) = cuda::stats_scale_shift(dev, x, [w, b], d, self.eps)?;
        let tensor = cuda::tensor_of(dev, stats, (2, d.1));
        let count = d.0 * d.2;
        *self.stats.lock().expect("stats lock") = Some(SavedStats {
            host: None,
            tensor,
            count,
        });
        Ok(ss)
    }

    /// The gradients of (x, weight, bias) from the output `y` and its gradient;
    /// x's only when `input_grad`.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        grad: &Tensor,
        input_grad: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.saved_stats();
        let grad = grad.contiguous_counted()?;
        let weight = w.contiguous_counted()?;
        let params = Params::default();
        let sums_op = GradSums {
            eps: self.eps,
            relu: self.relu,
            stats: stats.clone(),
            weight: weight.clone(),
            params: params.clone(),
        };
        let sums = x.apply_op3_no_bwd(y, &grad, &sums_op)?;
        let (sum_gxhat, sum_g) = (sums.get(0)?, sums.get(1)?);
        let input_op = InputGrad {
            eps: self.eps,
            relu: self.relu,
            stats,
            weight,
            sums,
            params,
        };
        let grad_x = match input_grad {
            true => Some(x.apply_op3_no_bwd(y, &grad, &input_op)?),
            false => None,
        };
        Ok((grad_x, Some(sum_gxhat), Some(sum_g)))
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
        // CUDA: statistics with scale and shift, then the output.
        crate::ledger::cpu_output(2, Ok((y, l1.shape().clone())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let dev = &s1.device;
        let y = three_cuda_floats!(self.name(), dev, (s1, l1, A), (s2, l2, P), (s3, l3, P), |x, w, b| self
            .cuda_forward(dev, x, [w, b], d)?);
        crate::ledger::cuda_output(Ok((y, l1.shape().clone())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, y, grad, x.track_op())
    }
}

/// Values per pass of [`masked_chunks`].
const MASK_CHUNK: usize = 256;

/// Calls `f(start, xs, kept)` for each chunk of up to [`MASK_CHUNK`] values of
/// a plane from `start`: `xs` the inputs, `kept` the gradient reaching the batch
/// norm, through the ReLU when there is one (it passes where the output is
/// positive). The mask is a loop of its own so that it compiles to vector
/// selects: inside the backward's loops it was a branch per value, mispredicted
/// about half the time on ReLU outputs of random inputs.
#[inline(always)]
fn masked_chunks<T: Float>(x: &[T], y: &[T], g: &[T], relu: bool, mut f: impl FnMut(usize, &[T], &[T])) {
    let mut kept = [T::zero(); MASK_CHUNK];
    for start in (0..x.len()).step_by(MASK_CHUNK) {
        let end = (start + MASK_CHUNK).min(x.len());
        let kept = &mut kept[..end - start];
        for ((k, &gv), &yv) in kept.iter_mut().zip(&g[start..end]).zip(&y[start..end]) {
            *k = if relu && yv <= T::zero() { T::zero() } else { gv };
        }
        f(start, &x[start..end], kept);
    }
}

/// Plane `p` (of index `n * C + c`) of a tensor.
type PlaneOf<'a, T> = dyn Fn(usize) -> &'a [T] + Sync + 'a;

/// The contiguous values of `N` operands, or an error naming `op`.
fn contiguous_all<'a, T, const N: usize>(
    values: [&'a [T]; N],
    layouts: [&Layout; N],
    op: &str,
) -> Result<[&'a [T]; N]> {
    let mut out = values;
    for (v, l) in out.iter_mut().zip(layouts) {
        *v = super::contiguous(v, l, op)?;
    }
    Ok(out)
}

/// The planes of `hw` values of a contiguous tensor.
fn planes<'a, T: Sync>(v: &'a [T], hw: usize) -> impl Fn(usize) -> &'a [T] + Sync + 'a {
    move |p| &v[p * hw..(p + 1) * hw]
}

/// Per channel: sum(g * x_hat) and sum(g) as a [2, C] tensor, from (x, y, grad).
/// On CUDA the same launch leaves the input gradient's per-channel parameters
/// in `params`, for [`InputGrad`].
#[derive(Debug, Clone)]
struct GradSums {
    eps: f64,
    relu: bool,
    stats: SavedStats,
    /// The batch norm's weight [C] (contiguous), read on CUDA.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    weight: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    params: Params,
}

/// The input gradient's per-channel parameters on CUDA (5C f64), from
/// [`GradSums`] to [`InputGrad`].
type Params = Arc<Mutex<Option<Tensor>>>;

impl GradSums {
    fn sums<T: Float + Send + Sync + 'static>(
        &self,
        x: &[T],
        y: &[T],
        g: &[T],
        d: (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let hw = d.2;
        let stats = self.stats.host("batch-norm-grad-sums")?;
        Ok(sums_by(
            stats,
            self.eps,
            self.relu,
            [&planes(x, hw), &planes(y, hw), &planes(g, hw)],
            d,
        ))
    }
}

/// Per channel: sum(g' * x_hat) then sum(g') of the planes (x, y, g), each given
/// by its index, with the statistics `s` (g' the gradient through the ReLU).
pub(crate) fn sums_by<'a, T: Float + Send + Sync + 'static>(
    s: &BatchStats,
    eps: f64,
    relu: bool,
    [x, y, g]: [&PlaneOf<'a, T>; 3],
    (n, c, hw): (usize, usize, usize),
) -> Vec<T> {
    let per = per_channel((n, c, hw), |grp| {
        let xyg = [x, y, g].map(|v| rows_by(v, grp, n * c));
        grad_sums(xyg, relu, per_lane(&s.mean, grp))
    });
    let invstd = s.invstd(eps);
    let first = per.iter().zip(&invstd).map(|(v, i)| T::from(v[0] * i).unwrap());
    let second = per.iter().map(|v| T::from(v[1]).unwrap());
    first.chain(second).collect()
}

impl CustomOp3 for GradSums {
    fn name(&self) -> &'static str {
        "batch-norm-grad-sums"
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
        // The sums are the parameters' gradients: f32 for bf16 activations.
        let out = three_floats!(f32 => self.name(), (s1, l1), (s2, l2), (s3, l3), |x, y, g| self
            .sums(x, y, g, d)?);
        crate::ledger::cpu_output(1, Ok((out, Shape::from((2, d.1)))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let dev = &s1.device;
        let (stats, _) = self.stats.tensor.storage_and_layout();
        let stats = cuda::stats_of(&stats)?;
        let (weight, wl) = self.weight.storage_and_layout();
        let weight = (cuda::cuda_storage(&weight)?, wl);
        let params;
        let out = three_cuda_floats!(self.name(), dev, (s1, l1, A), (s2, l2, A), (s3, l3, A), |x, y, g| {
            let w = cuda::view::<P>(weight.0, weight.1)?;
            let (sums, p) = cuda::grad_sums(dev, ([x, y, g], &w), d, stats, self.eps, self.relu)?;
            params = p;
            sums
        });
        *self.params.lock().expect("params lock") = Some(cuda::tensor_of(dev, params, 5 * d.1));
        crate::ledger::cuda_output(Ok((out, Shape::from((2, d.1)))))
    }
}

/// The input gradient of train-mode batch norm from (x, y, grad):
/// `w * invstd / n * (n * g - sum(g) - x_hat * sum(g * x_hat))`.
#[derive(Debug, Clone)]
struct InputGrad {
    eps: f64,
    relu: bool,
    stats: SavedStats,
    /// The batch norm's weight [C].
    weight: Tensor,
    /// [sum(g' * x_hat); sum(g')], [2, C], as [`GradSums`] gives them.
    sums: Tensor,
    /// The per-channel parameters [`GradSums`] left on CUDA.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    params: Params,
}

impl InputGrad {
    fn backward<T: Float + Send + Sync>(&self, x: &[T], y: &[T], g: &[T], d: (usize, usize, usize)) -> Result<Vec<T>> {
        let hw = d.2;
        let op = "batch-norm-input-grad";
        let host = HostGrad {
            eps: self.eps,
            relu: self.relu,
            stats: self.stats.host(op)?,
            weight: cpu_f64(&self.weight, op)?,
            sums: cpu_f64(&self.sums, op)?,
        };
        Ok(host.backward_by([&planes(x, hw), &planes(y, hw), &planes(g, hw)], d))
    }
}

/// [`InputGrad`] with its operands on the host (the CPU kernels').
pub(crate) struct HostGrad<'a> {
    pub eps: f64,
    pub relu: bool,
    pub stats: &'a BatchStats,
    pub weight: Vec<f64>,
    /// [sum(g' * x_hat); sum(g')], 2C values.
    pub sums: Vec<f64>,
}

impl HostGrad<'_> {
    /// The input gradient from the planes (x, y, g), each given by its index.
    pub(crate) fn backward_by<T: Float + Send + Sync>(
        &self,
        [x, y, g]: [&PlaneOf<'_, T>; 3],
        (batch, c, hw): (usize, usize, usize),
    ) -> Vec<T> {
        let s = self.stats;
        let (n, invstds) = (s.count as f64, s.invstd(self.eps));
        let (sum_gxhat, sum_g) = self.sums.split_at(c);
        // SAFETY: every value of each plane is written by the loop over it.
        unsafe {
            filled_in_chunks(batch * c * hw, hw, |plane, o| {
                let ch = plane % c;
                let invstd = invstds[ch];
                let (mean, k) = (s.mean[ch], self.weight[ch] * invstd / n);
                let (a, b) = (sum_g[ch], sum_gxhat[ch]);
                with_widest_simd!(masked_chunks(
                    x(plane),
                    y(plane),
                    g(plane),
                    self.relu,
                    |start, xs, kept| {
                        for ((o, &xv), &gv) in o[start..].iter_mut().zip(xs).zip(kept) {
                            let xhat = (xv.to_f64().unwrap() - mean) * invstd;
                            o.write(T::from(k * (n * gv.to_f64().unwrap() - a - xhat * b)).unwrap());
                        }
                    },
                ));
            })
        }
    }
}

impl CustomOp3 for InputGrad {
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
        let out = three_floats!(self.name(), (s1, l1), (s2, l2), (s3, l3), |x, y, g| self
            .backward(x, y, g, d)?);
        // CUDA: dx (the per-channel parameters came with the sums).
        crate::ledger::cpu_output(1, Ok((out, l1.shape().clone())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let dev = &s1.device;
        let params = self.params.lock().expect("params lock").clone();
        let Some(params) = params else {
            candle_core::bail!("{}: the gradient sums did not run on CUDA", self.name());
        };
        let (p, _) = params.storage_and_layout();
        let p = cuda::stats_of(&p)?;
        let dx = three_cuda_floats!(self.name(), dev, (s1, l1, A), (s2, l2, A), (s3, l3, A), |x, y, g| {
            cuda::input_grad(dev, (x, y, g), d, p, self.relu)?
        });
        crate::ledger::cuda_output(Ok((dx, l1.shape().clone())))
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
        crate::ledger::cpu_output(1, Ok((y, l1.shape().clone())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = dims(l1, self.name())?;
        let dev = &s1.device;
        let y = three_cuda_floats!(
            self.name(),
            dev,
            (s1, l1, A),
            (s2, l2, P),
            (s3, l3, P),
            |x, scale, shift| { cuda::channel_affine(dev, x, d, [scale, shift], self.relu)? }
        );
        crate::ledger::cuda_output(Ok((y, l1.shape().clone())))
    }
}
