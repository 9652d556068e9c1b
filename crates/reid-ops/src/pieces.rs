//! The Res2Net split and concatenation on the tape, one op and one launch each
//! way whatever the number of pieces. Without them, the split copies each piece
//! out with its own launch, its backward copies each gradient back, and so do the
//! concatenation and its backward: four launches per piece per block on CUDA.
//! The split's backward is the concatenation of the gradients, and the
//! concatenation's is the split of its gradient, so two kernels serve all four.
//! Values are copied, never combined: the results are the bits of the generic
//! ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, WithDType};

use crate::ledger::{made, CountedContiguous};
use crate::tape::{self, TapeOp};

/// The most pieces the CUDA kernels take (Res2Net's `scale` is at most 8).
pub const MAX_PIECES: usize = 8;

/// The geometry of a split: `count` pieces of `width` channels of images of
/// `h` x `w`, `images` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cut {
    pub images: usize,
    pub count: usize,
    pub width: usize,
    pub h: usize,
    pub w: usize,
}

impl Cut {
    fn new(images: usize, count: usize, width: usize, (h, w): (usize, usize)) -> Result<Self> {
        if !(1..=MAX_PIECES).contains(&count) {
            candle_core::bail!("pieces: {count} pieces (1 to {MAX_PIECES})");
        }
        let cut = Cut {
            images,
            count,
            width,
            h,
            w,
        };
        if u32::try_from(cut.total()).is_err() {
            candle_core::bail!("pieces: {} values is too many for one launch", cut.total());
        }
        Ok(cut)
    }

    /// Values of one piece of one image.
    pub fn piece_len(&self) -> usize {
        self.width * self.h * self.w
    }

    /// Values of the whole tensor.
    pub fn total(&self) -> usize {
        self.images * self.count * self.piece_len()
    }

    /// (images, count, values of a piece of an image), as the kernels take them.
    #[cfg(feature = "cuda")]
    pub fn kernel_sizes(&self) -> [u32; 3] {
        [self.images, self.count, self.piece_len()].map(|v| v as u32)
    }

    /// [N, width, H, W].
    pub fn piece_shape(&self) -> Shape {
        Shape::from((self.images, self.width, self.h, self.w))
    }

    /// [N, count * width, H, W].
    pub fn whole_shape(&self) -> Shape {
        Shape::from((self.images, self.count * self.width, self.h, self.w))
    }
}

/// Each image's run of values of each piece: (image, piece, run's range in
/// the piece) for the runs of the whole tensor in order.
fn runs(cut: Cut) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
    let len = cut.piece_len();
    (0..cut.images).flat_map(move |image| (0..cut.count).map(move |k| (k, image * len..(image + 1) * len)))
}

/// The pieces of the contiguous values of `(s, l)` (CPU, of type T).
fn split_cpu<T: WithDType>(s: &CpuStorage, l: &Layout, cut: Cut) -> Result<Vec<(CpuStorage, Shape)>> {
    let whole = crate::contiguous(T::cpu_storage_as_slice(s)?, l, "split-pieces")?;
    let mut pieces = vec![Vec::with_capacity(cut.images * cut.piece_len()); cut.count];
    for ((k, _), run) in runs(cut).zip(whole.chunks(cut.piece_len())) {
        pieces[k].extend_from_slice(run);
    }
    Ok(pieces
        .into_iter()
        .map(|p| (T::to_cpu_storage_owned(p), cut.piece_shape()))
        .collect())
}

/// The pieces `inputs` (CPU, of type T) side by side.
fn cat_cpu<T: WithDType>(inputs: &[(&CpuStorage, &Layout)], cut: Cut) -> Result<(CpuStorage, Shape)> {
    let pieces = inputs
        .iter()
        .map(|(s, l)| crate::contiguous(T::cpu_storage_as_slice(s)?, l, "cat-pieces"))
        .collect::<Result<Vec<&[T]>>>()?;
    let mut whole = Vec::with_capacity(cut.total());
    for (k, at) in runs(cut) {
        whole.extend_from_slice(&pieces[k][at]);
    }
    Ok((T::to_cpu_storage_owned(whole), cut.whole_shape()))
}

