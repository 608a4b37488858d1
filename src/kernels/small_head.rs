//! One head of attention, `softmax(Q·Kᵀ·s)·V`, for short sequences, in registers.
//!
//! The general path runs a head as two GEMM calls with a softmax between them. At the tiny
//! and small workloads' sizes (16 or 32 queries and keys, `d_k` 16 or 32) those calls spent
//! more in packing and per-call costs than in arithmetic, and one row's softmax was a chain of
//! dependent steps (maximum, exponential, sum, division) with nothing beside it to overlap.
//! Here, with AVX-512 and at most [`MAX_KEYS`] keys and value features:
//!
//! - Kᵀ is copied into a small buffer (keys contiguous, padded to whole vectors);
//! - [`ROWS`] query rows at a time keep all their scores in vector registers, take their
//!   softmax there (four independent chains side by side) when the mask of a row is a plain
//!   limit (causal, padding by length), and store the probabilities;
//! - then the same rows keep all their outputs in registers over the keys, reading V where it
//!   is.
//!
//! The arithmetic is the general path's, term for term, so the bits are the same whichever
//! path a head takes: each score a chain of fused multiply-adds over `d_k` in order and scaled
//! after the sum (the GEMM micro-kernel), the softmax's maximum, `exp_f32`, lane sums and
//! reciprocal those of [`super::softmax`], each output a chain over the keys in order with the
//! dropout mask multiplied into the weight first. A head is taken only where the GEMM would
//! have run its packed kernels (not the few-row kernels, which sum in another order); the
//! tests hold the two paths to the same bits.

use ndarray::{ArrayView2, ArrayViewMut2};

use super::Float;

/// Keys and value features of a head, at most.
pub(crate) const MAX_KEYS: usize = 64;
/// Key features `d_k` of a head, at most.
pub(crate) const MAX_DK: usize = 128;
/// Query rows computed together.
const ROWS: usize = 4;
/// Lanes of a vector.
const W: usize = 16;

