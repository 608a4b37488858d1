//! Layer normalisation: `y = γ ⊙ (x − μ) / √(σ² + ε) + β`, over the features of each row.
//!
//! The paper wraps every sub-layer in `LayerNorm(x + Sublayer(x))` (§3.1), citing Ba et al.
//! (2016). For one row x of width `d_model`: `μ = mean(x)`, `σ² = mean((x − μ)²)` (the
//! biased variance), `x̂ = (x − μ) / √(σ² + ε)`, `y = γ ⊙ x̂ + β`, with a learned gain γ and
//! bias β of width `d_model`, initialised to 1 and 0. Inputs are rows `[N, d_model]`, N
//! usually B·T: every position is normalised on its own, nothing mixes across rows.
//!
//! Backward, for `grad_y = ∂L/∂y`, `g = γ ⊙ grad_y` and `rstd = 1/√(σ² + ε)` per row:
//! `∂L/∂x = rstd · (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))`, `∂L/∂γ = Σ_rows grad_y ⊙ x̂`,
//! `∂L/∂β = Σ_rows grad_y`. The cache keeps x̂ and rstd, so backward never revisits x.
//!
//! The arithmetic is that of [`layer_norm_rows`](crate::kernels::layer_norm_rows) and [`layer_norm_rows_backward`](crate::kernels::layer_norm_rows_backward); inputs
//! that are not in standard layout (a transposed or sliced view) are copied into it first.
//!
//! PyTorch equivalent: `nn.LayerNorm(d_model, eps=1e-5)`, whose `weight` and `bias` are γ and
//! β here. The paper gives no ε; this uses PyTorch's, inside the square root, with the
//! biased variance, so outputs match PyTorch's (not the unbiased-std variant of some
//! tutorials).
//!
//! # Example
//! ```
//! use vaswani::ndarray::array;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::Params;
//! use vaswani::layers::LayerNormConfig;
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let norm = LayerNormConfig::new(4).init(&mut rng)?;
//! let x = array![[1.0_f32, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 8.0]];
//! let (y, cache) = norm.forward(x.view());
//! // torch.nn.LayerNorm(4)(torch.tensor([[1., 0., 0., 0.]])) = [1.7320, -0.5773, -0.5773, -0.5773]
//! assert!((y[[0, 0]] - 1.7320).abs() < 1e-4 && (y[[0, 1]] + 0.5773).abs() < 1e-4);
//! assert!(y.row(1).sum().abs() < 1e-5);
//!
//! let mut grads = norm.p.zeros_like();
//! let grad_x = norm.backward(&cache, vaswani::ndarray::Array2::ones((2, 4)).view(), &mut grads);
//! assert_eq!(grads.beta, array![2.0, 2.0, 2.0, 2.0]);
//! // A constant shift of a row changes nothing, so its gradient sums to 0 along the row.
//! assert!(grad_x.rows().into_iter().all(|r| r.sum().abs() < 1e-5));
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2};
use rand::Rng;

use crate::error::{Result, check};
use crate::kernels::dropout::DropKey;
use crate::kernels::layer_norm::layer_norm_rows_infer;
use crate::kernels::{Float, filled, layer_norm_rows_backward_masked, layer_norm_rows_sum};

/// Configuration of a [`LayerNorm`] layer.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LayerNormConfig {
    /// Width of the rows normalised, and of γ and β.
    pub d_model: usize,
    /// ε, added to the variance inside the square root; PyTorch's default is `1e-5`.
    pub eps: f32,
}

/// Parameters of a [`LayerNorm`] layer (and, with the same type, their gradients).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(bound = ""))]
pub struct LayerNormParams<F: Float = f32> {
    /// The gain γ, `[d_model]` (PyTorch's `weight`).
    pub gamma: Array1<F>,
    /// The bias β, `[d_model]` (PyTorch's `bias`).
    pub beta: Array1<F>,
}
crate::impl_params!(LayerNormParams { gamma, beta });

/// Layer normalisation `y = γ ⊙ (x − μ) / √(σ² + ε) + β` of each row. See the
/// [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm<F: Float = f32> {
    /// Its configuration.
    pub cfg: LayerNormConfig,
    /// Its parameters.
    pub p: LayerNormParams<F>,
}
crate::delegate_params!(LayerNorm => p);

/// What [`LayerNorm::backward`] needs from the forward pass: the normalised rows x̂ and
/// `rstd = 1/√(σ² + ε)` per row.
#[derive(Clone, Debug)]
pub struct LayerNormCache<F: Float = f32> {
    x_hat: Array2<F>,
    rstd: Array1<F>,
}
crate::kernels::workspace::impl_recycle!(LayerNormCache<F: Float> { x_hat, rstd });

