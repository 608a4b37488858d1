//! Cross-entropy from logits, with label smoothing (§5.4) and padding ignored.
//!
//! For one position with logits z over V classes, target y and smoothing ε, the target
//! distribution is `q = (1 − ε)·onehot(y) + ε/V` (PyTorch's `label_smoothing`, which spreads
//! ε over all V classes, the target included) and the loss is
//! `−Σⱼ qⱼ·log softmax(z)ⱼ`. The log-softmax is fused with the loss:
//! `log pⱼ = zⱼ − m − log Σₖ exp(zₖ − m)` with m the row maximum, and the gradient is simply
//! `∂L/∂z = (softmax(z) − q) / n`, n the number of positions that count.
//!
//! The paper notes that label smoothing "hurts perplexity, as the model learns to be more
//! unsure, but improves accuracy and BLEU score" (§5.4).
//!
//! PyTorch equivalent: `F.cross_entropy(logits, targets, ignore_index=pad,
//! label_smoothing=ε)` with the default mean reduction.

use ndarray::{Array2, ArrayView1, ArrayView2, Axis};

use crate::error::{Error, Result};
use crate::kernels::Float;
use crate::kernels::parallel::{Disjoint, for_each_chunk_mut};
use crate::kernels::simd::{exp_f32, exp_f64, max, sum_map, widest};

/// Loss value, gradient and counts of [`cross_entropy`].
#[derive(Clone, Debug)]
pub struct CrossEntropy<F: Float = f32> {
    /// The mean loss over the positions that count.
    pub loss: f64,
    /// `∂loss/∂logits`, `[N, V]`; zero on ignored rows.
    pub grad: Array2<F>,
    /// How many positions counted (targets not equal to the ignored id).
    pub tokens: usize,
    /// How many of them have their target as the arg-max logit.
    pub correct: usize,
}

impl<F: Float> CrossEntropy<F> {
    /// The fraction of counted positions predicted right (0 when none counted).
    pub fn accuracy(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.correct as f64 / self.tokens as f64
        }
    }
}

