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

/// The sha256 of every image under `root`, sorted (what the images show, whatever
/// their names).
fn image_hashes(root: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "jpg") {
                out.push(reid_data::gallery::sha256_file(&p).unwrap());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort();
    out
}

#[test]
fn every_synthetic_layout_indexes_with_the_same_identities_and_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut sizes: Vec<&str> = SMALL[..12].to_vec();
    sizes.extend(["--distractors", "0", "--junk", "0", "--seed", "4"]);
    let mut summaries = Vec::new();
    let mut hashes = Vec::new();
    for (layout, dataset) in [
        ("market", "market1501"),
        ("duke", "dukemtmc-reid"),
        ("msmt17", "msmt17"),
    ] {
        let mut args = vec!["synth", "--layout", layout, "--out", layout];
        args.extend(&sizes);
        let out = reid(&args, dir.path());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.contains(&format!("reid index --dataset {dataset} --root {layout}")),
            "{stdout}"
        );
        let manifest = format!("{layout}.parquet");
        let mut index = vec!["index", "--dataset", dataset, "--root", layout, "--out", &manifest];
        if layout == "msmt17" {
            // list_val.txt holds 30 * 2,373 / 32,621 = 2 of the train images.
            let out = reid(&index, dir.path());
            assert!(String::from_utf8_lossy(&out.stdout).contains("train          28"));
            index.push("--merge-val");
        }
        let out = reid(&index, dir.path());
        assert!(
            out.status.success(),
            "{layout}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = Manifest::read_parquet(&dir.path().join(&manifest)).unwrap();
        summaries.push(
            m.summary()
                .iter()
                .map(|s| (s.images, s.identities, s.cameras))
                .collect::<Vec<_>>(),
        );
        hashes.push(image_hashes(&dir.path().join(layout)));
    }
    assert_eq!(summaries[0], vec![(30, 6, 3), (12, 5, 3), (20, 5, 3)]);
    assert!(summaries.iter().all(|s| *s == summaries[0]), "{summaries:?}");
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "the same images in every layout"
    );

    let out = reid(
        &["synth", "--layout", "market", "--cameras", "7", "--out", "seven"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cameras must be 2 to 6 in the market layout"),
        "{stderr}"
    );
}
