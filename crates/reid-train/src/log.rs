//! `metrics.csv`: a row every `run.log_every` steps (means over the window) and
//! one per epoch. A resumed run first drops the rows written after the state it
//! resumes from (and a row cut off by a crash), so the log matches the weights.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::step::StepStats;
use crate::trainer::TrainError;

/// The columns of `metrics.csv`.
/// The `gnorm_*` columns hold the backbone gradient norm of each weighted term on
/// the row's last step (with `run.log_grad_norms`; empty otherwise and on epoch rows).
pub const CSV_HEADER: &str = "kind,epoch,step,lr,loss_id1,loss_id2,loss_verif,loss_triplet,loss,id_acc,verif_acc,images_per_s,rank1,mAP,gnorm_id1,gnorm_id2,gnorm_verif,gnorm_triplet,gnorm_total";

/// The open log with the current window of step statistics.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    window: StepStats,
    window_steps: usize,
    window_images: usize,
    window_start: Instant,
}

/// The rows of an existing log that belong to steps up to `step`, header first.
fn kept_rows(text: &str, step: u64) -> String {
    let columns = CSV_HEADER.split(',').count();
    let mut out = format!("{CSV_HEADER}\n");
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let at = fields.get(2).and_then(|s| s.parse::<u64>().ok());
        if fields.len() == columns && at.is_some_and(|s| s <= step) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
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
        reid_data::atomic::write_bytes_atomically(path, kept_rows(&existing, step).as_bytes())?;
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
        ips: f64,
        val: Option<(f64, f64)>,
    ) -> Result<(), TrainError> {
        let s = stats;
        let mut row = format!(
            "{kind},{epoch},{step},{lr:.6e},{:.6},{:.6},{:.6},{:.6},{:.6},{:.4},{:.4},{ips:.1}",
            s.loss_id1, s.loss_id2, s.loss_verif, s.loss_triplet, s.loss, s.id_accuracy, s.verif_accuracy
        );
        match val {
            Some((r1, map)) => row.push_str(&format!(",{r1:.4},{map:.4}")),
            None => row.push_str(",,"),
        }
        match s.grad_norms.filter(|_| kind == "step") {
            Some(g) => row.push_str(&format!(
                ",{:.6e},{:.6e},{:.6e},{:.6e},{:.6e}",
                g.id1, g.id2, g.verif, g.triplet, g.total
            )),
            None => row.push_str(",,,,,"),
        }
        writeln!(self.file, "{row}")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_after_the_resumed_step_and_cut_rows_are_dropped() {
        let row = |kind: &str, epoch: usize, step: u64| format!("{kind},{epoch},{step},1,1,1,1,1,1,1,1,1,,,,,,,");
        let text = format!(
            "{CSV_HEADER}\n{}\n{}\n{}\n{}\nstep,1,8,1,1",
            row("step", 0, 2),
            row("step", 0, 4),
            row("epoch", 0, 4),
            row("step", 1, 6)
        );
        let kept = kept_rows(&text, 4);
        assert_eq!(kept.lines().count(), 4, "{kept}");
        assert!(!kept.contains("step,1,6"));
        assert_eq!(kept_rows("", 0), format!("{CSV_HEADER}\n"));
    }
}