impl LayerNormConfig {
    /// Its number of parameters, γ and β: `2 · d_model`, in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around). Its arithmetic is not
    /// counted as FLOPs.
    pub fn params(&self) -> f64 {
        2.0 * self.d_model as f64
    }

    /// Normalisation of rows of width `d_model`, with PyTorch's `eps = 1e-5`.
    pub fn new(d_model: usize) -> Self {
        LayerNormConfig { d_model, eps: 1e-5 }
    }

    /// The same config with another ε.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`LayerNormConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`LayerNormConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<LayerNorm> {
        self.init_as(rng)
    }

    /// Builds the layer: γ = 1, β = 0, as PyTorch initialises `nn.LayerNorm`.
    ///
    /// The initialisation draws nothing; `rng` is taken so that every layer is built the
    /// same way.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if `d_model` is 0 or `eps` is
    /// not finite and positive.
    pub fn init_as<F: Float>(&self, _rng: &mut impl Rng) -> Result<LayerNorm<F>> {
        check::positive("d_model", self.d_model)?;
        check::eps("eps", self.eps)?;
        Ok(LayerNorm {
            cfg: self.clone(),
            p: LayerNormParams {
                gamma: Array1::ones(self.d_model),
                beta: Array1::zeros(self.d_model),
            },
        })
    }
}

impl<F: Float> LayerNorm<F> {
    /// Forward pass, keeping x̂ and rstd for [`LayerNorm::backward`].
    ///
    /// # Shapes
    /// `x`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `x` is not `[N, d_model]`, or γ or β is not `[d_model]`.
    pub fn forward(&self, x: ArrayView2<F>) -> (Array2<F>, LayerNormCache<F>) {
        let (y, x_hat, rstd) = self.normalize(x);
        (y, LayerNormCache { x_hat, rstd })
    }

    /// Forward pass without a cache, for inference.
    ///
    /// # Shapes
    /// `x`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `x` is not `[N, d_model]`, or γ or β is not `[d_model]`.
    pub fn infer(&self, x: ArrayView2<F>) -> Array2<F> {
        self.infer_rows(x, None)
    }

    /// Backward pass: adds `∂L/∂γ` and `∂L/∂β` into `g` and returns `∂L/∂x`.
    ///
    /// # Shapes
    /// `grad_y`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `grad_y` is not `[N, d_model]` for the N of the forward pass, or `g` has other
    /// shapes than the parameters.
    pub fn backward(
        &self,
        cache: &LayerNormCache<F>,
        grad_y: ArrayView2<F>,
        g: &mut LayerNormParams<F>,
    ) -> Array2<F> {
        self.backward_masked(cache, grad_y, g, None).0
    }

