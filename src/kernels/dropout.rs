//! Dropout masks (§5.4): each element kept with probability 1 − p and scaled by 1/(1 − p).
//!
//! One `u64` drawn from the caller's seeded RNG is the key of a counter-based generator: the
//! draw of element i is a 32-bit hash of (key, i), compared with `p·2³²`. Elements are
//! independent of each other, so the mask is filled in parallel and with vector instructions
//! (about 0.1 ns an element on AVX-512, where a sequential generator took 2 ns), and is the
//! same for `f32` and `f64`, on every machine, for any number of threads.
//!
//! The hash is two rounds of a 32-bit integer mixer (`lowbias32`, by Chris Wellons) over the
//! counter xored with the two halves of the key: statistically fine for a Bernoulli draw,
//! not for cryptography.

use ndarray::{Array, Dimension, ShapeBuilder};
use rand::Rng;

use super::Float;
use super::parallel::for_each_chunk_mut;
use super::simd::widest;

/// A mask of `0` (dropped) and `1/(1 − p)` (kept) of the given shape.
///
/// # Panics
/// If `p` is not in [0, 1): layer configs check this before a mask is ever drawn.
pub fn dropout_mask<F: Float, D: Dimension, Sh: ShapeBuilder<Dim = D>>(
    p: f32,
    shape: Sh,
    rng: &mut impl Rng,
) -> Array<F, D> {
    DropKey::draw(p, rng).mask(shape)
}

/// A dropout mask given by its key rather than stored: element i of a flat (row-major) array
/// is kept, and scaled by `1/(1 − p)`, when `draw(key, i) ≥ p·2³²`, else dropped (0). The
/// same mask as [`dropout_mask`] draws from the same RNG, computed wherever it is needed (in
/// a GEMM's stores, inside a layer norm) instead of being written out and read back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropKey {
    key: u64,
    p: f32,
}

impl DropKey {
    /// A key for rate `p`, from one `u64` of `rng`.
    ///
    /// # Panics
    /// If `p` is not in [0, 1).
    pub fn draw(p: f32, rng: &mut impl Rng) -> DropKey {
        assert!((0.0..1.0).contains(&p), "dropout: p = {p} is not in [0, 1)");
        DropKey {
            key: rng.next_u64(),
            p,
        }
    }

    /// The dropout rate.
    pub fn p(self) -> f32 {
        self.p
    }

    /// The draws below this are dropped.
    #[inline(always)]
    pub(crate) fn threshold(self) -> u32 {
        // p < 1, so p·2³² < 2³².
        (self.p as f64 * 4_294_967_296.0) as u32
    }

    /// `1/(1 − p)`, the factor of kept elements.
    #[inline(always)]
    pub(crate) fn scale<F: Float>(self) -> F {
        F::from_f64(1.0 / (1.0 - self.p as f64))
    }

    /// The 64-bit key.
    #[inline(always)]
    pub(crate) fn key(self) -> u64 {
        self.key
    }

    /// The factor of element `i`: 0 or `1/(1 − p)`.
    #[inline(always)]
    pub fn factor<F: Float>(self, i: usize) -> F {
        if draw(self.key, i as u32) < self.threshold() {
            F::ZERO
        } else {
            self.scale()
        }
    }

    /// `x[j] ·= factor(offset + j)` for a run of elements that starts at flat index `offset`,
    /// vectorised and, for long runs, in parallel.
    pub fn apply<F: Float>(self, offset: usize, x: &mut [F]) {
        let len = x.len();
        for_each_chunk_mut(x, 64, 4 * len, |at, chunk| self.apply_here(offset + at, chunk));
    }

    /// [`DropKey::apply`] on this thread (a row at a time, inside a pass over the rows).
    pub(crate) fn apply_here<F: Float>(self, offset: usize, x: &mut [F]) {
        let (threshold, scale, key) = (self.threshold(), self.scale::<F>(), self.key);
        if let Some(x) = F::as_f32_mut(x) {
            let p = x.as_mut_ptr();
            // SAFETY: the run's floats, in place.
            if unsafe { self.vectors(offset, p, p, x.len()) } {
                return;
            }
        }
        // A product with the factor, 0 included, as a stored mask would give (NaN · 0 is
        // NaN, as in PyTorch).
        widest!(for (j, v) in x.iter_mut().enumerate() {
            let keep = draw(key, (offset + j) as u32) >= threshold;
            *v *= if keep { scale } else { F::ZERO };
        })
    }

