//! Layers: each a Config, its Params, a forward pass and a hand-written backward pass.
//!
//! Every layer follows one pattern:
//!
//! ```text
//! XConfig::init(&self, rng) -> Result<X>          validated config, seeded init
//! X::forward(&self, input, ..) -> (output, XCache) training pass, keeps what backward needs
//! X::infer(&self, input, ..) -> output             the same arithmetic, no cache, no dropout
//! X::backward(&self, &cache, grad_output, &mut g) -> grad_input
//! ```
//!
//! `backward` *adds* into the gradient container `g` (same type as the parameters) and
//! never zeroes it, so a weight used twice (tied embeddings) or gradients accumulated over
//! micro-batches need no extra code. Layers hold no hidden state: `&self` everywhere, `Send`
//! and `Sync`.

pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod feed_forward;
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
pub use layer_norm::{LayerNorm, LayerNormCache, LayerNormConfig, LayerNormParams};
pub use linear::{Linear, LinearCache, LinearConfig, LinearParams};
pub use mask::{Mask, PairFlags, ResolvedMask};
pub use multi_head::{KvCache, MultiHead, MultiHeadCache, MultiHeadConfig, MultiHeadParams};
pub use positional::{
    LearnedPositional, LearnedPositionalConfig, LearnedPositionalParams, SinusoidalConfig,
    SinusoidalEncoding, sinusoidal_rows, sinusoidal_table,
};
pub use residual::{Residual, ResidualCache, ResidualConfig};