/// Runs `$body` with `$t` the type of the values of `$dtype`: f32, f64 or bf16.
macro_rules! copyable {
    ($dtype:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            dt => candle_core::bail!("pieces: {dt:?} (f32, f64 and bf16 only)"),
        }
    };
}
#[cfg(feature = "cuda")]
pub(crate) use copyable;

/// `x` [N, count * width, H, W] cut into `count` pieces [N, width, H, W].
#[derive(Debug, Clone, Copy)]
pub struct SplitPieces {
    pub width: usize,
    pub count: usize,
}

impl SplitPieces {
    fn cut(&self, layout: &Layout) -> Result<Cut> {
        let (n, c, h, w) = crate::dims4(layout, "split-pieces")?;
        if c != self.width * self.count {
            candle_core::bail!(
                "split-pieces: {} pieces of {} channels from {c}",
                self.count,
                self.width
            );
        }
        Cut::new(n, self.count, self.width, (h, w))
    }
}

impl TapeOp for SplitPieces {
    fn name(&self) -> &'static str {
        "split-pieces"
    }

    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
        let &[(s, l)] = inputs else {
            candle_core::bail!("split-pieces: one input");
        };
        let cut = self.cut(l)?;
        copyable!(s.dtype(), |T| split_cpu::<T>(s, l, cut))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> Result<Vec<(candle_core::CudaStorage, Shape)>> {
        let &[(s, l)] = inputs else {
            candle_core::bail!("split-pieces: one input");
        };
        crate::pieces_cuda::split(s, l, self.cut(l)?)
    }

    fn bwd(&self, _tensors: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let some = grads.iter().flatten().next().expect("a gradient reached the split");
        let grads = grads
            .iter()
            .map(|g| match g {
                Some(g) => g.contiguous_counted(),
                None => {
                    crate::ledger::zero_filled(1);
                    made(1, some.zeros_like())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let grads: Vec<&Tensor> = grads.iter().collect();
        Ok(tape::run(&CatPieces, &grads)?.into_iter().map(Some).collect())
    }
}

/// Pieces [N, width, H, W] of one shape, side by side: [N, count * width, H, W].
#[derive(Debug, Clone, Copy)]
pub struct CatPieces;

impl CatPieces {
    fn cut(layouts: &[&Layout]) -> Result<Cut> {
        let Some(first) = layouts.first() else {
            candle_core::bail!("cat-pieces: no pieces");
        };
        if layouts.iter().any(|l| l.dims() != first.dims()) {
            candle_core::bail!("cat-pieces: the pieces' shapes differ");
        }
        let (n, c, h, w) = crate::dims4(first, "cat-pieces")?;
        Cut::new(n, layouts.len(), c, (h, w))
    }
}

impl TapeOp for CatPieces {
    fn name(&self) -> &'static str {
        "cat-pieces"
    }

    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
        let cut = Self::cut(&inputs.iter().map(|(_, l)| *l).collect::<Vec<_>>())?;
        if inputs.iter().any(|(s, _)| s.dtype() != inputs[0].0.dtype()) {
            candle_core::bail!("cat-pieces: the pieces' dtypes differ");
        }
        Ok(vec![copyable!(inputs[0].0.dtype(), |T| cat_cpu::<T>(inputs, cut))?])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> Result<Vec<(candle_core::CudaStorage, Shape)>> {
        let cut = Self::cut(&inputs.iter().map(|(_, l)| *l).collect::<Vec<_>>())?;
        Ok(vec![crate::pieces_cuda::cat(inputs, cut)?])
    }

    fn bwd(&self, tensors: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let grad = tape::only_grad(self.name(), grads)?.contiguous_counted()?;
        let count = tensors.len() - 1;
        let split = SplitPieces {
            width: grad.dim(1)? / count,
            count,
        };
        Ok(tape::run(&split, &[&grad])?.into_iter().map(Some).collect())
    }
}

/// `x` [N, count * width, H, W] cut into `count` pieces, recorded on this
/// thread's tape (an error where none records).
pub fn split(x: &Tensor, width: usize, count: usize) -> Result<Vec<Tensor>> {
    let x = x.contiguous_counted()?;
    // The backward reads no tensor, but the tape keeps one per op: `x`, which
    // batch norm + ReLU's backward keeps anyway.
    tape::op_any_outputs(&[(&x, true)], SplitPieces { width, count }, false)
}

/// `pieces` side by side along the channels, recorded on this thread's tape
/// (an error where none records).
pub fn cat(pieces: &[Tensor]) -> Result<Tensor> {
    let pieces = pieces
        .iter()
        .map(|p| p.contiguous_counted())
        .collect::<Result<Vec<_>>>()?;
    // The backward reads no tensor, but the tape keeps one per op: the first
    // piece, which its convolution's backward keeps anyway.
    let inputs: Vec<(&Tensor, bool)> = pieces.iter().enumerate().map(|(i, p)| (p, i == 0)).collect();
    tape::op_any_inputs(&inputs, CatPieces, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::backprop::GradStore;
    use candle_core::{DType, Var};

    use crate::ledger::counting;
    use crate::testing::{random, values};

    /// Bit for bit, as two f64 tensors' values.
    fn same_bits(a: &Tensor, b: &Tensor, what: &str) {
        let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a), bits(b), "{what}");
    }

    #[test]
    fn split_and_cat_are_candles_narrow_and_cat_both_ways() {
        let x = Var::from_tensor(&random(&[3, 6, 4, 5], 1)).unwrap();
        let g = random(&[3, 6, 4, 5], 2);
        // Piece 1 is not used, so its gradient starts as zeros; piece 2 is used twice.
        let pick = |p: &[Tensor]| vec![p[2].clone(), p[0].clone(), p[2].clone()];
        let ((out, tape), ledger) = counting(|| tape::record(|| cat(&pick(&split(x.as_tensor(), 2, 3)?))).unwrap());
        let mut store = GradStore::default();
        let ((), back) = counting(|| tape.backward(&out, g.clone(), &mut store).unwrap());
        assert_eq!((ledger.launches, ledger.tape_ops), (2, 2), "one launch and one op each");
        assert_eq!(
            (back.launches, back.zero_filled_grads),
            (4, 1),
            "two, a zero fill and a sum"
        );

        let narrow: Vec<Tensor> = (0..3).map(|i| x.as_tensor().narrow(1, 2 * i, 2).unwrap()).collect();
        let theirs = Tensor::cat(&pick(&narrow), 1).unwrap();
        same_bits(&out, &theirs, "forward");
        let grads = (&theirs * &g).unwrap().sum_all().unwrap().backward().unwrap();
        same_bits(
            store.get(x.as_tensor()).unwrap(),
            grads.get(x.as_tensor()).unwrap(),
            "backward",
        );
    }

    #[test]
    fn bf16_round_trips_and_bad_cuts_are_errors() {
        let x = random(&[2, 8, 3, 3], 3).to_dtype(DType::BF16).unwrap();
        let (back, _) = tape::record(|| cat(&split(&x, 2, 4)?)).unwrap();
        let diff = (back.to_dtype(DType::F64).unwrap() - x.to_dtype(DType::F64).unwrap()).unwrap();
        assert_eq!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
        let err = tape::record(|| split(&x, 3, 3).map(|p| p[0].clone())).unwrap_err();
        assert!(err.to_string().contains("3 pieces of 3 channels from 8"), "{err}");
        let err = tape::record(|| cat(&[split(&x, 2, 4)?[0].clone(), x.clone()])).unwrap_err();
        assert!(err.to_string().contains("shapes differ"), "{err}");
        let err = tape::record(|| cat(&vec![x.clone(); 9])).unwrap_err();
        assert!(err.to_string().contains("9 pieces (1 to 8)"), "{err}");
        assert!(
            split(&x, 2, 4).unwrap_err().to_string().contains("tape"),
            "needs a tape"
        );
    }
}
