//! The AVX2 path of a decoding step's attention ([`super::step_head`], [`super::step_row`]):
//! a head's scores and its output in 8-lane registers, up to [`MAX_KEYS`] keys and value
//! features, for CPUs without AVX-512 (whose own path, in `avx512`, comes first where it
//! runs). Each of a head's sums is a chain of dependent fused multiply-adds (a score over the
//! `d_k` features, an output feature over the positions); in slices each link went through a
//! store and a load of the partial sum, and one head alone leaves the core waiting on each
//! link. Here the sums stay in registers and the heads run side by side, four, two or one at a
//! time so that their sums fill at most twelve of the sixteen registers. The arithmetic is
//! [`super::step_head_slices`]'s, term for term, and the softmax the same function's (for a
//! plain limit, [`softmax_rows`] of a group's rows side by side, the same bits), so the bits
//! are the same (tested). The module builds on x86-64 only; the path checks at run time
//! that the kernels may use AVX2 and FMA.

use std::arch::x86_64::*;

use super::avx512::{Strided, transpose};
use super::{Cached, StepCache, StepHead, StepRow, as_f32, ask_ahead};
use crate::kernels::Float;
use crate::kernels::simd::avx2::{exp_vecs_at_most_zero, fold_add, fold_max};
use crate::kernels::softmax::RowMask;
use crate::kernels::workspace::with_thread_scratch;

/// Keys, and value features, of a head whose step runs in registers, at most.
const MAX_KEYS: usize = 64;
/// Lanes of a vector.
const W: usize = 8;
/// Vectors of sums a group of heads keeps in registers, at most: the other four of the
/// sixteen hold the broadcast factor and the loaded operands.
const SUMS: usize = 12;

/// [`super::step_head`] in registers, where [`in_registers`] takes it: `false` (and nothing
/// written) where it does not.
///
/// # Safety
/// As [`super::step_head`].
pub(super) unsafe fn try_step_head<F: Float, S: Cached<F>>(
    h: &StepHead<'_, F, S>,
    scores: &mut [F],
    out: &mut [F],
) -> bool {
    let cache = in_registers::<F, S>(h.kb, out.len());
    // SAFETY: as `in_registers_as!` asks; the caller vouches for the keys and values.
    unsafe { in_registers_as!(cache, StepHead, h, scores, out, step_head_avx2) }
}

/// [`super::step_row`] in registers (`dv` value features a head), where [`in_registers`]
/// takes it: `false` (and nothing written) where not.
///
/// # Safety
/// As [`super::step_row`].
pub(super) unsafe fn try_step_row<F: Float, S: Cached<F>>(
    r: &StepRow<'_, F, S>,
    dv: usize,
    scores: &mut [F],
    out: &mut [F],
) -> bool {
    let cache = in_registers::<F, S>(r.kb, dv);
    // SAFETY: as `in_registers_as!` asks; the caller vouches for the heads.
    unsafe { in_registers_as!(cache, StepRow, r, scores, out, step_row_avx2) }
}

/// Whether a decoding step of `kb` keys and `dv` value features per head runs here (`f32`,
/// AVX2 and FMA, at most [`MAX_KEYS`] of each), and over which cache; `None` for the slices.
fn in_registers<F: 'static, S: 'static>(kb: usize, dv: usize) -> Option<StepCache> {
    super::step_cache::<F, S>(kb <= MAX_KEYS && dv <= MAX_KEYS && crate::kernels::cpu::avx2())
}

/// The heads a group is taken from: one head, or the heads of a row.
enum HeadsOf<'h, 'a, S> {
    One(&'h StepHead<'a, f32, S>),
    Row(&'h StepRow<'a, f32, S>),
}

impl<S> HeadsOf<'_, '_, S> {
    /// Head `hi`'s query, keys and values: `(q, scale, kt, kt_rs, v, v_rs)`.
    #[allow(clippy::type_complexity)]
    #[inline]
    fn head(&self, hi: usize) -> (&[f32], f32, *const S, isize, *const S, isize) {
        match self {
            HeadsOf::One(h) => (h.q, h.scale, h.kt, h.kt_rs, h.v, h.v_rs),
            HeadsOf::Row(r) => {
                let dk = r.q.len() / r.heads;
                (
                    &r.q[hi * dk..][..dk],
                    r.scale,
                    r.kt_of(hi),
                    r.kt_rs,
                    r.v_of(hi),
                    r.v_rs,
                )
            }
        }
    }

    /// Elements to the keys and values of the rows stepped next ([`StepRow::next`]).
    fn next(&self) -> Option<(isize, isize)> {
        match self {
            HeadsOf::One(_) => None,
            HeadsOf::Row(r) => r.next,
        }
    }

    /// The keys taking part and the mask of the query's row, in every head.
    fn keys(&self) -> (usize, RowMask<'_>) {
        match self {
            HeadsOf::One(h) => (h.kb, h.mask),
            HeadsOf::Row(r) => (r.kb, r.mask),
        }
    }
}

/// [`super::step_head`] with AVX2: a group of one head.
///
/// # Safety
/// As [`super::step_head`]; the CPU has AVX2 and FMA; `kb` and `d_v` are at most [`MAX_KEYS`].
unsafe fn step_head_avx2<S: Lanes>(h: &StepHead<'_, f32, S>, _scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: forwarded from this function's contract.
    unsafe { group::<S, 1>(&HeadsOf::One(h), 0, out) }
}

/// [`super::step_row`] with AVX2: the heads in groups of four, two or one, as many as keep
/// their sums in at most [`SUMS`] vectors.
///
/// # Safety
/// As [`super::step_row`]; the CPU has AVX2 and FMA; `kb` and `d_v` are at most [`MAX_KEYS`].
unsafe fn step_row_avx2<S: Lanes>(r: &StepRow<'_, f32, S>, _scores: &mut [f32], out: &mut [f32]) {
    let dv = out.len() / r.heads;
    let widest = r.kb.div_ceil(W).max(dv.div_ceil(W)).max(1);
    let heads = HeadsOf::Row(r);
    let mut hi = 0;
    while hi < r.heads {
        let left = r.heads - hi;
        // SAFETY (each): heads hi.. of the row (caller), the group inside them.
        unsafe {
            if left >= 4 && 4 * widest <= SUMS {
                group::<S, 4>(&heads, hi, &mut out[hi * dv..][..4 * dv]);
                hi += 4;
            } else if left >= 2 && 2 * widest <= SUMS {
                group::<S, 2>(&heads, hi, &mut out[hi * dv..][..2 * dv]);
                hi += 2;
            } else {
                group::<S, 1>(&heads, hi, &mut out[hi * dv..][..dv]);
                hi += 1;
            }
        }
    }
}

/// Picks the const generic `N` from the count `$n` (1 to 8 vectors) and runs `$f::<S, G, N>`.
macro_rules! by_vectors {
    ($n:expr, $f:ident, $($arg:expr),*) => {
        match $n {
            1 => $f::<S, G, 1>($($arg),*),
            2 => $f::<S, G, 2>($($arg),*),
            3 => $f::<S, G, 3>($($arg),*),
            4 => $f::<S, G, 4>($($arg),*),
            5 => $f::<S, G, 5>($($arg),*),
            6 => $f::<S, G, 6>($($arg),*),
            7 => $f::<S, G, 7>($($arg),*),
            _ => $f::<S, G, 8>($($arg),*),
        }
    };
}

/// Heads `first..first + G` side by side into `out` (`G · d_v` floats): their scores, each
/// head's softmax, then their outputs, over as many vectors as the keys, resp. the value
/// features, fill.
///
/// # Safety
/// As [`step_row_avx2`], for heads `first..first + G` of `heads`.
#[target_feature(enable = "avx2,fma")]
unsafe fn group<S: Lanes, const G: usize>(heads: &HeadsOf<'_, '_, S>, first: usize, out: &mut [f32]) {
    let mut probs = [[0.0f32; MAX_KEYS]; G];
    let (kb, mask) = heads.keys();
    let dv = out.len() / G;
    // SAFETY (both): forwarded from this function's contract; each vector count is the one
    // that kb, resp. d_v, fills (at most 8, as both are at most MAX_KEYS).
    if kb > 0 {
        unsafe { by_vectors!(kb.div_ceil(W), scores, heads, first, &mut probs) };
        if mask.keys.is_none() && mask.pairs.is_none() {
            // The G rows' softmaxes side by side: one row's is a chain of dependent steps
            // (the maximum's fold, the exponentials, the sum's fold, the reciprocal), and the
            // heads' had run one after the other.
            let (rows, live) = (probs.each_mut().map(|p| p.as_mut_ptr()), [mask.limit.min(kb); G]);
            // SAFETY: AVX2 and FMA (caller); each row holds MAX_KEYS ≥ kb floats, the live
            // ones within kb ≤ MAX_KEYS.
            unsafe { softmax_rows_within(rows, live, kb, kb) };
        } else {
            for p in &mut probs {
                crate::kernels::softmax::softmax_row_inline(&mut p[..kb], mask);
            }
        }
    }
    match dv.div_ceil(W) {
        0 => {}
        n => unsafe { by_vectors!(n, values, heads, first, &probs, out) },
    }
}

