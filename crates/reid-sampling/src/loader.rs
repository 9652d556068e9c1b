//! The batch loader: decodes and augments pair batches on a dedicated thread pool,
//! a bounded number of batches ahead, on a background thread. The content of every
//! batch depends only on (seed, epoch, pair index), never on the thread count.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use reid_io::seed::mix;

use crate::pairs::{Pair, PairSampler};
use crate::preprocess::{load_normalized, InputSpec};
use crate::transform::{guarded, Augment, Chw, DecodeError};

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Pairs per batch.
    pub batch_size: usize,
    /// The network's input size and resize filter.
    pub input: InputSpec,
    pub augment: Augment,
    /// Batches decoded ahead of the trainer (memory stays bounded by this).
    pub prefetch: usize,
    /// Decoding threads (0: all cores).
    pub threads: usize,
    /// Drop (and count) pairs with an unreadable image instead of failing.
    pub skip_unreadable: bool,
    /// Drop the last batch of an epoch when it has fewer than `batch_size` pairs.
    pub drop_last: bool,
    pub seed: u64,
}

/// A batch of pairs, images as [B, 3, H, W] row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PairBatch {
    pub epoch: u64,
    /// Batch number within the epoch.
    pub index: usize,
    pub x1: Vec<f32>,
    pub x2: Vec<f32>,
    pub y1: Vec<i64>,
    pub y2: Vec<i64>,
    /// 0 when the pair shows one identity, 1 otherwise (the model's convention).
    pub same: Vec<i64>,
    /// Pairs left out because an image could not be read.
    pub skipped: usize,
}

impl PairBatch {
    /// Pairs in the batch.
    pub fn len(&self) -> usize {
        self.y1.len()
    }

    /// Whether the batch holds no pair.
    pub fn is_empty(&self) -> bool {
        self.y1.is_empty()
    }
}

/// Why the loader stopped: an image it could not read, or a failure of its own.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the batch loader failed: {0}")]
    Worker(String),
}

/// Random stream for augmentation draws.
const AUGMENT_STREAM: u64 = 21;

/// Loads image `path` with the training transform, its draws seeded by
/// (seed, epoch, pair index, which image of the pair). A panic while decoding or
/// augmenting becomes an error naming the image.
pub fn load_augmented(
    path: &std::path::Path,
    cfg: &LoaderConfig,
    epoch: u64,
    pair: usize,
    which: u64,
) -> Result<Chw, DecodeError> {
    let mut img = load_normalized(path, cfg.input)?;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(cfg.seed, AUGMENT_STREAM, epoch), pair as u64, which));
    guarded(path, "augmenting", || cfg.augment.apply(&mut img, &mut rng))?;
    Ok(img)
}

/// Number of batches an epoch of `pairs` pairs gives.
pub fn batches_per_epoch(pairs: usize, cfg: &LoaderConfig) -> usize {
    if cfg.drop_last {
        pairs / cfg.batch_size
    } else {
        pairs.div_ceil(cfg.batch_size)
    }
}

