//! Fork-join over the threads of the current rayon pool, with a start-up measured in
//! nanoseconds rather than in the tens or hundreds of microseconds it takes to wake a sleeping
//! thread.
//!
//! A training step or a forward pass is a chain of a few hundred short parallel loops
//! (GEMMs, attention heads, layer norms), each a fraction of a millisecond. Between two of
//! them the pool's other threads fall asleep, and waking one costs about 70 µs on a virtual
//! machine, sometimes more than the loop itself: the loop then runs on one thread. OpenMP
//! runtimes avoid this by letting idle threads spin for a while; [`with_team`] does the same
//! for the length of one call into the crate, without a pool or a global setting of its own:
//!
//! - [`with_team`] runs a closure with the other threads of the current rayon pool held in a
//!   spin loop (rayon jobs of a scope, so they leave when the closure returns);
//! - [`for_each_index`] calls `f(0..parts)` on the team, or on rayon outside a team; a call
//!   from inside a part runs on the calling thread, so nested loops never oversubscribe;
//! - `for_each_index_shared`, inside a part, offers the loop's parts to the threads that have
//!   none left (one such loop at a time): two products run side by side ([`join`]) share
//!   their ends, block by block, rather than one thread waiting for the other's.
//!
//! Parts are handed out one at a time: the thread that opened the loop takes them from the
//! front (`0, 1, …`), its helpers from the back, until they meet. On two threads each takes a
//! contiguous run, the same half of the rows loop after loop (the rows a core wrote in one
//! loop are in its cache for the next), and the first to finish takes over what is left of
//! the other's run. Which thread runs which part still varies from run to run; what a part
//! computes must depend on its index only. The crate's
//! loops split independent rows, heads and tiles, never a sum, so their results are the
//! same for any number of threads.
//!
//! The model entry points (training steps, forward passes, decoding) enter a team; code that
//! calls single layers or kernels directly runs on rayon as before, or can enter one itself.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use rayon::prelude::*;

/// Spins of an idle helper between two yields of its time slice.
const SPINS_PER_YIELD: u32 = 1 << 12;

/// One parallel loop, on the stack of the thread that runs it.
struct Region<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    parts: usize,
}

/// The shared state of a team.
struct Team {
    /// Odd while a region is open, even while none is; changes with every open and close.
    epoch: AtomicUsize,
    /// The open region (valid while `epoch` is odd and a reader is counted in `active`).
    region: AtomicPtr<Region<'static>>,
    /// The open region's parts: from the front to the thread that opened it, from the back
    /// to the helpers.
    claims: Claims,
    /// Helpers that may be reading the region.
    active: AtomicUsize,
    /// Set when the team's closure has returned: helpers leave.
    done: AtomicBool,
    /// The first panic of a part, to resume on the calling thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Threads in the team, the caller included.
    size: usize,
    /// The loop offered by a thread inside a part, on a cache line of its own: the helpers
    /// look at it as they spin, the parts' claims above change at every part.
    offer: Offer,
}

/// A loop that a thread inside a part offers to the others ([`for_each_index_shared`]).
#[repr(align(64))]
struct Offer {
    /// The loop, valid while `readers` counts a reader that found it here.
    side: AtomicPtr<Side<'static>>,
    /// Threads that may be reading `side`.
    readers: AtomicUsize,
}

/// A loop offered by a thread inside a part of a region to the team's threads that have no
/// part left: its owner takes its parts from the front, the others from the back.
struct Side<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    claims: Claims,
    /// The first panic of a part, to resume on the owner's thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// How a loop's parts are handed out from both of its ends.
struct Claims {
    /// Parts handed out (a thread that takes the count to `parts` or past gets none).
    claimed: AtomicUsize,
    /// Parts handed out from the front (`0, 1, …`).
    front: AtomicUsize,
    /// Parts handed out from the back (`parts - 1, parts - 2, …`).
    back: AtomicUsize,
    /// Parts not yet finished.
    remaining: AtomicUsize,
}

impl Claims {
    /// For a loop of `parts` parts, none handed out.
    fn new(parts: usize) -> Self {
        Claims {
            claimed: AtomicUsize::new(0),
            front: AtomicUsize::new(0),
            back: AtomicUsize::new(0),
            remaining: AtomicUsize::new(parts),
        }
    }

    /// Made ready for a new loop of `parts` parts (by the one thread that opens it).
    fn reset(&self, parts: usize) {
        self.claimed.store(0, Ordering::Relaxed);
        self.front.store(0, Ordering::Relaxed);
        self.back.store(0, Ordering::Relaxed);
        self.remaining.store(parts, Ordering::Relaxed);
    }

