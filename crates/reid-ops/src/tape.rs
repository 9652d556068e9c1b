//! The backbone's own backward: a tape of the training forward's ops, replayed in
//! reverse with each gradient written once.
//!
//! candle's `Tensor::backward` starts every gradient as a tensor of zeros and adds
//! each contribution to it, pads each Res2Net split's gradient to the whole width
//! before adding it, and its graph keeps every op's inputs alive until the
//! backward ends. On the tape, a gradient that has one contribution is that
//! contribution; a split's gradient is one concatenation of its pieces'; an op
//! keeps only what its backward reads (see [`Reads`]), and frees that once its
//! backward has run, as PyTorch does with saved tensors.
//!
//! While a tape records, the custom ops ([`op1`], [`op2`], [`op3`]) and sums
//! ([`add`]) run without candle's graph: their outputs are new leaf tensors
//! (marked as variables, so that `track_op()` still says they need a gradient).
//! The few candle ops of the backbone ([`cat_channels`], [`split_channels`],
//! [`spatial_mean`]) keep candle's graph, which holds only tensors the tape holds
//! anyway. An op that reaches the tape with an input from outside it (a candle op
//! that did not record itself) is an error at once, never a gradient silently
//! lost. The custom ops record on the CPU and on CUDA (their `cuda_fwd`), and
//! so do the ops of any number of operands ([`TapeOp`]) that have a
//! `cuda_fwd`; the others, on the CPU only.

use crate::ledger::{made, CountedContiguous};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Result, Shape, Storage, Tensor, TensorId};

type Op1 = Arc<Box<dyn CustomOp1 + Send + Sync>>;
type Op2 = Arc<Box<dyn CustomOp2 + Send + Sync>>;
type Op3 = Arc<Box<dyn CustomOp3 + Send + Sync>>;

/// An op of any number of inputs and outputs that runs only on a tape: for
/// what candle's custom ops cannot take (three operands, one output).
pub trait TapeOp: Send + Sync {
    fn name(&self) -> &'static str;

    /// The outputs from the inputs' CPU storages and layouts.
    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &candle_core::Layout)]) -> Result<Vec<(CpuStorage, Shape)>>;

    /// The outputs from the inputs' CUDA storages and layouts (an error for an
    /// op only the CPU has).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _inputs: &[(&candle_core::CudaStorage, &candle_core::Layout)],
    ) -> Result<Vec<(candle_core::CudaStorage, Shape)>> {
        candle_core::bail!("tape: {} runs on the CPU only", self.name())
    }

    /// The launches its forward makes on CUDA (one for an op only the CPU has),
    /// which the CPU's forward reports (see [`crate::ledger`]).
    fn launches(&self) -> u64 {
        1
    }

    /// The inputs' gradients, in order, from `tensors` ([inputs..., outputs...],
    /// a kept one in place of each that is not read) and the outputs' gradients
    /// (at least one of them there).
    fn bwd(&self, tensors: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>>;
}

/// An op written with candle's ops (so on any device), recorded on the tape as
/// one step whose backward is written by hand: the heads' layers and losses.
/// Without a tape its forward runs on candle's graph, which differentiates it.
pub trait TensorOp: Send + Sync {
    fn name(&self) -> &'static str;

    /// The outputs (each tensor a kernel makes reported through
    /// [`crate::ledger::made`]).
    fn fwd(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>>;

    /// As [`TapeOp::bwd`].
    fn bwd(&self, tensors: &[&Tensor], grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>>;
}

/// The gradient of a one-output [`TapeOp`].
pub(crate) fn only_grad<'a>(op: &str, grads: &'a [Option<Tensor>]) -> Result<&'a Tensor> {
    match grads {
        [Some(g)] => Ok(g),
        _ => candle_core::bail!("{op}: expected the gradient of one output"),
    }
}

/// What an op's backward reads: its inputs, in order, and its output. The
/// tensors it does not read are not kept for it; the backward gets a kept one of
/// them in their place (so it must truly not read them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reads {
    pub inputs: [bool; 3],
    pub output: bool,
}