/// Mean cross-entropy of `logits` `[N, V]` against `targets` (N ids), with label smoothing
/// `smoothing` and positions whose target is `ignore` left out (PyTorch's `ignore_index`).
///
/// A logit of −∞ masks its class: with no smoothing the loss stays finite (as PyTorch's);
/// with smoothing ε > 0 the target distribution gives that class mass ε/V, and the loss is
/// +∞ (PyTorch gives +∞ too), while the gradient stays finite.
///
/// Rows are independent and run in parallel; the mean is summed in row order, so the result
/// does not depend on the thread count. With no counted position the loss is 0 and the
/// gradient all zeros.
///
/// # Errors
/// [`Error::ShapeMismatch`] if there is not one target per row, [`Error::InvalidInput`]
/// naming the row for a target id ≥ V that is not the ignored id (models check their targets
/// first and report the batch row and position), [`Error::InvalidConfig`] if `smoothing` is
/// not in [0, 1).
pub fn cross_entropy<F: Float>(
    logits: ArrayView2<F>,
    targets: &[usize],
    ignore: Option<usize>,
    smoothing: f64,
) -> Result<CrossEntropy<F>> {
    let (n, v) = logits.dim();
    if targets.len() != n {
        return Err(Error::shape(
            "targets (one per logits row)",
            &[n],
            &[targets.len()],
        ));
    }
    if !(0.0..1.0).contains(&smoothing) {
        return Err(Error::config(
            "label_smoothing",
            format!("must be in [0, 1), got {smoothing}"),
        ));
    }
    let counted = |y: usize| Some(y) != ignore;
    if let Some((row, &id)) = targets.iter().enumerate().find(|&(_, &y)| counted(y) && y >= v) {
        return Err(Error::InvalidInput {
            why: format!("target id {id} of logits row {row} is out of range for {v} classes"),
        });
    }
    let tokens = targets.iter().filter(|&&y| counted(y)).count();
    let mut row_loss = vec![0.0f64; n];
    let mut row_correct = vec![false; n];
    if tokens == 0 {
        return Ok(CrossEntropy {
            loss: 0.0,
            grad: crate::kernels::workspace::zeros((n, v)),
            tokens,
            correct: 0,
        });
    }
    let eps = smoothing;
    let inv_n = 1.0 / tokens as f64;
    let logits = logits.as_standard_layout();
    let z_all = logits.as_slice().expect("standard layout");
    let (losses, corrects) = (Disjoint::new(&mut row_loss), Disjoint::new(&mut row_correct));
    let write = |mut out: ndarray::ArrayViewMut2<'_, F>| {
        let grad_all = out.as_slice_mut().expect("a new array is contiguous");
        // Rows on their own, in parallel chunks of whole rows; each row's sums in lanes.
        for_each_chunk_mut(grad_all, v, 8 * n * v, |at, g_rows| {
            let (r0, rows) = (at / v, g_rows.len() / v);
            // SAFETY: this chunk's rows of the per-row results, disjoint from other chunks'.
            let (losses, corrects) = unsafe { (losses.range(r0, rows), corrects.range(r0, rows)) };
            widest!(for r in 0..rows {
                let y = targets[r0 + r];
                let g = &mut g_rows[r * v..(r + 1) * v];
                if !counted(y) {
                    g.fill(F::ZERO);
                    continue;
                }
                let z = &z_all[(r0 + r) * v..(r0 + r + 1) * v];
                let (loss, correct) = row_cross_entropy(z, g, y, eps, inv_n);
                losses[r] = loss;
                corrects[r] = correct;
            })
        })
    };
    // SAFETY: `write` writes every row before reading it: a counted row's by
    // `row_cross_entropy`, which writes all of it, an ignored row's with zeros. (The gradient
    // had been zeroed whole first: 0.5% of a small bf16 training step.)
    let grad = unsafe { crate::kernels::workspace::filled((n, v), write) };
    let loss = row_loss.iter().sum::<f64>() * inv_n;
    let correct = row_correct.iter().filter(|&&c| c).count();
    Ok(CrossEntropy {
        loss,
        grad,
        tokens,
        correct,
    })
}

/// The log-probabilities `log softmax(z)` of each row of `logits`, in `f64`: for scoring and
/// decoding.
pub fn log_softmax<F: Float>(logits: ArrayView2<F>) -> Array2<f64> {
    let mut out = logits.mapv(|x| x.to_f64());
    for mut row in out.axis_iter_mut(Axis(0)) {
        let log_z = log_sum_exp(row.view());
        row.mapv_inplace(|x| x - log_z);
    }
    out
}

/// `ln Σ exp(z)` over a row, in `f64`: the normaliser of [`log_softmax`] (and of a scored
/// token's and a beam search's log-probabilities, which take it without the whole row's).
/// `max z` plus the logarithm of the sum of `exp(z − max z)` ([`exp_f64`], in vectors), summed
/// in the lanes of [`sum_map`]; NaN for a row with a NaN or a +∞, or of −∞ only.
pub(crate) fn log_sum_exp<F: Float>(row: ArrayView1<F>) -> f64 {
    let row = row.as_standard_layout();
    let z = row.as_slice().expect("standard layout");
    widest!({
        let max = max(z).to_f64();
        max + sum_map(z, |x: F| exp_f64(x.to_f64() - max)).ln()
    })
}

/// [`row_cross_entropy`] with label smoothing 0.1 over a row of `z.len()` classes, for the
/// tests of its accuracy flag.
#[cfg(test)]
pub(crate) fn row_accuracy_probe(z: &[f32], g: &mut [f32], y: usize) -> (f64, bool) {
    row_cross_entropy(z, g, y, 0.1, 1.0)
}

