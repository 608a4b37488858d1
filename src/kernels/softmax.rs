//! Row softmax with a mask, and its backward pass.
//!
//! `softmax(s)ⱼ = exp(sⱼ − m) / Σₖ exp(sₖ − m)` with m the largest *allowed* score, so no
//! `exp` overflows. Blocked entries are *selected out*, not pushed down by adding `−∞`: they
//! become exactly 0 whatever their score (NaN included), and a row whose entries are all
//! blocked becomes a row of zeros with a zero gradient, never `0/0 = NaN`.
//! This is what PyTorch's `scaled_dot_product_attention` has done since 2024 (`_safe_softmax`).

use super::Float;
use super::simd::{dot, exp_f32, max, sum, sum_by, widest};

/// Which entries of one row take part in a softmax.
///
/// An entry j is allowed when `j < limit`, and `keys[j]` (if given) is true, and `pairs[j]`
/// (if given) is true. Attention builds one per query row: `limit` from a causal rule,
/// `keys` from padding, `pairs` from an explicit mask.
#[derive(Clone, Copy, Debug)]
pub struct RowMask<'a> {
    /// Entries at or after this index are blocked.
    pub limit: usize,
    /// Per-entry flags, `true` = allowed.
    pub keys: Option<&'a [bool]>,
    /// More per-entry flags, `true` = allowed.
    pub pairs: Option<&'a [bool]>,
}

impl<'a> RowMask<'a> {
    /// Every one of `len` entries allowed.
    pub fn all(len: usize) -> Self {
        RowMask {
            limit: len,
            keys: None,
            pairs: None,
        }
    }

    /// Whether entry `j` takes part.
    #[inline]
    pub fn allows(&self, j: usize) -> bool {
        j < self.limit && self.keys.is_none_or(|k| k[j]) && self.pairs.is_none_or(|p| p[j])
    }
}

/// Softmax over the allowed entries of `row`, in place; blocked entries become 0.
///
/// A row with no allowed entry, or whose allowed scores are all `−∞`, becomes all zeros.
/// NaN among the allowed scores makes the row NaN (it is not hidden). In `f32` the
/// exponentials are [`super::simd::exp_f32`] (within 2 ulp) and the sum runs in lanes
/// ([`super::simd::sum`]), compiled for the widest vectors of the CPU.
pub fn softmax_row<F: Float>(row: &mut [F], mask: RowMask<'_>) {
    widest!(softmax_row_inline(row, mask))
}

/// [`softmax_row`] without the dispatch to vector builds, for loops that dispatch once
/// around many rows.
#[inline(always)]
pub(crate) fn softmax_row_inline<F: Float>(row: &mut [F], mask: RowMask<'_>) {
    let len = row.len();
    let limit = mask.limit.min(len);
    if mask.keys.is_none() && mask.pairs.is_none() {
        // Entries before `limit` allowed, the rest blocked.
        let (live, dead) = row.split_at_mut(limit);
        dead.fill(F::ZERO);
        let max = max(live);
        if max == F::NEG_INFINITY {
            live.fill(F::ZERO);
            return;
        }
        let total = match F::as_f32_mut(live) {
            Some(live) => {
                let m = max.to_f64() as f32;
                for x in live.iter_mut() {
                    *x = exp_f32(*x - m);
                }
                F::from_f64(sum(live) as f64)
            }
            None => {
                for x in live.iter_mut() {
                    *x = (*x - max).exp();
                }
                sum(live)
            }
        };
        let inv = F::ONE / total;
        live.iter_mut().for_each(|x| *x *= inv);
        return;
    }
    let mut max = F::NEG_INFINITY;
    for (j, &x) in row[..limit].iter().enumerate() {
        if mask.allows(j) {
            max = max.max(x);
        }
    }
    if max == F::NEG_INFINITY {
        row.fill(F::ZERO);
        return;
    }
    for (j, x) in row[..limit].iter_mut().enumerate() {
        *x = if mask.allows(j) { (*x - max).exp() } else { F::ZERO };
    }
    let inv = F::ONE / sum(&row[..limit]);
    row[..limit].iter_mut().for_each(|x| *x *= inv);
    row[limit..].fill(F::ZERO);
}

/// Backward of [`softmax_row`]: `grad_s = p ⊙ (grad_p − Σⱼ pⱼ·grad_pⱼ)` on allowed entries,
/// exactly 0 on blocked ones (even where `grad_p` is NaN).
///
/// # Panics
/// If the three slices differ in length.
pub fn softmax_row_backward<F: Float>(p: &[F], grad_p: &[F], grad_s: &mut [F], mask: RowMask<'_>) {
    assert!(
        p.len() == grad_p.len() && p.len() == grad_s.len(),
        "softmax_row_backward: lengths differ: p {}, grad_p {}, grad_s {}",
        p.len(),
        grad_p.len(),
        grad_s.len()
    );
    widest!(softmax_row_backward_inline(p, grad_p, grad_s, mask))
}

