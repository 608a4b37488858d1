//! Optimizers over any [`Params`] tree, and clipping by the global gradient norm.
//!
//! The moment estimates of [`Adam`] and the velocity of [`Sgd`] have the type of the
//! parameters, so they are visited, saved and restored under the same dotted names. The
//! learning rate comes in with each step, from a [`crate::train::Schedule`].
//!
//! - [`Adam`] with the paper's settings (§5.3): β₁ = 0.9, β₂ = 0.98, ε = 1e-9
//!   ([`AdamConfig::paper`]); PyTorch's `torch.optim.Adam`.
//! - AdamW: Adam with decoupled weight decay (Loshchilov & Hutter), applied to tensors of
//!   rank ≥ 2 only, so biases and layer-norm gains are not decayed ([`AdamConfig::adamw`]);
//!   PyTorch's `torch.optim.AdamW` with the usual two parameter groups.
//! - [`Sgd`] with momentum, PyTorch's `torch.optim.SGD(momentum=μ)`.
//!
//! A [`Trainer`](crate::train::Trainer) builds the one its
//! [`TrainerConfig::optimizer`](crate::train::TrainerConfig::optimizer) names
//! ([`OptimizerConfig`]) and keeps it as an [`OptimizerState`].
//!
//! Every update is element-wise, so it does not depend on the thread count.

use ndarray::{ArrayViewD, ArrayViewMutD, Zip};

use crate::error::{Error, Result};
use crate::kernels::Float;
use crate::kernels::parallel::{Disjoint, for_each_chunk_mut};
use crate::kernels::simd::{LANES, reduce, widest};
use crate::params::{Params, SQ_NORM_CHUNK, chunk_sq_norm, tensor_sq_norm};

/// An optimizer: updates parameters from their gradients.
pub trait Optimizer<F: Float, P: Params<F>> {
    /// One update with learning rate `lr`.
    ///
    /// # Panics
    /// If `grads` has other tensors than `params`.
    fn step(&mut self, params: &mut P, grads: &P, lr: f64);

    /// One update, as [`Optimizer::step`], that also returns the global L2 norm of `grads`:
    /// the value of `grads.sq_norm().sqrt()` ([`Params::sq_norm`]), bit for bit. [`Adam`]
    /// sums it in its own pass over the gradients, which then are read from memory once
    /// rather than twice (a trainer that does not clip reports the norm of every step).
    ///
    /// # Panics
    /// As [`Optimizer::step`].
    fn step_with_norm(&mut self, params: &mut P, grads: &P, lr: f64) -> f64 {
        let norm = grads.sq_norm().sqrt();
        self.step(params, grads, lr);
        norm
    }
}

/// The largest step count an optimizer is rebuilt with: 2⁵³, the last integer `f64` holds
/// exactly.
pub const MAX_STEPS: u64 = 1 << 53;

/// A step count an optimizer is rebuilt with is at most [`MAX_STEPS`].
fn check_steps(t: u64) -> Result<()> {
    if t > MAX_STEPS {
        return Err(Error::config(
            "step",
            format!("a step count must be at most 2^53 = {MAX_STEPS}, got {t}"),
        ));
    }
    Ok(())
}

/// Settings of [`Adam`] and AdamW.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdamConfig {
    /// β₁, the decay of the first moment.
    pub beta1: f64,
    /// β₂, the decay of the second moment.
    pub beta2: f64,
    /// ε, added to the root of the second moment.
    pub eps: f64,
    /// Weight decay λ (0 for none).
    pub weight_decay: f64,
    /// `true`: decoupled decay `θ ← θ − lr·λ·θ` (AdamW), on tensors of rank ≥ 2 only.
    /// `false`: L2 decay `g ← g + λ·θ` on every tensor (PyTorch's `Adam(weight_decay=λ)`).
    pub decoupled: bool,
}

impl AdamConfig {
    /// The paper's Adam (§5.3): β₁ = 0.9, β₂ = 0.98, ε = 1e-9, no weight decay.
    pub fn paper() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            weight_decay: 0.0,
            decoupled: false,
        }
    }

    /// AdamW: PyTorch's defaults β₁ = 0.9, β₂ = 0.999, ε = 1e-8, with decoupled weight decay
    /// `weight_decay` on tensors of rank ≥ 2 (weights and embeddings, not biases or norms).
    pub fn adamw(weight_decay: f64) -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decoupled: true,
        }
    }

    /// Checks the settings without building anything.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for β outside [0, 1), ε that is not finite and positive, or a
    /// negative or non-finite weight decay.
    pub fn check(&self) -> Result<()> {
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(field, format!("must be in [0, 1), got {v}")));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config(
                "eps",
                format!("must be finite and positive, got {}", self.eps),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "weight_decay",
                format!("must be finite and ≥ 0, got {}", self.weight_decay),
            ));
        }
        Ok(())
    }
}

