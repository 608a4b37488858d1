//! The packed `f32` GEMM: operands copied into the micro-kernels' layouts, then tiles of C
//! computed by [`super::micro`].
//!
//! # Layouts
//! - Packed B: for each block of [`KC`] rows of B (the last may be shorter, `kc` rows), for each
//!   panel of NR columns, `kc × NR` floats, row by row; columns past n are zero. The block
//!   that starts at row `p0` starts at float `p0 · n_panels · NR`.
//! - Packed A: for each panel of MR rows of one `mc × kc` block, `kc × MR` floats, column by
//!   column; rows past the block are zero.
//!
//! # Loops
//! For each block of k (at most [`KC`]): for each block of at most [`mc_panels`] panels of A
//! (packed into a buffer that stays in L2): for each block of [`NC_PANELS`] panels of B (in L2
//! too): for each panel of A (`MR × kc`, in L1 while it is used): for each panel of B in the
//! block: one micro-kernel. B is packed once per call, before the loops, and shared by every
//! thread.
//!
//! # Threads and determinism
//! With more than one part, C is cut into contiguous runs of MR-row panels (or, when it has
//! few rows, of NR-column panels), one per thread. Every element of C is accumulated over k
//! in the same blocks of [`KC`] and in the same order within a block whatever the cut, so the
//! result is bitwise identical for any number of threads.

use std::cell::Cell;
use std::ops::Range;

use super::micro::Ahead;
#[cfg(target_arch = "x86_64")]
use super::micro::Far;
use super::micro::{Tile, TileDrop, TileGate, Update, kernel_scalar};
use crate::kernels::dropout::DropKey;
use crate::kernels::parallel::{for_each_index, for_each_index_shared, in_team_part};

/// Rows of B (columns of A) per block. Every element of C is summed over k in blocks of this
/// many, whatever the thread count. Measured on AVX-512 at the workloads' shapes: 512 is a
/// few percent faster than 192, 256 or 384 (fewer passes over C; the panels of B, `KC × 32`,
/// stream from L2 past a panel of A held in L1).
pub const KC: usize = 512;
/// Panels of B that stream past one panel of A (which stays in L1 meanwhile) before the next
/// panel of A: `8 · KC × 32` floats, 512 KiB, which stay in L2 while every panel of the block
/// of A passes. The other order, a panel of B held while the panels of A streamed past it,
/// read both from L2 (a `KC × 32` panel of B, 64 KiB, does not fit a 48 KiB L1): this order
/// with the 12-row tiles it makes pay ([`Isa::tile_rows`]) took 5–8% off the base workload's
/// eval forward (Intel Xeon, `bench`); 8 and 16 panels alike, 4 and 32 slower.
const NC_PANELS: usize = 8;
/// Row panels (of the AVX2 kernel reading A's rows in place) at or below which the rows pass
/// over one panel of B at a time, each pass asking for a share of the next panel's lines into
/// L2 ([`super::micro::Far::spread`]), rather than over blocks of [`NC_PANELS`] with only the
/// first pass asking: a decoding step's 8 rows (6 + 2) had left memory idle while the pass of 2
/// rows ran over the block in L2. 8 × 512 × 2048 over 168 MB of weights, AMD EPYC Zen 3, one
/// thread, interleaved in one process: mean 39–46 → 45–53 GFLOP/s; 12 rows 59–62 → 65–71. At 3
/// to 6 panels (16 and 32 rows) the products ran alike or slower. The passes then take equal
/// rows (8 as 4 + 4; see `run_part`), which ask for the next panel at an even pace: 8 × 512 ×
/// 2048 best 51–54 → 58–61 GFLOP/s, 10 × 512 × 2048 (5 + 5) 64–67 → 67–71.
const FEW_PANELS: usize = 2;
/// Row panels at or below which the rows pass over one panel of B at a time as [`FEW_PANELS`]'
/// do when B streams from memory ([`with_streamed_weights`]): the first pass over a block of
/// [`NC_PANELS`] had read it from memory at a pace of its own rows while the later passes,
/// over the block in L2, left memory idle. AMD EPYC Zen 3, `× 512 × 2048` over 42 weights (168
/// MB), one thread, in one process, median GFLOP/s: 16 rows 66–68 → 80–81, 24 rows 74–76 →
/// 91, 32 rows 77–81 → 87–88, 48 rows 81 → 93, 64 rows 81 → 91, 96 rows 90 → 95. With B in
/// L3 the same order was slower (16 × 64 × 256 over 8 weights 78 → 70, 32 × 256 × 1024 91 →
/// 87): products of weights that fit the cache keep the blocks.
const STREAMED_PANELS: usize = 16;

thread_local! {
    /// Whether the products on this thread take packed weights as streaming from memory (see
    /// [`with_streamed_weights`]).
    static STREAMED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the products of weights packed beforehand ([`super::PackedB`]) on this thread
/// taken as reading them from memory when `streamed`: a decoding step's products, when the
/// weights a step reads in turn are more than the last-level cache holds ([`llc_bytes`]), so
/// that each product finds its weight gone from the cache. Products of a few rows by the AVX2
/// kernels reading A's rows in place then pass over one panel of B at a time (see
/// [`STREAMED_PANELS`]). It changes the order in which the
/// tiles are computed, never a tile's sums: the same bits either way. The previous setting
/// comes back after `f`, also if it panics.
pub(crate) fn with_streamed_weights<R>(streamed: bool, f: impl FnOnce() -> R) -> R {
    crate::kernels::with_cell(&STREAMED, streamed, f)
}

/// Panels of A per block: as many as fill half of this core's L2 cache with `panels · MR × KC`
/// floats (64 panels of 8 rows or 42 of 12 on a 2 MiB L2), between 16 and 64. A block of A
/// stays in L2 while every panel of B streams past it once; measured on a 2 MiB L2, 512 rows
/// rather than 128 took 6% off a base eval forward and 4% off a small one (B read once per
/// block of k instead of four times). The result does not depend on it, only on [`KC`].
pub fn mc_panels(mr: usize) -> usize {
    (l2_cache_bytes() / 2 / (mr * KC * 4)).clamp(16, 64)
}

/// This core's L2 size in bytes ([`l2_bytes`]), measured once.
pub(crate) fn l2_cache_bytes() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static L2: AtomicUsize = AtomicUsize::new(0);
    let mut l2 = L2.load(Ordering::Relaxed);
    if l2 == 0 {
        l2 = l2_bytes();
        L2.store(l2, Ordering::Relaxed);
    }
    l2
}

/// Whether `bytes` of weights, read in turn (a decoding step's), are more than the last-level
/// cache holds ([`llc_bytes`]): each product then finds its weight gone from the cache (see
/// [`with_streamed_weights`]).
pub(crate) fn exceed_last_level_cache(bytes: usize) -> bool {
    bytes > llc_bytes()
}

/// The largest cache this core reads through, in bytes (CPUID's cache leaves: 4 on Intel,
/// 0x8000_001D on AMD), or 8 MiB where neither tells. Measured once.
fn llc_bytes() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static LLC: AtomicUsize = AtomicUsize::new(0);
    let mut llc = LLC.load(Ordering::Relaxed);
    if llc == 0 {
        llc = largest_cache().unwrap_or(8 << 20);
        LLC.store(llc, Ordering::Relaxed);
    }
    llc
}

/// The size of the largest data or unified cache that CPUID's deterministic cache leaves
/// describe (each sub-leaf one cache, until one of type 0).
fn largest_cache() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let mut largest = None;
        for (leaf, top) in [(4, 0), (0x8000_001D, 0x8000_0000)] {
            // Leaf `top` says whether `leaf` exists before it is read.
            if __cpuid(top).eax < leaf {
                continue;
            }
            for sub in 0..16 {
                let r = __cpuid_count(leaf, sub);
                match r.eax & 31 {
                    0 => break,
                    2 => continue, // instructions
                    _ => {}
                }
                let ways = (r.ebx >> 22) as usize + 1;
                let partitions = ((r.ebx >> 12) & 1023) as usize + 1;
                let line = (r.ebx & 4095) as usize + 1;
                let sets = r.ecx as usize + 1;
                let bytes = ways * partitions * line * sets;
                largest = largest.max(Some(bytes));
            }
        }
        largest
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// This core's L2 size (CPUID leaf 0x8000_0006, which Intel and AMD both fill), or 1 MiB.
fn l2_bytes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0x8000_0000 says whether the extended leaf exists before it is read.
        let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        if max >= 0x8000_0006 {
            let kib = (std::arch::x86_64::__cpuid(0x8000_0006).ecx >> 16) as usize;
            if kib > 0 {
                return kib << 10;
            }
        }
    }
    1 << 20
}

