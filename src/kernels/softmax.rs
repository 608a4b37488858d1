//! Row softmax with a mask, and its backward pass.
//!
//! `softmax(s)ⱼ = exp(sⱼ − m) / Σₖ exp(sₖ − m)` with m the largest *allowed* score, so no
//! `exp` overflows. Blocked entries are *selected out*, not pushed down by adding `−∞`: they
//! become exactly 0 whatever their score (NaN included), and a row whose entries are all
//! blocked becomes a row of zeros with a zero gradient, never `0/0 = NaN`.
//! This is what PyTorch's `scaled_dot_product_attention` has done since 2024 (`_safe_softmax`).

use super::Float;
use super::simd::{LANES, dot, exp_f32, max, reduce, sum, sum_by, widest};

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
        if let Some(live) = F::as_f32_mut(live) {
            softmax_f32(live);
            return;
        }
        let max = max(live);
        if max == F::NEG_INFINITY {
            live.fill(F::ZERO);
            return;
        }
        for x in live.iter_mut() {
            *x = (*x - max).exp();
        }
        let inv = F::ONE / sum(live);
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

/// Softmax over a whole row in `f32`: [`softmax_f32_lanes`], in AVX2 registers where those
/// are the widest vectors the CPU has ([`avx2::softmax_f32`], the same bits).
#[inline(always)]
fn softmax_f32(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::level() == super::cpu::Level::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        unsafe { avx2::softmax_f32(row) };
        return;
    }
    softmax_f32_lanes(row)
}

/// Softmax over a whole row in `f32`, in vectors of [`LANES`]: the last, partial one is
/// copied into a vector padded with `−∞` (which no maximum takes and whose exponential is 0),
/// so that rows shorter than a vector (attention over a few keys, causal rows) never take a
/// scalar loop. The maximum, the exponentials and the sum's lanes and order are those of
/// [`max`], [`exp_f32`] and [`sum`], so the bits are too. A row whose scores are all `−∞`
/// becomes zeros.
#[inline(always)]
fn softmax_f32_lanes(row: &mut [f32]) {
    let body = row.len() - row.len() % LANES;
    let (body, tail) = row.split_at_mut(body);
    let mut last = [f32::NEG_INFINITY; LANES];
    last[..tail.len()].copy_from_slice(tail);
    let mut top = [f32::NEG_INFINITY; LANES];
    for c in body.chunks_exact(LANES).chain([&last[..]]) {
        for (t, &x) in top.iter_mut().zip(c) {
            *t = if x > *t { x } else { *t };
        }
    }
    // In a tree, as `reduce`: no lane holds NaN (a comparison with NaN keeps the lane).
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            top[i] = if top[i + w] > top[i] { top[i + w] } else { top[i] };
        }
    }
    let m = top[0];
    if m == f32::NEG_INFINITY {
        body.fill(0.0);
        tail.fill(0.0);
        return;
    }
    let mut acc = [0.0f32; LANES];
    for c in body.chunks_exact_mut(LANES) {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp_f32(*x - m);
            *a += *x;
        }
    }
    for (a, x) in acc.iter_mut().zip(&mut last) {
        *x = exp_f32(*x - m);
        *a += *x;
    }
    let inv = 1.0 / reduce(acc);
    body.iter_mut().for_each(|x| *x *= inv);
    for (t, x) in tail.iter_mut().zip(last) {
        *t = x * inv;
    }
}

/// [`softmax_f32_lanes`] written out in AVX2 registers. Compiled for AVX2, that loop kept one
/// of its two vectors of sums on the stack and reloaded the exponential's constants at every
/// step: a head's rows over 128 keys (`cargo bench --bench layers -- attention_core/window`)
/// spent 45% of their time in it, AMD EPYC Zen 3. Here the sums and the maximum stay in
/// registers and two chunks of 16 go through the exponential side by side.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::kernels::simd::avx2::{exp_vecs_at_most_zero, fold_add, fold_max};

    /// [`super::softmax_f32_lanes`], operation for operation: the maximum in 16 lanes (lanes
    /// 0–7 in one vector, 8–15 in the other) over the chunks of 16 in order, the last padded
    /// with `−∞`, folded in the tree of [`crate::kernels::simd::reduce`]; each exponential as
    /// [`crate::kernels::simd::exp_f32`]; the sum in the same lanes, order and tree; one
    /// reciprocal. The same bits (tested; NaN as NaN).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_f32(row: &mut [f32]) {
        let len = row.len();
        let body = len - len % 16;
        let mut last = [f32::NEG_INFINITY; 16];
        last[..len - body].copy_from_slice(&row[body..]);
        let (p, l) = (row.as_mut_ptr(), last.as_mut_ptr());
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        // The loads and stores below: chunks of 16 that start below `body` lie in the row;
        // `last` holds 16 floats.
        let mut top = [ninf; 2];
        for c in (0..body).step_by(16) {
            // SAFETY: as above.
            unsafe {
                top[0] = _mm256_max_ps(_mm256_loadu_ps(p.add(c)), top[0]);
                top[1] = _mm256_max_ps(_mm256_loadu_ps(p.add(c + 8)), top[1]);
            }
        }
        // A row of whole chunks leaves the padded one out: its maximum and its exponentials
        // (all 0, added to sums of at least +0) change nothing.
        let tail = len > body;
        if tail {
            // SAFETY: as above.
            unsafe {
                top[0] = _mm256_max_ps(_mm256_loadu_ps(l), top[0]);
                top[1] = _mm256_max_ps(_mm256_loadu_ps(l.add(8)), top[1]);
            }
        }
        let m = _mm256_cvtss_f32(fold_max(top));
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        let mv = _mm256_set1_ps(m);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut c = 0;
        // Two chunks at a time through the exponential, then the last whole chunk and the
        // padded one.
        while c + 32 <= body {
            // SAFETY: as above.
            unsafe { exp_into::<4>(p.add(c), mv, &mut acc) };
            c += 32;
        }
        for at in [(c < body).then_some(p.wrapping_add(c)), tail.then_some(l)]
            .into_iter()
            .flatten()
        {
            // SAFETY: as above.
            unsafe { exp_into::<2>(at, mv, &mut acc) };
        }
        let inv = 1.0 / _mm256_cvtss_f32(fold_add(acc));
        let iv = _mm256_set1_ps(inv);
        for c in (0..body).step_by(8) {
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(p.add(c), _mm256_mul_ps(_mm256_loadu_ps(p.add(c)), iv)) };
        }
        for (t, x) in row[body..].iter_mut().zip(last) {
            *t = x * inv;
        }
    }

    /// `K` vectors at `at` replaced by `exp(x − m)`, each added to the sums of its lanes
    /// (vector i to `acc[i % 2]`, in order).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `8·K` floats at `at` are readable and writable.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn exp_into<const K: usize>(at: *mut f32, m: __m256, acc: &mut [__m256; 2]) {
        // SAFETY: the 8·K floats at `at` (caller).
        unsafe {
            let x: [__m256; K] = std::array::from_fn(|i| _mm256_sub_ps(_mm256_loadu_ps(at.add(8 * i)), m));
            for (i, &e) in exp_vecs_at_most_zero(x).iter().enumerate() {
                _mm256_storeu_ps(at.add(8 * i), e);
                acc[i % 2] = _mm256_add_ps(acc[i % 2], e);
            }
        }
    }
}