impl Default for AdamConfig {
    /// The paper's Adam ([`AdamConfig::paper`]).
    fn default() -> Self {
        AdamConfig::paper()
    }
}

/// Adam (and AdamW). Its state is public so that checkpoints can save and restore it.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam<F: Float, P: Params<F>> {
    /// Its settings.
    pub cfg: AdamConfig,
    /// First-moment estimates, shaped as the parameters.
    pub m: P,
    /// Second-moment estimates, shaped as the parameters.
    pub v: P,
    /// Steps taken so far.
    pub t: u64,
    _f: std::marker::PhantomData<F>,
}

impl<F: Float, P: Params<F> + Clone> Adam<F, P> {
    /// A fresh optimizer for `params` (moments zero, no step taken).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for β outside [0, 1), ε ≤ 0 or a negative or non-finite decay.
    pub fn new(cfg: AdamConfig, params: &P) -> Result<Self> {
        cfg.check()?;
        Ok(Adam {
            cfg,
            m: params.zeros_like(),
            v: params.zeros_like(),
            t: 0,
            _f: std::marker::PhantomData,
        })
    }
}

impl<F: Float, P: Params<F>> Adam<F, P> {
    /// Rebuilds an optimizer from saved state, `t` steps taken.
    ///
    /// # Errors
    /// As [`Adam::new`], and [`Error::InvalidConfig`] for a step count above 2⁵³ (no
    /// training reaches it; past it a step number is no longer exact in `f64`, and near
    /// `u64::MAX` the next step would overflow): a count read from a file is bounded before
    /// use.
    pub fn from_state(cfg: AdamConfig, m: P, v: P, t: u64) -> Result<Self> {
        cfg.check()?;
        check_steps(t)?;
        Ok(Adam {
            cfg,
            m,
            v,
            t,
            _f: std::marker::PhantomData,
        })
    }
}

impl<F: Float, P: Params<F>> Optimizer<F, P> for Adam<F, P> {
    fn step(&mut self, params: &mut P, grads: &P, lr: f64) {
        self.update(params, grads, lr, false);
    }

    fn step_with_norm(&mut self, params: &mut P, grads: &P, lr: f64) -> f64 {
        self.update(params, grads, lr, true).sqrt()
    }
}

