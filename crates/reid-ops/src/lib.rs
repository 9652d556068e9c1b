//! The kernels of `reid`'s network: operations candle 0.11 lacks or gets wrong
//! for training, each with its backward (CPU kernels, CUDA kernels behind the
//! `cuda` and `cudnn` features, and device-generic compositions of candle ops),
//! and the tape that replays the training forward's ops in reverse.
//!
//! This crate knows nothing of the model: it depends on candle (and cudarc)
//! only. `reid-model` builds the network from these ops.

// Tests read and build tensors freely; the library's reads go through `ledger`.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

use std::mem::MaybeUninit;

use candle_core::{Layout, Result};
use rayon::prelude::*;

/// The values of a contiguous `layout` in `data`; an error naming `op` otherwise.
pub fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

/// The contiguous values of a tensor's storage, which must be on the CPU and of
/// type `T`; an error naming `op` otherwise.
pub(crate) fn cpu_values<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let candle_core::Storage::Cpu(s) = storage else {
        candle_core::bail!("{op}: CPU tensors only");
    };
    contiguous(T::cpu_storage_as_slice(s)?, layout, op)
}

/// (N, C, H, W) of a 4-d layout; an error naming `op` otherwise.
pub(crate) fn dims4(layout: &Layout, op: &str) -> Result<(usize, usize, usize, usize)> {
    match layout.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => candle_core::bail!("{op}: expected an NCHW tensor, got shape {d:?}"),
    }
}

/// Runs `$body` on the f32 or f64 vector of a CPU storage, wrapping the result
/// back into a storage of the same type; a bf16 vector is widened to f32 and the
/// result rounded back (see [`mixed`]).
macro_rules! float_dispatch {
    ($storage:expr, $op:expr, |$data:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32($data) => candle_core::CpuStorage::F32($body),
            candle_core::CpuStorage::F64($data) => candle_core::CpuStorage::F64($body),
            candle_core::CpuStorage::BF16(v) => {
                let wide = $crate::mixed::to_f32(v);
                let $data = &wide;
                $crate::mixed::narrowed($body, true)
            }
            _ => candle_core::bail!("{}: only f32, f64 and bf16 are supported", $op),
        }
    };
}

/// Runs `$body` on the contiguous values of two f32 or two f64 operands; where
/// either is bf16, on both as f32, the result in the first one's dtype (see
/// [`mixed`]).
macro_rules! two_floats {
    ($op:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (s1, s2) if $crate::mixed::any_bf16(&[s1, s2]) => {
                let (a, b) = (
                    $crate::mixed::widened(s1, $l1, $op)?,
                    $crate::mixed::widened(s2, $l2, $op)?,
                );
                let ($a, $b) = (&*a, &*b);
                $crate::mixed::narrowed_like(s1, $body)
            }
            (candle_core::CpuStorage::F32(a), candle_core::CpuStorage::F32(b)) => {
                let ($a, $b) = ($crate::contiguous(a, $l1, $op)?, $crate::contiguous(b, $l2, $op)?);
                candle_core::CpuStorage::F32($body)
            }
            (candle_core::CpuStorage::F64(a), candle_core::CpuStorage::F64(b)) => {
                let ($a, $b) = ($crate::contiguous(a, $l1, $op)?, $crate::contiguous(b, $l2, $op)?);
                candle_core::CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: two f32 or two f64 operands expected", $op),
        }
    };
}

/// Runs `$body` with three f32 or three f64 slices; where any is bf16, with all
/// three as f32, the result in the first one's dtype, or in f32 after `f32 =>`
/// (see [`mixed`]).
macro_rules! three_floats {
    (f32 => $op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), |$a:ident, $b:ident, $c:ident| $body:expr) => {
        three_floats!($op, ($s1, $l1), ($s2, $l2), ($s3, $l3), narrow false => |$a, $b, $c| $body)
    };
    ($op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), |$a:ident, $b:ident, $c:ident| $body:expr) => {
        three_floats!($op, ($s1, $l1), ($s2, $l2), ($s3, $l3), narrow $crate::mixed::any_bf16(&[$s1]) => |$a, $b, $c| $body)
    };
    ($op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), narrow $narrow:expr => |$a:ident, $b:ident, $c:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (s1, s2, s3) if $crate::mixed::any_bf16(&[s1, s2, s3]) => {
                let w = |s, l| $crate::mixed::widened(s, l, $op);
                let (a, b, c) = (w(s1, $l1)?, w(s2, $l2)?, w(s3, $l3)?);
                let ($a, $b, $c) = (&*a, &*b, &*c);
                $crate::mixed::narrowed($body, $narrow)
            }
            (candle_core::CpuStorage::F32(a), candle_core::CpuStorage::F32(b), candle_core::CpuStorage::F32(c)) => {
                let ($a, $b, $c) = (
                    $crate::contiguous(a, $l1, $op)?,
                    $crate::contiguous(b, $l2, $op)?,
                    $crate::contiguous(c, $l3, $op)?,
                );
                candle_core::CpuStorage::F32($body)
            }
            (candle_core::CpuStorage::F64(a), candle_core::CpuStorage::F64(b), candle_core::CpuStorage::F64(c)) => {
                let ($a, $b, $c) = (
                    $crate::contiguous(a, $l1, $op)?,
                    $crate::contiguous(b, $l2, $op)?,
                    $crate::contiguous(c, $l3, $op)?,
                );
                candle_core::CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: operands must all be f32 or all f64", $op),
        }
    };
}

