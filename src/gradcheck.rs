//! Finite-difference checks of hand-written backward passes, for this crate's layers and
//! for yours.
//!
//! The check compares an analytic gradient with the five-point central difference
//! `(L(θ − 2h) − 8·L(θ − h) + 8·L(θ + h) − L(θ + 2h)) / 12h`, whose truncation error is
//! O(h⁴), for every element of every tensor (or a sample of them). The
//! loss is best a random projection of the output, `L = Σ R ⊙ y` with R fixed, so that
//! `∂L/∂y = R` is what the backward pass is fed.
//!
//! In `f64` (every layer is generic over [`Float`]) the defaults are sharp: step `1e-4`
//! (truncation error near 1e-16, rounding error near 1e-12 of the loss), relative error at
//! most `1e-6`. In `f32` use a step near `1e-2` and a bound near `1e-2`.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array2;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::gradcheck::{GradCheck, random_like};
//! use vaswani::layers::LinearConfig;
//! use vaswani::{Params, Tensors};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let layer = LinearConfig::new(3, 2).init_as::<f64>(&mut rng)?;
//! let x: Array2<f64> = random_like((4, 3), &mut rng);
//! let r: Array2<f64> = random_like((4, 2), &mut rng);
//!
//! // Analytic gradients: backward fed with ∂L/∂y = R.
//! let (_, cache) = layer.forward(x.view());
//! let mut grads = layer.p.zeros_like();
//! let grad_x = layer.backward(&cache, r.view(), &mut grads);
//!
//! // The point and its gradient, as (inputs, parameters).
//! let mut point = (Tensors::new().with("x", x), layer.p.clone());
//! let analytic = (Tensors::new().with("x", grad_x), grads);
//! let report = GradCheck::default().run(&mut point, &analytic, |(inputs, p)| {
//!     let y = vaswani::layers::Linear { cfg: layer.cfg.clone(), p: p.clone() }
//!         .infer(inputs.get("x").view().into_dimensionality().unwrap());
//!     (&y * &r).sum()
//! });
//! report.assert_ok();
//! report.assert_all_nonzero();
//! # Ok::<(), vaswani::Error>(())
//! ```
//!
//! # Gradients that are zero by the mathematics
//!
//! [`GradCheckReport::assert_all_nonzero`] catches a parameter that no gradient reaches (a
//! forgotten `+=` in a backward). Some parameters get an exactly zero gradient by the
//! mathematics, and the check would panic on them for no bug: **the key bias `b_k` of every
//! attention layer with biases** ([`MultiHead`](crate::layers::MultiHead), and so every
//! encoder or decoder layer, block and model built with `bias = true`). It adds `q·b_k` to
//! every score of a query's row, and a softmax does not change when one constant is added to
//! a whole row along the keys, so `∂L/∂b_k = 0`. PyTorch's `nn.MultiheadAttention` has the same
//! zero gradient on the key part of `in_proj_bias`. Name such tensors in
//! [`GradCheckReport::assert_all_nonzero_except`], which also checks that they are zero:
//!
//! ```
//! use vaswani::ndarray::Array3;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::gradcheck::{GradCheck, random_like};
//! use vaswani::layers::{Mask, MultiHead, MultiHeadConfig};
//! use vaswani::{Params, Tensors};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let mha = MultiHeadConfig::new(4, 2).with_p_drop(0.0).init_as::<f64>(&mut rng)?;
//! let x: Array3<f64> = random_like((1, 3, 4), &mut rng);
//! let r: Array3<f64> = random_like((1, 3, 4), &mut rng);
//! let (_, cache) = mha.forward(x.view(), None, &Mask::none(), &mut rng);
//! let mut grads = mha.p.zeros_like();
//! let (grad_x, _) = mha.backward(&cache, r.view(), &mut grads);
//!
//! let mut point = (Tensors::new().with("x", x), mha.p.clone());
//! let analytic = (Tensors::new().with("x", grad_x), grads);
//! let report = GradCheck::default().run(&mut point, &analytic, |(inputs, p)| {
//!     let layer = MultiHead { cfg: mha.cfg.clone(), p: p.clone() };
//!     let x = inputs.get("x").view().into_dimensionality().unwrap();
//!     (&layer.infer(x, None, &Mask::none()) * &r).sum()
//! });
//! report.assert_ok();
//! assert_eq!(report.zero_gradients(), ["b_k"]); // by the mathematics, not a bug
//! report.assert_all_nonzero_except(&["b_k"]); // `assert_all_nonzero()` would panic here
//! # Ok::<(), vaswani::Error>(())
//! ```

