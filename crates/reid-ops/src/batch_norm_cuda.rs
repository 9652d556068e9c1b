//! The CUDA side of the batch-norm ops of [`super::batch_norm`]: the kernels of
//! `batch_norm.cu` (compiled by NVRTC on first use), one pass each way over the
//! data where candle-nn's batch norm is a chain of a dozen broadcast ops. The
//! per-channel statistics, scale and shift and the backward's sums stay on the
//! device: a step of batch norms never waits for the host.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};

use crate::cuda_kernels::{contiguous_view, grid_stride as elementwise, Kernels, BLOCK};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Layout, Result, Shape, Storage, Tensor, WithDType};

/// The kernels of batch_norm.cu.
static KERNELS: Kernels = Kernels::new(
    "reid_batch_norm",
    concat!(include_str!("bf16.cuh"), include_str!("batch_norm.cu")),
);

/// A dtype of activations on CUDA, with the dtype of the parameters (weight,
/// bias, scale and shift) and of their gradients beside them: its own for f32
/// and f64, f32 for bf16 (mixed precision).
pub(crate) trait Activations: WithDType + DeviceRepr + CudaDType {
    type Param: WithDType + DeviceRepr + CudaDType;
}

impl Activations for f32 {
    type Param = f32;
}

impl Activations for f64 {
    type Param = f64;
}

impl Activations for half::bf16 {
    type Param = f32;
}

/// Kernel `name`, suffixed by T's dtype.
fn kernel<T: WithDType>(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    KERNELS.get::<T>(dev, name)
}

/// One block per channel.
fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// (N, C, HW) as the kernels' 32-bit sizes, refusing tensors they cannot index.
fn sizes((n, c, hw): (usize, usize, usize)) -> Result<(u32, u32, u32)> {
    if n * c * hw >= 1 << 31 {
        candle_core::bail!("batch norm on CUDA: {n}x{c}x{hw} values is over the kernels' 2^31");
    }
    Ok((n as u32, c as u32, hw as u32))
}

/// The contiguous values of a storage of T.
pub(crate) fn view<'a, T: WithDType + DeviceRepr + CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    contiguous_view(s, l, "batch norm")
}

/// The CUDA storage behind a tensor's storage guard.
pub(crate) fn cuda_storage(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("batch norm on CUDA: an operand is on another device"),
    }
}

/// The [mean; var] values (2C f64) of saved statistics on CUDA.
pub(crate) fn stats_of(s: &Storage) -> Result<&CudaSlice<f64>> {
    cuda_storage(s)?.as_cuda_slice::<f64>()
}

/// `slice` as a tensor of `shape` on `dev` (outside any graph).
pub(crate) fn tensor_of<S: Into<Shape>>(dev: &CudaDevice, slice: CudaSlice<f64>, shape: S) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Per channel, [mean; biased variance] of x and [scale; shift] from them and
/// the weight and bias (2C f64 each, left on the device): one launch.
pub(crate) fn stats_scale_shift<T: Activations>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    [w, b]: [&CudaView<T::Param>; 2],
    d: (usize, usize, usize),
    eps: f64,
) -> Result<(CudaSlice<f64>, CudaSlice<f64>)> {
    let (n, c, hw) = sizes(d)?;
    // SAFETY: the kernel writes every value of both.
    let (mut stats, mut ss) = unsafe { (dev.alloc::<f64>(2 * d.1)?, dev.alloc::<f64>(2 * d.1)?) };
    let f = kernel::<T>(dev, "bn_stats_scale_shift")?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(x).arg(w).arg(b).arg(&mut stats).arg(&mut ss);
    l.arg(&n).arg(&c).arg(&hw).arg(&eps);
    // SAFETY: the arguments of `bn_stats_scale_shift`; stats and ss hold 2C values.
    unsafe { l.launch(per_channel(d.1)) }.w()?;
    crate::ledger::launched(1);
    Ok((stats, ss))
}

