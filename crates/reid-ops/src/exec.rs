//! The execution plan: which implementation of each op a run uses, whether the
//! backbone's training forward records itself on a tape, and the precision
//! convolutions and matrix products compute in. It is chosen once (from the
//! command line or the config), handed to the model and the optimiser when they
//! are built, and read from there: no op looks at the environment.

use candle_core::{DType, Device, Tensor};

use crate::Precision;

/// Which implementation the ops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ops {
    /// The fastest the device has: the CPU's fused ops on the CPU, the CUDA
    /// kernels where CUDA has them (and the generic ops elsewhere) on CUDA.
    #[default]
    Auto,
    /// The fused ops everywhere; refused on a device that lacks some of them.
    Fused,
    /// candle's own operations everywhere (the generic ops of [`crate::generic`]).
    Generic,
    /// On the CPU, exactly the op graph CUDA runs: the CPU's fused op where CUDA
    /// has a kernel of its own, the generic one elsewhere. On CUDA, `auto`.
    AsCuda,
}

impl std::str::FromStr for Ops {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Ops::Auto),
            "fused" => Ok(Ops::Fused),
            "generic" => Ok(Ops::Generic),
            "as-cuda" => Ok(Ops::AsCuda),
            other => Err(format!("unknown ops '{other}' (auto, fused, generic or as-cuda)")),
        }
    }
}

impl std::fmt::Display for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ops::Auto => "auto",
            Ops::Fused => "fused",
            Ops::Generic => "generic",
            Ops::AsCuda => "as-cuda",
        })
    }
}

/// The families of ops whose implementation the plan picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Conv,
    /// Batch norm, alone or followed by ReLU (train and eval mode).
    BatchNorm,
    /// The ops that exist only on a tape: batch norm + ReLU + split, the 1x1
    /// convolution of pieces, and the stem.
    TapeFused,
    /// Batch norm + residual add + ReLU in one op (on a tape).
    BatchNormAddRelu,
    Pool,
    AddRelu,
    ChannelSlice,
    /// The Res2Net split and concatenation on a tape (see [`crate::pieces`]).
    Pieces,
    /// The optimiser's update of one parameter.
    Sgd,
}

impl OpKind {
    /// Whether the CUDA build (`cuda,cudnn`) has a kernel of its own for this op
    /// on `dtype`.
    pub fn has_cuda_kernel(self, dtype: DType) -> bool {
        match self {
            OpKind::Conv
            | OpKind::Pieces
            | OpKind::BatchNorm
            | OpKind::BatchNormAddRelu
            | OpKind::Pool
            | OpKind::AddRelu => {
                matches!(dtype, DType::F32 | DType::F64 | DType::BF16)
            }
            // Of f32 parameters with bf16 gradients too.
            OpKind::Sgd => matches!(dtype, DType::F32 | DType::F64),
            _ => false,
        }
    }

    /// Whether the CPU has a fused kernel of its own for this op on `dtype`:
    /// every op on f32 and f64; on bf16 (widened, see `mixed`), all but the
    /// tape-only fused ops, which run as their parts instead.
    pub fn has_cpu_kernel(self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F64) || (dtype == DType::BF16 && self != OpKind::TapeFused)
    }

    /// Whether this binary has that kernel (the features it was built with).
    fn built_for_cuda(self, dtype: DType) -> bool {
        let built = match self {
            OpKind::Conv => crate::CUDA_CONV_KERNELS,
            _ => cfg!(feature = "cuda"),
        };
        built && self.has_cuda_kernel(dtype)
    }
}

/// Which implementation runs an op: the fused kernels of this crate (CPU, or
/// CUDA's own), or the device-generic compositions of [`crate::generic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    Fused,
    Generic,
}

/// The execution plan of a run (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exec {
    pub ops: Ops,
    pub precision: Precision,
}

impl Exec {
    /// A plan of `ops` in `precision`.
    pub fn new(ops: Ops, precision: Precision) -> Self {
        Exec { ops, precision }
    }

