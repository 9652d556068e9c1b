//! Batch norm and ReLU whose output comes out already cut into Res2Net's
//! pieces: on the tape, the first batch norm of a Res2Net block writes each
//! piece's planes into the piece's own tensor, and its backward reads the
//! pieces' outputs and gradients where they are. No whole output is made to be
//! copied into pieces, and no concatenation of the pieces' gradients is made
//! for the backward. The values are those of batch norm, ReLU and the split.

use crate::ledger::CountedContiguous;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;

use super::{affine_planes, cpu_f64, dims, sums_by, to_f64, BatchNormTrain, HostGrad, PlaneOf};
use crate::tape::TapeOp;

/// Train-mode batch norm + ReLU of (x, weight, bias), its output's channels cut
/// into `count` pieces of `width`: `count` outputs.
#[derive(Debug, Clone)]
pub struct BatchNormReluSplit {
    /// The batch norm (with ReLU); its `stats` get the batch statistics.
    pub bn: BatchNormTrain,
    pub width: usize,
    pub count: usize,
}

impl BatchNormReluSplit {
    /// Inputs the backward reads: x and the weight (and every output).
    pub const READS: [bool; 3] = [true, true, false];

    /// The plane of piece `j` that holds plane `p` (`n * C + c`) of the whole.
    fn piece_plane(&self, p: usize) -> (usize, usize) {
        let c = self.width * self.count;
        let (n, ch) = (p / c, p % c);
        (ch / self.width, n * self.width + ch % self.width)
    }

    fn forward<T: Float + Send + Sync + 'static>(&self, [x, w, b]: [&[T]; 3], d: (usize, usize, usize)) -> Vec<Vec<T>> {
        let (n, c, hw) = d;
        let (scale, shift) = self.bn.normalise_batch(x, w, b, d);
        let pieces = (0..self.count).map(|j| {
            let source = |q: usize| (q / self.width) * c + j * self.width + q % self.width;
            affine_planes(x, (n * self.width, c, hw), source, &scale, &shift, true)
        });
        pieces.collect()
    }

    /// (x, weight, bias) gradients from x, the weight, the pieces and their
    /// gradients (a piece that got none counts as zeros).
    fn gradients<T: Float + candle_core::WithDType + Send + Sync + 'static>(
        &self,
        t: &[&Tensor],
        grads: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w, pieces) = (t[0], t[1], &t[3..]);
        let d = x.dims4()?;
        let (n, c, hw) = (d.0, d.1, d.2 * d.3);
        let zeros = vec![T::zero(); hw];
        let grads = grads
            .iter()
            .map(|g| g.as_ref().map(|g| g.contiguous_counted()).transpose());
        let grads: Vec<Option<Tensor>> = grads.collect::<Result<_>>()?;
        // x, the pieces, then the gradients there are.
        let all: Vec<&Tensor> = std::iter::once(x)
            .chain(pieces.iter().copied())
            .chain(grads.iter().flatten())
            .collect();
        let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = guards.iter().map(|(s, l)| crate::cpu_values::<T>(s, l, self.name()));
        let xs = slices.next().expect("x")?;
        let ys = slices.by_ref().take(pieces.len()).collect::<Result<Vec<_>>>()?;
        let mut gs = Vec::with_capacity(grads.len());
        for g in &grads {
            gs.push(g.as_ref().map(|_| slices.next().expect("a gradient")).transpose()?);
        }
        let x_plane = |p: usize| &xs[p * hw..(p + 1) * hw];
        let y_plane = |p: usize| {
            let (j, q) = self.piece_plane(p);
            &ys[j][q * hw..(q + 1) * hw]
        };
        let g_plane = |p: usize| {
            let (j, q) = self.piece_plane(p);
            gs[j].map_or(&zeros[..], |g| &g[q * hw..(q + 1) * hw])
        };
        let planes: [&PlaneOf<T>; 3] = [&x_plane, &y_plane, &g_plane];
        let saved = self.bn.saved_stats();
        let stats = saved.host(self.name())?;
        let sums = sums_by(stats, self.bn.eps, true, planes, (n, c, hw));
        let (sum_gxhat, sum_g) = sums.split_at(c);
        let input = HostGrad {
            eps: self.bn.eps,
            relu: true,
            stats,
            weight: cpu_f64(w, self.name())?,
            sums: to_f64(&sums),
        };
        let gx = t[0]
            .track_op()
            .then(|| crate::cpu_result(input.backward_by(planes, (n, c, hw)), d, t[0].device()))
            .transpose()?;
        let gw = crate::cpu_result(sum_gxhat.to_vec(), c, t[0].device())?;
        let gb = crate::cpu_result(sum_g.to_vec(), c, t[0].device())?;
        Ok(vec![gx, Some(gw), Some(gb)])
    }
}

