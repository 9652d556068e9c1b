//! Convolution through cuDNN, forward and both gradients, as one candle op (built
//! with the `cudnn` feature). candle's own CUDA convolution uses cuDNN for the
//! forward only: its input gradient goes through a naive `conv_transpose2d` kernel
//! and its weight gradient falls back to a direct convolution.
//!
//! Descriptors and the chosen algorithms are kept per thread and per shape (a
//! training step sees the same few dozen shapes every time), and one workspace per
//! device is reused and grown as needed. TF32 tensor cores are allowed for f32, as
//! PyTorch allows them for cuDNN convolutions, unless
//! [`set_reduced_precision_f32`] turns them off. bf16 convolutions accumulate in f32.

use crate::ledger::CountedContiguous;
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t, cudnnConvolutionBwdFilterAlgo_t, cudnnConvolutionFwdAlgo_t,
};
use candle_core::cuda::cudarc::cudnn::sys::{cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t};
use candle_core::cuda::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor,
    TensorDescriptor,
};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use half::bf16;

static REDUCED_PRECISION_F32: AtomicBool = AtomicBool::new(true);

/// Allows (the default) or forbids TF32 tensor cores in f32 convolutions (see
/// [`super::set_tf32`], which sets matrix products too).
pub fn set_reduced_precision_f32(allowed: bool) {
    REDUCED_PRECISION_F32.store(allowed, Ordering::SeqCst);
}

/// Whether TF32 is allowed in f32 convolutions.
pub fn reduced_precision_f32() -> bool {
    REDUCED_PRECISION_F32.load(Ordering::SeqCst)
}

/// Element types cuDNN convolves here, with the type it accumulates in.
trait ConvType: CudnnDataType + CudaDType + WithDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    type Compute: CudnnDataType + 'static;
    const ONE: Self;
    const ZERO: Self;
}

impl ConvType for f32 {
    type Compute = f32;
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}

impl ConvType for f64 {
    type Compute = f64;
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}

impl ConvType for bf16 {
    type Compute = f32;
    const ONE: Self = bf16::ONE;
    const ZERO: Self = bf16::ZERO;
}

/// One convolution shape: input [N, C, H, W], weight [O, C, k, k], stride, padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConvKey {
    device: DeviceId,
    dtype: DType,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
    tf32: bool,
}

/// Output dims of convolving `x` by `w`.
fn out_dims(x: [usize; 4], w: [usize; 4], stride: usize, padding: usize) -> [usize; 4] {
    let o = |n: usize| (n + 2 * padding - w[2]) / stride + 1;
    [x[0], w[0], o(x[2]), o(x[3])]
}

impl ConvKey {
    fn out(&self) -> [usize; 4] {
        out_dims(self.x, self.w, self.stride, self.padding)
    }
}

/// The descriptors of one shape and the algorithm chosen for each direction.
struct Plan<T: ConvType> {
    conv: ConvDescriptor<T::Compute>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    fwd: (cudnnConvolutionFwdAlgo_t, usize),
    bwd_data: (cudnnConvolutionBwdDataAlgo_t, usize),
    bwd_filter: (cudnnConvolutionBwdFilterAlgo_t, usize),
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<ConvKey, Rc<dyn Any>>> = RefCell::new(HashMap::new());
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

/// This thread's cuDNN handle for `dev` (handles are neither Send nor Sync).
fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with_borrow_mut(|h| {
        if let Some(c) = h.get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.insert(dev.id(), c.clone());
        Ok(c)
    })
}

fn dims4(d: [usize; 4]) -> [i32; 4] {
    d.map(|v| v as i32)
}

impl<T: ConvType> Plan<T> {
    fn new(key: &ConvKey, dev: &CudaDevice) -> Result<Self> {
        let cudnn = handle(dev)?;
        let (p, s) = (key.padding as i32, key.stride as i32);
        let mut conv = cudnn.create_conv2d::<T::Compute>(
            [p, p],
            [s, s],
            [1, 1],
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        let math = match (T::DATA_TYPE == f32::DATA_TYPE, key.tf32) {
            (true, false) => cudnnMathType_t::CUDNN_FMA_MATH,
            _ => cudnnMathType_t::CUDNN_DEFAULT_MATH,
        };
        conv.set_math_type(math)?;
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let x = cudnn.create_4d_tensor::<T>(nchw, dims4(key.x))?;
        let w = cudnn.create_4d_filter::<T>(nchw, dims4(key.w))?;
        let y = cudnn.create_4d_tensor::<T>(nchw, dims4(key.out()))?;
        let f = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        let fa = f.pick_algorithm()?;
        let fwd = (fa, f.get_workspace_size(fa)?);
        let d = ConvBackwardData {
            conv: &conv,
            dx: &x,
            w: &w,
            dy: &y,
        };
        let da = d.pick_algorithm()?;
        let bwd_data = (da, d.get_workspace_size(da)?);
        let g = ConvBackwardFilter {
            conv: &conv,
            x: &x,
            dw: &w,
            dy: &y,
        };
        let ga = g.pick_algorithm()?;
        let bwd_filter = (ga, g.get_workspace_size(ga)?);
        Ok(Plan {
            conv,
            x,
            w,
            y,
            fwd,
            bwd_data,
            bwd_filter,
        })
    }

    /// The cached plan of `key`, made on first use.
    fn get(key: &ConvKey, dev: &CudaDevice) -> Result<Rc<Self>> {
        if let Some(p) = PLANS.with_borrow(|m| m.get(key).cloned()) {
            return p
                .downcast::<Self>()
                .map_err(|_| candle_core::Error::Msg("conv plan of another type".into()));
        }
        let plan = Rc::new(Self::new(key, dev)?);
        PLANS.with_borrow_mut(|m| m.insert(*key, plan.clone() as Rc<dyn Any>));
        Ok(plan)
    }
}

/// Runs `f` with this thread's workspace for `dev`, grown to `bytes` first.
fn with_workspace<R>(dev: &CudaDevice, bytes: usize, f: impl FnOnce(&mut CudaSlice<u8>) -> Result<R>) -> Result<R> {
    WORKSPACES.with_borrow_mut(|w| {
        let too_small = w.get(&dev.id()).is_none_or(|s| s.len() < bytes.max(1));
        if too_small {
            w.insert(dev.id(), dev.alloc_zeros::<u8>(bytes.max(1))?);
        }
        f(w.get_mut(&dev.id()).expect("just inserted"))
    })
}

/// The contiguous values of an operand, from its layout's offsets.
fn view<'a, T: ConvType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("cudnn conv2d: operands must be contiguous"),
    }
}

