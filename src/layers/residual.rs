//! The residual sub-layer connection, "Add & Norm", in both orders: post-norm
//! `LayerNorm(x + Dropout(Sublayer(x)))` (§3.1, §5.4) and pre-norm
//! `x + Dropout(Sublayer(LayerNorm(x)))`.
//!
//! Every sub-layer of the paper's encoder and decoder, self-attention, cross-attention and
//! the feed-forward network, sits inside one of these. The sub-layer itself is not part of
//! [`Residual`]: it is handed to [`Residual::forward`], [`Residual::infer`] and
//! [`Residual::backward`] as a closure, so any sub-layer fits, with whatever extra inputs
//! (masks, the encoder memory) it captures.
//!
//! # The two orders
//!
//! **Post-norm**, the paper's, and the default (`norm_first = false`): "the output of each
//! sub-layer is LayerNorm(x + Sublayer(x))" (§3.1), with dropout "to the output of each
//! sub-layer, before it is added to the sub-layer input and normalized" (§5.4):
//!
//! ```text
//! z = x + Dropout(Sublayer(x))          y = LayerNorm(z)
//! ```
//!
//! **Pre-norm** (`norm_first = true`): the sub-layer sees a normalised copy of x and the
//! residual path stays an identity from the block's input to its output:
//!
//! ```text
//! u = LayerNorm(x)                      y = x + Dropout(Sublayer(u))
//! ```
//!
//! Pre-norm is popular because deep stacks train stably without the learning-rate warmup
//! that post-norm needs: Xiong et al. (2020), "On Layer Normalization in the Transformer
//! Architecture", show that with post-norm the gradients of the parameters near the output
//! are large at initialisation, so a large learning rate diverges unless warmed up, while
//! with pre-norm they are well-behaved at any depth. GPT-2 and most later large models
//! are pre-norm.
//!
//! A pre-norm stack needs a final LayerNorm after its last layer: its output is x plus the
//! un-normalised sum of every sub-layer's output, whose scale grows with depth. A post-norm
//! stack already ends in a LayerNorm and needs none; PyTorch's `nn.Transformer` adds one to
//! both its encoder and decoder anyway, whatever `norm_first` is, so a post-norm
//! `nn.Transformer` normalises its output twice.
//!
//! # Backward
//!
//! With `S` the sub-layer, `Drop` the dropout and `LN` the layer norm, each standing for its
//! backward pass, and `grad_y = ∂L/∂y`:
//!
//! - post-norm: `grad_z = LN(grad_y)`, `∂L/∂x = grad_z + S(Drop(grad_z))`;
//! - pre-norm: `∂L/∂x = grad_y + LN(S(Drop(grad_y)))`.
//!
//! The residual path adds the gradient it carries to the one that went through the
//! sub-layer. The layer norm's γ and β gradients go into the `g` given to
//! [`Residual::backward`]; the sub-layer's go wherever its backward closure puts them.
//!
//! PyTorch equivalent: `norm1` with `dropout1` (around self-attention) or `norm2` with
//! `dropout2` (around the feed-forward network) of `nn.TransformerEncoderLayer(...,
//! dropout=p_drop, layer_norm_eps=eps, norm_first=...)`:
//! `x = norm1(x + _sa_block(x))` when `norm_first=False`, `x = x + _sa_block(norm1(x))`
//! when `norm_first=True`, the `_sa_block` ending in `dropout1`. In
//! `nn.TransformerDecoderLayer`, `norm2`/`dropout2` go around the cross-attention and
//! `norm3`/`dropout3` around the feed-forward network. The parameters of a [`Residual`] are
//! its layer norm's, [`LayerNormParams`], so that a block's parameters read `norm1`,
//! `norm2` as PyTorch's do.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array2;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::Params;
//! use vaswani::gradcheck::random_like;
//! use vaswani::layers::{FeedForwardConfig, ResidualConfig};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let ffn = FeedForwardConfig::new(8, 32).init(&mut rng)?;
//! let norm2 = ResidualConfig::new(8).init(&mut rng)?; // post-norm, p_drop = 0.1
//! let x: Array2<f32> = random_like((6, 8), &mut rng);
//!
//! // y = LayerNorm(x + Dropout(FFN(x))); the FFN's cache comes back inside the residual's.
//! let (y, cache) = norm2.forward(x.view(), &mut rng, |x, rng| ffn.forward(x, rng));
//!
//! let grad_y: Array2<f32> = random_like((6, 8), &mut rng);
//! let mut g_norm = norm2.norm.p.zeros_like();
//! let mut g_ffn = ffn.p.zeros_like();
//! let grad_x = norm2.backward(&cache, grad_y.view(), &mut g_norm, |c, grad| {
//!     ffn.backward(c, grad, &mut g_ffn)
//! });
//! assert_eq!(grad_x.dim(), (6, 8));
//!
//! // Inference: no dropout anywhere.
//! let y = norm2.infer(x.view(), |x| ffn.infer(x));
//! assert!(y.rows().into_iter().all(|r| r.mean().unwrap().abs() < 1e-5));
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array2, ArrayView2};
use rand::Rng;