impl TapeOp for BatchNormReluSplit {
    fn name(&self) -> &'static str {
        "batch-norm-relu-split"
    }

    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
        let op = self.name();
        let &[(x, lx), (w, lw), (b, lb)] = inputs else {
            candle_core::bail!("{op}: expected 3 inputs, got {}", inputs.len());
        };
        let d = dims(lx, op)?;
        if d.1 != self.width * self.count {
            candle_core::bail!("{op}: {} channels are not {} pieces of {}", d.1, self.count, self.width);
        }
        let &[n, _, h, wd] = lx.dims() else {
            candle_core::bail!("{op}: expected an NCHW input, got {:?}", lx.dims());
        };
        let shape = Shape::from((n, self.width, h, wd));
        let pieces: Vec<CpuStorage> = match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let all = [x, w, b].map(|v| &v[..]);
                let all = super::contiguous_all(all, [lx, lw, lb], op)?;
                self.forward(all, d).into_iter().map(CpuStorage::F32).collect()
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let all = [x, w, b].map(|v| &v[..]);
                let all = super::contiguous_all(all, [lx, lw, lb], op)?;
                self.forward(all, d).into_iter().map(CpuStorage::F64).collect()
            }
            _ => candle_core::bail!("{op}: expected three f32 or three f64 inputs"),
        };
        Ok(pieces.into_iter().map(|p| (p, shape.clone())).collect())
    }

    fn bwd(&self, t: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        match t[0].dtype() {
            DType::F32 => self.gradients::<f32>(t, grads),
            DType::F64 => self.gradients::<f64>(t, grads),
            dt => candle_core::bail!("{}: {dt:?} (f32 and f64 only)", self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use candle_core::{backprop::GradStore, Var};

    use super::*;
    use crate::residual::add;
    use crate::tape::{self, Reads};
    use crate::testing::random;

    fn values(store: &GradStore, v: &Var) -> Vec<f64> {
        let t = store.get(v.as_tensor()).expect("a gradient");
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// Pieces 0 and 2 of 3 summed, piece 1 unused: the tape's gradients of
    /// (x, weight, bias) are those of batch norm, ReLU and narrow in candle's
    /// graph. (Equal as numbers: where a gradient is -0, candle's sum of it
    /// into zeros gives +0.)
    #[test]
    fn gives_the_gradients_of_batch_norm_relu_and_narrow() {
        let (x, w, b) = (
            Var::from_tensor(&random(&[2, 6, 3, 4], 1)).unwrap(),
            Var::from_tensor(&random(&[6], 2)).unwrap(),
            Var::from_tensor(&random(&[6], 3)).unwrap(),
        );
        let g = random(&[2, 2, 3, 4], 4);
        let bn = || BatchNormTrain {
            eps: 1e-5,
            relu: true,
            stats: Arc::new(Mutex::new(None)),
        };
        let y = tape::op3(x.as_tensor(), w.as_tensor(), b.as_tensor(), bn(), Reads::ALL).unwrap();
        let sum = (y.narrow(1, 0, 2).unwrap() + y.narrow(1, 4, 2).unwrap()).unwrap();
        let graph = (sum * &g).unwrap().sum_all().unwrap().backward().unwrap();

        let op = BatchNormReluSplit {
            bn: bn(),
            width: 2,
            count: 3,
        };
        let inputs = [(x.as_tensor(), true), (w.as_tensor(), true), (b.as_tensor(), false)];
        let (sum, recorded) = tape::record(|| {
            let pieces = tape::op_any_outputs(&inputs, op, true)?;
            add(&pieces[0], &pieces[2])
        })
        .unwrap();
        // A store to add into (candle makes them only by a backward).
        let unrelated = Var::new(0.0f64, &candle_core::Device::Cpu).unwrap();
        let mut store = unrelated.as_tensor().backward().unwrap();
        recorded.backward(&sum, g, &mut store).unwrap();
        for v in [&x, &w, &b] {
            assert!(values(&graph, v).iter().any(|&u| u != 0.0));
            assert_eq!(values(&graph, v), values(&store, v));
        }
    }
}
