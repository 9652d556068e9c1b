//! 2-D max and average pooling with padding, forward and backward, as PyTorch
//! computes them (floor mode; average pooling counts padded zeros). candle 0.11's
//! own pooling has no padding and a wrong or refused backward for overlapping
//! windows, which is exactly the stem max-pool and Res2Net's average pools.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Window geometry shared by both pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Window {
    /// Output length for an input length `n` (floor mode).
    pub fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// The input range `[start, end)` that output `o` covers, clipped to the input,
    /// and the window length counting padding (PyTorch's `count_include_pad`).
    fn span(&self, o: usize, n: usize) -> (usize, usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end = start + self.kernel as isize;
        let padded_end = end.min((n + self.padding) as isize);
        let with_pad = (padded_end - start) as usize;
        (start.max(0) as usize, end.min(n as isize) as usize, with_pad)
    }
}

fn dims4(layout: &Layout, op: &str) -> Result<(usize, usize, usize, usize)> {
    match layout.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => candle_core::bail!("{op}: expected an NCHW tensor, got shape {d:?}"),
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on f32 or f64 storage.
macro_rules! float_dispatch {
    ($storage:expr, $op:expr, |$data:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32($data) => CpuStorage::F32($body),
            CpuStorage::F64($data) => CpuStorage::F64($body),
            _ => candle_core::bail!("{}: only f32 and f64 are supported", $op),
        }
    };
}

/// Index of the maximum of one window: the first maximum in row-major order, NaN
/// winning, as PyTorch picks it.
fn window_argmax<T: Float>(plane: &[T], w: usize, ys: (usize, usize), xs: (usize, usize)) -> usize {
    let mut best = T::neg_infinity();
    let mut at = ys.0 * w + xs.0;
    for y in ys.0..ys.1 {
        for x in xs.0..xs.1 {
            let v = plane[y * w + x];
            if v > best || v.is_nan() {
                best = v;
                at = y * w + x;
            }
        }
    }
    at
}

/// Max pooling: `x.apply_op1(MaxPool2d(window))`.
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d(pub Window);

impl MaxPool2d {
    fn forward<T: Float + Send + Sync>(&self, x: &[T], (n, c, h, w): (usize, usize, usize, usize)) -> Vec<T> {
        let win = self.0;
        let (oh, ow) = (win.out_len(h), win.out_len(w));
        let mut out = vec![T::zero(); n * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                for oy in 0..oh {
                    let (y0, y1, _) = win.span(oy, h);
                    for ox in 0..ow {
                        let (x0, x1, _) = win.span(ox, w);
                        o[oy * ow + ox] = plane[window_argmax(plane, w, (y0, y1), (x0, x1))];
                    }
                }
            });
        out
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(layout, self.name())?;
        let out = float_dispatch!(storage, self.name(), |d| self
            .forward(contiguous(d, layout, self.name())?, (n, c, h, w)));
        Ok((out, Shape::from((n, c, self.0.out_len(h), self.0.out_len(w)))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2dBackward(self.0))?;
        Ok(Some(grad))
    }
}

/// The gradient of max pooling: routes each output gradient to its window's argmax.
/// Arguments: (input, output gradient).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2dBackward(pub Window);

