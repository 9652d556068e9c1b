//! Does this build compute what PyTorch computes? The parity harness of
//! `reid selftest` and of the parity tests alike: the shipped reference fixtures
//! are checked on a device (model forward and gradients, two training steps),
//! and each fused kernel against the device-generic composition of the same op
//! on random shapes, forward and backward. A missing or malformed fixture is an
//! error that names the file, never a panic.

mod fixtures;
mod inputs;
mod ops;
pub mod reference;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

/// Why the checks could not run (a check that ran and failed is a [`Check`]).
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    #[error("{path}: {message}")]
    Fixture { path: PathBuf, message: String },
    #[error(transparent)]
    File(#[from] reid_io::IoError),
    #[error(transparent)]
    Weights(#[from] reid_model::WeightError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Result with [`ParityError`].
pub type Result<T> = std::result::Result<T, ParityError>;

pub use fixtures::{model_folder, summarise, train_step_folder};
pub use inputs::input_checks;
pub use ops::op_checks;

/// One named check, passed or not, with what was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    /// A failed check.
    pub fn failed(name: impl Into<String>, detail: &str) -> Self {
        Check {
            name: name.into(),
            passed: false,
            detail: detail.to_string(),
        }
    }
}

/// The checks of one part of the self-test.
#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    pub checks: Vec<Check>,
}

/// The fixture folder: `explicit`, else `$REID_FIXTURES`, else `tests/fixtures`
/// under the working directory, else `fixtures/` beside the executable.
pub fn fixture_root(explicit: Option<&Path>) -> Result<PathBuf> {
    let exe_side = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.join("fixtures")));
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => std::env::var_os("REID_FIXTURES")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("tests/fixtures")])
            .chain(exe_side)
            .collect(),
    };
    candidates.iter().find(|p| p.is_dir()).cloned().ok_or_else(|| {
        ParityError::Invalid(format!(
            "no fixture folder (looked in {}); pass --fixtures DIR (the repository's tests/fixtures)",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Whether `device` computes in float64 (CPU and CUDA do; others may not).
fn has_f64(device: &Device) -> bool {
    device.is_cpu() || device.is_cuda()
}

/// Runs every check on `device`, the model run as `exec` says, with the fixtures
/// under `root`.
pub fn run(root: &Path, device: &Device, exec: reid_model::Exec) -> Result<Vec<Section>> {
    // The fixtures are float32 and float64 truth: TF32 tensor cores (10-bit
    // mantissas) are another precision, and would fail the float32 bounds on CUDA.
    reid_ops::set_tf32(false);
    let gradients = if has_f64(device) { DType::F64 } else { DType::F32 };
    let mut sections = Vec::new();
    for name in ["res2net_tiny", "resnet_tiny"] {
        let checks = model_folder(&root.join(name), device, exec, DType::F32, gradients)?;
        sections.push(Section {
            title: format!("{name}: forward in f32, gradients in {gradients:?}"),
            checks,
        });
    }
    for scenario in ["plain", "nesterov_groups"] {
        let folder = root.join("train_step_tiny").join(scenario);
        sections.push(Section {
            title: format!("train step {scenario}: f32, float32 tier"),
            checks: summarise(train_step_folder(&folder, device, exec, DType::F32, "float32")?),
        });
        if has_f64(device) {
            sections.push(Section {
                title: format!("train step {scenario}: f64, float64 tier"),
                checks: summarise(train_step_folder(&folder, device, exec, DType::F64, "float64")?),
            });
        }
    }
    sections.push(Section {
        title: "input tensors of real photographs against PIL and torchvision".into(),
        checks: input_checks(&root.join("real_photos"))?,
    });
    sections.push(Section {
        title: "fused kernels against the generic ops, f32, forward and backward".into(),
        checks: op_checks(device)?,
    });
    Ok(sections)
}
