//! The heads' layers and losses as ops of the tape ([`TensorOp`]): the forward
//! by candle's ops, each new tensor reported to the ledger with the launches it
//! makes on CUDA, and the backward written by hand, so that a step whose
//! backbone records on the tape runs no candle backward at all (whose launches
//! cannot be counted, and which starts every gradient as zeros). Without a tape
//! the same forwards run on candle's graph.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use reid_ops::ledger::made;
use reid_ops::tape::{op_tensors, TensorOp};

/// The one output of `outs`.
fn only(op: &str, outs: Vec<Tensor>) -> Result<Tensor> {
    match <[Tensor; 1]>::try_from(outs) {
        Ok([t]) => Ok(t),
        Err(v) => candle_core::bail!("{op}: {} outputs, not one", v.len()),
    }
}

/// The gradient of a one-output op.
fn the_grad<'a>(op: &str, grads: &'a [Option<Tensor>]) -> Result<&'a Tensor> {
    match grads {
        [Some(g)] => Ok(g),
        _ => candle_core::bail!("{op}: expected the gradient of its one output"),
    }
}

/// A tensor of `shape` filled with `v` (one launch), f32 or f64.
fn filled(v: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let t = match dtype {
        DType::F32 => Tensor::full(v as f32, shape, device),
        DType::F64 => Tensor::full(v, shape, device),
        d => candle_core::bail!("filled: {d:?} is not a float type"),
    };
    made(1, t)
}

/// The rows of `x` [2B, ...] cut into its two halves (views).
struct Halves;

impl TensorOp for Halves {
    fn name(&self) -> &'static str {
        "halves"
    }

    fn fwd(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let b = inputs[0].dim(0)? / 2;
        Ok(vec![inputs[0].narrow(0, 0, b)?, inputs[0].narrow(0, b, b)?])
    }

    fn bwd(&self, _: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let half = |g: &Option<Tensor>, other: &Option<Tensor>| match (g, other) {
            (Some(g), _) => Ok(g.clone()),
            (None, Some(o)) => made(1, o.zeros_like()),
            (None, None) => candle_core::bail!("halves: no gradient"),
        };
        let (g1, g2) = (half(&grads[0], &grads[1])?, half(&grads[1], &grads[0])?);
        // On CUDA, one copy per half.
        Ok(vec![Some(made(2, Tensor::cat(&[g1, g2], 0))?)])
    }
}

/// The two halves of the rows of `x` [2B, C].
pub fn halves(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let outs = op_tensors(&[(x, true)], Halves, false)?;
    match <[Tensor; 2]>::try_from(outs) {
        Ok([a, b]) => Ok((a, b)),
        Err(_) => candle_core::bail!("halves: two outputs expected"),
    }
}

/// `x * mask` (inverted dropout with a drawn mask).
struct Dropout(Tensor);

impl TensorOp for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn fwd(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![made(1, inputs[0] * &self.0)?])
    }

    fn bwd(&self, _: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(made(1, the_grad(self.name(), grads)? * &self.0)?)])
    }
}

/// `x * mask`.
pub fn dropout(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    only("dropout", op_tensors(&[(x, true)], Dropout(mask.clone()), false)?)
}

/// `x W^T + b` for (x [B, C], W [K, C], b [K]), its product in bf16 when asked.
struct Linear {
    bf16: bool,
}

impl TensorOp for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn fwd(&self, t: &[&Tensor]) -> Result<Vec<Tensor>> {
        let y = reid_ops::in_compute_precision(self.bf16, &[t[0], t[1]], |t| made(1, t[0].matmul(&t[1].t()?)))?;
        Ok(vec![made(1, y.broadcast_add(t[2]))?])
    }

    fn bwd(&self, t: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = the_grad(self.name(), grads)?;
        let (x, w) = (t[0], t[1]);
        let dx = made(1, g.matmul(w))?;
        let dw = made(1, g.t()?.matmul(x))?;
        let db = made(1, g.sum(0))?;
        Ok(vec![Some(dx), Some(dw), Some(db)])
    }
}

