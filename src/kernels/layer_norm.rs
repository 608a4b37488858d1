//! Layer normalisation over rows, forward and backward.
//!
//! For one row x of width d: `μ = mean(x)`, `σ² = mean((x − μ)²)` (biased, as PyTorch),
//! `x̂ = (x − μ) / √(σ² + ε)` (ε inside the square root, as PyTorch), `y = γ ⊙ x̂ + β`.
//! The mean and variance are computed in two passes, which stays accurate for rows with a
//! large common offset where `E[x²] − E[x]²` would cancel.
//!
//! Backward, with `g = γ ⊙ ∂L/∂y` and `rstd = 1/√(σ² + ε)`:
//! `∂L/∂x = rstd · (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))`, `∂L/∂γ = Σ_rows ∂L/∂y ⊙ x̂`,
//! `∂L/∂β = Σ_rows ∂L/∂y`.

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2};

use super::Float;
use super::dropout::{DropKey, draw};
use super::parallel::for_each_chunk_mut;
use super::simd::{dot, sum, sum_map, sum_zip3, widest};

/// Normalises one row: writes `x̂` and `y`, returns `rstd = 1/√(σ² + ε)`.
///
/// The sums run in the lanes of [`super::simd::sum`].
///
/// # Panics
/// If the slices differ in length.
pub fn layer_norm_row<F: Float>(x: &[F], gamma: &[F], beta: &[F], eps: F, x_hat: &mut [F], y: &mut [F]) -> F {
    let d = x.len();
    assert!(
        gamma.len() == d && beta.len() == d && x_hat.len() == d && y.len() == d,
        "layer_norm_row: lengths differ: x {d}, gamma {}, beta {}, x_hat {}, y {}",
        gamma.len(),
        beta.len(),
        x_hat.len(),
        y.len()
    );
    normalize(x, gamma, beta, eps, x_hat, y)
}

/// A row's mean and `1 / √(variance + ε)` (the variance over d, not d − 1): what every form
/// of the forward pass normalises by.
#[inline(always)]
fn mean_rstd<F: Float>(x: &[F], eps: F) -> (F, F) {
    let inv_d = F::ONE / F::from_f64(x.len() as f64);
    let mean = sum(x) * inv_d;
    let var = sum_map(x, |v| (v - mean) * (v - mean)) * inv_d;
    (mean, F::ONE / (var + eps).sqrt())
}

