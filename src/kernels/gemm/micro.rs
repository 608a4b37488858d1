//! The x86-64 micro-kernels of the packed GEMM: one `MR × NR` tile of C from an `MR`-row panel
//! of packed A and an `NR`-column panel of packed B (see [`super::packed`] for the layouts).
//!
//! - AVX-512: `MR × 32` (MR = 8 or 12), two 16-lane vectors of B per step of k and one broadcast
//!   of A per row, `2·MR` accumulators in registers.
//! - AVX2 + FMA: `6 × 16`, two 8-lane vectors of B, 12 accumulators.
//!
//! Every element of the tile is one register lane that accumulates its products in order of k
//! with fused multiply-adds, so its value does not depend on where the tile lies in C, on the
//! block sizes around it or on the thread that runs it. [`Update`] is applied the same way
//! by the vector stores and by the scalar path for edge tiles and strided C.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use crate::kernels::simd::first_lanes;

/// Where one tile goes and how it is combined with what is there.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    /// Element `[0, 0]` of the tile in C.
    pub c: *mut f32,
    /// Row stride of C.
    pub rsc: isize,
    /// Column stride of C.
    pub csc: isize,
    /// Rows of the tile that lie inside C (at most MR).
    pub rows: usize,
    /// Columns of the tile that lie inside C (at most NR).
    pub cols: usize,
    /// How the product is combined with C.
    pub update: Update,
    /// Whether `max(·, 0)` follows the update (ReLU, on the last block of k).
    pub relu: bool,
    /// Dropout after that, by key (on the last block of k).
    pub drop: Option<TileDrop>,
    /// A gate after that (on the last block of k).
    pub gate: Option<TileGate>,
    /// Whether the kernel asks for the lines of C and of the gate while it multiplies
    /// ([`TileLines`]): set for products of many rows, whose C does not stay in cache.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels
    pub prefetch: bool,
}

/// Dropout of a tile's elements: element (r, j) of the tile is multiplied by 0 or `scale` as
/// `draw(key, index0 + r·ld + j)` is below `threshold` or not (the flat index of the element
/// in C, whose rows are `ld` long).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileDrop {
    pub key: u64,
    pub threshold: u32,
    pub scale: f32,
    pub index0: usize,
    pub ld: usize,
}

/// A gate on a tile's elements: element (r, j) becomes `v · scale` where `g(r, j) > 0` and 0
/// elsewhere, with `g(r, j)` at `ptr + r·rs + j·cs` (the ReLU backward through an activation,
/// times the dropout scale).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileGate {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
    pub scale: f32,
}

impl Tile {
    /// What follows the update for element (r, j), in scalar arithmetic: dropout then gate.
    ///
    /// # Safety
    /// With a gate, its element (r, j) must be readable.
    #[inline(always)]
    pub(crate) unsafe fn post(&self, v: f32, r: usize, j: usize) -> f32 {
        let mut v = v;
        if let Some(d) = self.drop {
            let keep = crate::kernels::dropout::draw(d.key, (d.index0 + r * d.ld + j) as u32) >= d.threshold;
            v *= if keep { d.scale } else { 0.0 };
        }
        if let Some(g) = self.gate {
            // SAFETY: the caller vouches for the gate element.
            let gv = unsafe { *g.ptr.offset(r as isize * g.rs + j as isize * g.cs) };
            v = if gv > 0.0 { v * g.scale } else { 0.0 };
        }
        v
    }

    /// The part of this tile from its row `r` on (no rows if r ≥ rows): a tile of `MR` rows
    /// stored as several of fewer.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) fn below(&self, r: usize) -> Tile {
        Tile {
            c: self.c.wrapping_offset(r as isize * self.rsc),
            rows: self.rows.saturating_sub(r),
            drop: self.drop.map(|d| TileDrop {
                index0: d.index0 + r * d.ld,
                ..d
            }),
            gate: self.gate.map(|g| TileGate {
                ptr: g.ptr.wrapping_offset(r as isize * g.rs),
                ..g
            }),
            ..*self
        }
    }

    /// Whether the vector stores can apply everything (gates must have unit column stride).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn vector_post(&self) -> bool {
        self.gate.is_none_or(|g| g.cs == 1)
    }
}

/// How a tile's product `acc` (over one block of k) meets C.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Update {
    /// `C ← α·acc`: C is only written (the first block of k when β = 0).
    Set { alpha: f32 },
    /// `C ← α·acc + β·C`, one rounding for the sum (the first block of k).
    Scale { alpha: f32, beta: f32 },
    /// `C ← α·acc + C`, one rounding (every later block of k).
    Add { alpha: f32 },
    /// `C ← α·acc + bias`, one rounding, with `bias` pointing at the bias of the tile's first
    /// column (the first block of k of a product with a bias).
    Bias { alpha: f32, bias: *const f32 },
}

impl Update {
    /// The scalar form for column `j` of the tile, bit for bit what the vector stores compute.
    ///
    /// # Safety
    /// For `Bias`, the bias of column j must be readable.
    #[inline(always)]
    pub unsafe fn apply(self, acc: f32, c: f32, j: usize, relu: bool) -> f32 {
        let v = match self {
            Update::Set { alpha } => alpha * acc,
            Update::Scale { alpha, beta } => acc.mul_add(alpha, beta * c),
            Update::Add { alpha } => acc.mul_add(alpha, c),
            // SAFETY: the caller vouches for the bias of column j.
            Update::Bias { alpha, bias } => acc.mul_add(alpha, unsafe { *bias.add(j) }),
        };
        // As `Activation::Relu` and the vector stores: NaN stays NaN, −0 gives +0.
        if relu && !(v > 0.0 || v.is_nan()) { 0.0 } else { v }
    }

    /// Whether C is read.
    fn reads_c(self) -> bool {
        matches!(self, Update::Scale { .. } | Update::Add { .. })
    }
}

/// Writes a tile held in `acc` (row-major, `nr` per row) through the scalar [`Update`].
///
/// # Safety
/// `t` must describe `t.rows × t.cols` writable elements of C (readable too unless the update
/// is `Set`).
#[inline(always)]
unsafe fn store_scalar(acc: &[f32], nr: usize, t: &Tile) {
    for r in 0..t.rows {
        for j in 0..t.cols {
            // SAFETY: (r, j) is inside the tile, which the caller vouches for.
            unsafe {
                let p = t.c.offset(r as isize * t.rsc + j as isize * t.csc);
                let old = if t.update.reads_c() { *p } else { 0.0 };
                *p = t.post(t.update.apply(acc[r * nr + j], old, j, t.relu), r, j);
            }
        }
    }
}

/// The lines of a tile's C and of its gate (those with unit column stride) that the stores at
/// the end of a kernel read or write, asked for row by row while the kernel multiplies, unless
/// the tile says not to. A product of many rows streams C through memory: a weight's gradient
/// that it adds to was zeroed long before, the output of a forward product was last written a
/// layer ago, and without being asked for early each line of C kept the stores waiting for
/// memory. Decoding steps' few rows keep C in cache; their tiles do not ask (memory's bandwidth
/// goes to the weights they stream). Measured against no prefetch (Intel Xeon, interleaved
/// runs of `bench`): base bf16 training step 720–748 → 638–642 ms on one thread, base `f32`
/// eval forward 409–434 → 404–414 ms, base `f32` step on two threads 815–827 → 791–801 ms;
/// small and tiny unchanged within the machine's spread.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct TileLines {
    c: *const i8,
    rsc: isize,
    c_rows: usize,
    gate: *const i8,
    rsg: isize,
    gate_rows: usize,
    /// Bytes of a row (the tile's columns).
    bytes: usize,
}

