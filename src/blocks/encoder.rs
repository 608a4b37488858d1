//! The encoder: a stack of N identical [`EncoderLayer`]s (§3.1, N = 6 in the paper),
//! optionally followed by a final LayerNorm (see [`FinalNorm`]).
//!
//! PyTorch equivalent: `nn.TransformerEncoder(layer, num_layers, norm)`; parameter names
//! `layers.{i}.…` and `norm.…` as there.

use ndarray::{Array3, Array4, ArrayView3, s};
use rand::Rng;

use super::encoder_layer::PackedEncoderLayer;
use super::{
    BlockConfig, EncoderLayer, EncoderLayerCache, FinalNorm, flat, rows, step_in_runs, step_runs, unrows,
};
use crate::error::{Result, check};
use crate::kernels::Float;
use crate::kernels::workspace::Recycle;
use crate::layers::{KvCache, LayerNorm, LayerNormCache, LayerNormConfig, Mask};

/// Configuration of an [`Encoder`] stack.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EncoderConfig {
    /// The layers' shared config.
    pub block: BlockConfig,
    /// Number of layers N.
    pub n_layers: usize,
    /// Whether the stack ends with a LayerNorm.
    pub final_norm: FinalNorm,
}

/// A stack of encoder layers. Its gradients have its own type (see [`crate::blocks`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Encoder<F: Float = f32> {
    /// Its configuration.
    pub cfg: EncoderConfig,
    /// The layers, bottom first.
    pub layers: Vec<EncoderLayer<F>>,
    /// The final LayerNorm, if any.
    pub norm: Option<LayerNorm<F>>,
}
crate::impl_params!(Encoder { layers, norm });

/// What [`Encoder::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct EncoderCache<F: Float = f32> {
    layers: Vec<EncoderLayerCache<F>>,
    norm: Option<LayerNormCache<F>>,
    dims: (usize, usize),
}
crate::kernels::workspace::impl_recycle!(EncoderCache<F: Float> { layers, norm });

impl EncoderConfig {
    /// `n_layers` layers of `block`, with the final LayerNorm chosen automatically.
    pub fn new(block: BlockConfig, n_layers: usize) -> Self {
        EncoderConfig {
            block,
            n_layers,
            final_norm: FinalNorm::Auto,
        }
    }

    /// The same config with another final-norm choice.
    pub fn with_final_norm(mut self, final_norm: FinalNorm) -> Self {
        self.final_norm = final_norm;
        self
    }

    /// Builds the stack in `f32`, the type for training and inference;
    /// [`EncoderConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`EncoderConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<Encoder> {
        self.init_as(rng)
    }

    /// Builds the stack.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for zero layers or a bad block.
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<Encoder<F>> {
        check::positive("n_layers", self.n_layers)?;
        self.block.check()?;
        let layers = (0..self.n_layers)
            .map(|_| EncoderLayer::build(&self.block, rng))
            .collect::<Result<_>>()?;
        let norm = self
            .has_final_norm()
            .then(|| self.final_layer_norm().init_as(rng))
            .transpose()?;
        Ok(Encoder {
            cfg: self.clone(),
            layers,
            norm,
        })
    }

    /// Whether the stack ends with a LayerNorm.
    pub fn has_final_norm(&self) -> bool {
        self.final_norm.present(self.block.norm_first)
    }

    fn final_layer_norm(&self) -> LayerNormConfig {
        self.block.norm()
    }

    /// The stack's number of parameters (its layers and final LayerNorm), in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn params(&self) -> f64 {
        let norm = if self.has_final_norm() {
            self.block.norm().params()
        } else {
            0.0
        };
        self.n_layers as f64 * self.block.encoder_layer_params() + norm
    }

    /// FLOPs of the stack's forward pass over one sequence of `t` positions.
    pub fn flops(&self, t: usize) -> f64 {
        self.n_layers as f64 * self.block.encoder_layer_flops(t)
    }
}

impl Default for EncoderConfig {
    /// The paper's base encoder: N = 6 layers of [`BlockConfig::default`].
    fn default() -> Self {
        EncoderConfig::new(BlockConfig::default(), 6)
    }
}