/// A micro-kernel family, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: `12 × 32` tiles for products with many rows, `8 × 32` for short ones (the 32-
    /// and 64-row products of attention); see [`Isa::tile_rows`].
    Avx512,
    /// AVX2 and FMA: `6 × 16` tiles.
    Avx2,
    /// Plain Rust, `4 × 8` tiles: the vector kernels' naive twin.
    Scalar,
}

impl Isa {
    /// The fastest family this CPU runs, if any has a vector kernel (at most the
    /// [`crate::kernels::cpu::level`] in use).
    pub fn best() -> Option<Isa> {
        use crate::kernels::cpu::{Level, level};
        match level() {
            Level::Avx512 => Some(Isa::Avx512),
            Level::Avx2 => Some(Isa::Avx2),
            Level::Scalar => None,
        }
    }

    /// Every family this CPU runs, the fastest first, ending with `Scalar`.
    pub fn available() -> Vec<Isa> {
        let mut all = Vec::new();
        if Isa::best() == Some(Isa::Avx512) {
            all.push(Isa::Avx512);
        }
        if Isa::best().is_some() {
            all.push(Isa::Avx2);
        }
        all.push(Isa::Scalar);
        all
    }

    /// Rows of a tile: the shortest this family uses (see [`Isa::tile_rows`]).
    pub const fn mr(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 6,
            Isa::Scalar => 4,
        }
    }

    /// Rows of the tiles of a product whose C has `m` rows. AVX-512 has two kernels, `8 × 32`
    /// and `12 × 32`: the taller one loads B once per 24 multiply-adds, not 16, and ran the
    /// base workload's products 2–9% faster (alternating the two in one process, on an Intel
    /// Xeon), but wastes more rows on short products. It is chosen when its padded rows cost
    /// less than the 8% it gains (m ≥ 72 except a few heights, never the 32 or 64 rows of
    /// per-head attention). Each element of C is the same sum either way (one lane
    /// accumulating over k in order): only speed depends on the choice.
    pub fn tile_rows(self, m: usize) -> usize {
        match self {
            Isa::Avx512 if m.div_ceil(12) * 12 * 12 <= m.div_ceil(8) * 8 * 13 => 12,
            _ => self.mr(),
        }
    }

    /// Columns of a tile.
    pub const fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
            Isa::Scalar => 8,
        }
    }

    /// One tile of `mr` rows (one of [`Isa::tile_rows`]); `far` for the first row panel past
    /// a block of B, which asks for B further ahead (the first to read it from beyond L2).
    ///
    /// # Safety
    /// The CPU runs this family; `a` holds `kc·mr` floats, `b` `kc·NR` floats, and `t`
    /// describes a tile of C (see [`super::micro`]).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        self,
        mr: usize,
        far: bool,
        next: Option<Ahead>,
        kc: usize,
        a: *const f32,
        b: *const f32,
        t: &Tile,
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (mr, far, next); // only the x86 kernels' choice
        #[cfg(target_arch = "x86_64")]
        use super::micro::kernel_avx512 as k512;
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match (self, next) {
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, _) if mr == 12 && far => k512::<12, true, false>(kc, a, b, t, Ahead::NONE),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, Some(next)) if mr == 12 => k512::<12, false, true>(kc, a, b, t, next),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, None) if mr == 12 => k512::<12, false, false>(kc, a, b, t, Ahead::NONE),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, _) if far => k512::<8, true, false>(kc, a, b, t, Ahead::NONE),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, Some(next)) => k512::<8, false, true>(kc, a, b, t, next),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512, None) => k512::<8, false, false>(kc, a, b, t, Ahead::NONE),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, _) => super::micro::kernel_avx2(far, kc, a, b, t),
                _ => kernel_scalar(self.mr(), self.nr(), kc, a, b, t),
            }
        }
    }
}

/// A read-only strided matrix by pointer, to share between threads.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// A writable strided matrix by pointer; threads write disjoint tiles of it.
#[derive(Clone, Copy)]
pub(crate) struct MatMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

impl MatMut {
    /// The matrix a mutable view addresses.
    pub(crate) fn of(v: &mut ndarray::ArrayViewMut2<f32>) -> MatMut {
        MatMut {
            ptr: v.as_mut_ptr(),
            rs: v.strides()[0],
            cs: v.strides()[1],
        }
    }
}

// SAFETY: the pointers are only dereferenced inside `gemm`, while the views they come from are
// borrowed (A and B shared, C exclusively), and threads write disjoint parts of C.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}
unsafe impl Send for MatMut {}
unsafe impl Sync for MatMut {}

impl Mat {
    /// The matrix a view addresses.
    pub(crate) fn of(v: &ndarray::ArrayView2<f32>) -> Mat {
        Mat {
            ptr: v.as_ptr(),
            rs: v.strides()[0],
            cs: v.strides()[1],
        }
    }

    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller keeps (i, j) inside the matrix.
        unsafe { *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }
}

thread_local! {
    static A_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static WIDE_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// B packed in the layout of the module docs, as the loops read it: `f32`, or the bf16 bits
/// of values rounded to bf16 (the emulated bf16 path's weights, half the bytes), widened to
/// `f32` a block of panels at a time as the loops reach it. A bf16 value widens exactly, so
/// the kernels multiply the same `f32` values either way: the same bits.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Panels<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Panels<'_> {
    fn len(&self) -> usize {
        match self {
            Panels::F32(b) => b.len(),
            Panels::Bf16(b) => b.len(),
        }
    }
}

/// Where the bf16 bits of column `c` (0 to 15) of a step of a packed panel lie among the
/// step's 16 for the AVX2 kernels: columns j and 8 + j side by side (the low and the high
/// half of the step's 32-bit word j), so that one 32-byte load gives columns 0–7 shifted left
/// by 16 bits and 8–15 shifted right and back (see `micro::PanelOf`): three instructions and
/// no register beyond the two results, where widening each half had taken a load and two.
const fn avx2_bits_at(c: usize) -> usize {
    if c < 8 { 2 * c } else { 2 * (c - 8) + 1 }
}

/// `dst ← src`'s bf16 bits, each value a bf16 (or a padding zero) packed for the kernels of
/// `isa`: its top half, exactly, in those kernels' order (each step's columns as
/// [`avx2_bits_at`] lays them for AVX2; as they lie for the others). [`widen`] undoes it.
///
/// # Panics
/// If the lengths differ.
pub(super) fn narrow(isa: Isa, src: &[f32], dst: &mut [u16]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "narrow: {} values into {}",
        src.len(),
        dst.len()
    );
    let bits = |v: f32| (v.to_bits() >> 16) as u16;
    if isa == Isa::Avx2 {
        for (d, s) in dst.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
            for (c, &v) in s.iter().enumerate() {
                d[avx2_bits_at(c)] = bits(v);
            }
        }
    } else {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = bits(v);
        }
    }
}

/// `dst ← src` widened, each bf16 to its `f32` (exact), from the order of the kernels of
/// `isa` that [`narrow`] laid them in.
///
/// # Panics
/// If the lengths differ.
fn widen(isa: Isa, src: &[u16], dst: &mut [f32]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "widen: {} values into {}",
        src.len(),
        dst.len()
    );
    let f = |s: u16| f32::from_bits(u32::from(s) << 16);
    if isa == Isa::Avx2 {
        for (d, s) in dst.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
            for (c, d) in d.iter_mut().enumerate() {
                *d = f(s[avx2_bits_at(c)]);
            }
        }
    } else {
        crate::kernels::simd::widest!({
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = f(s);
            }
        })
    }
}

/// A buffer of packed panels whose first element lies on a 64-byte boundary, so that no
/// vector load and no AMX tile row of a panel straddles two cache lines. A `Vec`'s own
/// allocation is only as aligned as its element type asks (glibc puts large ones 16 bytes
/// past a page), and packed weights kept for inference had been stored so. Measured on an
/// Intel Xeon: a loop of the AMX kernel's four tile loads from L1 took 70.4 ns unaligned and
/// 10.7 ns aligned; the base `f32` eval forward went 412–441 → 402–417 ms (one thread, three
/// interleaved pairs); greedy decoding and bf16 products with packed weights did not change
/// measurably (their tiles wait on L2 and memory more than on the split lines).
#[derive(Debug)]
pub(crate) struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy + Default + Send> Aligned<T> {
    /// `len` elements of `T::default()`, written by the team (a weight's packing, megabytes
    /// at inference, had been zeroed by the calling thread alone while the others waited).
    pub(crate) fn zeroed(len: usize) -> Aligned<T> {
        use crate::kernels::workspace::{line_elements, line_pad, line_start, zeros_by_team};
        let buf: Vec<T> = zeros_by_team(len + line_pad::<T>(), line_elements::<T>());
        let off = line_start(&buf);
        Aligned { buf, off, len }
    }
}