use std::fmt;

use ndarray::{Array, Dimension, ShapeBuilder};
use rand::Rng;

use crate::kernels::Float;
use crate::params::Params;

/// Settings of a finite-difference check.
#[derive(Clone, Debug, PartialEq)]
pub struct GradCheck {
    /// The step h of the five-point central difference.
    pub step: f64,
    /// The largest relative error accepted, `|a − n| / max(|a|, |n|, abs_floor)`.
    pub tolerance: f64,
    /// Below this magnitude errors are measured absolutely (both values near 0). The check
    /// raises it to cover the rounding noise of the loss, `20·ε_f64·|L|/(step·tolerance)`,
    /// where a truly zero gradient reads as about `ε_f64·|L|/step`.
    pub abs_floor: f64,
    /// Check at most this many elements per tensor, spread evenly; `usize::MAX` for all.
    pub max_per_tensor: usize,
}

impl Default for GradCheck {
    /// Sharp settings for `f64`: step `1e-4`, tolerance `1e-6`, floor `1e-5`, every element.
    ///
    /// The floor is there because rounding in the loss leaves about `1e-12·|L|` of noise in
    /// each numeric derivative: a gradient that is truly 0 reads as ±1e-12 or so.
    fn default() -> Self {
        GradCheck {
            step: 1e-4,
            tolerance: 1e-6,
            abs_floor: 1e-5,
            max_per_tensor: usize::MAX,
        }
    }
}

/// The result for one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorCheck {
    /// The tensor's dotted name.
    pub name: String,
    /// How many elements were checked.
    pub checked: usize,
    /// The worst relative error among them.
    pub max_error: f64,
    /// The flat index of the worst element, with its analytic and numeric values.
    pub worst: (usize, f64, f64),
    /// The largest analytic gradient magnitude in the tensor (0 means no gradient arrived).
    pub max_abs_grad: f64,
}

/// The result of [`GradCheck::run`]: one row per tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct GradCheckReport {
    /// The tolerance the rows were held to.
    pub tolerance: f64,
    /// One row per tensor, in visiting order.
    pub tensors: Vec<TensorCheck>,
}

impl GradCheck {
    /// Compares `analytic` with central differences of `loss` around `point`.
    ///
    /// `point` and `analytic` must have the same tensors in the same order (the gradient of a
    /// parameter tree has the tree's own type). `point` is perturbed one element at a time
    /// and restored exactly.
    ///
    /// # Panics
    /// If `point` and `analytic` have different names or shapes.
    pub fn run<F: Float, P: Params<F>>(
        &self,
        point: &mut P,
        analytic: &P,
        mut loss: impl FnMut(&P) -> F,
    ) -> GradCheckReport {
        let mut grads: Vec<(String, Vec<F>, Vec<usize>)> = Vec::new();
        analytic.visit("", &mut |name, t| {
            grads.push((name.to_string(), t.iter().copied().collect(), t.shape().to_vec()))
        });
        let mut shapes = Vec::new();
        point.visit("", &mut |name, t| {
            shapes.push((name.to_string(), t.shape().to_vec()))
        });
        assert_eq!(
            shapes,
            grads
                .iter()
                .map(|(n, _, s)| (n.clone(), s.clone()))
                .collect::<Vec<_>>(),
            "GradCheck: the point and the analytic gradient have different tensors"
        );
        let noise = 20.0 * f64::EPSILON * loss(point).to_f64().abs() / (self.step * self.tolerance);
        let floor = self.abs_floor.max(noise);
        let mut tensors = Vec::new();
        for (t_idx, (name, grad, _)) in grads.iter().enumerate() {
            let len = grad.len();
            let stride = len.div_ceil(self.max_per_tensor.max(1)).max(1);
            let mut row = TensorCheck {
                name: name.clone(),
                checked: 0,
                max_error: 0.0,
                worst: (0, 0.0, 0.0),
                max_abs_grad: grad.iter().map(|g| g.to_f64().abs()).fold(0.0, f64::max),
            };
            for i in (0..len).step_by(stride) {
                let original = get(point, t_idx, i);
                let mut at = |offset: f64| {
                    set(
                        point,
                        t_idx,
                        i,
                        F::from_f64(original.to_f64() + offset * self.step),
                    );
                    loss(point).to_f64()
                };
                let (m2, m1, p1, p2) = (at(-2.0), at(-1.0), at(1.0), at(2.0));
                set(point, t_idx, i, original);
                let numeric = (m2 - 8.0 * m1 + 8.0 * p1 - p2) / (12.0 * self.step);
                let a = grad[i].to_f64();
                let err = (a - numeric).abs() / a.abs().max(numeric.abs()).max(floor);
                if err > row.max_error || err.is_nan() {
                    row.max_error = err;
                    row.worst = (i, a, numeric);
                }
                row.checked += 1;
            }
            tensors.push(row);
        }
        GradCheckReport {
            tolerance: self.tolerance,
            tensors,
        }
    }
}