impl Reads {
    /// Everything (the default of [`op1`], [`op2`], [`op3`]).
    pub const ALL: Reads = Reads {
        inputs: [true; 3],
        output: true,
    };
    /// The inputs, not the output.
    pub const INPUTS: Reads = Reads {
        inputs: [true; 3],
        output: false,
    };
    /// The output only.
    pub const OUTPUT: Reads = Reads {
        inputs: [false; 3],
        output: true,
    };
}

/// A tensor an op's backward gets: kept, or only named (its id, and whether it
/// is a variable of the model).
enum Saved {
    Kept(Tensor),
    Named(TensorId, bool),
}

impl Saved {
    fn new(t: &Tensor, keep: bool) -> Self {
        match keep {
            true => Saved::Kept(t.clone()),
            false => Saved::Named(t.id(), t.is_variable()),
        }
    }

    fn id(&self) -> TensorId {
        match self {
            Saved::Kept(t) => t.id(),
            Saved::Named(id, _) => *id,
        }
    }

    fn is_variable(&self) -> bool {
        match self {
            Saved::Kept(t) => t.is_variable(),
            Saved::Named(_, v) => *v,
        }
    }
}

/// One recorded custom op: the op, its inputs, its outputs.
struct Custom<Op> {
    op: Op,
    inputs: Vec<Saved>,
    outputs: Vec<Saved>,
}

impl<Op> Custom<Op> {
    /// `op` on `inputs` giving `output`, each kept where `reads` says so.
    fn new(op: Op, inputs: &[&Tensor], output: &Tensor, reads: Reads) -> Self {
        let inputs = inputs.iter().zip(reads.inputs).map(|(t, keep)| Saved::new(t, keep));
        Custom {
            op,
            inputs: inputs.collect(),
            outputs: vec![Saved::new(output, reads.output)],
        }
    }

    /// `op` on `inputs` (each with whether the backward reads it) giving
    /// `outputs` (which the backward reads if `outputs_read`).
    fn of_many(op: Op, inputs: &[(&Tensor, bool)], outputs: &[Tensor], outputs_read: bool) -> Self {
        Custom {
            op,
            inputs: inputs.iter().map(|&(t, keep)| Saved::new(t, keep)).collect(),
            outputs: outputs.iter().map(|t| Saved::new(t, outputs_read)).collect(),
        }
    }

    /// The tensors the backward gets, [inputs..., outputs...]: a kept tensor in
    /// place of each one not kept.
    fn tensors(&self) -> Vec<&Tensor> {
        let all = self.inputs.iter().chain(&self.outputs);
        let stand_in = all.clone().find_map(|s| match s {
            Saved::Kept(t) => Some(t),
            Saved::Named(..) => None,
        });
        let stand_in = stand_in.expect("an op keeps at least one tensor");
        all.map(|s| match s {
            Saved::Kept(t) => t,
            Saved::Named(..) => stand_in,
        })
        .collect()
    }
}

/// One recorded op.
enum Step {
    Op1(Custom<Op1>),
    Op2(Custom<Op2>),
    Op3(Custom<Op3>),
    OpN(Custom<Arc<dyn TapeOp>>),
    Tensors(Custom<Arc<dyn TensorOp>>),
    /// `a + b`: both get the output's gradient.
    Add([Saved; 2]),
    /// Concatenation along the channels of tensors of these channel counts.
    Cat(Vec<(Saved, usize)>),
    /// A tensor's channels cut into pieces of these shapes, in order.
    Split(Saved, Vec<Shape>),
    /// The mean over the two spatial dimensions of an [N, C, H, W] tensor.
    SpatialMean(Saved, (usize, usize, usize, usize)),
    /// A cast from this dtype.
    Cast(Saved, DType),
}

