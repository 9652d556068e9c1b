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

/// Renders `reid synth`'s default set resized to `[train ids, train images, test
/// ids, query images, gallery images, distractors, junk]` on 2 cameras into
/// `dir/syn`, and indexes it into `dir/m.parquet`.
#[allow(dead_code)]
pub fn tiny_dataset(dir: &Path, counts: [usize; 7]) {
    let [train_ids, train_images, test_ids, query_images, gallery_images, distractors, junk] = counts;
    let cfg = reid_data::SynthConfig {
        cameras: 2,
        train_ids,
        train_images,
        test_ids,
        query_images,
        gallery_images,
        distractors,
        junk,
        ..reid_data::SynthConfig::demo(0)
    };
    reid_data::synth::tiny_indexed_dataset(&cfg, dir).expect("the tiny dataset renders and indexes");
}
