//! Learning-rate schedules: warm-up, then step decay (the paper's) or cosine.

use serde::{Deserialize, Serialize};

/// How the learning rate falls after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// x `gamma` every `step_size` epochs.
    Step,
    /// Half a cosine from the base rate to zero over the epochs after warm-up.
    Cosine,
}

/// Schedule settings (`[schedule]` in a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub epochs: usize,
    pub warmup_epochs: usize,
    /// Learning-rate factor during warm-up.
    pub warmup_factor: f64,
    pub decay: Decay,
    pub step_size: usize,
    pub gamma: f64,
}

impl Default for ScheduleConfig {
    /// The paper's: 256 epochs, 5 warm-up epochs at 0.1x, then x0.1 every 40.
    fn default() -> Self {
        ScheduleConfig {
            epochs: 256,
            warmup_epochs: 5,
            warmup_factor: 0.1,
            decay: Decay::Step,
            step_size: 40,
            gamma: 0.1,
        }
    }
}

impl ScheduleConfig {
    /// The factor applied to the base learning rate during `epoch` (0-based).
    pub fn factor(&self, epoch: usize) -> f64 {
        if epoch < self.warmup_epochs {
            return self.warmup_factor;
        }
        match self.decay {
            Decay::Step => self.gamma.powi((epoch / self.step_size.max(1)) as i32),
            Decay::Cosine => {
                let span = self.epochs.saturating_sub(self.warmup_epochs).max(1) as f64;
                let t = (epoch - self.warmup_epochs) as f64 / span;
                0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_papers_schedule() {
        let s = ScheduleConfig::default();
        let f: Vec<f64> = [0, 4, 5, 39, 40, 79, 80, 255].iter().map(|&e| s.factor(e)).collect();
        let want = [0.1, 0.1, 1.0, 1.0, 0.1, 0.1, 0.01, 0.1f64.powi(6)];
        for (a, b) in f.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{f:?}");
        }
    }

    #[test]
    fn cosine_falls_from_one_to_zero_after_warm_up() {
        let s = ScheduleConfig {
            epochs: 15,
            warmup_epochs: 5,
            decay: Decay::Cosine,
            ..ScheduleConfig::default()
        };
        assert_eq!(s.factor(2), 0.1);
        assert!((s.factor(5) - 1.0).abs() < 1e-12);
        assert!((s.factor(10) - 0.5).abs() < 1e-12);
        assert!(s.factor(14) < s.factor(13));
    }
}