/// `x * scale[c] + shift[c]` (ss = [scale; shift], 2C f64), then ReLU if `relu`.
pub(crate) fn affine<T: WithDType + DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    d: (usize, usize, usize),
    ss: &CudaSlice<f64>,
    relu: bool,
) -> Result<CudaSlice<T>> {
    let (_, c, hw) = sizes(d)?;
    let total = d.0 * d.1 * d.2;
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<T>(total)? };
    let (t, r) = (total as u32, relu as i32);
    let f = kernel::<T>(dev, "bn_affine")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(&mut y).arg(ss).arg(&t).arg(&c).arg(&hw).arg(&r);
    // SAFETY: the arguments of `bn_affine`; x and y hold `total` values, ss 2C.
    unsafe { b.launch(elementwise(total)) }.w()?;
    crate::ledger::launched(1);
    Ok(y)
}

/// `relu(x * scale[c] + shift[c] + r)` (ss = [scale; shift], 2C f64): the end
/// of a residual block, one launch.
pub(crate) fn affine_add_relu<T: WithDType + DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    (x, r): (&CudaView<T>, &CudaView<T>),
    d: (usize, usize, usize),
    ss: &CudaSlice<f64>,
) -> Result<CudaSlice<T>> {
    let (_, c, hw) = sizes(d)?;
    let total = d.0 * d.1 * d.2;
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<T>(total)? };
    let t = total as u32;
    let f = kernel::<T>(dev, "bn_affine_add_relu")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(r).arg(&mut y).arg(ss).arg(&t).arg(&c).arg(&hw);
    // SAFETY: the arguments of `bn_affine_add_relu`; x, r and y hold `total` values, ss 2C.
    unsafe { b.launch(elementwise(total)) }.w()?;
    crate::ledger::launched(1);
    Ok(y)
}

/// `x * scale[c] + shift[c]` with scale and shift of T (eval mode).
pub(crate) fn channel_affine<T: Activations>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    d: (usize, usize, usize),
    [scale, shift]: [&CudaView<T::Param>; 2],
    relu: bool,
) -> Result<CudaSlice<T>> {
    let (_, c, hw) = sizes(d)?;
    let total = d.0 * d.1 * d.2;
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<T>(total)? };
    let (t, r) = (total as u32, relu as i32);
    let f = kernel::<T>(dev, "bn_channel_affine")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x)
        .arg(&mut y)
        .arg(scale)
        .arg(shift)
        .arg(&t)
        .arg(&c)
        .arg(&hw)
        .arg(&r);
    // SAFETY: the arguments of `bn_channel_affine`; scale and shift hold C values.
    unsafe { b.launch(elementwise(total)) }.w()?;
    crate::ledger::launched(1);
    Ok(y)
}

/// [sum(g' * x_hat); sum(g')] per channel as 2C parameter values, with the saved
/// statistics `stats` = [mean; var]; and in the same launch the input
/// gradient's per-channel parameters [mean; invstd; k; a; b] (5C f64) from
/// those sums and the weight `w` (see `bn_input_grad`).
pub(crate) fn grad_sums<T: Activations>(
    dev: &CudaDevice,
    ([x, y, g], w): ([&CudaView<T>; 3], &CudaView<T::Param>),
    d: (usize, usize, usize),
    stats: &CudaSlice<f64>,
    eps: f64,
    relu: bool,
) -> Result<(CudaSlice<T::Param>, CudaSlice<f64>)> {
    let (n, c, hw) = sizes(d)?;
    // SAFETY: the kernel writes every value of both.
    let (mut out, mut p) = unsafe { (dev.alloc::<T::Param>(2 * d.1)?, dev.alloc::<f64>(5 * d.1)?) };
    let r = relu as i32;
    let f = kernel::<T>(dev, "bn_grad_sums")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(y).arg(g).arg(&mut out).arg(stats).arg(w).arg(&mut p);
    b.arg(&eps).arg(&n).arg(&c).arg(&hw).arg(&r);
    // SAFETY: the arguments of `bn_grad_sums`; out and stats hold 2C values, p 5C.
    unsafe { b.launch(per_channel(d.1)) }.w()?;
    crate::ledger::launched(1);
    Ok((out, p))
}

