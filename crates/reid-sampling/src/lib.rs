//! From a manifest to batches of image pairs: decoding, the evaluation and training
//! transforms, the pair sampler, and a parallel loader with bounded prefetch.

pub mod loader;
pub mod pairs;
pub mod preprocess;
pub mod resize;
pub mod transform;

pub use loader::{LoadError, LoaderConfig, PairBatch, PairLoader};
pub use pairs::{Pair, PairSampler};
pub use preprocess::{load_normalized, InputSpec, Interpolation};
pub use transform::{Augment, Chw, DecodeError, EraseFill};
