//! Operations candle 0.11 lacks or gets wrong for training, with their backward.

pub mod batch_norm;
pub mod conv;
pub mod pool;

pub use conv::conv2d;
pub use pool::{avg_pool2d, max_pool2d};
