//! bf16 activations on the CPU: each op whose operands include bf16 reads them
//! widened to f32, computes as its f32 kernel does, and rounds its result back
//! to bf16 (to nearest even) where the result is an activation. This is what
//! the CUDA kernels do with bf16 (read, compute in f32 or f64, write), so the
//! CPU and CUDA give the same values up to summation order. Weights, batch
//! statistics and the gradients of f32 parameters stay f32.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use half::bf16;

/// Whether any of `storages` holds bf16 (and so the op runs widened).
pub fn any_bf16(storages: &[&CpuStorage]) -> bool {
    storages.iter().any(|s| matches!(s, CpuStorage::BF16(_)))
}

/// bf16 `values` widened to f32 (exactly).
pub fn to_f32(values: &[bf16]) -> Vec<f32> {
    values.iter().map(|x| x.to_f32()).collect()
}

/// The contiguous values of an f32 or bf16 storage as f32 (bf16 widened, f32
/// borrowed); an error naming `op` for another dtype.
pub fn widened<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<Cow<'a, [f32]>> {
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(crate::contiguous(v, layout, op)?),
        CpuStorage::BF16(v) => Cow::Owned(to_f32(crate::contiguous(v, layout, op)?)),
        other => candle_core::bail!("{op}: {:?} with bf16 operands (f32 and bf16 only)", other.dtype()),
    })
}

/// `values` as a storage: rounded to bf16 where `bf16`, kept as f32 otherwise.
pub fn narrowed(values: Vec<f32>, bf16: bool) -> CpuStorage {
    match bf16 {
        true => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        false => CpuStorage::F32(values),
    }
}

/// `values` as a storage of `like`'s dtype: rounded to bf16 where `like` is
/// bf16, kept as f32 otherwise.
pub fn narrowed_like(like: &CpuStorage, values: Vec<f32>) -> CpuStorage {
    narrowed(values, matches!(like, CpuStorage::BF16(_)))
}

/// Writes each of `values` into `copy`, rounded to bf16 (to nearest even).
pub fn round_into(copy: &mut [bf16], values: &[f32]) {
    for (c, &v) in copy.iter_mut().zip(values) {
        *c = bf16::from_f32(v);
    }
}

/// Rewrites `copy` (bf16) from `weight` (f32), each value rounded to nearest
/// even: one launch on CUDA, counted as a cast. The model runs it when it sets
/// its weights, and the optimiser after an update by tensor operations (its
/// in-place update writes the copy itself).
pub fn write_bf16_copy(copy: &candle_core::Tensor, weight: &candle_core::Tensor) -> Result<()> {
    if (copy.dtype(), weight.dtype()) != (candle_core::DType::BF16, candle_core::DType::F32) {
        candle_core::bail!("bf16 copy: a bf16 copy of an f32 weight expected");
    }
    if copy.dims() != weight.dims() {
        candle_core::bail!("bf16 copy: shapes {:?} and {:?} differ", copy.dims(), weight.dims());
    }
    crate::ledger::cast_in_place();
    copy.inplace_op2(weight, &WriteCopy)
}

/// The op of [`write_bf16_copy`], run on the copy.
struct WriteCopy;

impl candle_core::InplaceOp2 for WriteCopy {
    fn name(&self) -> &'static str {
        "bf16-copy"
    }

    fn cpu_fwd(&self, copy: &mut CpuStorage, cl: &Layout, weight: &CpuStorage, wl: &Layout) -> Result<()> {
        let (CpuStorage::BF16(c), CpuStorage::F32(w)) = (copy, weight) else {
            candle_core::bail!("bf16-copy: a bf16 copy of an f32 weight expected");
        };
        let Some((c0, c1)) = cl.contiguous_offsets() else {
            candle_core::bail!("bf16-copy: the copy must be contiguous");
        };
        round_into(&mut c[c0..c1], crate::contiguous(w, wl, "bf16-copy")?);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        copy: &mut candle_core::CudaStorage,
        cl: &Layout,
        weight: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<()> {
        crate::sgd_cuda::write_bf16_copy((copy, cl), (weight, wl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_and_narrowing_rounds_to_nearest_even() {
        let v = vec![bf16::from_f32(1.5), bf16::from_f32(-3.0)];
        let s = CpuStorage::BF16(v);
        let l = Layout::contiguous(2);
        assert_eq!(&*widened(&s, &l, "t").unwrap(), &[1.5, -3.0]);
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even one.
        let CpuStorage::BF16(r) = narrowed_like(&s, vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]) else {
            panic!("bf16 expected")
        };
        assert_eq!(r, vec![bf16::from_f32(1.0), bf16::from_f32(1.0 + 4.0 / 256.0)]);
        assert!(matches!(
            narrowed_like(&CpuStorage::F32(vec![]), vec![1.0]),
            CpuStorage::F32(_)
        ));
        assert!(widened(&CpuStorage::F64(vec![1.0]), &Layout::contiguous(1), "t").is_err());
    }
}
