#![allow(clippy::disallowed_methods)] // tests read and build tensors freely
//! A run that is interrupted and resumed ends with exactly the weights of an
//! uninterrupted run, and the loss falls on a small synthetic dataset.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use reid_data::synth::{tiny_indexed_dataset, SynthConfig};
use reid_train::{Outcome, TrainConfig, TrainData, Trainer};

fn data(dir: &Path) -> TrainData {
    let cfg = SynthConfig {
        seed: 2,
        cameras: 2,
        train_ids: 4,
        train_images: 24,
        test_ids: 2,
        query_images: 4,
        gallery_images: 4,
        distractors: 0,
        junk: 0,
        height: 64,
        width: 32,
        layout: Default::default(),
    };
    let report = tiny_indexed_dataset(&cfg, dir).unwrap();
    TrainData::from_manifest(&report.manifest, "manifest-sha".into()).unwrap()
}

fn config() -> TrainConfig {
    config_with(&[])
}

/// [`config`] with `extra` overrides after its own.
fn config_with(extra: &[&str]) -> TrainConfig {
    let base = [
        "model.arch=res2net_tiny",
        "model.dropout=0.5",
        "data.height=64",
        "data.width=32",
        "data.batch_size=4",
        "optim.lr=0.05",
        "schedule.epochs=2",
        "schedule.warmup_epochs=1",
        "run.log_every=2",
        "run.checkpoint_every=1",
        "run.seed=11",
    ];
    let all: Vec<String> = base.iter().chain(extra).map(|s| s.to_string()).collect();
    TrainConfig::load(None, &all).unwrap()
}

fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = reid_model::weights::read_safetensors(path)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let stop = Arc::new(AtomicBool::new(false));

    let straight = dir.path().join("straight");
    let mut t = Trainer::new(config(), &straight, data.clone(), stop.clone()).unwrap();
    let mut losses = Vec::new();
    assert_eq!(
        t.run(
            &mut |e| if let reid_train::Event::Step { stats, .. } = e {
                losses.push(stats.loss)
            },
            None
        )
        .unwrap(),
        Outcome::Finished
    );
    assert_eq!(losses.len(), 12);

    let cut = dir.path().join("cut");
    let mut t = Trainer::new(config(), &cut, data.clone(), stop.clone()).unwrap();
    t.max_steps = Some(4);
    assert_eq!(t.run(&mut |_| {}, None).unwrap(), Outcome::Interrupted);
    drop(t);
    assert!(
        Trainer::new(config(), &cut, data.clone(), stop.clone()).is_err(),
        "a run folder is not reused"
    );
    let mut t = Trainer::resume(&cut, config(), data.clone(), stop.clone()).unwrap();
    t.max_steps = Some(9);
    assert_eq!(t.run(&mut |_| {}, None).unwrap(), Outcome::Interrupted);
    drop(t); // the run folder has one owner at a time
    let mut t = Trainer::resume(&cut, config(), data.clone(), stop.clone()).unwrap();
    assert_eq!(t.position.step, 9);
    assert_eq!(t.run(&mut |_| {}, None).unwrap(), Outcome::Finished);

    let a = weights(&straight.join("checkpoints/last.safetensors"));
    let b = weights(&cut.join("checkpoints/last.safetensors"));
    assert_eq!(a.len(), b.len());
    assert!(a == b, "resumed weights differ from uninterrupted ones");
    assert!(straight.join("checkpoints/epoch-0002.safetensors").is_file());
    let csv = std::fs::read_to_string(straight.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("kind,epoch,step,lr,"));
    assert_eq!(csv.lines().filter(|l| l.starts_with("epoch,")).count(), 2);
    let info = reid_model::checkpoint::read_info(&straight.join("checkpoints/last.safetensors")).unwrap();
    assert_eq!(
        (info.model.num_classes, info.input.height, info.input.width),
        (4, 64, 32)
    );
    // The resumed run's log has each row once, as the uninterrupted one.
    let resumed = std::fs::read_to_string(cut.join("metrics.csv")).unwrap();
    let steps = |csv: &str| {
        csv.lines()
            .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&resumed), steps(&csv));
    // Identical runs give identical bytes.
    let bytes = |run: &Path| std::fs::read(run.join("checkpoints/last.safetensors")).unwrap();
    assert_eq!(bytes(&straight), bytes(&cut));

    // Another manifest is refused on resume.
    drop(t);
    let mut other = data;
    other.manifest_sha256 = "another".into();
    let err = Trainer::resume(&cut, config(), other, stop).err().unwrap().to_string();
    assert!(err.contains("manifest is not the one"), "{err}");
}

