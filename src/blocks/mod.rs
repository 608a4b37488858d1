//! Blocks: the encoder and decoder layers of Figure 1, and stacks of N of them.
//!
//! ```text
//! encoder layer   x → Add&Norm(self-attention) → Add&Norm(feed-forward)
//! decoder layer   x → Add&Norm(masked self-attention) → Add&Norm(cross-attention over the
//!                     encoder output) → Add&Norm(feed-forward)
//! ```
//!
//! Each sub-layer sits in a [`Residual`](crate::layers::Residual) connection, post-norm
//! (the paper, §3.1) or pre-norm (`norm_first`). A block's gradients have the block's own
//! type: `let mut g = layer.zeros_like()` ([`Params::zeros_like`](crate::Params)) gives a
//! zeroed copy whose tensors `backward` adds into, under the same dotted names
//! (`self_attn.w_q`, `norm1.gamma`, `ffn.w1`, …). Blocks take and return `[B, T, d_model]`
//! arrays; inside, position-wise layers see `[B·T, d_model]` rows.

pub mod decoder;
pub mod decoder_layer;
pub mod encoder;
pub mod encoder_layer;

pub use decoder::{Decoder, DecoderCache, DecoderConfig, DecoderState};
pub use decoder_layer::{DecoderLayer, DecoderLayerCache, DecoderLayerConfig, DecoderLayerWeights};
pub use encoder::{Encoder, EncoderCache, EncoderConfig};
pub use encoder_layer::{EncoderLayer, EncoderLayerCache, EncoderLayerConfig};

use std::sync::Mutex;

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis, CowArray, Ix2, Ix3, s};

use crate::error::{Result, check};
use crate::kernels::parallel::for_each_split_mut;
use crate::kernels::{Activation, Float, filled};
use crate::layers::kv_cache::KvRows;
use crate::layers::{KvCache, Mask};

/// The sizes and switches shared by every layer of a stack; PyTorch's
/// `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer` arguments.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BlockConfig {
    /// Model width d_model.
    pub d_model: usize,
    /// Attention heads h.
    pub n_heads: usize,
    /// Inner width of the feed-forward layer d_ff.
    pub d_ff: usize,
    /// Dropout rate, used on every sub-layer output, on the attention weights and inside the
    /// feed-forward layer, as PyTorch's `dropout` (the paper's P_drop = 0.1, §5.4).
    pub p_drop: f32,
    /// The feed-forward activation.
    pub activation: Activation,
    /// `false`: post-norm, `LayerNorm(x + Sublayer(x))` (the paper); `true`: pre-norm.
    pub norm_first: bool,
    /// Layer-norm ε.
    pub eps: f32,
    /// Whether the linear projections have biases.
    pub bias: bool,
}

impl BlockConfig {
    /// A block of the given sizes with PyTorch's defaults: dropout 0.1, ReLU, post-norm,
    /// ε = 1e-5, biases.
    pub fn new(d_model: usize, n_heads: usize, d_ff: usize) -> Self {
        BlockConfig {
            d_model,
            n_heads,
            d_ff,
            p_drop: 0.1,
            activation: Activation::Relu,
            norm_first: false,
            eps: 1e-5,
            bias: true,
        }
    }

    /// The same config with dropout `p`.
    pub fn with_p_drop(mut self, p: f32) -> Self {
        self.p_drop = p;
        self
    }

    /// The same config with another activation.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// The same config, pre-norm (`true`) or post-norm (`false`).
    pub fn with_norm_first(mut self, norm_first: bool) -> Self {
        self.norm_first = norm_first;
        self
    }

    /// The same config with another layer-norm ε.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// The same config with biases on or off.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for a zero size, d_model not
    /// divisible by n_heads, dropout outside [0, 1), or ε not finite and positive.
    pub fn check(&self) -> Result<()> {
        check::heads(self.d_model, self.n_heads)?;
        check::positive("d_ff", self.d_ff)?;
        check::dropout("p_drop", self.p_drop)?;
        check::eps("eps", self.eps)
    }

