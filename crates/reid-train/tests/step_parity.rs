//! Two full multi-task SGD steps against PyTorch, in float64, for every train-step
//! fixture folder (meta.json with an `optimizer`, model, batches, expected_f64).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use reid_fixtures::{folders_with, max_abs_diff, read_json, read_tensors, rel_l2};
use reid_model::{Arch, LoadScope, LossWeights, ModelConfig, PairTargets, ReidModel};
use reid_train::{train_step, BatchTensors, Sgd, SgdConfig};

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn tensor(t: &reid_fixtures::Tensor, dtype: DType) -> Tensor {
    let x = Tensor::from_vec(t.data.clone(), t.shape.as_slice(), &Device::Cpu).unwrap();
    if dtype == DType::I64 {
        x.to_dtype(DType::I64).unwrap()
    } else {
        x.to_dtype(dtype).unwrap()
    }
}

/// The optimiser the fixture describes, checked against its group listing.
fn optimizer(meta: &serde_json::Value, model: &ReidModel) -> Sgd {
    let o = &meta["optimizer"];
    let f = |k: &str| o[k].as_f64().unwrap();
    let groups = o["groups"].as_object().unwrap();
    let config = SgdConfig {
        lr: f("lr_heads"),
        momentum: f("momentum"),
        dampening: f("dampening"),
        weight_decay: f("weight_decay"),
        nesterov: o["nesterov"].as_bool().unwrap(),
        backbone_lr_mult: f("lr_backbone") / f("lr_heads"),
        no_decay_bn_bias: groups.values().any(|g| g["weight_decay"].as_f64().unwrap() == 0.0),
    };
    let sgd = Sgd::new(model.trainable_vars(), config.clone());
    let mut listed = 0;
    for g in groups.values() {
        for name in g["params"].as_array().unwrap() {
            let p = sgd
                .params
                .iter()
                .find(|p| p.name == name.as_str().unwrap())
                .expect("listed parameter exists");
            assert!(
                (config.lr * p.lr_mult - g["lr"].as_f64().unwrap()).abs() < 1e-15,
                "{}: lr",
                p.name
            );
            assert_eq!(
                p.weight_decay,
                g["weight_decay"].as_f64().unwrap(),
                "{}: weight decay",
                p.name
            );
            listed += 1;
        }
    }
    assert_eq!(listed, sgd.params.len(), "every trained parameter is in one group");
    sgd
}

fn group_of(key: &str) -> Option<String> {
    let (step, rest) = key.split_once('.')?;
    let group = if rest.starts_with("loss") {
        "loss"
    } else if rest.starts_with("param.") {
        "param"
    } else if rest.starts_with("momentum.") {
        "momentum"
    } else if rest.ends_with("running_mean") {
        "running_mean"
    } else if rest.ends_with("running_var") {
        "running_var"
    } else {
        return None;
    };
    Some(format!("{step}.{group}"))
}

fn check(folder: &Path, tolerances: &serde_json::Value, key: &str, group: &str, ours: &[f64], truth: &[f64]) {
    let tol = &tolerances[group];
    let (abs, rel) = (tol["abs"].as_f64().unwrap(), tol["rel_l2"].as_f64().unwrap());
    let (d, r) = (max_abs_diff(ours, truth), rel_l2(ours, truth));
    assert!(
        d <= abs && r <= rel,
        "{}: {key}: max-abs {d:.3e} (bound {abs:.3e}), rel-l2 {r:.3e} (bound {rel:.1e})",
        folder.display()
    );
}