/// [`mean_rstd`] of each row of `x`, a group of at most [`GROUP`] rows of d, into `stats`,
/// bit for bit: in `f32` the rows' lane sums are reduced side by side, 16 at a time with
/// AVX-512 ([`avx512::stats`]) and 8 with AVX2 ([`avx2::stats8`]), else row after row. A
/// row's sums are a chain of additions as long as the row has vectors, then a tree of
/// shuffles; one row after another, a layer norm of short rows waits on them (d = 64: about
/// 115 cycles a row, the tiny eval forward's 5%).
#[inline(always)]
fn group_stats<F: Float>(x: &[F], d: usize, eps: F, stats: &mut [(F, F)]) {
    let rows = x.len() / d;
    debug_assert!(rows <= GROUP && rows * d == x.len() && stats.len() >= rows);
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = F::as_f32(x)
        && rows > 0
        && super::cpu::avx512()
    {
        // SAFETY: the CPU has AVX-512F (checked); `x` holds `rows` rows of d.
        let (mean, rstd) = unsafe { avx512::stats(x.as_ptr(), rows, d, eps.to_f64() as f32) };
        for (st, (m, r)) in stats.iter_mut().zip(mean.into_iter().zip(rstd)).take(rows) {
            *st = (F::from_f64(m.into()), F::from_f64(r.into()));
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = F::as_f32(x)
        && super::cpu::avx2()
    {
        for (g, st) in x.chunks(8 * d).zip(stats.chunks_mut(8)) {
            // SAFETY: the CPU has AVX2 and FMA (checked); `g` holds 1 to 8 rows of d.
            let (mean, rstd) = unsafe { avx2::stats8(g.as_ptr(), g.len() / d, d, eps.to_f64() as f32) };
            for (st, (m, r)) in st.iter_mut().zip(mean.into_iter().zip(rstd)) {
                *st = (F::from_f64(m.into()), F::from_f64(r.into()));
            }
        }
        return;
    }
    for (st, row) in stats.iter_mut().zip(x.chunks_exact(d)) {
        *st = mean_rstd(row, eps);
    }
}

/// The row arithmetic of [`layer_norm_row`], lengths checked by the caller.
#[inline(always)]
fn normalize<F: Float>(x: &[F], gamma: &[F], beta: &[F], eps: F, x_hat: &mut [F], y: &mut [F]) -> F {
    let (mean, rstd) = mean_rstd(x, eps);
    normalize_with(x, mean, rstd, gamma, beta, x_hat, y);
    rstd
}

/// `(x̂, y)` of one value: `x̂ = (x − mean)·rstd` and `y = γ·x̂ + β`, the arithmetic that the
/// training and the inference forms share, so that they give the same bits.
#[inline(always)]
fn normalized<F: Float>(x: F, mean: F, rstd: F, gamma: F, beta: F) -> (F, F) {
    let h = (x - mean) * rstd;
    (h, gamma * h + beta)
}

/// `x̂ = (x − mean)·rstd` and `y = γ ⊙ x̂ + β` of one row whose statistics are known.
#[inline(always)]
fn normalize_with<F: Float>(
    x: &[F],
    mean: F,
    rstd: F,
    gamma: &[F],
    beta: &[F],
    x_hat: &mut [F],
    y: &mut [F],
) {
    for ((((xh, y), &x), &g), &b) in x_hat.iter_mut().zip(y.iter_mut()).zip(x).zip(gamma).zip(beta) {
        (*xh, *y) = normalized(x, mean, rstd, g, b);
    }
}

/// [`normalize_with`] of the row held in `x_hat`, overwritten by `x̂`.
#[inline(always)]
fn normalize_in_place_with<F: Float>(
    mean: F,
    rstd: F,
    gamma: &[F],
    beta: &[F],
    x_hat: &mut [F],
    y: &mut [F],
) {
    for (((xh, y), &g), &b) in x_hat.iter_mut().zip(y.iter_mut()).zip(gamma).zip(beta) {
        (*xh, *y) = normalized(*xh, mean, rstd, g, b);
    }
}

/// Backward of [`layer_norm_row`] for one row: writes `∂L/∂x` into `grad_x`, overwriting it
/// (γ and β gradients are summed over rows by [`layer_norm_rows_backward`]).
///
/// # Panics
/// If the slices differ in length.
pub fn layer_norm_row_backward<F: Float>(x_hat: &[F], rstd: F, gamma: &[F], grad_y: &[F], grad_x: &mut [F]) {
    let d = x_hat.len();
    assert!(
        gamma.len() == d && grad_y.len() == d && grad_x.len() == d,
        "layer_norm_row_backward: lengths differ: x_hat {d}, gamma {}, grad_y {}, grad_x {}",
        gamma.len(),
        grad_y.len(),
        grad_x.len()
    );
    row_backward(x_hat, rstd, gamma, grad_y, grad_x)
}

#[inline(always)]
fn row_backward<F: Float>(x_hat: &[F], rstd: F, gamma: &[F], grad_y: &[F], grad_x: &mut [F]) {
    let d = x_hat.len();
    let inv_d = F::ONE / F::from_f64(d as f64);
    let mean_g = dot(gamma, grad_y) * inv_d;
    let mean_gx = sum_zip3(gamma, grad_y, x_hat, |g, dy, h| g * dy * h) * inv_d;
    for (((gx, &g), &dy), &h) in grad_x.iter_mut().zip(gamma).zip(grad_y).zip(x_hat) {
        *gx = rstd * (g * dy - mean_g - h * mean_gx);
    }
}

/// [`layer_norm_row`] over every row of x `[N, d]`: writes `x̂` `[N, d]`, `rstd` `[N]` and
/// `y` `[N, d]` (all overwritten). Rows run in parallel when there are enough of them.
///
/// # Panics
/// If the shapes do not fit, or an array is not contiguous.
pub fn layer_norm_rows<F: Float>(
    x: ArrayView2<F>,
    gamma: ArrayView1<F>,
    beta: ArrayView1<F>,
    eps: F,
    x_hat: ArrayViewMut2<F>,
    rstd: ArrayViewMut1<F>,
    y: ArrayViewMut2<F>,
) {
    layer_norm_rows_sum(x, None, gamma, beta, eps, x_hat, rstd, y);
}

/// [`layer_norm_rows`] of `x + z ⊙ mask` (the dropout mask of a key, computed element by
/// element, or `x + z` without one), without storing the sum: the post-norm residual
/// connection `LN(x + Dropout(z))` in one pass. With `z = None` it is [`layer_norm_rows`] of x.
///
/// # Panics
/// If the shapes do not fit, or an array is not contiguous.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_rows_sum<F: Float>(
    x: ArrayView2<F>,
    z: Option<(ArrayView2<F>, Option<DropKey>)>,
    gamma: ArrayView1<F>,
    beta: ArrayView1<F>,
    eps: F,
    mut x_hat: ArrayViewMut2<F>,
    mut rstd: ArrayViewMut1<F>,
    mut y: ArrayViewMut2<F>,
) {
    let (n, d) = x.dim();
    assert!(
        gamma.len() == d
            && beta.len() == d
            && x_hat.dim() == (n, d)
            && y.dim() == (n, d)
            && rstd.len() == n
            && z.as_ref().is_none_or(|(z, _)| z.dim() == (n, d)),
        "layer_norm_rows: x {:?}, z {:?}, gamma {:?}, beta {:?}, x_hat {:?}, rstd {:?}, y {:?}",
        x.shape(),
        z.as_ref().map(|(z, _)| z.shape().to_vec()),
        gamma.shape(),
        beta.shape(),
        x_hat.shape(),
        rstd.shape(),
        y.shape()
    );
    if n * d == 0 {
        return;
    }
    let x = contiguous(&x);
    let z = z.as_ref().map(|(z, m)| (contiguous(z), *m));
    let (gamma, beta) = (contiguous(&gamma), contiguous(&beta));
    let x_hat = contiguous_mut(&mut x_hat);
    let rstd = contiguous_mut(&mut rstd);
    let y = contiguous_mut(&mut y);
    let (x_hat, rstd) = (SendMut(x_hat.as_mut_ptr()), SendMut(rstd.as_mut_ptr()));
    for_each_chunk_mut(y, d, 8 * n * d, |at, y| {
        let rows = at / d..at / d + y.len() / d;
        // SAFETY: the chunk's rows of x̂ and rstd, disjoint from other chunks'.
        let (x_hat, rstd) = unsafe {
            (
                std::slice::from_raw_parts_mut(x_hat.at(at), y.len()),
                std::slice::from_raw_parts_mut(rstd.at(rows.start), rows.len()),
            )
        };
        let x = &x[at..at + y.len()];
        let z = z.map(|(z, m)| (&z[at..at + y.len()], m));
        widest!(rows_forward(x, z, at, gamma, beta, eps, x_hat, rstd, y))
    });
}

/// The rows of one chunk of [`layer_norm_rows_sum`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_forward<F: Float>(
    x: &[F],
    z: Option<(&[F], Option<DropKey>)>,
    first: usize,
    gamma: &[F],
    beta: &[F],
    eps: F,
    x_hat: &mut [F],
    rstd: &mut [F],
    y: &mut [F],
) {
    let d = gamma.len();
    let rows = rstd.len();
    let mut stats = [(F::ZERO, F::ZERO); GROUP];
    for g0 in (0..rows).step_by(GROUP) {
        let group = g0..rows.min(g0 + GROUP);
        let span = group.start * d..group.end * d;
        let Some((z, m)) = z else {
            group_stats(&x[span.clone()], d, eps, &mut stats);
            for (i, &(mean, r)) in group.zip(&stats) {
                let at = i * d..(i + 1) * d;
                rstd[i] = r;
                normalize_with(
                    &x[at.clone()],
                    mean,
                    r,
                    gamma,
                    beta,
                    &mut x_hat[at.clone()],
                    &mut y[at],
                );
            }
            continue;
        };
        // The sums go into x̂ first, then are normalised from there: a group of rows at a
        // time, so that a row's sum is read back well after it was stored (read right away,
        // the wide loads of a row just stored in pieces stall until the stores retire: 18% of
        // a layer norm's samples at d = 64).
        let (sums, x, z) = (&mut x_hat[span.clone()], &x[span.clone()], &z[span.clone()]);
        match m {
            Some(key) => {
                // The mask's factor of flat index first + span.start + j.
                let (threshold, scale) = (key.threshold(), key.scale::<F>());
                let base = first + span.start;
                for (j, ((xh, &x), &z)) in sums.iter_mut().zip(x).zip(z).enumerate() {
                    let keep = draw(key.key(), (base + j) as u32) >= threshold;
                    *xh = x + z * if keep { scale } else { F::ZERO };
                }
            }
            None => {
                for ((xh, &x), &z) in sums.iter_mut().zip(x).zip(z) {
                    *xh = x + z;
                }
            }
        }
        group_stats(&x_hat[span], d, eps, &mut stats);
        for (i, &(mean, r)) in group.zip(&stats) {
            let at = i * d..(i + 1) * d;
            rstd[i] = r;
            normalize_in_place_with(mean, r, gamma, beta, &mut x_hat[at.clone()], &mut y[at]);
        }
    }
}

