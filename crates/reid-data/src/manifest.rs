//! The manifest: one row per image, stored as parquet (docs/FORMATS.md).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use polars::prelude::*;

use crate::error::{DataError, Result};
use reid_io::atomic::write_atomically;

/// Version of the manifest layout, stored in the parquet key-value metadata.
pub const MANIFEST_FORMAT_VERSION: &str = "1";

/// Which part of a dataset an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Split {
    Train,
    Query,
    Gallery,
}

impl Split {
    /// All splits in manifest order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Query, Split::Gallery];

    /// The name stored in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Query => "query",
            Split::Gallery => "gallery",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "query" => Ok(Split::Query),
            "gallery" => Ok(Split::Gallery),
            other => Err(format!("unknown split '{other}' (expected train, query or gallery)")),
        }
    }
}

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    /// Path relative to the dataset root, with `/` separators.
    pub path: String,
    pub split: Split,
    /// Identity as written in the file name (-1 junk, 0 distractor on Market-1501).
    pub pid: i64,
    /// Contiguous training label 0..K-1; `None` outside the train split.
    pub label: Option<i64>,
    /// Camera, 0-based.
    pub camid: i64,
    /// Frame number where the layout has one.
    pub frame: Option<i64>,
}

/// Images, identities and cameras of one split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitSummary {
    pub split: Split,
    pub images: usize,
    pub identities: usize,
    pub cameras: usize,
}

/// A whole indexed dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Dataset name, e.g. `market1501`.
    pub dataset: String,
    /// The dataset root that record paths are relative to.
    pub root: PathBuf,
    pub records: Vec<ManifestRecord>,
}

impl Manifest {
    /// Builds a manifest, assigning contiguous training labels in pid order.
    pub fn new(dataset: impl Into<String>, root: PathBuf, mut records: Vec<ManifestRecord>) -> Self {
        assign_labels(&mut records);
        Manifest {
            dataset: dataset.into(),
            root,
            records,
        }
    }