/// The input gradient from the per-channel parameters `p` of [`grad_sums`]:
/// one launch.
pub(crate) fn input_grad<T: WithDType + DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    (x, y, g): (&CudaView<T>, &CudaView<T>, &CudaView<T>),
    d: (usize, usize, usize),
    p: &CudaSlice<f64>,
    relu: bool,
) -> Result<CudaSlice<T>> {
    let (_, c, hw) = sizes(d)?;
    if p.len() != 5 * d.1 {
        candle_core::bail!("batch-norm input gradient on CUDA: parameters of another width");
    }
    let count = (d.0 * d.2) as f64;
    let total = d.0 * d.1 * d.2;
    // SAFETY: the kernel writes every value.
    let mut dx = unsafe { dev.alloc::<T>(total)? };
    let (t, r) = (total as u32, relu as i32);
    let f = kernel::<T>(dev, "bn_input_grad")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(y).arg(g).arg(&mut dx).arg(p);
    b.arg(&count).arg(&t).arg(&c).arg(&hw).arg(&r);
    // SAFETY: the arguments of `bn_input_grad`; p holds 5C values.
    unsafe { b.launch(elementwise(total)) }.w()?;
    crate::ledger::launched(1);
    Ok(dx)
}

/// The in-place update of both running statistics, [mean, var], from the
/// batch statistics (see `batch_norm/running.rs`): one launch.
pub(crate) fn running_update(
    running: [(&mut CudaStorage, &Layout); 2],
    stats: &CudaSlice<f64>,
    unbiased: f64,
    momentum: f64,
) -> Result<()> {
    use candle_core::backend::BackendStorage;
    match running[0].0.dtype() {
        candle_core::DType::F32 => running_update_as::<f32>(running, stats, unbiased, momentum),
        candle_core::DType::F64 => running_update_as::<f64>(running, stats, unbiased, momentum),
        dt => candle_core::bail!("batch-norm running update on CUDA: {dt:?} (f32 and f64 only)"),
    }
}

fn running_update_as<T: WithDType + DeviceRepr + CudaDType + num_traits::Float>(
    [(mean, ml), (var, vl)]: [(&mut CudaStorage, &Layout); 2],
    stats: &CudaSlice<f64>,
    unbiased: f64,
    momentum: f64,
) -> Result<()> {
    let what = "batch-norm running update on CUDA";
    let (Some((m0, m1)), Some((v0, v1))) = (ml.contiguous_offsets(), vl.contiguous_offsets()) else {
        candle_core::bail!("{what}: the running statistics must be contiguous");
    };
    if stats.len() != 2 * (v1 - v0) || m1 - m0 != v1 - v0 {
        candle_core::bail!("{what}: statistics of another width");
    }
    let t = |v: f64| T::from(v).expect("a float");
    let dev = var.device.clone();
    let mut m = mean.as_cuda_slice_mut::<T>()?.slice_mut(m0..m1);
    let mut v = var.as_cuda_slice_mut::<T>()?.slice_mut(v0..v1);
    let (c, u, keep, moment) = ((v1 - v0) as u32, t(unbiased), t(1.0 - momentum), t(momentum));
    let f = kernel::<T>(&dev, "bn_running_update")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut m)
        .arg(&mut v)
        .arg(stats)
        .arg(&c)
        .arg(&u)
        .arg(&keep)
        .arg(&moment);
    // SAFETY: the arguments of `bn_running_update`; stats holds 2C values.
    unsafe { b.launch(elementwise(v1 - v0)) }.w()?;
    crate::ledger::launched(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed: run with the `cuda` feature and
    /// the CUDA libraries on LD_LIBRARY_PATH, as after scripts/cuda-toolchain.sh).
    #[test]
    fn kernels_compile() {
        let ptx = super::KERNELS.ptx().expect("NVRTC compiles batch_norm.cu");
        let names = [
            "bn_stats_scale_shift",
            "bn_affine",
            "bn_channel_affine",
            "bn_grad_sums",
            "bn_input_grad",
            "bn_running_update",
            "bn_affine_add_relu",
        ];
        for name in names {
            for t in ["f32", "f64", "bf16"] {
                // The running statistics are f32 beside bf16 activations.
                if (name, t) == ("bn_running_update", "bf16") {
                    continue;
                }
                assert!(ptx.contains(&format!(".entry {name}_{t}(")), "{name}_{t} in the PTX");
            }
        }
    }
}
