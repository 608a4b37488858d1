//! Products with few rows, `C ← α·A·B + β·C` ([`takes`]): a decoding step (one new
//! position per sequence) or one query against cached keys.
//!
//! `matrixmultiply` copies ("packs") all of B into its own layout on every call. With many
//! rows of A that copy is repaid many times over; with a handful it costs as much as the
//! arithmetic. These kernels read B where it is:
//!
//! - `dot_rows`, when B's columns are contiguous (B = Wᵀ of a `[out, in]` weight, or Kᵀ of
//!   cached keys): each element of C is a dot product of two contiguous slices;
//! - `axpy_rows`, when B's rows are contiguous (B = V of cached values): each row of C is a
//!   sum of rows of B scaled by A's entries.
//!
//! A dot product accumulates in `L` lanes (16 with AVX-512, 8 with AVX2 and FMA, chosen at run
//! time) summed in a fixed tree, an axpy row in order of k: the same numbers for any thread
//! count, like the rest of the crate. They round differently from `matrixmultiply`, so a
//! product's last bits depend on whether it has few or many rows.

use ndarray::s;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};

use super::parallel::{for_each_split_mut, threads};

use super::{Float, parallel_worth};

/// Whether an `m × k` by `k × n` product takes these kernels: with up to 8 rows when k is at
/// least 32, with up to 32 rows when k is at least 128. Measured against `matrixmultiply`:
/// with shorter dot products, or past 32 rows, its packing is repaid.
pub fn takes(m: usize, k: usize) -> bool {
    (m <= 8 && k >= 32) || (m <= 32 && k >= 128)
}

/// Columns of C per parallel piece.
const COLUMN_BLOCK: usize = 64;

/// `C ← α·A·B + β·C` with A's rows and B's columns contiguous (`a.strides()[1] == 1`,
/// `b.strides()[0] == 1`).
pub(super) fn dot_rows<F: Float>(alpha: F, a: ArrayView2<F>, b: ArrayView2<F>, beta: F, c: ArrayViewMut2<F>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let run = |b: ArrayView2<F>, c: ArrayViewMut2<F>| {
        #[cfg(target_arch = "x86_64")]
        let mut c = c;
        #[cfg(target_arch = "x86_64")]
        if x86::dot_f32(alpha, a, b, beta, c.view_mut()) {
            return;
        }
        dispatch_dot(alpha, a, b, beta, c)
    };
    let parts = if parallel_worth(m * n * k) { threads() } else { 1 };
    for_each_split_mut(c, Axis(1), parts, COLUMN_BLOCK, |cols, c| {
        run(b.slice(s![.., cols]), c)
    });
}

/// `C ← α·A·B` (β = 0) with B's rows and C's rows contiguous.
pub(super) fn axpy_rows<F: Float>(
    alpha: F,
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    beta: F,
    c: ArrayViewMut2<F>,
) {
    dispatch_axpy(alpha, a, b, beta, c);
}

macro_rules! dispatch {
    ($name:ident, $body:ident) => {
        fn $name<F: Float>(alpha: F, a: ArrayView2<F>, b: ArrayView2<F>, beta: F, c: ArrayViewMut2<F>) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512<F: Float>(
                    alpha: F,
                    a: ArrayView2<F>,
                    b: ArrayView2<F>,
                    beta: F,
                    c: ArrayViewMut2<F>,
                ) {
                    $body::<F, 16, true>(alpha, a, b, beta, c)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2<F: Float>(
                    alpha: F,
                    a: ArrayView2<F>,
                    b: ArrayView2<F>,
                    beta: F,
                    c: ArrayViewMut2<F>,
                ) {
                    $body::<F, 8, true>(alpha, a, b, beta, c)
                }
                if $crate::kernels::cpu::avx512() {
                    // SAFETY: the CPU has AVX-512F, detected on the line above; the function
                    // is safe in every other respect.
                    return unsafe { avx512(alpha, a, b, beta, c) };
                }
                if $crate::kernels::cpu::avx2() {
                    // SAFETY: the CPU has AVX2 and FMA, detected on the line above.
                    return unsafe { avx2(alpha, a, b, beta, c) };
                }
            }
            $body::<F, 8, false>(alpha, a, b, beta, c)
        }
    };
}