    /// `dst[j] = src[j] · factor(offset + j)`: [`DropKey::apply`] into another run, on this
    /// thread (a row at a time, inside a pass over the rows).
    ///
    /// # Panics
    /// If the runs differ in length.
    pub fn apply_to<F: Float>(self, offset: usize, src: &[F], dst: &mut [F]) {
        assert_eq!(
            src.len(),
            dst.len(),
            "DropKey::apply_to: runs of different lengths"
        );
        let (threshold, scale, key) = (self.threshold(), self.scale::<F>(), self.key);
        if let (Some(src), Some(dst)) = (F::as_f32(src), F::as_f32_mut(dst)) {
            let n = dst.len();
            // SAFETY: the runs have the same length (asserted) and do not overlap.
            if unsafe { self.vectors(offset, src.as_ptr(), dst.as_mut_ptr(), n) } {
                return;
            }
        }
        widest!(for (j, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
            let keep = draw(key, (offset + j) as u32) >= threshold;
            *d = s * if keep { scale } else { F::ZERO };
        })
    }

    /// `dst[j] = src[j] · factor(offset + j)` for `len` floats by the vector kernel of the
    /// level in use (`drop_avx512`, `drop_avx2`), or `false` and nothing done where there is
    /// none.
    ///
    /// # Safety
    /// `src` and `dst` address `len` floats each: the same ones, or runs that do not overlap.
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // read by the x86 paths
    unsafe fn vectors(self, offset: usize, src: *const f32, dst: *mut f32, len: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let (key, threshold, scale) = (self.key, self.threshold(), self.scale::<f32>());
            if super::cpu::avx512() {
                // SAFETY: the CPU has AVX-512F (checked); the runs as the caller vouches.
                unsafe { drop_avx512(key, threshold, scale, offset as u32, src, dst, len) };
                return true;
            }
            if super::cpu::avx2() {
                // SAFETY: the CPU has AVX2 (checked); the runs as the caller vouches.
                unsafe { drop_avx2(key, threshold, scale, offset as u32, src, dst, len) };
                return true;
            }
        }
        false
    }

    /// The mask itself, of `shape` (flat indices in row-major order).
    pub fn mask<F: Float, D: Dimension, Sh: ShapeBuilder<Dim = D>>(self, shape: Sh) -> Array<F, D> {
        // SAFETY: `fill_mask` writes every element of the (new, standard layout) view.
        unsafe {
            super::workspace::filled(shape, |mut mask: ndarray::ArrayViewMut<'_, F, D>| {
                fill_mask(
                    self.p,
                    self.key,
                    mask.as_slice_mut().expect("a new array is contiguous"),
                )
            })
        }
    }
}

/// A [`DropKey`]'s mask over a matrix that lies inside the flat array it was drawn for:
/// element `(i, j)` is flat element `at + i·stride + j` (one head's `[Tq, Tk]` inside the
/// attention weights `[B, H, Tq, Tk]`), so a pass over any part of the matrix computes the
/// factors it needs where it needs them, and no mask is stored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropRows {
    pub key: DropKey,
    /// Flat index of element `(0, 0)`.
    pub at: usize,
    /// Flat distance between rows.
    pub stride: usize,
}

impl DropRows {
    /// `dst[j] = src[j] · factor(i, j)` for the first `src.len()` elements of row `i`.
    ///
    /// # Panics
    /// If the runs differ in length.
    pub fn apply_to<F: Float>(self, i: usize, src: &[F], dst: &mut [F]) {
        self.key.apply_to(self.at + i * self.stride, src, dst)
    }

    /// `x[j] ·= factor(i, j)` for the first `x.len()` elements of row `i`.
    pub fn apply<F: Float>(self, i: usize, x: &mut [F]) {
        self.key.apply_here(self.at + i * self.stride, x)
    }

    /// `P ⊙ M` for `p`, rows `first..` of the matrix (each row contiguous), as a new array.
    #[cfg(test)]
    pub fn times<F: Float>(self, first: usize, p: ndarray::ArrayView2<F>) -> ndarray::Array2<F> {
        let mut kept = ndarray::Array2::zeros(p.dim());
        self.times_into(first, p, kept.as_slice_mut().expect("a new array"));
        kept
    }

