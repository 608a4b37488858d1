//! Plain loops compiled for the widest vectors the CPU has, and sums whose order does not
//! depend on them.
//!
//! The crate-internal `widest!` macro compiles one body three times (AVX-512, AVX2 + FMA, the baseline x86-64) and
//! runs the best the CPU has, checked at run time: the crate builds for a generic x86-64 and
//! still uses the vectors of the machine it runs on. The compiler vectorises a loop only
//! where that keeps its arithmetic exactly as written, so the three builds give the same
//! bits.
//!
//! A plain sum `x.iter().sum()` is a chain of dependent additions that cannot be vectorised
//! without changing its rounding. [`sum`] and [`dot`] instead add into [`LANES`] partial sums,
//! element j into lane `j % LANES`, and add the lanes in a fixed tree: the compiler turns the
//! lanes into vector registers, and the order of additions, hence the result, is the same on
//! every machine and for every build.

use super::Float;

/// Partial sums of [`sum`] and [`dot`].
pub const LANES: usize = 16;

/// The mask of the first `n` lanes (all 16 from `n ≥ 16` on) of a 16-lane vector: the
/// masked loads and stores of rows that end inside a vector.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn first_lanes(n: usize) -> u16 {
    if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as u16 }
}

/// Runs `$body` (an expression) compiled with AVX-512, with AVX2 and FMA, or for the
/// baseline, whichever is the widest this CPU runs.
macro_rules! widest {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[inline]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[inline]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if $crate::kernels::cpu::avx512() {
                // SAFETY: the CPU has AVX-512F (checked).
                unsafe { avx512(|| $body) }
            } else if $crate::kernels::cpu::avx2() {
                // SAFETY: the CPU has AVX2 and FMA (checked).
                unsafe { avx2(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}
pub(crate) use widest;

/// Slices at least this long (in bytes) are zeroed by [`fill_streaming`] with non-temporal
/// stores.
#[cfg(target_arch = "x86_64")]
pub(crate) const STREAM_MIN_BYTES: usize = 1 << 20;

/// Sets every element of `x` to `value`, in the widest vectors.
pub(crate) fn fill<F: Float>(x: &mut [F], value: F) {
    widest!(x.fill(value))
}

/// [`fill`] for memory that is not read again soon (a gradient accumulator at the start of a
/// step, [`crate::params::Params::fill`]): a long `f32` slice set to zero is written with
/// non-temporal stores, which do not read each line before writing it and leave the caches
/// to the data in use (zeroing the base workload's 193 MB of gradients: 31 ms with 16-byte
/// stores, 20 ms with 64-byte ones, 9 ms non-temporal, on the Intel Xeon of
/// `docs/performance.md`).
pub(crate) fn fill_streaming<F: Float>(x: &mut [F], value: F) {
    #[cfg(target_arch = "x86_64")]
    if value.to_f64().to_bits() == 0
        && std::mem::size_of_val(x) >= STREAM_MIN_BYTES
        && super::cpu::avx512()
        && let Some(x) = F::as_f32_mut(x)
    {
        // SAFETY: the CPU has AVX-512F (checked).
        unsafe { zero_streaming(x) };
        return;
    }
    fill(x, value)
}

/// Zeroes `x` with 64-byte non-temporal stores (plain stores for the unaligned ends), then
/// fences them, so that later loads and stores on any thread see zeros.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn zero_streaming(x: &mut [f32]) {
    use std::arch::x86_64::{_mm_sfence, _mm512_setzero_ps, _mm512_stream_ps};
    let head = x.as_ptr().align_offset(64).min(x.len());
    let (head, rest) = x.split_at_mut(head);
    head.fill(0.0);
    let body = rest.len() / 16 * 16;
    let (body, tail) = rest.split_at_mut(body);
    let p = body.as_mut_ptr();
    for i in (0..body.len()).step_by(16) {
        // SAFETY: p + i is 64-byte aligned and 16 floats of `body` follow it.
        unsafe { _mm512_stream_ps(p.add(i), _mm512_setzero_ps()) };
    }
    tail.fill(0.0);
    _mm_sfence();
}

/// Adds the [`LANES`] partial sums in a fixed tree.
#[inline(always)]
pub(crate) fn reduce<F: Float>(mut acc: [F; LANES]) -> F {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// `Σ f(j)` over `0..len`, element j into lane `j % LANES`, the lanes added in a fixed tree.
/// The slice forms below ([`sum_map`], [`sum_zip`], [`sum_zip3`]) give the same bits and,
/// unlike this one, let the compiler vectorise (no index to check).
#[inline(always)]
pub fn sum_by<F: Float>(len: usize, f: impl Fn(usize) -> F) -> F {
    let mut acc = [F::ZERO; LANES];
    let whole = len - len % LANES;
    let mut j = 0;
    while j < whole {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(j + l);
        }
        j += LANES;
    }
    for (l, a) in acc.iter_mut().enumerate().take(len - whole) {
        *a += f(whole + l);
    }
    reduce(acc)
}

/// `Σ f(x_j)`, element j into lane `j % LANES`, the lanes added in a fixed tree.
#[inline(always)]
pub fn sum_map<T: Copy, F: Float>(x: &[T], f: impl Fn(T) -> F) -> F {
    let mut acc = [F::ZERO; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[T; LANES] = c.try_into().expect("a whole chunk");
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(v);
    }
    reduce(acc)
}

/// `Σ f(x_j, y_j)`, in the lanes of [`sum_map`].
///
/// # Panics
/// If the lengths differ.
#[inline(always)]
pub fn sum_zip<T: Copy, F: Float>(x: &[T], y: &[T], f: impl Fn(T, T) -> F) -> F {
    assert_eq!(x.len(), y.len(), "sum_zip: lengths differ");
    let mut acc = [F::ZERO; LANES];
    let (mut cx, mut cy) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    for (a, b) in (&mut cx).zip(&mut cy) {
        let a: &[T; LANES] = a.try_into().expect("a whole chunk");
        let b: &[T; LANES] = b.try_into().expect("a whole chunk");
        for l in 0..LANES {
            acc[l] += f(a[l], b[l]);
        }
    }
    for ((s, &a), &b) in acc.iter_mut().zip(cx.remainder()).zip(cy.remainder()) {
        *s += f(a, b);
    }
    reduce(acc)
}

/// `Σ f(x_j, y_j, z_j)`, in the lanes of [`sum_map`].
///
/// # Panics
/// If the lengths differ.
#[inline(always)]
pub fn sum_zip3<T: Copy, F: Float>(x: &[T], y: &[T], z: &[T], f: impl Fn(T, T, T) -> F) -> F {
    assert!(
        x.len() == y.len() && x.len() == z.len(),
        "sum_zip3: lengths differ"
    );
    let mut acc = [F::ZERO; LANES];
    let (mut cx, mut cy, mut cz) = (
        x.chunks_exact(LANES),
        y.chunks_exact(LANES),
        z.chunks_exact(LANES),
    );
    for ((a, b), c) in (&mut cx).zip(&mut cy).zip(&mut cz) {
        let a: &[T; LANES] = a.try_into().expect("a whole chunk");
        let b: &[T; LANES] = b.try_into().expect("a whole chunk");
        let c: &[T; LANES] = c.try_into().expect("a whole chunk");
        for l in 0..LANES {
            acc[l] += f(a[l], b[l], c[l]);
        }
    }
    let rest = cx.remainder().iter().zip(cy.remainder()).zip(cz.remainder());
    for (s, ((&a, &b), &c)) in acc.iter_mut().zip(rest) {
        *s += f(a, b, c);
    }
    reduce(acc)
}

/// The largest element of x, NaN ignored (`−∞` for an empty or all-NaN slice), in lanes as
/// [`sum_by`]: the same value in any order, but with independent chains the compiler can
/// turn into vector maxima.
#[inline(always)]
pub fn max<F: Float>(x: &[F]) -> F {
    let mut acc = [F::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if v > *a { v } else { *a };
    }
    acc.iter()
        .fold(F::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `Σ x`, in the lanes of [`sum_map`].
#[inline(always)]
pub fn sum<F: Float>(x: &[F]) -> F {
    sum_map(x, |v| v)
}

/// `Σ x ⊙ y`, in the lanes of [`sum_map`].
///
/// # Panics
/// If the lengths differ.
#[inline(always)]
pub fn dot<F: Float>(x: &[F], y: &[F]) -> F {
    sum_zip(x, y, |a, b| a * b)
}

/// The constants of [`exp_f32`] (Cephes' `expf`), shared with its vector forms.
#[allow(clippy::excessive_precision)] // Cephes' coefficients as published
pub(crate) mod exp_consts {
    /// Inputs are clamped to this from below: it rounds to `n = −126`, whose `2ⁿ⁻¹` has the
    /// exponent bits 0, so the result is exactly 0 there (eˣ < 1.7·10⁻³⁸ below −86.988).
    pub const LOW: f32 = -87.3;
    /// Inputs are clamped to this from above: it rounds to `n = 128`, and `e·2¹²⁸` with
    /// `e ≥ 1` (every input past 128·ln 2 = 88.7228) overflows to +∞.
    pub const CLAMP: f32 = 88.76;
    /// ln 2 in two parts, `C1 + C2`, for an exact `x − n·ln 2`.
    pub const C1: f32 = 0.693_359_4;
    pub const C2: f32 = -2.121_944_4e-4;
    /// Rounds to the nearest integer for |v| < 2²², by the float adder.
    pub const ROUND: f32 = 12_582_912.0;
    /// The exponent bits of `2ⁿ⁻¹` from the bits of `n·… + ROUND` (whose low mantissa bits
    /// hold n): add this and shift left by 23.
    pub const BIAS: i32 = 126 - ROUND.to_bits() as i32;
    /// The polynomial for `(eʳ − 1 − r)/r²`, highest power first.
    pub const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5.000_000_1e-1,
    ];
}

/// `eˣ` in `f32` by range reduction and a polynomial (Cephes' `expf`), in fused
/// multiply-adds, so that a loop of it vectorises and gives the same bits in every build.
/// Within 2 ulp of the exact value from −86.98 to 88.72; 0 below about −86.988 (where
/// eˣ < 1.7·10⁻³⁸, near the smallest normal float), +∞ above 128·ln 2 ≈ 88.7228, NaN for NaN.
///
/// The limits come out of the arithmetic (inputs clamped to −87.3 and 88.76, which give
/// `2ⁿ⁻¹ = 0` from exponent bits 0 and an overflow): the vector forms need no fix-up after
/// the polynomial, 18 operations a vector where there had been 34. A CPU without FMA
/// runs `mul_add` in software (correct, slower): the crate's loops of it run in functions
/// built for AVX2 and FMA or AVX-512 where the CPU has them (`widest!`).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    use exp_consts::*;
    // max/min rather than clamp: NaN becomes LOW here and the input NaN is returned at the end
    // (the vector forms carry NaN through instead: NaN either way).
    #[allow(clippy::manual_clamp)] // clamp would keep NaN; the result is NaN either way
    let xc = x.max(LOW).min(CLAMP);
    let t = xc.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = (-n).mul_add(C1, xc);
    let r = (-n).mul_add(C2, r);
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    // 2ⁿ = 2ⁿ⁻¹·2 from the exponent bits (n is in [−126, 128]; 2⁻¹²⁷ comes out as 0).
    let half = f32::from_bits(((t.to_bits() as i32).wrapping_add(BIAS) as u32) << 23);
    let v = e * half * 2.0;
    if x.is_nan() { x } else { v }
}

/// The constants of [`exp_f64`] (Cephes' range reduction, a Taylor polynomial).
#[allow(clippy::excessive_precision)] // Cephes' constant as published
pub(crate) mod exp64_consts {
    /// Inputs are clamped to this from below: it rounds to `n = −1022`, whose `2ⁿ⁻¹` has the
    /// exponent bits 0, so the result is exactly 0 there (eˣ < 4.5·10⁻³⁰⁸ below about
    /// −707.7: results near and below the smallest normal double are flushed to 0).
    pub const LOW: f64 = -708.5;
    /// Inputs are clamped to this from above: it rounds to `n = 1024`, and `e·2¹⁰²⁴` with
    /// `e ≥ 1` (every input past 1024·ln 2 = 709.7827) overflows to +∞.
    pub const CLAMP: f64 = 709.8;
    /// ln 2 in two parts, `C1 + C2`, for an exact `x − n·ln 2` (`n·C1` exact for |n| ≤ 2¹¹).
    pub const C1: f64 = 6.931_457_519_531_25e-1;
    pub const C2: f64 = 1.428_606_820_309_417_232_12e-6;
    /// Rounds to the nearest integer for |v| < 2⁵¹, by the float adder.
    pub const ROUND: f64 = 6_755_399_441_055_744.0;
    /// The exponent bits of `2ⁿ⁻¹` from the bits of `n·… + ROUND` (whose low mantissa bits
    /// hold n): add this and shift left by 52.
    pub const BIAS: i64 = 1022 - ROUND.to_bits() as i64;
    /// `(eʳ − 1 − r)/r² = Σ_{k≥2} r^(k−2)/k!` to `k = 13`, highest power first: over
    /// |r| ≤ ln 2 / 2 the next term is below 4·10⁻¹⁸.
    pub const TAYLOR: [f64; 12] = [
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
}

/// `eˣ` in `f64` as [`exp_f32`] computes it in `f32`: range reduction and a polynomial in
/// fused multiply-adds, so that a loop of it vectorises and gives the same bits in every
/// build (the log-normaliser of a scored token or a beam's candidates, [`crate::kernels::loss`],
/// had taken `libm`'s `exp` a call per vocabulary entry). Within 2 ulp of `libm`'s from
/// −707.7 to 709.78; 0 below about −707.7 (near and below the smallest normal double), +∞
/// above 1024·ln 2, NaN for NaN.
#[inline(always)]
pub(crate) fn exp_f64(x: f64) -> f64 {
    use exp64_consts::*;
    #[allow(clippy::manual_clamp)] // clamp would keep NaN; the result is NaN either way
    let xc = x.max(LOW).min(CLAMP);
    let t = xc.mul_add(std::f64::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = (-n).mul_add(C1, xc);
    let r = (-n).mul_add(C2, r);
    let mut p = TAYLOR[0];
    for c in &TAYLOR[1..] {
        p = p.mul_add(r, *c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    // 2ⁿ = 2ⁿ⁻¹·2 from the exponent bits (n is in [−1022, 1024]; 2⁻¹⁰²³ comes out as 0).
    let half = f64::from_bits(((t.to_bits() as i64).wrapping_add(BIAS) as u64) << 52);
    let v = e * half * 2.0;
    if x.is_nan() { x } else { v }
}

/// The error function in `f32`, `erf(x) = 2/√π ∫₀ˣ e^(−t²) dt`, in fused multiply-adds and
/// [`exp_f32`], so that a loop of it vectorises (GELU's, where `libm`'s `erff`, a call per
/// element with branches, had been a fifth of a character model's training step) and gives
/// the same bits in every build. Within 1 ulp of the exact value (0.91 at worst over −6..6
/// in steps of 0.00037, against `libm`'s `f64` `erf`); ±1 where erf rounds to ±1 in `f32` (|x| above about 3.93, the
/// input clamped to 4 beyond); odd (`erf(−0) = −0`), monotonic, NaN for NaN.
///
/// Below |x| = 1, `|x| + |x|·r(x²)`, `r` a polynomial of degree 6 for `erf(a)/a − 1` (its
/// error below 4·10⁻⁹, relative); from 1 on, `1 − e^(−x²)·g(t)`, `g` a polynomial of degree 8
/// in `t = (|x| − 2.5)/1.5` for `erfc(a)·e^(a²)` over `1 ≤ a ≤ 4` (absolute error of the
/// product below 4·10⁻⁹). Both least-squares fits, on Chebyshev nodes, to `mpmath`'s values.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    use erf_consts::*;
    // min rather than clamp: NaN becomes 4 here, and the input NaN is returned at the end.
    let a = x.abs().min(4.0);
    let s = a * a;
    let mut r = SMALL[0];
    for c in &SMALL[1..] {
        r = r.mul_add(s, *c);
    }
    let small = r.mul_add(a, a);
    let t = a.mul_add(1.0 / 1.5, -2.5 / 1.5);
    let mut g = LARGE[0];
    for c in &LARGE[1..] {
        g = g.mul_add(t, *c);
    }
    let large = (-exp_f32(-s)).mul_add(g, 1.0);
    let v = if a < 1.0 { small } else { large };
    if x.is_nan() { x } else { v.copysign(x) }
}

/// The hyperbolic tangent in `f32`, in fused multiply-adds and [`exp_f32`], so that a loop of
/// it vectorises (the tanh form of GELU's) and gives the same bits in every build. Within 2
/// ulp of the exact value (1.21 at worst over −10..10 in steps of 0.00053, against the `f64`
/// `tanh`); ±1 where tanh rounds to ±1 in `f32` (the input clamped to 10), odd (`tanh(−0) = −0`), monotonic, NaN for NaN.
///
/// Below |x| = 0.625, `a + a·s·q(s)` with `s = a²`, `q` a polynomial of degree 5 for
/// `(tanh(a)/a − 1)/s` (least squares on Chebyshev nodes to `mpmath`'s values, relative error
/// of the result below 3·10⁻⁹); from there `1 − 2/(e^(2a) + 1)`.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    const Q: [f32; 6] = [
        0.002_138_226_3,
        -0.008_171_788,
        0.021_698_21,
        -0.053_946_253,
        0.133_332_01,
        -0.333_333_3,
    ];
    // min rather than clamp: NaN becomes 10 here, and the input NaN is returned at the end.
    let a = x.abs().min(10.0);
    let s = a * a;
    let mut q = Q[0];
    for c in &Q[1..] {
        q = q.mul_add(s, *c);
    }
    let small = (a * s).mul_add(q, a);
    let large = 1.0 - 2.0 / (exp_f32(2.0 * a) + 1.0);
    let v = if a < 0.625 { small } else { large };
    if x.is_nan() { x } else { v.copysign(x) }
}

/// The polynomials of [`erf_f32`], highest power first.
#[allow(clippy::excessive_precision, clippy::unreadable_literal)] // as fitted
mod erf_consts {
    /// `erf(a)/a − 1` in `s = a²`, `0 ≤ s ≤ 1`.
    pub const SMALL: [f32; 7] = [
        7.847259257687256e-05,
        -0.0008008189033716917,
        0.005188099108636379,
        -0.026853691786527634,
        0.1128358244895935,
        -0.3761262595653534,
        0.12837916612625122,
    ];
    /// `erfc(a)·e^(a²)` in `t = (a − 2.5)/1.5`, `1 ≤ a ≤ 4`.
    pub const LARGE: [f32; 9] = [
        0.002634382341057062,
        0.0034513508435338736,
        0.005621524527668953,
        -0.005378383211791515,
        0.01160037238150835,
        -0.027404000982642174,
        0.05607752501964569,
        -0.11151118576526642,
        0.21080754697322845,
    ];
}

/// This thread's `f32` fused multiply-add throughput, in GFLOP/s (2 FLOP per lane), measured
/// for about `seconds` with the widest FMA the CPU has (16 lanes with AVX-512, 8 with AVX2):
/// the peak that "fraction of peak" figures are quoted against. Run it on every thread at
/// once (as `bench --peak` does) for the peak of several threads; 0 on CPUs without FMA.
pub fn fma_peak_gflops(seconds: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // 16 independent chains hide the FMA latency on both FMA ports.
        #[target_feature(enable = "avx512f")]
        fn run512(iters: u64) -> f32 {
            let mut acc = [_mm512_set1_ps(1.0); 16];
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
        }
        #[target_feature(enable = "avx2,fma")]
        fn run256(iters: u64) -> f32 {
            let mut acc = [_mm256_set1_ps(1.0); 12];
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, a, b);
                }
            }
            let mut out = [0.0f32; 8];
            let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
            // SAFETY: `out` holds 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
            out.iter().sum()
        }
        let (lanes, chains, run): (f64, f64, fn(u64) -> f32) = if super::cpu::avx512() {
            // SAFETY: the CPU has AVX-512F (checked).
            (16.0, 16.0, |n| unsafe { run512(n) })
        } else if super::cpu::avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            (8.0, 12.0, |n| unsafe { run256(n) })
        } else {
            return 0.0;
        };
        let mut iters = 1_000u64;
        loop {
            let start = std::time::Instant::now();
            std::hint::black_box(run(std::hint::black_box(iters)));
            let elapsed = start.elapsed().as_secs_f64();
            if elapsed >= seconds {
                return iters as f64 * chains * lanes * 2.0 / elapsed / 1e9;
            }
            iters = (iters as f64 * (seconds / elapsed.max(1e-6)).clamp(1.5, 100.0)) as u64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = seconds;
        0.0
    }
}

