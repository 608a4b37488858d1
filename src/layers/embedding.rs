//! Token embedding `y = √d_model · E[id]` (§3.4), and the tied output projection
//! `logits = h·Eᵀ`.
//!
//! The table E is `[V, d_model]`, one row per token, as PyTorch's `nn.Embedding` stores it.
//! Token ids come as a `[B, T]` array and leave as rows `[B·T, d_model]`: row `b·T + t` is
//! the embedding of `ids[b, t]`. "In the embedding layers, we multiply those weights by
//! √d_model" (§3.4); [`EmbeddingConfig::scale`] switches that factor (written s below) off.
//!
//! The paper also shares "the same weight matrix between the two embedding layers and the
//! pre-softmax linear transformation" (§3.4). [`Embedding::project`] is that pre-softmax
//! transformation, `logits = h·Eᵀ`, reading the same E, without the √d_model factor and
//! without a bias. Both backward passes *add* into the same `g.weight`, so the gradient of
//! the tied weight is the sum of its two uses with no extra code.
//!
//! Backward, for `grad_y = ∂L/∂y` and `grad_logits = ∂L/∂logits`:
//! - embedding: `∂L/∂E[v] = s · Σ_{r : ids[r] = v} grad_y[r]`, a scatter-add over the rows
//!   r of the batch, run in row order on one thread so that the result is deterministic
//!   when a token repeats; token ids have no gradient.
//! - projection: `∂L/∂h = grad_logits·E`, `∂L/∂E = grad_logitsᵀ·h`.
//!
//! Initialisation: E ~ N(0, σ²) with σ = d_model^(−1/2), so that the scaled embedding
//! `√d_model · E[id]` has unit variance, and so do the tied logits `h·Eᵀ` for an `h` of unit
//! variance (the output of a layer norm). This is what tensor2tensor and fairseq do; the
//! paper does not say. PyTorch's `nn.Embedding` initialises N(0, 1).
//!
//! PyTorch equivalent:
//! ```text
//! emb = nn.Embedding(V, d_model)                   # weight [V, d_model]
//! y = emb(ids) * math.sqrt(d_model)                # forward (scale = true)
//! logits = F.linear(h, emb.weight)                 # project: nn.Linear(d_model, V, bias=False)
//!                                                  # with lm_head.weight = emb.weight
//! ```
//! Differences from PyTorch: no `padding_idx` (a padding token gets an embedding and a
//! gradient like any other; mask it in the loss), no `max_norm`, no sparse gradients.
//!
//! Differences from the paper: none in the arithmetic. The paper ties all three uses (source
//! embedding, target embedding, pre-softmax projection, with a shared source/target BPE
//! vocabulary); a model gets that by using one `Embedding` for all three. `scale = false` and
//! an untied projection (a separate [`Linear`](crate::layers::Linear)) are options the paper
//! does not use.
//!
//! # Example
//! ```
//! use vaswani::ndarray::array;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::layers::EmbeddingConfig;
//! use vaswani::Params;
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let emb = EmbeddingConfig::new(10, 4).init(&mut rng)?;
//! let ids = array![[1_usize, 2, 3], [3, 3, 9]]; // B = 2, T = 3
//!
//! let (y, cache) = emb.forward(ids.view())?; // [B·T, d_model] = [6, 4]
//! assert_eq!(y.dim(), (6, 4));
//! assert_eq!(y.row(4), &emb.p.weight.row(3) * 2.0); // √d_model = 2
//!
//! // The tied pre-softmax projection reads the same table.
//! let (logits, pcache) = emb.project(y.view()); // [6, V]
//! assert_eq!(logits.dim(), (6, 10));
//!
//! // Both backward passes add into one gradient of the shared weight
//! // (here with ∂L/∂logits = logits, as if L = ½‖logits‖²).
//! let mut g = emb.p.zeros_like();
//! let grad_y = emb.project_backward(&pcache, logits.view(), &mut g);
//! emb.backward(&cache, grad_y.view(), &mut g);
//!
//! // An id outside the vocabulary is an error, not a panic.
//! assert!(emb.forward(array![[0_usize, 10]].view()).is_err());
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array2, ArrayView2};
use rand::Rng;