/// The scores of heads `first..first + G` over their `kb ≤ 8·NK` keys, into `probs`: each a
/// chain of fused multiply-adds over the features in order from `q_d·scale`, the `G` heads'
/// chains interleaved.
///
/// Only the last of a row's `NK` vectors can be part of one, and its mask is taken once, out
/// of the loop: where each load chose between a whole and a masked one, the compiler had kept
/// a group's sums partly on the stack (a chain through memory at every feature).
///
/// # Safety
/// As [`group`]; `kb` fills `NK` vectors.
#[target_feature(enable = "avx2,fma")]
unsafe fn scores<S: Lanes, const G: usize, const NK: usize>(
    heads: &HeadsOf<'_, '_, S>,
    first: usize,
    probs: &mut [[f32; MAX_KEYS]; G],
) {
    let (kb, _) = heads.keys();
    let each: [_; G] = std::array::from_fn(|g| heads.head(first + g));
    let dk = each[0].0.len();
    // SAFETY: AVX2 (caller).
    let tail = unsafe { Tail::of(kb - (NK - 1) * W) };
    let next = heads.next().map(|(kt, _)| kt);
    let mut acc = [[_mm256_setzero_ps(); NK]; G];
    for d in 0..dk {
        for (g, acc) in acc.iter_mut().enumerate() {
            let (q, scale, kt, kt_rs, ..) = each[g];
            let qd = _mm256_set1_ps(q[d] * scale);
            let row = kt.wrapping_offset(d as isize * kt_rs);
            // SAFETY: the head's row d of keys holds kb elements (caller), which fill NK
            // vectors, the last `tail`.
            unsafe { add_times(acc, qd, row, tail) };
            if let Some(next) = next {
                ask_ahead(row, NK * W, next);
            }
        }
    }
    for (p, acc) in probs.iter_mut().zip(&acc) {
        for (c, &x) in acc.iter().enumerate() {
            // SAFETY: NK ≤ 8 vectors fit a row of MAX_KEYS floats.
            unsafe { _mm256_storeu_ps(p.as_mut_ptr().add(c * W), x) };
        }
    }
}

/// The outputs of heads `first..first + G` (`d_v ≤ 8·NO` features each, `out` their `G · d_v`
/// floats) from their weights in `probs`: each feature a chain of fused multiply-adds over
/// the allowed positions in order, the `G` heads' chains interleaved. As in [`scores`], the
/// last vector's mask is taken once; a row whose every position up to its limit is allowed
/// runs a loop without the test.
///
/// # Safety
/// As [`group`]; `d_v` fills `NO` vectors.
#[target_feature(enable = "avx2,fma")]
unsafe fn values<S: Lanes, const G: usize, const NO: usize>(
    heads: &HeadsOf<'_, '_, S>,
    first: usize,
    probs: &[[f32; MAX_KEYS]; G],
    out: &mut [f32],
) {
    let (kb, mask) = heads.keys();
    let dv = out.len() / G;
    let each: [_; G] = std::array::from_fn(|g| heads.head(first + g));
    // SAFETY: AVX2 (caller).
    let tail = unsafe { Tail::of(dv - (NO - 1) * W) };
    let next = heads.next().map(|(_, v)| v);
    let mut acc = [[_mm256_setzero_ps(); NO]; G];
    // Position j's terms, each head's weight times its value row.
    let mut add = |j: usize| {
        for (g, acc) in acc.iter_mut().enumerate() {
            let (.., v, v_rs) = each[g];
            let p = _mm256_set1_ps(probs[g][j]);
            let row = v.wrapping_offset(j as isize * v_rs);
            // SAFETY: the head's value row j holds d_v elements (caller), which fill NO
            // vectors, the last `tail`.
            unsafe { add_times(acc, p, row, tail) };
            if let Some(next) = next {
                ask_ahead(row, NO * W, next);
            }
        }
    };
    let limit = mask.limit.min(kb);
    if mask.keys.is_none() && mask.pairs.is_none() {
        (0..limit).for_each(&mut add);
    } else {
        (0..limit).filter(|&j| mask.allows(j)).for_each(&mut add);
    }
    for (o, acc) in out.chunks_exact_mut(dv).zip(&acc) {
        for (c, &x) in acc.iter().enumerate() {
            let o = &mut o[c * W..];
            // SAFETY: AVX2 (caller); the head's output from feature c·8 on, at most 8 floats
            // written.
            unsafe { store_lanes(o.as_mut_ptr(), x, o.len()) };
        }
    }
}

/// `acc[c] += x · row[c]` for each of a row's `N` vectors, each sum one fused multiply-add:
/// the vectors before the last read whole, the last as `tail` says.
///
/// # Safety
/// The CPU has AVX2 and FMA; the row's `8·(N − 1) + tail.n` elements are readable at `row`.
#[inline(always)]
unsafe fn add_times<S: Lanes, const N: usize>(acc: &mut [__m256; N], x: __m256, row: *const S, tail: Tail) {
    for (c, acc) in acc.iter_mut().enumerate() {
        // SAFETY: AVX2 and FMA, and vector c of the row (caller).
        unsafe {
            let y = if c + 1 < N {
                S::whole(row.add(c * W))
            } else {
                S::part(row.add(c * W), tail)
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
    }
}

/// The last vector of a row of `n` elements (1 to 8): how many, and the mask of their lanes.
#[derive(Clone, Copy)]
struct Tail {
    n: usize,
    mask: __m256i,
}

impl Tail {
    /// # Safety
    /// The CPU has AVX2.
    #[inline(always)]
    unsafe fn of(n: usize) -> Tail {
        // SAFETY: AVX2 (caller); no memory is read.
        let mask = unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        };
        Tail { n, mask }
    }
}

/// The first `n` lanes of `v` (all eight where `n ≥ 8`) stored at `to`; a row's last, partial
/// vector through a local array, as a masked store is slow on AMD's cores.
///
/// # Safety
/// The CPU has AVX; `min(n, 8)` floats are writable at `to`.
#[inline(always)]
unsafe fn store_lanes(to: *mut f32, v: __m256, n: usize) {
    // SAFETY: the caller's contract; the array holds 8 floats.
    unsafe {
        if n >= W {
            _mm256_storeu_ps(to, v);
        } else {
            let mut lanes = [0.0f32; W];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), to, n);
        }
    }
}

/// Lane 0 of `v` in every lane.
///
/// # Safety
/// The CPU has AVX.
#[inline(always)]
unsafe fn splat_first(v: __m256) -> __m256 {
    // SAFETY: AVX (caller); no memory is touched.
    unsafe { _mm256_permute2f128_ps::<0>(_mm256_permute_ps::<0>(v), _mm256_permute_ps::<0>(v)) }
}

/// Eight cached elements as `f32` lanes: the first `n` read (all eight where `n ≥ 8`), the
/// others zero and not read.
trait Lanes: Copy {
    /// # Safety
    /// The CPU has AVX2; `min(n, 8) ≥ 1` elements are readable at `p`.
    unsafe fn lanes(p: *const Self, n: usize) -> __m256;

    /// Eight elements.
    ///
    /// # Safety
    /// The CPU has AVX2; eight elements are readable at `p`.
    #[inline(always)]
    unsafe fn whole(p: *const Self) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { Self::lanes(p, W) }
    }

    /// The `tail.n` elements of a row's last vector.
    ///
    /// # Safety
    /// The CPU has AVX2; `tail.n ≥ 1` elements are readable at `p`.
    #[inline(always)]
    unsafe fn part(p: *const Self, tail: Tail) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { Self::lanes(p, tail.n) }
    }
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn lanes(p: *const f32, n: usize) -> __m256 {
        // SAFETY: the caller's contract; a masked load reads only the lanes of its mask
        // (a fast instruction on every AVX2 CPU, where a masked store is not).
        unsafe {
            if n >= W {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, Tail::of(n).mask)
            }
        }
    }

    #[inline(always)]
    unsafe fn part(p: *const f32, tail: Tail) -> __m256 {
        // SAFETY: the caller's contract; the mask's lanes are the first tail.n (all eight
        // where the row fills its last vector).
        unsafe { _mm256_maskload_ps(p, tail.mask) }
    }
}

