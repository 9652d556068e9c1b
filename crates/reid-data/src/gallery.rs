//! The gallery file: extracted features with their identities and cameras, stored
//! as safetensors (docs/FORMATS.md). numpy opens it with
//! `safetensors.numpy.load_file`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use reid_io::feature_data::FeatureData;
use reid_io::input::Interpolation;

/// Version of the gallery layout, stored as `format_version` metadata.
pub const GALLERY_FORMAT_VERSION: &str = "1";

/// The string metadata of a gallery file. Every field is optional, so files made
/// by other tools with only `features`, `pids` and `camids` are read as well.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GalleryMeta {
    pub format_version: Option<String>,
    pub split: Option<String>,
    pub arch: Option<String>,
    /// (height, width) of the network input.
    pub image_size: Option<(u32, u32)>,
    /// The resize filter of the input.
    pub interpolation: Option<Interpolation>,
    pub normalized: Option<bool>,
    pub flip: Option<bool>,
    /// The precision of the network's convolutions and matrix products: `f32`
    /// (also when absent, as in files written before it was recorded) or `bf16`;
    /// see [`GalleryMeta::precision_or_f32`].
    pub precision: Option<String>,
    pub checkpoint_sha256: Option<String>,
    pub manifest_sha256: Option<String>,
    /// Image paths relative to `data_root`, one per row.
    pub paths: Option<Vec<String>>,
    /// The dataset root the paths are relative to.
    pub data_root: Option<String>,
    /// Any other keys, kept as they are.
    pub extra: BTreeMap<String, String>,
}

impl GalleryMeta {
    /// The recorded precision, `f32` where none is recorded.
    pub fn precision_or_f32(&self) -> &str {
        self.precision.as_deref().unwrap_or("f32")
    }

    fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = self.extra.clone();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("format_version", Some(GALLERY_FORMAT_VERSION.to_string()));
        put("split", self.split.clone());
        put("arch", self.arch.clone());
        put("image_size", self.image_size.map(|(h, w)| format!("{h}x{w}")));
        put("interpolation", self.interpolation.map(|i| i.to_string()));
        put("normalized", self.normalized.map(|b| b.to_string()));
        put("flip", self.flip.map(|b| b.to_string()));
        put("precision", self.precision.clone());
        put("checkpoint_sha256", self.checkpoint_sha256.clone());
        put("manifest_sha256", self.manifest_sha256.clone());
        put(
            "paths",
            self.paths
                .as_ref()
                .map(|p| serde_json::to_string(p).expect("strings serialise")),
        );
        put("data_root", self.data_root.clone());
        m
    }

    fn from_map(path: &Path, mut m: HashMap<String, String>) -> Result<Self> {
        let bad = |k: &str, v: &str| DataError::invalid(path, format!("metadata '{k}' = '{v}' does not parse"));
        let mut take = |k: &str| m.remove(k);
        let parse_bool = |k: &str, v: Option<String>| -> Result<Option<bool>> {
            v.map(|v| v.parse().map_err(|_| bad(k, &v))).transpose()
        };
        let format_version = take("format_version");
        let split = take("split");
        let arch = take("arch");
        let image_size = take("image_size")
            .map(|v| {
                v.split_once('x')
                    .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)))
                    .ok_or_else(|| bad("image_size", &v))
            })
            .transpose()?;
        let interpolation = take("interpolation")
            .map(|v| v.parse().map_err(|_| bad("interpolation", &v)))
            .transpose()?;
        let normalized = parse_bool("normalized", take("normalized"))?;
        let flip = parse_bool("flip", take("flip"))?;
        let precision = take("precision");
        let checkpoint_sha256 = take("checkpoint_sha256");
        let manifest_sha256 = take("manifest_sha256");
        let paths = take("paths")
            .map(|v| serde_json::from_str(&v).map_err(|_| bad("paths", "<json>")))
            .transpose()?;
        let data_root = take("data_root");
        Ok(GalleryMeta {
            format_version,
            split,
            arch,
            image_size,
            interpolation,
            normalized,
            flip,
            precision,
            checkpoint_sha256,
            manifest_sha256,
            paths,
            data_root,
            extra: m.into_iter().collect(),
        })
    }
}