#[cfg(target_arch = "x86_64")]
impl TileLines {
    #[inline(always)]
    pub(crate) fn of(t: &Tile) -> TileLines {
        let on = |yes: bool| if yes && t.prefetch { t.rows } else { 0 };
        let gate = t.gate.filter(|g| g.cs == 1);
        TileLines {
            c: t.c as *const i8,
            rsc: 4 * t.rsc,
            c_rows: on(t.csc == 1),
            gate: gate.map_or(std::ptr::null(), |g| g.ptr as *const i8),
            rsg: gate.map_or(0, |g| 4 * g.rs),
            gate_rows: on(gate.is_some()),
            bytes: 4 * t.cols,
        }
    }

    /// Asks for row `r`'s lines (nothing past the tile's rows).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) fn ask(&self, r: usize) {
        if r < self.c_rows {
            ask_row(self.c.wrapping_offset(r as isize * self.rsc), self.bytes);
        }
        if r < self.gate_rows {
            ask_row(self.gate.wrapping_offset(r as isize * self.rsg), self.bytes);
        }
    }
}

/// Asks for the lines of a row of `bytes` bytes at `p` (`bytes > 0`), the last element's
/// included, which an unaligned row reaches into.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn ask_row(p: *const i8, bytes: usize) {
    let mut at = 0;
    while at < bytes {
        // SAFETY: a prefetch does not fault; the address is not dereferenced.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at)) };
        at += 64;
    }
    // SAFETY: as above.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(bytes - 1)) };
}

/// Steps of k between the rows of C the vector kernels ask for ([`TileLines`]): spread over
/// the loop rather than asked for all at once beside B. Each measured against the kernels
/// without the prefetch, in runs not interleaved with each other (Intel Xeon, base `f32`
/// training step on two threads): all at once 786/830 → 841/844 ms, spread 815–827 →
/// 791–801 ms.
#[cfg(target_arch = "x86_64")]
const C_ROW_STEPS: usize = 8;

/// How far ahead (in floats) the AVX-512 kernel prefetches B: 32 steps of k, 4 KiB. Where B
/// streams from memory (a decoding step's few rows against every weight) the loads must be
/// asked for well ahead; the hardware's stream prefetcher does not cross 4 KiB pages. Measured
/// against 8 steps (Intel Xeon): base greedy decode 975 → 821–864 ms on one thread, 490 →
/// 403–427 ms on two; eval and training steps equal or a few percent faster.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 32 * 32;

/// How far ahead (in floats) the AVX-512 kernel asks for B into L2 on the first row panel of
/// a block (`FAR`): 64 steps of k, 8 KiB. That panel is the first to read the block of B,
/// from L3 or memory; the panels after it find the block in L2 and skip this. Asked into L1
/// alone, a stream holds no more lines in flight than L1 has fill buffers: a decoding step of
/// `base` (8 rows, so one row panel) reads every weight from beyond L2 at that pace. With
/// this (Intel Xeon, interleaved `bench` runs): base greedy decode 995–1002 → 806–829 ms on
/// one thread, 422–448 → 363–372 ms on two; small decode, eval and training steps no
/// different (16 KiB and 32 KiB ahead measured alike).
#[cfg(target_arch = "x86_64")]
const PREFETCH_L2: usize = 64 * 32;

/// The lines of the next block of packed B that one tile of the AVX-512 kernel asks for into
/// L2 (`NEXT`): `per` lines a step (1 or 2) for the first `steps` steps of k, from `start`.
/// The AVX2 kernels' counterpart is [`Far::spread`], one line every step (a line asked for
/// again over `2^shift` steps), whose pace was measured on an AMD EPYC Zen 3 for its one or
/// two passes; here the shares cover the whole block for any count of passes.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernel alone
pub(crate) struct Ahead {
    start: *const f32,
    steps: usize,
    per: usize,
}

impl Ahead {
    /// Nothing asked for.
    pub(crate) const NONE: Ahead = Ahead {
        start: std::ptr::null(),
        steps: 0,
        per: 1,
    };

    /// Share `share` of `shares` of the `len` floats at `next`, for a tile of `kc` steps:
    /// the shares split the block's lines evenly, each asked for at the start of its tile.
    pub(crate) fn share(next: *const f32, len: usize, share: usize, shares: usize, kc: usize) -> Ahead {
        let lines = len.div_ceil(16);
        let mine = lines.div_ceil(shares.max(1));
        let first = share * mine;
        if first >= lines || kc == 0 {
            return Ahead::NONE;
        }
        let mine = mine.min(lines - first);
        let per = mine.div_ceil(kc).clamp(1, 2);
        Ahead {
            start: next.wrapping_add(16 * first),
            steps: mine.div_ceil(per).min(kc),
            per,
        }
    }
}

/// The AVX-512 kernel: `MR × 32`; `FAR` on the first row panel of a block of B (see
/// [`PREFETCH_L2`]); `NEXT` on the later row panels of a few, asking for a share of the next
/// block of B into L2 ([`Ahead`]).
///
/// # Safety
/// The CPU must have AVX-512F. `a` must hold `kc·MR` floats and `b` `kc·32` floats, and `t`
/// must describe a tile of C as [`store_scalar`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn kernel_avx512<const MR: usize, const FAR: bool, const NEXT: bool>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    t: &Tile,
    next: Ahead,
) {
    // SAFETY: forwarded from this function's contract (A packed).
    unsafe { kernel_avx512_at::<MR, false, FAR, NEXT, true>(kc, a, 0, b, t, next) }
}