impl<F: Float> Encoder<F> {
    /// Forward pass in training mode through every layer.
    ///
    /// # Shapes
    /// `x` `[B, S, d_model]` → `[B, S, d_model]`; `mask` for `(B, S, S)`.
    ///
    /// # Panics
    /// If a shape or the mask does not fit.
    pub fn forward(&self, x: ArrayView3<F>, mask: &Mask, rng: &mut impl Rng) -> (Array3<F>, EncoderCache<F>) {
        let (b, s, _) = x.dim();
        let mut h = crate::kernels::workspace::owned(x);
        let mut caches = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, c) = layer.forward(h.view(), mask, rng);
            caches.push(c);
            std::mem::replace(&mut h, y).give_back();
        }
        let (y, norm) = match &self.norm {
            Some(ln) => {
                let (y, c) = ln.forward(flat(h).view());
                (unrows(y, b, s), Some(c))
            }
            None => (h, None),
        };
        (
            y,
            EncoderCache {
                layers: caches,
                norm,
                dims: (b, s),
            },
        )
    }

    /// Forward pass without dropout or cache.
    ///
    /// # Panics
    /// As [`Encoder::forward`].
    pub fn infer(&self, x: ArrayView3<F>, mask: &Mask) -> Array3<F> {
        self.infer_with_weights(x, mask).0
    }

    /// Every layer's weights packed for inference; `None` where nothing packs
    /// ([`crate::kernels::PackedB`]).
    pub(crate) fn pack(&self) -> Option<Vec<PackedEncoderLayer<F>>> {
        self.layers.iter().map(|l| l.pack()).collect()
    }

    /// [`Encoder::infer`] with the weights of [`Encoder::pack`].
    pub(crate) fn infer_packed(
        &self,
        x: ArrayView3<F>,
        mask: &Mask,
        packed: &[PackedEncoderLayer<F>],
    ) -> Array3<F> {
        let (b, s, _) = x.dim();
        let mut h = crate::kernels::workspace::owned(x);
        for (layer, p) in self.layers.iter().zip(packed) {
            let y = layer.infer_packed(h.view(), mask, p);
            std::mem::replace(&mut h, y).give_back();
        }
        if let Some(ln) = &self.norm {
            h = unrows(ln.infer(flat(h).view()), b, s);
        }
        h
    }

    /// Forward pass without dropout, with every layer's attention weights `[B, H, S, S]`.
    ///
    /// # Panics
    /// As [`Encoder::forward`].
    pub fn infer_with_weights(&self, x: ArrayView3<F>, mask: &Mask) -> (Array3<F>, Vec<Array4<F>>) {
        let (b, s, _) = x.dim();
        let mut h = x.to_owned();
        let mut weights = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, w) = layer.infer_with_weights(h.view(), mask);
            weights.push(w);
            h = y;
        }
        if let Some(ln) = &self.norm {
            h = unrows(ln.infer(flat(h).view()), b, s);
        }
        (h, weights)
    }

    /// Empty key/value caches, one per layer, for causal step-by-step inference with
    /// [`Encoder::infer_step`] (a decoder-only model), with room for `capacity` positions.
    pub fn begin(&self, b: usize, capacity: usize) -> Vec<KvCache<F>> {
        self.layers
            .iter()
            .map(|l| l.self_attn.empty_cache(b, capacity))
            .collect()
    }

    /// Causal inference for the next positions `x` `[B, Tq, d_model]`, after those already in
    /// `caches` (from [`Encoder::begin`]); equal to [`Encoder::infer`] with a causal mask at
    /// those rows.
    ///
    /// # Panics
    /// If `x` does not fit the caches, or `caches` is not one per layer.
    pub fn infer_step(&self, x: ArrayView3<F>, caches: &mut [KvCache<F>]) -> Array3<F> {
        self.infer_step_packed(x, caches, None)
    }

    /// [`Encoder::infer_step`] with the weights of [`Encoder::pack`] (`None`: the weights as
    /// they are); a step of many sequences on a team in runs of them ([`step_in_runs`]).
    pub(crate) fn infer_step_packed(
        &self,
        x: ArrayView3<F>,
        caches: &mut [KvCache<F>],
        packed: Option<&[PackedEncoderLayer<F>]>,
    ) -> Array3<F> {
        assert_eq!(
            caches.len(),
            self.layers.len(),
            "Encoder::infer_step: {} caches for {} layers",
            caches.len(),
            self.layers.len()
        );
        let (b, t, d) = x.dim();
        // Runs of sequences where the caches hold the batch (else one run, whose layers report
        // the mismatch).
        let fits = caches.iter().all(|c| c.batch_size() == b) && !self.layers.is_empty();
        let runs = if fits { step_runs(b, t) } else { 1 };
        let mut h = step_in_runs(caches, (b, t, d), runs, |_, seqs, rows| {
            let x = x.slice(s![seqs, .., ..]);
            let mut h: Option<Array3<F>> = None;
            for (i, (layer, rows)) in self.layers.iter().zip(rows).enumerate() {
                let input = h.as_ref().map_or(x, |h| h.view());
                h = Some(layer.infer_step_packed(input, rows, packed.map(|p| &p[i])));
            }
            h.unwrap_or_else(|| x.to_owned())
        });
        if let Some(ln) = &self.norm {
            h = unrows(ln.infer(flat(h).view()), b, t);
        }
        h
    }

    /// Backward pass: adds the parameter gradients into `g` and returns `∂L/∂x`.
    ///
    /// # Panics
    /// If `grad_y` does not have the output's shape.
    pub fn backward(&self, cache: &EncoderCache<F>, grad_y: ArrayView3<F>, g: &mut Encoder<F>) -> Array3<F> {
        let (b, s) = cache.dims;
        let mut grad = match (&self.norm, &cache.norm, &mut g.norm) {
            (Some(ln), Some(c), Some(gn)) => unrows(ln.backward(c, rows(grad_y).view(), &mut gn.p), b, s),
            _ => grad_y.to_owned(),
        };
        for ((layer, c), gl) in self
            .layers
            .iter()
            .zip(&cache.layers)
            .zip(g.layers.iter_mut())
            .rev()
        {
            let next = layer.backward(c, grad.view(), gl);
            std::mem::replace(&mut grad, next).give_back();
        }
        grad
    }
}

impl<F: Float> EncoderCache<F> {
    /// The caches of the layers, bottom first (their attention weights, for instance).
    pub fn layers(&self) -> &[EncoderLayerCache<F>] {
        &self.layers
    }
}