impl Lanes for u16 {
    #[inline(always)]
    unsafe fn lanes(p: *const u16, n: usize) -> __m256 {
        // SAFETY: the caller's contract; a bf16's bits are the high half of its f32's.
        unsafe {
            let h = if n >= W {
                _mm_loadu_si128(p as *const __m128i)
            } else {
                let mut few = [0u16; W];
                std::ptr::copy_nonoverlapping(p, few.as_mut_ptr(), n);
                _mm_loadu_si128(few.as_ptr() as *const __m128i)
            };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
}

/// Whether the register paths of this module take an `F` product here: `F` is `f32` and the
/// AVX2 kernels are the CPU's best ([`head_forward`], [`head_backward`], [`product`]).
fn runs_here<F: 'static>() -> bool {
    use crate::kernels::cpu::{Level, level};
    std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>() && level() == Level::Avx2
}

/// Whether a matrix of these strides and `cols` columns has contiguous rows.
fn unit_rows(strides: &[isize], cols: usize) -> bool {
    strides[1] == 1 || cols <= 1
}

/// One head's forward pass on the AVX2 path, `probs ← softmax(Q·Kᵀ·scale)`, `out ← (probs ⊙
/// M)·V`, by the attention layer's blocks of queries (`queries`, each with the keys its
/// queries see at most), where the general path made two GEMM calls a block: the products
/// here read Q, Kᵀ (transposed once per head into a scratch buffer, by the 8 × 8 vector
/// transposes of the AVX-512 path's `transpose`, which needs AVX2 only) and V where they are,
/// several rows of the result and 16 of their columns at a time in registers, with no
/// packing and no per-call loops; a block's softmax in registers up to [`MAX_KEYS`] keys, the
/// row softmax past them. Each element is what the GEMM's packed kernel
/// gives it (a chain of fused multiply-adds over the terms in order, scaled after the sum),
/// so a head is taken only where the GEMM would have run those kernels over one block of
/// terms (not the few-row kernels, which sum in another order); `softmax(i, row)` is the
/// general path's row softmax and the dropout's factors its own (`DropRows::apply_to`, row by
/// row into a scratch buffer). The same bits as the general path (tested). `false`, and
/// nothing written, where the head is not taken: `F` not `f32`, a CPU whose best kernels are
/// not the AVX2 ones, rows of Q, K, V, the weights or the output not contiguous, more than
/// [`MAX_KEYS`] value features, or products the GEMM would not give its packed kernels.
///
/// # Panics
/// If `probs` is not `[Tq, ≥ kb]` or `out` not `[Tq, d_v]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_forward<F: Float>(
    q: ndarray::ArrayView2<F>,
    k: ndarray::ArrayView2<F>,
    v: ndarray::ArrayView2<F>,
    scale: F,
    queries: impl Iterator<Item = (std::ops::Range<usize>, usize)> + Clone,
    softmax: super::RowSoftmax<impl Fn(usize) -> usize, impl FnMut(usize, &mut [F])>,
    dropped: Option<crate::kernels::dropout::DropRows>,
    probs: &mut ndarray::ArrayViewMut2<F>,
    out: &mut ndarray::ArrayViewMut2<F>,
) -> bool {
    use ndarray::s;
    let ((tq, dk), (kb, dv)) = (q.dim(), v.dim());
    assert!(
        probs.nrows() == tq && probs.ncols() >= kb && out.dim() == (tq, dv),
        "head_forward: probs {:?}, out {:?} for a head of {tq} queries, {kb} keys",
        probs.shape(),
        out.shape()
    );
    let taken = runs_here::<F>()
        && kb > 0
        && k.dim() == (kb, dk)
        && (1..=MAX_KEYS).contains(&dv)
        && unit_rows(q.strides(), dk)
        && unit_rows(k.strides(), dk)
        && unit_rows(v.strides(), dv)
        && probs.strides()[1] == 1
        && unit_rows(out.strides(), dv)
        && queries.clone().all(|(rows, width)| {
            let n = rows.len();
            width == 0 || n == 0 || (as_gemm(true, n, dk) && in_registers_as_gemm(true, n, width, dv))
        });
    if !taken {
        return false;
    }
    // F is f32 (checked above): the views below are of f32.
    let (q, p, o) = (Strided::of(&q), Strided::of_mut(probs), Strided::of_mut(out));
    let mut softmax = softmax;
    // Kᵀ, and with dropout a block's P ⊙ M (rows kb apart), in this thread's scratch.
    let pm_len = if dropped.is_some() { tq * kb } else { 0 };
    with_thread_scratch(dk * kb + pm_len, |scratch: &mut [f32]| {
        let (kt, pm) = scratch.split_at_mut(dk * kb);
        // SAFETY: K [kb, dk] with contiguous rows (checked above); AVX2 (level).
        unsafe { transpose(Strided::of(&k), kb, dk, kt) };
        for (rows, width) in queries {
            let n = rows.len();
            if width == 0 {
                // Queries that see no key: zero weights, zero output.
                probs.slice_mut(s![rows.clone(), ..]).fill(F::ZERO);
                out.slice_mut(s![rows, ..]).fill(F::ZERO);
                continue;
            }
            let scores = Operands {
                a: q.from(rows.start, 0).ptr,
                lda: q.rs,
                ats: 1,
                b: kt.as_ptr(),
                ldb: kb as isize,
                b_cols: kb,
                terms: dk,
                alpha: scale.to_f64() as f32,
                c: p.from(rows.start, 0).ptr as *mut f32,
                ldc: p.rs,
                cols: width,
            };
            // SAFETY: AVX2 and FMA (level); Q's rows n × dk, Kᵀ dk × kb, and the weights'
            // rows n × ≥ width, all with contiguous rows (checked above).
            unsafe { scores.run(n) };
            match &mut softmax {
                super::RowSoftmax::Limit(limit) if width > MAX_KEYS => {
                    // More keys than a row in registers: the row softmax, as the general path.
                    for i in rows.clone() {
                        let mut row = probs.row_mut(i);
                        let row = row.as_slice_mut().expect("contiguous rows (checked)");
                        let mask = RowMask {
                            limit: limit(i),
                            keys: None,
                            pairs: None,
                        };
                        crate::kernels::softmax::softmax_row(row, mask);
                    }
                }
                super::RowSoftmax::Limit(limit) => {
                    let row = |i: usize| p.from(i, 0).ptr as *mut f32;
                    let (len, ymm) = (probs.ncols(), 2 * width.div_ceil(LANES));
                    let mut i = rows.start;
                    while i < rows.end {
                        // Rows of at most 16 keys eight at a time: four such rows' chains
                        // (two folds, the exponentials, a division) had left the core waiting
                        // on them. Tiny eval forward, AMD EPYC Zen 3, one thread, builds
                        // alternating: 1.843 → 1.814 ms (medians of eight). Rows of 32 keys
                        // eight at a time: the small attention core 2% slower.
                        if ymm == 2 && rows.end - i >= 8 {
                            let at: [usize; 8] = std::array::from_fn(|j| i + j);
                            let live = at.map(|i| limit(i).min(len));
                            // SAFETY: as below.
                            unsafe { softmax_rows::<8, 2>(at.map(row), live, len) };
                            i += 8;
                            continue;
                        }
                        let r = if rows.end - i >= 4 { 4 } else { 1 };
                        let at: [usize; 4] = std::array::from_fn(|j| (i + j).min(rows.end - 1));
                        let live = at.map(|i| limit(i).min(len));
                        // SAFETY: AVX2 and FMA (level); rows of `len ≥ width ≥ live` floats,
                        // contiguous (checked above).
                        unsafe {
                            if r == 4 {
                                softmax_rows_within(at.map(row), live, len, width)
                            } else {
                                softmax_rows_within([row(i)], [live[0]], len, width)
                            }
                        }
                        i += r;
                    }
                }
                super::RowSoftmax::Rows(softmax) => {
                    for i in rows.clone() {
                        let mut row = probs.row_mut(i);
                        softmax(i, row.as_slice_mut().expect("contiguous rows (checked)"));
                    }
                }
            }
            let a = match dropped {
                Some(m) => {
                    for (r, i) in rows.clone().enumerate() {
                        // SAFETY: row i of the weights, at least width contiguous floats
                        // (checked above).
                        let p = unsafe { std::slice::from_raw_parts(p.from(i, 0).ptr, width) };
                        m.apply_to(i, p, &mut pm[r * kb..][..width]);
                    }
                    Strided::dense(pm, kb)
                }
                None => p.from(rows.start, 0),
            };
            let v = Strided::of(&v);
            let values = Operands {
                a: a.ptr,
                lda: a.rs,
                ats: 1,
                b: v.ptr,
                ldb: v.rs,
                b_cols: dv,
                terms: width,
                alpha: 1.0,
                c: o.from(rows.start, 0).ptr as *mut f32,
                ldc: o.rs,
                cols: dv,
            };
            // SAFETY: as above, for the weights (or their product with the dropout's
            // factors) n × width, V's rows width × dv and the output's rows n × dv.
            unsafe { values.run(n) };
        }
    });
    true
}

