//! Linear layer: `y = x·Wᵀ + b`.
//!
//! The weight is stored `[d_out, d_in]` as PyTorch's `nn.Linear` stores it, and `Wᵀ` is a
//! stride swap handed to the GEMM, never a copy. Inputs are rows `[N, d_in]`, where N is
//! usually B·T: every position of every sequence goes through one GEMM.
//!
//! Backward, for `grad_y = ∂L/∂y`:
//! `∂L/∂x = grad_y·W`, `∂L/∂W = grad_yᵀ·x`, `∂L/∂b = Σ_rows grad_y`.
//!
//! PyTorch equivalent: `nn.Linear(d_in, d_out, bias=True)`.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2};
use rand::Rng;

use crate::error::{Result, check};
use crate::kernels::parallel::join_gradients;
use crate::kernels::{
    Float, add_column_sums, bias_sums_in_packing, filled, gemm, gemm_bias, gemm_weight_grad,
};
use crate::params::xavier_uniform;

/// Configuration of a [`Linear`] layer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LinearConfig {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Whether the layer adds a bias b.
    pub bias: bool,
}

/// Parameters of a [`Linear`] layer (and, with the same type, their gradients).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(bound = ""))]
pub struct LinearParams<F: Float = f32> {
    /// W, `[d_out, d_in]`.
    pub weight: Array2<F>,
    /// b, `[d_out]`; `None` without bias.
    pub bias: Option<Array1<F>>,
}
crate::impl_params!(LinearParams { weight, bias });

/// A linear layer `y = x·Wᵀ + b`. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct Linear<F: Float = f32> {
    /// Its configuration.
    pub cfg: LinearConfig,
    /// Its parameters.
    pub p: LinearParams<F>,
}
crate::delegate_params!(Linear => p);

/// What [`Linear::backward`] needs from the forward pass: the input.
#[derive(Clone, Debug)]
pub struct LinearCache<F: Float = f32> {
    x: Array2<F>,
}
crate::kernels::workspace::impl_recycle!(LinearCache<F: Float> { x });

impl LinearConfig {
    /// Its number of parameters, in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn params(&self) -> f64 {
        let (i, o) = (self.d_in as f64, self.d_out as f64);
        i * o + if self.bias { o } else { 0.0 }
    }

    /// FLOPs of a forward pass over `tokens` rows: `2 · d_in · d_out` per row (the FLOP model
    /// of the crate's performance figures: multiply-adds count 2, biases nothing).
    pub fn flops(&self, tokens: usize) -> f64 {
        2.0 * self.d_in as f64 * self.d_out as f64 * tokens as f64
    }

    /// A layer from `d_in` to `d_out` features, with bias.
    pub fn new(d_in: usize, d_out: usize) -> Self {
        LinearConfig {
            d_in,
            d_out,
            bias: true,
        }
    }

    /// The same config with the bias switched on or off.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`LinearConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`LinearConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<Linear> {
        self.init_as(rng)
    }

    /// Builds the layer: W Xavier-uniform (as `nn.Transformer` initialises its linear
    /// layers), b zero.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if a width is 0.
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<Linear<F>> {
        check::positive("d_in", self.d_in)?;
        check::positive("d_out", self.d_out)?;
        let larger = if self.d_in > self.d_out { "d_in" } else { "d_out" };
        check::tensor(larger, &[self.d_out, self.d_in], size_of::<F>())?;
        Ok(Linear {
            cfg: self.clone(),
            p: LinearParams {
                weight: xavier_uniform((self.d_out, self.d_in), self.d_in, self.d_out, rng),
                bias: self.bias.then(|| Array1::zeros(self.d_out)),
            },
        })
    }
}

impl<F: Float> Linear<F> {
    /// Forward pass, keeping the input for [`Linear::backward`].
    ///
    /// # Shapes
    /// `x`: `[N, d_in]` → `[N, d_out]`.
    ///
    /// # Panics
    /// If `x` is not `[N, d_in]`.
    pub fn forward(&self, x: ArrayView2<F>) -> (Array2<F>, LinearCache<F>) {
        let y = self.infer(x);
        (
            y,
            LinearCache {
                x: crate::kernels::workspace::owned(x),
            },
        )
    }

