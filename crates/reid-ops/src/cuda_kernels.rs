//! This crate's CUDA kernels: CUDA C sources compiled by NVRTC on first use,
//! once per process, and loaded per device by candle.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, Layout, Result, WithDType};

/// Threads per block of every kernel here.
pub(crate) const BLOCK: u32 = 256;

/// A grid-stride loop over `n` items: blocks of [`BLOCK`] threads, at most 8192.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK).clamp(1, 8192), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous values of a storage of T, or an error naming `op`.
pub(crate) fn contiguous_view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("{op} on CUDA: operands must be contiguous"),
    }
}

/// One CUDA C source and its PTX, compiled when first asked for.
pub(crate) struct Kernels {
    module: &'static str,
    source: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl Kernels {
    pub(crate) const fn new(module: &'static str, source: &'static str) -> Self {
        Kernels {
            module,
            source,
            ptx: OnceLock::new(),
        }
    }

    /// The PTX of the source (an error naming the module if NVRTC fails).
    pub(crate) fn ptx(&self) -> Result<&str> {
        self.ptx
            .get_or_init(|| {
                compile_ptx_with_opts(self.source, CompileOptions::default())
                    .map(|p| p.to_src())
                    .map_err(|e| e.to_string())
            })
            .as_deref()
            .map_err(|e| candle_core::Error::Msg(format!("{}: NVRTC failed: {e}", self.module)))
    }

    /// Kernel `name`, suffixed by T's dtype (`bn_stats_f32`), on `dev`.
    pub(crate) fn get<T: WithDType>(&self, dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        let name = format!("{name}_{}", T::DTYPE.as_str());
        Ok(dev
            .get_or_load_custom_func(&name, self.module, self.ptx()?)?
            .into_cuda_function())
    }
}
