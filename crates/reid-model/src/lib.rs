//! The re-ID network in candle: Res2Net and ResNet backbones with timm's parameter
//! names, the identification and verification heads, the weighted loss, and
//! weight loading (local safetensors or the Hugging Face hub cache).

// Tests read and build tensors freely; the library's reads go through
// `reid_ops::ledger`.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod arch;
pub mod backbone;
pub mod checkpoint;
pub mod device;
mod head_ops;
pub mod heads;
pub mod layers;
pub mod metric;
pub mod model;
pub mod weights;

pub use arch::{Arch, BlockKind, ARCHS};
pub use checkpoint::CheckpointInfo;
pub use device::DeviceSpec;
pub use heads::{LossSettings, LossValues, PairLoss, PairTargets, Term};
pub use metric::{Negatives, TripletMargin};
pub use model::{ModelConfig, ReidModel};
/// The execution plan a model is built with (see [`reid_ops::exec`]).
pub use reid_ops::{Exec, Ops, Precision};
pub use weights::{LoadScope, WeightError, WeightSource};
