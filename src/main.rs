//! `reid`: person re-identification with a siamese Res2Net, one stage per
//! subcommand (DESIGN.md "Stages").

mod commands;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Render a synthetic pedestrian dataset in the Market-1501 layout.
    Synth(commands::synth::SynthArgs),
    /// Evaluate query features against gallery features (CMC, mAP, mINP).
    Evaluate(commands::evaluate::EvaluateArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Index(args) => commands::index::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Evaluate(args) => commands::evaluate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
