//! One head of attention in registers, up to 512 keys: `softmax(Q·Kᵀ·s)·V` and its backward
//! pass.
//!
//! The general path runs a head as two GEMM calls with a softmax between them (four GEMM
//! calls backward). At the tiny and small workloads' sizes (16 or 32 queries and keys, `d_k`
//! 16 or 32) those calls spent more in packing and per-call costs than in arithmetic, and one
//! row's softmax was a chain of dependent steps (maximum, exponential, sum, division) with
//! nothing beside it to overlap. Here, with AVX-512 and at most [`avx512::MAX_KEYS`] keys
//! and value features, every product is one kernel, `avx512::product`: four or eight rows of
//! the result at a time, all their columns (at most four vectors) in registers, the other
//! operand's rows read where they are (K and V are copied, transposed, only where their
//! columns are needed as rows).
//! The forward pass takes the softmax of the four rows in registers, side by side, when the
//! mask of a row is a plain limit (causal, padding by length). A head of more keys (up to
//! the GEMM's block of terms, 512) takes its scores in products of at most
//! [`avx512::MAX_KEYS`] columns, then the softmax of each stored row: no packing, where the
//! general path's GEMM calls packed both operands of every product of a head.
//!
//! Under a causal mask the products go by the attention layer's blocks of queries, each up
//! to the last key one of its queries sees, and of keys, each from the first query that sees
//! one: the general path's blocks, whose skipped terms are exact zeros.
//!
//! The arithmetic is the general path's, term for term, so the bits are the same whichever
//! path a head takes: each element of a product a chain of fused multiply-adds over the terms
//! in order, scaled after the sum (the GEMM micro-kernel), with the dropout mask multiplied
//! into the left factor first where the general path multiplies it into a copy; the softmax's
//! maximum, `exp_f32`, lane sums and reciprocal those of [`super::softmax`]. A head is taken
//! only where the GEMM would have run its packed kernels over one block of terms (not the
//! few-row kernels, which sum in another order); the tests hold the two paths to the same
//! bits.
//!
//! A decoding step's attention, one query against a head's cached keys and values, is here
//! too ([`step_head`], [`step_row`]): in slices on any CPU, in registers with AVX-512. Every
//! AVX-512 part lives in the x86-64-only submodule `avx512`; what is here builds everywhere.

use super::Float;

