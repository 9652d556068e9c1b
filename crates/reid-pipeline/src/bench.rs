//! The benchmarks behind `reid bench`: medians of timed iterations after warm-up,
//! as `bench/torch_baseline.py` times PyTorch on the same shapes, returned as one
//! JSON object. The training step is `reid_train::train_step` itself.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reid_data::gallery::{Gallery, GalleryMeta};
use reid_eval::files::{evaluate_files, EvaluateRequest};
use reid_eval::{Metric, RerankParams};
use reid_model::{Arch, DeviceSpec, LossSettings, ModelConfig, PairTargets, ReidModel};
use reid_ops::ledger::Ledger;
use reid_ops::Exec;
use reid_train::{train_step, BatchTensors, Sgd, SgdConfig, StepSettings};
use serde_json::{json, Value};
use std::path::PathBuf;

use crate::{PipelineError, Result};

/// The median of `v` (upper median for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of each of `iters` runs of `f` after `warmup` untimed ones.
pub fn timed(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect()
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A model benchmark: eval-mode forward, or a full siamese training step.
#[derive(Debug, Clone)]
pub struct ModelBench {
    pub arch: Arch,
    /// Images per iteration (a training step takes them as batch / 2 pairs).
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
    pub iters: usize,
    pub warmup: usize,
    pub train: bool,
    pub device: DeviceSpec,
    /// The ops and precision the model runs with.
    pub exec: Exec,
    /// TF32 for f32 on CUDA.
    pub tf32: bool,
    /// Count one more training step's work (see [`reid_ops::ledger`]).
    pub ledger: bool,
}

fn uniform(shape: (usize, usize, usize, usize), seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// A pair batch of random images; every other pair shows one identity.
fn pair_batch(b: &ModelBench, device: &Device) -> Result<BatchTensors> {
    let pairs = b.batch / 2;
    let k = b.classes as i64;
    let y1: Vec<i64> = (0..pairs as i64).map(|i| i % k).collect();
    let y2: Vec<i64> = y1
        .iter()
        .enumerate()
        .map(|(i, &y)| if i % 2 == 0 { y } else { (y + 1) % k })
        .collect();
    let same: Vec<i64> = y1.iter().zip(&y2).map(|(a, b)| i64::from(a != b)).collect();
    let labels = |v: Vec<i64>| Tensor::from_vec(v, pairs, device);
    let shape = (pairs, 3, b.height, b.width);
    Ok(BatchTensors {
        x1: uniform(shape, 1, device)?,
        x2: uniform(shape, 2, device)?,
        targets: PairTargets {
            y1: labels(y1)?,
            y2: labels(y2)?,
            same: labels(same)?,
        },
    })
}

impl ModelBench {
    /// Runs the benchmark: images/s of the median and best iteration.
    pub fn run(&self) -> Result<Value> {
        if self.train && (self.batch < 2 || self.batch % 2 == 1) {
            return Err(PipelineError::Invalid(format!(
                "--batch {} must be an even number of images (a training step takes pairs)",
                self.batch
            )));
        }
        if self.ledger && !self.train {
            return Err(PipelineError::Invalid(
                "--ledger counts a training step: use it with `reid bench train`".into(),
            ));
        }
        let device = self.device.open()?;
        self.exec.check(&device).map_err(PipelineError::Invalid)?;
        reid_ops::set_tf32(self.tf32);
        let config = ModelConfig {
            arch: self.arch,
            last_stride: 2,
            num_classes: self.classes,
            bnneck: false,
        };
        let model = ReidModel::new(config, self.exec, DType::F32, &device)?;
        model.initialize(0)?;
        let (times, ledger) = match self.train {
            true => self.time_train(&model, &device)?,
            false => (self.time_infer(&model, &device)?, None),
        };
        let best = times.iter().copied().fold(f64::MAX, f64::min);
        let med = median(times);
        let mut out = json!({
            "cmd": if self.train { "train" } else { "infer" },
            "arch": self.arch.name,
            "device": self.device.to_string(),
            "precision": self.exec.precision,
            "ops": self.exec.ops,
            "tf32": self.tf32,
            "batch": self.batch,
            "height": self.height,
            "width": self.width,
            "sec_per_iter_median": med,
            "images_per_s_median": self.batch as f64 / med,
            "images_per_s_best": self.batch as f64 / best,
        });
        if let Some(counts) = ledger {
            out["ledger"] = json!(counts);
            // Launches and allocations miss candle's own backward where it ran.
            out["ledger"]["launches_counted"] = json!(counts.launches_counted());
        }
        Ok(out)
    }

    /// Seconds of each timed training step, and the ledger of one more step
    /// when asked.
    fn time_train(&self, model: &ReidModel, device: &Device) -> Result<(Vec<f64>, Option<Ledger>)> {
        let batch = pair_batch(self, device)?;
        let mut sgd = Sgd::for_model(model, SgdConfig::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut step = || -> Result<()> {
            let settings = StepSettings::pairs(LossSettings::default(), 0.5);
            train_step(model, &mut sgd, &batch, settings, 0.01, &mut rng)
                .map_err(|e| PipelineError::Invalid(e.to_string()))?;
            device.synchronize()?;
            Ok(())
        };
        let times = timed(self.warmup, self.iters, &mut step)?;
        if !self.ledger {
            return Ok((times, None));
        }
        let (result, counts) = reid_ops::ledger::counting(&mut step);
        result?;
        Ok((times, Some(counts)))
    }

    /// Seconds of each timed eval-mode forward.
    fn time_infer(&self, model: &ReidModel, device: &Device) -> Result<Vec<f64>> {
        let x = uniform((self.batch, 3, self.height, self.width), 1, device)?;
        timed(self.warmup, self.iters, || {
            model.features(&x, false)?;
            device.synchronize()?;
            Ok(())
        })
    }
}

/// A loader benchmark: pair batches decoded (and augmented) from a manifest.
#[derive(Debug, Clone)]
pub struct LoaderBench {
    pub manifest: std::path::PathBuf,
    /// Pairs per batch.
    pub batch: usize,
    pub input: reid_sampling::InputSpec,
    pub batches: usize,
    pub augment: bool,
}

impl LoaderBench {
    /// Images/s of three passes over `batches` batches (median).
    pub fn run(&self) -> Result<Value> {
        let (data, _) = reid_train::TrainData::load(&self.manifest)?;
        let sampler = std::sync::Arc::new(reid_sampling::PairSampler::new(data.labels.clone(), 0.5, 0));
        let cfg = reid_sampling::LoaderConfig {
            batch_size: self.batch,
            input: self.input,
            augment: if self.augment {
                reid_sampling::Augment::default()
            } else {
                reid_sampling::Augment::none()
            },
            prefetch: 4,
            threads: 0,
            skip_unreadable: false,
            drop_last: true,
            seed: 0,
        };
        let mut rates = Vec::new();
        for pass in 0..3u64 {
            let t = Instant::now();
            let mut images = 0;
            let loader = reid_sampling::PairLoader::start(data.paths.clone(), sampler.clone(), cfg.clone(), pass, 0);
            for batch in loader.take(self.batches) {
                images += 2 * batch?.len();
            }
            rates.push(images as f64 / t.elapsed().as_secs_f64());
        }
        Ok(json!({
            "cmd": "loader",
            "augment": self.augment,
            "pairs_per_batch": self.batch,
            "batches": self.batches,
            "height": self.input.height,
            "width": self.input.width,
            "interpolation": self.input.interpolation.as_str(),
            "images_per_s_median": median(rates),
        }))
    }
}

/// An evaluation benchmark: `reid evaluate` as a user runs it, as a process
/// (reading the two files, distances, ranking, metrics, `metrics.json`, and the
/// pictures and page when `report`) on a random Market-like case of Q queries and G gallery entries
/// of D dimensions: 751 identities, 6 cameras, 10% distractors and 5% junk.
#[derive(Debug, Clone)]
pub struct EvalBench {
    pub queries: usize,
    pub gallery: usize,
    pub dim: usize,
    pub iters: usize,
    pub rerank: bool,
    pub report: bool,
    /// Where the case files are kept (written once, reused).
    pub cache: PathBuf,
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// The noise of the eval case per dimension, relative to the identity centres'
/// (both normal): with 2048 dimensions it puts mAP near 0.6, where ranks are
/// decided by small distance differences, as in real galleries.
const NOISE: f32 = 3.5;

/// Features around identity centres plus N(0, NOISE^2) noise per dimension: `n`
/// rows, the first `junk` as pid -1 and the next `distractors` as pid 0 (noise only).
fn random_gallery(n: usize, dim: usize, centers: &[f32], special: (usize, usize), rng: &mut ChaCha8Rng) -> Gallery {
    let ids = centers.len() / dim;
    let (distractors, junk) = special;
    let pids: Vec<i64> = (0..n)
        .map(|i| match i {
            _ if i < junk => -1,
            _ if i < junk + distractors => 0,
            _ => rng.gen_range(1..ids as i64),
        })
        .collect();
    let camids: Vec<i64> = (0..n).map(|_| rng.gen_range(0..6)).collect();
    let mut features = Vec::with_capacity(n * dim);
    for &p in &pids {
        let c = p.max(0) as usize;
        for k in 0..dim {
            let centre = if p <= 0 { 0.0 } else { centers[c * dim + k] };
            features.push(centre + NOISE * normal(rng));
        }
    }
    Gallery {
        features: features.into(),
        dim,
        pids,
        camids,
        meta: GalleryMeta::default(),
    }
}

impl EvalBench {
    /// The case's two files, written on first use, and whether this call wrote them.
    fn case(&self) -> Result<(PathBuf, PathBuf, bool)> {
        let dir = self
            .cache
            .join(format!("eval-v2-{}x{}x{}", self.queries, self.gallery, self.dim));
        let (q, g) = (dir.join("query.safetensors"), dir.join("gallery.safetensors"));
        if q.is_file() && g.is_file() {
            return Ok((q, g, false));
        }
        let d = self.dim;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let centers: Vec<f32> = (0..751 * d).map(|_| normal(&mut rng)).collect();
        random_gallery(self.queries, d, &centers, (0, 0), &mut rng).write(&q)?;
        let special = (self.gallery / 10, self.gallery / 20);
        random_gallery(self.gallery, d, &centers, special, &mut rng).write(&g)?;
        Ok((q, g, true))
    }

    /// The `reid evaluate` command of the case, as a child process of this binary.
    fn command(
        &self,
        q: &std::path::Path,
        g: &std::path::Path,
        out: &std::path::Path,
    ) -> Result<std::process::Command> {
        let exe =
            std::env::current_exe().map_err(|e| PipelineError::Invalid(format!("no path of this binary: {e}")))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("evaluate")
            .arg("--query")
            .arg(q)
            .arg("--gallery")
            .arg(g)
            .arg("--out")
            .arg(out)
            .arg("--json");
        cmd.arg("--ranked").arg("0");
        if !self.report {
            cmd.arg("--no-report");
        }
        if self.rerank {
            cmd.arg("--rerank");
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        Ok(cmd)
    }

    /// Wall seconds of `reid evaluate` as a process (median of `iters`), its peak
    /// memory, the parts of one in-process run, and the GEMM bound of the distances.
    pub fn run(&self) -> Result<Value> {
        let (q, g, written) = self.case()?;
        if written {
            // A child started by vfork + exec starts from its parent's peak, and the
            // allocator keeps what writing the case took: the peak is not the child's.
            eprintln!("the case was written in this run: run the benchmark again for the peak memory of `reid evaluate` alone");
        }
        let out = self.cache.join("eval-report");
        // The GEMM rate before and after the runs: the best of the two is the bound,
        // so that one slow spell of a shared machine cannot make the bound look lax.
        let peak_before = gemm_peak_gflops();
        let mut walls = Vec::new();
        let mut metrics = Value::Null;
        for _ in 0..self.iters.max(1) {
            let t = Instant::now();
            let child = self
                .command(&q, &g, &out)?
                .output()
                .map_err(|e| PipelineError::Invalid(e.to_string()))?;
            walls.push(t.elapsed().as_secs_f64());
            if !child.status.success() {
                return Err(PipelineError::Invalid(format!(
                    "reid evaluate failed: {}",
                    child.status
                )));
            }
            metrics = serde_json::from_slice(&child.stdout).unwrap_or(Value::Null);
        }
        let peak_child_mib = children_peak_rss_mib();
        let request = EvaluateRequest {
            pairs: vec![(q.clone(), g.clone())],
            metric: Metric::Cosine,
            rerank: self.rerank.then(RerankParams::default),
            max_rank: 50,
            out,
            ranked: 0,
            data_root: None,
            run: None,
            pictures: false,
        };
        let parts = evaluate_files(&request)?.timings[0];
        let peak_after = gemm_peak_gflops();
        let peak = peak_before.max(peak_after);
        let bound = 2.0 * (self.queries * self.gallery * self.dim) as f64 / (peak * 1e9);
        Ok(json!({
            "cmd": "eval",
            "rerank": self.rerank,
            "report": self.report,
            "Q": self.queries,
            "G": self.gallery,
            "D": self.dim,
            "files": [q, g],
            "process_s_median": median(walls.clone()),
            "process_s_all": walls,
            "process_peak_rss_mib": peak_child_mib,
            "process_peak_exact": !written,
            "distances_s": parts.distances_s,
            "ranking_s": parts.ranking_s,
            "amx": parts.amx,
            "gemm_peak_gflops": peak,
            "gemm_gflops_before_after": [peak_before, peak_after],
            "gemm_bound_s": bound,
            "distances_over_bound": parts.distances_s / bound,
            "rank1": metrics["rank1"],
            "mAP": metrics["mAP"],
        }))
    }
}

/// The largest peak resident memory of this process's finished children, MiB.
fn children_peak_rss_mib() -> Option<f64> {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } == 0;
    ok.then(|| usage.ru_maxrss as f64 / 1024.0)
}

/// The f32 GEMM rate of this machine on all threads, GFLOP/s (best of five runs of
/// an M x N x K = 1024 x 4096 x 2048 product, the shape of a query block against a
/// gallery panel), as the bound for the distance part of evaluation.
pub fn gemm_peak_gflops() -> f64 {
    let (m, n, k) = (1024usize, 4096usize, 2048usize);
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let b: Vec<f32> = (0..n * k).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let mut c = vec![0.0f32; m * n];
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            reid_eval::distance::gemm_nt(m, n, k, &mut c, n, false, &a, k, &b, k);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    2.0 * (m * n * k) as f64 / best / 1e9
}
