//! Writing `metrics.csv` (the format is `reid_data::metrics_csv`): a row every
//! `run.log_every` steps (means over the window) and one per epoch. A resumed run
//! first drops the rows written after the state it resumes from (and a row cut
//! off by a crash), so the log matches the weights.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use reid_data::metrics_csv::{self, Losses, MetricsRow};

use crate::step::StepStats;
use crate::trainer::TrainError;

/// The open log with the current window of step statistics.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    window: StepStats,
    window_steps: usize,
    window_images: usize,
    window_start: Instant,
}

impl MetricsLog {
    /// Opens (or creates) the log of a run that stands at `step`.
    pub fn open(path: &Path, step: u64) -> Result<Self, TrainError> {
        let io = |e| TrainError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let existing = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        reid_io::atomic::write_bytes_atomically(path, metrics_csv::rows_up_to(&existing, step).as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            window: StepStats::default(),
            window_steps: 0,
            window_images: 0,
            window_start: Instant::now(),
        })
    }

    /// Writes one row: (kind, epoch, step), the statistics, and validation if any.
    fn row(
        &mut self,
        (kind, epoch, step): (&str, usize, u64),
        stats: &StepStats,
        lr: f64,
        images_per_s: f64,
        validation: Option<(f64, f64)>,
    ) -> Result<(), TrainError> {
        let s = stats;
        let row = MetricsRow {
            kind: kind.to_string(),
            epoch,
            step,
            lr,
            losses: Losses {
                id1: s.loss_id1,
                id2: s.loss_id2,
                verif: s.loss_verif,
                triplet: s.loss_triplet,
                total: s.loss,
            },
            id_acc: s.id_accuracy,
            verif_acc: s.verif_accuracy,
            images_per_s,
            validation,
            grad_norms: s
                .grad_norms
                .filter(|_| kind == "step")
                .map(|g| [g.id1, g.id2, g.verif, g.triplet, g.total]),
        };
        writeln!(self.file, "{}", row.to_line())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::Io {
                path: self.path.clone(),
                source: e,
            })
    }

    /// Adds a step to the window; writes the window's means every `every` steps.
    pub fn step(
        &mut self,
        epoch: usize,
        step: u64,
        stats: &StepStats,
        lr: f64,
        images: usize,
        every: usize,
    ) -> Result<(), TrainError> {
        self.window.add(stats);
        self.window_steps += 1;
        self.window_images += images;
        if !step.is_multiple_of(every.max(1) as u64) {
            return Ok(());
        }
        let ips = self.window_images as f64 / self.window_start.elapsed().as_secs_f64();
        let mean = self.window.mean(self.window_steps);
        self.row(("step", epoch, step), &mean, lr, ips, None)?;
        (self.window, self.window_steps, self.window_images) = (StepStats::default(), 0, 0);
        self.window_start = Instant::now();
        Ok(())
    }

    /// Writes an epoch's row: its mean statistics, speed and validation.
    pub fn epoch(
        &mut self,
        epoch: usize,
        step: u64,
        mean: &StepStats,
        lr: f64,
        ips: f64,
        val: Option<(f64, f64)>,
    ) -> Result<(), TrainError> {
        self.row(("epoch", epoch, step), mean, lr, ips, val)
    }
}