    /// Whether every part has finished (their writes then visible to this thread).
    fn finished(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Takes parts of `f` until none is left: from the front, or `from_back`, each run as a
    /// part, the first panic kept in `panic`. Every claim below `parts` is one part; the `f`
    /// claims from the front are parts `0..f`, the `b` from the back the last `b`, and `f +
    /// b = parts`, so each part runs once.
    fn work(
        &self,
        parts: usize,
        f: &(dyn Fn(usize) + Sync),
        from_back: bool,
        panic: &Mutex<Option<Box<dyn Any + Send>>>,
    ) {
        loop {
            if self.claimed.fetch_add(1, Ordering::Relaxed) >= parts {
                return;
            }
            let i = if from_back {
                parts - 1 - self.back.fetch_add(1, Ordering::Relaxed)
            } else {
                self.front.fetch_add(1, Ordering::Relaxed)
            };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| as_part(|| f(i)))) {
                panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            }
            self.remaining.fetch_sub(1, Ordering::Release);
        }
    }
}

thread_local! {
    /// The team this thread leads, while it runs the closure of [`with_team`].
    static TEAM: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is running a part (nested loops then run serially).
    static IN_PART: Cell<bool> = const { Cell::new(false) };
    /// The team this thread belongs to, as its leader or as a helper, while the team lasts.
    static MEMBER: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with the other threads of the current rayon pool ready for [`for_each_index`].
///
/// With one thread, or when already inside a team, this is just `f()`. The helpers spin
/// while `f` runs: the pool's threads are busy for its whole length, as an OpenMP team's
/// are.
///
/// # Panics
/// Resumes a panic of `f` or of a part.
pub fn with_team<R>(f: impl FnOnce() -> R) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || !TEAM.get().is_null() || IN_PART.get() {
        return f();
    }
    let team = Team {
        epoch: AtomicUsize::new(0),
        region: AtomicPtr::new(std::ptr::null_mut()),
        claims: Claims::new(0),
        active: AtomicUsize::new(0),
        done: AtomicBool::new(false),
        panic: Mutex::new(None),
        size: threads,
        offer: Offer {
            side: AtomicPtr::new(std::ptr::null_mut()),
            readers: AtomicUsize::new(0),
        },
    };
    let out = rayon::in_place_scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| team.help());
        }
        TEAM.set(&team);
        MEMBER.set(&team);
        let out = catch_unwind(AssertUnwindSafe(f));
        MEMBER.set(std::ptr::null());
        TEAM.set(std::ptr::null());
        team.done.store(true, Ordering::Release);
        out
    });
    match out {
        Ok(r) => r,
        Err(p) => resume_unwind(p),
    }
}

/// Model calls in bf16 on AMX tiles below this many FLOPs (by the models' FLOP model: dense
/// m→n is 2mn per token, attention 4·Tq·Tk·d per sequence, a training step 3× the forward) run
/// on the calling thread alone: [`with_team_for`].
///
/// Measured on a 2-core Intel Xeon with AMX, training steps of encoder-decoder models (one
/// thread against two, `bench`-like runs, medians of 20): 0.38 GFLOP (the `tiny` workload)
/// 3.87 ms against 4.35, 0.76 GFLOP 7.55 against 7.91, 1.5 GFLOP 15.4 against 14.8 (the team
/// pays from here), 2.4 GFLOP 14.4 against 12.1. The tiles multiply such products in a few
/// microseconds; splitting them and the memory-bound passes between them over two cores costs
/// more in moved cache lines than the second core gives. In `f32` the same steps gain from the
/// team (the `tiny` step 5.92 → 5.52 ms). Inference calls are judged by the size of their
/// products instead ([`with_team_for_products`]): a decoding step's FLOPs do not tell a small
/// model's step from a large one's.
const AMX_ALONE_BELOW_FLOPS: u64 = 1_000_000_000;

/// Runs `f` as [`with_team`] does, unless a call of `flops` FLOPs in the current precision is
/// too small to pay for a second thread: then on the calling thread alone, with every loop
/// inside it serial (the results are the same bits either way).
///
/// Today the one such case is a bf16 call on AMX tiles below 10⁹ FLOPs; see
/// `AMX_ALONE_BELOW_FLOPS` in the source for the measurements. Pass `u64::MAX` when the work
/// is not known: the team then runs.
///
/// # Panics
/// Resumes a panic of `f` or of a part.
pub fn with_team_for<R>(flops: u64, f: impl FnOnce() -> R) -> R {
    with_team_if(flops >= AMX_ALONE_BELOW_FLOPS, f)
}

