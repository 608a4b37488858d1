//! The AVX2 path of a decoding step's attention ([`super::step_head`], [`super::step_row`]):
//! a head's scores and its output in 8-lane registers, up to [`MAX_KEYS`] keys and value
//! features, for CPUs without AVX-512 (whose own path, in `avx512`, comes first where it
//! runs). Each of a head's sums is a chain of dependent fused multiply-adds (a score over the
//! `d_k` features, an output feature over the positions); in slices each link went through a
//! store and a load of the partial sum, and one head alone leaves the core waiting on each
//! link. Here the sums stay in registers and the heads run side by side, four, two or one at a
//! time so that their sums fill at most twelve of the sixteen registers. The arithmetic is
//! [`super::step_head_slices`]'s, term for term, and the softmax the same function's, so the
//! bits are the same (tested). The module builds on x86-64 only; the path checks at run time
//! that the kernels may use AVX2 and FMA.

use std::arch::x86_64::*;

use super::{Cached, StepCache, StepHead, StepRow, as_f32};
use crate::kernels::Float;

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
    fn head(&self, hi: usize) -> (&[f32], f32, *const S, isize, *const S, isize) {
        match self {
            HeadsOf::One(h) => (h.q, h.scale, h.kt, h.kt_rs, h.v, h.v_rs),
            HeadsOf::Row(r) => {
                let dk = r.q.len() / r.heads;
                (
                    &r.q[hi * dk..][..dk],
                    r.scale,
                    r.kt.wrapping_offset(hi as isize * r.kt_hs),
                    r.kt_rs,
                    r.v.wrapping_offset(hi as isize * r.v_hs),
                    r.v_rs,
                )
            }
        }
    }

    /// The keys taking part and the mask of the query's row, in every head.
    fn keys(&self) -> (usize, crate::kernels::softmax::RowMask<'_>) {
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
        for p in &mut probs {
            crate::kernels::softmax::softmax_row_inline(&mut p[..kb], mask);
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
    let mut acc = [[_mm256_setzero_ps(); NK]; G];
    for d in 0..dk {
        for (g, acc) in acc.iter_mut().enumerate() {
            let (q, scale, kt, kt_rs, ..) = each[g];
            let qd = _mm256_set1_ps(q[d] * scale);
            // SAFETY: the head's row d of keys holds kb elements (caller); each load reads
            // those of its vector.
            let row = unsafe { kt.offset(d as isize * kt_rs) };
            for (c, acc) in acc.iter_mut().enumerate() {
                let k = unsafe { S::lanes(row.add(c * W), kb - c * W) };
                *acc = _mm256_fmadd_ps(qd, k, *acc);
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
/// the allowed positions in order, the `G` heads' chains interleaved.
///
/// # Safety
/// As [`group`]; `d_v` fills `NO` vectors.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // j indexes a position in every head's weights
unsafe fn values<S: Lanes, const G: usize, const NO: usize>(
    heads: &HeadsOf<'_, '_, S>,
    first: usize,
    probs: &[[f32; MAX_KEYS]; G],
    out: &mut [f32],
) {
    let (kb, mask) = heads.keys();
    let dv = out.len() / G;
    let each: [_; G] = std::array::from_fn(|g| heads.head(first + g));
    let plain = mask.keys.is_none() && mask.pairs.is_none();
    let mut acc = [[_mm256_setzero_ps(); NO]; G];
    for j in 0..mask.limit.min(kb) {
        if plain || mask.allows(j) {
            for (g, acc) in acc.iter_mut().enumerate() {
                let (.., v, v_rs) = each[g];
                let p = _mm256_set1_ps(probs[g][j]);
                // SAFETY: the head's value row j holds d_v elements (caller); each load reads
                // those of its vector.
                let row = unsafe { v.offset(j as isize * v_rs) };
                for (c, acc) in acc.iter_mut().enumerate() {
                    let x = unsafe { S::lanes(row.add(c * W), dv - c * W) };
                    *acc = _mm256_fmadd_ps(p, x, *acc);
                }
            }
        }
    }
    for (o, acc) in out.chunks_exact_mut(dv).zip(&acc) {
        for (c, &x) in acc.iter().enumerate() {
            let o = &mut o[c * W..];
            if o.len() >= W {
                // SAFETY: 8 floats of the head's output.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), x) };
            } else {
                let mut lanes = [0.0f32; W];
                // SAFETY: a local array of 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
                let n = o.len();
                o.copy_from_slice(&lanes[..n]);
            }
        }
    }
}

/// Eight cached elements as `f32` lanes: the first `n` read (all eight where `n ≥ 8`), the
/// others zero and not read.
trait Lanes: Copy {
    /// # Safety
    /// The CPU has AVX2; `min(n, 8) ≥ 1` elements are readable at `p`.
    unsafe fn lanes(p: *const Self, n: usize) -> __m256;
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
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes))
            }
        }
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
