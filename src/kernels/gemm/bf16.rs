//! The bf16 mixed-precision GEMM: `C ← α·A·B + β·C`, with the `f32` path's epilogues, where
//! A and B are rounded to bf16 (round to nearest, ties to even, denormals to zero: see
//! [`to_bf16`]) and the products are accumulated in `f32`. The vector paths convert with
//! AVX512-BF16's `vcvtne2ps2bf16` while they pack.
//!
//! # Paths
//! [`Bf16Path::best`] picks, at run time:
//! - [`Bf16Path::Amx`]: Intel's AMX tiles (`tdpbf16ps`), `32 × 32` tiles of C as four
//!   `16 × 16` tile registers, on Linux once the process has asked for the tile state
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).
//! - [`Bf16Path::Avx512Bf16`]: `vdpbf16ps`, `8 × 32` tiles of C in 16 vector registers, each
//!   instruction two products per lane.
//! - [`Bf16Path::Emulated`]: the `f32` kernels over the rounded values, on any CPU.
//!
//! # Layouts
//! k is cut into blocks of [`KC`] (the same blocks, whatever the path), each block
//! padded with zeros to a multiple of 32 values (`kp`), the depth of an AMX tile.
//! - Packed B: for each block of k, for each panel of 32 columns, `kp / 2` pair rows of 32
//!   pairs `(B[2q][j], B[2q + 1][j])`: 64 bf16 a pair row. The block that starts at row `p0`
//!   starts at element `p0 · n_pad` (every block but the last is whole).
//! - Packed A: for each panel of `MR` rows of a block, `kp / 32` chunks of `MR` rows × 32
//!   values of k.
//!
//! # Order of the sums
//! Within a block of k, each element of C is a sum over pairs of k:
//! - AVX512-BF16 adds, for q = 0, 1, …, the product of the odd index `2q + 1` and then that
//!   of the even index `2q`, each addition rounded to `f32` (a bf16 product is exact in
//!   `f32`), with denormal inputs and results flushed to zero: [`gemm_bf16_naive`] bit for
//!   bit.
//! - AMX sums within a tile in an order of its own (measured: none of the sequential orders);
//!   its results are held to the naive twin within a few units in the last place of the sum of
//!   the products' magnitudes.
//! - The emulated path sums the products of the rounded values in order of k with fused
//!   multiply-adds, as the `f32` kernels do.
//!
//! The blocks of k meet C as in `f32` (each block of k accumulated on its own, then added to C
//! with one rounding), except on AMX for a whole `32 × 32` tile with α = 1 and nothing after
//! the update: there the tiles start from what C holds (`C ← C + A·B`, a later block of k) or
//! from the bias in every row (`C ← bias + A·B`) and accumulate onto it, and are stored into
//! C directly, with no pass through the vector stores (the base workload's bf16 eval forward
//! 8% faster). The order never depends on where a tile lies or which thread runs it: results
//! are bitwise identical for any thread count, on each path.

use std::cell::Cell;
use std::ops::Range;

use ndarray::{ArrayView2, ArrayViewMut2};

#[cfg(target_arch = "x86_64")]
use super::micro::Tile;
#[cfg(target_arch = "x86_64")]
use super::micro::Update;
use super::packed::{
    self, Aligned, Epilogue, Isa, Mat, MatMut, add_row_sums, block_update, for_panel_runs, for_tile_runs,
    mc_panels, prefetch_c, split, tile, with_scratch,
};

/// Values of k per block: every element of C is summed over k in blocks of this many,
/// whatever the path and thread count. Twice the `f32` path's [`super::KC`] (a bf16 panel
/// takes half the bytes): each block's partial sums meet C in memory once, and with AMX that
/// pass is a large share of a product (measured on the small workload's training step).
pub const KC: usize = 1024;
/// Columns of a tile of C (both vector paths).
const NR: usize = 32;
/// Values of k per chunk of packed A (the depth of an AMX tile).
const DEPTH: usize = 32;

/// `x` rounded to bf16, to nearest with ties to even; NaN stays NaN (quiet); a denormal
/// (magnitude below 2⁻¹²⁶) becomes a zero of its sign. The same bits as AVX512-BF16's
/// `vcvtne2ps2bf16`, which the packing of the vector paths uses; and a denormal bf16 operand
/// would count as zero in their products anyway (`vdpbf16ps` and `tdpbf16ps` read denormals
/// as zero).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else if x.is_subnormal() {
        ((b >> 16) & 0x8000) as u16
    } else {
        rounded
    }
}

/// `src` rounded to bf16 into `dst` (of the same length), each value as [`to_bf16`] (the same
/// bits): 16 at a time with AVX512-BF16's `vcvtneps2bf16` where the CPU has it (a key or value
/// written into a bf16 cache while decoding).
///
/// # Panics
/// If the lengths differ.
pub fn to_bf16_slice(src: &[f32], dst: &mut [u16]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "to_bf16_slice: {} values into {} places",
        src.len(),
        dst.len()
    );
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // set only by the x86 paths
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx512bf16() {
        done = src.len() / 16 * 16;
        // SAFETY: `done` values of both; the CPU has AVX512-BF16 (checked).
        unsafe { vec::convert_run(src.as_ptr(), dst.as_mut_ptr(), done) };
    }
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = to_bf16(s);
    }
}

/// The `f32` of a bf16 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to the nearest bf16 value, as an `f32`.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(to_bf16(x))
}

/// Which kernel multiplies in bf16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bf16Path {
    /// Intel AMX tiles (AMX-TILE and AMX-BF16, and the operating system's permission).
    Amx,
    /// AVX512-BF16 (with AVX-512F and BW): Intel since Cooper Lake, AMD since Zen 4.
    Avx512Bf16,
    /// `f32` kernels over values rounded to bf16, for CPUs without bf16 arithmetic. Weights
    /// packed ahead ([`super::PackedB`], a model packed for inference) are kept as bf16 bits,
    /// half the bytes of `f32`, and widened exactly as the products read them; operands
    /// rounded on every call (a training step's) make it slower than `f32` itself (the
    /// rounding is a pass of its own).
    Emulated,
}

impl Bf16Path {
    /// The fastest path this process can run, found once: AMX where the CPU has it and the
    /// operating system grants the tile state (Linux; asked for on the first call), else
    /// AVX512-BF16, else emulated.
    pub fn best() -> Bf16Path {
        use std::sync::OnceLock;
        static BEST: OnceLock<Bf16Path> = OnceLock::new();
        *BEST.get_or_init(|| {
            if amx_usable() {
                Bf16Path::Amx
            } else if avx512bf16() {
                Bf16Path::Avx512Bf16
            } else {
                Bf16Path::Emulated
            }
        })
    }

    /// Every path this process can run, the fastest first, ending with `Emulated`.
    pub fn available() -> Vec<Bf16Path> {
        let mut all = Vec::new();
        if Bf16Path::best() == Bf16Path::Amx {
            all.push(Bf16Path::Amx);
        }
        if avx512bf16() {
            all.push(Bf16Path::Avx512Bf16);
        }
        all.push(Bf16Path::Emulated);
        all
    }

    /// Rows of a tile of C.
    const fn mr(self) -> usize {
        match self {
            Bf16Path::Amx => 32,
            _ => 8,
        }
    }
}

fn avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::kernels::cpu::avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), the vector
/// kernels' AVX-512 for the stores, and the operating system gives this process the tile
/// state.
fn amx_usable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::arch::x86_64::__cpuid_count;
        let leaf7 = __cpuid_count(7, 0);
        let amx = leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 22) != 0;
        if !amx || !avx512bf16() {
            return false;
        }
        // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): the kernel enables the tile
        // data state for this process (every thread), or refuses; 0 means granted.
        let ret: i64;
        // SAFETY: a system call with integer arguments that touches no memory of ours; the
        // kernel clobbers rcx and r11 as declared.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") 158i64 => ret,
                in("rdi") 0x1023i64,
                in("rsi") 18i64,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            );
        }
        ret == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

