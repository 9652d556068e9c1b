//! `reid bench`: throughput of the model and the evaluator, timed as
//! ../shared/bench/torch_baseline.py times PyTorch (median of iterations after
//! warm-up), printed as one JSON line.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use reid_model::{Arch, ModelConfig, ReidModel};
use reid_train::{Sgd, SgdConfig};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum)]
pub enum BenchKind {
    /// Eval-mode forward.
    Infer,
    /// One SGD step on cross-entropy (forward, backward, update).
    Train,
    /// Distances + CMC/mAP of a random Market-size case.
    Eval,
    /// Pair-batch loading (decode + augment) from --manifest's training split.
    Loader,
}

#[derive(Args)]
pub struct BenchArgs {
    pub kind: BenchKind,
    #[arg(long, default_value = "res2net50_26w_4s")]
    pub arch: Arch,
    /// Images per iteration [default: 32 for infer, 16 for train].
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long, default_value_t = 256)]
    pub height: usize,
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    #[arg(long, default_value_t = 751)]
    pub classes: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Manifest for the loader benchmark (e.g. of `reid synth --preset market`).
    #[arg(long)]
    pub manifest: Option<std::path::PathBuf>,
    /// Loader benchmark without augmentation.
    #[arg(long)]
    pub no_augment: bool,
    /// Eval benchmark with k-reciprocal re-ranking (20, 6, 0.3).
    #[arg(long)]
    pub rerank: bool,
    /// Queries, gallery size and dimension of the eval case.
    #[arg(long, value_delimiter = ',', default_value = "3368,15913,2048")]
    pub eval_size: Vec<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let best = times.iter().copied().fold(f64::MAX, f64::min);
    Ok((median(times), best))
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn random_tensor(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    let mut out = json!({ "threads": threads, "device": "cpu" });
    match args.kind {
        BenchKind::Infer | BenchKind::Train => {
            let train = matches!(args.kind, BenchKind::Train);
            let b = args.batch.unwrap_or(if train { 16 } else { 32 });
            let config = ModelConfig {
                arch: args.arch,
                last_stride: 2,
                num_classes: args.classes,
                bnneck: false,
            };
            let model = ReidModel::new(config, DType::F32, &Device::Cpu)?;
            model.initialize(0)?;
            let x = random_tensor((b, 3, args.height, args.width), 1)?;
            let labels: Vec<i64> = (0..b as i64).map(|i| i % args.classes as i64).collect();
            let y = Tensor::from_vec(labels, b, &Device::Cpu)?;
            let mut sgd = Sgd::new(
                model.trainable_vars(),
                SgdConfig {
                    lr: 0.01,
                    ..SgdConfig::default()
                },
            );
            let (med, best) = timed(args.warmup, args.iters, || {
                if train {
                    let f = model.features(&x, true)?;
                    let logits = model.heads.id_classifier.forward(&f)?;
                    let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                    let grads = loss.backward()?;
                    sgd.step(&grads, 0.01)?;
                } else {
                    model.features(&x, false)?;
                }
                Ok(())
            })?;
            out["cmd"] = json!(if train { "train" } else { "infer" });
            out["arch"] = json!(args.arch.name);
            out["batch"] = json!(b);
            out["height"] = json!(args.height);
            out["width"] = json!(args.width);
            out["sec_per_iter_median"] = json!(med);
            out["images_per_s_median"] = json!(b as f64 / med);
            out["images_per_s_best"] = json!(b as f64 / best);
        }
        BenchKind::Eval => {
            let (q, g, d) = match args.eval_size.as_slice() {
                [q, g, d] => (*q, *g, *d),
                _ => anyhow::bail!("--eval-size takes Q,G,D"),
            };
            let ids = 751;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            let centers: Vec<f32> = (0..ids * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let mut make = |n: usize| {
                let pids: Vec<i64> = (0..n).map(|_| rng.gen_range(0..ids as i64)).collect();
                let cams: Vec<i64> = (0..n).map(|_| rng.gen_range(0..6)).collect();
                let mut f = Vec::with_capacity(n * d);
                for &p in &pids {
                    for k in 0..d {
                        f.push(centers[p as usize * d + k] + 1.5 * rng.gen_range(-1.0f32..1.0));
                    }
                }
                (f, pids, cams)
            };
            let (qf, qp, qc) = make(q);
            let (gf, gp, gc) = make(g);
            let qs = reid_eval::FeatureSet {
                features: &qf,
                dim: d,
                pids: &qp,
                camids: &qc,
            };
            let gs = reid_eval::FeatureSet {
                features: &gf,
                dim: d,
                pids: &gp,
                camids: &gc,
            };
            let mut metrics = None;
            let rerank = args.rerank.then(reid_eval::RerankParams::default);
            let (med, best) = timed(0, args.iters.min(5), || {
                metrics = Some(reid_eval::evaluate(qs, gs, reid_eval::Metric::Cosine, rerank, 50)?.metrics);
                Ok(())
            })?;
            let m = metrics.expect("ran");
            out["cmd"] = json!("eval");
            out["rerank"] = json!(args.rerank);
            out["Q"] = json!(q);
            out["G"] = json!(g);
            out["D"] = json!(d);
            out["total_s_median"] = json!(med);
            out["total_s_best"] = json!(best);
            out["rank1"] = json!(m.rank1);
            out["mAP"] = json!(m.map);
        }
        BenchKind::Loader => {
            let Some(path) = &args.manifest else {
                anyhow::bail!("the loader benchmark needs --manifest (e.g. of `reid synth --preset market`)");
            };
            let (data, _) = reid_train::TrainData::load(path)?;
            let sampler = std::sync::Arc::new(reid_sampling::PairSampler::new(data.labels.clone(), 0.5, 0));
            let b = args.batch.unwrap_or(32);
            let cfg = reid_sampling::LoaderConfig {
                batch_size: b,
                height: args.height,
                width: args.width,
                augment: if args.no_augment {
                    reid_sampling::Augment::none()
                } else {
                    reid_sampling::Augment::default()
                },
                prefetch: 4,
                threads: 0,
                skip_unreadable: false,
                drop_last: true,
                seed: 0,
            };
            let batches = args.iters.max(1) * 5;
            let mut times = Vec::new();
            for rep in 0..3u64 {
                let t = Instant::now();
                let mut images = 0;
                for batch in reid_sampling::PairLoader::start(data.paths.clone(), sampler.clone(), cfg.clone(), rep, 0)
                    .take(batches)
                {
                    images += 2 * batch?.len();
                }
                times.push(images as f64 / t.elapsed().as_secs_f64());
            }
            out["cmd"] = json!("loader");
            out["augment"] = json!(!args.no_augment);
            out["pairs_per_batch"] = json!(b);
            out["batches"] = json!(batches);
            out["height"] = json!(args.height);
            out["width"] = json!(args.width);
            out["images_per_s_median"] = json!(median(times));
        }
    }
    out["peak_rss_mib"] = json!(peak_rss_mib());
    println!("{out}");
    Ok(())
}