impl MaxPool2dBackward {
    fn backward<T: Float + Send + Sync>(&self, x: &[T], g: &[T], (n, c, h, w): (usize, usize, usize, usize)) -> Vec<T> {
        let win = self.0;
        let (oh, ow) = (win.out_len(h), win.out_len(w));
        let mut out = vec![T::zero(); n * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .zip(g.par_chunks(oh * ow))
            .for_each(|((gi, plane), go)| {
                for oy in 0..oh {
                    let (y0, y1, _) = win.span(oy, h);
                    for ox in 0..ow {
                        let (x0, x1, _) = win.span(ox, w);
                        let at = window_argmax(plane, w, (y0, y1), (x0, x1));
                        gi[at] = gi[at] + go[oy * ow + ox];
                    }
                }
            });
        out
    }
}

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = dims4(l1, self.name())?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(self.backward(contiguous(x, l1, self.name())?, contiguous(g, l2, self.name())?, dims))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(self.backward(contiguous(x, l1, self.name())?, contiguous(g, l2, self.name())?, dims))
            }
            _ => candle_core::bail!("{}: f32 or f64 tensors of one dtype expected", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Average pooling counting padded zeros (PyTorch's default `count_include_pad`).
#[derive(Debug, Clone, Copy)]
pub struct AvgPool2d(pub Window);

impl AvgPool2d {
    fn forward<T: Float + Send + Sync>(&self, x: &[T], (n, c, h, w): (usize, usize, usize, usize)) -> Vec<T> {
        let win = self.0;
        let (oh, ow) = (win.out_len(h), win.out_len(w));
        let mut out = vec![T::zero(); n * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                for oy in 0..oh {
                    let (y0, y1, py) = win.span(oy, h);
                    for ox in 0..ow {
                        let (x0, x1, px) = win.span(ox, w);
                        let mut sum = T::zero();
                        for y in y0..y1 {
                            for x in x0..x1 {
                                sum = sum + plane[y * w + x];
                            }
                        }
                        o[oy * ow + ox] = sum / T::from(py * px).unwrap();
                    }
                }
            });
        out
    }
}

impl CustomOp1 for AvgPool2d {
    fn name(&self) -> &'static str {
        "avg-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(layout, self.name())?;
        let out = float_dispatch!(storage, self.name(), |d| self
            .forward(contiguous(d, layout, self.name())?, (n, c, h, w)));
        Ok((out, Shape::from((n, c, self.0.out_len(h), self.0.out_len(w)))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let grad = grad_res.contiguous()?.apply_op1_no_bwd(&AvgPool2dBackward {
            window: self.0,
            input_hw: (h, w),
        })?;
        Ok(Some(grad))
    }
}

/// The gradient of [`AvgPool2d`]: spreads each output gradient evenly over its window.
#[derive(Debug, Clone, Copy)]
pub struct AvgPool2dBackward {
    pub window: Window,
    pub input_hw: (usize, usize),
}

impl AvgPool2dBackward {
    fn backward<T: Float + Send + Sync>(&self, g: &[T], (n, c, oh, ow): (usize, usize, usize, usize)) -> Vec<T> {
        let (win, (h, w)) = (self.window, self.input_hw);
        let mut out = vec![T::zero(); n * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .for_each(|(gi, go)| {
                for oy in 0..oh {
                    let (y0, y1, py) = win.span(oy, h);
                    for ox in 0..ow {
                        let (x0, x1, px) = win.span(ox, w);
                        let share = go[oy * ow + ox] / T::from(py * px).unwrap();
                        for y in y0..y1 {
                            for x in x0..x1 {
                                gi[y * w + x] = gi[y * w + x] + share;
                            }
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp1 for AvgPool2dBackward {
    fn name(&self) -> &'static str {
        "avg-pool2d-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, oh, ow) = dims4(layout, self.name())?;
        let out = float_dispatch!(storage, self.name(), |d| self
            .backward(contiguous(d, layout, self.name())?, (n, c, oh, ow)));
        Ok((out, Shape::from((n, c, self.input_hw.0, self.input_hw.1))))
    }
}

/// `max_pool2d` with padding (PyTorch semantics) and a correct backward.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool2d(Window {
        kernel,
        stride,
        padding,
    }))
}

/// `avg_pool2d` with padding, counting padded zeros, with a correct backward.
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(AvgPool2d(Window {
        kernel,
        stride,
        padding,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
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

    /// d(sum(pool(x) * g))/dx by central differences against the op's backward.
    fn check_gradient(pool: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize]) {
        let x = Var::from_tensor(&random(shape, 1)).unwrap();
        let y = pool(x.as_tensor()).unwrap();
        let g = random(y.dims(), 2);
        let loss = (&y * &g).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let analytic: Vec<f64> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
                (pool(&t).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!(
                (numeric - analytic[i]).abs() < 1e-6,
                "element {i}: {numeric} vs {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn max_pool_gradient_matches_finite_differences() {
        check_gradient(|x| max_pool2d(x, 3, 2, 1), &[2, 3, 7, 6]);
        check_gradient(|x| max_pool2d(x, 2, 2, 0), &[1, 2, 4, 4]);
    }

    #[test]
    fn avg_pool_gradient_matches_finite_differences() {
        check_gradient(|x| avg_pool2d(x, 3, 2, 1), &[2, 3, 7, 6]);
        check_gradient(|x| avg_pool2d(x, 3, 1, 1), &[1, 2, 5, 4]);
    }

    #[test]
    fn pools_match_candle_where_candle_is_right() {
        // Without padding and with kernel == stride candle's forward is correct.
        let x = random(&[2, 3, 8, 6], 3).to_dtype(DType::F32).unwrap();
        let ours = max_pool2d(&x, 2, 2, 0).unwrap();
        let theirs = x.max_pool2d(2).unwrap();
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let ours = avg_pool2d(&x, 2, 2, 0).unwrap();
        let theirs = x.avg_pool2d(2).unwrap();
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
    }

    #[test]
    fn padding_is_minus_infinity_for_max_and_counted_zero_for_average() {
        let x = Tensor::from_vec(vec![-1.0f64, -2.0, -3.0, -4.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let m: Vec<f64> = max_pool2d(&x, 3, 2, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(m, vec![-1.0]);
        let a: Vec<f64> = avg_pool2d(&x, 3, 2, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((a[0] - (-10.0 / 9.0)).abs() < 1e-12);
        // Ties go to the first position in row-major order, as in PyTorch.
        let z = Var::from_tensor(&Tensor::zeros((1, 1, 2, 2), DType::F64, &Device::Cpu).unwrap()).unwrap();
        let g = max_pool2d(z.as_tensor(), 3, 2, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gz: Vec<f64> = g.get(z.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(gz, vec![1.0, 0.0, 0.0, 0.0]);
    }
}