/// Rows whose sums [`rows_forward`] and [`rows_infer`] reduce side by side ([`group_stats`]),
/// and whose residual sums they write before normalising the first of them. (The backward
/// pass goes row by row: its two sums a row side by side in 16 rows, three loads a term,
/// took 1.98% of a tiny training step's samples where row by row took 1.33%.)
const GROUP: usize = 16;

/// [`layer_norm_rows_sum`] of `x + z` (or of `x`) for inference: writes `y` alone, the same
/// bits, where the training form also writes `x̂` and `rstd` for the backward pass (a store
/// stream of the rows' size that inference would throw away).
///
/// # Panics
/// If the shapes do not fit, or an array is not contiguous.
pub(crate) fn layer_norm_rows_infer<F: Float>(
    x: ArrayView2<F>,
    z: Option<ArrayView2<F>>,
    gamma: ArrayView1<F>,
    beta: ArrayView1<F>,
    eps: F,
    mut y: ArrayViewMut2<F>,
) {
    let (n, d) = x.dim();
    assert!(
        gamma.len() == d
            && beta.len() == d
            && y.dim() == (n, d)
            && z.as_ref().is_none_or(|z| z.dim() == (n, d)),
        "layer_norm_rows_infer: x {:?}, z {:?}, gamma {:?}, beta {:?}, y {:?}",
        x.shape(),
        z.as_ref().map(|z| z.shape().to_vec()),
        gamma.shape(),
        beta.shape(),
        y.shape()
    );
    if n * d == 0 {
        return;
    }
    let x = contiguous(&x);
    let z = z.as_ref().map(|z| contiguous(z));
    let (gamma, beta) = (contiguous(&gamma), contiguous(&beta));
    for_each_chunk_mut(contiguous_mut(&mut y), d, 8 * n * d, |at, y| {
        let x = &x[at..at + y.len()];
        let z = z.map(|z| &z[at..at + y.len()]);
        widest!(rows_infer(x, z, gamma, beta, eps, y))
    });
}

/// The rows of one chunk of [`layer_norm_rows_infer`]: as [`rows_forward`] without a mask,
/// the sums and then the normalised rows in `y`.
#[inline(always)]
fn rows_infer<F: Float>(x: &[F], z: Option<&[F]>, gamma: &[F], beta: &[F], eps: F, y: &mut [F]) {
    let d = gamma.len();
    let rows = y.len() / d;
    let mut stats = [(F::ZERO, F::ZERO); GROUP];
    for g0 in (0..rows).step_by(GROUP) {
        let span = g0 * d..rows.min(g0 + GROUP) * d;
        match z {
            Some(z) => {
                for ((s, &x), &z) in y[span.clone()]
                    .iter_mut()
                    .zip(&x[span.clone()])
                    .zip(&z[span.clone()])
                {
                    *s = x + z;
                }
            }
            None => y[span.clone()].copy_from_slice(&x[span.clone()]),
        }
        // Every row's mean and 1/√(var + ε) first, then the rows normalised.
        group_stats(&y[span.clone()], d, eps, &mut stats);
        for (row, &(mean, rstd)) in y[span].chunks_exact_mut(d).zip(&stats) {
            for ((y, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
                *y = normalized(*y, mean, rstd, g, b).1;
            }
        }
    }
}

/// A pointer to send to threads that write disjoint parts of what it points to.
#[derive(Clone, Copy)]
struct SendMut<F>(*mut F);
// SAFETY: used only for disjoint rows of arrays borrowed mutably for the call.
unsafe impl<F> Send for SendMut<F> {}
unsafe impl<F> Sync for SendMut<F> {}
impl<F> SendMut<F> {
    fn at(self, i: usize) -> *mut F {
        self.0.wrapping_add(i)
    }
}

/// Backward of [`layer_norm_rows`]: writes `∂L/∂x` `[N, d]` (overwritten) and adds `∂L/∂γ`
/// and `∂L/∂β` into `grad_gamma` and `grad_beta` (summed over rows in order, on one thread).
///
/// # Panics
/// If the shapes do not fit, or an array is not contiguous.
pub fn layer_norm_rows_backward<F: Float>(
    x_hat: ArrayView2<F>,
    rstd: ArrayView1<F>,
    gamma: ArrayView1<F>,
    grad_y: ArrayView2<F>,
    grad_gamma: ArrayViewMut1<F>,
    grad_beta: ArrayViewMut1<F>,
    grad_x: ArrayViewMut2<F>,
) {
    layer_norm_rows_backward_masked(x_hat, rstd, gamma, grad_y, grad_gamma, grad_beta, grad_x, None);
}

/// [`layer_norm_rows_backward`] (overwrites `grad_x`, adds into `grad_gamma` and
/// `grad_beta`) that also overwrites `masked` with `∂L/∂x ⊙ mask` (the mask of
/// `key`, over `[N, d]` in row-major order), a row at a time while the row of `∂L/∂x` is in
/// cache: the backward of the post-norm residual `LN(x + Dropout(z))`, whose two inputs take
/// `∂L/∂x` and `∂L/∂x ⊙ mask`.
///
/// # Panics
/// If the shapes do not fit (`masked` as `grad_x`), or an array is not contiguous.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_rows_backward_masked<F: Float>(
    x_hat: ArrayView2<F>,
    rstd: ArrayView1<F>,
    gamma: ArrayView1<F>,
    grad_y: ArrayView2<F>,
    mut grad_gamma: ArrayViewMut1<F>,
    mut grad_beta: ArrayViewMut1<F>,
    mut grad_x: ArrayViewMut2<F>,
    mut masked: Option<(ArrayViewMut2<F>, DropKey)>,
) {
    let (n, d) = x_hat.dim();
    assert!(
        rstd.len() == n
            && gamma.len() == d
            && grad_y.dim() == (n, d)
            && grad_x.dim() == (n, d)
            && grad_gamma.len() == d
            && grad_beta.len() == d
            && masked.as_ref().is_none_or(|(m, _)| m.dim() == (n, d)),
        "layer_norm_rows_backward: x_hat {:?}, rstd {:?}, gamma {:?}, grad_y {:?}, grad_x {:?}, grad_gamma {:?}, grad_beta {:?}, masked {:?}",
        x_hat.shape(),
        rstd.shape(),
        gamma.shape(),
        grad_y.shape(),
        grad_x.shape(),
        grad_gamma.shape(),
        grad_beta.shape(),
        masked.as_ref().map(|(m, _)| m.shape().to_vec())
    );
    if n * d == 0 {
        return;
    }
    let (x_hat, rstd, gamma, grad_y) = (
        contiguous(&x_hat),
        contiguous(&rstd),
        contiguous(&gamma),
        contiguous(&grad_y),
    );
    let masked = masked
        .as_mut()
        .map(|(m, key)| (super::parallel::Disjoint::new(contiguous_mut(m)), *key));
    for_each_chunk_mut(contiguous_mut(&mut grad_x), d, 8 * n * d, |at, gx| {
        let rows = at / d..at / d + gx.len() / d;
        // SAFETY: the rows of this chunk, disjoint between chunks.
        let mut out = masked
            .as_ref()
            .map(|(m, key)| (unsafe { m.range(at, gx.len()) }, *key));
        widest!({
            for (i, r) in rows.enumerate() {
                let row = r * d..(r + 1) * d;
                let gx = &mut gx[i * d..(i + 1) * d];
                row_backward(&x_hat[row.clone()], rstd[r], gamma, &grad_y[row], gx);
                if let Some((m, key)) = out.as_mut() {
                    key.apply_to(r * d, gx, &mut m[i * d..(i + 1) * d]);
                }
            }
        })
    });
    // γ and β gradients: columns cut between threads, each summed over the rows in order.
    let (gg, gb) = (contiguous_mut(&mut grad_gamma), contiguous_mut(&mut grad_beta));
    let gb = super::parallel::Disjoint::new(gb);
    for_each_chunk_mut(gg, 16, 2 * n * d, |j0, gg| {
        // SAFETY: the same columns of β's gradient as of γ's, disjoint between chunks.
        let gb = unsafe { gb.range(j0, gg.len()) };
        widest!({
            for (b, (gg, gb)) in gg
                .chunks_mut(PARAM_BLOCK)
                .zip(gb.chunks_mut(PARAM_BLOCK))
                .enumerate()
            {
                param_grads_block(x_hat, grad_y, n, d, j0 + b * PARAM_BLOCK, gg, gb);
            }
        })
    });
}

