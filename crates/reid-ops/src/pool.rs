//! 2-D max and average pooling with padding, forward and backward, as PyTorch
//! computes them (floor mode; average pooling counts padded zeros). candle 0.11's
//! own pooling has no padding and a wrong or refused backward for overlapping
//! windows, which is exactly the stem max-pool and Res2Net's average pools.

use crate::ledger::CountedContiguous;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::{contiguous, dims4, Exec, Kernels, OpKind};
use crate::tape::{self, Reads};

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

/// Index of the maximum of one window: the first maximum in row-major order, as
/// PyTorch picks it; a NaN wins (the first one, where PyTorch takes the last).
fn window_argmax<T: Float>(plane: &[T], w: usize, ys: (usize, usize), xs: (usize, usize)) -> usize {
    let mut best = T::neg_infinity();
    let mut at = ys.0 * w + xs.0;
    for y in ys.0..ys.1 {
        for x in xs.0..xs.1 {
            let v = plane[y * w + x];
            if v.is_nan() {
                return y * w + x;
            }
            if v > best {
                best = v;
                at = y * w + x;
            }
        }
    }
    at
}

/// Max pooling of one plane `x` [H, W] into `out` and `at` [OH, OW], window by
/// window.
fn max_pool_plane<T: Float>(x: &[T], (h, w): (usize, usize), win: Window, out: &mut [T], at: &mut [u32]) {
    let (oh, ow) = (win.out_len(h), win.out_len(w));
    for oy in 0..oh {
        let (y0, y1, _) = win.span(oy, h);
        for ox in 0..ow {
            let (x0, x1, _) = win.span(ox, w);
            let i = window_argmax(x, w, (y0, y1), (x0, x1));
            out[oy * ow + ox] = x[i];
            at[oy * ow + ox] = i as u32;
        }
    }
}

/// [`max_pool_plane`] for stride 2 (the stem's pool), a row of outputs at a
/// time: each window position updates every output of the row, a loop that
/// compiles to vector compares and blends instead of a mispredicted branch per
/// value. Each input row is copied into a buffer padded with -inf, which never
/// wins, so the result is [`window_argmax`]'s: the first maximum in row-major
/// order, or the first NaN.
#[inline(always)]
fn max_pool_plane_stride2<T: Float>(x: &[T], (h, w): (usize, usize), win: Window, out: &mut [T], at: &mut [u32]) {
    let (oh, ow, (k, p)) = (win.out_len(h), win.out_len(w), (win.kernel, win.padding));
    // Room for 2 * ow values from every window column kx < k.
    let mut row = vec![T::neg_infinity(); (2 * ow + k).max(w + p)];
    for oy in 0..oh {
        let (y0, y1, _) = win.span(oy, h);
        let (best, arg) = (&mut out[oy * ow..][..ow], &mut at[oy * ow..][..ow]);
        for (ox, (b, a)) in best.iter_mut().zip(arg.iter_mut()).enumerate() {
            *b = T::neg_infinity();
            *a = (y0 * w + win.span(ox, w).0) as u32;
        }
        for y in y0..y1 {
            row[p..p + w].copy_from_slice(&x[y * w..(y + 1) * w]);
            for kx in 0..k {
                // Input column of output 0 for this kx (wraps below 0 in padding,
                // whose -inf is never taken).
                let first = (y * w + kx) as u32;
                let values = row[kx..kx + 2 * ow].chunks_exact(2);
                for (ox, ((b, a), pair)) in best.iter_mut().zip(arg.iter_mut()).zip(values).enumerate() {
                    let v = pair[0];
                    let take = v > *b || (v.is_nan() && !b.is_nan());
                    *b = if take { v } else { *b };
                    *a = if take {
                        first.wrapping_add(2 * ox as u32).wrapping_sub(p as u32)
                    } else {
                        *a
                    };
                }
            }
        }
    }
}

/// The position of each window's maximum in its plane, where the forward ran.
#[derive(Debug)]
pub enum Argmax {
    Cpu(Vec<u32>),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>),
}

/// Max pooling: `x.apply_op1(MaxPool2d::new(window))`. The forward keeps the
/// position of each window's maximum for the backward.
#[derive(Debug, Clone)]
pub struct MaxPool2d {
    pub window: Window,
    argmax: Arc<Mutex<Option<Arc<Argmax>>>>,
}