dispatch!(dispatch_dot, dot_body);
dispatch!(dispatch_axpy, axpy_body);

/// `x · y` in `L` lanes, then a fixed pairwise sum of the lanes, then the tail in order.
#[inline(always)]
fn dot<F: Float, const L: usize, const FMA: bool>(x: &[F], y: &[F]) -> F {
    let chunks = x.len() / L;
    let mut acc = [F::ZERO; L];
    for c in 0..chunks {
        let (xs, ys) = (&x[c * L..c * L + L], &y[c * L..c * L + L]);
        for l in 0..L {
            acc[l] = madd::<F, FMA>(xs[l], ys[l], acc[l]);
        }
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    let mut sum = acc[0];
    for i in chunks * L..x.len() {
        sum = madd::<F, FMA>(x[i], y[i], sum);
    }
    sum
}

#[inline(always)]
fn madd<F: Float, const FMA: bool>(a: F, b: F, c: F) -> F {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn dot_body<F: Float, const L: usize, const FMA: bool>(
    alpha: F,
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    beta: F,
    mut c: ArrayViewMut2<F>,
) {
    let (m, n) = c.dim();
    for j in 0..n {
        let col = b.column(j);
        let w = col.as_slice().expect("columns of B are contiguous");
        for i in 0..m {
            let row = a.row(i);
            let x = row.as_slice().expect("rows of A are contiguous");
            let v = alpha * dot::<F, L, FMA>(x, w);
            let out = &mut c[[i, j]];
            *out = if beta == F::ZERO { v } else { v + beta * *out };
        }
    }
}

#[inline(always)]
fn axpy_body<F: Float, const L: usize, const FMA: bool>(
    alpha: F,
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    beta: F,
    mut c: ArrayViewMut2<F>,
) {
    debug_assert!(beta == F::ZERO, "axpy_rows overwrites C");
    let (m, k) = a.dim();
    for i in 0..m {
        let mut row = c.row_mut(i);
        let out = row.as_slice_mut().expect("rows of C are contiguous");
        // Σ_p a[i, p]·B[p, :] in order of p, then α.
        out.fill(F::ZERO);
        for p in 0..k {
            let s = a[[i, p]];
            let brow = b.row(p);
            let bs = brow.as_slice().expect("rows of B are contiguous");
            for (o, &x) in out.iter_mut().zip(bs) {
                *o = madd::<F, FMA>(s, x, *o);
            }
        }
        if alpha != F::ONE {
            out.iter_mut().for_each(|o| *o *= alpha);
        }
    }
}

/// The `f32` dot-product kernel with AVX2 and FMA intrinsics: tiles of rows of A by 4 columns
/// of B, 8 lanes each, so that each load of B feeds several fused multiply-adds. With
/// AVX-512VL the same code has 32 vector registers and takes 4 rows at a time, else 2.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use ndarray::{ArrayView2, ArrayViewMut2};

    use super::Float;

    /// Runs the product if F is `f32` and the CPU has AVX2 and FMA; returns whether it did.
    pub(super) fn dot_f32<F: Float>(
        alpha: F,
        a: ArrayView2<F>,
        b: ArrayView2<F>,
        beta: F,
        mut c: ArrayViewMut2<F>,
    ) -> bool {
        let wide = crate::kernels::cpu::avx512() && std::arch::is_x86_feature_detected!("avx512vl");
        let avx2 = crate::kernels::cpu::avx2();
        if !(wide || avx2) {
            return false;
        }
        let rows: Option<Vec<&[f32]>> = a
            .rows()
            .into_iter()
            .map(|r| r.to_slice().and_then(F::as_f32))
            .collect();
        let cols: Option<Vec<&[f32]>> = b
            .columns()
            .into_iter()
            .map(|c| c.to_slice().and_then(F::as_f32))
            .collect();
        let (Some(rows), Some(cols)) = (rows, cols) else {
            return false;
        };
        if rows.iter().chain(&cols).any(|s| s.len() != rows[0].len()) {
            return false;
        }
        let mut store = |i: usize, j: usize, v: f32| {
            let v = alpha * F::from_f64(v as f64);
            let out = &mut c[[i, j]];
            *out = if beta == F::ZERO { v } else { v + beta * *out };
        };
        // SAFETY: the CPU has the features of the function called, detected above; every slice
        // has the same length k, which is all the tiles read.
        unsafe {
            if wide {
                drive_avx512(&rows, &cols, &mut store);
            } else {
                drive_avx2(&rows, &cols, &mut store);
            }
        }
        true
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn drive_avx512(rows: &[&[f32]], cols: &[&[f32]], store: &mut impl FnMut(usize, usize, f32)) {
        // SAFETY: as for `drive`.
        unsafe { drive::<4>(rows, cols, store) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn drive_avx2(rows: &[&[f32]], cols: &[&[f32]], store: &mut impl FnMut(usize, usize, f32)) {
        // SAFETY: as for `drive`.
        unsafe { drive::<2>(rows, cols, store) }
    }

    /// Columns outer, rows inner: each block of four columns of B is read from memory once and
    /// serves every row of A from the L1 cache. `RB` rows at a time, then the rest one by one.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; all slices must have one length.
    #[inline(always)]
    unsafe fn drive<const RB: usize>(
        rows: &[&[f32]],
        cols: &[&[f32]],
        store: &mut impl FnMut(usize, usize, f32),
    ) {
        fn emit<const R: usize, const C: usize>(
            t: [[f32; C]; R],
            i: usize,
            j: usize,
            store: &mut impl FnMut(usize, usize, f32),
        ) {
            for (di, row) in t.iter().enumerate() {
                for (dj, &v) in row.iter().enumerate() {
                    store(i + di, j + dj, v);
                }
            }
        }
        let (m, n) = (rows.len(), cols.len());
        let mut j = 0;
        while j < n {
            let mut i = 0;
            // SAFETY (each tile): the caller's.
            if j + 4 <= n {
                let w = [cols[j], cols[j + 1], cols[j + 2], cols[j + 3]];
                while i + RB <= m {
                    let x: [&[f32]; RB] = std::array::from_fn(|r| rows[i + r]);
                    emit(unsafe { tile(x, w) }, i, j, store);
                    i += RB;
                }
                while i < m {
                    emit(unsafe { tile([rows[i]], w) }, i, j, store);
                    i += 1;
                }
                j += 4;
            } else {
                while i < m {
                    emit(unsafe { tile([rows[i]], [cols[j]]) }, i, j, store);
                    i += 1;
                }
                j += 1;
            }
        }
    }

    /// `R × C` dot products of length k: 8-lane fused multiply-adds, a fixed horizontal sum,
    /// then the tail in order.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; all slices must have one length.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(x: [&[f32]; R], w: [&[f32]; C]) -> [[f32; C]; R] {
        let k = x[0].len();
        let k8 = k / 8 * 8;
        // SAFETY (all intrinsics below): the caller guarantees AVX2 and FMA; every load reads
        // 8 floats at offset o with o + 8 ≤ k8 ≤ k, the length of every slice.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut o = 0;
            while o < k8 {
                let wv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(w[c].as_ptr().add(o)));
                for r in 0..R {
                    let xv = _mm256_loadu_ps(x[r].as_ptr().add(o));
                    for c in 0..C {
                        acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
                o += 8;
            }
            let mut out = [[0.0f32; C]; R];
            for r in 0..R {
                for c in 0..C {
                    let mut sum = hsum(acc[r][c]);
                    for p in k8..k {
                        sum = x[r][p].mul_add(w[c][p], sum);
                    }
                    out[r][c] = sum;
                }
            }
            out
        }
    }

    /// The 8 lanes of `v` summed in a fixed order.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: the caller's.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{gemm, gemm_naive};
    use ndarray::{Array2, s};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn ints(rng: &mut StdRng, r: usize, c: usize) -> Array2<f32> {
        Array2::from_shape_fn((r, c), |_| rng.random_range(-3..=3) as f32)
    }

    #[test]
    fn both_kernels_match_naive_at_odd_sizes_with_nan_prefilled_outputs() {
        let mut rng = StdRng::seed_from_u64(80);
        // Sizes the small kernels take (see `takes`), with odd k, and a few they leave to
        // matrixmultiply.
        for &(m, k, n) in &[
            (1, 33, 1),
            (3, 33, 70),
            (2, 47, 9),
            (8, 64, 1),
            (5, 130, 70),
            (16, 200, 33),
            (31, 129, 5),
            (7, 5, 200),
        ] {
            let a = ints(&mut rng, m, k);
            let w = ints(&mut rng, n, k); // [out, in]: w.t() has contiguous columns
            let v = ints(&mut rng, k, n); // rows contiguous
            for (b, name) in [(w.t(), "dot"), (v.view(), "axpy")] {
                let mut want = Array2::zeros((m, n));
                gemm_naive(2.0, a.view(), b, 0.0, want.view_mut());
                let mut got = Array2::from_elem((m, n), f32::NAN);
                gemm(2.0, a.view(), b, 0.0, got.view_mut());
                assert_eq!(got, want, "{name} m={m} k={k} n={n}");
            }
            // β ≠ 0 takes the dot kernel (or matrixmultiply) and reads C.
            let c0 = ints(&mut rng, m, n);
            let mut want = c0.clone();
            gemm_naive(1.0, a.view(), w.t(), -1.0, want.view_mut());
            let mut got = c0.clone();
            gemm(1.0, a.view(), w.t(), -1.0, got.view_mut());
            assert_eq!(got, want);
        }
    }

    #[test]
    fn strided_rows_and_f64() {
        let mut rng = StdRng::seed_from_u64(81);
        let a = ints(&mut rng, 8, 40);
        let w = ints(&mut rng, 30, 20);
        // Every other row of A, the first 20 columns: rows still contiguous.
        let a_view = a.slice(s![..;2, ..20]);
        let mut want = Array2::zeros((4, 30));
        gemm_naive(1.0, a_view, w.t(), 0.0, want.view_mut());
        let mut got = Array2::from_elem((4, 30), f32::NAN);
        gemm(1.0, a_view, w.t(), 0.0, got.view_mut());
        assert_eq!(got, want);
        let a64 = a.mapv(f64::from);
        let w64 = w.mapv(f64::from);
        let mut got64 = Array2::<f64>::zeros((8, 30));
        gemm(1.0, a64.slice(s![.., ..20]), w64.t(), 0.0, got64.view_mut());
        let mut want64 = Array2::<f64>::zeros((8, 30));
        gemm_naive(1.0, a64.slice(s![.., ..20]), w64.t(), 0.0, want64.view_mut());
        assert_eq!(got64, want64);
    }

    #[test]
    fn random_values_agree_with_matrixmultiply_to_rounding() {
        let mut rng = StdRng::seed_from_u64(82);
        let a = Array2::from_shape_fn((5, 300), |_| rng.random::<f32>() - 0.5);
        let w = Array2::from_shape_fn((77, 300), |_| rng.random::<f32>() - 0.5);
        let mut small = Array2::zeros((5, 77));
        gemm(1.0, a.view(), w.t(), 0.0, small.view_mut());
        let mut naive = Array2::zeros((5, 77));
        gemm_naive(1.0, a.view(), w.t(), 0.0, naive.view_mut());
        assert!((&small - &naive).iter().all(|e| e.abs() < 1e-5));
    }
}
