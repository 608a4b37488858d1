//! A layer defined outside the crate, made trainable with `vaswani::impl_params!`, as a user
//! writes it: gradient-checked, stepped by the crate's optimizers, named like the crate's own.
//!
//! The layer lives in a module where `ndarray` names an empty local module, as in a user's
//! crate without an `ndarray` dependency of its own: the macro must reach ndarray through
//! `vaswani::ndarray`, never through a bare `ndarray::` path.

mod user {
    /// Shadows the `ndarray` crate (a dev-dependency of this package) inside this module.
    #[allow(dead_code)]
    mod ndarray {}

    use vaswani::ndarray::{Array1, Array2, ArrayView2, Axis};
    use vaswani::{Float, impl_params};

    /// y = x ⊙ g + b, per feature.
    #[derive(Clone, Debug, PartialEq)]
    pub struct ScaleShift<F: Float> {
        pub g: Array1<F>,
        pub b: Option<Array1<F>>,
    }
    impl_params!(ScaleShift { g, b });

    /// Two of them one after the other: nested parameter structs and a `Vec` of them.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Stack<F: Float> {
        pub layers: Vec<ScaleShift<F>>,
        pub out: Array2<F>,
    }
    impl_params!(Stack { layers, out });

    impl<F: Float> ScaleShift<F> {
        pub fn forward(&self, x: ArrayView2<F>) -> Array2<F> {
            let y = &x * &self.g;
            match &self.b {
                Some(b) => y + b,
                None => y,
            }
        }

        /// Adds ∂L/∂g and ∂L/∂b into `grads`, returns ∂L/∂x.
        pub fn backward(&self, x: ArrayView2<F>, grad_y: ArrayView2<F>, grads: &mut Self) -> Array2<F> {
            grads.g += &(&grad_y * &x).sum_axis(Axis(0));
            if let Some(gb) = &mut grads.b {
                *gb += &grad_y.sum_axis(Axis(0));
            }
            &grad_y * &self.g
        }
    }
}

use user::{ScaleShift, Stack};
use vaswani::gradcheck::{GradCheck, random_like};
use vaswani::ndarray::{Array1, Array2};
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::train::{Adam, AdamConfig, Optimizer};
use vaswani::{Params, Tensors};

#[test]
fn a_user_layer_is_named_checked_and_trained() {
    let mut rng = StdRng::seed_from_u64(0);
    let layer = ScaleShift::<f64> {
        g: random_like(4, &mut rng),
        b: Some(random_like(4, &mut rng)),
    };
    let stack = Stack {
        layers: vec![
            layer.clone(),
            ScaleShift {
                g: Array1::ones(2),
                b: None,
            },
        ],
        out: Array2::<f64>::zeros((2, 3)),
    };
    let names: Vec<String> = stack.shapes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["layers.0.g", "layers.0.b", "layers.1.g", "out"]);

    // The gradient check of the user's backward, through the crate's checker.
    let x: Array2<f64> = random_like((3, 4), &mut rng);
    let r: Array2<f64> = random_like((3, 4), &mut rng);
    let mut grads = layer.zeros_like();
    let grad_x = layer.backward(x.view(), r.view(), &mut grads);
    let mut point = (Tensors::new().with("x", x.clone()), layer.clone());
    let analytic = (Tensors::new().with("x", grad_x), grads);
    let report = GradCheck::default().run(&mut point, &analytic, |(inputs, p)| {
        let x = inputs.get("x").view().into_dimensionality().unwrap();
        (&p.forward(x) * &r).sum()
    });
    report.assert_ok();
    report.assert_all_nonzero();

    // Trained by the crate's optimizer towards y = 2x + 1.
    let mut layer = ScaleShift::<f32> {
        g: Array1::zeros(4),
        b: Some(Array1::zeros(4)),
    };
    let mut adam = Adam::new(AdamConfig::paper(), &layer).unwrap();
    let x: Array2<f32> = random_like((16, 4), &mut rng);
    let target = x.mapv(|v| 2.0 * v + 1.0);
    for _ in 0..400 {
        let y = layer.forward(x.view());
        let grad_y = (&y - &target) * (2.0 / y.len() as f32);
        let mut grads = layer.zeros_like();
        layer.backward(x.view(), grad_y.view(), &mut grads);
        adam.step(&mut layer, &grads, 0.05);
    }
    assert!(layer.g.iter().all(|g| (g - 2.0).abs() < 1e-2), "{}", layer.g);
    assert!(layer.b.as_ref().unwrap().iter().all(|b| (b - 1.0).abs() < 1e-2));
}