/// Inference calls in bf16 on AMX tiles whose matrix products are each below this many FLOPs
/// (`2 · rows · width²`: the rows of the call against a square weight of the model's width)
/// run on the calling thread alone: [`with_team_for_products`].
///
/// Measured on 2-core Intel Xeons with AMX (one thread against two, interleaved `bench`
/// runs). On the first (2026-12-02), the `tiny` workload's eval forward (256 rows of width 64,
/// 2²¹ FLOPs per product) took 0.78–0.80 ms on two threads against 0.71–0.75 on one, its greedy
/// decode (16 rows a step, 2¹⁷) 1.68–1.71 against 1.57–1.63 ms; an eval forward of twice the
/// rows (2²²) was 11% faster on two, and so was a decoding step of the `small` workload (32 rows
/// of width 256, 2²², 1.4×). The threshold was 2²² then. On a later one (2026-12-04), whose
/// second core gave the `f32` tiny eval 2.1×, the tiny bf16 eval forward took 0.28–0.30 ms on
/// two threads against 0.48–0.52 alone; the tiny decode still ran faster alone (0.87–0.90 ms
/// against 1.35–1.42 with every call on the team). A whole call's FLOPs do not tell these apart
/// (a small decoding step and a tiny eval forward are both about 0.13 GFLOP); the size of its
/// products does. Splitting products that the tiles multiply in a microsecond or two, and the
/// passes between them, moves more cache lines between the cores than the second core gives
/// back.
const AMX_ALONE_BELOW_PRODUCT_FLOPS: u64 = 1 << 21;

/// Runs `f` as [`with_team`] does, unless it is an inference call in bf16 on AMX tiles whose
/// products, `rows` rows against weights of `width × width`, are too small to pay for a
/// second thread: then on the calling thread alone (the results are the same bits either way).
/// See `AMX_ALONE_BELOW_PRODUCT_FLOPS` in the source for the measurements.
///
/// # Panics
/// Resumes a panic of `f` or of a part.
pub fn with_team_for_products<R>(rows: usize, width: usize, f: impl FnOnce() -> R) -> R {
    with_team_if(product_flops(rows, width) >= AMX_ALONE_BELOW_PRODUCT_FLOPS, f)
}

/// The FLOPs of one product of `rows` rows against a `width × width` weight, `2 · rows ·
/// width²` (saturating): the size by which inference calls choose how to use the threads.
pub(crate) fn product_flops(rows: usize, width: usize) -> u64 {
    2u64.saturating_mul(rows as u64)
        .saturating_mul(width as u64)
        .saturating_mul(width as u64)
}

/// [`with_team`], or on this thread alone when `!pays` for a bf16 call on AMX tiles with more
/// than one thread.
fn with_team_if<R>(pays: bool, f: impl FnOnce() -> R) -> R {
    use super::precision::{Bf16Path, Precision, bf16_path, precision};
    let alone = !pays
        && rayon::current_num_threads() > 1
        && precision() == Precision::Bf16
        && bf16_path() == Bf16Path::Amx;
    if alone { as_part(f) } else { with_team(f) }
}

/// The number of threads a loop started here would run on.
pub fn threads() -> usize {
    if IN_PART.get() {
        return 1;
    }
    let team = TEAM.get();
    if team.is_null() {
        rayon::current_num_threads()
    } else {
        // SAFETY: TEAM points to the team on this thread's stack while its closure runs.
        unsafe { (*team).size }
    }
}

/// Calls `f(i)` for every `i` in `0..parts`, on the current team, or on rayon's pool outside
/// one, or on this thread inside a part of another loop or with `parts < 2`.
///
/// # Panics
/// Resumes a panic of `f`.
pub fn for_each_index(parts: usize, f: impl Fn(usize) + Sync) {
    if parts < 2 || IN_PART.get() {
        (0..parts).for_each(f);
        return;
    }
    let f = carried(f);
    let team = TEAM.get();
    if team.is_null() {
        (0..parts).into_par_iter().for_each(|i| as_part(|| f(i)));
        return;
    }
    // SAFETY: TEAM points to the team on this thread's stack while its closure runs.
    unsafe { (*team).run(parts, &f) };
}

/// `f` with the calling thread's precision of the products and the weights packed for them,
/// which travel with the work to the threads that run its parts.
fn carried(f: impl Fn(usize) + Sync) -> impl Fn(usize) + Sync {
    let precision = super::precision::precision();
    let packs = super::gemm::weights::Current::get();
    move |i| super::precision::with_precision(precision, || packs.with(|| f(i)))
}

