//! Learning-rate schedules, as functions of the step number (counted from 1).
//!
//! The paper's schedule (Eq. 3, §5.3) rises linearly for `warmup` steps and then decays with
//! the inverse square root of the step:
//! `lrate = d_model^−0.5 · min(step^−0.5, step · warmup^−1.5)`, with warmup = 4000.
//! Its peak, at `step = warmup`, is `(d_model · warmup)^−0.5` (7.0e-4 for the base model).

use crate::error::{Error, Result};

/// A learning-rate schedule.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Schedule {
    /// The same rate at every step.
    Constant {
        /// The rate.
        lr: f64,
    },
    /// Eq. 3 of the paper, times `scale` (1 for the paper).
    Noam {
        /// Model width d_model.
        d_model: usize,
        /// Warm-up steps (4000 in the paper).
        warmup: u64,
        /// A factor on the whole curve.
        scale: f64,
    },
    /// Linear warm-up to `peak`, then a cosine decay to `min` at step `total` (and `min` after).
    Cosine {
        /// The rate at the end of warm-up.
        peak: f64,
        /// Warm-up steps.
        warmup: u64,
        /// The step at which the decay reaches `min`.
        total: u64,
        /// The final rate.
        min: f64,
    },
}

impl Schedule {
    /// The paper's schedule for `d_model` with `warmup` steps (Eq. 3).
    pub fn paper(d_model: usize, warmup: u64) -> Self {
        Schedule::Noam {
            d_model,
            warmup,
            scale: 1.0,
        }
    }

    /// Checks that every rate the schedule can give is finite and positive (the cosine's final
    /// rate may be 0).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn check(&self) -> Result<()> {
        let positive = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    field,
                    format!("a learning rate must be finite and positive, got {v}"),
                ))
            }
        };
        match *self {
            Schedule::Constant { lr } => positive("lr", lr),
            Schedule::Noam { d_model, scale, .. } => {
                if d_model == 0 {
                    return Err(Error::config("d_model", "must be at least 1, got 0"));
                }
                positive("scale", scale)
            }
            Schedule::Cosine { peak, min, .. } => {
                positive("peak", peak)?;
                if !(min.is_finite() && (0.0..=peak).contains(&min)) {
                    return Err(Error::config(
                        "min",
                        format!("must be finite, at least 0 and at most the peak {peak}, got {min}"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The learning rate at `step` (1 is the first step; 0 is treated as 1).
    pub fn lr(&self, step: u64) -> f64 {
        let step = step.max(1);
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::Noam {
                d_model,
                warmup,
                scale,
            } => {
                let s = step as f64;
                let w = warmup.max(1) as f64;
                scale * (d_model as f64).powf(-0.5) * s.powf(-0.5).min(s * w.powf(-1.5))
            }
            Schedule::Cosine {
                peak,
                warmup,
                total,
                min,
            } => {
                if step <= warmup {
                    peak * step as f64 / warmup.max(1) as f64
                } else if step >= total {
                    min
                } else {
                    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_schedule_peaks_at_warmup() {
        let s = Schedule::paper(512, 4000);
        let peak = (512.0_f64 * 4000.0).powf(-0.5);
        assert!((s.lr(4000) - peak).abs() < 1e-12);
        assert!(s.lr(1) < s.lr(2000) && s.lr(2000) < s.lr(4000));
        assert!(s.lr(16000) < s.lr(4000));
        // Past warm-up it is d_model^-0.5 · step^-0.5.
        assert!((s.lr(16000) - 512.0_f64.powf(-0.5) / 16000.0_f64.sqrt()).abs() < 1e-15);
    }

    #[test]
    fn rates_that_are_not_positive_are_config_errors() {
        assert!(Schedule::Constant { lr: 0.0 }.check().is_err());
        assert!(Schedule::Constant { lr: f64::NAN }.check().is_err());
        assert!(Schedule::Constant { lr: -1e-3 }.check().is_err());
        assert!(
            Schedule::Noam {
                d_model: 0,
                warmup: 10,
                scale: 1.0
            }
            .check()
            .is_err()
        );
        assert!(
            Schedule::Cosine {
                peak: 1e-3,
                warmup: 1,
                total: 10,
                min: 2e-3
            }
            .check()
            .is_err()
        );
        assert!(
            Schedule::Cosine {
                peak: 1e-3,
                warmup: 1,
                total: 10,
                min: 0.0
            }
            .check()
            .is_ok()
        );
        assert!(Schedule::paper(512, 4000).check().is_ok());
    }

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let s = Schedule::Cosine {
            peak: 1.0,
            warmup: 10,
            total: 110,
            min: 0.1,
        };
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert_eq!(s.lr(500), 0.1);
        assert_eq!(Schedule::Constant { lr: 0.3 }.lr(7), 0.3);
    }
}
