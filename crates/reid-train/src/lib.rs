//! Training the siamese re-ID network: SGD as PyTorch computes it, learning-rate
//! schedules, the training loop with logs, checkpoints and exact resume.

pub mod checkpoint;
pub mod config;
pub mod optim;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use checkpoint::{read_info, CheckpointInfo, Position, RunPaths};
pub use config::TrainConfig;
pub use optim::{Sgd, SgdConfig};
pub use schedule::{Decay, ScheduleConfig};
pub use step::{train_step, BatchTensors, StepStats};
pub use trainer::{parse_device, Event, Outcome, TrainData, TrainError, Trainer};
