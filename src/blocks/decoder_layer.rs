//! The decoder layer (§3.1, Figure 1, right): masked self-attention, cross-attention over the
//! encoder output ("encoder-decoder attention", §3.2.3), and a position-wise feed-forward
//! network, each in a residual connection.
//!
//! Post-norm (the paper):
//! `h₁ = LN₁(x + Drop(SelfAttn(x)))`, `h₂ = LN₂(h₁ + Drop(CrossAttn(h₁, m)))`,
//! `y = LN₃(h₂ + Drop(FFN(h₂)))`, with m the encoder output ("memory"). Pre-norm moves each
//! LN to the sub-layer's input.
//!
//! The self-attention mask is normally causal, so that "predictions for position i can
//! depend only on the known outputs at positions less than i" (§3.2.3); the memory mask
//! normally blocks the source's padding.
//!
//! PyTorch equivalent: `nn.TransformerDecoderLayer(…, batch_first=True, norm_first)`; its
//! `self_attn`, `multihead_attn`, `linear1`/`linear2`, `norm1..3` are here `self_attn`,
//! `cross_attn`, `ffn`, `norm1..3`.

use ndarray::{Array3, Array4, ArrayView3, ArrayView4};
use rand::Rng;

use super::{BlockConfig, clean_padding, flat, rows, unrows, view3};
use crate::error::Result;
use crate::kernels::Float;
use crate::kernels::workspace::Recycle;
use crate::layers::feed_forward::PackedFeedForward;
use crate::layers::kv_cache::{KvRows, KvView};
use crate::layers::multi_head::PackedMultiHead;
use crate::layers::{
    FeedForward, FeedForwardCache, KvCache, Mask, MultiHead, MultiHeadCache, Residual, ResidualCache,
};

/// A decoder layer. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderLayer<F: Float = f32> {
    /// Its configuration.
    pub cfg: BlockConfig,
    /// Masked multi-head self-attention.
    pub self_attn: MultiHead<F>,
    /// The residual connection around the self-attention.
    pub norm1: Residual<F>,
    /// Multi-head attention over the encoder output.
    pub cross_attn: MultiHead<F>,
    /// The residual connection around the cross-attention.
    pub norm2: Residual<F>,
    /// The position-wise feed-forward network.
    pub ffn: FeedForward<F>,
    /// The residual connection around the feed-forward network.
    pub norm3: Residual<F>,
}
crate::impl_params!(DecoderLayer {
    self_attn,
    norm1,
    cross_attn,
    norm2,
    ffn,
    norm3
});

/// What [`DecoderLayer::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct DecoderLayerCache<F: Float = f32> {
    b: usize,
    t: usize,
    s: usize,
    self_attn: ResidualCache<F, MultiHeadCache<F>>,
    cross_attn: ResidualCache<F, MultiHeadCache<F>>,
    ffn: ResidualCache<F, FeedForwardCache<F>>,
}
crate::kernels::workspace::impl_recycle!(DecoderLayerCache<F: Float> { self_attn, cross_attn, ffn });

/// Attention weights of one decoder layer, each `[B, H, Tq, Tk]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderLayerWeights<F: Float = f32> {
    /// Self-attention, `[B, H, T, T]`.
    pub self_attn: Array4<F>,
    /// Cross-attention over the memory, `[B, H, T, S]`.
    pub cross_attn: Array4<F>,
}

/// A [`DecoderLayer`]'s weights packed for decoding, valid while the layer is borrowed.
#[derive(Clone, Debug)]
pub(crate) struct PackedDecoderLayer<F: Float> {
    self_attn: PackedMultiHead<F>,
    cross_attn: PackedMultiHead<F>,
    ffn: PackedFeedForward,
}

impl<F: Float> PackedDecoderLayer<F> {
    /// The bytes of the weights a decoding step multiplies by.
    pub(crate) fn step_bytes(&self) -> usize {
        self.self_attn.step_bytes() + self.cross_attn.step_bytes() + self.ffn.bytes()
    }
}

/// Configuration of a [`DecoderLayer`]: the [`BlockConfig`] its sub-layers share.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DecoderLayerConfig {
    /// The sub-layers' sizes, dropout, activation and norm placement.
    pub block: BlockConfig,
}

impl DecoderLayerConfig {
    /// A layer of `block`.
    pub fn new(block: BlockConfig) -> Self {
        DecoderLayerConfig { block }
    }

    /// Builds the layer in `f32`; [`DecoderLayerConfig::init_as`] builds it in another float
    /// type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`DecoderLayerConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<DecoderLayer> {
        self.init_as(rng)
    }

    /// Builds the layer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for a bad config (see
    /// [`BlockConfig::check`]).
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<DecoderLayer<F>> {
        DecoderLayer::build(&self.block, rng)
    }
}

