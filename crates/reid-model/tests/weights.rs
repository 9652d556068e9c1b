#![allow(clippy::disallowed_methods)] // tests read and build tensors freely
//! Loading weights: from the Hugging Face hub cache as the hub client lays it out
//! (no network), refusing mismatched checkpoints with the full list, and our own
//! checkpoints round-tripping under timm's names. One test: it sets HF_HOME.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use reid_model::weights::{resolve, WeightSource};
use reid_model::{Arch, LoadScope, ModelConfig, ReidModel, WeightError};

fn model(classes: usize, seed: u64) -> ReidModel {
    let arch: Arch = "res2net_tiny".parse().unwrap();
    let m = ReidModel::new(
        ModelConfig {
            arch,
            last_stride: 2,
            num_classes: classes,
            bnneck: false,
        },
        reid_model::Exec::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    m.initialize(seed).unwrap();
    m
}

fn values(m: &ReidModel, name: &str) -> Vec<f32> {
    m.named_vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// An "ImageNet" checkpoint of `source` in the hub cache under `home`, laid out
/// as the hub client does: the backbone plus a timm fc and a BN counter.
fn cached_imagenet_checkpoint(home: &Path, source: &ReidModel) -> (HashMap<String, Tensor>, PathBuf) {
    let mut state: HashMap<String, Tensor> = source
        .state_dict()
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !reid_model::model::is_head(n))
        .collect();
    let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &Device::Cpu).unwrap();
    state.insert("fc.weight".into(), zeros(&[1000, 256], DType::F32));
    state.insert("fc.bias".into(), zeros(&[1000], DType::F32));
    state.insert("bn1.num_batches_tracked".into(), zeros(&[], DType::I64));
    let repo = home.join("hub/models--timm--res2net_tiny.test");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    candle_core::safetensors::save(&state, snapshot.join("model.safetensors")).unwrap();
    (state, snapshot.join("model.safetensors"))
}

/// A mismatched checkpoint lists everything wrong and loads nothing.
fn check_a_mismatch_loads_nothing(home: &Path, state: &HashMap<String, Tensor>) {
    let mut bad = state.clone();
    bad.remove("layer1.0.conv1.weight");
    bad.insert(
        "layer9.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    bad.insert(
        "conv1.weight".into(),
        Tensor::zeros((64, 3, 5, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let bad_path = home.join("bad.safetensors");
    candle_core::safetensors::save(&bad, &bad_path).unwrap();
    let fresh = model(7, 3);
    let before = values(&fresh, "layer2.0.conv1.weight");
    match fresh.load_weights(&bad_path, LoadScope::Backbone) {
        Err(WeightError::Mismatch { path, mismatch }) => {
            assert_eq!(path, bad_path);
            assert_eq!(mismatch.missing, vec!["layer1.0.conv1.weight".to_string()]);
            assert_eq!(mismatch.unexpected, vec!["layer9.weight".to_string()]);
            assert_eq!(mismatch.mis_shaped.len(), 1);
            assert_eq!(mismatch.mis_shaped[0].0, "conv1.weight");
            let text = WeightError::Mismatch { path, mismatch }.to_string();
            assert!(
                text.contains("missing (1)") && text.contains("unexpected (1)") && text.contains("mis-shaped"),
                "{text}"
            );
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(
        values(&fresh, "layer2.0.conv1.weight"),
        before,
        "nothing loaded half-way"
    );
}

/// Our own checkpoint: saved under timm names, loaded in full.
fn check_own_checkpoints_round_trip(home: &Path, target: &ReidModel) {
    let own = home.join("own.safetensors");
    target.save_weights(&own, &Default::default()).unwrap();
    let names: Vec<String> = reid_model::weights::read_safetensors(&own)
        .unwrap()
        .into_keys()
        .collect();
    assert!(names.iter().any(|n| n == "layer1.0.convs.0.weight") && names.iter().any(|n| n == "id_classifier.weight"));
    let back = model(7, 4);
    back.load_weights(&own, LoadScope::Full).unwrap();
    assert_eq!(
        values(&back, "id_classifier.weight"),
        values(target, "id_classifier.weight")
    );
    // A checkpoint for another number of classes cannot be loaded in full.
    assert!(model(9, 5).load_weights(&own, LoadScope::Full).is_err());
}

#[test]
fn hub_cache_mismatches_and_round_trips() {
    let home = tempfile::tempdir().unwrap();
    // SAFETY: this test binary runs this one test; nothing else reads the environment.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let source = model(10, 1);
    let (state, cached) = cached_imagenet_checkpoint(home.path(), &source);
    let hub: WeightSource = "hf:timm/res2net_tiny.test".parse().unwrap();
    let path = resolve(&hub).unwrap();
    assert_eq!(path, cached);
    let target = model(7, 2);
    let head_before = values(&target, "id_classifier.weight");
    target.load_weights(&path, LoadScope::Backbone).unwrap();
    assert_eq!(values(&target, "conv1.weight"), values(&source, "conv1.weight"));
    assert_eq!(
        values(&target, "layer4.1.bn3.running_var"),
        values(&source, "layer4.1.bn3.running_var")
    );
    assert_eq!(
        values(&target, "id_classifier.weight"),
        head_before,
        "heads keep their values"
    );

    // Not in the cache, offline: a clear error naming the cache.
    let err = resolve(&"hf:timm/absent".parse().unwrap()).unwrap_err().to_string();
    assert!(
        err.contains("hf:timm/absent") && err.contains("HF_HUB_OFFLINE") && err.contains("hub"),
        "{err}"
    );
    check_a_mismatch_loads_nothing(home.path(), &state);
    check_own_checkpoints_round_trip(home.path(), &target);
}