use crate::error::{Error, Result, check};
use crate::kernels::parallel::for_each_chunk_mut;
use crate::kernels::{Float, gemm};
use crate::layers::linear::weights_beside;
use crate::params::normal;

/// Configuration of an [`Embedding`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EmbeddingConfig {
    /// Vocabulary size V: ids run from 0 to V − 1.
    pub vocab: usize,
    /// Embedding width d_model.
    pub d_model: usize,
    /// Whether [`Embedding::forward`] multiplies by √d_model (§3.4). Default `true`.
    pub scale: bool,
}

/// Parameters of an [`Embedding`] (and, with the same type, their gradients).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(bound = ""))]
pub struct EmbeddingParams<F: Float = f32> {
    /// E, `[V, d_model]`: row v is the embedding of token v.
    pub weight: Array2<F>,
}
crate::impl_params!(EmbeddingParams { weight });

/// A token embedding `y = √d_model · E[id]` with its tied output projection `h·Eᵀ`. See
/// the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding<F: Float = f32> {
    /// Its configuration.
    pub cfg: EmbeddingConfig,
    /// Its parameters.
    pub p: EmbeddingParams<F>,
}
crate::delegate_params!(Embedding => p);

/// What [`Embedding::backward`] needs from the forward pass: the ids, `[B, T]`.
#[derive(Clone, Debug)]
pub struct EmbeddingCache {
    ids: Array2<usize>,
}
impl crate::kernels::workspace::Recycle for EmbeddingCache {
    fn give_back(self) {}
}

/// What [`Embedding::project_backward`] needs from [`Embedding::project`]: the input h.
#[derive(Clone, Debug)]
pub struct ProjectionCache<F: Float = f32> {
    h: Array2<F>,
}
crate::kernels::workspace::impl_recycle!(ProjectionCache<F: Float> { h });

impl EmbeddingConfig {
    /// Its number of parameters, `vocab · d_model`, in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around). A lookup costs no FLOPs;
    /// as the tied output projection it costs what a [`LinearConfig`](crate::layers::LinearConfig)
    /// of `d_model → vocab` does.
    pub fn params(&self) -> f64 {
        self.vocab as f64 * self.d_model as f64
    }

    /// An embedding of `vocab` tokens in `d_model` features, scaled by √d_model.
    pub fn new(vocab: usize, d_model: usize) -> Self {
        EmbeddingConfig {
            vocab,
            d_model,
            scale: true,
        }
    }