/// The AVX-512 kernel reading `t.rows` (1 to 12) of A's rows where they lie, `lda` apart
/// (row r's element i at `a + r·lda + i`), nothing packed; `far` on the first row panel of a
/// block of B, as [`kernel_avx512`]'s `FAR`; `ask`: B asked for ahead of its loads at all
/// (`false`: left to the hardware's prefetch, `far` then ignored). Each element's chain of
/// multiply-adds is the packed kernel's, so the bits are too.
///
/// # Safety
/// The CPU must have AVX-512F; that many rows of `kc` floats at `a`, `lda` apart, readable;
/// `b` must hold `kc·32` floats, and `t` must describe a tile of C as [`store_scalar`]
/// requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn kernel_avx512_rows(
    far: bool,
    ask: bool,
    kc: usize,
    a: *const f32,
    lda: isize,
    b: *const f32,
    t: &Tile,
) {
    macro_rules! rows {
        ($($r:literal)*) => {
            match (t.rows, far, ask) {
                $(
                    ($r, _, false) => kernel_avx512_at::<$r, true, false, false, false>(kc, a, lda, b, t, Ahead::NONE),
                    ($r, true, true) => kernel_avx512_at::<$r, true, true, false, true>(kc, a, lda, b, t, Ahead::NONE),
                    ($r, false, true) => kernel_avx512_at::<$r, true, false, false, true>(kc, a, lda, b, t, Ahead::NONE),
                )*
                (rows, _, _) => panic!("an AVX-512 tile of {rows} rows (1 to 12)"),
            }
        };
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { rows!(12 11 10 9 8 7 6 5 4 3 2 1) }
}

/// [`kernel_avx512`] over A packed (`ROWS` false: step i's MR floats at `a + MR·i`) or over
/// `MR` of A's rows where they lie (`ROWS`: row r's element i at `a + r·lda + i`).
///
/// # Safety
/// As [`kernel_avx512`], resp. [`kernel_avx512_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn kernel_avx512_at<
    const MR: usize,
    const ROWS: bool,
    const FAR: bool,
    const NEXT: bool,
    const ASK: bool,
>(
    kc: usize,
    a: *const f32,
    lda: isize,
    b: *const f32,
    t: &Tile,
    next: Ahead,
) {
    let mut lo = [_mm512_setzero_ps(); MR];
    let mut hi = [_mm512_setzero_ps(); MR];
    let rows: [*const f32; MR] = std::array::from_fn(|r| a.wrapping_offset(r as isize * lda));
    let (mut a, mut b) = (a, b);
    // C's rows are asked for one every few steps of k, not all at once beside B.
    let lines = TileLines::of(t);
    for i in 0..kc {
        if i % C_ROW_STEPS == 0 {
            lines.ask(i / C_ROW_STEPS);
        }
        // SAFETY: A has MR and b has 32 floats left for each remaining step of k.
        unsafe {
            // B streams through once per row panel of A: ask for it a few steps ahead.
            if ASK {
                _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH + 16) as *const i8);
            }
            if FAR {
                _mm_prefetch::<_MM_HINT_T1>(b.add(PREFETCH_L2) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(b.add(PREFETCH_L2 + 16) as *const i8);
            }
            if NEXT && i < next.steps {
                let line = next.start.wrapping_add(16 * next.per * i);
                _mm_prefetch::<_MM_HINT_T1>(line as *const i8);
                if next.per > 1 {
                    _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(16) as *const i8);
                }
            }
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for r in 0..MR {
                let ar = _mm512_set1_ps(*if ROWS { rows[r].add(i) } else { a.add(r) });
                lo[r] = _mm512_fmadd_ps(ar, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(ar, b1, hi[r]);
            }
            if !ROWS {
                a = a.add(MR);
            }
            b = b.add(32);
        }
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { store_avx512(&lo, &hi, t) }
}

/// Writes an `MR × 32` tile held in `lo` (columns 0..16) and `hi` (16..32) through its
/// [`Update`] and post-operations: the AVX-512 kernels' stores, shared by the `f32` and the
/// bf16 kernels.
///
/// # Safety
/// The CPU must have AVX-512F; `t` must describe a tile of C as [`store_scalar`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(crate) unsafe fn store_avx512<const MR: usize>(lo: &[__m512; MR], hi: &[__m512; MR], t: &Tile) {
    if t.csc == 1 && t.cols == 32 && t.drop.is_none() && t.gate.is_none() {
        // Whole rows with no dropout or gate: the update chosen once for the tile.
        // SAFETY: forwarded from this function's contract.
        let done = unsafe {
            if t.relu {
                store_whole::<MR, true>(lo, hi, t)
            } else {
                store_whole::<MR, false>(lo, hi, t)
            }
        };
        if done {
            return;
        }
    }
    if t.csc == 1 && t.cols == 32 && t.vector_post() {
        for r in 0..MR {
            if r >= t.rows {
                break;
            }
            // SAFETY: row r < rows and its 32 columns are inside C (csc = 1).
            unsafe {
                store512(t, r, 0, lo[r], 0xffff);
                store512(t, r, 16, hi[r], 0xffff);
            }
        }
    } else if t.csc == 1 && t.vector_post() {
        let (m0, m1) = (first_lanes(t.cols), first_lanes(t.cols.saturating_sub(16)));
        for r in 0..MR {
            if r >= t.rows {
                break;
            }
            // SAFETY: the masks cover exactly the columns inside C; masked-off lanes are
            // neither read nor written.
            unsafe {
                store512(t, r, 0, lo[r], m0);
                if m1 != 0 {
                    store512(t, r, 16, hi[r], m1);
                }
            }
        }
    } else {
        let mut tile = [[0.0f32; 32]; MR];
        for r in 0..MR {
            // SAFETY: each row of `tile` holds 32 floats.
            unsafe {
                _mm512_storeu_ps(tile[r].as_mut_ptr(), lo[r]);
                _mm512_storeu_ps(tile[r].as_mut_ptr().add(16), hi[r]);
            }
        }
        // SAFETY: `tile` is MR rows of 32; the caller vouches for t.
        unsafe { store_scalar(tile.as_flattened(), 32, t) };
    }
}

/// [`store_avx512`] of a tile of whole rows of 32 columns with no dropout and no gate, its
/// update matched once instead of at every store (a bias loaded once): the same arithmetic as
/// [`store512`]. `false` (nothing written) for [`Update::Scale`], which it leaves to the
/// general path.
///
/// # Safety
/// As [`store_avx512`], with `t.csc == 1` and `t.cols == 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_whole<const MR: usize, const RELU: bool>(
    lo: &[__m512; MR],
    hi: &[__m512; MR],
    t: &Tile,
) -> bool {
    let post = |v: __m512| if RELU { relu16(v) } else { v };
    let rows = MR.min(t.rows);
    // SAFETY (every access): rows r < t.rows of the tile, 32 columns each, are inside C, and
    // the bias holds the tile's 32 columns (caller).
    unsafe {
        let row = |r: usize| t.c.offset(r as isize * t.rsc);
        match t.update {
            Update::Set { alpha } => {
                let a = _mm512_set1_ps(alpha);
                for r in 0..rows {
                    _mm512_storeu_ps(row(r), post(_mm512_mul_ps(lo[r], a)));
                    _mm512_storeu_ps(row(r).add(16), post(_mm512_mul_ps(hi[r], a)));
                }
            }
            Update::Bias { alpha, bias } => {
                let a = _mm512_set1_ps(alpha);
                let (b0, b1) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)));
                for r in 0..rows {
                    _mm512_storeu_ps(row(r), post(_mm512_fmadd_ps(lo[r], a, b0)));
                    _mm512_storeu_ps(row(r).add(16), post(_mm512_fmadd_ps(hi[r], a, b1)));
                }
            }
            Update::Add { alpha } => {
                let a = _mm512_set1_ps(alpha);
                for r in 0..rows {
                    let (p0, p1) = (row(r), row(r).add(16));
                    _mm512_storeu_ps(p0, post(_mm512_fmadd_ps(lo[r], a, _mm512_loadu_ps(p0))));
                    _mm512_storeu_ps(p1, post(_mm512_fmadd_ps(hi[r], a, _mm512_loadu_ps(p1))));
                }
            }
            Update::Scale { .. } => return false,
        }
    }
    true
}

/// One 16-lane store under `mask` of row r's columns `j0..j0 + 16` of the tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store512(t: &Tile, r: usize, j0: usize, acc: __m512, mask: u16) {
    // SAFETY: the caller vouches for the masked lanes of the row (and of the bias and gate).
    unsafe {
        let p = t.c.offset(r as isize * t.rsc + j0 as isize);
        let v = match t.update {
            Update::Set { alpha } => _mm512_mul_ps(acc, _mm512_set1_ps(alpha)),
            Update::Bias { alpha, bias } => {
                let b = _mm512_maskz_loadu_ps(mask, bias.add(j0));
                _mm512_fmadd_ps(acc, _mm512_set1_ps(alpha), b)
            }
            Update::Scale { alpha, beta } => {
                let old = _mm512_maskz_loadu_ps(mask, p);
                _mm512_fmadd_ps(
                    acc,
                    _mm512_set1_ps(alpha),
                    _mm512_mul_ps(old, _mm512_set1_ps(beta)),
                )
            }
            Update::Add { alpha } => {
                let old = _mm512_maskz_loadu_ps(mask, p);
                _mm512_fmadd_ps(acc, _mm512_set1_ps(alpha), old)
            }
        };
        let mut v = if t.relu { relu16(v) } else { v };
        if let Some(d) = t.drop {
            // The 16 flat indices of these elements, hashed as `dropout::draw` does.
            let base = _mm512_set1_epi32((d.index0 + r * d.ld + j0) as u32 as i32);
            let idx = _mm512_add_epi32(
                base,
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            );
            let x =
                crate::kernels::dropout::mix16(_mm512_xor_si512(idx, _mm512_set1_epi32(d.key as u32 as i32)));
            let x = crate::kernels::dropout::mix16(_mm512_xor_si512(
                x,
                _mm512_set1_epi32((d.key >> 32) as u32 as i32),
            ));
            let keep = _mm512_cmpge_epu32_mask(x, _mm512_set1_epi32(d.threshold as i32));
            let factor = _mm512_mask_blend_ps(keep, _mm512_setzero_ps(), _mm512_set1_ps(d.scale));
            v = _mm512_mul_ps(v, factor);
        }
        if let Some(g) = t.gate {
            let gv = _mm512_maskz_loadu_ps(mask, g.ptr.offset(r as isize * g.rs + j0 as isize));
            let open = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(gv, _mm512_setzero_ps());
            v = _mm512_maskz_mul_ps(open, v, _mm512_set1_ps(g.scale));
        }
        _mm512_mask_storeu_ps(p, mask, v);
    }
}

