//! The whole pipeline end to end on a tiny generated dataset: `reid demo` writes
//! every artifact, learns far above chance, reuses its caches on a second run; a
//! corrupt image stops training with the documented error.

mod common;

use common::{ok, reid, tiny_dataset};

const DEMO: [&str; 15] = [
    "demo",
    "--size",
    "tiny",
    "--set",
    "schedule.epochs=20",
    "--set",
    "data.batch_size=8",
    "--set",
    "run.log_every=4",
    "--set",
    "optim.lr=0.04",
    "--set",
    "augment.erase=0.3",
    "--set",
    "schedule.warmup_epochs=0",
];

#[test]
fn the_demo_writes_every_artifact_learns_and_reuses_its_caches() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&reid(&DEMO, dir.path()));
    assert!(stdout.contains("rank-1") && stdout.contains("report.html"), "{stdout}");

    let a = dir.path().join("artifacts");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("reports/demo/metrics.json")).unwrap()).unwrap();
    for key in [
        "rank1",
        "rank5",
        "rank10",
        "cmc",
        "mAP",
        "mINP",
        "num_queries",
        "num_valid_queries",
        "metric",
        "rerank",
    ] {
        assert!(metrics.get(key).is_some(), "metrics.json lacks {key}");
    }
    // 12 test identities: chance rank-1 is about 1/12; twenty short epochs reach several
    // times that (the exact figure depends on the CPU's float kernels).
    let rank1 = metrics["rank1"].as_f64().unwrap();
    assert!(rank1 > 0.2, "rank-1 {rank1} is not well above chance (1/12)");
    for png in ["cmc.png", "ranked.png", "training.png"] {
        let img = image::open(a.join("reports/demo").join(png)).unwrap();
        assert!(img.width() > 100 && img.height() > 100, "{png}");
    }
    let html = std::fs::read_to_string(a.join("reports/demo/report.html")).unwrap();
    assert!(html.contains("cmc.png") && html.contains("ranked.png") && html.contains("id=\"metrics\""));
    let gallery = reid_data::gallery::Gallery::read(&a.join("features/demo/gallery.safetensors")).unwrap();
    assert_eq!(gallery.len(), 75);
    assert!(a.join("runs/demo/checkpoints/last.safetensors").is_file());

    // The loss falls over training.
    let csv = std::fs::read_to_string(a.join("runs/demo/metrics.csv")).unwrap();
    let loss_column = csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "loss")
        .unwrap();
    let losses: Vec<f64> = csv
        .lines()
        .filter(|l| l.starts_with("epoch,"))
        .map(|l| l.split(',').nth(loss_column).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 20);
    assert!(losses[19] < 0.8 * losses[0], "loss did not fall: {losses:?}");

    // A second run reuses every stage.
    let again = ok(&reid(&DEMO, dir.path()));
    for stage in ["[synth] cached", "[index] cached", "[train] cached"] {
        assert!(again.contains(stage), "{stage} missing from:\n{again}");
    }
    let extract = again.lines().find(|l| l.starts_with("[extract]")).unwrap_or_default();
    assert_eq!(extract.matches("cached (same checkpoint").count(), 2, "{again}");

    // Several runs evaluated together give one comparison table and one chart.
    let (q, g) = (
        a.join("features/demo/query.safetensors"),
        a.join("features/demo/gallery.safetensors"),
    );
    let (q, g) = (q.to_str().unwrap(), g.to_str().unwrap());
    let out = dir.path().join("compare");
    let table = ok(&reid(
        &[
            "evaluate",
            "--query",
            q,
            "--gallery",
            g,
            "--query",
            q,
            "--gallery",
            g,
            "--ranked",
            "0",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert!(table.contains("rank-1  rank-5"), "{table}");
    let csv = std::fs::read_to_string(out.join("comparison.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert_eq!(rows[1], rows[2]);
    assert!(out.join("cmc.png").is_file());
}

#[test]
fn a_corrupt_training_image_names_the_file_or_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    tiny_dataset(dir.path(), [4, 16, 2, 4, 4, 0, 0]);
    let victim = std::fs::read_dir(dir.path().join("syn/bounding_box_train"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&victim, b"this is not a jpeg").unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let train = |extra: &[&str], out: &str| {
        let mut args = vec![
            "train",
            "--manifest",
            "m.parquet",
            "--out",
            out,
            "--set",
            "model.arch=\"res2net_tiny\"",
        ];
        for s in [
            "data.height=64",
            "data.width=32",
            "data.batch_size=4",
            "schedule.epochs=1",
        ] {
            args.extend(["--set", s]);
        }
        args.extend_from_slice(extra);
        reid(&args, dir.path())
    };
    let failed = train(&[], "run-a");
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(&name) && stderr.contains("cannot decode image"),
        "{stderr}"
    );
    let skipped = train(&["--set", "data.skip_unreadable=true"], "run-b");
    ok(&skipped);
}

#[test]
fn the_demo_retrains_when_its_recipe_changes_and_reuses_an_identical_run() {
    let dir = tempfile::tempdir().unwrap();
    let demo = |lr: &str| {
        let args = [
            "demo",
            "--size",
            "tiny",
            "--no-flip",
            "--set",
            "schedule.epochs=1",
            "--set",
            "data.batch_size=8",
            "--set",
            lr,
        ];
        ok(&reid(&args, dir.path()))
    };
    let first = demo("optim.lr=0.04");
    assert!(first.contains("[train] trained 1 epochs"), "{first}");
    let changed = demo("optim.lr=0.03");
    assert!(
        changed.contains("the recipe changed (optim.lr: 0.04 -> 0.03)") && changed.contains("[train] trained"),
        "{changed}"
    );
    // New weights: the galleries are extracted again.
    assert!(!changed.contains("cached (same checkpoint"), "{changed}");
    let same = demo("optim.lr=0.03");
    assert!(
        same.contains("[train] cached") && same.contains("cached (same checkpoint"),
        "{same}"
    );
}