/// Runs `a` and `b`, two independent pieces of work of about the same size: on a team of
/// exactly two threads, one on each (every loop inside either then runs on its thread
/// alone, but for a loop offered with `for_each_index_shared`, such as a product's blocks,
/// which the thread done first takes from the far end), else one after the other, each with
/// every thread.
///
/// A weight gradient `∂Y ᵀ·X` and the input gradient `∂Y·W` of the same projection take the
/// same FLOPs; run side by side, each product keeps its packed operands in its own core's
/// cache and the two threads meet once, where split between them every product packs half of
/// each operand for the other core to read and ends with a wait for the slower half. What each
/// computes does not depend on where it runs, so the results are the same bits either way.
///
/// # Panics
/// Resumes a panic of `a` or `b`.
pub fn join(a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
    if threads() != 2 {
        a();
        b();
        return;
    }
    let (a, b) = (Mutex::new(Some(a)), Mutex::new(Some(b)));
    for_each_index(2, |i| {
        if i == 0 {
            let a = a.lock().unwrap_or_else(|e| e.into_inner()).take();
            a.expect("part 0 runs once")();
        } else {
            let b = b.lock().unwrap_or_else(|e| e.into_inner()).take();
            b.expect("part 1 runs once")();
        }
    });
}

/// [`join`] for a layer's weight gradient (`a`) and input gradient (`b`), except under bf16
/// precision on AMX: there the two run one after the other, each product cut between every
/// thread. A weight gradient's bf16 product takes longer than its input-gradient twin of the
/// same FLOPs (its `∂Yᵀ` packed by transposes, its C read and added to, its bias summed in
/// its packing), each product is short beside its packing, and side by side the faster
/// thread waited for the other. Intel Xeon with AMX, two threads, alternating runs: small
/// bf16 training step 46.0–48.3 → 44.9–47.5 ms (eight pairs), base 237.5–238.0 → 232.5–235.2
/// ms (three). The AVX512-BF16 kernels (AMD EPYC Zen 4 and 5) keep them side by side, as
/// tuned there. The same bits either way.
///
/// # Panics
/// Resumes a panic of `a` or `b`.
pub(crate) fn join_gradients(a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
    use super::precision::{Precision, bf16_path, precision};
    if precision() == Precision::Bf16 && bf16_path() == super::gemm::bf16::Bf16Path::Amx {
        a();
        b();
    } else {
        join(a, b);
    }
}

/// Calls `f(offset, chunk)` on contiguous chunks of `data` that together cover it, in
/// parallel when `work` (an estimate of the cost, e.g. elements times operations per element)
/// is worth it ([`super::parallel_worth`]). Chunks are whole multiples of `align` elements
/// (but the last), so a chunk can be made of whole rows.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    align: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let len = data.len();
    let parts = if super::parallel_worth(work) { threads() } else { 1 };
    if parts < 2 || len <= align {
        f(0, data);
        return;
    }
    let align = align.max(1);
    let chunk = len.div_ceil(parts).div_ceil(align) * align;
    let pieces = len.div_ceil(chunk);
    let base = SharedSlice(data.as_mut_ptr());
    for_each_index(pieces, |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: pieces are disjoint ranges of `data`, which is borrowed mutably for the call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
        f(start, piece);
    });
}

/// Cuts `c` along `axis` into `parts` contiguous ranges (lengths multiples of `align`, but the
/// last) and calls `f(range, view of that range)` for each, on the team.
pub fn for_each_split_mut<T: Send>(
    mut c: ndarray::ArrayViewMut2<'_, T>,
    axis: ndarray::Axis,
    parts: usize,
    align: usize,
    f: impl Fn(std::ops::Range<usize>, ndarray::ArrayViewMut2<'_, T>) + Sync,
) {
    let len = c.len_of(axis);
    let chunk = len.div_ceil(parts.max(1)).div_ceil(align.max(1)) * align.max(1);
    if parts < 2 || chunk >= len {
        let all = 0..len;
        f(all, c);
        return;
    }
    let pieces = len.div_ceil(chunk);
    let (dim, strides) = (c.dim(), (c.strides()[0], c.strides()[1]));
    let base = SharedSlice(c.as_mut_ptr());
    for_each_index(pieces, |i| {
        let range = i * chunk..((i + 1) * chunk).min(len);
        // SAFETY: a view of the same elements as `c` (pointer, shape and strides from it);
        // each piece then touches only its own range along `axis`, disjoint from the others'.
        let all = unsafe {
            ndarray::ArrayViewMut2::from_shape_ptr(
                ndarray::ShapeBuilder::strides(dim, (strides.0 as usize, strides.1 as usize)),
                base.at(0),
            )
        };
        let piece = match axis.index() {
            0 => all.slice_move(ndarray::s![range.clone(), ..]),
            _ => all.slice_move(ndarray::s![.., range.clone()]),
        };
        f(range, piece);
    });
}

/// A 4-D mutable view handed out as the disjoint 2-D views of its `(i, j)` pairs (one sequence
/// and one head of attention), for the parts of a parallel loop.
pub struct PairViews<'a, T> {
    ptr: *mut T,
    dim: [usize; 4],
    strides: [isize; 4],
    _life: std::marker::PhantomData<ndarray::ArrayViewMut4<'a, T>>,
}

