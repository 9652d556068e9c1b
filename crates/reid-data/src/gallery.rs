//! The gallery file: extracted features with their identities and cameras, stored
//! as safetensors (DESIGN.md "File formats"). numpy opens it with
//! `safetensors.numpy.load_file`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::atomic::write_atomically;
use crate::error::{DataError, Result};

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
    pub normalized: Option<bool>,
    pub flip: Option<bool>,
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
    fn to_map(&self) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = self.extra.clone().into_iter().collect();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("format_version", Some(GALLERY_FORMAT_VERSION.to_string()));
        put("split", self.split.clone());
        put("arch", self.arch.clone());
        put("image_size", self.image_size.map(|(h, w)| format!("{h}x{w}")));
        put("normalized", self.normalized.map(|b| b.to_string()));
        put("flip", self.flip.map(|b| b.to_string()));
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
        let normalized = parse_bool("normalized", take("normalized"))?;
        let flip = parse_bool("flip", take("flip"))?;
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
            normalized,
            flip,
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
    /// Row-major [N, dim].
    pub features: Vec<f32>,
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
        let st = |e: safetensors::SafeTensorError| DataError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let f = le_bytes(&self.features, f32::to_le_bytes);
        let p = le_bytes(&self.pids, i64::to_le_bytes);
        let c = le_bytes(&self.camids, i64::to_le_bytes);
        let tensors = vec![
            (
                "features",
                TensorView::new(Dtype::F32, vec![n, self.dim], &f).map_err(st)?,
            ),
            ("pids", TensorView::new(Dtype::I64, vec![n], &p).map_err(st)?),
            ("camids", TensorView::new(Dtype::I64, vec![n], &c).map_err(st)?),
        ];
        let bytes = safetensors::serialize(tensors, Some(self.meta.to_map())).map_err(st)?;
        write_atomically(path, |file| file.write_all(&bytes).map_err(|e| DataError::io(path, e)))
    }

    /// Reads a gallery file; `features` may be f32, f16-free f64 is converted.
    pub fn read(path: &Path) -> Result<Gallery> {
        let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
        let st = |e: safetensors::SafeTensorError| DataError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(st)?;
        let meta = GalleryMeta::from_map(path, header.metadata().clone().unwrap_or_default())?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(st)?;
        let get = |name: &str| {
            tensors.tensor(name).map_err(|_| {
                DataError::invalid(
                    path,
                    format!("no '{name}' tensor; a gallery holds features [N, D], pids [N] and camids [N]"),
                )
            })
        };
        let features = get("features")?;
        let (n, dim) = match features.shape() {
            [n, d] => (*n, *d),
            s => return Err(DataError::invalid(path, format!("features must be [N, D], got {s:?}"))),
        };
        let features: Vec<f32> = match features.dtype() {
            Dtype::F32 => features
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F64 => features
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            d => {
                return Err(DataError::invalid(
                    path,
                    format!("features must be F32 or F64, got {d:?}"),
                ))
            }
        };
        let ints = |name: &str| -> Result<Vec<i64>> {
            let t = get(name)?;
            if t.shape() != [n] {
                return Err(DataError::invalid(
                    path,
                    format!("{name} must be [{n}], got {:?}", t.shape()),
                ));
            }
            Ok(match t.dtype() {
                Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::I32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                    .collect(),
                d => {
                    return Err(DataError::invalid(
                        path,
                        format!("{name} must be I64 or I32, got {d:?}"),
                    ))
                }
            })
        };
        let pids = ints("pids")?;
        let camids = ints("camids")?;
        if let Some(p) = &meta.paths {
            if p.len() != n {
                return Err(DataError::invalid(
                    path,
                    format!("{} paths recorded for {n} rows", p.len()),
                ));
            }
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
            features: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            dim: 3,
            pids: vec![7, -1],
            camids: vec![0, 5],
            meta: GalleryMeta {
                format_version: Some(GALLERY_FORMAT_VERSION.into()),
                split: Some("query".into()),
                arch: Some("res2net_tiny".into()),
                image_size: Some((256, 128)),
                normalized: Some(true),
                flip: Some(false),
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
    fn a_file_without_pids_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let data = [0u8; 8];
        let t = TensorView::new(Dtype::F32, vec![1, 2], &data).unwrap();
        fs::write(&path, safetensors::serialize([("features", t)], None).unwrap()).unwrap();
        let err = Gallery::read(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors") && err.contains("pids"), "{err}");
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