/// One row of [`cross_entropy`]: writes the gradient of the row into g and returns its loss
/// and whether its argmax is the target. The exponentials are kept in g and summed in `f64`
/// lanes.
#[inline(always)]
fn row_cross_entropy<F: Float>(z: &[F], g: &mut [F], y: usize, eps: f64, inv_n: f64) -> (f64, bool) {
    let v = z.len();
    let max = max(z);
    let sum_exp = match (F::as_f32(z), F::as_f32_mut(g)) {
        (Some(z), Some(g)) => {
            let m = max.to_f64() as f32;
            for (g, &z) in g.iter_mut().zip(z) {
                *g = exp_f32(z - m);
            }
            sum_map(g, |x| x as f64)
        }
        _ => {
            for (g, &z) in g.iter_mut().zip(z) {
                *g = (z - max).exp();
            }
            sum_map(g, |x| x.to_f64())
        }
    };
    let log_z = max.to_f64() + sum_exp.ln();
    // −Σ q·log p = −(1−ε)·log p_y − (ε/V)·Σ log p, with Σ log p = Σ z − V·log Z. Without
    // smoothing the second term is left out, not multiplied by 0: a logit of −∞ (a masked
    // class) makes Σ log p = −∞, and 0·−∞ would be NaN where the loss is finite.
    let smoothing_term = if eps > 0.0 {
        let sum_log_p = sum_map(z, |x| x.to_f64()) - v as f64 * log_z;
        -eps / v as f64 * sum_log_p
    } else {
        0.0
    };
    let loss = -(1.0 - eps) * (z[y].to_f64() - log_z) + smoothing_term;
    // argmax(z) == y, from the maximum already at hand: z[y] holds it and no earlier value
    // does (the first of equal maxima wins); a maximum that is not finite goes to argmax.
    let correct = if max.is_finite() {
        z[y] == max && !z[..y].iter().fold(false, |seen, &x| seen | (x == max))
    } else {
        crate::kernels::argmax(ndarray::ArrayView1::from(z)) == y
    };
    // ∂/∂z = (p − q)/N with q = ε/V, plus 1 − ε at the target.
    let (inv_sum, q) = (1.0 / sum_exp, eps / v as f64);
    let p_y = g[y].to_f64() * inv_sum;
    for gj in g.iter_mut() {
        *gj = F::from_f64((gj.to_f64() * inv_sum - q) * inv_n);
    }
    g[y] = F::from_f64((p_y - q - (1.0 - eps)) * inv_n);
    (loss, correct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::params::Tensors;
    use ndarray::array;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn matches_pytorch_reference_values() {
        // torch.nn.functional.cross_entropy(torch.tensor([[1., 2., 3.], [1., 0., -1.]]),
        //     torch.tensor([2, 0])) = 0.4076059644
        //   with label_smoothing=0.1: 0.5076059644 (torch 2.15, float64)
        let z = array![[1.0_f64, 2.0, 3.0], [1.0, 0.0, -1.0]];
        let ce = cross_entropy(z.view(), &[2, 0], None, 0.0).unwrap();
        assert!((ce.loss - 0.407_605_964_4).abs() < 1e-9, "{}", ce.loss);
        let ce = cross_entropy(z.view(), &[2, 0], None, 0.1).unwrap();
        assert!((ce.loss - 0.507_605_964_4).abs() < 1e-9, "{}", ce.loss);
        assert_eq!(ce.correct, 2);
    }

    /// The gradient comes from the workspace unzeroed (NaN in tests when reused): an ignored
    /// row's is written with zeros, a counted row's whole, the same on a fresh and a reused
    /// buffer.
    #[test]
    fn ignored_rows_of_a_reused_buffer_are_zero() {
        use crate::kernels::workspace::{Recycle, Workspace, with_workspace};
        let logits = Array2::from_shape_fn((40, 300), |(i, j)| ((i * 31 + j * 7) % 23) as f32 * 0.1);
        let targets: Vec<usize> = (0..40)
            .map(|i| if i % 3 == 0 { 0 } else { i * 7 % 300 })
            .collect();
        let mut ws = Workspace::new();
        let (a, b) = with_workspace(&mut ws, || {
            let a = cross_entropy(logits.view(), &targets, Some(0), 0.1).unwrap().grad;
            let keep = a.clone();
            a.give_back();
            (
                keep,
                cross_entropy(logits.view(), &targets, Some(0), 0.1).unwrap().grad,
            )
        });
        assert_eq!(a, b);
        for (i, row) in b.rows().into_iter().enumerate() {
            assert_eq!(row.iter().all(|&g| g == 0.0), i % 3 == 0, "row {i}");
        }
    }

    #[test]
    fn gradient_matches_finite_differences_with_smoothing_and_ignored_rows() {
        let mut rng = StdRng::seed_from_u64(40);
        let z: Array2<f64> = random_like((5, 7), &mut rng);
        let targets = [3, 0, 6, 0, 2];
        let ce = cross_entropy(z.view(), &targets, Some(0), 0.1).unwrap();
        assert_eq!(ce.tokens, 3);
        assert!(ce.grad.row(1).iter().all(|&g| g == 0.0));
        let mut point = Tensors::new().with("logits", z);
        let analytic = Tensors::new().with("logits", ce.grad.clone());
        let report = GradCheck::default().run(&mut point, &analytic, |t| {
            cross_entropy(
                t.get("logits").view().into_dimensionality().unwrap(),
                &targets,
                Some(0),
                0.1,
            )
            .unwrap()
            .loss
        });
        report.assert_ok();
    }

    #[test]
    fn bad_inputs_are_errors() {
        let z = Array2::<f32>::zeros((2, 4));
        assert!(matches!(
            cross_entropy(z.view(), &[1], None, 0.0),
            Err(Error::ShapeMismatch { .. })
        ));
        let err = cross_entropy(z.view(), &[1, 4], None, 0.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("target id 4 of logits row 1") && err.contains("4 classes"),
            "{err}"
        );
        assert!(cross_entropy(z.view(), &[1, 9], Some(9), 0.0).is_ok());
        assert!(cross_entropy(z.view(), &[1, 1], None, 1.0).is_err());
        let all_ignored = cross_entropy(z.view(), &[0, 0], Some(0), 0.1).unwrap();
        assert_eq!((all_ignored.loss, all_ignored.tokens), (0.0, 0));
    }

    #[test]
    fn a_masked_class_keeps_the_loss_finite_as_pytorch() {
        // F.cross_entropy(torch.tensor([[1., 2., -inf]]), torch.tensor([1])) = 0.3132616580,
        // gradient [0.2689, -0.2689, 0]; with label_smoothing=0.1 the loss is inf and the
        // gradient [0.2356, 0.6977, -0.9333] for target 2 (torch 2.15).
        let z = array![[1.0_f32, 2.0, f32::NEG_INFINITY]];
        let ce = cross_entropy(z.view(), &[1], None, 0.0).unwrap();
        assert!((ce.loss - 0.313_261_658).abs() < 1e-6, "{}", ce.loss);
        let want = [0.268_941_4, -0.268_941_4, 0.0];
        for (g, w) in ce.grad.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{:?}", ce.grad);
        }
        let ce = cross_entropy(z.view(), &[1], None, 0.1).unwrap();
        assert_eq!(ce.loss, f64::INFINITY);
        assert!(ce.grad.iter().all(|g| g.is_finite()), "{:?}", ce.grad);
    }

    #[test]
    fn extreme_logits_stay_finite() {
        let z = array![[1e4_f32, -1e4, 0.0]];
        let ce = cross_entropy(z.view(), &[1], None, 0.1).unwrap();
        assert!(ce.loss.is_finite() && ce.grad.iter().all(|g| g.is_finite()));
    }
}