    /// `P ⊙ M` for `p`, rows `first..` of the matrix (each row contiguous), into the first
    /// `p.len()` elements of `buf`, as a view of `p`'s shape.
    ///
    /// # Panics
    /// If `buf` is shorter than `p`, or `p`'s rows are not contiguous.
    pub fn times_into<'b, F: Float>(
        self,
        first: usize,
        p: ndarray::ArrayView2<F>,
        buf: &'b mut [F],
    ) -> ndarray::ArrayViewMut2<'b, F> {
        let mut kept =
            ndarray::ArrayViewMut2::from_shape(p.dim(), &mut buf[..p.len()]).expect("a buffer of p's size");
        for (i, (p, mut kept)) in p.rows().into_iter().zip(kept.rows_mut()).enumerate() {
            let (p, kept) = (p.to_slice(), kept.as_slice_mut());
            self.apply_to(
                first + i,
                p.expect("contiguous rows"),
                kept.expect("a dense view"),
            );
        }
        kept
    }

    /// The factors of the first `rows × cols` elements, as a stored mask (for tests).
    #[cfg(test)]
    pub fn dense<F: Float>(self, rows: usize, cols: usize) -> ndarray::Array2<F> {
        ndarray::Array2::from_shape_fn((rows, cols), |(i, j)| {
            self.key.factor(self.at + i * self.stride + j)
        })
    }
}

/// Fills `out` with the mask of elements `0..out.len()` for `key`: 0 where `draw(key, i) <
/// p·2³²`, else `1/(1 − p)`.
pub(crate) fn fill_mask<F: Float>(p: f32, key: u64, out: &mut [F]) {
    let threshold = (p as f64 * 4_294_967_296.0) as u64;
    let keep = F::from_f64(1.0 / (1.0 - p as f64));
    let len = out.len();
    for_each_chunk_mut(out, 64, 4 * len, |at, chunk| match F::as_f32_mut(chunk) {
        Some(chunk) => fill_f32(threshold, keep.to_f64() as f32, key, at, chunk),
        None => {
            for (i, x) in chunk.iter_mut().enumerate() {
                *x = if (draw(key, (at + i) as u32) as u64) < threshold {
                    F::ZERO
                } else {
                    keep
                };
            }
        }
    });
}

/// The draw of element `i` for `key`.
#[inline(always)]
pub(crate) fn draw(key: u64, i: u32) -> u32 {
    mix(mix(i ^ key as u32) ^ (key >> 32) as u32)
}

/// [`DropKey::apply_to`] and [`DropKey::apply`] for `f32` in 16 lanes: the draws of 16 consecutive indices at once
/// ([`draw`] lane by lane: the counter wraps at 2³² as `as u32` does), each element times
/// its factor (0 for a dropped one, so NaN stays NaN, as in the scalar loop). The loop the
/// compiler made of the scalar form ran in 8 lanes with 64-bit counters: 1.4% of a small
/// training step (AMD EPYC Zen 5), for a pass a mask fill does about seven times faster.
///
/// # Safety
/// The CPU must have AVX-512F; `src` and `dst` address `len` floats each (the same ones, for
/// [`DropKey::apply`] in place, or runs that do not overlap).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn drop_avx512(
    key: u64,
    threshold: u32,
    scale: f32,
    offset: u32,
    src: *const f32,
    dst: *mut f32,
    len: usize,
) {
    use std::arch::x86_64::*;
    let (lo, hi) = (
        _mm512_set1_epi32(key as u32 as i32),
        _mm512_set1_epi32((key >> 32) as u32 as i32),
    );
    let thr = _mm512_set1_epi32(threshold as i32);
    let (zero, factor) = (_mm512_setzero_ps(), _mm512_set1_ps(scale));
    let step = _mm512_set1_epi32(16);
    let mut idx = _mm512_add_epi32(
        _mm512_set1_epi32(offset as i32),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    );
    for at in (0..len).step_by(16) {
        let draw = mix16(_mm512_xor_si512(mix16(_mm512_xor_si512(idx, lo)), hi));
        let keep = _mm512_cmpge_epu32_mask(draw, thr);
        let f = _mm512_mask_mov_ps(zero, keep, factor);
        let lanes = super::simd::first_lanes(len - at);
        // SAFETY: elements at.. of both runs, as many as are left (at most 16).
        unsafe {
            let x = _mm512_maskz_loadu_ps(lanes, src.add(at));
            _mm512_mask_storeu_ps(dst.add(at), lanes, _mm512_mul_ps(x, f));
        }
        idx = _mm512_add_epi32(idx, step);
    }
}