thread_local! {
    static A_BUF: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    static ROUND_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static ROUND_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `kc` padded to whole chunks.
const fn padded(kc: usize) -> usize {
    kc.div_ceil(DEPTH) * DEPTH
}

/// bf16 elements of B `k × n` packed.
pub(super) fn packed_len(k: usize, n: usize) -> usize {
    let last = if k == 0 { 0 } else { k - (k - 1) / KC * KC };
    (k - last + padded(last)) * n.div_ceil(NR) * NR
}

/// The packed-B buffer, shared by threads that pack disjoint panels of it.
#[derive(Clone, Copy)]
struct Shared(*mut u16);
// SAFETY: see `pack_b`, the one user.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Packs the column panels `panels` of B (`k × n`, every block of k) into `out`.
///
/// # Safety
/// B is `k × n`; `out` points to [`packed_len`] elements, of which no other thread touches
/// those of these panels; the CPU has AVX-512F, BW and BF16 (both vector paths need them).
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512bf16")
)]
unsafe fn pack_b(b: Mat, k: usize, n: usize, panels: Range<usize>, out: Shared) {
    let n_pad = n.div_ceil(NR) * NR;
    if b.cs == 1 {
        // Rows of B are contiguous (B = W in `∂Y·W`, or X in `∂Yᵀ·X`): a few pair rows at a
        // time across every panel, so that B is read row after row (a stream the hardware
        // prefetches) rather than one panel's 128 bytes of every row, thousands of bytes
        // apart, before the next panel's.
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let kp = padded(kc);
            for q0 in (0..kp / 2).step_by(PAIR_ROWS) {
                for jp in panels.clone() {
                    let j0 = jp * NR;
                    let cols = NR.min(n - j0);
                    for q in q0..(q0 + PAIR_ROWS).min(kp / 2) {
                        // SAFETY: pair row q of this panel of this block, inside `out` and
                        // ours alone; rows 2q, 2q + 1 (below kc) of the block, columns j0..j0 +
                        // cols, inside B (caller).
                        unsafe {
                            let pair = std::slice::from_raw_parts_mut(
                                out.0.add(p0 * n_pad + jp * kp * NR + q * 2 * NR),
                                2 * NR,
                            );
                            pack_pair_row(b, p0, kc, j0, cols, q, pair);
                        }
                    }
                }
            }
        }
        return;
    }
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        let kp = padded(kc);
        for jp in panels.clone() {
            let j0 = jp * NR;
            let cols = NR.min(n - j0);
            // SAFETY: this panel's elements of this block, inside `out` and ours alone.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.0.add(p0 * n_pad + jp * kp * NR), kp * NR) };
            #[cfg(target_arch = "x86_64")]
            if b.rs == 1 && cols == NR {
                // Columns of B are contiguous (B = Wᵀ): each pair is two neighbours. 32 values
                // of 16 columns at a time give 16 vectors of 16 pairs, one per column;
                // transposed, one per pair row, each 16 columns wide.
                use std::arch::x86_64::*;
                let whole = kc / DEPTH * DEPTH;
                for jb in (0..NR).step_by(16) {
                    for p in (0..whole).step_by(DEPTH) {
                        // SAFETY: columns j0 + jb.. + 16, rows p0 + p.. + 32, contiguous in
                        // each column; the 16 pair rows p/2.. of this panel, 32 u32 each.
                        unsafe {
                            let mut v: [__m512i; 16] = std::array::from_fn(|j| {
                                vec::convert32(
                                    b.ptr.offset((p0 + p) as isize + (j0 + jb + j) as isize * b.cs),
                                )
                            });
                            vec::transpose16(&mut v);
                            for (i, row) in v.iter().enumerate() {
                                let at = dst.as_mut_ptr().add((p / 2 + i) * 2 * NR + 2 * jb);
                                _mm512_storeu_si512(at as *mut __m512i, *row);
                            }
                        }
                    }
                }
                for j in 0..NR {
                    // SAFETY: column j0 + j, rows p0..p0 + kc, contiguous.
                    unsafe {
                        let col = b.ptr.offset(p0 as isize + (j0 + j) as isize * b.cs);
                        for q in whole / 2..kp / 2 {
                            let v0 = if 2 * q < kc { *col.add(2 * q) } else { 0.0 };
                            let v1 = if 2 * q + 1 < kc { *col.add(2 * q + 1) } else { 0.0 };
                            dst[q * 2 * NR + 2 * j] = to_bf16(v0);
                            dst[q * 2 * NR + 2 * j + 1] = to_bf16(v1);
                        }
                    }
                }
                continue;
            }
            for (q, pair) in dst.chunks_exact_mut(2 * NR).enumerate() {
                // SAFETY: rows p0.. + kc, columns j0.. + cols of B (caller).
                unsafe { pack_pair_row(b, p0, kc, j0, cols, q, pair) };
            }
        }
    }
}

/// Pair rows of B packed at a time across every panel when B's rows are contiguous
/// ([`pack_b`]): 16 rows of B.
const PAIR_ROWS: usize = 8;

/// Pair row `q` of one panel of B (columns `j0..j0 + cols`) in the block of k starting at row
/// `p0` (`kc` rows): `(B[2q][j], B[2q + 1][j])` for the panel's 32 columns, zeros past the
/// block and past `cols`.
///
/// # Safety
/// Rows `p0..p0 + kc`, columns `j0..j0 + cols` lie inside B; the CPU has AVX-512F, BW and
/// BF16.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512bf16")
)]
#[inline]
unsafe fn pack_pair_row(b: Mat, p0: usize, kc: usize, j0: usize, cols: usize, q: usize, pair: &mut [u16]) {
    let (p, p1) = (2 * q, 2 * q + 1);
    #[cfg(target_arch = "x86_64")]
    if b.cs == 1 && cols == NR && p1 < kc {
        // Rows of B are contiguous: two rows interleaved, 16 columns at a time.
        use std::arch::x86_64::*;
        // SAFETY: rows p0 + p and p0 + p1, columns j0..j0 + 32 of B; 64 u16 in the pair row.
        unsafe {
            let r0 = b.ptr.offset((p0 + p) as isize * b.rs + j0 as isize);
            let r1 = b.ptr.offset((p0 + p1) as isize * b.rs + j0 as isize);
            // The same columns of the rows the next run of pair rows packs.
            let ahead = (2 * PAIR_ROWS) as isize * b.rs;
            for r in [r0, r1] {
                let at = r.wrapping_offset(ahead) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(at);
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64));
            }
            for h in [0, 16] {
                let v = vec::pairs(_mm512_loadu_ps(r0.add(h)), _mm512_loadu_ps(r1.add(h)));
                _mm512_storeu_si512(pair.as_mut_ptr().add(2 * h) as *mut __m512i, v);
            }
        }
        return;
    }
    // SAFETY (every read): (p0 + i, j0 + j) with i < kc and j < cols lies inside B (caller).
    let at =
        |i: usize, j: usize| unsafe { *b.ptr.offset((p0 + i) as isize * b.rs + (j0 + j) as isize * b.cs) };
    for j in 0..NR {
        let inside = j < cols;
        pair[2 * j] = if inside && p < kc { to_bf16(at(p, j)) } else { 0 };
        pair[2 * j + 1] = if inside && p1 < kc { to_bf16(at(p1, j)) } else { 0 };
    }
}

