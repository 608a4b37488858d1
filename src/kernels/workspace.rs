//! Memory reused from one training step to the next.
//!
//! A training step allocates its activations, keeps them in caches until the backward pass,
//! and frees them at its end. Freed in bulk, that memory goes back to the operating system,
//! and the next step takes a page fault (and has the kernel zero a page) for every 4 KiB of
//! it again: measured on a small training step of the reference workloads, 22 000 faults and
//! about 45 ms a step, a sixth of the step.
//!
//! A [`Workspace`] keeps that memory instead. While [`with_workspace`] runs a closure, the
//! arrays the crate's layers allocate on that thread come from the workspace when it holds a
//! buffer of the right size, and caches handed to [`Recycle::give_back`] give their arrays back
//! to it. The owner decides how long the memory lives: [`crate::train::Trainer`] owns one and
//! uses it for every step, so after the first step a step allocates almost nothing. Nothing
//! process-wide changes: without a workspace, allocation is the global allocator's as usual.
//!
//! Buffers handed out are initialised (with whatever a previous step left in them, or zeros);
//! the crate writes every element of an array before reading it.

use std::any::TypeId;
use std::cell::Cell;

use ndarray::{Array, Dimension, ShapeBuilder};

use super::Float;

/// Buffers smaller than this many elements are not worth keeping: the allocator recycles
/// small blocks well on its own.
const MIN_LEN: usize = 4096;

/// Memory kept for reuse between calls: buffers of `f32` and `f64`, by length, each marked
/// with the step that gave it back.
#[derive(Debug, Default)]
pub struct Workspace {
    f32s: Vec<(Vec<f32>, u64)>,
    f64s: Vec<(Vec<f64>, u64)>,
    step: u64,
}

impl Workspace {
    /// An empty workspace.
    pub fn new() -> Self {
        Workspace::default()
    }

    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        self.f32s.iter().map(|(v, _)| v.capacity() * 4).sum::<usize>()
            + self.f64s.iter().map(|(v, _)| v.capacity() * 8).sum::<usize>()
    }

    /// Ends a step: frees the buffers that were given back before this step and not taken
    /// during it (the step did not need them), so that the workspace holds no more than one
    /// step's memory even when the shapes change from step to step.
    pub fn end_step(&mut self) {
        let step = self.step;
        self.f32s.retain(|(_, s)| *s == step);
        self.f64s.retain(|(_, s)| *s == step);
        self.step += 1;
    }

    /// Frees everything it holds.
    pub fn clear(&mut self) {
        self.f32s.clear();
        self.f64s.clear();
    }

    fn pool<F: Float>(&mut self) -> &mut Vec<(Vec<F>, u64)> {
        let any: &mut dyn std::any::Any = if TypeId::of::<F>() == TypeId::of::<f32>() {
            &mut self.f32s
        } else {
            &mut self.f64s
        };
        any.downcast_mut::<Vec<(Vec<F>, u64)>>()
            .expect("a Float is f32 or f64")
    }
}

impl Clone for Workspace {
    /// A clone starts empty: the memory is scratch, not state.
    fn clone(&self) -> Self {
        Workspace::new()
    }
}

thread_local! {
    static CURRENT: Cell<*mut Workspace> = const { Cell::new(std::ptr::null_mut()) };
}

/// Runs `f` with `ws` as this thread's workspace (see the [module docs](self)). Nested calls
/// use the innermost workspace.
pub fn with_workspace<R>(ws: &mut Workspace, f: impl FnOnce() -> R) -> R {
    super::with_cell(&CURRENT, ws as *mut Workspace, f)
}

/// A workspace kept by a handle from one of its calls to the next (a packed model's), shared
/// by the calls: one call at a time takes it. A clone starts empty, as a [`Workspace`]'s.
#[derive(Debug, Default)]
pub(crate) struct KeptWorkspace(std::sync::Mutex<Workspace>);

impl Clone for KeptWorkspace {
    fn clone(&self) -> Self {
        KeptWorkspace::default()
    }
}

