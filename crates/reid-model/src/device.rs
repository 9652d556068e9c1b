//! Which device a command runs on, parsed once from `cpu`, `cuda` or `cuda:N`.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// A device name as users write it (`--device`, `run.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device; a CPU-only build says how to get a CUDA one.
    pub fn open(self) -> candle_core::Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    candle_core::bail!(
                        "--device {self}: this reid was built without CUDA; build it with `cargo build --release --features cuda,cudnn` (docs/GPU.md)"
                    );
                }
                let device = Device::new_cuda_with_stream(n).map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "--device {self}: cannot open CUDA device {n} ({e}); check the GPU and its driver with nvidia-smi, and that LD_LIBRARY_PATH holds the CUDA libraries (docs/GPU.md)"
                    ))
                })?;
                #[cfg(feature = "cuda")]
                cuda_setup::tune(&device)?;
                Ok(device)
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(0) => f.write_str("cuda"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device '{other}' (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }
}

/// The settings of a CUDA device opened by [`DeviceSpec::open`].
#[cfg(feature = "cuda")]
mod cuda_setup {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    fn env_on(name: &str) -> bool {
        std::env::var(name).as_deref() == Ok("1")
    }

    /// All of the device's work goes through one stream (`new_cuda_with_stream`),
    /// in the order the host issues it, so cudarc's per-buffer events (created with
    /// every allocation and recorded at every launch, to order several streams) are
    /// turned off unless `REID_CUDA_EVENTS=1`. The stream-ordered memory pool keeps
    /// what it has allocated across synchronisations (by default it hands memory
    /// back to the driver at each one) unless `REID_CUDA_POOL_TRIM=1`.
    pub fn tune(device: &Device) -> candle_core::Result<()> {
        let cuda = device.as_cuda_device()?;
        if !env_on("REID_CUDA_EVENTS") {
            // SAFETY: this device has one stream, so stream order alone orders every
            // use of a buffer after its allocation and before its free.
            unsafe { cuda.disable_event_tracking() };
        }
        if !env_on("REID_CUDA_POOL_TRIM") {
            let stream = cuda.cuda_stream();
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            let mut keep = u64::MAX;
            // SAFETY: `pool` and `keep` outlive the calls, which read and write only them.
            let status = unsafe {
                match sys::cuDeviceGetDefaultMemPool(&mut pool, stream.context().cu_device()) {
                    sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        (&mut keep as *mut u64).cast(),
                    ),
                    other => other,
                }
            };
            if status != sys::CUresult::CUDA_SUCCESS {
                tracing::warn!("CUDA memory pool: cannot set its release threshold ({status:?})");
            }
        }
        Ok(())
    }
}
