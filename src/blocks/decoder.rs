//! The decoder: a stack of N identical [`DecoderLayer`]s (§3.1), each attending over the same
//! encoder output, optionally followed by a final LayerNorm (see [`FinalNorm`]).
//!
//! PyTorch equivalent: `nn.TransformerDecoder(layer, num_layers, norm)`.

use ndarray::{Array3, ArrayView3, s};
use rand::Rng;

use super::decoder_layer::PackedDecoderLayer;
use super::{
    BlockConfig, DecoderLayer, DecoderLayerCache, DecoderLayerWeights, FinalNorm, flat, rows, step_in_runs,
    step_runs, unrows,
};
use crate::error::{Result, check};
use crate::kernels::Float;
use crate::kernels::workspace::Recycle;
use crate::layers::kv_cache::KvView;
use crate::layers::{KvCache, LayerNorm, LayerNormCache, LayerNormConfig, Mask};

/// Configuration of a [`Decoder`] stack.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DecoderConfig {
    /// The layers' shared config.
    pub block: BlockConfig,
    /// Number of layers N.
    pub n_layers: usize,
    /// Whether the stack ends with a LayerNorm.
    pub final_norm: FinalNorm,
}

/// A stack of decoder layers. Its gradients have its own type (see [`crate::blocks`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Decoder<F: Float = f32> {
    /// Its configuration.
    pub cfg: DecoderConfig,
    /// The layers, bottom first.
    pub layers: Vec<DecoderLayer<F>>,
    /// The final LayerNorm, if any.
    pub norm: Option<LayerNorm<F>>,
}
crate::impl_params!(Decoder { layers, norm });

/// The key/value caches of a decode in progress: per layer, the self-attention keys and values
/// of the positions generated so far and the memory's keys and values, projected once.
///
/// The memories stay where [`Decoder::begin`] put them, one per source: each sequence of the
/// decode knows its source, and sequences of one source (the beams of a beam search) read its
/// keys and values in the same place, rather than a copy each.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderState<F: Float = f32> {
    self_caches: Vec<KvCache<F>>,
    cross: Vec<KvCache<F>>,
    /// The source of each sequence: its memory's keys and values in `cross`.
    sources: Vec<usize>,
}

crate::kernels::workspace::impl_recycle!(DecoderState<F: Float> { self_caches, cross });

impl<F: Float> DecoderState<F> {
    /// The caches, taken out (this state is left with none).
    pub(crate) fn take(&mut self) -> DecoderState<F> {
        DecoderState {
            self_caches: std::mem::take(&mut self.self_caches),
            cross: std::mem::take(&mut self.cross),
            sources: std::mem::take(&mut self.sources),
        }
    }

    /// The number of target positions decoded so far.
    pub fn len(&self) -> usize {
        self.self_caches.first().map_or(0, |c| c.len())
    }

    /// Whether no position has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of sequences decoded side by side.
    pub fn batch_size(&self) -> usize {
        self.sources.len()
    }

    /// Keeps the sequences `rows`, in that order (see [`KvCache::select`]): beams copied,
    /// reordered or dropped, each with its source (whose memory is not copied).
    ///
    /// # Panics
    /// If a row is not below the batch size.
    pub fn select(&mut self, rows: &[usize]) {
        let b = self.batch_size();
        assert!(
            rows.iter().all(|&r| r < b),
            "DecoderState::select: rows {rows:?} for a batch of {b}"
        );
        for cache in &mut self.self_caches {
            cache.select(rows);
        }
        self.sources = rows.iter().map(|&r| self.sources[r]).collect();
    }
}

/// Every layer's memory keys and values (`cross`) as the sequences read them: each
/// sequence's source's (`sources`), in place.
fn cross_views<'a, F: Float>(
    cross: &'a [KvCache<F>],
    sources: &'a [usize],
) -> impl Iterator<Item = KvView<'a, F>> {
    let n = cross.first().map_or(0, |c| c.batch_size());
    let in_place = sources.iter().copied().eq(0..n);
    cross.iter().map(move |c| {
        let view = c.view();
        if in_place { view } else { view.mapped(sources) }
    })
}

/// What [`Decoder::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct DecoderCache<F: Float = f32> {
    layers: Vec<DecoderLayerCache<F>>,
    norm: Option<LayerNormCache<F>>,
    dims: (usize, usize, usize),
}
crate::kernels::workspace::impl_recycle!(DecoderCache<F: Float> { layers, norm });