    /// The number of parameters of an encoder layer (self-attention, feed-forward, two
    /// layer norms), in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn encoder_layer_params(&self) -> f64 {
        self.attention().params() + self.feed_forward().params() + 2.0 * self.norm().params()
    }

    /// The number of parameters of a decoder layer (self-attention, cross-attention,
    /// feed-forward, three layer norms).
    pub fn decoder_layer_params(&self) -> f64 {
        2.0 * self.attention().params() + self.feed_forward().params() + 3.0 * self.norm().params()
    }

    /// FLOPs of an encoder layer's forward pass over one sequence of `t` positions (see
    /// [`MultiHeadConfig::flops`](crate::layers::MultiHeadConfig::flops) and
    /// [`FeedForwardConfig::flops`](crate::layers::FeedForwardConfig::flops)).
    pub fn encoder_layer_flops(&self, t: usize) -> f64 {
        self.attention().flops(t, t) + self.feed_forward().flops(t)
    }

    /// FLOPs of a decoder layer's forward pass over one sequence of `t` target positions and
    /// a memory of `s`.
    pub fn decoder_layer_flops(&self, t: usize, s: usize) -> f64 {
        let attention = self.attention();
        attention.flops(t, t) + attention.flops(t, s) + self.feed_forward().flops(t)
    }

    pub(crate) fn norm(&self) -> crate::layers::LayerNormConfig {
        crate::layers::LayerNormConfig::new(self.d_model).with_eps(self.eps)
    }

    pub(crate) fn attention(&self) -> crate::layers::MultiHeadConfig {
        crate::layers::MultiHeadConfig::new(self.d_model, self.n_heads)
            .with_p_drop(self.p_drop)
            .with_bias(self.bias)
    }

    pub(crate) fn feed_forward(&self) -> crate::layers::FeedForwardConfig {
        crate::layers::FeedForwardConfig::new(self.d_model, self.d_ff)
            .with_activation(self.activation)
            .with_p_drop(self.p_drop)
            .with_bias(self.bias)
    }

    pub(crate) fn residual(&self) -> crate::layers::ResidualConfig {
        crate::layers::ResidualConfig::new(self.d_model)
            .with_norm_first(self.norm_first)
            .with_p_drop(self.p_drop)
            .with_eps(self.eps)
    }
}

impl Default for BlockConfig {
    /// The paper's base layer (Table 3): d_model = 512, h = 8, d_ff = 2048, P_drop = 0.1,
    /// ReLU, post-norm, ε = 1e-5, biases ([`BlockConfig::new`]`(512, 8, 2048)`).
    fn default() -> Self {
        BlockConfig::new(512, 8, 2048)
    }
}

/// Whether a stack ends with a LayerNorm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum FinalNorm {
    /// The right choice for the norm placement: a pre-norm stack ends with a LayerNorm (its
    /// residual stream is never normalised otherwise), a post-norm stack does not (its last
    /// sub-layer already normalised).
    #[default]
    Auto,
    /// Always: what PyTorch's `nn.Transformer` builds, even for post-norm (two LayerNorms in
    /// a row; pytorch/pytorch#74092).
    Always,
    /// Never.
    Never,
}

impl FinalNorm {
    /// Whether a stack with this setting and norm placement ends with a LayerNorm.
    pub fn present(self, norm_first: bool) -> bool {
        match self {
            FinalNorm::Auto => norm_first,
            FinalNorm::Always => true,
            FinalNorm::Never => false,
        }
    }
}

/// `x` (`[B, T, d]`, the keys of `mask`) with the positions the mask marks as padding zeroed,
/// in a copy made only when one of them holds a non-finite value; `x` itself otherwise.
///
/// Padding never reaches a real position forward (attention skips or zeroes those keys), but
/// its rows are computed, and the weight gradients sum products over every row: `xᵀ·∂L/∂y`,
/// where `∂L/∂y` is 0 on padded rows, would turn a NaN there into a NaN in every weight's
/// gradient (`0·NaN`). Zeroed, a padded row is finite all the way through the block.
pub(crate) fn clean_padding<'a, F: Float>(x: ArrayView3<'a, F>, mask: &Mask) -> CowArray<'a, F, Ix3> {
    let dirty = |bi: usize, j: usize| x.slice(s![bi, j, ..]).iter().any(|v| !v.is_finite());
    let (b, t, _) = x.dim();
    let padded = || {
        (0..b)
            .flat_map(|bi| (0..t).map(move |j| (bi, j)))
            .filter(|&(bi, j)| mask.is_padding(bi, j))
    };
    if mask.is_none() || !padded().any(|(bi, j)| dirty(bi, j)) {
        return CowArray::from(x);
    }
    let mut clean = x.to_owned();
    for (bi, j) in padded() {
        clean.slice_mut(s![bi, j, ..]).fill(F::ZERO);
    }
    CowArray::from(clean)
}

