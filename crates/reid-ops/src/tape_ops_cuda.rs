//! The CUDA side of the residual and pooling ops (`tape_ops.cu`): each value as
//! the CPU kernel computes it, so that the tape runs the same ops on both.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, WithDType};

use crate::cuda_kernels::{contiguous_view as values, grid_stride as grid, Kernels};
use crate::pool::Window;

static KERNELS: Kernels = Kernels::new(
    "reid_tape_ops",
    concat!(include_str!("bf16.cuh"), include_str!("tape_ops.cu")),
);

/// Runs `$body` with `T` the f32, f64 or bf16 of `$dtype` (bf16 computed in f32
/// by the kernels).
macro_rules! with_float {
    ($op:expr, $dtype:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            dt => candle_core::bail!("{} on CUDA: {dt:?} (f32, f64 and bf16 only)", $op),
        }
    };
}

/// Element-wise `name` (`sum`, `add_relu`, `relu_mask`) of two tensors of one shape.
pub(crate) fn binary(
    name: &str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    if l1.dims() != l2.dims() {
        candle_core::bail!("{name}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    with_float!(name, s1.dtype(), |T| binary_as::<T>(name, (s1, l1), (s2, l2)))
}

fn binary_as<T: WithDType + DeviceRepr + CudaDType>(
    name: &str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (a, b) = (values::<T>(s1, l1, name)?, values::<T>(s2, l2, name)?);
    let n = l1.shape().elem_count();
    let dev = s1.device().clone();
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<T>(n)? };
    let n32 = n as u32;
    let f = KERNELS.get::<T>(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&a).arg(&b).arg(&mut y).arg(&n32);
    // SAFETY: (a, b, y, n) as the element-wise kernels of tape_ops.cu take them.
    unsafe { l.launch(grid(n)) }.w()?;
    crate::ledger::launched(1);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// The window's sizes as the kernels take them: (h, w, oh, ow, k, s, p).
fn geometry(win: Window, (h, w): (usize, usize)) -> [i32; 7] {
    let (oh, ow) = (win.out_len(h), win.out_len(w));
    [h, w, oh, ow, win.kernel, win.stride, win.padding].map(|v| v as i32)
}

/// Max pooling: the output and each window's argmax (an index in its plane).
pub(crate) fn max_pool(s: &CudaStorage, l: &Layout, win: Window) -> Result<(CudaStorage, Shape, CudaSlice<u32>)> {
    with_float!("max-pool2d", s.dtype(), |T| max_pool_as::<T>(s, l, win))
}

fn max_pool_as<T: WithDType + DeviceRepr + CudaDType>(
    s: &CudaStorage,
    l: &Layout,
    win: Window,
) -> Result<(CudaStorage, Shape, CudaSlice<u32>)> {
    let (n, c, h, w) = crate::dims4(l, "max-pool2d")?;
    let x = values::<T>(s, l, "max-pool2d")?;
    let g = geometry(win, (h, w));
    let (planes, total) = (n * c, n * c * g[2] as usize * g[3] as usize);
    let dev = s.device().clone();
    // SAFETY: the kernel writes every value of both.
    let (mut y, mut at) = unsafe { (dev.alloc::<T>(total)?, dev.alloc::<u32>(total)?) };
    let planes32 = planes as u32;
    let f = KERNELS.get::<T>(&dev, "max_pool")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x).arg(&mut y).arg(&mut at).arg(&planes32);
    for v in &g {
        b.arg(v);
    }
    // SAFETY: the arguments of `max_pool` in tape_ops.cu.
    unsafe { b.launch(grid(total)) }.w()?;
    crate::ledger::launched(1);
    let shape = Shape::from((n, c, g[2] as usize, g[3] as usize));
    Ok((CudaStorage::wrap_cuda_slice(y, dev), shape, at))
}

/// The gradient of max pooling with `win` from the output gradient and the
/// argmax, for an input of `hw`.
pub(crate) fn max_pool_backward(
    s: &CudaStorage,
    l: &Layout,
    at: &CudaSlice<u32>,
    win: Window,
    hw: (usize, usize),
) -> Result<(CudaStorage, Shape)> {
    with_float!("max-pool2d-backward", s.dtype(), |T| max_pool_backward_as::<T>(
        s, l, at, win, hw
    ))
}

fn max_pool_backward_as<T: WithDType + DeviceRepr + CudaDType>(
    s: &CudaStorage,
    l: &Layout,
    at: &CudaSlice<u32>,
    win: Window,
    (h, w): (usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let (n, c, oh, ow) = crate::dims4(l, "max-pool2d-backward")?;
    let g = geometry(win, (h, w));
    if at.len() != n * c * oh * ow || [oh, ow] != [g[2] as usize, g[3] as usize] {
        candle_core::bail!("max-pool2d-backward: the gradient does not match the forward");
    }
    let grad = values::<T>(s, l, "max-pool2d-backward")?;
    let dev = s.device().clone();
    // SAFETY: the kernel writes every value (one thread per input).
    let mut dx = unsafe { dev.alloc::<T>(n * c * h * w)? };
    let planes = (n * c) as u32;
    let f = KERNELS.get::<T>(&dev, "max_pool_backward")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&grad).arg(at).arg(&mut dx).arg(&planes);
    for v in &g {
        b.arg(v);
    }
    // SAFETY: the arguments of `max_pool_backward`.
    unsafe { b.launch(grid(n * c * h * w)) }.w()?;
    crate::ledger::launched(1);
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), Shape::from((n, c, h, w))))
}