/// `max(v, 0)` on 16 lanes, NaN kept: the ReLU of the stores (max alone gives +0 for −0 and
/// for NaN; NaN is put back).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn relu16(v: __m512) -> __m512 {
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_mov_ps(_mm512_max_ps(v, _mm512_setzero_ps()), nan, v)
}

/// The AVX2 + FMA kernel: `6 × 16`.
///
/// # Safety
/// The CPU must have AVX2 and FMA. `a` must hold `kc·6` floats and `b` `kc·16` floats, and `t`
/// must describe a tile of C as [`store_scalar`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn kernel_avx2(far: bool, kc: usize, a: *const f32, b: *const f32, t: &Tile) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match far {
            true => kernel_avx2_at::<6, false, true, f32>(kc, a, 0, b, t, Far::ahead(b)),
            false => kernel_avx2_at::<6, false, false, f32>(kc, a, 0, b, t, Far::ahead(b)),
        }
    }
}

/// [`kernel_avx2`] reading A's rows where they lie, unpacked: row r of the panel at `a +
/// r·lda`, its `kc` elements contiguous, for `t.rows` (1 to 6) rows. The same broadcasts of the
/// same values in the same order, so the same bits as the packed kernel; the packing of A
/// (transposes of 6 rows into a panel of columns) is left out, and a short panel multiplies
/// only its own rows (a decoding step's 8 rows cost 8 rows' work, not 12). Each row is
/// read along k a line at a time, as the packed panel was. With `far`, step i asks for the line
/// of B at `far.line(i)` into L2 ([`Far`]). The panel of B holds `f32` or bf16 bits
/// ([`PanelOf`]).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `t.rows` must be 1 to 6 and that many rows of `kc` floats
/// at `a`, `lda` apart, readable; `b` must hold `kc·16` elements, and `t` must describe a tile
/// of C as [`store_scalar`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn kernel_avx2_rows<B: PanelOf>(
    far: Option<Far>,
    kc: usize,
    a: *const f32,
    lda: isize,
    b: *const B,
    t: &Tile,
) {
    let ahead = B::ahead(b);
    macro_rules! rows {
        ($($r:literal)*) => {
            match (t.rows, far) {
                $(
                    ($r, Some(far)) => kernel_avx2_at::<$r, true, true, B>(kc, a, lda, b, t, far),
                    ($r, None) => kernel_avx2_at::<$r, true, false, B>(kc, a, lda, b, t, ahead),
                )*
                (rows, _) => panic!("an AVX2 tile of {rows} rows (1 to 6)"),
            }
        };
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { rows!(6 5 4 3 2 1) }
}

/// Steps of k (lines of packed B) the AVX2 kernels ask for ahead of their loads into L1 on a
/// block's first row panel, the one that reads the block of B from L3 or memory.
#[cfg(target_arch = "x86_64")]
const B_AHEAD: usize = 8;
/// Steps of k the AVX2 kernels ask for into L2 on that panel. The panels after it find the
/// block in L2 and ask for nothing: there the hardware's own prefetch keeps up, and the extra
/// instruction a step cost decoding steps' products (B from L3 or memory) 7–13% in
/// interleaved runs (AMD EPYC Zen 3: 8 × 512 × 2048 over 168 MB of weights, best 41.0 / 41.8
/// / 36.8 → 49.0 / 46.0 / 38.5 GFLOP/s; 32 × 256 × 1024 over 42 MB 64.9 / 67.6 / 60.9 →
/// 68.8 / 73.7 / 69.2); products with B in cache alike.
#[cfg(target_arch = "x86_64")]
const B_FAR: usize = 128;

/// The lines of packed B that a loop of the AVX2 kernels asks for into L2, one a step: step i
/// asks for the line at `start + 16·(i >> shift)` floats.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Far {
    start: *const f32,
    shift: u32,
}

#[cfg(target_arch = "x86_64")]
impl Far {
    /// [`B_FAR`] lines ahead of the panel `b` that the loop reads: one stream through a block
    /// of B, asked for by its first row panel.
    pub(crate) fn ahead(b: *const f32) -> Far {
        Far {
            start: b.wrapping_add(16 * B_FAR),
            shift: 0,
        }
    }

    /// Pass `pass` of `passes` over one panel of `kc` steps, each pass a row panel's, asks for
    /// its share of the next panel's `lines` lines, which start at `next`: `kc / 2^s` lines a
    /// pass, one every `2^s` steps, `2^s` the power of two at or above `passes · kc / lines`
    /// (`passes` for a panel of `f32`, a line a step; twice that for one of bf16 bits). The
    /// next panel is on its way from memory while every pass runs, not only the first (the
    /// decoding steps' few rows, where the later passes over a panel in cache had left memory
    /// idle).
    pub(crate) fn spread(next: *const f32, kc: usize, lines: usize, pass: usize, passes: usize) -> Far {
        let shift = (passes * kc)
            .div_ceil(lines.max(1))
            .next_power_of_two()
            .trailing_zeros();
        Far {
            start: next.wrapping_add(16 * pass * (kc >> shift)),
            shift,
        }
    }

    /// What a pass `pass` of `passes` of the kernel reading A's rows in place asks for over the
    /// panel of `kc` steps at `b` (the next panel right after it): with `few` passes, each its
    /// share of the next panel ([`Far::spread`]); otherwise the first pass a stream ahead
    /// through the block ([`PanelOf::ahead`]) and the others nothing.
    pub(crate) fn for_pass<B: PanelOf>(
        b: *const B,
        kc: usize,
        few: bool,
        pass: usize,
        passes: usize,
    ) -> Option<Far> {
        match (few, pass) {
            (true, _) => {
                let lines = kc * 16 * std::mem::size_of::<B>() / 64;
                Some(Far::spread(
                    b.wrapping_add(kc * 16).cast(),
                    kc,
                    lines,
                    pass,
                    passes,
                ))
            }
            (false, 0) => Some(B::ahead(b)),
            (false, _) => None,
        }
    }

    /// The line that step i asks for (an address only: asking never reads memory).
    #[inline(always)]
    fn line(self, i: usize) -> *const i8 {
        self.start.wrapping_add(16 * (i >> self.shift)).cast()
    }
}

/// The AVX2 kernels: A packed (`ROWS` false: step i's 6 floats at `a + 6·i`) or `MR` of A's
/// rows where they lie (`ROWS`: row r's element i at `a + r·lda + i`). `FAR` asks for B into L1
/// [`B_AHEAD`] steps ahead and into L2 the lines `far` names: a block's first row panel reads
/// B from L3 or memory.
///
/// # Safety
/// As [`kernel_avx2`], resp. [`kernel_avx2_rows`] (`MR` is 6 when A is packed).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_avx2_at<const MR: usize, const ROWS: bool, const FAR: bool, B: PanelOf>(
    kc: usize,
    a: *const f32,
    lda: isize,
    b: *const B,
    t: &Tile,
    far: Far,
) {
    let mut lo = [_mm256_setzero_ps(); MR];
    let mut hi = [_mm256_setzero_ps(); MR];
    let rows: [*const f32; MR] = std::array::from_fn(|r| a.wrapping_offset(r as isize * lda));
    let (mut a, mut b) = (a, b);
    // C's rows are asked for one every few steps of k, as in the AVX-512 kernel, but only on a
    // block's first row panel, whose loop waits on B from L3 or memory anyway. In the other
    // panels' loops the asks' state held registers, and three loads a step of A's row
    // pointers from the stack took their place (29 instructions a step, now 24): without it
    // there, runs interleaved within one process (AMD EPYC Zen 3) had products with C asked
    // for 2–10% faster in the mean (1024 × 256 × 1024 set and added to, 96 × 256 × 512),
    // decoding shapes alike.
    let lines = TileLines::of(t);
    for i in 0..kc {
        if FAR && i % C_ROW_STEPS == 0 {
            lines.ask(i / C_ROW_STEPS);
        }
        // SAFETY: A has MR and b has 16 floats left for each remaining step of k.
        unsafe {
            if FAR {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(16 * B_AHEAD).cast());
                _mm_prefetch::<_MM_HINT_T1>(far.line(i));
            }
            let (b0, b1) = B::step(b);
            for r in 0..MR {
                let ar = _mm256_broadcast_ss(&*if ROWS { rows[r].add(i) } else { a.add(r) });
                lo[r] = _mm256_fmadd_ps(ar, b0, lo[r]);
                hi[r] = _mm256_fmadd_ps(ar, b1, hi[r]);
            }
            if !ROWS {
                a = a.add(MR);
            }
            b = b.add(16);
        }
    }
    if t.csc == 1 && t.cols == 16 && t.rows == MR && t.drop.is_none() && t.gate.is_none() {
        // A whole tile with nothing after its update, stored here from the registers (in a
        // call the accumulators went through the stack).
        // SAFETY: the tile's MR rows of 16 columns are inside C (csc = 1; caller).
        unsafe { store_rows16(&lo, &hi, MR, t) };
        return;
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { store_avx2(&lo, &hi, t) }
}

