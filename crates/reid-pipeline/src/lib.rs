//! The stages wired together, for the `reid` binary: the demo (synth, index,
//! train, extract, evaluate with every cache checked), extraction of a trained
//! run's splits, and the benchmarks. Each command of the binary parses its
//! arguments, calls one function here or in a stage crate, and prints.

pub mod bench;
pub mod demo;
pub mod extract;

/// An error of a pipeline step, with the stage crates' errors inside.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Data(#[from] reid_data::DataError),
    #[error(transparent)]
    Train(#[from] reid_train::TrainError),
    #[error(transparent)]
    Config(#[from] reid_train::config::ConfigError),
    #[error(transparent)]
    Extract(#[from] reid_extract::ExtractError),
    #[error(transparent)]
    Evaluate(#[from] reid_eval::files::FilesError),
    #[error(transparent)]
    Eval(#[from] reid_eval::EvalError),
    #[error(transparent)]
    Weights(#[from] reid_model::WeightError),
    #[error(transparent)]
    Load(#[from] reid_sampling::LoadError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Result with [`PipelineError`].
pub type Result<T> = std::result::Result<T, PipelineError>;
