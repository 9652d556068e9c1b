//! `reid`: person re-identification with a siamese Res2Net, one stage per
//! subcommand (docs/USAGE.md).

mod commands;
mod progress;
mod stop;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Training allocates and frees large tensors at every op; mimalloc keeps those
/// pages instead of returning them to the kernel each time (page faults and TLB
/// shootdowns were a third of a CPU step with the system allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Person re-identification: index a dataset, train, extract features, evaluate.
#[derive(Parser)]
#[command(name = "reid", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Index a dataset folder into a parquet manifest.
    Index(commands::index::IndexArgs),
    /// Render a synthetic pedestrian dataset (Market-1501, Duke or MSMT17 layout).
    Synth(commands::synth::SynthArgs),
    /// Train the siamese network (identification + verification losses).
    Train(commands::train::TrainArgs),
    /// Extract features of dataset splits into cached gallery files.
    Extract(commands::extract::ExtractArgs),
    /// Evaluate query features against gallery features (CMC, mAP, mINP).
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Export a checkpoint to ONNX (images to retrieval features).
    Export(commands::export::ExportArgs),
    /// Find the nearest gallery entries of query images (and draw them).
    Search(commands::search::SearchArgs),
    /// Run the whole pipeline on a generated dataset (no download).
    Demo(commands::demo::DemoArgs),
    /// Benchmark the model (infer, train) or the evaluator (eval).
    Bench(commands::bench::BenchArgs),
    /// Check that this build computes what PyTorch does, on a device.
    Selftest(commands::selftest::SelftestArgs),
}

/// mimalloc's `mi_option_purge_delay`: its position in `mi_option_e`, the same in
/// the mimalloc v3 that libmimalloc-sys 0.1.49 builds by default and in its v2
/// (next to `mi_option_use_numa_nodes` = 16 in both).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process: returning it makes every training step fault
/// in and zero fresh pages (28% of a Res2Net-50 CPU step). The price is peak RSS:
/// a Res2Net-50 step (batch 16) peaks at about 1.97 GiB of live allocations but
/// 2.5 GiB resident; with a 1 s purge delay it peaked at 2.2-2.3 GiB and took 7%
/// longer (system time 1.2 -> 3.9 s over the bench), measured 2026-12-04.
fn keep_freed_memory() {
    // SAFETY: setting an allocator option is a plain store into mimalloc's table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Turns transparent huge pages off for this process. mimalloc advises them for
/// its arena (before `main`, so its own option comes too late), and with the
/// kernel's `defrag = madvise` each first touch of a huge page then waits for
/// compaction and the zeroing of 2 MiB: on the shared VMs that measured 5-20x
/// slower than small pages (re-ranking at Market size spent 2.5-5.7 s of system
/// time against 0.3 s; a training bench 17-22 s against 1.5-2.5 s).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE sets one flag of this process; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// candle runs large element-wise ops on a pool of its own, whose workers spin
/// 25,000 rounds after each op before they sleep. Beside the training's rayon
/// threads that spin holds a core: 12-14% of a `res2net_tiny` step's samples in
/// `reid bench train` on 2 cores. A short spin unless the user chose one (candle
/// reads the variable when its pool starts, after this).
fn short_candle_spin() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "100");
    }
}

/// Ends quietly when stdout is closed early (`reid index ... | head`), as Unix
/// tools do, instead of panicking on the failed write.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    keep_freed_memory();
    no_transparent_huge_pages();
    short_candle_spin();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Index(args) => commands::index::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Extract(args) => commands::extract::run(args),
        Command::Evaluate(args) => commands::evaluate::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Search(args) => commands::search::run(args),
        Command::Selftest(args) => commands::selftest::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit status of a failed command: 128 + the signal for a run stopped by
/// one, 75 (`EX_TEMPFAIL`: try again later) for a run folder another process
/// holds, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(stopped) = cause.downcast_ref::<stop::Interrupted>() {
            return stopped.exit_code();
        }
        if let Some(reid_train::TrainError::Busy { .. }) = cause.downcast_ref::<reid_train::TrainError>() {
            return 75;
        }
    }
    1
}
