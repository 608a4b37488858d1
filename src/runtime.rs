//! Process-wide settings that make training and decoding loops fast.

use std::sync::Once;

/// Keeps the memory of freed activations mapped between training or decoding steps.
///
/// With glibc's allocator (Linux), free memory at the top of the heap goes back to the
/// operating system as soon as more than `M_TRIM_THRESHOLD` bytes lie there (128 KiB at
/// first). A training step allocates its activations and caches, frees them at its end, and
/// the next step then takes a page fault, and has the kernel zero a page, for every 4 KiB of
/// them again: a third of a step of the `tiny` reference workload, a tenth of the `small` one,
/// measured on a 2-core AVX-512 machine. glibc raises the threshold on its own, to twice the
/// size of the largest block it has handed back after `mmap`, up to 32 MiB; this function
/// allocates and frees one 31 MiB block, once per process, so that up to 62 MiB of freed memory
/// stays mapped and is reused. PyTorch's CPU tuning guide recommends replacing the allocator
/// for the same reason; this needs neither a new allocator nor `unsafe`.
///
/// It changes nothing else, under other allocators nothing at all, and calling it more than
/// once does nothing more. The models' `init` and [`Trainer::new`](crate::train::Trainer::new)
/// call it.
pub fn retain_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let block = vec![0u8; 31 << 20];
        std::hint::black_box(&block);
    });
}
