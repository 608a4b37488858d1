//! Allocations of a training step: after the first steps, a step takes its activations from
//! the trainer's workspace and its scratch from buffers kept per thread, and allocates a
//! few dozen small things (masks, index lists), not one per head, per tensor or per name.
//! Inference (an eval forward, a greedy decoding step) allocates a few dozen times too, none
//! per head or per sequence.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::models::{EncoderDecoderConfig, Seq2SeqBatch};
use vaswani::train::{Trainer, TrainerConfig};

/// The system allocator, counting the allocations of each thread.
pub struct Counting;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is the system allocator's; the count is a thread-local `Cell` with a
// const initialiser and no destructor, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations made on this thread while `f` runs.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = COUNT.get();
    f();
    COUNT.get() - before
}

/// Whether the portable kernels run, whose GEMM (`matrixmultiply`) allocates its packing
/// buffers at every call: the tests below then say they are skipped.
fn on_portable_kernels() -> bool {
    use vaswani::kernels::cpu::{Level, level};
    let portable = level() == Level::Scalar;
    if portable {
        eprintln!("skipped: the portable kernels' GEMM allocates at every call");
    }
    portable
}

/// `f` on a pool of one thread, so that every allocation it makes is counted on that thread.
fn on_one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(f)
}

/// A training step of a model of `heads` heads over a batch of `batch` pairs, on one thread,
/// allocates a few dozen times whatever the heads, the batch and the number of layers:
/// nothing per head, per sequence or per parameter tensor. On the crate's own kernels (AVX2,
/// AVX-512); the portable path's GEMM (`matrixmultiply`) allocates its packing buffers at
/// every call.
#[test]
fn a_training_step_allocates_nothing_per_head_or_tensor() {
    if on_portable_kernels() {
        return;
    }
    let per_step = |heads: usize, batch: usize, layers: usize| {
        on_one_thread(|| {
            let mut rng = StdRng::seed_from_u64(5);
            let block = BlockConfig::new(32, heads, 64).with_p_drop(0.1);
            let model = EncoderDecoderConfig::new(40, 40, block, layers, layers)
                .init(&mut rng)
                .unwrap();
            let mut trainer = Trainer::new(model, TrainerConfig::default()).unwrap();
            let pairs: Vec<(Vec<usize>, Vec<usize>)> = (0..batch)
                .map(|_| {
                    let s: Vec<usize> = (0..12).map(|_| rng.random_range(3..40)).collect();
                    (s.clone(), s)
                })
                .collect();
            let batch = Seq2SeqBatch::from_pairs(&pairs, 1, 2, 0).unwrap();
            for _ in 0..2 {
                trainer.step(std::slice::from_ref(&batch), &mut rng).unwrap();
            }
            let steps = 3;
            let n = allocations(|| {
                for _ in 0..steps {
                    trainer.step(std::slice::from_ref(&batch), &mut rng).unwrap();
                }
            });
            n / steps
        })
    };
    let small = per_step(2, 4, 1);
    let large = per_step(8, 16, 3);
    eprintln!(
        "allocations a training step: {small} (2 heads, 4 pairs, 1 + 1 layers), {large} (8, 16, 3 + 3)"
    );
    // 32 times the (sequence, head) pairs and three times the tensors: before the attention's
    // scratch and the names on the stack, the larger step allocated about 5 000 times.
    assert!(
        large <= small + small / 2 && large < 400,
        "allocations a step: {small} small, {large} large"
    );
}

/// A model packed for inference allocates a few dozen times an eval forward and a greedy
/// decoding step, on one thread: nothing per head or per sequence, a few dozen at most per
/// layer (its outputs, its step's small buffers), and the allocator serves them from memory it
/// keeps (the performance page measures no page faults once warm). On the crate's own
/// kernels, as above.
#[test]
fn inference_allocates_nothing_per_head_or_sequence() {
    use vaswani::models::TokenBatch;
    if on_portable_kernels() {
        return;
    }
    let counts = |heads: usize, batch: usize, layers: usize| {
        on_one_thread(|| {
            let mut rng = StdRng::seed_from_u64(7);
            let block = BlockConfig::new(32, heads, 64);
            let model = EncoderDecoderConfig::new(40, 40, block, layers, layers)
                .init(&mut rng)
                .unwrap();
            let tokens = |len: usize, rng: &mut StdRng| -> Vec<Vec<usize>> {
                (0..batch)
                    .map(|_| (0..len).map(|_| rng.random_range(3..40)).collect())
                    .collect()
            };
            let src = TokenBatch::from_sequences(&tokens(12, &mut rng), 0).unwrap();
            let tgt = TokenBatch::from_sequences(&tokens(10, &mut rng), 0).unwrap();
            let packed = model.packed();
            let steps = 10;
            let decode = || {
                let state = packed.begin_decode(&src, steps).unwrap();
                vaswani::infer::greedy(state, 1, None, steps).unwrap();
            };
            for _ in 0..2 {
                packed.infer(&src, &tgt).unwrap();
                decode();
            }
            let forward = allocations(|| {
                packed.infer(&src, &tgt).unwrap();
            });
            let per_step = allocations(decode) / steps as u64;
            (forward, per_step)
        })
    };
    let small = counts(2, 4, 1);
    let wide = counts(8, 16, 1);
    let large = counts(8, 16, 3);
    eprintln!(
        "allocations (eval forward, a greedy step): {small:?} (2 heads, 4 sequences, 1 + 1 layers), \
         {wide:?} (8, 16, 1 + 1), {large:?} (8, 16, 3 + 3)"
    );
    // Measured when this test was written: (50, 33), (33, 36) and (65, 79); the tiny and small
    // reference workloads (4 and 8 heads, 16 and 32 sequences, 2 + 2 layers) 49 and 54 alike.
    let forward = ("an eval forward", small.0, wide.0, large.0);
    let step = ("a greedy step", small.1, wide.1, large.1);
    for (what, s, w, l) in [forward, step] {
        assert!(
            w <= s + s / 2 && l <= 3 * w && l < 200,
            "allocations {what}: {s} small, {w} with 4 times the heads and sequences, {l} with 3 \
             times the layers too"
        );
    }
}
