//! A synthetic pedestrian dataset in the exact layout and naming of Market-1501,
//! DukeMTMC-reID or MSMT17 (see [`SynthLayout`]).
//!
//! Every identity has fixed attributes (clothing colours and patterns, hair, height,
//! build, a bag); every camera has its own colour cast, brightness, background and
//! blur; every image varies pose, view, position, scale, occlusion and JPEG
//! quality. All draws come from RNGs seeded by (seed, what, index), so the same seed
//! gives byte-identical files whatever the thread count.

mod draw;
mod plan;

use std::fs;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use reid_io::seed::mix;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::layout::{DatasetKind, IndexOptions, IndexReport};
pub use crate::synth_layout::SynthLayout;
use crate::synth_layout::{MSMT17_TRAIN_LIST, MSMT17_VAL_LIST};
use draw::{render, Camera, Person};
use plan::{plan, ImageSpec};

/// Sizes and seed of a synthetic dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub seed: u64,
    /// Number of cameras (at most 6 for Market-1501's naming, 8 for Duke's, 15 for
    /// MSMT17's).
    pub cameras: usize,
    pub train_ids: usize,
    pub train_images: usize,
    pub test_ids: usize,
    /// Query images: one per test identity per camera it appears in.
    pub query_images: usize,
    /// Gallery images of test identities (distractors and junk come on top).
    pub gallery_images: usize,
    /// Gallery images of identity 0000: people who are not test identities.
    pub distractors: usize,
    /// Gallery images of identity -1: bad detections.
    pub junk: usize,
    /// Image height and width in pixels (Market-1501's crops are 128 x 64).
    pub height: u32,
    pub width: u32,
    /// The folder layout and file names (Market-1501's when absent from a record).
    #[serde(default)]
    pub layout: SynthLayout,
}

impl SynthConfig {
    /// The default: small enough for a demo that trains in minutes on 2 cores.
    pub fn demo(seed: u64) -> Self {
        SynthConfig {
            seed,
            cameras: 4,
            train_ids: 100,
            train_images: 1200,
            test_ids: 100,
            query_images: 250,
            gallery_images: 700,
            distractors: 100,
            junk: 50,
            height: 128,
            width: 64,
            layout: SynthLayout::Market,
        }
    }

    /// Market-1501's real split sizes: 12,936 train images of 751 identities,
    /// 3,368 queries of 750, 19,732 gallery files (2,793 distractors, 3,819 junk),
    /// 6 cameras.
    pub fn market(seed: u64) -> Self {
        SynthConfig {
            seed,
            cameras: 6,
            train_ids: 751,
            train_images: 12_936,
            test_ids: 750,
            query_images: 3_368,
            gallery_images: 13_120,
            distractors: 2_793,
            junk: 3_819,
            height: 128,
            width: 64,
            layout: SynthLayout::Market,
        }
    }

    /// MSMT17's real split sizes in its layout: 32,621 train images of 1,041
    /// identities (2,373 of them in the val list), 11,659 queries and 82,161 gallery
    /// images of 3,060 identities, 15 cameras, no distractors or junk.
    pub fn msmt17(seed: u64) -> Self {
        SynthConfig {
            seed,
            cameras: 15,
            train_ids: 1_041,
            train_images: 32_621,
            test_ids: 3_060,
            query_images: 11_659,
            gallery_images: 82_161,
            distractors: 0,
            junk: 0,
            height: 128,
            width: 64,
            layout: SynthLayout::Msmt17,
        }
    }

    /// Train images that go to MSMT17's val list (2,373 of 32,621, as in MSMT17).
    pub fn val_images(&self) -> usize {
        match self.layout {
            SynthLayout::Msmt17 => self.train_images * 2_373 / 32_621,
            _ => 0,
        }
    }

    /// Total number of image files.
    pub fn total_images(&self) -> usize {
        self.train_images + self.query_images + self.gallery_images + self.distractors + self.junk
    }

    /// Checks that the sizes can be met (every test identity in at least two
    /// cameras, one gallery image per camera it appears in, ...).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (c, max) = (self.cameras, self.layout.max_cameras());
        if !(2..=max).contains(&c) {
            return Err(format!(
                "cameras must be 2 to {max} in the {} layout, got {c}",
                self.layout
            ));
        }
        if self.layout == SynthLayout::Msmt17 && self.distractors + self.junk > 0 {
            return Err("the msmt17 layout has no distractors or junk: pass --distractors 0 --junk 0".into());
        }
        if self.train_ids == 0 || self.test_ids == 0 {
            return Err("train and test identities must be at least 1".into());
        }
        if self.train_ids + self.test_ids > 9999 {
            return Err("at most 9999 identities fit the 4-digit names".into());
        }
        if self.train_images < 2 * self.train_ids {
            return Err(format!(
                "train images ({}) must be at least 2 per train identity ({})",
                self.train_images,
                2 * self.train_ids
            ));
        }
        let (lo, hi) = (2 * self.test_ids, c * self.test_ids);
        if !(lo..=hi).contains(&self.query_images) {
            return Err(format!(
                "query images must be 2 to {c} per test identity: {lo}..={hi}, got {}",
                self.query_images
            ));
        }
        if self.gallery_images < self.query_images {
            return Err(format!(
                "gallery images ({}) must be at least the query images ({}): one per identity and camera",
                self.gallery_images, self.query_images
            ));
        }
        if self.height < 32 || self.width < 16 {
            return Err("images must be at least 32 x 16".into());
        }
        Ok(())
    }
}

