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

pub mod embedding;
pub mod linear;
pub mod positional;

pub use embedding::{Embedding, EmbeddingCache, EmbeddingConfig, EmbeddingParams, ProjectionCache};
pub use linear::{Linear, LinearCache, LinearConfig, LinearParams};
pub use positional::{
    LearnedPositional, LearnedPositionalConfig, LearnedPositionalParams, SinusoidalConfig,
    SinusoidalEncoding, sinusoidal_rows, sinusoidal_table,
};
