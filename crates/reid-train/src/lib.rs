//! Training the siamese re-ID network: SGD as PyTorch computes it, learning-rate
//! schedules, the training loop with logs, checkpoints, validation and exact
//! resume, and the checks that stop a run that went wrong.

// Tests read and build tensors freely; the library's reads go through
// `reid_ops::ledger`.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod config;
pub mod finite;
pub mod launch;
pub mod lock;
pub mod log;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod step;
pub mod trainer;
pub mod validation;

pub use config::TrainConfig;
pub use launch::{Launch, Prepared};
pub use optim::{Sgd, SgdConfig};
pub use schedule::{Decay, ScheduleConfig};
pub use state::{recover_state, Best, Position, RunPaths, TrainerState};
pub use step::{train_step, BatchTensors, GradNorms, StepError, StepSettings, StepStats};
pub use trainer::{Event, Outcome, TrainData, TrainError, Trainer};