impl<F: Float, P: Params<F>> Adam<F, P> {
    /// One update; with `norm`, also the sum of squares of `grads`, tensor by tensor and
    /// chunk by chunk as [`Params::sq_norm`] sums it (each chunk's sum taken just before the
    /// chunk's update, while its gradients are in cache), else 0.
    fn update(&mut self, params: &mut P, grads: &P, lr: f64, norm: bool) -> f64 {
        self.t = self.t.saturating_add(1);
        let c = &self.cfg;
        let (b1, b2) = (c.beta1, c.beta2);
        let bias1 = 1.0 - b1.powi(self.t.min(i32::MAX as u64) as i32);
        let bias2 = 1.0 - b2.powi(self.t.min(i32::MAX as u64) as i32);
        // θ ← θ − (lr/bias1)·m / (√v/√bias2 + ε), as PyTorch computes it.
        let step_size = F::from_f64(lr / bias1);
        let inv_sqrt_bias2 = F::from_f64(1.0 / bias2.sqrt());
        let (b1f, b2f) = (F::from_f64(b1), F::from_f64(b2));
        let (one_b1, one_b2) = (F::from_f64(1.0 - b1), F::from_f64(1.0 - b2));
        let eps = F::from_f64(c.eps);
        let l2 = F::from_f64(if c.decoupled { 0.0 } else { c.weight_decay });
        let decay = c.decoupled && c.weight_decay > 0.0;
        let shrink = F::from_f64(1.0 - lr * c.weight_decay);
        let mut sq = 0.0f64;
        zip_state(
            params,
            grads,
            &mut [&mut self.m, &mut self.v],
            |_, mut p, g, state| {
                let [m, v] = state else {
                    unreachable!("two state trees")
                };
                if decay && p.ndim() >= 2 {
                    p.mapv_inplace(|x| x * shrink);
                }
                let update = |p: &mut F, g: F, m: &mut F, v: &mut F| {
                    let g = g + l2 * *p;
                    *m = b1f * *m + one_b1 * g;
                    *v = b2f * *v + one_b2 * g * g;
                    *p -= step_size * *m / (v.sqrt() * inv_sqrt_bias2 + eps);
                };
                let same = p.is_standard_layout()
                    && g.is_standard_layout()
                    && m.is_standard_layout()
                    && v.is_standard_layout();
                if !same {
                    if norm {
                        sq += tensor_sq_norm(g.view());
                    }
                    Zip::from(&mut p)
                        .and(&g)
                        .and(m)
                        .and(v)
                        .for_each(|p, &g, m, v| update(p, g, m, v));
                    return;
                }
                // One flat loop per tensor, in parallel chunks, vectorised.
                let (g, m, v) = (
                    g.as_slice().expect("standard layout"),
                    Disjoint::new(m.as_slice_mut().expect("standard layout")),
                    Disjoint::new(v.as_slice_mut().expect("standard layout")),
                );
                let p = p.as_slice_mut().expect("standard layout");
                let len = p.len();
                // A tensor of one chunk of the norm's has its sum taken first (it is small, and
                // is then read from cache), so that its update can still be cut between
                // threads; a longer one is cut into parts of whole chunks, each chunk's sum of
                // squares in its own slot, the slots added in order afterwards.
                let chunked = norm && len > SQ_NORM_CHUNK;
                if norm && !chunked {
                    sq += chunk_sq_norm(g);
                }
                let mut sums = vec![0.0f64; if chunked { len.div_ceil(SQ_NORM_CHUNK) } else { 0 }];
                let slots = Disjoint::new(&mut sums);
                let align = if chunked { SQ_NORM_CHUNK } else { 16 };
                for_each_chunk_mut(p, align, 16 * len, |at, p| {
                    // SAFETY: the chunk's own range of m and v, disjoint from other chunks'.
                    let (m, v) = unsafe { (m.range(at, p.len()), v.range(at, p.len())) };
                    let g = &g[at..at + p.len()];
                    let run = |p: &mut [F], g: &[F], m: &mut [F], v: &mut [F]| {
                        // Iterators rather than indices, so that the loop vectorises.
                        widest!(for (((p, &g), m), v) in
                            p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                        {
                            update(p, g, m, v);
                        })
                    };
                    if !chunked {
                        run(p, g, m, v);
                        return;
                    }
                    let parts = p
                        .chunks_mut(SQ_NORM_CHUNK)
                        .zip(g.chunks(SQ_NORM_CHUNK))
                        .zip(m.chunks_mut(SQ_NORM_CHUNK).zip(v.chunks_mut(SQ_NORM_CHUNK)));
                    // Each chunk's sum of squares in the same loop as its update, in the lanes
                    // and order of `chunk_sq_norm` (the same bits): a pass of its own over the
                    // chunk had read the gradient from memory alone, one stream where the
                    // update reads four. On base's 56M parameters (one thread, Intel Xeon) the
                    // step with the norm took about 17 ms more than the step without it; 9 ms
                    // now (medians over alternating steps).
                    let run_norm = |p: &mut [F], g: &[F], m: &mut [F], v: &mut [F]| -> f64 {
                        widest!({
                            let mut acc = [0.0f64; LANES];
                            let mut pc = p.chunks_exact_mut(LANES);
                            let mut gc = g.chunks_exact(LANES);
                            let mut mc = m.chunks_exact_mut(LANES);
                            let mut vc = v.chunks_exact_mut(LANES);
                            for (((p, g), m), v) in (&mut pc).zip(&mut gc).zip(&mut mc).zip(&mut vc) {
                                let p: &mut [F; LANES] = p.try_into().expect("a whole chunk");
                                let g: &[F; LANES] = g.try_into().expect("a whole chunk");
                                let m: &mut [F; LANES] = m.try_into().expect("a whole chunk");
                                let v: &mut [F; LANES] = v.try_into().expect("a whole chunk");
                                for l in 0..LANES {
                                    let x = g[l].to_f64();
                                    acc[l] += x * x;
                                    update(&mut p[l], g[l], &mut m[l], &mut v[l]);
                                }
                            }
                            let rest = pc
                                .into_remainder()
                                .iter_mut()
                                .zip(gc.remainder())
                                .zip(mc.into_remainder().iter_mut().zip(vc.into_remainder()));
                            for (l, ((p, &g), (m, v))) in rest.enumerate() {
                                let x = g.to_f64();
                                acc[l] += x * x;
                                update(p, g, m, v);
                            }
                            reduce(acc)
                        })
                    };
                    for (i, ((p, g), (m, v))) in parts.enumerate() {
                        // SAFETY: `at` is a multiple of the chunk length, so slot
                        // at / SQ_NORM_CHUNK + i is this chunk's alone.
                        unsafe { slots.range(at / SQ_NORM_CHUNK + i, 1)[0] = run_norm(p, g, m, v) };
                    }
                });
                sq += sums.iter().sum::<f64>();
            },
        );
        sq
    }
}

