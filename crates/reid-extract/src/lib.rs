//! The test half of the method: one branch of the trained network turns images
//! into descriptors. Galleries are extracted once, cached by the hashes of the
//! checkpoint and the manifest, and searched without the model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use reid_data::gallery::{sha256_file, Gallery, GalleryMeta, GALLERY_FORMAT_VERSION};
use reid_data::{Manifest, Split};
use reid_model::{Exec, Precision, ReidModel};
use reid_sampling::{load_normalized, Chw, InputSpec};

/// Why extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Data(#[from] reid_data::DataError),
    #[error(transparent)]
    Decode(#[from] reid_sampling::DecodeError),
    #[error(transparent)]
    Weights(#[from] reid_model::WeightError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// How features are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractOptions {
    pub batch_size: usize,
    /// Average the features of each image and its mirror image.
    pub flip: bool,
    /// L2-normalise the features.
    pub normalize: bool,
    /// The precision of convolutions and matrix products (`bf16`: mixed
    /// precision; the features are f32 either way).
    pub precision: Precision,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            batch_size: 32,
            flip: false,
            normalize: true,
            precision: Precision::F32,
        }
    }
}

/// A trained model ready for inference, with the input it was trained on.
pub struct Extractor {
    pub model: ReidModel,
    pub input: InputSpec,
    pub checkpoint: PathBuf,
}

impl Extractor {
    /// Loads a checkpoint written by `reid train` onto `device`, to run in
    /// `precision`.
    pub fn load(checkpoint: &Path, precision: Precision, device: &Device) -> Result<Self, ExtractError> {
        let exec = Exec {
            precision,
            ..Exec::default()
        };
        let (model, info) = reid_model::checkpoint::load(checkpoint, exec, device)?;
        Ok(Extractor {
            model,
            input: info.input,
            checkpoint: checkpoint.to_path_buf(),
        })
    }

    /// Features [N, D] (row-major) of decoded images, in eval mode.
    pub fn embed(&self, images: &[Chw], options: &ExtractOptions) -> Result<Vec<f32>, ExtractError> {
        embed(&self.model, self.input, images, options)
    }

