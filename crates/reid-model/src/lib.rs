//! The re-ID network in candle: Res2Net and ResNet backbones with timm's parameter
//! names, the identification and verification heads, the weighted loss, and
//! weight loading (local safetensors or the Hugging Face hub cache).

pub mod arch;
pub mod backbone;
pub mod checkpoint;
pub mod device;
pub mod heads;
pub mod layers;
pub mod metric;
pub mod model;
pub mod weights;

pub use arch::{Arch, BlockKind, ARCHS};
pub use checkpoint::CheckpointInfo;
pub use device::DeviceSpec;
pub use heads::{LossSettings, PairLoss, PairTargets, Term};
pub use metric::{Negatives, TripletMargin};
pub use model::{ModelConfig, ReidModel};
pub use weights::{LoadScope, WeightError, WeightSource};
