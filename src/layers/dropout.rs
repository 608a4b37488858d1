//! Dropout (§5.4): `y = x ⊙ m / (1 − p)` with `m` a Bernoulli(1 − p) mask, during training.
//!
//! The paper applies dropout "to the output of each sub-layer, before it is added to the
//! sub-layer input and normalized", and to the sums of the embeddings and positional
//! encodings, with `P_drop = 0.1` for the base model (§5.4). Each element is kept with
//! probability 1 − p and the survivors are scaled by 1/(1 − p) ("inverted" dropout), so the
//! expected output is the input and inference is the identity.
//!
//! The mask is a [`DropKey`] drawn from the `rng` handed to [`Dropout::forward`] (one `u64`)
//! and kept in the [`DropoutCache`]: a key from which any element's draw is computed where it
//! is needed, so no mask is stored. The same seed gives the same mask, for `f32` and `f64`
//! alike, and [`DropoutCache::mask`] writes it out. With `p = 0` nothing is drawn (the `rng`
//! is not touched) and the layer is a copy.
//!
//! Backward, for `grad_y = ∂L/∂y` and the scaled mask `m' = m / (1 − p)` of the forward
//! pass: `∂L/∂x = grad_y ⊙ m'`. There are no parameters.
//!
//! PyTorch equivalent: `nn.Dropout(p)`, in `train()` mode for [`Dropout::forward`] and in
//! `eval()` mode for [`Dropout::infer`]. PyTorch's masks come from its own generator, so
//! the same seed does not give PyTorch's mask.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array2;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::layers::DropoutConfig;
//!
//! let dropout = DropoutConfig::new(0.5).init()?;
//! let x = Array2::<f32>::ones((4, 8));
//! let (y, cache) = dropout.forward(x.view(), &mut StdRng::seed_from_u64(0));
//! // Survivors are scaled by 1/(1 − p) = 2, the others are 0.
//! assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
//! // Backward multiplies by the same mask.
//! let grad_x = dropout.backward(&cache, x.view());
//! assert_eq!(grad_x, y);
//! // Inference is the identity.
//! assert_eq!(dropout.infer(x.view()), x);
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rand::Rng;

use crate::error::{Result, check};
use crate::kernels::Float;
use crate::kernels::dropout::DropKey;

/// Configuration of a [`Dropout`] layer.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DropoutConfig {
    /// The probability p that an element is dropped, in [0, 1).
    pub p: f32,
}

/// Dropout `y = x ⊙ m / (1 − p)` in training, the identity in inference. See the
/// [module docs](self).
///
/// It has no parameters and no element type of its own: [`Dropout::forward`] works on
/// `f32` and `f64` rows alike.
#[derive(Clone, Debug, PartialEq)]
pub struct Dropout {
    /// Its configuration.
    pub cfg: DropoutConfig,
}

/// What [`Dropout::backward`] needs from the forward pass: the mask's key, `None` when
/// `p = 0`.
#[derive(Clone, Debug)]
pub struct DropoutCache<F: Float = f32> {
    key: Option<DropKey>,
    dim: (usize, usize),
    _f: std::marker::PhantomData<F>,
}
impl<F: Float> crate::kernels::workspace::Recycle for DropoutCache<F> {
    fn give_back(self) {}
}

impl DropoutConfig {
    /// Dropout with rate `p` (PyTorch's `nn.Dropout` defaults to 0.5; the paper uses 0.1).
    pub fn new(p: f32) -> Self {
        DropoutConfig { p }
    }

    /// Builds the layer.
    ///
    /// Unlike the other layers it takes no `rng` and no element type: there is nothing to
    /// initialise, and the mask's randomness comes in at [`Dropout::forward`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if `p` is not in [0, 1) (NaN
    /// included).
    pub fn init(&self) -> Result<Dropout> {
        check::dropout("p", self.p)?;
        Ok(Dropout { cfg: self.clone() })
    }
}

impl Default for DropoutConfig {
    /// The paper's rate, P_drop = 0.1 (§5.4).
    fn default() -> Self {
        DropoutConfig::new(0.1)
    }
}

