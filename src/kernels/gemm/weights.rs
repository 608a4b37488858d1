//! Weights converted to bf16 and packed once for the many products that use them: those of a
//! bf16 training step of several micro-batches.
//!
//! A training step multiplies every weight `W` `[out, in]` in two layouts, `X·Wᵀ` forward and
//! `∂Y·W` backward, and each product converts its `W` to bf16 and packs it into the kernels'
//! layout itself. With one micro-batch that is once per layout per step; with several, once
//! per micro-batch. [`WeightPacks`] holds both packings of each weight (B = `Wᵀ` and B = `W`);
//! inside [`with_weight_packs`], a bf16 product whose B operand is one of them (the same
//! address, shape and strides) uses that packing instead of making its own. The packing is the
//! same function of the same values, so the results are the same bits.
//!
//! A packing is only valid while its weight keeps its values: the
//! [`crate::train::Trainer`] makes them at the start of a step of several micro-batches, from
//! the weights that the whole step reads, and holds them for that step only.
//!
//! Packing them instead right after the optimizer has updated each weight (still in cache),
//! for the next step, was measured and not kept (`docs/performance.md`): the packing costs
//! about what the products' own packing did, so steps of one micro-batch got no faster, and
//! the packings would have had to outlive the step, valid only while nothing else changed the
//! model.

use std::any::TypeId;
use std::cell::Cell;
use std::collections::HashMap;

use ndarray::ArrayView2;

use super::bf16::{Bf16Path, pack_b_into, packed_len};
use super::packed::{Aligned, Mat};

/// Where a B operand is, and how it is laid out: `(address, k, n, row stride, column stride)`.
type Key = (usize, usize, usize, isize, isize);

/// The bf16 packings of a set of weights, each for both of its products (see the
/// [module docs](self)).
#[derive(Debug, Default)]
pub(crate) struct WeightPacks {
    packs: HashMap<Key, Aligned<u16>>,
}

impl WeightPacks {
    /// Whether weights of `F` are packed here at all: `f32`, on a CPU with a vector bf16
    /// path (the emulated path multiplies `f32` copies of the rounded values instead).
    pub(crate) fn apply<F: 'static>() -> bool {
        TypeId::of::<F>() == TypeId::of::<f32>() && Bf16Path::best() != Bf16Path::Emulated
    }

    /// Packs exactly `weights` (each `[out, in]`, any strides), reusing the memory of an
    /// earlier packing of the same matrix; packings of other matrices are dropped.
    pub(crate) fn refresh_all<'a>(&mut self, weights: impl IntoIterator<Item = ArrayView2<'a, f32>>) {
        let mut old = std::mem::take(&mut self.packs);
        for w in weights {
            for b in [w.t(), w] {
                let key = key_of(&b);
                if let Some(buf) = old.remove(&key) {
                    self.packs.insert(key, buf);
                }
            }
            self.refresh(w);
        }
    }

    /// Packs `w` `[out, in]` (again) for both of its products, `X·Wᵀ` (B = `Wᵀ`) and `∂Y·W`
    /// (B = `W`). On the threads of the current team.
    fn refresh(&mut self, w: ArrayView2<'_, f32>) {
        if !WeightPacks::apply::<f32>() {
            return;
        }
        for b in [w.t(), w] {
            let (k, n) = b.dim();
            let len = packed_len(k, n);
            let buf = self
                .packs
                .entry(key_of(&b))
                .or_insert_with(|| Aligned::zeroed(len));
            if buf.len() != len {
                *buf = Aligned::zeroed(len);
            }
            // SAFETY: the view addresses its own k × n elements; the buffer has the length of
            // a packing of that shape.
            unsafe { pack_b_into(k, n, Mat::of(&b), crate::kernels::parallel::threads(), buf) };
        }
    }

    /// Matrices packed (each counts twice, once per product).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.packs.len()
    }
}

/// The key of B `[k, n]` at `b`, as a product receives it.
fn key(b: Mat, k: usize, n: usize) -> Key {
    (b.ptr as usize, k, n, b.rs, b.cs)
}

/// The key of the matrix `b`.
fn key_of(b: &ArrayView2<'_, f32>) -> Key {
    let (k, n) = b.dim();
    key(Mat::of(b), k, n)
}

thread_local! {
    /// The packings that the bf16 products on this thread use, while [`with_weight_packs`]
    /// runs (and on the threads its parallel loops run on).
    static CURRENT: Cell<*const WeightPacks> = const { Cell::new(std::ptr::null()) };
}

