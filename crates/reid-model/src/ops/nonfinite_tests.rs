//! NaN and infinities through every op, fused and generic, forward and backward:
//! both must give what PyTorch's unfused ops give (a NaN is never turned into a
//! number), and the two implementations must agree value for value.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::pool::Window;
use super::test_tensors::random;
use super::Kernels;
use crate::layers::BatchNorm;

/// `random(shape)` with NaN, +inf and -inf planted at three positions.
fn poisoned(shape: &[usize], seed: u64) -> Tensor {
    let mut v: Vec<f64> = random(shape, seed).flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len();
    v[n / 7] = f64::NAN;
    v[n / 2] = f64::INFINITY;
    v[n - 3] = f64::NEG_INFINITY;
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Equal value for value, NaN equal to NaN.
fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let same = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-12 * x.abs().max(1.0);
        assert!(same, "{what}: element {i}: {x} vs {y}");
    }
}

/// Runs `op` with both kernels on a poisoned input (as a variable) and compares
/// outputs and input gradients (where the fused op has a backward: eval-mode
/// batch norm has none); returns the fused output.
fn both(shape: &[usize], op: impl Fn(Kernels, &Tensor) -> Result<Tensor>, what: &str) -> Tensor {
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

#[test]
fn add_relu_keeps_nan_and_clamps_minus_infinity() {
    let b = random(&[2, 3, 4, 5], 4);
    let y = both(
        &[2, 3, 4, 5],
        |k, x| super::residual::add_relu_with(k, x, &b),
        "add_relu",
    );
    let v = values(&y);
    let n = v.len();
    assert!(v[n / 7].is_nan() && v[n / 2] == f64::INFINITY && v[n - 3] == 0.0);
}

#[test]
fn pools_convolution_and_channel_slices_propagate_non_finite_values() {
    let w = Window {
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    both(&[2, 3, 7, 6], |k, x| super::pool::max_pool2d_with(k, x, w), "max_pool");
    both(&[2, 3, 7, 6], |k, x| super::pool::avg_pool2d_with(k, x, w), "avg_pool");
    let weight = random(&[4, 3, 3, 3], 5);
    both(
        &[2, 3, 7, 6],
        |k, x| super::conv::conv2d_with(k, x, &weight, 2, 1),
        "conv2d",
    );
    both(
        &[2, 5, 4, 3],
        |k, x| super::channels::channel_slice_with(k, x, 0, 5),
        "channel_slice",
    );
}

fn batch_norm(channels: usize) -> (VarMap, BatchNorm) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let bn = BatchNorm::new(channels, vb).unwrap();
    (varmap, bn)
}

#[test]
fn batch_norm_spreads_a_nan_over_its_channel_in_training_and_not_in_eval() {
    let shape = [2, 4, 3, 3];
    for relu in [false, true] {
        for train in [true, false] {
            let y = both(
                &shape,
                |k, x| {
                    let (_, bn) = batch_norm(4);
                    bn.forward_with(k, x, train, relu)
                },
                "batch_norm",
            );
            let v = values(&y);
            let nan_channels: std::collections::BTreeSet<usize> =
                (0..v.len()).filter(|&i| v[i].is_nan()).map(|i| (i / 9) % 4).collect();
            assert_eq!(
                nan_channels.len(),
                if train { 3 } else { 1 },
                "train {train} relu {relu}"
            );
        }
    }
}

#[test]
fn the_generic_batch_norm_matches_the_fused_one_in_training() {
    let x = Var::from_tensor(&random(&[3, 5, 4, 4], 7)).unwrap();
    let mut results = Vec::new();
    for k in [Kernels::Fused, Kernels::Generic] {
        let (varmap, bn) = batch_norm(5);
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name == "weight" || name == "bias" {
                var.set(&random(&[5], name.len() as u64)).unwrap();
            }
        }
        let y = bn.forward_with(k, x.as_tensor(), true, true).unwrap();
        let g = random(y.dims(), 8);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let vars = varmap.data().lock().unwrap().clone();
        let (rm, rv) = bn.running_stats();
        results.push(vec![
            y.clone(),
            rm.clone(),
            rv.clone(),
            grads.get(x.as_tensor()).unwrap().clone(),
            grads.get(vars["weight"].as_tensor()).unwrap().clone(),
            grads.get(vars["bias"].as_tensor()).unwrap().clone(),
        ]);
    }
    let names = [
        "output",
        "running mean",
        "running var",
        "grad x",
        "grad weight",
        "grad bias",
    ];
    for (i, name) in names.iter().enumerate() {
        let d = values(&(&results[0][i] - &results[1][i]).unwrap().abs().unwrap())
            .into_iter()
            .fold(0.0, f64::max);
        assert!(d < 1e-12, "{name}: {d}");
    }
}
