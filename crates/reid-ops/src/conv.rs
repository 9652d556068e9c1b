//! 2-D convolution forward and backward by matrix multiplication (im2col + GEMM,
//! GEMM for the weight gradient, GEMM + col2im for the input gradient), replacing
//! candle 0.11's CPU backward, which goes through a direct `conv_transpose2d` loop.
//!
//! Work is split over images (and, for the weight gradient, over fixed groups of
//! images summed in a fixed order), never by thread count, so results are the same
//! bit for bit whatever the number of threads.

mod cat;

use crate::ledger::CountedContiguous;
use std::cell::Cell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::{filled_in_chunks, Kernels};
use crate::tape::{self, Reads};
pub use cat::ConvCat;

/// Geometry of one convolution call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &[usize], weight: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[n, c, h, w], &[o, wc, kh, kw]) = (x, weight) else {
            candle_core::bail!("conv2d: expected NCHW input and OIHW weight, got {x:?} and {weight:?}");
        };
        if wc != c || kh != kw {
            candle_core::bail!("conv2d: weight {weight:?} does not fit input {x:?} (square kernels only)");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{w}");
        }
        let oh = (h + 2 * padding - kh) / stride + 1;
        let ow = (w + 2 * padding - kw) / stride + 1;
        Ok(Geometry {
            n,
            c,
            h,
            w,
            o,
            k: kh,
            stride,
            padding,
            oh,
            ow,
        })
    }

    /// Rows of the column matrix: C * k * k.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Output positions per image.
    fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Whether the input itself is the column matrix (1x1, stride 1, no padding).
    fn direct(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
}

thread_local! {
    /// Each thread's column matrix, reused across calls (bytes, aligned for f64).
    static COLS: Cell<Vec<f64>> = const { Cell::new(Vec::new()) };
}

/// The first `len` values of a thread's scratch buffer, viewed as `T` and grown
/// as needed; their contents are stale values from earlier calls.
fn scratch<T: Float>(buf: &mut Vec<f64>, len: usize) -> &mut [T] {
    let bytes = len * std::mem::size_of::<T>();
    let words = bytes.div_ceil(8);
    if buf.len() < words {
        buf.resize(words, 0.0);
    }
    assert!(std::mem::size_of::<T>() <= 8 && std::mem::align_of::<T>() <= 8);
    // SAFETY: the buffer holds at least `bytes` initialised bytes, aligned for
    // f64 and so for `T` (f32 or f64, any bit pattern valid).
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut T, len) }
}

/// Runs `f` on this thread's column buffer of `len` values. The buffer is out of
/// the thread-local during the call: a task that the thread runs while `f`
/// waits for a threaded GEMM finds none there and makes its own.
fn with_cols<T: Float, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let mut buf = COLS.take();
    let result = f(scratch(&mut buf, len));
    COLS.set(buf);
    result
}

/// The column matrix [C*k*k, P] of each image of a convolution's input.
trait Columns<T>: Sync {
    /// Values of scratch an image's columns are built in (0: none).
    fn scratch_len(&self) -> usize;

    /// Image `i`'s columns: built in `buf` (of `scratch_len()` values), or
    /// borrowed where the input is its own column matrix.
    fn of<'a>(&'a self, i: usize, buf: &'a mut [T]) -> &'a [T];
}

/// The images of an [N, C, H, W] input and the convolution's geometry.
struct Images<'x, T> {
    x: &'x [T],
    g: Geometry,
}

impl<T: Float + Sync> Columns<T> for Images<'_, T> {
    fn scratch_len(&self) -> usize {
        match self.g.direct() {
            true => 0,
            false => self.g.ckk() * self.g.p(),
        }
    }

    fn of<'a>(&'a self, i: usize, buf: &'a mut [T]) -> &'a [T] {
        let len = self.g.c * self.g.h * self.g.w;
        let image = &self.x[i * len..(i + 1) * len];
        if self.g.direct() {
            return image;
        }
        crate::with_widest_simd!(im2col(image, &self.g, buf));
        buf
    }
}

/// The output positions `lo..hi` (of `out` positions) whose input position
/// `o * stride + offset - padding` lies in `0..len`.
fn inside(out: usize, len: usize, stride: usize, offset: usize, padding: usize) -> (usize, usize) {
    // o * stride + offset >= padding, and o * stride + offset < len + padding.
    let lo = padding.saturating_sub(offset).div_ceil(stride);
    let hi = (len + padding).saturating_sub(offset).div_ceil(stride).min(out);
    (lo.min(hi), hi)
}