/// Columns of γ's and β's gradients that [`layer_norm_rows_backward`] sums in registers while
/// it runs down the rows.
const PARAM_BLOCK: usize = 32;

/// `gg += Σ_rows ∂y ⊙ x̂` and `gb += Σ_rows ∂y` over columns `j0..j0 + gg.len()`, a whole
/// block's sums held in local arrays (registers) across the rows rather than loaded and stored
/// at every row. The same operations in the same order.
#[inline(always)]
fn param_grads_block<F: Float>(
    x_hat: &[F],
    grad_y: &[F],
    n: usize,
    d: usize,
    j0: usize,
    gg: &mut [F],
    gb: &mut [F],
) {
    let w = gg.len();
    if w == PARAM_BLOCK {
        let mut sg: [F; PARAM_BLOCK] = (&*gg).try_into().expect("a whole block");
        let mut sb: [F; PARAM_BLOCK] = (&*gb).try_into().expect("a whole block");
        for r in 0..n {
            let row = r * d + j0..r * d + j0 + PARAM_BLOCK;
            let h: &[F; PARAM_BLOCK] = x_hat[row.clone()].try_into().expect("a whole block");
            let g: &[F; PARAM_BLOCK] = grad_y[row].try_into().expect("a whole block");
            for j in 0..PARAM_BLOCK {
                sg[j] += g[j] * h[j];
                sb[j] += g[j];
            }
        }
        gg.copy_from_slice(&sg);
        gb.copy_from_slice(&sb);
        return;
    }
    for r in 0..n {
        let row = r * d + j0..r * d + j0 + w;
        let (h, g) = (&x_hat[row.clone()], &grad_y[row]);
        for (((gg, gb), &g), &h) in gg.iter_mut().zip(gb.iter_mut()).zip(g).zip(h) {
            *gg += g * h;
            *gb += g;
        }
    }
}

