//! `reid bench`: throughput of the model and the evaluator, timed as
//! `bench/torch_baseline.py` times PyTorch (median of iterations after warm-up),
//! printed as one JSON line.

use anyhow::Result;
use clap::{Args, ValueEnum};
use reid_model::{Arch, DeviceSpec};
use reid_ops::Precision;
use reid_pipeline::bench::{peak_rss_mib, EvalBench, LoaderBench, ModelBench};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchKind {
    /// Eval-mode forward.
    Infer,
    /// One siamese training step (forward of cat[x1, x2], three losses, backward, SGD).
    Train,
    /// Distances + CMC/mAP of a random Market-size case.
    Eval,
    /// Pair-batch loading (decode + augment) from --manifest's training split.
    Loader,
    /// This machine's f32 GEMM rate on all threads.
    Gemm,
}

#[derive(Args)]
pub struct BenchArgs {
    pub kind: BenchKind,
    #[arg(long, default_value = "res2net50_26w_4s")]
    pub arch: Arch,
    /// Images per iteration (a training step takes them as pairs) [default: 32 for
    /// infer and loader, 16 for train].
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
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32, or bf16 (mixed precision: convolutions and matrix products in bf16).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Forbid TF32 tensor cores for f32 on CUDA (allowed by default, as PyTorch
    /// allows them for convolutions).
    #[arg(long)]
    pub no_tf32: bool,
    #[command(flatten)]
    pub ops: super::OpsArg,
    /// With train: count one more step's device work (host reads and uploads,
    /// kernel launches, tensors allocated and their bytes, gradients started as
    /// zeros, ops on the tape and on candle's graph) and add it as "ledger" to the
    /// JSON line.
    #[arg(long)]
    pub ledger: bool,
    /// Manifest for the loader benchmark (e.g. of `reid synth --preset market`).
    #[arg(long)]
    pub manifest: Option<std::path::PathBuf>,
    /// Loader benchmark without augmentation.
    #[arg(long)]
    pub no_augment: bool,
    /// The loader benchmark's resize filter: bilinear or bicubic.
    #[arg(long, default_value = "bilinear")]
    pub interpolation: reid_sampling::Interpolation,
    /// Eval benchmark with k-reciprocal re-ranking (20, 6, 0.3); medians of
    /// --iters (at most 5) runs.
    #[arg(long)]
    pub rerank: bool,
    /// Queries, gallery size and dimension of the eval case.
    #[arg(long, value_delimiter = ',', default_value = "3368,15913,2048")]
    pub eval_size: Vec<usize>,
    /// Eval benchmark with the pictures and report.html (else metrics.json only).
    #[arg(long)]
    pub report: bool,
    /// Where the eval benchmark keeps its case files (written once).
    #[arg(long, default_value = "artifacts/bench")]
    pub cache: std::path::PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let train = args.kind == BenchKind::Train;
    let batch = args.batch.unwrap_or(if train { 16 } else { 32 });
    let mut out = match args.kind {
        BenchKind::Infer | BenchKind::Train => ModelBench {
            arch: args.arch,
            batch,
            height: args.height,
            width: args.width,
            classes: args.classes,
            iters: args.iters,
            warmup: args.warmup,
            train,
            device: args.device,
            exec: reid_ops::Exec::new(args.ops.get()?.unwrap_or_default(), args.precision),
            tf32: !args.no_tf32,
            ledger: args.ledger,
        }
        .run()?,
        BenchKind::Eval => {
            let [queries, gallery, dim] = args.eval_size[..] else {
                anyhow::bail!("--eval-size takes Q,G,D");
            };
            let iters = args.iters.min(5);
            EvalBench {
                queries,
                gallery,
                dim,
                iters,
                rerank: args.rerank,
                report: args.report,
                cache: args.cache.clone(),
            }
            .run()?
        }
        BenchKind::Gemm => serde_json::json!({"cmd": "gemm", "gflops": reid_pipeline::bench::gemm_peak_gflops()}),
        BenchKind::Loader => {
            let Some(manifest) = args.manifest.clone() else {
                anyhow::bail!("the loader benchmark needs --manifest (e.g. of `reid synth --preset market`)");
            };
            let input = reid_sampling::InputSpec {
                height: args.height,
                width: args.width,
                interpolation: args.interpolation,
            };
            LoaderBench {
                manifest,
                batch,
                input,
                batches: args.iters.max(1) * 5,
                augment: !args.no_augment,
            }
            .run()?
        }
    };
    out["threads"] = serde_json::json!(rayon::current_num_threads());
    out["peak_rss_mib"] = serde_json::json!(peak_rss_mib());
    println!("{out}");
    Ok(())
}