fn get<F: Float, P: Params<F>>(p: &P, tensor: usize, i: usize) -> F {
    let mut k = 0;
    let mut out = F::ZERO;
    p.visit("", &mut |_, t| {
        if k == tensor {
            out = match t.as_slice() {
                Some(s) => s[i],
                None => *t.iter().nth(i).expect("index in range"),
            };
        }
        k += 1;
    });
    out
}

fn set<F: Float, P: Params<F>>(p: &mut P, tensor: usize, i: usize, value: F) {
    let mut k = 0;
    p.visit_mut("", &mut |_, mut t| {
        if k == tensor {
            match t.as_slice_mut() {
                Some(s) => s[i] = value,
                None => *t.iter_mut().nth(i).expect("index in range") = value,
            }
        }
        k += 1;
    });
}

impl GradCheckReport {
    /// Whether every tensor is within the tolerance (a NaN error fails).
    pub fn is_ok(&self) -> bool {
        self.tensors.iter().all(|t| t.max_error <= self.tolerance)
    }

    /// The names of tensors whose analytic gradient is zero everywhere, up to rounding: at
    /// most `1e-10` of the largest gradient in the report.
    pub fn zero_gradients(&self) -> Vec<&str> {
        let largest = self.tensors.iter().map(|t| t.max_abs_grad).fold(0.0, f64::max);
        self.tensors
            .iter()
            .filter(|t| t.max_abs_grad <= 1e-10 * largest)
            .map(|t| t.name.as_str())
            .collect()
    }

    /// Panics with the whole report unless [`GradCheckReport::is_ok`].
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "gradient check failed:\n{self}");
    }

    /// Panics with the whole report if any tensor received no gradient (see
    /// [`GradCheckReport::zero_gradients`]).
    ///
    /// The key bias `b_k` of an attention layer with biases has a gradient of exactly zero by
    /// the mathematics (see the [module docs](self)), so this panics for any such layer, block
    /// or model: use [`GradCheckReport::assert_all_nonzero_except`]`(&["b_k"])` there.
    pub fn assert_all_nonzero(&self) {
        self.assert_all_nonzero_except(&[]);
    }

    /// As [`GradCheckReport::assert_all_nonzero`], for tensors whose names do not end with one
    /// of `exempt` (a parameter whose gradient is zero by the mathematics, not by a bug, such
    /// as the key bias of attention).
    pub fn assert_all_nonzero_except(&self, exempt: &[&str]) {
        let zero: Vec<&str> = self
            .zero_gradients()
            .into_iter()
            .filter(|n| !exempt.iter().any(|e| n.ends_with(e)))
            .collect();
        assert!(zero.is_empty(), "no gradient reached {zero:?}:\n{self}");
        for name in exempt {
            assert!(
                self.zero_gradients().iter().any(|n| n.ends_with(name))
                    || !self.tensors.iter().any(|t| t.name.ends_with(name)),
                "{name} was exempted as zero but has a gradient:\n{self}"
            );
        }
    }
}

impl fmt::Display for GradCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<40} {:>8} {:>12} {:>12}  worst (index: analytic vs numeric)",
            "tensor", "checked", "max error", "max |grad|"
        )?;
        for t in &self.tensors {
            let flag = if t.max_error <= self.tolerance {
                ""
            } else {
                "  <-- FAIL"
            };
            writeln!(
                f,
                "{:<40} {:>8} {:>12.3e} {:>12.3e}  {}: {:.9e} vs {:.9e}{flag}",
                t.name, t.checked, t.max_error, t.max_abs_grad, t.worst.0, t.worst.1, t.worst.2
            )?;
        }
        Ok(())
    }
}

/// An array of the given shape with elements uniform in [−1, 1): a fixed projection R for
/// `L = Σ R ⊙ y`, or a random input.
pub fn random_like<F: Float, D: Dimension, Sh: ShapeBuilder<Dim = D>>(
    shape: Sh,
    rng: &mut impl Rng,
) -> Array<F, D> {
    Array::from_shape_simple_fn(shape, || F::from_f64(rng.random_range(-1.0..1.0)))
}