    /// Forward pass without a cache, for inference.
    ///
    /// # Panics
    /// If `x` is not `[N, d_in]`.
    pub fn infer(&self, x: ArrayView2<F>) -> Array2<F> {
        assert_eq!(
            x.ncols(),
            self.cfg.d_in,
            "Linear: input is {:?}, expected [N, d_in = {}]",
            x.shape(),
            self.cfg.d_in
        );
        affine(x, self.p.weight.view(), self.p.bias.as_ref().map(|b| b.view()))
    }

    /// Backward pass: adds `∂L/∂W` and `∂L/∂b` into `g` and returns `∂L/∂x`.
    ///
    /// # Panics
    /// If `grad_y` is not `[N, d_out]` for the N of the forward pass, or `g` has other
    /// shapes than the parameters.
    pub fn backward(
        &self,
        cache: &LinearCache<F>,
        grad_y: ArrayView2<F>,
        g: &mut LinearParams<F>,
    ) -> Array2<F> {
        affine_backward(
            cache.x.view(),
            self.p.weight.view(),
            grad_y,
            g.weight.view_mut(),
            g.bias.as_mut().map(|b| b.view_mut()),
        )
    }
}

/// `y = x·Wᵀ + b` for rows x `[N, d_in]` and W `[d_out, d_in]`: the arithmetic of every
/// projection in the crate.
///
/// # Panics
/// If the shapes do not fit.
pub fn affine<F: Float>(x: ArrayView2<F>, w: ArrayView2<F>, b: Option<ArrayView1<F>>) -> Array2<F> {
    check_affine(x, w, b);
    // SAFETY: gemm_bias writes every element of y (C is only written).
    unsafe { filled((x.nrows(), w.nrows()), |y| gemm_bias(x, w.t(), b, false, y)) }
}

/// [`affine`] into a given output, which may be a strided view.
///
/// # Panics
/// If the shapes do not fit.
pub fn affine_into<F: Float>(
    x: ArrayView2<F>,
    w: ArrayView2<F>,
    b: Option<ArrayView1<F>>,
    y: ArrayViewMut2<F>,
) {
    check_affine(x, w, b);
    assert_eq!(
        y.dim(),
        (x.nrows(), w.nrows()),
        "affine: y {:?} for x {:?} and W {:?}: expected [N, d_out]",
        y.shape(),
        x.shape(),
        w.shape()
    );
    gemm_bias(x, w.t(), b, false, y);
}

fn check_affine<F: Float>(x: ArrayView2<F>, w: ArrayView2<F>, b: Option<ArrayView1<F>>) {
    assert!(
        x.ncols() == w.ncols() && b.is_none_or(|b| b.len() == w.nrows()),
        "affine: x {:?}, W {:?}, bias {:?}: expected x [N, d_in], W [d_out, d_in], bias [d_out]",
        x.shape(),
        w.shape(),
        b.map(|b| b.len())
    );
}

/// Backward of [`affine`]: adds `grad_yᵀ·x` into `grad_w` and `Σ_rows grad_y` into
/// `grad_b`, returns `grad_y·W`.
///
/// # Panics
/// If the shapes do not fit.
pub fn affine_backward<F: Float>(
    x: ArrayView2<F>,
    w: ArrayView2<F>,
    grad_y: ArrayView2<F>,
    grad_w: ArrayViewMut2<F>,
    grad_b: Option<ArrayViewMut1<F>>,
) -> Array2<F> {
    check_affine(x, w, None);
    // SAFETY: a GEMM with β = 0 writes every element.
    unsafe {
        filled(x.dim(), |gx| {
            weights_beside(x, grad_y, grad_w, grad_b, || gemm(F::ONE, grad_y, w, F::ZERO, gx))
        })
    }
}

/// [`affine_backward_weights`] beside `input_grad`, the input gradient's product of the same
/// layer (`grad_y·W` or a fused form of it), on the two threads of a team of two
/// ([`join_gradients`]): the two products take the same FLOPs. The bias's column sums go
/// with the input gradient, whose operands pack in less time, unless the weight gradient's
/// bf16 packing takes them as it reads `grad_y` ([`bias_sums_in_packing`]).
///
/// # Panics
/// If the shapes do not fit.
pub(crate) fn weights_beside<F: Float>(
    x: ArrayView2<F>,
    grad_y: ArrayView2<F>,
    grad_w: ArrayViewMut2<F>,
    grad_b: Option<ArrayViewMut1<F>>,
    input_grad: impl FnOnce() + Send,
) {
    check_backward_weights(x, grad_y, grad_w.view(), grad_b.as_ref().map(|b| b.len()));
    let (with_weights, with_input) = if bias_sums_in_packing::<F>() {
        (grad_b, None)
    } else {
        (None, grad_b)
    };
    join_gradients(
        || gemm_weight_grad(grad_y, x, grad_w, with_weights),
        || {
            input_grad();
            if let Some(gb) = with_input {
                add_column_sums(grad_y, gb);
            }
        },
    )
}