/// `$run($x, $scores, $out)` with `$x` (a `$Step<'_, F, S>`) as the `$Step` of `f32` over the
/// cache `$cache` found (from [`step_cache`]), then `true`; `false` and nothing run for
/// `None`. In an `unsafe` block of a function generic over `F` and `S`, where `$cache` came
/// from `step_cache::<F, S>` (so the casts are identities), with the CPU features `$run`
/// needs, and `$run`'s own contract holds.
#[cfg(target_arch = "x86_64")]
macro_rules! in_registers_as {
    ($cache:expr, $Step:ident, $x:ident, $scores:ident, $out:ident, $run:ident) => {
        match $cache {
            Some(StepCache::F32) => {
                let (x, scores, out) = as_f32::<_, $Step<'_, f32, f32>, F>($x, $scores, $out);
                $run(x, scores, out);
                true
            }
            Some(StepCache::Bf16) => {
                let (x, scores, out) = as_f32::<_, $Step<'_, f32, u16>, F>($x, $scores, $out);
                $run(x, scores, out);
                true
            }
            None => false,
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::{
    head_backward as head_backward_avx2, head_forward as head_forward_avx2, product as product_avx2,
};
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{RowSoftmax, SmallHead};

/// What a decoding step's cache holds, where the step runs in registers.
#[cfg(target_arch = "x86_64")]
enum StepCache {
    /// `f32` values.
    F32,
    /// bf16 bits (`u16`).
    Bf16,
}

/// Over which cache a decoding step of `F` over `S` runs in registers, where `vectors` (the
/// path's own conditions: the CPU, the lengths) holds: `F` must be `f32`, `S` `f32` or bf16
/// bits; `None` for the slices.
#[cfg(target_arch = "x86_64")]
fn step_cache<F: 'static, S: 'static>(vectors: bool) -> Option<StepCache> {
    use std::any::TypeId;
    let vectors = vectors && TypeId::of::<F>() == TypeId::of::<f32>();
    match TypeId::of::<S>() {
        s if vectors && s == TypeId::of::<f32>() => Some(StepCache::F32),
        s if vectors && s == TypeId::of::<u16>() => Some(StepCache::Bf16),
        _ => None,
    }
}

/// A head or row of `F` over `S` (`x`) as the one of `f32` over `T` it is (`Y`), with its
/// scratch and output.
///
/// # Safety
/// `F` is `f32`, `S` is `T`, and `Y` is `X` with those types.
#[cfg(target_arch = "x86_64")]
unsafe fn as_f32<'a, X, Y, F>(
    x: &'a X,
    scores: &'a mut [F],
    out: &'a mut [F],
) -> (&'a Y, &'a mut [f32], &'a mut [f32]) {
    // SAFETY: the same types (caller).
    unsafe {
        (
            &*(x as *const X as *const Y),
            &mut *(scores as *mut [F] as *mut [f32]),
            &mut *(out as *mut [F] as *mut [f32]),
        )
    }
}

/// One query of one head against `kb` cached keys and values, the attention of a decoding
/// step: `out ← softmax(q·Kᵀ·scale)·V`, with the keys stored transposed (`kt`: feature d's
/// keys over the positions at `kt + d·kt_rs`, contiguous) and the values by position
/// (position j's row at `v + j·v_rs`, contiguous).
///
/// The cache holds `S`: the floats themselves, or (a bf16 decode, `S = u16`) bf16 bits that
/// are widened to `f32` exactly as they are read ([`Cached`]).
pub(crate) struct StepHead<'a, F, S = F> {
    /// The query, `d_k` features.
    pub q: &'a [F],
    /// `1 / √d_k`.
    pub scale: F,
    /// The keys, transposed: `d_k` rows of `kb` elements, `kt_rs` apart.
    pub kt: *const S,
    pub kt_rs: isize,
    /// The values: `kb` rows of `d_v` elements, `v_rs` apart.
    pub v: *const S,
    pub v_rs: isize,
    /// Keys taking part (the cache's length).
    pub kb: usize,
    /// The mask of this query's row.
    pub mask: super::RowMask<'a>,
}

/// [`StepHead`]'s result into `out` (`d_v` floats), with `scores` (at least `kb` floats) as
/// scratch. With AVX-512, `f32`, and at most [`avx512::MAX_KEYS`] keys and value features, the
/// scores and the output stay in registers across the sums (a head's step had been a chain of
/// stores and loads of each partial sum); elsewhere the same arithmetic in slices: each score a
/// chain of fused multiply-adds over the features in order from `q_d·scale`, the softmax of
/// [`super::softmax`], each output feature a chain of fused multiply-adds over the allowed
/// positions in order. The two give the same bits (tested).
///
/// # Safety
/// The `d_k` rows of `kb` keys and the `kb` rows of `out.len()` values must be readable.
pub(crate) unsafe fn step_head<F: Float, S: Cached<F>>(
    h: &StepHead<'_, F, S>,
    scores: &mut [F],
    out: &mut [F],
) {
    // SAFETY: forwarded from this function's contract.
    #[cfg(target_arch = "x86_64")]
    if unsafe { avx512::try_step_head(h, scores, out) || avx2::try_step_head(h, scores, out) } {
        return;
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { step_head_slices(h, scores, out) }
}

/// An element of a key/value cache as [`step_head`] reads it: the float itself, or bf16 bits
/// (`u16`, a bf16 decode's cache) widened exactly.
pub(crate) trait Cached<F>: Copy + Send + Sync + 'static {
    /// The value as an `F`.
    fn widen(self) -> F;
}

impl<F: Float> Cached<F> for F {
    #[inline(always)]
    fn widen(self) -> F {
        self
    }
}

impl<F: Float> Cached<F> for u16 {
    #[inline(always)]
    fn widen(self) -> F {
        F::from_f64(f64::from(super::gemm::bf16::bf16_to_f32(self)))
    }
}

/// [`step_head`] in slices: the naive twin of `avx512::step_head_avx512`, and the path of other
/// types, lengths and CPUs.
///
/// # Safety
/// As [`step_head`].
pub(crate) unsafe fn step_head_slices<F: Float, S: Cached<F>>(
    h: &StepHead<'_, F, S>,
    scores: &mut [F],
    out: &mut [F],
) {
    let (kb, dv) = (h.kb, out.len());
    // SAFETY (both closures): the caller vouches for these rows.
    let key_t = |d: usize| unsafe { std::slice::from_raw_parts(h.kt.offset(d as isize * h.kt_rs), kb) };
    let value = |j: usize| unsafe { std::slice::from_raw_parts(h.v.offset(j as isize * h.v_rs), dv) };
    let scores = &mut scores[..kb];
    super::simd::widest!({
        scores.fill(F::ZERO);
        for (d, &qd) in h.q.iter().enumerate() {
            let qd = qd * h.scale;
            for (s, &k) in scores.iter_mut().zip(key_t(d)) {
                *s = qd.mul_add(k.widen(), *s);
            }
        }
        super::softmax::softmax_row_inline(scores, h.mask);
        out.fill(F::ZERO);
        for (j, &p) in scores.iter().enumerate() {
            if h.mask.allows(j) {
                for (o, &x) in out.iter_mut().zip(value(j)) {
                    *o = p.mul_add(x.widen(), *o);
                }
            }
        }
    })
}

/// Every head of one query row of a decoding step, or of a few rows with the same mask:
/// [`StepHead`] for each of `heads` heads, their queries side by side in `q`, in rows of
/// `row_heads` heads; within a row each head's keys and values `kt_hs` and `v_hs` after the
/// previous head's, each row's `kt_ss` and `v_ss` after the previous row's (0 for rows that
/// read the same sequence's cache, as the beams of one source do).
pub(crate) struct StepRow<'a, F, S = F> {
    /// The queries, `heads · d_k` features, head after head.
    pub q: &'a [F],
    /// `1 / √d_k`.
    pub scale: F,
    /// Heads of the rows.
    pub heads: usize,
    /// Heads of a row.
    pub row_heads: usize,
    /// Head 0's keys, transposed, as [`StepHead::kt`] ([`StepRow::kt_of`] for the others).
    pub kt: *const S,
    pub kt_hs: isize,
    pub kt_ss: isize,
    pub kt_rs: isize,
    /// Head 0's values, as [`StepHead::v`] ([`StepRow::v_of`] for the others).
    pub v: *const S,
    pub v_hs: isize,
    pub v_ss: isize,
    pub v_rs: isize,
    /// Keys taking part (the cache's length), in every head.
    pub kb: usize,
    /// The mask of this query's row, in every head.
    pub mask: super::RowMask<'a>,
    /// Elements from these rows' keys, resp. values, to those of the rows stepped next, if
    /// the vector paths are to ask for their lines into L2 as they read their own
    /// ([`ask_ahead`]; why, and when a step asks: `attention_step` in `layers::attention`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels
    pub next: Option<(isize, isize)>,
}