struct Entry {
    step: Step,
    outputs: Vec<TensorId>,
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

/// Runs `f` with no tape recording on this thread, whatever records here, and
/// puts the tape back after: for candle ops whose graph the tape stands in
/// for, and for a job a worker runs in the middle of another's forward
/// (rayon's work stealing).
pub fn isolated<R>(f: impl FnOnce() -> R) -> R {
    let outer = RECORDING.with(|r| r.borrow_mut().take());
    let result = f();
    RECORDING.with(|r| *r.borrow_mut() = outer);
    result
}

/// Whether a tape records on this thread.
pub fn recording() -> bool {
    RECORDING.with(|r| r.borrow().is_some())
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
        let outputs: Vec<TensorId> = outputs.iter().map(|t| t.id()).collect();
        crate::ledger::tape_op();
        self.produced.extend(&outputs);
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
    /// Gradients of the model's variables, in the order they were first reached.
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
    /// later ones are added (as candle's `0 + a + b`, without the zeros). Tensors
    /// neither produced on the tape nor variables (the images) get none.
    fn add_to(&mut self, x: &Saved, grad: Tensor) -> Result<()> {
        let id = x.id();
        if self.produced.contains(&id) {
            let sum = match self.pending.remove(&id) {
                Some(before) => made(1, &before + &grad)?,
                None => grad,
            };
            self.pending.insert(id, sum);
        } else if x.is_variable() {
            match self.variable_index.get(&id) {
                Some(&i) => self.variables[i].1 = made(1, &self.variables[i].1 + &grad)?,
                None => {
                    self.variable_index.insert(id, self.variables.len());
                    self.variables.push((id, grad));
                }
            }
        }
        Ok(())
    }

    /// [`Pass::add_to`] for each input that got a gradient.
    fn add_all(&mut self, inputs: &[Saved], grads: impl IntoIterator<Item = Option<Tensor>>) -> Result<()> {
        for (x, g) in inputs.iter().zip(grads) {
            if let Some(g) = g {
                self.add_to(x, g)?;
            }
        }
        Ok(())
    }

    /// The gradients `op` gave its `inputs`, one each, added to theirs.
    fn add_each(&mut self, op: &str, inputs: &[Saved], grads: Vec<Option<Tensor>>) -> Result<()> {
        if grads.len() != inputs.len() {
            let (got, want) = (grads.len(), inputs.len());
            candle_core::bail!("tape: {op} gave {got} gradients for {want} inputs");
        }
        self.add_all(inputs, grads)
    }

    /// The backward of one entry, if a gradient reached any of its outputs.
    fn step_back(&mut self, entry: &Entry) -> Result<()> {
        let grads: Vec<Option<Tensor>> = entry.outputs.iter().map(|id| self.pending.remove(id)).collect();
        if grads.iter().all(Option::is_none) {
            return Ok(());
        }
        match &entry.step {
            Step::Split(x, shapes) => return self.split_back(x, shapes, grads),
            Step::OpN(c) => return self.add_each(c.op.name(), &c.inputs, c.op.bwd(&c.tensors(), &grads)?),
            Step::Tensors(c) => return self.add_each(c.op.name(), &c.inputs, c.op.bwd(&c.tensors(), &grads)?),
            _ => {}
        }
        let grad = grads.into_iter().next().flatten().expect("one output");
        match &entry.step {
            Step::Op1(c) => {
                let t = c.tensors();
                let g = c.op.bwd(t[0], t[1], &grad)?;
                self.add_all(&c.inputs, [g])
            }
            Step::Op2(c) => {
                let t = c.tensors();
                let (ga, gb) = c.op.bwd(t[0], t[1], t[2], &grad)?;
                self.add_all(&c.inputs, [ga, gb])
            }
            Step::Op3(c) => {
                let t = c.tensors();
                let (ga, gb, gc) = c.op.bwd(t[0], t[1], t[2], t[3], &grad)?;
                self.add_all(&c.inputs, [ga, gb, gc])
            }
            Step::Add([a, b]) => {
                self.add_to(a, grad.clone())?;
                self.add_to(b, grad)
            }
            Step::Cat(parts) => {
                let mut start = 0;
                for (p, len) in parts {
                    self.add_to(p, grad.narrow(1, start, *len)?.contiguous_counted()?)?;
                    start += len;
                }
                Ok(())
            }
            Step::Cast(x, from) => self.add_to(x, crate::ledger::cast(&grad, *from)?),
            Step::SpatialMean(x, (n, c, h, w)) => {
                let scaled = made(1, grad * (1.0 / (h * w) as f64))?;
                let spread = scaled.reshape((*n, *c, 1, 1))?.broadcast_as((*n, *c, *h, *w))?;
                self.add_to(x, spread.contiguous_counted()?)
            }
            Step::Split(..) | Step::OpN(..) | Step::Tensors(..) => unreachable!("handled above"),
        }
    }

    /// A split's gradient: its pieces' gradients (zeros for a piece none reached)
    /// side by side.
    fn split_back(&mut self, x: &Saved, shapes: &[Shape], grads: Vec<Option<Tensor>>) -> Result<()> {
        let some = grads
            .iter()
            .flatten()
            .next()
            .expect("a gradient reached the split")
            .clone();
        let grads = shapes
            .iter()
            .zip(grads)
            .map(|(shape, g)| {
                g.map_or_else(
                    || {
                        crate::ledger::zero_filled(1);
                        made(1, Tensor::zeros(shape, some.dtype(), some.device()))
                    },
                    Ok,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.add_to(x, made(grads.len() as u64, Tensor::cat(&grads, 1))?)
    }

    /// Adds the variables' gradients into `store`.
    fn finish(self, store: &mut GradStore) -> Result<()> {
        for (id, grad) in self.variables {
            let sum = match store.get_id(id) {
                Some(before) => made(1, before + &grad)?,
                None => grad,
            };
            store.insert_id(id, sum);
        }
        Ok(())
    }
}

/// A new leaf tensor of an op's result: no graph, marked as a variable so that
/// `track_op()` says it needs a gradient.
fn device_leaf((storage, shape): (Storage, Shape)) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), true)
}

/// The error of an op given operands on devices it does not record on.
fn elsewhere<T>(op: &str) -> Result<T> {
    candle_core::bail!("tape: {op} records on the CPU and CUDA, with every operand on one device")
}

/// A custom op's forward on its operands' device: `cpu_fwd` or `cuda_fwd`.
macro_rules! forward_on {
    ($op:expr, [$(($s:ident, $l:ident)),+]) => {
        match ($(&*$s,)+) {
            ($(Storage::Cpu($s),)+) => $op.cpu_fwd($($s, $l),+).map(|(s, sh)| (Storage::Cpu(s), sh)),
            #[cfg(feature = "cuda")]
            ($(Storage::Cuda($s),)+) => $op.cuda_fwd($($s, $l),+).map(|(s, sh)| (Storage::Cuda(s), sh)),
            _ => elsewhere($op.name()),
        }
    };
}

/// The CPU storage behind a guard, or an error naming `op`.
fn cpu<'a>(storage: &'a Storage, op: &str) -> Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(s) => Ok(s),
        _ => candle_core::bail!("tape: {op} records on the CPU, or on CUDA with every operand there"),
    }
}