/// `x W^T + b`, the product in bf16 when `bf16`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, bf16: bool) -> Result<Tensor> {
    let inputs = [(x, true), (w, true), (b, false)];
    only("linear", op_tensors(&inputs, Linear { bf16 }, false)?)
}

/// Mean cross-entropy of logits [B, K] against `targets` [B] (u32) with label
/// smoothing `e`: `(1 - e) * nll + e * mean over classes of -log p`.
struct CrossEntropy {
    targets: Tensor,
    smoothing: f64,
    /// The forward's log-probabilities, for the backward.
    log_p: Mutex<Option<Tensor>>,
}

impl CrossEntropy {
    /// `log_softmax(logits)` along the classes (six launches).
    fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        let max = made(1, logits.max_keepdim(1))?;
        let diff = made(1, logits.broadcast_sub(&max))?;
        let sum_exp = made(1, made(1, diff.exp())?.sum_keepdim(1))?;
        made(1, diff.broadcast_sub(&made(1, sum_exp.log())?))
    }
}

impl TensorOp for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn fwd(&self, t: &[&Tensor]) -> Result<Vec<Tensor>> {
        let log_p = Self::log_softmax(t[0])?;
        let (b, k) = log_p.dims2()?;
        let picked = made(1, log_p.gather(&self.targets.unsqueeze(1)?, 1))?;
        let nll = made(1, made(1, picked.sum_all())?.affine(-1.0 / b as f64, 0.0))?;
        let e = self.smoothing;
        let loss = if e == 0.0 {
            nll
        } else {
            let uniform = made(1, made(1, log_p.sum_all())?.affine(-1.0 / (b * k) as f64, 0.0))?;
            made(1, made(1, nll * (1.0 - e))? + made(1, uniform * e)?)?
        };
        *self.log_p.lock().expect("log_p lock") = Some(log_p);
        Ok(vec![loss])
    }

    /// `g / B * (softmax - (1 - e) onehot - e / K)`.
    fn bwd(&self, _: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = the_grad(self.name(), grads)?;
        let log_p = self.log_p.lock().expect("log_p lock").clone();
        let log_p = log_p.expect("the forward ran");
        let (b, k) = log_p.dims2()?;
        let e = self.smoothing;
        let spread = made(1, made(1, log_p.exp())?.affine(1.0 / b as f64, -e / (b * k) as f64))?;
        let at_target = filled(-(1.0 - e) / b as f64, (b, 1), log_p.dtype(), log_p.device())?;
        spread.scatter_add_set(&self.targets.unsqueeze(1)?, &at_target, 1)?;
        reid_ops::ledger::launched(1); // the scatter, in place
        Ok(vec![Some(made(1, spread.broadcast_mul(g))?)])
    }
}

/// Mean cross-entropy of `logits` [B, K] against `targets` [B] with label
/// smoothing `e` (0: plain cross-entropy).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, e: f64) -> Result<Tensor> {
    let targets = reid_ops::ledger::cast(targets, DType::U32)?;
    let op = CrossEntropy {
        targets,
        smoothing: e,
        log_p: Mutex::new(None),
    };
    only("cross-entropy", op_tensors(&[(logits, true)], op, false)?)
}

/// `(a - b)^2`, element-wise.
struct SquaredDifference;

impl TensorOp for SquaredDifference {
    fn name(&self) -> &'static str {
        "squared-difference"
    }

    fn fwd(&self, t: &[&Tensor]) -> Result<Vec<Tensor>> {
        Ok(vec![made(1, made(1, t[0] - t[1])?.sqr())?])
    }

    fn bwd(&self, t: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = the_grad(self.name(), grads)?;
        let diff = made(1, t[0] - t[1])?;
        let da = made(1, made(1, diff * g)?.affine(2.0, 0.0))?;
        let db = made(1, da.neg())?;
        Ok(vec![Some(da), Some(db)])
    }
}