/// The file `reid synth` writes into the dataset root to record its settings.
pub const SYNTH_RECORD: &str = "synth.json";

/// Reads the settings a synthetic dataset at `root` was made with, if any.
pub fn read_synth_record(root: &Path) -> Option<SynthConfig> {
    let text = fs::read_to_string(root.join(SYNTH_RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Renders the dataset into `out` (which must not exist). Files are written into a
/// temporary sibling folder that is renamed to `out` when complete, so an
/// interrupted run never leaves a dataset that looks whole. `progress` is called
/// with the number of images written so far.
pub fn generate(cfg: &SynthConfig, out: &Path, progress: &(dyn Fn(usize) + Sync)) -> Result<usize> {
    cfg.validate().map_err(|m| DataError::invalid(out, m))?;
    if out.exists() {
        return Err(DataError::invalid(
            out,
            "already exists; remove it or choose another --out",
        ));
    }
    let (specs, total_ids) = plan(cfg);
    let people: Vec<Person> = (0..total_ids)
        .map(|i| Person::random(&mut ChaCha8Rng::seed_from_u64(mix(cfg.seed, 2, i as u64))))
        .collect();
    let cameras: Vec<Camera> = (0..cfg.cameras)
        .map(|c| Camera::random(&mut ChaCha8Rng::seed_from_u64(mix(cfg.seed, 4, c as u64))))
        .collect();
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let result = (|| {
        let folders: std::collections::BTreeSet<&str> = specs
            .iter()
            .filter_map(|s| s.relative_path.rsplit_once('/').map(|(dir, _)| dir))
            .collect();
        for folder in folders {
            let dir = staging.join(folder);
            fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        }
        let done = std::sync::atomic::AtomicUsize::new(0);
        specs.par_iter().enumerate().try_for_each(|(i, spec)| {
            let bytes = render(spec, &people, &cameras, cfg, i)?;
            let path = staging.join(&spec.relative_path);
            fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_multiple_of(256) {
                progress(n);
            }
            Ok::<_, DataError>(())
        })?;
        write_lists(&specs, &staging)?;
        let record = staging.join(SYNTH_RECORD);
        let json = serde_json::to_string_pretty(cfg).expect("config serialises");
        fs::write(&record, json).map_err(|e| DataError::io(&record, e))?;
        fs::rename(&staging, out).map_err(|e| DataError::io(out, e))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result.map(|_| specs.len())
}

/// Writes MSMT17's list files (one `<path> <pid>` line per image, in plan order).
fn write_lists(specs: &[ImageSpec], root: &Path) -> Result<()> {
    let mut lists: std::collections::BTreeMap<&str, String> = Default::default();
    for (list, line) in specs.iter().filter_map(|s| s.listed.as_ref()) {
        let text = lists.entry(list).or_default();
        text.push_str(line);
        text.push('\n');
    }
    if lists.contains_key(MSMT17_TRAIN_LIST) {
        lists.entry(MSMT17_VAL_LIST).or_default();
    }
    for (list, text) in lists {
        let path = root.join(list);
        fs::write(&path, text).map_err(|e| DataError::io(&path, e))?;
    }
    Ok(())
}

/// Generates the dataset unless `out` already holds one made with `cfg`; returns
/// whether anything was generated. A folder of other settings, or not a
/// synthetic dataset, is an error.
pub fn ensure(cfg: &SynthConfig, out: &Path, progress: &(dyn Fn(usize) + Sync)) -> Result<bool> {
    if !out.exists() {
        return generate(cfg, out, progress).map(|_| true);
    }
    match read_synth_record(out) {
        Some(existing) if &existing == cfg => Ok(false),
        Some(_) => Err(DataError::invalid(
            out,
            "holds a synthetic dataset made with other settings; remove it or choose another --out",
        )),
        None => Err(DataError::invalid(
            out,
            "already exists and is not a synthetic dataset; choose another --out",
        )),
    }
}

/// Renders `cfg` into `dir/syn`, indexes it in its layout and writes the
/// manifest to `dir/m.parquet`: the small dataset the tests and examples train
/// on, in one call.
pub fn tiny_indexed_dataset(cfg: &SynthConfig, dir: &Path) -> Result<IndexReport> {
    let root = dir.join("syn");
    generate(cfg, &root, &|_| {})?;
    let kind: DatasetKind = cfg
        .layout
        .dataset()
        .parse()
        .map_err(|m: String| DataError::invalid(&root, m))?;
    let report = kind.layout().index(&root, &IndexOptions::default())?;
    report.manifest.write_parquet(&dir.join("m.parquet"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plan::{spread, Subject};

    fn tiny(seed: u64) -> SynthConfig {
        SynthConfig {
            seed,
            cameras: 3,
            train_ids: 5,
            train_images: 20,
            test_ids: 4,
            query_images: 9,
            gallery_images: 14,
            distractors: 3,
            junk: 2,
            height: 64,
            width: 32,
            layout: SynthLayout::Market,
        }
    }

    #[test]
    fn spread_hits_the_total_within_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let c = spread(&mut rng, 10, 37, 2, 6);
        assert_eq!(c.iter().sum::<usize>(), 37);
        assert!(c.iter().all(|&x| (2..=6).contains(&x)));
    }

    #[test]
    fn the_market_preset_has_market_sizes() {
        let cfg = SynthConfig::market(0);
        cfg.validate().unwrap();
        let (specs, _) = plan(&cfg);
        let count = |prefix: &str| specs.iter().filter(|s| s.relative_path.starts_with(prefix)).count();
        assert_eq!(count("bounding_box_train/"), 12_936);
        assert_eq!(count("query/"), 3_368);
        assert_eq!(count("bounding_box_test/"), 19_732);
    }

    #[test]
    fn plans_are_unique_and_test_identities_span_two_cameras() {
        let cfg = SynthConfig::demo(5);
        let (specs, _) = plan(&cfg);
        let names: std::collections::HashSet<_> = specs.iter().map(|s| &s.relative_path).collect();
        assert_eq!(names.len(), specs.len());
        let mut cams: std::collections::HashMap<usize, std::collections::BTreeSet<usize>> = Default::default();
        for s in specs.iter().filter(|s| s.relative_path.starts_with("query/")) {
            if let Subject::Identity(i) = s.subject {
                cams.entry(i).or_default().insert(s.camera);
            }
        }
        assert_eq!(cams.len(), cfg.test_ids);
        assert!(cams.values().all(|c| c.len() >= 2));
    }

    #[test]
    fn the_msmt17_preset_has_msmt17_sizes_and_lists() {
        let cfg = SynthConfig::msmt17(0);
        cfg.validate().unwrap();
        let (specs, _) = plan(&cfg);
        let count = |list: &str| {
            specs
                .iter()
                .filter(|s| s.listed.as_ref().is_some_and(|l| l.0 == list))
                .count()
        };
        assert_eq!(count(MSMT17_TRAIN_LIST), 30_248);
        assert_eq!(count(MSMT17_VAL_LIST), 2_373);
        assert_eq!(count("list_query.txt"), 11_659);
        assert_eq!(count("list_gallery.txt"), 82_161);
        let names: std::collections::HashSet<_> = specs.iter().map(|s| &s.relative_path).collect();
        assert_eq!(names.len(), specs.len(), "unique paths");
        let first = &specs[0];
        assert!(
            first.relative_path.starts_with("train/0000/0000_000_"),
            "{}",
            first.relative_path
        );
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let read_all = |root: &Path| {
            let mut files = Vec::new();
            for (_, folder) in crate::layout::SPLIT_FOLDERS {
                let mut names: Vec<_> = fs::read_dir(root.join(folder))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                names.sort();
                for n in names {
                    files.push((n.strip_prefix(root).unwrap().to_path_buf(), fs::read(&n).unwrap()));
                }
            }
            files
        };
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let c = dir.path().join("c");
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| generate(&tiny(7), &a, &|_| {}))
            .unwrap();
        generate(&tiny(7), &b, &|_| {}).unwrap();
        generate(&tiny(8), &c, &|_| {}).unwrap();
        let (fa, fb, fc) = (read_all(&a), read_all(&b), read_all(&c));
        assert_eq!(fa.len(), tiny(7).total_images());
        assert_eq!(fa, fb);
        assert_ne!(fa, fc);
        assert_eq!(read_synth_record(&a), Some(tiny(7)));
        assert!(
            generate(&tiny(7), &a, &|_| {}).is_err(),
            "an existing folder is not overwritten"
        );
    }

    #[test]
    fn impossible_sizes_are_refused() {
        let mut cfg = tiny(1);
        cfg.query_images = 100;
        assert!(cfg.validate().is_err());
        let mut cfg = tiny(1);
        cfg.cameras = 7;
        assert!(cfg.validate().is_err());
        cfg.layout = SynthLayout::Duke;
        cfg.validate().unwrap();
        cfg.layout = SynthLayout::Msmt17;
        assert!(cfg.validate().unwrap_err().contains("no distractors or junk"));
    }
}