    /// The records of one split, in manifest order.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &ManifestRecord> {
        self.records.iter().filter(move |r| r.split == split)
    }

    /// Number of training identities K.
    pub fn num_classes(&self) -> usize {
        self.split(Split::Train)
            .filter_map(|r| r.label)
            .max()
            .map_or(0, |m| m as usize + 1)
    }

    /// Absolute (root-joined) path of a record's image.
    pub fn image_path(&self, record: &ManifestRecord) -> PathBuf {
        self.root.join(&record.path)
    }

    /// Images, identities and cameras per split.
    pub fn summary(&self) -> Vec<SplitSummary> {
        Split::ALL
            .iter()
            .map(|&split| {
                let mut pids = std::collections::BTreeSet::new();
                let mut cams = std::collections::BTreeSet::new();
                let mut images = 0;
                for r in self.split(split) {
                    images += 1;
                    pids.insert(r.pid);
                    cams.insert(r.camid);
                }
                SplitSummary {
                    split,
                    images,
                    identities: pids.len(),
                    cameras: cams.len(),
                }
            })
            .collect()
    }

    /// Writes the manifest as parquet, atomically, with the dataset name, root and
    /// format version in the file's key-value metadata.
    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        let pq_err = |e: PolarsError| DataError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let n = self.records.len();
        let mut paths = Vec::with_capacity(n);
        let mut splits = Vec::with_capacity(n);
        let mut pids = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        let mut camids = Vec::with_capacity(n);
        let mut frames = Vec::with_capacity(n);
        for r in &self.records {
            paths.push(r.path.as_str());
            splits.push(r.split.as_str());
            pids.push(r.pid);
            labels.push(r.label);
            camids.push(r.camid);
            frames.push(r.frame);
        }
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("path".into(), paths),
            Column::new("split".into(), splits),
            Column::new("pid".into(), pids),
            Column::new("label".into(), labels),
            Column::new("camid".into(), camids),
            Column::new("frame".into(), frames),
        ])
        .map_err(pq_err)?;
        let metadata = KeyValueMetadata::from_static(vec![
            ("reid.dataset".to_string(), self.dataset.clone()),
            ("reid.root".to_string(), self.root.to_string_lossy().into_owned()),
            ("reid.manifest_version".to_string(), MANIFEST_FORMAT_VERSION.to_string()),
        ]);
        write_atomically(path, |file| {
            ParquetWriter::new(file)
                .with_key_value_metadata(Some(metadata))
                .finish(&mut df)
                .map_err(pq_err)?;
            Ok(())
        })
    }

    /// Reads a manifest written by [`Manifest::write_parquet`] (or by any tool that
    /// writes the documented columns and metadata).
    pub fn read_parquet(path: &Path) -> Result<Manifest> {
        let pq_err = |e: PolarsError| DataError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut reader = ParquetReader::new(file);
        let metadata: BTreeMap<String, String> = reader
            .get_metadata()
            .map_err(pq_err)?
            .key_value_metadata
            .iter()
            .flatten()
            .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
            .collect();
        let version = metadata.get("reid.manifest_version").ok_or_else(|| {
            DataError::invalid(
                path,
                "not a reid manifest (no reid.manifest_version metadata); re-create it with `reid index`",
            )
        })?;
        if version != MANIFEST_FORMAT_VERSION {
            return Err(DataError::invalid(
                path,
                format!("manifest format version {version}, this build reads {MANIFEST_FORMAT_VERSION}; re-create it with `reid index`"),
            ));
        }
        let df = reader.finish().map_err(pq_err)?;
        let column = |name: &str| -> Result<Series> {
            df.column(name)
                .map(|c| c.as_materialized_series().clone())
                .map_err(|_| DataError::invalid(path, format!("missing column '{name}'")))
        };
        let typed =
            |name: &str, e: PolarsError| DataError::invalid(path, format!("column '{name}' has the wrong type: {e}"));
        let paths = column("path")?;
        let paths = paths.str().map_err(|e| typed("path", e))?;
        let splits = column("split")?;
        let splits = splits.str().map_err(|e| typed("split", e))?;
        let pids = column("pid")?;
        let pids = pids.i64().map_err(|e| typed("pid", e))?;
        let labels = column("label")?;
        let labels = labels.i64().map_err(|e| typed("label", e))?;
        let camids = column("camid")?;
        let camids = camids.i64().map_err(|e| typed("camid", e))?;
        let frames = column("frame")?;
        let frames = frames.i64().map_err(|e| typed("frame", e))?;
        let mut records = Vec::with_capacity(df.height());
        for i in 0..df.height() {
            let null = |name: &str| DataError::invalid(path, format!("row {i}: '{name}' is null"));
            let split: Split = splits
                .get(i)
                .ok_or_else(|| null("split"))?
                .parse()
                .map_err(|e: String| DataError::invalid(path, format!("row {i}: {e}")))?;
            records.push(ManifestRecord {
                path: paths.get(i).ok_or_else(|| null("path"))?.to_string(),
                split,
                pid: pids.get(i).ok_or_else(|| null("pid"))?,
                label: labels.get(i),
                camid: camids.get(i).ok_or_else(|| null("camid"))?,
                frame: frames.get(i),
            });
        }
        check_records(&records)
            .map_err(|m| DataError::invalid(path, format!("{m}; re-create it with `reid index`")))?;
        Ok(Manifest {
            dataset: metadata.get("reid.dataset").cloned().unwrap_or_default(),
            root: PathBuf::from(metadata.get("reid.root").cloned().unwrap_or_default()),
            records,
        })
    }
}

/// What every manifest must satisfy: pid >= -1, camid >= 0, and labels that are
/// null outside the train split and, on it, one per identity, contiguous 0..K-1.
fn check_records(records: &[ManifestRecord]) -> std::result::Result<(), String> {
    let mut label_of_pid: BTreeMap<i64, i64> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        if r.pid < -1 {
            return Err(format!(
                "row {i} ({}): pid {} (expected -1 junk, 0 distractor or an identity)",
                r.path, r.pid
            ));
        }
        if r.camid < 0 {
            return Err(format!("row {i} ({}): camid {} (cameras are 0-based)", r.path, r.camid));
        }
        match (r.split, r.label) {
            (Split::Train, None) => return Err(format!("row {i} ({}): a train row without a label", r.path)),
            (Split::Train, Some(l)) => {
                if *label_of_pid.entry(r.pid).or_insert(l) != l {
                    return Err(format!("row {i} ({}): pid {} has two labels", r.path, r.pid));
                }
            }
            (_, Some(l)) => return Err(format!("row {i} ({}): label {l} outside the train split", r.path)),
            (_, None) => {}
        }
    }
    let mut labels: Vec<i64> = label_of_pid.into_values().collect();
    labels.sort_unstable();
    if let Some((k, l)) = labels.iter().enumerate().find(|(k, l)| **l != *k as i64) {
        return Err(format!(
            "train labels are not contiguous 0..K-1: label {k} is missing (found {l})"
        ));
    }
    Ok(())
}

