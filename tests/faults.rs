//! Failure as a first-class output: `reid train` killed with SIGKILL mid-epoch and
//! inside a checkpoint save, or stopped by SIGINT and SIGTERM, resumes to the
//! bytes of an uninterrupted run; a second process is refused a run folder that
//! is in use; a diverging recipe and bad settings fail with their cause and write
//! nothing non-finite; `--resume` applies the changes it may make and refuses the
//! rest.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{ok, reid, tiny_dataset};

const SETTINGS: [&str; 11] = [
    "model.pretrained=",
    "model.arch=res2net_tiny",
    "data.height=64",
    "data.width=32",
    "data.batch_size=4",
    "schedule.epochs=3",
    "schedule.warmup_epochs=1",
    "optim.lr=0.005",
    "run.checkpoint_every=1",
    "run.log_every=3",
    "run.seed=5",
];

/// A small synthetic dataset and its manifest, in `dir`.
fn dataset(dir: &Path) {
    tiny_dataset(dir, [8, 80, 2, 4, 4, 0, 0]);
}

fn train_args(out: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--manifest", "m.parquet", "--out", out]
        .map(String::from)
        .to_vec();
    for s in SETTINGS {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_reid"))
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("reid starts")
}

/// Whether a save is under way: a temporary file or a pending state in `ckpt`.
fn saving(ckpt: &Path) -> bool {
    std::fs::read_dir(ckpt).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.contains(".tmp-") || name.contains("state.next")
        })
    })
}

/// When to kill a run.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    /// A few milliseconds after the first trainer state exists: mid-epoch.
    MidEpoch,
    /// The moment a save is seen under way.
    InsideSave,
}

/// Runs training in `run`, killing it with SIGKILL at `trigger` up to `kills`
/// times and resuming after each; returns how many kills landed.
fn run_with_kills(dir: &Path, run: &str, trigger: Trigger, kills: usize) -> usize {
    let ckpt = dir.join(run).join("checkpoints");
    let mut landed = 0;
    let mut child = spawn(dir, &train_args(run, &[]));
    loop {
        let started = Instant::now();
        let mut killed = false;
        while child.try_wait().unwrap().is_none() && landed < kills {
            let due = match trigger {
                Trigger::MidEpoch => {
                    ckpt.join("last.state.safetensors").exists() && started.elapsed() > Duration::from_millis(40)
                }
                Trigger::InsideSave => saving(&ckpt),
            };
            if due {
                child.kill().unwrap();
                killed = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let status = child.wait().unwrap();
        if !killed {
            assert!(status.success(), "{trigger:?}: training failed");
            return landed;
        }
        landed += 1;
        let args = if ckpt.join("last.safetensors").exists() {
            vec!["train".to_string(), "--resume".to_string(), run.to_string()]
        } else {
            // Killed before the first checkpoint: nothing to resume, start anew.
            std::fs::remove_dir_all(dir.join(run)).unwrap();
            train_args(run, &[])
        };
        child = spawn(dir, &args);
    }
}

fn bytes(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn killed_runs_resume_to_the_bytes_of_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    ok(&reid(
        &train_args("straight", &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        dir.path(),
    ));
    let reference = bytes(dir.path().join("straight/checkpoints/last.safetensors"));
    let mut landed = 0;
    for (trigger, run) in [(Trigger::MidEpoch, "mid"), (Trigger::InsideSave, "save")] {
        landed += run_with_kills(dir.path(), run, trigger, 3);
        let ckpt = dir.path().join(run).join("checkpoints");
        assert!(
            bytes(ckpt.join("last.safetensors")) == reference,
            "{trigger:?}: not bit-identical"
        );
        for epoch in 1..=3 {
            let name = format!("epoch-{epoch:04}.safetensors");
            assert!(
                bytes(ckpt.join(&name)) == bytes(dir.path().join("straight/checkpoints").join(&name)),
                "{trigger:?}: {name}"
            );
        }
        assert!(!saving(&ckpt), "{trigger:?}: a temporary file was left behind");
        let log = std::fs::read_to_string(dir.path().join(run).join("metrics.csv")).unwrap();
        let straight = std::fs::read_to_string(dir.path().join("straight/metrics.csv")).unwrap();
        assert_eq!(
            log.lines().count(),
            straight.lines().count(),
            "{trigger:?}: the log has each row once"
        );
    }
    assert!(landed >= 2, "only {landed} kills landed");

    a_second_process_is_refused_the_run_folder(dir.path(), &reference);
    signals_stop_a_run_that_resumes_to_the_same_bytes(dir.path(), &reference);
}

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            out.extend(snapshot(&entry.path()));
        } else {
            out.push((entry.path(), meta.len(), meta.modified().unwrap()));
        }
    }
    out.sort();
    out
}