/// Packs rows `i0..i0 + mc`, columns `p0..p0 + kc` of A into panels of `mr` rows; with `sums`,
/// adds each row's `f32` values into its element (`sums[i0 + r]`), in the order of the
/// columns, as [`crate::kernels::add_column_sums`] adds the rows of `Aᵀ`: the same bits.
///
/// # Safety
/// The block lies inside A; `out` holds `ceil(mc / mr) · mr · padded(kc)` elements; `sums`
/// holds rows `i0..i0 + mc`, and no other thread writes them; the CPU has AVX-512F, BW and
/// BF16.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512bf16")
)]
unsafe fn pack_a(
    a: Mat,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    mr: usize,
    out: &mut [u16],
    sums: Option<*mut f32>,
) {
    let kp = padded(kc);
    // SAFETY (every read through `at`): rows i0..i0 + mc, columns p0..p0 + kc of A.
    let at =
        |r: usize, p: usize| unsafe { a.ptr.offset((i0 + r) as isize * a.rs + (p0 + p) as isize * a.cs) };
    // Columns of A contiguous (A = Xᵀ, a weight gradient's left operand): the whole chunks
    // of every 16 rows are converted in registers first, the rest below. A group's two runs
    // of 8 rows each lie in one panel when MR is a multiple of 8: two panels of the
    // AVX512-BF16 path (MR = 8), half of one of AMX (MR = 32). Chunks outer, groups inner:
    // each chunk reads 32 rows of X along their length, where groups outer walked every row
    // of X once a group, a line from each (a weight gradient of 1024 × 1024 × 256 at 475
    // GFLOP/s that way, 708 this way, on AMX).
    let vector = cfg!(target_arch = "x86_64") && a.rs == 1 && a.cs != 1;
    let (grouped, chunked) = if vector && mr.is_multiple_of(8) {
        (mc / 16 * 16, kc / DEPTH * DEPTH)
    } else {
        (0, 0)
    };
    #[cfg(target_arch = "x86_64")]
    for c in 0..chunked / DEPTH {
        for g in (0..grouped).step_by(16) {
            // Where row r of the block starts in chunk c.
            let row_at = |r: usize, c: usize| (r / mr) * mr * kp + (c * mr + r % mr) * DEPTH;
            let (lo, hi) = (row_at(g, c), row_at(g + 8, c));
            assert!(lo.max(hi) + 8 * DEPTH <= out.len());
            // SAFETY: columns c·32.. + 32 ≤ kc of rows g.. + 16 ≤ mc; 8 rows of 32 u16 at
            // each destination (asserted); rows i0 + g.. + 16 of the sums (caller); the
            // vector paths run on CPUs with AVX-512F, BW and BF16.
            unsafe {
                let (src, lo, hi) = (
                    at(g, c * DEPTH),
                    out.as_mut_ptr().add(lo),
                    out.as_mut_ptr().add(hi),
                );
                match sums {
                    Some(sums) => vec::chunk_from_columns::<true>(src, a.cs, lo, hi, sums.add(i0 + g)),
                    None => vec::chunk_from_columns::<false>(src, a.cs, lo, hi, std::ptr::null_mut()),
                }
            };
        }
    }
    if let Some(sums) = sums {
        // The values the groups above did not sum, in order after theirs: each grouped row's
        // columns past the whole chunks, every column of the rows past the last group.
        // SAFETY: rows and columns inside the block, its rows inside the sums (caller).
        unsafe {
            add_row_sums(a, i0..i0 + grouped, p0 + chunked..p0 + kc, sums);
            add_row_sums(a, i0 + grouped..i0 + mc, p0..p0 + kc, sums);
        }
    }
    for (ip, dst) in out.chunks_exact_mut(mr * kp).take(mc.div_ceil(mr)).enumerate() {
        let r0 = ip * mr;
        let rows = mr.min(mc - r0);
        if a.cs == 1 {
            // Rows of A are contiguous: each chunk of a row is one converted run.
            for r in 0..mr {
                // SAFETY: row r0 + r, columns p0..p0 + kc, contiguous (when r < rows).
                let row = if r < rows {
                    unsafe { std::slice::from_raw_parts(at(r0 + r, 0), kc) }
                } else {
                    &[][..]
                };
                for c in 0..kp / DEPTH {
                    let d = &mut dst[(c * mr + r) * DEPTH..(c * mr + r + 1) * DEPTH];
                    if r >= rows {
                        // A row past the block (a decoding step's 8 rows fill a quarter of an
                        // AMX panel): zeros, in one fill rather than value by value; none past
                        // the first 16 rows of an AMX panel of at most 16, whose kernel reads
                        // only its first tile (`kernel_amx`'s `HALF`).
                        if !(mr == 32 && rows <= 16 && r >= 16) {
                            d.fill(0);
                        }
                        continue;
                    }
                    let src = row.get(c * DEPTH..).unwrap_or(&[]);
                    #[cfg(target_arch = "x86_64")]
                    if r + 1 < rows {
                        // The same columns of the next row, read after this one's.
                        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                        let next = at(r0 + r + 1, c * DEPTH) as *const i8;
                        _mm_prefetch::<_MM_HINT_T0>(next);
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64));
                    }
                    if src.len() >= DEPTH {
                        // SAFETY: 32 floats of the row, 32 u16 of the panel; the vector paths
                        // run on CPUs with AVX-512F, BW and BF16.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            std::arch::x86_64::_mm512_storeu_si512(
                                d.as_mut_ptr() as *mut std::arch::x86_64::__m512i,
                                vec::convert32(src.as_ptr()),
                            )
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        for (d, &s) in d.iter_mut().zip(&src[..DEPTH]) {
                            *d = to_bf16(s);
                        }
                    } else {
                        for (i, d) in d.iter_mut().enumerate() {
                            *d = src.get(i).map_or(0, |&s| to_bf16(s));
                        }
                    }
                }
            }
            continue;
        }
        // The values the groups above left: the chunk past the whole ones (and its padding)
        // and the rows past the last group.
        let left = |r: usize, p: usize| r0 + r >= grouped || p >= chunked;
        #[cfg(target_arch = "x86_64")]
        if r0 + mr <= grouped && mr.is_multiple_of(16) {
            // A whole AMX panel in groups: the pairs of its last, partial chunk scattered
            // across its rows.
            use std::arch::x86_64::*;
            let whole = kc / 2 * 2;
            // SAFETY: columns p, p + 1 < kc of rows r0..r0 + mr ≤ mc; the chunk holds mr rows
            // of 16 u32; the vector paths run on CPUs with AVX-512F, BW and BF16.
            unsafe {
                let across = _mm512_mullo_epi32(
                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                    _mm512_set1_epi32((DEPTH / 2) as i32),
                );
                for p in (chunked..whole).step_by(2) {
                    let (c, q) = (p / DEPTH, p % DEPTH / 2);
                    for r in (0..mr).step_by(16) {
                        let v =
                            vec::pairs(_mm512_loadu_ps(at(r0 + r, p)), _mm512_loadu_ps(at(r0 + r, p + 1)));
                        let base = dst.as_mut_ptr().add((c * mr + r) * DEPTH + 2 * q) as *mut i32;
                        _mm512_i32scatter_epi32::<4>(base, across, v);
                    }
                }
            }
            for p in whole..kp {
                let (c, kk) = (p / DEPTH, p % DEPTH);
                for r in 0..mr {
                    // SAFETY: (r0 + r, p) inside the block when p < kc (r < rows = mr).
                    dst[(c * mr + r) * DEPTH + kk] = if p < kc {
                        to_bf16(unsafe { *at(r0 + r, p) })
                    } else {
                        0
                    };
                }
            }
            continue;
        }
        // Otherwise one value at a time, k outer (strided reads: the slow way); a panel in
        // groups only from its partial chunk on.
        let from = if r0 + mr <= grouped { chunked } else { 0 };
        for p in from..kp {
            let (c, kk) = (p / DEPTH, p % DEPTH);
            for r in 0..mr {
                if !left(r, p) {
                    continue;
                }
                // SAFETY: (r0 + r, p) inside the block when r < rows and p < kc.
                dst[(c * mr + r) * DEPTH + kk] = if r < rows && p < kc {
                    to_bf16(unsafe { *at(r0 + r, p) })
                } else {
                    0
                };
            }
        }
    }
}

/// Vectorised conversions for packing (AVX-512F, BW and BF16, which both vector paths have): the
/// same bits as [`to_bf16`].
#[cfg(target_arch = "x86_64")]
mod vec {
    use std::arch::x86_64::*;