fn build_batch(
    paths: &[PathBuf],
    sampler: &PairSampler,
    pairs: &[Pair],
    first_pair: usize,
    epoch: u64,
    index: usize,
    cfg: &LoaderConfig,
) -> Result<PairBatch, DecodeError> {
    let images: Vec<Result<(Chw, Chw), DecodeError>> = pairs
        .par_iter()
        .enumerate()
        .map(|(i, p)| {
            let k = first_pair + i;
            Ok((
                load_augmented(&paths[p.first], cfg, epoch, k, 0)?,
                load_augmented(&paths[p.second], cfg, epoch, k, 1)?,
            ))
        })
        .collect();
    let plane = 3 * cfg.input.height * cfg.input.width;
    let mut batch = PairBatch {
        epoch,
        index,
        x1: Vec::with_capacity(pairs.len() * plane),
        x2: Vec::with_capacity(pairs.len() * plane),
        y1: Vec::with_capacity(pairs.len()),
        y2: Vec::with_capacity(pairs.len()),
        same: Vec::with_capacity(pairs.len()),
        skipped: 0,
    };
    for (p, loaded) in pairs.iter().zip(images) {
        match loaded {
            Ok((a, b)) => {
                batch.x1.extend_from_slice(&a.data);
                batch.x2.extend_from_slice(&b.data);
                batch.y1.push(sampler.label(p.first) as i64);
                batch.y2.push(sampler.label(p.second) as i64);
                batch.same.push(if p.same { 0 } else { 1 });
            }
            Err(e) if cfg.skip_unreadable => {
                tracing::warn!("skipping a pair: {e}");
                batch.skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(batch)
}

/// Yields the batches of one epoch, decoded in the background. It ends after the
/// last batch; any failure (an unreadable image, a panic) is an error item.
pub struct PairLoader {
    receiver: Receiver<Result<PairBatch, LoadError>>,
    worker: Option<JoinHandle<()>>,
}

impl PairLoader {
    /// Starts loading `epoch` from batch `start_batch` (non-zero when resuming).
    /// `paths[i]` is training image i, labelled by `sampler`.
    pub fn start(
        paths: Arc<Vec<PathBuf>>,
        sampler: Arc<PairSampler>,
        cfg: LoaderConfig,
        epoch: u64,
        start_batch: usize,
    ) -> Self {
        let (sender, receiver) = sync_channel(cfg.prefetch.max(1));
        let worker = std::thread::spawn(move || {
            let pool = match rayon::ThreadPoolBuilder::new().num_threads(cfg.threads).build() {
                Ok(p) => p,
                Err(e) => {
                    let _ = sender.send(Err(LoadError::Worker(format!("no decoding threads: {e}"))));
                    return;
                }
            };
            let pairs = sampler.epoch(epoch);
            let total = batches_per_epoch(pairs.len(), &cfg);
            for index in start_batch..total {
                let start = index * cfg.batch_size;
                let end = (start + cfg.batch_size).min(pairs.len());
                let batch = pool
                    .install(|| build_batch(&paths, &sampler, &pairs[start..end], start, epoch, index, &cfg))
                    .map_err(LoadError::from);
                let failed = batch.is_err();
                if sender.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        PairLoader {
            receiver,
            worker: Some(worker),
        }
    }
}

impl Iterator for PairLoader {
    type Item = Result<PairBatch, LoadError>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.recv() {
            Ok(b) => Some(b),
            // The channel closes when the worker returns or dies: a death is an error.
            Err(_) => match self.worker.take()?.join() {
                Ok(()) => None,
                Err(panic) => Some(Err(LoadError::Worker(crate::transform::panic_message(&panic)))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(dir: &std::path::Path) -> (Arc<Vec<PathBuf>>, Vec<usize>) {
        let mut paths = Vec::new();
        let mut labels = Vec::new();
        for i in 0..12u8 {
            let p = dir.join(format!("{i}.png"));
            let img = image::RgbImage::from_fn(8, 16, |x, y| image::Rgb([i * 20, (x * 30) as u8, (y * 15) as u8]));
            img.save(&p).unwrap();
            paths.push(p);
            labels.push((i / 3) as usize);
        }
        (Arc::new(paths), labels)
    }

    fn config(threads: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 5,
            input: InputSpec {
                height: 16,
                width: 8,
                interpolation: Default::default(),
            },
            augment: Augment::default(),
            prefetch: 2,
            threads,
            skip_unreadable: false,
            drop_last: false,
            seed: 4,
        }
    }

    #[test]
    fn batches_are_identical_for_one_and_two_threads() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, labels) = dataset(dir.path());
        let sampler = Arc::new(PairSampler::new(labels, 0.5, 4));
        let one: Vec<PairBatch> = PairLoader::start(paths.clone(), sampler.clone(), config(1), 2, 0)
            .map(Result::unwrap)
            .collect();
        let two: Vec<PairBatch> = PairLoader::start(paths.clone(), sampler.clone(), config(2), 2, 0)
            .map(Result::unwrap)
            .collect();
        assert_eq!(one.len(), 3);
        assert_eq!(one, two);
        assert_eq!(one[2].len(), 2);
        // Resuming at batch 1 gives the same batches 1 and 2.
        let resumed: Vec<PairBatch> = PairLoader::start(paths, sampler, config(2), 2, 1)
            .map(Result::unwrap)
            .collect();
        assert_eq!(resumed, one[1..]);
        for b in &one {
            for i in 0..b.len() {
                assert_eq!(b.same[i] == 0, b.y1[i] == b.y2[i]);
            }
        }
    }

    #[test]
    fn a_panic_while_augmenting_is_an_error_naming_the_image_not_an_early_end() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, labels) = dataset(dir.path());
        let sampler = Arc::new(PairSampler::new(labels, 0.5, 4));
        let mut cfg = config(2);
        // An empty range, which validated configs refuse: gen_range panics on it.
        cfg.augment.erase = 1.0;
        cfg.augment.erase_area = [0.5, 0.1];
        let results: Vec<_> = PairLoader::start(paths, sampler, cfg, 0, 0).collect();
        let err = results.last().unwrap().as_ref().unwrap_err().to_string();
        assert!(
            err.contains(".png") && err.contains("panicked while augmenting"),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_image_is_an_error_naming_it_or_a_counted_skip() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, labels) = dataset(dir.path());
        std::fs::write(&paths[4], b"not an image").unwrap();
        let sampler = Arc::new(PairSampler::new(labels, 0.5, 4));
        let results: Vec<_> = PairLoader::start(paths.clone(), sampler.clone(), config(2), 0, 0).collect();
        let err = results
            .iter()
            .find_map(|r| r.as_ref().err())
            .expect("an error")
            .to_string();
        assert!(err.contains("4.png"), "{err}");
        let mut cfg = config(2);
        cfg.skip_unreadable = true;
        let batches: Vec<PairBatch> = PairLoader::start(paths, sampler, cfg, 0, 0)
            .map(Result::unwrap)
            .collect();
        let skipped: usize = batches.iter().map(|b| b.skipped).sum();
        let kept: usize = batches.iter().map(|b| b.len()).sum();
        assert!(skipped >= 1);
        assert_eq!(skipped + kept, 12);
    }
}
