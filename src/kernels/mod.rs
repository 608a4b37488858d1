//! Scalar kernels: the arithmetic every layer is built from.
//!
//! Each kernel has a naive twin (`*_naive`) written for clarity, and the tests hold the two
//! together at odd sizes, with strided and transposed inputs and NaN-filled outputs.

pub mod activations;
pub mod cpu;
pub mod dropout;
pub mod float;
pub mod gemm;
pub mod layer_norm;
pub mod loss;
pub mod parallel;
pub mod precision;
pub mod simd;
pub mod small_gemm;
pub(crate) mod small_head;
pub mod softmax;
pub mod workspace;

pub use activations::Activation;

/// Runs `f` with this thread's `cell` set to `value`, then sets it back to what it was, also
/// if `f` panics: the scoped settings of the kernels (the precision of the products, the
/// workspace, the bf16 packings of the weights, weights streamed from memory).
pub(crate) fn with_cell<T: Copy + 'static, R>(
    cell: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(cell, cell.replace(value));
    f()
}

/// [`crate::Error::NonFinite`] naming `what()` if a value of `row` is NaN or an infinity: a
/// decision (a token, a class, a beam) is never taken from values that mean nothing. A
/// contiguous row is checked in one pass that vectorises (`0·x` is ±0 for a finite x, NaN
/// for an infinity or NaN): the scalar check and [`argmax`]'s scalar search had been 3% of a
/// small bf16 greedy decode.
pub(crate) fn check_finite<F: Float>(
    row: ndarray::ArrayView1<F>,
    what: impl FnOnce() -> String,
) -> crate::Result<()> {
    let finite = match row.as_slice() {
        Some(x) => simd::widest!(x.iter().fold(true, |all, &v| all & (v * F::ZERO == F::ZERO))),
        None => row.iter().all(|z| z.is_finite()),
    };
    match finite {
        true => Ok(()),
        false => Err(crate::Error::NonFinite { what: what() }),
    }
}

/// [`argmax`] of a row that must be finite ([`check_finite`]): greedy decoding and
/// classification.
pub(crate) fn decide<F: Float>(
    row: ndarray::ArrayView1<F>,
    what: impl FnOnce() -> String,
) -> crate::Result<usize> {
    check_finite(row, what)?;
    Ok(argmax(row))
}

/// The index of the largest value of `row` (the first on ties; NaN never wins). A contiguous
/// row is searched in two passes that vectorise: the largest value in lanes ([`simd::max`],
/// NaN ignored), then the first index that holds it (the first of equal maxima, and NaN
/// equals nothing); a maximum that is not finite (every value −∞ or NaN, or a +∞) and a
/// strided row are searched one value at a time, which gives the same index.
pub fn argmax<F: Float>(row: ndarray::ArrayView1<F>) -> usize {
    if let Some(x) = row.as_slice() {
        let m = simd::widest!(simd::max(x));
        if m.is_finite() {
            return x.iter().position(|&v| v == m).unwrap_or(0);
        }
    }
    argmax_scalar(row)
}

/// [`argmax`] one value at a time: its naive twin.
fn argmax_scalar<F: Float>(row: ndarray::ArrayView1<F>) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, F::NEG_INFINITY),
            |best, (j, &x)| if x > best.1 { (j, x) } else { best },
        )
        .0
}