/// `(a - b)^2`.
pub fn squared_difference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    only(
        "squared-difference",
        op_tensors(&[(a, true), (b, true)], SquaredDifference, false)?,
    )
}

/// `sum of w_i * t_i` over scalar terms.
struct Weighted(Vec<f64>);

impl TensorOp for Weighted {
    fn name(&self) -> &'static str {
        "weighted-sum"
    }

    fn fwd(&self, t: &[&Tensor]) -> Result<Vec<Tensor>> {
        let mut total = made(1, t[0] * self.0[0])?;
        for (term, w) in t.iter().zip(&self.0).skip(1) {
            total = made(1, total + made(1, *term * *w)?)?;
        }
        Ok(vec![total])
    }

    fn bwd(&self, _: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = the_grad(self.name(), grads)?;
        self.0.iter().map(|w| Ok(Some(made(1, g * *w)?))).collect()
    }
}

/// `sum of weights[i] * terms[i]` over scalar terms.
pub fn weighted_sum(terms: &[&Tensor], weights: &[f64]) -> Result<Tensor> {
    // The backward reads none of them; the first is kept as the tape asks.
    let inputs: Vec<(&Tensor, bool)> = terms.iter().enumerate().map(|(i, t)| (*t, i == 0)).collect();
    only("weighted-sum", op_tensors(&inputs, Weighted(weights.to_vec()), false)?)
}

#[cfg(test)]
mod tests {
    use candle_core::backprop::GradStore;
    use candle_core::Var;

    use super::*;
    use reid_ops::testing::random;

    /// A loss through every op here: both halves of `x`, dropout, the two
    /// classifiers, smoothed and plain cross-entropy, and their weighted sum.
    fn loss(v: &[Var], masks: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let [x, w1, b1, w2, b2] = [0, 1, 2, 3, 4].map(|i| v[i].as_tensor());
        let (h1, h2) = halves(x)?;
        let id = cross_entropy(&linear(&dropout(&h1, masks)?, w1, b1, false)?, targets, 0.1)?;
        let square = squared_difference(&h1, &h2)?;
        let verif = cross_entropy(&linear(&square, w2, b2, false)?, &targets.clamp(0u32, 1u32)?, 0.0)?;
        weighted_sum(&[&id, &verif], &[0.5, 1.0])
    }

    #[test]
    fn the_hand_written_backward_matches_candles() {
        let shapes: [&[usize]; 5] = [&[8, 6], &[5, 6], &[5], &[2, 6], &[2]];
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Var::from_tensor(&random(s, i as u64 + 1)).unwrap())
            .collect();
        let masks = (random(&[4, 6], 9).ge(-0.5).unwrap().to_dtype(DType::F64).unwrap() * 1.5).unwrap();
        let targets = Tensor::new(&[0u32, 3, 1, 4], &Device::Cpu).unwrap();
        let on_graph = loss(&vars, &masks, &targets).unwrap();
        let graph = on_graph.backward().unwrap();
        let (on_tape, tape) = reid_ops::tape::record(|| loss(&vars, &masks, &targets)).unwrap();
        let mut store = GradStore::default();
        tape.backward(&on_tape, on_tape.ones_like().unwrap(), &mut store)
            .unwrap();
        let value = |t: &Tensor| t.to_scalar::<f64>().unwrap();
        assert_eq!(value(&on_graph), value(&on_tape), "the same forward");
        for (i, v) in vars.iter().enumerate() {
            let grad = |s: &GradStore| {
                s.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let (want, got) = (grad(&graph), grad(&store));
            assert!(want.iter().any(|g| *g != 0.0), "input {i} has a gradient");
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + a.abs()), "input {i}: {a} against {b}");
            }
        }
    }
}