/// Asks for the lines of the `len` elements at `row` (a row of keys or values, on a line's
/// start) `next` elements ahead, in the rows stepped next ([`StepRow::next`]), into L2: one
/// ask a line. Asking reads nothing and never faults: only the addresses are computed.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ask_ahead<S>(row: *const S, len: usize, next: isize) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    let per_line = (64 / std::mem::size_of::<S>()).max(1);
    for e in (0..len).step_by(per_line) {
        // SAFETY: SSE is part of x86-64; an ask reads nothing and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(e).wrapping_offset(next) as *const i8) };
    }
}

impl<'a, F, S> StepRow<'a, F, S> {
    /// Head `hi`'s keys, transposed.
    pub(crate) fn kt_of(&self, hi: usize) -> *const S {
        let (row, head) = (hi / self.row_heads, hi % self.row_heads);
        self.kt
            .wrapping_offset(row as isize * self.kt_ss + head as isize * self.kt_hs)
    }

    /// Head `hi`'s values.
    pub(crate) fn v_of(&self, hi: usize) -> *const S {
        let (row, head) = (hi / self.row_heads, hi % self.row_heads);
        self.v
            .wrapping_offset(row as isize * self.v_ss + head as isize * self.v_hs)
    }
}

impl<'a, F: Copy, S> StepRow<'a, F, S> {
    /// Head `hi` alone.
    fn head(&self, hi: usize) -> StepHead<'a, F, S> {
        let dk = self.q.len() / self.heads;
        StepHead {
            q: &self.q[hi * dk..][..dk],
            scale: self.scale,
            kt: self.kt_of(hi),
            kt_rs: self.kt_rs,
            v: self.v_of(hi),
            v_rs: self.v_rs,
            kb: self.kb,
            mask: self.mask,
        }
    }
}

