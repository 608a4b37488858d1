//! Dropout masks (§5.4): each element kept with probability 1 − p and scaled by 1/(1 − p).
//!
//! One `u64` drawn from the caller's seeded RNG seeds a fast generator (xoshiro256++, rand's
//! `SmallRng`) for the mask, which gives one `u32` per element compared with `p·2³²`: the same
//! seed gives the same mask for `f32` and `f64` and on every machine, and a mask costs about
//! a nanosecond per element rather than the caller's cryptographic generator's several.

use ndarray::{Array, Dimension, ShapeBuilder};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::Float;

/// A mask of `0` (dropped) and `1/(1 − p)` (kept) of the given shape.
///
/// # Panics
/// If `p` is not in [0, 1): layer configs check this before a mask is ever drawn.
pub fn dropout_mask<F: Float, D: Dimension, Sh: ShapeBuilder<Dim = D>>(
    p: f32,
    shape: Sh,
    rng: &mut impl Rng,
) -> Array<F, D> {
    assert!((0.0..1.0).contains(&p), "dropout_mask: p = {p} is not in [0, 1)");
    let threshold = (p as f64 * 4_294_967_296.0) as u64;
    let keep = F::from_f64(1.0 / (1.0 - p as f64));
    let mut fast = SmallRng::seed_from_u64(rng.next_u64());
    // Two 32-bit draws from each 64-bit output.
    let mut spare: Option<u32> = None;
    Array::from_shape_simple_fn(shape, || {
        let r = match spare.take() {
            Some(r) => r,
            None => {
                let x = fast.next_u64();
                spare = Some((x >> 32) as u32);
                x as u32
            }
        };
        if (r as u64) < threshold { F::ZERO } else { keep }
    })
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
        let a: Array2<f32> = dropout_mask(0.5, (4, 5), &mut StdRng::seed_from_u64(1));
        let b: Array2<f64> = dropout_mask(0.5, (4, 5), &mut StdRng::seed_from_u64(1));
        assert!(a.iter().zip(&b).all(|(x, y)| (*x == 0.0) == (*y == 0.0)));
        // p = 0 keeps everything unscaled.
        let z: Array2<f32> = dropout_mask(0.0, (3, 3), &mut rng);
        assert!(z.iter().all(|&v| v == 1.0));
    }
}
