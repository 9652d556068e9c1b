//! The backbone's own backward: a tape of the training forward's ops, replayed in
//! reverse with each gradient written once.
//!
//! candle's `Tensor::backward` starts every gradient as a tensor of zeros and adds
//! each contribution to it, pads each Res2Net split's gradient to the whole width
//! before adding it, and keeps every activation alive until the backward ends. On
//! the tape, a gradient that has one contribution is that contribution; a split's
//! gradient is one concatenation of its pieces'; and each op's tensors are freed
//! once its backward has run, as PyTorch frees saved tensors.
//!
//! The ops still build candle's graph as they run (their backward functions ask
//! `track_op()` whether an input needs a gradient), but nothing walks it. The
//! custom ops record themselves through [`op1`], [`op2`] and [`op3`]; the few
//! candle ops of the backbone through [`add`], [`cat_channels`],
//! [`split_channels`] and [`spatial_mean`]. An op that reaches the tape with an
//! input from outside it (a candle op that did not record itself) is an error at
//! once, never a gradient silently lost.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Tensor, TensorId};

type Op1 = Arc<Box<dyn CustomOp1 + Send + Sync>>;
type Op2 = Arc<Box<dyn CustomOp2 + Send + Sync>>;
type Op3 = Arc<Box<dyn CustomOp3 + Send + Sync>>;

/// One recorded op and the tensors its backward needs.
enum Step {
    Op1(Op1, Tensor),
    Op2(Op2, [Tensor; 2]),
    Op3(Op3, [Tensor; 3]),
    /// `a + b`: both get the output's gradient.
    Add([Tensor; 2]),
    /// Concatenation of these tensors along the channels.
    Cat(Vec<Tensor>),
    /// This tensor's channels cut into the entry's outputs, in order.
    Split(Tensor),
    /// The mean over the two spatial dimensions of this [N, C, H, W] tensor.
    SpatialMean(Tensor),
}

struct Entry {
    step: Step,
    outputs: Vec<Tensor>,
}

/// The ops of one forward, in the order they ran.
#[derive(Default)]
pub struct Tape {
    entries: Vec<Entry>,
    /// Ids of every tensor an entry produced.
    produced: HashSet<TensorId>,
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tape({} ops)", self.entries.len())
    }
}

thread_local! {
    static RECORDING: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Runs the forward `f` with its ops recorded on a new tape, returned beside its
/// result. Ops run on this thread only are recorded.
pub fn record<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, Tape)> {
    let outer = RECORDING.with(|r| r.replace(Some(Tape::default())));
    let result = f();
    let tape = RECORDING.with(|r| r.replace(outer)).expect("the tape set above");
    Ok((result?, tape))
}

/// Appends `step` and its `outputs` to this thread's tape, if one records.
fn push(step: impl FnOnce() -> Step, outputs: &[&Tensor], inputs: &[&Tensor]) -> Result<()> {
    RECORDING.with(|r| match r.borrow_mut().as_mut() {
        Some(tape) => tape.push(step(), outputs, inputs),
        None => Ok(()),
    })
}

impl Tape {
    fn push(&mut self, step: Step, outputs: &[&Tensor], inputs: &[&Tensor]) -> Result<()> {
        for x in inputs {
            if x.track_op() && !x.is_variable() && !self.produced.contains(&x.id()) {
                candle_core::bail!(
                    "tape: an input of shape {:?} comes from an op that was not recorded",
                    x.dims()
                );
            }
        }
        self.produced.extend(outputs.iter().map(|t| t.id()));
        let outputs = outputs.iter().map(|t| (*t).clone()).collect();
        self.entries.push(Entry { step, outputs });
        Ok(())
    }

    /// Runs the ops backward from `grad`, the gradient of `output`, and adds each
    /// variable's gradient into `store`. Each op's tensors are freed once its
    /// backward has run.
    pub fn backward(mut self, output: &Tensor, grad: Tensor, store: &mut GradStore) -> Result<()> {
        let mut pass = Pass::new(&self.produced, output, grad);
        while let Some(entry) = self.entries.pop() {
            pass.step_back(&entry)?;
        }
        pass.finish(store)
    }