/// The packings in use on this thread, to hand to the threads of a parallel loop.
#[derive(Clone, Copy)]
pub(crate) struct Current(*const WeightPacks);
// SAFETY: a shared reference's address, only read from while `with_weight_packs` runs, which
// outlives the loops that carry it (they end before it returns).
unsafe impl Send for Current {}
unsafe impl Sync for Current {}

impl Current {
    /// The packings in use on this thread now.
    pub(crate) fn get() -> Current {
        Current(CURRENT.get())
    }

    /// Runs `f` with these packings in use on this thread, then restores the previous ones.
    pub(crate) fn with<R>(self, f: impl FnOnce() -> R) -> R {
        crate::kernels::with_cell(&CURRENT, self.0, f)
    }
}

/// Runs `f` with the bf16 products on this thread (and in the parallel loops started inside
/// `f`) using the packings of `packs` for the weights they hold.
pub(crate) fn with_weight_packs<R>(packs: &WeightPacks, f: impl FnOnce() -> R) -> R {
    Current(packs).with(f)
}

/// `f(packing)` if B `[k, n]` at `b` is a weight packed in the packings in use on this
/// thread; `None` (and `f` not called) otherwise.
pub(super) fn with_packed<R>(b: Mat, k: usize, n: usize, f: impl FnOnce(&[u16]) -> R) -> Option<R> {
    let packs = CURRENT.get();
    if packs.is_null() {
        return None;
    }
    // SAFETY: CURRENT points to the packings of a `with_weight_packs` running on this thread,
    // or of one whose parallel loop this thread runs a part of, until it returns.
    let packs = unsafe { &*packs };
    packs.packs.get(&key(b, k, n)).map(|p| f(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::gemm;
    use crate::kernels::precision::{Precision, with_precision};
    use ndarray::Array2;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Products with packed weights give the bits of the products that pack their own, for
    /// both of a weight's products; after the weight changes, a refreshed packing the new
    /// bits and a stale one the old (which is why the trainer refreshes them).
    #[test]
    fn packed_weights_give_the_bits_of_products_that_pack_their_own() {
        if !WeightPacks::apply::<f32>() {
            eprintln!("skipped: no vector bf16 path on this CPU");
            return;
        }
        let mut rng = StdRng::seed_from_u64(3);
        let mut random =
            |r: usize, c: usize| Array2::from_shape_fn((r, c), |_| rng.random_range(-1.0f32..1.0));
        // A weight wider than a block of k (1024) both ways, and edges of panels.
        let (out, inp, rows) = (1100, 70, 45);
        let mut w = random(out, inp);
        let x = random(rows, inp);
        let g = random(rows, out);
        let products = |w: &Array2<f32>, packs: Option<&WeightPacks>| {
            let (mut y, mut gx) = (Array2::zeros((rows, out)), Array2::zeros((rows, inp)));
            let mut run = || {
                gemm(1.0, x.view(), w.t(), 0.0, y.view_mut());
                gemm(1.0, g.view(), w.view(), 0.0, gx.view_mut());
            };
            with_precision(Precision::Bf16, || match packs {
                Some(p) => with_weight_packs(p, &mut run),
                None => run(),
            });
            (y, gx)
        };
        let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut packs = WeightPacks::default();
        packs.refresh_all([w.view()]);
        assert_eq!(packs.len(), 2);
        let (want_y, want_gx) = products(&w, None);
        let (y, gx) = products(&w, Some(&packs));
        assert_eq!(bits(&y), bits(&want_y));
        assert_eq!(bits(&gx), bits(&want_gx));

        w.mapv_inplace(|v| v * 0.5 + 0.25);
        let (stale_y, _) = products(&w, Some(&packs));
        assert_eq!(bits(&stale_y), bits(&want_y), "a stale packing is used as it is");
        packs.refresh(w.view());
        let (want_y, want_gx) = products(&w, None);
        let (y, gx) = products(&w, Some(&packs));
        assert_eq!(bits(&y), bits(&want_y));
        assert_eq!(bits(&gx), bits(&want_gx));

        // Another matrix of the same shape at another address is not taken for it.
        let other = random(out, inp);
        let (want_y, _) = products(&other, None);
        let (y, _) = products(&other, Some(&packs));
        assert_eq!(bits(&y), bits(&want_y));

        // Refreshing all of a new set drops the packings of matrices not in it.
        packs.refresh_all([other.view()]);
        assert_eq!(packs.len(), 2);
        let (y, _) = products(&w, Some(&packs));
        assert_eq!(bits(&y), bits(&products(&w, None).0));
    }
}
