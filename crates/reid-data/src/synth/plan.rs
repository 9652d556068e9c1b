//! Planning a synthetic dataset: which identities go to which split, how many
//! images each has under which camera, and every file's name in the chosen
//! layout.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reid_io::seed::mix;

use super::SynthConfig;
use crate::manifest::Split;
use crate::synth_layout::{Namer, SynthLayout, MSMT17_TRAIN_LIST, MSMT17_VAL_LIST};

/// What kind of picture an image file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Subject {
    /// An identity's person (train, query, gallery).
    Identity(usize),
    /// A one-off person (a distractor, pid 0).
    Stranger,
    /// A bad detection (junk, pid -1): background and a sliver of someone.
    Junk,
}

/// One file to render.
#[derive(Debug, Clone)]
pub(super) struct ImageSpec {
    pub(super) relative_path: String,
    pub(super) subject: Subject,
    pub(super) camera: usize,
    /// MSMT17's (list file, line).
    pub(super) listed: Option<(&'static str, String)>,
}

/// Splits `total` into `n` counts, each between `min` and `max`, at random.
pub(super) fn spread<R: Rng>(rng: &mut R, n: usize, total: usize, min: usize, max: usize) -> Vec<usize> {
    let mut counts = vec![min; n];
    let mut left = total - min * n;
    let mut open: Vec<usize> = (0..n).collect();
    while left > 0 {
        let k = rng.gen_range(0..open.len());
        let i = open[k];
        counts[i] += 1;
        left -= 1;
        if counts[i] == max {
            open.swap_remove(k);
        }
    }
    counts
}

/// The file names of the dataset, in a fixed order, and what each one shows.
pub(super) fn plan(cfg: &SynthConfig) -> (Vec<ImageSpec>, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, 1, 0));
    let total_ids = cfg.train_ids + cfg.test_ids;
    let mut pids: Vec<i64> = (1..=total_ids as i64).collect();
    pids.shuffle(&mut rng);
    let (mut train, mut test) = (pids[..cfg.train_ids].to_vec(), pids[cfg.train_ids..].to_vec());
    train.sort_unstable();
    test.sort_unstable();
    if cfg.layout == SynthLayout::Msmt17 {
        // MSMT17 numbers train and test identities from 0, each on its own.
        train = (0..cfg.train_ids as i64).collect();
        test = (0..cfg.test_ids as i64).collect();
    }
    let mut namer = Namer::new(cfg.layout, cfg.cameras);
    let mut specs = Vec::with_capacity(cfg.total_images());
    let mut add = |rng: &mut ChaCha8Rng, split: Split, pid: i64, camera: usize, subject: Subject| {
        let placed = namer.place(rng, split, pid, camera);
        specs.push(ImageSpec {
            relative_path: placed.relative_path,
            subject,
            camera,
            listed: placed.listed,
        });
    };

    // Person index: train identities first, then test identities.
    let train_counts = spread(&mut rng, cfg.train_ids, cfg.train_images, 2, usize::MAX);
    for (i, (&pid, &count)) in train.iter().zip(&train_counts).enumerate() {
        let mut cams: Vec<usize> = (0..cfg.cameras).collect();
        cams.shuffle(&mut rng);
        let seen = &cams[..rng.gen_range(2..=cfg.cameras)];
        for k in 0..count {
            let camera = if k < seen.len() {
                seen[k]
            } else {
                seen[rng.gen_range(0..seen.len())]
            };
            add(&mut rng, Split::Train, pid, camera, Subject::Identity(i));
        }
    }
    let camera_counts = spread(&mut rng, cfg.test_ids, cfg.query_images, 2, cfg.cameras);
    let gallery_counts = {
        // At least one gallery image per (identity, camera); the rest at random.
        let extra = spread(
            &mut rng,
            cfg.test_ids,
            cfg.gallery_images - cfg.query_images,
            0,
            usize::MAX,
        );
        camera_counts.iter().zip(extra).map(|(c, e)| c + e).collect::<Vec<_>>()
    };
    for (j, &pid) in test.iter().enumerate() {
        let person = Subject::Identity(cfg.train_ids + j);
        let mut cams: Vec<usize> = (0..cfg.cameras).collect();
        cams.shuffle(&mut rng);
        let seen = cams[..camera_counts[j]].to_vec();
        for &camera in &seen {
            add(&mut rng, Split::Query, pid, camera, person);
        }
        for k in 0..gallery_counts[j] {
            let camera = if k < seen.len() {
                seen[k]
            } else {
                seen[rng.gen_range(0..seen.len())]
            };
            add(&mut rng, Split::Gallery, pid, camera, person);
        }
    }
    for (count, pid, subject) in [(cfg.distractors, 0, Subject::Stranger), (cfg.junk, -1, Subject::Junk)] {
        for _ in 0..count {
            let camera = rng.gen_range(0..cfg.cameras);
            add(&mut rng, Split::Gallery, pid, camera, subject);
        }
    }
    move_to_val(cfg, &mut specs);
    (specs, total_ids)
}

/// MSMT17: moves [`SynthConfig::val_images`] train images, never an identity's
/// first, from the train list to the val list (so list_train alone still holds
/// every train identity).
pub(super) fn move_to_val(cfg: &SynthConfig, specs: &mut [ImageSpec]) {
    let mut seen = std::collections::HashSet::new();
    let mut candidates: Vec<usize> = (0..specs.len())
        .filter(|&i| match (&specs[i].listed, specs[i].subject) {
            (Some((MSMT17_TRAIN_LIST, _)), Subject::Identity(p)) => !seen.insert(p),
            _ => false,
        })
        .collect();
    candidates.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(cfg.seed, 5, 0)));
    for &i in candidates.iter().take(cfg.val_images()) {
        if let Some((list, _)) = &mut specs[i].listed {
            *list = MSMT17_VAL_LIST;
        }
    }
}
