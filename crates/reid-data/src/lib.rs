//! Datasets for `reid`: layouts and file-name parsing, the parquet manifest, the
//! synthetic pedestrian generator and the gallery feature-file format.

pub mod error;
pub mod gallery;
pub mod layout;
pub mod manifest;
pub mod metrics_csv;
pub mod msmt17;
pub mod names;
pub mod synth;
pub mod synth_layout;

pub use error::{DataError, Result};
pub use layout::{DatasetKind, DatasetLayout, IndexOptions, IndexReport};
pub use manifest::{Manifest, ManifestRecord, Split, SplitSummary};
pub use synth::SynthConfig;
