//! The SGD update on CUDA: one launch per parameter (of sgd.cu), rounding each
//! value as the CPU's one-pass update does, so that both give the same bits.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, Layout, Result, WithDType};

use crate::cuda_kernels::{grid_stride as grid, Kernels};

static KERNELS: Kernels = Kernels::new("reid_sgd", concat!(include_str!("bf16.cuh"), include_str!("sgd.cu")));

/// The settings of one parameter's update, as f64 (the kernel gets them as T).
#[derive(Debug, Clone, Copy)]
pub struct SgdScalars {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
}

/// A momentum buffer to update beside the parameter, and whether it is new
/// (it then becomes the decayed gradient).
pub struct MomentumBuffer<'a> {
    pub storage: &'a mut CudaStorage,
    pub layout: &'a Layout,
    pub first: bool,
}

/// The contiguous range of a layout of `n` values, or an error.
fn range(l: &Layout, n: usize, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == n => Ok((a, b)),
        _ => candle_core::bail!("sgd-update on CUDA: the {what} must be contiguous, of the parameter's size"),
    }
}

/// A parameter's bf16 copy, written beside it.
pub type Bf16Copy<'a> = (&'a mut CudaStorage, &'a Layout);

/// `param <- param - lr * direction` (and the buffer beside it, and the bf16
/// copy if any), one launch. The gradient has the parameter's dtype, or bf16
/// for an f32 parameter (the gradient of its bf16 copy).
pub fn update(
    (param, pl): (&mut CudaStorage, &Layout),
    (grad, gl): (&CudaStorage, &Layout),
    buf: Option<MomentumBuffer>,
    copy: Option<Bf16Copy>,
    s: &SgdScalars,
) -> Result<()> {
    use candle_core::DType::{BF16, F32, F64};
    let (p, g) = ((param, pl), (grad, gl));
    match (p.0.dtype(), g.0.dtype(), copy) {
        (F32, F32, copy) => update_as::<f32, f32>(p, g, buf, copy, s, ""),
        (F64, F64, None) => update_as::<f64, f64>(p, g, buf, None, s, ""),
        (F32, BF16, copy) => update_as::<f32, half::bf16>(p, g, buf, copy, s, "_bf16_grad"),
        (F64, _, Some(_)) => candle_core::bail!("sgd-update on CUDA: a bf16 copy of an f64 parameter"),
        (p, g, _) => candle_core::bail!(
            "sgd-update on CUDA: {p:?} parameters with {g:?} gradients (f32 or f64 with their own, \
             or f32 with bf16)"
        ),
    }
}

/// [`update`] of a parameter of T with a gradient of G, by the kernels named
/// with `grad_kind` (empty where G is T).
fn update_as<T: WithDType + DeviceRepr + CudaDType + num_traits::Float, G: WithDType + DeviceRepr + CudaDType>(
    (param, pl): (&mut CudaStorage, &Layout),
    (grad, gl): (&CudaStorage, &Layout),
    buf: Option<MomentumBuffer>,
    copy: Option<Bf16Copy>,
    s: &SgdScalars,
    grad_kind: &str,
) -> Result<()> {
    let n = pl.shape().elem_count();
    let (p0, p1) = range(pl, n, "parameter")?;
    let (g0, g1) = range(gl, n, "gradient")?;
    let dev = param.device().clone();
    let t = |v: f64| T::from(v).expect("a float");
    let (n32, lr, wd, has_wd) = (n as u32, t(s.lr), t(s.weight_decay), (s.weight_decay != 0.0) as i32);
    let g = grad.as_cuda_slice::<G>()?.slice(g0..g1);
    let mut p = param.as_cuda_slice_mut::<T>()?.slice_mut(p0..p1);
    let mut copy = match copy {
        Some((c, cl)) => {
            let (c0, c1) = range(cl, n, "bf16 copy")?;
            Some(c.as_cuda_slice_mut::<half::bf16>()?.slice_mut(c0..c1))
        }
        None => None,
    };
    // A null pointer where there is no copy.
    let no_copy = 0u64;
    let stream = dev.cuda_stream();
    match buf {
        None => {
            let f = KERNELS.get::<T>(&dev, &format!("sgd_plain{grad_kind}"))?;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut p).arg(&g).arg(&n32).arg(&lr).arg(&wd).arg(&has_wd);
            match copy.as_mut() {
                Some(c) => b.arg(c),
                None => b.arg(&no_copy),
            };
            // SAFETY: the arguments of `sgd_plain` in sgd.cu; p, g and the copy (or null) hold n values.
            unsafe { b.launch(grid(n)) }.w()?;
            crate::ledger::launched(1);
        }
        Some(MomentumBuffer { storage, layout, first }) => {
            let (b0, b1) = range(layout, n, "momentum buffer")?;
            let mut m = storage.as_cuda_slice_mut::<T>()?.slice_mut(b0..b1);
            let (mom, keep) = (t(s.momentum), t(1.0 - s.dampening));
            let (first, nesterov) = (first as i32, s.nesterov as i32);
            let f = KERNELS.get::<T>(&dev, &format!("sgd_momentum{grad_kind}"))?;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut p)
                .arg(&g)
                .arg(&mut m)
                .arg(&n32)
                .arg(&lr)
                .arg(&wd)
                .arg(&has_wd);
            b.arg(&mom).arg(&keep).arg(&first).arg(&nesterov);
            match copy.as_mut() {
                Some(c) => b.arg(c),
                None => b.arg(&no_copy),
            };
            // SAFETY: the arguments of `sgd_momentum`; p, g, m and the copy (or null) hold n values.
            unsafe { b.launch(grid(n)) }.w()?;
            crate::ledger::launched(1);
        }
    }
    Ok(())
}

/// `copy <- bf16(param)` for an f32 parameter and its bf16 copy, one launch.
pub(crate) fn write_bf16_copy(
    (copy, cl): (&mut CudaStorage, &Layout),
    (param, pl): (&CudaStorage, &Layout),
) -> Result<()> {
    let n = pl.shape().elem_count();
    let (c0, c1) = range(cl, n, "copy")?;
    let (p0, p1) = range(pl, n, "parameter")?;
    let dev = param.device().clone();
    let p = param.as_cuda_slice::<f32>()?.slice(p0..p1);
    let mut c = copy.as_cuda_slice_mut::<half::bf16>()?.slice_mut(c0..c1);
    let n32 = n as u32;
    let f = KERNELS.get::<f32>(&dev, "bf16_copy")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&p).arg(&mut c).arg(&n32);
    // SAFETY: the arguments of `bf16_copy` in sgd.cu; p and c hold n values.
    unsafe { b.launch(grid(n)) }.w()?;
    crate::ledger::launched(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed; see batch_norm_cuda's test).
    #[test]
    fn kernels_compile() {
        let ptx = super::KERNELS.ptx().expect("NVRTC compiles sgd.cu");
        for name in ["sgd_plain", "sgd_momentum"] {
            for t in ["f32", "f64", "bf16_grad_f32"] {
                assert!(ptx.contains(&format!(".entry {name}_{t}(")), "{name}_{t} in the PTX");
            }
        }
        assert!(ptx.contains(".entry bf16_copy_f32("), "bf16_copy_f32 in the PTX");
    }
}