/// Fills `cols` [C*k*k, OH*OW] from one image `x` [C, H, W].
#[inline(always)]
fn im2col<T: Float>(x: &[T], g: &Geometry, cols: &mut [T]) {
    let p = g.p();
    for c in 0..g.c {
        for ky in 0..g.k {
            let (y_lo, y_hi) = inside(g.oh, g.h, g.stride, ky, g.padding);
            for kx in 0..g.k {
                let row = &mut cols[((c * g.k + ky) * g.k + kx) * p..][..p];
                let (x_lo, x_hi) = inside(g.ow, g.w, g.stride, kx, g.padding);
                row[..y_lo * g.ow].fill(T::zero());
                row[y_hi * g.ow..].fill(T::zero());
                for oy in y_lo..y_hi {
                    let iy = oy * g.stride + ky - g.padding;
                    let src = &x[(c * g.h + iy) * g.w..][..g.w];
                    let out = &mut row[oy * g.ow..(oy + 1) * g.ow];
                    out[..x_lo].fill(T::zero());
                    out[x_hi..].fill(T::zero());
                    let first = x_lo * g.stride + kx - g.padding;
                    copy_strided(&src[first..], g.stride, &mut out[x_lo..x_hi]);
                }
            }
        }
    }
}

/// `out[j] = src[j * stride]` for every `j` of `out`. Stride 2 (every strided
/// convolution of the backbones) is a loop over pairs, which compiles to vector
/// shuffles; `step_by` did not vectorise.
#[inline(always)]
fn copy_strided<T: Float>(src: &[T], stride: usize, out: &mut [T]) {
    match stride {
        1 => out.copy_from_slice(&src[..out.len()]),
        2 => {
            // Whole pairs first (a shuffle per vector), then the last value of
            // a row whose final pair is cut short.
            let pairs = (src.len() / 2).min(out.len());
            for (o, pair) in out[..pairs].iter_mut().zip(src.chunks_exact(2)) {
                *o = pair[0];
            }
            for (j, o) in out.iter_mut().enumerate().skip(pairs) {
                *o = src[2 * j];
            }
        }
        _ => out
            .iter_mut()
            .zip(src.iter().step_by(stride))
            .for_each(|(o, &v)| *o = v),
    }
}

/// Sums the column matrix `cols` back into the image gradient `x` [C, H, W]
/// (every value of `x` is written).
fn col2im<T: Float>(cols: &[T], g: &Geometry, x: &mut [MaybeUninit<T>]) {
    let p = g.p();
    x.iter_mut().for_each(|v| {
        v.write(T::zero());
    });
    // SAFETY: every value was just initialised.
    let x = unsafe { &mut *(x as *mut [MaybeUninit<T>] as *mut [T]) };
    for c in 0..g.c {
        for ky in 0..g.k {
            let (y_lo, y_hi) = inside(g.oh, g.h, g.stride, ky, g.padding);
            for kx in 0..g.k {
                let row = &cols[((c * g.k + ky) * g.k + kx) * p..][..p];
                let (x_lo, x_hi) = inside(g.ow, g.w, g.stride, kx, g.padding);
                for oy in y_lo..y_hi {
                    let iy = oy * g.stride + ky - g.padding;
                    let dst = &mut x[(c * g.h + iy) * g.w..][..g.w];
                    let first = x_lo * g.stride + kx - g.padding;
                    let values = &row[oy * g.ow + x_lo..oy * g.ow + x_hi];
                    let targets = dst[first..].iter_mut().step_by(g.stride);
                    targets.zip(values).for_each(|(d, &v)| *d = *d + v);
                }
            }
        }
    }
}

/// How the GEMMs of `tasks` parallel tasks are threaded: each on its own thread
/// when there are at least as many tasks as threads, else each over its share of
/// the pool, so that a small batch (or few weight-gradient groups) leaves no core
/// idle. gemm splits a product's output among threads, never its sums, so the
/// results are the same either way.
fn parallelism(tasks: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    match tasks < threads {
        true => gemm::Parallelism::Rayon(threads.div_ceil(tasks.max(1))),
        false => gemm::Parallelism::None,
    }
}

