//! Exported ONNX files run in tract, a runtime that shares no code with `reid`, and
//! give the features `reid extract` computes: for the timm-parity tiny models of
//! the fixtures and for every full-size architecture, at batch sizes 1
//! and 5 from one loaded file (the batch dimension is dynamic), normalised or not.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reid_export::{export, ExportOptions};
use reid_extract::{embed, ExtractOptions};
use reid_model::{LoadScope, ModelConfig, ReidModel};
use reid_sampling::Chw;
use tract_onnx::prelude::{tvec, Framework, InferenceModelExt, IntoRunnable};

/// Relative tolerance of the features: `max|onnx - reid| <= TOL * max|reid|` per row.
const TOL: f32 = 1e-5;

fn model(arch: &str, bnneck: bool, last_stride: usize) -> ReidModel {
    let config = ModelConfig {
        arch: arch.parse().unwrap(),
        last_stride,
        num_classes: 7,
        bnneck,
    };
    ReidModel::new(config, reid_model::Exec::default(), DType::F32, &Device::Cpu).unwrap()
}

/// Seeded weights with batch norms far from the identity (so folding matters):
/// scale in [0.5, 1.5], shift and mean in [-0.2, 0.2], variance in [0.5, 2].
fn randomize(m: &ReidModel, seed: u64) {
    m.initialize(seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in m.named_vars() {
        let (lo, hi) = match name.rsplit('.').next().unwrap() {
            "running_var" => (0.5, 2.0),
            "running_mean" | "bias" => (-0.2, 0.2),
            "weight" if var.dims().len() == 1 => (0.5, 1.5),
            _ => continue,
        };
        let v: Vec<f32> = (0..var.elem_count()).map(|_| rng.gen_range(lo..hi)).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

fn save(m: &ReidModel, size: (usize, usize), dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    let input = reid_io::InputSpec::bilinear(size.0, size.1);
    reid_model::checkpoint::save(m, input, &Default::default(), &path).unwrap();
    path
}

fn images(n: usize, input: reid_io::InputSpec, seed: u64) -> Vec<Chw> {
    let (h, w) = (input.height, input.width);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| Chw {
            height: h,
            width: w,
            data: (0..3 * h * w).map(|_| rng.gen_range(-2.0f32..2.5)).collect(),
        })
        .collect()
}

/// The ONNX file at `path`, loaded and optimised by tract.
fn tract_plan(path: &Path) -> std::sync::Arc<tract_onnx::prelude::TypedRunnableModel> {
    tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

/// Features of `batch` from the ONNX file, run by tract.
fn onnx_features(plan: &std::sync::Arc<tract_onnx::prelude::TypedRunnableModel>, batch: &[Chw]) -> Vec<f32> {
    let (h, w) = (batch[0].height, batch[0].width);
    let data: Vec<f32> = batch.iter().flat_map(|c| c.data.iter().copied()).collect();
    let input = tract_onnx::prelude::Tensor::from_shape(&[batch.len(), 3, h, w], &data).unwrap();
    let out = plan.run(tvec!(input.into())).unwrap();
    let view = out[0].to_plain_array_view::<f32>().unwrap();
    assert_eq!(view.shape(), &[batch.len(), view.shape()[1]]);
    view.iter().copied().collect()
}

fn assert_close(onnx: &[f32], reid: &[f32], dim: usize, what: &str) {
    assert_eq!(onnx.len(), reid.len(), "{what}: feature count");
    for (row, (a, b)) in onnx.chunks(dim).zip(reid.chunks(dim)).enumerate() {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0, "{what}: row {row} is all zero");
        assert!(diff <= TOL * scale, "{what}: row {row} off by {diff} (max |f| {scale})");
    }
}

/// Exports `checkpoint` with and/or without normalisation (`normalize`) and checks
/// batch sizes 1 and 5 against `reid`.
fn check(checkpoint: &Path, dir: &Path, seed: u64, normalize: &[bool]) {
    let (m, info) = reid_model::checkpoint::load(checkpoint, reid_model::Exec::default(), &Device::Cpu).unwrap();
    let dim = info.model.arch.feature_dim();
    let batch = images(5, info.input, seed);
    for &normalize in normalize {
        let out = dir.join(format!("model-{normalize}.onnx"));
        let options = ExportOptions {
            normalize,
            ..Default::default()
        };
        export(checkpoint, &options, &out).unwrap();
        let plan = tract_plan(&out);
        let extract = ExtractOptions {
            batch_size: 5,
            flip: false,
            normalize,
            ..ExtractOptions::default()
        };
        let what = format!("{} normalize={normalize}", info.model.arch);
        let one = embed(&m, info.input, &batch[..1], &extract).unwrap();
        assert_close(&onnx_features(&plan, &batch[..1]), &one, dim, &format!("{what} N=1"));
        let five = embed(&m, info.input, &batch, &extract).unwrap();
        assert_close(&onnx_features(&plan, &batch), &five, dim, &format!("{what} N=5"));
    }
}

#[test]
fn the_fixture_models_match_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, size) in [("res2net_tiny", (256, 128)), ("resnet_tiny", (128, 64))] {
        let weights = reid_fixtures::root().join(arch).join("model.safetensors");
        for bnneck in [false, true] {
            let m = model(arch, bnneck, 2);
            randomize(&m, 11);
            m.load_weights(&weights, LoadScope::Backbone).unwrap();
            let path = save(&m, size, dir.path(), &format!("{arch}-{bnneck}"));
            check(&path, dir.path(), 3, &[false, true]);
        }
    }
}