/// [`drop_avx512`] in 8 lanes, for CPUs with AVX2 and not AVX-512: the compiler's loop of the
/// scalar form took about 6 ns an element there, and the attention's dropout by key (three
/// passes over the weights a training step) 7.8% of a small training step (AMD EPYC Zen 5,
/// `VASWANI_MAX_ISA=avx2`). The draws are [`draw`]'s, lane by lane (the unsigned comparison
/// as `max(draw, threshold) = draw`).
///
/// # Safety
/// The CPU must have AVX2; `src` and `dst` address `len` floats each (the same ones, or runs
/// that do not overlap).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn drop_avx2(
    key: u64,
    threshold: u32,
    scale: f32,
    offset: u32,
    src: *const f32,
    dst: *mut f32,
    len: usize,
) {
    use std::arch::x86_64::*;
    let (lo, hi) = (
        _mm256_set1_epi32(key as u32 as i32),
        _mm256_set1_epi32((key >> 32) as u32 as i32),
    );
    let thr = _mm256_set1_epi32(threshold as i32);
    let factor = _mm256_set1_ps(scale);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut idx = _mm256_add_epi32(_mm256_set1_epi32(offset as i32), lanes);
    let step = _mm256_set1_epi32(8);
    for at in (0..len).step_by(8) {
        let draw = mix8(_mm256_xor_si256(mix8(_mm256_xor_si256(idx, lo)), hi));
        let keep = _mm256_cmpeq_epi32(_mm256_max_epu32(draw, thr), draw);
        let f = _mm256_and_ps(_mm256_castsi256_ps(keep), factor);
        let left = len - at;
        // SAFETY: elements at.. of both runs, as many as are left (masked below 8: a masked
        // store per vector is a microcoded sequence on AMD's cores before Zen 4).
        unsafe {
            if left >= 8 {
                _mm256_storeu_ps(dst.add(at), _mm256_mul_ps(_mm256_loadu_ps(src.add(at)), f));
            } else {
                let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), lanes);
                let x = _mm256_maskload_ps(src.add(at), live);
                _mm256_maskstore_ps(dst.add(at), live, _mm256_mul_ps(x, f));
            }
        }
        idx = _mm256_add_epi32(idx, step);
    }
}

/// [`mix`] on 8 lanes: the mixer of [`draw`], for the AVX2 paths (dropout by key here,
/// dropout in the GEMM's stores).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn mix8(x: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
    let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb_352d));
    let x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
    let x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x846c_a68b_u32 as i32));
    _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
}

/// [`mix`] on 16 lanes: the mixer of [`draw`], for the vector paths (dropout by key here,
/// dropout in the GEMM's stores).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn mix16(x: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
    let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb_352d));
    let x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
    let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x846c_a68b_u32 as i32));
    _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
}

