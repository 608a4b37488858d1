//! Position-wise feed-forward network: `FFN(x) = act(x·W1ᵀ + b1)·W2ᵀ + b2` (Eq. 2, §3.3).
//!
//! "Two linear transformations with a ReLU activation in between", applied to each position
//! separately and identically (§3.3): rows `[N, d_model]`, N usually B·T, are widened to
//! `d_ff` and projected back. The base model has `d_model = 512`, `d_ff = 2048`. As in
//! PyTorch, dropout is applied to the inner activation:
//!
//! ```text
//! h = x·W1ᵀ + b1          [N, d_ff]      pre-activation
//! a = Dropout(act(h))     [N, d_ff]      input of the second projection
//! y = a·W2ᵀ + b2          [N, d_model]
//! ```
//!
//! The weights are stored `[out, in]` as PyTorch's `nn.Linear` stores them (W1 `[d_ff,
//! d_model]`, W2 `[d_model, d_ff]`), so the paper's `x·W1` is `x·W1ᵀ` here; the two
//! projections are [`affine`] and [`affine_backward`], the arithmetic of
//! [`Linear`](crate::layers::Linear).
//!
//! Backward, for `grad_y = ∂L/∂y` and the dropout mask m' (`0` or `1/(1 − p)`):
//! `∂L/∂a = grad_y·W2`, `∂L/∂W2 = grad_yᵀ·a`, `∂L/∂b2 = Σ_rows grad_y`;
//! `∂L/∂h = ∂L/∂a ⊙ m' ⊙ act'(h)`;
//! `∂L/∂x = ∂L/∂h·W1`, `∂L/∂W1 = (∂L/∂h)ᵀ·x`, `∂L/∂b1 = Σ_rows ∂L/∂h`.
//!
//! PyTorch equivalent: the `linear1`, `activation`, `dropout` and `linear2` of
//! `nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=d_ff, dropout=p_drop,
//! activation=...)`, that is `linear2(dropout(activation(linear1(x))))`; `w1`, `b1`, `w2`,
//! `b2` are `linear1.weight`, `linear1.bias`, `linear2.weight`, `linear2.bias`.
//!
//! Differences from the paper: the paper has no dropout inside the feed-forward layer (its
//! §5.4 dropout is on sub-layer outputs, which [`Residual`](crate::layers::Residual)
//! applies); PyTorch adds this one, at the rate of its other dropouts (tensor2tensor has it
//! too, as a separate `relu_dropout`). `p_drop = 0` gives the paper's layer. GELU is
//! offered beside the paper's ReLU. Initialisation: W1 and W2 are Xavier-uniform, as
//! `nn.Transformer` resets them; the biases start at 0, where PyTorch keeps `nn.Linear`'s
//! `U(±1/√fan_in)`.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array2;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::Params;
//! use vaswani::gradcheck::random_like;
//! use vaswani::kernels::Activation;
//! use vaswani::layers::FeedForwardConfig;
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let ffn = FeedForwardConfig::new(8, 32)
//!     .with_activation(Activation::Gelu)
//!     .init(&mut rng)?;
//! let x: Array2<f32> = random_like((6, 8), &mut rng);
//!
//! // Training: dropout on the inner activation, with a mask drawn from `rng`.
//! let (y, cache) = ffn.forward(x.view(), &mut rng);
//! assert_eq!(y.dim(), (6, 8));
//! let mut grads = ffn.p.zeros_like();
//! let grad_x = ffn.backward(&cache, Array2::ones((6, 8)).view(), &mut grads);
//! assert_eq!(grad_x.dim(), (6, 8));
//! assert_eq!(grads.shapes()[0], ("w1".to_string(), vec![32, 8]));
//!
//! // Inference: no dropout.
//! let y = ffn.infer(x.view());
//! assert!(y.iter().all(|v| v.is_finite()));
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2};
use rand::Rng;

