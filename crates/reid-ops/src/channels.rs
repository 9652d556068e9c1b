//! A contiguous copy of a range of channels, for Res2Net's split. candle's `narrow`
//! is a view that the next convolution copies anyway, and its backward pads the
//! gradient by concatenating zero tensors; this op copies once forward and writes
//! the padded gradient in one pass backward.

use crate::ledger::CountedContiguous;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use num_traits::Float;

use super::{contiguous, dims4, filled_in_chunks, Exec, Kernels, OpKind};

/// Copies channels `start..start + len` of each image (`channels` in all) from
/// `src` (images of `src_c` channels) into images of `dst_c` channels at
/// `dst_start`, zeroing the other channels of the destination.
fn copy_channels<T: Float + Send + Sync>(
    src: &[T],
    (n, src_c, hw): (usize, usize, usize),
    (src_start, dst_start, len): (usize, usize, usize),
    dst_c: usize,
) -> Vec<T> {
    // SAFETY: each plane is either copied from `src` or zeroed, value by value.
    unsafe {
        filled_in_chunks(n * dst_c * hw, hw, |plane, out| {
            let (image, ch) = (plane / dst_c, plane % dst_c);
            if (dst_start..dst_start + len).contains(&ch) {
                let from = (image * src_c + ch - dst_start + src_start) * hw;
                for (o, &v) in out.iter_mut().zip(&src[from..from + hw]) {
                    o.write(v);
                }
            } else {
                out.iter_mut().for_each(|o| {
                    o.write(T::zero());
                });
            }
        })
    }
}

/// Channels `start..start + len` of an [N, C, H, W] tensor, as a new tensor.
#[derive(Debug, Clone, Copy)]
struct ChannelSlice {
    start: usize,
    len: usize,
}

impl CustomOp1 for ChannelSlice {
    fn name(&self) -> &'static str {
        "channel-slice"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(layout, self.name())?;
        if self.start + self.len > c {
            candle_core::bail!(
                "{}: channels {}..{} of {c}",
                self.name(),
                self.start,
                self.start + self.len
            );
        }
        let ranges = (self.start, 0, self.len);
        let out = float_dispatch!(storage, self.name(), |d| copy_channels(
            contiguous(d, layout, self.name())?,
            (n, c, h * w),
            ranges,
            self.len
        ));
        crate::ledger::cpu_output(1, Ok((out, Shape::from((n, self.len, h, w)))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let pad = ChannelPad {
            start: self.start,
            channels: arg.dim(1)?,
        };
        Ok(Some(grad.contiguous_counted()?.apply_op1_no_bwd(&pad)?))
    }
}

/// The slice's gradient: places an [N, len, H, W] tensor at channel `start` of an
/// [N, channels, H, W] tensor of zeros.
#[derive(Debug, Clone, Copy)]
struct ChannelPad {
    start: usize,
    channels: usize,
}

impl CustomOp1 for ChannelPad {
    fn name(&self) -> &'static str {
        "channel-pad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, len, h, w) = dims4(layout, self.name())?;
        let ranges = (0, self.start, len);
        let out = float_dispatch!(storage, self.name(), |d| copy_channels(
            contiguous(d, layout, self.name())?,
            (n, len, h * w),
            ranges,
            self.channels
        ));
        crate::ledger::cpu_output(1, Ok((out, Shape::from((n, self.channels, h, w)))))
    }
}

/// Channels `start..start + len` of `x` [N, C, H, W]: one copy by the fused op
/// on the CPU, the generic `narrow` elsewhere.
pub fn channel_slice(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    channel_slice_with(Exec::default().kernels(OpKind::ChannelSlice, x), x, start, len)
}

/// [`channel_slice`] with the given kernels.
pub fn channel_slice_with(kernels: Kernels, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    match kernels {
        Kernels::Fused if x.device().is_cpu() => x.contiguous_counted()?.apply_op1(ChannelSlice { start, len }),
        _ => super::generic::channel_slice(x, start, len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::testing::random;

    #[test]
    fn matches_narrow_forward_and_backward() {
        let x = Var::from_tensor(&random(&[3, 7, 4, 5], 1)).unwrap();
        for (start, len) in [(0, 2), (2, 3), (5, 2), (0, 7)] {
            let g = random(&[3, len, 4, 5], 2 + start as u64);
            let ours = channel_slice(x.as_tensor(), start, len).unwrap();
            let theirs = x.as_tensor().narrow(1, start, len).unwrap();
            let same = |a: &Tensor, b: &Tensor| {
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                d.to_scalar::<f64>().unwrap() == 0.0
            };
            assert!(same(&ours, &theirs), "forward {start}+{len}");
            let ga = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&theirs * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
            assert!(same(a, b), "backward {start}+{len}");
        }
        assert!(channel_slice(x.as_tensor(), 5, 3).is_err());
    }
}
