//! A training loop that any model can plug into: micro-batches accumulated into one
//! gradient, clipping, the learning-rate schedule and the optimizer.
//!
//! A model implements [`Trainable`] (defined beside the models, so that the models import
//! nothing from here): given a batch it runs forward, the loss and backward,
//! adding `weight · ∂loss/∂θ` into a gradient tree of its own type. The [`Trainer`] weighs
//! each micro-batch by its share of the step's tokens, so the accumulated gradient is that of
//! the per-token mean loss over all micro-batches: the same as one large batch.

use rand::Rng;

use crate::Precision;
use crate::error::Result;
use crate::kernels::Float;
use crate::kernels::gemm::weights::{WeightPacks, with_weight_packs};
use crate::kernels::workspace::{Workspace, with_workspace};
use crate::models::{LossStats, Trainable};
use crate::train::optim::{Optimizer, OptimizerConfig, OptimizerState, clip_grad_norm};
use crate::train::schedule::Schedule;

/// A parameter of `F` = `f32` with two axes, as an `f32` matrix: a weight that products use.
/// (Parameters are laid out row by row; one that is not is left to its products to pack.)
fn as_f32_matrix<F: Float>(t: ndarray::ArrayViewD<'_, F>) -> Option<ndarray::ArrayView2<'_, f32>> {
    let &[rows, cols] = t.shape() else {
        return None;
    };
    let values = F::as_f32(t.to_slice()?)?;
    ndarray::ArrayView2::from_shape((rows, cols), values).ok()
}

/// Settings of a [`Trainer`].
///
/// [`TrainerConfig::default`] is the paper's setup for the base model
/// ([`TrainerConfig::paper`]`(512, 4000)`).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TrainerConfig {
    /// The optimizer: Adam, AdamW or SGD with momentum.
    pub optimizer: OptimizerConfig,
    /// The learning rate by step.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this, if set.
    pub clip_norm: Option<f64>,
    /// Label smoothing ε (§5.4: 0.1).
    pub label_smoothing: f64,
    /// The precision of the matrix products of every step: [`Precision::F32`] (the default)
    /// or [`Precision::Bf16`] mixed precision (bf16 operands, `f32` accumulation; the
    /// parameters, the optimizer and everything else stay `f32`). See
    /// [`crate::kernels::precision`].
    #[cfg_attr(feature = "serde", serde(default))]
    pub precision: Precision,
}

impl TrainerConfig {
    /// The paper's training setup (§5.3, §5.4) for width `d_model`: Adam (0.9, 0.98, 1e-9),
    /// the schedule of Eq. 3 with `warmup` steps, label smoothing 0.1, no clipping.
    pub fn paper(d_model: usize, warmup: u64) -> Self {
        TrainerConfig {
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::paper(d_model, warmup),
            clip_norm: None,
            label_smoothing: 0.1,
            precision: Precision::F32,
        }
    }

    /// The same settings with another optimizer.
    pub fn with_optimizer(mut self, optimizer: OptimizerConfig) -> Self {
        self.optimizer = optimizer;
        self
    }

    /// The same settings with another learning-rate schedule.
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// The same settings with clipping of the global gradient norm to `max_norm` (`None`: off).
    pub fn with_clip_norm(mut self, max_norm: Option<f64>) -> Self {
        self.clip_norm = max_norm;
        self
    }

