//! Training the siamese re-ID network: SGD as PyTorch computes it, learning-rate
//! schedules, the training loop with logs, checkpoints and exact resume.

pub mod optim;
pub mod schedule;
pub mod step;

pub use optim::{Sgd, SgdConfig};
pub use schedule::{Decay, ScheduleConfig};
pub use step::{train_step, BatchTensors, StepStats};
