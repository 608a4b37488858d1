//! Training: the loss (§5.4), optimizers (§5.3), learning-rate schedules (Eq. 3), gradient
//! clipping, checkpoint averaging (§6.1) and batching by a token budget (§5.1).

pub mod batch;
pub mod optim;
pub mod schedule;

pub use crate::kernels::loss;
pub use crate::kernels::loss::{CrossEntropy, cross_entropy, log_softmax};
pub use crate::models::batch::pad_batch;
pub use batch::token_batches;
pub use optim::{
    Adam, AdamConfig, MAX_STEPS, Optimizer, OptimizerConfig, OptimizerState, Sgd, average, clip_grad_norm,
};
pub use schedule::Schedule;
pub mod trainer;

pub use crate::models::{LossStats, Trainable};
pub use trainer::{StepStats, Trainer, TrainerConfig};