/// `dst[m, n] (+)= a[m, k] * b[k, n]` for row-major matrices given by their row
/// strides and transposition, threaded as `par` says.
#[allow(clippy::too_many_arguments)]
fn matmul<T: 'static + Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    a_transposed: bool,
    b: &[T],
    b_transposed: bool,
    par: gemm::Parallelism,
) {
    // SAFETY: `dst` is initialised, so reading it (when accumulating) is sound.
    let dst = unsafe { &mut *(dst as *mut [T] as *mut [MaybeUninit<T>]) };
    gemm_into((m, n, k), dst, accumulate, a, a_transposed, b, b_transposed, par);
}

/// [`matmul`] into memory that may be uninitialised: it must be when `accumulate`
/// is true; otherwise all `m * n` values are written.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: 'static + Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [MaybeUninit<T>],
    accumulate: bool,
    a: &[T],
    a_transposed: bool,
    b: &[T],
    b_transposed: bool,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    // Row-major [m, k] has (column stride, row stride) = (1, k); its transpose, stored
    // as [k, m], has (m, 1).
    let (a_cs, a_rs) = if a_transposed { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if b_transposed { (k as isize, 1) } else { (1, n as isize) };
    // SAFETY: the asserts above bound every index the strides describe; without
    // `accumulate` gemm only writes `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr() as *mut T,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

fn forward<T: 'static + Float + Send + Sync>(cols: &impl Columns<T>, weight: &[T], g: &Geometry) -> Vec<T> {
    let (ckk, p) = (g.ckk(), g.p());
    let par = parallelism(g.n);
    // SAFETY: gemm without accumulation writes all O x P outputs of an image.
    unsafe {
        filled_in_chunks(g.n * g.o * p, g.o * p, |i, y| {
            with_cols(cols.scratch_len(), |buf| {
                let columns = cols.of(i, buf);
                gemm_into((g.o, p, ckk), y, false, weight, false, columns, false, par);
            })
        })
    }
}

fn backward_input<T: 'static + Float + Send + Sync>(grad_out: &[T], weight: &[T], g: &Geometry) -> Vec<T> {
    let (ckk, p) = (g.ckk(), g.p());
    let image_len = g.c * g.h * g.w;
    let par = parallelism(g.n);
    // SAFETY: gemm (direct) or col2im (which zeroes first) writes the whole image gradient.
    unsafe {
        filled_in_chunks(g.n * image_len, image_len, |i, gx| {
            let gy = &grad_out[i * g.o * p..(i + 1) * g.o * p];
            if g.direct() {
                gemm_into((ckk, p, g.o), gx, false, weight, true, gy, false, par);
            } else {
                with_cols(ckk * p, |cols| {
                    matmul((ckk, p, g.o), cols, false, weight, true, gy, false, par);
                    col2im(cols, g, gx);
                });
            }
        })
    }
}

/// Images per partial sum of the weight gradient: fixed by the batch alone.
const WEIGHT_GROUP: usize = 4;

fn backward_weight<T: 'static + Float + Send + Sync>(cols: &impl Columns<T>, grad_out: &[T], g: &Geometry) -> Vec<T> {
    let (ckk, p) = (g.ckk(), g.p());
    let groups = g.n.div_ceil(WEIGHT_GROUP);
    let par = parallelism(groups);
    let partials: Vec<Vec<T>> = (0..groups)
        .into_par_iter()
        .map(|group| {
            let mut acc = vec![T::zero(); g.o * ckk];
            let mut buf = vec![T::zero(); cols.scratch_len()];
            for i in group * WEIGHT_GROUP..((group + 1) * WEIGHT_GROUP).min(g.n) {
                let columns = cols.of(i, &mut buf);
                let gy = &grad_out[i * g.o * p..(i + 1) * g.o * p];
                let accumulate = i > group * WEIGHT_GROUP;
                matmul((g.o, ckk, p), &mut acc, accumulate, gy, false, columns, true, par);
            }
            acc
        })
        .collect();
    let mut total = partials[0].clone();
    for part in &partials[1..] {
        total.iter_mut().zip(part).for_each(|(t, v)| *t = *t + *v);
    }
    total
}

/// The convolution of the values of `x` (of shape `x_dims`) with `weight` (of
/// shape `weight_dims`), and the output's shape.
pub(crate) fn forward_values<T: 'static + Float + Send + Sync>(
    (x, x_dims): (&[T], &[usize]),
    (weight, weight_dims): (&[T], &[usize]),
    conv: Conv2d,
) -> Result<(Vec<T>, [usize; 4])> {
    let g = Geometry::new(x_dims, weight_dims, conv.stride, conv.padding)?;
    Ok((forward(&Images { x, g }, weight, &g), [g.n, g.o, g.oh, g.ow]))
}