    /// [`Tape::backward`], keeping the tape for another backward.
    pub fn backward_kept(&self, output: &Tensor, grad: Tensor, store: &mut GradStore) -> Result<()> {
        let mut pass = Pass::new(&self.produced, output, grad);
        for entry in self.entries.iter().rev() {
            pass.step_back(entry)?;
        }
        pass.finish(store)
    }
}

/// The gradients of one backward so far.
struct Pass<'a> {
    produced: &'a HashSet<TensorId>,
    /// Gradients of tensors the tape produced, until their op's backward takes them.
    pending: HashMap<TensorId, Tensor>,
    /// Gradients of variables, in the order they were first reached.
    variables: Vec<(TensorId, Tensor)>,
    variable_index: HashMap<TensorId, usize>,
}

impl<'a> Pass<'a> {
    fn new(produced: &'a HashSet<TensorId>, output: &Tensor, grad: Tensor) -> Self {
        Pass {
            produced,
            pending: HashMap::from([(output.id(), grad)]),
            variables: Vec::new(),
            variable_index: HashMap::new(),
        }
    }

    /// Adds `grad` to `x`'s gradient: the first contribution is kept as it is,
    /// later ones are added (as candle's `0 + a + b`, without the zeros).
    fn add_to(&mut self, x: &Tensor, grad: Tensor) -> Result<()> {
        if x.is_variable() {
            match self.variable_index.get(&x.id()) {
                Some(&i) => self.variables[i].1 = (&self.variables[i].1 + &grad)?,
                None => {
                    self.variable_index.insert(x.id(), self.variables.len());
                    self.variables.push((x.id(), grad));
                }
            }
        } else if self.produced.contains(&x.id()) {
            let sum = match self.pending.remove(&x.id()) {
                Some(before) => (&before + &grad)?,
                None => grad,
            };
            self.pending.insert(x.id(), sum);
        }
        Ok(())
    }

    fn add_some(&mut self, x: &Tensor, grad: Option<Tensor>) -> Result<()> {
        match grad {
            Some(g) => self.add_to(x, g),
            None => Ok(()),
        }
    }

    /// The backward of one entry, if a gradient reached any of its outputs.
    fn step_back(&mut self, entry: &Entry) -> Result<()> {
        let grads: Vec<Option<Tensor>> = entry.outputs.iter().map(|t| self.pending.remove(&t.id())).collect();
        if grads.iter().all(Option::is_none) {
            return Ok(());
        }
        if let Step::Split(x) = &entry.step {
            return self.split_back(x, &entry.outputs, grads);
        }
        let (out, grad) = (
            &entry.outputs[0],
            grads.into_iter().next().flatten().expect("one output"),
        );
        match &entry.step {
            Step::Op1(op, x) => {
                let g = op.bwd(x, out, &grad)?;
                self.add_some(x, g)
            }
            Step::Op2(op, [a, b]) => {
                let (ga, gb) = op.bwd(a, b, out, &grad)?;
                self.add_some(a, ga)?;
                self.add_some(b, gb)
            }
            Step::Op3(op, [a, b, c]) => {
                let (ga, gb, gc) = op.bwd(a, b, c, out, &grad)?;
                self.add_some(a, ga)?;
                self.add_some(b, gb)?;
                self.add_some(c, gc)
            }
            Step::Add([a, b]) => {
                self.add_to(a, grad.clone())?;
                self.add_to(b, grad)
            }
            Step::Cat(parts) => {
                let mut start = 0;
                for p in parts {
                    let len = p.dim(1)?;
                    self.add_to(p, grad.narrow(1, start, len)?.contiguous()?)?;
                    start += len;
                }
                Ok(())
            }
            Step::SpatialMean(x) => {
                let (n, c, h, w) = x.dims4()?;
                let scaled = (grad * (1.0 / (h * w) as f64))?;
                self.add_to(x, scaled.reshape((n, c, 1, 1))?.broadcast_as(x.shape())?.contiguous()?)
            }
            Step::Split(_) => unreachable!("handled above"),
        }
    }

    /// A split's gradient: its pieces' gradients (zeros for a piece none reached)
    /// side by side.
    fn split_back(&mut self, x: &Tensor, pieces: &[Tensor], grads: Vec<Option<Tensor>>) -> Result<()> {
        let grads = pieces
            .iter()
            .zip(grads)
            .map(|(p, g)| g.map_or_else(|| p.zeros_like(), Ok))
            .collect::<Result<Vec<_>>>()?;
        self.add_to(x, Tensor::cat(&grads, 1)?)
    }