use crate::error::{Result, check};
use crate::kernels::gemm::{Fused, gemm_fused};
use crate::kernels::parallel::{Disjoint, for_each_chunk_mut};
use crate::kernels::simd::widest;
use crate::kernels::workspace::Recycle;
use crate::kernels::{Activation, Float, PackedB, filled, gemm_bias, gemm_packed};
use crate::layers::dropout::{Dropout, DropoutCache, DropoutConfig};
use crate::layers::linear::{affine, affine_backward, weights_beside};
use crate::params::xavier_uniform;

/// Configuration of a [`FeedForward`] layer.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FeedForwardConfig {
    /// Width of the input and output rows.
    pub d_model: usize,
    /// Width of the inner layer (2048 in the base model).
    pub d_ff: usize,
    /// The non-linearity between the projections; ReLU in the paper.
    pub activation: Activation,
    /// Dropout rate on the inner activation, in [0, 1); PyTorch's default is 0.1.
    pub p_drop: f32,
    /// Whether both projections add a bias (b1, b2).
    pub bias: bool,
}

/// Parameters of a [`FeedForward`] layer (and, with the same type, their gradients).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(bound = ""))]
pub struct FeedForwardParams<F: Float = f32> {
    /// W1, `[d_ff, d_model]` (PyTorch's `linear1.weight`).
    pub w1: Array2<F>,
    /// b1, `[d_ff]`; `None` without bias (PyTorch's `linear1.bias`).
    pub b1: Option<Array1<F>>,
    /// W2, `[d_model, d_ff]` (PyTorch's `linear2.weight`).
    pub w2: Array2<F>,
    /// b2, `[d_model]`; `None` without bias (PyTorch's `linear2.bias`).
    pub b2: Option<Array1<F>>,
}
crate::impl_params!(FeedForwardParams { w1, b1, w2, b2 });

/// The position-wise feed-forward network `act(x·W1ᵀ + b1)·W2ᵀ + b2` (Eq. 2, §3.3). See the
/// [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct FeedForward<F: Float = f32> {
    /// Its configuration.
    pub cfg: FeedForwardConfig,
    /// Its parameters.
    pub p: FeedForwardParams<F>,
    /// The dropout on the inner activation, of rate `cfg.p_drop`.
    pub dropout: Dropout,
}
crate::delegate_params!(FeedForward => p);

/// What [`FeedForward::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct FeedForwardCache<F: Float = f32> {
    /// The input x, `[N, d_model]`.
    x: Array2<F>,
    /// The activation's slope at the pre-activation h = x·W1ᵀ + b1, act′(h), `[N, d_ff]`,
    /// computed beside act(h) in the forward pass; `None` for ReLU, whose derivative (1 where
    /// a > 0) comes from a.
    slope: Option<Array2<F>>,
    /// The input of the second projection, a = Dropout(act(h)), `[N, d_ff]`.
    a: Array2<F>,
    /// The dropout mask.
    dropout: DropoutCache<F>,
}
crate::kernels::workspace::impl_recycle!(FeedForwardCache<F: Float> { x, slope, a, dropout });

/// W1 and W2 of a [`FeedForward`] packed once for the many products of a decode
/// ([`crate::kernels::PackedB`]); made by [`FeedForward::pack`], valid while the layer is
/// borrowed.
#[derive(Clone, Debug)]
pub(crate) struct PackedFeedForward {
    w1: PackedB,
    w2: PackedB,
}

impl PackedFeedForward {
    /// The bytes of its packed weights.
    pub(crate) fn bytes(&self) -> usize {
        self.w1.bytes() + self.w2.bytes()
    }
}