    /// Lanes `(lo[i], hi[i])` of 16 pairs, as u32 lanes: `lo`'s bf16 in the low half, each
    /// value rounded as [`super::to_bf16`] (`vcvtne2ps2bf16`, then the halves interleaved).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn pairs(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: a bf16 vector is 512 bits, as an integer vector.
        let both: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo)) };
        let zip = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
            18, 2, 17, 1, 16, 0,
        );
        _mm512_permutexvar_epi16(zip, both)
    }

    /// `n` (a multiple of 16) floats at `src` as bf16 at `dst`, each as [`super::to_bf16`].
    ///
    /// # Safety
    /// `n` floats readable at `src`, `n` u16 writable at `dst`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_run(src: *const f32, dst: *mut u16, n: usize) {
        for i in (0..n).step_by(16) {
            // SAFETY: values i..i + 16 ≤ n of both (caller); bf16 × 16 is 256 bits.
            unsafe {
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(i))));
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, h);
            }
        }
    }

    /// 32 consecutive floats at `src` as 32 bf16 (16 pairs of neighbours, as u32 lanes),
    /// rounded as [`super::to_bf16`]: one `vcvtne2ps2bf16`.
    ///
    /// # Safety
    /// 32 floats readable at `src`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert32(src: *const f32) -> __m512i {
        // SAFETY: the caller vouches for the run; a bf16 vector is 512 bits.
        unsafe {
            std::mem::transmute(_mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(src.add(16)),
                _mm512_loadu_ps(src),
            ))
        }
    }

    /// 16 rows of one chunk of packed A (16 × 32 values of k; rows of 32 bf16 at `lo`, `lo +
    /// 32`, … for the first 8 rows and at `hi`, `hi + 32`, … for the next 8) from an A whose
    /// columns are contiguous: column p of the 16 rows is 16 floats at `src + p·cs`. 16
    /// vectors of 16 rows' pairs, transposed in registers.
    ///
    /// With `SUM`, also adds the 32 columns, one after the other, into the 16 rows' sums at
    /// `sums`.
    ///
    /// # Safety
    /// 16 floats readable at `src + p·cs` for p < 32; 8 · 32 u16 writable at `lo` and at `hi`;
    /// with `SUM`, 16 floats readable and writable at `sums`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn chunk_from_columns<const SUM: bool>(
        src: *const f32,
        cs: isize,
        lo: *mut u16,
        hi: *mut u16,
        sums: *mut f32,
    ) {
        // SAFETY: the caller vouches for the 32 columns and the 16 rows of the chunk, and for
        // the sums.
        unsafe {
            let cols: [__m512; 32] = std::array::from_fn(|p| _mm512_loadu_ps(src.offset(p as isize * cs)));
            if SUM {
                let s = cols
                    .iter()
                    .fold(_mm512_loadu_ps(sums), |s, &c| _mm512_add_ps(s, c));
                _mm512_storeu_ps(sums, s);
            }
            let mut v: [__m512i; 16] = std::array::from_fn(|i| pairs(cols[2 * i], cols[2 * i + 1]));
            transpose16(&mut v);
            for (j, row) in v.iter().enumerate() {
                let dst = if j < 8 {
                    lo.add(j * super::DEPTH)
                } else {
                    hi.add((j - 8) * super::DEPTH)
                };
                _mm512_storeu_si512(dst as *mut __m512i, *row);
            }
        }
    }

    /// Transposes 16 rows of 16 u32 lanes in place: in four steps, each exchanging the
    /// off-diagonal blocks of size 8, 4, 2 and 1 between pairs of rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn transpose16(r: &mut [__m512i; 16]) {
        exchange::<8>(r);
        exchange::<4>(r);
        exchange::<2>(r);
        exchange::<1>(r);
    }

    /// One step of [`transpose16`]: the off-diagonal blocks of size `B` exchanged between
    /// rows i and i + B (a constant, so that the loop unrolls and the rows stay in registers).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn exchange<const B: usize>(r: &mut [__m512i; 16]) {
        // Row i takes lanes of row i + B where (lane & B) ≠ 0, and row i + B the lanes of row
        // i where (lane & B) = 0, shifted by B (16 + j picks lane j of the second).
        let lo: [i32; 16] = std::array::from_fn(|l| if l & B == 0 { l as i32 } else { (16 + l - B) as i32 });
        let hi: [i32; 16] = std::array::from_fn(|l| {
            if l & B == 0 {
                (l + B) as i32
            } else {
                (16 + l) as i32
            }
        });
        // SAFETY: two arrays of 16 i32 read as vectors.
        let (lo, hi) = unsafe {
            (
                _mm512_loadu_si512(lo.as_ptr() as *const __m512i),
                _mm512_loadu_si512(hi.as_ptr() as *const __m512i),
            )
        };
        for i in 0..16 {
            if i & B == 0 {
                let (x, y) = (r[i], r[i + B]);
                r[i] = _mm512_permutex2var_epi32(x, lo, y);
                r[i + B] = _mm512_permutex2var_epi32(x, hi, y);
            }
        }
    }
}

/// The AVX512-BF16 kernel: an `8 × 32` tile from `kp / 32` chunks, of which it computes the
/// tile's rows only ([`kernel_avx512bf16_rows`]).
///
/// # Safety
/// The CPU has AVX512-BF16, F and BW; `a` holds `8 · kp` and `b` `32 · kp` elements packed as
/// the module docs say; `t` describes a tile of C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn kernel_avx512bf16(kp: usize, a: *const u16, b: *const u16, t: &Tile) {
    // SAFETY (each): forwarded from this function's contract; the tile has that many rows.
    unsafe {
        match t.rows {
            1 => kernel_avx512bf16_rows::<1>(kp, a, b, t),
            2 => kernel_avx512bf16_rows::<2>(kp, a, b, t),
            3 => kernel_avx512bf16_rows::<3>(kp, a, b, t),
            4 => kernel_avx512bf16_rows::<4>(kp, a, b, t),
            5 => kernel_avx512bf16_rows::<5>(kp, a, b, t),
            6 => kernel_avx512bf16_rows::<6>(kp, a, b, t),
            7 => kernel_avx512bf16_rows::<7>(kp, a, b, t),
            _ => kernel_avx512bf16_rows::<8>(kp, a, b, t),
        }
    }
}

/// The first `ROWS` rows of [`kernel_avx512bf16`]'s tile (A packed for eight): a decoding
/// step of one sequence had multiplied seven rows of zeros beside its one. Each row's chain
/// of products is the same whichever rows are computed beside it, so the bits are too.
///
/// # Safety
/// As [`kernel_avx512bf16`]; `ROWS ≤ 8` and at least the tile's rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn kernel_avx512bf16_rows<const ROWS: usize>(kp: usize, a: *const u16, b: *const u16, t: &Tile) {
    use std::arch::x86_64::*;
    const MR: usize = 8;
    let mut lo = [_mm512_setzero_ps(); ROWS];
    let mut hi = [_mm512_setzero_ps(); ROWS];
    let lines = super::micro::TileLines::of(t);
    for c in 0..kp / DEPTH {
        // C's rows one per chunk of k (a chunk is 32 steps).
        lines.ask(c);
        // SAFETY: chunk c of both panels; row r's pair q is the i32 at r·16 + q of the chunk.
        unsafe {
            let ac = a.add(c * MR * DEPTH) as *const i32;
            let bc = b.add(c * DEPTH * NR);
            for q in 0..DEPTH / 2 {
                // B asked for 4 KiB ahead, as in the f32 and AMX kernels (a pair row is 128
                // bytes): a decoding step streams every weight from memory. Measured on the
                // Intel Xeon of docs/performance.md with this path forced in a build for the
                // purpose: base bf16 greedy decode 904/954 → 658/626 ms, eval unchanged.
                // B_PREFETCH bytes are B_PREFETCH / 2 elements of u16.
                let ahead = bc.add(q * 2 * NR + B_PREFETCH / 2) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.add(64));
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_epi32(bc.add(q * 2 * NR) as *const i32));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_epi32(bc.add(q * 2 * NR + NR) as *const i32));
                for r in 0..ROWS {
                    let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ac.add(r * DEPTH / 2 + q)));
                    lo[r] = _mm512_dpbf16_ps(lo[r], ar, b0);
                    hi[r] = _mm512_dpbf16_ps(hi[r], ar, b1);
                }
            }
        }
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { super::micro::store_avx512(&lo, &hi, t) }
}

/// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
const TILE_CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

/// Loads [`TILE_CONFIG`] on this thread; [`amx_end`] releases the tiles.
///
/// # Safety
/// The CPU has AMX and the process has the tile state ([`Bf16Path::best`] is `Amx`).
#[cfg(target_arch = "x86_64")]
unsafe fn amx_begin() {
    // SAFETY: the configuration is 64 valid bytes; the caller vouches for AMX.
    unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly)) };
}

