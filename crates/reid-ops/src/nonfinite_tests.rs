//! NaN and infinities through the ops, fused and generic, forward and backward:
//! both must give what PyTorch's unfused ops give (a NaN is never turned into a
//! number), and the two implementations must agree value for value. Batch
//! norm's cases are the layer's, in reid-model's tests.

use crate::pool::Window;
use crate::testing::{both_kernels_agree, random, values};

#[test]
fn add_relu_keeps_nan_and_clamps_minus_infinity() {
    let b = random(&[2, 3, 4, 5], 4);
    let y = both_kernels_agree(
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
    both_kernels_agree(&[2, 3, 7, 6], |k, x| super::pool::max_pool2d_with(k, x, w), "max_pool");
    both_kernels_agree(&[2, 3, 7, 6], |k, x| super::pool::avg_pool2d_with(k, x, w), "avg_pool");
    let weight = random(&[4, 3, 3, 3], 5);
    both_kernels_agree(
        &[2, 3, 7, 6],
        |k, x| super::conv::conv2d_with(k, x, &weight, 2, 1),
        "conv2d",
    );
    both_kernels_agree(
        &[2, 5, 4, 3],
        |k, x| super::channels::channel_slice_with(k, x, 0, 5),
        "channel_slice",
    );
}
