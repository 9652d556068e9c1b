//! Each fused kernel against the generic composition of the same op, on the
//! device, in f32: forward values and the gradients of every input, on fixed and
//! seeded random shapes. Where a device has no fused kernel for an op, the check
//! says so (both sides are then the generic op).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reid_model::layers::{Activation, BatchNorm};
use reid_ops::pool::Window;
use reid_ops::{channels, conv, pool, residual, Exec, Kernels, OpKind};

use crate::{Check, Result};

/// Largest error allowed, relative to the largest magnitude of the generic result.
const TOLERANCE: f64 = 1e-4;

fn uniform(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// max |a - b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let m = b
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(d / m.max(1e-30))
}

/// The output and input gradients of `op` with `kernels` on variables of `shapes`.
fn run_op(
    kernels: Kernels,
    shapes: &[Vec<usize>],
    device: &Device,
    op: &dyn Fn(Kernels, &[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Ok(Var::from_tensor(&uniform(s, 10 + i as u64, device)?)?))
        .collect::<Result<_>>()?;
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(kernels, &inputs)?;
    let g = uniform(y.dims(), 99, device)?;
    let grads = (&y * &g)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for v in &vars {
        out.push(grads.get(v.as_tensor()).cloned().unwrap_or(v.zeros_like()?));
    }
    Ok(out)
}

/// Compares `op` fused against generic; `fused` tells whether the device has a
/// fused kernel for it.
fn check(
    name: String,
    fused: bool,
    shapes: &[Vec<usize>],
    device: &Device,
    op: &dyn Fn(Kernels, &[Tensor]) -> candle_core::Result<Tensor>,
) -> Check {
    let result = (|| -> Result<f64> {
        // Without a fused kernel on this device, both sides run the generic op
        // (asking for the fused one would be an error, not a check).
        let kernels = if fused { Kernels::Fused } else { Kernels::Generic };
        let a = run_op(kernels, shapes, device, op)?;
        let b = run_op(Kernels::Generic, shapes, device, op)?;
        a.iter()
            .zip(&b)
            .map(|(x, y)| relative(x, y))
            .try_fold(0.0, |m, r| Ok(f64::max(m, r?)))
    })();
    match result {
        Err(e) => Check::failed(name, &e.to_string()),
        Ok(err) => Check {
            name,
            passed: err <= TOLERANCE,
            detail: match fused {
                true => format!("max relative difference {err:.2e} (bound {TOLERANCE:.0e}), output and gradients"),
                false => "no fused kernel on this device: generic on both sides".into(),
            },
        },
    }
}

/// Seeded random convolution shapes: (n, c, h, w, o, k, stride, padding).
fn conv_shapes() -> Vec<[usize; 8]> {
    let mut shapes = vec![
        [2, 3, 64, 32, 16, 7, 2, 3],
        [2, 13, 16, 8, 13, 3, 1, 1],
        [2, 26, 16, 8, 26, 3, 2, 1],
        [2, 64, 8, 4, 32, 1, 1, 0],
        [2, 32, 8, 4, 64, 1, 2, 0],
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..3 {
        let k = [1, 3, 5][rng.gen_range(0..3)];
        let h = rng.gen_range(k.max(4)..20);
        let c = rng.gen_range(1..20);
        shapes.push([
            rng.gen_range(1..4),
            c,
            h,
            rng.gen_range(k.max(4)..20),
            rng.gen_range(1..24),
            k,
            rng.gen_range(1..3),
            k / 2,
        ]);
    }
    shapes
}

/// A train-mode batch norm (+ ReLU) on fresh variables of `channels`.
fn batch_norm(kernels: Kernels, x: &Tensor, then: Activation) -> candle_core::Result<Tensor> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, x.dtype(), x.device());
    let bn = BatchNorm::new(x.dim(1)?, Exec::default(), vb)?;
    bn.forward_with(kernels, x, true, then)
}

/// Every op check on `device`.
pub fn op_checks(device: &Device) -> Result<Vec<Check>> {
    let cpu = device.is_cpu();
    let fused = |op| Exec::default().kernels_on(op, device, DType::F32) == Kernels::Fused;
    let conv_fused = fused(OpKind::Conv);
    let mut checks = Vec::new();
    for [n, c, h, w, o, k, s, p] in conv_shapes() {
        let name = format!("conv2d {n}x{c}x{h}x{w} -> {o}, {k}x{k}/{s} pad {p}");
        let shapes = [vec![n, c, h, w], vec![o, c, k, k]];
        checks.push(check(name, conv_fused, &shapes, device, &|kn, t| {
            conv::conv2d_with(kn, &t[0], &t[1], s, p)
        }));
    }
    let x = vec![2, 8, 15, 9];
    let one = std::slice::from_ref(&x);
    for (kernel, stride) in [(3, 2), (3, 1)] {
        let win = Window {
            kernel,
            stride,
            padding: 1,
        };
        let max = move |kn, t: &[Tensor]| pool::max_pool2d_with(kn, &t[0], win);
        let avg = move |kn, t: &[Tensor]| pool::avg_pool2d_with(kn, &t[0], win);
        let pool_fused = fused(OpKind::Pool);
        checks.push(check(format!("max_pool2d 3x3/{stride}"), pool_fused, one, device, &max));
        checks.push(check(format!("avg_pool2d 3x3/{stride}"), pool_fused, one, device, &avg));
    }
    let add = |kn, t: &[Tensor]| residual::add_relu_with(kn, &t[0], &t[1]);
    let add_fused = fused(OpKind::AddRelu);
    checks.push(check(
        "add_relu".into(),
        add_fused,
        &[x.clone(), x.clone()],
        device,
        &add,
    ));
    let slice = |kn, t: &[Tensor]| channels::channel_slice_with(kn, &t[0], 2, 5);
    checks.push(check("channel_slice".into(), cpu, one, device, &slice));
    let bn_fused = fused(OpKind::BatchNorm);
    for (relu, then) in [(false, Activation::Identity), (true, Activation::Relu)] {
        let bn = move |kn, t: &[Tensor]| batch_norm(kn, &t[0], then);
        checks.push(check(
            format!("batch_norm train relu={relu}"),
            bn_fused,
            one,
            device,
            &bn,
        ));
    }
    Ok(checks)
}