use crate::error::{Result, check};
use crate::kernels::Float;
use crate::kernels::workspace::Recycle;
use crate::layers::dropout::{Dropout, DropoutCache, DropoutConfig};
use crate::layers::layer_norm::{LayerNorm, LayerNormCache, LayerNormConfig, LayerNormParams};

/// Configuration of a [`Residual`] connection.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ResidualConfig {
    /// Width of the rows, of the sub-layer's input and output, and of the layer norm.
    pub d_model: usize,
    /// `false`: post-norm `LayerNorm(x + Dropout(Sublayer(x)))`, the paper's (§3.1);
    /// `true`: pre-norm `x + Dropout(Sublayer(LayerNorm(x)))`.
    pub norm_first: bool,
    /// Dropout rate on the sub-layer's output, in [0, 1) (§5.4: 0.1 for the base model).
    pub p_drop: f32,
    /// The layer norm's ε; PyTorch's default is `1e-5`.
    pub eps: f32,
}

/// The residual connection around a sub-layer, "Add & Norm" (§3.1), post-norm or pre-norm.
/// See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct Residual<F: Float = f32> {
    /// Its configuration.
    pub cfg: ResidualConfig,
    /// The layer norm, whose parameters are the connection's.
    pub norm: LayerNorm<F>,
    /// The dropout on the sub-layer's output, of rate `cfg.p_drop`.
    pub dropout: Dropout,
}
crate::delegate_params!(Residual => norm.p);

/// What [`Residual::backward`] needs from the forward pass: the sub-layer's own cache `C`,
/// the dropout mask and the layer norm's cache.
#[derive(Clone, Debug)]
pub struct ResidualCache<F: Float, C> {
    sublayer: C,
    dropout: DropoutCache<F>,
    norm: LayerNormCache<F>,
    dim: (usize, usize),
}
impl<F: Float, C: crate::kernels::workspace::Recycle> crate::kernels::workspace::Recycle
    for ResidualCache<F, C>
{
    fn give_back(self) {
        self.sublayer.give_back();
        self.dropout.give_back();
        self.norm.give_back();
    }
}

impl ResidualConfig {
    /// A post-norm connection over rows of width `d_model`, with PyTorch's defaults for the
    /// rest: `norm_first = false`, `p_drop = 0.1`, `eps = 1e-5`.
    pub fn new(d_model: usize) -> Self {
        ResidualConfig {
            d_model,
            norm_first: false,
            p_drop: 0.1,
            eps: 1e-5,
        }
    }

    /// The same config, pre-norm (`true`) or post-norm (`false`).
    pub fn with_norm_first(mut self, norm_first: bool) -> Self {
        self.norm_first = norm_first;
        self
    }

    /// The same config with another dropout rate.
    pub fn with_p_drop(mut self, p_drop: f32) -> Self {
        self.p_drop = p_drop;
        self
    }

