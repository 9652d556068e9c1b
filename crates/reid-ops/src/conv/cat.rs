//! A 1x1 convolution of the channel concatenation of several tensors, without
//! the concatenation: the end of a Res2Net block, whose pieces go into `conv3`.
//! The forward and the weight gradient gather each image's pieces into a column
//! buffer that stays in cache; the input gradient is computed an image at a time
//! into such a buffer and cut into the pieces' gradients. The products are
//! [`Conv2d`]'s on the concatenation, so the results are its bits. It runs on
//! the tape only, for it takes any number of pieces.

use crate::ledger::CountedContiguous;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::{backward_weight, forward, matmul, parallelism, with_cols, Columns, Geometry};
use crate::tape::{self, TapeOp};

/// The pieces of a concatenation: each [N, C_i, H, W], the same N, H and W.
struct Pieces<'a, T> {
    values: Vec<&'a [T]>,
    channels: Vec<usize>,
    g: Geometry,
}

impl<T: Float + Sync> Columns<T> for Pieces<'_, T> {
    fn scratch_len(&self) -> usize {
        self.g.c * self.g.p()
    }

    fn of<'a>(&'a self, i: usize, buf: &'a mut [T]) -> &'a [T] {
        let mut at = 0;
        for (piece, &c) in self.values.iter().zip(&self.channels) {
            let len = c * self.g.p();
            buf[at..at + len].copy_from_slice(&piece[i * len..(i + 1) * len]);
            at += len;
        }
        buf
    }
}

impl<'a, T> Pieces<'a, T> {
    /// The pieces with their dims, and the weight's dims [O, sum C_i, 1, 1].
    fn new(pieces: Vec<(&'a [T], &[usize])>, weight: &[usize]) -> Result<Self> {
        let Some(&(_, first)) = pieces.first() else {
            candle_core::bail!("conv-cat: no pieces");
        };
        let &[n, _, h, w] = first else {
            candle_core::bail!("conv-cat: expected NCHW pieces, got {first:?}");
        };
        let mut channels = Vec::with_capacity(pieces.len());
        for &(_, dims) in &pieces {
            match dims {
                &[pn, c, ph, pw] if (pn, ph, pw) == (n, h, w) => channels.push(c),
                _ => candle_core::bail!("conv-cat: piece {dims:?} does not fit {first:?}"),
            }
        }
        let total = channels.iter().sum();
        let g = Geometry::new(&[n, total, h, w], weight, 1, 0)?;
        if !g.direct() {
            candle_core::bail!("conv-cat: 1x1 weights only, got {weight:?}");
        }
        let values = pieces.into_iter().map(|(v, _)| v).collect();
        Ok(Pieces { values, channels, g })
    }
}

/// Each piece's gradient: image by image, the concatenation's input gradient
/// (as [`super::backward_input`] computes it) cut into the pieces' channels.
fn backward_pieces<T: 'static + Float + Send + Sync>(cat: &Pieces<T>, grad_out: &[T], weight: &[T]) -> Vec<Vec<T>> {
    let (g, p) = (&cat.g, cat.g.p());
    let mut grads: Vec<Vec<T>> = cat.channels.iter().map(|&c| vec![T::zero(); g.n * c * p]).collect();
    let mut per_image: Vec<Vec<&mut [T]>> = (0..g.n).map(|_| Vec::new()).collect();
    for (grad, &c) in grads.iter_mut().zip(&cat.channels) {
        for (image, rows) in per_image.iter_mut().zip(grad.chunks_mut(c * p)) {
            image.push(rows);
        }
    }
    let par = parallelism(g.n);
    per_image.into_par_iter().enumerate().for_each(|(i, rows)| {
        let gy = &grad_out[i * g.o * p..(i + 1) * g.o * p];
        with_cols(g.c * p, |cols| {
            matmul((g.c, p, g.o), cols, false, weight, true, gy, false, par);
            let mut at = 0;
            for dst in rows {
                dst.copy_from_slice(&cols[at..at + dst.len()]);
                at += dst.len();
            }
        })
    });
    grads
}

/// The 1x1 convolution of the concatenation of inputs `0..k` along the
/// channels, with the weight as input `k`.
#[derive(Debug, Clone, Copy)]
pub struct ConvCat;

impl ConvCat {
    /// The inputs' gradients, for f32 or f64 `tensors` ([pieces.., weight, output]).
    fn gradients<T: 'static + Float + WithDType + Send + Sync>(
        t: &[&Tensor],
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let k = t.len() - 2;
        let grad = grad.contiguous_counted()?;
        let guards: Vec<_> = t[..=k].iter().chain([&&grad]).map(|x| x.storage_and_layout()).collect();
        let mut values = Vec::with_capacity(k + 2);
        for (s, l) in &guards {
            values.push((crate::cpu_values::<T>(s, l, "conv-cat")?, l.dims()));
        }
        let (gy, _) = values.pop().expect("the gradient");
        let (weight, weight_dims) = values.pop().expect("the weight");
        let cat = Pieces::new(values, weight_dims)?;
        let device = grad.device();
        let mut out = Vec::with_capacity(k + 1);
        for ((piece, &c), x) in backward_pieces(&cat, gy, weight).into_iter().zip(&cat.channels).zip(t) {
            let g = &cat.g;
            out.push(
                x.track_op()
                    .then(|| crate::cpu_result(piece, (g.n, c, g.h, g.w), device))
                    .transpose()?,
            );
        }
        let gw = crate::cpu_result(backward_weight(&cat, gy, &cat.g), weight_dims, device)?;
        out.push(Some(gw));
        Ok(out)
    }
}

impl TapeOp for ConvCat {
    fn name(&self) -> &'static str {
        "conv-cat"
    }

    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
        let Some((&(weight, wl), pieces)) = inputs.split_last() else {
            candle_core::bail!("conv-cat: no inputs");
        };
        let op = self.name();
        macro_rules! run {
            ($variant:ident, $w:expr) => {{
                let mut values = Vec::with_capacity(pieces.len());
                for &(s, l) in pieces {
                    let CpuStorage::$variant(v) = s else {
                        candle_core::bail!("{op}: pieces and weight of one dtype, f32 or f64");
                    };
                    values.push((crate::contiguous(v, l, op)?, l.dims()));
                }
                let cat = Pieces::new(values, wl.dims())?;
                let w = crate::contiguous($w, wl, op)?;
                let g = cat.g;
                (
                    CpuStorage::$variant(forward(&cat, w, &g)),
                    Shape::from((g.n, g.o, g.oh, g.ow)),
                )
            }};
        }
        Ok(vec![match weight {
            CpuStorage::F32(w) => run!(F32, w),
            CpuStorage::F64(w) => run!(F64, w),
            _ => candle_core::bail!("{op}: f32 or f64 only"),
        }])
    }

    fn bwd(&self, tensors: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let grad = tape::only_grad(self.name(), grads)?;
        match grad.dtype() {
            candle_core::DType::F32 => Self::gradients::<f32>(tensors, grad),
            candle_core::DType::F64 => Self::gradients::<f64>(tensors, grad),
            dt => candle_core::bail!("conv-cat: {dt:?} (f32 and f64 only)"),
        }
    }
}
