//! Parity with the shipped PyTorch fixtures on any device and dtype: a model
//! folder (timm forward, train-mode gradients and batch-norm updates) and a
//! training-step folder (two siamese SGD steps), each key checked against the
//! float64 truth with the folder's own tolerances.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use reid_model::backbone::Backbone;
use reid_model::weights::load_into;
use reid_model::{Arch, Exec, LoadScope, LossSettings, ModelConfig, PairTargets, ReidModel};
use reid_train::{train_step, BatchTensors, Sgd, SgdConfig, StepSettings};
use serde_json::Value;

use crate::reference::{max_abs, max_abs_diff, read_json, rel_l2, RefTensor, Reference};
use crate::{Check, ParityError, Result};

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

fn tensor(t: &RefTensor, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(t.data.clone(), t.shape.as_slice(), device)?.to_dtype(dtype)?)
}

/// A check of `ours` against `truth` within (abs, rel_l2).
fn compare(name: String, ours: &[f64], truth: &[f64], abs: f64, rel: f64) -> Check {
    if ours.len() != truth.len() {
        let detail = format!("{} values against {} in the fixture", ours.len(), truth.len());
        return Check::failed(name, &detail);
    }
    let (d, r) = (max_abs_diff(ours, truth), rel_l2(ours, truth));
    Check {
        name,
        passed: d <= abs && r <= rel,
        detail: format!("max-abs {d:.2e} (bound {abs:.2e}), rel-l2 {r:.2e} (bound {rel:.2e})"),
    }
}

/// The fixture network: the backbone with timm's `fc` classifier on top.
struct Classifier {
    varmap: VarMap,
    backbone: Backbone,
    fc: candle_nn::Linear,
}

impl Classifier {
    fn load(folder: &Path, meta: &Value, dtype: DType, device: &Device, exec: Exec) -> Result<Self> {
        let arch: Arch = meta["arch"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(ParityError::Invalid)?;
        let last_stride = meta.get("last_stride").and_then(Value::as_u64).unwrap_or(2) as usize;
        let classes = meta["num_classes"].as_u64().unwrap_or(0) as usize;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let backbone = Backbone::new(arch, last_stride, exec, vb.clone())?;
        let fc = candle_nn::linear(arch.feature_dim(), classes, vb.pp("fc"))?;
        let vars: Vec<(String, Var)> = varmap.data().lock().expect("varmap").clone().into_iter().collect();
        load_into(&vars, &folder.join("model.safetensors"), |n| {
            n.ends_with("num_batches_tracked")
        })?;
        Ok(Classifier { varmap, backbone, fc })
    }

    fn var(&self, name: &str) -> Option<Tensor> {
        self.varmap
            .data()
            .lock()
            .expect("varmap")
            .get(name)
            .map(|v| v.as_tensor().clone())
    }
}

/// Checks `key` of a model folder against its float64 twin.
fn model_key(meta: &Value, expected: &Reference, key: &str, ours: &[f64]) -> Result<Check> {
    let tol = &meta["suggested_tolerances"][key];
    let truth = &expected.get(tol["compare_against"].as_str().unwrap_or(key))?.data;
    let abs = tol["rel_to_maxabs"].as_f64().unwrap_or(0.0) * max_abs(truth);
    Ok(compare(
        key.to_string(),
        ours,
        truth,
        abs,
        tol["rel_l2"].as_f64().unwrap_or(0.0),
    ))
}

/// A model folder: eval forward (features, logits, stage outputs) in `forward`
/// dtype; a train-mode forward with backward and the batch-norm updates in
/// `gradients` dtype (float64 where the device has it: gradients of a float32
/// run move at ReLU kinks, see tests/fixtures/README.md).
pub fn model_folder(
    folder: &Path,
    device: &Device,
    exec: Exec,
    forward: DType,
    gradients: DType,
) -> Result<Vec<Check>> {
    let meta = read_json(&folder.join("meta.json"))?;
    let expected = Reference::read(&folder.join("expected.safetensors"))?;
    let inputs = Reference::read(&folder.join("input.safetensors"))?;
    let input = inputs.get("input")?;
    let mut checks = Vec::new();
    let c = Classifier::load(folder, &meta, forward, device, exec)?;
    let stages = c.backbone.stage_outputs(&tensor(input, forward, device)?, false)?;
    let features = stages[3].mean((2, 3))?;
    checks.push(model_key(&meta, &expected, "features", &values(&features)?)?);
    checks.push(model_key(
        &meta,
        &expected,
        "logits",
        &values(&c.fc.forward(&features)?)?,
    )?);
    let intermediates = folder.join("intermediates.safetensors");
    if intermediates.is_file() {
        for (name, t) in Reference::read(&intermediates)?.tensors {
            let stage: usize = name.trim_start_matches("layer").parse().unwrap_or(1);
            let Some(ours) = stages.get(stage.max(1) - 1) else {
                checks.push(Check::failed(name, "no such stage"));
                continue;
            };
            checks.push(compare(name, &values(ours)?, &t.data, f64::INFINITY, 1e-5));
        }
    }
    checks.extend(model_gradients(
        folder, &meta, &expected, input, device, exec, gradients,
    )?);
    Ok(checks)
}

/// The train-mode part of [`model_folder`].
fn model_gradients(
    folder: &Path,
    meta: &Value,
    expected: &Reference,
    input: &RefTensor,
    device: &Device,
    exec: Exec,
    dtype: DType,
) -> Result<Vec<Check>> {
    let c = Classifier::load(folder, meta, dtype, device, exec)?;
    let x = tensor(input, dtype, device)?;
    c.backbone.forward_t(&x, false)?; // an eval forward first changes nothing
    let logits = c.fc.forward(&c.backbone.forward_t(&x, true)?)?;
    let mut checks = vec![model_key(meta, expected, "train_logits", &values(&logits)?)?];
    let loss = (&logits * tensor(expected.get("G")?, dtype, device)?)?.sum_all()?;
    checks.push(model_key(meta, expected, "loss", &values(&loss)?)?);
    let grads = loss.backward()?;
    let keys: Vec<String> = meta["suggested_tolerances"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        let ours = if let Some(param) = key.strip_prefix("grad.") {
            c.var(param).and_then(|v| grads.get(&v).cloned())
        } else if let Some(stat) = key.strip_prefix("bn_after.") {
            c.var(stat)
        } else {
            continue;
        };
        match ours {
            Some(t) => checks.push(model_key(meta, expected, &key, &values(&t)?)?),
            None => checks.push(Check::failed(key.clone(), "no such tensor or gradient")),
        }
    }
    Ok(checks)
}

/// The optimiser a training-step folder describes.
fn optimizer(meta: &Value, model: &ReidModel) -> Sgd {
    let o = &meta["optimizer"];
    let f = |k: &str| o[k].as_f64().unwrap_or(0.0);
    let decay_off = o["groups"]
        .as_object()
        .into_iter()
        .flatten()
        .any(|(_, g)| g["weight_decay"].as_f64() == Some(0.0));
    let config = SgdConfig {
        lr: f("lr_heads"),
        momentum: f("momentum"),
        dampening: f("dampening"),
        weight_decay: f("weight_decay"),
        nesterov: o["nesterov"].as_bool().unwrap_or(false),
        backbone_lr_mult: f("lr_backbone") / f("lr_heads"),
        no_decay_bn_bias: decay_off,
    };
    Sgd::for_model(model, config)
}

/// The tolerance group of an expected key: `stepK.loss`, `.param`, `.momentum`,
/// `.running_mean` or `.running_var`.
fn group_of(key: &str) -> Option<String> {
    let (step, rest) = key.split_once('.')?;
    let group = match rest {
        r if r.starts_with("loss") => "loss",
        r if r.starts_with("param.") => "param",
        r if r.starts_with("momentum.") => "momentum",
        r if r.ends_with("running_mean") => "running_mean",
        r if r.ends_with("running_var") => "running_var",
        _ => return None,
    };
    Some(format!("{step}.{group}"))
}

/// One training step of a folder: `(step name, batch suffix)`.
struct StepCase<'a> {
    folder: &'a Path,
    meta: &'a Value,
    tier: &'a str,
    expected: &'a Reference,
}

