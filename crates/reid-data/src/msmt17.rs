//! MSMT17 as distributed: V1 (`train/`, `test/`) or V2 (`mask_train_v2/`,
//! `mask_test_v2/`), with the list files `list_train.txt`, `list_val.txt`,
//! `list_query.txt` and `list_gallery.txt`. Each list line is `<path> <pid>`, the
//! path relative to the train or test folder. Identities come from the lists (train
//! and test are numbered from 0 separately, as in the lists), cameras from the
//! third `_` field of the file name (1 to 15). `list_val.txt` holds more images of
//! the train identities; [`IndexOptions::merge_val`] adds them to train (torchreid's
//! `combineall` of train and val).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::layout::{is_image_path, DatasetLayout, IndexOptions, IndexReport, Rejections};
use crate::manifest::{Manifest, ManifestRecord, Split};
use crate::names::parse_msmt17_camera;

/// MSMT17's cameras.
pub const CAMERAS: std::ops::RangeInclusive<i64> = 1..=15;

/// The image folders of each release: (train, test).
pub const VERSIONS: [(&str, &str); 2] = [("train", "test"), ("mask_train_v2", "mask_test_v2")];

/// The list files, the split their entries go to and whether they name train-folder
/// images; `list_val.txt` is read only when merging.
pub const LISTS: [(&str, Split, bool); 4] = [
    ("list_train.txt", Split::Train, true),
    ("list_val.txt", Split::Train, true),
    ("list_query.txt", Split::Query, false),
    ("list_gallery.txt", Split::Gallery, false),
];

/// The MSMT17 layout.
pub struct Msmt17Layout;

/// Whether `dir` is an MSMT17 folder; returns its (train, test) folder names.
fn release(dir: &Path) -> Option<(&'static str, &'static str)> {
    let lists = LISTS.iter().all(|(l, ..)| dir.join(l).is_file());
    let folders = VERSIONS
        .into_iter()
        .find(|(tr, te)| dir.join(tr).is_dir() && dir.join(te).is_dir());
    folders.filter(|_| lists)
}

/// The dataset folder (`root` or its one sub-folder that is one) and its folders.
fn resolve(root: &Path) -> Result<(PathBuf, (&'static str, &'static str))> {
    if let Some(r) = release(root) {
        return Ok((root.to_path_buf(), r));
    }
    let mut found: Vec<(PathBuf, (&str, &str))> = fs::read_dir(root)
        .map_err(|e| DataError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| release(&p).map(|r| (p, r)))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(DataError::invalid(
            root,
            "not an MSMT17 folder: expected train/ and test/ (V1) or mask_train_v2/ and mask_test_v2/ (V2) with list_train.txt, list_val.txt, list_query.txt and list_gallery.txt, here or in one sub-folder",
        )),
        _ => Err(DataError::invalid(
            root,
            "several MSMT17 folders found; pass one of them as --root",
        )),
    }
}

/// One list line `<path> <pid>` as a record, or why it is refused.
fn record(line: &str, folder: &str, split: Split, dir: &Path) -> std::result::Result<ManifestRecord, String> {
    let mut fields = line.split_whitespace();
    let (Some(rel), Some(pid), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err("expected '<image path> <identity>'".into());
    };
    let pid: i64 = pid
        .parse()
        .ok()
        .filter(|p| *p >= 0)
        .ok_or_else(|| format!("identity '{pid}' is not a whole number >= 0"))?;
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if !is_image_path(Path::new(name)) {
        return Err(format!("'{rel}' is not an image file name"));
    }
    let camera = parse_msmt17_camera(name)
        .ok_or_else(|| format!("'{name}' does not parse; expected a name like 0000_000_01_0303morning_0015_0.jpg"))?;
    if !CAMERAS.contains(&camera) {
        return Err(format!("camera {camera} of '{name}' out of range 1-15"));
    }
    if !dir.join(folder).join(rel).is_file() {
        return Err(format!("image {folder}/{rel} not found"));
    }
    Ok(ManifestRecord {
        path: format!("{folder}/{rel}"),
        split,
        pid,
        label: None,
        camid: camera - 1,
        frame: None,
    })
}

impl DatasetLayout for Msmt17Layout {
    fn name(&self) -> &'static str {
        "msmt17"
    }

    fn index(&self, root: &Path, options: &IndexOptions) -> Result<IndexReport> {
        if !root.is_dir() {
            return Err(DataError::invalid(
                root,
                "no such folder; pass the MSMT17 folder or its parent",
            ));
        }
        let (dir, (train, test)) = resolve(root)?;
        let mut rejections = Rejections::new(options.skip_invalid);
        let (mut seen, mut records) = (HashSet::new(), Vec::new());
        for (list, split, in_train) in LISTS {
            if list == "list_val.txt" && !options.merge_val {
                continue;
            }
            let path = dir.join(list);
            let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
            let folder = if in_train { train } else { test };
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let r = record(line, folder, split, &dir).and_then(|r| match seen.insert(r.path.clone()) {
                    true => Ok(r),
                    false => Err(format!("{} is listed twice", r.path)),
                });
                match r {
                    Ok(r) => records.push(r),
                    Err(m) => rejections.reject(&path, format!("line {}: {m}", i + 1))?,
                }
            }
        }
        if let Some(split) = Split::ALL.into_iter().find(|s| !records.iter().any(|r| r.split == *s)) {
            return Err(DataError::invalid(&dir, format!("split '{split}' has no images")));
        }
        Ok(IndexReport {
            manifest: Manifest::new("msmt17", dir, records),
            skipped_non_images: 0,
            skipped_invalid: rejections.messages,
        })
    }
}