/// The AVX-512 forms of the rows' sums in `f32`: up to 16 rows at a time, each row's lane
/// sums accumulated as [`sum_map`] does (lane l takes the columns `l`, `l + 16`, …, the last
/// partial vector masked) and the 16 rows' lane trees reduced together, with the additions of
/// [`super::simd::reduce`] and so its bits: 30 shuffles, 15 additions and a permutation for
/// the 16, where one row at a time takes 8 operations, each waiting on the one before.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::simd::first_lanes;

    /// For rows `0..rows` (at most 16), `Σ_c term(r, c, mask)` over the vectors of columns
    /// `c = 0, 16, …` below d (`mask` the columns inside the row), in lane trees; lane r of the
    /// result is row r's sum. `term` of a row past `rows` is asked with an empty mask and
    /// must then read nothing (a masked load reads no memory under an empty mask).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sums(rows: usize, d: usize, term: impl Fn(usize, usize, __mmask16) -> __m512) -> __m512 {
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut c = 0;
        while c < d {
            let m = first_lanes(d - c);
            for (r, a) in acc.iter_mut().enumerate() {
                let k = if r < rows { m } else { 0 };
                *a = _mm512_mask_add_ps(*a, k, *a, term(r, c, k));
            }
            c += 16;
        }
        reduce16(acc)
    }

    /// Lane r of the result: the lanes of `a[r]` added in the tree of
    /// [`super::super::simd::reduce`] (lane i + lane i + 8, then + 4, + 2, + 1).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn reduce16(a: [__m512; 16]) -> __m512 {
        // Lanes i and i + 8 of rows r and r + 8 in one vector: blocks of four lanes [r 0..4,
        // r 4..8, r + 8 0..4, r + 8 4..8].
        let mut l8 = [_mm512_setzero_ps(); 8];
        for (r, v) in l8.iter_mut().enumerate() {
            let (p, q) = (a[r], a[r + 8]);
            *v = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(p, q),
                _mm512_shuffle_f32x4::<0xEE>(p, q),
            );
        }
        // i + 4: blocks [r, r + 8, r + 4, r + 12], four lanes of each.
        let mut l4 = [_mm512_setzero_ps(); 4];
        for (r, v) in l4.iter_mut().enumerate() {
            let (p, q) = (l8[r], l8[r + 4]);
            *v = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(p, q),
                _mm512_shuffle_f32x4::<0xDD>(p, q),
            );
        }
        // i + 2, within each block: two lanes of a row of l4[r], then two of l4[r + 2]'s.
        let mut l2 = [_mm512_setzero_ps(); 2];
        for (r, v) in l2.iter_mut().enumerate() {
            let (p, q) = (l4[r], l4[r + 2]);
            *v = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(p, q), _mm512_shuffle_ps::<0xEE>(p, q));
        }
        // i + 1: the sums of rows [0, 2, 1, 3], [8, 10, 9, 11], [4, 6, 5, 7], [12, 14, 13, 15].
        let (p, q) = (l2[0], l2[1]);
        let s = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(p, q), _mm512_shuffle_ps::<0xDD>(p, q));
        let order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
        _mm512_permutexvar_ps(order, s)
    }

    /// [`super::mean_rstd`] of `rows` (1 to 16) rows of d at `x`: the means and `1/√(σ² + ε)`.
    ///
    /// # Safety
    /// `rows` rows of d floats must be readable at `x`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn stats(x: *const f32, rows: usize, d: usize, eps: f32) -> ([f32; 16], [f32; 16]) {
        let inv_d = _mm512_set1_ps(1.0 / d as f32);
        // SAFETY: row r < rows (the last for rows past it, read under an empty mask), columns
        // c..c + 16 under a mask of those below d (caller).
        let load =
            |r: usize, c: usize, k| unsafe { _mm512_maskz_loadu_ps(k, x.add(r.min(rows - 1) * d + c)) };
        let mut mean = [0.0f32; 16];
        let means = _mm512_mul_ps(sums(rows, d, load), inv_d);
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(mean.as_mut_ptr(), means) };
        let var = sums(rows, d, |r, c, k| {
            let t = _mm512_sub_ps(load(r, c, k), _mm512_set1_ps(mean[r]));
            _mm512_mul_ps(t, t)
        });
        let var = _mm512_mul_ps(var, inv_d);
        let rstd = _mm512_div_ps(
            _mm512_set1_ps(1.0),
            _mm512_sqrt_ps(_mm512_add_ps(var, _mm512_set1_ps(eps))),
        );
        let mut out = [0.0f32; 16];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), rstd) };
        (mean, out)
    }
}

/// The AVX2 forms of the rows' sums in `f32`: 8 rows at a time, each row's lane sums
/// accumulated as [`sum_map`] does (its 16 lanes in two vectors, columns `l`, `l + 16`, … in
/// lane l) one row after another, whose chains are independent, and the 8 rows' lane trees
/// reduced together with the additions of [`super::simd::reduce`], so its bits: 15 shuffles
/// (the last a permutation into row order) and 7 additions for the 8, where one row at a time
/// takes 6 operations, each waiting on the one before.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// For rows `0..rows` (at most 8), `Σ_c term(r, c)` over the vectors of 8 columns `c = 0,
    /// 8, …` below d, in lane trees: lane r of the result is row r's sum. In the last vectors
    /// of a row whose length is not a multiple of 16, `term` reads under `live` (the columns
    /// below d, a lane mask) and the other lanes are left as they were.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn sums(rows: usize, d: usize, term: impl Fn(usize, usize, Option<__m256i>) -> __m256) -> __m256 {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let whole = d - d % 16;
        let mut part = [_mm256_setzero_ps(); 8];
        for (r, v) in part.iter_mut().enumerate().take(rows) {
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c < whole {
                lo = _mm256_add_ps(lo, term(r, c, None));
                hi = _mm256_add_ps(hi, term(r, c + 8, None));
                c += 16;
            }
            for (acc, c) in [(&mut lo, whole), (&mut hi, whole + 8)] {
                if c < d {
                    let live = _mm256_cmpgt_epi32(_mm256_set1_epi32((d - c).min(8) as i32), lanes);
                    let sum = _mm256_add_ps(*acc, term(r, c, Some(live)));
                    *acc = _mm256_blendv_ps(*acc, sum, _mm256_castsi256_ps(live));
                }
            }
            // Lane i + lane i + 8.
            *v = _mm256_add_ps(lo, hi);
        }
        // i + 4: rows r (low half) and r + 4 (high half).
        let l4: [__m256; 4] = std::array::from_fn(|r| {
            let (p, q) = (part[r], part[r + 4]);
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(p, q),
                _mm256_permute2f128_ps::<0x31>(p, q),
            )
        });
        // i + 2: two lanes of each half's row, then two of the row of l4[r + 2]'s.
        let l2: [__m256; 2] = std::array::from_fn(|r| {
            let (p, q) = (l4[r], l4[r + 2]);
            _mm256_add_ps(_mm256_shuffle_ps::<0x44>(p, q), _mm256_shuffle_ps::<0xEE>(p, q))
        });
        // i + 1: the sums of rows [0, 2, 1, 3, 4, 6, 5, 7].
        let (p, q) = (l2[0], l2[1]);
        let s = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(p, q), _mm256_shuffle_ps::<0xDD>(p, q));
        _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7))
    }

    /// [`super::mean_rstd`] of `rows` (1 to 8) rows of d at `x`: the means and `1/√(σ² + ε)`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `rows` rows of d floats must be readable at `x`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn stats8(x: *const f32, rows: usize, d: usize, eps: f32) -> ([f32; 8], [f32; 8]) {
        let inv_d = _mm256_set1_ps(1.0 / d as f32);
        // SAFETY: row r < rows, columns c..c + 8, those past d not read (caller).
        let load = |r: usize, c: usize, live: Option<__m256i>| unsafe {
            let p = x.add(r * d + c);
            match live {
                None => _mm256_loadu_ps(p),
                Some(live) => _mm256_maskload_ps(p, live),
            }
        };
        let mut mean = [0.0f32; 8];
        let means = _mm256_mul_ps(sums(rows, d, load), inv_d);
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(mean.as_mut_ptr(), means) };
        let var = sums(rows, d, |r, c, live| {
            let t = _mm256_sub_ps(load(r, c, live), _mm256_set1_ps(mean[r]));
            _mm256_mul_ps(t, t)
        });
        let var = _mm256_mul_ps(var, inv_d);
        let rstd = _mm256_div_ps(
            _mm256_set1_ps(1.0),
            _mm256_sqrt_ps(_mm256_add_ps(var, _mm256_set1_ps(eps))),
        );
        let mut out = [0.0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), rstd) };
        (mean, out)
    }
}