impl<F: Float> DecoderLayer<F> {
    /// Builds the layer of [`DecoderLayerConfig::init_as`].
    pub(crate) fn build(cfg: &BlockConfig, rng: &mut impl Rng) -> Result<Self> {
        cfg.check()?;
        Ok(DecoderLayer {
            cfg: cfg.clone(),
            self_attn: cfg.attention().init_as(rng)?,
            norm1: cfg.residual().init_as(rng)?,
            cross_attn: cfg.attention().init_as(rng)?,
            norm2: cfg.residual().init_as(rng)?,
            ffn: cfg.feed_forward().init_as(rng)?,
            norm3: cfg.residual().init_as(rng)?,
        })
    }

    /// Forward pass in training mode (dropout on), keeping what backward needs.
    ///
    /// # Shapes
    /// `x` `[B, T, d_model]`, `memory` `[B, S, d_model]` → `[B, T, d_model]`; `self_mask` for
    /// `(B, T, T)`, `memory_mask` for `(B, T, S)`.
    ///
    /// # Panics
    /// If a shape does not fit or a mask does not fit.
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
        rng: &mut impl Rng,
    ) -> (Array3<F>, DecoderLayerCache<F>) {
        let (b, t, s) = self.check_input(x, memory);
        let x = clean_padding(x, self_mask);
        let x = rows(x.view());
        let memory = clean_padding(memory, memory_mask);
        let (h1, self_attn) = self.norm1.forward(x.view(), rng, |z, rng| {
            let (y, c) = self.self_attn.forward(view3(z, b, t), None, self_mask, rng);
            (flat(y), c)
        });
        let (h2, cross_attn) = self.norm2.forward(h1.view(), rng, |z, rng| {
            let (y, c) = self
                .cross_attn
                .forward(view3(z, b, t), Some(memory.view()), memory_mask, rng);
            (flat(y), c)
        });
        let (y, ffn) = self
            .norm3
            .forward(h2.view(), rng, |z, rng| self.ffn.forward(z, rng));
        (h1, h2).give_back();
        (
            unrows(y, b, t),
            DecoderLayerCache {
                b,
                t,
                s,
                self_attn,
                cross_attn,
                ffn,
            },
        )
    }

    /// Forward pass without dropout or cache.
    ///
    /// # Panics
    /// As [`DecoderLayer::forward`].
    pub fn infer(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
    ) -> Array3<F> {
        self.infer_with_weights(x, memory, self_mask, memory_mask).0
    }

    /// Forward pass without dropout, with both attention maps.
    ///
    /// # Panics
    /// As [`DecoderLayer::forward`].
    pub fn infer_with_weights(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
    ) -> (Array3<F>, DecoderLayerWeights<F>) {
        let (b, t, _) = self.check_input(x, memory);
        let x = rows(x);
        let (mut w_self, mut w_cross) = (None, None);
        let h1 = self.norm1.infer(x.view(), |z| {
            let (y, w) = self.self_attn.infer_with_weights(view3(z, b, t), None, self_mask);
            w_self = Some(w);
            flat(y)
        });
        let h2 = self.norm2.infer(h1.view(), |z| {
            let (y, w) = self
                .cross_attn
                .infer_with_weights(view3(z, b, t), Some(memory), memory_mask);
            w_cross = Some(w);
            flat(y)
        });
        let y = self.norm3.infer(h2.view(), |z| self.ffn.infer(z));
        let weights = DecoderLayerWeights {
            self_attn: w_self.expect("the self-attention ran"),
            cross_attn: w_cross.expect("the cross-attention ran"),
        };
        (unrows(y, b, t), weights)
    }

    /// Inference for new target positions `x` `[B, Tq, d_model]` that follow the positions
    /// already in `self_cache`, with the memory's keys and values projected once in `cross`
    /// ([`MultiHead::project_kv`] of this layer's `cross_attn`): step-by-step decoding. Equal
    /// to [`DecoderLayer::infer`] over the whole target with a causal mask, at the new rows.
    ///
    /// # Panics
    /// If a shape does not fit or `memory_mask` does not fit `(B, Tq, S)`.
    pub fn infer_step(
        &self,
        x: ArrayView3<F>,
        self_cache: &mut KvCache<F>,
        cross: &KvCache<F>,
        memory_mask: &Mask,
    ) -> Array3<F> {
        let t = x.dim().1;
        let y = self.infer_step_packed(x, &mut self_cache.rows_mut(t), cross.view(), memory_mask, None);
        self_cache.advance(t);
        y
    }

    /// The weights packed for decoding, with the cross-attention's W_K and W_V packed too if
    /// `memory` (for teacher-forced inference over a whole memory); `None` where nothing packs
    /// ([`crate::kernels::PackedB`]).
    pub(crate) fn pack_with(&self, memory: bool) -> Option<PackedDecoderLayer<F>> {
        Some(PackedDecoderLayer {
            self_attn: self.self_attn.pack(true)?,
            cross_attn: self.cross_attn.pack_with(false, memory)?,
            ffn: self.ffn.pack()?,
        })
    }

    /// [`DecoderLayer::infer`] with the weights of [`DecoderLayer::pack_with`] (with the
    /// memory's projections packed).
    pub(crate) fn infer_packed(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
        packed: &PackedDecoderLayer<F>,
    ) -> Array3<F> {
        let (b, t, _) = self.check_input(x, memory);
        let x = rows(x);
        let h1 = self.norm1.infer(x.view(), |z| {
            flat(
                self.self_attn
                    .infer_packed(view3(z, b, t), None, self_mask, Some(&packed.self_attn)),
            )
        });
        let h2 = self.norm2.infer(h1.view(), |z| {
            flat(self.cross_attn.infer_packed(
                view3(z, b, t),
                Some(memory),
                memory_mask,
                Some(&packed.cross_attn),
            ))
        });
        let y = self
            .norm3
            .infer(h2.view(), |z| self.ffn.infer_packed(z, Some(&packed.ffn)));
        (h1, h2).give_back();
        unrows(y, b, t)
    }

    /// [`DecoderLayer::infer_step`] with the weights of [`DecoderLayer::pack_with`] (`None`: the
    /// weights as they are).
    pub(crate) fn infer_step_packed(
        &self,
        x: ArrayView3<F>,
        self_cache: &mut KvRows<F>,
        cross: KvView<F>,
        memory_mask: &Mask,
        packed: Option<&PackedDecoderLayer<F>>,
    ) -> Array3<F> {
        let (b, t, d) = x.dim();
        assert_eq!(
            d,
            self.cfg.d_model,
            "DecoderLayer::infer_step: x is {:?}, expected [B, Tq, d_model = {d}]",
            x.shape()
        );
        let x = rows(x);
        let h1 = self.norm1.infer(x.view(), |z| {
            flat(
                self.self_attn
                    .infer_cached_packed(view3(z, b, t), self_cache, packed.map(|p| &p.self_attn)),
            )
        });
        let h2 = self.norm2.infer(h1.view(), |z| {
            flat(self.cross_attn.infer_with_cache_packed(
                view3(z, b, t),
                cross,
                memory_mask,
                packed.map(|p| &p.cross_attn),
            ))
        });
        let y = self
            .norm3
            .infer(h2.view(), |z| self.ffn.infer_packed(z, packed.map(|p| &p.ffn)));
        unrows(y, b, t)
    }

    /// Backward pass: adds the parameter gradients into `g` and returns `(∂L/∂x, ∂L/∂memory)`.
    ///
    /// # Panics
    /// If `grad_y` is not `[B, T, d_model]` of the forward pass.
    pub fn backward(
        &self,
        cache: &DecoderLayerCache<F>,
        grad_y: ArrayView3<F>,
        g: &mut DecoderLayer<F>,
    ) -> (Array3<F>, Array3<F>) {
        let (b, t, s) = (cache.b, cache.t, cache.s);
        let grad_y = rows(grad_y);
        let grad_h2 = self
            .norm3
            .backward(&cache.ffn, grad_y.view(), &mut g.norm3.norm.p, |c, gz| {
                self.ffn.backward(c, gz, &mut g.ffn.p)
            });
        let mut grad_memory = None;
        let grad_h1 = self
            .norm2
            .backward(&cache.cross_attn, grad_h2.view(), &mut g.norm2.norm.p, |c, gz| {
                let (gx, gm) = self.cross_attn.backward(c, view3(gz, b, t), &mut g.cross_attn.p);
                grad_memory = gm;
                flat(gx)
            });
        let grad_x = self
            .norm1
            .backward(&cache.self_attn, grad_h1.view(), &mut g.norm1.norm.p, |c, gz| {
                let (gx, _) = self.self_attn.backward(c, view3(gz, b, t), &mut g.self_attn.p);
                flat(gx)
            });
        let grad_memory = grad_memory.expect("cross-attention returns a memory gradient");
        debug_assert_eq!(grad_memory.dim().1, s);
        (grad_h1, grad_h2).give_back();
        (unrows(grad_x, b, t), grad_memory)
    }

    fn check_input(&self, x: ArrayView3<F>, memory: ArrayView3<F>) -> (usize, usize, usize) {
        let d = self.cfg.d_model;
        assert!(
            x.dim().2 == d && memory.dim().2 == d && memory.dim().0 == x.dim().0,
            "DecoderLayer: x {:?}, memory {:?}: expected [B, T, d_model = {d}] and [B, S, d_model = {d}]",
            x.shape(),
            memory.shape()
        );
        (x.dim().0, x.dim().1, memory.dim().1)
    }
}

impl<F: Float> DecoderLayerCache<F> {
    /// The self-attention weights of the forward pass, `[B, H, T, T]`, before dropout.
    pub fn self_attention_weights(&self) -> ArrayView4<'_, F> {
        self.self_attn.sublayer().weights()
    }

    /// The cross-attention weights of the forward pass, `[B, H, T, S]`, before dropout.
    pub fn cross_attention_weights(&self) -> ArrayView4<'_, F> {
        self.cross_attn.sublayer().weights()
    }
}