/// Stochastic gradient descent with momentum: `b ← μ·b + g`, `θ ← θ − lr·b` (PyTorch's form).
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd<F: Float, P: Params<F>> {
    /// Momentum μ (0 for plain SGD).
    pub momentum: f64,
    /// The velocity b, shaped as the parameters.
    pub velocity: P,
    /// Steps taken so far.
    pub t: u64,
    _f: std::marker::PhantomData<F>,
}

/// A momentum must be finite and in [0, 1).
fn check_momentum(momentum: f64) -> Result<()> {
    if !(0.0..1.0).contains(&momentum) {
        return Err(Error::config(
            "momentum",
            format!("must be in [0, 1), got {momentum}"),
        ));
    }
    Ok(())
}

impl<F: Float, P: Params<F> + Clone> Sgd<F, P> {
    /// A fresh optimizer for `params`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the momentum is not in [0, 1).
    pub fn new(momentum: f64, params: &P) -> Result<Self> {
        Sgd::from_state(momentum, params.zeros_like(), 0)
    }
}

impl<F: Float, P: Params<F>> Sgd<F, P> {
    /// Rebuilds an optimizer from saved state.
    ///
    /// # Errors
    /// As [`Sgd::new`].
    pub fn from_state(momentum: f64, velocity: P, t: u64) -> Result<Self> {
        check_momentum(momentum)?;
        check_steps(t)?;
        Ok(Sgd {
            momentum,
            velocity,
            t,
            _f: std::marker::PhantomData,
        })
    }
}

impl<F: Float, P: Params<F>> Optimizer<F, P> for Sgd<F, P> {
    fn step(&mut self, params: &mut P, grads: &P, lr: f64) {
        self.t = self.t.saturating_add(1);
        let (mu, lr) = (F::from_f64(self.momentum), F::from_f64(lr));
        zip_state(params, grads, &mut [&mut self.velocity], |_, mut p, g, state| {
            let [b] = state else {
                unreachable!("one state tree")
            };
            Zip::from(&mut p).and(&g).and(b).for_each(|p, &g, b| {
                *b = mu * *b + g;
                *p -= lr * *b;
            });
        });
    }
}

/// Which optimizer a [`Trainer`](crate::train::Trainer) builds, with its settings.
///
/// ```
/// use vaswani::train::{AdamConfig, OptimizerConfig, TrainerConfig};
///
/// let adam = TrainerConfig::paper(512, 4000); // Adam (0.9, 0.98, 1e-9), §5.3
/// assert_eq!(adam.optimizer, OptimizerConfig::Adam(AdamConfig::paper()));
/// let adamw = adam.clone().with_optimizer(OptimizerConfig::Adam(AdamConfig::adamw(0.01)));
/// let sgd = adam.with_optimizer(OptimizerConfig::Sgd { momentum: 0.9 });
/// assert!(sgd.check().is_ok() && adamw.check().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum OptimizerConfig {
    /// [`Adam`], or AdamW when [`AdamConfig::decoupled`] is set ([`AdamConfig::adamw`]).
    Adam(AdamConfig),
    /// [`Sgd`] with momentum μ (0 for plain SGD).
    Sgd {
        /// Momentum μ, in [0, 1).
        momentum: f64,
    },
}