/// Rows `0..rows` (`rows ≤ MR`) of a tile of 16 columns with unit column stride and no
/// dropout or gate, through its update and ReLU: [`store_avx2`]'s whole rows, which the
/// kernels also store from their registers when every row of a tile is whole.
///
/// Always inlined (a `#[target_feature]` function may not be), so that it runs in its callers'
/// AVX2 code with the accumulators in their registers.
///
/// # Safety
/// The CPU must have AVX2 and FMA; those rows and columns must be inside C (readable too
/// unless the update is `Set`), and so must the bias's columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_rows16<const MR: usize>(lo: &[__m256; MR], hi: &[__m256; MR], rows: usize, t: &Tile) {
    for r in 0..MR {
        if r >= rows {
            break;
        }
        // SAFETY: row r < rows and its 16 columns are inside C (caller).
        unsafe {
            let p = t.c.offset(r as isize * t.rsc);
            store256(p, lo[r], t.update, 0, t.relu);
            store256(p.add(8), hi[r], t.update, 8, t.relu);
        }
    }
}

/// Stores an AVX2 kernel's `MR × 16` accumulators (`lo`: columns 0–7, `hi`: 8–15) into the
/// tile `t`, only its `t.rows` rows and `t.cols` columns.
///
/// # Safety
/// The CPU must have AVX2; `t` must describe a tile of C as [`store_scalar`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store_avx2<const MR: usize>(lo: &[__m256; MR], hi: &[__m256; MR], t: &Tile) {
    if t.csc == 1 && t.cols == 16 && t.drop.is_none() && t.gate.is_none() {
        // SAFETY: the tile's rows of 16 columns are inside C (csc = 1; caller).
        unsafe { store_rows16(lo, hi, t.rows, t) };
    } else if t.csc == 1 && t.cols == 16 && t.vector_post() {
        // SAFETY: the tile's rows of 16 columns are inside C (csc = 1; caller).
        unsafe { store_post16(lo, hi, t) };
    } else if t.csc == 1 && t.vector_post() {
        for r in 0..MR.min(t.rows) {
            // SAFETY: row r < rows and its `cols` columns are inside C (csc = 1).
            unsafe {
                store_post8(t, r, 0, lo[r], t.cols.min(8));
                if t.cols > 8 {
                    store_post8(t, r, 8, hi[r], t.cols - 8);
                }
            }
        }
    } else {
        let mut tile = [[0.0f32; 16]; MR];
        for r in 0..MR {
            // SAFETY: each row of `tile` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(tile[r].as_mut_ptr(), lo[r]);
                _mm256_storeu_ps(tile[r].as_mut_ptr().add(8), hi[r]);
            }
        }
        // SAFETY: `tile` is MR ≥ t.rows rows of 16; the caller vouches for t.
        unsafe { store_scalar(tile.as_flattened(), 16, t) };
    }
}

/// The accumulators of a pass of [`kernel_avx2_span`], carried from one span of k to the next:
/// `2·R·P` vectors (at most 12), those of row r over panel p at `2·(p·R + r)` (columns 0–7)
/// and the one after (8–15).
#[cfg(target_arch = "x86_64")]
pub(crate) type Carried = [__m256; 12];

/// Accumulators at zero.
#[cfg(target_arch = "x86_64")]
pub(crate) fn carried_zero() -> Carried {
    // SAFETY: SSE is part of x86-64.
    unsafe { [_mm256_setzero_ps(); 12] }
}

/// Steps `steps` of a pass of `R` of A's rows where they lie (row r's element i at `a + r·lda +
/// i`) over `P` panels of B side by side (panel p at `b + p·panel`), its accumulators carried
/// in `acc`: the same broadcasts of the same values in the same order as
/// [`kernel_avx2_rows`], so each element's chain of multiply-adds is the same and so are its
/// bits, whatever the spans. Step i asks for the line `near` steps on in each panel into L1
/// (past the panel's `kc` steps: the same line of the panel `jump` elements on, the next
/// group's).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `R` rows of at least `steps.end` floats at `a`, `lda` apart,
/// readable; each of the `P` panels at `b` holds `steps.end·16` elements; `2·R·P ≤ 12`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn span_at<const R: usize, const P: usize, B: PanelOf>(
    steps: std::ops::Range<usize>,
    a: *const f32,
    lda: isize,
    b: *const B,
    panel: usize,
    (near, kc, jump): (usize, usize, isize),
    acc: &mut Carried,
) {
    let mut lo: [[__m256; R]; P] = std::array::from_fn(|p| std::array::from_fn(|r| acc[2 * (p * R + r)]));
    let mut hi: [[__m256; R]; P] = std::array::from_fn(|p| std::array::from_fn(|r| acc[2 * (p * R + r) + 1]));
    let rows: [*const f32; R] = std::array::from_fn(|r| a.wrapping_offset(r as isize * lda));
    let panels: [*const B; P] = std::array::from_fn(|p| b.wrapping_add(p * panel));
    // The steps whose line ahead lies in the panel, then those whose line lies in the next
    // group's (one loop each: no choice inside the loop).
    let split = kc.saturating_sub(near).clamp(steps.start, steps.end);
    for (range, to) in [(steps.start..split, 0), (split..steps.end, jump)] {
        let ahead: [*const B; P] =
            std::array::from_fn(|p| panels[p].wrapping_add(16 * near).wrapping_offset(to));
        for i in range {
            // SAFETY: each row has more than i floats, each panel more than 16·i elements;
            // asking for a line never reads it.
            unsafe {
                for line in ahead {
                    _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(16 * i).cast());
                }
                let ar: [__m256; R] = std::array::from_fn(|r| _mm256_broadcast_ss(&*rows[r].add(i)));
                for p in 0..P {
                    let bp = panels[p].add(16 * i);
                    let (b0, b1) = B::step(bp);
                    for r in 0..R {
                        lo[p][r] = _mm256_fmadd_ps(ar[r], b0, lo[p][r]);
                        hi[p][r] = _mm256_fmadd_ps(ar[r], b1, hi[p][r]);
                    }
                }
            }
        }
    }
    for p in 0..P {
        for r in 0..R {
            acc[2 * (p * R + r)] = lo[p][r];
            acc[2 * (p * R + r) + 1] = hi[p][r];
        }
    }
}