/// [`step_head`] for every head of `r`, into `out` (`heads · d_v` floats, head after head),
/// with `scores` (at least `kb` floats) as scratch.
///
/// With AVX-512, `f32`, and at most [`avx512::MAX_KEYS`] keys and value features, the heads run
/// side by side, eight at a time (four where a head's keys or features take more than two
/// vectors): each of a head's sums is a chain of dependent multiply-adds (its scores over the
/// `d_k` features, its output over the positions), and one head alone leaves the core waiting
/// on each link; the heads' chains side by side fill the wait. Each head's arithmetic is
/// [`step_head`]'s, term for term, so the bits are the same (tested).
///
/// # Safety
/// For every head, as [`step_head`]; `out.len()` is a multiple of `heads`.
pub(crate) unsafe fn step_row<F: Float, S: Cached<F>>(
    r: &StepRow<'_, F, S>,
    scores: &mut [F],
    out: &mut [F],
) {
    if r.heads == 0 || out.is_empty() {
        return;
    }
    let dv = out.len() / r.heads;
    // SAFETY: forwarded from this function's contract.
    #[cfg(target_arch = "x86_64")]
    if unsafe { avx512::try_step_row(r, dv, scores, out) || avx2::try_step_row(r, dv, scores, out) } {
        return;
    }
    for (hi, o) in out.chunks_exact_mut(dv).enumerate() {
        // SAFETY: forwarded from this function's contract.
        unsafe { step_head(&r.head(hi), scores, o) };
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::gemm::Isa;
    use crate::kernels::softmax::RowMask;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    pub(super) fn random(rng: &mut StdRng, shape: (usize, usize)) -> Array2<f32> {
        Array2::from_shape_fn(shape, |_| rng.random_range(-2.0..2.0))
    }

    /// A score for the softmax tests: one time in six a special value (an infinity, NaN, a
    /// signed zero, a large one), else uniform in −30..30.
    pub(super) fn score(rng: &mut StdRng) -> f32 {
        const SPECIALS: [f32; 9] = [
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            0.0,
            -0.0,
            80.0,
            -80.0,
            1e30,
            -1e30,
        ];
        if rng.random_range(0..6) == 0 {
            SPECIALS[rng.random_range(0..SPECIALS.len())]
        } else {
            rng.random_range(-30.0f32..30.0)
        }
    }

    /// The softmax of the first `len` floats of each row under a plain limit, by the row
    /// softmax of the general path: what a softmax of stored rows must give, bit for bit.
    pub(super) fn row_softmaxes<T: Clone + AsMut<[f32]>>(rows: &[T], len: usize, limits: &[usize]) -> Vec<T> {
        let mut want = rows.to_vec();
        for (row, &limit) in want.iter_mut().zip(limits) {
            let mask = RowMask {
                limit,
                keys: None,
                pairs: None,
            };
            crate::kernels::softmax::softmax_row(&mut row.as_mut()[..len], mask);
        }
        want
    }

    /// Asserts that the first `len` elements of each row of `got` have the bits of `want`'s
    /// (a NaN matching any NaN), naming `case`, the row, its limit and the key where one does
    /// not: the softmax paths of stored rows against the row softmax.
    pub(super) fn assert_rows_bits<G: AsRef<[f32]>, W: AsRef<[f32]>>(
        got: &[G],
        want: &[W],
        len: usize,
        limits: &[usize],
        case: &str,
    ) {
        for (r, (g, w)) in got.iter().zip(want).enumerate() {
            for (j, (&g, &w)) in g.as_ref()[..len].iter().zip(&w.as_ref()[..len]).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{case}, row {r} (limit {}), key {j}: {g} against {w}",
                    limits[r]
                );
            }
        }
    }

    pub(super) static KEYS: [bool; 303] = {
        let mut k = [true; 303];
        let mut j = 1;
        while j < 303 {
            k[j] = false;
            j += 3;
        }
        k
    };

    /// A decoding step's row masks over `kb` cached keys: all of them, all but the last, none,
    /// and some flagged.
    fn step_masks(kb: usize) -> [RowMask<'static>; 4] {
        [
            RowMask::all(kb),
            RowMask::all(0),
            RowMask {
                limit: kb.saturating_sub(1).max(1),
                keys: None,
                pairs: None,
            },
            RowMask {
                limit: kb,
                keys: Some(&KEYS[..kb]),
                pairs: None,
            },
        ]
    }

    /// A decoding step's head in registers gives the bits of its twin in slices, at the edges
    /// of vectors and with each kind of mask, the keys and values strided as in a cache.
    #[test]
    fn step_head_in_registers_matches_its_twin_bit_for_bit() {
        if Isa::best().is_none() {
            eprintln!("skipped: no AVX2 or AVX-512F on this CPU (or VASWANI_MAX_ISA asks for less)");
            return;
        }
        let mut rng = StdRng::seed_from_u64(21);
        for &(dk, kb, dv) in &[
            (8, 1, 8),
            (32, 5, 16),
            (32, 16, 30),
            (64, 17, 64),
            (16, 33, 1),
            (64, 64, 64),
        ] {
            // Cached as the decoder keeps them: capacity 70 positions per row of keys.
            let kt = random(&mut rng, (dk, 70));
            let v = random(&mut rng, (70, dv + 3));
            let q: Vec<f32> = (0..dk).map(|_| rng.random_range(-2.0..2.0)).collect();
            let masks = step_masks(kb);
            // The head over keys and values (of either kind) laid out as kt and v are.
            fn over<'a, S>(
                q: &'a [f32],
                kt: *const S,
                v: *const S,
                dv: usize,
                kb: usize,
                mask: RowMask<'a>,
            ) -> StepHead<'a, f32, S> {
                StepHead {
                    q,
                    scale: 1.0 / (q.len() as f32).sqrt(),
                    kt,
                    kt_rs: 70,
                    v,
                    v_rs: (dv + 3) as isize,
                    kb,
                    mask,
                }
            }
            for mask in masks {
                let head = over(&q, kt.as_ptr(), v.as_ptr(), dv, kb, mask);
                let (mut got, mut want) = (vec![f32::NAN; dv], vec![f32::NAN; dv]);
                let mut scores = vec![0.0f32; 70];
                // SAFETY: kt holds dk rows of 70 ≥ kb, v 70 ≥ kb rows of dv + 3 ≥ dv.
                unsafe {
                    step_head(&head, &mut scores, &mut got);
                    step_head_slices(&head, &mut scores, &mut want);
                }
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "dk={dk} kb={kb} dv={dv} limit={}: {got:?} vs {want:?}",
                    mask.limit
                );
                assert!(got.iter().all(|x| x.is_finite()));

                // The same cache in bf16: both paths give the bits of the f32 path over the
                // values rounded to bf16 (each is widened exactly as it is read).
                use crate::kernels::gemm::bf16::{round_bf16, to_bf16};
                let (kt16, v16) = (kt.mapv(to_bf16), v.mapv(to_bf16));
                let (ktr, vr) = (kt.mapv(round_bf16), v.mapv(round_bf16));
                let head16 = over(&q, kt16.as_ptr(), v16.as_ptr(), dv, kb, mask);
                let rounded = over(&q, ktr.as_ptr(), vr.as_ptr(), dv, kb, mask);
                let (mut got16, mut want16, mut f32_rounded) =
                    (vec![f32::NAN; dv], vec![f32::NAN; dv], vec![f32::NAN; dv]);
                // SAFETY: as above, for arrays of the same shapes.
                unsafe {
                    step_head(&head16, &mut scores, &mut got16);
                    step_head_slices(&head16, &mut scores, &mut want16);
                    step_head(&rounded, &mut scores, &mut f32_rounded);
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got16), bits(&want16), "bf16 cache, dk={dk} kb={kb} dv={dv}");
                assert_eq!(
                    bits(&got16),
                    bits(&f32_rounded),
                    "bf16 cache against f32, dk={dk} kb={kb}"
                );
                if mask.limit > 0 {
                    assert_ne!(bits(&got16), bits(&got), "the keys and values were rounded");
                } else {
                    assert!(got.iter().all(|&x| x == 0.0), "no key: zeros, {got:?}");
                }
            }
        }
    }
    /// A decoding step's heads side by side give each head's bits alone, for every count of
    /// heads around the groups of four and eight, at the edges of vectors, with each kind of
    /// mask, over `f32` and bf16 caches laid out as the decoder keeps them.
    #[test]
    fn step_row_matches_each_head_alone_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(22);
        for &(heads, dk, kb, dv) in &[
            (1, 8, 1, 8),
            (3, 32, 5, 16),
            (4, 16, 16, 30),
            (5, 64, 17, 64),
            (8, 32, 32, 32),
            (8, 16, 33, 1),
            (9, 32, 12, 32),
            (12, 64, 64, 64),
            (13, 8, 3, 40),
            // Groups of four heads on AVX2 (at most three vectors a head), then two.
            (6, 16, 16, 16),
            (4, 8, 24, 8),
        ] {
            // Cached as the decoder keeps them: capacity 70 positions, heads one after another.
            let kt = random(&mut rng, (heads * dk, 70));
            let v = random(&mut rng, (heads * 70, dv + 3));
            let q: Vec<f32> = (0..heads * dk).map(|_| rng.random_range(-2.0..2.0)).collect();
            let masks = step_masks(kb);
            fn row<'a, S>(
                q: &'a [f32],
                heads: usize,
                kt: *const S,
                v: *const S,
                dv: usize,
                kb: usize,
                mask: RowMask<'a>,
            ) -> StepRow<'a, f32, S> {
                let dk = q.len() / heads;
                StepRow {
                    q,
                    scale: 1.0 / (dk as f32).sqrt(),
                    heads,
                    row_heads: heads,
                    kt,
                    kt_hs: (dk * 70) as isize,
                    kt_ss: 0,
                    kt_rs: 70,
                    v,
                    v_hs: (70 * (dv + 3)) as isize,
                    v_ss: 0,
                    v_rs: (dv + 3) as isize,
                    kb,
                    mask,
                    next: None,
                }
            }
            use crate::kernels::gemm::bf16::to_bf16;
            let (kt16, v16) = (kt.mapv(to_bf16), v.mapv(to_bf16));
            for mask in masks {
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let mut scores = vec![0.0f32; 70];
                let f32_row = row(&q, heads, kt.as_ptr(), v.as_ptr(), dv, kb, mask);
                let bf16_row = row(&q, heads, kt16.as_ptr(), v16.as_ptr(), dv, kb, mask);
                let (mut got, mut got16) = (vec![f32::NAN; heads * dv], vec![f32::NAN; heads * dv]);
                let (mut want, mut want16) = (got.clone(), got.clone());
                // SAFETY: every head's keys hold dk rows of 70 ≥ kb and its values 70 ≥ kb
                // rows of dv + 3 ≥ dv; out holds heads · dv floats.
                unsafe {
                    step_row(&f32_row, &mut scores, &mut got);
                    step_row(&bf16_row, &mut scores, &mut got16);
                    for hi in 0..heads {
                        step_head_slices(&f32_row.head(hi), &mut scores, &mut want[hi * dv..][..dv]);
                        step_head_slices(&bf16_row.head(hi), &mut scores, &mut want16[hi * dv..][..dv]);
                    }
                }
                let what = format!(
                    "heads={heads} dk={dk} kb={kb} dv={dv} limit={} keys={}",
                    mask.limit,
                    mask.keys.is_some()
                );
                assert_eq!(bits(&got), bits(&want), "f32 cache, {what}");
                assert_eq!(bits(&got16), bits(&want16), "bf16 cache, {what}");
                assert!(got.iter().all(|x| x.is_finite()), "{what}");
            }
        }
    }
}