    /// The same config with the √d_model factor switched on or off.
    pub fn with_scale(mut self, scale: bool) -> Self {
        self.scale = scale;
        self
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`EmbeddingConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`EmbeddingConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<Embedding> {
        self.init_as(rng)
    }

    /// Builds the layer: E ~ N(0, 1/d_model), so that `√d_model · E[id]` has unit variance
    /// (PyTorch's `nn.Embedding` draws N(0, 1) instead).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `vocab` or `d_model` is 0.
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<Embedding<F>> {
        check::positive("vocab", self.vocab)?;
        check::positive("d_model", self.d_model)?;
        check::tensor("vocab", &[self.vocab, self.d_model], size_of::<F>())?;
        let std = 1.0 / (self.d_model as f64).sqrt();
        Ok(Embedding {
            cfg: self.clone(),
            p: EmbeddingParams {
                weight: normal((self.vocab, self.d_model), std, rng),
            },
        })
    }
}

/// [`Error::TokenOutOfRange`] for the first id of `ids` `[B, T]`, in row-major order, that is
/// not below `vocab`, reported at `(b, first + t)`: `first` is the position of column 0 in its
/// sequence (a decoding step's ids come after those already fed).
pub(crate) fn check_ids(ids: ArrayView2<usize>, vocab: usize, first: usize) -> Result<()> {
    match ids.indexed_iter().find(|&(_, &id)| id >= vocab) {
        Some(((b, t), &id)) => Err(Error::TokenOutOfRange {
            id,
            position: (b, first + t),
            vocab,
        }),
        None => Ok(()),
    }
}

impl<F: Float> Embedding<F> {
    /// Forward pass, keeping the ids for [`Embedding::backward`].
    ///
    /// # Shapes
    /// `ids`: `[B, T]` → `[B·T, d_model]`, row `b·T + t` for `ids[b, t]`.
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`] for the first id (in row-major order) that is not below
    /// `vocab`, with its position `(b, t)`.
    pub fn forward(&self, ids: ArrayView2<usize>) -> Result<(Array2<F>, EmbeddingCache)> {
        let y = self.infer(ids)?;
        Ok((
            y,
            EmbeddingCache {
                ids: ids.as_standard_layout().into_owned(),
            },
        ))
    }

    /// Forward pass without a cache, for inference.
    ///
    /// # Errors
    /// As [`Embedding::forward`].
    pub fn infer(&self, ids: ArrayView2<usize>) -> Result<Array2<F>> {
        self.check_ids(ids)?;
        let s = self.factor();
        let w = self.p.weight.view();
        let d = self.cfg.d_model;
        let mut y = crate::kernels::workspace::zeros((ids.len(), d));
        // `ids.iter()` runs in row-major order: b, then t.
        let flat: Vec<usize> = ids.iter().copied().collect();
        let w = w.as_standard_layout();
        let w = w.as_slice().expect("standard layout");
        let out = y.as_slice_mut().expect("a new array is contiguous");
        for_each_chunk_mut(out, d, out.len(), |at, rows| {
            for (r, row) in rows.chunks_exact_mut(d).enumerate() {
                let id = flat[at / d + r];
                for (o, &e) in row.iter_mut().zip(&w[id * d..(id + 1) * d]) {
                    *o = s * e;
                }
            }
        });
        Ok(y)
    }

    /// Backward pass: adds `∂L/∂E` into `g.weight`, a scatter-add of the (scaled) rows of
    /// `grad_y` in row order on one thread. Ids have no gradient, so nothing is returned.
    ///
    /// # Shapes
    /// `grad_y`: `[B·T, d_model]` for the `[B, T]` ids of the forward pass.
    ///
    /// # Panics
    /// If `grad_y` is not `[B·T, d_model]`, or `g.weight` is not `[V, d_model]`.
    pub fn backward(&self, cache: &EmbeddingCache, grad_y: ArrayView2<F>, g: &mut EmbeddingParams<F>) {
        assert_eq!(
            grad_y.dim(),
            (cache.ids.len(), self.cfg.d_model),
            "Embedding::backward: grad_y is {:?}, expected [B·T, d_model] = [{}, {}] for ids {:?}",
            grad_y.shape(),
            cache.ids.len(),
            self.cfg.d_model,
            cache.ids.shape()
        );
        self.check_grad(g);
        let s = self.factor();
        for (&id, gy) in cache.ids.iter().zip(grad_y.rows()) {
            g.weight.row_mut(id).scaled_add(s, &gy);
        }
    }

    /// The tied pre-softmax projection `logits = h·Eᵀ` (§3.4), keeping h for
    /// [`Embedding::project_backward`]. No √d_model factor and no bias.
    ///
    /// # Shapes
    /// `h`: `[N, d_model]` → `[N, V]`.
    ///
    /// # Panics
    /// If `h` is not `[N, d_model]`.
    pub fn project(&self, h: ArrayView2<F>) -> (Array2<F>, ProjectionCache<F>) {
        let logits = self.project_infer(h);
        (
            logits,
            ProjectionCache {
                h: crate::kernels::workspace::owned(h),
            },
        )
    }

    /// [`Embedding::project`] without a cache, for inference.
    ///
    /// # Panics
    /// If `h` is not `[N, d_model]`.
    pub fn project_infer(&self, h: ArrayView2<F>) -> Array2<F> {
        assert_eq!(
            h.ncols(),
            self.cfg.d_model,
            "Embedding::project: h is {:?}, expected [N, d_model = {}]",
            h.shape(),
            self.cfg.d_model
        );
        // SAFETY: a GEMM with β = 0 writes every element.
        unsafe {
            crate::kernels::filled((h.nrows(), self.cfg.vocab), |logits| {
                gemm(F::ONE, h, self.p.weight.t(), F::ZERO, logits)
            })
        }
    }

    /// Backward of [`Embedding::project`]: adds `grad_logitsᵀ·h` into `g.weight` and
    /// returns `∂L/∂h = grad_logits·E`.
    ///
    /// # Shapes
    /// `grad_logits`: `[N, V]` → `[N, d_model]`.
    ///
    /// # Panics
    /// If `grad_logits` is not `[N, V]` for the N of the forward pass, or `g.weight` is not
    /// `[V, d_model]`.
    pub fn project_backward(
        &self,
        cache: &ProjectionCache<F>,
        grad_logits: ArrayView2<F>,
        g: &mut EmbeddingParams<F>,
    ) -> Array2<F> {
        assert_eq!(
            grad_logits.dim(),
            (cache.h.nrows(), self.cfg.vocab),
            "Embedding::project_backward: grad_logits is {:?}, expected [N, V] = [{}, {}]",
            grad_logits.shape(),
            cache.h.nrows(),
            self.cfg.vocab
        );
        self.check_grad(g);
        // SAFETY: a GEMM with β = 0 writes every element.
        unsafe {
            crate::kernels::filled(cache.h.dim(), |gh| {
                weights_beside(cache.h.view(), grad_logits, g.weight.view_mut(), None, || {
                    gemm(F::ONE, grad_logits, self.p.weight.view(), F::ZERO, gh)
                })
            })
        }
    }

    /// The factor s: √d_model, or 1 when scaling is off.
    fn factor(&self) -> F {
        if self.cfg.scale {
            F::from_f64((self.cfg.d_model as f64).sqrt())
        } else {
            F::ONE
        }
    }

    /// The first id, in row-major order, that is not below `vocab`.
    fn check_ids(&self, ids: ArrayView2<usize>) -> Result<()> {
        check_ids(ids, self.cfg.vocab, 0)
    }

    fn check_grad(&self, g: &EmbeddingParams<F>) {
        assert_eq!(
            g.weight.dim(),
            self.p.weight.dim(),
            "Embedding: gradient weight is {:?}, expected [V, d_model] = {:?}",
            g.weight.shape(),
            self.p.weight.shape()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::params::{Params, Tensors};
    use ndarray::array;
    use rand::{SeedableRng, rngs::StdRng};

    /// Ids with repeats inside a sequence and across the batch, and tokens that never occur
    /// (4 and 6), for a vocabulary of 7.
    fn ids() -> Array2<usize> {
        array![[1, 3, 3, 0], [5, 1, 2, 3]]
    }

    fn with(emb: &Embedding<f64>, p: &EmbeddingParams<f64>) -> Embedding<f64> {
        Embedding {
            cfg: emb.cfg.clone(),
            p: p.clone(),
        }
    }

    #[test]
    fn embedding_gradient_matches_finite_differences_with_repeated_ids() {
        for scale in [true, false] {
            let mut rng = StdRng::seed_from_u64(30);
            let emb = EmbeddingConfig::new(7, 5)
                .with_scale(scale)
                .init_as::<f64>(&mut rng)
                .unwrap();
            let ids = ids();
            let r: Array2<f64> = random_like((8, 5), &mut rng);
            let (_, cache) = emb.forward(ids.view()).unwrap();
            let mut g = emb.p.zeros_like();
            emb.backward(&cache, r.view(), &mut g);
            let mut point = emb.p.clone();
            let report = GradCheck::default().run(&mut point, &g, |p| {
                (&with(&emb, p).infer(ids.view()).unwrap() * &r).sum()
            });
            report.assert_ok();
            report.assert_all_nonzero();
            // Token 3 occurs three times: its gradient is the sum of three rows.
            let s = if scale { 5.0_f64.sqrt() } else { 1.0 };
            let want = (&r.row(1) + &r.row(2) + r.row(7)) * s;
            assert!((&g.weight.row(3) - &want).iter().all(|v| v.abs() < 1e-12));
            // Tokens that never occur get exactly nothing.
            for unused in [4, 6] {
                assert!(g.weight.row(unused).iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn projection_gradients_match_finite_differences() {
        let mut rng = StdRng::seed_from_u64(31);
        let emb = EmbeddingConfig::new(7, 5).init_as::<f64>(&mut rng).unwrap();
        let h: Array2<f64> = random_like((3, 5), &mut rng);
        let r: Array2<f64> = random_like((3, 7), &mut rng);
        let (_, cache) = emb.project(h.view());
        let mut g = emb.p.zeros_like();
        let grad_h = emb.project_backward(&cache, r.view(), &mut g);
        let mut point = (Tensors::new().with("h", h), emb.p.clone());
        let analytic = (Tensors::new().with("h", grad_h), g);
        let report = GradCheck::default().run(&mut point, &analytic, |(t, p)| {
            let logits = with(&emb, p).project_infer(t.get("h").view().into_dimensionality().unwrap());
            (&logits * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero();
    }

    #[test]
    fn tied_weight_gradient_is_the_sum_of_both_uses() {
        // L = Σ R ⊙ project(tanh(embed(ids))), with one E in both places.
        let mut rng = StdRng::seed_from_u64(32);
        let emb = EmbeddingConfig::new(7, 5).init_as::<f64>(&mut rng).unwrap();
        let ids = ids();
        let r: Array2<f64> = random_like((8, 7), &mut rng);
        let (y, e_cache) = emb.forward(ids.view()).unwrap();
        let h = y.mapv(f64::tanh);
        let (_, p_cache) = emb.project(h.view());

        let mut tied = emb.p.zeros_like();
        let grad_h = emb.project_backward(&p_cache, r.view(), &mut tied);
        let grad_y = &grad_h * &h.mapv(|v| 1.0 - v * v);
        emb.backward(&e_cache, grad_y.view(), &mut tied);

        // The two parts, each into its own zeroed container.
        let mut from_project = emb.p.zeros_like();
        emb.project_backward(&p_cache, r.view(), &mut from_project);
        let mut from_embed = emb.p.zeros_like();
        emb.backward(&e_cache, grad_y.view(), &mut from_embed);
        let sum = &from_project.weight + &from_embed.weight;
        assert!((&tied.weight - &sum).iter().all(|v| v.abs() < 1e-12));
        assert!(from_project.weight.iter().any(|&v| v != 0.0));
        assert!(from_embed.weight.iter().any(|&v| v != 0.0));

        let mut point = emb.p.clone();
        let report = GradCheck::default().run(&mut point, &tied, |p| {
            let layer = with(&emb, p);
            let h = layer.infer(ids.view()).unwrap().mapv(f64::tanh);
            (&layer.project_infer(h.view()) * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero();
    }

    #[test]
    fn scale_multiplies_rows_by_sqrt_d_model() {
        let mut rng = StdRng::seed_from_u64(33);
        let ids = ids();
        for scale in [true, false] {
            let emb = EmbeddingConfig::new(7, 16)
                .with_scale(scale)
                .init(&mut rng)
                .unwrap();
            let y = emb.infer(ids.view()).unwrap();
            let s = if scale { 4.0 } else { 1.0 };
            for (r, &id) in ids.iter().enumerate() {
                assert_eq!(y.row(r), &emb.p.weight.row(id) * s, "row {r}, scale {scale}");
            }
        }
        assert!(EmbeddingConfig::new(7, 16).scale);
    }

    #[test]
    fn init_gives_unit_variance_after_scaling() {
        let mut rng = StdRng::seed_from_u64(34);
        let emb = EmbeddingConfig::new(500, 64).init_as::<f64>(&mut rng).unwrap();
        let var = emb.p.weight.mapv(|v| v * v).mean().unwrap();
        assert!((var * 64.0 - 1.0).abs() < 0.03, "64·var = {}", var * 64.0);
        let all: Array2<usize> = Array2::from_shape_fn((1, 500), |(_, t)| t);
        let y = emb.infer(all.view()).unwrap();
        let var_y = y.mapv(|v| v * v).mean().unwrap();
        assert!((var_y - 1.0).abs() < 0.03, "var {var_y}");
    }

    #[test]
    fn out_of_range_id_is_an_error_naming_the_first_one() {
        let mut rng = StdRng::seed_from_u64(35);
        let emb = EmbeddingConfig::new(7, 4).init(&mut rng).unwrap();
        let ids = array![[1, 2, 3], [4, 9, 7], [0, 100, 1]];
        let want = Error::TokenOutOfRange {
            id: 9,
            position: (1, 1),
            vocab: 7,
        };
        assert_eq!(emb.forward(ids.view()).unwrap_err(), want);
        assert_eq!(emb.infer(ids.view()).unwrap_err(), want);
        assert_eq!(
            want.to_string(),
            "token id 9 at batch row 1, position 1 is out of range for a vocabulary of 7"
        );
        // Ids in a transposed view are reported at their logical position.
        let t = ids.t();
        assert!(matches!(
            emb.infer(t).unwrap_err(),
            Error::TokenOutOfRange {
                id: 9,
                position: (1, 1),
                ..
            }
        ));
        // The last id of the vocabulary is fine.
        assert!(emb.infer(array![[6]].view()).is_ok());
    }

    #[test]
    fn transposed_ids_give_rows_in_logical_order() {
        let mut rng = StdRng::seed_from_u64(36);
        let emb = EmbeddingConfig::new(7, 3).init_as::<f64>(&mut rng).unwrap();
        let ids_t = array![[1, 5], [3, 1], [3, 2], [0, 3]]; // [T, B]
        let ids = ids_t.t(); // [B, T] by strides
        let (y, cache) = emb.forward(ids).unwrap();
        assert_eq!(y, emb.infer(ids.to_owned().view()).unwrap());
        let r: Array2<f64> = random_like((8, 3), &mut StdRng::seed_from_u64(1));
        let (mut a, mut b) = (emb.p.zeros_like(), emb.p.zeros_like());
        emb.backward(&cache, r.view(), &mut a);
        let (_, cache) = emb.forward(ids.to_owned().view()).unwrap();
        emb.backward(&cache, r.view(), &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn backward_accumulates() {
        let mut rng = StdRng::seed_from_u64(37);
        let emb = EmbeddingConfig::new(7, 3).init_as::<f64>(&mut rng).unwrap();
        let (_, cache) = emb.forward(ids().view()).unwrap();
        let r: Array2<f64> = random_like((8, 3), &mut rng);
        let mut once = emb.p.zeros_like();
        emb.backward(&cache, r.view(), &mut once);
        let mut twice = emb.p.zeros_like();
        emb.backward(&cache, r.view(), &mut twice);
        emb.backward(&cache, r.view(), &mut twice);
        assert!(
            (&twice.weight - &(&once.weight * 2.0))
                .iter()
                .all(|v| v.abs() < 1e-12)
        );
    }

    #[test]
    fn config_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(EmbeddingConfig::new(0, 3).init(&mut rng).is_err());
        assert!(EmbeddingConfig::new(3, 0).init(&mut rng).is_err());
    }

    #[test]
    #[should_panic(expected = "expected [B·T, d_model] = [8, 4]")]
    fn wrong_gradient_shape_panics_with_both_shapes() {
        let emb = EmbeddingConfig::new(7, 4)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        let (_, cache) = emb.forward(ids().view()).unwrap();
        emb.backward(&cache, Array2::zeros((8, 5)).view(), &mut emb.p.zeros_like());
    }

    #[test]
    #[should_panic(expected = "expected [N, d_model = 4]")]
    fn wrong_projection_width_panics_with_both_shapes() {
        let emb = EmbeddingConfig::new(7, 4)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        emb.project_infer(Array2::zeros((2, 7)).view());
    }
}