impl StepCase<'_> {
    fn check(&self, key: String, group: &str, ours: &[f64], truth: &[f64]) -> Check {
        let tol = &self.meta["suggested_tolerances"][self.tier]["groups"][group];
        let (abs, rel) = (
            tol["abs"].as_f64().unwrap_or(0.0),
            tol["rel_l2"].as_f64().unwrap_or(0.0),
        );
        let mut c = compare(key, ours, truth, abs, rel);
        c.name = format!(
            "{}: {}",
            self.folder.file_name().unwrap_or_default().to_string_lossy(),
            c.name
        );
        c
    }
}

/// A training-step folder: two steps of `reid_train::train_step` in `dtype` on
/// `device`, every loss, parameter, statistic, momentum buffer and update checked
/// at tolerance `tier` (`float64` or `float32`): one check per key.
pub fn train_step_folder(folder: &Path, device: &Device, exec: Exec, dtype: DType, tier: &str) -> Result<Vec<Check>> {
    let meta = read_json(&folder.join("meta.json"))?;
    let arch: Arch = meta["arch"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(ParityError::Invalid)?;
    let config = ModelConfig {
        arch,
        last_stride: meta.get("last_stride").and_then(Value::as_u64).unwrap_or(2) as usize,
        num_classes: meta["num_classes"].as_u64().unwrap_or(0) as usize,
        bnneck: false,
    };
    let model = ReidModel::new(config, exec, dtype, device)?;
    model.load_weights(&folder.join("model.safetensors"), LoadScope::Full)?;
    let mut sgd = optimizer(&meta, &model);
    let w = &meta["loss"]["weights"];
    let weights = LossSettings {
        id1: w["loss_id1"].as_f64().unwrap_or(0.0),
        id2: w["loss_id2"].as_f64().unwrap_or(0.0),
        verif: w["loss_verif"].as_f64().unwrap_or(0.0),
        ..LossSettings::default()
    };
    let batches = Reference::read(&folder.join("batches.safetensors"))?;
    let expected = Reference::read(&folder.join("expected_f64.safetensors"))?;
    let case = StepCase {
        folder,
        meta: &meta,
        tier,
        expected: &expected,
    };
    let mut previous: HashMap<String, Vec<f64>> = Reference::read(&folder.join("model.safetensors"))?
        .tensors
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut checks = Vec::new();
    for (k, suffix) in ["a", "b"].iter().enumerate() {
        let b = |name: &str, dtype| tensor(batches.get(&format!("{name}_{suffix}"))?, dtype, device);
        let batch = BatchTensors {
            x1: b("x1", dtype)?,
            x2: b("x2", dtype)?,
            targets: PairTargets {
                y1: b("y1", DType::I64)?,
                y2: b("y2", DType::I64)?,
                same: b("v", DType::I64)?,
            },
        };
        let lr = sgd.config.lr;
        let stats = train_step(
            &model,
            &mut sgd,
            &batch,
            StepSettings::pairs(weights, 0.0),
            lr,
            &mut rng,
        )
        .map_err(|e| ParityError::Invalid(e.to_string()))?;
        let step = format!("step{}", k + 1);
        let losses = [stats.loss_id1, stats.loss_id2, stats.loss_verif, stats.loss];
        for (name, value) in ["loss_id1", "loss_id2", "loss_verif", "loss"].iter().zip(losses) {
            let key = format!("{step}.{name}");
            checks.push(case.check(
                key.clone(),
                &format!("{step}.loss"),
                &[value],
                &expected.get(&key)?.data,
            ));
        }
        previous = step_state_checks(&case, &step, &model, &sgd, &previous, &mut checks)?;
    }
    Ok(checks)
}

/// Checks every parameter, statistic, momentum buffer and update after `step`;
/// returns the values of the model's variables.
fn step_state_checks(
    case: &StepCase,
    step: &str,
    model: &ReidModel,
    sgd: &Sgd,
    previous: &HashMap<String, Vec<f64>>,
    checks: &mut Vec<Check>,
) -> Result<HashMap<String, Vec<f64>>> {
    let vars: HashMap<String, Vec<f64>> = model
        .named_vars()
        .iter()
        .map(|(n, v)| Ok((n.clone(), values(v.as_tensor())?)))
        .collect::<Result<_>>()?;
    for (key, truth) in &case.expected.tensors {
        let Some(group) = group_of(key).filter(|g| g.starts_with(&format!("{step}.")) && !g.ends_with("loss")) else {
            continue;
        };
        let name = key.splitn(3, '.').nth(2).unwrap_or_default();
        let ours = if group.ends_with("momentum") {
            let buffer = sgd
                .params
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.momentum_buffer.as_ref());
            match buffer {
                Some(b) => values(b)?,
                None => {
                    checks.push(Check::failed(key.clone(), "no momentum buffer"));
                    continue;
                }
            }
        } else {
            match vars.get(name) {
                Some(v) => v.clone(),
                None => {
                    checks.push(Check::failed(key.clone(), "no such variable in the model"));
                    continue;
                }
            }
        };
        checks.push(case.check(key.clone(), &group, &ours, &truth.data));
        if group.ends_with("param") {
            let Some(previous) = previous.get(name) else {
                checks.push(Check::failed(key.clone(), "not in the fixture's model.safetensors"));
                continue;
            };
            let before = match step {
                "step1" => previous.clone(),
                _ => case.expected.get(&format!("step1.param.{name}"))?.data.clone(),
            };
            let ours_update: Vec<f64> = ours.iter().zip(previous).map(|(a, b)| a - b).collect();
            let truth_update: Vec<f64> = truth.data.iter().zip(&before).map(|(a, b)| a - b).collect();
            let group = format!("{step}.update");
            checks.push(case.check(format!("{step}.update.{name}"), &group, &ours_update, &truth_update));
        }
    }
    Ok(vars)
}

/// One check per (folder, step, group): passed when all its keys did, with the
/// first failure (or the key count) as detail.
pub fn summarise(checks: Vec<Check>) -> Vec<Check> {
    let mut groups: std::collections::BTreeMap<String, (usize, Option<Check>)> = Default::default();
    for c in checks {
        let mut parts = c.name.splitn(3, '.');
        let group = format!(
            "{}.{}",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        );
        let entry = groups.entry(group).or_insert((0, None));
        entry.0 += 1;
        if !c.passed && entry.1.is_none() {
            entry.1 = Some(c);
        }
    }
    groups
        .into_iter()
        .map(|(group, (n, failure))| match failure {
            Some(f) => Check::failed(group, &format!("{}: {}", f.name, f.detail)),
            None => Check {
                name: group,
                passed: true,
                detail: format!("{n} keys within bounds"),
            },
        })
        .collect()
}