impl Default for OptimizerConfig {
    /// The paper's Adam ([`AdamConfig::paper`]).
    fn default() -> Self {
        OptimizerConfig::Adam(AdamConfig::paper())
    }
}

impl OptimizerConfig {
    /// Checks the settings without building anything.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field, as [`AdamConfig::check`] and [`Sgd::new`].
    pub fn check(&self) -> Result<()> {
        match self {
            OptimizerConfig::Adam(c) => c.check(),
            OptimizerConfig::Sgd { momentum } => check_momentum(*momentum),
        }
    }

    /// A fresh optimizer of this kind for `params`.
    ///
    /// # Errors
    /// As [`OptimizerConfig::check`].
    pub fn build<F: Float, P: Params<F> + Clone>(&self, params: &P) -> Result<OptimizerState<F, P>> {
        Ok(match self {
            OptimizerConfig::Adam(c) => OptimizerState::Adam(Adam::new(c.clone(), params)?),
            OptimizerConfig::Sgd { momentum } => OptimizerState::Sgd(Sgd::new(*momentum, params)?),
        })
    }
}

/// The optimizer a [`Trainer`](crate::train::Trainer) holds: one of the kinds of
/// [`OptimizerConfig`], with its state (public for checkpoints).
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerState<F: Float, P: Params<F>> {
    /// Adam or AdamW.
    Adam(Adam<F, P>),
    /// SGD with momentum.
    Sgd(Sgd<F, P>),
}

impl<F: Float, P: Params<F>> OptimizerState<F, P> {
    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        match self {
            OptimizerState::Adam(a) => a.t,
            OptimizerState::Sgd(s) => s.t,
        }
    }

    /// The settings it was built from.
    pub fn config(&self) -> OptimizerConfig {
        match self {
            OptimizerState::Adam(a) => OptimizerConfig::Adam(a.cfg.clone()),
            OptimizerState::Sgd(s) => OptimizerConfig::Sgd { momentum: s.momentum },
        }
    }
}

impl<F: Float, P: Params<F>> Optimizer<F, P> for OptimizerState<F, P> {
    fn step(&mut self, params: &mut P, grads: &P, lr: f64) {
        match self {
            OptimizerState::Adam(a) => a.step(params, grads, lr),
            OptimizerState::Sgd(s) => s.step(params, grads, lr),
        }
    }