/// Features of N images with their identities and cameras.
#[derive(Debug, Clone, PartialEq)]
pub struct Gallery {
    /// Row-major [N, dim]; mapped from the file when read (see [`FeatureData`]).
    pub features: FeatureData,
    pub dim: usize,
    pub pids: Vec<i64>,
    pub camids: Vec<i64>,
    pub meta: GalleryMeta,
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}

impl Gallery {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.pids.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    /// The feature of entry `i`.
    pub fn feature(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// Writes the gallery atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let n = self.len();
        if self.camids.len() != n || self.features.len() != n * self.dim {
            return Err(DataError::invalid(path, "features, pids and camids disagree in length"));
        }
        let st = |e: safetensors::SafeTensorError| reid_io::IoError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let f = le_bytes(&self.features, f32::to_le_bytes);
        let p = le_bytes(&self.pids, i64::to_le_bytes);
        let c = le_bytes(&self.camids, i64::to_le_bytes);
        let tensors = vec![
            (
                "features".to_string(),
                TensorView::new(Dtype::F32, vec![n, self.dim], &f).map_err(st)?,
            ),
            (
                "pids".to_string(),
                TensorView::new(Dtype::I64, vec![n], &p).map_err(st)?,
            ),
            (
                "camids".to_string(),
                TensorView::new(Dtype::I64, vec![n], &c).map_err(st)?,
            ),
        ];
        Ok(reid_io::tensor_file::write(path, tensors, &self.meta.to_map())?)
    }

    /// Reads a gallery file: features f32 (or f64, converted), pids and camids
    /// i64 (or i32), all checked (shapes, finite features, format version).
    pub fn read(path: &Path) -> Result<Gallery> {
        let mut file = reid_io::tensor_file::TensorReader::open(path)?;
        let meta = GalleryMeta::from_map(path, file.metadata.clone().into_iter().collect())?;
        check_version(path, meta.format_version.as_deref())?;
        let what = "a gallery holds features [N, D], pids [N] and camids [N]";
        let shape = |name: &str| {
            file.entries
                .get(name)
                .map(|e| e.shape.clone())
                .ok_or_else(|| DataError::invalid(path, format!("no '{name}' tensor; {what}")))
        };
        let (n, dim) = match shape("features")?[..] {
            [n, d] if d > 0 => (n, d),
            ref s => {
                return Err(DataError::invalid(
                    path,
                    format!("features must be [N, D] with D > 0, got {s:?}"),
                ))
            }
        };
        for name in ["pids", "camids"] {
            let s = shape(name)?;
            if s != [n] {
                return Err(DataError::invalid(path, format!("{name} must be [{n}], got {s:?}")));
            }
        }
        let features = file.map_f32("features")?;
        check_finite(path, &features, dim)?;
        let (pids, camids) = (file.read_i64("pids")?, file.read_i64("camids")?);
        if let Some(p) = meta.paths.as_ref().filter(|p| p.len() != n) {
            return Err(DataError::invalid(
                path,
                format!("{} paths recorded for {n} rows", p.len()),
            ));
        }
        Ok(Gallery {
            features,
            dim,
            pids,
            camids,
            meta,
        })
    }
}

