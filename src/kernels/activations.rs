//! Element-wise activations of the feed-forward layer (§3.3) and their derivatives.
//!
//! - ReLU, `max(0, x)`: the paper's choice. Its derivative at exactly 0 is taken as 0, as
//!   PyTorch does.
//! - GELU, `x·Φ(x) = x/2 · (1 + erf(x/√2))`: the exact form, PyTorch's `F.gelu` default and
//!   what `nn.Transformer(activation="gelu")` uses. Derivative `Φ(x) + x·φ(x)`.
//! - GELU, tanh approximation `x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`: PyTorch's
//!   `approximate="tanh"`, GPT-2's choice.

use super::Float;

/// Which non-linearity the position-wise feed-forward layer applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Activation {
    /// `max(0, x)`, the paper's (§3.3).
    #[default]
    Relu,
    /// `x·Φ(x)` with the exact `erf`: PyTorch's `"gelu"`.
    Gelu,
    /// The tanh approximation of GELU: PyTorch's `approximate="tanh"`.
    GeluTanh,
}

/// `$body` with `$act` bound to the constant of `$a`'s variant, one arm each.
macro_rules! for_each_variant {
    ($a:expr, |$act:ident| $body:expr) => {
        match $a {
            Activation::Relu => {
                let $act = Activation::Relu;
                $body
            }
            Activation::Gelu => {
                let $act = Activation::Gelu;
                $body
            }
            Activation::GeluTanh => {
                let $act = Activation::GeluTanh;
                $body
            }
        }
    };
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the peak of the standard normal density φ.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const GELU_TANH_C: f64 = 0.044_715;

/// `erf(x/√2)`, shared by GELU and its derivative.
#[inline(always)]
fn gelu_erf<F: Float>(x: F) -> F {
    (x * F::from_f64(FRAC_1_SQRT_2)).erf()
}

/// GELU, `x·Φ(x)`, from `erf(x/√2)`.
#[inline(always)]
fn gelu<F: Float>(x: F, erf: F) -> F {
    F::from_f64(0.5) * x * (F::ONE + erf)
}

/// GELU's derivative, `Φ(x) + x·φ(x)`, from `erf(x/√2)`.
#[inline(always)]
fn gelu_slope<F: Float>(x: F, erf: F) -> F {
    let half = F::from_f64(0.5);
    let cdf = half * (F::ONE + erf);
    let pdf = F::from_f64(FRAC_1_SQRT_2PI) * (-half * x * x).exp_vector();
    cdf + x * pdf
}

/// `tanh(√(2/π)·(x + 0.044715·x³))`, shared by the tanh approximation and its derivative.
#[inline(always)]
fn gelu_tanh_t<F: Float>(x: F) -> F {
    (F::from_f64(SQRT_2_OVER_PI) * (x + F::from_f64(GELU_TANH_C) * x * x * x)).tanh()
}

/// The tanh approximation of GELU from its `tanh`.
#[inline(always)]
fn gelu_tanh<F: Float>(x: F, t: F) -> F {
    F::from_f64(0.5) * x * (F::ONE + t)
}

/// The tanh approximation's derivative from its `tanh`.
#[inline(always)]
fn gelu_tanh_slope<F: Float>(x: F, t: F) -> F {
    let (c, k, half) = (
        F::from_f64(GELU_TANH_C),
        F::from_f64(SQRT_2_OVER_PI),
        F::from_f64(0.5),
    );
    half * (F::ONE + t) + half * x * (F::ONE - t * t) * k * (F::ONE + F::from_f64(3.0) * c * x * x)
}

impl Activation {
    /// The activation at `x`. Always inlined: the layers' loops of it are built for the
    /// CPU's vector instructions, and GELU's fused multiply-adds must be compiled there, not in
    /// a function of its own for the baseline CPU (whose `mul_add` is a call).
    #[inline(always)]
    pub fn apply<F: Float>(self, x: F) -> F {
        match self {
            // NaN stays NaN (as PyTorch's ReLU): a NaN must not turn into a finite 0.
            Activation::Relu => {
                if x > F::ZERO || x.is_nan() {
                    x
                } else {
                    F::ZERO
                }
            }
            Activation::Gelu => gelu(x, gelu_erf(x)),
            Activation::GeluTanh => gelu_tanh(x, gelu_tanh_t(x)),
        }
    }

    /// The derivative of the activation at `x` (always inlined, as [`Activation::apply`]).
    #[inline(always)]
    pub fn derivative<F: Float>(self, x: F) -> F {
        match self {
            Activation::Relu => {
                if x > F::ZERO {
                    F::ONE
                } else {
                    F::ZERO
                }
            }
            Activation::Gelu => gelu_slope(x, gelu_erf(x)),
            Activation::GeluTanh => gelu_tanh_slope(x, gelu_tanh_t(x)),
        }
    }

    /// `(act(x), act′(x))`, the bits of [`Activation::apply`] and [`Activation::derivative`],
    /// with what the two have in common computed once: GELU's `erf(x/√2)`, the tanh
    /// approximation's `tanh`. Always inlined, as they are.
    #[inline(always)]
    pub fn apply_and_derivative<F: Float>(self, x: F) -> (F, F) {
        match self {
            Activation::Relu => (self.apply(x), self.derivative(x)),
            Activation::Gelu => {
                let erf = gelu_erf(x);
                (gelu(x, erf), gelu_slope(x, erf))
            }
            Activation::GeluTanh => {
                let t = gelu_tanh_t(x);
                (gelu_tanh(x, t), gelu_tanh_slope(x, t))
            }
        }
    }

    /// `a ← act(x)` and `x ← act′(x)` for every element ([`Activation::apply_and_derivative`]),
    /// as [`Activation::apply_all`] builds its loop.
    ///
    /// # Panics
    /// If `a` is shorter than `x`.
    #[inline(always)]
    pub(crate) fn apply_keeping_derivative<F: Float>(self, x: &mut [F], a: &mut [F]) {
        let a = &mut a[..x.len()];
        for_each_variant!(self, |act| {
            for (x, a) in x.iter_mut().zip(a.iter_mut()) {
                (*a, *x) = act.apply_and_derivative(*x);
            }
        })
    }

    /// `x ← act(x)` for every element. The activation is fixed outside the loop (a loop
    /// that chose it element by element stayed scalar), and the loop is inlined into the
    /// caller's, so that it vectorises where the caller is built for vector instructions.
    #[inline(always)]
    pub(crate) fn apply_all<F: Float>(self, x: &mut [F]) {
        // A `for` loop, not `for_each`: the iterator's method was compiled on its own, for the
        // baseline CPU, its fused multiply-adds calls.
        for_each_variant!(self, |act| {
            for v in x.iter_mut() {
                *v = act.apply(*v);
            }
        })
    }

    /// The naive twin of [`Activation::apply`]: the textbook formula in `f64`.
    pub fn apply_naive(self, x: f64) -> f64 {
        match self {
            Activation::Relu => {
                if x.is_nan() {
                    x
                } else {
                    x.max(0.0)
                }
            }
            Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / 2.0_f64.sqrt())),
            Activation::GeluTanh => {
                0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Activation; 3] = [Activation::Relu, Activation::Gelu, Activation::GeluTanh];

    #[test]
    fn matches_naive_formula() {
        for act in ALL {
            for i in -400..=400 {
                let x = i as f64 / 50.0;
                assert!(
                    (act.apply(x) - act.apply_naive(x)).abs() < 1e-15,
                    "{act:?} at {x}"
                );
                let x32 = x as f32;
                assert!(
                    (act.apply(x32) as f64 - act.apply_naive(x32 as f64)).abs() < 2e-6,
                    "{act:?} f32 at {x}"
                );
            }
        }
    }

    /// The activation and its derivative computed together are the bits of the two computed
    /// apart, in `f64` and `f32`, at ordinary values, far in the tails, at zero of either sign,
    /// the infinities and NaN.
    #[test]
    fn apply_and_derivative_together_are_the_bits_of_each_apart() {
        let mut xs: Vec<f64> = (-600..=600).map(|i| i as f64 / 37.0).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e10, -1e10]);
        xs.extend([f64::INFINITY, f64::NEG_INFINITY, f64::NAN]);
        for act in ALL {
            for &x in &xs {
                let (a, d) = act.apply_and_derivative(x);
                assert_eq!(a.to_bits(), act.apply(x).to_bits(), "{act:?} f64 at {x}");
                assert_eq!(d.to_bits(), act.derivative(x).to_bits(), "{act:?}′ f64 at {x}");
                let x = x as f32;
                let (a, d) = act.apply_and_derivative(x);
                assert_eq!(a.to_bits(), act.apply(x).to_bits(), "{act:?} f32 at {x}");
                assert_eq!(d.to_bits(), act.derivative(x).to_bits(), "{act:?}′ f32 at {x}");
            }
        }
    }

    #[test]
    fn derivative_matches_finite_differences() {
        let h = 1e-6;
        for act in ALL {
            for i in -300..=300 {
                let x = i as f64 / 50.0 + 0.013; // off the ReLU kink
                let numeric = (act.apply(x + h) - act.apply(x - h)) / (2.0 * h);
                assert!((numeric - act.derivative(x)).abs() < 1e-8, "{act:?} at {x}");
            }
        }
    }

    /// The layers' loops ([`Activation::apply_all`], [`Activation::apply_keeping_derivative`])
    /// give each element the bits of the scalar calls, built for the baseline CPU or for its
    /// vector instructions; the `f32` derivative stays near the `f64` one.
    #[test]
    fn loops_give_the_scalar_bits_in_every_build() {
        use crate::kernels::simd::widest;
        let x: Vec<f32> = (0..5000)
            .map(|i| -12.0 + 0.0049 * i as f32)
            .chain([f32::NAN, -0.0])
            .collect();
        for act in ALL {
            let scalar: Vec<u32> = x.iter().map(|&v| act.apply(v).to_bits()).collect();
            let (mut plain, mut wide) = (x.clone(), x.clone());
            act.apply_all(&mut plain);
            widest!(act.apply_all(&mut wide));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), scalar, "{act:?}");
            assert_eq!(bits(&wide), scalar, "{act:?}");
            let (mut plain, mut wide) = (x.clone(), x.clone());
            let (mut plain_a, mut wide_a) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            act.apply_keeping_derivative(&mut plain, &mut plain_a);
            widest!(act.apply_keeping_derivative(&mut wide, &mut wide_a));
            let derivative: Vec<u32> = x.iter().map(|&v| act.derivative(v).to_bits()).collect();
            let applied: Vec<u32> = x.iter().map(|&v| act.apply(v).to_bits()).collect();
            for (a, d) in [(&plain_a, &plain), (&wide_a, &wide)] {
                assert_eq!(bits(a), applied, "{act:?}: act(x) beside act′(x)");
                assert_eq!(bits(d), derivative, "{act:?}: act′(x) beside act(x)");
            }
            for &v in &x[..5000] {
                let want = act.derivative(v as f64);
                assert!((act.derivative(v) as f64 - want).abs() < 2e-6, "{act:?} at {v}");
            }
        }
    }

    #[test]
    fn nan_stays_nan() {
        // PyTorch's relu, gelu and gelu(approximate="tanh") all give NaN for NaN.
        for act in ALL {
            assert!(act.apply(f32::NAN).is_nan(), "{act:?} f32");
            assert!(act.apply(f64::NAN).is_nan(), "{act:?} f64");
            assert!(act.apply_naive(f64::NAN).is_nan(), "{act:?} naive");
        }
        assert_eq!(Activation::Relu.apply(-0.0_f32).to_bits(), 0.0_f32.to_bits());
    }

    #[test]
    fn known_values() {
        // PyTorch: F.gelu(torch.tensor(1.0)) = 0.8413447, approximate="tanh": 0.8411920.
        assert!((Activation::Gelu.apply(1.0_f64) - 0.841_344_746).abs() < 1e-8);
        assert!((Activation::GeluTanh.apply(1.0_f64) - 0.841_191_990).abs() < 1e-8);
        assert_eq!(Activation::Relu.derivative(0.0_f32), 0.0);
    }
}
