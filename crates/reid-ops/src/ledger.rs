//! The ledger: what a training step asks of the device, counted the same way on
//! the CPU and on CUDA, through this module's functions. Every read of a
//! tensor's values to the host in the step's path goes through [`read`] or
//! [`read_scalar`], and every upload of host values through [`upload`] (clippy's
//! `disallowed-methods` keeps it so); the backward reports the gradients it
//! starts as zeros ([`zero_filled`]); tape and candle's graph report the ops
//! they ran.
//!
//! Kernel launches are counted where they happen: each CUDA launch and cuDNN
//! call of this crate's ops reports itself ([`launched`]); the CPU
//! implementation of an op that has a CUDA kernel reports the launches its CUDA
//! twin makes, so that the CPU shows CUDA's count; candle's own ops report
//! through [`made`], with the launches they make on CUDA. Allocations are the
//! tensors that kernels make (outputs and gradients), with their bytes; an
//! op's per-channel scratch is not counted. candle's backward of its own graph
//! cannot be counted so (its ops are not public): where a step ran any,
//! [`Ledger::launches_counted`] is false.
//!
//! Counting is per thread (the step runs on one) and only inside [`counting`];
//! elsewhere the functions only do their work.

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Shape, Tensor, WithDType};

/// The counts of one stretch of work (see the module's documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Ledger {
    /// Reads of tensor values to the host (each a synchronisation on CUDA).
    pub device_to_host: u64,
    /// Uploads of host values to the device.
    pub host_to_device: u64,
    /// Gradients that start as a tensor of zeros (candle's backward starts every
    /// gradient of its graph so; the tape only a split's unreached piece).
    pub zero_filled_grads: u64,
    /// Ops recorded on the tape (forward; each has one backward).
    pub tape_ops: u64,
    /// Ops of candle's graph that the backward went through (views included).
    pub graph_ops: u64,
    /// Kernel launches (see the module's documentation).
    pub launches: u64,
    /// Casts from one dtype to another (each also a launch).
    pub casts: u64,
    /// Tensors made by kernels.
    pub allocations: u64,
    /// Their bytes.
    pub bytes_allocated: u64,
}

impl std::ops::AddAssign for Ledger {
    fn add_assign(&mut self, o: Ledger) {
        self.device_to_host += o.device_to_host;
        self.host_to_device += o.host_to_device;
        self.zero_filled_grads += o.zero_filled_grads;
        self.tape_ops += o.tape_ops;
        self.graph_ops += o.graph_ops;
        self.launches += o.launches;
        self.casts += o.casts;
        self.allocations += o.allocations;
        self.bytes_allocated += o.bytes_allocated;
    }
}

impl Ledger {
    /// Whether launches and allocations are all counted: nothing ran through
    /// candle's backward, whose launches cannot be seen.
    pub fn launches_counted(&self) -> bool {
        self.graph_ops == 0
    }
}

thread_local! {
    static LEDGER: RefCell<Option<Ledger>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's work counted; returns its result and the counts.
pub fn counting<R>(f: impl FnOnce() -> R) -> (R, Ledger) {
    let outer = LEDGER.with(|l| l.replace(Some(Ledger::default())));
    let result = f();
    let ledger = LEDGER.with(|l| l.replace(outer)).unwrap_or_default();
    (result, ledger)
}

/// Runs `f` on another thread through `run` (e.g. on a rayon worker), its work
/// counted here if this thread is [`counting`]. There `f` has the thread's
/// counts to itself: a worker may run it in the middle of another job (rayon's
/// work stealing), whose counts are set aside meanwhile.
pub fn carried<R: Send>(
    f: impl FnOnce() -> R + Send,
    run: impl FnOnce(Box<dyn FnOnce() -> (R, Ledger) + Send + '_>) -> (R, Ledger),
) -> R {
    let here = LEDGER.with(|l| l.borrow().is_some());
    let (result, there) = run(Box::new(move || {
        let outer = LEDGER.with(|l| l.replace(here.then(Ledger::default)));
        let result = f();
        let counted = LEDGER.with(|l| l.replace(outer)).unwrap_or_default();
        (result, counted)
    }));
    add(|l| *l += there);
    result
}

/// Adds to this thread's counts, if [`counting`].
fn add(f: impl FnOnce(&mut Ledger)) {
    LEDGER.with(|l| {
        if let Some(ledger) = l.borrow_mut().as_mut() {
            f(ledger)
        }
    })
}

/// The values of `t`, flattened, on the host: one device-to-host read.
pub fn read<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    add(|l| l.device_to_host += 1);
    #[allow(clippy::disallowed_methods)]
    t.flatten_all()?.to_vec1()
}

/// The one value of `t` on the host: one device-to-host read.
pub fn read_scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    add(|l| l.device_to_host += 1);
    #[allow(clippy::disallowed_methods)]
    t.to_scalar()
}