    /// Features of image files, `batch_size` at a time; `progress` gets the count done.
    pub fn embed_files(
        &self,
        paths: &[PathBuf],
        options: &ExtractOptions,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<f32>, ExtractError> {
        embed_files(&self.model, self.input, paths, options, progress)
    }
}

/// Features [N, D] (row-major) of decoded `images` of `input`'s size, in eval mode.
pub fn embed(
    model: &ReidModel,
    input: InputSpec,
    images: &[Chw],
    options: &ExtractOptions,
) -> Result<Vec<f32>, ExtractError> {
    let (h, w) = (input.height, input.width);
    let mut data: Vec<f32> = Vec::with_capacity(images.len() * 3 * h * w * if options.flip { 2 } else { 1 });
    for img in images {
        data.extend_from_slice(&img.data);
    }
    if options.flip {
        for img in images {
            let mut m = img.clone();
            m.flip_horizontal();
            data.extend_from_slice(&m.data);
        }
    }
    let n = data.len() / (3 * h * w);
    let x = Tensor::from_vec(data, (n, 3, h, w), &model.device)?;
    let mut f = model.features(&x, false)?;
    if options.flip {
        let b = images.len();
        f = ((f.narrow(0, 0, b)? + f.narrow(0, b, b)?)? * 0.5)?;
    }
    if options.normalize {
        let norm = f.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        f = f.broadcast_div(&norm)?;
    }
    Ok(f.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Features of image files, `batch_size` at a time; `progress` gets the count done.
/// Decoding runs on all cores; memory holds one batch.
pub fn embed_files(
    model: &ReidModel,
    input: InputSpec,
    paths: &[PathBuf],
    options: &ExtractOptions,
    progress: &dyn Fn(usize),
) -> Result<Vec<f32>, ExtractError> {
    let mut features = Vec::new();
    for (i, chunk) in paths.chunks(options.batch_size.max(1)).enumerate() {
        let images: Vec<Chw> = chunk
            .par_iter()
            .map(|p| load_normalized(p, input))
            .collect::<Result<_, _>>()?;
        features.extend(embed(model, input, &images, options)?);
        progress((i * options.batch_size + chunk.len()).min(paths.len()));
    }
    Ok(features)
}

/// The features of one split of `manifest`, as a gallery (identities, cameras
/// and image paths included; the cache hashes are left to the caller).
/// `progress` gets (done, total).
pub fn split_features(
    model: &ReidModel,
    input: InputSpec,
    manifest: &Manifest,
    split: Split,
    options: &ExtractOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Gallery, ExtractError> {
    let records: Vec<_> = manifest.split(split).collect();
    if records.is_empty() {
        return Err(ExtractError::Invalid(format!(
            "the {split} split of the manifest has no images"
        )));
    }
    let paths: Vec<PathBuf> = records.iter().map(|r| manifest.image_path(r)).collect();
    let total = paths.len();
    let features = embed_files(model, input, &paths, options, &|done| progress(done, total))?;
    let meta = GalleryMeta {
        split: Some(split.as_str().into()),
        arch: Some(model.config.arch.name.to_string()),
        image_size: Some((input.height as u32, input.width as u32)),
        interpolation: Some(input.interpolation),
        normalized: Some(options.normalize),
        flip: Some(options.flip),
        precision: Some(model.exec.precision.as_str().into()),
        paths: Some(records.iter().map(|r| r.path.clone()).collect()),
        data_root: Some(manifest.root.to_string_lossy().into_owned()),
        ..GalleryMeta::default()
    };
    Ok(Gallery {
        dim: features.len() / total,
        features: features.into(),
        pids: records.iter().map(|r| r.pid).collect(),
        camids: records.iter().map(|r| r.camid).collect(),
        meta,
    })
}

/// What `extract_split` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extracted {
    /// A gallery with the same hashes and settings was already there.
    Cached,
    /// Features were computed and written.
    Written { images: usize },
}

/// What a gallery file must record to be reused.
fn expected_meta(
    checkpoint_sha: &str,
    manifest_sha: &str,
    split: Split,
    input: InputSpec,
    options: &ExtractOptions,
) -> GalleryMeta {
    GalleryMeta {
        format_version: Some(GALLERY_FORMAT_VERSION.into()),
        split: Some(split.as_str().into()),
        image_size: Some((input.height as u32, input.width as u32)),
        interpolation: Some(input.interpolation),
        normalized: Some(options.normalize),
        flip: Some(options.flip),
        precision: Some(options.precision.as_str().into()),
        checkpoint_sha256: Some(checkpoint_sha.into()),
        manifest_sha256: Some(manifest_sha.into()),
        ..GalleryMeta::default()
    }
}

fn same_settings(a: &GalleryMeta, b: &GalleryMeta) -> bool {
    a.format_version == b.format_version
        && a.split == b.split
        && a.image_size == b.image_size
        && a.interpolation.unwrap_or_default() == b.interpolation.unwrap_or_default()
        && a.normalized == b.normalized
        && a.flip == b.flip
        && a.precision_or_f32() == b.precision_or_f32()
        && a.checkpoint_sha256 == b.checkpoint_sha256
        && a.manifest_sha256 == b.manifest_sha256
}

/// One split to extract.
#[derive(Debug, Clone)]
pub struct SplitJob {
    pub checkpoint: PathBuf,
    pub manifest: PathBuf,
    pub split: Split,
    pub options: ExtractOptions,
    /// The gallery file to write.
    pub out: PathBuf,
    /// Recompute even when `out` matches.
    pub force: bool,
}

/// Writes the features of one split to `job.out`, unless it already holds them for
/// the same checkpoint, manifest and settings (and `force` is off). The file is
/// written atomically. `progress` gets (done, total).
pub fn extract_split(
    job: &SplitJob,
    device: &Device,
    progress: &dyn Fn(usize, usize),
) -> Result<Extracted, ExtractError> {
    let checkpoint_sha = sha256_file(&job.checkpoint)?;
    let manifest_sha = sha256_file(&job.manifest)?;
    let info = reid_model::checkpoint::read_info(&job.checkpoint)?;
    let wanted = expected_meta(&checkpoint_sha, &manifest_sha, job.split, info.input, &job.options);
    if !job.force && job.out.exists() {
        if let Ok(existing) = Gallery::read(&job.out) {
            if same_settings(&existing.meta, &wanted) {
                return Ok(Extracted::Cached);
            }
        }
    }
    let manifest = Manifest::read_parquet(&job.manifest)?;
    let extractor = Extractor::load(&job.checkpoint, job.options.precision, device)?;
    let mut gallery = split_features(
        &extractor.model,
        extractor.input,
        &manifest,
        job.split,
        &job.options,
        progress,
    )
    .map_err(|e| match e {
        ExtractError::Invalid(m) => ExtractError::Invalid(format!("{}: {m}", job.manifest.display())),
        other => other,
    })?;
    gallery.meta.checkpoint_sha256 = wanted.checkpoint_sha256;
    gallery.meta.manifest_sha256 = wanted.manifest_sha256;
    gallery.write(&job.out)?;
    Ok(Extracted::Written { images: gallery.len() })
}

/// The `top` gallery entries nearest to `query` (cosine distance on L2-normalised
/// features): (row, distance), nearest first.
pub fn nearest(gallery: &Gallery, query: &[f32], top: usize) -> Vec<(usize, f32)> {
    let qn = query.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    let mut scored: Vec<(usize, f32)> = (0..gallery.len())
        .map(|i| {
            let g = gallery.feature(i);
            let gn = g.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            let dot: f32 = g.iter().zip(query).map(|(a, b)| a * b).sum();
            (i, 1.0 - dot / (qn * gn))
        })
        .collect();
    scored.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    scored.truncate(top);
    scored
}

/// The nearest gallery entries of each query image.
pub struct SearchResult {
    pub gallery: Gallery,
    /// Per query image: (gallery row, distance), nearest first.
    pub matches: Vec<Vec<(usize, f32)>>,
}

/// Embeds `images` with `checkpoint` (which must be the one the gallery file was
/// extracted with) and finds each one's `top` nearest gallery entries.
pub fn search(
    gallery_path: &Path,
    checkpoint: &Path,
    images: &[PathBuf],
    top: usize,
    device: &Device,
) -> Result<SearchResult, ExtractError> {
    let gallery = Gallery::read(gallery_path)?;
    gallery.check_checkpoint(gallery_path, Some(&sha256_file(checkpoint)?), checkpoint)?;
    // The queries are embedded as the gallery was.
    let precision: Precision = gallery
        .meta
        .precision_or_f32()
        .parse()
        .map_err(|e| ExtractError::Invalid(format!("{}: metadata 'precision': {e}", gallery_path.display())))?;
    let extractor = Extractor::load(checkpoint, precision, device)?;
    let options = ExtractOptions {
        batch_size: 32,
        flip: gallery.meta.flip.unwrap_or(false),
        normalize: true,
        precision,
    };
    let features = extractor.embed_files(images, &options, &|_| {})?;
    let dim = gallery.dim;
    if features.len() != images.len() * dim {
        return Err(ExtractError::Invalid(format!(
            "{}: the gallery holds {dim}-d features but {} gives {}-d ones",
            gallery_path.display(),
            checkpoint.display(),
            features.len() / images.len().max(1)
        )));
    }
    let matches = features.chunks_exact(dim).map(|q| nearest(&gallery, q, top)).collect();
    Ok(SearchResult { gallery, matches })
}
