//! Dataset layouts: how a dataset folder maps to manifest records.
//!
//! Each layout implements [`DatasetLayout`]; [`DatasetKind`] names them for the
//! command line. Adding a dataset (CUHK03, say) means one more `DatasetLayout` and one more
//! `DatasetKind` variant (as [`crate::msmt17`] does); callers only see
//! [`DatasetKind::layout`].

use std::collections::HashSet;
use std::fs;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::manifest::{Manifest, ManifestRecord, Split};
use crate::names::{parse_dukemtmc, parse_market1501, ParsedName};

/// File extensions that count as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "bmp"];

/// Whether `path` has an image extension.
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// How indexing treats bad entries.
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexOptions {
    /// Skip (and count) unparsable names, cameras out of range and duplicates
    /// instead of failing.
    pub skip_invalid: bool,
    /// MSMT17: add `list_val.txt`'s images to train (torchreid's `combineall`).
    pub merge_val: bool,
}

/// The outcome of indexing: the manifest and what was left out of it.
#[derive(Debug, Clone)]
pub struct IndexReport {
    pub manifest: Manifest,
    /// Files ignored because their extension is not an image's (e.g. `Thumbs.db`).
    pub skipped_non_images: usize,
    /// One message per entry skipped under `skip_invalid`.
    pub skipped_invalid: Vec<String>,
}

/// A dataset layout: finds the images under a root and describes each one.
pub trait DatasetLayout {
    /// The dataset name stored in the manifest.
    fn name(&self) -> &'static str;
    /// Indexes the dataset at `root`.
    fn index(&self, root: &Path, options: &IndexOptions) -> Result<IndexReport>;
}

/// The layouts `reid index --dataset` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    Market1501,
    DukeMtmcReid,
    Msmt17,
    Csv,
}

impl DatasetKind {
    /// Every kind, for help texts.
    pub const ALL: [DatasetKind; 4] = [
        DatasetKind::Market1501,
        DatasetKind::DukeMtmcReid,
        DatasetKind::Msmt17,
        DatasetKind::Csv,
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetKind::Market1501 => "market1501",
            DatasetKind::DukeMtmcReid => "dukemtmc-reid",
            DatasetKind::Msmt17 => "msmt17",
            DatasetKind::Csv => "csv",
        }
    }

    /// The layout that indexes this kind.
    pub fn layout(self) -> Box<dyn DatasetLayout> {
        match self {
            DatasetKind::Market1501 => Box::new(FolderLayout::market1501()),
            DatasetKind::DukeMtmcReid => Box::new(FolderLayout::dukemtmc_reid()),
            DatasetKind::Msmt17 => Box::new(crate::msmt17::Msmt17Layout),
            DatasetKind::Csv => Box::new(CsvLayout),
        }
    }
}

impl FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        DatasetKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown dataset '{s}' (expected market1501, dukemtmc-reid, msmt17 or csv)"))
    }
}

/// Collects entries rejected under `skip_invalid`, or fails on the first one.
pub(crate) struct Rejections {
    skip: bool,
    pub(crate) messages: Vec<String>,
}

impl Rejections {
    pub(crate) fn new(skip: bool) -> Self {
        Rejections {
            skip,
            messages: Vec::new(),
        }
    }

    pub(crate) fn reject(&mut self, path: &Path, message: String) -> Result<()> {
        if self.skip {
            self.messages.push(format!("{}: {message}", path.display()));
            Ok(())
        } else {
            Err(DataError::invalid(
                path,
                format!("{message} (pass --skip-invalid to skip such entries)"),
            ))
        }
    }
}

/// Market-1501-style folders: `bounding_box_train`, `query`, `bounding_box_test`,
/// with the identity, camera and frame encoded in each file name.
pub struct FolderLayout {
    name: &'static str,
    example: &'static str,
    parse: fn(&str) -> Option<ParsedName>,
    cameras: RangeInclusive<i64>,
}

/// The split folders of Market-1501 and DukeMTMC-reID.
pub const SPLIT_FOLDERS: [(Split, &str); 3] = [
    (Split::Train, "bounding_box_train"),
    (Split::Query, "query"),
    (Split::Gallery, "bounding_box_test"),
];