/// `x.apply_op1(op)`, recorded on this thread's tape if one records.
pub fn op1(x: &Tensor, op: impl CustomOp1 + Send + Sync + 'static, reads: Reads) -> Result<Tensor> {
    let op: Op1 = Arc::new(Box::new(op));
    if !recording() {
        return x.apply_op1_arc(op);
    }
    let out = {
        let (s, l) = x.storage_and_layout();
        device_leaf(forward_on!(op, [(s, l)])?)
    };
    push(|| Step::Op1(Custom::new(op, &[x], &out, reads)), &[&out], &[x])?;
    Ok(out)
}

/// `a.apply_op2(b, op)`, recorded on this thread's tape if one records.
pub fn op2(a: &Tensor, b: &Tensor, op: impl CustomOp2 + Send + Sync + 'static, reads: Reads) -> Result<Tensor> {
    let op: Op2 = Arc::new(Box::new(op));
    if !recording() {
        return a.apply_op2_arc(b, op);
    }
    let out = {
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        device_leaf(forward_on!(op, [(sa, la), (sb, lb)])?)
    };
    push(|| Step::Op2(Custom::new(op, &[a, b], &out, reads)), &[&out], &[a, b])?;
    Ok(out)
}

/// `a.apply_op3(b, c, op)`, recorded on this thread's tape if one records.
pub fn op3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: impl CustomOp3 + Send + Sync + 'static,
    reads: Reads,
) -> Result<Tensor> {
    let op: Op3 = Arc::new(Box::new(op));
    if !recording() {
        return a.apply_op3_arc(b, c, op);
    }
    let out = {
        let (sa, la) = a.storage_and_layout();
        let ((sb, lb), (sc, lc)) = (b.storage_and_layout(), c.storage_and_layout());
        device_leaf(forward_on!(op, [(sa, la), (sb, lb), (sc, lc)])?)
    };
    push(
        || Step::Op3(Custom::new(op, &[a, b, c], &out, reads)),
        &[&out],
        &[a, b, c],
    )?;
    Ok(out)
}

