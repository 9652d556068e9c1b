//! Parity with PyTorch and timm on every fixture folder under the fixture root
//! (tests/fixtures, or $REID_FIXTURES), on the CPU: model folders (eval forward in
//! f32 and f64; train-mode logits, gradients and batch-norm updates in f64) and
//! training-step folders (two SGD steps in f64 at the float64 tier). Each runs
//! under every plan: `auto` (the CPU's fused ops and tape), `generic` (candle's
//! ops) and `as-cuda` (the op graph CUDA runs).

use candle_core::{DType, Device};
use reid_fixtures::folders_with;
use reid_model::{Exec, Ops, Precision};
use reid_parity::{model_folder, train_step_folder, Check};

/// The plans every parity suite runs under.
fn plans() -> [Exec; 3] {
    [Ops::Auto, Ops::Generic, Ops::AsCuda].map(|ops| Exec::new(ops, Precision::F32))
}

fn assert_all_pass(what: &std::path::Path, checks: &[Check]) {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    assert!(failed.is_empty(), "{}:\n{}", what.display(), failed.join("\n"));
}

#[test]
fn models_match_timm_forward_and_backward() {
    let folders = folders_with(&[
        "meta.json",
        "model.safetensors",
        "input.safetensors",
        "expected.safetensors",
    ]);
    assert!(folders.len() >= 2, "the Res2Net and the ResNet fixture: {folders:?}");
    for (folder, exec) in folders.iter().flat_map(|f| plans().map(|p| (f, p))) {
        for forward in [DType::F32, DType::F64] {
            let checks = model_folder(folder, &Device::Cpu, exec, forward, DType::F64).unwrap();
            assert!(
                checks.iter().any(|c| c.name.starts_with("grad.")),
                "{}: no gradient checked",
                folder.display()
            );
            assert_all_pass(folder, &checks);
        }
    }
}

#[test]
fn two_sgd_steps_match_pytorch_in_f64() {
    for (folder, exec) in folders_with(&[
        "meta.json",
        "model.safetensors",
        "batches.safetensors",
        "expected_f64.safetensors",
    ])
    .iter()
    .flat_map(|f| plans().map(|p| (f.clone(), p)))
    {
        let checks = train_step_folder(&folder, &Device::Cpu, exec, DType::F64, "float64").unwrap();
        assert!(
            checks.len() > 700,
            "{}: only {} keys checked",
            folder.display(),
            checks.len()
        );
        assert_all_pass(&folder, &checks);
    }
}

#[test]
fn a_float32_step_passes_the_float32_tier() {
    for (folder, exec) in folders_with(&[
        "meta.json",
        "model.safetensors",
        "batches.safetensors",
        "expected_f64.safetensors",
    ])
    .iter()
    .flat_map(|f| plans().map(|p| (f.clone(), p)))
    {
        let checks = train_step_folder(&folder, &Device::Cpu, exec, DType::F32, "float32").unwrap();
        assert_all_pass(&folder, &checks);
    }
}

#[test]
fn every_fused_op_matches_its_generic_composition() {
    let checks = reid_parity::op_checks(&Device::Cpu).unwrap();
    assert!(checks.len() >= 10);
    assert_all_pass(std::path::Path::new("ops"), &checks);
}

#[test]
fn input_tensors_of_real_photographs_match_pil_and_torchvision() {
    let folders = folders_with(&["meta.json", "expected.safetensors", "crops"]);
    assert_eq!(folders.len(), 1, "the real-photo fixture: {folders:?}");
    let checks = reid_parity::input_checks(&folders[0]).unwrap();
    assert!(checks.len() >= 20, "{} checks", checks.len());
    for c in &checks {
        println!("{}: {}", c.name, c.detail);
    }
    assert_all_pass(&folders[0], &checks);
}