impl Dropout {
    /// Forward pass in training: draws a mask from `rng`, keeps it for
    /// [`Dropout::backward`], and returns `x ⊙ mask`.
    ///
    /// With `p = 0` the output is a copy of `x` and `rng` is not used.
    ///
    /// # Shapes
    /// `x`: `[N, d]` → `[N, d]`, any d.
    ///
    /// # Panics
    /// If `p` is not in [0, 1) (only possible for a layer not built by
    /// [`DropoutConfig::init`]).
    pub fn forward<F: Float>(&self, x: ArrayView2<F>, rng: &mut impl Rng) -> (Array2<F>, DropoutCache<F>) {
        let cache = self.draw(x.dim(), rng);
        (cache.apply(x), cache)
    }

    /// Forward pass without a cache, for inference: a copy of `x`.
    ///
    /// # Shapes
    /// `x`: `[N, d]` → `[N, d]`.
    pub fn infer<F: Float>(&self, x: ArrayView2<F>) -> Array2<F> {
        x.to_owned()
    }

    /// Backward pass: returns `∂L/∂x = grad_y ⊙ mask`, with the mask of the forward pass.
    ///
    /// # Shapes
    /// `grad_y`: `[N, d]` → `[N, d]`.
    ///
    /// # Panics
    /// If `grad_y` does not have the shape of the forward pass's input.
    pub fn backward<F: Float>(&self, cache: &DropoutCache<F>, grad_y: ArrayView2<F>) -> Array2<F> {
        cache.apply(grad_y)
    }

    /// Draws the mask for an input of shape `dim` without applying it: a cache for
    /// [`DropoutCache::apply`] and [`DropoutCache::apply_inplace`]. With `p = 0` nothing is
    /// drawn.
    ///
    /// # Panics
    /// If `p` is not in [0, 1).
    pub fn draw<F: Float>(&self, dim: (usize, usize), rng: &mut impl Rng) -> DropoutCache<F> {
        let key = (self.cfg.p > 0.0).then(|| DropKey::draw(self.cfg.p, rng));
        DropoutCache {
            key,
            dim,
            _f: std::marker::PhantomData,
        }
    }
}

impl<F: Float> DropoutCache<F> {
    /// `x ⊙ mask`, or a copy of `x` when there is no mask: the forward arithmetic and the
    /// backward arithmetic alike.
    ///
    /// # Panics
    /// If `x` does not have the shape the mask was drawn for.
    pub fn apply(&self, x: ArrayView2<F>) -> Array2<F> {
        let mut y = crate::kernels::workspace::owned(x);
        self.apply_inplace(y.view_mut());
        y
    }

    /// [`DropoutCache::apply`] in place: `x ← x ⊙ mask`, nothing when there is no mask.
    ///
    /// # Panics
    /// If `x` does not have the shape the mask was drawn for.
    pub fn apply_inplace(&self, mut x: ArrayViewMut2<F>) {
        assert_eq!(
            x.dim(),
            self.dim,
            "Dropout: input is {:?}, but the mask was drawn for {:?}",
            x.shape(),
            [self.dim.0, self.dim.1]
        );
        let Some(key) = self.key else { return };
        let cols = self.dim.1;
        match x.as_slice_mut() {
            Some(x) => key.apply(0, x),
            None => {
                for (r, mut row) in x.rows_mut().into_iter().enumerate() {
                    for (c, v) in row.iter_mut().enumerate() {
                        *v *= key.factor(r * cols + c);
                    }
                }
            }
        }
    }

    /// The scaled mask written out, `0` or `1/(1 − p)` per element; `None` when `p = 0`.
    pub fn mask(&self) -> Option<Array2<F>> {
        self.key.map(|k| k.mask(self.dim))
    }

