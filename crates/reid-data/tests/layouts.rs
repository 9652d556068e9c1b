//! Small dataset trees per layout, with exact expected counts and the errors that
//! bad input gives.

use std::fs;
use std::path::Path;

use reid_data::{DatasetKind, IndexOptions, Split};

fn touch(root: &Path, rel: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, b"not decoded by the indexer").unwrap();
}

fn market_tree(root: &Path) {
    for f in [
        "bounding_box_train/0002_c1s1_000451_03.jpg",
        "bounding_box_train/0002_c2s1_000551_01.jpg",
        "bounding_box_train/0007_c3s2_001200_02.jpg",
        "bounding_box_train/Thumbs.db",
        "query/0003_c1s1_000100_00.jpg",
        "query/0003_c4s1_000200_00.jpg",
        "bounding_box_test/0003_c2s1_000300_01.jpg",
        "bounding_box_test/0000_c5s1_000400_01.jpg",
        "bounding_box_test/-1_c6s1_000500_01.jpg",
    ] {
        touch(root, f);
    }
}

fn index(kind: DatasetKind, root: &Path, skip_invalid: bool) -> reid_data::Result<reid_data::IndexReport> {
    kind.layout().index(
        root,
        &IndexOptions {
            skip_invalid,
            ..Default::default()
        },
    )
}

#[test]
fn market_tree_counts_labels_and_cameras() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("Market-1501-v15.09.15");
    market_tree(&root);
    // The parent folder works too.
    for given in [root.clone(), dir.path().to_path_buf()] {
        let report = index(DatasetKind::Market1501, &given, false).unwrap();
        let m = &report.manifest;
        assert_eq!(m.root, root);
        assert_eq!(report.skipped_non_images, 1);
        let s = m.summary();
        assert_eq!((s[0].images, s[0].identities, s[0].cameras), (3, 2, 3));
        assert_eq!((s[1].images, s[1].identities, s[1].cameras), (2, 1, 2));
        assert_eq!((s[2].images, s[2].identities, s[2].cameras), (3, 3, 3));
        assert_eq!(m.num_classes(), 2);
        let junk = m.records.iter().find(|r| r.pid == -1).unwrap();
        assert_eq!((junk.split, junk.camid, junk.frame), (Split::Gallery, 5, Some(500)));
        assert!(m.records.iter().any(|r| r.pid == 0 && r.split == Split::Gallery));
        let labels: Vec<_> = m.split(Split::Train).map(|r| (r.pid, r.label)).collect();
        assert_eq!(labels, vec![(2, Some(0)), (2, Some(0)), (7, Some(1))]);
        assert!(m.split(Split::Query).all(|r| r.label.is_none()));
    }
}

#[test]
fn duke_tree_counts() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "bounding_box_train/0001_c2_f0046182.jpg",
        "bounding_box_train/0005_c8_f0000001.jpg",
        "query/0010_c1_f0000100.jpg",
        "bounding_box_test/0010_c3_f0000200.jpg",
        "bounding_box_test/0011_c3_f0000300.jpg",
    ] {
        touch(dir.path(), f);
    }
    let report = index(DatasetKind::DukeMtmcReid, dir.path(), false).unwrap();
    let s = report.manifest.summary();
    assert_eq!((s[0].images, s[0].identities, s[0].cameras), (2, 2, 2));
    assert_eq!((s[1].images, s[2].images, s[2].identities), (1, 2, 2));
    let r = &report.manifest.records[0];
    assert_eq!((r.pid, r.camid, r.frame), (1, 1, Some(46182)));
}

#[test]
fn bad_market_input_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    market_tree(dir.path());
    touch(dir.path(), "query/badname.jpg");
    let err = index(DatasetKind::Market1501, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("badname.jpg") && err.contains("does not parse") && err.contains("--skip-invalid"),
        "{err}"
    );
    let report = index(DatasetKind::Market1501, dir.path(), true).unwrap();
    assert_eq!(report.skipped_invalid.len(), 1);

    touch(dir.path(), "query/0003_c9s1_000100_00.jpg");
    let err = index(DatasetKind::Market1501, dir.path(), true)
        .map(|r| r.skipped_invalid)
        .unwrap();
    assert!(err.iter().any(|m| m.contains("camera c9 out of range")), "{err:?}");
}