// SAFETY: the views it hands out are disjoint (`get`'s contract), as for `&mut [T]` split in
// pieces.
unsafe impl<T: Send> Send for PairViews<'_, T> {}
unsafe impl<T: Send> Sync for PairViews<'_, T> {}

impl<'a, T> PairViews<'a, T> {
    /// Takes the view for the length of the loop.
    pub fn new(mut v: ndarray::ArrayViewMut4<'a, T>) -> Self {
        let (a, b, c, d) = v.dim();
        let s = v.strides();
        let strides = [s[0], s[1], s[2], s[3]];
        PairViews {
            ptr: v.as_mut_ptr(),
            dim: [a, b, c, d],
            strides,
            _life: std::marker::PhantomData,
        }
    }

    /// The `[.., ..]` view of pair `(i, j)`.
    ///
    /// # Safety
    /// Each pair may be taken once at a time: two live views of the same pair alias.
    pub unsafe fn get(&self, i: usize, j: usize) -> ndarray::ArrayViewMut2<'a, T> {
        assert!(
            i < self.dim[0] && j < self.dim[1],
            "PairViews: pair ({i}, {j}) out of {:?}",
            self.dim
        );
        let [_, _, r, c] = self.dim;
        let [si, sj, sr, sc] = self.strides;
        // SAFETY: (i, j) is inside the view (asserted), so its [r, c] elements are elements of
        // the view `new` took, with the view's strides; disjoint from other pairs (caller).
        unsafe {
            let p = self.ptr.offset(i as isize * si + j as isize * sj);
            ndarray::ArrayViewMut2::from_shape_ptr(
                ndarray::ShapeBuilder::strides((r, c), (sr as usize, sc as usize)),
                p,
            )
        }
    }
}

/// A mutable slice shared by the parts of a parallel loop, each of which takes its own ranges.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _life: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: see `range`: parts take disjoint ranges, as with `split_at_mut`.
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    /// Takes the slice for the length of the loop.
    pub fn new(s: &'a mut [T]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _life: std::marker::PhantomData,
        }
    }

    /// Elements `at..at + len`.
    ///
    /// # Safety
    /// Ranges alive at the same time must not overlap.
    ///
    /// # Panics
    /// If the range goes past the end.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, at: usize, len: usize) -> &'a mut [T] {
        self.check(at, len);
        // SAFETY: inside the slice (checked); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) }
    }

    /// Elements `at..at + len`, read-only: a range several parts may read at once.
    ///
    /// # Safety
    /// No range from [`Disjoint::range`] that overlaps it may be alive at the same time.
    ///
    /// # Panics
    /// If the range goes past the end.
    pub unsafe fn shared(&self, at: usize, len: usize) -> &'a [T] {
        self.check(at, len);
        // SAFETY: inside the slice (checked); not written meanwhile by the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(at), len) }
    }

    /// Panics unless `at..at + len` lies inside the slice.
    #[inline]
    fn check(&self, at: usize, len: usize) {
        assert!(
            at + len <= self.len,
            "Disjoint: {at}..{} past {}",
            at + len,
            self.len
        );
    }
}