/// One head's backward pass on the AVX2 path, given `∂L/∂O` (`grad_out`): `∂L/∂V = (P ⊙
/// M)ᵀ·G`, `∂L/∂P = (G·Vᵀ) ⊙ M`, `∂L/∂S` row by row (where each row's mask is a plain
/// limit, `softmax_backward` is `Limit(limit)` and [`softmax_backward_rows`] runs in vector
/// registers; else it is `Rows(f)`, and `f(i, p, ∂L/∂p, ∂L/∂s)` the general path's row
/// backward), `∂L/∂Q = scale·∂L/∂S·K` and `∂L/∂K = scale·(∂L/∂S)ᵀ·Q`, by the forward pass's
/// blocks: of `queries`, each with the keys its queries see at most, and of `keys`, each with
/// the first query that sees one. The general path makes each product a [`product`] call on
/// views it slices block by block, zeroes the whole of `∂L/∂P` and `∂L/∂S` for every head and
/// draws the dropout's mask twice (it had also allocated them and `P ⊙ M` head by head); here
/// they live in a scratch buffer reused from head to head, the mask is drawn once (its factors
/// kept for both of its products), and the products are [`Operands`] over the same rows: the
/// same bits (tested). `few_rows` is the general path's: whether its GEMM is `gemm` (with the
/// few-row kernels) or `gemm_blocks`. `false`, and nothing written, where the general path
/// runs instead: `F` not `f32`, a CPU whose best kernels are not the AVX2 ones, rows not
/// contiguous, or a product [`product`] would not take (but `∂L/∂P`'s, whose columns, one a
/// key, go by parts of 16 however many there are).
///
/// # Panics
/// If `probs` is not `[Tq, kb]`, or `grad_out` or a gradient not of its input's shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_backward<F: Float>(
    few_rows: bool,
    q: ndarray::ArrayView2<F>,
    k: ndarray::ArrayView2<F>,
    v: ndarray::ArrayView2<F>,
    scale: F,
    queries: impl Iterator<Item = (std::ops::Range<usize>, usize)> + Clone,
    keys: impl Iterator<Item = (std::ops::Range<usize>, usize)> + Clone,
    probs: ndarray::ArrayView2<F>,
    dropped: Option<crate::kernels::dropout::DropRows>,
    grad_out: ndarray::ArrayView2<F>,
    mut softmax_backward: super::RowSoftmax<impl Fn(usize) -> usize, impl FnMut(usize, &[F], &[F], &mut [F])>,
    grad_q: &mut ndarray::ArrayViewMut2<F>,
    grad_k: &mut ndarray::ArrayViewMut2<F>,
    grad_v: &mut ndarray::ArrayViewMut2<F>,
) -> bool {
    let ((tq, dk), (kb, dv)) = (q.dim(), v.dim());
    assert!(
        k.dim() == (kb, dk)
            && probs.dim() == (tq, kb)
            && grad_out.dim() == (tq, dv)
            && grad_q.dim() == (tq, dk)
            && grad_k.dim() == (kb, dk)
            && grad_v.dim() == (kb, dv),
        "head_backward: q {:?}, k {:?}, v {:?}, probs {:?}, grad_out {:?}, grads {:?} {:?} {:?}",
        q.shape(),
        k.shape(),
        v.shape(),
        probs.shape(),
        grad_out.shape(),
        grad_q.shape(),
        grad_k.shape(),
        grad_v.shape()
    );
    let fits = |m: usize, terms: usize, n: usize| m == 0 || in_registers_as_gemm(few_rows, m, terms, n);
    let taken = runs_here::<F>()
        && tq * kb * dk * dv > 0
        && unit_rows(q.strides(), dk)
        && unit_rows(k.strides(), dk)
        && unit_rows(v.strides(), dv)
        && unit_rows(probs.strides(), kb)
        && unit_rows(grad_out.strides(), dv)
        && unit_rows(grad_q.strides(), dk)
        && unit_rows(grad_k.strides(), dk)
        && unit_rows(grad_v.strides(), dv)
        && queries.clone().all(|(rows, width)| {
            // ∂L/∂P's columns, one a key, by parts of 16 as the forward's scores.
            let grad_p = rows.is_empty() || as_gemm(few_rows, rows.len(), dv);
            width == 0 || (grad_p && fits(rows.len(), width, dk))
        })
        && keys.clone().all(|(keys, first)| {
            first >= tq || (fits(keys.len(), tq - first, dv) && fits(keys.len(), tq - first, dk))
        });
    if !taken {
        return false;
    }
    // F is f32 (checked above): the views below are of f32.
    let (q, k, p, g) = (
        Strided::of(&q),
        Strided::of(&k),
        Strided::of(&probs),
        Strided::of(&grad_out),
    );
    let (gq, gk, gv) = (
        Strided::of_mut(grad_q),
        Strided::of_mut(grad_k),
        Strided::of_mut(grad_v),
    );
    // Rows `rows` of `x` (`cols` floats each) zero.
    let zero = |x: Strided, rows: std::ops::Range<usize>, cols: usize| {
        for r in rows {
            // SAFETY: row r of a gradient of `cols` contiguous floats (checked above).
            unsafe { std::slice::from_raw_parts_mut(x.from(r, 0).ptr as *mut f32, cols) }.fill(0.0);
        }
    };
    // Row i of P, its kb floats.
    // SAFETY: probs is [tq, kb] with contiguous rows (checked above).
    let p_row = |i: usize| unsafe { std::slice::from_raw_parts(p.from(i, 0).ptr, kb) };
    // Vᵀ, ∂L/∂P, ∂L/∂S, and with dropout the mask's factors and P ⊙ M, in this thread's
    // scratch.
    let parts = if dropped.is_some() { 5 } else { 3 };
    with_thread_scratch(parts * tq * kb + dv * kb, |scratch: &mut [f32]| {
        let (vt, rest) = scratch.split_at_mut(dv * kb);
        let (gp, rest) = rest.split_at_mut(tq * kb);
        let (gs, rest) = rest.split_at_mut(tq * kb);
        let (factors, pm) = rest.split_at_mut(tq * kb);
        // P ⊙ M and M's factors, the mask drawn once: a factor times 1 is the factor, and
        // `x · factor` the product the mask's own pass makes.
        let left = match dropped {
            Some(m) => {
                for (i, (f, pm)) in factors
                    .chunks_exact_mut(kb)
                    .zip(pm.chunks_exact_mut(kb))
                    .enumerate()
                {
                    f.fill(1.0);
                    m.apply(i, f);
                    for ((pm, &p), &f) in pm.iter_mut().zip(p_row(i)).zip(&*f) {
                        *pm = p * f;
                    }
                }
                Strided::dense(pm, kb)
            }
            None => p,
        };
        // SAFETY (every `run` below): AVX2 and FMA (level); each operand is inside the head's
        // arrays or the scratch, with the rows and strides given, and 1 ≤ cols ≤ MAX_KEYS
        // (checked above through `in_registers_as_gemm`).
        // ∂L/∂V = (P ⊙ M)ᵀ·G, over the queries from the first that sees each block of keys.
        for (keys, first) in keys.clone() {
            if first >= tq {
                zero(gv, keys, dv);
                continue;
            }
            let a = left.from(first, keys.start);
            let product = Operands {
                a: a.ptr,
                lda: 1,
                ats: a.rs,
                b: g.from(first, 0).ptr,
                ldb: g.rs,
                b_cols: dv,
                terms: tq - first,
                alpha: 1.0,
                c: gv.from(keys.start, 0).ptr as *mut f32,
                ldc: gv.rs,
                cols: dv,
            };
            unsafe { product.run(keys.len()) };
        }
        // ∂L/∂P = (G·Vᵀ) ⊙ M below each block's width, zero past it.
        // SAFETY: V is [kb, dv] with contiguous rows (checked above); AVX2 (level).
        unsafe { transpose(Strided::of(&v), kb, dv, vt) };
        for (rows, width) in queries.clone() {
            if width > 0 {
                let product = Operands {
                    a: g.from(rows.start, 0).ptr,
                    lda: g.rs,
                    ats: 1,
                    b: vt.as_ptr(),
                    ldb: kb as isize,
                    b_cols: kb,
                    terms: dv,
                    alpha: 1.0,
                    c: gp[rows.start * kb..].as_mut_ptr(),
                    ldc: kb as isize,
                    cols: width,
                };
                unsafe { product.run(rows.len()) };
            }
            for i in rows.clone() {
                let row = &mut gp[i * kb..][..kb];
                row[width..].fill(0.0);
                if dropped.is_some() {
                    for (x, &f) in row[..width].iter_mut().zip(&factors[i * kb..][..width]) {
                        *x *= f;
                    }
                }
            }
            match &mut softmax_backward {
                super::RowSoftmax::Limit(limit) => {
                    let at = rows.start * kb;
                    // SAFETY: AVX2 and FMA (level); rows of P (checked above), ∂L/∂P and
                    // ∂L/∂S (the scratch's) of kb floats each, apart.
                    unsafe {
                        softmax_backward_rows(
                            (p.from(rows.start, 0).ptr, p.rs),
                            gp[at..].as_ptr(),
                            gs[at..].as_mut_ptr(),
                            kb,
                            rows.len(),
                            |r| limit(rows.start + r).min(kb),
                        )
                    }
                }
                super::RowSoftmax::Rows(softmax_backward) => {
                    for i in rows {
                        // SAFETY: F is f32 (checked above): the same floats.
                        let (p, gp, gs) = unsafe {
                            (
                                std::slice::from_raw_parts(p_row(i).as_ptr() as *const F, kb),
                                std::slice::from_raw_parts(gp[i * kb..].as_ptr() as *const F, kb),
                                std::slice::from_raw_parts_mut(gs[i * kb..].as_mut_ptr() as *mut F, kb),
                            )
                        };
                        softmax_backward(i, p, gp, gs);
                    }
                }
            }
        }
        let gs = Strided::dense(gs, kb);
        // ∂L/∂Q = scale·∂L/∂S·K, the keys below each block's width.
        for (rows, width) in queries {
            if width == 0 {
                zero(gq, rows, dk);
                continue;
            }
            let product = Operands {
                a: gs.from(rows.start, 0).ptr,
                lda: kb as isize,
                ats: 1,
                b: k.ptr,
                ldb: k.rs,
                b_cols: dk,
                terms: width,
                alpha: scale.to_f64() as f32,
                c: gq.from(rows.start, 0).ptr as *mut f32,
                ldc: gq.rs,
                cols: dk,
            };
            unsafe { product.run(rows.len()) };
        }
        // ∂L/∂K = scale·(∂L/∂S)ᵀ·Q, over the queries from the first that sees each block.
        for (keys, first) in keys {
            if first >= tq {
                zero(gk, keys, dk);
                continue;
            }
            let product = Operands {
                a: gs.from(first, keys.start).ptr,
                lda: 1,
                ats: kb as isize,
                b: q.from(first, 0).ptr,
                ldb: q.rs,
                b_cols: dk,
                terms: tq - first,
                alpha: scale.to_f64() as f32,
                c: gk.from(keys.start, 0).ptr as *mut f32,
                ldc: gk.rs,
                cols: dk,
            };
            unsafe { product.run(keys.len()) };
        }
    });
    true
}

