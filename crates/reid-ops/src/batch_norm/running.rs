//! The running statistics' update after a train-mode forward, in place and in
//! one launch for both running tensors: `r <- r * (1 - m) + s * m`, where `s`
//! is the batch mean for the running mean, and the batch variance made
//! unbiased for the running variance. Each value is rounded as candle's chain
//! of tensor ops (cast, scale, scale, add) rounded it, so the bits are that
//! chain's.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Tensor};
use num_traits::Float;

use super::SavedStats;

/// The settings of an update: the momentum and the batch statistics.
#[derive(Debug, Clone)]
struct Update {
    momentum: f64,
    stats: SavedStats,
}

impl Update {
    /// Bessel's correction of the batch variance.
    fn unbiased(&self) -> f64 {
        let n = self.stats.count as f64;
        n / (n - 1.0).max(1.0)
    }

    /// `r <- (r * keep + 0) + (s * moment + 0)` for the mean (row 0 of the
    /// statistics) and the variance (row 1, `s` times the correction, + 0).
    fn run<T: Float>(&self, mean: &mut [T], var: &mut [T], stats: &[f64]) {
        let t = |v: f64| T::from(v).expect("a float");
        let (zero, keep, moment, unbiased) = (T::zero(), t(1.0 - self.momentum), t(self.momentum), t(self.unbiased()));
        let c = mean.len();
        let step = |r: T, s: T| (r * keep + zero) + (s * moment + zero);
        for (i, (m, v)) in mean.iter_mut().zip(var.iter_mut()).enumerate() {
            *m = step(*m, t(stats[i]));
            *v = step(*v, t(stats[c + i]) * unbiased + zero);
        }
    }
}

/// The running mean's storage, lent to the op on the variance.
enum Lent<'a> {
    Cpu(&'a mut CpuStorage, (usize, usize)),
    #[cfg(feature = "cuda")]
    Cuda(&'a mut candle_core::CudaStorage, Layout),
}

/// The op on the running mean: lends it to [`WithMean`] on the variance.
struct OnMean<'a> {
    update: Update,
    var: &'a Tensor,
}

/// The op on the running variance, with the running mean beside it: the update.
struct WithMean<'a> {
    update: &'a Update,
    mean: RefCell<Lent<'a>>,
}

impl InplaceOp1 for OnMean<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-running-update"
    }

    fn cpu_fwd(&self, mean: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the running mean must be contiguous", self.name());
        };
        let mean = RefCell::new(Lent::Cpu(mean, range));
        self.var.inplace_op1(&WithMean {
            update: &self.update,
            mean,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, mean: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        let mean = RefCell::new(Lent::Cuda(mean, layout.clone()));
        self.var.inplace_op1(&WithMean {
            update: &self.update,
            mean,
        })
    }
}

impl InplaceOp1 for WithMean<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-running-update"
    }

    fn cpu_fwd(&self, var: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let op = self.name();
        let (Some((lo, hi)), Lent::Cpu(mean, (m0, m1))) = (layout.contiguous_offsets(), &mut *self.mean.borrow_mut())
        else {
            candle_core::bail!("{op}: contiguous running statistics on the CPU only");
        };
        let (stats, stats_layout) = self.update.stats.tensor.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F64(stats)) = &*stats else {
            candle_core::bail!("{op}: the statistics must be f64 on the CPU");
        };
        let stats = crate::contiguous(stats, stats_layout, op)?;
        if stats.len() != 2 * (hi - lo) || *m1 - *m0 != hi - lo {
            candle_core::bail!("{op}: {} statistics for {} channels", stats.len(), hi - lo);
        }
        crate::ledger::launched(1); // as CUDA's one kernel
        match (&mut **mean, var) {
            (CpuStorage::F32(m), CpuStorage::F32(v)) => self.update.run(&mut m[*m0..*m1], &mut v[lo..hi], stats),
            (CpuStorage::F64(m), CpuStorage::F64(v)) => self.update.run(&mut m[*m0..*m1], &mut v[lo..hi], stats),
            _ => candle_core::bail!("{op}: f32 or f64 running statistics, both of one dtype"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, var: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        let Lent::Cuda(mean, mean_layout) = &mut *self.mean.borrow_mut() else {
            candle_core::bail!("{}: the running mean is not on CUDA", self.name());
        };
        let (stats, _) = self.update.stats.tensor.storage_and_layout();
        let stats = super::cuda::stats_of(&stats)?;
        let u = &self.update;
        super::cuda::running_update([(mean, mean_layout), (var, layout)], stats, u.unbiased(), u.momentum)
    }
}

/// Moves the running `mean` and `var` towards the batch statistics `stats`,
/// with `momentum`, in place: one launch.
pub fn update_running(mean: &Tensor, var: &Tensor, stats: &SavedStats, momentum: f64) -> Result<()> {
    let update = Update {
        momentum,
        stats: stats.clone(),
    };
    mean.inplace_op1(&OnMean { update, var })
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::testing::random;

    /// The update as candle's tensor ops computed it before this op existed.
    fn by_tensor_ops(mean: &Tensor, var: &Tensor, stats: &SavedStats, m: f64) -> (Tensor, Tensor) {
        let unbiased = stats.count as f64 / (stats.count as f64 - 1.0);
        let batch_mean = stats.tensor.get(0).unwrap().to_dtype(mean.dtype()).unwrap();
        let batch_var = (stats.tensor.get(1).unwrap().to_dtype(mean.dtype()).unwrap() * unbiased).unwrap();
        let step = |r: &Tensor, s: Tensor| ((r * (1.0 - m)).unwrap() + (s * m).unwrap()).unwrap();
        (step(mean, batch_mean), step(var, batch_var))
    }

    #[test]
    fn one_op_gives_the_bits_of_the_tensor_ops() {
        for dtype in [DType::F32, DType::F64] {
            let stats = SavedStats {
                host: None,
                tensor: (random(&[2, 37], 1).abs().unwrap() * 3.0).unwrap(),
                count: 96,
            };
            let mean = random(&[37], 2).to_dtype(dtype).unwrap();
            let var = (random(&[37], 3).abs().unwrap() + 0.5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (want_mean, want_var) = by_tensor_ops(&mean, &var, &stats, 0.1);
            let ((), ledger) = crate::ledger::counting(|| update_running(&mean, &var, &stats, 0.1).unwrap());
            assert_eq!(ledger.launches, 1);
            let bits = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(bits(&mean), bits(&want_mean), "{dtype:?} mean");
            assert_eq!(bits(&var), bits(&want_var), "{dtype:?} var");
        }
    }
}