/// A slice's pointer, shared by threads that touch disjoint ranges of it.
struct SharedSlice<T>(*mut T);
impl<T> Clone for SharedSlice<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedSlice<T> {}
// SAFETY: see `for_each_chunk_mut`, the one user.
unsafe impl<T: Send> Send for SharedSlice<T> {}
unsafe impl<T: Send> Sync for SharedSlice<T> {}
impl<T> SharedSlice<T> {
    fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// Runs `g` flagged as a part, so that loops inside it stay on this thread.
fn as_part<R>(g: impl FnOnce() -> R) -> R {
    let was = IN_PART.replace(true);
    let out = g();
    IN_PART.set(was);
    out
}

impl Team {
    /// Opens a region, works on it, waits for every part and every reader.
    fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        let region = Region { f, parts };
        self.claims.reset(parts);
        // SAFETY of the cast: the pointer is only dereferenced while the region is open and
        // counted readers hold it, and this function waits for both to end before returning.
        self.region.store(
            &region as *const Region<'_> as *mut Region<'static>,
            Ordering::Relaxed,
        );
        self.epoch.fetch_add(1, Ordering::SeqCst); // open (odd)
        self.claims.work(parts, f, false, &self.panic);
        while !self.claims.finished() {
            if !self.steal() {
                std::hint::spin_loop();
            }
        }
        self.epoch.fetch_add(1, Ordering::SeqCst); // closed (even)
        while self.active.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if let Some(p) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }

    /// Works on the loop offered by a thread inside a part, if there is one; whether there was.
    fn steal(&self) -> bool {
        if self.offer.side.load(Ordering::Relaxed).is_null() {
            return false;
        }
        self.offer.readers.fetch_add(1, Ordering::SeqCst);
        let side = self.offer.side.load(Ordering::SeqCst);
        if !side.is_null() {
            // SAFETY: this thread is counted in `offer.readers` and found the loop published,
            // so its owner has not yet taken it down (it waits for the readers after doing
            // so) and the loop on its stack is alive.
            unsafe {
                let side = &*side;
                side.claims.work(side.parts, side.f, true, &side.panic);
            }
        }
        self.offer.readers.fetch_sub(1, Ordering::SeqCst);
        !side.is_null()
    }