/// Gives train records contiguous labels 0..K-1 in pid order; other splits get none.
fn assign_labels(records: &mut [ManifestRecord]) {
    let pids: std::collections::BTreeSet<i64> = records
        .iter()
        .filter(|r| r.split == Split::Train)
        .map(|r| r.pid)
        .collect();
    let label_of: BTreeMap<i64, i64> = pids.into_iter().enumerate().map(|(i, p)| (p, i as i64)).collect();
    for r in records.iter_mut() {
        r.label = match r.split {
            Split::Train => Some(label_of[&r.pid]),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str, split: Split, pid: i64, camid: i64) -> ManifestRecord {
        ManifestRecord {
            path: path.into(),
            split,
            pid,
            label: None,
            camid,
            frame: Some(7),
        }
    }

    fn sample() -> Manifest {
        Manifest::new(
            "market1501",
            PathBuf::from("/data/market"),
            vec![
                record("bounding_box_train/0010_c1s1_000001_00.jpg", Split::Train, 10, 0),
                record("bounding_box_train/0002_c2s1_000001_00.jpg", Split::Train, 2, 1),
                record("bounding_box_train/0010_c3s1_000001_00.jpg", Split::Train, 10, 2),
                record("query/0005_c1s1_000001_00.jpg", Split::Query, 5, 0),
                record("bounding_box_test/-1_c1s1_000001_00.jpg", Split::Gallery, -1, 0),
                record("bounding_box_test/0000_c2s1_000001_00.jpg", Split::Gallery, 0, 1),
            ],
        )
    }

    #[test]
    fn labels_are_contiguous_in_pid_order() {
        let m = sample();
        let labels: Vec<_> = m.records.iter().map(|r| r.label).collect();
        assert_eq!(labels, vec![Some(1), Some(0), Some(1), None, None, None]);
        assert_eq!(m.num_classes(), 2);
    }

    #[test]
    fn parquet_round_trip_keeps_rows_schema_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.parquet");
        let mut m = sample();
        m.records[4].frame = None;
        m.write_parquet(&path).unwrap();
        let back = Manifest::read_parquet(&path).unwrap();
        assert_eq!(back, m);

        let df = ParquetReader::new(fs::File::open(&path).unwrap()).finish().unwrap();
        let schema: Vec<(String, DataType)> = df
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.dtype().clone()))
            .collect();
        assert_eq!(
            schema,
            vec![
                ("path".into(), DataType::String),
                ("split".into(), DataType::String),
                ("pid".into(), DataType::Int64),
                ("label".into(), DataType::Int64),
                ("camid".into(), DataType::Int64),
                ("frame".into(), DataType::Int64),
            ]
        );
        assert_eq!(df.column("label").unwrap().null_count(), 3);
    }

    #[test]
    fn a_parquet_file_without_reid_metadata_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.parquet");
        let mut df = DataFrame::new_infer_height(vec![Column::new("x".into(), [1i64, 2])]).unwrap();
        ParquetWriter::new(fs::File::create(&path).unwrap())
            .finish(&mut df)
            .unwrap();
        let err = Manifest::read_parquet(&path).unwrap_err().to_string();
        assert!(err.contains("other.parquet") && err.contains("reid index"), "{err}");
    }

    #[test]
    fn bad_labels_pids_and_cameras_are_refused_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.parquet");
        type Spoil = fn(&mut Manifest);
        let cases: [(Spoil, &str); 6] = [
            (|m| m.records[1].label = Some(-1), "not contiguous"),
            (
                |m| {
                    m.records[0].label = Some(5);
                    m.records[2].label = Some(5);
                },
                "label 1 is missing",
            ),
            (|m| m.records[0].label = Some(0), "two labels"),
            (|m| m.records[3].label = Some(0), "outside the train split"),
            (|m| m.records[4].pid = -2, "pid -2"),
            (|m| m.records[5].camid = -1, "camid -1"),
        ];
        for (spoil, want) in cases {
            let mut m = sample();
            spoil(&mut m);
            m.write_parquet(&path).unwrap();
            let err = Manifest::read_parquet(&path).unwrap_err().to_string();
            assert!(err.contains("m.parquet") && err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn summary_counts_images_identities_and_cameras() {
        let s = sample().summary();
        assert_eq!(
            s[0],
            SplitSummary {
                split: Split::Train,
                images: 3,
                identities: 2,
                cameras: 3
            }
        );
        assert_eq!(s[2].images, 2);
        assert_eq!(s[2].identities, 2);
    }
}