impl DecoderConfig {
    /// `n_layers` layers of `block`, with the final LayerNorm chosen automatically.
    pub fn new(block: BlockConfig, n_layers: usize) -> Self {
        DecoderConfig {
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
    /// [`DecoderConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`DecoderConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<Decoder> {
        self.init_as(rng)
    }

    /// Builds the stack.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for zero layers or a bad block.
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<Decoder<F>> {
        check::positive("n_layers", self.n_layers)?;
        self.block.check()?;
        let layers = (0..self.n_layers)
            .map(|_| DecoderLayer::build(&self.block, rng))
            .collect::<Result<_>>()?;
        let norm = self
            .has_final_norm()
            .then(|| {
                LayerNormConfig::new(self.block.d_model)
                    .with_eps(self.block.eps)
                    .init_as(rng)
            })
            .transpose()?;
        Ok(Decoder {
            cfg: self.clone(),
            layers,
            norm,
        })
    }

    /// Whether the stack ends with a LayerNorm.
    pub fn has_final_norm(&self) -> bool {
        self.final_norm.present(self.block.norm_first)
    }

    /// The stack's number of parameters (its layers and final LayerNorm), in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn params(&self) -> f64 {
        let norm = if self.has_final_norm() {
            self.block.norm().params()
        } else {
            0.0
        };
        self.n_layers as f64 * self.block.decoder_layer_params() + norm
    }

    /// FLOPs of the stack's forward pass over one sequence of `t` target positions and a
    /// memory of `s`.
    pub fn flops(&self, t: usize, s: usize) -> f64 {
        self.n_layers as f64 * self.block.decoder_layer_flops(t, s)
    }
}

impl Default for DecoderConfig {
    /// The paper's base decoder: N = 6 layers of [`BlockConfig::default`].
    fn default() -> Self {
        DecoderConfig::new(BlockConfig::default(), 6)
    }
}