thread_local! {
    /// Each thread's buffer for Kᵀ (at most 32 KiB).
    static KEYS_T: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A strided `f32` matrix seen through a raw pointer.
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Strided {
    fn of<F: Float>(x: &ArrayView2<F>) -> Strided {
        Strided {
            ptr: x.as_ptr() as *const f32,
            rs: x.strides()[0],
            cs: x.strides()[1],
        }
    }

    /// Element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` must be inside the view this was taken from.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller keeps (i, j) inside the view.
        unsafe { *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }

    /// The address of row `i`.
    ///
    /// # Safety
    /// Row `i` must be inside the view.
    #[inline(always)]
    unsafe fn row(&self, i: usize) -> *const f32 {
        // SAFETY: the caller keeps row i inside the view.
        unsafe { self.ptr.offset(i as isize * self.rs) }
    }
}

/// How the rows of a head's probabilities are normalised.
pub(crate) enum RowSoftmax<L, S> {
    /// Row `i` allows the keys below `limit(i)` and no other: the softmax runs in registers.
    Limit(L),
    /// Any other mask: `softmax(i, row)` on each stored row of scores.
    Rows(S),
}

/// One (sequence, head) that this path takes; see the [module docs](self).
pub(crate) struct SmallHead {
    q: Strided,
    k: Strided,
    v: Strided,
    tq: usize,
    kb: usize,
    dk: usize,
    dv: usize,
}

impl SmallHead {
    /// The head `q` `[Tq, d_k]`, `k` `[kb, d_k]`, `v` `[kb, d_v]` into `probs` `[Tq, Tk ≥ kb]`
    /// and `out` `[Tq, d_v]`, if this path takes it: `f32` on a CPU with AVX-512F, at most
    /// [`MAX_KEYS`] keys and value features and [`MAX_DK`] key features, the features of K
    /// and V and the keys of `probs` contiguous, and shapes the GEMM would have given its
    /// packed kernels.
    pub(crate) fn new<F: Float>(
        q: ArrayView2<F>,
        k: ArrayView2<F>,
        v: ArrayView2<F>,
        probs: &ArrayViewMut2<F>,
        out: &ArrayViewMut2<F>,
    ) -> Option<SmallHead> {
        use super::gemm::Isa;
        let ((tq, dk), (kb, dv)) = (q.dim(), v.dim());
        let unit = |stride: isize, len: usize| stride == 1 || len <= 1;
        let few_rows = super::small_gemm::takes;
        let fits = std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>()
            && Isa::best() == Some(Isa::Avx512)
            && (1..=MAX_KEYS).contains(&kb)
            && (1..=MAX_KEYS).contains(&dv)
            && (1..=MAX_DK).contains(&dk)
            && tq > 0
            && !few_rows(tq, dk)
            && !few_rows(tq, kb)
            && k.dim() == (kb, dk)
            && probs.nrows() == tq
            && probs.ncols() >= kb
            && out.dim() == (tq, dv)
            && unit(k.strides()[1], dk)
            && unit(v.strides()[1], dv)
            && unit(probs.strides()[1], probs.ncols());
        fits.then(|| SmallHead {
            q: Strided::of(&q),
            k: Strided::of(&k),
            v: Strided::of(&v),
            tq,
            kb,
            dk,
            dv,
        })
    }

    /// `probs ← softmax(Q·Kᵀ·scale)` (zero past `kb`), then `out ← (probs ⊙ dropped)·V`.
    ///
    /// # Safety
    /// F must be f32 and the views given to [`SmallHead::new`] still alive; `probs` and
    /// `out` must be those given to it.
    pub(crate) unsafe fn run<F: Float, L: Fn(usize) -> usize, S: FnMut(usize, &mut [F])>(
        &self,
        scale: f32,
        softmax: RowSoftmax<L, S>,
        dropped: Option<ArrayView2<F>>,
        probs: &mut ArrayViewMut2<F>,
        out: &mut ArrayViewMut2<F>,
    ) {
        let kp = self.kb.div_ceil(W) * W;
        let p = (probs.as_mut_ptr() as *mut f32, probs.strides()[0]);
        let drop = dropped.map(|m| Strided::of(&m));
        let o = (out.as_mut_ptr() as *mut f32, out.strides()[0], out.strides()[1]);
        KEYS_T.with_borrow_mut(|kt| {
            if kt.len() < self.dk * kp {
                kt.resize(self.dk * kp, 0.0);
            }
            let kt = &mut kt[..self.dk * kp];
            // Whole 8 × 8 blocks by vector transposes, the edges one by one.
            let (kb8, dk8) = (self.kb / 8 * 8, self.dk / 8 * 8);
            for j in (0..kb8).step_by(8) {
                for d in (0..dk8).step_by(8) {
                    // SAFETY: rows j..j+8 < kb and features d..d+8 < dk of K (checked by
                    // `new`, features contiguous); rows d..d+8 of kt, columns j..j+8 < kp;
                    // AVX-512F (so AVX2) is there.
                    unsafe {
                        let src = self.k.row(j).add(d);
                        let dst = kt.as_mut_ptr().add(d * kp + j);
                        super::gemm::micro::transpose8x8(src, self.k.rs, dst, kp as isize);
                    }
                }
            }
            for j in 0..self.kb {
                let ds = if j < kb8 { dk8..self.dk } else { 0..self.dk };
                for d in ds {
                    // SAFETY: row j < kb and feature d < dk of K (checked by `new`).
                    kt[d * kp + j] = unsafe { self.k.at(j, d) };
                }
            }
            for row in kt.chunks_exact_mut(kp) {
                row[self.kb..].fill(0.0);
            }
            let limit = match &softmax {
                RowSoftmax::Limit(l) => Some(l),
                RowSoftmax::Rows(_) => None,
            };
            // SAFETY: AVX-512F is there and the shapes fit (checked by `new`); kt holds dk
            // rows of kp; p and o are the probabilities and output of the caller.
            unsafe { self.for_blocks(|i, n| scores_at(self, i, n, kt.as_ptr(), scale, limit, p)) };
        });
        match softmax {
            RowSoftmax::Limit(_) => {
                for mut row in probs.rows_mut() {
                    row.slice_mut(ndarray::s![self.kb..]).fill(F::ZERO);
                }
            }
            RowSoftmax::Rows(mut softmax) => {
                for (i, mut row) in probs.rows_mut().into_iter().enumerate() {
                    softmax(i, row.as_slice_mut().expect("contiguous rows (checked by new)"));
                }
            }
        }
        let p = Strided {
            ptr: p.0,
            rs: p.1,
            cs: 1,
        };
        // SAFETY: as above; V's rows hold dv contiguous floats (checked by `new`).
        unsafe { self.for_blocks(|i, n| outputs_at(self, i, n, p, drop, o)) };
    }

    /// `f(i, rows)` for blocks of [`ROWS`] query rows and the last, shorter one.
    #[inline(always)]
    fn for_blocks(&self, mut f: impl FnMut(usize, usize)) {
        let mut i = 0;
        while i < self.tq {
            let n = (self.tq - i).min(ROWS);
            f(i, n);
            i += n;
        }
    }
}

/// [`scores`] for rows `i..i + n` with the number of key vectors of the head.
///
/// # Safety
/// As [`scores`].
unsafe fn scores_at<L: Fn(usize) -> usize>(
    head: &SmallHead,
    i: usize,
    n: usize,
    kt: *const f32,
    scale: f32,
    limit: Option<&L>,
    p: (*mut f32, isize),
) {
    macro_rules! go {
        ($r:literal, $i:expr) => {
            // SAFETY: the caller's contract, for C vectors of keys.
            unsafe {
                match head.kb.div_ceil(W) {
                    1 => scores::<$r, 1, L>(head, $i, kt, scale, limit, p),
                    2 => scores::<$r, 2, L>(head, $i, kt, scale, limit, p),
                    3 => scores::<$r, 3, L>(head, $i, kt, scale, limit, p),
                    _ => scores::<$r, 4, L>(head, $i, kt, scale, limit, p),
                }
            }
        };
    }
    if n == ROWS {
        go!(4, i);
    } else {
        for r in i..i + n {
            go!(1, r);
        }
    }
}

/// [`outputs`] for rows `i..i + n` with the number of value vectors of the head.
///
/// # Safety
/// As [`outputs`].
unsafe fn outputs_at(
    head: &SmallHead,
    i: usize,
    n: usize,
    p: Strided,
    drop: Option<Strided>,
    o: (*mut f32, isize, isize),
) {
    macro_rules! go {
        ($r:literal, $i:expr) => {
            // SAFETY: the caller's contract, for C vectors of values.
            unsafe {
                match head.dv.div_ceil(W) {
                    1 => outputs::<$r, 1>(head, $i, p, drop, o),
                    2 => outputs::<$r, 2>(head, $i, p, drop, o),
                    3 => outputs::<$r, 3>(head, $i, p, drop, o),
                    _ => outputs::<$r, 4>(head, $i, p, drop, o),
                }
            }
        };
    }
    if n == ROWS {
        go!(4, i);
    } else {
        for r in i..i + n {
            go!(1, r);
        }
    }
}

/// The lanes `0..n` (all for n ≥ 16) of a vector.
#[inline(always)]
fn lanes(n: usize) -> u16 {
    if n >= W { u16::MAX } else { (1u16 << n) - 1 }
}

/// Scores of query rows `i..i + R` against `C` vectors of keys, `s[r][j] = scale·Σ_d
/// q[r][d]·kt[d][j]` (a chain of fused multiply-adds over d in order, as the GEMM's), then,
/// with `limit`, the softmax of each row over its keys below `limit(i + r)` in registers;
/// stored into `p` for `j < kb`.
///
/// # Safety
/// AVX-512F; rows `i..i + R` inside the head's Q and inside `p` (row stride `p.1`, at least
/// `kb` floats a row); `kt` holds `dk` rows of `C` vectors.
#[target_feature(enable = "avx512f")]
unsafe fn scores<const R: usize, const C: usize, L: Fn(usize) -> usize>(
    head: &SmallHead,
    i: usize,
    kt: *const f32,
    scale: f32,
    limit: Option<&L>,
    p: (*mut f32, isize),
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    for d in 0..head.dk {
        let mut kv = [_mm512_setzero_ps(); C];
        for (c, kv) in kv.iter_mut().enumerate() {
            // SAFETY: row d of kt holds C vectors (the caller).
            *kv = unsafe { _mm512_loadu_ps(kt.add((d * C + c) * W)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row i + r and column d < dk are inside Q (the caller).
            let a = _mm512_set1_ps(unsafe { head.q.at(i + r, d) });
            for (acc, &kv) in acc.iter_mut().zip(&kv) {
                *acc = _mm512_fmadd_ps(a, kv, *acc);
            }
        }
    }
    let s = _mm512_set1_ps(scale);
    for acc in acc.iter_mut().flatten() {
        *acc = _mm512_mul_ps(*acc, s);
    }
    if let Some(limit) = limit {
        let mut live = [[0u16; C]; R];
        for (r, live) in live.iter_mut().enumerate() {
            let n = limit(i + r).min(head.kb);
            for (c, live) in live.iter_mut().enumerate() {
                *live = lanes(n.saturating_sub(c * W));
            }
        }
        softmax_rows(&mut acc, &live);
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &acc) in acc.iter().enumerate() {
            // SAFETY: the lanes stored are columns below kb of row i + r of p (the caller).
            unsafe {
                let at = p.0.offset((i + r) as isize * p.1).add(c * W);
                _mm512_mask_storeu_ps(at, lanes(head.kb.saturating_sub(c * W)), acc);
            }
        }
    }
}

/// The softmax of `R` rows of `C` vectors over their `live` lanes (the others become 0), as
/// [`super::softmax`]'s `f32` path computes it: the largest live score (0 for a row with none,
/// or whose live scores are all `−∞`), `exp_f32` of each difference, lane sums over the
/// vectors in order added in a tree, one reciprocal.
#[inline]
#[target_feature(enable = "avx512f")]
fn softmax_rows<const R: usize, const C: usize>(
    x: &mut [[std::arch::x86_64::__m512; C]; R],
    live: &[[u16; C]; R],
) {
    use std::arch::x86_64::*;
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut top = [ninf; R];
    for r in 0..R {
        for c in 0..C {
            // max(x, top) keeps top where x is NaN, as the softmax's maximum ignores NaN.
            top[r] = _mm512_mask_max_ps(top[r], live[r][c], x[r][c], top[r]);
        }
    }
    let mut m = [0.0f32; R];
    for r in 0..R {
        m[r] = _mm512_reduce_max_ps(top[r]);
    }
    let mut sum = [_mm512_setzero_ps(); R];
    for r in 0..R {
        let mr = _mm512_set1_ps(m[r]);
        for c in 0..C {
            let e = exp16(_mm512_sub_ps(x[r][c], mr));
            x[r][c] = _mm512_maskz_mov_ps(live[r][c], e);
            sum[r] = _mm512_add_ps(sum[r], x[r][c]);
        }
    }
    for r in 0..R {
        if m[r] == f32::NEG_INFINITY {
            x[r] = [_mm512_setzero_ps(); C];
            continue;
        }
        let inv = _mm512_set1_ps(1.0 / lane_tree_sum(sum[r]));
        for x in x[r].iter_mut() {
            *x = _mm512_mul_ps(*x, inv);
        }
    }
}

/// The 16 lanes added in the tree of `simd::reduce`: lane i with lane i + 8, then i + 4, i + 2,
/// i + 1.
#[inline]
#[target_feature(enable = "avx512f")]
fn lane_tree_sum(v: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
    _mm_cvtss_f32(s1)
}

/// [`super::simd::exp_f32`] on 16 lanes, operation for operation (so the same bits).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use super::simd::exp_consts::*;
    use std::arch::x86_64::*;
    let set = _mm512_set1_ps;
    // max(x, LOW) gives LOW for NaN, as f32::max does.
    let xc = _mm512_min_ps(_mm512_max_ps(x, set(LOW)), set(CLAMP));
    let t = _mm512_add_ps(_mm512_mul_ps(xc, set(std::f32::consts::LOG2_E)), set(ROUND));
    let n = _mm512_sub_ps(t, set(ROUND));
    let n_int = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(ROUND.to_bits() as i32));
    let r = _mm512_sub_ps(
        _mm512_sub_ps(xc, _mm512_mul_ps(n, set(C1))),
        _mm512_mul_ps(n, set(C2)),
    );
    let mut p = set(POLY[0]);
    for &c in &POLY[1..] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), set(c));
    }
    let e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), set(1.0));
    let n126 = _mm512_add_epi32(n_int, _mm512_set1_epi32(126));
    let half = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(n126));
    let v = _mm512_mul_ps(_mm512_mul_ps(e, half), set(2.0));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, set(HIGH));
    let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(LOW));
    let v = _mm512_mask_mov_ps(v, nan, x);
    let v = _mm512_mask_mov_ps(v, big, set(f32::INFINITY));
    _mm512_mask_mov_ps(v, small, _mm512_setzero_ps())
}