    /// A helper's loop: wait for a region, work on it, until the team is done.
    fn help(&self) {
        MEMBER.set(self);
        let mut seen = 0;
        let mut spins = 0u32;
        loop {
            let e = self.epoch.load(Ordering::Acquire);
            if e % 2 == 1 && e != seen {
                self.active.fetch_add(1, Ordering::SeqCst);
                if self.epoch.load(Ordering::SeqCst) == e {
                    // SAFETY: the region is open and this thread is counted in `active`, so
                    // `run` has not returned and the region it points to is alive.
                    let region = unsafe { &*self.region.load(Ordering::Acquire) };
                    self.claims.work(region.parts, region.f, true, &self.panic);
                }
                self.active.fetch_sub(1, Ordering::SeqCst);
                seen = e;
                spins = 0;
                continue;
            }
            if self.done.load(Ordering::Acquire) {
                MEMBER.set(std::ptr::null());
                return;
            }
            if self.steal() {
                spins = 0;
                continue;
            }
            spins += 1;
            if spins.is_multiple_of(SPINS_PER_YIELD) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// Whether this thread runs a part of a loop of a team, where [`for_each_index_shared`] can
/// offer a loop to the others.
pub(crate) fn in_team_part() -> bool {
    IN_PART.get() && !MEMBER.get().is_null()
}

/// Calls `f(i)` for every `i` in `0..parts` as [`for_each_index`] does, and inside a part of
/// another loop offers the parts to the team's threads that have none left: the calling
/// thread takes them from the front, a thread that is done with its own part from the back.
/// Two products run side by side ([`join`]), each on its thread, are cut this way in blocks,
/// so that the thread that finishes first takes the end of the other's product rather than
/// wait for it. Only one such loop is offered at a time; another runs on its thread alone.
///
/// # Panics
/// Resumes a panic of `f`.
pub(crate) fn for_each_index_shared(parts: usize, f: impl Fn(usize) + Sync) {
    if parts < 2 || !in_team_part() {
        return for_each_index(parts, f);
    }
    let team = MEMBER.get();
    let f = carried(f);
    let side = Side {
        f: &f,
        parts,
        claims: Claims::new(parts),
        panic: Mutex::new(None),
    };
    // SAFETY: MEMBER points to the team this thread belongs to, alive while it runs a part.
    let team = unsafe { &*team };
    let ptr = &side as *const Side<'_> as *mut Side<'static>;
    if team
        .offer
        .side
        .compare_exchange(std::ptr::null_mut(), ptr, Ordering::SeqCst, Ordering::Relaxed)
        .is_err()
    {
        // Another loop is on offer: this one runs here.
        return (0..parts).for_each(f);
    }
    // SAFETY of the cast above: the loop is only read by threads counted in `offer.readers`
    // that found it published; it is taken down and those readers waited for below, before
    // this function returns.
    side.claims.work(parts, &f, false, &side.panic);
    while !side.claims.finished() {
        std::hint::spin_loop();
    }
    team.offer.side.store(std::ptr::null_mut(), Ordering::SeqCst);
    while team.offer.readers.load(Ordering::SeqCst) != 0 {
        std::hint::spin_loop();
    }
    if let Some(p) = side.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
        resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn small_bf16_calls_on_amx_run_alone() {
        use crate::kernels::precision::{Bf16Path, Precision, bf16_path, with_precision};
        pool(2).install(|| {
            // A loop inside says how many threads it would use, and on which threads it ran.
            let seen = |flops: u64| {
                with_team_for(flops, || {
                    let others = AtomicU64::new(0);
                    let me = std::thread::current().id();
                    for_each_index(64, |_| {
                        if std::thread::current().id() != me {
                            others.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    (threads(), others.load(Ordering::Relaxed))
                })
            };
            let amx = bf16_path() == Bf16Path::Amx;
            if !amx {
                eprintln!("no AMX here: only the calls that keep the team are checked");
            }
            with_precision(Precision::Bf16, || {
                let (threads, others) = seen(AMX_ALONE_BELOW_FLOPS - 1);
                if amx {
                    assert_eq!((threads, others), (1, 0), "a small bf16 call on AMX runs alone");
                } else {
                    assert_eq!(threads, 2, "bf16 off AMX keeps the team");
                }
                assert_eq!(
                    seen(AMX_ALONE_BELOW_FLOPS).0,
                    2,
                    "a large bf16 call keeps the team"
                );
                assert_eq!(seen(u64::MAX).0, 2, "work not known: the team");
            });
            assert_eq!(seen(0).0, 2, "f32 calls keep the team");
        });
        assert_eq!(pool(1).install(|| with_team_for(0, threads)), 1);
    }

    #[test]
    fn bf16_inference_with_small_products_on_amx_runs_alone() {
        use crate::kernels::precision::{Bf16Path, Precision, bf16_path, with_precision};
        pool(2).install(|| {
            let amx = bf16_path() == Bf16Path::Amx;
            let seen = |rows: usize, width: usize| with_team_for_products(rows, width, threads);
            with_precision(Precision::Bf16, || {
                // 16 rows of width 64: 2¹⁷ FLOPs per product (a tiny decoding step); 128 rows,
                // 2²⁰.
                assert_eq!(seen(16, 64), if amx { 1 } else { 2 });
                assert_eq!(seen(128, 64), if amx { 1 } else { 2 });
                // 2²¹: 256 rows of width 64 (the tiny workload's eval); 2²²: 32 rows of width
                // 256 (a small decoding step).
                assert_eq!(seen(256, 64), 2);
                assert_eq!(seen(32, 256), 2);
                assert_eq!(seen(usize::MAX, usize::MAX), 2, "no overflow");
            });
            assert_eq!(seen(1, 1), 2, "f32 calls keep the team");
        });
    }

    #[test]
    fn every_index_runs_once_in_and_out_of_a_team() {
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                for in_team in [false, true] {
                    let hits: Vec<AtomicU64> = (0..1000).map(|_| AtomicU64::new(0)).collect();
                    let body = || {
                        for round in 0..50 {
                            for_each_index(20, |i| {
                                hits[round * 20 + i].fetch_add(1, Ordering::Relaxed);
                            });
                        }
                    };
                    if in_team {
                        with_team(body);
                    } else {
                        body();
                    }
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            });
        }
    }

    #[test]
    fn the_caller_runs_a_run_from_the_front_and_the_helper_one_from_the_back() {
        pool(2).install(|| {
            with_team(|| {
                let me = std::thread::current().id();
                for parts in [2, 3, 64, 257] {
                    for _ in 0..20 {
                        // 1 where the caller ran the part, 2 where the helper did.
                        let by: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
                        for_each_index(parts, |i| {
                            let who = if std::thread::current().id() == me { 1 } else { 2 };
                            by[i].fetch_add(who, Ordering::Relaxed);
                            std::hint::black_box((0..200).sum::<u64>());
                        });
                        let by: Vec<u64> = by.iter().map(|b| b.load(Ordering::Relaxed)).collect();
                        let front = by.iter().take_while(|&&w| w == 1).count();
                        assert!(
                            by[front..].iter().all(|&w| w == 2),
                            "{parts} parts: the caller's must be a prefix, the helper's the rest: {by:?}"
                        );
                    }
                }
            })
        });
    }

    #[test]
    fn nested_loops_run_inside_the_part() {
        pool(2).install(|| {
            with_team(|| {
                let total = AtomicU64::new(0);
                for_each_index(4, |_| {
                    assert_eq!(threads(), 1);
                    for_each_index(5, |j| {
                        total.fetch_add(j as u64, Ordering::Relaxed);
                    });
                });
                assert_eq!(total.load(Ordering::Relaxed), 4 * 10);
                assert_eq!(threads(), 2);
            })
        });
    }

    #[test]
    fn join_runs_each_side_once_on_a_thread_of_its_own_with_two_threads() {
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                for in_team in [false, true] {
                    let count = |n: usize| {
                        let hits = AtomicU64::new(0);
                        for_each_index(n, |_| {
                            hits.fetch_add(1, Ordering::Relaxed);
                        });
                        hits.load(Ordering::Relaxed)
                    };
                    let body = || {
                        // Each side counts the threads its loops would use and runs one.
                        let (mut a, mut b) = (None, None);
                        join(
                            || a = Some((super::threads(), count(16))),
                            || b = Some((super::threads(), count(16))),
                        );
                        (a.expect("a ran"), b.expect("b ran"))
                    };
                    let ((ta, na), (tb, nb)) = if in_team { with_team(body) } else { body() };
                    assert_eq!((na, nb), (16, 16));
                    // Two threads: one side each, alone; otherwise every thread for each.
                    let each = if threads == 2 { 1 } else { threads };
                    assert_eq!((ta, tb), (each, each), "{threads} threads, in a team: {in_team}");
                }
            });
        }
        pool(2).install(|| {
            let caught = catch_unwind(AssertUnwindSafe(|| join(|| (), || panic!("side b"))));
            assert!(caught.is_err(), "a panic of a side reaches the caller");
        });
    }

    /// Runs a loop of `parts` offered inside one side of a join (`side_b`: the helper's side
    /// on two threads) and returns how many times each part ran and how many parts ran on
    /// another thread than the owner's. With `wait`, the owner's first part waits (up to two
    /// seconds) for another thread to take one.
    fn offered(parts: usize, side_b: bool, wait: bool) -> (Vec<u64>, u64) {
        let hits: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
        let others = AtomicU64::new(0);
        let body = || {
            let owner = std::thread::current().id();
            for_each_index_shared(parts, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                if std::thread::current().id() != owner {
                    others.fetch_add(1, Ordering::Relaxed);
                }
                if i == 0 && wait {
                    let start = std::time::Instant::now();
                    while others.load(Ordering::Relaxed) == 0 && start.elapsed().as_secs() < 2 {
                        std::thread::yield_now();
                    }
                }
                // Nested loops inside a part, the owner's or a taken one, run on its thread.
                assert_eq!(threads(), 1);
            })
        };
        if side_b {
            join(|| (), body)
        } else {
            join(body, || ())
        }
        let hits = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        (hits, others.load(Ordering::Relaxed))
    }