/// A new `shape` array whose elements are all written by `fill`, with no zeroing pass before
/// (from the current [`workspace`] when it holds a buffer of that size).
///
/// # Safety
/// `fill` must write every element of the view it is given before it reads any (a GEMM with
/// β = 0 does).
pub(crate) unsafe fn filled<F: Float>(
    shape: (usize, usize),
    fill: impl FnOnce(ndarray::ArrayViewMut2<'_, F>),
) -> ndarray::Array2<F> {
    // SAFETY: forwarded from this function's contract.
    unsafe { workspace::filled(shape, fill) }
}

/// `acc += x`, element by element (x broadcast to acc's shape as ndarray's `+=` does): in
/// parallel chunks when both are contiguous in standard layout and of one shape (the residual
/// sums of the blocks: on the calling thread alone they had left the team's other thread
/// waiting), else through ndarray.
pub(crate) fn add_assign<F: Float, D: ndarray::Dimension>(
    mut acc: ndarray::ArrayViewMut<'_, F, D>,
    x: ndarray::ArrayView<'_, F, D>,
) {
    if acc.shape() == x.shape()
        && let (Some(a), Some(x)) = (acc.as_slice_mut(), x.as_slice())
    {
        let len = a.len();
        parallel::for_each_chunk_mut(a, 64, len, |at, a| {
            let x = &x[at..at + a.len()];
            simd::widest!(for (a, &v) in a.iter_mut().zip(x) {
                *a += v;
            })
        });
        return;
    }
    acc.zip_mut_with(&x, |a, &v| *a += v);
}

/// `acc += Σ_rows x` (one row after the other, so the result does not depend on threads).
///
/// # Panics
/// If `acc` does not have one element per column of x.
pub fn add_column_sums<F: Float>(x: ndarray::ArrayView2<F>, mut acc: ndarray::ArrayViewMut1<F>) {
    assert_eq!(
        acc.len(),
        x.ncols(),
        "add_column_sums: acc {:?} for rows {:?}",
        acc.shape(),
        x.shape()
    );
    let (n, d) = x.dim();
    match (acc.as_slice_mut(), x.as_slice()) {
        // Columns cut between threads; each column summed over the rows in order.
        (Some(acc), Some(x)) => parallel::for_each_chunk_mut(acc, 64, n * d, |j0, acc| {
            simd::widest!(for (b, acc) in acc.chunks_mut(SUM_BLOCK).enumerate() {
                column_sums_block(x, n, d, j0 + b * SUM_BLOCK, acc)
            })
        }),
        _ => {
            for row in x.rows() {
                acc += &row;
            }
        }
    }
}

/// Columns whose sums [`add_column_sums`] keeps in registers while it runs down the rows.
const SUM_BLOCK: usize = 64;

/// `acc += Σ_rows x[.., j0..j0 + acc.len()]` (rows of `d` floats), the sums of a whole block
/// held in a local array (registers) across the rows rather than loaded and stored at every
/// row, whose stores the next row's loads had to wait for. The same additions in the same
/// order.
#[inline(always)]
fn column_sums_block<F: Float>(x: &[F], n: usize, d: usize, j0: usize, acc: &mut [F]) {
    if acc.len() == SUM_BLOCK {
        let mut s: [F; SUM_BLOCK] = acc.try_into().expect("a whole block");
        for r in 0..n {
            let row: &[F; SUM_BLOCK] = x[r * d + j0..r * d + j0 + SUM_BLOCK]
                .try_into()
                .expect("a whole block");
            for (s, &v) in s.iter_mut().zip(row) {
                *s += v;
            }
        }
        acc.copy_from_slice(&s);
    } else {
        for r in 0..n {
            let row = &x[r * d + j0..r * d + j0 + acc.len()];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

/// Below this much work (multiply-adds or elements), a loop stays on the calling thread: handing
/// it to the rayon pool would cost more than it saves.
pub const PARALLEL_MIN_WORK: usize = 1 << 15;

/// Whether `work` units are worth spreading over the rayon pool: enough of them, and more than
/// one thread to spread them over. Splits never depend on the answer for their results (only
/// independent rows, heads and batches are split), so this changes speed, never values.
#[inline]
pub fn parallel_worth(work: usize) -> bool {
    work >= PARALLEL_MIN_WORK && parallel::threads() > 1
}
pub use dropout::{DropKey, dropout_mask};
pub use float::{Float, MaybeSerde};
pub use gemm::{PackedB, gemm, gemm_batched, gemm_bias, gemm_naive, gemm_packed};
pub(crate) use gemm::{bias_sums_in_packing, gemm_blocks, gemm_weight_grad};
pub use layer_norm::{
    layer_norm_row, layer_norm_row_backward, layer_norm_row_naive, layer_norm_rows, layer_norm_rows_backward,
    layer_norm_rows_backward_masked, layer_norm_rows_sum,
};
pub use softmax::{RowMask, softmax_row, softmax_row_backward, softmax_row_naive};

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayView1;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// A scoped setting holds inside its call, nests, and comes back after it, also when the
    /// call panics.
    #[test]
    fn a_scoped_setting_comes_back_after_a_panic() {
        use std::cell::Cell;
        thread_local! {
            static SETTING: Cell<u32> = const { Cell::new(1) };
        }
        let inner = with_cell(&SETTING, 2, || {
            (SETTING.get(), with_cell(&SETTING, 3, || SETTING.get()))
        });
        assert_eq!((inner, SETTING.get()), ((2, 3), 1));
        let caught = std::panic::catch_unwind(|| with_cell(&SETTING, 4, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(SETTING.get(), 1);
    }

    /// Column sums in blocks held in registers give the bits of the sums run down the rows
    /// one element at a time, for widths around the block's and both sides of the parallel
    /// threshold, on one and two threads.
    #[test]
    fn column_sums_are_the_sums_down_the_rows() {
        let mut rng = StdRng::seed_from_u64(4);
        for (n, d) in [(1, 1), (7, 63), (33, 64), (5, 65), (300, 130), (200, 256)] {
            let x = ndarray::Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0_f32));
            let start: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut want = start.clone();
            for r in 0..n {
                for (j, w) in want.iter_mut().enumerate() {
                    *w += x[[r, j]];
                }
            }
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut acc = ndarray::Array1::from(start.clone());
                pool.install(|| add_column_sums(x.view(), acc.view_mut()));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(acc.as_slice().unwrap()),
                    bits(&want),
                    "{n} × {d}, {threads} threads"
                );
            }
        }
    }

    /// `argmax` and `check_finite` give their scalar twins' index and verdict on rows with
    /// ties, signed zeros, NaN, infinities and every length around a vector's, contiguous and
    /// strided; the loss's accuracy flag is `argmax == target` on the same rows.
    #[test]
    fn vector_argmax_and_check_match_the_scalar_ones() {
        let mut rng = StdRng::seed_from_u64(3);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            1.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -2.5,
        ];
        for len in [1, 2, 15, 16, 17, 33, 100, 1000] {
            for _ in 0..200 {
                let row: Vec<f32> = (0..len)
                    .map(|_| match rng.random_range(0..4) {
                        0 => specials[rng.random_range(0..specials.len())],
                        _ => rng.random_range(-3..3) as f32 * 0.5,
                    })
                    .collect();
                let want = argmax_scalar(ArrayView1::from(&row[..]));
                let finite = row.iter().all(|v| v.is_finite());
                let doubled: Vec<f32> = row.iter().flat_map(|&v| [v, 9.0]).collect();
                let strided = ArrayView1::from(&doubled[..]).slice_move(ndarray::s![..;2]);
                for view in [ArrayView1::from(&row[..]), strided] {
                    assert_eq!(argmax(view), want, "{row:?}");
                    assert_eq!(check_finite(view, String::new).is_ok(), finite, "{row:?}");
                    let decided = decide(view, String::new);
                    assert_eq!(decided.ok(), finite.then_some(want), "{row:?}");
                }
                let y = rng.random_range(0..len);
                let mut g = vec![0.0f32; len];
                let (_, correct) = loss::row_accuracy_probe(&row, &mut g, y);
                assert_eq!(correct, want == y, "{row:?} target {y}");
            }
        }
    }
}
