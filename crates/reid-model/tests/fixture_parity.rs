//! Parity with timm on every model fixture folder (meta.json, model.safetensors,
//! input.safetensors, expected.safetensors) under the fixture root: eval-mode
//! features, logits and stage outputs; train-mode logits, gradients and batch-norm
//! updates, within the tolerances each folder's meta.json suggests.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use reid_fixtures::{folders_with, max_abs, max_abs_diff, read_json, read_tensors, rel_l2};
use reid_model::backbone::Backbone;
use reid_model::weights::load_into;
use reid_model::Arch;

/// The fixture network: the backbone with timm's `fc` classifier on top.
struct Classifier {
    varmap: VarMap,
    backbone: Backbone,
    fc: candle_nn::Linear,
}

fn build(folder: &Path, meta: &serde_json::Value, dtype: DType) -> Classifier {
    let arch: Arch = meta["arch"].as_str().unwrap().parse().unwrap();
    let last_stride = meta.get("last_stride").and_then(|v| v.as_u64()).unwrap_or(2) as usize;
    let classes = meta["num_classes"].as_u64().unwrap() as usize;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let backbone = Backbone::new(arch, last_stride, vb.clone()).unwrap();
    let fc = candle_nn::linear(arch.feature_dim(), classes, vb.pp("fc")).unwrap();
    let vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    load_into(&vars, &folder.join("model.safetensors"), |n| {
        n.ends_with("num_batches_tracked")
    })
    .unwrap();
    Classifier { varmap, backbone, fc }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn var(c: &Classifier, name: &str) -> Tensor {
    c.varmap.data().lock().unwrap()[name].as_tensor().clone()
}

/// Checks `ours[key]` against the float64 truth with meta.json's tolerance for `key`.
fn check(
    folder: &Path,
    meta: &serde_json::Value,
    expected: &HashMap<String, reid_fixtures::Tensor>,
    key: &str,
    ours: &[f64],
) {
    let tol = &meta["suggested_tolerances"][key];
    let truth = &expected[tol["compare_against"].as_str().unwrap()].data;
    let (rel_max, rel) = (tol["rel_to_maxabs"].as_f64().unwrap(), tol["rel_l2"].as_f64().unwrap());
    let (d, r) = (max_abs_diff(ours, truth), rel_l2(ours, truth));
    assert!(
        d <= rel_max * max_abs(truth) && r <= rel,
        "{}: {key}: max-abs {d:.3e} (bound {:.3e}), rel-l2 {r:.3e} (bound {rel:.3e})",
        folder.display(),
        rel_max * max_abs(truth)
    );
}

fn input(folder: &Path, dtype: DType) -> Tensor {
    let t = &read_tensors(&folder.join("input.safetensors"))["input"];
    Tensor::from_vec(t.data.clone(), t.shape.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn check_eval(
    folder: &Path,
    meta: &serde_json::Value,
    expected: &HashMap<String, reid_fixtures::Tensor>,
    dtype: DType,
) {
    let c = build(folder, meta, dtype);
    let x = input(folder, dtype);
    let stages = c.backbone.stage_outputs(&x, false).unwrap();
    let features = stages[3].mean((2, 3)).unwrap();
    check(folder, meta, expected, "features", &values(&features));
    check(
        folder,
        meta,
        expected,
        "logits",
        &values(&c.fc.forward(&features).unwrap()),
    );
    let intermediates = folder.join("intermediates.safetensors");
    if intermediates.is_file() {
        for (name, t) in read_tensors(&intermediates) {
            let stage: usize = name.trim_start_matches("layer").parse().unwrap();
            let r = rel_l2(&values(&stages[stage - 1]), &t.data);
            assert!(
                r <= 1e-5,
                "{}: intermediate {name} ({dtype:?}): rel-l2 {r:.3e}",
                folder.display()
            );
        }
    }
}

#[test]
fn eval_forward_matches_timm_in_f32_and_f64() {
    for folder in folders_with(&[
        "meta.json",
        "model.safetensors",
        "input.safetensors",
        "expected.safetensors",
    ]) {
        let meta = read_json(&folder.join("meta.json"));
        let expected = read_tensors(&folder.join("expected.safetensors"));
        check_eval(&folder, &meta, &expected, DType::F32);
        check_eval(&folder, &meta, &expected, DType::F64);
    }
}

#[test]
fn train_forward_gradients_and_batch_norm_updates_match_timm_in_f64() {
    for folder in folders_with(&[
        "meta.json",
        "model.safetensors",
        "input.safetensors",
        "expected.safetensors",
    ]) {
        let meta = read_json(&folder.join("meta.json"));
        let expected = read_tensors(&folder.join("expected.safetensors"));
        let c = build(&folder, &meta, DType::F64);
        let x = input(&folder, DType::F64);
        // An eval forward first, as the fixture did: it must change nothing.
        c.backbone.forward_t(&x, false).unwrap();
        let logits = c.fc.forward(&c.backbone.forward_t(&x, true).unwrap()).unwrap();
        check(&folder, &meta, &expected, "train_logits", &values(&logits));
        let g = &expected["G"];
        let g = Tensor::from_vec(g.data.clone(), g.shape.as_slice(), &Device::Cpu).unwrap();
        let loss = (&logits * &g).unwrap().sum_all().unwrap();
        check(&folder, &meta, &expected, "loss", &values(&loss));
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for key in meta["suggested_tolerances"].as_object().unwrap().keys() {
            if let Some(param) = key.strip_prefix("grad.") {
                let grad = grads
                    .get(&var(&c, param))
                    .unwrap_or_else(|| panic!("no gradient for {param}"));
                check(&folder, &meta, &expected, key, &values(grad));
                checked += 1;
            } else if let Some(stat) = key.strip_prefix("bn_after.") {
                check(&folder, &meta, &expected, key, &values(&var(&c, stat)));
                checked += 1;
            }
        }
        assert!(
            checked > 0,
            "{}: no gradient or batch-norm key checked",
            folder.display()
        );
    }
}