impl MaxPool2d {
    pub fn new(window: Window) -> Self {
        MaxPool2d {
            window,
            argmax: Arc::new(Mutex::new(None)),
        }
    }

    pub(crate) fn forward<T: Float + Send + Sync>(
        &self,
        x: &[T],
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let win = self.window;
        let (oh, ow) = (win.out_len(h), win.out_len(w));
        let mut out = vec![T::zero(); n * c * oh * ow];
        let mut at = vec![0u32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(at.par_chunks_mut(oh * ow))
            .zip(x.par_chunks(h * w))
            .for_each(|((o, a), plane)| {
                if win.stride == 2 {
                    crate::with_widest_simd!(max_pool_plane_stride2(plane, (h, w), win, o, a))
                } else {
                    max_pool_plane(plane, (h, w), win, o, a)
                }
            });
        *self.argmax.lock().expect("argmax lock") = Some(Arc::new(Argmax::Cpu(at)));
        out
    }
}

impl MaxPool2d {
    /// The gradient of the pool's input `arg` from the output gradient.
    pub(crate) fn input_grad(&self, arg: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = arg.dims4()?;
        let Some(argmax) = self.argmax.lock().expect("argmax lock").clone() else {
            candle_core::bail!("{}: the backward ran before the forward", self.name());
        };
        let op = MaxPool2dBackward {
            input_hw: (h, w),
            window: self.window,
            argmax,
        };
        grad.contiguous_counted()?.apply_op1_no_bwd(&op)
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
        let shape = Shape::from((n, c, self.window.out_len(h), self.window.out_len(w)));
        crate::ledger::allocated(shape.elem_count(), DType::U32); // CUDA's argmax
        crate::ledger::cpu_output(1, Ok((out, shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, shape, at) = crate::tape_ops_cuda::max_pool(s, l, self.window)?;
        crate::ledger::allocated(at.len(), DType::U32);
        *self.argmax.lock().expect("argmax lock") = Some(Arc::new(Argmax::Cuda(at)));
        crate::ledger::cuda_output(Ok((y, shape)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_grad(arg, grad_res)?))
    }
}

/// The gradient of max pooling: routes each output gradient to its window's
/// maximum, at the positions the forward recorded.
#[derive(Debug, Clone)]
pub struct MaxPool2dBackward {
    pub input_hw: (usize, usize),
    /// The forward's window (CUDA gathers each input's gradient over it).
    pub window: Window,
    pub argmax: Arc<Argmax>,
}

impl MaxPool2dBackward {
    fn backward<T: Float + Send + Sync>(
        &self,
        g: &[T],
        argmax: &[u32],
        (n, c, oh, ow): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let (h, w) = self.input_hw;
        let mut out = vec![T::zero(); n * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow).zip(argmax.par_chunks(oh * ow)))
            .for_each(|(gi, (go, at))| {
                for (&v, &i) in go.iter().zip(at) {
                    gi[i as usize] = gi[i as usize] + v;
                }
            });
        out
    }
}

impl CustomOp1 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, oh, ow) = dims4(layout, self.name())?;
        #[allow(irrefutable_let_patterns)] // without CUDA
        let Argmax::Cpu(argmax) = &*self.argmax
        else {
            candle_core::bail!("{}: the forward ran on another device", self.name());
        };
        if argmax.len() != n * c * oh * ow {
            candle_core::bail!("{}: the gradient does not match the forward", self.name());
        }
        let out = float_dispatch!(storage, self.name(), |d| self.backward(
            contiguous(d, layout, self.name())?,
            argmax,
            (n, c, oh, ow)
        ));
        crate::ledger::cpu_output(1, Ok((out, Shape::from((n, c, self.input_hw.0, self.input_hw.1)))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let Argmax::Cuda(at) = &*self.argmax else {
            candle_core::bail!("{}: the forward ran on another device", self.name());
        };
        crate::ledger::cuda_output(crate::tape_ops_cuda::max_pool_backward(
            s,
            l,
            at,
            self.window,
            self.input_hw,
        ))
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
        crate::ledger::cpu_output(1, Ok((out, Shape::from((n, c, self.0.out_len(h), self.0.out_len(w))))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ledger::cuda_output(crate::tape_ops_cuda::avg_pool(s, l, self.0, None))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let grad = grad_res.contiguous_counted()?.apply_op1_no_bwd(&AvgPool2dBackward {
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
        crate::ledger::cpu_output(1, Ok((out, Shape::from((n, c, self.input_hw.0, self.input_hw.1)))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::ledger::cuda_output(crate::tape_ops_cuda::avg_pool(s, l, self.window, Some(self.input_hw)))
    }
}

/// `max_pool2d` with padding (PyTorch semantics) and a correct backward.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let window = Window {
        kernel,
        stride,
        padding,
    };
    max_pool2d_with(Exec::default().kernels(OpKind::Pool, x), x, window)
}

/// [`max_pool2d`] with the given kernels.
pub fn max_pool2d_with(kernels: Kernels, x: &Tensor, window: Window) -> Result<Tensor> {
    match kernels {
        Kernels::Fused => tape::op1(&x.contiguous_counted()?, MaxPool2d::new(window), Reads::INPUTS),
        _ => super::generic::max_pool2d(x, window),
    }
}

/// `avg_pool2d` with padding, counting padded zeros, with a correct backward.
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let window = Window {
        kernel,
        stride,
        padding,
    };
    avg_pool2d_with(Exec::default().kernels(OpKind::Pool, x), x, window)
}

/// [`avg_pool2d`] with the given kernels.
pub fn avg_pool2d_with(kernels: Kernels, x: &Tensor, window: Window) -> Result<Tensor> {
    match kernels {
        Kernels::Fused => tape::op1(&x.contiguous_counted()?, AvgPool2d(window), Reads::INPUTS),
        _ => super::generic::avg_pool2d(x, window),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    use crate::testing::random;

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

    /// The row-at-a-time stride-2 pool against the window-by-window one, on
    /// values with many ties, infinities and NaNs, with and without padding.
    #[test]
    fn the_stride_2_rows_pick_the_windows_maxima() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match (state >> 33) % 11 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 => f32::INFINITY,
                r => r as f32 - 6.0,
            }
        };
        for (h, w, kernel, padding) in [
            (9, 7, 3, 1),
            (8, 8, 3, 1),
            (6, 5, 2, 0),
            (7, 9, 3, 0),
            (5, 5, 4, 1),
            (1, 1, 1, 0),
        ] {
            let win = Window {
                kernel,
                stride: 2,
                padding,
            };
            let (oh, ow) = (win.out_len(h), win.out_len(w));
            for trial in 0..20 {
                let mut x: Vec<f32> = (0..h * w).map(|_| next()).collect();
                if trial % 4 == 0 {
                    x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                }
                let (mut o1, mut a1) = (vec![0.0; oh * ow], vec![0; oh * ow]);
                let (mut o2, mut a2) = (vec![0.0; oh * ow], vec![0; oh * ow]);
                max_pool_plane(&x, (h, w), win, &mut o1, &mut a1);
                max_pool_plane_stride2(&x, (h, w), win, &mut o2, &mut a2);
                assert_eq!(a1, a2, "{h}x{w} k{kernel} p{padding}, trial {trial}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&o1), bits(&o2), "{h}x{w} k{kernel} p{padding}, trial {trial}");
            }
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
    fn the_generic_pools_match_the_kernels_on_signed_input() {
        for (shape, stride) in [([2, 3, 7, 6], 2), ([1, 2, 8, 5], 1), ([1, 1, 6, 6], 2)] {
            let x = (random(&shape, 5) - 0.5).unwrap();
            let v = Var::from_tensor(&x).unwrap();
            for max in [true, false] {
                let w = Window {
                    kernel: 3,
                    stride,
                    padding: 1,
                };
                let ours = if max {
                    max_pool2d(v.as_tensor(), 3, stride, 1)
                } else {
                    avg_pool2d(v.as_tensor(), 3, stride, 1)
                }
                .unwrap();
                let composed = if max {
                    crate::generic::max_pool2d(v.as_tensor(), w)
                } else {
                    crate::generic::avg_pool2d(v.as_tensor(), w)
                }
                .unwrap();
                assert_eq!(ours.dims(), composed.dims());
                let d = (&ours - &composed)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(d < 1e-12, "forward {shape:?} {max}");
                let g = random(ours.dims(), 6);
                let ga = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&composed * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let a: Vec<f64> = ga.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f64> = gb.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                assert!(d < 1e-12, "backward {shape:?} {max}");
            }
        }
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