/// # Safety
/// As [`amx_begin`].
#[cfg(target_arch = "x86_64")]
unsafe fn amx_end() {
    // SAFETY: the caller vouches for AMX.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

/// How far ahead (in bytes) [`kernel_amx`] and [`kernel_avx512bf16`] prefetch B: two chunks of
/// 32 pairs of rows, 4 KiB. For AMX, measured against no prefetch (Intel Xeon, one thread,
/// interleaved): base bf16 greedy decode 416–464 → 324–331 ms; against prefetching for the
/// first panel of A only: base bf16 eval 112–117 → 106–109 ms.
#[cfg(target_arch = "x86_64")]
const B_PREFETCH: usize = 2 * DEPTH * NR * 2;

/// Values of k per block, in whole chunks (`kp`), at which [`kernel_amx`] loads A's tiles
/// with `tileloaddt1`, the hint that keeps them out of L1 (`STREAM_A`). A panel of B
/// (`kp × 32` bf16, 64 bytes a step of k) is read by every panel of A in turn, each panel
/// of A once per panel of B: B's panel should stay in L1 while A's stream past it. At `kp`
/// 512 (every product with k = 512, most of the base workload's) the two panels take 32 KiB
/// each, more than the 48 KiB L1 holds, and A's lines evicted B's: each chunk's four tiles
/// came from L2. With A's tiles hinted, B's panel stays. Intel Xeon with AMX, one thread,
/// in one process against the build without, packing included: 512 × 512 × 2048 689 → 893
/// GFLOP/s, 512 × 512 × 512 739 → 948, 512 × 512 × 1536 776 → 1047, 512 × 512 × 8000 729 →
/// 851; at `kp` 256 (both panels fit) 1024 × 256 × 256 5% slower and 1024 × 256 × 1024 5%
/// faster, at 1024 (B's panel alone fills L1) 3–4% slower; so only between. Same bits.
#[cfg(target_arch = "x86_64")]
const STREAM_A_KP: std::ops::RangeInclusive<usize> = 384..=640;

/// The AMX kernel: a `32 × 32` tile of C as four `16 × 16` tile registers (tmm0–3), from
/// `kp / 32` chunks of A (two tiles of 16 rows, tmm4–5; kept out of L1 with `STREAM_A`) and
/// B (two tiles of 16 columns, tmm6–7), then written through the AVX-512 stores in four
/// runs of 8 rows; or, for the updates of [`direct_update`], started from C or the bias and
/// stored into `held`, whose previous tile this call copies into C while its tiles multiply
/// (see [`Held`]).
///
/// # Safety
/// [`amx_begin`] ran on this thread; `a` holds `32 · kp` and `b` `32 · kp` elements packed as
/// the module docs say; `t` describes a tile of C (its bias, with `Update::Bias`, 32 floats);
/// the tile `held` holds, if any, is inside C, no other thread writes it, and this tile is
/// not it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn kernel_amx<const STREAM_A: bool, const HALF: bool>(
    kp: usize,
    a: *const u16,
    b: *const u16,
    t: &Tile,
    held: &mut Held,
) {
    use std::arch::x86_64::*;
    #[repr(C, align(64))]
    struct Buf([[f32; 32]; 32]);
    // Not zeroed: the four tile stores write all of it before it is read (zeroing it was 3% of
    // a base bf16 eval forward).
    let mut buf = std::mem::MaybeUninit::<Buf>::uninit();
    // SAFETY: the tiles are configured (caller); every load reads 16 rows of 64 bytes inside
    // the panels (chunk c of A: 32 rows of 64 bytes; of B: 16 pair rows of 128 bytes), and
    // the stores write 16 rows of 64 bytes inside `buf` (rows of 128 bytes), all of it
    // between them, before the vector loads read it back through the same pointer. A direct
    // update (whole tile, unit column stride: `direct_update`) reads and writes the tile's 32
    // rows of 32 floats in C, which the caller vouches for, or reads the tile's 32 floats of
    // the bias.
    let direct = direct_update(t);
    unsafe {
        match direct {
            Some(Update::Add { .. }) => c_tiles::<false>(t.c, t.rsc),
            // Row stride 0: every row of each tile is the bias.
            Some(Update::Bias { bias, .. }) => c_tiles::<false>(bias as *mut f32, 0),
            _ => std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            ),
        }
        // C's rows asked for a few at a time over the first chunks, not all at once beside B;
        // a direct tile instead copies the held one into C, a few rows a chunk, each asked
        // for a chunk before its copy.
        let lines = super::micro::TileLines::of(t);
        let chunks = kp / DEPTH;
        let per = 32usize.div_ceil(chunks.max(1));
        if direct.is_some() {
            held.ask(0..per);
        }
        for c in 0..chunks {
            if direct.is_some() {
                held.ask((c + 1) * per..(c + 2) * per);
                held.copy_rows((c + 1) * per);
            } else {
                for r in c * per..(c + 1) * per {
                    lines.ask(r);
                }
            }
            let ac = a.add(c * 32 * DEPTH) as *const u8;
            let bc = b.add(c * DEPTH * NR) as *const u8;
            // B is asked for B_PREFETCH bytes ahead, line by line (a chunk is 2 KiB): where
            // it streams from memory, as for a decoding step's few rows against every weight,
            // the hardware's stream prefetcher stops at each 4 KiB page; where a panel of B
            // (64 KiB) is read again from L2 for the next panel of A, it arrives in time too.
            for line in 0..DEPTH * NR * 2 / 64 {
                _mm_prefetch::<_MM_HINT_T0>(bc.add(B_PREFETCH + 64 * line) as *const i8);
            }
            // One chunk: A's two tiles (with `tileloaddt1` when they stream, see
            // [`STREAM_A_KP`]), B's two, and the four products.
            macro_rules! chunk {
                ($load_a:literal) => {
                    std::arch::asm!(
                        concat!($load_a, " tmm4, [{a0} + {s64}]"),
                        "tileloadd tmm6, [{b0} + {s128}]",
                        "tileloadd tmm7, [{b1} + {s128}]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        concat!($load_a, " tmm5, [{a1} + {s64}]"),
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) ac,
                        a1 = in(reg) ac.add(16 * 64),
                        b0 = in(reg) bc,
                        b1 = in(reg) bc.add(64),
                        s64 = in(reg) 64usize,
                        s128 = in(reg) 128usize,
                        options(nostack, readonly)
                    )
                };
            }
            if HALF {
                // A tile of at most 16 rows: A's first tile and the products of its row of C
                // alone (its second tile is zeros, whose products the tile would only waste).
                std::arch::asm!(
                    "tileloadd tmm4, [{a0} + {s64}]",
                    "tileloadd tmm6, [{b0} + {s128}]",
                    "tileloadd tmm7, [{b1} + {s128}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) ac,
                    b0 = in(reg) bc,
                    b1 = in(reg) bc.add(64),
                    s64 = in(reg) 64usize,
                    s128 = in(reg) 128usize,
                    options(nostack, readonly)
                );
            } else if STREAM_A {
                chunk!("tileloaddt1");
            } else {
                chunk!("tileloadd");
            }
        }
        if direct.is_some() {
            held.hold(t.c, t.rsc);
            return;
        }
        let p = buf.as_mut_ptr() as *mut f32;
        c_tiles::<true>(p, 32);
        for g in 0..4 {
            if t.rows <= 8 * g {
                break;
            }
            let lo: [__m512; 8] = std::array::from_fn(|r| _mm512_load_ps(p.add((8 * g + r) * 32)));
            let hi: [__m512; 8] = std::array::from_fn(|r| _mm512_load_ps(p.add((8 * g + r) * 32 + 16)));
            super::micro::store_avx512(&lo, &hi, &t.below(8 * g));
        }
    }
}

/// A whole `32 × 32` tile of C computed by [`kernel_amx`] and not yet in C: the next call's
/// loop copies it there, a few rows each chunk, while its own tiles multiply; [`Held::flush`]
/// copies what is left.
///
/// Stored straight into C by `tilestored`, a tile's 16 rows of 64 bytes at a row stride that
/// is a multiple of 4 KiB (widths of 1024 or 2048 floats; 2 KiB, 512 floats, for every other
/// row) all fall in one set of the 12-way L1, so the lines asked for ahead of the store
/// evicted one another: at 1024 × 256 × 1024 the AMX path ran at 745 GFLOP/s, at
/// 1024 × 256 × 1040 at 1000 (Intel Xeon with AMX, one thread, packing included). A tile is
/// now stored into this buffer, whose rows are contiguous, and its rows go into C by vector
/// stores spread over the next tile's chunks, each row asked for a chunk ahead: the copy
/// waits on no line and the tiles never wait on the copy. The same values, in the same bits.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
pub(super) struct Held {
    buf: [[f32; 32]; 32],
    /// Where the held tile goes, its row stride in floats, and how many of its rows are in C
    /// already (all 32: none held).
    c: *mut f32,
    rs: isize,
    done: usize,
}

#[cfg(target_arch = "x86_64")]
impl Held {
    pub(super) fn new() -> Held {
        Held {
            buf: [[0.0; 32]; 32],
            c: std::ptr::null_mut(),
            rs: 0,
            done: 32,
        }
    }

    /// Asks for the lines of C of the held tile's `rows` not yet copied.
    #[inline(always)]
    fn ask(&self, rows: Range<usize>) {
        for r in rows.start.max(self.done)..rows.end.min(32) {
            let p = self.c.wrapping_offset(r as isize * self.rs) as *const i8;
            super::micro::ask_row(p, 32 * 4);
        }
    }

    /// Copies the held tile's rows up to `upto` into C.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the held tile is inside C and no other thread writes it.
    #[inline(always)]
    unsafe fn copy_rows(&mut self, upto: usize) {
        use std::arch::x86_64::*;
        let upto = upto.min(32);
        while self.done < upto {
            let r = self.done;
            // SAFETY: row r of the buffer; row r of the tile in C (caller).
            unsafe {
                let from = self.buf[r].as_ptr();
                let to = self.c.offset(r as isize * self.rs);
                _mm512_storeu_ps(to, _mm512_load_ps(from));
                _mm512_storeu_ps(to.add(16), _mm512_load_ps(from.add(16)));
            }
            self.done += 1;
        }
    }

    /// Copies what is left of the held tile into C.
    ///
    /// # Safety
    /// As [`Held::copy_rows`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn flush(&mut self) {
        // SAFETY: forwarded.
        unsafe { self.copy_rows(32) }
    }

    /// Holds the tile in tmm0–3, bound for C at `c` (row stride `rs`), after copying what is
    /// left of the previous one.
    ///
    /// # Safety
    /// As [`Held::copy_rows`], for both tiles; the tiles are configured.
    #[inline(always)]
    unsafe fn hold(&mut self, c: *mut f32, rs: isize) {
        // SAFETY: forwarded; the buffer holds 32 rows of 32 floats.
        unsafe {
            self.copy_rows(32);
            c_tiles::<true>(self.buf.as_mut_ptr() as *mut f32, 32);
        }
        self.c = c;
        self.rs = rs;
        self.done = 0;
    }
}