impl<F: Float> Decoder<F> {
    /// Forward pass in training mode through every layer.
    ///
    /// # Shapes
    /// `x` `[B, T, d_model]`, `memory` `[B, S, d_model]` → `[B, T, d_model]`; `self_mask`
    /// for `(B, T, T)`, `memory_mask` for `(B, T, S)`.
    ///
    /// # Panics
    /// If a shape or a mask does not fit.
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
        rng: &mut impl Rng,
    ) -> (Array3<F>, DecoderCache<F>) {
        let (b, t, _) = x.dim();
        let mut h = crate::kernels::workspace::owned(x);
        let mut caches = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, c) = layer.forward(h.view(), memory, self_mask, memory_mask, rng);
            caches.push(c);
            std::mem::replace(&mut h, y).give_back();
        }
        let (y, norm) = match &self.norm {
            Some(ln) => {
                let (y, c) = ln.forward(flat(h).view());
                (unrows(y, b, t), Some(c))
            }
            None => (h, None),
        };
        (
            y,
            DecoderCache {
                layers: caches,
                norm,
                dims: (b, t, memory.dim().1),
            },
        )
    }

    /// Forward pass without dropout or cache.
    ///
    /// # Panics
    /// As [`Decoder::forward`].
    pub fn infer(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
    ) -> Array3<F> {
        self.infer_with_weights(x, memory, self_mask, memory_mask).0
    }

    /// Forward pass without dropout, with every layer's attention maps.
    ///
    /// # Panics
    /// As [`Decoder::forward`].
    pub fn infer_with_weights(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
    ) -> (Array3<F>, Vec<DecoderLayerWeights<F>>) {
        let (b, t, _) = x.dim();
        let mut h = x.to_owned();
        let mut weights = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, w) = layer.infer_with_weights(h.view(), memory, self_mask, memory_mask);
            weights.push(w);
            h = y;
        }
        if let Some(ln) = &self.norm {
            h = unrows(ln.infer(flat(h).view()), b, t);
        }
        (h, weights)
    }

    /// Starts a step-by-step decode over `memory` `[B, S, d_model]`: projects every layer's
    /// cross-attention keys and values once, with room for `capacity` target positions.
    ///
    /// # Panics
    /// If `memory` is not `[B, S, d_model]`.
    pub fn begin(&self, memory: ArrayView3<F>, capacity: usize) -> DecoderState<F> {
        let b = memory.dim().0;
        DecoderState {
            self_caches: self
                .layers
                .iter()
                .map(|l| l.self_attn.empty_cache(b, capacity))
                .collect(),
            cross: self
                .layers
                .iter()
                .map(|l| l.cross_attn.project_kv(memory))
                .collect(),
            sources: (0..b).collect(),
        }
    }

    /// Inference for the next target positions `x` `[B, Tq, d_model]` of a decode begun with
    /// [`Decoder::begin`]; equal to [`Decoder::infer`] with a causal mask at those rows.
    ///
    /// # Panics
    /// If a shape does not fit or `memory_mask` does not fit `(B, Tq, S)`.
    pub fn infer_step(&self, x: ArrayView3<F>, state: &mut DecoderState<F>, memory_mask: &Mask) -> Array3<F> {
        self.infer_step_packed(x, state, memory_mask, None)
    }

    /// Every layer's weights packed for decoding, with the memory's projections packed too if
    /// `memory` (for [`Decoder::infer_packed`]); `None` where nothing packs
    /// ([`crate::kernels::PackedB`]).
    pub(crate) fn pack_with(&self, memory: bool) -> Option<Vec<PackedDecoderLayer<F>>> {
        self.layers.iter().map(|l| l.pack_with(memory)).collect()
    }

    /// [`Decoder::infer`] with the weights of [`Decoder::pack_with`] (with the memory's
    /// projections packed).
    pub(crate) fn infer_packed(
        &self,
        x: ArrayView3<F>,
        memory: ArrayView3<F>,
        self_mask: &Mask,
        memory_mask: &Mask,
        packed: &[PackedDecoderLayer<F>],
    ) -> Array3<F> {
        let (b, t, _) = x.dim();
        let mut h = crate::kernels::workspace::owned(x);
        for (layer, p) in self.layers.iter().zip(packed) {
            let y = layer.infer_packed(h.view(), memory, self_mask, memory_mask, p);
            std::mem::replace(&mut h, y).give_back();
        }
        if let Some(ln) = &self.norm {
            h = unrows(ln.infer(flat(h).view()), b, t);
        }
        h
    }

    /// [`Decoder::infer_step`] with the weights of [`Decoder::pack_with`] (`None`: the weights as
    /// they are).
    pub(crate) fn infer_step_packed(
        &self,
        x: ArrayView3<F>,
        state: &mut DecoderState<F>,
        memory_mask: &Mask,
        packed: Option<&[PackedDecoderLayer<F>]>,
    ) -> Array3<F> {
        let (b, t, d) = x.dim();
        let runs = self.runs_for(x, state, memory_mask);
        let per = b.div_ceil(runs);
        let seqs = |r: usize| r * per..((r + 1) * per).min(b);
        // Per run of several: its memory mask, and every layer's cross-attention keys and
        // values of its sequences; one run reads the batch's.
        let masks: Vec<Mask> = if runs > 1 {
            (0..runs).map(|r| memory_mask.sequences(b, seqs(r))).collect()
        } else {
            Vec::new()
        };
        let cross: Vec<Vec<KvView<F>>> = (0..runs)
            .map(|r| {
                let all = cross_views(&state.cross, &state.sources);
                if runs > 1 {
                    all.map(|v| v.sequences(seqs(r))).collect()
                } else {
                    all.collect()
                }
            })
            .collect();
        let mut h = step_in_runs(&mut state.self_caches, (b, t, d), runs, |r, seqs, rows| {
            let (x, mask) = (x.slice(s![seqs, .., ..]), masks.get(r).unwrap_or(memory_mask));
            // The first layer reads the input where it lies.
            let mut h: Option<Array3<F>> = None;
            for (i, ((layer, rows), cross)) in self.layers.iter().zip(rows).zip(&cross[r]).enumerate() {
                let input = h.as_ref().map_or(x, |h| h.view());
                h = Some(layer.infer_step_packed(input, rows, *cross, mask, packed.map(|p| &p[i])));
            }
            h.unwrap_or_else(|| x.to_owned())
        });
        if let Some(ln) = &self.norm {
            h = unrows(ln.infer(flat(h).view()), b, t);
        }
        h
    }

    /// Into how many runs of sequences a decoding step of `x` `[B, T, d_model]` is cut
    /// ([`step_runs`]); 1 for none, and for a memory mask that does not fit the batch (left to
    /// the whole step's checks).
    fn runs_for(&self, x: ArrayView3<F>, state: &DecoderState<F>, memory_mask: &Mask) -> usize {
        let (b, t, _) = x.dim();
        let runs = step_runs(b, t);
        let fits = || {
            let s = state.cross.first().map_or(0, |c| c.len());
            state.batch_size() == b && memory_mask.resolve(b, t, s).is_ok()
        };
        if runs < 2 || self.layers.is_empty() || !fits() {
            1
        } else {
            runs
        }
    }

    /// Backward pass: adds the parameter gradients into `g` and returns `(∂L/∂x, ∂L/∂memory)`;
    /// the memory gradient sums the contributions of every layer.
    ///
    /// # Panics
    /// If `grad_y` does not have the output's shape.
    pub fn backward(
        &self,
        cache: &DecoderCache<F>,
        grad_y: ArrayView3<F>,
        g: &mut Decoder<F>,
    ) -> (Array3<F>, Array3<F>) {
        let (b, t, s) = cache.dims;
        let mut grad = match (&self.norm, &cache.norm, &mut g.norm) {
            (Some(ln), Some(c), Some(gn)) => unrows(ln.backward(c, rows(grad_y).view(), &mut gn.p), b, t),
            _ => grad_y.to_owned(),
        };
        let mut grad_memory = crate::kernels::workspace::zeros((b, s, self.cfg.block.d_model));
        for ((layer, c), gl) in self
            .layers
            .iter()
            .zip(&cache.layers)
            .zip(g.layers.iter_mut())
            .rev()
        {
            let (gx, gm) = layer.backward(c, grad.view(), gl);
            crate::kernels::add_assign(grad_memory.view_mut(), gm.view());
            (std::mem::replace(&mut grad, gx), gm).give_back();
        }
        (grad, grad_memory)
    }
}

impl<F: Float> DecoderCache<F> {
    /// The caches of the layers, bottom first.
    pub fn layers(&self) -> &[DecoderLayerCache<F>] {
        &self.layers
    }
}