impl FeedForwardConfig {
    /// Its number of parameters, W₁, W₂ and their biases, in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn params(&self) -> f64 {
        let (d, f) = (self.d_model as f64, self.d_ff as f64);
        2.0 * d * f + if self.bias { f + d } else { 0.0 }
    }

    /// FLOPs of a forward pass over `tokens` rows: `4 · d_model · d_ff` per row (Eq. 2's two
    /// products; the activation is not counted).
    pub fn flops(&self, tokens: usize) -> f64 {
        4.0 * self.d_model as f64 * self.d_ff as f64 * tokens as f64
    }

    /// A layer of widths `d_model` → `d_ff` → `d_model`, with PyTorch's defaults for the
    /// rest: ReLU, `p_drop = 0.1`, biases.
    pub fn new(d_model: usize, d_ff: usize) -> Self {
        FeedForwardConfig {
            d_model,
            d_ff,
            activation: Activation::Relu,
            p_drop: 0.1,
            bias: true,
        }
    }

    /// The same config with another activation.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// The same config with another dropout rate.
    pub fn with_p_drop(mut self, p_drop: f32) -> Self {
        self.p_drop = p_drop;
        self
    }

    /// The same config with the biases switched on or off.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`FeedForwardConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`FeedForwardConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<FeedForward> {
        self.init_as(rng)
    }

    /// Builds the layer: W1 then W2 Xavier-uniform, each with its own fan-in and fan-out
    /// (as `nn.Transformer` initialises them), biases zero.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if a width is 0 or `p_drop` is
    /// not in [0, 1).
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<FeedForward<F>> {
        check::positive("d_model", self.d_model)?;
        check::positive("d_ff", self.d_ff)?;
        check::tensor("d_ff", &[2, self.d_ff, self.d_model], size_of::<F>())?;
        check::dropout("p_drop", self.p_drop)?;
        let (d_model, d_ff) = (self.d_model, self.d_ff);
        let w1 = xavier_uniform((d_ff, d_model), d_model, d_ff, rng);
        let w2 = xavier_uniform((d_model, d_ff), d_ff, d_model, rng);
        Ok(FeedForward {
            cfg: self.clone(),
            p: FeedForwardParams {
                w1,
                b1: self.bias.then(|| Array1::zeros(d_ff)),
                w2,
                b2: self.bias.then(|| Array1::zeros(d_model)),
            },
            dropout: DropoutConfig::new(self.p_drop).init()?,
        })
    }
}

impl<F: Float> FeedForward<F> {
    /// Forward pass in training: dropout on the inner activation with a mask drawn from
    /// `rng`, keeping x, h, a and the mask for [`FeedForward::backward`].
    ///
    /// # Shapes
    /// `x`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `x` is not `[N, d_model]`, or the parameters do not have the config's shapes.
    pub fn forward(&self, x: ArrayView2<F>, rng: &mut impl Rng) -> (Array2<F>, FeedForwardCache<F>) {
        self.check_input(x);
        let dropout = self.dropout.draw((x.nrows(), self.cfg.d_ff), rng);
        let (slope, a) = if self.cfg.activation == Activation::Relu {
            // a = Dropout(ReLU(x·W1ᵀ + b1)) in the GEMM's stores, the mask by its key.
            let post = Fused {
                bias: self.p.b1.as_ref().map(|b| b.view()),
                relu: true,
                dropout: dropout.key(),
                gate: None,
            };
            self.check_w1(x);
            // SAFETY: gemm_fused writes every element.
            let a = unsafe {
                filled((x.nrows(), self.cfg.d_ff), |a| {
                    gemm_fused(x, self.p.w1.t(), post, a)
                })
            };
            (None, a)
        } else {
            // act(h) and act′(h) in one pass over h, which becomes the slope: GELU's erf once
            // for both, and the backward pass a multiplication.
            let mut h = self.pre_activation(x);
            let mut a = activate_keeping_slope(self.cfg.activation, &mut h);
            dropout.apply_inplace(a.view_mut());
            (Some(h), a)
        };
        let y = affine(a.view(), self.p.w2.view(), self.p.b2.as_ref().map(|b| b.view()));
        let cache = FeedForwardCache {
            x: crate::kernels::workspace::owned(x),
            slope,
            a,
            dropout,
        };
        (y, cache)
    }

    /// Forward pass without a cache and without dropout, for inference.
    ///
    /// # Shapes
    /// `x`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `x` is not `[N, d_model]`, or the parameters do not have the config's shapes.
    pub fn infer(&self, x: ArrayView2<F>) -> Array2<F> {
        self.check_input(x);
        let a = self.hidden(x);
        affine(a.view(), self.p.w2.view(), self.p.b2.as_ref().map(|b| b.view()))
    }

