//! Test support for the ops and the layers built on them (the `testing`
//! feature): deterministic random tensors, non-finite inputs, and a check that
//! the fused and the generic kernels of an op agree.

use candle_core::{Device, Result, Tensor, Var};

use crate::Kernels;

/// Uniform values in [-1, 1) as f64, from a seeded linear congruential stream.
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `random(shape)` with NaN, +inf and -inf planted at three positions.
pub fn poisoned(shape: &[usize], seed: u64) -> Tensor {
    let mut v = values(&random(shape, seed));
    let n = v.len();
    v[n / 7] = f64::NAN;
    v[n / 2] = f64::INFINITY;
    v[n - 3] = f64::NEG_INFINITY;
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The values of an f64 tensor, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Asserts equal value for value, NaN equal to NaN.
pub fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let same = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-12 * x.abs().max(1.0);
        assert!(same, "{what}: element {i}: {x} vs {y}");
    }
}

/// Runs `op` with both kernels on a poisoned input (as a variable) and asserts
/// that outputs and input gradients agree (where the fused op has a backward:
/// eval-mode batch norm has none) and that the NaN survives; returns the fused
/// output.
pub fn both_kernels_agree(shape: &[usize], op: impl Fn(Kernels, &Tensor) -> Result<Tensor>, what: &str) -> Tensor {
    let x = Var::from_tensor(&poisoned(shape, 3)).unwrap();
    let mut out = Vec::new();
    for k in [Kernels::Fused, Kernels::Generic] {
        let y = op(k, x.as_tensor()).unwrap();
        let g = random(y.dims(), 9);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        out.push((y, grads.get(x.as_tensor()).cloned()));
    }
    assert_same(&out[0].0, &out[1].0, &format!("{what} forward"));
    if let (Some(a), Some(b)) = (&out[0].1, &out[1].1) {
        assert_same(a, b, &format!("{what} backward"));
    }
    assert!(values(&out[0].0).iter().any(|v| v.is_nan()), "{what}: the NaN is gone");
    out.swap_remove(0).0
}