#[test]
fn every_full_size_architecture_matches_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    let full = reid_model::ARCHS.iter().filter(|a| !a.name.ends_with("_tiny"));
    for (i, arch) in full.enumerate() {
        // Necks and last strides alternate across the list.
        let m = model(arch.name, i % 2 == 1, 1 + i % 2);
        randomize(&m, 5 + i as u64);
        let path = save(&m, (64, 32), dir.path(), arch.name);
        // Normalisation is the same nodes for all: both ways for the paper's two
        // backbones, normalised for the rest (what `reid extract` gives by default).
        let both = ["res2net50_26w_4s", "resnet50"].contains(&arch.name);
        check(&path, dir.path(), 4, if both { &[false, true] } else { &[true] });
    }
}

fn tiny_checkpoint(dir: &Path) -> PathBuf {
    let m = model("res2net_tiny", true, 2);
    randomize(&m, 2);
    save(&m, (64, 32), dir, "tiny")
}

#[test]
fn the_file_says_what_it_holds_and_loads_at_every_supported_opset() {
    use onnx_protobuf::Message;
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_checkpoint(dir.path());
    let out = dir.path().join("m.onnx");
    let summary = export(&ckpt, &ExportOptions::default(), &out).unwrap();
    assert_eq!(summary.bytes as u64, std::fs::metadata(&out).unwrap().len());
    let proto = onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(proto.opset_import[0].version, 17);
    let meta: std::collections::HashMap<_, _> = proto
        .metadata_props
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    assert_eq!(meta["reid.arch"], "res2net_tiny");
    assert_eq!(meta["reid.input_size"], "64x32");
    assert_eq!(meta["reid.input_mean"], "0.485,0.456,0.406");
    assert_eq!(meta["reid.input_std"], "0.229,0.224,0.225");
    assert_eq!(meta["reid.bnneck"], "true");
    assert_eq!(
        meta["reid.checkpoint_sha256"],
        reid_data::gallery::sha256_file(&ckpt).unwrap()
    );
    let graph = &proto.graph;
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(!ops.contains(&"BatchNormalization"), "batch norms are folded");
    assert_eq!(
        ops.iter().filter(|o| **o == "Conv").count(),
        1 + 8 * 5 + 4,
        "stem, 8 blocks of 5, 4 downsamples"
    );
    assert_eq!(
        (graph.input[0].name.as_str(), graph.output[0].name.as_str()),
        ("images", "features")
    );

    let batch = images(2, reid_io::InputSpec::bilinear(64, 32), 9);
    let (m, info) = reid_model::checkpoint::load(&ckpt, reid_model::Exec::default(), &Device::Cpu).unwrap();
    let want = embed(&m, info.input, &batch, &ExtractOptions::default()).unwrap();
    for opset in [13, 18, 21] {
        let out = dir.path().join(format!("m{opset}.onnx"));
        export(&ckpt, &ExportOptions { opset, normalize: true }, &out).unwrap();
        let plan = tract_plan(&out);
        assert_close(&onnx_features(&plan, &batch), &want, 256, &format!("opset {opset}"));
    }
}

/// Runs a failing export and returns its message, checking that nothing was written.
fn failure(checkpoint: &Path, options: ExportOptions, out: &Path) -> String {
    let dir = out.parent().unwrap();
    let before: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let err = export(checkpoint, &options, out).unwrap_err().to_string();
    let after: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "{err}: a file was written");
    err
}

#[test]
fn a_malformed_or_mismatched_checkpoint_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.onnx");
    let options = ExportOptions::default();

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let err = failure(&garbage, options, &out);
    assert!(err.contains("garbage.safetensors"), "{err}");

    // timm's weights, not a reid checkpoint: no model facts in the header.
    let timm = reid_fixtures::root().join("res2net_tiny/model.safetensors");
    let err = failure(&timm, options, &out);
    assert!(err.contains("not a reid checkpoint"), "{err}");

    // A ResNet's tensors under a header that says Res2Net.
    let m = model("resnet_tiny", false, 2);
    randomize(&m, 1);
    let lie = std::collections::BTreeMap::from([("reid.arch".to_string(), "res2net_tiny".to_string())]);
    let mismatched = dir.path().join("mismatched.safetensors");
    reid_model::checkpoint::save(&m, reid_io::InputSpec::bilinear(64, 32), &lie, &mismatched).unwrap();
    let err = failure(&mismatched, options, &out);
    assert!(
        err.contains("do not fit the model") && err.contains("layer1.0.convs.0.weight"),
        "{err}"
    );

    let ckpt = tiny_checkpoint(dir.path());
    let err = failure(
        &ckpt,
        ExportOptions {
            opset: 12,
            normalize: true,
        },
        &out,
    );
    assert!(err.contains("--opset 12") && err.contains("13 to 21"), "{err}");
    let err = failure(&ckpt, options, &ckpt);
    assert!(err.contains("is the checkpoint itself"), "{err}");
    assert!(!out.exists());
}