/// The AVX2 forms of this module's arithmetic that hand-written kernels share: [`exp_f32`] on
/// vectors, and the tree in which [`reduce`] folds its lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::exp_f32`] of each lane of `K` vectors whose lanes are at most 0 (or NaN), as
    /// a softmax's differences from its maximum are, operation for operation (so the same
    /// bits; NaN comes through as NaN), each operation on the `K` vectors before the next.
    /// The clamp from above, which changes none of these lanes, is left out.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn exp_vecs_at_most_zero<const K: usize>(v: [__m256; K]) -> [__m256; K] {
        exp_clamped(v.map(|v| _mm256_max_ps(_mm256_set1_ps(super::exp_consts::LOW), v)))
    }

    /// [`super::exp_f32`] past its clamps.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp_clamped<const K: usize>(v: [__m256; K]) -> [__m256; K] {
        use super::exp_consts::*;
        let set = _mm256_set1_ps;
        let t = v.map(|v| _mm256_fmadd_ps(v, set(std::f32::consts::LOG2_E), set(ROUND)));
        // r = x − n·C1 − n·C2.
        let r: [__m256; K] = std::array::from_fn(|i| {
            let n = _mm256_sub_ps(t[i], set(ROUND));
            _mm256_fnmadd_ps(n, set(C2), _mm256_fnmadd_ps(n, set(C1), v[i]))
        });
        let mut p = [set(POLY[0]); K];
        for &k in &POLY[1..] {
            for i in 0..K {
                p[i] = _mm256_fmadd_ps(p[i], r[i], set(k));
            }
        }
        // e = p·r² + r + 1; 2ⁿ⁻¹ from n's integer (the low bits of t's mantissa).
        std::array::from_fn(|i| {
            let e = _mm256_add_ps(_mm256_fmadd_ps(p[i], _mm256_mul_ps(r[i], r[i]), r[i]), set(1.0));
            let half = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_castps_si256(t[i]),
                _mm256_set1_epi32(BIAS),
            )));
            _mm256_mul_ps(_mm256_mul_ps(e, half), set(2.0))
        })
    }

    /// The maximum of the 16 lanes of `v` (lanes 0–7 in `v[0]`, 8–15 in `v[1]`) in
    /// [`super::reduce`]'s tree: lane i with i + 8, then i + 4, i + 2, i + 1, each step
    /// `if later > earlier { later } else { earlier }`. Lane 0 of the result holds it (the
    /// others the same terms, some in the other order).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn fold_max(v: [__m256; 2]) -> __m256 {
        let v = _mm256_max_ps(v[1], v[0]);
        let v = _mm256_max_ps(_mm256_permute2f128_ps::<1>(v, v), v);
        let v = _mm256_max_ps(_mm256_permute_ps::<0b01_00_11_10>(v), v);
        _mm256_max_ps(_mm256_permute_ps::<0b10_11_00_01>(v), v)
    }

    /// The sum of the 16 lanes of `v` in [`super::reduce`]'s tree (as [`fold_max`]); lane 0
    /// of the result holds it.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn fold_add(v: [__m256; 2]) -> __m256 {
        let v = _mm256_add_ps(v[0], v[1]);
        let v = _mm256_add_ps(v, _mm256_permute2f128_ps::<1>(v, v));
        let v = _mm256_add_ps(v, _mm256_permute_ps::<0b01_00_11_10>(v));
        _mm256_add_ps(v, _mm256_permute_ps::<0b10_11_00_01>(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fill_streaming` sets every element, on both sides of the streaming threshold, from
    /// unaligned starts and for lengths that end inside a vector; a negative zero is written
    /// as such (it does not take the streaming path, which writes +0).
    #[test]
    fn fill_sets_every_element() {
        let long = STREAM_MIN_BYTES / 4 + 37;
        let mut buf = vec![7.0f32; long + 64];
        for start in [0, 1, 5, 16] {
            for len in [0, 15, 1000, long - 40, long] {
                for value in [0.0f32, -0.0, 1.5] {
                    buf.fill(7.0);
                    fill_streaming(&mut buf[start..start + len], value);
                    let bits = |v: f32| v.to_bits();
                    assert!(buf[start..start + len].iter().all(|&v| bits(v) == bits(value)));
                    assert!(buf[..start].iter().chain(&buf[start + len..]).all(|&v| v == 7.0));
                }
            }
        }
        let mut d = vec![3.0f64; long];
        fill_streaming(&mut d, 0.0);
        assert!(d.iter().all(|&v| v.to_bits() == 0));
    }

    #[test]
    fn exp_f64_is_within_two_ulp_of_libm() {
        let mut x = -707.6_f64;
        let mut worst = 0.0_f64;
        while x < 709.78 {
            let want = x.exp();
            let got = exp_f64(x);
            let ulp = want.next_up() - want;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(-0.0), 1.0);
        assert!(exp_f64(-707.6) > 0.0 && exp_f64(-707.6).is_normal());
        assert_eq!(exp_f64(-708.5), 0.0);
        assert_eq!(exp_f64(-1000.0), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(f64::MIN), 0.0);
        assert!(exp_f64(709.78).is_finite() && exp_f64(709.78) > 1.79e308);
        assert_eq!(exp_f64(709.79), f64::INFINITY);
        assert_eq!(exp_f64(f64::MAX), f64::INFINITY);
        assert_eq!(exp_f64(f64::INFINITY), f64::INFINITY);
        assert!(exp_f64(f64::NAN).is_nan());
        // Monotonic across the limits and the reduction's bins.
        let (mut x, mut last) = (-710.0_f64, 0.0);
        while x < 711.0 {
            let y = exp_f64(x);
            assert!(y >= last, "exp_f64({x}) = {y} below {last}");
            last = y;
            x += 0.0173;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_of_lanes_at_most_zero_is_exp_f32_bit_for_bit() {
        use std::arch::x86_64::*;
        if !crate::kernels::cpu::avx2() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        // Every bin of the range reduction down to past the limit, then the edges.
        let mut xs: Vec<f32> = (0..24_000).map(|i| -(i as f32) * 0.003_7).collect();
        xs.extend([
            0.0,
            -0.0,
            -1.0e-30,
            -86.98,
            -87.0,
            -87.3,
            -1.0e4,
            f32::MIN,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        xs.resize(xs.len().div_ceil(24) * 24, -1.5);
        for chunk in xs.chunks_exact(24) {
            #[target_feature(enable = "avx2,fma")]
            fn three(x: &[f32]) -> [f32; 24] {
                // SAFETY: `x` holds 24 floats, read 8 at a time; `out` holds 24.
                unsafe {
                    let v = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
                    let e: [__m256; 3] = super::avx2::exp_vecs_at_most_zero(v);
                    let mut out = [0.0f32; 24];
                    for (i, e) in e.iter().enumerate() {
                        _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *e);
                    }
                    out
                }
            }
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let got = unsafe { three(chunk) };
            for (&x, g) in chunk.iter().zip(got) {
                let want = exp_f32(x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "exp({x}): {g} against {want}"
                );
            }
        }
    }

    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut x = -86.98_f32;
        let mut worst = 0.0_f64;
        while x < 88.72 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        // The limits, from the arithmetic: 0 below −86.988, +∞ past 88.7228.
        assert!(exp_f32(-86.98) > 0.0 && exp_f32(-86.98).is_normal());
        assert_eq!(exp_f32(-87.0), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::MIN), 0.0);
        assert!(exp_f32(88.72).is_finite() && exp_f32(88.72) > 3.39e38);
        assert_eq!(exp_f32(88.73), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::MAX), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        // Monotonic across the limits and the reduction's bins.
        let mut x = -90.0_f32;
        let mut last = 0.0;
        while x < 90.0 {
            let e = exp_f32(x);
            assert!(e >= last, "exp_f32({x}) = {e} below {last}");
            last = e;
            x += 0.000_61;
        }
        let mut xs: Vec<f32> = (0..10_000).map(|i| -95.0 + 0.019 * i as f32).collect();
        xs.extend([
            f32::MIN,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-30,
            -1e-30,
        ]);
        let plain: Vec<u32> = xs.iter().map(|&v| exp_f32(v).to_bits()).collect();
        let wide: Vec<u32> = widest!(xs.iter().map(|&v| exp_f32(v).to_bits()).collect());
        assert_eq!(plain, wide);
    }

    #[test]
    fn erf_f32_is_within_one_ulp_odd_and_the_same_in_every_build() {
        let mut worst = 0.0_f64;
        let mut x = -6.0_f32;
        while x < 6.0 {
            let want = libm::erf(x as f64);
            let got = erf_f32(x) as f64;
            let w = want as f32;
            let ulp = (w.abs().next_up() - w.abs()) as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_37;
        }
        // 0.91 ulp at worst over this sweep.
        assert!(worst <= 1.0, "worst {worst} ulp");
        // Tiny inputs: erf(x) = 2x/√π to within the rounding.
        for x in [1e-30_f32, 1e-10, 3e-5, -2e-7] {
            let want = libm::erf(x as f64);
            assert!(((erf_f32(x) as f64 - want) / want).abs() < 1.2e-7, "{x}");
        }
        assert_eq!(erf_f32(0.0).to_bits(), 0.0_f32.to_bits());
        assert_eq!(erf_f32(-0.0).to_bits(), (-0.0_f32).to_bits());
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf_f32(4.0), 1.0);
        assert_eq!(erf_f32(-100.0), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
        let xs: Vec<f32> = (0..20_000).map(|i| -7.0 + 0.0007 * i as f32).collect();
        let mut last = -1.0_f32;
        for &x in &xs {
            let e = erf_f32(x);
            assert_eq!(e.to_bits(), (-erf_f32(-x)).to_bits(), "odd at {x}");
            assert!(e >= last, "erf_f32({x}) = {e} below {last}");
            last = e;
        }
        let plain: Vec<u32> = xs.iter().map(|&v| erf_f32(v).to_bits()).collect();
        let wide: Vec<u32> = widest!(xs.iter().map(|&v| erf_f32(v).to_bits()).collect());
        assert_eq!(plain, wide);
    }

    #[test]
    fn tanh_f32_is_within_two_ulp_odd_and_the_same_in_every_build() {
        let mut worst = 0.0_f64;
        let mut x = -10.0_f32;
        while x < 10.0 {
            let want = (x as f64).tanh();
            let got = tanh_f32(x) as f64;
            let w = want as f32;
            let ulp = (w.abs().next_up() - w.abs()) as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_53;
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        for x in [1e-30_f32, 1e-10, 3e-5, -2e-7] {
            assert_eq!(tanh_f32(x), x, "{x}");
        }
        assert_eq!(tanh_f32(-0.0).to_bits(), (-0.0_f32).to_bits());
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert_eq!(tanh_f32(-100.0), -1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
        let xs: Vec<f32> = (0..20_000).map(|i| -12.0 + 0.0012 * i as f32).collect();
        let mut last = -1.0_f32;
        for &x in &xs {
            let t = tanh_f32(x);
            assert_eq!(t.to_bits(), (-tanh_f32(-x)).to_bits(), "odd at {x}");
            assert!(t >= last, "tanh_f32({x}) = {t} below {last}");
            last = t;
        }
        let plain: Vec<u32> = xs.iter().map(|&v| tanh_f32(v).to_bits()).collect();
        let wide: Vec<u32> = widest!(xs.iter().map(|&v| tanh_f32(v).to_bits()).collect());
        assert_eq!(plain, wide);
    }

    #[test]
    fn lane_sums_are_exact_on_integers_and_the_same_in_every_build() {
        for len in [0, 1, 15, 16, 17, 100, 1000] {
            let x: Vec<f32> = (0..len).map(|i| (i % 7) as f32 - 3.0).collect();
            let want: f32 = x.iter().sum();
            assert_eq!(sum(&x), want, "len {len}");
            let plain = sum(&x);
            let wide = widest!(sum(&x));
            assert_eq!(plain.to_bits(), wide.to_bits());
        }
        let x: Vec<f64> = (0..1001).map(|i| 1.0 / (1.0 + i as f64)).collect();
        let y: Vec<f64> = (0..1001).map(|i| (i as f64).sin()).collect();
        assert_eq!(dot(&x, &y).to_bits(), widest!(dot(&x, &y)).to_bits());
        let naive: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - naive).abs() < 1e-12);
        // The slice forms add in the order of sum_by.
        assert_eq!(dot(&x, &y).to_bits(), sum_by(x.len(), |j| x[j] * y[j]).to_bits());
        let z: Vec<f64> = (0..1001).map(|i| (i as f64).cos()).collect();
        assert_eq!(
            sum_zip3(&x, &y, &z, |a, b, c| a * b * c).to_bits(),
            sum_by(x.len(), |j| x[j] * y[j] * z[j]).to_bits()
        );
        assert_eq!(
            sum_map(&x, |v| v * v).to_bits(),
            sum_by(x.len(), |j| x[j] * x[j]).to_bits()
        );
    }
}