/// `[B, T, d]` as `[B·T, d]` rows, without a copy when the input is in standard layout.
pub(crate) fn rows<F: Float>(x: ArrayView3<'_, F>) -> CowArray<'_, F, Ix2> {
    let (b, t, d) = x.dim();
    match x.to_slice() {
        Some(_) => CowArray::from(x.into_shape_with_order((b * t, d)).expect("standard layout")),
        None => CowArray::from(
            x.as_standard_layout()
                .into_owned()
                .into_shape_with_order((b * t, d))
                .expect("standard layout"),
        ),
    }
}

/// An owned `[B, T, d]` as `[B·T, d]` rows (no copy for standard layout).
pub(crate) fn flat<F: Float>(x: Array3<F>) -> Array2<F> {
    let (b, t, d) = x.dim();
    let x = if x.is_standard_layout() {
        x
    } else {
        x.as_standard_layout().into_owned()
    };
    x.into_shape_with_order((b * t, d)).expect("standard layout")
}

/// `[B·T, d]` rows as `[B, T, d]`.
pub(crate) fn unrows<F: Float>(x: Array2<F>, b: usize, t: usize) -> Array3<F> {
    let d = x.ncols();
    x.into_shape_with_order((b, t, d)).expect("standard layout")
}

/// A standard-layout rows view as `[B, T, d]`.
pub(crate) fn view3<F: Float>(x: ArrayView2<'_, F>, b: usize, t: usize) -> ArrayView3<'_, F> {
    let d = x.ncols();
    x.into_shape_with_order((b, t, d))
        .expect("rows in standard layout")
}

/// The fewest rows (sequences times new positions) a run of a decoding step takes on a thread
/// of its own ([`step_in_runs`]): each run reads every weight, so runs of fewer rows pay more
/// for the weights' reads than they save in waits (the `base` reference workload's 8
/// sequences decode faster with its products cut by columns).
const STEP_RUN_ROWS: usize = 8;

/// Into how many runs of sequences [`step_in_runs`] cuts a decoding step of `b` sequences of
/// `t` new positions: one a thread of the team, [`STEP_RUN_ROWS`] rows each at least; 1 for
/// none.
pub(crate) fn step_runs(b: usize, t: usize) -> usize {
    let runs = crate::kernels::parallel::threads()
        .min(b)
        .min(b * t / STEP_RUN_ROWS)
        .max(1);
    // As many runs as cutting into runs of `per` sequences makes (5 sequences in 4 runs are
    // 2 + 2 + 1: three).
    if b == 0 { 1 } else { b.div_ceil(b.div_ceil(runs)) }
}

/// A decoding step of `b` sequences of `t` new positions (of width `d`) cut into `runs` runs
/// of sequences, each taken through every layer by a thread of the team: `step(r, seqs,
/// rows)` steps run `r`, the sequences `seqs`, with `rows` each layer's cache of those
/// sequences, and returns their output `[seqs, T, d]`. Between the step's products no thread
/// waits for another: their rows, layer norms and attention are each sequence's own. The
/// caches count the new positions once every run has appended them. Each element's
/// arithmetic is the whole step's, so the bits are. With `runs` below 2 the whole batch is
/// one run, on the calling thread's loops, its output returned as `step` gives it.
///
/// Measured on an AMD EPYC Zen 3, two threads, against every loop of the step cut between
/// them (about 25 a step, each ending in a wait), builds alternating: small greedy decode
/// 61.3–62.1 → 58.0–58.8 ms and tiny 2.53–2.56 → 1.98–2.02 ms in a slow minute of the host,
/// small 53.8–56.0 → 53.7–55.2 and tiny 1.92–1.97 → 1.58–1.74 in a fast one; two processes
/// decoding half the small batch each, one thread apiece, took 53.0–54.1 ms then.
pub(crate) fn step_in_runs<F: Float>(
    caches: &mut [KvCache<F>],
    (b, t, d): (usize, usize, usize),
    runs: usize,
    step: impl Fn(usize, std::ops::Range<usize>, &mut [KvRows<'_, F>]) -> Array3<F> + Sync,
) -> Array3<F> {
    if runs < 2 {
        let mut rows: Vec<KvRows<F>> = caches.iter_mut().map(|c| c.rows_mut(t)).collect();
        let out = step(0, 0..b, &mut rows);
        drop(rows);
        for cache in caches {
            cache.advance(t);
        }
        return out;
    }
    let per = b.div_ceil(runs);
    let mut lent: Vec<Vec<KvRows<F>>> = (0..runs).map(|_| Vec::with_capacity(caches.len())).collect();
    for cache in caches.iter_mut() {
        for (r, rows) in cache.runs_mut(t, per).into_iter().enumerate() {
            lent[r].push(rows);
        }
    }
    let lent: Vec<Mutex<Option<Vec<KvRows<F>>>>> = lent.into_iter().map(|l| Mutex::new(Some(l))).collect();
    // SAFETY: the runs cover every row of the output, each writing all of its own.
    let out = unsafe {
        filled((b * t, d), |out| {
            for_each_split_mut(out, Axis(0), runs, per * t, |range, mut out| {
                let r = range.start / (per * t);
                let mut rows = lent[r]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .expect("each run is stepped once");
                let seqs = r * per..((r + 1) * per).min(b);
                out.assign(&flat(step(r, seqs, &mut rows)));
            })
        })
    };
    drop(lent);
    for cache in caches {
        cache.advance(t);
    }
    unrows(out, b, t)
}
