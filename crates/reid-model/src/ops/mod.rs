//! Operations candle 0.11 lacks or gets wrong for training, with their backward.

pub mod pool;

pub use pool::{avg_pool2d, max_pool2d};