/// A `reid train --out` into a folder that a running training holds exits with
/// 75, names the folder and the holder's pid, and changes nothing; the holder
/// then finishes with the bytes of an uninterrupted run.
fn a_second_process_is_refused_the_run_folder(dir: &Path, reference: &[u8]) {
    let mut first = spawn(dir, &train_args("held", &[]));
    let run = dir.join("held");
    while !run.join("checkpoints").exists() && first.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run ended before the second started"
    );
    let before = snapshot(&run);
    let args = train_args("held", &[]);
    let second = reid(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir);
    let held = first.try_wait().unwrap().is_none();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("held") && stderr.contains(&first.id().to_string()),
        "{stderr}"
    );
    if held {
        let after: Vec<_> = snapshot(&run)
            .into_iter()
            .filter(|f| before.iter().any(|b| b.0 == f.0))
            .collect();
        assert_eq!(before, after, "the refused process changed the run folder");
    }
    let resume = reid(&["train", "--resume", "held"], dir);
    if first.try_wait().unwrap().is_none() {
        assert_eq!(resume.status.code(), Some(75), "--resume is refused too");
    }
    assert!(first.wait().unwrap().success(), "the first run finishes");
    assert!(
        bytes(run.join("checkpoints/last.safetensors")) == reference,
        "the first run is intact"
    );
}

/// Sends `signal` to `child` once the run's first checkpoint exists; returns the
/// exit status.
fn stop_with(dir: &Path, mut child: Child, run: &str, epoch: usize, signal: i32) -> Option<i32> {
    let ckpt = dir.join(run).join(format!("checkpoints/epoch-{epoch:04}.safetensors"));
    while !ckpt.exists() && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: kill(2) on a child process this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    child.wait().unwrap().code()
}

/// SIGTERM, then SIGINT: each stops the run at a step boundary with 143 and
/// 130, and resuming after each ends with the bytes of an uninterrupted run.
fn signals_stop_a_run_that_resumes_to_the_same_bytes(dir: &Path, reference: &[u8]) {
    let code = stop_with(
        dir,
        spawn(dir, &train_args("signalled", &[])),
        "signalled",
        1,
        libc::SIGTERM,
    );
    assert_eq!(code, Some(143), "SIGTERM");
    let resume = ["train", "--resume", "signalled"].map(String::from);
    let code = stop_with(dir, spawn(dir, &resume), "signalled", 2, libc::SIGINT);
    assert_eq!(code, Some(130), "SIGINT");
    let last = dir.join("signalled/checkpoints/last.safetensors");
    assert!(bytes(last.clone()) != reference, "the run stopped before its end");
    ok(&reid(&["train", "--resume", "signalled"], dir));
    assert!(bytes(last) == reference, "resumed after the signals: not bit-identical");
}

#[test]
fn a_diverging_recipe_fails_with_its_cause_and_saves_nothing_non_finite() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let args = train_args("div", &["--set", "optim.lr=50000", "--set", "schedule.warmup_epochs=0"]);
    let out = reid(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a diverged run must fail");
    assert!(stderr.contains("diverged") && stderr.contains("optim.lr"), "{stderr}");
    for entry in std::fs::read_dir(dir.path().join("div/checkpoints")).unwrap() {
        let path = entry.unwrap().path();
        for (name, t) in reid_model::weights::read_safetensors(&path).unwrap() {
            let v: Vec<f32> = t
                .flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}: {name}", path.display());
        }
    }
}

#[test]
fn bad_settings_fail_at_load_time_and_resume_refuses_what_it_cannot_keep_exact() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    for (set, want) in [
        (
            "augment.scale_jitter=1.5",
            "augment.scale_jitter = 1.5 (from --set augment.scale_jitter=1.5)",
        ),
        ("augment.erase_area=[0.5,0.1]", "augment.erase_area = [0.5, 0.1]"),
        ("optim.lr=-1", "optim.lr = -1"),
    ] {
        let out = reid(
            &train_args("bad", &["--set", set])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            dir.path(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{set}: {stderr}");
        assert!(!dir.path().join("bad").exists(), "{set}: nothing is written");
    }
    let args = train_args("run", &["--max-steps", "3"]);
    ok(&reid(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir.path()));
    let out = reid(&["train", "--resume", "run", "--set", "optim.lr=0.01"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("optim.lr: 0.005 -> 0.01"),
        "{stderr}"
    );
    let stdout = ok(&reid(
        &["train", "--resume", "run", "--set", "schedule.epochs=1"],
        dir.path(),
    ));
    assert!(stdout.contains("schedule.epochs: 3 -> 1"), "{stdout}");
    let config = std::fs::read_to_string(dir.path().join("run/config.toml")).unwrap();
    assert!(config.contains("epochs = 1"), "{config}");
}

#[test]
fn selftest_on_a_partial_fixture_folder_names_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/res2net_tiny");
    let partial = dir.path().join("fixtures/res2net_tiny");
    std::fs::create_dir_all(&partial).unwrap();
    for file in ["meta.json", "model.safetensors", "input.safetensors"] {
        std::fs::copy(fixtures.join(file), partial.join(file)).unwrap();
    }
    let out = reid(&["selftest", "--fixtures", "fixtures"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("res2net_tiny/expected.safetensors") && stderr.contains("missing"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