std::thread_local! {
    /// [`product`]'s right factor with its rows made contiguous, reused from call to call (its
    /// own: the general attention path calls it inside its `with_thread_scratch`).
    static RIGHT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out ← alpha·left·right` as a register product of [`Operands`], where the GEMM
/// ([`crate::kernels::gemm`], or its `gemm_blocks` if `few_rows` is false) would have given it
/// to its packed kernels in one block of terms: the same bits, each element a chain of fused
/// multiply-adds over the terms in order, times `alpha` after the sum. A head's backward pass
/// on the AVX2 path makes its products here (`∂L/∂V = P'ᵀ·G`, `∂L/∂P = G·Vᵀ`, `∂L/∂Q`,
/// `∂L/∂K = ∂L/∂Sᵀ·Q`): products of a few dozen rows and columns, where a GEMM call's packing
/// and loops cost about as much as its multiply-adds. The left factor is read where it lies,
/// by any strides (a transposed one too); the right one where its rows are contiguous, else
/// transposed once into a scratch buffer. `false`, and nothing written, where it is not taken:
/// `F` not `f32`, a CPU whose best kernels are not the AVX2 ones, more than [`MAX_KEYS`]
/// columns, `out`'s or the right factor's elements contiguous along neither axis, or a
/// product the GEMM would not give its packed kernels in one block.
///
/// # Panics
/// If the shapes do not chain.
pub(crate) fn product<F: Float>(
    few_rows: bool,
    alpha: F,
    left: ndarray::ArrayView2<F>,
    right: ndarray::ArrayView2<F>,
    out: &mut ndarray::ArrayViewMut2<F>,
) -> bool {
    let ((m, terms), n) = (left.dim(), right.ncols());
    assert!(
        right.nrows() == terms && out.dim() == (m, n),
        "product: left {:?}, right {:?}, out {:?}",
        left.shape(),
        right.shape(),
        out.shape()
    );
    let rows_unit = unit_rows(right.strides(), n);
    let taken = runs_here::<F>()
        && in_registers_as_gemm(few_rows, m, terms, n)
        && unit_rows(out.strides(), n)
        && (rows_unit || right.strides()[0] == 1);
    if !taken {
        return false;
    }
    // F is f32 (checked above): the views below are of f32.
    let (a, c) = (Strided::of(&left), Strided::of_mut(out));
    let ats = left.strides()[1];
    RIGHT.with_borrow_mut(|scratch| {
        let b = if rows_unit {
            Strided::of(&right)
        } else {
            scratch.resize(terms * n, 0.0);
            // SAFETY: rightᵀ [n, terms] has contiguous rows (checked above); AVX2 (level).
            unsafe { transpose(Strided::of(&right.t()), n, terms, scratch) };
            Strided::dense(scratch, n)
        };
        let product = Operands {
            a: a.ptr,
            lda: a.rs,
            ats,
            b: b.ptr,
            ldb: b.rs,
            b_cols: n,
            terms,
            alpha: alpha.to_f64() as f32,
            c: c.ptr as *mut f32,
            ldc: c.rs,
            cols: n,
        };
        // SAFETY: AVX2 and FMA (level); left m × terms by its strides, right terms × n with
        // contiguous rows, out m × n with contiguous rows (checked above), 1 ≤ n ≤ MAX_KEYS.
        unsafe { product.run(m) };
    });
    true
}

/// Whether a product of `m` rows, `terms` terms and `n` columns runs as [`Operands`] with the
/// GEMM's bits: the GEMM ([`crate::kernels::gemm`], or its `gemm_blocks` if `few_rows` is
/// false) gives it to its packed kernels in one block of terms ([`as_gemm`]), and its columns
/// fit [`MAX_KEYS`]: for [`head_forward`]'s outputs, [`head_backward`]'s products but
/// `∂L/∂P`, and [`product`]. The scores and `∂L/∂P`, whose columns (one a key) go by parts of
/// 16 however many there are, ask [`as_gemm`] alone.
fn in_registers_as_gemm(few_rows: bool, m: usize, terms: usize, n: usize) -> bool {
    (1..=MAX_KEYS).contains(&n) && as_gemm(few_rows, m, terms)
}

/// Whether a product of `m` rows and `terms` terms runs as [`Operands`] with the GEMM's bits,
/// whatever its columns: the GEMM gives it to its packed kernels in one block of terms. The
/// one place of these conditions.
fn as_gemm(few_rows: bool, m: usize, terms: usize) -> bool {
    use crate::kernels::gemm::KC;
    use crate::kernels::small_gemm::takes;
    m > 0 && (1..=KC).contains(&terms) && !(few_rows && takes(m, terms))
}

/// A product `C ← alpha·A·B` of [`head_forward`] and [`product`]: A's rows (`terms` floats
/// each, `ats` apart, the rows `lda` apart), B's `terms` rows (`ldb` apart, the first `b_cols`
/// floats of each readable), the first `cols ≤ b_cols` columns of C's rows (`ldc` apart).
#[derive(Clone, Copy)]
struct Operands {
    a: *const f32,
    lda: isize,
    /// A's stride from one term to the next (1: its rows are contiguous).
    ats: isize,
    b: *const f32,
    ldb: isize,
    b_cols: usize,
    terms: usize,
    alpha: f32,
    c: *mut f32,
    ldc: isize,
    cols: usize,
}

impl Operands {
    /// The product for `n` rows: parts of 16 columns (two vectors), each by tiles of six rows
    /// and one tile of the rows left, as the GEMM's AVX2 kernel holds its `6 × 16` tile: twelve
    /// vectors of sums, two of B, one broadcast factor, of the sixteen registers. Tiles of
    /// three rows by 32 columns had needed seventeen (twelve sums, four of B, the factor): the
    /// compiler kept sums on the stack, the loop tested each load of B for a masked one, and
    /// the rows left over (two of 32) ran one at a time. The same chains, the same bits. AMD
    /// EPYC Zen 3, `cargo bench --bench layers -- attention_core` on one thread: small 1.08 →
    /// 0.69 ms, base 1.96 → 1.08 ms (the products from about 42% of the peak to 85%).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the operands hold what [`Operands`] says for `n` rows;
    /// `cols ≥ 1`.
    unsafe fn run(&self, n: usize) {
        if self.cols > 2 * W {
            for c0 in (0..self.cols).step_by(2 * W) {
                let part = Operands {
                    b: self.b.wrapping_add(c0),
                    b_cols: self.b_cols - c0,
                    c: self.c.wrapping_add(c0),
                    cols: (self.cols - c0).min(2 * W),
                    ..*self
                };
                // SAFETY: columns c0.. of the same operands (caller).
                unsafe { part.run(n) };
            }
            return;
        }
        // SAFETY: one or two vectors of columns (above; at least one, caller).
        unsafe {
            match self.cols.div_ceil(W) {
                1 => self.rows::<1>(n),
                _ => self.rows::<2>(n),
            }
        }
    }

    /// [`Operands::run`] for `N ≤ 2` vectors of columns: tiles of six rows, then one of the
    /// rows left. Where the columns fill one vector (a head's output or gradient of at most 8
    /// features), tiles of twelve rows first: six rows' chains of fused multiply-adds, one
    /// a row, had left the two FMA units waiting on their latency (four cycles), twelve fill
    /// it, in twelve sums, one vector of B and the broadcast factor.
    ///
    /// # Safety
    /// As [`Operands::run`], with `cols ≤ N · 8`.
    unsafe fn rows<const N: usize>(&self, n: usize) {
        let mut i = 0;
        if N == 1 {
            while i + 12 <= n {
                // SAFETY: rows i..i + 12 (caller).
                unsafe { self.tile_of::<12, 1>(i) };
                i += 12;
            }
        }
        let full = i + (n - i) / 6 * 6;
        while i < full {
            // SAFETY: rows i..i + 6 (caller).
            unsafe { self.tile_of::<6, N>(i) };
            i += 6;
        }
        // SAFETY (each): the rows full..n (caller).
        unsafe {
            match n - full {
                0 => {}
                1 => self.tile_of::<1, N>(full),
                2 => self.tile_of::<2, N>(full),
                3 => self.tile_of::<3, N>(full),
                4 => self.tile_of::<4, N>(full),
                _ => self.tile_of::<5, N>(full),
            }
        }
    }

    /// [`Operands::tile`] for A's stride between terms and for whether B's `N` vectors are
    /// whole in every row (no masked loads in the loop).
    ///
    /// # Safety
    /// As [`Operands::tile`].
    #[inline(always)]
    unsafe fn tile_of<const R: usize, const N: usize>(&self, i: usize) {
        // SAFETY: forwarded.
        unsafe {
            match (self.ats == 1, self.b_cols >= N * W) {
                (true, true) => self.tile::<R, N, true, true>(i),
                (true, false) => self.tile::<R, N, true, false>(i),
                (false, true) => self.tile::<R, N, false, true>(i),
                (false, false) => self.tile::<R, N, false, false>(i),
            }
        }
    }

    /// Rows `i..i + R` of the product, `N` vectors of columns: each element a chain of fused
    /// multiply-adds over the terms in order, times `alpha` after the sum (the GEMM kernel's
    /// arithmetic, [`crate::kernels::gemm`]'s `Update::Set`).
    ///
    /// # Safety
    /// As [`Operands::run`], for those rows; `cols` fills `N` vectors; `UNIT` if `ats` is 1;
    /// `WHOLE` if `b_cols ≥ N · 8`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const N: usize, const UNIT: bool, const WHOLE: bool>(&self, i: usize) {
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        // SAFETY (all accesses): inside the rows and columns the caller vouches for.
        unsafe {
            let a: [*const f32; R] = std::array::from_fn(|r| self.a.offset((i + r) as isize * self.lda));
            for t in 0..self.terms {
                let row = self.b.offset(t as isize * self.ldb);
                let b: [__m256; N] = std::array::from_fn(|c| {
                    if WHOLE {
                        _mm256_loadu_ps(row.add(c * W))
                    } else {
                        f32::lanes(row.add(c * W), self.b_cols - c * W)
                    }
                });
                for r in 0..R {
                    let x = _mm256_broadcast_ss(&*if UNIT {
                        a[r].add(t)
                    } else {
                        a[r].offset(t as isize * self.ats)
                    });
                    for c in 0..N {
                        acc[r][c] = _mm256_fmadd_ps(x, b[c], acc[r][c]);
                    }
                }
            }
            let alpha = _mm256_set1_ps(self.alpha);
            for (r, acc) in acc.iter().enumerate() {
                let to = self.c.offset((i + r) as isize * self.ldc);
                for (c, &x) in acc.iter().enumerate() {
                    store_lanes(to.add(c * W), _mm256_mul_ps(x, alpha), self.cols - c * W);
                }
            }
        }
    }
}

/// Lanes of the crate's sums: a softmax's maximum and sum are taken in this many lanes,
/// folded in a tree ([`crate::kernels::simd`]); two vectors here.
const LANES: usize = crate::kernels::simd::LANES;

/// [`softmax_rows`] with as many vectors a row as `width` floats fill (two per 16 lanes).
///
/// # Safety
/// As [`softmax_rows`], with each `live[r] ≤ width ≤ 64`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn softmax_rows_within<const R: usize>(
    rows: [*mut f32; R],
    live: [usize; R],
    len: usize,
    width: usize,
) {
    // SAFETY: the caller's contract; each count of vectors covers `width`.
    unsafe {
        match width.div_ceil(LANES) {
            1 => softmax_rows::<R, 2>(rows, live, len),
            2 => softmax_rows::<R, 4>(rows, live, len),
            3 => softmax_rows::<R, 6>(rows, live, len),
            _ => softmax_rows::<R, 8>(rows, live, len),
        }
    }
}

