//! Re-ID evaluation without a model: distances by GEMM, CMC / mAP / mINP under the
//! Market-1501 protocol, k-reciprocal re-ranking, and reports with plots.

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(not(target_arch = "x86_64"))]
#[path = "amx_absent.rs"]
pub mod amx;
pub mod distance;
pub mod evaluate;
pub mod files;
pub mod protocol;
pub mod report;
pub mod rerank;

pub use distance::Metric;
pub use evaluate::{evaluate, EvalError, Evaluation, Evaluator, FeatureSet, Metrics, Timings};
pub use rerank::RerankParams;
