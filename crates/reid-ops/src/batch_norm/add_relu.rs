//! The end of a residual block in training, `relu(bn(x) + r)`, as one pass
//! forward: the batch norm's output is never written out to be read again by
//! the residual sum. It runs on the tape only (it has four inputs), on the CPU
//! and on CUDA (the statistics with scale and shift, then one pass).

use crate::ledger::CountedContiguous;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use num_traits::Float;

use super::{contiguous_all, dims, BatchNormTrain};
use crate::filled_in_chunks;
use crate::residual::{relu_of_sum, ReluMask};
use crate::tape::{self, TapeOp};
use crate::with_widest_simd;

/// `relu(x * scale[c] + shift[c] + r)` over planes in parallel; each value is
/// rounded as batch norm's output and then the residual sum round it.
fn affine_add_relu<T: Float + Send + Sync>(
    x: &[T],
    r: &[T],
    (_, c, hw): (usize, usize, usize),
    scale: &[f64],
    shift: &[f64],
) -> Vec<T> {
    // SAFETY: every value of each plane is written by the loop over it.
    unsafe {
        filled_in_chunks(x.len(), hw, |plane, yo| {
            let ch = plane % c;
            let (s, b) = (T::from(scale[ch]).unwrap(), T::from(shift[ch]).unwrap());
            let (x, r) = (&x[plane * hw..(plane + 1) * hw], &r[plane * hw..(plane + 1) * hw]);
            with_widest_simd!({
                for ((o, &v), &u) in yo.iter_mut().zip(x).zip(r) {
                    o.write(relu_of_sum(v * s + b, u));
                }
            })
        })
    }
}

/// A storage of either device with its layout.
type Operand<'a, S> = (&'a S, &'a Layout);

/// The four operands (x, weight, bias, r) of either device, or an error
/// naming `op`.
fn operands<'a, S>(op: &str, inputs: &[Operand<'a, S>]) -> Result<[Operand<'a, S>; 4]> {
    let &[x, w, b, r] = inputs else {
        candle_core::bail!("{op}: expected 4 inputs, got {}", inputs.len());
    };
    if x.1.dims() != r.1.dims() {
        candle_core::bail!("{op}: input {:?} and residual {:?} differ", x.1.dims(), r.1.dims());
    }
    Ok([x, w, b, r])
}

/// Train-mode batch norm of (x, weight, bias) without ReLU, plus the residual
/// `r`, then ReLU: inputs (x, weight, bias, r). The batch statistics are left in
/// the batch norm's `stats`, as [`BatchNormTrain`] leaves them.
#[derive(Debug, Clone)]
pub struct BatchNormAddRelu {
    pub bn: BatchNormTrain,
}

impl BatchNormAddRelu {
    /// Inputs the backward reads: x and the weight (not the bias or residual).
    pub const READS: [bool; 4] = [true, true, false, false];

    fn forward<T: Float + Send + Sync + 'static>(&self, [x, w, b, r]: [&[T]; 4], d: (usize, usize, usize)) -> Vec<T> {
        let (scale, shift) = self.bn.normalise_batch(x, w, b, d);
        affine_add_relu(x, r, d, &scale, &shift)
    }
}

impl TapeOp for BatchNormAddRelu {
    fn name(&self) -> &'static str {
        "batch-norm-add-relu"
    }

    /// On CUDA: the statistics with scale and shift, then the output.
    fn launches(&self) -> u64 {
        2
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> Result<Vec<(candle_core::CudaStorage, Shape)>> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let op = self.name();
        let [(x, lx), (w, lw), (b, lb), (r, lr)] = operands(op, inputs)?;
        let d = dims(lx, op)?;
        let dev = &x.device;
        // Activations of $a, parameters of $p.
        macro_rules! run {
            ($a:ty, $p:ty) => {{
                let (xv, rv) = (cuda::view::<$a>(x, lx)?, cuda::view::<$a>(r, lr)?);
                let (wv, bv) = (cuda::view::<$p>(w, lw)?, cuda::view::<$p>(b, lb)?);
                let ss = self.bn.cuda_normalise(dev, &xv, [&wv, &bv], d)?;
                let y = cuda::affine_add_relu(dev, (&xv, &rv), d, &ss)?;
                candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone())
            }};
        }
        let y = match x.dtype() {
            candle_core::DType::F32 => run!(f32, f32),
            candle_core::DType::F64 => run!(f64, f64),
            candle_core::DType::BF16 => run!(half::bf16, f32),
            dt => candle_core::bail!("{op}: {dt:?} on CUDA (f32, f64 and bf16 only)"),
        };
        Ok(vec![(y, lx.shape().clone())])
    }

    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
        let op = self.name();
        let [(x, lx), (w, lw), (b, lb), (r, lr)] = operands(op, inputs)?;
        let d = dims(lx, op)?;
        let layouts = [lx, lw, lb, lr];
        let y = match (x, w, b, r) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b), CpuStorage::F32(r)) => {
                CpuStorage::F32(self.forward(contiguous_all([&x[..], w, b, r], layouts, op)?, d))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b), CpuStorage::F64(r)) => {
                CpuStorage::F64(self.forward(contiguous_all([&x[..], w, b, r], layouts, op)?, d))
            }
            _ if crate::mixed::any_bf16(&[x, w, b, r]) => {
                let wide = |s, l| crate::mixed::widened(s, l, op);
                let all = [wide(x, lx)?, wide(w, lw)?, wide(b, lb)?, wide(r, lr)?];
                crate::mixed::narrowed_like(x, self.forward([&*all[0], &all[1], &all[2], &all[3]], d))
            }
            _ => candle_core::bail!("{op}: expected four f32 or four f64 inputs, or bf16 activations"),
        };
        Ok(vec![(y, lx.shape().clone())])
    }

    /// The gradient where the output is positive goes to the residual as it is,
    /// and through the batch norm to (x, weight, bias).
    fn bwd(&self, t: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let grad = tape::only_grad(self.name(), grads)?;
        let (x, w, out) = (t[0], t[1], t[4]);
        let masked = grad.contiguous_counted()?.apply_op2_no_bwd(out, &ReluMask)?;
        // Without ReLU the batch norm's backward reads no output: `out` stands in.
        let (gx, gw, gb) = self.bn.backward(x, w, out, &masked, x.track_op())?;
        Ok(vec![gx, gw, gb, Some(masked)])
    }
}