impl KeptWorkspace {
    /// Runs `f` with the kept workspace and ends its step after, or without one if another
    /// call holds it (or it is poisoned).
    pub(crate) fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        match self.0.try_lock() {
            Ok(mut ws) => {
                let out = with_workspace(&mut ws, f);
                ws.end_step();
                out
            }
            Err(_) => f(),
        }
    }
}

/// Runs `g` on this thread's workspace, if there is one.
fn current<R>(g: impl FnOnce(&mut Workspace) -> R) -> Option<R> {
    let ws = CURRENT.get();
    if ws.is_null() {
        return None;
    }
    // SAFETY: CURRENT points to the workspace borrowed mutably by `with_workspace` on this
    // thread for as long as it is set, and nothing else on this thread uses that borrow while
    // `g` runs (g does not call back into this module).
    Some(g(unsafe { &mut *ws }))
}

/// A buffer of exactly `len` elements from this thread's workspace, if it holds one.
pub(crate) fn take<F: Float>(len: usize) -> Option<Vec<F>> {
    if len < MIN_LEN {
        return None;
    }
    current(|ws| {
        let pool = ws.pool::<F>();
        let at = pool.iter().rposition(|(v, _)| v.len() == len)?;
        #[allow(unused_mut)]
        let mut v = pool.swap_remove(at).0;
        // In the crate's own tests, a reused buffer holds NaN: code that read an element before
        // writing it would show.
        #[cfg(test)]
        v.fill(F::from_f64(f64::NAN));
        Some(v)
    })
    .flatten()
}

/// Gives a buffer to this thread's workspace (or frees it, without one).
pub(crate) fn give<F: Float>(v: Vec<F>) {
    if v.len() < MIN_LEN {
        return;
    }
    let _ = current(move |ws| {
        let step = ws.step;
        ws.pool::<F>().push((v, step));
    });
}

std::thread_local! {
    static SCRATCH_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH_F64: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
    static WEIGHTS_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static WEIGHTS_F64: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on `len` elements of a buffer this thread keeps for scratch (their values arbitrary):
/// the per-head buffers of the attention (`Kᵀ`, `Vᵀ`, `P ⊙ M`, `∂L/∂P`, `∂L/∂S`), on its
/// general path and its AVX2 register path, which had been allocated head by head. A call
/// inside `f` gets a buffer of its own, allocated.
pub(crate) fn with_thread_scratch<F: Float, R>(len: usize, f: impl FnOnce(&mut [F]) -> R) -> R {
    scratch_of(&SCRATCH_F32, &SCRATCH_F64, len, f)
}

/// [`with_thread_scratch`] on a second buffer of the thread's: a head's attention weights in
/// inference ([`crate::layers::attention::attention_infer`]), around the calls that take
/// the first.
pub(crate) fn with_weights_scratch<F: Float, R>(len: usize, f: impl FnOnce(&mut [F]) -> R) -> R {
    scratch_of(&WEIGHTS_F32, &WEIGHTS_F64, len, f)
}

type Scratch<T> = std::thread::LocalKey<std::cell::RefCell<Vec<T>>>;

/// `f` on `len` elements of the thread's buffer of `F` (`f32` or `f64`), or of a new one
/// where that buffer is taken.
fn scratch_of<F: Float, R>(
    f32s: &'static Scratch<f32>,
    f64s: &'static Scratch<f64>,
    len: usize,
    f: impl FnOnce(&mut [F]) -> R,
) -> R {
    fn on<T: Default + Clone + 'static, F: Float, R>(
        cell: &std::cell::RefCell<Vec<T>>,
        len: usize,
        f: impl FnOnce(&mut [F]) -> R,
    ) -> R {
        match cell.try_borrow_mut() {
            Ok(mut buf) => {
                if buf.len() < len {
                    buf.resize(len, T::default());
                }
                let any: &mut dyn std::any::Any = &mut *buf;
                let buf = any.downcast_mut::<Vec<F>>().expect("T is F");
                f(&mut buf[..len])
            }
            Err(_) => f(&mut vec![F::ZERO; len]),
        }
    }
    if TypeId::of::<F>() == TypeId::of::<f32>() {
        f32s.with(|c| on::<f32, F, R>(c, len, f))
    } else {
        f64s.with(|c| on::<f64, F, R>(c, len, f))
    }
}