    /// W1 and W2 packed for decoding; `None` where nothing packs (see [`PackedB`]).
    pub(crate) fn pack(&self) -> Option<PackedFeedForward> {
        Some(PackedFeedForward {
            w1: PackedB::new(self.p.w1.t())?,
            w2: PackedB::new(self.p.w2.t())?,
        })
    }

    /// [`FeedForward::infer`] with the weights of [`FeedForward::pack`] (`None`: the weights
    /// as they are).
    pub(crate) fn infer_packed(&self, x: ArrayView2<F>, packed: Option<&PackedFeedForward>) -> Array2<F> {
        let Some(packed) = packed else {
            return self.infer(x);
        };
        self.check_input(x);
        let (n, d_ff, d) = (x.nrows(), self.cfg.d_ff, self.cfg.d_model);
        let (b1, b2) = (
            self.p.b1.as_ref().map(|b| b.view()),
            self.p.b2.as_ref().map(|b| b.view()),
        );
        let a = if self.cfg.activation == Activation::Relu {
            // SAFETY: gemm_packed writes every element.
            unsafe { filled((n, d_ff), |a| gemm_packed(x, &packed.w1, b1, true, a)) }
        } else {
            // SAFETY: as above.
            let h = unsafe { filled((n, d_ff), |h| gemm_packed(x, &packed.w1, b1, false, h)) };
            activate(self.cfg.activation, h)
        };
        // SAFETY: as above.
        unsafe { filled((n, d), |y| gemm_packed(a.view(), &packed.w2, b2, false, y)) }
    }

    /// `act(x·W1ᵀ + b1)` without dropout: for ReLU in the product's stores, else the
    /// activation applied in place to the product.
    fn hidden(&self, x: ArrayView2<F>) -> Array2<F> {
        if self.cfg.activation == Activation::Relu {
            let (w1, b1) = (self.p.w1.view(), self.p.b1.as_ref().map(|b| b.view()));
            self.check_w1(x);
            // SAFETY: gemm_bias writes every element.
            return unsafe { filled((x.nrows(), w1.nrows()), |a| gemm_bias(x, w1.t(), b1, true, a)) };
        }
        activate(self.cfg.activation, self.pre_activation(x))
    }

    /// The pre-activation `h = x·W1ᵀ + b1`, `[N, d_ff]`, for an activation with a pass of its
    /// own.
    fn pre_activation(&self, x: ArrayView2<F>) -> Array2<F> {
        self.check_w1(x);
        affine(x, self.p.w1.view(), self.p.b1.as_ref().map(|b| b.view()))
    }

    /// Backward pass: adds `∂L/∂W1`, `∂L/∂b1`, `∂L/∂W2`, `∂L/∂b2` into `g` and returns
    /// `∂L/∂x`.
    ///
    /// # Shapes
    /// `grad_y`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `grad_y` is not `[N, d_model]` for the N of the forward pass, or `g` has other
    /// shapes (or other biases) than the parameters.
    pub fn backward(
        &self,
        cache: &FeedForwardCache<F>,
        grad_y: ArrayView2<F>,
        g: &mut FeedForwardParams<F>,
    ) -> Array2<F> {
        assert_eq!(
            grad_y.dim(),
            cache.x.dim(),
            "FeedForward::backward: grad_y is {:?}, expected the forward output's {:?}",
            grad_y.shape(),
            cache.x.shape()
        );
        assert!(
            g.b1.is_some() == self.p.b1.is_some() && g.b2.is_some() == self.p.b2.is_some(),
            "FeedForward::backward: g has biases (b1 {}, b2 {}), the layer (b1 {}, b2 {})",
            g.b1.is_some(),
            g.b2.is_some(),
            self.p.b1.is_some(),
            self.p.b2.is_some()
        );
        let grad_h = match &cache.slope {
            // ReLU: ∂L/∂h = (grad_y·W2) ⊙ mask ⊙ [h > 0] = (grad_y·W2) · scale where a > 0 (a
            // kept entry of a positive h), else 0: a gate on the GEMM's stores, with no mask
            // and no pass of its own.
            None => {
                let scale = cache.dropout.key().map_or(F::ONE, |k| k.scale());
                let post = Fused {
                    gate: Some((cache.a.view(), scale)),
                    ..Fused::none()
                };
                let (w2, b2) = (g.w2.view_mut(), g.b2.as_mut().map(|b| b.view_mut()));
                // SAFETY: gemm_fused writes every element.
                unsafe {
                    filled(cache.a.dim(), |gh| {
                        weights_beside(cache.a.view(), grad_y, w2, b2, || {
                            gemm_fused(grad_y, self.p.w2.view(), post, gh)
                        })
                    })
                }
            }
            // ∂L/∂a, then ∂L/∂h in place: ⊙ mask, ⊙ act′(h).
            Some(slope) => {
                let mut grad_h = affine_backward(
                    cache.a.view(),
                    self.p.w2.view(),
                    grad_y,
                    g.w2.view_mut(),
                    g.b2.as_mut().map(|b| b.view_mut()),
                );
                cache.dropout.apply_inplace(grad_h.view_mut());
                let gh = grad_h.as_slice_mut().expect("standard layout");
                let slope = slope.as_slice().expect("standard layout");
                for_each_chunk_mut(gh, 1, gh.len(), |at, gh| {
                    widest!({
                        for (g, &s) in gh.iter_mut().zip(&slope[at..]) {
                            *g *= s;
                        }
                    })
                });
                grad_h
            }
        };
        let grad_x = affine_backward(
            cache.x.view(),
            self.p.w1.view(),
            grad_h.view(),
            g.w1.view_mut(),
            g.b1.as_mut().map(|b| b.view_mut()),
        );
        grad_h.give_back();
        grad_x
    }