    /// The same config with another layer-norm ε.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`ResidualConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`ResidualConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<Residual> {
        self.init_as(rng)
    }

    /// Builds the connection: a layer norm with γ = 1, β = 0, and a dropout.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if `d_model` is 0, `p_drop` is
    /// not in [0, 1), or `eps` is not finite and positive.
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<Residual<F>> {
        check::positive("d_model", self.d_model)?;
        check::dropout("p_drop", self.p_drop)?;
        check::eps("eps", self.eps)?;
        Ok(Residual {
            cfg: self.clone(),
            norm: LayerNormConfig::new(self.d_model)
                .with_eps(self.eps)
                .init_as(rng)?,
            dropout: DropoutConfig::new(self.p_drop).init()?,
        })
    }
}

impl<F: Float> Residual<F> {
    /// Forward pass in training around `sublayer`, which is called once with its input and
    /// `rng` and returns its output and its cache. The dropout mask is drawn from `rng`
    /// after the sub-layer has run.
    ///
    /// Post-norm: `y = LayerNorm(x + Dropout(sublayer(x)))`; pre-norm:
    /// `y = x + Dropout(sublayer(LayerNorm(x)))`.
    ///
    /// # Shapes
    /// `x`: `[N, d_model]` → `[N, d_model]`; the sub-layer maps `[N, d_model]` to
    /// `[N, d_model]`.
    ///
    /// # Panics
    /// If `x` is not `[N, d_model]` or the sub-layer's output does not have the shape of its
    /// input.
    pub fn forward<R: Rng, C>(
        &self,
        x: ArrayView2<F>,
        rng: &mut R,
        sublayer: impl FnOnce(ArrayView2<F>, &mut R) -> (Array2<F>, C),
    ) -> (Array2<F>, ResidualCache<F, C>) {
        self.check_input(x);
        let dim = x.dim();
        if self.cfg.norm_first {
            let (u, norm) = self.norm.forward(x);
            let (mut y, sublayer) = sublayer(u.view(), rng);
            u.give_back();
            check_sublayer_output("forward", y.dim(), dim);
            let dropout = self.dropout.draw(dim, rng);
            dropout.apply_inplace(y.view_mut());
            crate::kernels::add_assign(y.view_mut(), x);
            let cache = ResidualCache {
                sublayer,
                dropout,
                norm,
                dim,
            };
            (y, cache)
        } else {
            let (z, sublayer) = sublayer(x, rng);
            check_sublayer_output("forward", z.dim(), dim);
            let dropout = self.dropout.draw(dim, rng);
            // LN(x + z ⊙ mask) in one pass.
            let (y, norm) = self.norm.forward_sum(x, z.view(), dropout.key());
            z.give_back();
            let cache = ResidualCache {
                sublayer,
                dropout,
                norm,
                dim,
            };
            (y, cache)
        }
    }

    /// Forward pass without a cache and without dropout, for inference, around the
    /// sub-layer's own inference pass.
    ///
    /// Post-norm: `y = LayerNorm(x + sublayer(x))`; pre-norm: `y = x + sublayer(LayerNorm(x))`.
    ///
    /// # Shapes
    /// `x`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `x` is not `[N, d_model]` or the sub-layer's output does not have the shape of its
    /// input.
    pub fn infer(&self, x: ArrayView2<F>, sublayer: impl FnOnce(ArrayView2<F>) -> Array2<F>) -> Array2<F> {
        self.check_input(x);
        if self.cfg.norm_first {
            let u = self.norm.infer(x);
            let mut y = sublayer(u.view());
            u.give_back();
            check_sublayer_output("infer", y.dim(), x.dim());
            crate::kernels::add_assign(y.view_mut(), x);
            y
        } else {
            let z = sublayer(x);
            check_sublayer_output("infer", z.dim(), x.dim());
            let y = self.norm.infer_sum(x, z.view());
            z.give_back();
            y
        }
    }