/// Average pooling (forward) or its gradient (`backward`, from the output
/// gradient, with the input's `hw`).
pub(crate) fn avg_pool(
    s: &CudaStorage,
    l: &Layout,
    win: Window,
    backward: Option<(usize, usize)>,
) -> Result<(CudaStorage, Shape)> {
    with_float!("avg-pool2d", s.dtype(), |T| avg_pool_as::<T>(s, l, win, backward))
}

fn avg_pool_as<T: WithDType + DeviceRepr + CudaDType>(
    s: &CudaStorage,
    l: &Layout,
    win: Window,
    backward: Option<(usize, usize)>,
) -> Result<(CudaStorage, Shape)> {
    let (n, c, a, b) = crate::dims4(l, "avg-pool2d")?;
    let x = values::<T>(s, l, "avg-pool2d")?;
    // (input hw, output hw) of the pooling, whichever way this runs.
    let (hw, name) = match backward {
        None => ((a, b), "avg_pool"),
        Some(input) => (input, "avg_pool_backward"),
    };
    let g = geometry(win, hw);
    let out_dims = match backward {
        None => (g[2] as usize, g[3] as usize),
        Some(input) => input,
    };
    let planes = n * c;
    let dev = s.device().clone();
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<T>(planes * out_dims.0 * out_dims.1)? };
    let planes32 = planes as u32;
    let f = KERNELS.get::<T>(&dev, name)?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&x).arg(&mut y).arg(&planes32);
    for v in &g {
        l.arg(v);
    }
    // One thread per output forward, per input backward.
    let threads = planes * out_dims.0 * out_dims.1;
    // SAFETY: the arguments of `avg_pool` and `avg_pool_backward`.
    unsafe { l.launch(grid(threads)) }.w()?;
    crate::ledger::launched(1);
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev),
        Shape::from((n, c, out_dims.0, out_dims.1)),
    ))
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed; see batch_norm_cuda's test).
    #[test]
    fn kernels_compile() {
        let ptx = super::KERNELS.ptx().expect("NVRTC compiles tape_ops.cu");
        let names = [
            "sum",
            "add_relu",
            "relu_mask",
            "max_pool",
            "max_pool_backward",
            "avg_pool",
            "avg_pool_backward",
        ];
        for name in names {
            for t in ["f32", "f64", "bf16"] {
                assert!(ptx.contains(&format!(".entry {name}_{t}(")), "{name}_{t} in the PTX");
            }
        }
    }
}
