//! `RUN/metrics.csv`, a training run's log: its columns, how a row is written,
//! which rows a resumed run keeps, and how the file is read back. `reid train`
//! writes it (`reid_train::log`); `reid evaluate` reads it for the training
//! curves.

use std::path::Path;

use crate::error::{DataError, Result};

/// The columns of `metrics.csv`. The `gnorm_*` columns hold the backbone
/// gradient norm of each weighted term on the row's last step (with
/// `run.log_grad_norms`; empty otherwise and on epoch rows).
pub const HEADER: &str = "kind,epoch,step,lr,loss_id1,loss_id2,loss_verif,loss_triplet,loss,id_acc,verif_acc,images_per_s,rank1,mAP,gnorm_id1,gnorm_id2,gnorm_verif,gnorm_triplet,gnorm_total";

/// The losses of a row, as named by the columns.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Losses {
    pub id1: f64,
    pub id2: f64,
    pub verif: f64,
    /// The triplet term (0 in logs written before it existed).
    pub triplet: f64,
    pub total: f64,
}

/// One row: a window of `run.log_every` steps (`kind` "step") or an epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    pub kind: String,
    pub epoch: usize,
    pub step: u64,
    pub lr: f64,
    pub losses: Losses,
    pub id_acc: f64,
    pub verif_acc: f64,
    pub images_per_s: f64,
    /// Validation (rank-1, mAP), on the epochs that ran it.
    pub validation: Option<(f64, f64)>,
    /// Backbone gradient norms of (id1, id2, verif, triplet, total), when logged.
    pub grad_norms: Option<[f64; 5]>,
}

impl MetricsRow {
    /// The row as a line of the file (no newline), in [`HEADER`]'s order.
    pub fn to_line(&self) -> String {
        let l = &self.losses;
        let mut row = format!(
            "{},{},{},{:.6e},{:.6},{:.6},{:.6},{:.6},{:.6},{:.4},{:.4},{:.1}",
            self.kind,
            self.epoch,
            self.step,
            self.lr,
            l.id1,
            l.id2,
            l.verif,
            l.triplet,
            l.total,
            self.id_acc,
            self.verif_acc,
            self.images_per_s
        );
        match self.validation {
            Some((r1, map)) => row.push_str(&format!(",{r1:.4},{map:.4}")),
            None => row.push_str(",,"),
        }
        match self.grad_norms {
            Some(g) => row.push_str(&format!(
                ",{:.6e},{:.6e},{:.6e},{:.6e},{:.6e}",
                g[0], g[1], g[2], g[3], g[4]
            )),
            None => row.push_str(",,,,,"),
        }
        row
    }
}

