//! The training contract: what a model offers to be trained — the loss and the gradients of
//! one batch — and the loss statistics it reports. It lives with the models (a model knows
//! its own loss) so that `train/`, which knows optimizers, schedules and the loop, imports
//! the models and never the other way round.

use rand::Rng;

use crate::error::Result;
use crate::kernels::Float;
use crate::params::Params;

/// The loss of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// The mean loss per counted token (or example).
    pub loss: f64,
    /// How many tokens (or examples) counted.
    pub tokens: usize,
    /// How many of them were predicted right (0 for regression).
    pub correct: usize,
}

impl LossStats {
    /// The fraction predicted right.
    pub fn accuracy(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.correct as f64 / self.tokens as f64
        }
    }

    /// Token-weighted combination of two batches' statistics.
    pub fn merge(self, other: LossStats) -> LossStats {
        let tokens = self.tokens + other.tokens;
        let loss = if tokens == 0 {
            0.0
        } else {
            (self.loss * self.tokens as f64 + other.loss * other.tokens as f64) / tokens as f64
        };
        LossStats {
            loss,
            tokens,
            correct: self.correct + other.correct,
        }
    }
}

/// A model that can be trained: forward, loss and backward on one batch.
///
/// The float type is part of the model's type (`EncoderDecoder` is `EncoderDecoder<f32>`),
/// so a [`Trainer`](crate::train::Trainer) or a checkpoint loader needs to be told only the model type.
pub trait Trainable: Params<<Self as Trainable>::Float> + Clone {
    /// The element type of the parameters, `f32` or `f64`.
    type Float: Float;

    /// What one training batch holds (inputs and targets).
    type Batch;

    /// The number of tokens (or examples) the batch's loss is averaged over.
    fn batch_tokens(batch: &Self::Batch) -> usize;

    /// FLOPs of a training step over `batch` by the FLOP model of [`Cost`](super::Cost)
    /// (`train_flops`), which decides whether a step is worth a second thread
    /// ([`with_team_for`](crate::kernels::parallel::with_team_for)). The default, `u64::MAX`,
    /// says the work is not known: every step then runs on the whole team.
    fn train_flops(&self, batch: &Self::Batch) -> u64 {
        let _ = batch;
        u64::MAX
    }

    /// Runs the batch in training mode and adds `weight · ∂loss/∂θ` into `grads`, where the
    /// loss is the batch's mean with label smoothing `smoothing` (ignored by losses it does
    /// not apply to).
    ///
    /// # Errors
    /// The model's input errors: token ids out of range, mismatched batches, too long.
    fn accumulate<R: Rng>(
        &self,
        batch: &Self::Batch,
        smoothing: f64,
        weight: f64,
        grads: &mut Self,
        rng: &mut R,
    ) -> Result<LossStats>;
}