/// Which computation a [`CudnnConv`] op performs.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// (x, w) -> y
    Forward,
    /// (dy, w) -> dx
    BackwardData,
    /// (x, dy) -> dw
    BackwardFilter,
}

/// One direction of a cuDNN convolution of input dims `x` and weight dims `w`.
#[derive(Debug, Clone, Copy)]
struct CudnnConv {
    direction: Direction,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
}

impl CudnnConv {
    fn key(&self, dev: &CudaDevice, dtype: DType) -> ConvKey {
        ConvKey {
            device: dev.id(),
            dtype,
            x: self.x,
            w: self.w,
            stride: self.stride,
            padding: self.padding,
            tf32: reduced_precision_f32(),
        }
    }

    fn shape(&self) -> Shape {
        match self.direction {
            Direction::Forward => Shape::from(out_dims(self.x, self.w, self.stride, self.padding).to_vec()),
            Direction::BackwardData => Shape::from(self.x.to_vec()),
            Direction::BackwardFilter => Shape::from(self.w.to_vec()),
        }
    }

    fn run<T: ConvType>(&self, dev: &CudaDevice, a: &CudaView<T>, b: &CudaView<T>) -> Result<CudaSlice<T>> {
        let plan = Plan::<T>::get(&self.key(dev, T::DTYPE), dev)?;
        let p = &*plan;
        // SAFETY: beta is zero, so cuDNN writes every output value without reading it.
        let mut out = unsafe { dev.alloc::<T>(self.shape().elem_count())? };
        let scale = (T::ONE, T::ZERO);
        match self.direction {
            Direction::Forward => with_workspace(dev, p.fwd.1, |ws| {
                let op = ConvForward {
                    conv: &p.conv,
                    x: &p.x,
                    w: &p.w,
                    y: &p.y,
                };
                // SAFETY: the descriptors were made for these shapes and this type.
                unsafe { op.launch(p.fwd.0, Some(ws), scale, a, b, &mut out)? };
                Ok(())
            })?,
            Direction::BackwardData => with_workspace(dev, p.bwd_data.1, |ws| {
                let op = ConvBackwardData {
                    conv: &p.conv,
                    dx: &p.x,
                    w: &p.w,
                    dy: &p.y,
                };
                // SAFETY: as above; `a` is dy, `b` the weight.
                unsafe { op.launch(p.bwd_data.0, Some(ws), scale, &mut out, b, a)? };
                Ok(())
            })?,
            Direction::BackwardFilter => with_workspace(dev, p.bwd_filter.1, |ws| {
                let op = ConvBackwardFilter {
                    conv: &p.conv,
                    x: &p.x,
                    dw: &p.w,
                    dy: &p.y,
                };
                // SAFETY: as above; `a` is x, `b` dy.
                unsafe { op.launch(p.bwd_filter.0, Some(ws), scale, a, &mut out, b)? };
                Ok(())
            })?,
        }
        Ok(out)
    }
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn-conv2d runs on CUDA only")
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let storage = match s1.dtype() {
            DType::F32 => CudaStorage::wrap_cuda_slice(self.run::<f32>(&dev, &view(s1, l1)?, &view(s2, l2)?)?, dev),
            DType::F64 => CudaStorage::wrap_cuda_slice(self.run::<f64>(&dev, &view(s1, l1)?, &view(s2, l2)?)?, dev),
            DType::BF16 => CudaStorage::wrap_cuda_slice(self.run::<bf16>(&dev, &view(s1, l1)?, &view(s2, l2)?)?, dev),
            d => candle_core::bail!("cudnn-conv2d: {d:?} is not supported (f32, f64, bf16)"),
        };
        // One cuDNN call (counted as one launch; cuDNN may run more kernels in it).
        crate::ledger::launched(1);
        crate::ledger::cuda_output(Ok((storage, self.shape())))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous_counted()?;
        let with = |direction| CudnnConv { direction, ..*self };
        let grad_x = match x.track_op() {
            true => Some(grad.apply_op2_no_bwd(w, &with(Direction::BackwardData))?),
            false => None,
        };
        let grad_w = x.apply_op2_no_bwd(&grad, &with(Direction::BackwardFilter))?;
        Ok((grad_x, Some(grad_w)))
    }
}

/// Convolution without bias of `x` [N, C, H, W] by `weight` [O, C, k, k] through cuDNN.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (x, weight) = (x.contiguous_counted()?, weight.contiguous_counted()?);
    let (n, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c || kh != kw || h + 2 * padding < kh || w + 2 * padding < kw {
        candle_core::bail!("conv2d: weight {:?} does not fit input {:?}", weight.dims(), x.dims());
    }
    let op = CudnnConv {
        direction: Direction::Forward,
        x: [n, c, h, w],
        w: [o, c, kh, kw],
        stride,
        padding,
    };
    crate::tape::op2(&x, &weight, op, crate::tape::Reads::INPUTS)
}