/// Runs `$body` with three contiguous CUDA views, each of the activations'
/// type `A` or of the parameters' type `P` as marked (the CUDA side of
/// `three_floats!`): f32 and f32, f64 and f64, or bf16 and f32, by the first
/// operand's dtype. `$body` gives a `CudaSlice`, wrapped for `$dev`.
#[cfg(feature = "cuda")]
macro_rules! three_cuda_floats {
    ($op:expr, $dev:expr, ($s1:expr, $l1:expr, $t1:ident), ($s2:expr, $l2:expr, $t2:ident), ($s3:expr, $l3:expr, $t3:ident), |$a:ident, $b:ident, $c:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage;
        use $crate::batch_norm_cuda::view;
        macro_rules! run {
            () => {{
                let ($a, $b, $c) = (
                    &view::<$t1>($s1, $l1)?,
                    &view::<$t2>($s2, $l2)?,
                    &view::<$t3>($s3, $l3)?,
                );
                candle_core::CudaStorage::wrap_cuda_slice($body, $dev.clone())
            }};
        }
        match $s1.dtype() {
            candle_core::DType::F32 => {
                type A = f32;
                #[allow(dead_code)]
                type P = f32;
                run!()
            }
            candle_core::DType::F64 => {
                type A = f64;
                #[allow(dead_code)]
                type P = f64;
                run!()
            }
            candle_core::DType::BF16 => {
                type A = half::bf16;
                #[allow(dead_code)]
                type P = f32;
                run!()
            }
            dt => candle_core::bail!("{}: {dt:?} on CUDA (f32, f64 and bf16 only)", $op),
        }
    }};
}

pub mod batch_norm;
#[cfg(feature = "cuda")]
mod batch_norm_cuda;
pub mod channels;
pub mod conv;
#[cfg(feature = "cudnn")]
pub mod cuda;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod exec;
pub mod generic;
pub mod ledger;
pub mod mixed;
pub mod pieces;
#[cfg(feature = "cuda")]
mod pieces_cuda;
mod plane_sums;
pub mod pool;
pub mod residual;
#[cfg(feature = "cuda")]
pub mod sgd_cuda;
pub mod simd;
pub mod stem;
pub mod tape;
#[cfg(feature = "cuda")]
mod tape_ops_cuda;

/// The dtype convolutions and matrix products compute in: `bf16` is mixed
/// precision (f32 weights, optimiser state, batch-norm statistics and losses;
/// bf16 operands of convolutions and matrix products).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`, as parsed.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision '{other}' (f32 or bf16)")),
        }
    }
}

/// `op` on `operands`, in bf16 when `bf16` and they are f32 (the result cast back
/// to f32; each cast counted); as they are otherwise.
pub fn in_compute_precision(
    bf16: bool,
    operands: &[&candle_core::Tensor],
    op: impl FnOnce(&[candle_core::Tensor]) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    use candle_core::DType;
    if !(bf16 && operands.iter().all(|t| t.dtype() == DType::F32)) {
        return op(&operands.iter().map(|t| (*t).clone()).collect::<Vec<_>>());
    }
    let cast: Vec<candle_core::Tensor> = operands
        .iter()
        .map(|t| ledger::cast(t, DType::BF16))
        .collect::<Result<_>>()?;
    ledger::cast(&op(&cast)?, DType::F32)
}

/// Allows (the default, as PyTorch for convolutions) or forbids TF32 tensor cores
/// in f32 matrix products and convolutions on CUDA; no effect elsewhere.
pub fn set_tf32(allowed: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(allowed);
    #[cfg(feature = "cudnn")]
    cuda::set_reduced_precision_f32(allowed);
}

/// Whether this build has fused CUDA convolutions (the `cudnn` feature).
pub const CUDA_CONV_KERNELS: bool = cfg!(feature = "cudnn");

pub use channels::channel_slice;
pub use conv::conv2d;
pub use exec::{Exec, Kernels, OpKind, Ops};
pub use pool::{avg_pool2d, max_pool2d};
pub use residual::add_relu;

/// A vector of `len` values, each written by `fill` (given disjoint chunks of
/// `chunk` values and their index) before the vector exists: no zeroing pass.
///
/// # Safety
/// `fill` must write every value of every chunk it is given.
pub(crate) unsafe fn filled_in_chunks<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: `fill` wrote every value of every chunk (the caller's promise).
    unsafe { out.set_len(len) };
    out
}

/// A tensor of a CPU kernel's `values` on `device` (the CPU: no upload, so not
/// counted by the ledger).
pub(crate) fn cpu_result<T: candle_core::WithDType, S: Into<candle_core::Shape>>(
    values: Vec<T>,
    shape: S,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    #[allow(clippy::disallowed_methods)]
    candle_core::Tensor::from_vec(values, shape, device)
}

#[cfg(test)]
mod nonfinite_tests;

#[cfg(any(test, feature = "testing"))]
#[allow(clippy::disallowed_methods)]
pub mod testing;
