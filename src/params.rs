//! Parameters by name: one trait that visits every tensor of a layer, block or model.
//!
//! Parameters, their gradients and an optimizer's moment estimates share one type, so
//! `grads: LinearParams` has exactly the tensors of `params: LinearParams`. [`Params`] visits
//! them in a fixed order under dotted names (`self_attn.w_q`,
//! `encoder.layers.3.ffn.w1`); checkpoints, the PyTorch name map, weight-decay rules and the
//! gradient checker are all written against it.

use ndarray::{Array, ArrayD, ArrayViewD, ArrayViewMutD, Dimension};
use ndarray_rand::RandomExt;
use ndarray_rand::rand_distr::{Normal, Uniform};
use rand::Rng;

use crate::kernels::Float;

/// Elements per chunk of [`Params::sq_norm`].
pub const SQ_NORM_CHUNK: usize = 1 << 14;

/// The sum of squares of one tensor as [`Params::sq_norm`] adds it: in chunks of
/// [`SQ_NORM_CHUNK`] elements ([`chunk_sq_norm`], in parallel), the chunks' sums in order.
pub(crate) fn tensor_sq_norm<F: Float>(t: ArrayViewD<'_, F>) -> f64 {
    match t.as_slice_memory_order() {
        Some(x) => {
            let mut sums = vec![0.0f64; x.len().div_ceil(SQ_NORM_CHUNK)];
            let work = x.len();
            crate::kernels::parallel::for_each_chunk_mut(&mut sums, 1, work, |at, out| {
                for (i, o) in out.iter_mut().enumerate() {
                    let c = &x[(at + i) * SQ_NORM_CHUNK..((at + i + 1) * SQ_NORM_CHUNK).min(x.len())];
                    *o = chunk_sq_norm(c);
                }
            });
            sums.iter().sum::<f64>()
        }
        None => t.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>(),
    }
}

/// The sum of squares of one chunk (at most [`SQ_NORM_CHUNK`] elements) in `f64`, summed in
/// the lanes of [`crate::kernels::simd`].
pub(crate) fn chunk_sq_norm<F: Float>(c: &[F]) -> f64 {
    crate::kernels::simd::widest!(crate::kernels::simd::sum_map(c, |v| {
        let v = v.to_f64();
        v * v
    }))
}

/// A tree of named tensors that can be visited in a fixed order.
pub trait Params<F: Float> {
    /// Calls `f(name, tensor)` for every tensor, in a fixed order, names prefixed by
    /// `prefix` and a dot (no dot when `prefix` is empty).
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'a, F>));

    /// As [`Params::visit`], with mutable views.
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'a, F>));

    /// A copy with every element 0: the starting point of a gradient accumulator.
    fn zeros_like(&self) -> Self
    where
        Self: Clone,
    {
        let mut z = self.clone();
        z.fill(F::ZERO);
        z
    }

    /// Sets every element to `value` (large tensors in parallel chunks).
    fn fill(&mut self, value: F) {
        self.visit_mut("", &mut |_, mut t| match t.as_slice_memory_order_mut() {
            Some(x) => {
                let len = x.len();
                crate::kernels::parallel::for_each_chunk_mut(x, 1024, len, |_, c| {
                    crate::kernels::simd::fill_streaming(c, value)
                });
            }
            None => t.fill(value),
        });
    }

    /// Multiplies every element by `factor`.
    fn scale(&mut self, factor: F) {
        self.visit_mut("", &mut |_, mut t| t.mapv_inplace(|v| v * factor));
    }

    /// `self += factor · other`, tensor by tensor.
    ///
    /// # Panics
    /// If `other` has other tensors (names or shapes) than `self`.
    fn add_scaled(&mut self, other: &Self, factor: F) {
        let mut theirs = Vec::new();
        other.visit("", &mut |name, t| theirs.push((name.to_string(), t)));
        let mut it = theirs.into_iter();
        self.visit_mut("", &mut |name, mut t| {
            let (other_name, o) = it
                .next()
                .unwrap_or_else(|| panic!("add_scaled: {name} missing from the other tree"));
            assert!(
                other_name == name && o.shape() == t.shape(),
                "add_scaled: {name} {:?} paired with {other_name} {:?}",
                t.shape(),
                o.shape()
            );
            t.zip_mut_with(&o, |a, &b| *a += factor * b);
        });
    }

    /// The sum of squares of every element, accumulated in `f64`: tensor by tensor in visiting
    /// order, each in chunks of [`SQ_NORM_CHUNK`] elements summed in the lanes of
    /// [`crate::kernels::simd`] (in parallel), the chunks' sums added in order. The same value
    /// on every machine and for any number of threads.
    fn sq_norm(&self) -> f64 {
        let mut acc = 0.0;
        self.visit("", &mut |_, t| acc += tensor_sq_norm(t));
        acc
    }