impl<T: Copy + Default + Send> Clone for Aligned<T> {
    /// A copy in a new allocation, aligned afresh (the offset of the old one need not fit it).
    fn clone(&self) -> Aligned<T> {
        let mut out = Aligned::zeroed(self.len);
        out.copy_from_slice(self);
        out
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// Runs `f` on a 64-byte-aligned scratch slice of `len` elements from this thread's buffer
/// `key`, which keeps its memory between calls. Re-entry (a call from inside `f` on the same
/// thread, as rayon's work stealing can cause) finds the buffer taken and uses a new one.
pub(super) fn with_scratch<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<Cell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    use crate::kernels::workspace::{line_pad, line_start};
    let mut buf = key.with(Cell::take);
    if buf.len() < len + line_pad::<T>() {
        buf = vec![T::default(); len + line_pad::<T>()];
    }
    let skip = line_start(&buf);
    let out = f(&mut buf[skip..skip + len]);
    key.with(|cell| {
        let other = cell.take();
        cell.set(if other.len() > buf.len() { other } else { buf });
    });
    out
}

/// What follows the product: `C ← act(α·A·B + bias)` in place of `α·A·B + β·C`, then dropout
/// and a gate.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Epilogue {
    /// A bias per column of C (n floats); β must then be 0.
    pub bias: Option<*const f32>,
    /// The ReLU on the result (NaN kept, as `Activation::Relu`).
    pub relu: bool,
    /// Dropout of C's elements by their flat (row-major) index.
    pub dropout: Option<DropKey>,
    /// `C ← C · scale` where the gate's element is above 0, else 0: `(ptr, rs, cs, scale)`,
    /// the gate of C's shape.
    pub gate: Option<(*const f32, isize, isize, f32)>,
    /// `Σ_p A[i][p]` added into element i (m floats), each row's values in order as packing
    /// reads them: a bias gradient taken from `∂Yᵀ` on its way into a weight gradient
    /// (`super::gemm_weight_grad`). Summed in the packing by the bf16 vector paths and the
    /// AVX-512 `f32` path's packing of columns of A, by a pass of its own elsewhere.
    pub a_sums: Option<*mut f32>,
}

// SAFETY: the bias is read-only while `gemm` runs, and borrowed for that long by the caller;
// the parts of a product add into disjoint elements of `a_sums` (rows of their own).
unsafe impl Send for Epilogue {}
unsafe impl Sync for Epilogue {}

/// `C ← α·A·B + β·C`, or with an [`Epilogue`] `C ← act(α·A·B + bias)` (`m × k` by `k × n`),
/// on `parts` threads at most; see the module docs.
///
/// # Safety
/// `a`, `b` and `c` address `m × k`, `k × n` and `m × n` matrices inside live allocations, C
/// aliases neither A nor B and no two of its elements share an address; the CPU runs `isa`;
/// the bias holds n floats. If β is zero C need not be initialised.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    c: MatMut,
    parts: usize,
    ep: Epilogue,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        let update = match ep.bias {
            Some(bias) => Update::Bias { alpha, bias },
            None if beta == 0.0 => Update::Set { alpha },
            None => Update::Scale { alpha, beta },
        };
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is inside C, j inside the bias, (i, j) inside the gate.
                unsafe {
                    let p = c.ptr.offset(i as isize * c.rs + j as isize * c.cs);
                    let old = if beta == 0.0 { 0.0 } else { *p };
                    let t = tile(c, 1, 1, update, ep, i, j, n, true, false);
                    *p = t.post(update.apply(0.0, old, j, ep.relu), 0, 0);
                }
            }
        }
        return;
    }
    let nr = isa.nr();
    let n_panels = n.div_ceil(nr);
    let (parts, _) = split(parts, m.div_ceil(isa.tile_rows(m)), n_panels);
    with_scratch(&B_BUF, k * n_panels * nr, |bpack| {
        let out = SharedMut(bpack.as_mut_ptr());
        // SAFETY: B is k × n (caller) and `bpack` holds every block's panels; parts pack
        // disjoint panels, which occupy disjoint floats.
        let pack_panels = |panels: Range<usize>| unsafe { pack_b(b, k, n, nr, panels, out, isa) };
        for_panel_runs(parts, n_panels, pack_panels);
        // SAFETY: forwarded from this function's contract; B is now packed in `bpack`.
        unsafe {
            gemm_packed_b(
                isa,
                m,
                k,
                n,
                alpha,
                a,
                Panels::F32(bpack),
                beta,
                c,
                parts,
                ep,
                false,
            )
        };
    });
}

/// [`gemm`] with B already packed (the layout of the module docs, for `isa`), as `f32` or as
/// bf16 bits ([`Panels`]): `prepacked` for a B packed before the call (a weight, read from
/// beyond L2), not by it (see [`NEXT_PASSES`]).
///
/// # Safety
/// As [`gemm`], and `bpack` holds B `k × n` packed for `isa`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed_b(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat,
    bpack: Panels<'_>,
    beta: f32,
    c: MatMut,
    parts: usize,
    ep: Epilogue,
    prepacked: bool,
) {
    let (mr, nr) = (isa.tile_rows(m), isa.nr());
    let n_panels = n.div_ceil(nr);
    debug_assert!(bpack.len() >= k * n_panels * nr);
    // The AVX2 kernel reading A's rows in place takes any rows (see `run_part`): cut evenly.
    let even = isa == Isa::Avx2 && a.cs == 1;
    // Read here, on the calling thread: the parts may run on others.
    let streamed = prepacked && STREAMED.get();
    for_tile_runs(parts, m, mr, n_panels, even, mc_panels(mr), |rows, panels| {
        // SAFETY: forwarded from this function's contract; parts get disjoint tiles of C.
        unsafe {
            run_part(
                isa, mr, k, n, alpha, a, bpack, beta, c, rows, panels, ep, prepacked, streamed,
            )
        }
    });
}

/// How C is cut between `parts` threads: `(parts, by_rows)`. By rows when each part gets at
/// least two panels of them, else by columns when each gets two panels of those, else not.
pub(super) fn split(parts: usize, m_panels: usize, n_panels: usize) -> (usize, bool) {
    if parts < 2 {
        (1, true)
    } else if m_panels >= 2 * parts {
        (parts, true)
    } else if n_panels >= 2 * parts {
        (parts, false)
    } else {
        (1, true)
    }
}

/// Runs `pack` over the panels `0..n_panels` cut into at most `parts` contiguous runs, one
/// per thread (the packing of B, whose panels are disjoint).
pub(super) fn for_panel_runs(parts: usize, n_panels: usize, pack: impl Fn(Range<usize>) + Sync) {
    let per = n_panels.div_ceil(parts.max(1)).max(1);
    let runs = n_panels.div_ceil(per);
    if runs < 2 {
        return pack(0..n_panels);
    }
    for_each_index(runs, |i| pack(i * per..((i + 1) * per).min(n_panels)));
}