/// Loads tmm0–3 from (or, with `STORE`, stores them into) the `32 × 32` block of `f32` at `p`
/// whose rows are `rs` floats apart: tmm0 the top left `16 × 16`, tmm1 the top right, tmm2 and
/// tmm3 below them.
///
/// # Safety
/// The tiles are configured ([`amx_begin`]); the 32 rows of 32 floats are readable (and, with
/// `STORE`, writable).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn c_tiles<const STORE: bool>(p: *mut f32, rs: isize) {
    let q = [
        p,
        p.wrapping_add(16),
        p.wrapping_offset(16 * rs),
        p.wrapping_offset(16 * rs + 16),
    ];
    let s = rs * 4;
    // SAFETY: the caller vouches for the block.
    unsafe {
        if STORE {
            std::arch::asm!(
                "tilestored [{0} + {s}], tmm0", "tilestored [{1} + {s}], tmm1",
                "tilestored [{2} + {s}], tmm2", "tilestored [{3} + {s}], tmm3",
                in(reg) q[0], in(reg) q[1], in(reg) q[2], in(reg) q[3], s = in(reg) s,
                options(nostack)
            )
        } else {
            std::arch::asm!(
                "tileloadd tmm0, [{0} + {s}]", "tileloadd tmm1, [{1} + {s}]",
                "tileloadd tmm2, [{2} + {s}]", "tileloadd tmm3, [{3} + {s}]",
                in(reg) q[0], in(reg) q[1], in(reg) q[2], in(reg) q[3], s = in(reg) s,
                options(nostack, readonly)
            )
        }
    }
}

/// The update of a whole `32 × 32` tile that the AMX tiles can make themselves, with no pass
/// through the vector stores: `C ← acc` (tiles from zero, stored into C), `C ← C + acc` (tiles
/// loaded from C) or `C ← bias + acc` (tiles loaded with the bias in every row), for α = 1,
/// unit column stride and nothing after the update. `None` for every other tile.
#[cfg(target_arch = "x86_64")]
fn direct_update(t: &Tile) -> Option<Update> {
    let whole = t.rows == 32 && t.cols == 32 && t.csc == 1;
    let plain = !t.relu && t.drop.is_none() && t.gate.is_none();
    let unit = match t.update {
        Update::Set { alpha } | Update::Add { alpha } | Update::Bias { alpha, .. } => alpha == 1.0,
        Update::Scale { .. } => false,
    };
    (whole && plain && unit).then_some(t.update)
}

/// `C ← α·A·B + β·C` (or with the epilogue) in bf16 on `path`, on up to `parts` threads.
///
/// # Safety
/// As [`packed::gemm`]; the process runs `path` ([`Bf16Path::available`]).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    path: Bf16Path,
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
        // No products: the f32 path's handling of the update and epilogue.
        // SAFETY: forwarded; the scalar family runs everywhere.
        return unsafe { packed::gemm(Isa::Scalar, m, k, n, alpha, a, b, beta, c, parts, ep) };
    }
    if path == Bf16Path::Emulated {
        let isa = Isa::best().unwrap_or(Isa::Scalar);
        // SAFETY: forwarded; the rounded copies are m × k and k × n.
        return unsafe {
            with_rounded(Operand::A, a, m, k, |ra| {
                with_rounded(Operand::B, b, k, n, |rb| {
                    packed::gemm(isa, m, k, n, alpha, ra, rb, beta, c, parts, ep)
                })
            })
        };
    }
    let n_panels = n.div_ceil(NR);
    let (parts, _) = split(parts, m.div_ceil(path.mr()), n_panels);
    // A weight packed ahead (see `weights`): its packing is the one made below, made once.
    let done = super::weights::with_packed(b, k, n, |bpack| {
        // SAFETY: forwarded; `bpack` holds B packed (by `pack_b_into`, from these values).
        unsafe { gemm_packed_b(path, m, k, n, alpha, a, bpack, beta, c, parts, ep) }
    });
    if done.is_some() {
        return;
    }
    with_scratch(&B_BUF, packed_len(k, n), |bpack| {
        let out = Shared(bpack.as_mut_ptr());
        // SAFETY: B is k × n (caller); parts pack disjoint panels.
        let pack = |panels: Range<usize>| unsafe { pack_b(b, k, n, panels, out) };
        for_panel_runs(parts, n_panels, pack);
        // SAFETY: forwarded; B is packed in `bpack`.
        unsafe { gemm_packed_b(path, m, k, n, alpha, a, bpack, beta, c, parts, ep) };
    });
}

/// Which operand of a product a rounded copy is of: each has a buffer of its own
/// ([`with_rounded`]).
#[derive(Clone, Copy, Debug)]
pub(super) enum Operand {
    A,
    B,
}

/// `f(copy)`: a copy of the `rows × cols` matrix `x` with every value rounded to bf16 (as
/// [`round_bf16`]), the emulated path's operands. The copy is laid out as `x` is where its
/// rows, or else its columns, are contiguous (so the rounding runs along them, in vectors: a
/// weight's transpose is contiguous by columns), otherwise by rows; it lives in a buffer of
/// this thread's that keeps its memory between calls (no allocation, no zeroing).
///
/// # Safety
/// `x` addresses a `rows × cols` matrix.
pub(super) unsafe fn with_rounded<R>(
    which: Operand,
    x: Mat,
    rows: usize,
    cols: usize,
    f: impl FnOnce(Mat) -> R,
) -> R {
    let key = match which {
        Operand::A => &ROUND_A,
        Operand::B => &ROUND_B,
    };
    let by_columns = x.cs != 1 && x.rs == 1;
    // Lines of the copy (rows, or columns), `len` elements each, `step` apart in x.
    let (line_stride, len, step) = if by_columns {
        (x.cs, rows, x.rs)
    } else {
        (x.rs, cols, x.cs)
    };
    with_scratch(key, rows * cols, |out| {
        if len > 0 {
            for (i, line) in out.chunks_exact_mut(len).enumerate() {
                // SAFETY: line i of x is inside it (caller).
                let start = unsafe { x.ptr.offset(i as isize * line_stride) };
                if step == 1 {
                    // SAFETY: the line's `len` elements, contiguous.
                    round_run(unsafe { std::slice::from_raw_parts(start, len) }, line);
                } else {
                    for (j, r) in line.iter_mut().enumerate() {
                        // SAFETY: element j of the line is inside x.
                        *r = round_bf16(unsafe { *start.offset(j as isize * step) });
                    }
                }
            }
        }
        let (rs, cs) = if by_columns {
            (1, rows as isize)
        } else {
            (cols as isize, 1)
        };
        f(Mat {
            ptr: out.as_ptr(),
            rs,
            cs,
        })
    })
}

/// `dst ← src` each rounded as [`round_bf16`] (the same bits), with selects in place of its
/// branches so that the loop runs in vectors: the emulated path rounds every A it multiplies.
fn round_run(src: &[f32], dst: &mut [f32]) {
    crate::kernels::simd::widest!({
        for (d, &s) in dst.iter_mut().zip(src) {
            let b = s.to_bits();
            let magnitude = b & 0x7fff_ffff;
            let nearest = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
            let bits = if magnitude > 0x7f80_0000 {
                (b | 0x0040_0000) & 0xffff_0000 // NaN, quiet
            } else if magnitude < 0x0080_0000 {
                b & 0x8000_0000 // zero or denormal: a zero of its sign
            } else {
                nearest
            };
            *d = f32::from_bits(bits);
        }
    })
}

/// All of B (`k × n`) packed for the vector bf16 paths, on up to `parts` threads.
///
/// # Safety
/// `b` addresses a `k × n` matrix.
pub(super) unsafe fn pack_b_all(k: usize, n: usize, b: Mat, parts: usize) -> Aligned<u16> {
    let mut out = Aligned::zeroed(packed_len(k, n));
    // SAFETY: forwarded; `out` holds packed_len(k, n) elements.
    unsafe { pack_b_into(k, n, b, parts, &mut out) };
    out
}

/// [`pack_b_all`] into `out`, which holds [`packed_len`]`(k, n)` elements (every one of which
/// is written).
///
/// # Safety
/// `b` addresses a `k × n` matrix.
///
/// # Panics
/// If `out` has another length.
pub(super) unsafe fn pack_b_into(k: usize, n: usize, b: Mat, parts: usize, out: &mut [u16]) {
    assert_eq!(
        out.len(),
        packed_len(k, n),
        "pack_b_into: a buffer for another shape"
    );
    let n_panels = n.div_ceil(NR);
    let shared = Shared(out.as_mut_ptr());
    // SAFETY: B is k × n (caller); runs pack disjoint panels of `out`.
    for_panel_runs(parts, n_panels, |panels| unsafe {
        pack_b(b, k, n, panels, shared)
    });
}

