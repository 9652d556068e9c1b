//! Finding the first tensor that holds a NaN or an infinity, cheaply enough to run
//! after every step: a parallel scan of the values on the CPU, one reduction per
//! tensor and a single transfer on other devices.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Values per chunk of [`first_non_finite_in`]: a chunk is tested in one
/// branch-free pass, and only a chunk that fails is searched value by value.
const SCAN_CHUNK: usize = 4096;

/// Tensors with more values than this are scanned on rayon's pool; smaller ones
/// (most parameters) on the calling thread, where a parallel call costs more than
/// the scan.
const PARALLEL_SCAN: usize = 1 << 18;

/// The first value of `v` that is NaN or infinite.
fn first_non_finite_in<T: Copy + Into<f64> + Sync>(v: &[T]) -> Option<f64> {
    let first_in = |c: &[T]| -> Option<f64> {
        // `|` (not a short-circuit) keeps the test a vector loop.
        let bad = c.iter().fold(false, |bad, &x| bad | !x.into().is_finite());
        bad.then(|| c.iter().map(|&x| x.into()).find(|x| !x.is_finite()))
            .flatten()
    };
    if v.len() > PARALLEL_SCAN {
        v.par_chunks(SCAN_CHUNK).find_map_first(first_in)
    } else {
        v.chunks(SCAN_CHUNK).find_map(first_in)
    }
}

/// The first non-finite value of a contiguous f32 or f64 CPU tensor (`Some(None)`
/// when all are finite); `None` when the tensor is not of that kind.
fn scan_cpu(t: &Tensor) -> Option<Option<f64>> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(first_non_finite_in(&v[start..end])),
        Storage::Cpu(CpuStorage::F64(v)) => Some(first_non_finite_in(&v[start..end])),
        _ => None,
    }
}

/// The first of `tensors` (name, tensor) holding a NaN or an infinity, with such a
/// value (NaN when only the device-side sum is known).
pub fn first_non_finite<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<Option<(String, f64)>> {
    let mut elsewhere: Vec<(&str, Tensor)> = Vec::new();
    for (name, t) in tensors {
        match scan_cpu(t) {
            Some(Some(v)) => return Ok(Some((name.to_string(), v))),
            Some(None) => {}
            // 0 * x is 0 for every finite x and NaN otherwise, so the sum is 0
            // exactly when every value is finite (it cannot overflow).
            None => elsewhere.push((name, t.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F32)?)),
        }
    }
    if elsewhere.is_empty() {
        return Ok(None);
    }
    let sums: Vec<&Tensor> = elsewhere.iter().map(|(_, s)| s).collect();
    let sums: Vec<f32> = reid_ops::ledger::read(&Tensor::stack(&sums, 0)?)?;
    Ok(elsewhere
        .iter()
        .zip(sums)
        .find(|(_, s)| *s != 0.0)
        .map(|((name, _), s)| (name.to_string(), s as f64)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_nan_and_infinity_in_any_dtype_and_layout() {
        let ok = Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let nan = Tensor::new(&[1.0f64, f64::NAN], &Device::Cpu).unwrap();
        let inf = Tensor::new(&[[1.0f32, f32::NEG_INFINITY], [0.0, 1.0]], &Device::Cpu).unwrap();
        let transposed = inf.t().unwrap();
        let half = ok.to_dtype(DType::BF16).unwrap();
        assert_eq!(first_non_finite([("a", &ok), ("h", &half)]).unwrap(), None);
        let (name, v) = first_non_finite([("a", &ok), ("b", &nan), ("c", &inf)])
            .unwrap()
            .unwrap();
        assert!(name == "b" && v.is_nan());
        assert_eq!(
            first_non_finite([("c", &inf)]).unwrap(),
            Some(("c".to_string(), f64::NEG_INFINITY))
        );
        let (name, v) = first_non_finite([("a", &ok), ("t", &transposed)]).unwrap().unwrap();
        assert!(name == "t" && v.is_nan(), "found through the reduction");
    }

    #[test]
    fn finds_the_first_bad_value_in_small_and_large_tensors() {
        for len in [1, SCAN_CHUNK + 3, PARALLEL_SCAN + 5 * SCAN_CHUNK + 7] {
            let mut v = vec![0.5f32; len];
            assert_eq!(first_non_finite_in(&v), None, "len {len}");
            v[len - 1] = f32::NEG_INFINITY;
            assert_eq!(first_non_finite_in(&v), Some(f64::NEG_INFINITY), "len {len}");
            v[len / 2] = f32::INFINITY;
            assert_eq!(first_non_finite_in(&v), Some(f64::INFINITY), "len {len}: the first one");
            v[len / 3] = f32::NAN;
            assert!(first_non_finite_in(&v).unwrap().is_nan(), "len {len}");
        }
    }
}