    /// Adds the variables' gradients into `store`.
    fn finish(self, store: &mut GradStore) -> Result<()> {
        for (id, grad) in self.variables {
            let sum = match store.get_id(id) {
                Some(before) => (before + &grad)?,
                None => grad,
            };
            store.insert_id(id, sum);
        }
        Ok(())
    }
}

/// `x.apply_op1(op)`, recorded on this thread's tape if one records.
pub fn op1(x: &Tensor, op: impl CustomOp1 + Send + Sync + 'static) -> Result<Tensor> {
    let op: Op1 = Arc::new(Box::new(op));
    let out = x.apply_op1_arc(op.clone())?;
    push(|| Step::Op1(op, x.clone()), &[&out], &[x])?;
    Ok(out)
}

/// `a.apply_op2(b, op)`, recorded on this thread's tape if one records.
pub fn op2(a: &Tensor, b: &Tensor, op: impl CustomOp2 + Send + Sync + 'static) -> Result<Tensor> {
    let op: Op2 = Arc::new(Box::new(op));
    let out = a.apply_op2_arc(b, op.clone())?;
    push(|| Step::Op2(op, [a.clone(), b.clone()]), &[&out], &[a, b])?;
    Ok(out)
}

/// `a.apply_op3(b, c, op)`, recorded on this thread's tape if one records.
pub fn op3(a: &Tensor, b: &Tensor, c: &Tensor, op: impl CustomOp3 + Send + Sync + 'static) -> Result<Tensor> {
    let op: Op3 = Arc::new(Box::new(op));
    let out = a.apply_op3_arc(b, c, op.clone())?;
    push(|| Step::Op3(op, [a.clone(), b.clone(), c.clone()]), &[&out], &[a, b, c])?;
    Ok(out)
}

/// `a + b`, recorded on this thread's tape if one records.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = (a + b)?;
    push(|| Step::Add([a.clone(), b.clone()]), &[&out], &[a, b])?;
    Ok(out)
}

/// `parts` concatenated along dimension 1, recorded on this thread's tape if one
/// records.
pub fn cat_channels(parts: &[Tensor]) -> Result<Tensor> {
    let out = Tensor::cat(parts, 1)?;
    let inputs: Vec<&Tensor> = parts.iter().collect();
    push(|| Step::Cat(parts.to_vec()), &[&out], &inputs)?;
    Ok(out)
}

/// `x` cut into `count` pieces of `width` channels by `slice(x, start, len)`,
/// recorded on this thread's tape (as one split, whatever `slice` records) if
/// one records.
pub fn split_channels(
    x: &Tensor,
    width: usize,
    count: usize,
    slice: impl Fn(&Tensor, usize, usize) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let pieces = (0..count)
        .map(|i| slice(x, i * width, width))
        .collect::<Result<Vec<_>>>()?;
    if count * width != x.dim(1)? {
        candle_core::bail!("tape: {count} pieces of {width} channels from {:?}", x.dims());
    }
    let outputs: Vec<&Tensor> = pieces.iter().collect();
    push(|| Step::Split(x.clone()), &outputs, &[x])?;
    Ok(pieces)
}

/// The mean of `x` [N, C, H, W] over H and W, recorded on this thread's tape if
/// one records.
pub fn spatial_mean(x: &Tensor) -> Result<Tensor> {
    let out = x.mean((2, 3))?;
    push(|| Step::SpatialMean(x.clone()), &[&out], &[x])?;
    Ok(out)
}

/// A forward recorded on a tape, its output handed on as a new variable: the
/// leaf of candle's graph for the layers after it (the heads).
#[derive(Debug)]
pub struct TapedOutput {
    output: Tensor,
    leaf: candle_core::Var,
    tape: Tape,
}

impl TapedOutput {
    /// Runs and records `forward`; its output is copied into the leaf.
    pub fn record(forward: impl FnOnce() -> Result<Tensor>) -> Result<Self> {
        let (output, tape) = record(forward)?;
        let leaf = candle_core::Var::from_tensor(&output.detach())?;
        Ok(TapedOutput { output, leaf, tape })
    }