impl Gallery {
    /// Refuses features (read from `path`) that were extracted with another
    /// checkpoint than the one of sha256 `checkpoint` (named `other` in the error),
    /// when both are known: distances between two models' features mean nothing.
    pub fn check_checkpoint(&self, path: &Path, checkpoint: Option<&str>, other: &Path) -> Result<()> {
        match (&self.meta.checkpoint_sha256, checkpoint) {
            (Some(a), Some(b)) if a != b => Err(DataError::invalid(
                path,
                format!(
                    "extracted with another checkpoint (sha256 {:.12}…) than {} (sha256 {:.12}…); extract both with the same one",
                    a,
                    other.display(),
                    b
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Refuses a gallery written by a newer `reid` (or with a version that is no number).
fn check_version(path: &Path, version: Option<&str>) -> Result<()> {
    let Some(v) = version else { return Ok(()) };
    let ours: u32 = GALLERY_FORMAT_VERSION.parse().expect("a number");
    match v.parse::<u32>() {
        Ok(theirs) if theirs <= ours => Ok(()),
        _ => Err(DataError::invalid(
            path,
            format!("gallery format version {v}; this build reads versions up to {ours}: upgrade reid, or re-extract with this one"),
        )),
    }
}

/// Refuses features holding NaN or infinity, naming the first such row.
fn check_finite(path: &Path, features: &[f32], dim: usize) -> Result<()> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    // Chunks in parallel, each by a branch-free pass the compiler vectorises.
    let bad = features
        .par_chunks(CHUNK)
        .position_first(|c| !c.iter().fold(true, |ok, v| ok & v.is_finite()));
    let first = bad.and_then(|k| {
        let at = features[k * CHUNK..].iter().position(|v| !v.is_finite());
        at.map(|p| k * CHUNK + p)
    });
    match first {
        None => Ok(()),
        Some(i) => Err(DataError::invalid(
            path,
            format!(
                "row {} of features holds {} (column {}); the model that made them diverged or the file is damaged: re-extract with a finite checkpoint",
                i / dim,
                features[i],
                i % dim
            ),
        )),
    }
}

/// The sha256 of a file's bytes, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_and_without_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        let g = Gallery {
            features: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0].into(),
            dim: 3,
            pids: vec![7, -1],
            camids: vec![0, 5],
            meta: GalleryMeta {
                format_version: Some(GALLERY_FORMAT_VERSION.into()),
                split: Some("query".into()),
                arch: Some("res2net_tiny".into()),
                image_size: Some((256, 128)),
                interpolation: Some(Interpolation::Bicubic),
                normalized: Some(true),
                flip: Some(false),
                precision: Some("bf16".into()),
                checkpoint_sha256: Some("ab".into()),
                manifest_sha256: Some("cd".into()),
                paths: Some(vec!["query/a.jpg".into(), "query/b.jpg".into()]),
                data_root: Some("/data".into()),
                extra: BTreeMap::from([("note".into(), "x".into())]),
            },
        };
        g.write(&path).unwrap();
        assert_eq!(Gallery::read(&path).unwrap(), g);

        let bare = Gallery {
            meta: GalleryMeta::default(),
            ..g.clone()
        };
        bare.write(&path).unwrap();
        let back = Gallery::read(&path).unwrap();
        assert_eq!(back.features, g.features);
        assert_eq!(back.meta.paths, None);
        assert_eq!(back.meta.format_version.as_deref(), Some(GALLERY_FORMAT_VERSION));
    }

    #[test]
    fn read_features_are_mapped_private_and_survive_the_file_being_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        let g = bare((0..4096 * 3).map(|i| i as f32).collect(), 3);
        g.write(&path).unwrap();
        let mut back = Gallery::read(&path).unwrap();
        assert!(
            matches!(back.features, FeatureData::Mapped { .. }),
            "{:?}",
            back.features
        );
        assert!(back.features == g.features && back.pids == g.pids);
        // A write to the mapped values stays in this process.
        back.features[5] = -1.0;
        assert_eq!(Gallery::read(&path).unwrap().features[5], 5.0);
        // Replacing the file (as every write of this crate does) leaves the map as it was.
        bare(vec![9.0; 6], 3).write(&path).unwrap();
        assert_eq!(back.features[6], 6.0);
        assert_eq!(Gallery::read(&path).unwrap().features.len(), 6);
    }

