//! The CUDA side of the batch-norm ops of [`super::batch_norm`]: the kernels of
//! `batch_norm.cu` (compiled by NVRTC on first use), one pass each way over the
//! data where candle-nn's batch norm is a chain of a dozen broadcast ops. The
//! per-channel statistics and sums come back to the host (2C values, one
//! synchronisation per batch norm), where the ops keep them as on the CPU.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, WithDType};

use super::batch_norm::BatchStats;

const SOURCE: &str = include_str!("batch_norm.cu");
const BLOCK: u32 = 256;

/// The kernels' PTX, compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        compile_ptx_with_opts(SOURCE, CompileOptions::default())
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("batch-norm CUDA kernels: NVRTC failed: {e}")))
}

/// Kernel `name`, suffixed by T's dtype.
fn kernel<T: WithDType>(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    let name = format!("{name}_{}", T::DTYPE.as_str());
    Ok(dev
        .get_or_load_custom_func(&name, "reid_batch_norm", ptx()?)?
        .into_cuda_function())
}

/// One block per channel.
fn per_channel(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `total` values.
fn elementwise(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((total as u32).div_ceil(BLOCK).clamp(1, 8192), 1, 1),
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
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("batch norm on CUDA: operands must be contiguous"),
    }
}

/// Per-channel mean and biased variance of x.
pub(crate) fn stats<T: WithDType + DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    d: (usize, usize, usize),
) -> Result<BatchStats> {
    let (n, c, hw) = sizes(d)?;
    let mut out = dev.alloc_zeros::<f64>(2 * d.1)?;
    let f = kernel::<T>(dev, "bn_stats")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(&mut out).arg(&n).arg(&c).arg(&hw);
    // SAFETY: the arguments of `bn_stats` in batch_norm.cu; `out` holds 2C values.
    unsafe { b.launch(per_channel(d.1)) }.w()?;
    let v = dev.clone_dtoh(&out)?;
    Ok(BatchStats {
        mean: v[..d.1].to_vec(),
        var: v[d.1..].to_vec(),
        count: d.0 * d.2,
    })
}

/// `x * scale[c] + shift[c]`, then ReLU if `relu`.
pub(crate) fn affine<T: WithDType + DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    d: (usize, usize, usize),
    scale: &[f64],
    shift: &[f64],
    relu: bool,
) -> Result<CudaSlice<T>> {
    let (_, c, hw) = sizes(d)?;
    let total = d.0 * d.1 * d.2;
    let ss = dev.clone_htod(&[scale, shift].concat())?;
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<T>(total)? };
    let (t, r) = (total as u32, relu as i32);
    let f = kernel::<T>(dev, "bn_affine")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(&mut y).arg(&ss).arg(&t).arg(&c).arg(&hw).arg(&r);
    // SAFETY: the arguments of `bn_affine`; x and y hold `total` values, ss 2C.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(y)
}

/// [sum(g' * x_hat); sum(g')] per channel as 2C values of T.
pub(crate) fn grad_sums<T: WithDType + DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    (x, y, g): (&CudaView<T>, &CudaView<T>, &CudaView<T>),
    d: (usize, usize, usize),
    mean_invstd: &[f64],
    relu: bool,
) -> Result<CudaSlice<T>> {
    let (n, c, hw) = sizes(d)?;
    let ms = dev.clone_htod(mean_invstd)?;
    // SAFETY: the kernel writes every value.
    let mut out = unsafe { dev.alloc::<T>(2 * d.1)? };
    let r = relu as i32;
    let f = kernel::<T>(dev, "bn_grad_sums")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x)
        .arg(y)
        .arg(g)
        .arg(&mut out)
        .arg(&ms)
        .arg(&n)
        .arg(&c)
        .arg(&hw)
        .arg(&r);
    // SAFETY: the arguments of `bn_grad_sums`; out and ms hold 2C values.
    unsafe { b.launch(per_channel(d.1)) }.w()?;
    Ok(out)
}

/// The input gradient; `params` = [mean; invstd; k; a; b] (5C values).
pub(crate) fn input_grad<T: WithDType + DeviceRepr + CudaDType>(
    dev: &CudaDevice,
    (x, y, g): (&CudaView<T>, &CudaView<T>, &CudaView<T>),
    d: (usize, usize, usize),
    params: &[f64],
    relu: bool,
) -> Result<CudaSlice<T>> {
    let (_, c, hw) = sizes(d)?;
    let total = d.0 * d.1 * d.2;
    let p = dev.clone_htod(params)?;
    // SAFETY: the kernel writes every value.
    let mut dx = unsafe { dev.alloc::<T>(total)? };
    let (count, t, r) = ((d.0 * d.2) as f64, total as u32, relu as i32);
    let f = kernel::<T>(dev, "bn_input_grad")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x)
        .arg(y)
        .arg(g)
        .arg(&mut dx)
        .arg(&p)
        .arg(&count)
        .arg(&t)
        .arg(&c)
        .arg(&hw)
        .arg(&r);
    // SAFETY: the arguments of `bn_input_grad`; p holds 5C values.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed: run with the `cuda` feature and
    /// the CUDA libraries on LD_LIBRARY_PATH, as after scripts/cuda-toolchain.sh).
    #[test]
    fn kernels_compile() {
        let ptx = super::ptx().expect("NVRTC compiles batch_norm.cu");
        for name in ["bn_stats", "bn_affine", "bn_grad_sums", "bn_input_grad"] {
            for t in ["f32", "f64"] {
                assert!(ptx.contains(&format!(".entry {name}_{t}(")), "{name}_{t} in the PTX");
            }
        }
    }
}