/// A tensor of `shape` on `device` from host `values`: one upload (none on the
/// CPU's side of things, but counted alike so that the CPU shows CUDA's count).
pub fn upload<T: WithDType, S: Into<Shape>>(values: Vec<T>, shape: S, device: &Device) -> Result<Tensor> {
    add(|l| l.host_to_device += 1);
    #[allow(clippy::disallowed_methods)]
    Tensor::from_vec(values, shape, device)
}

/// Reports a copy of device memory to the host made without a tensor (a CUDA
/// kernel's results).
pub fn copied_to_host() {
    add(|l| l.device_to_host += 1)
}

/// Reports a copy of host memory to the device made without a tensor (a CUDA
/// kernel's parameters).
pub fn copied_to_device() {
    add(|l| l.host_to_device += 1)
}

/// Reports `n` kernel launches that make no new tensor (in-place updates, or
/// the steps of an op whose output is reported by [`allocated`]).
pub fn launched(n: u64) {
    add(|l| l.launches += n)
}

/// Reports one tensor of `elements` values of `dtype` made on the device.
pub fn allocated(elements: usize, dtype: DType) {
    add(|l| {
        l.allocations += 1;
        l.bytes_allocated += (elements * dtype.size_in_bytes()) as u64;
    })
}

/// candle's op `t`, which makes one new tensor in `launches` kernel launches on
/// CUDA: counted, and handed back.
pub fn made(launches: u64, t: Result<Tensor>) -> Result<Tensor> {
    let t = t?;
    launched(launches);
    allocated(t.elem_count(), t.dtype());
    Ok(t)
}

/// The output of an op's CPU implementation, counted as `launches` launches
/// (those of its CUDA twin, so that the CPU counts as CUDA does; one for an op
/// only the CPU has) and one tensor.
pub fn cpu_output(
    launches: u64,
    r: Result<(candle_core::CpuStorage, Shape)>,
) -> Result<(candle_core::CpuStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (s, shape) = r?;
    launched(launches);
    allocated(shape.elem_count(), s.dtype());
    Ok((s, shape))
}

/// The output of a CUDA op, counted as one tensor made (its launches report
/// themselves).
#[cfg(feature = "cuda")]
pub fn cuda_output(r: Result<(candle_core::CudaStorage, Shape)>) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (s, shape) = r?;
    allocated(shape.elem_count(), s.dtype());
    Ok((s, shape))
}

/// `t.to_dtype(dtype)` counted: one launch and one tensor where the dtype
/// changes, nothing where it is already `dtype`.
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    match t.dtype() == dtype {
        true => Ok(t.clone()),
        false => {
            add(|l| l.casts += 1);
            made(1, t.to_dtype(dtype))
        }
    }
}

/// Reports a cast written into an existing tensor: one launch, one cast.
pub fn cast_in_place() {
    add(|l| {
        l.casts += 1;
        l.launches += 1;
    })
}

/// `contiguous()` counted: a copy (one launch, one tensor) where `t` is not
/// contiguous, nothing where it is.
pub trait CountedContiguous {
    fn contiguous_counted(&self) -> Result<Tensor>;
}

impl CountedContiguous for Tensor {
    fn contiguous_counted(&self) -> Result<Tensor> {
        match self.is_contiguous() {
            true => Ok(self.clone()),
            false => made(1, self.contiguous()),
        }
    }
}

/// Reports `n` gradients started as zeros.
pub fn zero_filled(n: usize) {
    add(|l| l.zero_filled_grads += n as u64)
}

/// Reports one op recorded on the tape.
pub fn tape_op() {
    add(|l| l.tape_ops += 1)
}

/// Reports the backward of candle's graph from `root`: each of its tracked
/// tensors but the root starts its gradient as zeros.
pub fn graph_backward(root: &Tensor) {
    if LEDGER.with(|l| l.borrow().is_none()) {
        return;
    }
    let nodes = root.sorted_nodes().len() as u64;
    add(|l| {
        l.graph_ops += nodes;
        l.zero_filled_grads += nodes.saturating_sub(1);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_inside_counting_only() {
        let t = upload(vec![1.0f32, 2.0], 2, &Device::Cpu).unwrap();
        let ((), ledger) = counting(|| {
            let t2 = upload(vec![3.0f32], 1, &Device::Cpu).unwrap();
            read::<f32>(&t).unwrap();
            read_scalar::<f32>(&t2.sum_all().unwrap()).unwrap();
            zero_filled(2);
        });
        assert_eq!(ledger.host_to_device, 1);
        assert_eq!(ledger.device_to_host, 2);
        assert_eq!(ledger.zero_filled_grads, 2);
        let v = candle_core::Var::from_tensor(&t).unwrap();
        let y = v.as_tensor().exp().unwrap().exp().unwrap();
        let ((), ledger) = counting(|| graph_backward(&y));
        // y <- exp <- v: the root's gradient is ones, the other two zeros.
        assert_eq!((ledger.graph_ops, ledger.zero_filled_grads), (3, 2));
    }
}