#[test]
fn two_sgd_steps_match_pytorch_in_f64() {
    for folder in folders_with(&[
        "meta.json",
        "model.safetensors",
        "batches.safetensors",
        "expected_f64.safetensors",
    ]) {
        let meta = read_json(&folder.join("meta.json"));
        let tolerances = &meta["suggested_tolerances"]["float64"]["groups"];
        let arch: Arch = meta["arch"].as_str().unwrap().parse().unwrap();
        let config = ModelConfig {
            arch,
            last_stride: meta.get("last_stride").and_then(|v| v.as_u64()).unwrap_or(2) as usize,
            num_classes: meta["num_classes"].as_u64().unwrap() as usize,
            bnneck: false,
        };
        let model = ReidModel::new(config, DType::F64, &Device::Cpu).unwrap();
        model
            .load_weights(&folder.join("model.safetensors"), LoadScope::Full)
            .unwrap();
        let mut sgd = optimizer(&meta, &model);
        let w = &meta["loss"]["weights"];
        let weights = LossWeights {
            id1: w["loss_id1"].as_f64().unwrap(),
            id2: w["loss_id2"].as_f64().unwrap(),
            verif: w["loss_verif"].as_f64().unwrap(),
            id_label_smoothing: 0.0,
        };
        let batches = read_tensors(&folder.join("batches.safetensors"));
        let expected = read_tensors(&folder.join("expected_f64.safetensors"));
        let start = read_tensors(&folder.join("model.safetensors"));
        let mut previous: HashMap<String, Vec<f64>> = model
            .named_vars()
            .iter()
            .map(|(n, v)| (n.clone(), values(v.as_tensor())))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let steps = meta["optimizer"]["steps"].as_u64().unwrap_or(2) as usize;
        let mut checked = 0;
        for (k, suffix) in ["a", "b"].iter().enumerate().take(steps) {
            let step = format!("step{}", k + 1);
            let b = |name: &str, dtype| tensor(&batches[&format!("{name}_{suffix}")], dtype);
            let batch = BatchTensors {
                x1: b("x1", DType::F64),
                x2: b("x2", DType::F64),
                targets: PairTargets {
                    y1: b("y1", DType::I64),
                    y2: b("y2", DType::I64),
                    same: b("v", DType::I64),
                },
            };
            let lr = sgd.config.lr;
            let stats = train_step(&model, &mut sgd, &batch, weights, 0.0, lr, &mut rng).unwrap();
            for (name, value) in [
                ("loss_id1", stats.loss_id1),
                ("loss_id2", stats.loss_id2),
                ("loss_verif", stats.loss_verif),
                ("loss", stats.loss),
            ] {
                let key = format!("{step}.{name}");
                check(
                    &folder,
                    tolerances,
                    &key,
                    &format!("{step}.loss"),
                    &[value],
                    &expected[&key].data,
                );
                checked += 1;
            }
            let vars: HashMap<String, Vec<f64>> = model
                .named_vars()
                .iter()
                .map(|(n, v)| (n.clone(), values(v.as_tensor())))
                .collect();
            for (key, truth) in &expected {
                let Some(group) = group_of(key) else { continue };
                if !key.starts_with(&format!("{step}.")) || group.ends_with("loss") {
                    continue;
                }
                let name = key.splitn(3, '.').nth(2).unwrap();
                let ours = if group.ends_with("momentum") {
                    let p = sgd.params.iter().find(|p| p.name == name).expect("momentum parameter");
                    values(p.momentum_buffer.as_ref().expect("momentum buffer"))
                } else {
                    vars[name].clone()
                };
                check(&folder, tolerances, key, &group, &ours, &truth.data);
                checked += 1;
                if group.ends_with("param") {
                    // The size of the update, own previous values against the truth's.
                    let truth_prev = if k == 0 {
                        start[name].data.clone()
                    } else {
                        expected[&format!("step{k}.param.{name}")].data.clone()
                    };
                    let ours_update: Vec<f64> = ours.iter().zip(&previous[name]).map(|(a, b)| a - b).collect();
                    let truth_update: Vec<f64> = truth.data.iter().zip(&truth_prev).map(|(a, b)| a - b).collect();
                    check(
                        &folder,
                        tolerances,
                        &format!("{step}.update.{name}"),
                        &format!("{step}.update"),
                        &ours_update,
                        &truth_update,
                    );
                }
            }
            previous = vars;
        }
        assert!(checked > 700, "{}: only {checked} keys checked", folder.display());
    }
}