    #[test]
    fn f64_features_are_read_into_memory_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g64.safetensors");
        let values: Vec<u8> = [0.5f64, -2.0, 3.25, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids: Vec<u8> = [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            ("features", TensorView::new(Dtype::F64, vec![2, 2], &values).unwrap()),
            ("pids", TensorView::new(Dtype::I64, vec![2], &ids).unwrap()),
            ("camids", TensorView::new(Dtype::I64, vec![2], &ids).unwrap()),
        ];
        fs::write(&path, safetensors::serialize(tensors, None).unwrap()).unwrap();
        let g = Gallery::read(&path).unwrap();
        assert!(matches!(g.features, FeatureData::Owned(_)));
        assert_eq!(&g.features[..], &[0.5, -2.0, 3.25, 4.0]);
    }

    #[test]
    fn a_file_without_pids_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let data = [0u8; 8];
        let t = TensorView::new(Dtype::F32, vec![1, 2], &data).unwrap();
        fs::write(&path, safetensors::serialize([("features", t)], None).unwrap()).unwrap();
        let err = Gallery::read(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors") && err.contains("pids"), "{err}");
    }

    fn bare(features: Vec<f32>, dim: usize) -> Gallery {
        let n = features.len() / dim.max(1);
        Gallery {
            features: features.into(),
            dim,
            pids: vec![1; n],
            camids: vec![0; n],
            meta: GalleryMeta::default(),
        }
    }

    #[test]
    fn non_finite_features_a_zero_dimension_and_a_newer_version_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        for bad in [f32::NAN, f32::INFINITY] {
            bare(vec![0.5, 1.0, 2.0, bad], 2).write(&path).unwrap();
            let err = Gallery::read(&path).unwrap_err().to_string();
            assert!(err.contains("g.safetensors") && err.contains("row 1"), "{err}");
        }
        // Past the first chunk of the parallel check, the first bad row is named.
        let mut big = vec![0.25f32; 4 * 20_000];
        big[4 * 19_000] = f32::NAN;
        big[4 * 17_000 + 3] = f32::INFINITY;
        bare(big, 4).write(&path).unwrap();
        let err = Gallery::read(&path).unwrap_err().to_string();
        assert!(err.contains("row 17000 ") && err.contains("column 3"), "{err}");
        bare(vec![], 0).write(&path).unwrap();
        let err = Gallery::read(&path).unwrap_err().to_string();
        assert!(err.contains("D > 0"), "{err}");
        bare(vec![1.0, 2.0], 2).write(&path).unwrap();
        assert!(Gallery::read(&path).is_ok());
        // The writer stamps its own version; a newer file's header is written by hand.
        let data = [0u8; 8];
        let p = 1i64.to_le_bytes();
        let tensors = vec![
            (
                "features".to_string(),
                TensorView::new(Dtype::F32, vec![1, 2], &data).unwrap(),
            ),
            ("pids".to_string(), TensorView::new(Dtype::I64, vec![1], &p).unwrap()),
            ("camids".to_string(), TensorView::new(Dtype::I64, vec![1], &p).unwrap()),
        ];
        let meta = BTreeMap::from([("format_version".to_string(), "2".to_string())]);
        reid_io::tensor_file::write(&path, tensors, &meta).unwrap();
        let err = Gallery::read(&path).unwrap_err().to_string();
        assert!(err.contains("format version 2") && err.contains("upgrade"), "{err}");
    }

    #[test]
    fn identical_galleries_are_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = bare(vec![1.0, 2.0, 3.0, 4.0], 2);
        g.meta.split = Some("query".into());
        g.meta.arch = Some("x".into());
        g.meta.flip = Some(true);
        g.meta.paths = Some(vec!["a".into(), "b".into()]);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        g.write(&a).unwrap();
        g.write(&b).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    }

    #[test]
    fn sha256_of_known_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