    /// The mask's key; `None` when `p = 0`.
    pub fn key(&self) -> Option<DropKey> {
        self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::params::Tensors;
    use rand::{RngCore, SeedableRng, rngs::StdRng};

    #[test]
    fn gradients_match_finite_differences_with_a_fixed_mask() {
        let mut rng = StdRng::seed_from_u64(40);
        let dropout = DropoutConfig::new(0.3).init().unwrap();
        let x: Array2<f64> = random_like((4, 5), &mut rng);
        let r: Array2<f64> = random_like((4, 5), &mut rng);
        let (_, cache) = dropout.forward(x.view(), &mut StdRng::seed_from_u64(41));
        let grad_x = dropout.backward(&cache, r.view());
        let mut point = Tensors::new().with("x", x);
        let analytic = Tensors::new().with("x", grad_x);
        let report = GradCheck::default().run(&mut point, &analytic, |t| {
            // The same seed inside the loss, so every evaluation sees the same mask.
            let x = t.get("x").view().into_dimensionality().unwrap();
            let (y, _) = dropout.forward(x, &mut StdRng::seed_from_u64(41));
            (&y * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero();
    }

    #[test]
    fn backward_uses_the_mask_of_the_forward_pass() {
        let dropout = DropoutConfig::new(0.4).init().unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        let x = Array2::<f64>::ones((6, 7));
        let (y, cache) = dropout.forward(x.view(), &mut rng);
        // The rng has moved on: a second mask would differ, the cached one must not.
        let _ = dropout.forward(x.view(), &mut rng);
        let grad_x = dropout.backward(&cache, x.view());
        assert_eq!(grad_x, y);
        assert_eq!(cache.mask(), Some(y.clone()));
        assert!(y.iter().any(|&v| v == 0.0) && y.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn same_seed_same_mask() {
        let dropout = DropoutConfig::new(0.5).init().unwrap();
        let x = Array2::<f32>::ones((5, 9));
        let (a, _) = dropout.forward(x.view(), &mut StdRng::seed_from_u64(43));
        let (b, _) = dropout.forward(x.view(), &mut StdRng::seed_from_u64(43));
        let (c, _) = dropout.forward(x.view(), &mut StdRng::seed_from_u64(44));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn p_zero_is_the_identity_and_draws_nothing() {
        let dropout = DropoutConfig::new(0.0).init().unwrap();
        let mut rng = StdRng::seed_from_u64(45);
        let x: Array2<f64> = random_like((3, 4), &mut rng);
        let (y, cache) = dropout.forward(x.view(), &mut rng);
        assert_eq!(y, x);
        assert!(cache.mask().is_none());
        assert_eq!(dropout.backward(&cache, x.view()), x);
        let mut fresh = StdRng::seed_from_u64(45);
        let _: Array2<f64> = random_like((3, 4), &mut fresh);
        assert_eq!(
            rng.next_u32(),
            fresh.next_u32(),
            "p = 0 must not draw from the rng"
        );
    }

    #[test]
    fn keeps_about_one_minus_p_and_infer_is_the_identity() {
        let dropout = DropoutConfig::new(0.3).init().unwrap();
        let x = Array2::<f32>::ones((200, 300));
        let (y, _) = dropout.forward(x.view(), &mut StdRng::seed_from_u64(46));
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
        assert!(
            (y.mean().unwrap() - 1.0).abs() < 0.02,
            "mean {}",
            y.mean().unwrap()
        );
        assert_eq!(dropout.infer(x.view()), x);
    }

    #[test]
    fn config_errors() {
        for p in [1.0, 1.5, -0.1, f32::NAN] {
            assert!(DropoutConfig::new(p).init().is_err(), "p {p}");
        }
        assert!(DropoutConfig::new(0.0).init().is_ok());
    }

    #[test]
    #[should_panic(expected = "input is [3, 4], but the mask was drawn for [4, 3]")]
    fn wrong_shape_panics_with_both_shapes() {
        let dropout = DropoutConfig::new(0.1).init().unwrap();
        let x = Array2::<f32>::ones((4, 3));
        let (_, cache) = dropout.forward(x.view(), &mut StdRng::seed_from_u64(0));
        dropout.backward(&cache, Array2::zeros((3, 4)).view());
    }
}