    /// An opt-in check that every element is finite (no NaN, no infinity), for weights loaded
    /// from elsewhere or a training run that may have diverged.
    ///
    /// # Errors
    /// [`Error::NonFinite`](crate::Error::NonFinite) naming the first tensor that is not, and
    /// how many of its elements are not.
    fn check_finite(&self) -> crate::Result<()> {
        let mut bad: Option<(String, usize)> = None;
        self.visit("", &mut |name, t| {
            if bad.is_none() {
                let n = t.iter().filter(|v| !v.is_finite()).count();
                if n > 0 {
                    bad = Some((name.to_string(), n));
                }
            }
        });
        match bad {
            Some((name, n)) => Err(crate::Error::NonFinite {
                what: format!("{name} ({n} of its elements)"),
            }),
            None => Ok(()),
        }
    }

    /// The number of scalar parameters.
    fn num_params(&self) -> usize {
        let mut n = 0;
        self.visit("", &mut |_, t| n += t.len());
        n
    }

    /// The names and shapes of all tensors, in visiting order.
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        self.visit("", &mut |name, t| {
            out.push((name.to_string(), t.shape().to_vec()))
        });
        out
    }
}

/// `prefix.name`, or `name` when the prefix is empty.
pub fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{name}"),
    }
}

/// Names of at most this many bytes are joined on the stack by [`with_joined`].
const NAME_ON_STACK: usize = 192;

/// `f(&join(prefix, name))`, the name built on the stack where it fits in 192 bytes: the
/// visits of an optimizer step name every tensor of four trees (parameters, gradients and
/// two moments), and through [`join`] that had been a `String` per field and per layer, a
/// thousand allocations in a step of the `tiny` workload.
pub fn with_joined<R>(prefix: &str, name: &str, f: impl FnOnce(&str) -> R) -> R {
    if prefix.is_empty() {
        return f(name);
    }
    if name.is_empty() {
        return f(prefix);
    }
    let len = prefix.len() + 1 + name.len();
    if len > NAME_ON_STACK {
        return f(&join(prefix, name));
    }
    let mut buf = [0u8; NAME_ON_STACK];
    buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
    buf[prefix.len()] = b'.';
    buf[prefix.len() + 1..len].copy_from_slice(name.as_bytes());
    f(std::str::from_utf8(&buf[..len]).expect("two strs and a dot"))
}

/// [`with_joined`] with the decimal digits of `i` as the name (an element of a stack).
fn with_index<R>(prefix: &str, i: usize, f: impl FnOnce(&str) -> R) -> R {
    let mut digits = [0u8; 20];
    let (mut at, mut rest) = (digits.len(), i);
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    with_joined(
        prefix,
        std::str::from_utf8(&digits[at..]).expect("ASCII digits"),
        f,
    )
}

/// A single tensor is named by the prefix alone.
impl<F: Float, D: Dimension> Params<F> for Array<F, D> {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'a, F>)) {
        f(prefix, self.view().into_dyn());
    }
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'a, F>)) {
        f(prefix, self.view_mut().into_dyn());
    }
}

/// An absent tensor (a switched-off bias) visits nothing.
impl<F: Float, P: Params<F>> Params<F> for Option<P> {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'a, F>)) {
        if let Some(p) = self {
            p.visit(prefix, f);
        }
    }
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'a, F>)) {
        if let Some(p) = self {
            p.visit_mut(prefix, f);
        }
    }
}

/// A stack of layers: elements named `0`, `1`, ….
impl<F: Float, P: Params<F>> Params<F> for Vec<P> {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'a, F>)) {
        for (i, p) in self.iter().enumerate() {
            with_index(prefix, i, |name| p.visit(name, f));
        }
    }
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'a, F>)) {
        for (i, p) in self.iter_mut().enumerate() {
            with_index(prefix, i, |name| p.visit_mut(name, f));
        }
    }
}

/// Two trees side by side under the same prefix (inputs and parameters in a gradient check).
impl<F: Float, A: Params<F>, B: Params<F>> Params<F> for (A, B) {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'a, F>)) {
        self.0.visit(prefix, f);
        self.1.visit(prefix, f);
    }
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'a, F>)) {
        self.0.visit_mut(prefix, f);
        self.1.visit_mut(prefix, f);
    }
}

/// A list of named tensors of any rank: the inputs of a gradient check, or a loose set of
/// parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tensors<F: Float>(pub Vec<(String, ArrayD<F>)>);

impl<F: Float> Tensors<F> {
    /// An empty list.
    pub fn new() -> Self {
        Tensors(Vec::new())
    }