/// [`span_at`] for a pass of `rows` rows over `panels` panels (1 to 6 rows over 1 panel, 1
/// row over up to 6, 2 over up to 3).
///
/// # Safety
/// As [`span_at`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_avx2_span<B: PanelOf>(
    (rows, panels): (usize, usize),
    steps: std::ops::Range<usize>,
    a: *const f32,
    lda: isize,
    b: *const B,
    panel: usize,
    ahead: (usize, usize, isize),
    acc: &mut Carried,
) {
    macro_rules! shapes {
        ($(($r:literal, $p:literal))*) => {
            match (rows, panels) {
                $(($r, $p) => span_at::<$r, $p, B>(steps, a, lda, b, panel, ahead, acc),)*
                (r, p) => panic!("an AVX2 span of {r} rows over {p} panels"),
            }
        };
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { shapes!((6, 1)(5, 1)(4, 1)(3, 1)(2, 1)(1, 1)(1, 2)(1, 3)(1, 4)(1, 5)(1, 6)(2, 2)(2, 3)) }
}

/// Stores the carried accumulators of a pass of `rows` rows, those over its panel `p`, into the
/// tile `t` (at most `rows` rows).
///
/// # Safety
/// The CPU must have AVX2; `2·rows·(p + 1) ≤ 12`; `t` describes a tile of C as
/// [`store_scalar`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn store_carried(rows: usize, acc: &Carried, p: usize, t: &Tile) {
    let zero = _mm256_setzero_ps();
    let lo: [__m256; 6] = std::array::from_fn(|r| if r < rows { acc[2 * (p * rows + r)] } else { zero });
    let hi: [__m256; 6] = std::array::from_fn(|r| {
        if r < rows {
            acc[2 * (p * rows + r) + 1]
        } else {
            zero
        }
    });
    // SAFETY: the tile's rows are at most `rows`; the caller's contract.
    unsafe { store_avx2(&lo, &hi, t) };
}

/// An element of a packed panel of B as the AVX2 kernels read it: `f32`, or the bits of a
/// bf16 (`u16`, the emulated bf16 path's weights), widened exactly as it is loaded. Either
/// way the kernels multiply the same `f32` values.
#[cfg(target_arch = "x86_64")]
pub(crate) trait PanelOf: Copy {
    /// A step's 16 elements at `p` as `f32` lanes: columns 0–7 and 8–15.
    ///
    /// # Safety
    /// The CPU has AVX2; 16 elements are readable at `p`.
    unsafe fn step(p: *const Self) -> (__m256, __m256);

    /// [`B_FAR`] steps ahead of the panel `b` that the loop reads, a line for every step's
    /// bytes: one stream through a block of B, asked for by its first row panel.
    fn ahead(b: *const Self) -> Far;
}

#[cfg(target_arch = "x86_64")]
impl PanelOf for f32 {
    #[inline(always)]
    unsafe fn step(p: *const f32) -> (__m256, __m256) {
        // SAFETY: the caller's contract.
        unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }

    fn ahead(b: *const f32) -> Far {
        Far::ahead(b)
    }
}

#[cfg(target_arch = "x86_64")]
impl PanelOf for u16 {
    #[inline(always)]
    unsafe fn step(p: *const u16) -> (__m256, __m256) {
        // SAFETY: the caller's contract; a bf16's bits are the high half of its f32's, and the
        // step's columns lie as `packed::avx2_bits_at` puts them: 32-bit word j holds column j
        // in its low half and column 8 + j in its high half.
        // Column 8 + j is cleared of column j by two shifts rather than a mask, which would
        // hold a register (the pass of 2 rows over 3 panels keeps all sixteen busy).
        unsafe {
            let bits = _mm256_loadu_si256(p.cast());
            (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits)),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_srli_epi32::<16>(bits))),
            )
        }
    }

    fn ahead(b: *const u16) -> Far {
        // A step reads half a line: a line every two steps.
        Far {
            start: b.wrapping_add(16 * B_FAR).cast(),
            shift: 1,
        }
    }
}

/// One 8-lane store of a tile row's columns `j0..j0 + 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store256(p: *mut f32, acc: __m256, update: Update, j0: usize, relu: bool) {
    // SAFETY: the caller vouches for 8 floats at p (and of the bias).
    unsafe {
        let v = match update {
            Update::Bias { alpha, bias } => {
                _mm256_fmadd_ps(acc, _mm256_set1_ps(alpha), _mm256_loadu_ps(bias.add(j0)))
            }
            Update::Set { alpha } => _mm256_mul_ps(acc, _mm256_set1_ps(alpha)),
            Update::Scale { alpha, beta } => _mm256_fmadd_ps(
                acc,
                _mm256_set1_ps(alpha),
                _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(beta)),
            ),
            Update::Add { alpha } => _mm256_fmadd_ps(acc, _mm256_set1_ps(alpha), _mm256_loadu_ps(p)),
        };
        let v = if relu {
            // max(v, 0) gives +0 for −0 and for NaN; NaN is put back.
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
            _mm256_blendv_ps(_mm256_max_ps(v, _mm256_setzero_ps()), v, nan)
        } else {
            v
        };
        _mm256_storeu_ps(p, v);
    }
}

/// The rows `0..t.rows` (at most `MR`) of a tile of 16 columns with dropout or a gate: each
/// 8 lanes as [`store_post8`], in one call for the tile. Each 8 lanes had been a call from
/// the kernel, which set up the update's, the dropout's and the gate's constants again;
/// here they are set up once (the compiler lifts them out of the loop over the rows) and
/// the kernel's loop keeps its code (the stores inlined there had slowed the products that
/// take neither tail, *Tried and dropped* on the performance page).
///
/// # Safety
/// As [`store_post8`] for every row below `t.rows`, columns 0–15.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn store_post16<const MR: usize>(lo: &[__m256; MR], hi: &[__m256; MR], t: &Tile) {
    for r in 0..MR {
        if r >= t.rows {
            break;
        }
        // SAFETY: row r < rows, its 16 columns inside C (caller).
        unsafe {
            store_post8(t, r, 0, lo[r], 8);
            store_post8(t, r, 8, hi[r], 8);
        }
    }
}

/// Row r's columns `j0..j0 + n` (`1 ≤ n ≤ 8`) of the tile through its update, ReLU, dropout
/// and gate, 8 lanes at a time: [`store512`]'s arithmetic, and [`Tile::post`]'s, lane by lane.
/// The AVX2 kernel's tiles with dropout or a gate (the feed-forward and attention outputs of a
/// training step) and its edge tiles had gone through the scalar stores, the dropout's hash
/// one element at a time: 9% of a tiny training step (AMD EPYC Zen 3).
///
/// Lanes past `n` are not read (masked loads) and not written (the row goes through a local
/// array): a masked store is a microcoded sequence on AMD's cores before Zen 4.
///
/// Always inlined (a `#[target_feature]` function may not be) into its AVX2 callers:
/// [`store_avx2`]'s edge tiles and [`store_post16`], which runs it with `n` known.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the tile's row r, columns `j0..j0 + n`, must be inside C
/// with unit column stride (and readable unless the update is `Set`); the bias and the gate
/// (unit column stride) must hold them too.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_post8(t: &Tile, r: usize, j0: usize, acc: __m256, n: usize) {
    // SAFETY: the CPU has AVX2 (caller).
    let (lanes, live) = unsafe {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        (lanes, _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes))
    };
    // SAFETY: the caller vouches for the first n floats at q; the others are not read.
    let load = |q: *const f32| unsafe {
        if n == 8 {
            _mm256_loadu_ps(q)
        } else {
            _mm256_maskload_ps(q, live)
        }
    };
    // SAFETY: the caller vouches for the row's n lanes (and the bias's and the gate's).
    unsafe {
        let p = t.c.offset(r as isize * t.rsc + j0 as isize);
        let a = _mm256_set1_ps(match t.update {
            Update::Set { alpha }
            | Update::Bias { alpha, .. }
            | Update::Scale { alpha, .. }
            | Update::Add { alpha } => alpha,
        });
        let v = match t.update {
            Update::Set { .. } => _mm256_mul_ps(acc, a),
            Update::Bias { bias, .. } => _mm256_fmadd_ps(acc, a, load(bias.add(j0))),
            Update::Scale { beta, .. } => {
                _mm256_fmadd_ps(acc, a, _mm256_mul_ps(load(p), _mm256_set1_ps(beta)))
            }
            Update::Add { .. } => _mm256_fmadd_ps(acc, a, load(p)),
        };
        let mut v = if t.relu {
            // max(v, 0) gives +0 for −0 and for NaN; NaN is put back.
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
            _mm256_blendv_ps(_mm256_max_ps(v, _mm256_setzero_ps()), v, nan)
        } else {
            v
        };
        if let Some(d) = t.drop {
            // The 8 flat indices of these elements, hashed as `dropout::draw` does.
            let idx = _mm256_add_epi32(_mm256_set1_epi32((d.index0 + r * d.ld + j0) as u32 as i32), lanes);
            use crate::kernels::dropout::mix8;
            let x = mix8(_mm256_xor_si256(idx, _mm256_set1_epi32(d.key as u32 as i32)));
            let x = mix8(_mm256_xor_si256(
                x,
                _mm256_set1_epi32((d.key >> 32) as u32 as i32),
            ));
            // x ≥ threshold, unsigned: max(x, threshold) = x.
            let keep = _mm256_cmpeq_epi32(_mm256_max_epu32(x, _mm256_set1_epi32(d.threshold as i32)), x);
            let factor = _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_set1_ps(d.scale));
            v = _mm256_mul_ps(v, factor);
        }
        if let Some(g) = t.gate {
            let gv = load(g.ptr.offset(r as isize * g.rs + j0 as isize));
            let open = _mm256_cmp_ps::<_CMP_GT_OQ>(gv, _mm256_setzero_ps());
            v = _mm256_and_ps(_mm256_mul_ps(v, _mm256_set1_ps(g.scale)), open);
        }
        if n == 8 {
            _mm256_storeu_ps(p, v);
        } else {
            let mut row = [0.0f32; 8];
            _mm256_storeu_ps(row.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(row.as_ptr(), p, n);
        }
    }
}