/// `op` on `inputs` (each with whether its backward reads it), recorded on this
/// thread's tape; an error where none records. Its one output is returned.
pub fn op_any_inputs(inputs: &[(&Tensor, bool)], op: impl TapeOp + 'static, output_read: bool) -> Result<Tensor> {
    let name = op.name();
    match <[Tensor; 1]>::try_from(op_any_outputs(inputs, op, output_read)?) {
        Ok([out]) => Ok(out),
        Err(outs) => candle_core::bail!("tape: {name} gave {} outputs, not one", outs.len()),
    }
}

/// [`op_any_inputs`] for an op of any number of outputs (which its backward reads if
/// `outputs_read`).
pub fn op_any_outputs(
    inputs: &[(&Tensor, bool)],
    op: impl TapeOp + 'static,
    outputs_read: bool,
) -> Result<Vec<Tensor>> {
    let op: Arc<dyn TapeOp> = Arc::new(op);
    if !recording() {
        candle_core::bail!("tape: {} runs only while a tape records", op.name());
    }
    let outs = forward_any(&*op, inputs)?;
    let tensors: Vec<&Tensor> = inputs.iter().map(|(t, _)| *t).collect();
    let outputs: Vec<&Tensor> = outs.iter().collect();
    push(
        || Step::OpN(Custom::of_many(op, inputs, &outs, outputs_read)),
        &outputs,
        &tensors,
    )?;
    Ok(outs)
}

/// `op` on `inputs` (each with whether its backward reads it), recorded on this
/// thread's tape (its outputs, which the backward reads if `outputs_read`, cut
/// from candle's graph); on candle's graph where no tape records.
pub fn op_tensors(inputs: &[(&Tensor, bool)], op: impl TensorOp + 'static, outputs_read: bool) -> Result<Vec<Tensor>> {
    let tensors: Vec<&Tensor> = inputs.iter().map(|(t, _)| *t).collect();
    if !recording() {
        return op.fwd(&tensors);
    }
    let outs = isolated(|| op.fwd(&tensors))?;
    let outs: Vec<Tensor> = outs.iter().map(Tensor::detach).collect();
    let op: Arc<dyn TensorOp> = Arc::new(op);
    let outputs: Vec<&Tensor> = outs.iter().collect();
    push(
        || Step::Tensors(Custom::of_many(op, inputs, &outs, outputs_read)),
        &outputs,
        &tensors,
    )?;
    Ok(outs)
}

/// The outputs of `op` on `inputs`, on their device (CPU, or CUDA with the
/// `cuda` feature), as new leaf tensors (each reported to the ledger).
fn forward_any(op: &dyn TapeOp, inputs: &[(&Tensor, bool)]) -> Result<Vec<Tensor>> {
    let outs = forward_on_device(op, inputs)?;
    for t in &outs {
        crate::ledger::allocated(t.elem_count(), t.dtype());
    }
    Ok(outs)
}

/// [`forward_any`]'s outputs, not yet reported.
fn forward_on_device(op: &dyn TapeOp, inputs: &[(&Tensor, bool)]) -> Result<Vec<Tensor>> {
    let guards: Vec<_> = inputs.iter().map(|(t, _)| t.storage_and_layout()).collect();
    #[cfg(feature = "cuda")]
    if guards.iter().all(|(s, _)| matches!(&**s, Storage::Cuda(_))) {
        let views: Vec<_> = guards
            .iter()
            .map(|(s, l)| match &**s {
                Storage::Cuda(s) => (s, *l),
                _ => unreachable!("all on CUDA"),
            })
            .collect();
        let results = op.cuda_fwd(&views)?;
        let on_cuda = |(s, shape)| device_leaf((Storage::Cuda(s), shape));
        return Ok(results.into_iter().map(on_cuda).collect());
    }
    let views = guards
        .iter()
        .map(|(s, l)| Ok((cpu(s, op.name())?, *l)))
        .collect::<Result<Vec<_>>>()?;
    let results = op.cpu_fwd(&views)?;
    crate::ledger::launched(op.launches());
    let on_cpu = |(s, shape)| device_leaf((Storage::Cpu(s), shape));
    Ok(results.into_iter().map(on_cpu).collect())
}