    /// A loop offered inside one side of a join runs every part once, and the thread done
    /// with the other side takes some of its parts, whichever side offers it; outside a team
    /// it runs as `for_each_index`; a panic of a taken part reaches the caller.
    #[test]
    fn a_loop_offered_inside_a_part_is_shared_with_the_idle_thread() {
        pool(2).install(|| {
            with_team(|| {
                for side_b in [true, false] {
                    let (hits, others) = offered(32, side_b, true);
                    assert!(hits.iter().all(|&h| h == 1), "{hits:?}");
                    assert!(others > 0, "side b: {side_b}: the idle thread took none");
                }
                // The offer is taken down: the team's loops go on as before.
                let hits = AtomicU64::new(0);
                for_each_index(16, |_| {
                    hits.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(hits.load(Ordering::Relaxed), 16);
            });
            // Outside a team: every part once, on this pool.
            let (hits, _) = offered(8, true, false);
            assert!(hits.iter().all(|&h| h == 1), "{hits:?}");
            let caught = catch_unwind(AssertUnwindSafe(|| {
                with_team(|| {
                    join(
                        || (),
                        || {
                            let owner = std::thread::current().id();
                            for_each_index_shared(64, |_| {
                                if std::thread::current().id() != owner {
                                    panic!("a taken part");
                                }
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            })
                        },
                    )
                })
            }));
            assert!(caught.is_err(), "the panic reaches the caller");
            assert_eq!(with_team(|| 3 + 4), 7);
        });
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_team_goes_on() {
        pool(2).install(|| {
            let caught = catch_unwind(AssertUnwindSafe(|| {
                with_team(|| {
                    for_each_index(8, |i| {
                        if i == 5 {
                            panic!("part 5");
                        }
                    })
                })
            }));
            assert!(caught.is_err());
            // The pool is still usable.
            assert_eq!(with_team(|| 3 + 4), 7);
        });
    }
}