#[test]
fn missing_folders_and_empty_splits_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = index(DatasetKind::Market1501, &dir.path().join("nope"), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope") && err.contains("no such folder"), "{err}");
    let err = index(DatasetKind::Market1501, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bounding_box_train"), "{err}");

    market_tree(dir.path());
    fs::remove_dir_all(dir.path().join("query")).unwrap();
    let err = index(DatasetKind::Market1501, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("query") && err.contains("missing split folder"), "{err}");
    fs::create_dir_all(dir.path().join("query")).unwrap();
    touch(dir.path(), "query/Thumbs.db");
    let err = index(DatasetKind::Market1501, dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no images"), "{err}");
}

#[test]
fn csv_layout_reads_paths_and_rejects_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["imgs/a.jpg", "imgs/b.png", "imgs/c.jpg", "imgs/d.jpg"] {
        touch(dir.path(), f);
    }
    let csv = dir.path().join("dataset.csv");
    fs::write(&csv, "path,pid,camid,split\nimgs/a.jpg,4,0,train\nimgs/b.png,9,1,train\nimgs/c.jpg,11,0,query\nimgs/d.jpg,11,2,gallery\nnotes.txt,1,0,train\n").unwrap();
    let report = index(DatasetKind::Csv, dir.path(), false).unwrap();
    assert_eq!(report.manifest.records.len(), 4);
    assert_eq!(report.skipped_non_images, 1);
    assert_eq!(report.manifest.num_classes(), 2);
    assert_eq!(report.manifest.records[3].camid, 2);

    for (row, message) in [
        ("imgs/a.jpg,5,0,train", "duplicate path"),
        ("imgs/zzz.jpg,5,0,train", "image file not found"),
        ("imgs/c.jpg,5,-3,query", "camid out of range"),
        ("imgs/c.jpg,x,0,query", "pid must be"),
        ("imgs/c.jpg,5,0,validation", "unknown split"),
    ] {
        let body = format!(
            "path,pid,camid,split\nimgs/a.jpg,4,0,train\nimgs/c.jpg,11,0,query\nimgs/d.jpg,11,2,gallery\n{row}\n"
        );
        fs::write(&csv, body).unwrap();
        let err = index(DatasetKind::Csv, &csv, false).unwrap_err().to_string();
        assert!(err.contains("dataset.csv") && err.contains(message), "{row}: {err}");
        assert_eq!(
            index(DatasetKind::Csv, &csv, true).unwrap().skipped_invalid.len(),
            1,
            "{row}"
        );
    }
    fs::write(&csv, "file,pid,camid,split\n").unwrap();
    let err = index(DatasetKind::Csv, &csv, false).unwrap_err().to_string();
    assert!(err.contains("missing column 'path'"), "{err}");
}

/// A hand-written MSMT17 tree: train identities 0 and 1 (one more image of 0 in
/// the val list), test identities 0 and 5, cameras from the third name field.
fn msmt17_tree(root: &Path, train: &str, test: &str) {
    let lists = [
        (
            "list_train.txt",
            train,
            vec![
                "0000/0000_000_01_0303morning_0015_0.jpg 0",
                "0001/0001_000_15_0303noon_0100_1.jpg 1",
                "0001/0001_001_02_0303noon_0101_0.jpg 1",
            ],
        ),
        ("list_val.txt", train, vec!["0000/0000_001_03_0303morning_0020_0.jpg 0"]),
        (
            "list_query.txt",
            test,
            vec![
                "0000/0000_000_04_0113morning_0001_0.jpg 0",
                "0005/0005_000_02_0113morning_0002_0.jpg 5",
            ],
        ),
        (
            "list_gallery.txt",
            test,
            vec![
                "0000/0000_001_07_0113morning_0003_0.jpg 0",
                "0005/0005_001_09_0113morning_0004_0.jpg 5",
                "0005/0005_002_11_0113morning_0005_0.jpg 5",
            ],
        ),
    ];
    for (list, folder, lines) in lists {
        for line in &lines {
            touch(root, &format!("{folder}/{}", line.split(' ').next().unwrap()));
        }
        fs::write(root.join(list), lines.join("\n") + "\n").unwrap();
    }
}

#[test]
fn msmt17_v1_and_v2_read_the_lists_and_merge_val_on_request() {
    let dir = tempfile::tempdir().unwrap();
    for (release, train, test) in [
        ("MSMT17_V1", "train", "test"),
        ("MSMT17_V2", "mask_train_v2", "mask_test_v2"),
    ] {
        let root = dir.path().join(release);
        msmt17_tree(&root, train, test);
        for merge_val in [false, true] {
            let options = IndexOptions {
                merge_val,
                ..Default::default()
            };
            let m = DatasetKind::Msmt17.layout().index(&root, &options).unwrap().manifest;
            let s = m.summary();
            let train_images = if merge_val { 4 } else { 3 };
            assert_eq!(
                (s[0].images, s[0].identities),
                (train_images, 2),
                "{release} merge_val={merge_val}"
            );
            assert_eq!(
                (s[1].images, s[1].identities, s[2].images, s[2].identities),
                (2, 2, 3, 2)
            );
            assert_eq!(m.num_classes(), 2);
            let first = &m.records[0];
            assert_eq!(first.path, format!("{train}/0000/0000_000_01_0303morning_0015_0.jpg"));
            assert_eq!((first.pid, first.camid, first.label), (0, 0, Some(0)));
            let cams: Vec<i64> = m.split(Split::Gallery).map(|r| r.camid).collect();
            assert_eq!(cams, vec![6, 8, 10]);
            assert!(m.split(Split::Train).any(|r| r.camid == 14), "camera 15");
        }
    }
    // The parent of one release folder works; of two, it asks which.
    let err = index(DatasetKind::Msmt17, dir.path(), false).unwrap_err().to_string();
    assert!(err.contains("several MSMT17 folders"), "{err}");
    fs::remove_dir_all(dir.path().join("MSMT17_V2")).unwrap();
    let m = index(DatasetKind::Msmt17, dir.path(), false).unwrap().manifest;
    assert_eq!(m.root, dir.path().join("MSMT17_V1"));
}

#[test]
fn bad_msmt17_lists_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("MSMT17_V1");
    msmt17_tree(&root, "train", "test");
    let gallery = root.join("list_gallery.txt");
    let good = fs::read_to_string(&gallery).unwrap();
    for (bad_line, says) in [
        ("0005/0005_009_09_0113morning_0009_0.jpg 5", "not found"),
        ("0005/0005_002_11_0113morning_0005_0.jpg 5", "listed twice"),
        ("0005/0005_002_16_0113morning_0005_0.jpg 5", "out of range 1-15"),
        ("0005/0005_002_11_0113morning_0005_0.jpg x", "not a whole number"),
        (
            "0005/0005_002_11_0113morning_0005_0.jpg",
            "expected '<image path> <identity>'",
        ),
        ("0005/badname.jpg 5", "does not parse"),
    ] {
        fs::write(&gallery, format!("{good}{bad_line}\n")).unwrap();
        let err = index(DatasetKind::Msmt17, &root, false).unwrap_err().to_string();
        assert!(
            err.contains("list_gallery.txt") && err.contains("line 4") && err.contains(says),
            "{err}"
        );
        let report = index(DatasetKind::Msmt17, &root, true).unwrap();
        assert_eq!(report.skipped_invalid.len(), 1, "{bad_line}");
        assert_eq!(report.manifest.split(Split::Gallery).count(), 3);
    }
    fs::remove_file(root.join("list_val.txt")).unwrap();
    let err = index(DatasetKind::Msmt17, &root, false).unwrap_err().to_string();
    assert!(
        err.contains("not an MSMT17 folder") && err.contains("list_val.txt"),
        "{err}"
    );
}