/// The outputs of `op` on `inputs` (on their device), not recorded: for a
/// backward that runs another op's forward.
pub(crate) fn run(op: &dyn TapeOp, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    let inputs: Vec<(&Tensor, bool)> = inputs.iter().map(|t| (*t, false)).collect();
    let outs = forward_any(op, &inputs)?;
    Ok(outs.iter().map(Tensor::detach).collect())
}

/// `a + b`, recorded on this thread's tape if one records (by `sum`, the op
/// that adds, so that the output holds neither).
pub fn add(a: &Tensor, b: &Tensor, sum: impl CustomOp2 + Send + Sync + 'static) -> Result<Tensor> {
    if !recording() {
        return a + b;
    }
    let out = {
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        device_leaf(forward_on!(sum, [(sa, la), (sb, lb)])?)
    };
    push(
        || Step::Add([Saved::new(a, false), Saved::new(b, false)]),
        &[&out],
        &[a, b],
    )?;
    Ok(out)
}

/// `parts` concatenated along dimension 1, recorded on this thread's tape if one
/// records.
pub fn cat_channels(parts: &[Tensor]) -> Result<Tensor> {
    // On CUDA, one copy per part.
    let out = made(parts.len() as u64, isolated(|| Tensor::cat(parts, 1)))?;
    let channels = parts.iter().map(|p| p.dim(1)).collect::<Result<Vec<_>>>()?;
    let step = || Step::Cat(parts.iter().map(|p| Saved::new(p, false)).zip(channels).collect());
    let inputs: Vec<&Tensor> = parts.iter().collect();
    push(step, &[&out], &inputs)?;
    Ok(out)
}

/// `x` cut into `count` pieces of `width` channels by `slice(x, start, len)`,
/// recorded on this thread's tape (as one split) if one records.
pub fn split_channels(
    x: &Tensor,
    width: usize,
    count: usize,
    slice: impl Fn(&Tensor, usize, usize) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    if count * width != x.dim(1)? {
        candle_core::bail!("split: {count} pieces of {width} channels from {:?}", x.dims());
    }
    let pieces = isolated(|| {
        (0..count)
            .map(|i| slice(x, i * width, width))
            .collect::<Result<Vec<_>>>()
    })?;
    let step = || Step::Split(Saved::new(x, false), pieces.iter().map(|p| p.shape().clone()).collect());
    let outputs: Vec<&Tensor> = pieces.iter().collect();
    push(step, &outputs, &[x])?;
    Ok(pieces)
}

/// The mean of `x` [N, C, H, W] over H and W, recorded on this thread's tape if
/// one records.
pub fn spatial_mean(x: &Tensor) -> Result<Tensor> {
    // On CUDA, the sum, then the division.
    let out = made(2, isolated(|| x.mean((2, 3))))?;
    let dims = x.dims4()?;
    push(|| Step::SpatialMean(Saved::new(x, false), dims), &[&out], &[x])?;
    Ok(out)
}

/// `x` cast to `dtype` (one launch, counted as a cast), recorded: its backward
/// casts the gradient back. The same tensor where `x` already is `dtype`.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let out = isolated(|| crate::ledger::cast(x, dtype))?;
    push(|| Step::Cast(Saved::new(x, false), x.dtype()), &[&out], &[x])?;
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
    use candle_core::Var;

    use super::*;
    use crate::testing::random;

    #[test]
    fn an_op_that_did_not_record_itself_is_an_error() {
        let w = Var::from_tensor(&random(&[2, 3], 1)).unwrap();
        let result = record(|| {
            let outside = w.as_tensor().exp()?; // candle's op, not on the tape
            crate::residual::add(&outside, w.as_tensor())
        });
        let err = result.unwrap_err().to_string();
        assert!(err.contains("not recorded"), "{err}");
        // Variables and recorded outputs are fine.
        let (_, tape) = record(|| {
            let sum = crate::residual::add(w.as_tensor(), w.as_tensor())?;
            crate::residual::add(&sum, w.as_tensor())
        })
        .unwrap();
        assert_eq!(tape.entries.len(), 2);
    }
}