    /// Adds a tensor under `name`; returns the list for chaining.
    pub fn with<D: Dimension>(mut self, name: &str, t: Array<F, D>) -> Self {
        self.0.push((name.to_string(), t.into_dyn()));
        self
    }

    /// The tensor named `name`.
    ///
    /// # Panics
    /// If there is none.
    pub fn get(&self, name: &str) -> &ArrayD<F> {
        &self
            .0
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("Tensors: no tensor named {name:?}"))
            .1
    }
}

impl<F: Float> Params<F> for Tensors<F> {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewD<'a, F>)) {
        for (name, t) in &self.0 {
            with_joined(prefix, name, |name| f(name, t.view()));
        }
    }
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'a, F>)) {
        for (name, t) in &mut self.0 {
            with_joined(prefix, name, |name| f(name, t.view_mut()));
        }
    }
}

/// Implements [`Params`] for your own struct of parameters, so that the crate's optimizers,
/// [`Trainer`](crate::train::Trainer), gradient clipping, checkpoint averaging and
/// [`gradcheck`](crate::gradcheck) work with it.
///
/// The struct must take the float type as its one type parameter, `F: vaswani::Float`. The
/// listed fields are visited in the order given, each under its field name (`w`, `b`, …,
/// dotted behind the caller's prefix); a field may be an ndarray array, an `Option` of one
/// (an absent bias visits nothing), a `Vec` of anything that implements [`Params`] (named
/// `0`, `1`, …), or another such struct. Gradients then have the struct's own type:
/// `p.zeros_like()` is the gradient container that your `backward` adds into.
///
/// The expansion names only `$crate::…` paths, so your crate needs no `ndarray` dependency
/// of its own ([`ndarray`](crate::ndarray) is re-exported).
///
/// # Example
/// ```
/// use vaswani::ndarray::{Array1, Array2, ArrayView2};
/// use vaswani::{Float, Params, impl_params};
///
/// /// A learned gain and bias per feature: y = x ⊙ g + b.
/// #[derive(Clone, Debug)]
/// struct ScaleShift<F: Float> {
///     g: Array1<F>,
///     b: Option<Array1<F>>,
/// }
/// impl_params!(ScaleShift { g, b });
///
/// impl<F: Float> ScaleShift<F> {
///     fn forward(&self, x: ArrayView2<F>) -> Array2<F> {
///         let y = &x * &self.g;
///         match &self.b {
///             Some(b) => y + b,
///             None => y,
///         }
///     }
///
///     /// Adds ∂L/∂g and ∂L/∂b into `grads` (never zeroes it) and returns ∂L/∂x.
///     fn backward(&self, x: ArrayView2<F>, grad_y: ArrayView2<F>, grads: &mut Self) -> Array2<F> {
///         grads.g += &(&grad_y * &x).sum_axis(vaswani::ndarray::Axis(0));
///         if let Some(gb) = &mut grads.b {
///             *gb += &grad_y.sum_axis(vaswani::ndarray::Axis(0));
///         }
///         &grad_y * &self.g
///     }
/// }
///
/// let layer = ScaleShift { g: Array1::<f32>::ones(3), b: Some(Array1::zeros(3)) };
/// assert_eq!(layer.shapes(), [("g".to_string(), vec![3]), ("b".to_string(), vec![3])]);
/// let x = Array2::from_elem((2, 3), 2.0);
/// let mut grads = layer.zeros_like();
/// let grad_x = layer.backward(x.view(), Array2::ones((2, 3)).view(), &mut grads);
/// assert_eq!(grads.g[0], 4.0); // Σ over the 2 rows of 1 · 2
/// assert_eq!(grad_x, layer.forward(Array2::ones((2, 3)).view()));
/// ```
#[macro_export]
macro_rules! impl_params {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl<F: $crate::Float> $crate::Params<F> for $ty<F> {
            fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, $crate::ndarray::ArrayViewD<'a, F>)) {
                $( $crate::params::with_joined(prefix, stringify!($field), |name| $crate::Params::visit(&self.$field, name, f)); )*
            }
            fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, $crate::ndarray::ArrayViewMutD<'a, F>)) {
                $( $crate::params::with_joined(prefix, stringify!($field), |name| $crate::Params::visit_mut(&mut self.$field, name, f)); )*
            }
        }
    };
}

/// Implements [`Params`] for a layer by delegating to one field (its parameter struct): the
/// layer visits exactly its parameters' names, so a block can list its layers in
/// [`impl_params!`].
#[macro_export]
#[doc(hidden)]
macro_rules! delegate_params {
    ($ty:ident => $($path:ident).+) => {
        impl<F: $crate::Float> $crate::Params<F> for $ty<F> {
            fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, $crate::ndarray::ArrayViewD<'a, F>)) {
                $crate::Params::visit(&self.$($path).+, prefix, f);
            }
            fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, $crate::ndarray::ArrayViewMutD<'a, F>)) {
                $crate::Params::visit_mut(&mut self.$($path).+, prefix, f);
            }
        }
    };
}

