//! A convolution that keeps its forward's column matrices (im2col) for the
//! weight gradient, instead of building them again in the backward: on a tape,
//! for convolutions that need columns, while they fit in what the tape may keep
//! (`REID_KEEP_COLUMNS_MB`, see [`column_budget`]).

use std::sync::Mutex;

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::{backward_weight, gemm_into, im2col, parallelism, Columns, Conv2d, Conv2dBackwardInput, Geometry};
use crate::tape::{self, TapeOp};

/// Bytes of columns one training step's tape may keep: `REID_KEEP_COLUMNS_MB`
/// (read once), 0 when unset.
pub fn column_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| match std::env::var("REID_KEEP_COLUMNS_MB") {
        Err(_) => 0,
        Ok(v) => match v.parse::<usize>() {
            Ok(mb) => mb << 20,
            Err(_) => {
                tracing::warn!("REID_KEEP_COLUMNS_MB={v} is not a whole number of MiB; keeping no columns");
                0
            }
        },
    })
}

/// Every image's columns, one after another.
struct Kept<'a, T> {
    cols: &'a [T],
    g: Geometry,
}

impl<T: Float + Sync> Columns<T> for Kept<'_, T> {
    fn scratch_len(&self) -> usize {
        0
    }

    fn of<'a>(&'a self, i: usize, _: &'a mut [T]) -> &'a [T] {
        let len = self.g.ckk() * self.g.p();
        &self.cols[i * len..(i + 1) * len]
    }
}

/// The forward, and every image's columns, each built and multiplied while in
/// cache.
fn forward<T: 'static + Float + Send + Sync>(x: &[T], weight: &[T], g: &Geometry) -> (Vec<T>, Vec<T>) {
    let (ckk, p, image) = (g.ckk(), g.p(), g.c * g.h * g.w);
    let mut y = vec![T::zero(); g.n * g.o * p];
    let mut cols = vec![T::zero(); g.n * ckk * p];
    let par = parallelism(g.n);
    y.par_chunks_mut(g.o * p)
        .zip(cols.par_chunks_mut(ckk * p))
        .enumerate()
        .for_each(|(i, (y, c))| {
            crate::widest!(im2col(&x[i * image..(i + 1) * image], g, c));
            // SAFETY: `y` is initialised; without accumulation gemm only writes it.
            let y = unsafe { &mut *(y as *mut [T] as *mut [std::mem::MaybeUninit<T>]) };
            gemm_into((g.o, p, ckk), y, false, weight, false, c, false, par);
        });
    (y, cols)
}

/// [`Conv2d`] with its columns kept: inputs (x, weight); its backward reads the
/// weight and the kept columns, not x.
pub(super) struct Conv2dKept {
    conv: Conv2d,
    g: Geometry,
    input_grad: bool,
    cols: Mutex<Option<CpuStorage>>,
}

impl Conv2dKept {
    /// The forward, its columns left in `self.cols` for the backward.
    fn forward_keeping<T: 'static + Float + WithDType + Send + Sync>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let (y, cols) = forward(x, w, &self.g);
        *self.cols.lock().expect("columns lock") = Some(T::to_cpu_storage_owned(cols));
        y
    }

    /// The op for `x` and `weight`, if a tape records, the convolution needs
    /// columns, and they fit in the tape's budget.
    pub(super) fn new(conv: Conv2d, x: &Tensor, weight: &Tensor) -> Result<Option<Self>> {
        let g = Geometry::new(x.dims(), weight.dims(), conv.stride, conv.padding)?;
        let bytes = g.n * g.ckk() * g.p() * x.dtype().size_in_bytes();
        if g.direct() || !tape::keep(bytes) {
            return Ok(None);
        }
        Ok(Some(Conv2dKept {
            conv,
            g,
            input_grad: x.track_op(),
            cols: Mutex::new(None),
        }))
    }
}

impl TapeOp for Conv2dKept {
    fn name(&self) -> &'static str {
        "conv2d-kept-columns"
    }

    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
        let &[(x, lx), (w, lw)] = inputs else {
            candle_core::bail!("{}: expected (x, weight)", self.name());
        };
        let g = self.g;
        let y = two_floats!(self.name(), x, lx, w, lw, |x, w| self.forward_keeping(x, w));
        Ok(vec![(y, Shape::from((g.n, g.o, g.oh, g.ow)))])
    }

    fn bwd(&self, t: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let grad = tape::only_grad(self.name(), grads)?;
        let (weight, g) = (t[1], self.g);
        let grad = grad.contiguous()?;
        let grad_x = match self.input_grad {
            true => Some(grad.apply_op2_no_bwd(
                weight,
                &Conv2dBackwardInput {
                    conv: self.conv,
                    input: (g.n, g.c, g.h, g.w),
                },
            )?),
            false => None,
        };
        // Kept until the tape drops the op: a kept tape runs its backward again.
        let cols = self.cols.lock().expect("columns lock");
        let Some(cols) = cols.as_ref() else {
            candle_core::bail!("{}: the backward ran before the forward", self.name());
        };
        let gw = {
            let (gs, gl) = grad.storage_and_layout();
            let Storage::Cpu(gs) = &*gs else {
                candle_core::bail!("{}: CPU tensors only", self.name());
            };
            let cols_l = Layout::contiguous(g.n * g.ckk() * g.p());
            let values = two_floats!(self.name(), cols, &cols_l, gs, gl, |cols, gy| {
                backward_weight(&Kept { cols, g }, gy, &g)
            });
            Tensor::from_storage(Storage::Cpu(values), weight.shape(), BackpropOp::none(), false)
        };
        Ok(vec![grad_x, Some(gw)])
    }
}