/// Backward of [`softmax_row`]: `grad_s = p ⊙ (grad_p − Σⱼ pⱼ·grad_pⱼ)` on allowed entries,
/// exactly 0 on blocked ones (even where `grad_p` is NaN), written into `grad_s`, overwriting
/// it.
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
    fn f32_rows_of_any_length_match_the_scalar_formula_bit_for_bit() {
        // The padded vector path against the formula it must reproduce: the maximum, exp_f32
        // of each difference, the lane sum of `simd::sum`, one reciprocal.
        let mut rng = StdRng::seed_from_u64(11);
        for n in (1..=40usize).chain([63, 64, 65, 130]) {
            for limit in [n, n.div_ceil(2)] {
                let row: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0..30.0)).collect();
                let mut fast = row.clone();
                softmax_row(
                    &mut fast,
                    RowMask {
                        limit,
                        keys: None,
                        pairs: None,
                    },
                );
                let live = &row[..limit];
                let m = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let e: Vec<f32> = live.iter().map(|&x| exp_f32(x - m)).collect();
                let inv = 1.0 / sum(&e);
                let mut naive = row.iter().map(|&x| x as f64).collect::<Vec<_>>();
                softmax_row_naive(
                    &mut naive,
                    RowMask {
                        limit,
                        keys: None,
                        pairs: None,
                    },
                );
                for j in 0..n {
                    let want = if j < limit { e[j] * inv } else { 0.0 };
                    assert_eq!(fast[j].to_bits(), want.to_bits(), "n {n}, limit {limit}, j {j}");
                    assert!((fast[j] as f64 - naive[j]).abs() < 1e-6);
                }
            }
        }
        let mut all_blocked = vec![f32::NEG_INFINITY; 19];
        softmax_row(&mut all_blocked, RowMask::all(19));
        assert!(all_blocked.iter().all(|&p| p == 0.0));
        let mut with_nan = vec![0.5f32; 19];
        with_nan[17] = f32::NAN;
        softmax_row(&mut with_nan, RowMask::all(19));
        assert!(with_nan.iter().all(|p| p.is_nan()));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_rows_equal_the_portable_lanes_bit_for_bit() {
        // The AVX2 twin against the portable loop it writes out (compiled for the baseline
        // here), at every length around its chunks of 16 and pairs of chunks, with −∞
        // entries, an all-blocked row, large scores and NaN.
        if !crate::kernels::cpu::avx2() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        let mut rng = StdRng::seed_from_u64(12);
        let lengths = (1..=70usize).chain([95, 96, 97, 127, 128, 129, 200, 256, 257, 513]);
        for n in lengths {
            let mut rows: Vec<Vec<f32>> = vec![
                (0..n).map(|_| rng.random_range(-30.0..30.0)).collect(),
                (0..n).map(|_| rng.random_range(-1.0e3..1.0e3)).collect(),
                (0..n)
                    .map(|j| {
                        if j % 3 == 1 {
                            f32::NEG_INFINITY
                        } else {
                            rng.random_range(-5.0..5.0)
                        }
                    })
                    .collect(),
                vec![f32::NEG_INFINITY; n],
            ];
            let mut nan: Vec<f32> = (0..n).map(|_| rng.random_range(-5.0..5.0)).collect();
            nan[n / 2] = f32::NAN;
            rows.push(nan);
            for row in rows {
                let mut want = row.clone();
                softmax_f32_lanes(&mut want);
                let mut got = row.clone();
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { avx2::softmax_f32(&mut got) };
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
                    assert!(same, "n {n}, j {j}: {g} against {w}");
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