    /// The output, as a variable of candle's graph.
    pub fn leaf(&self) -> &Tensor {
        self.leaf.as_tensor()
    }

    /// Continues the backward whose gradients `store` holds through the tape
    /// (nothing if none reached the leaf), freeing the forward's tensors as it goes.
    pub fn backward(self, store: &mut GradStore) -> Result<()> {
        match store.remove(self.leaf.as_tensor()) {
            Some(grad) => self.tape.backward(&self.output, grad, store),
            None => Ok(()),
        }
    }

    /// [`TapedOutput::backward`], keeping the tape for another backward.
    pub fn backward_kept(&self, store: &mut GradStore) -> Result<()> {
        match store.remove(self.leaf.as_tensor()) {
            Some(grad) => self.tape.backward_kept(&self.output, grad, store),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, ModuleT, Var};

    use super::*;
    use crate::model::{is_head, ModelConfig, ReidModel};
    use crate::ops::test_tensors::random;

    /// A tiny model of `arch` in `dtype`, and images whose batch covers every
    /// block kind (a stage's first block pools its last split).
    fn model(arch: &str, dtype: DType) -> (ReidModel, Tensor) {
        let config = ModelConfig {
            arch: arch.parse().unwrap(),
            last_stride: 1,
            num_classes: 5,
            bnneck: false,
        };
        let m = ReidModel::new(config, dtype, &Device::Cpu).unwrap();
        m.initialize(7).unwrap();
        let x = random(&[4, 3, 32, 16], 8).to_dtype(dtype).unwrap();
        (m, x)
    }

    #[test]
    fn the_tape_gives_candles_gradients_bit_for_bit() {
        for arch in ["res2net_tiny", "resnet_tiny"] {
            for dtype in [DType::F32, DType::F64] {
                let (m, x) = model(arch, dtype);
                let pooled = m.backbone.forward_t(&x, true).unwrap();
                let g = random(pooled.dims(), 9).to_dtype(dtype).unwrap();
                let graph = (pooled * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let taped = TapedOutput::record(|| m.backbone.forward_t(&x, true)).unwrap();
                let mut store = (taped.leaf() * &g).unwrap().sum_all().unwrap().backward().unwrap();
                taped.backward(&mut store).unwrap();
                let mut compared = 0;
                for (name, var) in m.trainable_vars().into_iter().filter(|(n, _)| !is_head(n)) {
                    let values = |s: &GradStore| -> Vec<f64> {
                        let t = s
                            .get(var.as_tensor())
                            .unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
                        t.flatten_all()
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    };
                    let (want, got) = (values(&graph), values(&store));
                    assert!(want.iter().any(|v| *v != 0.0), "{arch} {name}: a gradient");
                    assert_eq!(want, got, "{arch} {dtype:?} {name}");
                    compared += 1;
                }
                assert!(compared > 20, "{arch}: {compared} variables compared");
            }
        }
    }

    #[test]
    fn a_kept_tape_gives_the_same_gradients_twice() {
        let (m, x) = model("res2net_tiny", DType::F64);
        let taped = TapedOutput::record(|| m.backbone.forward_t(&x, true)).unwrap();
        let run = || {
            let mut store = taped.leaf().sqr().unwrap().sum_all().unwrap().backward().unwrap();
            taped.backward_kept(&mut store).unwrap();
            let w = m.backbone.stem.conv.weight.clone();
            let g: Vec<f64> = store.get(&w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            g
        };
        let first = run();
        assert!(first.iter().any(|v| *v != 0.0));
        assert_eq!(first, run());
    }

    #[test]
    fn an_op_that_did_not_record_itself_is_an_error() {
        let w = Var::from_tensor(&random(&[2, 3], 1)).unwrap();
        let result = record(|| {
            let outside = w.as_tensor().exp()?; // candle's op, not on the tape
            add(&outside, w.as_tensor())
        });
        let err = result.unwrap_err().to_string();
        assert!(err.contains("not recorded"), "{err}");
        // Variables and recorded outputs are fine.
        let (sum, tape) = record(|| add(w.as_tensor(), w.as_tensor())).unwrap();
        assert_eq!(tape.entries.len(), 1);
        record(|| add(&sum, w.as_tensor())).unwrap_err();
    }
}
