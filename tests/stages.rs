//! The stages as users chain them: training with validation keeps `best`, which
//! `extract --run` then uses; `search` finds a query's matches with the checkpoint
//! that made the gallery and refuses another; `evaluate` refuses a query and a
//! gallery made by different checkpoints; `export --run` writes an ONNX file that
//! tract (an independent runtime) runs to the gallery's features.

mod common;

use std::path::Path;

use common::{ok, reid, tiny_dataset};
use reid_data::gallery::{sha256_file, Gallery};

fn prepare(dir: &Path) {
    tiny_dataset(dir, [6, 48, 4, 8, 16, 2, 1]);
    let mut train = vec!["train", "--manifest", "m.parquet", "--out", "run"];
    for s in [
        "model.pretrained=",
        "model.arch=res2net_tiny",
        "data.height=64",
        "data.width=32",
        "data.batch_size=4",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        // Batches of 4 from scratch: the paper's 0.05 without warm-up can diverge.
        "optim.lr=0.01",
        "run.eval_every=1",
        "run.checkpoint_every=1",
    ] {
        train.extend(["--set", s]);
    }
    let stdout = ok(&reid(&train, dir));
    assert_eq!(stdout.matches("validation: rank-1").count(), 2, "{stdout}");
}

#[test]
fn validation_keeps_best_and_the_later_stages_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    prepare(d);
    let best = d.join("run/checkpoints/best.safetensors");
    assert!(best.is_file(), "validation keeps checkpoints/best");
    let csv = std::fs::read_to_string(d.join("run/metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (rank1, map) = (column("rank1"), column("mAP"));
    let epochs: Vec<Vec<&str>> = csv
        .lines()
        .filter(|l| l.starts_with("epoch,"))
        .map(|l| l.split(',').collect())
        .collect();
    assert!(
        epochs.iter().all(|f| !f[rank1].is_empty() && !f[map].is_empty()),
        "epoch rows carry rank-1 and mAP: {csv}"
    );

    ok(&reid(&["extract", "--run", "run", "--out", "feat"], d));
    let gallery = Gallery::read(&d.join("feat/gallery.safetensors")).unwrap();
    assert_eq!(
        gallery.meta.checkpoint_sha256.unwrap(),
        sha256_file(&best).unwrap(),
        "extract --run takes best"
    );

    // search: the query images against the gallery, with the checkpoint that made it.
    let query = std::fs::read_dir(d.join("syn/query"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let q = query.to_str().unwrap();
    let found = ok(&reid(
        &[
            "search",
            "--gallery",
            "feat/gallery.safetensors",
            "--checkpoint",
            best.to_str().unwrap(),
            q,
            "--top",
            "3",
            "--draw",
            "strip.png",
        ],
        d,
    ));
    assert_eq!(
        found
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        3,
        "{found}"
    );
    assert!(found.contains("bounding_box_test/"), "{found}");
    assert!(image::open(d.join("strip.png")).unwrap().width() > 100);
    // An epoch's checkpoint that is not best: another checkpoint than the gallery's.
    let other = ["epoch-0001", "epoch-0002"]
        .map(|e| d.join(format!("run/checkpoints/{e}.safetensors")))
        .into_iter()
        .find(|c| sha256_file(c).unwrap() != sha256_file(&best).unwrap())
        .expect("best is one epoch's checkpoint, not both");
    let refused = reid(
        &[
            "search",
            "--gallery",
            "feat/gallery.safetensors",
            "--checkpoint",
            other.to_str().unwrap(),
            q,
        ],
        d,
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("another checkpoint"),
        "{stderr}"
    );

    // evaluate refuses a query and a gallery of different checkpoints.
    ok(&reid(
        &[
            "extract",
            "--checkpoint",
            other.to_str().unwrap(),
            "--manifest",
            "m.parquet",
            "--out",
            "other",
        ],
        d,
    ));
    let out = reid(
        &[
            "evaluate",
            "--query",
            "other/query.safetensors",
            "--gallery",
            "feat/gallery.safetensors",
        ],
        d,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("other/query.safetensors")
            && stderr.contains("feat/gallery.safetensors"),
        "{stderr}"
    );

    exported_features_match_the_gallery(d);
}

/// `reid export --run` exports `best`; tract runs the file on the gallery's images
/// and gives the gallery's (L2-normalised) features. A file that is not a
/// checkpoint fails and writes nothing.
fn exported_features_match_the_gallery(d: &Path) {
    use tract_onnx::prelude::{tvec, Framework, InferenceModelExt, IntoRunnable, Tensor};
    let said = ok(&reid(&["export", "--run", "run", "--out", "model.onnx"], d));
    assert!(said.contains("features [N, 256] (L2-normalised), opset 17"), "{said}");
    let plan = tract_onnx::onnx()
        .model_for_path(d.join("model.onnx"))
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let gallery = Gallery::read(&d.join("feat/gallery.safetensors")).unwrap();
    let root = d.join(gallery.meta.data_root.as_deref().unwrap());
    let paths = gallery.meta.paths.as_ref().unwrap();
    let data: Vec<f32> = paths
        .iter()
        .flat_map(|p| {
            reid_sampling::load_normalized(&root.join(p), reid_sampling::InputSpec::bilinear(64, 32))
                .unwrap()
                .data
        })
        .collect();
    let input = Tensor::from_shape(&[paths.len(), 3, 64, 32], &data).unwrap();
    let out = plan.run(tvec!(input.into())).unwrap();
    let got = out[0].to_plain_array_view::<f32>().unwrap();
    assert_eq!(got.shape(), &[gallery.len(), 256]);
    let worst = got
        .iter()
        .zip(gallery.features.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-5, "unit-norm features off by {worst}");

    let refused = reid(&["export", "--checkpoint", "m.parquet", "--out", "bad.onnx"], d);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("m.parquet"), "{stderr}");
    assert!(!d.join("bad.onnx").exists());
}
