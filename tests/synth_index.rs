//! End to end: `reid synth` renders a dataset that `reid index` reads back with the
//! expected summary, and bad input gives a clear error and a non-zero exit.

mod common;

use common::reid;
use reid_data::{Manifest, Split};

const SMALL: [&str; 16] = [
    "--cameras",
    "3",
    "--train-ids",
    "6",
    "--train-images",
    "30",
    "--test-ids",
    "5",
    "--query-images",
    "12",
    "--gallery-images",
    "20",
    "--distractors",
    "4",
    "--junk",
    "3",
];

#[test]
fn synth_then_index_gives_the_expected_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["synth", "--out", "data/syn", "--seed", "3"];
    args.extend(SMALL);
    let out = reid(&args, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A second run with the same settings reuses the folder.
    let again = reid(&args, dir.path());
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));

    let out = reid(&["index", "--dataset", "market1501", "--root", "data/syn"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("train") && stdout.contains("training classes: 6"),
        "{stdout}"
    );

    let m = Manifest::read_parquet(&dir.path().join("artifacts/manifests/market1501.parquet")).unwrap();
    assert_eq!(m.dataset, "market1501");
    let s = m.summary();
    assert_eq!((s[0].images, s[0].identities), (30, 6));
    assert_eq!((s[1].images, s[1].identities), (12, 5));
    // Gallery: 20 images of the 5 test identities, 4 distractors (0), 3 junk (-1).
    assert_eq!((s[2].images, s[2].identities), (27, 7));
    assert_eq!(m.split(Split::Gallery).filter(|r| r.pid == -1).count(), 3);
    assert_eq!(m.split(Split::Gallery).filter(|r| r.pid == 0).count(), 4);
    for r in &m.records {
        assert!(m.image_path(r).is_file(), "{}", r.path);
        image::open(m.image_path(r)).unwrap();
    }
}

#[test]
fn indexing_a_bad_tree_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["synth", "--out", "syn", "--seed", "1"];
    args.extend(SMALL);
    assert!(reid(&args, dir.path()).status.success());
    std::fs::write(dir.path().join("syn/query/garbage.jpg"), b"x").unwrap();
    let out = reid(
        &[
            "index",
            "--dataset",
            "market1501",
            "--root",
            "syn",
            "--out",
            "m.parquet",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("garbage.jpg") && stderr.contains("--skip-invalid"),
        "{stderr}"
    );
    assert!(!dir.path().join("m.parquet").exists());

    let out = reid(
        &[
            "index",
            "--dataset",
            "market1501",
            "--root",
            "syn",
            "--out",
            "m.parquet",
            "--skip-invalid",
        ],
        dir.path(),
    );
    assert!(out.status.success());
    assert!(dir.path().join("m.parquet").exists());
}
