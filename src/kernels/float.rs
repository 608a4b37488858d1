//! The element type: `f32` for speed, `f64` for sharp gradient checks.
//!
//! Every kernel, layer and model is generic over [`Float`], with `f32` as the default type
//! parameter, so `Linear` means `Linear<f32>`. The `f64` instantiation exists so that the
//! finite-difference checks of the hand-written backward passes (see [`crate::gradcheck`])
//! can be sharp: [`GradCheck::default`](crate::gradcheck::GradCheck) uses a step of 1e-4 and
//! a relative-error tolerance of 1e-6 (the five-point difference leaves a truncation error
//! near 1e-16), where `f32` would force a step near 1e-2 and a tolerance near 1e-2.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, Neg, SubAssign};

use ndarray::{LinalgScalar, ScalarOperand};
use rand::distr::uniform::SampleUniform;

/// Serde bounds, present only with the `serde` feature.
#[cfg(feature = "serde")]
pub trait MaybeSerde: serde::Serialize + serde::de::DeserializeOwned {}
#[cfg(feature = "serde")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> MaybeSerde for T {}
/// Serde bounds, present only with the `serde` feature.
#[cfg(not(feature = "serde"))]
pub trait MaybeSerde {}
#[cfg(not(feature = "serde"))]
impl<T> MaybeSerde for T {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point element type: implemented for `f32` and `f64` only (the trait is sealed).
///
/// It carries the scalar functions the kernels need (`exp`, `erf`, …), conversions to and
/// from `f64` for constants, and the raw GEMM entry point of `matrixmultiply` for its type.
pub trait Float:
    sealed::Sealed
    + 'static
    + LinalgScalar
    + ScalarOperand
    + SampleUniform
    + MaybeSerde
    + PartialOrd
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Neg<Output = Self>
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Negative infinity.
    const NEG_INFINITY: Self;
    /// The type's name, `"f32"` or `"f64"`.
    const NAME: &'static str;

    /// The value nearest to `x`.
    fn from_f64(x: f64) -> Self;
    /// The value as `f64` (exact).
    fn to_f64(self) -> f64;
    /// `eˣ`.
    fn exp(self) -> Self;
    /// `eˣ` as the crate's vector loops compute it: for `f32`
    /// [`exp_f32`](crate::kernels::simd::exp_f32) (within 2 ulp, in fused multiply-adds that a
    /// loop vectorises), for `f64` [`Float::exp`].
    fn exp_vector(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Hyperbolic tangent: for `f32` [`tanh_f32`](crate::kernels::simd::tanh_f32) (within 2
    /// ulp, vectorises), for `f64` the standard library's.
    fn tanh(self) -> Self;
    /// The error function, erf(x) = 2/√π ∫₀ˣ e^(−t²) dt: for `f32`
    /// [`erf_f32`](crate::kernels::simd::erf_f32) (within 1 ulp, vectorises), for `f64`
    /// `libm`'s.
    fn erf(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// The larger of two values; a NaN argument loses to a number.
    fn max(self, other: Self) -> Self;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
    /// Whether the value is NaN.
    fn is_nan(self) -> bool;
    /// `self · a + b` with one rounding (a fused multiply-add where the CPU has one).
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// The slice as `f32`s, if the type is `f32` (for kernels written for `f32` only).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The slice as `f32`s, if the type is `f32`.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;

    /// `C ← α·A·B + β·C` on raw strided pointers, by `matrixmultiply`'s `sgemm` or `dgemm`.
    ///
    /// # Safety
    /// The pointers and strides must describe an `m × k` matrix A, a `k × n` matrix B and an
    /// `m × n` matrix C inside live allocations; C must not alias A or B, and no two
    /// elements of C may share an address. If β is zero, C need not be initialised.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_float {
    ($t:ty, $gemm:path, $erf:path, $exp:path, $tanh:path, |$s:ident| $as_f32:expr) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const NAME: &'static str = stringify!($t);

            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn exp_vector(self) -> Self {
                $exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn as_f32($s: &[Self]) -> Option<&[f32]> {
                $as_f32
            }
            #[inline(always)]
            fn as_f32_mut($s: &mut [Self]) -> Option<&mut [f32]> {
                $as_f32
            }

            #[inline]
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // SAFETY: forwarded from this function's contract, which is matrixmultiply's.
                unsafe { $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
            }
        }
    };
}

impl_float!(
    f32,
    matrixmultiply::sgemm,
    super::simd::erf_f32,
    super::simd::exp_f32,
    super::simd::tanh_f32,
    |s| Some(s)
);
impl_float!(f64, matrixmultiply::dgemm, libm::erf, f64::exp, f64::tanh, |_s| {
    None
});