/// Convolution of (input [N, C, H, W], weight [O, C, k, k]) without bias.
#[derive(Debug, Clone, Copy)]
pub struct Conv2d {
    pub stride: usize,
    pub padding: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let out = two_floats!(self.name(), s1, l1, s2, l2, |x, w| forward(&Images { x, g }, w, &g));
        // CUDA: one cuDNN call.
        crate::ledger::cpu_output(1, Ok((out, Shape::from((g.n, g.o, g.oh, g.ow)))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous_counted()?;
        // No input gradient where nothing upstream needs one (the images).
        let grad_x = if x.track_op() {
            let op = Conv2dBackwardInput {
                conv: *self,
                input: x.dims4()?,
            };
            Some(grad.apply_op2_no_bwd(weight, &op)?)
        } else {
            None
        };
        let grad_w = x.apply_op2_no_bwd(
            &grad,
            &Conv2dBackwardWeight {
                conv: *self,
                weight: weight.dims4()?,
            },
        )?;
        Ok((grad_x, Some(grad_w)))
    }
}

/// The input gradient of [`Conv2d`] from (output gradient, weight).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dBackwardInput {
    pub conv: Conv2d,
    pub input: (usize, usize, usize, usize),
}

impl CustomOp2 for Conv2dBackwardInput {
    fn name(&self) -> &'static str {
        "conv2d-gemm-backward-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = self.input;
        let g = Geometry::new(&[n, c, h, w], l2.dims(), self.conv.stride, self.conv.padding)?;
        if l1.dims() != [g.n, g.o, g.oh, g.ow] {
            candle_core::bail!("{}: gradient {:?} does not fit the output", self.name(), l1.dims());
        }
        let out = two_floats!(self.name(), s1, l1, s2, l2, |gy, wt| backward_input(gy, wt, &g));
        crate::ledger::cpu_output(1, Ok((out, Shape::from(self.input))))
    }
}

/// The weight gradient of [`Conv2d`] from (input, output gradient).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dBackwardWeight {
    pub conv: Conv2d,
    pub weight: (usize, usize, usize, usize),
}

impl CustomOp2 for Conv2dBackwardWeight {
    fn name(&self) -> &'static str {
        "conv2d-gemm-backward-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (o, c, kh, kw) = self.weight;
        let g = Geometry::new(l1.dims(), &[o, c, kh, kw], self.conv.stride, self.conv.padding)?;
        if l2.dims() != [g.n, g.o, g.oh, g.ow] {
            candle_core::bail!("{}: gradient {:?} does not fit the output", self.name(), l2.dims());
        }
        let out = two_floats!(self.name(), s1, l1, s2, l2, |x, gy| backward_weight(
            &Images { x, g },
            gy,
            &g
        ));
        crate::ledger::cpu_output(1, Ok((out, Shape::from(self.weight))))
    }
}

/// Convolution without bias: the fused [`Conv2d`] on the CPU, the generic
/// [`super::generic::conv2d`] elsewhere (the `auto` plan).
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let kernels = super::Exec::default().kernels(super::OpKind::Conv, x);
    conv2d_with(kernels, x, weight, stride, padding)
}