/// Runs `run(rows, panels)` over C (`m` rows in panels of `mr`, `n_panels` column panels) cut
/// between at most `parts` threads as [`split`] says: contiguous runs of row panels, or of
/// column panels, or all on this thread. `even_rows`: runs of rows as equal as can be, for a
/// kernel whose cost is its rows' rather than its panels' (32 rows as 16 + 16, not 18 + 14).
///
/// With `block_panels` (the row panels `run` takes in one block of A, as `run_part` cuts them;
/// 0 for none), a thread's share of rows that spans blocks is handed out as two pieces, its
/// first blocks and its last one ([`share_pieces`]): a thread whose core the host slows
/// leaves its last block to the other, which takes it once its own pieces are done (the team
/// hands out pieces from both ends). With the threads at the same pace each runs its own
/// share as before, its blocks and so its passes over B unchanged.
pub(super) fn for_tile_runs(
    parts: usize,
    m: usize,
    mr: usize,
    n_panels: usize,
    even_rows: bool,
    block_panels: usize,
    run: impl Fn(Range<usize>, Range<usize>) + Sync,
) {
    let m_panels = m.div_ceil(mr);
    let (parts, by_rows) = split(parts, m_panels, n_panels);
    if parts == 1 {
        // Inside a part of a team's loop (a product beside another, `parallel::join`), its
        // blocks are offered to the thread that finishes first.
        let blocks = if in_team_part() {
            blocks_of(m, mr, block_panels)
        } else {
            1
        };
        if blocks < 2 {
            run(0..m, 0..n_panels);
        } else {
            for_each_index_shared(blocks, |j| {
                let rows = share_block(0..m, j, blocks, mr, even_rows);
                if !rows.is_empty() {
                    run(rows, 0..n_panels);
                }
            });
        }
    } else if by_rows {
        let per = m_panels.div_ceil(parts) * mr;
        let share = |i: usize| {
            if even_rows {
                i * m / parts..(i + 1) * m / parts
            } else {
                (i * per).min(m)..((i + 1) * per).min(m)
            }
        };
        // Shares of one block (a tiny model's products) stay whole: nothing to leave behind.
        let first = share(0);
        let apart = last_block_start(first.clone(), mr, block_panels) < first.end;
        for_each_index(if apart { 2 * parts } else { parts }, |p| {
            let rows = if apart {
                let (i, last) = share_pieces(p);
                let rows = share(i);
                let cut = last_block_start(rows.clone(), mr, block_panels);
                if last { cut..rows.end } else { rows.start..cut }
            } else {
                share(p)
            };
            if !rows.is_empty() {
                run(rows, 0..n_panels);
            }
        });
    } else {
        let per = n_panels.div_ceil(parts);
        for_each_index(parts, |i| {
            run(0..m, (i * per).min(n_panels)..((i + 1) * per).min(n_panels))
        });
    }
}

/// Block `j` of `blocks` of `rows`: rows as equal as can be (`even_rows`), else whole panels
/// of `mr` rows, as many in each block but the last; as `run_part` cuts a run of rows into
/// blocks of A.
fn share_block(rows: Range<usize>, j: usize, blocks: usize, mr: usize, even_rows: bool) -> Range<usize> {
    let len = rows.len();
    if even_rows {
        rows.start + j * len / blocks..rows.start + (j + 1) * len / blocks
    } else {
        let per = len.div_ceil(mr).div_ceil(blocks) * mr;
        (rows.start + j * per).min(rows.end)..(rows.start + (j + 1) * per).min(rows.end)
    }
}

/// Piece `p` of the `2 · parts` of [`for_tile_runs`]: `(share, last block or not)`. The first
/// share's two pieces come first, its last block second; every other share's last block comes
/// before its first blocks: the thread that takes pieces from the front (`0, 1, …`) runs share
/// 0 in order, the helpers from the back start on their own share's first blocks and come to
/// its last block at the end. With two threads: share 0's first blocks, share 0's last block,
/// share 1's last block, share 1's first blocks.
pub(super) fn share_pieces(p: usize) -> (usize, bool) {
    match p {
        0 => (0, false),
        1 => (0, true),
        p => (1 + (p - 2) / 2, p % 2 == 0),
    }
}

/// Where the last block of A begins in a share of `rows`: `run_part` cuts a run of rows into
/// as few blocks of at most `block_panels` panels of `mr` rows as it can, of equal size; the
/// first blocks of this cut take the same blocks as the whole run would. A share of one block
/// has no last block apart (its end).
fn last_block_start(rows: Range<usize>, mr: usize, block_panels: usize) -> usize {
    let blocks = blocks_of(rows.len(), mr, block_panels);
    if blocks < 2 {
        return rows.end;
    }
    share_block(rows, blocks - 1, blocks, mr, false).start
}

/// How many blocks of A `run_part` cuts a run of `rows` rows into: as few of at most
/// `block_panels` panels of `mr` rows as it can, one at least (one without `block_panels`).
fn blocks_of(rows: usize, mr: usize, block_panels: usize) -> usize {
    if block_panels == 0 {
        return 1;
    }
    rows.div_ceil(mr).div_ceil(block_panels).max(1)
}

/// Rows from which a thread's part of a product asks for C ahead of its stores
/// ([`super::micro::TileLines`]): fewer are a decoding step's, whose C stays in cache.
const PREFETCH_C_ROWS: usize = 64;

/// Whether the tiles of a part of `rows` rows ask for C ahead of their stores.
pub(super) fn prefetch_c(rows: usize) -> bool {
    rows >= PREFETCH_C_ROWS
}

/// How the block of k starting at `p0` meets the tile of C whose first column is `j0`: the
/// first block sets C (with the bias, or scaling the old C by β), every later one adds.
///
/// # Safety
/// With a bias, `j0` is a column of C (inside the bias).
pub(super) unsafe fn block_update(p0: usize, ep: &Epilogue, alpha: f32, beta: f32, j0: usize) -> Update {
    match (p0, ep.bias) {
        // SAFETY: j0 < n, inside the bias (caller).
        (0, Some(bias)) => Update::Bias {
            alpha,
            bias: unsafe { bias.add(j0) },
        },
        (0, None) if beta == 0.0 => Update::Set { alpha },
        (0, None) => Update::Scale { alpha, beta },
        _ => Update::Add { alpha },
    }
}

/// Packs all of B (`k × n`) for `isa` into a new buffer, on up to `parts` threads: the
/// operand of many later products (a weight at inference).
///
/// # Safety
/// `b` addresses a `k × n` matrix inside a live allocation.
pub(crate) unsafe fn pack_b_all(isa: Isa, k: usize, n: usize, b: Mat, parts: usize) -> Aligned<f32> {
    let nr = isa.nr();
    let n_panels = n.div_ceil(nr);
    let mut out = Aligned::zeroed(k * n_panels * nr);
    let shared = SharedMut(out.as_mut_ptr());
    // SAFETY: B is k × n (caller); runs pack disjoint panels of `out`.
    for_panel_runs(parts, n_panels, |panels| unsafe {
        pack_b(b, k, n, nr, panels, shared, isa)
    });
    out
}

/// The tile of C at (r0, j0), `rows × cols`, with the epilogue's post-operations when `last`
/// (the last block of k). Its pointer is only an address: the kernels that write through it
/// vouch for the tile lying inside C.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn tile(
    c: MatMut,
    rows: usize,
    cols: usize,
    update: Update,
    ep: Epilogue,
    r0: usize,
    j0: usize,
    n: usize,
    last: bool,
    prefetch: bool,
) -> Tile {
    Tile {
        prefetch,
        c: c.ptr.wrapping_offset(r0 as isize * c.rs + j0 as isize * c.cs),
        rsc: c.rs,
        csc: c.cs,
        rows,
        cols,
        update,
        relu: ep.relu && last,
        drop: ep.dropout.filter(|_| last).map(|d| TileDrop {
            key: d.key(),
            threshold: d.threshold(),
            scale: d.scale(),
            index0: r0 * n + j0,
            ld: n,
        }),
        gate: ep.gate.filter(|_| last).map(|(g, rs, cs, scale)| TileGate {
            // The gate's element (r0, j0), inside the gate (its caller's shape is C's).
            ptr: g.wrapping_offset(r0 as isize * rs + j0 as isize * cs),
            rs,
            cs,
            scale,
        }),
    }
}

/// Contiguous lines (rows of B, columns of A) the packings copy across every panel before the
/// next lines (AVX-512, and AVX2 for its panels of 6 rows and 16 columns). A panel's share of
/// a line is 24–128 bytes, and the lines are rows of a training step's activations or
/// gradients, 1–32 KiB apart in L3: packed a panel at a time, every line of the block was
/// visited once per panel, a cache line or two from each, which the hardware's prefetcher
/// does not follow. By runs of lines, each is read along its length. Intel Xeon (AVX-512),
/// one thread, weight gradients with B packed in the call: 1024 × 1024 × 256 150 → 161
/// GFLOP/s, 256 × 1024 × 1024 144 → 154, 768 × 1024 × 256 146 → 151; small `f32` training
/// step 1–3% faster. AMD EPYC Zen 3 (AVX2), one thread, `small`'s weight gradients (`cargo
/// bench --bench kernels -- gemm_weight_grad`), builds alternating, three runs each: 1024 ×
/// 1024 × 256 76.1 / 80.4 / 80.0 → 81.7 / 81.4 / 80.3 GFLOP/s, 256 × 1024 × 1024 82.6 / 82.3 /
/// 84.8 → 84.6 / 86.2 / 85.7, the others alike; training steps alike within that host's noise.
#[cfg(target_arch = "x86_64")]
const LINE_RUN: usize = 16;