/// The softmax of `R` rows side by side in registers, each over its first `live[r]` floats
/// (the rest of its `len` set to zero), as [`crate::kernels::softmax::softmax_row`] computes it
/// for a plain limit: the maximum in 16 lanes (chunks of 16 in order, the last padded with
/// `−∞`) folded in a tree, `exp_f32` of each difference, the sum in 16 lanes folded in the
/// same tree, one reciprocal. `YMM` vectors a row (two per 16 lanes) cover the longest live
/// part; chunks past a row's own are all `−∞`, whose maximum and exponentials (0) change
/// nothing. One row's softmax is a chain of dependent steps; the rows side by side fill the
/// wait. The same bits (tested; NaN as NaN).
///
/// # Safety
/// The CPU has AVX2 and FMA; each row holds `len ≥ live` floats, `live ≤ 8·YMM`.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows<const R: usize, const YMM: usize>(rows: [*mut f32; R], live: [usize; R], len: usize) {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    // Loops rather than closures: a closure here had been compiled as a call of its own (3%
    // of the attention core at the base workload's shape, AMD EPYC Zen 3).
    let mut x = [[ninf; YMM]; R];
    for r in 0..R {
        for (c, x) in x[r].iter_mut().enumerate() {
            let m = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(live[r].saturating_sub(c * W).min(W) as i32),
                lanes,
            );
            // SAFETY: the live floats of each row (caller); lanes past them are not read.
            let v = unsafe { _mm256_maskload_ps(rows[r].add(c * W), m) };
            *x = _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(m));
        }
    }
    // The maximum: 16 lanes over the chunks, then lane i with i + 8, i + 4, i + 2, i + 1.
    let mut top = [[ninf; 2]; R];
    for r in 0..R {
        for c in 0..YMM {
            top[r][c % 2] = _mm256_max_ps(x[r][c], top[r][c % 2]);
        }
    }
    // SAFETY: AVX2 (caller).
    let m: [__m256; R] = std::array::from_fn(|r| unsafe { splat_first(fold_max(top[r])) });
    for (x, &m) in x.iter_mut().zip(&m) {
        for v in x.iter_mut() {
            *v = _mm256_sub_ps(*v, m);
        }
    }
    exp_all(&mut x);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for r in 0..R {
        for c in 0..YMM {
            acc[r][c % 2] = _mm256_add_ps(acc[r][c % 2], x[r][c]);
        }
    }
    for r in 0..R {
        let top = _mm256_cvtss_f32(m[r]);
        // SAFETY: the row's len floats (caller).
        let row = unsafe { std::slice::from_raw_parts_mut(rows[r], len) };
        let live = live[r];
        row[live..].fill(0.0);
        if top == f32::NEG_INFINITY {
            row[..live].fill(0.0);
            continue;
        }
        let inv = _mm256_set1_ps(1.0 / _mm256_cvtss_f32(fold_add(acc[r])));
        for (c, &v) in x[r].iter().enumerate().take(live.div_ceil(W)) {
            // SAFETY: AVX2 (caller); the row's live floats from c·8 on, at most 8 written.
            unsafe { store_lanes(row.as_mut_ptr().add(c * W), _mm256_mul_ps(v, inv), live - c * W) };
        }
    }
}

/// The backward pass of the softmax of `n` rows, row `r` over its first `live(r)` keys, as
/// [`crate::kernels::softmax::softmax_row_backward`] computes it for a plain limit: `gs =
/// p ⊙ (gp − Σⱼ pⱼ·gpⱼ)` below the limit, zero from there to `len`. The sum in the 16 lanes
/// of [`crate::kernels::simd::dot`] (a product, then a sum, in chunks of 16 in order, the
/// last chunk's missing lanes left alone) folded in its tree. The scalar row, called row by
/// row, had cost more than the arithmetic at a few dozen keys (its lanes' sums, its tail, the
/// row's mask asked for again). The same bits (tested; NaN as NaN).
///
/// # Safety
/// The CPU has AVX2 and FMA; rows `0..n` of `p` (`p_rs` apart), of `gp` and of `gs` (`len`
/// apart) hold `len` floats, `live(r) ≤ len` of them readable in `p` and `gp`, all writable in
/// `gs`, which is apart from both.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_backward_rows(
    (p, p_rs): (*const f32, isize),
    gp: *const f32,
    gs: *mut f32,
    len: usize,
    n: usize,
    live: impl Fn(usize) -> usize,
) {
    // Row r's three rows.
    let at = |r: usize| {
        (
            p.wrapping_offset(r as isize * p_rs),
            gp.wrapping_add(r * len),
            gs.wrapping_add(r * len),
        )
    };
    for r in 0..n {
        let (p, gp, gs) = at(r);
        // SAFETY: row r of each, as the caller vouches; AVX2 and FMA (caller).
        unsafe {
            let dot = splat_first(fold_add(row_sum(p, gp, live(r))));
            row_gradient(p, gp, gs, dot, live(r), len)
        };
    }
}

/// `Σⱼ pⱼ·gpⱼ` over a row's first `live` floats in the two vectors of 16 lanes of
/// [`crate::kernels::simd::dot`], before their fold.
///
/// # Safety
/// The CPU has AVX2 and FMA; `p` and `gp` hold `live` readable floats.
#[inline(always)]
unsafe fn row_sum(p: *const f32, gp: *const f32, live: usize) -> [__m256; 2] {
    // SAFETY (every access): inside the floats the caller vouches for; AVX2 and FMA.
    unsafe {
        let (whole, n) = (live / W, live % W);
        let term = |c: usize| _mm256_mul_ps(_mm256_loadu_ps(p.add(c * W)), _mm256_loadu_ps(gp.add(c * W)));
        // The two halves of 16 lanes, named rather than indexed (an index kept them in memory).
        let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c + 2 <= whole {
            even = _mm256_add_ps(even, term(c));
            odd = _mm256_add_ps(odd, term(c + 1));
            c += 2;
        }
        if c < whole {
            even = _mm256_add_ps(even, term(c));
        }
        if n > 0 {
            // The last vector's live lanes; the others load as +0, and a product +0 added
            // leaves a lane's sum as it was (begun at +0, a sum is never −0).
            let mask = Tail::of(n).mask;
            let x = _mm256_mul_ps(
                _mm256_maskload_ps(p.add(whole * W), mask),
                _mm256_maskload_ps(gp.add(whole * W), mask),
            );
            if whole % 2 == 0 {
                even = _mm256_add_ps(even, x);
            } else {
                odd = _mm256_add_ps(odd, x);
            }
        }
        [even, odd]
    }
}

/// `gs = p ⊙ (gp − dot)` over a row's first `live` floats, zero from there to `len`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `p` and `gp` hold `live` readable floats, `gs` `len ≥ live`
/// writable ones, apart from both.
#[inline(always)]
unsafe fn row_gradient(p: *const f32, gp: *const f32, gs: *mut f32, dot: __m256, live: usize, len: usize) {
    // SAFETY (every access): inside the floats the caller vouches for; AVX2 and FMA.
    unsafe {
        let (whole, n) = (live / W, live % W);
        for c in 0..whole {
            let (p, gp) = (_mm256_loadu_ps(p.add(c * W)), _mm256_loadu_ps(gp.add(c * W)));
            _mm256_storeu_ps(gs.add(c * W), _mm256_mul_ps(p, _mm256_sub_ps(gp, dot)));
        }
        if n > 0 {
            let mask = Tail::of(n).mask;
            let (p, gp) = (
                _mm256_maskload_ps(p.add(whole * W), mask),
                _mm256_maskload_ps(gp.add(whole * W), mask),
            );
            store_lanes(gs.add(whole * W), _mm256_mul_ps(p, _mm256_sub_ps(gp, dot)), n);
        }
        for j in live..len {
            *gs.add(j) = 0.0;
        }
    }
}