#[test]
fn a_stop_at_an_epochs_last_batch_ends_the_epoch_first() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let run = dir.path().join("run");
    let mut t = Trainer::new(config(), &run, data.clone(), stop.clone()).unwrap();
    t.max_steps = Some(6);
    assert_eq!(t.run(&mut |_| {}, None).unwrap(), Outcome::Interrupted);
    assert_eq!((t.position.epoch, t.position.batch), (1, 0));
    drop(t); // the run folder has one owner at a time
    let mut t = Trainer::resume(&run, config(), data, stop).unwrap();
    assert_eq!(t.run(&mut |_| {}, None).unwrap(), Outcome::Finished);
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().filter(|l| l.starts_with("epoch,")).count(), 2);
}

#[test]
fn the_best_validation_survives_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let mut cfg = config();
    cfg.run.eval_every = 1;
    cfg.schedule.epochs = 3;
    let run = dir.path().join("run");
    // Validation scores fall after the first epoch: `best` must stay at epoch 1.
    let scores = std::cell::RefCell::new(vec![0.5, 0.4, 0.3].into_iter());
    let mut validate = |_: &reid_model::ReidModel| Ok((scores.borrow_mut().next().unwrap(), 0.1));
    let mut t = Trainer::new(cfg.clone(), &run, data.clone(), stop.clone()).unwrap();
    t.max_steps = Some(7);
    assert_eq!(t.run(&mut |_| {}, Some(&mut validate)).unwrap(), Outcome::Interrupted);
    let best_bytes = std::fs::read(run.join("checkpoints/best.safetensors")).unwrap();
    drop(t); // the run folder has one owner at a time
    let mut t = Trainer::resume(&run, cfg, data, stop).unwrap();
    assert_eq!(t.best.unwrap().epoch, 1);
    assert_eq!(t.run(&mut |_| {}, Some(&mut validate)).unwrap(), Outcome::Finished);
    assert_eq!(t.best.unwrap().rank1, 0.5);
    assert_eq!(
        std::fs::read(run.join("checkpoints/best.safetensors")).unwrap(),
        best_bytes
    );
}

#[test]
fn a_pk_run_with_triplet_and_gradient_norms_resumes_mid_epoch_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let pk = || {
        config_with(&[
            "data.sampler=\"pk\"",
            "data.p=2",
            "data.k=3",
            "loss.triplet=1.0",
            "loss.triplet_margin=\"soft\"",
            "run.log_grad_norms=true",
            "run.log_every=1",
            "schedule.epochs=3",
        ])
    };
    let straight = dir.path().join("straight");
    let mut t = Trainer::new(pk(), &straight, data.clone(), stop.clone()).unwrap();
    let mut triplets = Vec::new();
    t.run(
        &mut |e| {
            if let reid_train::Event::Step { stats, .. } = e {
                triplets.push(stats.loss_triplet);
            }
        },
        None,
    )
    .unwrap();
    // 4 identities, 2 per batch: 2 batches an epoch.
    assert_eq!(triplets.len(), 6);
    assert!(triplets.iter().all(|t| t.is_finite() && *t > 0.0), "{triplets:?}");

    let cut = dir.path().join("cut");
    let mut t = Trainer::new(pk(), &cut, data.clone(), stop.clone()).unwrap();
    t.max_steps = Some(3);
    assert_eq!(t.run(&mut |_| {}, None).unwrap(), Outcome::Interrupted);
    drop(t); // the run folder has one owner at a time
    let mut t = Trainer::resume(&cut, pk(), data, stop).unwrap();
    assert_eq!((t.position.epoch, t.position.batch), (1, 1), "mid-epoch");
    assert_eq!(t.run(&mut |_| {}, None).unwrap(), Outcome::Finished);
    let bytes = |run: &Path| std::fs::read(run.join("checkpoints/last.safetensors")).unwrap();
    assert_eq!(bytes(&straight), bytes(&cut));

    let csv = std::fs::read_to_string(straight.join("metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    for row in csv.lines().filter(|l| l.starts_with("step,")) {
        let f: Vec<&str> = row.split(',').collect();
        let norm = |name: &str| f[col(name)].parse::<f64>().unwrap();
        let (id1, verif, triplet, total) = (
            norm("gnorm_id1"),
            norm("gnorm_verif"),
            norm("gnorm_triplet"),
            norm("gnorm_total"),
        );
        assert!(id1 > 0.0 && verif > 0.0 && triplet > 0.0, "{row}");
        // The update's gradient is the sum of the terms': its norm is at most theirs.
        assert!(total <= id1 + norm("gnorm_id2") + verif + triplet + 1e-9, "{row}");
    }
}
