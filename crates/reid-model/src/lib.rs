//! The re-ID network in candle: Res2Net and ResNet backbones with timm's parameter
//! names, the identification and verification heads, the weighted loss, and
//! weight loading (local safetensors or the Hugging Face hub cache).

pub mod arch;
pub mod backbone;
pub mod heads;
pub mod layers;
pub mod model;
pub mod ops;
pub mod weights;

pub use arch::{Arch, BlockKind, ARCHS};
pub use heads::{LossWeights, PairLoss, PairTargets};
pub use model::{ModelConfig, ReidModel};
pub use weights::{LoadScope, WeightError, WeightSource};

/// A 64-bit seed from (seed, index) by SplitMix64 mixing, for per-variable and
/// per-sample generators.
pub fn seed_for(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x6A09_E667_F3BC_C909);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