    /// Backward pass: adds `∂L/∂γ` and `∂L/∂β` of the layer norm into `g` and returns
    /// `∂L/∂x`, through both the residual path and the sub-layer.
    ///
    /// `sublayer_backward` is called once with the sub-layer's cache and the gradient at
    /// the sub-layer's output; it returns the gradient at the sub-layer's input, and adds
    /// the sub-layer's parameter gradients into whatever it captures.
    ///
    /// # Shapes
    /// `grad_y`: `[N, d_model]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `grad_y` is not `[N, d_model]` for the N of the forward pass, `g` has other shapes
    /// than the parameters, or `sublayer_backward` returns another shape than `[N, d_model]`.
    pub fn backward<C>(
        &self,
        cache: &ResidualCache<F, C>,
        grad_y: ArrayView2<F>,
        g: &mut LayerNormParams<F>,
        sublayer_backward: impl FnOnce(&C, ArrayView2<F>) -> Array2<F>,
    ) -> Array2<F> {
        assert_eq!(
            grad_y.dim(),
            cache.dim,
            "Residual::backward: grad_y is {:?}, expected the forward output's {:?}",
            grad_y.shape(),
            [cache.dim.0, cache.dim.1]
        );
        if self.cfg.norm_first {
            let grad_s = self.dropout.backward(&cache.dropout, grad_y);
            let grad_u = sublayer_backward(&cache.sublayer, grad_s.view());
            check_sublayer_output("backward", grad_u.dim(), cache.dim);
            let mut grad_x = self.norm.backward(&cache.norm, grad_u.view(), g);
            crate::kernels::add_assign(grad_x.view_mut(), grad_y);
            (grad_s, grad_u).give_back();
            grad_x
        } else {
            // ∂L/∂(x + z ⊙ mask), and ⊙ mask for the sub-layer, in one pass.
            let (mut grad_z, grad_s) = self
                .norm
                .backward_masked(&cache.norm, grad_y, g, cache.dropout.key());
            let grad_x = sublayer_backward(&cache.sublayer, grad_s.as_ref().unwrap_or(&grad_z).view());
            check_sublayer_output("backward", grad_x.dim(), cache.dim);
            crate::kernels::add_assign(grad_z.view_mut(), grad_x.view());
            (grad_s, grad_x).give_back();
            grad_z
        }
    }

    fn check_input(&self, x: ArrayView2<F>) {
        assert_eq!(
            x.ncols(),
            self.cfg.d_model,
            "Residual: input is {:?}, expected [N, d_model = {}]",
            x.shape(),
            self.cfg.d_model
        );
    }
}

impl<F: Float, C> ResidualCache<F, C> {
    /// The sub-layer's cache, as its forward pass returned it.
    pub fn sublayer(&self) -> &C {
        &self.sublayer
    }
}

