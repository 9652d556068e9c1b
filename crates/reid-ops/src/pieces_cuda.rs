//! The CUDA side of [`crate::pieces`] (`pieces.cu`): the split and the
//! concatenation, each one launch whatever the number of pieces.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape, WithDType};

use crate::cuda_kernels::{contiguous_view as values, grid_stride as grid, Kernels};
use crate::pieces::{copyable, Cut, MAX_PIECES};

static KERNELS: Kernels = Kernels::new("reid_pieces", include_str!("pieces.cu"));

/// The pieces' device addresses, as `pieces.cu`'s `Pieces` takes them.
#[repr(C)]
#[derive(Clone, Copy)]
struct Addresses([u64; MAX_PIECES]);

// SAFETY: plain data, laid out as the kernel's struct of MAX_PIECES addresses.
unsafe impl DeviceRepr for Addresses {}

/// The addresses of `pointers` (address, guard) in order, with their guards,
/// which must live until the launch that reads them is queued.
fn addresses<G>(pointers: impl Iterator<Item = (u64, G)>) -> (Addresses, Vec<G>) {
    let mut at = Addresses([0; MAX_PIECES]);
    let mut guards = Vec::with_capacity(MAX_PIECES);
    for (slot, (ptr, guard)) in at.0.iter_mut().zip(pointers) {
        *slot = ptr;
        guards.push(guard);
    }
    (at, guards)
}

/// `x` [N, K * W, H, W'] cut into the K pieces of `cut`.
pub(crate) fn split(s: &CudaStorage, l: &Layout, cut: Cut) -> Result<Vec<(CudaStorage, Shape)>> {
    copyable!(s.dtype(), |T| split_as::<T>(s, l, cut))
}

fn split_as<T: WithDType + DeviceRepr + CudaDType>(
    s: &CudaStorage,
    l: &Layout,
    cut: Cut,
) -> Result<Vec<(CudaStorage, Shape)>> {
    let x = values::<T>(s, l, "split-pieces")?;
    let dev = s.device().clone();
    let stream = dev.cuda_stream();
    let mut outs: Vec<CudaSlice<T>> = (0..cut.count)
        // SAFETY: the kernel writes every value of every piece.
        .map(|_| unsafe { dev.alloc::<T>(cut.images * cut.piece_len()) })
        .collect::<Result<_>>()?;
    {
        let (at, _guards) = addresses(outs.iter_mut().map(|o| o.device_ptr_mut(&stream)));
        let f = KERNELS.get::<T>(&dev, "split_pieces")?;
        let [images, count, piece] = cut.kernel_sizes();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&at).arg(&images).arg(&count).arg(&piece);
        // SAFETY: the arguments of `split_pieces`; each address is a piece of
        // `images * piece` values, kept alive (and ordered) by its guard.
        unsafe { b.launch(grid(cut.total())) }.w()?;
        crate::ledger::launched(1);
    }
    let shape = cut.piece_shape();
    Ok(outs
        .into_iter()
        .map(|o| (CudaStorage::wrap_cuda_slice(o, dev.clone()), shape.clone()))
        .collect())
}

/// The K pieces of `cut` side by side: [N, K * W, H, W'].
pub(crate) fn cat(pieces: &[(&CudaStorage, &Layout)], cut: Cut) -> Result<(CudaStorage, Shape)> {
    copyable!(pieces[0].0.dtype(), |T| cat_as::<T>(pieces, cut))
}

fn cat_as<T: WithDType + DeviceRepr + CudaDType>(
    pieces: &[(&CudaStorage, &Layout)],
    cut: Cut,
) -> Result<(CudaStorage, Shape)> {
    let views = pieces
        .iter()
        .map(|(s, l)| values::<T>(s, l, "cat-pieces"))
        .collect::<Result<Vec<_>>>()?;
    let dev = pieces[0].0.device().clone();
    let stream = dev.cuda_stream();
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<T>(cut.total())? };
    {
        let (at, _guards) = addresses(views.iter().map(|v| v.device_ptr(&stream)));
        let f = KERNELS.get::<T>(&dev, "cat_pieces")?;
        let [images, count, piece] = cut.kernel_sizes();
        let mut b = stream.launch_builder(&f);
        b.arg(&at).arg(&mut y).arg(&images).arg(&count).arg(&piece);
        // SAFETY: the arguments of `cat_pieces`; each address is a piece of
        // `images * piece` values, kept alive (and ordered) by its guard.
        unsafe { b.launch(grid(cut.total())) }.w()?;
        crate::ledger::launched(1);
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), cut.whole_shape()))
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed; see batch_norm_cuda's test).
    #[test]
    fn kernels_compile() {
        let ptx = super::KERNELS.ptx().expect("NVRTC compiles pieces.cu");
        for name in ["split_pieces", "cat_pieces"] {
            for t in ["f32", "f64", "bf16"] {
                assert!(ptx.contains(&format!(".entry {name}_{t}(")), "{name}_{t} in the PTX");
            }
        }
    }
}