/// `lowbias32`: a 32-bit integer hash with good avalanche.
#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The `f32` loop, compiled for the widest vectors the CPU has.
fn fill_f32(threshold: u64, keep: f32, key: u64, at: usize, out: &mut [f32]) {
    #[inline(always)]
    fn body(threshold: u64, keep: f32, key: u64, at: usize, out: &mut [f32]) {
        // p < 1, so the threshold fits in 32 bits unless p rounds to 1 in f64 (it cannot).
        let threshold = threshold.min(u32::MAX as u64) as u32;
        for (i, x) in out.iter_mut().enumerate() {
            *x = if draw(key, (at + i) as u32) < threshold {
                0.0
            } else {
                keep
            };
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2")]
        fn avx512(threshold: u64, keep: f32, key: u64, at: usize, out: &mut [f32]) {
            body(threshold, keep, key, at, out)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(threshold: u64, keep: f32, key: u64, at: usize, out: &mut [f32]) {
            body(threshold, keep, key, at, out)
        }
        if super::cpu::avx512() {
            // SAFETY: the CPU has AVX-512F (checked).
            return unsafe { avx512(threshold, keep, key, at, out) };
        }
        if super::cpu::avx2() {
            // SAFETY: the CPU has AVX2 (checked).
            return unsafe { avx2(threshold, keep, key, at, out) };
        }
    }
    body(threshold, keep, key, at, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn keeps_about_one_minus_p_and_scales_survivors() {
        let mut rng = StdRng::seed_from_u64(12);
        let m: Array2<f32> = dropout_mask(0.3, (200, 300), &mut rng);
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
        // Same seed, same mask, whatever the float type.
        let a: Array2<f32> = dropout_mask(0.5, (40, 50), &mut StdRng::seed_from_u64(1));
        let b: Array2<f64> = dropout_mask(0.5, (40, 50), &mut StdRng::seed_from_u64(1));
        assert!(a.iter().zip(&b).all(|(x, y)| (*x == 0.0) == (*y == 0.0)));
        // p = 0 keeps everything unscaled.
        let z: Array2<f32> = dropout_mask(0.0, (3, 3), &mut rng);
        assert!(z.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn the_vector_loop_matches_the_scalar_draws_on_any_thread_count() {
        let key = 0x1234_5678_9abc_def0;
        let want: Vec<f32> = (0..10_000u32)
            .map(|i| {
                if draw(key, i) < (0.25 * 4_294_967_296.0) as u32 {
                    0.0
                } else {
                    1.0 / 0.75
                }
            })
            .collect();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut got = vec![f32::NAN; want.len()];
            pool.install(|| fill_mask(0.25, key, &mut got));
            assert_eq!(got, want, "threads={threads}");
        }
    }

    /// Runs of `f32` for the kernels' tests, each with the scalar factor of each element
    /// applied: `(offset, run, expected)` for runs that end inside a vector, offsets whose
    /// counters wrap at 2³², and NaN that a dropped element keeps (NaN · 0).
    fn runs(key: DropKey) -> Vec<(usize, Vec<f32>, Vec<f32>)> {
        [
            (0usize, 1usize),
            (5, 7),
            (3, 37),
            (1000, 4096 + 5),
            ((1 << 32) - 20, 77),
        ]
        .into_iter()
        .map(|(offset, len)| {
            let src: Vec<f32> = (0..len)
                .map(|i| {
                    if i % 13 == 5 {
                        f32::NAN
                    } else {
                        i as f32 * 0.25 - 3.0
                    }
                })
                .collect();
            let want = src
                .iter()
                .enumerate()
                .map(|(j, &x)| x * key.factor::<f32>(offset + j))
                .collect();
            (offset, src, want)
        })
        .collect()
    }

    fn same(got: &[f32], want: &[f32]) -> bool {
        got.len() == want.len() && got.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits())
    }

    /// `apply` and `apply_to` (the path of the level in use: 16 lanes on AVX-512, 8 on AVX2,
    /// the compiler's loop elsewhere) against the scalar factor of each element.
    #[test]
    fn apply_and_apply_to_match_the_scalar_factor_of_each_element() {
        let key = DropKey::draw(0.3, &mut StdRng::seed_from_u64(5));
        for (offset, src, want) in runs(key) {
            let len = src.len();
            let mut dst = vec![f32::NAN; len];
            key.apply_to(offset, &src, &mut dst);
            assert!(same(&dst, &want), "apply_to at {offset}, {len} elements");
            let mut x = src.clone();
            key.apply(offset, &mut x);
            assert!(same(&x, &want), "apply at {offset}, {len} elements");
            let dropped = (0..len).filter(|&j| key.factor::<f32>(offset + j) == 0.0).count();
            assert!(
                len < 100 || dropped > len / 5,
                "about 30% dropped, got {dropped} of {len}"
            );
        }
    }

    /// The AVX2 kernel against the scalar factor of each element, whatever level the process
    /// runs at (it is called directly): in place and into another run.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_kernel_matches_the_scalar_factor_of_each_element() {
        if !(std::arch::is_x86_feature_detected!("avx2")) {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let key = DropKey::draw(0.3, &mut StdRng::seed_from_u64(6));
        let scale = key.scale::<f32>();
        for (offset, src, want) in runs(key) {
            let len = src.len();
            let mut dst = vec![f32::NAN; len + 3];
            let mut x = src.clone();
            // SAFETY: the CPU has AVX2 (checked); len floats in each run.
            unsafe {
                drop_avx2(
                    key.key(),
                    key.threshold(),
                    scale,
                    offset as u32,
                    src.as_ptr(),
                    dst.as_mut_ptr(),
                    len,
                );
                drop_avx2(
                    key.key(),
                    key.threshold(),
                    scale,
                    offset as u32,
                    x.as_ptr(),
                    x.as_mut_ptr(),
                    len,
                );
            }
            assert!(
                same(&dst[..len], &want),
                "into another run at {offset}, {len} elements"
            );
            assert!(dst[len..].iter().all(|v| v.is_nan()), "wrote past the run");
            assert!(same(&x, &want), "in place at {offset}, {len} elements");
        }
    }

    #[test]
    fn neighbouring_elements_and_keys_are_uncorrelated() {
        // Pairs (i, i+1) kept together about (1 − p)² of the time; two keys agree about
        // p² + (1 − p)² of the time.
        let p = 0.5;
        let n = 200_000u32;
        let t = (p * 4_294_967_296.0) as u32;
        let kept = |key: u64, i: u32| draw(key, i) >= t;
        let both = (0..n - 1).filter(|&i| kept(7, i) && kept(7, i + 1)).count() as f64 / n as f64;
        assert!((both - 0.25).abs() < 0.01, "both kept {both}");
        let agree = (0..n).filter(|&i| kept(7, i) == kept(8, i)).count() as f64 / n as f64;
        assert!((agree - 0.5).abs() < 0.01, "agree {agree}");
    }
}
