//! Running the `reid` binary from the end-to-end tests.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `reid args...` in `cwd`.
pub fn reid(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reid"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("reid runs")
}

/// The stdout of a run that must have succeeded (its output shown when it did not).
#[allow(dead_code)]
pub fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
