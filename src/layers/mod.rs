//! Layers: each a Config, its Params, a forward pass and a hand-written backward pass.
//!
//! Every layer follows one pattern:
//!
//! ```text
//! XConfig::init(&self, rng) -> Result<X>          validated config, seeded init, f32
//! XConfig::init_as::<F>(&self, rng) -> Result<X<F>>   the same in another float type (f64)
//! X::forward(&self, input, ..) -> (output, XCache) training pass, keeps what backward needs
//! X::infer(&self, input, ..) -> output             the same arithmetic, no cache, no dropout
//! X::backward(&self, &cache, grad_output, &mut g) -> grad_input
//! ```
//!
//! `backward` *adds* into the gradient container `g` and never zeroes it, so a weight used
//! twice (tied embeddings) or gradients accumulated over micro-batches need no extra code;
//! start from `zeros_like()` (see [`Params`](crate::Params)). The container has the type of
//! what holds the parameters: a layer's parameter struct for a layer (`Linear::backward`
//! takes `&mut LinearParams`, built by `layer.p.zeros_like()`), the block's or model's own
//! type for blocks and models (`EncoderLayer::backward` takes `&mut EncoderLayer`, built by
//! `layer.zeros_like()`). Only the input gradients a backward *returns* are fresh arrays;
//! the kernels that write into a caller's `grad_x` say that they overwrite it. Layers hold
//! no hidden state: `&self` everywhere, `Send` and `Sync`.

pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod feed_forward;
pub mod kv_cache;
pub mod layer_norm;
pub mod linear;
pub mod mask;
pub mod multi_head;
pub mod positional;
pub mod residual;

pub use attention::{AttentionCache, AttentionConfig, ScaledDotProductAttention};
pub use dropout::{Dropout, DropoutCache, DropoutConfig};
pub use embedding::{Embedding, EmbeddingCache, EmbeddingConfig, EmbeddingParams, ProjectionCache};
pub use feed_forward::{FeedForward, FeedForwardCache, FeedForwardConfig, FeedForwardParams};
pub use kv_cache::KvCache;
pub use layer_norm::{LayerNorm, LayerNormCache, LayerNormConfig, LayerNormParams};
pub use linear::{Linear, LinearCache, LinearConfig, LinearParams};
pub use mask::{Mask, PairFlags, ResolvedMask};
pub use multi_head::{MultiHead, MultiHeadCache, MultiHeadConfig, MultiHeadParams};
pub use positional::{
    LearnedPositional, LearnedPositionalConfig, LearnedPositionalParams, SinusoidalConfig,
    SinusoidalEncoding, sinusoidal_rows, sinusoidal_table,
};
pub use residual::{Residual, ResidualCache, ResidualConfig};
