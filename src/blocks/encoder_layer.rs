//! The encoder layer (§3.1, Figure 1, left): self-attention, then a position-wise
//! feed-forward network, each in a residual connection.
//!
//! Post-norm (the paper): `h = LN₁(x + Drop(SelfAttn(x)))`, `y = LN₂(h + Drop(FFN(h)))`.
//! Pre-norm: `h = x + Drop(SelfAttn(LN₁(x)))`, `y = h + Drop(FFN(LN₂(h)))`.
//!
//! With a causal mask the same layer is the block of a decoder-only language model.
//!
//! PyTorch equivalent: `nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
//! activation, layer_norm_eps, batch_first=True, norm_first)`; its parameters `self_attn`,
//! `linear1`/`linear2`, `norm1`, `norm2` are here `self_attn`, `ffn`, `norm1`, `norm2`.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array3;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::blocks::{BlockConfig, EncoderLayerConfig};
//! use vaswani::layers::Mask;
//! use vaswani::Params;
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let layer = EncoderLayerConfig::new(BlockConfig::new(16, 4, 32)).init(&mut rng)?;
//! let x = Array3::<f32>::zeros((2, 5, 16));
//! let (y, cache) = layer.forward(x.view(), &Mask::key_lengths(&[5, 3]), &mut rng);
//! let mut grads = layer.zeros_like();
//! let grad_x = layer.backward(&cache, y.view(), &mut grads);
//! assert_eq!(grad_x.dim(), (2, 5, 16));
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array3, Array4, ArrayView3, ArrayView4};
use rand::Rng;

use super::{BlockConfig, clean_padding, flat, rows, unrows, view3};
use crate::error::Result;
use crate::kernels::Float;
use crate::kernels::workspace::Recycle;
use crate::layers::feed_forward::PackedFeedForward;
use crate::layers::kv_cache::KvRows;
use crate::layers::multi_head::PackedMultiHead;
use crate::layers::{
    FeedForward, FeedForwardCache, KvCache, Mask, MultiHead, MultiHeadCache, Residual, ResidualCache,
};

/// An encoder layer. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderLayer<F: Float = f32> {
    /// Its configuration.
    pub cfg: BlockConfig,
    /// Multi-head self-attention.
    pub self_attn: MultiHead<F>,
    /// The residual connection around the self-attention, with its LayerNorm.
    pub norm1: Residual<F>,
    /// The position-wise feed-forward network.
    pub ffn: FeedForward<F>,
    /// The residual connection around the feed-forward network, with its LayerNorm.
    pub norm2: Residual<F>,
}
crate::impl_params!(EncoderLayer {
    self_attn,
    norm1,
    ffn,
    norm2
});

/// What [`EncoderLayer::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct EncoderLayerCache<F: Float = f32> {
    b: usize,
    t: usize,
    attn: ResidualCache<F, MultiHeadCache<F>>,
    ffn: ResidualCache<F, FeedForwardCache<F>>,
}
crate::kernels::workspace::impl_recycle!(EncoderLayerCache<F: Float> { attn, ffn });

/// An [`EncoderLayer`]'s weights packed for inference, valid while the layer is borrowed.
#[derive(Clone, Debug)]
pub(crate) struct PackedEncoderLayer<F: Float> {
    self_attn: PackedMultiHead<F>,
    ffn: PackedFeedForward,
}

impl<F: Float> PackedEncoderLayer<F> {
    /// The bytes of the weights a decoding step multiplies by (a decoder-only model's layer).
    pub(crate) fn step_bytes(&self) -> usize {
        self.self_attn.step_bytes() + self.ffn.bytes()
    }
}

/// Configuration of an [`EncoderLayer`]: the [`BlockConfig`] its sub-layers share.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EncoderLayerConfig {
    /// The sub-layers' sizes, dropout, activation and norm placement.
    pub block: BlockConfig,
}

impl EncoderLayerConfig {
    /// A layer of `block`.
    pub fn new(block: BlockConfig) -> Self {
        EncoderLayerConfig { block }
    }

    /// Builds the layer in `f32`; [`EncoderLayerConfig::init_as`] builds it in another float
    /// type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`EncoderLayerConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<EncoderLayer> {
        self.init_as(rng)
    }

    /// Builds the layer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for a bad config (see
    /// [`BlockConfig::check`]).
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<EncoderLayer<F>> {
        EncoderLayer::build(&self.block, rng)
    }
}

impl<F: Float> EncoderLayer<F> {
    /// Builds the layer of [`EncoderLayerConfig::init_as`].
    pub(crate) fn build(cfg: &BlockConfig, rng: &mut impl Rng) -> Result<Self> {
        cfg.check()?;
        Ok(EncoderLayer {
            cfg: cfg.clone(),
            self_attn: cfg.attention().init_as(rng)?,
            norm1: cfg.residual().init_as(rng)?,
            ffn: cfg.feed_forward().init_as(rng)?,
            norm2: cfg.residual().init_as(rng)?,
        })
    }