/// [`gemm`] with B packed by [`pack_b_all`] (a vector path, not `Emulated`).
///
/// # Safety
/// As [`gemm`], and `bpack` holds B `k × n` packed.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_packed_b(
    path: Bf16Path,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat,
    bpack: &[u16],
    beta: f32,
    c: MatMut,
    parts: usize,
    ep: Epilogue,
) {
    debug_assert!(path != Bf16Path::Emulated && bpack.len() >= packed_len(k, n));
    if m == 0 || n == 0 {
        return;
    }
    for_tile_runs(parts, m, path.mr(), n.div_ceil(NR), false, 0, |rows, panels| {
        // SAFETY: forwarded; parts get disjoint tiles of C.
        unsafe { run_part(path, k, n, alpha, a, bpack, beta, c, rows, panels, ep) }
    });
}

/// The tiles of rows `rows` and column panels `panels`, on the calling thread.
///
/// # Safety
/// As [`gemm_packed_b`]; no other thread writes these tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn run_part(
    path: Bf16Path,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat,
    bpack: &[u16],
    beta: f32,
    c: MatMut,
    rows: Range<usize>,
    panels: Range<usize>,
    ep: Epilogue,
) {
    if rows.is_empty() || panels.is_empty() {
        return;
    }
    let mr = path.mr();
    let n_pad = n.div_ceil(NR) * NR;
    let mc_max = mc_panels(mr) * mr;
    let prefetch = prefetch_c(rows.len());
    #[cfg(target_arch = "x86_64")]
    if path == Bf16Path::Amx {
        // SAFETY: the path is AMX, so the CPU and the process have it.
        unsafe { amx_begin() };
    }
    #[cfg(target_arch = "x86_64")]
    let mut held = Held::new();
    // A's rows summed by the part that holds the first panel of columns (parts cut by
    // columns all pack the same rows).
    let sums = ep.a_sums.filter(|_| panels.start == 0);
    with_scratch(&A_BUF, mc_max * KC, |apack| {
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let kp = padded(kc);
            for i0 in rows.clone().step_by(mc_max) {
                let mc = mc_max.min(rows.end - i0);
                // SAFETY: the block is inside A, its rows inside the sums (caller).
                unsafe { pack_a(a, i0, mc, p0, kc, mr, apack, sums) };
                for jp in panels.clone() {
                    let j0 = jp * NR;
                    let bp = bpack[p0 * n_pad + jp * kp * NR..].as_ptr();
                    // SAFETY: j0 < n.
                    let update = unsafe { block_update(p0, &ep, alpha, beta, j0) };
                    for ip in 0..mc.div_ceil(mr) {
                        let r0 = i0 + ip * mr;
                        let t = tile(
                            c,
                            mr.min(i0 + mc - r0),
                            NR.min(n - j0),
                            update,
                            ep,
                            r0,
                            j0,
                            n,
                            p0 + kc == k,
                            prefetch,
                        );
                        let ap = apack[ip * mr * kp..].as_ptr();
                        // SAFETY: the panels hold kp·mr and kp·32 elements; the tile is in C;
                        // the path runs here (AMX configured above).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            match path {
                                Bf16Path::Amx if t.rows <= 16 => {
                                    kernel_amx::<false, true>(kp, ap, bp, &t, &mut held)
                                }
                                Bf16Path::Amx if STREAM_A_KP.contains(&kp) => {
                                    kernel_amx::<true, false>(kp, ap, bp, &t, &mut held)
                                }
                                Bf16Path::Amx => kernel_amx::<false, false>(kp, ap, bp, &t, &mut held),
                                _ => kernel_avx512bf16(kp, ap, bp, &t),
                            }
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (ap, bp, t);
                    }
                }
            }
            // The next block of k reads every tile of C again: the held one goes in first.
            // SAFETY: a tile is held only on the AMX path, whose CPU has AVX-512F; it is this
            // part's, inside C.
            #[cfg(target_arch = "x86_64")]
            if path == Bf16Path::Amx {
                unsafe { held.flush() };
            }
        }
    });
    #[cfg(target_arch = "x86_64")]
    if path == Bf16Path::Amx {
        // SAFETY: as above.
        unsafe { amx_end() };
    }
}

/// A result flushed to zero if denormal, as `vdpbf16ps` does.
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() { 0.0f32.copysign(x) } else { x }
}

/// The naive twin of the bf16 GEMM: the AVX512-BF16 path's arithmetic in three loops
/// (see the module docs for the order), for tests. Without an epilogue; β = 0 does not read C.
///
/// # Panics
/// If the shapes do not chain.
pub fn gemm_bf16_naive(
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    mut c: ArrayViewMut2<f32>,
) {
    super::check_shapes(a.dim(), b.dim(), c.dim());
    let k = a.ncols();
    for i in 0..a.nrows() {
        for j in 0..b.ncols() {
            let mut v = c[[i, j]];
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                let mut s = 0.0f32;
                for q in 0..kc.div_ceil(2) {
                    let (e, o) = (p0 + 2 * q, p0 + 2 * q + 1);
                    if o < p0 + kc {
                        s = ftz(s + round_bf16(a[[i, o]]) * round_bf16(b[[o, j]]));
                    } else {
                        s = ftz(s + 0.0);
                    }
                    s = ftz(s + round_bf16(a[[i, e]]) * round_bf16(b[[e, j]]));
                }
                v = match p0 {
                    0 if beta == 0.0 => alpha * s,
                    0 => s.mul_add(alpha, beta * v),
                    _ => s.mul_add(alpha, v),
                };
            }
            if k == 0 {
                v = if beta == 0.0 { 0.0 } else { beta * v };
            }
            c[[i, j]] = v;
        }
    }
}