impl FolderLayout {
    /// Market-1501: names like `0002_c1s1_000451_03.jpg`, cameras 1-6.
    pub fn market1501() -> Self {
        FolderLayout {
            name: "market1501",
            example: "0002_c1s1_000451_03.jpg",
            parse: parse_market1501,
            cameras: 1..=6,
        }
    }

    /// DukeMTMC-reID: names like `0001_c2_f0046182.jpg`, cameras 1-8.
    pub fn dukemtmc_reid() -> Self {
        FolderLayout {
            name: "dukemtmc-reid",
            example: "0001_c2_f0046182.jpg",
            parse: parse_dukemtmc,
            cameras: 1..=8,
        }
    }

    /// The dataset folder: `root` itself, or its one sub-folder holding
    /// `bounding_box_train` (users point at the parent of `Market-1501-v15.09.15/`).
    fn resolve_root(&self, root: &Path) -> Result<PathBuf> {
        if !root.is_dir() {
            return Err(DataError::invalid(
                root,
                "no such folder; pass the dataset folder (holding bounding_box_train, query, bounding_box_test) or its parent",
            ));
        }
        if root.join(SPLIT_FOLDERS[0].1).is_dir() {
            return Ok(root.to_path_buf());
        }
        let mut candidates: Vec<PathBuf> = fs::read_dir(root)
            .map_err(|e| DataError::io(root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(SPLIT_FOLDERS[0].1).is_dir())
            .collect();
        candidates.sort();
        match candidates.len() {
            1 => Ok(candidates.remove(0)),
            0 => Err(DataError::invalid(
                root,
                format!(
                    "no bounding_box_train folder here or in a sub-folder; expected the {} layout (bounding_box_train, query, bounding_box_test)",
                    self.name
                ),
            )),
            _ => Err(DataError::invalid(
                root,
                format!(
                    "several dataset folders found ({}); pass one of them as --root",
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

impl DatasetLayout for FolderLayout {
    fn name(&self) -> &'static str {
        self.name
    }

    fn index(&self, root: &Path, options: &IndexOptions) -> Result<IndexReport> {
        let root = self.resolve_root(root)?;
        let mut rejections = Rejections::new(options.skip_invalid);
        let mut skipped_non_images = 0;
        let mut records = Vec::new();
        for (split, folder) in SPLIT_FOLDERS {
            let dir = root.join(folder);
            if !dir.is_dir() {
                return Err(DataError::invalid(
                    &dir,
                    format!("missing split folder '{folder}' of the {} layout", self.name),
                ));
            }
            let mut names: Vec<String> = fs::read_dir(&dir)
                .map_err(|e| DataError::io(&dir, e))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()
                .map_err(|e| DataError::io(&dir, e))?;
            names.sort();
            let before = records.len();
            for name in names {
                let path = dir.join(&name);
                if !is_image_path(&path) {
                    skipped_non_images += 1;
                    continue;
                }
                let Some(parsed) = (self.parse)(&name) else {
                    rejections.reject(
                        &path,
                        format!("file name does not parse; expected a name like {}", self.example),
                    )?;
                    continue;
                };
                if !self.cameras.contains(&parsed.camera) {
                    rejections.reject(
                        &path,
                        format!(
                            "camera c{} out of range c{}-c{} for {}",
                            parsed.camera,
                            self.cameras.start(),
                            self.cameras.end(),
                            self.name
                        ),
                    )?;
                    continue;
                }
                if split == Split::Train && parsed.pid < 0 {
                    rejections.reject(&path, "junk image (-1) in the train split".into())?;
                    continue;
                }
                records.push(ManifestRecord {
                    path: format!("{folder}/{name}"),
                    split,
                    pid: parsed.pid,
                    label: None,
                    camid: parsed.camera - 1,
                    frame: Some(parsed.frame),
                });
            }
            if records.len() == before {
                return Err(DataError::invalid(&dir, format!("split '{split}' has no images")));
            }
        }
        Ok(IndexReport {
            manifest: Manifest::new(self.name, root, records),
            skipped_non_images,
            skipped_invalid: rejections.messages,
        })
    }
}

/// A custom dataset described by a CSV file with the header `path,pid,camid,split`
/// (columns in any order). `--root` is the CSV file itself, or a folder holding
/// `dataset.csv`; image paths are relative to the CSV file's folder. `camid` is
/// 0-based; `pid` is -1 for junk, 0 or more otherwise.
pub struct CsvLayout;

/// The CSV file name looked for when `--root` is a folder.
pub const CSV_DEFAULT_NAME: &str = "dataset.csv";

/// The CSV file `root` names: the file itself, or `dataset.csv` in a folder.
fn csv_file(root: &Path) -> Result<PathBuf> {
    let path = if root.is_dir() {
        root.join(CSV_DEFAULT_NAME)
    } else {
        root.to_path_buf()
    };
    if !path.is_file() {
        return Err(DataError::invalid(
            &path,
            "no such CSV file; pass the CSV (header path,pid,camid,split) or a folder holding dataset.csv",
        ));
    }
    Ok(path)
}

/// Positions of the four columns of a dataset CSV.
struct CsvColumns {
    path: usize,
    pid: usize,
    camid: usize,
    split: usize,
}

impl CsvColumns {
    fn find(headers: &csv::StringRecord, file: &Path) -> Result<Self> {
        let column = |name: &str| {
            headers.iter().position(|h| h == name).ok_or_else(|| {
                DataError::invalid(
                    file,
                    format!("missing column '{name}'; expected the header path,pid,camid,split"),
                )
            })
        };
        Ok(CsvColumns {
            path: column("path")?,
            pid: column("pid")?,
            camid: column("camid")?,
            split: column("split")?,
        })
    }

    /// The record of one row whose path is `rel`, or why it is refused.
    fn record(&self, row: &csv::StringRecord, rel: String) -> std::result::Result<ManifestRecord, String> {
        let field = |c: usize| row.get(c).unwrap_or("");
        let pid = match field(self.pid).parse::<i64>() {
            Ok(p) if p >= -1 => p,
            _ => return Err("pid must be an integer >= -1".into()),
        };
        let camid = match field(self.camid).parse::<i64>() {
            Ok(c) if c >= 0 => c,
            _ => return Err("camid out of range: must be an integer >= 0 (0-based)".into()),
        };
        let split = field(self.split).parse::<Split>()?;
        if split == Split::Train && pid < 0 {
            return Err("junk image (-1) in the train split".into());
        }
        Ok(ManifestRecord {
            path: rel,
            split,
            pid,
            label: None,
            camid,
            frame: None,
        })
    }
}

impl DatasetLayout for CsvLayout {
    fn name(&self) -> &'static str {
        "csv"
    }

    fn index(&self, root: &Path, options: &IndexOptions) -> Result<IndexReport> {
        let csv_path = csv_file(root)?;
        let base = csv_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let bad = |e: csv::Error| DataError::invalid(&csv_path, e.to_string());
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_path(&csv_path)
            .map_err(bad)?;
        let columns = CsvColumns::find(&reader.headers().map_err(bad)?.clone(), &csv_path)?;
        let mut rejections = Rejections::new(options.skip_invalid);
        let (mut skipped_non_images, mut seen, mut records) = (0, HashSet::new(), Vec::new());
        for (i, row) in reader.records().enumerate() {
            let line = i + 2;
            let row = row.map_err(|e| DataError::invalid(&csv_path, format!("line {line}: {e}")))?;
            let rel = row.get(columns.path).unwrap_or("").replace('\\', "/");
            if !is_image_path(Path::new(&rel)) {
                skipped_non_images += 1;
                continue;
            }
            let record = columns.record(&row, rel.clone()).and_then(|r| {
                if !seen.insert(rel.clone()) {
                    Err("duplicate path".to_string())
                } else if !base.join(&rel).is_file() {
                    Err("image file not found".to_string())
                } else {
                    Ok(r)
                }
            });
            match record {
                Ok(r) => records.push(r),
                Err(m) => rejections.reject(&csv_path, format!("line {line} ({rel}): {m}"))?,
            }
        }
        if let Some(split) = Split::ALL.into_iter().find(|s| !records.iter().any(|r| r.split == *s)) {
            return Err(DataError::invalid(&csv_path, format!("split '{split}' has no images")));
        }
        Ok(IndexReport {
            manifest: Manifest::new("csv", base, records),
            skipped_non_images,
            skipped_invalid: rejections.messages,
        })
    }
}