    /// Panics unless W1 takes rows of `x`'s width, naming both shapes.
    fn check_w1(&self, x: ArrayView2<F>) {
        assert_eq!(
            self.p.w1.ncols(),
            x.ncols(),
            "FeedForward: W1 is {:?} for x {:?}",
            self.p.w1.shape(),
            x.shape()
        );
    }

    fn check_input(&self, x: ArrayView2<F>) {
        assert_eq!(
            x.ncols(),
            self.cfg.d_model,
            "FeedForward: input is {:?}, expected [N, d_model = {}]",
            x.shape(),
            self.cfg.d_model
        );
    }
}

/// `act(h)` element-wise in place, on the rayon pool for large arrays (each element on its
/// own, so the result does not depend on the thread count).
fn activate<F: Float>(act: Activation, mut h: Array2<F>) -> Array2<F> {
    let len = h.len();
    let slice = h.as_slice_mut().expect("standard layout");
    // In vector registers where the CPU has them (GELU's erf and exponential are fused
    // multiply-adds: `Float::erf`, `Float::exp_vector`).
    for_each_chunk_mut(slice, 1, 16 * len, |_, chunk| widest!(act.apply_all(chunk)));
    h
}

/// `act(h)` element-wise, returned, and `h ← act′(h)` in place, in one pass
/// ([`Activation::apply_keeping_derivative`]), on the rayon pool as [`activate`].
fn activate_keeping_slope<F: Float>(act: Activation, h: &mut Array2<F>) -> Array2<F> {
    let (dim, len) = (h.dim(), h.len());
    let h = h.as_slice_mut().expect("standard layout");
    let fill = |mut a: ArrayViewMut2<F>| {
        let a = Disjoint::new(a.as_slice_mut().expect("standard layout"));
        for_each_chunk_mut(h, 1, 16 * len, |at, h| {
            // SAFETY: the chunks are disjoint ranges of `h`, and so these ranges of `a` are.
            let a = unsafe { a.range(at, h.len()) };
            widest!(act.apply_keeping_derivative(h, a))
        });
    };
    // SAFETY: the chunks of `h` cover it, so their ranges of `a` write every element.
    unsafe { filled(dim, fill) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::params::{Params, Tensors};
    use rand::{SeedableRng, rngs::StdRng};

    /// Checks x and every parameter of `layer` against finite differences, with the dropout
    /// mask fixed by re-seeding the rng in the loss.
    fn check_gradients(layer: &FeedForward<f64>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x: Array2<f64> = random_like((4, layer.cfg.d_model), &mut rng);
        let r: Array2<f64> = random_like((4, layer.cfg.d_model), &mut rng);
        let mask_seed = seed + 1000;
        let (_, cache) = layer.forward(x.view(), &mut StdRng::seed_from_u64(mask_seed));
        let mut g = layer.p.zeros_like();
        let grad_x = layer.backward(&cache, r.view(), &mut g);
        let mut point = (Tensors::new().with("x", x), layer.p.clone());
        let analytic = (Tensors::new().with("x", grad_x), g);
        let report = GradCheck::default().run(&mut point, &analytic, |(t, p)| {
            let layer = FeedForward {
                cfg: layer.cfg.clone(),
                p: p.clone(),
                dropout: layer.dropout.clone(),
            };
            let x = t.get("x").view().into_dimensionality().unwrap();
            let (y, _) = layer.forward(x, &mut StdRng::seed_from_u64(mask_seed));
            (&y * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero();
    }

    #[test]
    fn gradients_match_finite_differences_for_every_activation_with_dropout() {
        for (i, act) in [Activation::Relu, Activation::Gelu, Activation::GeluTanh]
            .into_iter()
            .enumerate()
        {
            let mut rng = StdRng::seed_from_u64(50 + i as u64);
            let mut layer = FeedForwardConfig::new(5, 7)
                .with_activation(act)
                .with_p_drop(0.3)
                .init_as::<f64>(&mut rng)
                .unwrap();
            // Non-zero biases, so that a bias missing from forward or backward shows.
            layer.p.b1 = Some(random_like(7, &mut rng) * 0.5);
            layer.p.b2 = Some(random_like(5, &mut rng) * 0.5);
            check_gradients(&layer, 60 + i as u64);
        }
    }

    #[test]
    fn without_bias() {
        let mut rng = StdRng::seed_from_u64(53);
        let layer = FeedForwardConfig::new(5, 7)
            .with_bias(false)
            .with_p_drop(0.3)
            .init_as::<f64>(&mut rng)
            .unwrap();
        assert_eq!(
            layer.p.shapes(),
            [("w1".to_string(), vec![7, 5]), ("w2".to_string(), vec![5, 7])]
        );
        check_gradients(&layer, 63);
        // Without biases, FFN(0) = 0.
        assert!(
            layer
                .infer(Array2::zeros((2, 5)).view())
                .iter()
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn infer_equals_forward_without_dropout() {
        let mut rng = StdRng::seed_from_u64(54);
        for act in [Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
            let layer = FeedForwardConfig::new(6, 10)
                .with_activation(act)
                .with_p_drop(0.0)
                .init(&mut rng)
                .unwrap();
            let x: Array2<f32> = random_like((5, 6), &mut rng);
            let (y, _) = layer.forward(x.view(), &mut rng);
            assert_eq!(y, layer.infer(x.view()));
        }
    }

    #[test]
    fn nan_in_the_input_or_in_w1_reaches_the_output() {
        // A NaN must not come out as the finite bias of the second layer, on any path
        // (forward, infer, packed; the fused ReLU stores and the others).
        let mut rng = StdRng::seed_from_u64(55);
        for act in [Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
            for d_ff in [10, 64] {
                let mut layer = FeedForwardConfig::new(6, d_ff)
                    .with_activation(act)
                    .with_p_drop(0.0)
                    .init(&mut rng)
                    .unwrap();
                let mut x: Array2<f32> = random_like((5, 6), &mut rng);
                x[[2, 3]] = f32::NAN;
                let (y, _) = layer.forward(x.view(), &mut rng);
                let nan_rows = |y: &Array2<f32>| -> Vec<bool> {
                    y.rows()
                        .into_iter()
                        .map(|r| r.iter().all(|v| v.is_nan()))
                        .collect()
                };
                let want = vec![false, false, true, false, false];
                assert_eq!(nan_rows(&y), want, "{act:?} forward");
                assert_eq!(nan_rows(&layer.infer(x.view())), want, "{act:?} infer");
                if let Some(packed) = layer.pack() {
                    assert_eq!(
                        nan_rows(&layer.infer_packed(x.view(), Some(&packed))),
                        want,
                        "{act:?} packed"
                    );
                }
                x[[2, 3]] = 0.5;
                layer.p.w1[[0, 0]] = f32::NAN;
                let (y, _) = layer.forward(x.view(), &mut rng);
                assert!(y.iter().all(|v| v.is_nan()), "{act:?}: NaN in W1 lost");
            }
        }
    }

    #[test]
    fn names_shapes_and_xavier_bounds() {
        let layer = FeedForwardConfig::new(8, 32)
            .init(&mut StdRng::seed_from_u64(55))
            .unwrap();
        assert_eq!(
            layer.p.shapes(),
            [
                ("w1".to_string(), vec![32, 8]),
                ("b1".to_string(), vec![32]),
                ("w2".to_string(), vec![8, 32]),
                ("b2".to_string(), vec![8]),
            ]
        );
        let a = (6.0_f32 / 40.0).sqrt();
        for w in [&layer.p.w1, &layer.p.w2] {
            assert!(w.iter().all(|v| v.abs() <= a));
            assert!(w.iter().any(|v| v.abs() > 0.9 * a));
        }
        assert!(layer.p.b1.as_ref().unwrap().iter().all(|&v| v == 0.0));
    }

    /// The fused ReLU-dropout (mask computed in the GEMM's stores from its key) gives what the
    /// mask written out gives, in `f32` on the vector kernels.
    #[test]
    fn fused_dropout_equals_the_written_out_mask() {
        let mut rng = StdRng::seed_from_u64(60);
        let layer = FeedForwardConfig::new(48, 96)
            .with_p_drop(0.25)
            .init(&mut rng)
            .unwrap();
        let x: Array2<f32> =
            Array2::from_shape_fn((70, 48), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
        let (y, cache) = layer.forward(x.view(), &mut StdRng::seed_from_u64(61));
        let mask: Array2<f32> = cache.dropout.mask().unwrap();
        let h = affine(x.view(), layer.p.w1.view(), layer.p.b1.as_ref().map(|b| b.view()));
        let a = h.mapv(|v| v.max(0.0)) * &mask;
        assert_eq!(cache.a, a);
        let want = affine(a.view(), layer.p.w2.view(), layer.p.b2.as_ref().map(|b| b.view()));
        assert_eq!(y, want);
        // Backward: the gate gives the written-out ⊙ mask ⊙ [h > 0].
        let r: Array2<f32> = Array2::from_shape_fn((70, 48), |(i, j)| ((i + 2 * j) % 5) as f32 - 2.0);
        let mut g = layer.p.zeros_like();
        let grad_x = layer.backward(&cache, r.view(), &mut g);
        let mut grad_a = Array2::<f32>::zeros((70, 96));
        crate::kernels::gemm(1.0, r.view(), layer.p.w2.view(), 0.0, grad_a.view_mut());
        let grad_h = Array2::from_shape_fn((70, 96), |(i, j)| {
            if h[[i, j]] > 0.0 {
                grad_a[[i, j]] * mask[[i, j]]
            } else {
                0.0
            }
        });
        let mut want_x = Array2::<f32>::zeros((70, 48));
        crate::kernels::gemm(1.0, grad_h.view(), layer.p.w1.view(), 0.0, want_x.view_mut());
        assert_eq!(grad_x, want_x);
    }

    #[test]
    fn config_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(FeedForwardConfig::new(0, 4).init(&mut rng).is_err());
        assert!(FeedForwardConfig::new(4, 0).init(&mut rng).is_err());
        for p in [1.0, -0.1, f32::NAN] {
            let err = FeedForwardConfig::new(4, 8)
                .with_p_drop(p)
                .init(&mut rng)
                .unwrap_err();
            assert!(
                matches!(err, crate::Error::InvalidConfig { field: "p_drop", .. }),
                "p_drop {p}: {err}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "expected [N, d_model = 4]")]
    fn wrong_width_panics_with_both_shapes() {
        let layer = FeedForwardConfig::new(4, 8)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        layer.infer(Array2::zeros((2, 5)).view());
    }
}