/// [`conv2d`] with the given kernels (fused: this module's on the CPU, cuDNN's on
/// CUDA when built with `cudnn`).
pub fn conv2d_with(kernels: Kernels, x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    match kernels {
        Kernels::Fused if x.device().is_cpu() => {
            let conv = Conv2d { stride, padding };
            let (x, weight) = (x.contiguous_counted()?, weight.contiguous_counted()?);
            tape::op2(&x, &weight, conv, Reads::INPUTS)
        }
        #[cfg(feature = "cudnn")]
        Kernels::Fused if x.device().is_cuda() => super::cuda::conv2d(x, weight, stride, padding),
        _ => super::generic::conv2d(x, weight, stride, padding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::testing::random;

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// Shapes covering strides 1 and 2, padding 0 and 1, 1x1/3x3/7x7, odd channels.
    /// n, c, h, w, o, k, stride, padding
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    const CASES: [Case; 7] = [
        // n, c, h, w, o, k, stride, padding
        (2, 3, 9, 7, 5, 3, 1, 1),
        (3, 5, 8, 6, 7, 3, 2, 1),
        (2, 3, 13, 11, 4, 7, 2, 3),
        (5, 7, 6, 5, 3, 1, 1, 0),
        (2, 6, 7, 7, 9, 1, 2, 0),
        (1, 1, 5, 5, 1, 3, 1, 0),
        (6, 3, 4, 4, 2, 3, 2, 0),
    ];

    #[test]
    fn forward_and_gradients_match_candle() {
        for (i, &(n, c, h, w, o, k, s, p)) in CASES.iter().enumerate() {
            let x = Var::from_tensor(&random(&[n, c, h, w], 1 + i as u64)).unwrap();
            let wt = Var::from_tensor(&random(&[o, c, k, k], 100 + i as u64)).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            assert!(max_diff(&values(&ours), &values(&theirs)) < 1e-12, "forward, case {i}");
            let g = random(ours.dims(), 7);
            let ga = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&theirs * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt] {
                let (a, b) = (
                    values(ga.get(v.as_tensor()).unwrap()),
                    values(gb.get(v.as_tensor()).unwrap()),
                );
                assert!(max_diff(&a, &b) < 1e-11, "gradient, case {i}");
            }
        }
    }

    #[test]
    fn the_matmul_formulation_matches_the_kernels() {
        for (i, &(n, c, h, w, o, k, s, p)) in CASES.iter().enumerate() {
            let x = Var::from_tensor(&random(&[n, c, h, w], 11 + i as u64)).unwrap();
            let wt = Var::from_tensor(&random(&[o, c, k, k], 111 + i as u64)).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
            let generic = crate::generic::conv2d(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
            assert_eq!(ours.dims(), generic.dims(), "case {i}");
            assert!(max_diff(&values(&ours), &values(&generic)) < 1e-12, "forward, case {i}");
            let g = random(ours.dims(), 17);
            let ga = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&generic * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt] {
                let (a, b) = (
                    values(ga.get(v.as_tensor()).unwrap()),
                    values(gb.get(v.as_tensor()).unwrap()),
                );
                assert!(max_diff(&a, &b) < 1e-11, "gradient, case {i}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, c, h, w, o, k, s, p) = (2, 3, 6, 5, 4, 3, 2, 1);
        let x = Var::from_tensor(&random(&[n, c, h, w], 3)).unwrap();
        let wt = Var::from_tensor(&random(&[o, c, k, k], 4)).unwrap();
        let y = conv2d(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
        let g = random(y.dims(), 5);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (var, other, is_input) in [(&x, &wt, true), (&wt, &x, false)] {
            let analytic = values(grads.get(var.as_tensor()).unwrap());
            let base = values(var.as_tensor());
            for (j, &a) in analytic.iter().enumerate() {
                let eval = |d: f64| {
                    let mut v = base.clone();
                    v[j] += d;
                    let t = Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap();
                    let y = if is_input {
                        conv2d(&t, other.as_tensor(), s, p)
                    } else {
                        conv2d(other.as_tensor(), &t, s, p)
                    };
                    (y.unwrap() * &g)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let numeric = (eval(1e-6) - eval(-1e-6)) / 2e-6;
                assert!((numeric - a).abs() < 1e-6, "element {j}: {numeric} vs {a}");
            }
        }
    }

    /// Forward and both gradients of a conv on `threads` threads, as f32 values.
    fn on_threads(x: &Var, wt: &Var, stride: usize, threads: usize) -> [Vec<f32>; 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let y = conv2d(x.as_tensor(), wt.as_tensor(), stride, 1).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            [
                f(&y),
                f(grads.get(x.as_tensor()).unwrap()),
                f(grads.get(wt.as_tensor()).unwrap()),
            ]
        })
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let f32_var = |dims: &[usize], seed| {
            Var::from_tensor(&random(dims, seed).to_dtype(candle_core::DType::F32).unwrap()).unwrap()
        };
        let (x, wt) = (f32_var(&[9, 5, 12, 10], 8), f32_var(&[6, 5, 3, 3], 9));
        assert_eq!(on_threads(&x, &wt, 2, 1), on_threads(&x, &wt, 2, 3));
        // Fewer images (and weight groups) than threads: the GEMMs themselves
        // run on several threads, being large enough for gemm to split them.
        let wt = f32_var(&[32, 16, 3, 3], 10);
        for n in [1, 2, 5] {
            let x = f32_var(&[n, 16, 24, 24], 11 + n as u64);
            let one = on_threads(&x, &wt, 1, 1);
            assert_eq!(one, on_threads(&x, &wt, 1, 3), "{n} images");
            assert_eq!(one, on_threads(&x, &wt, 1, 8), "{n} images");
        }
    }
}