    /// Forward pass in training mode (dropout on), keeping what backward needs.
    ///
    /// # Shapes
    /// `x` `[B, T, d_model]` → `[B, T, d_model]`; `mask` for `(B, T, T)`.
    ///
    /// # Panics
    /// If `x` is not `[B, T, d_model]` or the mask does not fit.
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        mask: &Mask,
        rng: &mut impl Rng,
    ) -> (Array3<F>, EncoderLayerCache<F>) {
        let (b, t, _) = self.check_input(x);
        let x = clean_padding(x, mask);
        let x = rows(x.view());
        let (h, attn) = self.norm1.forward(x.view(), rng, |z, rng| {
            let (y, c) = self.self_attn.forward(view3(z, b, t), None, mask, rng);
            (flat(y), c)
        });
        let (y, ffn) = self
            .norm2
            .forward(h.view(), rng, |z, rng| self.ffn.forward(z, rng));
        h.give_back();
        (unrows(y, b, t), EncoderLayerCache { b, t, attn, ffn })
    }

    /// Forward pass without dropout or cache.
    ///
    /// # Panics
    /// As [`EncoderLayer::forward`].
    pub fn infer(&self, x: ArrayView3<F>, mask: &Mask) -> Array3<F> {
        self.infer_with_weights(x, mask).0
    }

    /// The weights packed for inference; `None` where nothing packs
    /// ([`crate::kernels::PackedB`]).
    pub(crate) fn pack(&self) -> Option<PackedEncoderLayer<F>> {
        Some(PackedEncoderLayer {
            self_attn: self.self_attn.pack(true)?,
            ffn: self.ffn.pack()?,
        })
    }

    /// [`EncoderLayer::infer`] with the weights of [`EncoderLayer::pack`].
    pub(crate) fn infer_packed(
        &self,
        x: ArrayView3<F>,
        mask: &Mask,
        packed: &PackedEncoderLayer<F>,
    ) -> Array3<F> {
        let (b, t, _) = self.check_input(x);
        let x = rows(x);
        let h = self.norm1.infer(x.view(), |z| {
            flat(
                self.self_attn
                    .infer_packed(view3(z, b, t), None, mask, Some(&packed.self_attn)),
            )
        });
        let y = self
            .norm2
            .infer(h.view(), |z| self.ffn.infer_packed(z, Some(&packed.ffn)));
        h.give_back();
        unrows(y, b, t)
    }

    /// Forward pass without dropout, with the self-attention weights `[B, H, T, T]`.
    ///
    /// # Panics
    /// As [`EncoderLayer::forward`].
    pub fn infer_with_weights(&self, x: ArrayView3<F>, mask: &Mask) -> (Array3<F>, Array4<F>) {
        let (b, t, _) = self.check_input(x);
        let x = rows(x);
        let mut weights = None;
        let h = self.norm1.infer(x.view(), |z| {
            let (y, w) = self.self_attn.infer_with_weights(view3(z, b, t), None, mask);
            weights = Some(w);
            flat(y)
        });
        let y = self.norm2.infer(h.view(), |z| self.ffn.infer(z));
        (unrows(y, b, t), weights.expect("the attention ran"))
    }

    /// Causal inference for new positions `x` `[B, Tq, d_model]` that follow the positions
    /// already in `cache`: the block of a decoder-only model, step by step. Equal to
    /// [`EncoderLayer::infer`] with a causal mask over the whole sequence, at the new rows.
    ///
    /// # Panics
    /// If `x` is not `[B, Tq, d_model]` for the cache's B.
    pub fn infer_step(&self, x: ArrayView3<F>, cache: &mut KvCache<F>) -> Array3<F> {
        let t = x.dim().1;
        let y = self.infer_step_packed(x, &mut cache.rows_mut(t), None);
        cache.advance(t);
        y
    }

    /// [`EncoderLayer::infer_step`] over a run of a cache's sequences, with the weights of
    /// [`EncoderLayer::pack`] (`None`: the weights as they are).
    pub(crate) fn infer_step_packed(
        &self,
        x: ArrayView3<F>,
        cache: &mut KvRows<F>,
        packed: Option<&PackedEncoderLayer<F>>,
    ) -> Array3<F> {
        let (b, t, _) = self.check_input(x);
        let x = rows(x);
        let h = self.norm1.infer(x.view(), |z| {
            flat(
                self.self_attn
                    .infer_cached_packed(view3(z, b, t), cache, packed.map(|p| &p.self_attn)),
            )
        });
        let y = self
            .norm2
            .infer(h.view(), |z| self.ffn.infer_packed(z, packed.map(|p| &p.ffn)));
        unrows(y, b, t)
    }

    /// Backward pass: adds the parameter gradients into `g` and returns `∂L/∂x`.
    ///
    /// # Panics
    /// If `grad_y` is not `[B, T, d_model]` of the forward pass.
    pub fn backward(
        &self,
        cache: &EncoderLayerCache<F>,
        grad_y: ArrayView3<F>,
        g: &mut EncoderLayer<F>,
    ) -> Array3<F> {
        let (b, t) = (cache.b, cache.t);
        let grad_y = rows(grad_y);
        let grad_h = self
            .norm2
            .backward(&cache.ffn, grad_y.view(), &mut g.norm2.norm.p, |c, gz| {
                self.ffn.backward(c, gz, &mut g.ffn.p)
            });
        let grad_x = self
            .norm1
            .backward(&cache.attn, grad_h.view(), &mut g.norm1.norm.p, |c, gz| {
                let (gx, _) = self.self_attn.backward(c, view3(gz, b, t), &mut g.self_attn.p);
                flat(gx)
            });
        grad_h.give_back();
        unrows(grad_x, b, t)
    }

    fn check_input(&self, x: ArrayView3<F>) -> (usize, usize, usize) {
        assert_eq!(
            x.dim().2,
            self.cfg.d_model,
            "EncoderLayer: input is {:?}, expected [B, T, d_model = {}]",
            x.shape(),
            self.cfg.d_model
        );
        x.dim()
    }
}

impl<F: Float> EncoderLayerCache<F> {
    /// The self-attention weights of the forward pass, `[B, H, T, T]`, before dropout.
    pub fn attention_weights(&self) -> ArrayView4<'_, F> {
        self.attn.sublayer().weights()
    }
}