/// `C ← α·A·B + β·C` in bf16 on `path`, on up to `parts` threads: every path of the bf16
/// GEMM on its own, for tests and benchmarks.
///
/// # Panics
/// If the shapes do not chain, or this process does not run `path`.
pub fn gemm_bf16_with(
    path: Bf16Path,
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    mut c: ArrayViewMut2<f32>,
    parts: usize,
) {
    super::check_shapes(a.dim(), b.dim(), c.dim());
    assert!(
        Bf16Path::available().contains(&path),
        "gemm_bf16_with: this process does not run {path:?}"
    );
    let (m, k) = a.dim();
    let n = b.ncols();
    let (ma, mb, mc) = (Mat::of(&a), Mat::of(&b), MatMut::of(&mut c));
    // SAFETY: the views address their own elements, C is exclusive, the shapes chain and the
    // process runs `path` (both checked above).
    unsafe { gemm(path, m, k, n, alpha, ma, mb, beta, mc, parts, Epilogue::default()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // Halfway between 0x3f80 and 0x3f81: to the even one.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "rounds up to infinity");
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert!(bf16_to_f32(to_bf16(f32::NAN)).is_nan());
        // A NaN whose payload sits only in the low bits must not become an infinity.
        assert!(bf16_to_f32(to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
        assert_eq!(round_bf16(3.140625), 3.140625);
        // Denormals become zeros of their sign, as the hardware conversion gives them.
        assert_eq!(to_bf16(f32::from_bits(0x007f_ffff)), 0x0000);
        assert_eq!(to_bf16(f32::from_bits(0x8001_8000)), 0x8000);
        assert_eq!(to_bf16(f32::MIN_POSITIVE), 0x0080, "the smallest normal stays");
    }

    /// The packing's vector conversions (`vcvtne2ps2bf16`) give [`to_bf16`]'s bits on ties,
    /// NaN, infinities, overflow, denormals, zeros of both signs and random values.
    /// The emulated path's rounding of whole rows (in vectors, with selects) against
    /// [`round_bf16`], bit for bit: ties, NaNs, infinities, denormals, signed zeros, values that
    /// round up to infinity, and random bit patterns; rows contiguous and strided.
    #[test]
    fn rounding_rows_matches_round_bf16() {
        let mut values: Vec<f32> = [
            0x0000_0000u32,
            0x8000_0000,
            0x0000_0001,
            0x807f_ffff,
            0x0080_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x7f7f_ffff,
            0xff7f_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xffc1_2345,
            0x7fbf_ffff,
        ]
        .into_iter()
        .map(f32::from_bits)
        .collect();
        let mut state = 0x9e37_79b9u32;
        values.extend((0..1000).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f32::from_bits(state)
        }));
        let cols = 31;
        values.truncate(values.len() / cols * cols);
        let rows = values.len() / cols;
        let x = Array2::from_shape_vec((rows, cols), values).unwrap();
        let want: Vec<u32> = x.iter().map(|&v| round_bf16(v).to_bits()).collect();
        let by_columns = x.t().as_standard_layout().into_owned();
        let odd = x.slice(ndarray::s![.., ..;2]).to_owned();
        let want_odd: Vec<u32> = odd.iter().map(|&v| round_bf16(v).to_bits()).collect();
        let cases = [
            (x.view(), &want),
            (by_columns.t(), &want),
            (x.slice(ndarray::s![.., ..;2]), &want_odd),
        ];
        for (view, want) in cases {
            let (r, c) = view.dim();
            // SAFETY: the view addresses its own r × c elements; the copy is r × c.
            let got: Vec<u32> = unsafe {
                with_rounded(Operand::A, Mat::of(&view), r, c, |copy| {
                    (0..r * c)
                        .map(|e| {
                            (*copy
                                .ptr
                                .offset((e / c) as isize * copy.rs + (e % c) as isize * copy.cs))
                            .to_bits()
                        })
                        .collect()
                })
            };
            assert_eq!(&got, want, "strides {:?}", view.strides());
        }
    }

    #[test]
    fn vector_conversions_match_to_bf16() {
        if !avx512bf16() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut values = vec![
            1.0,
            -2.5,
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            3.140625,
        ];
        for bits in [
            0x3f80_8000u32,
            0x3f81_8000,
            0x3f80_8001,
            0x7f80_0001,
            0xff81_2345,
            0x007f_ffff,
            0x8001_8000,
            0x0000_0001,
            0x7f7f_ffff,
        ] {
            values.push(f32::from_bits(bits));
        }
        let mut h = 0x9e37_79b9_7f4a_7c15u64;
        while values.len() < 32 * 64 {
            h = h
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            values.push(f32::from_bits((h >> 32) as u32));
        }
        for run in values.chunks_exact(32) {
            let want: Vec<u16> = run.iter().map(|&x| to_bf16(x)).collect();
            let mut got = [0u16; 32];
            let mut pairs = [0u16; 32];
            // SAFETY: the CPU has AVX-512F, BW and BF16 (checked); 32 floats in `run`, 32 u16
            // in each output.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_si512(got.as_mut_ptr() as *mut __m512i, vec::convert32(run.as_ptr()));
                let v = vec::pairs(
                    _mm512_loadu_ps(run.as_ptr()),
                    _mm512_loadu_ps(run.as_ptr().add(16)),
                );
                _mm512_storeu_si512(pairs.as_mut_ptr() as *mut __m512i, v);
            }
            assert_eq!(&got[..], &want[..]);
            for i in 0..16 {
                assert_eq!(
                    (pairs[2 * i], pairs[2 * i + 1]),
                    (want[i], want[16 + i]),
                    "pair {i}"
                );
            }
        }
        // The slice conversion, with a tail past the last 16.
        for n in [0, 5, 16, 37, values.len()] {
            let want: Vec<u16> = values[..n].iter().map(|&x| to_bf16(x)).collect();
            let mut got = vec![0u16; n];
            to_bf16_slice(&values[..n], &mut got);
            assert_eq!(got, want, "{n} values");
        }
    }

    fn data(rows: usize, cols: usize, seed: u32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let h = crate::kernels::dropout::draw(seed as u64, (i * 7919 + j) as u32);
            (h as f32 / u32::MAX as f32 - 0.5) * 4.0
        })
    }

    /// Whether `got` is within the accumulation-order tolerance of `want`: a few units in the
    /// last place of `mag`, the sum of the magnitudes of what each element adds up.
    fn close(got: &Array2<f32>, want: &Array2<f32>, mag: &Array2<f32>, what: &str) {
        for ((idx, &g), &w) in got.indexed_iter().zip(want.iter()) {
            let tol = 4.0 * f32::EPSILON * (mag[idx] + w.abs());
            assert!(
                (g - w).abs() <= tol,
                "{what} {idx:?}: {g} vs {w} (tolerance {tol})"
            );
        }
    }

    #[test]
    fn every_path_against_its_naive_twin() {
        // Odd sizes, k across a block of KC and not a whole chunk, transposed operands; whole
        // 32 × 32 tiles one after another (AMX holds each until the next: `Held`), across a
        // block of KC too, the second block one whose A streams past B (`STREAM_A_KP`); every
        // count of rows below a tile of eight (which AVX512-BF16 computes alone).
        for &(m, k, n) in &[
            (2, 100, 70),
            (3, 40, 33),
            (4, 64, 40),
            (7, 200, 50),
            (37, 1100, 45),
            (96, 1100, 64),
            (96, 1500, 64),
            (128, 64, 96),
            (64, 64, 64),
            (5, 3, 70),
            (70, 512, 33),
            (24, 96, 40),
            (1, 1, 1),
        ] {
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if at {
                    data(k, m, 1).reversed_axes()
                } else {
                    data(m, k, 1)
                };
                let b = if bt {
                    data(n, k, 2).reversed_axes()
                } else {
                    data(k, n, 2)
                };
                let c0 = data(m, n, 3);
                for (alpha, beta) in [(1.0, 0.0), (0.5, 2.0)] {
                    let mut want = c0.clone();
                    gemm_bf16_naive(alpha, a.view(), b.view(), beta, want.view_mut());
                    for path in Bf16Path::available() {
                        for parts in [1, 2] {
                            let mut got = c0.clone();
                            gemm_bf16_with(path, alpha, a.view(), b.view(), beta, got.view_mut(), parts);
                            let what = format!("{path:?} {m}x{k}x{n} {at} {bt} {alpha} {beta} {parts}");
                            if path == Bf16Path::Avx512Bf16 {
                                assert_eq!(got, want, "{what}");
                            } else {
                                let mag = alpha
                                    * a.mapv(|x| round_bf16(x).abs())
                                        .dot(&b.mapv(|x| round_bf16(x).abs()))
                                    + beta * c0.mapv(f32::abs);
                                close(&got, &want, &mag, &what);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_with_a_bias_or_a_relu_against_the_naive_twin() {
        // Whole 32 × 32 tiles (which AMX starts from the bias: `direct_update`) and edge tiles,
        // with and without a ReLU (which goes through the vector stores).
        use crate::kernels::precision::{Precision, with_precision};
        for &(m, k, n) in &[(64, 96, 64), (70, 40, 45), (96, 1100, 64)] {
            let (a, b) = (data(m, k, 4), data(k, n, 5));
            let bias = data(1, n, 6).row(0).to_owned();
            for relu in [false, true] {
                let mut want = Array2::zeros((m, n));
                gemm_bf16_naive(1.0, a.view(), b.view(), 0.0, want.view_mut());
                // The naive twin's sum, then the bias added once, as the vector stores do.
                want += &bias;
                if relu {
                    want.mapv_inplace(|x| x.max(0.0));
                }
                let mut got = Array2::from_elem((m, n), f32::NAN);
                with_precision(Precision::Bf16, || {
                    crate::kernels::gemm_bias(a.view(), b.view(), Some(bias.view()), relu, got.view_mut())
                });
                let mag = a
                    .mapv(|x| round_bf16(x).abs())
                    .dot(&b.mapv(|x| round_bf16(x).abs()))
                    + bias.mapv(f32::abs);
                close(
                    &got,
                    &want,
                    &mag,
                    &format!("{:?} {m}x{k}x{n} relu {relu}", Bf16Path::best()),
                );
            }
        }
    }

    #[test]
    fn any_thread_count_gives_the_same_bits() {
        let (a, b) = (data(300, 700, 4), data(700, 200, 5));
        for path in Bf16Path::available() {
            let mut one = Array2::zeros((300, 200));
            gemm_bf16_with(path, 1.0, a.view(), b.view(), 0.0, one.view_mut(), 1);
            for parts in [2, 3] {
                let mut many = Array2::from_elem((300, 200), f32::NAN);
                crate::kernels::parallel::with_team(|| {
                    gemm_bf16_with(path, 1.0, a.view(), b.view(), 0.0, many.view_mut(), parts)
                });
                assert_eq!(one, many, "{path:?} on {parts} parts");
            }
        }
    }

    #[test]
    fn paths_say_what_runs() {
        let all = Bf16Path::available();
        assert_eq!(all[0], Bf16Path::best());
        assert_eq!(*all.last().unwrap(), Bf16Path::Emulated);
        for path in [Bf16Path::Amx, Bf16Path::Avx512Bf16] {
            if !all.contains(&path) {
                eprintln!("skipped: this machine cannot run the {path:?} path");
            }
        }
    }
}