    fn step_with_norm(&mut self, params: &mut P, grads: &P, lr: f64) -> f64 {
        match self {
            OptimizerState::Adam(a) => a.step_with_norm(params, grads, lr),
            OptimizerState::Sgd(s) => s.step_with_norm(params, grads, lr),
        }
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. PyTorch's `clip_grad_norm_` over all parameters (not per tensor).
///
/// The norm is summed in `f64` in visiting order, so it does not depend on the thread count.
///
/// # Panics
/// If `max_norm` is not finite and positive (a negative bound would flip every gradient, 0
/// zero them, NaN switch clipping off); [`TrainerConfig`](crate::train::TrainerConfig)'s
/// `clip_norm` is checked as an error where the trainer is built.
pub fn clip_grad_norm<F: Float, P: Params<F>>(grads: &mut P, max_norm: f64) -> f64 {
    assert!(
        max_norm.is_finite() && max_norm > 0.0,
        "clip_grad_norm: max_norm must be finite and positive, got {max_norm}"
    );
    let norm = grads.sq_norm().sqrt();
    if norm > max_norm && norm.is_finite() {
        grads.scale(F::from_f64(max_norm / (norm + 1e-6)));
    }
    norm
}

/// Visits every tensor of `params` with the matching tensors of `grads` and of each state tree.
///
/// Each pair's names (by a hash of each) and shapes are checked; the gradient's name itself is
/// looked up only to report a pair that does not match. Nothing is allocated per tensor (the
/// names had been a `String` each, and the state's views a `Vec`: a few hundred allocations in
/// a step of the `tiny` workload).
fn zip_state<F: Float, P: Params<F>>(
    params: &mut P,
    grads: &P,
    states: &mut [&mut P],
    mut f: impl FnMut(&str, ArrayViewMutD<'_, F>, ArrayViewD<'_, F>, &mut [ArrayViewMutD<'_, F>]),
) {
    let mut g_views = Vec::new();
    grads.visit("", &mut |name, t| g_views.push((name_hash(name), t)));
    let mut s_views: Vec<Vec<ArrayViewMutD<'_, F>>> = Vec::new();
    for s in states.iter_mut() {
        let mut v = Vec::new();
        s.visit_mut("", &mut |_, t| v.push(t));
        s_views.push(v);
    }
    let mut iters: Vec<_> = s_views.into_iter().map(|v| v.into_iter()).collect();
    let mut g_iter = g_views.into_iter();
    let mut state = Vec::with_capacity(iters.len());
    let mut index = 0;
    params.visit_mut("", &mut |name, p| {
        let (g_hash, g) = g_iter
            .next()
            .unwrap_or_else(|| panic!("optimizer: no gradient for {name}"));
        if g_hash != name_hash(name) || g.shape() != p.shape() {
            let g_name = grads.shapes().swap_remove(index).0;
            panic!(
                "optimizer: parameter {name} {:?} paired with gradient {g_name} {:?}",
                p.shape(),
                g.shape()
            );
        }
        state.extend(
            iters
                .iter_mut()
                .map(|it| it.next().expect("state shaped as the parameters")),
        );
        f(name, p, g, &mut state);
        state.clear();
        index += 1;
    });
}

/// FNV-1a of a tensor's name: [`zip_state`]'s check that a parameter and its gradient have
/// the same name, without keeping the names.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The element-wise mean of parameter sets, for checkpoint averaging (§6.1: "averaging the
/// last 5 checkpoints, which were written at 10-minute intervals").
///
/// # Errors
/// [`Error::InvalidInput`] for an empty list.
///
/// # Panics
/// If the sets have different tensors.
pub fn average<F: Float, P: Params<F> + Clone>(sets: &[P]) -> Result<P> {
    let (first, rest) = sets.split_first().ok_or_else(|| Error::InvalidInput {
        why: "average of no parameter sets".into(),
    })?;
    let mut sum = first.clone();
    for s in rest {
        sum.add_scaled(s, F::ONE);
    }
    sum.scale(F::from_f64(1.0 / sets.len() as f64));
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Tensors;
    use ndarray::{Array1, Array2, array};

    fn quadratic_grad(p: &Tensors<f64>) -> Tensors<f64> {
        // L = Σ (θ − 3)², ∂L/∂θ = 2(θ − 3)
        let mut g = p.clone();
        g.visit_mut("", &mut |_, mut t| t.mapv_inplace(|v| 2.0 * (v - 3.0)));
        g
    }

    #[test]
    fn adam_matches_pytorch_first_steps() {
        // torch: p = tensor([1.0, -2.0]); opt = Adam([p], lr=0.1, betas=(0.9, 0.98), eps=1e-9)
        // (float64) loss = ((p - 3)**2).sum(); after three steps p = [1.29946807, -1.70017753]
        let mut p = Tensors::new().with("w", array![1.0_f64, -2.0]);
        let mut adam = Adam::new(AdamConfig::paper(), &p).unwrap();
        for _ in 0..3 {
            let g = quadratic_grad(&p);
            adam.step(&mut p, &g, 0.1);
        }
        let w = p.get("w");
        assert!(
            (w[0] - 1.299_468_07).abs() < 1e-8 && (w[1] + 1.700_177_53).abs() < 1e-8,
            "{w}"
        );
        assert_eq!(adam.t, 3);
    }

    /// A gradient tree whose names differ from the parameters' (shapes alike) is refused with
    /// both names; the names are visited through the stack-built joins of nested trees.
    #[test]
    #[should_panic(expected = "parameter 0.b [2] paired with gradient 0.c [2]")]
    fn adam_refuses_gradients_of_other_names() {
        let tree = |second: &str| {
            vec![
                Tensors::new()
                    .with("a", array![1.0_f64])
                    .with(second, array![1.0, 2.0]),
            ]
        };
        let mut p = tree("b");
        let mut adam = Adam::new(AdamConfig::paper(), &p).unwrap();
        adam.step(&mut p, &tree("c"), 0.1);
    }

    /// Adam's norm, summed in its own pass, is `sq_norm`'s bit for bit, and the update is
    /// `step`'s, on one thread and on two, for tensors of several norm chunks, of one, and
    /// one stored transposed (not in standard layout).
    #[test]
    fn adam_step_with_norm_is_sq_norm_and_step() {
        let n = 3 * SQ_NORM_CHUNK + 5;
        let wave = |len: usize, k: f32| (0..len).map(|i| ((i as f32) * k).sin()).collect::<Vec<_>>();
        let p = Tensors::new()
            .with("big", Array1::from(wave(n, 0.37)))
            .with("small", Array2::from_shape_vec((3, 7), wave(21, 1.3)).unwrap())
            .with(
                "t",
                Array2::from_shape_vec((40, 30), wave(1200, 0.11))
                    .unwrap()
                    .reversed_axes(),
            );
        let mut g = p.clone();
        g.visit_mut("", &mut |_, mut t| t.mapv_inplace(|v| 1e-3 * v - 0.2 * v * v));
        let bits = |t: &Tensors<f32>| {
            let mut b = Vec::new();
            t.visit("", &mut |_, t| b.extend(t.iter().map(|v| v.to_bits())));
            b
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (mut a, mut b) = (p.clone(), p.clone());
            let mut adam_a = Adam::new(AdamConfig::paper(), &a).unwrap();
            let mut adam_b = Adam::new(AdamConfig::paper(), &b).unwrap();
            for _ in 0..2 {
                let (norm, want) = pool.install(|| {
                    crate::kernels::parallel::with_team(|| {
                        let norm = adam_a.step_with_norm(&mut a, &g, 1e-2);
                        adam_b.step(&mut b, &g, 1e-2);
                        (norm, g.sq_norm().sqrt())
                    })
                });
                assert_eq!(norm.to_bits(), want.to_bits(), "threads {threads}");
                assert_eq!(bits(&a), bits(&b), "threads {threads}");
            }
            assert_ne!(bits(&a), bits(&p));
        }
    }

    #[test]
    fn adam_converges_and_sgd_too() {
        let mut p = Tensors::new()
            .with("w", Array2::<f64>::zeros((2, 2)))
            .with("b", Array1::<f64>::zeros(3));
        let mut adam = Adam::new(AdamConfig::paper(), &p).unwrap();
        for _ in 0..500 {
            let g = quadratic_grad(&p);
            adam.step(&mut p, &g, 0.05);
        }
        p.visit("", &mut |_, t| {
            assert!(t.iter().all(|v| (v - 3.0).abs() < 1e-3), "{t}")
        });
        let mut q = Tensors::new().with("w", Array1::<f64>::zeros(2));
        let mut sgd = Sgd::new(0.9, &q).unwrap();
        for _ in 0..300 {
            let g = quadratic_grad(&q);
            sgd.step(&mut q, &g, 0.01);
        }
        assert!(q.get("w").iter().all(|v| (v - 3.0).abs() < 1e-3));
    }

    #[test]
    fn adamw_decays_matrices_but_not_vectors() {
        let mut p = Tensors::new()
            .with("w", Array2::<f64>::ones((2, 2)))
            .with("b", Array1::<f64>::ones(2));
        let zero = p.zeros_like();
        let mut opt = Adam::new(AdamConfig::adamw(0.1), &p).unwrap();
        opt.step(&mut p, &zero, 0.5);
        assert!(p.get("w").iter().all(|&v| (v - 0.95).abs() < 1e-12));
        assert!(p.get("b").iter().all(|&v| v == 1.0));
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let mut g = Tensors::new()
            .with("a", array![3.0_f64, 0.0])
            .with("b", array![0.0_f64, 4.0]);
        assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
        assert_eq!(g.get("a")[0], 3.0);
        let before = clip_grad_norm(&mut g, 1.0);
        assert_eq!(before, 5.0);
        assert!((g.sq_norm().sqrt() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn averaging_and_config_errors() {
        let a = Tensors::new().with("w", array![1.0_f64, 2.0]);
        let b = Tensors::new().with("w", array![3.0_f64, 6.0]);
        assert_eq!(
            average(&[a.clone(), b]).unwrap().get("w"),
            &array![2.0, 4.0].into_dyn()
        );
        assert!(average::<f64, Tensors<f64>>(&[]).is_err());
        assert!(
            Adam::new(
                AdamConfig {
                    beta2: 1.0,
                    ..AdamConfig::paper()
                },
                &a
            )
            .is_err()
        );
        assert!(
            Adam::new(
                AdamConfig {
                    eps: 0.0,
                    ..AdamConfig::paper()
                },
                &a
            )
            .is_err()
        );
        assert!(Sgd::new(1.5, &a).is_err());
    }
}