/// Xavier/Glorot uniform initialisation, as PyTorch's `nn.init.xavier_uniform_`:
/// `U(−a, a)` with `a = √(6 / (fan_in + fan_out))`.
pub fn xavier_uniform<F: Float, D: Dimension, Sh: ndarray::ShapeBuilder<Dim = D>>(
    shape: Sh,
    fan_in: usize,
    fan_out: usize,
    rng: &mut impl Rng,
) -> Array<F, D> {
    let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let dist =
        Uniform::new_inclusive(F::from_f64(-a), F::from_f64(a)).expect("xavier_uniform: bounds are finite");
    Array::random_using(shape, dist, rng)
}

/// Normal initialisation `N(0, std²)`.
pub fn normal<F: Float, D: Dimension, Sh: ndarray::ShapeBuilder<Dim = D>>(
    shape: Sh,
    std: f64,
    rng: &mut impl Rng,
) -> Array<F, D> {
    let dist = Normal::new(0.0, std).expect("normal: std is finite and non-negative");
    Array::from_shape_simple_fn(shape, || F::from_f64(rng.sample(dist)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};
    use rand::SeedableRng;

    #[derive(Clone)]
    struct Two<F: Float> {
        w: Array2<F>,
        b: Option<Array1<F>>,
    }
    impl_params!(Two { w, b });

    /// Names joined on the stack are `join`'s: nested fields, elements of a stack past ten,
    /// an empty prefix, and a name too long for the stack.
    #[test]
    fn names_joined_on_the_stack_are_joins() {
        let long = "x".repeat(NAME_ON_STACK);
        let layer = Two {
            w: Array2::<f32>::zeros((1, 1)),
            b: Some(Array1::zeros(1)),
        };
        let stack = vec![layer; 12];
        let loose = Tensors::new()
            .with(&long, Array1::<f32>::zeros(1))
            .with("", Array1::zeros(1));
        let mut names = Vec::new();
        stack.visit("enc", &mut |n, _| names.push(n.to_string()));
        loose.visit("dec", &mut |n, _| names.push(n.to_string()));
        stack.visit("", &mut |n, _| names.push(n.to_string()));
        let mut want: Vec<String> = (0..12)
            .flat_map(|i| ["w", "b"].map(|f| join(&join("enc", &i.to_string()), f)))
            .collect();
        want.extend([join("dec", &long), "dec".to_string()]);
        want.extend((0..12).flat_map(|i| ["w", "b"].map(|f| join(&i.to_string(), f))));
        assert_eq!(names, want);
        assert_eq!(names[22], "enc.11.w");
    }

    #[test]
    fn visits_by_dotted_name_in_order() {
        let layers = vec![
            Two {
                w: Array2::<f32>::ones((2, 3)),
                b: Some(Array1::ones(2)),
            },
            Two {
                w: Array2::ones((1, 1)),
                b: None,
            },
        ];
        let expected = [("0.w", vec![2, 3]), ("0.b", vec![2]), ("1.w", vec![1, 1])];
        assert_eq!(layers.shapes(), expected.map(|(n, s)| (n.to_string(), s)));
        let mut names = vec![];
        layers.visit("stack", &mut |n, _| names.push(n.to_string()));
        assert_eq!(names, ["stack.0.w", "stack.0.b", "stack.1.w"]);
        assert_eq!(layers.num_params(), 9);
        let z = layers.zeros_like();
        assert_eq!(z.sq_norm(), 0.0);
        let mut doubled = layers.clone();
        doubled.add_scaled(&layers, 1.0);
        assert_eq!(doubled.sq_norm(), 4.0 * layers.sq_norm());
    }

    #[test]
    fn finiteness_check_names_the_tensor() {
        let mut layers = vec![Two {
            w: Array2::<f32>::ones((2, 2)),
            b: Some(Array1::ones(2)),
        }];
        assert!(layers.check_finite().is_ok());
        layers[0].b.as_mut().unwrap()[1] = f32::NAN;
        let err = layers.check_finite().unwrap_err().to_string();
        assert!(err.contains("0.b (1 of its elements)"), "{err}");
    }

    #[test]
    fn xavier_bounds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let w: Array2<f32> = xavier_uniform((64, 32), 32, 64, &mut rng);
        let a = (6.0_f32 / 96.0).sqrt();
        assert!(w.iter().all(|v| v.abs() <= a));
        assert!(w.iter().any(|v| v.abs() > 0.9 * a));
    }
}