/// The packed-B buffer, shared by threads that pack disjoint panels of it.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: see `pack_b`, the one user.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Packs the column panels `panels` of B (every block of k) into `out` (layout: module docs).
///
/// # Safety
/// B is `k × n`; `out` points to `k · ceil(n / nr) · nr` floats, of which no other thread
/// touches those of these panels; the CPU runs `isa`.
unsafe fn pack_b(b: Mat, k: usize, n: usize, nr: usize, panels: Range<usize>, out: SharedMut, isa: Isa) {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // read by the x86 paths
    let simd = isa != Isa::Scalar;
    let n_pad = n.div_ceil(nr) * nr;
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        #[cfg(target_arch = "x86_64")]
        if b.cs == 1 && (isa == Isa::Avx512 || isa == Isa::Avx2 && nr <= 16) {
            // Rows of B contiguous: runs of rows across every panel (see `LINE_RUN`).
            for p in (0..kc).step_by(LINE_RUN) {
                let lines = LINE_RUN.min(kc - p);
                for jp in panels.clone() {
                    let j0 = jp * nr;
                    let cols = nr.min(n - j0);
                    // SAFETY: rows p0 + p.. + lines, columns j0.. + cols of B; their lines of
                    // this panel's floats of this block, inside `out` and ours alone; the CPU
                    // has AVX-512F, resp. AVX2 (and the panel at most 16 floats wide).
                    unsafe {
                        use super::micro::{copy_lines_padded, copy_lines_padded_avx2};
                        let src = b.ptr.offset((p0 + p) as isize * b.rs + j0 as isize);
                        let dst = out.0.add(p0 * n_pad + jp * kc * nr + p * nr);
                        match isa {
                            Isa::Avx2 => copy_lines_padded_avx2(src, b.rs, cols, lines, dst, nr),
                            _ => copy_lines_padded::<false>(
                                src,
                                b.rs,
                                cols,
                                lines,
                                dst,
                                nr,
                                std::ptr::null_mut(),
                            ),
                        }
                    }
                }
            }
            continue;
        }
        for jp in panels.clone() {
            let j0 = jp * nr;
            let cols = nr.min(n - j0);
            // SAFETY: this panel's floats of this block, inside `out` and ours alone.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.0.add(p0 * n_pad + jp * kc * nr), kc * nr) };
            // SAFETY (for every read below): rows p0..p0 + kc and columns j0..j0 + cols are
            // inside B.
            if b.cs == 1 {
                for (p, row) in dst.chunks_exact_mut(nr).enumerate() {
                    let src = unsafe {
                        std::slice::from_raw_parts(b.ptr.offset((p0 + p) as isize * b.rs + j0 as isize), cols)
                    };
                    row[..cols].copy_from_slice(src);
                    row[cols..].fill(0.0);
                }
                continue;
            }
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // set only by the x86 paths
            let mut p_done = 0;
            #[cfg(target_arch = "x86_64")]
            if simd && b.rs == 1 && cols == nr && nr.is_multiple_of(8) {
                // Columns of B are contiguous: 8 × 8 transposes.
                p_done = kc - kc % 8;
                for j in (0..nr).step_by(8) {
                    for p in (0..p_done).step_by(8) {
                        // SAFETY: an 8 × 8 block of B and of the panel; the CPU has AVX2.
                        unsafe {
                            let src = b.ptr.offset((p0 + p) as isize + (j0 + j) as isize * b.cs);
                            super::micro::transpose8x8(
                                src,
                                b.cs,
                                dst.as_mut_ptr().add(p * nr + j),
                                nr as isize,
                            );
                        }
                    }
                }
            }
            for j in 0..nr {
                for p in p_done..kc {
                    dst[p * nr + j] = if j < cols {
                        unsafe { b.at(p0 + p, j0 + j) }
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// `sums[r] += Σ_p A[r][p]` for the rows `rows` and the columns `cols` of A, the columns in
/// order: the row sums of the values a packing does not sum itself (both families).
///
/// # Safety
/// The rows and columns lie inside A; `sums` holds the rows, and no other thread writes them.
pub(super) unsafe fn add_row_sums(a: Mat, rows: Range<usize>, cols: Range<usize>, sums: *mut f32) {
    for r in rows {
        // SAFETY: row r of the sums (caller).
        let s = unsafe { &mut *sums.add(r) };
        for p in cols.clone() {
            // SAFETY: (r, p) inside the block (caller).
            *s += unsafe { a.at(r, p) };
        }
    }
}

/// Packs rows `i0..i0 + mc`, columns `p0..p0 + kc` of A into panels of `mr` rows; with `sums`,
/// adds each row's values into its element (`sums[i0 + r]`), in the order of the columns, as
/// [`crate::kernels::add_column_sums`] adds the rows of `Aᵀ`: the same bits.
///
/// # Safety
/// The block lies inside A; `out` holds `ceil(mc / mr) · mr · kc` floats; `sums` holds rows
/// `i0..i0 + mc`, and no other thread writes them; the CPU runs `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_a(
    a: Mat,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    mr: usize,
    out: &mut [f32],
    isa: Isa,
    sums: Option<*mut f32>,
) {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // read by the x86 paths
    let simd = isa != Isa::Scalar;
    // Only the AVX-512 copy of contiguous columns sums as it copies; every other path takes
    // the sums first.
    let summed_in_copy = cfg!(target_arch = "x86_64") && a.rs == 1 && isa == Isa::Avx512;
    if let Some(sums) = sums
        && !summed_in_copy
    {
        // SAFETY: the block's rows of the sums and of A (caller).
        unsafe { add_row_sums(a, i0..i0 + mc, p0..p0 + kc, sums) };
    }
    #[cfg(target_arch = "x86_64")]
    if a.rs == 1 && (isa == Isa::Avx512 || isa == Isa::Avx2 && mr <= 16) {
        // Columns of A contiguous (A = ∂Yᵀ, a weight gradient's): runs of columns across every
        // panel (see `LINE_RUN`).
        for p in (0..kc).step_by(LINE_RUN) {
            let lines = LINE_RUN.min(kc - p);
            for ip in 0..mc.div_ceil(mr) {
                let r0 = i0 + ip * mr;
                let rows = mr.min(i0 + mc - r0);
                // SAFETY: columns p0 + p.. + lines, rows r0.. + rows of A (inside the block);
                // their lines of panel ip, inside `out`; the CPU has AVX-512F, resp. AVX2 (and
                // the panel at most 16 rows).
                unsafe {
                    use super::micro::{copy_lines_padded as copy, copy_lines_padded_avx2};
                    let src = a.ptr.offset(r0 as isize + (p0 + p) as isize * a.cs);
                    let dst = out.as_mut_ptr().add(ip * mr * kc + p * mr);
                    match (isa, sums) {
                        (Isa::Avx2, _) => copy_lines_padded_avx2(src, a.cs, rows, lines, dst, mr),
                        (_, Some(s)) => copy::<true>(src, a.cs, rows, lines, dst, mr, s.add(r0)),
                        (_, None) => copy::<false>(src, a.cs, rows, lines, dst, mr, std::ptr::null_mut()),
                    }
                }
            }
        }
        return;
    }
    for (ip, dst) in out.chunks_exact_mut(mr * kc).take(mc.div_ceil(mr)).enumerate() {
        let r0 = i0 + ip * mr;
        let rows = mr.min(i0 + mc - r0);
        // SAFETY (for every read below): rows r0..r0 + rows and columns p0..p0 + kc are
        // inside A.
        let at =
            |r: usize, p: usize| unsafe { a.ptr.offset((r0 + r) as isize * a.rs + (p0 + p) as isize * a.cs) };
        if a.rs == 1 {
            // Columns of A are contiguous: each step of k is one copy.
            for (p, col) in dst.chunks_exact_mut(mr).enumerate() {
                col[..rows].copy_from_slice(unsafe { std::slice::from_raw_parts(at(0, p), rows) });
                col[rows..].fill(0.0);
            }
            continue;
        }
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // set only by the x86 paths
        let mut r_done = 0;
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // set only by the x86 paths
        let mut p_done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd && a.cs == 1 && rows == mr {
            // Rows of A are contiguous: 8 × 8 and 4 × 8 transposes.
            p_done = kc - kc % 8;
            for p in (0..p_done).step_by(8) {
                let mut r = 0;
                type Transpose = unsafe fn(*const f32, isize, *mut f32, isize);
                let by_rows: [(usize, Transpose); 3] = [
                    (8, super::micro::transpose8x8),
                    (4, super::micro::transpose4x8),
                    (2, super::micro::transpose2x8),
                ];
                for (step, transpose) in by_rows {
                    while r + step <= mr {
                        // SAFETY: blocks of A and of the panel; the CPU has AVX2.
                        unsafe { transpose(at(r, p), a.rs, dst.as_mut_ptr().add(p * mr + r), mr as isize) };
                        r += step;
                    }
                }
                r_done = r;
            }
        }
        // The edges one by one: the rows past the transposes' over their steps of k, then
        // every row of the steps past them (a loop over every step of k for rows that are
        // all done had been 0.4% of a small training step's samples).
        let edge = |p: usize, r: usize| if r < rows { unsafe { *at(r, p) } } else { 0.0 };
        if r_done < mr {
            for p in 0..p_done {
                for r in r_done..mr {
                    dst[p * mr + r] = edge(p, r);
                }
            }
        }
        for p in p_done..kc {
            for r in 0..mr {
                dst[p * mr + r] = edge(p, r);
            }
        }
    }
}

/// Row panels at or below which the AVX-512 kernel's later passes over a block of B ask for
/// the next block into L2, a share each ([`Ahead`]): a decoding step's few rows against
/// weights that come from L3 or memory. Only the first pass over a block used to ask for it,
/// 8 KiB ahead ([`super::micro`]'s `PREFETCH_L2`), at the pace one core draws lines from L3
/// (about 20 GB/s here), while the later passes found the block in L2 and left the memory
/// idle. Intel Xeon, one thread, in one process against the build without it, weights cycling
/// through 12 copies: 32 × 256 × 1024 145 → 168 GFLOP/s, 32 × 1024 × 256 138 → 159, 32 × 256
/// × 768 147 → 165, 32 × 256 × 1000 142 → 160, 16 × 256 × 1024 118 → 134, 48 × 256 × 1024 175
/// → 182, 64 × 256 × 1024 165 → 167; on two threads 32 × 256 × 1024 237 → 265. The small
/// workload's greedy decode (32 rows a step), builds alternating: 72.3–83.8 → 70.1–75.5 ms on
/// one thread, 47.7–49.0 → 45.4–46.8 on two. The price, where B is in L2 already (one weight
/// multiplied again and again): 32 × 256 × 1024 171 → 156 GFLOP/s, 96 × 512 × 512 172 → 165,
/// 64 × 512 × 2048 alike; blocks of eight panels with the asks 160 and 168.
const NEXT_PASSES: usize = 8;
/// Panels of B per block where the passes ask for the next block ([`NEXT_PASSES`]), not
/// [`NC_PANELS`]: the first block of each product, which nothing asked for, is then a small
/// one. Against 8 panels, in one process: 32 × 1024 × 256 137 → 147 GFLOP/s on one thread,
/// 228 → 257 on two, the other decoding shapes alike or a few percent faster; 1 panel as 2.
const NEXT_NC: usize = 2;
/// Floats of packed B (`k · n`, padded) below which nothing asks for the next block: a B this
/// small stays in L2 from one call to the next (the tiny workload's weights), and the asks
/// had made its greedy decode 2–4% slower. Nor does a B that the call packs itself (in cache
/// just after): with it, the products with B packed on every call ran 2–6% slower at 64 × 512
/// × 512 and 64 × 256 × 256.
const NEXT_MIN_B: usize = 1 << 16;

/// Rows at most of a product whose rows are read in place that goes by [`run_spans`].
#[cfg(target_arch = "x86_64")]
const SPAN_ROWS_MAX: usize = 8;

/// Up to this many rows, [`run_spans`] takes [`FEW_STREAMS`] panels side by side, one stream
/// from memory each, where more rows take one panel at a time: memory delivers more to one
/// core from several streams than from one (`bench --bandwidth`), and so few rows leave it
/// the only limit. AMD EPYC Zen 3, one thread, × 512 × 2048 over 168 MB of weights, one panel
/// → three: 1 row 16.1–18.0 → 19.1–21.4 GB/s, 2 rows 18.4–18.5 → 21.6–22.5, 3 rows 15.2–18.9 →
/// 19.7–20.6 (in L3 alike or faster); 4 rows 19.1–20.4 → 20.1–21.4 but slower in L3 (80.8–83.3
/// → 72.0–78.1 GFLOP/s), 6 rows alike from memory.
#[cfg(target_arch = "x86_64")]
const FEW_STREAMS_ROWS: usize = 3;
#[cfg(target_arch = "x86_64")]
const FEW_STREAMS: usize = 3;

/// Steps of k of a span in [`run_spans`], over all the panels of a group (divided among
/// them). 96 against 48, 64, 192 and 384: the decoding shapes of 6 and 8 rows from memory and
/// from L3 alike or faster (AMD EPYC Zen 3, one thread).
#[cfg(target_arch = "x86_64")]
const SPAN_STEPS: usize = 96;

/// How far ahead of its reads a pass in [`run_spans`] asks for B, in bytes of a panel (24
/// lines): a single stream asking 24 lines ahead read 20–22 GB/s on the AMD EPYC Zen 3, one
/// asking 512 lines ahead (a panel of `f32`) 14–16.
#[cfg(target_arch = "x86_64")]
const NEAR_BYTES: usize = 24 * 64;

/// The `mc` rows at `i0` (1 to 8: a decoding step's few rows) over the panels `panels` of the
/// block of k at `p0` (`kc` steps) for the AVX2 kernels reading A's rows in place, in groups of
/// panels: up to 6 rows in one pass over each panel (in groups of [`FEW_STREAMS`] panels up to
/// [`FEW_STREAMS_ROWS`] rows, else of one); 7 or 8 as a pass of 6 rows over each panel of a
/// group and one of the other 1 or 2 rows over the group's 6 or 3 panels at once (12 chains
/// of multiply-adds, where 4 + 4 rows a panel had 8 and waited on their latency).
///
/// The passes over a group take turns over spans of [`SPAN_STEPS`] steps of k, their
/// accumulators carried from span to span ([`kernel_avx2_span`]): memory sees one stream
/// through each panel, read by the first pass and found in L1 by the next. The first pass over
/// a panel asks for its lines [`NEAR_BYTES`] ahead, the other pass for those a span further on
/// (asking again costs little), so that memory is kept busy while it runs; the last span asks
/// for the next group's first lines. Each element's chain of multiply-adds is the same as in
/// any other pass, so the bits are too.
///
/// Measured against passes over a whole panel each asking for a share of the next (AMD EPYC
/// Zen 3, one thread, × 512 × 2048 over 168 MB of weights, over 16 MB in L3): 6 rows 49.2 → 56.1
/// GFLOP/s from memory, 82.6 → 88.7 in L3; 8 rows 59.0 → 68.0 and 66.8 → 82.1. 10 and 12 rows
/// (two passes of 5 or 6 rows) ran faster in L3 (78.3 → 84.5, 85.0 → 89.0) but slower from
/// memory (71.2 → 65.0, 77.8 → 72.2) and stay with the passes over whole panels.
///
/// # Safety
/// As [`run_part`]; the CPU has AVX2 and FMA; A's rows are contiguous.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_spans(
    (p0, kc, n_pad): (usize, usize, usize),
    a: Mat,
    bpack: Panels<'_>,
    c: MatMut,
    (i0, mc): (usize, usize),
    panels: Range<usize>,
    (alpha, beta, ep): (f32, f32, &Epilogue),
    (n, last, prefetch): (usize, bool, bool),
) {
    use super::micro::{Carried, carried_zero, kernel_avx2_span, store_carried};
    /// A pass over a group: rows `r0..r0 + rows` over the group's panels `first..first +
    /// panels`; `lead`: the first pass over its panel (it asks for the lines just ahead).
    #[derive(Clone, Copy)]
    struct Pass {
        r0: usize,
        rows: usize,
        first: usize,
        panels: usize,
        lead: bool,
    }
    let nr = 16;
    let lead = |rows: usize, first: usize| Pass {
        r0: 0,
        rows,
        first,
        panels: 1,
        lead: true,
    };
    let mut passes = [lead(0, 0); 7];
    let (count, group) = if mc <= 6 {
        // A pass over each panel of the group, the group of several panels for the fewest
        // rows (several streams from memory at once).
        let group = if mc <= FEW_STREAMS_ROWS { FEW_STREAMS } else { 1 };
        for (q, pass) in passes.iter_mut().enumerate().take(group) {
            *pass = lead(mc, q);
        }
        (group, group)
    } else {
        // The other 2 rows of 8 over 3 panels keep 12 sums, 2 broadcasts and a step's 2 vectors
        // of B in the 16 registers; widening bf16 bits (`micro::PanelOf`) wants one more, and
        // over 2 panels the pass has it (AMD EPYC Zen 3, 8 × 512 × 2048 in bf16 bits, one
        // thread: 62.8–63.5 → 75.8–78.6 GFLOP/s from memory, 65.8 → 83.5 in L3).
        let group = match bpack {
            Panels::Bf16(_) if mc == 8 => 2,
            _ => 6 / (mc - 6),
        };
        for (q, pass) in passes.iter_mut().enumerate().take(group) {
            *pass = lead(6, q);
        }
        passes[group] = Pass {
            r0: 6,
            rows: mc - 6,
            first: 0,
            panels: group,
            lead: false,
        };
        (group + 1, group)
    };
    let panel = kc * nr;
    let span = SPAN_STEPS / group;
    let mut acc: [Carried; 7] = [carried_zero(); 7];
    for j_group in panels.clone().step_by(group) {
        let here = group.min(panels.end - j_group);
        let at = p0 * n_pad + j_group * panel;
        // A pass over a panel past the group's end (its last, short) is left out; one over the
        // group's panels takes those it has.
        let width = |panels: usize| panels.min(here);
        for carried in &mut acc[..count] {
            *carried = carried_zero();
        }
        // SAFETY (both arms): rows i0..i0 + mc and columns p0..p0 + kc are inside A; the group's
        // panels hold kc·16 elements each; the CPU has AVX2 and FMA (caller). The lines asked
        // for past the group need not exist (asking never reads).
        unsafe {
            let a0 = a.ptr.offset(i0 as isize * a.rs + p0 as isize * a.cs);
            macro_rules! group {
                ($b:expr, $bytes:literal) => {{
                    let b = $b;
                    let near = NEAR_BYTES / (16 * $bytes);
                    let jump = (here * panel) as isize - panel as isize;
                    for k0 in (0..kc).step_by(span) {
                        let steps = k0..(k0 + span).min(kc);
                        for (q, pass) in passes[..count].iter().enumerate() {
                            if pass.first >= here {
                                continue;
                            }
                            kernel_avx2_span(
                                (pass.rows, width(pass.panels)),
                                steps.clone(),
                                a0.offset(pass.r0 as isize * a.rs),
                                a.rs,
                                b.add(pass.first * panel),
                                panel,
                                (if pass.lead { near } else { span + near }, kc, jump),
                                &mut acc[q],
                            );
                        }
                    }
                }};
            }
            match bpack {
                Panels::F32(b) => group!(b[at..].as_ptr(), 4),
                Panels::Bf16(b) => group!(b[at..].as_ptr(), 2),
            }
        }
        for (
            q,
            &Pass {
                r0,
                rows,
                first,
                panels,
                ..
            },
        ) in passes[..count].iter().enumerate()
        {
            for p in (first < here).then(|| 0..width(panels)).into_iter().flatten() {
                let j0 = (j_group + first + p) * nr;
                // SAFETY: j0 < n, inside the bias (caller).
                let update = unsafe { block_update(p0, ep, alpha, beta, j0) };
                let t = tile(
                    c,
                    rows,
                    nr.min(n - j0),
                    update,
                    *ep,
                    i0 + r0,
                    j0,
                    n,
                    last,
                    prefetch,
                );
                // SAFETY: the tile is inside C and has `rows` rows; the CPU has AVX2.
                unsafe { store_carried(rows, &acc[q], p, &t) };
            }
        }
    }
}

/// Where the block of packed B after the one at `(p0, j_block)` starts in the packing, and
/// its length in floats: the next panels of the same block of k, else (with the last rows
/// of A, `last_rows`) the first panels of the next block of k, else (more rows of A to
/// come) the first panels of this one; `None` after the last.
#[allow(clippy::too_many_arguments)]
fn next_block_of(
    k: usize,
    n_pad: usize,
    nr: usize,
    nc: usize,
    p0: usize,
    last_rows: bool,
    j_block: usize,
    panels: &Range<usize>,
) -> Option<(usize, usize)> {
    let (p, j) = if j_block + nc < panels.end {
        (p0, j_block + nc)
    } else if !last_rows {
        (p0, panels.start)
    } else if p0 + KC < k {
        (p0 + KC, panels.start)
    } else {
        return None;
    };
    let kc = KC.min(k - p);
    let len = ((j + nc).min(panels.end) - j) * kc * nr;
    Some((p * n_pad + j * kc * nr, len))
}

/// Column panels of B at most over which the AVX-512 kernel reads A's rows in place.
const DIRECT_PANELS_MAX: usize = 8;

/// Rows of A below which the AVX-512 kernel reads them in place over any number of panels of
/// B: fewer than a tile of the packed kernels' smallest height ([`Isa::mr`], 8), which
/// multiplies the rows it lacks as zeros. A decoding step of one sequence (one row) had run
/// the 8-row tile, eight times its arithmetic. `cargo bench --bench kernels -- gemm_few_rows`
/// (7 weights of `[1024, 256]` in L3, one thread, AMD EPYC Zen 4): 1 row 24.0 → 58.2 GiB/s
/// of weights, 2 rows 23.4 → 58.1, 4 rows 23.3 → 48.5 (3, 5, 6 and 7 rows, in a build for
/// the purpose: 23.4–23.9 → 58.1, 38.6, 32.4, 27.1); 8 rows 24.7 either way.
const DIRECT_ROWS_BELOW: usize = Isa::Avx512.mr();

/// Rows of A read in place at most whose passes over weights in the cache (not streamed from
/// memory, [`with_streamed_weights`]) leave B to the hardware's prefetch: one or two rows
/// load B for only two or four multiply-adds a step, and asking for it ahead (two or four
/// requests a step) had cost more than it saved. `cargo bench --bench kernels --
/// gemm_few_rows` (AMD EPYC Zen 4, weights in L3): 1 row 58.8 → 75.6 GiB/s on one thread,
/// 111.2 → 128.6 on two; 2 rows 58.1 → 70.2 and 94.4 → 135.3. From memory the requests pay
/// (a base decode of one sequence, one thread, 226–256 ms with them, 254–269 without), and
/// streamed weights keep them.
#[cfg(target_arch = "x86_64")]
const FEW_ROWS_ASK_ABOVE: usize = 2;

/// The tiles of rows `rows` (a run of whole MR panels, or to the end of C; any run for
/// the kernels reading A's rows in place) and column panels
/// `panels`, on the calling thread.
///
/// # Safety
/// As [`gemm`]; `bpack` holds B packed; no other thread writes these tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn run_part(
    isa: Isa,
    mr: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat,
    bpack: Panels<'_>,
    beta: f32,
    c: MatMut,
    rows: Range<usize>,
    panels: Range<usize>,
    ep: Epilogue,
    prepacked: bool,
    streamed: bool,
) {
    if rows.is_empty() || panels.is_empty() {
        return;
    }
    let nr = isa.nr();
    let n_pad = n.div_ceil(nr) * nr;
    // Blocks of A of equal size (within a panel), as few as fit: a short last block would
    // stream all of B past a few rows.
    let m_panels = rows.len().div_ceil(mr);
    let blocks = blocks_of(rows.len(), mr, mc_panels(mr));
    let mc_max = m_panels.div_ceil(blocks) * mr;
    let prefetch = prefetch_c(rows.len());
    let last_col = panels.end;
    // With rows of A contiguous, the AVX2 kernel reads its panels where they lie
    // (`kernel_avx2_rows`): each of a panel's rows a run of whole lines along k, as packed, and
    // a short panel only its own rows. Nothing is packed. (Columns of A contiguous would put
    // each step of k on a line of its own.)
    let direct = isa == Isa::Avx2 && a.cs == 1;
    // The AVX-512 kernel reads them in place too (`kernel_avx512_rows`), over `f32` panels,
    // where packing would pay least: few panels of B to pass over, or fewer rows than a tile
    // (`DIRECT_ROWS_BELOW`), and rows that are not a multiple of 4 KiB apart (which would
    // share one set of L1 lines; a single row shares with none).
    let direct512 = isa == Isa::Avx512
        && a.cs == 1
        && matches!(bpack, Panels::F32(_))
        && (panels.len() <= DIRECT_PANELS_MAX || rows.len() < DIRECT_ROWS_BELOW)
        && ((a.rs * 4) % 4096 != 0 || rows.len() == 1);
    let in_place = direct || direct512;
    let a_len = if in_place { 0 } else { mc_max * KC };
    let wide_len = match bpack {
        Panels::Bf16(_) if !direct => NC_PANELS * KC * nr,
        _ => 0,
    };
    // A's rows summed by the part that holds the first panel of columns (parts cut by
    // columns all read the same rows).
    let sums = ep.a_sums.filter(|_| panels.start == 0);
    with_scratch(&A_BUF, a_len, |apack| {
        with_scratch(&WIDE_BUF, wide_len, |wide| {
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                for i0 in rows.clone().step_by(mc_max) {
                    let mc = mc_max.min(rows.end - i0);
                    if !in_place {
                        // SAFETY: the block is inside A, its rows inside the sums (caller).
                        unsafe { pack_a(a, i0, mc, p0, kc, mr, apack, isa, sums) };
                    } else if let Some(sums) = sums {
                        // SAFETY: as above.
                        unsafe { add_row_sums(a, i0..i0 + mc, p0..p0 + kc, sums) };
                    }
                    let passes = mc.div_ceil(mr);
                    // A decoding step's few rows pass over one panel of B at a time (see `Far`),
                    // more of them when B streams from memory.
                    let few = direct && (passes <= FEW_PANELS || streamed && passes <= STREAMED_PANELS);
                    // The AVX-512 kernel's few rows over a large B: the later passes ask for the
                    // next block, over blocks of two panels (see `NEXT_PASSES`).
                    let spread = matches!(bpack, Panels::F32(_))
                        && isa == Isa::Avx512
                        && !direct512
                        && (2..=NEXT_PASSES).contains(&passes)
                        && k * n_pad >= NEXT_MIN_B
                        && prepacked;
                    let nc = if few {
                        1
                    } else if spread {
                        NEXT_NC
                    } else {
                        NC_PANELS
                    };
                    // Rows read in place go in panels of equal height, give or take one (8 rows as
                    // 4 + 4, 32 as 6 + 6 + 5 + 5 + 5 + 5, not 6 + 2 and 6 · 5 + 2): a panel of 2
                    // rows loads B for 4 multiply-adds a step. Each element's chain of
                    // multiply-adds does not depend on its panel, so the bits do not either.
                    // Small greedy decode, 32 rows a step, AMD EPYC Zen 3, one thread, builds
                    // alternating: 122.5 / 115.3 / 112.0 / 116.1 / 125.2 / 121.9 / 125.3 / 124.6 →
                    // 114.0 / 112.7 / 111.7 / 112.7 / 119.6 / 119.8 / 117.7 / 115.2 ms.
                    let (base, extra) = if in_place {
                        (mc / passes, mc % passes)
                    } else {
                        (mr, 0)
                    };
                    #[cfg(target_arch = "x86_64")]
                    if few && mc <= SPAN_ROWS_MAX {
                        // SAFETY: as the passes below (the caller's contract).
                        unsafe {
                            run_spans(
                                (p0, kc, n_pad),
                                a,
                                bpack,
                                c,
                                (i0, mc),
                                panels.clone(),
                                (alpha, beta, &ep),
                                (n, p0 + kc == k, prefetch),
                            )
                        };
                        continue;
                    }
                    for j_block in panels.clone().step_by(nc) {
                        // The block's panels as `f32`: where they lie, or widened into `wide`
                        // (in L2 for the passes that follow, as a block of `f32` panels would
                        // be). The kernel reading A's rows in place instead reads bf16 bits where
                        // they lie (`micro::PanelOf`, below): widening a block into the buffer
                        // had cost more than widening in the kernel, pass after pass (AMD EPYC
                        // Zen 3, one thread, in one process: 32 × 256 × 1024 and 32 × 1024 × 256
                        // over 40 weights 6–12% slower, 512 × 512 × 2048 1–3%).
                        let b_at = p0 * n_pad + j_block * kc * nr;
                        let len = ((j_block + nc).min(last_col) - j_block) * kc * nr;
                        let block = match bpack {
                            Panels::F32(b) => b[b_at..][..len].as_ptr(),
                            Panels::Bf16(_) if direct => std::ptr::null(), // not read
                            Panels::Bf16(b) => {
                                widen(isa, &b[b_at..][..len], &mut wide[..len]);
                                wide.as_ptr()
                            }
                        };
                        // A few row panels over the block in L2 leave memory idle after the first:
                        // the later ones ask for the next block's lines, a share each.
                        let here = (j_block + nc).min(last_col) - j_block;
                        let next_block = match bpack {
                            Panels::F32(b) if spread => {
                                next_block_of(k, n_pad, nr, nc, p0, i0 + mc >= rows.end, j_block, &panels)
                                    .map(|(at, len)| (b[at..][..len].as_ptr(), len))
                            }
                            _ => None,
                        };
                        for ip in 0..passes {
                            let r0 = i0 + ip * base + ip.min(extra);
                            let rows = (base + usize::from(ip < extra)).min(i0 + mc - r0);
                            for jp in j_block..(j_block + nc).min(last_col) {
                                let j0 = jp * nr;
                                let bp = block.wrapping_add((jp - j_block) * kc * nr);
                                // SAFETY: j0 < n.
                                let update = unsafe { block_update(p0, &ep, alpha, beta, j0) };
                                let cols = nr.min(n - j0);
                                let tile = tile(c, rows, cols, update, ep, r0, j0, n, p0 + kc == k, prefetch);
                                #[cfg(target_arch = "x86_64")]
                                if direct {
                                    // SAFETY: rows r0..r0 + rows (at most 6) and columns p0..p0 + kc
                                    // are inside A; the panel of B holds kc·16 floats (or bf16
                                    // bits); the tile is inside C; the CPU has AVX2 and FMA.
                                    unsafe {
                                        let at = a.ptr.offset(r0 as isize * a.rs + p0 as isize * a.cs);
                                        match bpack {
                                            Panels::F32(_) => {
                                                let far = Far::for_pass(bp, kc, few, ip, passes);
                                                super::micro::kernel_avx2_rows(far, kc, at, a.rs, bp, &tile)
                                            }
                                            Panels::Bf16(b) => {
                                                let bits = b[b_at + (jp - j_block) * kc * nr..].as_ptr();
                                                let far = Far::for_pass(bits, kc, few, ip, passes);
                                                super::micro::kernel_avx2_rows(far, kc, at, a.rs, bits, &tile)
                                            }
                                        }
                                    }
                                    continue;
                                }
                                #[cfg(target_arch = "x86_64")]
                                if direct512 {
                                    // SAFETY: rows r0..r0 + rows (at most 12) and columns
                                    // p0..p0 + kc are inside A; the panel of B holds kc·32
                                    // floats; the tile is inside C; the CPU has AVX-512F.
                                    unsafe {
                                        let at = a.ptr.offset(r0 as isize * a.rs + p0 as isize * a.cs);
                                        // One or two rows over weights in the cache ask for
                                        // nothing ahead (`FEW_ROWS_ASK_ABOVE`).
                                        let ask = streamed || rows > FEW_ROWS_ASK_ABOVE;
                                        super::micro::kernel_avx512_rows(
                                            ip == 0,
                                            ask,
                                            kc,
                                            at,
                                            a.rs,
                                            bp,
                                            &tile,
                                        )
                                    }
                                    continue;
                                }
                                let ap = apack.as_ptr().wrapping_add(ip * mr * kc);
                                let ahead = match next_block {
                                    Some((next, next_len)) if ip > 0 => {
                                        let share = (ip - 1) * here + (jp - j_block);
                                        Some(Ahead::share(next, next_len, share, (passes - 1) * here, kc))
                                    }
                                    _ => None,
                                };
                                // SAFETY: the panels hold kc·mr and kc·nr floats; the tile is inside C.
                                unsafe { isa.kernel(mr, ip == 0, ahead, kc, ap, bp, &tile) };
                            }
                        }
                    }
                }
            }
        });
    });
}
