//! Whole models: the encoder-decoder of Figure 1, an encoder-only classifier or regressor
//! over tokens or feature vectors, and a decoder-only language model; the paper's presets
//! (Table 3).
//!
//! Model entry points return [`Result`](crate::Result): token ids, lengths, batch sizes and
//! sequence lengths come from outside the program and are checked, each a typed
//! [`crate::Error`] naming the value. Every model implements
//! [`Params`](crate::Params) (its gradients have its own type) and
//! [`Trainable`], the training contract (defined here, so that models import nothing from
//! `train/`), for the [`Trainer`](crate::train::Trainer).

pub mod attention_maps;
pub mod batch;
pub mod cost;
pub mod decoder_only;
pub mod encoder_decoder;
pub mod encoder_only;
pub mod input;
mod output;
pub mod trainable;

pub use attention_maps::AttentionMaps;
pub use batch::{FeatureBatch, TokenBatch};
pub use cost::Cost;
pub use decoder_only::{
    DecoderOnly, DecoderOnlyCache, DecoderOnlyConfig, GenerateState, LmBatch, PackedDecoderOnly,
};
pub use encoder_decoder::{
    DecodeState, EncoderDecoder, EncoderDecoderCache, EncoderDecoderConfig, PackedEncoderDecoder,
    Seq2SeqBatch,
};
pub use encoder_only::{
    EncoderInput, EncoderOnly, EncoderOnlyCache, EncoderOnlyConfig, Head, InputKind, LabeledBatch, Pooling,
    Targets,
};
pub use input::{InputCache, InputStage, Positions};
pub use trainable::{LossStats, Trainable};