    /// [`LayerNorm::backward`] of `LN(x + Dropout(z))` ([`LayerNorm::forward_sum`] with a
    /// mask): `(∂L/∂x, ∂L/∂x ⊙ mask)`, the gradients at `x` and at `z`, in one pass over the
    /// rows; without a key the second is `None` (it is the first).
    ///
    /// # Panics
    /// If `grad_y` does not have the shape of the forward pass's output.
    pub(crate) fn backward_masked(
        &self,
        cache: &LayerNormCache<F>,
        grad_y: ArrayView2<F>,
        g: &mut LayerNormParams<F>,
        key: Option<DropKey>,
    ) -> (Array2<F>, Option<Array2<F>>) {
        assert_eq!(
            grad_y.dim(),
            cache.x_hat.dim(),
            "LayerNorm::backward: grad_y is {:?}, expected the forward output's {:?}",
            grad_y.shape(),
            cache.x_hat.shape()
        );
        let grad_y = grad_y.as_standard_layout();
        let gamma = self.p.gamma.as_standard_layout();
        let dim = cache.x_hat.dim();
        let mut run = |grad_x: ArrayViewMut2<'_, F>, masked: Option<(ArrayViewMut2<'_, F>, DropKey)>| {
            layer_norm_rows_backward_masked(
                cache.x_hat.view(),
                cache.rstd.view(),
                gamma.view(),
                grad_y.view(),
                g.gamma.view_mut(),
                g.beta.view_mut(),
                grad_x,
                masked,
            )
        };
        let Some(key) = key else {
            // SAFETY: the backward kernel writes every element of grad_x.
            return (unsafe { filled(dim, |grad_x| run(grad_x, None)) }, None);
        };
        let mut grad_x = None;
        // SAFETY: the backward kernel writes every element of both.
        let masked = unsafe {
            filled(dim, |masked| {
                grad_x = Some(filled(dim, |grad_x| run(grad_x, Some((masked, key)))))
            })
        };
        (grad_x.expect("filled runs its closure"), Some(masked))
    }

    /// `(y, x̂, rstd)` for the rows of `x`.
    fn normalize(&self, x: ArrayView2<F>) -> (Array2<F>, Array2<F>, Array1<F>) {
        self.normalize_sum(x, None)
    }

    /// Forward pass of `LN(x + z ⊙ mask)` (`LN(x + z)` without a mask) without storing the
    /// sum: the post-norm residual connection in one pass over the rows.
    ///
    /// # Panics
    /// If x or z is not `[N, d_model]`, or the mask has another shape than z.
    pub(crate) fn forward_sum(
        &self,
        x: ArrayView2<F>,
        z: ArrayView2<F>,
        mask: Option<DropKey>,
    ) -> (Array2<F>, LayerNormCache<F>) {
        let (y, x_hat, rstd) = self.normalize_sum(x, Some((z, mask)));
        (y, LayerNormCache { x_hat, rstd })
    }

    /// [`LayerNorm::forward_sum`] without a cache.
    ///
    /// # Panics
    /// As [`LayerNorm::forward_sum`].
    pub(crate) fn infer_sum(&self, x: ArrayView2<F>, z: ArrayView2<F>) -> Array2<F> {
        self.infer_rows(x, Some(z))
    }

    /// `LN(x + z)`, or `LN(x)`, with neither x̂ nor rstd written: the values of
    /// [`LayerNorm::normalize_sum`]'s output, bit for bit.
    fn infer_rows(&self, x: ArrayView2<F>, z: Option<ArrayView2<F>>) -> Array2<F> {
        self.check_rows(x, z);
        let x = x.as_standard_layout();
        let z = z.as_ref().map(|z| z.as_standard_layout());
        let gamma = self.p.gamma.as_standard_layout();
        let beta = self.p.beta.as_standard_layout();
        // SAFETY: the kernel writes every element of y.
        unsafe {
            filled(x.dim(), |y| {
                layer_norm_rows_infer(
                    x.view(),
                    z.as_ref().map(|z| z.view()),
                    gamma.view(),
                    beta.view(),
                    F::from_f64(f64::from(self.cfg.eps)),
                    y,
                )
            })
        }
    }

    /// # Panics
    /// If x is not `[N, d_model]`, or z (if any) has another shape than x.
    fn check_rows(&self, x: ArrayView2<F>, z: Option<ArrayView2<F>>) {
        assert_eq!(
            x.ncols(),
            self.cfg.d_model,
            "LayerNorm: input is {:?}, expected [N, d_model = {}]",
            x.shape(),
            self.cfg.d_model
        );
        if let Some(z) = &z {
            assert!(
                z.dim() == x.dim(),
                "LayerNorm: the residual sum of x {:?} and z {:?}",
                x.shape(),
                z.shape()
            );
        }
    }

    fn normalize_sum(
        &self,
        x: ArrayView2<F>,
        z: Option<(ArrayView2<F>, Option<DropKey>)>,
    ) -> (Array2<F>, Array2<F>, Array1<F>) {
        self.check_rows(x, z.as_ref().map(|(z, _)| z.view()));
        let x = x.as_standard_layout();
        let z = z.as_ref().map(|(z, m)| (z.as_standard_layout(), *m));
        let gamma = self.p.gamma.as_standard_layout();
        let beta = self.p.beta.as_standard_layout();
        let mut rstd = Array1::zeros(x.nrows());
        let mut x_hat = None;
        // SAFETY: the kernel writes every element of y and x̂.
        let y = unsafe {
            filled(x.dim(), |y| {
                x_hat = Some(filled(x.dim(), |x_hat| {
                    layer_norm_rows_sum(
                        x.view(),
                        z.as_ref().map(|(z, m)| (z.view(), *m)),
                        gamma.view(),
                        beta.view(),
                        F::from_f64(f64::from(self.cfg.eps)),
                        x_hat,
                        rstd.view_mut(),
                        y,
                    )
                }))
            })
        };
        (y, x_hat.expect("written"), rstd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::params::{Params, Tensors};
    use ndarray::array;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = StdRng::seed_from_u64(30);
        let mut layer = LayerNormConfig::new(6).init_as::<f64>(&mut rng).unwrap();
        // γ and β away from 1 and 0, so that a γ or β mix-up in backward shows.
        layer.p.gamma = random_like(6, &mut rng) + 1.5;
        layer.p.beta = random_like(6, &mut rng);
        let x: Array2<f64> = random_like((4, 6), &mut rng);
        let r: Array2<f64> = random_like((4, 6), &mut rng);
        let (_, cache) = layer.forward(x.view());
        let mut g = layer.p.zeros_like();
        let grad_x = layer.backward(&cache, r.view(), &mut g);
        let mut point = (Tensors::new().with("x", x), layer.p.clone());
        let analytic = (Tensors::new().with("x", grad_x), g);
        let report = GradCheck::default().run(&mut point, &analytic, |(t, p)| {
            let layer = LayerNorm {
                cfg: layer.cfg.clone(),
                p: p.clone(),
            };
            let y = layer.infer(t.get("x").view().into_dimensionality().unwrap());
            (&y * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero();
    }

    #[test]
    fn rows_have_mean_beta_and_std_gamma() {
        let mut rng = StdRng::seed_from_u64(31);
        // A tiny ε, so that the std is γ to 1e-9 rather than to ε/σ².
        let mut layer = LayerNormConfig::new(16)
            .with_eps(1e-12)
            .init_as::<f64>(&mut rng)
            .unwrap();
        layer.p.gamma.fill(2.5);
        layer.p.beta.fill(-0.75);
        let x: Array2<f64> = random_like((5, 16), &mut rng) * 3.0 + 10.0;
        let y = layer.infer(x.view());
        for row in y.rows() {
            let mean = row.mean().unwrap();
            let std = row.mapv(|v| (v - mean).powi(2)).mean().unwrap().sqrt();
            assert!((mean + 0.75).abs() < 1e-10, "mean {mean}");
            assert!((std - 2.5).abs() < 1e-9, "std {std}");
        }
    }

    #[test]
    fn matches_pytorch_reference_value() {
        // torch.nn.LayerNorm(4)(torch.tensor([[1., 0., 0., 0.]]))
        //   = [[1.7320, -0.5773, -0.5773, -0.5773]]
        let layer = LayerNormConfig::new(4)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        let y = layer.infer(array![[1.0_f32, 0.0, 0.0, 0.0]].view());
        let want = [1.7320, -0.5773, -0.5773, -0.5773];
        for (got, want) in y.iter().zip(want) {
            assert!((got - want).abs() < 1e-4, "{y:?}");
        }
    }

    #[test]
    fn strided_input_gives_the_same_as_standard_layout() {
        let mut rng = StdRng::seed_from_u64(32);
        let layer = LayerNormConfig::new(5).init_as::<f64>(&mut rng).unwrap();
        let xt: Array2<f64> = random_like((5, 3), &mut rng);
        let (y, cache) = layer.forward(xt.t());
        assert_eq!(y, layer.infer(xt.t().as_standard_layout().view()));
        let rt: Array2<f64> = random_like((5, 3), &mut rng);
        let (mut g1, mut g2) = (layer.p.zeros_like(), layer.p.zeros_like());
        let grad_x = layer.backward(&cache, rt.t(), &mut g1);
        assert_eq!(
            grad_x,
            layer.backward(&cache, rt.t().as_standard_layout().view(), &mut g2)
        );
        assert_eq!(g1, g2);
    }

    #[test]
    fn backward_accumulates() {
        let mut rng = StdRng::seed_from_u64(33);
        let layer = LayerNormConfig::new(3).init_as::<f64>(&mut rng).unwrap();
        let x: Array2<f64> = random_like((4, 3), &mut rng);
        let r: Array2<f64> = random_like((4, 3), &mut rng);
        let (_, cache) = layer.forward(x.view());
        let mut once = layer.p.zeros_like();
        layer.backward(&cache, r.view(), &mut once);
        let mut twice = layer.p.zeros_like();
        layer.backward(&cache, r.view(), &mut twice);
        layer.backward(&cache, r.view(), &mut twice);
        assert!(
            (&twice.gamma - &(&once.gamma * 2.0))
                .iter()
                .chain((&twice.beta - &(&once.beta * 2.0)).iter())
                .all(|v| v.abs() < 1e-12)
        );
    }

    #[test]
    fn config_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(LayerNormConfig::new(0).init(&mut rng).is_err());
        for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
            assert!(
                LayerNormConfig::new(4).with_eps(eps).init(&mut rng).is_err(),
                "eps {eps}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "expected [N, d_model = 4]")]
    fn wrong_width_panics_with_both_shapes() {
        let layer = LayerNormConfig::new(4)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        layer.infer(Array2::zeros((2, 3)).view());
    }
}