/// The kernels' arithmetic in plain Rust, for any `MR × NR`: the naive twin of the micro-kernels
/// (same products, same order, same fused updates), and the path of CPUs without AVX2.
///
/// # Safety
/// As the vector kernels.
pub(crate) unsafe fn kernel_scalar(mr: usize, nr: usize, kc: usize, a: *const f32, b: *const f32, t: &Tile) {
    let mut acc = vec![0.0f32; mr * nr];
    for p in 0..kc {
        for r in 0..mr {
            // SAFETY: a holds kc·mr and b kc·nr floats.
            let ar = unsafe { *a.add(p * mr + r) };
            for j in 0..nr {
                let bj = unsafe { *b.add(p * nr + j) };
                acc[r * nr + j] = ar.mul_add(bj, acc[r * nr + j]);
            }
        }
    }
    // SAFETY: the caller vouches for t.
    unsafe { store_scalar(&acc, nr, t) };
}

/// How many lines ahead [`copy_lines_padded`] asks for its source. Its lines are rows of
/// activations or weights a training step's backward reads from L3 or memory (the input of
/// a weight gradient, saved by the forward pass long before), a stride of 1–4 KiB apart,
/// which the hardware's stream prefetcher follows poorly. AMD EPYC Zen 5, small training step,
/// one thread: the packing's copies 6.3% → 5.0% of the samples (8, 16 and 32 lines ahead
/// alike), the step 138.6 / 139.1 / 141.3 → 137.0 / 133.9 / 137.4 ms alternating the builds;
/// base 768.6 / 755.2 → 752.1 / 734.2 ms; small on two threads no different.
#[cfg(target_arch = "x86_64")]
const COPY_AHEAD: usize = 16;

/// Asks for the line [`COPY_AHEAD`] lines after the one at `from` (lines `ss` floats apart,
/// `width` floats long): its first and last cache lines.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ask_line_ahead(from: *const f32, ss: isize, width: usize) {
    let ahead = from.wrapping_offset(COPY_AHEAD as isize * ss) as *const i8;
    // SAFETY: a prefetch does not fault; the addresses are only computed (wrapping).
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(ahead);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add((4 * width).saturating_sub(1)));
    }
}

/// Copies `lines` lines of `width` floats (line i at `src + i·ss`) into consecutive lines of
/// `pad` floats at `dst`, the floats past `width` set to zero: the packing of contiguous
/// runs (rows of B, columns of A) into panels, two masked 16-lane moves per line.
///
/// With `SUM`, also adds the lines, one after the other, into the `width` floats at `sums`
/// (a weight gradient's bias, summed as its `∂Yᵀ` is packed: [`super::gemm_weight_grad`]).
///
/// # Safety
/// The CPU must have AVX-512F; `width ≤ pad ≤ 32`; the source lines and `lines · pad` floats
/// at `dst` must be valid; with `SUM`, `width` floats at `sums` too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn copy_lines_padded<const SUM: bool>(
    src: *const f32,
    ss: isize,
    width: usize,
    lines: usize,
    dst: *mut f32,
    pad: usize,
    sums: *mut f32,
) {
    let (w0, w1) = (first_lanes(width), first_lanes(width.saturating_sub(16)));
    let (p0, p1) = (first_lanes(pad), first_lanes(pad.saturating_sub(16)));
    // SAFETY (both): `width` floats at `sums` with SUM (caller); masked-off lanes are neither
    // read nor written.
    let (mut s0, mut s1) = if SUM {
        unsafe {
            (
                _mm512_maskz_loadu_ps(w0, sums),
                _mm512_maskz_loadu_ps(w1, sums.wrapping_add(16)),
            )
        }
    } else {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    };
    for i in 0..lines {
        // SAFETY: the masks cover `width` floats of line i and `pad` floats of its
        // destination (caller); masked-off lanes are neither read nor written.
        unsafe {
            let from = src.offset(i as isize * ss);
            ask_line_ahead(from, ss, width);
            let to = dst.add(i * pad);
            let v0 = _mm512_maskz_loadu_ps(w0, from);
            _mm512_mask_storeu_ps(to, p0, v0);
            if SUM {
                s0 = _mm512_add_ps(s0, v0);
            }
            if p1 != 0 {
                let v1 = _mm512_maskz_loadu_ps(w1, from.add(16));
                _mm512_mask_storeu_ps(to.add(16), p1, v1);
                if SUM {
                    s1 = _mm512_add_ps(s1, v1);
                }
            }
        }
    }
    if SUM {
        // SAFETY: as above.
        unsafe {
            _mm512_mask_storeu_ps(sums, w0, s0);
            _mm512_mask_storeu_ps(sums.wrapping_add(16), w1, s1);
        }
    }
}

