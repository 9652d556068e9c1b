//! The device-generic versions of the ops, composed of candle's own operations so
//! that they run (and differentiate) on any device: this is what CUDA runs where
//! no fused kernel exists, and what `--ops generic` runs on the CPU so that the
//! GPU code path is tested without a GPU. NaN and infinities propagate as in
//! PyTorch (candle's `relu` turns NaN into 0; the `relu` here does not).

use crate::ledger::CountedContiguous;
use candle_core::{Result, Tensor};

use super::pool::Window;

/// `max(x, 0)` with NaN kept: 0 where `x <= 0`, else `x` (NaN included), and a
/// gradient that passes wherever the output is not clamped.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.le(0.0)?.where_cond(&x.zeros_like()?, x)
}

/// `relu(a + b)`.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    relu(&(a + b)?)
}

/// Channels `start..start + len` of `x` [N, C, H, W].
pub fn channel_slice(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    x.narrow(1, start, len)?.contiguous_counted()
}

/// `x` [N, C, H, W] padded by `p` on every side and by `extra` more at the bottom
/// and right, with `value`.
fn pad(x: &Tensor, p: usize, extra: (usize, usize), value: f64) -> Result<Tensor> {
    if p == 0 && extra == (0, 0) {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return x.pad_with_zeros(2, p, p + extra.0)?.pad_with_zeros(3, p, p + extra.1);
    }
    let fill = |dims: &[usize]| Tensor::full(value, dims, x.device())?.to_dtype(x.dtype());
    let (n, c, h, w) = x.dims4()?;
    let rows = Tensor::cat(&[&fill(&[n, c, p, w])?, x, &fill(&[n, c, p + extra.0, w])?], 2)?;
    let hp = h + 2 * p + extra.0;
    Tensor::cat(&[&fill(&[n, c, hp, p])?, &rows, &fill(&[n, c, hp, p + extra.1])?], 3)
}

/// The `k * k` shifted views of a window over `x` [N, C, H, W] padded with
/// `value`: view (ky, kx) holds, at each output position, the input under kernel
/// tap (ky, kx). Each is [N, C, OH, OW].
fn window_views(x: &Tensor, w: Window, value: f64) -> Result<Vec<Tensor>> {
    let (n, c, h, wd) = x.dims4()?;
    let (oh, ow, s, k) = (w.out_len(h), w.out_len(wd), w.stride, w.kernel);
    // Pad so that every shifted view of `stride * out` rows and columns exists.
    let extra_h = (k + s * oh).saturating_sub(h + 2 * w.padding);
    let extra_w = (k + s * ow).saturating_sub(wd + 2 * w.padding);
    let padded = pad(x, w.padding, (extra_h, extra_w), value)?;
    let mut views = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            let v = padded.narrow(2, ky, s * oh)?.narrow(3, kx, s * ow)?;
            views.push(if s == 1 {
                v
            } else {
                v.reshape((n, c, oh, s, ow, s))?
                    .narrow(5, 0, 1)?
                    .narrow(3, 0, 1)?
                    .reshape((n, c, oh, ow))?
            });
        }
    }
    Ok(views)
}

/// Convolution without bias: im2col by zero padding and `k * k` shifted views
/// stacked into columns, then one batched matrix product with the weight. Its
/// backward is a matrix product plus the copies that undo the stacking (col2im),
/// and a matrix product for the weight: never candle's `conv_transpose2d`, a naive
/// kernel on CUDA.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (o, wc, k, k2) = weight.dims4()?;
    if wc != c || k != k2 {
        candle_core::bail!("conv2d: weight {:?} does not fit input {:?}", weight.dims(), x.dims());
    }
    let win = Window {
        kernel: k,
        stride,
        padding,
    };
    let (oh, ow) = (win.out_len(h), win.out_len(w));
    let cols = if k == 1 && stride == 1 && padding == 0 {
        x.reshape((n, c, h * w))?
    } else {
        Tensor::stack(&window_views(x, win, 0.0)?, 2)?.reshape((n, c * k * k, oh * ow))?
    };
    let wm = weight.reshape((o, c * k * k))?.unsqueeze(0)?.repeat((n, 1, 1))?;
    wm.matmul(&cols.contiguous()?)?.reshape((n, o, oh, ow))
}

/// Max pooling with -inf padding (PyTorch's): the window maximum by `argmax` and
/// `gather`, so that the whole gradient goes to the first maximum (candle's
/// `maximum` would split it between ties). A window holding NaN gives its first
/// NaN, and the gradient goes there.
pub fn max_pool2d(x: &Tensor, w: Window) -> Result<Tensor> {
    let stacked = Tensor::stack(&window_views(x, w, f64::NEG_INFINITY)?, 4)?;
    let inf = Tensor::full(f64::INFINITY, stacked.shape(), x.device())?.to_dtype(x.dtype())?;
    let keyed = stacked.ne(&stacked)?.where_cond(&inf, &stacked)?;
    let at = keyed.argmax_keepdim(4)?.contiguous()?;
    stacked.contiguous()?.gather(&at, 4)?.squeeze(4)
}

/// Average pooling with zero padding counted (`count_include_pad`).
pub fn avg_pool2d(x: &Tensor, w: Window) -> Result<Tensor> {
    let views = window_views(x, w, 0.0)?;
    let mut sum = views[0].clone();
    for v in &views[1..] {
        sum = (sum + v)?;
    }
    sum / (w.kernel * w.kernel) as f64
}