    /// An error where `device` cannot run this plan (`fused` on CUDA, which lacks
    /// fused kernels for several ops; `as-cuda` is for the CPU and runs as `auto`
    /// on CUDA).
    pub fn check(&self, device: &Device) -> std::result::Result<(), String> {
        match (self.ops, device.is_cuda()) {
            (Ops::Fused, true) => Err(
                "--ops fused: CUDA has no fused kernels for pooling, the residual add and the \
                 tape's fused ops yet; use --ops auto"
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    /// The implementation of `op` on `device` for `dtype`.
    pub fn kernels_on(&self, op: OpKind, device: &Device, dtype: DType) -> Kernels {
        let fused = match (self.ops, device.is_cuda()) {
            (Ops::Generic, _) => false,
            (Ops::Auto | Ops::Fused, false) => device.is_cpu() && op.has_cpu_kernel(dtype),
            (Ops::AsCuda, false) => device.is_cpu() && op.has_cuda_kernel(dtype) && op.has_cpu_kernel(dtype),
            (_, true) => op.built_for_cuda(dtype),
        };
        if fused {
            Kernels::Fused
        } else {
            Kernels::Generic
        }
    }

    /// The implementation of `op` on `x`'s device and dtype.
    pub fn kernels(&self, op: OpKind, x: &Tensor) -> Kernels {
        self.kernels_on(op, x.device(), x.dtype())
    }

    /// Whether the backbone's training forward on `x` records itself on a tape:
    /// any plan but `generic`, on f32 or f64 images, on the CPU or on CUDA with
    /// the `cudnn` build, where every op it runs has a kernel for the
    /// activations' dtype (see [`Exec::activations`]). Elsewhere its backward is
    /// candle's.
    pub fn tape(&self, x: &Tensor) -> bool {
        let dtype = self.activations(x.dtype());
        let device = x.device().is_cpu() || (x.device().is_cuda() && OpKind::Conv.built_for_cuda(dtype));
        device
            && self.ops != Ops::Generic
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && self.backbone_kernels(x.device(), dtype)
    }

    /// Whether every op of the backbone has a kernel of its own on `device` for
    /// activations of `dtype`.
    fn backbone_kernels(&self, device: &Device, dtype: DType) -> bool {
        let ops = [
            OpKind::Conv,
            OpKind::BatchNorm,
            OpKind::BatchNormAddRelu,
            OpKind::Pool,
            OpKind::AddRelu,
            OpKind::Pieces,
        ];
        ops.iter()
            .all(|&op| self.kernels_on(op, device, dtype) == Kernels::Fused)
    }

    /// The dtype of the backbone's activations for images of `input`: bf16 for
    /// f32 images in bf16 precision, `input` otherwise.
    pub fn activations(&self, input: DType) -> DType {
        match (self.precision, input) {
            (Precision::Bf16, DType::F32) => DType::BF16,
            _ => input,
        }
    }

    /// The dtype of the backbone's activations for the images `x`, in train or
    /// eval mode: [`Exec::activations`] where every op of the backbone has a
    /// kernel for it on `x`'s device, else `x`'s (bf16 precision then casts each
    /// convolution's operands instead).
    pub fn activations_of(&self, x: &Tensor) -> DType {
        let dtype = self.activations(x.dtype());
        match self.backbone_kernels(x.device(), dtype) {
            true => dtype,
            false => x.dtype(),
        }
    }

    /// Whether convolutions and matrix products of f32 operands run in bf16.
    pub fn bf16(&self) -> bool {
        self.precision == Precision::Bf16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_cuda_fuses_on_the_cpu_what_cuda_has_kernels_for() {
        let cpu = Device::Cpu;
        let plan = Exec::new(Ops::AsCuda, Precision::F32);
        let k = |op| plan.kernels_on(op, &cpu, DType::F32);
        assert_eq!(k(OpKind::Conv), Kernels::Fused);
        assert_eq!(k(OpKind::BatchNorm), Kernels::Fused);
        for op in [
            OpKind::Sgd,
            OpKind::Pool,
            OpKind::AddRelu,
            OpKind::BatchNormAddRelu,
            OpKind::Pieces,
        ] {
            assert_eq!(k(op), Kernels::Fused, "{op:?}");
        }
        for op in [OpKind::TapeFused, OpKind::ChannelSlice] {
            assert_eq!(k(op), Kernels::Generic, "{op:?}");
        }
        let x = Tensor::zeros(2, DType::F32, &cpu).unwrap();
        assert!(plan.tape(&x), "CUDA's backbone records itself");
        assert!(Exec::default().tape(&x));
        let bf16 = Exec::new(Ops::Auto, Precision::Bf16);
        assert!(bf16.tape(&x), "the CPU has every op in bf16");
        assert!(Exec::new(Ops::AsCuda, Precision::Bf16).tape(&x), "and so has CUDA");
        assert_eq!(bf16.activations_of(&x), DType::BF16);
        assert_eq!(Exec::new(Ops::Generic, Precision::Bf16).activations_of(&x), DType::F32);
        assert_eq!(bf16.activations(DType::F32), DType::BF16);
        assert_eq!(bf16.activations(DType::F64), DType::F64);
        assert_eq!(bf16.kernels_on(OpKind::TapeFused, &cpu, DType::BF16), Kernels::Generic);
        let generic = Exec::new(Ops::Generic, Precision::F32);
        assert_eq!(generic.kernels(OpKind::Conv, &x), Kernels::Generic);
        assert!(!generic.tape(&x));
    }

    #[test]
    fn ops_parse_and_print_alike() {
        for s in ["auto", "fused", "generic", "as-cuda"] {
            assert_eq!(s.parse::<Ops>().unwrap().to_string(), s);
        }
        assert!("cuda".parse::<Ops>().unwrap_err().contains("as-cuda"));
    }
}
