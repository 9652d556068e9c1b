//! Our input tensors against PIL's and torchvision's on crops of real
//! photographs (`real_photos/` of the fixtures): decoding alone, decoding and
//! resizing (bilinear and bicubic), and the normalised tensor.

use std::path::Path;

use reid_sampling::preprocess::{decode_rgb, normalize, Rgb8};
use reid_sampling::resize::resize;
use reid_sampling::{InputSpec, Interpolation};
use serde_json::Value;

use crate::reference::{read_json, Reference};
use crate::{Check, ParityError, Result};

/// At least this share of the values must be exactly PIL's.
const EXACT_SHARE: f64 = 0.99;

/// Every input check on the crops under `folder`.
pub fn input_checks(folder: &Path) -> Result<Vec<Check>> {
    let meta = read_json(&folder.join("meta.json"))?;
    let expected = Reference::read(&folder.join("expected.safetensors"))?;
    let crops = meta["crops"].as_array().ok_or_else(|| ParityError::Fixture {
        path: folder.join("meta.json"),
        message: "no 'crops' list".into(),
    })?;
    let mut checks = Vec::new();
    for crop in crops {
        checks.extend(crop_checks(folder, crop, &expected)?);
    }
    Ok(checks)
}

/// The checks of one crop: its decoded pixels (JPEG crops that have them), its
/// pixels after each resize, and its normalised tensor where recorded.
fn crop_checks(folder: &Path, crop: &Value, expected: &Reference) -> Result<Vec<Check>> {
    let name = crop["name"].as_str().unwrap_or_default();
    let path = folder.join(crop["file"].as_str().unwrap_or_default());
    let bytes = std::fs::read(&path).map_err(|e| ParityError::Fixture {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let decoded = decode_rgb(&path, &bytes).map_err(|e| ParityError::Invalid(e.to_string()))?;
    let mut checks = Vec::new();
    if let Some(truth) = expected.tensors.get(&format!("{name}.decoded")) {
        checks.push(compare_u8(format!("{name}: decoded"), &decoded.data, &truth.data));
    }
    for interpolation in [Interpolation::Bilinear, Interpolation::Bicubic] {
        let key = format!("{name}.{interpolation}");
        let spec = InputSpec {
            height: 256,
            width: 128,
            interpolation,
        };
        let resized = resize(decoded.clone(), spec.height, spec.width, interpolation);
        let pil = expected.get(&key)?;
        checks.push(compare_u8(format!("{name}: {interpolation}"), &resized.data, &pil.data));
        if let Some(truth) = expected.tensors.get(&format!("{key}.input")) {
            let pil = Rgb8 {
                height: spec.height,
                width: spec.width,
                data: pil.data.iter().map(|v| *v as u8).collect(),
            };
            checks.push(compare_input(
                format!("{name}: {interpolation} normalised"),
                &pil,
                &truth.data,
            ));
        }
    }
    Ok(checks)
}

/// Passed when every value is within one level of PIL's and at least
/// [`EXACT_SHARE`] of them equal it.
fn compare_u8(name: String, ours: &[u8], truth: &[f64]) -> Check {
    if ours.len() != truth.len() {
        return Check::failed(name, &format!("{} values against {}", ours.len(), truth.len()));
    }
    let diffs: Vec<f64> = ours.iter().zip(truth).map(|(a, b)| (*a as f64 - b).abs()).collect();
    let worst = diffs.iter().copied().fold(0.0, f64::max);
    let exact = diffs.iter().filter(|d| **d == 0.0).count() as f64 / diffs.len().max(1) as f64;
    Check {
        name,
        passed: worst <= 1.0 && exact >= EXACT_SHARE,
        detail: format!("{:.3}% exact, largest difference {worst} level(s)", 100.0 * exact),
    }
}

/// Our normalisation of PIL's pixels against torchvision's `ToTensor` +
/// `Normalize` of them: equal to f32 rounding.
fn compare_input(name: String, pixels: &Rgb8, truth: &[f64]) -> Check {
    let ours = normalize(pixels);
    if ours.data.len() != truth.len() {
        return Check::failed(name, &format!("{} values against {}", ours.data.len(), truth.len()));
    }
    let worst = ours
        .data
        .iter()
        .zip(truth)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    Check {
        name,
        passed: worst <= 1e-6,
        detail: format!("largest difference {worst:.1e} (bound 1e-6)"),
    }
}