/// The file's text cut back to the rows of steps up to `step`, header first: what
/// a run resumed at `step` keeps (a row cut off by a crash is dropped too).
pub fn rows_up_to(text: &str, step: u64) -> String {
    let columns = HEADER.split(',').count();
    let mut out = format!("{HEADER}\n");
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

/// Reads a run's `metrics.csv`. Logs of earlier versions, without the triplet
/// or gradient-norm columns, read with those empty; a row without its losses
/// (cut off by a crash) is skipped.
pub fn read(path: &Path) -> Result<Vec<MetricsRow>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| DataError::invalid(path, e.to_string()))?;
    let header = reader
        .headers()
        .map_err(|e| DataError::invalid(path, e.to_string()))?
        .clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let need = |name: &str| {
        col(name).ok_or_else(|| {
            DataError::invalid(
                path,
                format!("no '{name}' column; expected a metrics.csv from `reid train`"),
            )
        })
    };
    let [id1, id2, verif, total] = [need("loss_id1")?, need("loss_id2")?, need("loss_verif")?, need("loss")?];
    let [kind, epoch, step, id_acc, verif_acc] = [
        need("kind")?,
        need("epoch")?,
        need("step")?,
        need("id_acc")?,
        need("verif_acc")?,
    ];
    let optional = ["lr", "loss_triplet", "images_per_s", "rank1", "mAP"].map(col);
    let norms = ["gnorm_id1", "gnorm_id2", "gnorm_verif", "gnorm_triplet", "gnorm_total"].map(col);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| DataError::invalid(path, e.to_string()))?;
        let num = |i: usize| record.get(i).and_then(|v| v.parse::<f64>().ok());
        let (Some(id1), Some(id2), Some(verif), Some(total)) = (num(id1), num(id2), num(verif), num(total)) else {
            continue;
        };
        let [lr, triplet, ips, rank1, map] = optional.map(|c| c.and_then(num));
        let grad_norms = norms.map(|c| c.and_then(num));
        rows.push(MetricsRow {
            kind: record.get(kind).unwrap_or_default().to_string(),
            epoch: num(epoch).unwrap_or(0.0) as usize,
            step: num(step).unwrap_or(0.0) as u64,
            lr: lr.unwrap_or(f64::NAN),
            losses: Losses {
                id1,
                id2,
                verif,
                triplet: triplet.unwrap_or(0.0),
                total,
            },
            id_acc: num(id_acc).unwrap_or(f64::NAN),
            verif_acc: num(verif_acc).unwrap_or(f64::NAN),
            images_per_s: ips.unwrap_or(f64::NAN),
            validation: rank1.map(|r1| (r1, map.unwrap_or(f64::NAN))),
            grad_norms: grad_norms
                .iter()
                .all(Option::is_some)
                .then(|| grad_norms.map(Option::unwrap_or_default)),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, epoch: usize, step: u64) -> MetricsRow {
        MetricsRow {
            kind: kind.into(),
            epoch,
            step,
            lr: 0.005,
            losses: Losses {
                id1: 4.0,
                id2: 4.25,
                verif: 0.5,
                triplet: 0.0,
                total: 4.625,
            },
            id_acc: 0.25,
            verif_acc: 0.5,
            images_per_s: 100.0,
            validation: (kind == "epoch").then_some((0.5, 0.25)),
            grad_norms: (kind == "step").then_some([3.0, 4.0, 2.0, 1.0, 6.5]),
        }
    }

    #[test]
    fn rows_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let rows = [row("step", 0, 10), row("epoch", 0, 20)];
        let text: String = std::iter::once(HEADER.to_string())
            .chain(rows.iter().map(MetricsRow::to_line))
            .map(|l| l + "\n")
            .collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(read(&path).unwrap(), rows);
    }

    #[test]
    fn an_older_log_reads_with_the_new_columns_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        std::fs::write(
            &path,
            "kind,epoch,step,lr,loss_id1,loss_id2,loss_verif,loss,id_acc,verif_acc,images_per_s,rank1,mAP\n\
             step,0,10,0.005,4.0,4.2,0.7,4.8,0.01,0.5,100.0,,\n\
             epoch,0,20,0.005,3.0,3.2,0.6,3.7,0.1,0.6,100.0,0.5,0.3\n\
             step,1,30,0.005,3.0",
        )
        .unwrap();
        let log = read(&path).unwrap();
        assert_eq!(log.len(), 2, "the cut-off row is skipped");
        assert_eq!((log[0].step, log[0].losses.triplet, log[0].grad_norms), (10, 0.0, None));
        assert_eq!(log[1].validation, Some((0.5, 0.3)));
        std::fs::write(&path, "kind,epoch,step\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("no 'loss_id1' column"));
    }

    #[test]
    fn rows_after_the_resumed_step_and_cut_rows_are_dropped() {
        let lines: Vec<String> = [
            row("step", 0, 2),
            row("step", 0, 4),
            row("epoch", 0, 4),
            row("step", 1, 6),
        ]
        .iter()
        .map(MetricsRow::to_line)
        .collect();
        let text = format!("{HEADER}\n{}\nstep,1,8,1,1", lines.join("\n"));
        let kept = rows_up_to(&text, 4);
        assert_eq!(kept.lines().count(), 4, "{kept}");
        assert!(!kept.contains("step,1,6"));
        assert_eq!(rows_up_to("", 0), format!("{HEADER}\n"));
    }
}