/// Outputs of query rows `i..i + R`: `o[r][e] = Σ_j (p[r][j]·m[r][j])·v[j][e]` for `e < dv`
/// (`m` the dropout mask, if any), each a chain of fused multiply-adds over the keys in order
/// (as the GEMM's), `C` vectors a row in registers, V read where it is.
///
/// # Safety
/// AVX-512F; rows `i..i + R` inside `p` and the mask (`kb` columns) and `o` (`dv` columns);
/// V's rows of `dv` contiguous floats.
#[target_feature(enable = "avx512f")]
unsafe fn outputs<const R: usize, const C: usize>(
    head: &SmallHead,
    i: usize,
    p: Strided,
    drop: Option<Strided>,
    o: (*mut f32, isize, isize),
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    for j in 0..head.kb {
        // SAFETY: row j < kb of V (the caller).
        let vrow = unsafe { head.v.row(j) };
        let mut vv = [_mm512_setzero_ps(); C];
        for (c, vv) in vv.iter_mut().enumerate() {
            let n = lanes(head.dv.saturating_sub(c * W));
            // SAFETY: the lanes loaded are features below dv of row j (the caller).
            *vv = unsafe { _mm512_maskz_loadu_ps(n, vrow.add(c * W)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row i + r and column j < kb are inside p and the mask (the caller).
            let w = unsafe {
                match drop {
                    Some(m) => p.at(i + r, j) * m.at(i + r, j),
                    None => p.at(i + r, j),
                }
            };
            let a = _mm512_set1_ps(w);
            for (acc, &vv) in acc.iter_mut().zip(&vv) {
                *acc = _mm512_fmadd_ps(a, vv, *acc);
            }
        }
    }
    let (optr, ors, ocs) = o;
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row i + r of o (the caller).
        let row = unsafe { optr.offset((i + r) as isize * ors) };
        for (c, &acc) in acc.iter().enumerate() {
            let n = head.dv.saturating_sub(c * W).min(W);
            // SAFETY: columns below dv of row i + r of o (the caller).
            unsafe {
                if ocs == 1 {
                    _mm512_mask_storeu_ps(row.add(c * W), lanes(n), acc);
                } else {
                    let mut v = [0.0f32; W];
                    _mm512_storeu_ps(v.as_mut_ptr(), acc);
                    for (e, &x) in v[..n].iter().enumerate() {
                        *row.offset((c * W + e) as isize * ocs) = x;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::gemm;
    use crate::kernels::softmax::{RowMask, softmax_row};
    use ndarray::{Array2, s};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(rng: &mut StdRng, shape: (usize, usize)) -> Array2<f32> {
        Array2::from_shape_fn(shape, |_| rng.random_range(-2.0..2.0))
    }

    /// The general path: two GEMM calls and a softmax per row.
    fn general(
        q: &Array2<f32>,
        k: &Array2<f32>,
        v: &Array2<f32>,
        scale: f32,
        mask: impl Fn(usize) -> RowMask<'static>,
        drop: Option<&Array2<f32>>,
        tk: usize,
    ) -> (Array2<f32>, Array2<f32>) {
        let (tq, kb, dv) = (q.nrows(), k.nrows(), v.ncols());
        let mut probs = Array2::zeros((tq, tk));
        gemm(scale, q.view(), k.t(), 0.0, probs.slice_mut(s![.., ..kb]));
        for (i, mut row) in probs.rows_mut().into_iter().enumerate() {
            softmax_row(row.as_slice_mut().unwrap(), mask(i));
        }
        let mut out = Array2::from_elem((tq, dv), f32::NAN);
        let p = match drop {
            Some(m) => &probs.slice(s![.., ..kb]) * m,
            None => probs.slice(s![.., ..kb]).to_owned(),
        };
        gemm(1.0, p.view(), v.view(), 0.0, out.view_mut());
        (probs, out)
    }

    #[test]
    fn heads_equal_the_general_path_bit_for_bit() {
        if crate::kernels::gemm::Isa::best() != Some(crate::kernels::gemm::Isa::Avx512) {
            eprintln!("skipped: this CPU has no AVX-512F, the only path of small_head");
            return;
        }
        let mut rng = StdRng::seed_from_u64(3);
        static KEYS: [bool; 64] = {
            let mut k = [true; 64];
            let mut j = 1;
            while j < 64 {
                k[j] = false;
                j += 3;
            }
            k
        };
        let mut taken = 0;
        for &(tq, kb, dk, dv) in &[
            (9, 1, 8, 5),
            (16, 16, 16, 16),
            (13, 17, 31, 20),
            (33, 33, 32, 32),
            (32, 64, 64, 64),
            (40, 50, 128, 48),
        ] {
            let tk = kb + 3;
            let q = random(&mut rng, (tq, dk));
            let mut k = random(&mut rng, (kb, dk));
            k[[0, 0]] = 40.0; // a large score
            let v = random(&mut rng, (kb, dv));
            let drop = Array2::from_shape_fn((tq, kb), |(i, j)| ((i * 7 + j) % 3) as f32 * 1.25);
            let scale = 1.0 / (dk as f32).sqrt();
            for (causal, flags, dropped) in [
                (false, false, false),
                (true, false, false),
                (true, false, true),
                (false, true, false),
            ] {
                let limit = |i: usize| if causal { (i + 1).min(kb) } else { kb };
                let mask = |i: usize| RowMask {
                    limit: limit(i),
                    keys: flags.then_some(&KEYS[..tk.min(64)]),
                    pairs: None,
                };
                let drop = dropped.then_some(&drop);
                let (want_p, want_o) = general(&q, &k, &v, scale, mask, drop, tk);
                let mut probs = Array2::from_elem((tq, tk), f32::NAN);
                // Output columns strided, as a head's columns inside [B, T, H·d_v] are not.
                let mut wide = Array2::from_elem((tq, 2 * dv), f32::NAN);
                let mut out = wide.slice_mut(s![.., ..;2]);
                let head = SmallHead::new(q.view(), k.view(), v.view(), &probs.view_mut(), &out)
                    .expect("a head this path takes");
                let drop_view = drop.map(|m| m.view());
                let mut p = probs.view_mut();
                // SAFETY: f32, and the views given to new.
                unsafe {
                    if flags {
                        let rows = |i, row: &mut [f32]| softmax_row(row, mask(i));
                        head.run(
                            scale,
                            RowSoftmax::<fn(usize) -> usize, _>::Rows(rows),
                            drop_view,
                            &mut p,
                            &mut out,
                        );
                    } else {
                        let none = RowSoftmax::<_, fn(usize, &mut [f32])>::Limit(limit);
                        head.run(scale, none, drop_view, &mut p, &mut out);
                    }
                }
                taken += 1;
                let same = |a: &Array2<f32>, b: ndarray::ArrayView2<f32>| {
                    a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                let case =
                    format!("tq {tq} kb {kb} dk {dk} dv {dv} causal {causal} flags {flags} drop {dropped}");
                assert!(same(&want_p, probs.view()), "probabilities differ: {case}");
                assert!(same(&want_o, out.view()), "outputs differ: {case}");
                assert!(
                    wide.slice(s![.., 1..;2]).iter().all(|x| x.is_nan()),
                    "wrote between columns: {case}"
                );
            }
        }
        assert_eq!(taken, 24);
    }

    #[test]
    fn exp16_is_exp_f32_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            88.7,
            88.72,
            88.73,
            -86.5,
            -86.49,
            -86.51,
            -87.0,
            100.0,
            -100.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            -1e-30,
        ];
        let mut rng = StdRng::seed_from_u64(5);
        xs.extend((0..4096).map(|_| rng.random_range(-90.0f32..90.0)));
        xs.resize(xs.len().next_multiple_of(W), 0.5);
        for chunk in xs.chunks_exact(W) {
            let mut got = [0.0f32; W];
            // SAFETY: AVX-512F checked above; 16 floats each side.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(chunk.as_ptr())));
            }
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = crate::kernels::simd::exp_f32(x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "exp16({x}) = {g}, exp_f32 = {want}"
                );
            }
        }
    }
}
