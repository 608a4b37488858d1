//! Training: the loss (§5.4), optimizers (§5.3), learning-rate schedules (Eq. 3), gradient
//! clipping, checkpoint averaging (§6.1) and batching by a token budget (§5.1).

pub mod batch;
pub mod loss;
pub mod optim;
pub mod schedule;

pub use batch::{pad_batch, token_batches};
pub use loss::{CrossEntropy, cross_entropy, log_softmax};
pub use optim::{
    Adam, AdamConfig, MAX_STEPS, Optimizer, OptimizerConfig, OptimizerState, Sgd, average, clip_grad_norm,
};
pub use schedule::Schedule;
pub mod trainer;

pub use trainer::{LossStats, StepStats, Trainable, Trainer, TrainerConfig};
