//! Gallery extraction: the file format, the cache (hit, and misses when the
//! checkpoint or the manifest change), atomic writing and flip averaging.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use reid_data::gallery::Gallery;
use reid_data::synth::{tiny_indexed_dataset, SynthConfig};
use reid_data::Split;
use reid_extract::{extract_split, ExtractOptions, Extracted, Extractor, SplitJob};
use reid_model::{Arch, ModelConfig, Precision, ReidModel};

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let cfg = SynthConfig {
        seed: 1,
        cameras: 2,
        train_ids: 3,
        train_images: 6,
        test_ids: 3,
        query_images: 6,
        gallery_images: 8,
        distractors: 1,
        junk: 1,
        height: 64,
        width: 32,
        layout: Default::default(),
    };
    tiny_indexed_dataset(&cfg, dir).unwrap();
    (dir.join("m.parquet"), checkpoint(dir, "a.safetensors", 5))
}

fn checkpoint(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let arch: Arch = "res2net_tiny".parse().unwrap();
    let model = ReidModel::new(
        ModelConfig {
            arch,
            last_stride: 2,
            num_classes: 3,
            bnneck: false,
        },
        reid_model::Exec::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    model.initialize(seed).unwrap();
    let path = dir.join(name);
    reid_model::checkpoint::save(
        &model,
        reid_sampling::InputSpec::bilinear(64, 32),
        &Default::default(),
        &path,
    )
    .unwrap();
    path
}

#[test]
fn extraction_caches_by_checkpoint_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (manifest, ckpt) = setup(dir.path());
    let out = dir.path().join("features/query.safetensors");
    let mut job = SplitJob {
        checkpoint: ckpt,
        manifest: manifest.clone(),
        split: Split::Query,
        options: ExtractOptions {
            batch_size: 4,
            flip: false,
            normalize: true,
            ..ExtractOptions::default()
        },
        out: out.clone(),
        force: false,
    };
    let calls = std::cell::Cell::new(0);
    let progress = |_: usize, _: usize| calls.set(calls.get() + 1);
    assert_eq!(
        extract_split(&job, &Device::Cpu, &progress).unwrap(),
        Extracted::Written { images: 6 }
    );
    let g = Gallery::read(&out).unwrap();
    assert_eq!((g.len(), g.dim), (6, 256));
    assert_eq!(g.meta.split.as_deref(), Some("query"));
    assert_eq!(g.meta.paths.as_ref().unwrap().len(), 6);
    assert_eq!(g.meta.arch.as_deref(), Some("res2net_tiny"));
    for i in 0..g.len() {
        let norm: f32 = g.feature(i).iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    assert!(calls.get() >= 2);
    // Nothing but the gallery file is left in its folder (no temporary files).
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);

    assert_eq!(
        extract_split(&job, &Device::Cpu, &|_, _| {}).unwrap(),
        Extracted::Cached
    );
    job.force = true;
    assert!(matches!(
        extract_split(&job, &Device::Cpu, &|_, _| {}).unwrap(),
        Extracted::Written { .. }
    ));
    job.force = false;

    // Another checkpoint misses the cache and changes the features.
    job.checkpoint = checkpoint(dir.path(), "b.safetensors", 6);
    assert!(matches!(
        extract_split(&job, &Device::Cpu, &|_, _| {}).unwrap(),
        Extracted::Written { .. }
    ));
    assert_ne!(Gallery::read(&out).unwrap().features, g.features);
    // So does a changed manifest, and other settings.
    let m = reid_data::Manifest::read_parquet(&manifest).unwrap();
    let mut m2 = m.clone();
    m2.dataset = "renamed".into();
    m2.write_parquet(&manifest).unwrap();
    assert!(matches!(
        extract_split(&job, &Device::Cpu, &|_, _| {}).unwrap(),
        Extracted::Written { .. }
    ));
    job.options.flip = true;
    assert!(matches!(
        extract_split(&job, &Device::Cpu, &|_, _| {}).unwrap(),
        Extracted::Written { .. }
    ));
    assert_eq!(Gallery::read(&out).unwrap().meta.flip, Some(true));
}

#[test]
fn with_flip_an_image_and_its_mirror_have_one_feature() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ckpt) = setup(dir.path());
    let extractor = Extractor::load(&ckpt, Precision::F32, &Device::Cpu).unwrap();
    let path = std::fs::read_dir(dir.path().join("syn/query"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let img = reid_sampling::load_normalized(&path, reid_sampling::InputSpec::bilinear(64, 32)).unwrap();
    let mut mirror = img.clone();
    mirror.flip_horizontal();
    let on = ExtractOptions {
        batch_size: 2,
        flip: true,
        normalize: true,
        ..ExtractOptions::default()
    };
    let f = extractor.embed(&[img.clone(), mirror.clone()], &on).unwrap();
    let (a, b) = f.split_at(256);
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
    let off = ExtractOptions { flip: false, ..on };
    let f = extractor.embed(&[img, mirror], &off).unwrap();
    let (a, b) = f.split_at(256);
    assert!(
        a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-4),
        "without flip the two differ"
    );
}

/// bf16 features (mixed precision) are the f32 ones within rounding, and each
/// precision has its own cache entry. The bound: bf16 keeps 8 significant bits,
/// so each activation and weight is off by up to 2^-9 relative, and the tiny
/// model's L2-normalised features come out at a cosine similarity above 0.9999
/// to f32's (measured: 1 - 2e-5 at worst, with bf16 activations from end to
/// end); 0.999 leaves room for another
/// machine's summation order, while a wrong layer or a lost cast would give
/// far less.
#[test]
fn bf16_features_are_f32s_within_rounding_and_cached_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (manifest, ckpt) = setup(dir.path());
    let mut job = SplitJob {
        checkpoint: ckpt,
        manifest,
        split: Split::Gallery,
        options: ExtractOptions::default(),
        out: dir.path().join("gallery.safetensors"),
        force: false,
    };
    let mut extract = |precision: Precision| {
        job.options.precision = precision;
        let outcome = extract_split(&job, &Device::Cpu, &|_, _| {}).unwrap();
        (outcome, Gallery::read(&job.out).unwrap())
    };
    let (first, f32s) = extract(Precision::F32);
    assert!(matches!(first, Extracted::Written { .. }));
    assert_eq!(f32s.meta.precision.as_deref(), Some("f32"));
    let (second, bf16s) = extract(Precision::Bf16);
    assert!(
        matches!(second, Extracted::Written { .. }),
        "an f32 gallery is not a bf16 one"
    );
    assert_eq!(bf16s.meta.precision.as_deref(), Some("bf16"));
    assert_eq!(extract(Precision::Bf16).0, Extracted::Cached);
    assert_ne!(f32s.features, bf16s.features, "bf16 rounds");
    let worst = (0..f32s.len())
        .map(|i| {
            f32s.feature(i)
                .iter()
                .zip(bf16s.feature(i))
                .map(|(a, b)| a * b)
                .sum::<f32>()
        })
        .fold(f32::INFINITY, f32::min);
    assert!(worst > 0.999, "cosine similarity {worst}");
}