/// [`copy_lines_padded`] with AVX2, for panels of at most 16 floats (the AVX2 kernels' 6-row
/// panels of A and 16-column panels of B): one or two 8-lane moves per line. The packing's
/// copies had been calls to `memcpy` of 24 to 64 bytes each (the compiler merged the
/// fixed-size copies of each panel width into one call with the length in a register): 6.7% of
/// a small training step on the AVX2 paths (AMD EPYC Zen 5, `VASWANI_MAX_ISA=avx2`).
///
/// Short lines are read with masked loads (the lanes past `width` read as zero), but the
/// stores are whole 8-lane stores, each line's spilling into the next line's floats before
/// that line is written over them; only the last line stores through a mask. AMD's cores
/// before Zen 4 run a masked store (`vmaskmovps` to memory) as a microcoded sequence of
/// dozens of operations: with a masked store per move, these copies took 8.8% of a small
/// training step on an AMD EPYC Zen 3, the cost of the copies alone.
///
/// # Safety
/// The CPU must have AVX2; `width ≤ pad ≤ 16`; the source lines and `lines · pad` floats at
/// `dst` must be valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn copy_lines_padded_avx2(
    src: *const f32,
    ss: isize,
    width: usize,
    lines: usize,
    dst: *mut f32,
    pad: usize,
) {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // Lane i of the mask for the first n floats of 8 from `from`: all ones where i < n.
    let first = |n: usize, from: usize| {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n.saturating_sub(from).min(8) as i32), lanes)
    };
    let (w0, w1) = (first(width, 0), first(width, 8));
    let second = pad > 8;
    // SAFETY (both): the masks cover `width` floats of the line at `from`; lanes masked off
    // are not read.
    let load0 = |from: *const f32| unsafe {
        if width >= 8 {
            _mm256_loadu_ps(from)
        } else {
            _mm256_maskload_ps(from, w0)
        }
    };
    let load1 = |from: *const f32| unsafe {
        if width >= 16 {
            _mm256_loadu_ps(from.add(8))
        } else {
            _mm256_maskload_ps(from.add(8), w1)
        }
    };
    let Some(last) = lines.checked_sub(1) else {
        return;
    };
    for i in 0..last {
        // SAFETY: line i's loads as above; its stores write `pad` floats of its destination,
        // and at most 8 − pad % 8 more of the next line's, which is written after it.
        unsafe {
            let from = src.offset(i as isize * ss);
            ask_line_ahead(from, ss, width);
            let to = dst.add(i * pad);
            _mm256_storeu_ps(to, load0(from));
            if second {
                _mm256_storeu_ps(to.add(8), load1(from));
            }
        }
    }
    // SAFETY: the last line's `pad` floats, stored through masks (nothing after them).
    unsafe {
        let from = src.offset(last as isize * ss);
        let to = dst.add(last * pad);
        _mm256_maskstore_ps(to, first(pad, 0), load0(from));
        if second {
            _mm256_maskstore_ps(to.add(8), first(pad, 8), load1(from));
        }
    }
}

/// Transposes an 8 × 8 block: line i of `src` (8 floats at `src + i·ss`) becomes column i of
/// `dst` (float i of the 8 at `dst + j·ds`, for each j).
///
/// # Safety
/// The CPU must have AVX; the 8 source and 8 destination lines must be valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose8x8(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
    // SAFETY: the caller vouches for the 8 lines on each side.
    unsafe {
        let r = |i: isize| _mm256_loadu_ps(src.offset(i * ss));
        let (r0, r1, r2, r3, r4, r5, r6, r7) = (r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7));
        let t0 = _mm256_unpacklo_ps(r0, r1);
        let t1 = _mm256_unpackhi_ps(r0, r1);
        let t2 = _mm256_unpacklo_ps(r2, r3);
        let t3 = _mm256_unpackhi_ps(r2, r3);
        let t4 = _mm256_unpacklo_ps(r4, r5);
        let t5 = _mm256_unpackhi_ps(r4, r5);
        let t6 = _mm256_unpacklo_ps(r6, r7);
        let t7 = _mm256_unpackhi_ps(r6, r7);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let w = |j: isize, v: __m256| _mm256_storeu_ps(dst.offset(j * ds), v);
        w(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
        w(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
        w(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
        w(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
        w(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
        w(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
        w(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
        w(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
    }
}

/// Transposes a 2 × 8 block: line i of `src` (8 floats at `src + i·ss`, i < 2) becomes
/// column i of `dst` (float i of the 2 at `dst + j·ds`, for each j < 8): the last two rows of
/// the AVX2 kernels' 6-row panels of A, after a 4 × 8 block (they had been copied one float
/// at a time: with the transposes, 13.7% of a small eval forward on the AVX2 paths).
///
/// # Safety
/// The CPU must have AVX; the 2 source lines of 8 and 8 destination lines of 2 must be valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose2x8(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
    // SAFETY: the caller vouches for the lines on each side.
    unsafe {
        let (r0, r1) = (_mm256_loadu_ps(src), _mm256_loadu_ps(src.offset(ss)));
        // Columns 0, 1, 4, 5 in lo (pairs), 2, 3, 6, 7 in hi.
        let (lo, hi) = (
            _mm256_castps_pd(_mm256_unpacklo_ps(r0, r1)),
            _mm256_castps_pd(_mm256_unpackhi_ps(r0, r1)),
        );
        let w = |j: isize| dst.offset(j * ds) as *mut f64;
        let (lo0, lo1) = (_mm256_castpd256_pd128(lo), _mm256_extractf128_pd::<1>(lo));
        let (hi0, hi1) = (_mm256_castpd256_pd128(hi), _mm256_extractf128_pd::<1>(hi));
        _mm_storel_pd(w(0), lo0);
        _mm_storeh_pd(w(1), lo0);
        _mm_storel_pd(w(2), hi0);
        _mm_storeh_pd(w(3), hi0);
        _mm_storel_pd(w(4), lo1);
        _mm_storeh_pd(w(5), lo1);
        _mm_storel_pd(w(6), hi1);
        _mm_storeh_pd(w(7), hi1);
    }
}

/// Transposes a 4 × 8 block: line i of `src` (8 floats at `src + i·ss`, i < 4) becomes
/// column i of `dst` (float i of the 4 at `dst + j·ds`, for each j < 8).
///
/// # Safety
/// The CPU must have AVX; the 4 source lines of 8 and 8 destination lines of 4 must be valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose4x8(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
    // SAFETY: the caller vouches for the lines on each side.
    unsafe {
        let r = |i: isize| _mm256_loadu_ps(src.offset(i * ss));
        let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
        let t0 = _mm256_unpacklo_ps(r0, r1);
        let t1 = _mm256_unpackhi_ps(r0, r1);
        let t2 = _mm256_unpacklo_ps(r2, r3);
        let t3 = _mm256_unpackhi_ps(r2, r3);
        // Column j of the block is in lane j%4 of u_{j%4}'s 128-bit half j/4.
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let w = |j: isize, v: __m128| _mm_storeu_ps(dst.offset(j * ds), v);
        w(0, _mm256_castps256_ps128(u0));
        w(1, _mm256_castps256_ps128(u1));
        w(2, _mm256_castps256_ps128(u2));
        w(3, _mm256_castps256_ps128(u3));
        w(4, _mm256_extractf128_ps::<1>(u0));
        w(5, _mm256_extractf128_ps::<1>(u1));
        w(6, _mm256_extractf128_ps::<1>(u2));
        w(7, _mm256_extractf128_ps::<1>(u3));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// The AVX2 copy into padded lines gives each line's `width` floats then zeros, and
    /// writes nothing past the last line, at every width of every panel width it serves, from
    /// strided lines, with one line and none.
    #[test]
    fn copy_lines_padded_avx2_matches_a_plain_copy() {
        if !crate::kernels::cpu::avx2() {
            eprintln!("skipped: this CPU has no AVX2 (or VASWANI_MAX_ISA asks for less)");
            return;
        }
        let src: Vec<f32> = (0..40 * 23).map(|i| i as f32 + 0.5).collect();
        for pad in [6, 8, 12, 16] {
            for width in 0..=pad {
                for lines in [0, 1, 2, 7, 40] {
                    let mut got = vec![f32::NAN; lines * pad + 9];
                    // SAFETY: lines of `width ≤ 16` floats 23 apart inside `src`; `got`
                    // holds lines · pad floats and more; AVX2 checked above.
                    unsafe {
                        super::copy_lines_padded_avx2(src.as_ptr(), 23, width, lines, got.as_mut_ptr(), pad)
                    };
                    for i in 0..lines {
                        for j in 0..pad {
                            let want = if j < width { src[i * 23 + j] } else { 0.0 };
                            assert_eq!(
                                got[i * pad + j].to_bits(),
                                want.to_bits(),
                                "pad {pad} width {width} lines {lines}: line {i} float {j}"
                            );
                        }
                    }
                    assert!(
                        got[lines * pad..].iter().all(|x| x.is_nan()),
                        "pad {pad} width {width} lines {lines}: wrote past the last line"
                    );
                }
            }
        }
    }
}