fn check_sublayer_output(pass: &str, got: (usize, usize), want: (usize, usize)) {
    assert_eq!(
        got,
        want,
        "Residual::{pass}: the sub-layer gave {:?} for an input of {:?}",
        [got.0, got.1],
        [want.0, want.1]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::layers::linear::{Linear, LinearConfig};
    use crate::params::{Params, Tensors};
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn gradients_match_finite_differences_in_both_orders() {
        for norm_first in [false, true] {
            let mut rng = StdRng::seed_from_u64(70 + norm_first as u64);
            let mut residual = ResidualConfig::new(5)
                .with_norm_first(norm_first)
                .with_p_drop(0.2)
                .init_as::<f64>(&mut rng)
                .unwrap();
            residual.norm.p.gamma = random_like(5, &mut rng) + 1.5;
            residual.norm.p.beta = random_like(5, &mut rng);
            let mut linear = LinearConfig::new(5, 5).init_as::<f64>(&mut rng).unwrap();
            linear.p.bias = Some(random_like(5, &mut rng));
            let x: Array2<f64> = random_like((4, 5), &mut rng);
            let r: Array2<f64> = random_like((4, 5), &mut rng);
            let mask_seed = 80 + norm_first as u64;

            let (_, cache) = residual.forward(x.view(), &mut StdRng::seed_from_u64(mask_seed), |u, _| {
                linear.forward(u)
            });
            assert!(cache.dropout.mask().is_some());
            let mut g_norm = residual.norm.p.zeros_like();
            let mut g_linear = linear.p.zeros_like();
            let grad_x = residual.backward(&cache, r.view(), &mut g_norm, |c, grad| {
                linear.backward(c, grad, &mut g_linear)
            });

            let mut point = (
                Tensors::new().with("x", x),
                (residual.norm.p.clone(), linear.p.clone()),
            );
            let analytic = (Tensors::new().with("x", grad_x), (g_norm, g_linear));
            let report = GradCheck::default().run(&mut point, &analytic, |(t, (pn, pl))| {
                let mut residual = residual.clone();
                residual.norm.p = pn.clone();
                let linear = Linear {
                    cfg: linear.cfg.clone(),
                    p: pl.clone(),
                };
                let x = t.get("x").view().into_dimensionality().unwrap();
                // The same seed inside the loss, so every evaluation sees the same mask.
                let (y, _) =
                    residual.forward(x, &mut StdRng::seed_from_u64(mask_seed), |u, _| linear.forward(u));
                (&y * &r).sum()
            });
            report.assert_ok();
            report.assert_all_nonzero();
        }
    }

    #[test]
    fn infer_equals_forward_without_dropout_and_composes_as_documented() {
        for norm_first in [false, true] {
            let mut rng = StdRng::seed_from_u64(72);
            let mut residual = ResidualConfig::new(6)
                .with_norm_first(norm_first)
                .with_p_drop(0.0)
                .init_as::<f64>(&mut rng)
                .unwrap();
            residual.norm.p.gamma = random_like(6, &mut rng) + 1.5;
            residual.norm.p.beta = random_like(6, &mut rng);
            let linear = LinearConfig::new(6, 6).init_as::<f64>(&mut rng).unwrap();
            let x: Array2<f64> = random_like((3, 6), &mut rng);
            let (y, cache) = residual.forward(x.view(), &mut rng, |u, _| linear.forward(u));
            assert_eq!(y, residual.infer(x.view(), |u| linear.infer(u)));
            let want = if norm_first {
                &x + &linear.infer(residual.norm.infer(x.view()).view())
            } else {
                residual.norm.infer((&x + &linear.infer(x.view())).view())
            };
            assert_eq!(y, want, "norm_first = {norm_first}");
            // The sub-layer's cache is the one its forward pass returned.
            let mut g = linear.p.zeros_like();
            let r: Array2<f64> = random_like((3, 6), &mut rng);
            let direct = linear.backward(cache.sublayer(), r.view(), &mut g);
            assert_eq!(direct.dim(), (3, 6));
        }
    }

    #[test]
    fn post_norm_rows_have_mean_beta_and_std_gamma() {
        let mut rng = StdRng::seed_from_u64(73);
        let mut residual = ResidualConfig::new(16)
            .with_eps(1e-12)
            .init_as::<f64>(&mut rng)
            .unwrap();
        residual.norm.p.gamma.fill(0.5);
        residual.norm.p.beta.fill(3.0);
        let linear = LinearConfig::new(16, 16).init_as::<f64>(&mut rng).unwrap();
        let x: Array2<f64> = random_like((5, 16), &mut rng) * 4.0;
        let (y, _) = residual.forward(x.view(), &mut rng, |u, _| linear.forward(u));
        for row in y.rows() {
            let mean = row.mean().unwrap();
            let std = row.mapv(|v| (v - mean).powi(2)).mean().unwrap().sqrt();
            assert!((mean - 3.0).abs() < 1e-10, "mean {mean}");
            assert!((std - 0.5).abs() < 1e-9, "std {std}");
        }
    }

    #[test]
    fn config_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        let field = |cfg: ResidualConfig| match cfg.init(&mut StdRng::seed_from_u64(0)) {
            Err(crate::Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(field(ResidualConfig::new(0)), "d_model");
        assert_eq!(field(ResidualConfig::new(4).with_p_drop(1.0)), "p_drop");
        assert_eq!(field(ResidualConfig::new(4).with_p_drop(f32::NAN)), "p_drop");
        assert_eq!(field(ResidualConfig::new(4).with_eps(0.0)), "eps");
        assert_eq!(field(ResidualConfig::new(4).with_eps(f32::INFINITY)), "eps");
        assert!(ResidualConfig::new(4).init(&mut rng).is_ok());
    }

    #[test]
    #[should_panic(expected = "expected [N, d_model = 4]")]
    fn wrong_width_panics_with_both_shapes() {
        let residual = ResidualConfig::new(4)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        residual.infer(Array2::zeros((2, 3)).view(), |u| u.to_owned());
    }
}