/// The naive twin of [`layer_norm_row`], in `f64`; returns `y`.
pub fn layer_norm_row_naive<F: Float>(x: &[F], gamma: &[F], beta: &[F], eps: f64) -> Vec<F> {
    let d = x.len() as f64;
    let xs: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let mean = xs.iter().sum::<f64>() / d;
    let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d;
    xs.iter()
        .zip(gamma.iter().zip(beta))
        .map(|(v, (g, b))| F::from_f64((v - mean) / (var + eps).sqrt() * g.to_f64() + b.to_f64()))
        .collect()
}

fn contiguous<'a, F, D: ndarray::Dimension>(v: &'a ndarray::ArrayView<'_, F, D>) -> &'a [F] {
    v.as_slice().expect("layer norm: arrays must be contiguous")
}

fn contiguous_mut<'a, F, D: ndarray::Dimension>(v: &'a mut ndarray::ArrayViewMut<'_, F, D>) -> &'a mut [F] {
    v.as_slice_mut().expect("layer norm: arrays must be contiguous")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn matches_naive_and_pytorch_reference_value() {
        // x = [1, 0, 0, 0]: PyTorch's nn.LayerNorm gives [1.7320, -0.5773, -0.5773, -0.5773]
        // (the unbiased-std variant would give [1.5, -0.5, -0.5, -0.5]).
        let x = [1.0_f32, 0.0, 0.0, 0.0];
        let (g, b) = ([1.0_f32; 4], [0.0_f32; 4]);
        let (mut h, mut y) = ([0.0; 4], [0.0; 4]);
        layer_norm_row(&x, &g, &b, 1e-5, &mut h, &mut y);
        let want = [1.7320, -0.5773, -0.5773, -0.5773];
        for (got, want) in y.iter().zip(want) {
            assert!((got - want).abs() < 1e-4, "{y:?}");
        }
        let mut rng = StdRng::seed_from_u64(9);
        for d in [1, 3, 17, 64] {
            let x: Vec<f64> = (0..d).map(|_| rng.random_range(-3.0..3.0) + 1000.0).collect();
            let g: Vec<f64> = (0..d).map(|_| rng.random_range(0.5..1.5)).collect();
            let b: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut h, mut y) = (vec![0.0; d], vec![0.0; d]);
            layer_norm_row(&x, &g, &b, 1e-5, &mut h, &mut y);
            let want = layer_norm_row_naive(&x, &g, &b, 1e-5);
            for (got, want) in y.iter().zip(want) {
                assert!((got - want).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn rows_have_mean_beta_and_scale_gamma_with_nan_prefilled_outputs() {
        let mut rng = StdRng::seed_from_u64(10);
        let (n, d) = (300, 129); // past the parallel threshold
        let x = Array2::from_shape_fn((n, d), |_| rng.random_range(-4.0..4.0_f64));
        let gamma = Array1::from_elem(d, 2.5);
        let beta = Array1::from_elem(d, -0.75);
        let mut x_hat = Array2::from_elem((n, d), f64::NAN);
        let mut y = Array2::from_elem((n, d), f64::NAN);
        let mut rstd = Array1::from_elem(n, f64::NAN);
        layer_norm_rows(
            x.view(),
            gamma.view(),
            beta.view(),
            1e-12,
            x_hat.view_mut(),
            rstd.view_mut(),
            y.view_mut(),
        );
        for row in y.rows() {
            let mean = row.mean().unwrap();
            let std = row.mapv(|v| (v - mean).powi(2)).mean().unwrap().sqrt();
            assert!((mean + 0.75).abs() < 1e-10, "mean {mean}");
            assert!((std - 2.5).abs() < 1e-8, "std {std}");
        }
    }

    #[test]
    fn inference_rows_are_the_training_rows_bit_for_bit() {
        // Row counts inside one group, across groups and past the parallel threshold; widths
        // inside one vector, at its edge and past several; with and without the residual.
        let mut rng = StdRng::seed_from_u64(12);
        for (n, d) in [(3, 5), (8, 16), (13, 64), (300, 129), (40, 256)] {
            let x = Array2::from_shape_fn((n, d), |_| rng.random_range(-4.0..4.0_f32) + 10.0);
            let z = Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0_f32));
            let gamma = Array1::from_shape_fn(d, |_| rng.random_range(0.5..1.5_f32));
            let beta = Array1::from_shape_fn(d, |_| rng.random_range(-1.0..1.0_f32));
            for z in [None, Some(z.view())] {
                let (mut x_hat, mut y) = (Array2::zeros((n, d)), Array2::zeros((n, d)));
                let mut rstd = Array1::zeros(n);
                layer_norm_rows_sum(
                    x.view(),
                    z.map(|z| (z, None)),
                    gamma.view(),
                    beta.view(),
                    1e-5,
                    x_hat.view_mut(),
                    rstd.view_mut(),
                    y.view_mut(),
                );
                let mut got = Array2::from_elem((n, d), f32::NAN);
                layer_norm_rows_infer(x.view(), z, gamma.view(), beta.view(), 1e-5, got.view_mut());
                for (a, b) in got.iter().zip(&y) {
                    assert_eq!(a.to_bits(), b.to_bits(), "n {n}, d {d}, residual {}", z.is_some());
                }
            }
        }
    }

    /// Each vector form of the rows' statistics the CPU can run, called directly (not only the
    /// one the dispatch picks), against [`mean_rstd`] row by row, bit for bit: groups whole
    /// and cut, widths inside a vector, at its edges and past several, constant rows and rows
    /// of −0.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_stats_are_the_row_statistics_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(14);
        for d in [1, 7, 8, 9, 15, 16, 17, 24, 31, 64, 100, 129] {
            for rows in [1, 3, 8, 16] {
                let mut x: Vec<f32> = (0..rows * d)
                    .map(|_| rng.random_range(-4.0..4.0_f32) + 100.0)
                    .collect();
                x[..d].fill(3.5);
                if rows > 2 {
                    x[2 * d..3 * d].fill(-0.0);
                }
                let want: Vec<(u32, u32)> = x
                    .chunks_exact(d)
                    .map(|row| {
                        let (m, r) = mean_rstd(row, 1e-5);
                        (m.to_bits(), r.to_bits())
                    })
                    .collect();
                if crate::kernels::cpu::avx512() {
                    // SAFETY: the CPU has AVX-512F; `x` holds `rows` rows of d.
                    let (m, r) = unsafe { avx512::stats(x.as_ptr(), rows, d, 1e-5) };
                    let got: Vec<_> = m
                        .iter()
                        .zip(&r)
                        .take(rows)
                        .map(|(m, r)| (m.to_bits(), r.to_bits()))
                        .collect();
                    assert_eq!(got, want, "AVX-512, {rows} rows of {d}");
                }
                if crate::kernels::cpu::avx2() {
                    for (g, want) in x.chunks(8 * d).zip(want.chunks(8)) {
                        // SAFETY: the CPU has AVX2 and FMA; `g` holds 1 to 8 rows of d.
                        let (m, r) = unsafe { avx2::stats8(g.as_ptr(), g.len() / d, d, 1e-5) };
                        let got: Vec<_> = m
                            .iter()
                            .zip(&r)
                            .take(want.len())
                            .map(|(m, r)| (m.to_bits(), r.to_bits()))
                            .collect();
                        assert_eq!(got, want, "AVX2, {rows} rows of {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn rows_are_the_single_row_bit_for_bit() {
        // The rows' forms (whose sums run side by side in groups, with AVX-512 on the CPUs
        // that have it) against the one-row forms, row after row: groups of rows whole, cut
        // and past several; widths inside a vector, at its edges and past several; rows with
        // a large common offset, constant rows (variance 0) and rows of −0.
        let mut rng = StdRng::seed_from_u64(13);
        let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (n, d) in [
            (1, 1),
            (5, 15),
            (16, 16),
            (17, 17),
            (33, 64),
            (7, 100),
            (20, 256),
            (3, 512),
        ] {
            let mut x = Array2::from_shape_fn((n, d), |_| rng.random_range(-4.0..4.0_f32) + 100.0);
            x.row_mut(0).fill(3.5);
            if n > 2 {
                x.row_mut(2).fill(-0.0);
            }
            let gamma = Array1::from_shape_fn(d, |_| rng.random_range(0.5..1.5_f32));
            let beta = Array1::from_shape_fn(d, |_| rng.random_range(-1.0..1.0_f32));
            let grad_y = Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0_f32));
            let (mut x_hat, mut y) = (Array2::zeros((n, d)), Array2::zeros((n, d)));
            let mut rstd = Array1::zeros(n);
            let (g, b) = (gamma.as_slice().unwrap(), beta.as_slice().unwrap());
            layer_norm_rows(
                x.view(),
                gamma.view(),
                beta.view(),
                1e-5,
                x_hat.view_mut(),
                rstd.view_mut(),
                y.view_mut(),
            );
            let mut infer = Array2::zeros((n, d));
            layer_norm_rows_infer(x.view(), None, gamma.view(), beta.view(), 1e-5, infer.view_mut());
            let (mut grad_x, mut gg, mut gb) = (Array2::zeros((n, d)), Array1::zeros(d), Array1::zeros(d));
            layer_norm_rows_backward(
                x_hat.view(),
                rstd.view(),
                gamma.view(),
                grad_y.view(),
                gg.view_mut(),
                gb.view_mut(),
                grad_x.view_mut(),
            );
            for r in 0..n {
                let (mut h, mut yr, mut gx) = (vec![0.0; d], vec![0.0; d], vec![0.0; d]);
                let s = layer_norm_row(x.row(r).as_slice().unwrap(), g, b, 1e-5, &mut h, &mut yr);
                let at = format!("n {n}, d {d}, row {r}");
                assert_eq!(s.to_bits(), rstd[r].to_bits(), "rstd, {at}");
                assert_eq!(bits(&h), bits(x_hat.row(r).as_slice().unwrap()), "x̂, {at}");
                assert_eq!(bits(&yr), bits(y.row(r).as_slice().unwrap()), "y, {at}");
                assert_eq!(
                    bits(&yr),
                    bits(infer.row(r).as_slice().unwrap()),
                    "inference, {at}"
                );
                layer_norm_row_backward(&h, s, g, grad_y.row(r).as_slice().unwrap(), &mut gx);
                assert_eq!(bits(&gx), bits(grad_x.row(r).as_slice().unwrap()), "∂L/∂x, {at}");
            }
        }
    }

    #[test]
    fn a_residual_sum_normalises_as_the_sum_written_out() {
        // Row counts on both sides of the groups of rows and of the parallel threshold; with
        // and without a dropout mask: the same bits as x + z ⊙ mask formed first.
        let mut rng = StdRng::seed_from_u64(12);
        for (n, d) in [(1, 64), (19, 64), (300, 129)] {
            let x = Array2::from_shape_fn((n, d), |_| rng.random_range(-4.0..4.0_f32));
            let z = Array2::from_shape_fn((n, d), |_| rng.random_range(-4.0..4.0_f32));
            let gamma = Array1::from_shape_fn(d, |_| rng.random_range(0.5..1.5_f32));
            let beta = Array1::from_shape_fn(d, |_| rng.random_range(-1.0..1.0_f32));
            for key in [None, Some(DropKey::draw(0.3, &mut rng))] {
                let run = |x: &Array2<f32>, z: Option<&Array2<f32>>| {
                    let mut x_hat = Array2::from_elem((n, d), f32::NAN);
                    let mut y = Array2::from_elem((n, d), f32::NAN);
                    let mut rstd = Array1::from_elem(n, f32::NAN);
                    layer_norm_rows_sum(
                        x.view(),
                        z.map(|z| (z.view(), key)),
                        gamma.view(),
                        beta.view(),
                        1e-5,
                        x_hat.view_mut(),
                        rstd.view_mut(),
                        y.view_mut(),
                    );
                    (x_hat, rstd, y)
                };
                let sum = Array2::from_shape_fn((n, d), |(i, j)| {
                    x[(i, j)] + z[(i, j)] * key.map_or(1.0, |k| k.factor::<f32>(i * d + j))
                });
                let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let (got, want) = (run(&x, Some(&z)), run(&sum, None));
                assert_eq!(bits(got.0.as_slice().unwrap()), bits(want.0.as_slice().unwrap()));
                assert_eq!(bits(got.1.as_slice().unwrap()), bits(want.1.as_slice().unwrap()));
                assert_eq!(bits(got.2.as_slice().unwrap()), bits(want.2.as_slice().unwrap()));
            }
        }
    }

    #[test]
    fn a_masked_backward_writes_the_gradient_and_its_masked_copy() {
        // Row counts on both sides of the parallel threshold, widths around the γ/β blocks:
        // the same gradients as the plain backward, the masked output the same bits as the
        // mask applied to them after, and γ's and β's gradients the bits of `+= ∂y·x̂` and
        // `+= ∂y` run down the rows one element at a time.
        let mut rng = StdRng::seed_from_u64(13);
        for (n, d) in [(3, 5), (1, 64), (9, 32), (19, 48), (300, 129)] {
            let x_hat = Array2::from_shape_fn((n, d), |_| rng.random_range(-2.0..2.0_f32));
            let rstd = Array1::from_shape_fn(n, |_| rng.random_range(0.5..2.0_f32));
            let gamma = Array1::from_shape_fn(d, |_| rng.random_range(0.5..1.5_f32));
            let grad_y = Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0_f32));
            let key = DropKey::draw(0.3, &mut rng);
            let start = Array1::from_shape_fn(d, |_| rng.random_range(-1.0..1.0_f32));
            let run = |masked: Option<&mut Array2<f32>>| {
                let (mut gg, mut gb) = (start.clone(), start.clone());
                let mut gx = Array2::from_elem((n, d), f32::NAN);
                layer_norm_rows_backward_masked(
                    x_hat.view(),
                    rstd.view(),
                    gamma.view(),
                    grad_y.view(),
                    gg.view_mut(),
                    gb.view_mut(),
                    gx.view_mut(),
                    masked.map(|m| (m.view_mut(), key)),
                );
                (gx, gg, gb)
            };
            let mut masked = Array2::from_elem((n, d), f32::NAN);
            let with = run(Some(&mut masked));
            let (mut want, gg, gb) = run(None);
            assert_eq!(
                with,
                (want.clone(), gg.clone(), gb.clone()),
                "{n} × {d}: the gradients"
            );
            key.apply(0, want.as_slice_mut().unwrap());
            let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&masked), bits(&want), "{n} × {d}: the masked copy");
            if n * d >= 64 {
                assert!(masked.iter().any(|&v| v == 0.0) && masked.iter().any(|&v| v != 0.0));
            }
            let (mut want_g, mut want_b) = (start.clone(), start.clone());
            for r in 0..n {
                for j in 0..d {
                    want_g[j] += grad_y[[r, j]] * x_hat[[r, j]];
                    want_b[j] += grad_y[[r, j]];
                }
            }
            let bits = |a: &Array1<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&gg), bits(&want_g), "{n} × {d}: γ");
            assert_eq!(bits(&gb), bits(&want_b), "{n} × {d}: β");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = StdRng::seed_from_u64(11);
        let (n, d) = (3, 6);
        let x = Array2::from_shape_fn((n, d), |_| rng.random_range(-2.0..2.0_f64));
        let gamma = Array1::from_shape_fn(d, |_| rng.random_range(0.5..1.5));
        let beta = Array1::from_shape_fn(d, |_| rng.random_range(-0.5..0.5));
        let r = Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0));
        let eps = 1e-5;
        let forward = |x: &Array2<f64>, gamma: &Array1<f64>, beta: &Array1<f64>| {
            let mut x_hat = Array2::zeros((n, d));
            let mut y = Array2::zeros((n, d));
            let mut rstd = Array1::zeros(n);
            layer_norm_rows(
                x.view(),
                gamma.view(),
                beta.view(),
                eps,
                x_hat.view_mut(),
                rstd.view_mut(),
                y.view_mut(),
            );
            (y, x_hat, rstd)
        };
        let loss = |x: &Array2<f64>, g: &Array1<f64>, b: &Array1<f64>| (&forward(x, g, b).0 * &r).sum();
        let (_, x_hat, rstd) = forward(&x, &gamma, &beta);
        let mut grad_x = Array2::from_elem((n, d), f64::NAN);
        let mut grad_gamma = Array1::zeros(d);
        let mut grad_beta = Array1::zeros(d);
        layer_norm_rows_backward(
            x_hat.view(),
            rstd.view(),
            gamma.view(),
            r.view(),
            grad_gamma.view_mut(),
            grad_beta.view_mut(),
            grad_x.view_mut(),
        );
        let h = 1e-6;
        for i in 0..n {
            for j in 0..d {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[[i, j]] += h;
                down[[i, j]] -= h;
                let numeric = (loss(&up, &gamma, &beta) - loss(&down, &gamma, &beta)) / (2.0 * h);
                assert!((numeric - grad_x[[i, j]]).abs() < 1e-7, "x[{i},{j}]");
            }
        }
        for j in 0..d {
            let (mut up, mut down) = (gamma.clone(), gamma.clone());
            up[j] += h;
            down[j] -= h;
            let numeric = (loss(&x, &up, &beta) - loss(&x, &down, &beta)) / (2.0 * h);
            assert!((numeric - grad_gamma[j]).abs() < 1e-7, "gamma[{j}]");
            let (mut up, mut down) = (beta.clone(), beta.clone());
            up[j] += h;
            down[j] -= h;
            let numeric = (loss(&x, &gamma, &up) - loss(&x, &gamma, &down)) / (2.0 * h);
            assert!((numeric - grad_beta[j]).abs() < 1e-7, "beta[{j}]");
        }
    }
}
