//! `reid selftest`: checks that this build computes what PyTorch computes on a
//! device: the shipped fixtures, and every fused kernel against the generic ops.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use reid_model::DeviceSpec;
use reid_parity::{fixture_root, run as run_checks};

#[derive(Args)]
pub struct SelftestArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// The fixture folder [default: $REID_FIXTURES, else tests/fixtures, else
    /// fixtures/ beside the binary].
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Print every check, not only the failed ones and the section totals.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub ops: super::OpsArg,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    let root = fixture_root(args.fixtures.as_deref())?;
    let device = args.device.open()?;
    let exec = reid_model::Exec::new(args.ops.get()?.unwrap_or_default(), reid_model::Precision::F32);
    exec.check(&device).map_err(anyhow::Error::msg)?;
    println!(
        "reid selftest on {} (ops {}) with the fixtures in {}",
        args.device,
        exec.ops,
        root.display()
    );
    let started = std::time::Instant::now();
    let sections = run_checks(&root, &device, exec)?;
    let (mut passed, mut failed) = (0, 0);
    for section in &sections {
        let bad = section.checks.iter().filter(|c| !c.passed).count();
        let mark = if bad == 0 { "PASS" } else { "FAIL" };
        println!("{mark}  {} ({} checks)", section.title, section.checks.len());
        for c in section.checks.iter().filter(|c| args.verbose || !c.passed) {
            println!("  {}  {}: {}", if c.passed { "ok  " } else { "FAIL" }, c.name, c.detail);
        }
        failed += bad;
        passed += section.checks.len() - bad;
    }
    println!("{passed} passed, {failed} failed in {:.1?}", started.elapsed());
    if failed > 0 {
        bail!("{failed} self-test checks failed on {}", args.device);
    }
    Ok(())
}