    /// The same settings with the matrix products in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The same settings with label smoothing ε.
    pub fn with_label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }

    /// Checks the settings without building anything.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the field: bad optimizer
    /// settings, a learning rate that is not finite and positive, a `clip_norm` that is not
    /// finite and positive, or a label smoothing outside [0, 1).
    pub fn check(&self) -> Result<()> {
        self.optimizer.check()?;
        self.schedule.check()?;
        if let Some(c) = self.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            // −1 would flip every gradient, 0 zero every step, NaN switch clipping off.
            return Err(crate::Error::config(
                "clip_norm",
                format!("a gradient-norm bound must be finite and positive (or None), got {c}"),
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(crate::Error::config(
                "label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            ));
        }
        Ok(())
    }
}

impl Default for TrainerConfig {
    /// The paper's setup for the base model: [`TrainerConfig::paper`]`(512, 4000)`.
    fn default() -> Self {
        TrainerConfig::paper(512, 4000)
    }
}

/// What one [`Trainer::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step's loss statistics over all its micro-batches.
    pub loss: LossStats,
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Owns a model, its gradient buffer and its optimizer, and takes training steps.
///
/// `Trainer<EncoderDecoder>` trains an `f32` model; the float type comes with the model
/// type (`Trainer<EncoderDecoder<f64>>`).
#[derive(Clone, Debug)]
pub struct Trainer<M: Trainable> {
    /// The model being trained.
    pub model: M,
    /// The optimizer state (moments, velocity, step count), for checkpoints.
    pub optimizer: OptimizerState<M::Float, M>,
    /// Its settings.
    pub cfg: TrainerConfig,
    grads: M,
    /// The memory of one step's activations, kept for the next (see
    /// [`crate::kernels::workspace`]).
    workspace: Workspace,
    /// A bf16 step's weights converted and packed once for all its micro-batches.
    packs: StepPacks,
}

/// The weights of a bf16 step of several micro-batches, converted to bf16 and packed once for
/// all of them (see [`crate::kernels::gemm`]'s `weights`), in memory kept for the next such
/// step. A step of one micro-batch does without: each of its products with a weight is then
/// the weight's only one in that layout (`X·Wᵀ` forward, `∂Y·W` backward), and packs it as it
/// goes.
#[derive(Debug, Default)]
struct StepPacks(WeightPacks);

impl Clone for StepPacks {
    /// Empty: the packings name the weights by address, and a clone's model has its own (they
    /// are made afresh at the start of every step that uses them anyway).
    fn clone(&self) -> StepPacks {
        StepPacks::default()
    }
}

impl<M: Trainable> Trainer<M> {
    /// A trainer with a fresh optimizer of the kind `cfg.optimizer` names.
    ///
    /// # Errors
    /// As [`TrainerConfig::check`].
    pub fn new(model: M, cfg: TrainerConfig) -> Result<Self> {
        cfg.check()?;
        let optimizer = cfg.optimizer.build(&model)?;
        Trainer::resume(model, optimizer, cfg)
    }

    /// A trainer that continues from saved model and optimizer state.
    ///
    /// # Errors
    /// As [`TrainerConfig::check`], and
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for an optimizer of another kind
    /// or settings than `cfg.optimizer`.
    pub fn resume(model: M, optimizer: OptimizerState<M::Float, M>, cfg: TrainerConfig) -> Result<Self> {
        cfg.check()?;
        if optimizer.config() != cfg.optimizer {
            return Err(crate::Error::config(
                "optimizer",
                format!(
                    "the optimizer state is {:?}, the settings say {:?}",
                    optimizer.config(),
                    cfg.optimizer
                ),
            ));
        }
        let grads = model.zeros_like();
        Ok(Trainer {
            model,
            optimizer,
            cfg,
            grads,
            workspace: Workspace::new(),
            packs: StepPacks::default(),
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.optimizer.steps()
    }

    /// One optimizer step over `micro_batches`, their gradients accumulated with token
    /// weights. An empty list, or batches with no token, leave the model unchanged.
    ///
    /// # Errors
    /// The model's input errors; the model is unchanged then.
    pub fn step<R: Rng>(&mut self, micro_batches: &[M::Batch], rng: &mut R) -> Result<StepStats> {
        let precision = self.cfg.precision;
        crate::kernels::precision::with_precision(precision, || self.step_inner(micro_batches, rng))
    }

    fn step_inner<R: Rng>(&mut self, micro_batches: &[M::Batch], rng: &mut R) -> Result<StepStats> {
        let flops = micro_batches
            .iter()
            .map(|b| self.model.train_flops(b))
            .fold(0u64, u64::saturating_add);
        crate::kernels::parallel::with_team_for(flops, || {
            let total: usize = micro_batches.iter().map(M::batch_tokens).sum();
            let lr = self.cfg.schedule.lr(self.optimizer.steps() + 1);
            if total == 0 {
                return Ok(StepStats {
                    loss: LossStats::default(),
                    lr,
                    grad_norm: 0.0,
                });
            }
            self.grads.fill(<M::Float as Float>::ZERO);
            // In bf16, several micro-batches multiply every weight again in both of its layouts:
            // each is converted and packed once for the step instead.
            let packed = micro_batches.len() > 1
                && self.cfg.precision == Precision::Bf16
                && WeightPacks::apply::<M::Float>();
            if packed {
                let mut weights = Vec::new();
                self.model.visit("", &mut |_, t| weights.extend(as_f32_matrix(t)));
                self.packs.0.refresh_all(weights);
            }
            let (model, grads, packs) = (&self.model, &mut self.grads, &self.packs.0);
            let label_smoothing = self.cfg.label_smoothing;
            let mut stats = LossStats::default();
            let mut micro_steps = || -> Result<()> {
                for batch in micro_batches {
                    let weight = M::batch_tokens(batch) as f64 / total as f64;
                    stats = stats.merge(model.accumulate(batch, label_smoothing, weight, grads, rng)?);
                }
                Ok(())
            };
            // The activations of each micro-batch come from (and go back to) the workspace.
            with_workspace(&mut self.workspace, || {
                if packed {
                    with_weight_packs(packs, &mut micro_steps)
                } else {
                    micro_steps()
                }
            })?;
            self.workspace.end_step();
            // Without clipping, the optimizer sums the norm in its own pass over the gradients.
            let grad_norm = match self.cfg.clip_norm {
                Some(max) => {
                    let norm = clip_grad_norm(&mut self.grads, max);
                    self.optimizer.step(&mut self.model, &self.grads, lr);
                    norm
                }
                None => self.optimizer.step_with_norm(&mut self.model, &self.grads, lr),
            };
            Ok(StepStats {
                loss: stats,
                lr,
                grad_norm,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::BlockConfig;
    use crate::models::{EncoderDecoder, EncoderDecoderConfig, Seq2SeqBatch, TokenBatch};
    use crate::params::Params;
    use crate::train::{Adam, AdamConfig, Optimizer, Schedule, clip_grad_norm};
    use rand::{SeedableRng, rngs::StdRng};

    /// A small encoder-decoder and a batch of `n` sequences for it (`off` shifts the ids).
    fn fixture(n: usize, off: usize) -> (EncoderDecoder, Seq2SeqBatch) {
        let cfg = EncoderDecoderConfig::new(40, 40, BlockConfig::new(32, 4, 64), 2, 2)
            .with_share_embeddings(true)
            .with_tie_output(true);
        let model: EncoderDecoder = cfg.init(&mut StdRng::seed_from_u64(5)).unwrap();
        let seqs = |off: usize| -> Vec<Vec<usize>> {
            (0..n)
                .map(|i| (0..(9 + i % 3)).map(|j| 2 + (i * 7 + j * 3 + off) % 38).collect())
                .collect()
        };
        let src = TokenBatch::from_sequences(&seqs(off), 0).unwrap();
        let tgt = seqs(off + 5);
        let cut = |a: usize, b: usize| -> Vec<Vec<usize>> {
            tgt.iter().map(|t| t[a..t.len() - b].to_vec()).collect()
        };
        let batch = Seq2SeqBatch {
            src,
            tgt_in: TokenBatch::from_sequences(&cut(0, 1), 0).unwrap(),
            tgt_out: TokenBatch::from_sequences(&cut(1, 0), 0).unwrap(),
        };
        (model, batch)
    }

    /// Every parameter's bits, in visiting order.
    fn bits(model: &EncoderDecoder) -> Vec<u32> {
        let mut out = Vec::new();
        model.visit("", &mut |_, t| out.extend(t.iter().map(|v| v.to_bits())));
        out
    }

    /// Steps through the trainer, whose workspace hands reused buffers out (filled with NaN in
    /// tests), give bit for bit the parameters of steps taken by hand with fresh memory.
    #[test]
    fn steps_with_the_workspace_equal_steps_with_fresh_memory() {
        let (model, batch) = fixture(16, 0);
        let tc = TrainerConfig {
            optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
            schedule: Schedule::Constant { lr: 1e-3 },
            clip_norm: None,
            label_smoothing: 0.1,
            precision: crate::Precision::F32,
        };
        let mut trainer = Trainer::new(model.clone(), tc.clone()).unwrap();
        let mut by_hand = model.clone();
        let mut adam = Adam::new(AdamConfig::paper(), &by_hand).unwrap();
        let (mut r1, mut r2) = (StdRng::seed_from_u64(9), StdRng::seed_from_u64(9));
        for _ in 0..3 {
            trainer.step(std::slice::from_ref(&batch), &mut r1).unwrap();
            let mut g = by_hand.zeros_like();
            by_hand.accumulate(&batch, 0.1, 1.0, &mut g, &mut r2).unwrap();
            adam.step(&mut by_hand, &g, 1e-3);
        }
        let (a, b) = (bits(&trainer.model), bits(&by_hand));
        assert!(a.iter().all(|&x| f32::from_bits(x).is_finite()));
        assert_eq!(a, b);
    }

    /// A bf16 step of several micro-batches converts and packs each weight once, at its
    /// start, for all of them: its steps give bit for bit the parameters of steps taken by
    /// hand, whose products convert their weights themselves, step after step (the packings
    /// made afresh each time, here also after the model was changed between steps), with
    /// Adam and with SGD, and with one micro-batch (no packings).
    #[test]
    fn bf16_steps_with_weights_packed_once_equal_steps_whose_products_pack_their_own() {
        use crate::Precision;
        use crate::kernels::precision::with_precision;
        let (model, first) = fixture(12, 0);
        let (_, second) = fixture(7, 3);
        let (two, one) = (vec![first.clone(), second], vec![first]);
        for (optimizer, micro) in [
            (OptimizerConfig::Adam(AdamConfig::adamw(0.01)), &two),
            (OptimizerConfig::Sgd { momentum: 0.9 }, &two),
            (OptimizerConfig::Adam(AdamConfig::paper()), &one),
        ] {
            let tc = TrainerConfig {
                optimizer: optimizer.clone(),
                schedule: Schedule::Constant { lr: 1e-3 },
                clip_norm: Some(0.5),
                label_smoothing: 0.1,
                precision: Precision::Bf16,
            };
            let mut trainer = Trainer::new(model.clone(), tc).unwrap();
            let mut by_hand = model.clone();
            let mut opt = optimizer.build(&by_hand).unwrap();
            let total: usize = micro
                .iter()
                .map(<EncoderDecoder as Trainable>::batch_tokens)
                .sum();
            let (mut r1, mut r2) = (StdRng::seed_from_u64(9), StdRng::seed_from_u64(9));
            for step in 0..4 {
                if step == 2 {
                    trainer.model.scale(0.75);
                    by_hand.scale(0.75);
                }
                trainer.step(micro, &mut r1).unwrap();
                with_precision(Precision::Bf16, || {
                    let mut g = by_hand.zeros_like();
                    for b in micro {
                        let w = <EncoderDecoder as Trainable>::batch_tokens(b) as f64 / total as f64;
                        by_hand.accumulate(b, 0.1, w, &mut g, &mut r2).unwrap();
                    }
                    clip_grad_norm(&mut g, 0.5);
                    opt.step(&mut by_hand, &g, 1e-3);
                });
                let what = format!("{optimizer:?}, {} micro-batches, step {step}", micro.len());
                assert!(
                    bits(&trainer.model) == bits(&by_hand),
                    "{what}: the parameters differ"
                );
            }
            let a = bits(&trainer.model);
            assert_ne!(a, bits(&model), "the steps changed the model");
            assert!(a.iter().all(|&x| f32::from_bits(x).is_finite()));
        }
    }
}
