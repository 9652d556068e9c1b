//! The end of every residual block, `relu(a + b)`, as one pass forward and one
//! backward, instead of candle's add, ReLU and the five passes of its ReLU backward.

use crate::ledger::CountedContiguous;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Float;

use super::{filled_in_chunks, Exec, Kernels, OpKind};
use crate::tape::{self, Reads};

/// Elements per parallel task: large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;

/// `f(x, y)` elementwise over two equally long slices, in parallel, into a new vector.
fn zip_map<T: Float + Send + Sync>(x: &[T], y: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    // SAFETY: the loop writes every value of the chunk.
    unsafe {
        filled_in_chunks(x.len(), CHUNK, |i, out| {
            let range = i * CHUNK..(i * CHUNK + out.len());
            for ((o, &u), &v) in out.iter_mut().zip(&x[range.clone()]).zip(&y[range]) {
                o.write(f(u, v));
            }
        })
    }
}

/// Runs `$f` elementwise on two f32 or two f64 operands of the same shape.
macro_rules! binary {
    ($op:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:expr) => {{
        if $l1.dims() != $l2.dims() {
            candle_core::bail!("{}: shapes {:?} and {:?} differ", $op, $l1.dims(), $l2.dims());
        }
        let storage = two_floats!($op, $s1, $l1, $s2, $l2, |a, b| zip_map(a, b, $f));
        Ok((storage, $l1.shape().clone()))
    }};
}

/// The `cuda_fwd` of an element-wise op of two operands: `$kernel` of
/// tape_ops.cu (with the `cuda` feature).
macro_rules! cuda_binary_fwd {
    ($kernel:literal) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &Layout,
            s2: &candle_core::CudaStorage,
            l2: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            crate::ledger::cuda_output(crate::tape_ops_cuda::binary($kernel, (s1, l1), (s2, l2)))
        }
    };
}

/// `max(a + b, 0)`, NaN kept (as PyTorch's ReLU; `f32::max` would drop it).
#[inline(always)]
pub(crate) fn relu_of_sum<T: Float>(a: T, b: T) -> T {
    let s = a + b;
    if s <= T::zero() {
        T::zero()
    } else {
        s
    }
}

/// The gradient wherever the output was not clamped to 0 (NaN outputs pass it,
/// as PyTorch's `threshold_backward` does).
fn pass_where_positive<T: Float>(g: T, out: T) -> T {
    if out <= T::zero() {
        T::zero()
    } else {
        g
    }
}

/// `relu(a + b)`; the backward hands both operands the output gradient where the
/// output is positive.
#[derive(Debug, Clone, Copy)]
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::ledger::cpu_output(1, binary!(self.name(), s1, l1, s2, l2, relu_of_sum))
    }

    cuda_binary_fwd!("add_relu");

    fn bwd(&self, _a: &Tensor, _b: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let masked = grad.contiguous_counted()?.apply_op2_no_bwd(out, &ReluMask)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// (gradient, ReLU output) -> the gradient where the output is positive, else 0.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::ledger::cpu_output(1, binary!(self.name(), s1, l1, s2, l2, pass_where_positive))
    }

    cuda_binary_fwd!("relu_mask");
}

/// `a + b` for tensors of one shape, without a graph on a tape (see [`tape::add`]).
#[derive(Debug, Clone, Copy)]
struct Sum;

impl CustomOp2 for Sum {
    fn name(&self) -> &'static str {
        "sum"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::ledger::cpu_output(1, binary!(self.name(), s1, l1, s2, l2, |a, b| a + b))
    }

    cuda_binary_fwd!("sum");
}

/// `a + b`: candle's add, or while a tape records, [`Sum`] on it.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    tape::add(a, b, Sum)
}

/// `relu(a + b)` for tensors of one shape: one fused op where the device has it
/// (the CPU; CUDA with the `cuda` feature), the generic composition elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_relu_with(Exec::default().kernels(OpKind::AddRelu, a), a, b)
}

/// [`add_relu`] with the given kernels.
pub fn add_relu_with(kernels: Kernels, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match kernels {
        Kernels::Fused => tape::op2(
            &a.contiguous_counted()?,
            &b.contiguous_counted()?,
            AddRelu,
            Reads::OUTPUT,
        ),
        _ => super::generic::add_relu(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::testing::random;

    #[test]
    fn matches_candle_forward_and_backward() {
        let a = Var::from_tensor(&random(&[3, 5, 4, 7], 1)).unwrap();
        let b = Var::from_tensor(&random(&[3, 5, 4, 7], 2)).unwrap();
        let g = random(&[3, 5, 4, 7], 3);
        let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
        let ga = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&theirs * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&a, &b] {
            let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
        }
        // The mask really masks: some outputs are zero and their gradients too.
        let zeros = ours.eq(0.0).unwrap().to_dtype(candle_core::DType::F64).unwrap();
        assert!(zeros.sum_all().unwrap().to_scalar::<f64>().unwrap() > 10.0);
    }

    #[test]
    fn refuses_different_shapes() {
        let a = random(&[2, 3], 1);
        let b = random(&[3, 2], 2);
        assert!(add_relu(&a, &b).is_err());
    }
}
