//! `reid export`: a trained checkpoint as an ONNX graph from ImageNet-normalised
//! images `images` [N, 3, H, W] (N dynamic) to retrieval features `features`
//! [N, D], batch norms folded into the convolutions, the neck included when the
//! checkpoint has one, L2-normalised unless asked otherwise. The file is written
//! with the ONNX protobuf messages of `onnx-protobuf`, atomically, and only once
//! the whole graph is built.

mod graph;
mod network;

use std::path::{Path, PathBuf};

use candle_core::Device;
use onnx_protobuf::{ModelProto, OperatorSetIdProto, StringStringEntryProto};
use protobuf::{Message, MessageField};
use reid_model::{CheckpointInfo, ReidModel, WeightError};

use graph::{Dim, GraphBuilder};
use network::Emitter;

/// The preprocessing the graph expects (`reid`'s, and torchvision's ImageNet one).
pub const INPUT_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const INPUT_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The opsets the graph is written for: every op it uses has had its present form
/// since opset 13 (`Split` and `ReduceSum` take their sizes and axes as inputs).
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;

/// What to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// The ONNX opset of the default domain (17 by default).
    pub opset: i64,
    /// L2-normalise the features (as `reid extract` does by default).
    pub normalize: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            opset: 17,
            normalize: true,
        }
    }
}

/// Why an export failed; nothing is written in any case.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] WeightError),
    #[error("tensor '{tensor}' holds {value}: the checkpoint is not finite; export a finite one")]
    NonFinite { tensor: String, value: f64 },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Data(#[from] reid_data::DataError),
    #[error(transparent)]
    File(#[from] reid_io::IoError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("cannot encode the ONNX model: {0}")]
    Encode(#[from] protobuf::Error),
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub path: PathBuf,
    pub info: CheckpointInfo,
    pub feature_dim: usize,
    pub nodes: usize,
    pub bytes: usize,
}

/// The ONNX IR version that goes with `opset` (the oldest that defines it, so that
/// older runtimes load the file).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

fn entry(key: &str, value: impl ToString) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.to_string(),
        value: value.to_string(),
        ..Default::default()
    }
}

fn join(v: &[f32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// The metadata of the exported file: what the model is, what it expects, and the
/// checkpoint it came from.
fn metadata(info: &CheckpointInfo, options: &ExportOptions, sha256: &str) -> Vec<StringStringEntryProto> {
    let (h, w) = (info.input.height, info.input.width);
    vec![
        entry("reid.arch", info.model.arch.name),
        entry("reid.last_stride", info.model.last_stride),
        entry("reid.bnneck", info.model.bnneck),
        entry("reid.input_size", format!("{h}x{w}")),
        entry("reid.input_interpolation", info.input.interpolation),
        entry("reid.input_layout", "NCHW RGB float32, x = (pixel / 255 - mean) / std"),
        entry("reid.input_mean", join(&INPUT_MEAN)),
        entry("reid.input_std", join(&INPUT_STD)),
        entry("reid.normalized", options.normalize),
        entry("reid.checkpoint_sha256", sha256),
    ]
}

/// The model as an ONNX graph (see the crate's documentation).
pub fn to_onnx(
    model: &ReidModel,
    info: &CheckpointInfo,
    options: &ExportOptions,
    checkpoint_sha256: &str,
) -> Result<ModelProto, ExportError> {
    if !OPSETS.contains(&options.opset) {
        return Err(ExportError::Invalid(format!(
            "--opset {}: the graph is written for opsets {} to {}",
            options.opset,
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let (h, w) = (info.input.height, info.input.width);
    let mut g = GraphBuilder::default();
    g.input(
        "images",
        &[Dim::Dynamic("N"), Dim::Fixed(3), Dim::Fixed(h), Dim::Fixed(w)],
    );
    let mut emit = Emitter { g: &mut g };
    let mut f = emit.backbone("images", model)?;
    if let Some(neck) = &model.neck {
        f = emit.neck(&f, neck)?;
    }
    if options.normalize {
        f = emit.l2_normalize(&f);
    }
    g.rename_output(&f, "features");
    g.output(
        "features",
        &[Dim::Dynamic("N"), Dim::Fixed(info.model.arch.feature_dim())],
    );
    Ok(ModelProto {
        ir_version: ir_version(options.opset),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: options.opset,
            ..Default::default()
        }],
        producer_name: "reid".to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        doc_string: format!(
            "{} re-ID features: images [N, 3, {h}, {w}] -> features [N, {}]",
            info.model.arch.name,
            info.model.arch.feature_dim()
        ),
        graph: MessageField::some(g.finish(info.model.arch.name)),
        metadata_props: metadata(info, options, checkpoint_sha256),
        ..Default::default()
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Exports the checkpoint at `checkpoint` to `out`. The checkpoint is read and
/// checked whole, and the graph built, before anything is written; the file then
/// appears atomically.
pub fn export(checkpoint: &Path, options: &ExportOptions, out: &Path) -> Result<Exported, ExportError> {
    if same_file(checkpoint, out) {
        return Err(ExportError::Invalid(format!(
            "--out {} is the checkpoint itself; choose another file (e.g. model.onnx)",
            out.display()
        )));
    }
    let (model, info) = reid_model::checkpoint::load(checkpoint, reid_model::Exec::default(), &Device::Cpu)?;
    let sha = reid_data::gallery::sha256_file(checkpoint)?;
    let proto = to_onnx(&model, &info, options, &sha)?;
    let nodes = proto.graph.node.len();
    let bytes = proto.write_to_bytes()?;
    reid_io::atomic::write_bytes_atomically(out, &bytes)?;
    Ok(Exported {
        path: out.to_path_buf(),
        info,
        feature_dim: info.model.arch.feature_dim(),
        nodes,
        bytes: bytes.len(),
    })
}