/// A new array of `shape` whose elements are all written by `fill` before any is read: from
/// the workspace when it has a buffer of that size, else allocated without zeroing.
///
/// # Safety
/// `fill` must write every element of the view it is given before it reads any.
pub(crate) unsafe fn filled<F: Float, D: Dimension, Sh: ShapeBuilder<Dim = D>>(
    shape: Sh,
    fill: impl FnOnce(ndarray::ArrayViewMut<'_, F, D>),
) -> Array<F, D> {
    let shape = shape.into_shape_with_order();
    let len = shape.size();
    if let Some(v) = take::<F>(len) {
        let mut a = Array::from_shape_vec(shape, v).expect("a buffer of the shape's size");
        fill(a.view_mut());
        return a;
    }
    let mut out = Array::<F, D>::uninit(shape);
    // SAFETY: a view of out's own storage with its shape and strides; creating it reads
    // nothing, and `fill` writes every element before reading any (caller).
    unsafe {
        let view = ndarray::ArrayViewMut::from_shape_ptr(out.raw_dim(), out.as_mut_ptr() as *mut F);
        fill(view);
        out.assume_init()
    }
}

/// A new array of zeros, from the workspace when it has a buffer of that size.
pub(crate) fn zeros<F: Float, D: Dimension, Sh: ShapeBuilder<Dim = D>>(shape: Sh) -> Array<F, D> {
    let shape = shape.into_shape_with_order();
    match take::<F>(shape.size()) {
        Some(mut v) => {
            let len = v.len();
            super::parallel::for_each_chunk_mut(&mut v, 64, len, |_, c| super::simd::fill(c, F::ZERO));
            Array::from_shape_vec(shape, v).expect("a buffer of the shape's size")
        }
        None => Array::zeros(shape),
    }
}

/// A cache line, in bytes: where buffers read by vector loads start ([`line_start`]).
const LINE_BYTES: usize = 64;

/// Elements of `T` in a cache line.
pub(crate) const fn line_elements<T>() -> usize {
    LINE_BYTES / std::mem::size_of::<T>()
}

/// Elements of `T` a buffer needs beyond its contents so that they can start on a cache line
/// ([`line_start`]): a `Vec`'s allocation is only as aligned as its element type asks (glibc
/// puts large ones 16 bytes past a page, or anywhere on its heap).
pub(crate) const fn line_pad<T>() -> usize {
    line_elements::<T>() - 1
}

/// Where in `buf` (its contents and [`line_pad`] elements more) the first element on a cache
/// line lies.
pub(crate) fn line_start<T>(buf: &[T]) -> usize {
    buf.as_ptr().align_offset(LINE_BYTES).min(line_pad::<T>())
}

/// `len` zeros, written by the team in chunks of whole multiples of `align` elements, each on
/// the thread that a loop cut the same way would give it (a key/value cache's sequences are
/// zeroed by the thread that runs them): a buffer of megabytes zeroed by the calling thread
/// alone (the allocator's zeroing, or the first touch of its pages) had left the others
/// waiting.
pub(crate) fn zeros_by_team<T: Copy + Default + Send>(len: usize, align: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    super::parallel::for_each_chunk_mut(&mut v.spare_capacity_mut()[..len], align, len, |_, c| {
        for x in c {
            x.write(T::default());
        }
    });
    // SAFETY: every element of the first `len` was written above.
    unsafe { v.set_len(len) };
    v
}

/// An owned copy of `x` in standard layout, from the workspace when it can.
pub(crate) fn owned<F: Float, D: Dimension>(x: ndarray::ArrayView<'_, F, D>) -> Array<F, D> {
    // SAFETY: both branches write every element.
    unsafe {
        filled(x.raw_dim(), |mut out| match (out.as_slice_mut(), x.as_slice()) {
            // Contiguous: copied in parallel chunks.
            (Some(out), Some(x)) => {
                let len = out.len();
                super::parallel::for_each_chunk_mut(out, 64, len, |at, o| {
                    o.copy_from_slice(&x[at..at + o.len()])
                });
            }
            _ => out.assign(&x),
        })
    }
}

/// Values whose memory can go back to the current workspace when they are no longer needed:
/// arrays, and the caches of the crate's layers, blocks and models.
pub trait Recycle {
    /// Gives this value's buffers to the current workspace ([`with_workspace`]), or drops
    /// them without one.
    fn give_back(self);
}

impl<F: Float, D: Dimension> Recycle for Array<F, D> {
    fn give_back(self) {
        let (v, offset) = self.into_raw_vec_and_offset();
        if offset == Some(0) || offset.is_none() {
            give(v);
        }
    }
}

impl<T: Recycle> Recycle for Option<T> {
    fn give_back(self) {
        if let Some(x) = self {
            x.give_back();
        }
    }
}

impl<A: Recycle, B: Recycle> Recycle for (A, B) {
    fn give_back(self) {
        self.0.give_back();
        self.1.give_back();
    }
}

impl<A: Recycle, B: Recycle, C: Recycle> Recycle for (A, B, C) {
    fn give_back(self) {
        self.0.give_back();
        self.1.give_back();
        self.2.give_back();
    }
}

impl<T: Recycle> Recycle for Vec<T> {
    fn give_back(self) {
        self.into_iter().for_each(Recycle::give_back);
    }
}

/// Implements [`Recycle`] for a cache struct by recycling the listed fields.
macro_rules! impl_recycle {
    ($ty:ident < $($g:ident $(: $bound:path)?),* > { $($field:ident),* $(,)? }) => {
        impl<$($g $(: $bound)?),*> $crate::kernels::workspace::Recycle for $ty<$($g),*> {
            fn give_back(self) {
                $($crate::kernels::workspace::Recycle::give_back(self.$field);)*
            }
        }
    };
}
pub(crate) use impl_recycle;

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn recycled_buffers_come_back_and_only_inside_the_scope() {
        let mut ws = Workspace::new();
        let first: Array2<f32> = with_workspace(&mut ws, || zeros((100, 50)));
        let ptr = first.as_ptr();
        with_workspace(&mut ws, || first.give_back());
        assert_eq!(ws.bytes(), 100 * 50 * 4);
        // Same size: the same memory, zeroed.
        let again: Array2<f32> = with_workspace(&mut ws, || zeros((50, 100)));
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.iter().all(|&v| v == 0.0));
        assert_eq!(ws.bytes(), 0);
        // Outside a workspace, recycling drops and allocation is fresh.
        again.give_back();
        assert_eq!(ws.bytes(), 0);
        // f64 buffers are kept apart from f32 ones.
        let d: Array2<f64> = Array2::zeros((100, 50));
        with_workspace(&mut ws, || d.give_back());
        let f: Array2<f32> = with_workspace(&mut ws, || zeros((100, 50)));
        assert!(f.iter().all(|&v| v == 0.0));
        assert_eq!(ws.bytes(), 100 * 50 * 8);
        // A step that does not take a buffer back frees it at its end.
        ws.end_step();
        assert_eq!(ws.bytes(), 100 * 50 * 8, "given back during the step that ends");
        ws.end_step();
        assert_eq!(ws.bytes(), 0, "not taken during the next step");
    }

    #[test]
    fn a_steady_loop_reuses_the_same_memory() {
        let mut ws = Workspace::new();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let mut seen = std::collections::HashSet::new();
        for step in 0..20 {
            with_workspace(&mut ws, || {
                let masks: Vec<Array2<f32>> = (0..4)
                    .map(|_| crate::kernels::dropout_mask(0.1, (128, 64), &mut rng))
                    .collect();
                if step > 0 {
                    assert!(masks.iter().all(|m| seen.contains(&(m.as_ptr() as usize))));
                }
                seen.extend(masks.iter().map(|m| m.as_ptr() as usize));
                masks.give_back();
            });
            ws.end_step();
            assert_eq!(ws.bytes(), 4 * 128 * 64 * 4);
        }
    }
}
