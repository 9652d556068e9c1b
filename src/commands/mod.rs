//! One module per subcommand: argument parsing and printing; the work itself lives
//! in the stage crates.

pub mod bench;
pub mod demo;
pub mod evaluate;
pub mod export;
pub mod extract;
pub mod index;
pub mod search;
pub mod selftest;
pub mod synth;
pub mod train;

/// `--ops`, shared by the commands that run the network's ops.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct OpsArg {
    /// Which implementation the ops run: auto (the fastest the device has),
    /// fused (this crate's fused kernels; CPU only), generic (candle's own ops, as
    /// CUDA runs where it has no kernel), or as-cuda (on the CPU, exactly the op
    /// graph CUDA runs). Default: $REID_OPS, else the config's run.ops, else auto.
    #[arg(long, value_name = "PLAN")]
    pub ops: Option<reid_ops::Ops>,
}

impl OpsArg {
    /// The plan asked for: the flag, else $REID_OPS (an error if it names no
    /// plan), else none.
    pub fn get(self) -> anyhow::Result<Option<reid_ops::Ops>> {
        if self.ops.is_some() {
            return Ok(self.ops);
        }
        match std::env::var("REID_OPS") {
            Ok(v) => v.parse().map(Some).map_err(|e| anyhow::anyhow!("REID_OPS={v}: {e}")),
            Err(_) => Ok(None),
        }
    }
}
