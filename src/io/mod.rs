//! Files: checkpoints of the crate's own models, and PyTorch `nn.Transformer` weights, both
//! as safetensors (no pickle, every size validated before use).
//!
//! Needs the `serde` feature (on by default).

pub mod checkpoint;
pub mod pytorch;
pub mod tensors;

pub use checkpoint::{
    CheckpointInfo, Checkpointable, inspect, load_into, load_model, load_trainer, save_model, save_trainer,
};
pub use pytorch::{ParityConfig, TorchTransformer, TorchTransformerConfig, parity};
pub use tensors::{OwnedTensor, TensorFile, TensorInfo, write_tensor_file};