/// [`crate::kernels::simd::exp_f32`] of every vector of `x`, whose lanes are at most 0 or NaN (a
/// softmax's differences from its maximum), operation for operation (so the same bits; NaN
/// comes through as NaN), eight vectors at a time, each operation on the eight before the next.
#[target_feature(enable = "avx2,fma")]
fn exp_all<const R: usize, const C: usize>(x: &mut [[__m256; C]; R]) {
    let all = x.as_flattened_mut();
    let mut eights = all.chunks_exact_mut(8);
    for eight in &mut eights {
        let v: &mut [__m256; 8] = eight.try_into().expect("eight");
        *v = exp_vecs_at_most_zero(*v);
    }
    for v in eights.into_remainder() {
        [*v] = exp_vecs_at_most_zero([*v]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dropout::{DropKey, DropRows};
    use crate::kernels::gemm_blocks;
    use crate::kernels::small_head::RowSoftmax;
    use crate::kernels::small_head::tests::{KEYS, assert_rows_bits, random, row_softmaxes, score};
    use crate::kernels::softmax::softmax_row;
    use ndarray::{Array2, s};
    use rand::{SeedableRng, rngs::StdRng};

    /// The heads `(Tq, kb, d_k, d_v)` the tests of a head's passes take: at the edges of
    /// vectors and of row tiles, one of a single query, and more keys than a row in registers
    /// (over a few columns past them, and past a chunk of 256).
    const HEADS: [(usize, usize, usize, usize); 9] = [
        (16, 16, 16, 16),
        (32, 32, 32, 32),
        (13, 17, 9, 20),
        (1, 5, 8, 3),
        (70, 64, 24, 64),
        (40, 33, 64, 7),
        (64, 70, 16, 16),
        (40, 130, 16, 16),
        (33, 257, 32, 24),
    ];

    /// Whether the AVX2 kernels are this CPU's best, said when they are not.
    fn avx2_is_best() -> bool {
        use crate::kernels::cpu::{Level, level};
        let best = level() == Level::Avx2;
        if !best {
            eprintln!("skipped: the AVX2 kernels are not this CPU's best (VASWANI_MAX_ISA=avx2 runs them)");
        }
        best
    }

    /// `x` in the first columns of a wider array (three more columns, NaN), as a head's rows
    /// lie inside `[B, T, H·d]`.
    fn wide(x: &Array2<f32>) -> Array2<f32> {
        let mut w = Array2::from_elem((x.nrows(), x.ncols() + 3), f32::NAN);
        w.slice_mut(s![.., ..x.ncols()]).assign(x);
        w
    }

    /// A head's forward on the AVX2 path gives the general path's bits (two GEMM calls, the
    /// row softmax and the dropout's factors per block of queries), for heads at the edges of
    /// vectors and of row tiles, causal (in blocks of 32 queries) or not, with padding flags
    /// and dropout, the head's rows inside wider arrays as in `[B, T, H·d]`.
    #[test]
    fn head_forward_equals_the_general_path_bit_for_bit() {
        if !avx2_is_best() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(31);
        let (mut taken, mut long) = (0, 0);
        for (tq, kb, dk, dv) in HEADS {
            for (causal, flags, dropped) in [
                (false, false, false),
                (true, false, false),
                (true, false, true),
                (false, true, true),
            ] {
                let (q, k, v) = (
                    random(&mut rng, (tq, dk)),
                    random(&mut rng, (kb, dk)),
                    random(&mut rng, (kb, dv)),
                );
                let (qw, kw, vw) = (wide(&q), wide(&k), wide(&v));
                let (q, k, v) = (
                    qw.slice(s![.., ..dk]),
                    kw.slice(s![.., ..dk]),
                    vw.slice(s![.., ..dv]),
                );
                let mask = |i: usize| RowMask {
                    limit: if causal { (i + 1).min(kb) } else { kb },
                    keys: flags.then_some(&KEYS[..kb]),
                    pairs: None,
                };
                let count = if causal { (tq + 16) / 32 } else { 1 }.max(1);
                let blocks: Vec<_> = (0..count)
                    .map(|i| {
                        let rows = i * 32..if i + 1 == count { tq } else { (i + 1) * 32 };
                        let width = mask(rows.end - 1).limit;
                        (rows, width)
                    })
                    .collect();
                let drop = dropped.then(|| DropRows {
                    key: DropKey::draw(0.3, &mut rng),
                    at: 77,
                    stride: kb + 2,
                });
                let scale = 1.0 / (dk as f32).sqrt();
                // The general path.
                let tk = kb + 2;
                let (mut want_p, mut want_o) = (
                    Array2::from_elem((tq, tk), f32::NAN),
                    Array2::from_elem((tq, dv), f32::NAN),
                );
                for (rows, width) in blocks.clone() {
                    let mut p = want_p.slice_mut(s![rows.clone(), ..]);
                    gemm_blocks(
                        scale,
                        q.slice(s![rows.clone(), ..]),
                        k.slice(s![..width, ..]).t(),
                        0.0,
                        p.slice_mut(s![.., ..width]),
                    );
                    for (i, mut row) in rows.clone().zip(p.rows_mut()) {
                        softmax_row(row.as_slice_mut().unwrap(), mask(i));
                    }
                    let p = want_p.slice(s![rows.clone(), ..width]);
                    let o = want_o.slice_mut(s![rows.clone(), ..]);
                    match drop {
                        Some(m) => gemm_blocks(
                            1.0,
                            m.times(rows.start, p).view(),
                            v.slice(s![..width, ..]),
                            0.0,
                            o,
                        ),
                        None => gemm_blocks(1.0, p, v.slice(s![..width, ..]), 0.0, o),
                    }
                }
                let (mut probs, mut outw) = (
                    Array2::from_elem((tq, tk), f32::NAN),
                    Array2::from_elem((tq, 2 * dv), f32::NAN),
                );
                let mut out = outw.slice_mut(s![.., ..;2]);
                let name =
                    format!("({tq}, {kb}, {dk}, {dv}) causal {causal} flags {flags} dropout {dropped}");
                let softmax = || {
                    if flags {
                        RowSoftmax::Rows(|i, row: &mut [f32]| softmax_row(row, mask(i)))
                    } else {
                        RowSoftmax::Limit(|i| mask(i).limit)
                    }
                };
                if !head_forward(
                    q,
                    k,
                    v,
                    scale,
                    blocks.into_iter(),
                    softmax(),
                    drop,
                    &mut probs.view_mut(),
                    &mut out,
                ) {
                    // Strided output columns: not taken; the same head with contiguous ones is.
                    let mut out = Array2::from_elem((tq, dv), f32::NAN);
                    let blocks = (0..count).map(|i| {
                        let rows = i * 32..if i + 1 == count { tq } else { (i + 1) * 32 };
                        let width = mask(rows.end - 1).limit;
                        (rows, width)
                    });
                    if !head_forward(
                        q,
                        k,
                        v,
                        scale,
                        blocks,
                        softmax(),
                        drop,
                        &mut probs.view_mut(),
                        &mut out.view_mut(),
                    ) {
                        continue;
                    }
                    taken += 1;
                    long += usize::from(kb > MAX_KEYS);
                    let same = |a: &Array2<f32>, b: &Array2<f32>| {
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                    };
                    assert!(same(&probs, &want_p), "weights differ: {name}");
                    assert!(same(&out, &want_o), "outputs differ: {name}");
                    continue;
                }
                unreachable!("strided output columns are not taken: {name}");
            }
        }
        // (40, 33, 64, 7): 40 rows of 64 terms go to the packed kernels; (1, 5, 8, 3) too.
        assert!(taken >= 20, "{taken} heads taken");
        // Heads of more keys than a row in registers, every variant but the padding flags'.
        assert!(long >= 9, "{long} heads of more than {MAX_KEYS} keys taken");
    }

    /// A head's backward on the AVX2 path gives the general path's bits (the products by
    /// `gemm` or `gemm_blocks` per block, `P ⊙ M` and `∂L/∂P ⊙ M` by the dropout's own
    /// passes, the row softmax's backward), for heads at the edges of vectors and of row tiles,
    /// causal (in blocks of 32 queries and keys) or not, with padding flags and dropout, the
    /// head's rows inside wider arrays; every gradient element written.
    #[test]
    fn head_backward_equals_the_general_path_bit_for_bit() {
        use crate::kernels::gemm;
        use crate::kernels::softmax::softmax_row_backward;
        use rand::Rng;
        if !avx2_is_best() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(37);
        let (mut taken, mut long) = (0, 0);
        for (tq, kb, dk, dv) in HEADS {
            for (causal, flags, dropped) in [
                (false, false, false),
                (false, false, true),
                (true, false, false),
                (true, false, true),
                (false, true, true),
            ] {
                let limit = |i: usize| if causal { (i + 1).min(kb) } else { kb };
                let mask = |i: usize| RowMask {
                    limit: limit(i),
                    keys: flags.then_some(&KEYS[..kb]),
                    pairs: None,
                };
                let mut p = Array2::from_shape_fn((tq, kb), |_| rng.random_range(0.0f32..1.0));
                for (i, mut row) in p.rows_mut().into_iter().enumerate() {
                    row.slice_mut(s![limit(i)..]).fill(0.0);
                }
                let (qw, kw, vw, gw, pw) = (
                    wide(&random(&mut rng, (tq, dk))),
                    wide(&random(&mut rng, (kb, dk))),
                    wide(&random(&mut rng, (kb, dv))),
                    wide(&random(&mut rng, (tq, dv))),
                    wide(&p),
                );
                let (q, k, v, g, p) = (
                    qw.slice(s![.., ..dk]),
                    kw.slice(s![.., ..dk]),
                    vw.slice(s![.., ..dv]),
                    gw.slice(s![.., ..dv]),
                    pw.slice(s![.., ..kb]),
                );
                let blocks = |len: usize| {
                    let step = if causal { 32 } else { len.max(1) };
                    (0..len).step_by(step).map(move |a| a..(a + step).min(len))
                };
                let queries = blocks(tq).map(|rows| {
                    let width = limit(rows.end - 1);
                    (rows, width)
                });
                let keys = blocks(kb).map(|keys| {
                    let first = if causal { keys.start.min(tq) } else { 0 };
                    (keys, first)
                });
                let drop = dropped.then(|| DropRows {
                    key: DropKey::draw(0.3, &mut rng),
                    at: 91,
                    stride: kb + 3,
                });
                let scale = 1.0 / (dk as f32).sqrt();
                let few_rows = !causal;
                // The general path.
                fn product(
                    few_rows: bool,
                    alpha: f32,
                    l: ndarray::ArrayView2<f32>,
                    r: ndarray::ArrayView2<f32>,
                    out: ndarray::ArrayViewMut2<f32>,
                ) {
                    if few_rows {
                        gemm(alpha, l, r, 0.0, out)
                    } else {
                        gemm_blocks(alpha, l, r, 0.0, out)
                    }
                }
                let (mut want_q, mut want_k, mut want_v) = (
                    Array2::from_elem((tq, dk), f32::NAN),
                    Array2::from_elem((kb, dk), f32::NAN),
                    Array2::from_elem((kb, dv), f32::NAN),
                );
                let kept = drop.map_or_else(|| p.to_owned(), |m| m.times(0, p));
                for (keys, first) in keys.clone() {
                    let mut out = want_v.slice_mut(s![keys.clone(), ..]);
                    if first == tq {
                        out.fill(0.0);
                        continue;
                    }
                    product(
                        few_rows,
                        1.0,
                        kept.slice(s![first.., keys]).t(),
                        g.slice(s![first.., ..]),
                        out,
                    );
                }
                let (mut gp, mut gs) = (Array2::zeros((tq, kb)), Array2::zeros((tq, kb)));
                for (rows, width) in queries.clone() {
                    if width > 0 {
                        product(
                            few_rows,
                            1.0,
                            g.slice(s![rows.clone(), ..]),
                            v.slice(s![..width, ..]).t(),
                            gp.slice_mut(s![rows.clone(), ..width]),
                        );
                    }
                    for i in rows.clone() {
                        if let Some(m) = drop {
                            m.apply(i, &mut gp.row_mut(i).as_slice_mut().unwrap()[..width]);
                        }
                        softmax_row_backward(
                            p.row(i).to_slice().unwrap(),
                            gp.row(i).to_slice().unwrap(),
                            gs.row_mut(i).into_slice().unwrap(),
                            mask(i),
                        );
                    }
                    let mut out = want_q.slice_mut(s![rows.clone(), ..]);
                    if width == 0 {
                        out.fill(0.0);
                    } else {
                        product(
                            few_rows,
                            scale,
                            gs.slice(s![rows, ..width]),
                            k.slice(s![..width, ..]),
                            out,
                        );
                    }
                }
                for (keys, first) in keys.clone() {
                    let mut out = want_k.slice_mut(s![keys.clone(), ..]);
                    if first == tq {
                        out.fill(0.0);
                        continue;
                    }
                    product(
                        few_rows,
                        scale,
                        gs.slice(s![first.., keys]).t(),
                        q.slice(s![first.., ..]),
                        out,
                    );
                }
                // The AVX2 path, into gradients inside wider arrays.
                let (mut gqw, mut gkw, mut gvw) = (
                    Array2::from_elem((tq, dk + 5), f32::NAN),
                    Array2::from_elem((kb, dk + 5), f32::NAN),
                    Array2::from_elem((kb, dv + 5), f32::NAN),
                );
                let name =
                    format!("({tq}, {kb}, {dk}, {dv}) causal {causal} flags {flags} dropout {dropped}");
                if !head_backward(
                    few_rows,
                    q,
                    k,
                    v,
                    scale,
                    queries,
                    keys,
                    p,
                    drop,
                    g,
                    if flags {
                        RowSoftmax::Rows(|i, p: &[f32], gp: &[f32], gs: &mut [f32]| {
                            softmax_row_backward(p, gp, gs, mask(i))
                        })
                    } else {
                        RowSoftmax::Limit(limit)
                    },
                    &mut gqw.slice_mut(s![.., ..dk]),
                    &mut gkw.slice_mut(s![.., ..dk]),
                    &mut gvw.slice_mut(s![.., ..dv]),
                ) {
                    continue;
                }
                taken += 1;
                long += usize::from(kb > MAX_KEYS);
                let same = |got: ndarray::ArrayView2<f32>, want: &Array2<f32>| {
                    got.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                assert!(same(gqw.slice(s![.., ..dk]), &want_q), "∂Q differs: {name}");
                assert!(same(gkw.slice(s![.., ..dk]), &want_k), "∂K differs: {name}");
                assert!(same(gvw.slice(s![.., ..dv]), &want_v), "∂V differs: {name}");
            }
        }
        assert!(taken >= 25, "{taken} heads taken");
        assert!(long >= 9, "{long} heads of more than {MAX_KEYS} keys taken");
    }

    /// A product in registers gives the GEMM's bits (`gemm` with its few-row kernels, or
    /// `gemm_blocks` without), for left factors by rows, transposed and strided, right factors
    /// by rows and transposed, at the edges of vectors, of parts of columns and of row tiles
    /// (every count of rows left over); the products the GEMM gives its few-row kernels, more
    /// than 64 columns and strided outputs are not taken.
    #[test]
    fn product_equals_the_gemm_bit_for_bit() {
        use crate::kernels::gemm;
        use crate::kernels::small_gemm::takes;
        if !avx2_is_best() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let mut taken = 0;
        for (m, terms, n) in [
            (16, 16, 16),
            (32, 32, 32),
            (13, 17, 9),
            (1, 5, 3),
            (70, 64, 64),
            (8, 40, 24),
            (32, 130, 8),
            (5, 33, 65),
            (9, 12, 20),
            (15, 8, 40),
            // One vector of columns: tiles of twelve rows, then six, then the rest.
            (12, 10, 7),
            (23, 9, 8),
            (29, 8, 8),
            (18, 11, 4),
        ] {
            let left = random(&mut rng, (m, terms));
            let left_t = random(&mut rng, (terms, m));
            let left_wide = random(&mut rng, (m, 2 * terms));
            let right = random(&mut rng, (terms, n));
            let right_t = random(&mut rng, (n, terms));
            let lefts = [left.view(), left_t.t(), left_wide.slice(s![.., ..;2])];
            for (l, left) in lefts.into_iter().enumerate() {
                for (r, right) in [right.view(), right_t.t()].into_iter().enumerate() {
                    for few_rows in [true, false] {
                        for alpha in [1.0, 0.125, -0.7] {
                            let mut want = Array2::from_elem((m, n), f32::NAN);
                            match few_rows {
                                true => gemm(alpha, left, right, 0.0, want.view_mut()),
                                false => gemm_blocks(alpha, left, right, 0.0, want.view_mut()),
                            }
                            let mut got = Array2::from_elem((m, n), f32::NAN);
                            let name =
                                format!("{m}×{terms}×{n} left {l} right {r} few rows {few_rows} α {alpha}");
                            let expected = n <= MAX_KEYS && !(few_rows && takes(m, terms));
                            assert_eq!(
                                product(few_rows, alpha, left, right, &mut got.view_mut()),
                                expected,
                                "{name}"
                            );
                            if expected {
                                taken += 1;
                                assert!(
                                    got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                                    "{name}: {got} against {want}"
                                );
                            } else {
                                assert!(got.iter().all(|x| x.is_nan()), "{name}: written though not taken");
                            }
                            // Strided output columns: never taken.
                            let mut wide = Array2::from_elem((m, 2 * n), f32::NAN);
                            let mut strided = wide.slice_mut(s![.., ..;2]);
                            assert!(
                                !product(few_rows, alpha, left, right, &mut strided) || n <= 1,
                                "{name}"
                            );
                        }
                    }
                }
            }
        }
        assert!(taken >= 200, "{taken} products taken");
    }

    /// The softmax of rows side by side gives the bits of the general softmax of each row
    /// alone, for rows with no live key, with only −∞ scores, with NaN, ±∞ and scores far
    /// apart, at every shape the forward uses (NaN as NaN).
    #[test]
    fn softmax_rows_equals_the_row_softmax_bit_for_bit() {
        if !crate::kernels::cpu::avx2() {
            eprintln!("skipped: no AVX2 on this CPU (or VASWANI_MAX_ISA asks for less)");
            return;
        }
        use rand::Rng;
        fn check<const R: usize, const YMM: usize>(rng: &mut StdRng) {
            let len = 8 * YMM + 5;
            for round in 0..300 {
                let mut rows = vec![vec![0.0f32; len]; R];
                let mut live = [0; R];
                for (r, (row, live)) in rows.iter_mut().zip(&mut live).enumerate() {
                    *live = match (round + r) % 5 {
                        0 => 0,
                        1 => 8 * YMM,
                        _ => rng.random_range(1..=8 * YMM),
                    };
                    for x in row.iter_mut() {
                        *x = score(rng);
                    }
                    if round % 7 == r % 7 {
                        row[..*live].fill(f32::NEG_INFINITY);
                    }
                }
                let want = row_softmaxes(&rows, len, &live);
                let ptrs: [*mut f32; R] = std::array::from_fn(|r| rows[r].as_mut_ptr());
                // SAFETY: AVX2 (checked); rows of len ≥ live floats.
                unsafe { softmax_rows::<R, YMM>(ptrs, live, len) };
                assert_rows_bits(&rows, &want, len, &live, &format!("{R}×{YMM}, round {round}"));
            }
        }
        let mut rng = StdRng::seed_from_u64(32);
        check::<8, 2>(&mut rng);
        check::<4, 2>(&mut rng);
        check::<4, 4>(&mut rng);
        check::<4, 6>(&mut rng);
        check::<4, 8>(&mut rng);
        check::<1, 2>(&mut rng);
        check::<1, 8>(&mut rng);
    }

    /// The softmax backward of rows in vector registers gives the scalar row backward's bits
    /// for plain limits: blocks of rows of every length to past four vectors, each row with its
    /// own limit (every one within the length, over the blocks), P's rows further apart than
    /// the length, and products of −0, infinities and NaN among the values.
    #[test]
    fn softmax_backward_rows_equals_the_row_backward_bit_for_bit() {
        use crate::kernels::softmax::softmax_row_backward;
        use rand::Rng;
        if !avx2_is_best() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(41);
        let mut rows = 0;
        for len in 0..=70 {
            for block in 0..len + 2 {
                // Five rows, the first's limit going through 0..=len from block to block.
                let n = 5;
                let live: Vec<usize> = (0..n)
                    .map(|r| {
                        if r == 0 {
                            block.min(len)
                        } else {
                            rng.random_range(0..=len)
                        }
                    })
                    .collect();
                let p_rs = len + 3;
                let mut p: Vec<f32> = (0..n * p_rs).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut gp: Vec<f32> = (0..n * len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                for (r, &live) in live.iter().enumerate() {
                    let (p, gp) = (&mut p[r * p_rs..][..len], &mut gp[r * len..][..len]);
                    match (r + block) % 4 {
                        // Every product −0.
                        1 => {
                            p.iter_mut().for_each(|x| *x = 0.0);
                            gp.iter_mut().for_each(|x| *x = -x.abs());
                        }
                        2 if live > 0 => p[rng.random_range(0..live)] = f32::INFINITY,
                        3 if live > 0 => gp[rng.random_range(0..live)] = f32::NAN,
                        _ => {}
                    }
                }
                let mut got = vec![f32::NAN; n * len];
                // SAFETY: AVX2 and FMA (checked above); rows of len ≥ live floats, P's p_rs
                // apart.
                unsafe {
                    softmax_backward_rows(
                        (p.as_ptr(), p_rs as isize),
                        gp.as_ptr(),
                        got.as_mut_ptr(),
                        len,
                        n,
                        |r| live[r],
                    )
                };
                for (r, &live) in live.iter().enumerate() {
                    let mut want = vec![f32::NAN; len];
                    let mask = RowMask {
                        limit: live,
                        keys: None,
                        pairs: None,
                    };
                    softmax_row_backward(&p[r * p_rs..][..len], &gp[r * len..][..len], &mut want, mask);
                    let got = &got[r * len..][..len];
                    assert!(
                        got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "len {len}, row {r}, live {live}: {got:?} against {want:?}"
                    );
                    rows += 1;
                }
            }
        }
        assert!(rows > 10_000, "{rows} rows");
    }
}