/// [`softmax_row_backward`] without the dispatch to vector builds (lengths checked by the
/// caller).
#[inline(always)]
pub(crate) fn softmax_row_backward_inline<F: Float>(
    p: &[F],
    grad_p: &[F],
    grad_s: &mut [F],
    mask: RowMask<'_>,
) {
    let limit = mask.limit.min(p.len());
    if mask.keys.is_none() && mask.pairs.is_none() {
        let dot = dot(&p[..limit], &grad_p[..limit]);
        for ((gs, &p), &gp) in grad_s[..limit].iter_mut().zip(&p[..limit]).zip(&grad_p[..limit]) {
            *gs = p * (gp - dot);
        }
        grad_s[limit..].fill(F::ZERO);
        return;
    }
    let dot = sum_by(limit, |j| if mask.allows(j) { p[j] * grad_p[j] } else { F::ZERO });
    for j in 0..limit {
        grad_s[j] = if mask.allows(j) {
            p[j] * (grad_p[j] - dot)
        } else {
            F::ZERO
        };
    }
    grad_s[limit..].fill(F::ZERO);
}

/// The naive twin of [`softmax_row`], in `f64`, for tests.
pub fn softmax_row_naive<F: Float>(row: &mut [F], mask: RowMask<'_>) {
    let allowed: Vec<usize> = (0..row.len()).filter(|&j| mask.allows(j)).collect();
    let max = allowed
        .iter()
        .map(|&j| row[j].to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0; row.len()];
    if max != f64::NEG_INFINITY {
        let sum: f64 = allowed.iter().map(|&j| (row[j].to_f64() - max).exp()).sum();
        for &j in &allowed {
            out[j] = (row[j].to_f64() - max).exp() / sum;
        }
    }
    for (x, o) in row.iter_mut().zip(out) {
        *x = F::from_f64(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random_row(rng: &mut StdRng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-5.0..5.0)).collect()
    }

    #[test]
    fn rows_sum_to_one_and_match_naive() {
        let mut rng = StdRng::seed_from_u64(7);
        for n in [1, 2, 7, 33, 130] {
            let keys: Vec<bool> = (0..n).map(|j| j % 3 != 1 || j == 0).collect();
            for mask in [
                RowMask::all(n),
                RowMask {
                    limit: n.div_ceil(2),
                    keys: None,
                    pairs: None,
                },
                RowMask {
                    limit: n,
                    keys: Some(&keys),
                    pairs: None,
                },
            ] {
                let row = random_row(&mut rng, n);
                let mut fast = row.clone();
                softmax_row(&mut fast, mask);
                let mut naive = row.clone();
                softmax_row_naive(&mut naive, mask);
                let sum: f64 = fast.iter().sum();
                assert!((sum - 1.0).abs() < 1e-12, "sum {sum}");
                for j in 0..n {
                    assert!((fast[j] - naive[j]).abs() < 1e-14);
                    if !mask.allows(j) {
                        assert_eq!(fast[j], 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn large_scores_do_not_overflow() {
        let mut row = vec![1000.0_f32, 999.0, -1000.0];
        softmax_row(&mut row, RowMask::all(3));
        assert!(row.iter().all(|x| x.is_finite()));
        assert!((row[0] - 1.0 / (1.0 + (-1.0_f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn blocked_entries_are_zero_even_when_nan() {
        let keys = [true, false, true];
        let mut row = vec![0.5_f32, f32::NAN, -0.5];
        softmax_row(
            &mut row,
            RowMask {
                limit: 3,
                keys: Some(&keys),
                pairs: None,
            },
        );
        assert_eq!(row[1], 0.0);
        assert!((row[0] + row[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn fully_blocked_row_is_zero_with_zero_gradient() {
        let mut row = vec![f32::NAN, 1.0, 2.0];
        let mask = RowMask {
            limit: 0,
            keys: None,
            pairs: None,
        };
        softmax_row(&mut row, mask);
        assert_eq!(row, vec![0.0; 3]);
        let mut grad_s = vec![f32::NAN; 3];
        softmax_row_backward(&row, &[1.0, f32::NAN, 3.0], &mut grad_s, mask);
        assert_eq!(grad_s, vec![0.0; 3]);
        // All allowed scores −∞: zeros too.
        let mut row = vec![f32::NEG_INFINITY; 4];
        softmax_row(&mut row, RowMask::all(4));
        assert_eq!(row, vec![0.0; 4]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = StdRng::seed_from_u64(8);
        let n = 9;
        let keys: Vec<bool> = (0..n).map(|j| j != 4).collect();
        let mask = RowMask {
            limit: 7,
            keys: Some(&keys),
            pairs: None,
        };
        let s = random_row(&mut rng, n);
        let r = random_row(&mut rng, n);
        let loss = |s: &[f64]| {
            let mut p = s.to_vec();
            softmax_row(&mut p, mask);
            p.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut p = s.clone();
        softmax_row(&mut p, mask);
        let mut grad = vec![f64::NAN; n];
        softmax_row_backward(&p, &r, &mut grad, mask);
        let h = 1e-6;
        for j in 0..n {
            let (mut up, mut down) = (s.clone(), s.clone());
            up[j] += h;
            down[j] -= h;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!(
                (numeric - grad[j]).abs() < 1e-8,
                "j={j}: {numeric} vs {}",
                grad[j]
            );
        }
    }
}