/// The parameter half of [`affine_backward`]: adds `grad_yᵀ·x` into `grad_w` and
/// `Σ_rows grad_y` into `grad_b`.
///
/// # Panics
/// If the shapes do not fit.
pub fn affine_backward_weights<F: Float>(
    x: ArrayView2<F>,
    grad_y: ArrayView2<F>,
    grad_w: ArrayViewMut2<F>,
    grad_b: Option<ArrayViewMut1<F>>,
) {
    check_backward_weights(x, grad_y, grad_w.view(), grad_b.as_ref().map(|b| b.len()));
    gemm_weight_grad(grad_y, x, grad_w, grad_b);
}

/// The shapes of a weight gradient: `grad_w` `[d_out, d_in]` (and `grad_b` `[d_out]`) for rows
/// `x` `[N, d_in]` and `grad_y` `[N, d_out]`.
///
/// # Panics
/// If they do not fit.
pub(crate) fn check_backward_weights<F: Float>(
    x: ArrayView2<F>,
    grad_y: ArrayView2<F>,
    grad_w: ArrayView2<F>,
    grad_b: Option<usize>,
) {
    assert!(
        grad_y.nrows() == x.nrows()
            && grad_w.dim() == (grad_y.ncols(), x.ncols())
            && grad_b.is_none_or(|n| n == grad_y.ncols()),
        "affine_backward: x {:?}, grad_y {:?}, grad_W {:?}, grad_b {:?}",
        x.shape(),
        grad_y.shape(),
        grad_w.shape(),
        grad_b
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::params::{Params, Tensors};
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn gradients_match_finite_differences_with_and_without_bias() {
        for bias in [true, false] {
            let mut rng = StdRng::seed_from_u64(20);
            let layer = LinearConfig::new(5, 3)
                .with_bias(bias)
                .init_as::<f64>(&mut rng)
                .unwrap();
            let x: Array2<f64> = random_like((4, 5), &mut rng);
            let r: Array2<f64> = random_like((4, 3), &mut rng);
            let (_, cache) = layer.forward(x.view());
            let mut g = layer.p.zeros_like();
            let grad_x = layer.backward(&cache, r.view(), &mut g);
            let mut point = (Tensors::new().with("x", x), layer.p.clone());
            let analytic = (Tensors::new().with("x", grad_x), g);
            let report = GradCheck::default().run(&mut point, &analytic, |(t, p)| {
                let y = affine(
                    t.get("x").view().into_dimensionality().unwrap(),
                    p.weight.view(),
                    p.bias.as_ref().map(|b| b.view()),
                );
                (&y * &r).sum()
            });
            report.assert_ok();
            report.assert_all_nonzero();
        }
    }

    #[test]
    fn backward_accumulates() {
        let mut rng = StdRng::seed_from_u64(21);
        let layer = LinearConfig::new(3, 2).init_as::<f64>(&mut rng).unwrap();
        let x: Array2<f64> = random_like((4, 3), &mut rng);
        let r: Array2<f64> = random_like((4, 2), &mut rng);
        let (_, cache) = layer.forward(x.view());
        let mut once = layer.p.zeros_like();
        layer.backward(&cache, r.view(), &mut once);
        let mut twice = layer.p.zeros_like();
        layer.backward(&cache, r.view(), &mut twice);
        layer.backward(&cache, r.view(), &mut twice);
        assert!(
            (&twice.weight - &(&once.weight * 2.0))
                .iter()
                .all(|v| v.abs() < 1e-12)
        );
    }

    #[test]
    fn config_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(LinearConfig::new(0, 3).init(&mut rng).is_err());
        assert!(LinearConfig::new(3, 0).init(&mut rng).is_err());
    }

    #[test]
    #[should_panic(expected = "expected [N, d_in = 3]")]
    fn wrong_width_panics_with_both_shapes() {
        let layer = LinearConfig::new(3, 2)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        layer.infer(Array2::zeros((2, 4)).view());
    }
}
