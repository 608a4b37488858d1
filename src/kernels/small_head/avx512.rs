//! The AVX-512 paths of [`super`]: one head of attention over short sequences in registers,
//! forward and backward ([`SmallHead`]; the parent module tells why and how), and a decoding
//! step's heads in registers ([`try_step_head`], [`try_step_row`]). The module builds on
//! x86-64 only; each path checks at run time that the CPU has the instructions it uses.

use std::ops::Range;

use ndarray::{ArrayView2, ArrayViewMut2};

use super::{Cached, StepCache, StepHead, StepRow, as_f32, ask_ahead};
use crate::kernels::Float;
use crate::kernels::dropout::DropRows;
use crate::kernels::gemm::KC;

/// Columns of a product in registers, at most: keys whose softmax runs in registers, value
/// features, and (backward) key features of a head. Heads with more keys (up to [`KC`]) take
/// their scores in products of this many columns at a time and the softmax of each stored row.
pub(crate) const MAX_KEYS: usize = 64;
/// Key features `d_k` of a head in the forward pass, at most.
pub(crate) const MAX_DK: usize = 128;
/// Lanes of a vector.
const W: usize = 16;
/// Queries taken through their scores, weights and product with V together, at most, where
/// a head's rows of weights are stored between them.
const SUB_ROWS: usize = 16;

thread_local! {
    /// Each thread's scratch: Kᵀ or Vᵀ, and the backward pass's `∂L/∂P` and `∂L/∂S`.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A strided `f32` matrix seen through a raw pointer.
#[derive(Clone, Copy)]
pub(super) struct Strided {
    pub(super) ptr: *const f32,
    pub(super) rs: isize,
    cs: isize,
}

impl Strided {
    pub(super) fn of<F: Float>(x: &ArrayView2<F>) -> Strided {
        Strided {
            ptr: x.as_ptr() as *const f32,
            rs: x.strides()[0],
            cs: x.strides()[1],
        }
    }

    pub(super) fn of_mut<F: Float>(x: &mut ArrayViewMut2<F>) -> Strided {
        Strided {
            ptr: x.as_mut_ptr() as *const f32,
            rs: x.strides()[0],
            cs: x.strides()[1],
        }
    }

    /// A dense row-major `[_, cols]` buffer.
    pub(super) fn dense(buf: &[f32], cols: usize) -> Strided {
        Strided {
            ptr: buf.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The same matrix from row `i` and column `j` on (only computed: wrapping).
    pub(super) fn from(self, i: usize, j: usize) -> Strided {
        Strided {
            ptr: self
                .ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }

    /// Element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` must be inside the view this was taken from.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller keeps (i, j) inside the view.
        unsafe { *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }

    /// The address of element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` must be inside the view, or one past its last column.
    #[inline(always)]
    unsafe fn addr(&self, i: usize, j: usize) -> *mut f32 {
        // SAFETY: the caller keeps (i, j) inside the view.
        unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) as *mut f32 }
    }
}

/// How the rows of a head's probabilities are normalised.
pub(crate) enum RowSoftmax<L, S> {
    /// Row `i` allows the keys below `limit(i)` and no other: the softmax runs in registers.
    Limit(L),
    /// Any other mask: `softmax(i, row)` on each stored row of scores.
    Rows(S),
}

/// Whether `gemm` runs an `m × k` by `k × n` product through its packed kernels in one block
/// of terms, the arithmetic [`product`] reproduces.
fn packed_in_one_block(m: usize, k: usize) -> bool {
    !crate::kernels::small_gemm::takes(m, k) && k <= KC
}

/// One (sequence, head) that this path takes; see the [module docs](self).
pub(crate) struct SmallHead {
    q: Strided,
    k: Strided,
    v: Strided,
    tq: usize,
    kb: usize,
    dk: usize,
    dv: usize,
}

impl SmallHead {
    /// The head `q` `[Tq, d_k]`, `k` `[kb, d_k]`, `v` `[kb, d_v]`, if this path takes its
    /// forward pass: `f32` on a CPU with AVX-512F, at most [`KC`] keys, [`MAX_KEYS`] value
    /// features and [`MAX_DK`] key features, the rows of Q, K and V contiguous, and products
    /// the GEMM would have given its packed kernels.
    pub(crate) fn new<F: Float>(q: ArrayView2<F>, k: ArrayView2<F>, v: ArrayView2<F>) -> Option<SmallHead> {
        use crate::kernels::gemm::Isa;
        let ((tq, dk), (kb, dv)) = (q.dim(), v.dim());
        let unit = |x: &ArrayView2<F>| x.strides()[1] == 1 || x.ncols() <= 1;
        let fits = std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>()
            && Isa::best() == Some(Isa::Avx512)
            && (1..=KC).contains(&kb)
            && (1..=MAX_KEYS).contains(&dv)
            && (1..=MAX_DK).contains(&dk)
            && tq > 0
            && k.dim() == (kb, dk)
            && packed_in_one_block(tq, dk)
            && packed_in_one_block(tq, kb)
            && unit(&q)
            && unit(&k)
            && unit(&v);
        fits.then(|| SmallHead {
            q: Strided::of(&q),
            k: Strided::of(&k),
            v: Strided::of(&v),
            tq,
            kb,
            dk,
            dv,
        })
    }

    /// `probs ← softmax(Q·Kᵀ·scale)` (zero past `kb`), then `out ← (probs ⊙ M)·V` with M the
    /// dropout mask of `dropped` (if any), by the blocks of queries of `queries`, each with
    /// the keys its queries see at most (their scores, weights, factors and products stop
    /// there: the general path's blocks, so the same sums).
    ///
    /// # Safety
    /// F must be f32 and the views given to [`SmallHead::new`] still alive.
    ///
    /// # Panics
    /// If `probs` is not `[Tq, ≥ kb]` with contiguous rows or `out` not `[Tq, d_v]`.
    pub(crate) unsafe fn forward<F: Float, L: Fn(usize) -> usize, S: FnMut(usize, &mut [F])>(
        &self,
        scale: f32,
        mut softmax: RowSoftmax<L, S>,
        queries: impl Iterator<Item = (Range<usize>, usize)> + Clone,
        dropped: Option<DropRows>,
        probs: &mut ArrayViewMut2<F>,
        out: &mut ArrayViewMut2<F>,
    ) {
        let (tq, kb, dk, dv) = (self.tq, self.kb, self.dk, self.dv);
        assert!(
            probs.nrows() == tq
                && probs.ncols() >= kb
                && (probs.strides()[1] == 1 || probs.ncols() <= 1)
                && out.dim() == (tq, dv),
            "SmallHead::forward: probs {:?}, out {:?} for a head of {tq} queries, {kb} keys",
            probs.shape(),
            out.shape()
        );
        let p = Strided::of_mut(probs);
        let o = Strided::of_mut(out);
        let len = probs.ncols();
        // Every row of Q, K and V, all asked for at once: they come from the projections'
        // outputs, in L2 or beyond, a few KiB apart. Not for heads of more keys than
        // registers hold, whose rows the products stream (over 128 keys of `d_k` 16 the
        // core took about 2% longer with the asks, AMD EPYC Zen 4).
        if kb <= MAX_KEYS {
            ask_rows(self.q, tq, dk);
            ask_rows(self.k, kb, dk);
            ask_rows(self.v, kb, dv);
        }
        let row = |i: usize| p.from(i, 0).ptr as *mut f32;
        SCRATCH.with_borrow_mut(|scratch| {
            let (qt, rest) = take(scratch, dk * tq + dk * kb + kb * tq).split_at_mut(dk * tq);
            // Kᵀ (below), and P ⊙ M [tq][kb] made row by row (below each block's width) when
            // there is a dropout mask.
            let (kt, pm) = rest.split_at_mut(dk * kb);
            // Kᵀ by blocks of MAX_KEYS keys, block c·MAX_KEYS (`[dk][w]`, `w` its keys) at
            // `c·MAX_KEYS·dk`: each product's keys one dense run, its rows `w` floats apart
            // rather than `kb` (at 256 keys, rows 1 KiB apart shared a quarter of L1's sets).
            for c in (0..kb).step_by(MAX_KEYS) {
                // SAFETY: K has contiguous rows (checked by `new`), keys c.. lie inside it and
                // the block's dk·w floats inside kt; AVX-512F is there.
                unsafe { transpose(self.k.from(c, 0), MAX_KEYS.min(kb - c), dk, &mut kt[c * dk..]) };
            }
            let kt_block = |c: usize| Strided::dense(&kt[c * dk..], MAX_KEYS.min(kb - c));
            // Q's rows are read where they are, except for rows of keys that fit one vector,
            // whose products go sixteen rows at a time from Qᵀ.
            if kb <= W {
                unsafe { transpose(self.q, tq, dk, qt) };
            }
            for (rows, width) in queries {
                if width == 0 {
                    // Queries that see no key: zero weights (or the row softmax's), zero output.
                    for i in rows {
                        match &mut softmax {
                            RowSoftmax::Rows(softmax) => {
                                softmax(i, probs.row_mut(i).as_slice_mut().expect("contiguous rows"))
                            }
                            RowSoftmax::Limit(_) => probs.row_mut(i).fill(F::ZERO),
                        }
                        // SAFETY: row i of out [tq, dv] (asserted).
                        (0..dv).for_each(|d| unsafe { *o.addr(i, d) = 0.0 });
                    }
                    continue;
                }
                // Scores, weights and the product with V by runs of at most SUB_ROWS queries
                // where a row's weights are stored between them (more keys than registers
                // hold), so that the run's weights stay in L1 from one to the next; else the
                // whole block at once.
                let in_registers = matches!(softmax, RowSoftmax::Limit(_)) && width <= MAX_KEYS;
                let run = if in_registers { rows.len() } else { SUB_ROWS };
                for start in rows.clone().step_by(run) {
                    let sub = start..(start + run).min(rows.end);
                    let n = sub.len();
                    let q = if kb <= W {
                        Left::Transposed(&qt[sub.start..], tq)
                    } else {
                        Left::Rows(self.q.from(sub.start, 0))
                    };
                    let ps = p.from(sub.start, 0);
                    match &mut softmax {
                        RowSoftmax::Limit(limit) if in_registers => {
                            let limit = &*limit;
                            let limit = |r: usize| limit(sub.start + r);
                            // The softmax in registers, beside the scores. SAFETY: AVX-512F; S =
                            // Q·Kᵀ for these rows from Q and Kᵀ's first block (all `width` ≤
                            // MAX_KEYS keys), into probs [tq, ≥ kb] (asserted).
                            unsafe { products(q, kt_block(0), dk, width, scale, Some(&limit), ps, n) };
                            // The keys past the block's own are blocked. By pointer: a view
                            // of each row's tail (most often empty) had been 6% of a tiny eval
                            // forward.
                            if width < len {
                                for i in sub.clone() {
                                    // SAFETY: columns width..len of row i of probs [tq, len],
                                    // contiguous (asserted); 0.0 is all zero bits.
                                    unsafe { std::ptr::write_bytes(row(i).add(width), 0, len - width) };
                                }
                            }
                        }
                        softmax => {
                            // The scores alone, a product of at most MAX_KEYS columns at a time.
                            for c in (0..width).step_by(MAX_KEYS) {
                                let cols = MAX_KEYS.min(width - c);
                                // SAFETY: as above, for columns c..c + cols.
                                unsafe {
                                    products(q, kt_block(c), dk, cols, scale, NO_LIMIT, ps.from(0, c), n)
                                };
                            }
                            match softmax {
                                // SAFETY: AVX-512F; rows of probs [tq, len], contiguous (asserted).
                                RowSoftmax::Limit(limit) => unsafe {
                                    softmax_stored_rows(row, &*limit, sub.clone(), len)
                                },
                                RowSoftmax::Rows(softmax) => {
                                    for i in sub.clone() {
                                        softmax(i, probs.row_mut(i).as_slice_mut().expect("contiguous rows"));
                                    }
                                }
                            }
                        }
                    }
                    let src = match dropped {
                        Some(m) => {
                            // SAFETY: F is f32; probs [tq, ≥ kb] with contiguous rows (asserted),
                            // pm [tq][kb].
                            unsafe {
                                mask_rows(Some(p), m, std::iter::once((sub.clone(), width)), kb, pm, false)
                            };
                            Strided::dense(pm, kb)
                        }
                        None => p,
                    };
                    // SAFETY: AVX-512F; O = (P ⊙ M)·V for these rows from the rows of P ⊙ M
                    // [tq, ≥ kb] (contiguous) and V [kb, dv] with contiguous rows (checked by
                    // `new`), into out [tq, dv] (asserted).
                    unsafe {
                        products(
                            Left::Rows(src.from(sub.start, 0)),
                            self.v,
                            width,
                            dv,
                            1.0,
                            NO_LIMIT,
                            o.from(sub.start, 0),
                            n,
                        )
                    };
                }
            }
        });
    }

    /// Whether this path takes the head's backward pass too: at most [`MAX_KEYS`] key
    /// features, at most [`KC`] queries, and products the GEMM would have given its packed
    /// kernels.
    pub(crate) fn takes_backward(&self) -> bool {
        self.dk <= MAX_KEYS && packed_in_one_block(self.kb, self.tq) && packed_in_one_block(self.tq, self.dv)
    }

    /// The backward pass of [`SmallHead::forward`] given `∂L/∂O` (`grad_out`): `∂L/∂V =
    /// (P ⊙ M)ᵀ·G`, `∂L/∂P = (G·Vᵀ) ⊙ M`, `∂L/∂S` row by row from `softmax_backward(i, p,
    /// ∂L/∂p, ∂L/∂s)`, `∂L/∂Q = scale·∂L/∂S·K`, `∂L/∂K = scale·(∂L/∂S)ᵀ·Q`; the products
    /// by the blocks of the forward pass: of `queries`, each with the keys its queries see at
    /// most, and of `keys`, each with the first query that sees one.
    ///
    /// # Safety
    /// F must be f32, the views given to [`SmallHead::new`] still alive, and
    /// [`SmallHead::takes_backward`] true.
    ///
    /// # Panics
    /// If `probs` is not `[Tq, kb]` with contiguous rows, or a gradient has another shape than
    /// its input.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn backward<F: Float>(
        &self,
        scale: f32,
        queries: impl Iterator<Item = (Range<usize>, usize)> + Clone,
        keys: impl Iterator<Item = (Range<usize>, usize)> + Clone,
        probs: ArrayView2<F>,
        dropped: Option<DropRows>,
        grad_out: ArrayView2<F>,
        mut softmax_backward: impl FnMut(usize, &[F], &[F], &mut [F]),
        grad_q: &mut ArrayViewMut2<F>,
        grad_k: &mut ArrayViewMut2<F>,
        grad_v: &mut ArrayViewMut2<F>,
    ) {
        let (tq, kb, dk, dv) = (self.tq, self.kb, self.dk, self.dv);
        let unit = |x: &ArrayView2<F>| x.strides()[1] == 1 || x.ncols() <= 1;
        assert!(
            probs.dim() == (tq, kb)
                && unit(&probs)
                && (tq == 1 || probs.strides()[0] >= kb as isize)
                && grad_out.dim() == (tq, dv)
                && unit(&grad_out)
                && grad_q.dim() == (tq, dk)
                && grad_k.dim() == (kb, dk)
                && grad_v.dim() == (kb, dv),
            "SmallHead::backward: probs {:?}, grad_out {:?}, grads {:?} {:?} {:?} for a head of \
             {tq} queries, {kb} keys, d_k {dk}, d_v {dv}",
            probs.shape(),
            grad_out.shape(),
            grad_q.shape(),
            grad_k.shape(),
            grad_v.shape()
        );
        let g = Strided::of(&grad_out);
        // Every row read from memory, all asked for at once: in a training step these were
        // saved by the forward pass and are in L3 or memory.
        ask_rows(Strided::of(&probs), tq, kb);
        ask_rows(g, tq, dv);
        ask_rows(self.k, kb, dk);
        ask_rows(self.q, tq, dk);
        ask_rows(self.v, kb, dv);
        SCRATCH.with_borrow_mut(|scratch| {
            let all = take(scratch, 2 * tq * kb + dv * kb + kb * tq);
            let (pd, rest) = all.split_at_mut(tq * kb);
            let (gs, rest) = rest.split_at_mut(tq * kb);
            let (vt, gp) = rest.split_at_mut(dv * kb);
            // SAFETY (the products and transposes below): AVX-512F (checked by `new`); each
            // operand's shape is the head's (checked by `new` and asserted), the right
            // operands' rows contiguous.
            // ∂L/∂V = (P ⊙ M)ᵀ·G: the left factor's transpose is P ⊙ M [tq][kb] (zero past
            // each block's width, where P is).
            let pd: &[f32] = match dropped {
                Some(m) => {
                    // SAFETY: F is f32; probs is [tq, kb] with contiguous rows (asserted).
                    unsafe { mask_rows(Some(Strided::of(&probs)), m, queries.clone(), kb, pd, true) };
                    pd
                }
                // SAFETY: F is f32, probs [tq, kb] with contiguous rows at a stride of at
                // least kb (asserted).
                None => unsafe {
                    let len = (tq - 1) * probs.strides()[0] as usize + kb;
                    std::slice::from_raw_parts(probs.as_ptr() as *const f32, len)
                },
            };
            let pd_rs = if dropped.is_some() {
                kb
            } else {
                probs.strides()[0] as usize
            };
            // Rows `keys` of `x` [kb, cols] zero: keys no query sees.
            let zero = |x: Strided, keys: Range<usize>, cols: usize| {
                for j in keys {
                    // SAFETY: row j < kb of a gradient [kb, cols] (asserted).
                    (0..cols).for_each(|d| unsafe { *x.addr(j, d) = 0.0 });
                }
            };
            let gv = Strided::of_mut(grad_v);
            for (keys, first) in keys.clone() {
                if first == tq {
                    zero(gv, keys, dv);
                    continue;
                }
                let left = Left::Transposed(&pd[first * pd_rs + keys.start..], pd_rs);
                let (terms, out) = (tq - first, gv.from(keys.start, 0));
                unsafe { products(left, g.from(first, 0), terms, dv, 1.0, NO_LIMIT, out, keys.len()) };
            }
            // ∂L/∂P = (G·Vᵀ) ⊙ M, from the rows of G [tq, dv] and Vᵀ [dv][kb], at most
            // MAX_KEYS columns at a time (only below each block's width: the softmax's
            // backward reads no further).
            unsafe { transpose(self.v, kb, dv, vt) };
            let gp = &mut gp[..tq * kb];
            for (rows, width) in queries.clone() {
                for c in (0..width).step_by(MAX_KEYS) {
                    let cols = MAX_KEYS.min(width - c);
                    let out = Strided::dense(&gp[rows.start * kb + c..], kb);
                    let b = Strided::dense(&vt[c..], kb);
                    unsafe {
                        products(
                            Left::Rows(g.from(rows.start, 0)),
                            b,
                            dv,
                            cols,
                            1.0,
                            NO_LIMIT,
                            out,
                            rows.len(),
                        )
                    };
                }
            }
            if let Some(m) = dropped {
                // SAFETY: gp is [tq][kb].
                unsafe { mask_rows(None, m, queries.clone(), kb, gp, false) };
            }
            // ∂L/∂S, row by row.
            for (i, (gp, gs)) in gp.chunks_exact(kb).zip(gs.chunks_exact_mut(kb)).enumerate() {
                let p = probs.row(i);
                let p = p.as_slice().expect("contiguous rows (asserted)");
                // SAFETY: F is f32 (the caller), so these are the same floats.
                let (gp, gs) = unsafe {
                    (
                        std::slice::from_raw_parts(gp.as_ptr() as *const F, kb),
                        std::slice::from_raw_parts_mut(gs.as_mut_ptr() as *mut F, kb),
                    )
                };
                softmax_backward(i, p, gp, gs);
            }
            // ∂L/∂Q = scale·∂L/∂S·K from the rows of ∂L/∂S [tq][kb]; ∂L/∂K =
            // scale·(∂L/∂S)ᵀ·Q from ∂L/∂S [tq][kb] as the transposed left factor.
            let gq = Strided::of_mut(grad_q);
            for (rows, width) in queries {
                let out = gq.from(rows.start, 0);
                if width == 0 {
                    zero(out, 0..rows.len(), dk);
                    continue;
                }
                let left = Left::Rows(Strided::dense(&gs[rows.start * kb..], kb));
                unsafe { products(left, self.k, width, dk, scale, NO_LIMIT, out, rows.len()) };
            }
            let gk = Strided::of_mut(grad_k);
            for (keys, first) in keys {
                if first == tq {
                    zero(gk, keys, dk);
                    continue;
                }
                let left = Left::Transposed(&gs[first * kb + keys.start..], kb);
                let (terms, out) = (tq - first, gk.from(keys.start, 0));
                unsafe {
                    products(
                        left,
                        self.q.from(first, 0),
                        terms,
                        dk,
                        scale,
                        NO_LIMIT,
                        out,
                        keys.len(),
                    )
                };
            }
        });
    }
}

/// The first `n` floats of the scratch, grown if need be (the values left are arbitrary).
fn take(scratch: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if scratch.len() < n {
        scratch.resize(n, 0.0);
    }
    &mut scratch[..n]
}

/// `dst ← P ⊙ M` (with `p`) or `dst ← dst ⊙ M` (without), M the dropout mask of `m` and
/// `dst` a dense `[tq][kb]` buffer, row by row below each block's width of `queries` (the
/// factors computed from the mask's key, in vectors); past the width, zeros with `zero_rest`,
/// else left as they are.
///
/// # Safety
/// `p`, if any, is `[tq, ≥ kb]` with contiguous rows, `tq` the end of the last block;
/// `dst` holds `tq · kb` floats.
unsafe fn mask_rows(
    p: Option<Strided>,
    m: DropRows,
    queries: impl Iterator<Item = (Range<usize>, usize)>,
    kb: usize,
    dst: &mut [f32],
    zero_rest: bool,
) {
    for (rows, width) in queries {
        for i in rows {
            let (d, rest) = dst[i * kb..][..kb].split_at_mut(width);
            match p {
                Some(p) => {
                    // SAFETY: row i of P, at least kb ≥ width contiguous floats (the caller).
                    let row = unsafe { std::slice::from_raw_parts(p.ptr.offset(i as isize * p.rs), width) };
                    m.apply_to(i, row, d);
                }
                None => m.apply(i, d),
            }
            if zero_rest {
                rest.fill(0.0);
            }
        }
    }
}

/// Asks for the lines of `rows` rows of `cols` floats of `x` (contiguous rows), all at once:
/// a head's rows lie a few KiB apart, and a backward pass finds them in L3 or memory.
fn ask_rows(x: Strided, rows: usize, cols: usize) {
    for j in 0..rows {
        for d in (0..cols).step_by(W) {
            let at = x.ptr.wrapping_offset(j as isize * x.rs + d as isize * x.cs);
            // SAFETY: a prefetch does not fault, and the address is only computed (wrapping).
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at as *const i8) };
        }
    }
}

/// `dst` `[cols][rows]` (dense) ← the transpose of `src` `[rows, cols]` (contiguous rows):
/// whole 8 × 8 blocks by vector transposes, the edges one by one.
///
/// # Safety
/// `src` must be `[rows, cols]` with contiguous rows; AVX2 must be there.
pub(super) unsafe fn transpose(src: Strided, rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        dst.len() >= rows * cols,
        "transpose: {} floats for {rows} × {cols}",
        dst.len()
    );
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    for j in (0..r8).step_by(8) {
        for d in (0..c8).step_by(8) {
            // SAFETY: rows j..j+8 and columns d..d+8 of src (the caller), rows d..d+8 and
            // columns j..j+8 of dst (asserted).
            unsafe {
                let at = dst.as_mut_ptr().add(d * rows + j);
                crate::kernels::gemm::micro::transpose8x8(src.addr(j, d), src.rs, at, rows as isize);
            }
        }
    }
    for j in 0..rows {
        let ds = if j < r8 { c8..cols } else { 0..cols };
        for d in ds {
            // SAFETY: (j, d) is inside src (the caller).
            dst[d * rows + j] = unsafe { src.at(j, d) };
        }
    }
}

/// No softmax in a product.
const NO_LIMIT: Option<&fn(usize) -> usize> = None;

/// The left factor of [`products`]: where its element of term `t` and row `r` lies.
#[derive(Clone, Copy)]
enum Left<'a> {
    /// Transposed (`at[t·ars + r]`): the rows of a block of the result side by side at each
    /// term, as the GEMM packs them.
    Transposed(&'a [f32], usize),
    /// By rows, where they are: row `r`'s term `t` at `r·rs + t·cs`.
    Rows(Strided),
}

/// `out[r][c] = alpha·Σ_t a(t, r)·b[t][c]` for rows `r < rows` and columns `c < width`,
/// from the left factor (transposed, or its rows where they are: [`Left`]) and the right
/// factor's rows where they are, several rows at a time by [`product`]; with `limit`, each
/// row then becomes its softmax over the columns below `limit(r)`.
///
/// # Safety
/// AVX-512F; `b` holds `terms × width` with contiguous rows, `out` `rows × width`; `width`
/// at most 64; a left factor by rows holds `rows × terms`.
///
/// # Panics
/// If a transposed left factor holds fewer than `terms` rows of `rows` floats at its stride.
#[allow(clippy::too_many_arguments)]
unsafe fn products<L: Fn(usize) -> usize>(
    a: Left<'_>,
    b: Strided,
    terms: usize,
    width: usize,
    alpha: f32,
    limit: Option<&L>,
    out: Strided,
    rows: usize,
) {
    match a {
        Left::Transposed(at, ars) => {
            assert!(
                terms > 0 && (terms == 1 || ars >= rows) && at.len() >= (terms - 1) * ars + rows,
                "products: {} floats for {terms} terms of {rows} rows at stride {ars}",
                at.len()
            );
            // SAFETY: forwarded; term t of row r at t·ars + r, inside `at` (asserted).
            unsafe {
                products_of::<false, L>(
                    at.as_ptr(),
                    ars as isize,
                    1,
                    b,
                    terms,
                    width,
                    alpha,
                    limit,
                    out,
                    rows,
                )
            }
        }
        Left::Rows(x) => {
            // SAFETY: forwarded; term t of row r at r·rs + t·cs (the caller's rows × terms).
            unsafe { products_of::<true, L>(x.ptr, x.cs, x.rs, b, terms, width, alpha, limit, out, rows) }
        }
    }
}

/// [`products`] with the left factor's term `t` of row `r` at `a + t·ts + r·rs` (`rs` is 1
/// unless `ROWS`).
///
/// # Safety
/// As [`products`], for that left factor.
#[allow(clippy::too_many_arguments)]
unsafe fn products_of<const ROWS: bool, L: Fn(usize) -> usize>(
    a: *const f32,
    ts: isize,
    rs: isize,
    b: Strided,
    terms: usize,
    width: usize,
    alpha: f32,
    limit: Option<&L>,
    out: Strided,
    rows: usize,
) {
    // Up to 16 vectors of sums in registers: 8 rows of up to two vectors, or 4 rows of up to
    // four (or beside the softmax's vectors), then the rows left one at a time. Rows of one
    // vector with their softmax go 16 at a time, then 4: a row's softmax is a chain of
    // dependent steps (its maximum across the lanes, the exponentials, their sum across the
    // lanes, one division), and 16 rows side by side fill the waits that 4 left (tiny eval
    // forward, AMD EPYC Zen 5, one thread: the softmax 9.9% → 5.6% of the samples).
    macro_rules! run {
        (16, 1, true) => {{
            let mut i = 0;
            while i + 16 <= rows {
                // SAFETY: the caller's contract, for rows i..i+16 and one vector of columns.
                unsafe { product::<16, 1, true, ROWS, L>(a, ts, rs, b, i, terms, width, alpha, limit, out) };
                i += 16;
            }
            run!(i, 4, 1, true)
        }};
        ($r:literal, $c:literal, $soft:literal) => {{ run!(0, $r, $c, $soft) }};
        ($from:expr, $r:literal, $c:literal, $soft:literal) => {{
            let mut i = $from;
            while i + $r <= rows {
                // SAFETY: the caller's contract, for rows i..i+R and C vectors of columns.
                unsafe {
                    product::<$r, $c, $soft, ROWS, L>(a, ts, rs, b, i, terms, width, alpha, limit, out)
                };
                i += $r;
            }
            for r in i..rows {
                // SAFETY: as above, for row r.
                unsafe { product::<1, $c, $soft, ROWS, L>(a, ts, rs, b, r, terms, width, alpha, limit, out) };
            }
        }};
    }
    match (width.div_ceil(W), limit.is_some()) {
        (1, false) => run!(8, 1, false),
        (2, false) => run!(8, 2, false),
        (3, false) => run!(4, 3, false),
        (_, false) => run!(4, 4, false),
        // Sixteen rows where they lie would take sixteen address registers.
        (1, true) if !ROWS => run!(16, 1, true),
        (1, true) => run!(8, 1, true),
        (2, true) => run!(4, 2, true),
        (3, true) => run!(4, 3, true),
        (_, true) => run!(4, 4, true),
    }
}

/// `$v ← $e` for every vector `$v` of `$x` (`[[__m512; C]; R]`, `R` and `C` given): one step
/// of a computation on all of a block's vectors before the next step, so that the block's
/// independent chains run side by side (a loop with a body this short is unrolled, where the
/// whole computation's was not).
///
/// Each result then passes through an empty `asm!` statement (`staged!`). The compiler keeps
/// such statements in the order written, and a step's operation cannot run before the
/// statement that hands it its input: the steps stay in the order written. Without them the
/// compiler's scheduler took each vector's exponential through to its end before the next
/// vector's (fewer vectors alive at once), and the processor, its schedulers full of one
/// chain's waiting operations, ran the block's chains one after another: the attention core
/// 4–7% slower at the small and base workloads' shapes (AMD EPYC Zen 5).
macro_rules! each {
    ($x:ident, $rows:expr, $cols:expr, |$v:ident| $e:expr) => {
        for r in 0..$rows {
            for c in 0..$cols {
                let $v = $x[r][c];
                $x[r][c] = staged!($e);
            }
        }
    };
    ($x:ident, $y:ident, $rows:expr, $cols:expr, |$v:ident, $w:ident| $e:expr) => {
        for r in 0..$rows {
            for c in 0..$cols {
                let ($v, $w) = ($x[r][c], $y[r][c]);
                $x[r][c] = staged!($e);
            }
        }
    };
}

/// `$e` (an `__m512`), passed through an empty `asm!` statement that holds it in a register
/// and does nothing to it: a point in the order of the computation that the compiler keeps
/// (the statement is taken to have effects of its own, so two of them keep their order), in
/// a function with AVX-512F.
macro_rules! staged {
    ($e:expr) => {{
        let mut v: std::arch::x86_64::__m512 = $e;
        // SAFETY: an empty statement: no instruction, no memory touched, no flag changed.
        unsafe {
            std::arch::asm!("/* {0} */", inout(zmm_reg) v, options(nomem, nostack, preserves_flags));
        }
        v
    }};
}

/// [`exp_f32`] of every vector of `$x` (`[[__m512; C]; R]`, `R` and `C` given), operation for
/// operation (so the same bits), each operation on all of them before the next: a row's
/// exponentials alone are a chain of about 17 dependent operations. NaN comes through the
/// clamps (`max` and `min` return their second operand where one is NaN) and every step
/// after them as NaN, as `exp_f32` gives it. `exp_all!(x, R, C, at_most_zero)` leaves out
/// the upper clamp, which changes nothing where every input is at most 0 or NaN (a softmax's
/// differences from its row's largest): one operation of 17 fewer.
///
/// [`exp_f32`]: crate::kernels::simd::exp_f32
macro_rules! exp_all {
    ($x:ident, $rows:expr, $cols:expr) => {{
        use crate::kernels::simd::exp_consts::*;
        use std::arch::x86_64::*;
        each!($x, $rows, $cols, |v| _mm512_min_ps(
            _mm512_set1_ps(CLAMP),
            _mm512_max_ps(_mm512_set1_ps(LOW), v)
        ));
        exp_all!(@clamped $x, $rows, $cols);
    }};
    // Inputs at most 0 (or NaN), which the upper clamp leaves as they are: the same bits
    // without it (a softmax's differences from its row's largest).
    ($x:ident, $rows:expr, $cols:expr, at_most_zero) => {{
        use crate::kernels::simd::exp_consts::*;
        use std::arch::x86_64::*;
        each!($x, $rows, $cols, |v| _mm512_max_ps(_mm512_set1_ps(LOW), v));
        exp_all!(@clamped $x, $rows, $cols);
    }};
    (@clamped $x:ident, $rows:expr, $cols:expr) => {{
        use crate::kernels::simd::exp_consts::*;
        use std::arch::x86_64::*;
        let set = _mm512_set1_ps;
        let mut t = $x;
        each!(t, $rows, $cols, |v| _mm512_fmadd_ps(
            v,
            set(std::f32::consts::LOG2_E),
            set(ROUND)
        ));
        let mut n = t;
        each!(n, $rows, $cols, |v| _mm512_sub_ps(v, set(ROUND)));
        // r = x − n·C1 − n·C2, in `$x`.
        each!($x, n, $rows, $cols, |v, nv| _mm512_fnmadd_ps(nv, set(C1), v));
        each!($x, n, $rows, $cols, |v, nv| _mm512_fnmadd_ps(nv, set(C2), v));
        let mut p = [[set(POLY[0]); $cols]; $rows];
        for &k in &POLY[1..] {
            each!(p, $x, $rows, $cols, |pv, rv| _mm512_fmadd_ps(pv, rv, set(k)));
        }
        // e = p·r² + r + 1, in `p`.
        each!(p, $x, $rows, $cols, |pv, rv| _mm512_fmadd_ps(
            pv,
            _mm512_mul_ps(rv, rv),
            rv
        ));
        each!(p, $rows, $cols, |pv| _mm512_add_ps(pv, set(1.0)));
        // 2ⁿ⁻¹ from n's integer (the low bits of t's mantissa), in `t`.
        each!(t, $rows, $cols, |tv| _mm512_castsi512_ps(
            _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_castps_si512(tv), _mm512_set1_epi32(BIAS)))
        ));
        each!(p, t, $rows, $cols, |e, half| _mm512_mul_ps(
            _mm512_mul_ps(e, half),
            set(2.0)
        ));
        $x = p;
    }};
}

/// Each of the `$rows` vectors of `$v` (`[__m512; R]`) folded across its lanes by one operation
/// (`$op8`, `$op4`, `$op1`: its 8-, 4- and 1-lane forms) in the tree of
/// [`crate::kernels::simd`]'s sums, lane i with lane i + 8, then i + 4, i + 2, i + 1, each
/// stage for all the vectors before the next; the results as `[f32; R]`.
macro_rules! lane_trees {
    ($v:ident, $rows:expr, $op8:ident, $op4:ident, $op1:ident) => {{
        use std::arch::x86_64::*;
        let mut h8 = [_mm256_setzero_ps(); $rows];
        for r in 0..$rows {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd($v[r])));
            h8[r] = $op8(_mm512_castps512_ps256($v[r]), hi);
        }
        let mut h4 = [_mm_setzero_ps(); $rows];
        for r in 0..$rows {
            h4[r] = $op4(_mm256_castps256_ps128(h8[r]), _mm256_extractf128_ps::<1>(h8[r]));
        }
        for r in 0..$rows {
            h4[r] = $op4(h4[r], _mm_movehl_ps(h4[r], h4[r]));
        }
        let mut out = [0.0f32; $rows];
        for r in 0..$rows {
            out[r] = _mm_cvtss_f32($op1(h4[r], _mm_shuffle_ps::<0b01>(h4[r], h4[r])));
        }
        out
    }};
}

/// The softmax of `R` rows of `C` vectors over their `live` lanes (the others become 0), as
/// [`crate::kernels::softmax`]'s `f32` path computes it: the largest live score (0 for a row
/// with none, or whose live scores are all `−∞`), `exp_f32` of each difference, lane sums
/// over the vectors in order added in a tree (lane i with lane i + 8, then i + 4, i + 2,
/// i + 1, as [`crate::kernels::simd`]'s sums), one reciprocal.
///
/// `$x` is `[[__m512; C]; R]` and `$live` `[[u16; C]; R]`, `R` and `C` given, in a function
/// with AVX-512F. A macro rather than a function: the compiler kept a function of its own out
/// of line (a `#[target_feature]` function cannot be `#[inline(always)]`), and the caller's
/// sums went through the stack on their way in and out. Every step is taken for all the rows
/// before the next ([`each!`]): one row's softmax is a chain of dependent steps (its maximum
/// across the lanes, the exponentials, their sum across the lanes, a division).
macro_rules! softmax_rows {
    ($x:ident, $live:expr, $rows:expr, $cols:expr) => {{
        use std::arch::x86_64::*;
        let live = &$live;
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut top = [ninf; $rows];
        for c in 0..$cols {
            for r in 0..$rows {
                // max(x, top) keeps top where x is NaN, as the softmax's maximum ignores NaN.
                top[r] = _mm512_mask_max_ps(top[r], live[r][c], $x[r][c], top[r]);
            }
        }
        // Each row's largest, across its lanes (exact: any order gives the same maximum).
        let m = lane_trees!(top, $rows, _mm256_max_ps, _mm_max_ps, _mm_max_ss);
        for r in 0..$rows {
            let mr = _mm512_set1_ps(m[r]);
            for c in 0..$cols {
                $x[r][c] = _mm512_sub_ps($x[r][c], mr);
            }
        }
        // A live lane's difference is at most 0 (or NaN): m is its row's largest. The other
        // lanes' exponentials (of anything) are set to 0 below.
        exp_all!($x, $rows, $cols, at_most_zero);
        let mut sum = [_mm512_setzero_ps(); $rows];
        for c in 0..$cols {
            for r in 0..$rows {
                $x[r][c] = _mm512_maskz_mov_ps(live[r][c], $x[r][c]);
                sum[r] = _mm512_add_ps(sum[r], $x[r][c]);
            }
        }
        let total = lane_trees!(sum, $rows, _mm256_add_ps, _mm_add_ps, _mm_add_ss);
        for r in 0..$rows {
            let inv = _mm512_set1_ps(1.0 / total[r]);
            // A row with no live score, or only −∞ ones, is all zero (its exponentials are
            // NaN); blocked keys are exactly 0 even where a NaN score made the sum NaN.
            let all = m[r] != f32::NEG_INFINITY;
            for c in 0..$cols {
                let keep = if all { live[r][c] } else { 0 };
                $x[r][c] = _mm512_maskz_mul_ps(keep, $x[r][c], inv);
            }
        }
    }};
}

/// The softmax of `R` stored rows side by side (row `r` at `rows[r]`, `len` floats), each over
/// its first `limits[r]` columns with zeros after them: what [`crate::kernels::softmax::softmax_row`] computes
/// for each under a plain limit, bit for bit ([`softmax_rows!`]'s steps on vectors loaded
/// from the rows, a vector of each row at a time). For heads of more keys than fit
/// registers: one row's softmax alone is a chain of dependent steps (maximum, the lanes'
/// tree, exponentials, sum, the tree again, one division), and the rows side by side fill
/// each other's waits.
///
/// # Safety
/// AVX-512F; each `rows[r]` is valid for reads and writes of `len` floats, no two overlap.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_stored<const R: usize>(rows: [*mut f32; R], limits: [usize; R], len: usize) {
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;
    let limits = limits.map(|l| l.min(len));
    // Vectors below `whole` lie below every row's limit: their lanes are all live, their
    // loads, stores and masks plain (in a head without a mask, every vector but a last
    // partial one). The masks of the others are worked out per vector.
    let whole = limits.iter().min().map_or(0, |&l| l / W);
    let lanes = |r: usize, c: usize| {
        if c < whole {
            0xffff
        } else {
            first_lanes(limits[r].saturating_sub(c * W))
        }
    };
    let vectors = limits.iter().max().map_or(0, |&l| l.div_ceil(W));
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut top = [ninf; R];
    // Each pass's loop split at `whole`, so that each part's masks are one constant or worked
    // out per vector: the same arithmetic either way. (Macros: a closure was left out of line.)
    macro_rules! split {
        ($range:expr, $step:expr, |$c:ident| $body:block) => {
            let (end, cut) = ($range.end, $range.end.min(whole / $step * $step));
            for $c in ($range.start..cut).step_by($step) $body
            for $c in (cut..end).step_by($step) $body
        };
    }
    split!(0..vectors, 1, |c| {
        for r in 0..R {
            // SAFETY: the lanes loaded lie below the row's limit, inside its `len` floats.
            let x = unsafe { _mm512_maskz_loadu_ps(lanes(r, c), rows[r].add(c * W)) };
            // max(x, top) keeps top where x is NaN, as the softmax's maximum ignores NaN.
            top[r] = _mm512_mask_max_ps(top[r], lanes(r, c), x, top[r]);
        }
    });
    let m = lane_trees!(top, R, _mm256_max_ps, _mm_max_ps, _mm_max_ss);
    let mut sum = [_mm512_setzero_ps(); R];
    // One vector of each row at a time (four in flight): two of each had been about 3%
    // slower over a head's 128 or 256 keys (AMD EPYC Zen 4), four slower still. The rows'
    // sums take their vectors in the same order either way.
    const J: usize = 1;
    split!(0..vectors, J, |c| {
        let mut live = [[0u16; J]; R];
        let mut x = [[_mm512_setzero_ps(); J]; R];
        for r in 0..R {
            for j in 0..J {
                live[r][j] = lanes(r, c + j);
                // SAFETY: as above.
                let v = unsafe { _mm512_maskz_loadu_ps(live[r][j], rows[r].add((c + j) * W)) };
                x[r][j] = _mm512_sub_ps(v, _mm512_set1_ps(m[r]));
            }
        }
        // A live lane's difference is at most 0 (or NaN): m is its row's largest.
        exp_all!(x, R, J, at_most_zero);
        for j in 0..J {
            for r in 0..R {
                x[r][j] = _mm512_maskz_mov_ps(live[r][j], x[r][j]);
                sum[r] = _mm512_add_ps(sum[r], x[r][j]);
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_ps(rows[r].add((c + j) * W), live[r][j], x[r][j]) };
            }
        }
    });
    let total = lane_trees!(sum, R, _mm256_add_ps, _mm_add_ps, _mm_add_ss);
    for r in 0..R {
        let inv = _mm512_set1_ps(1.0 / total[r]);
        // A row with no live score, or only −∞ ones, is all zero (its exponentials are NaN).
        let all = m[r] != f32::NEG_INFINITY;
        let cut = whole.min(len.div_ceil(W));
        // The whole vectors (below `len` too), plainly: each weight scaled, or all zero.
        for c in 0..cut {
            // SAFETY: vector c lies below the row's limit, inside its `len` floats.
            unsafe {
                let at = rows[r].add(c * W);
                let x = if all {
                    _mm512_mul_ps(_mm512_loadu_ps(at), inv)
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_storeu_ps(at, x);
            }
        }
        for c in cut..len.div_ceil(W) {
            let keep = if all { lanes(r, c) } else { 0 };
            // SAFETY: the lanes loaded lie below the limit, those stored below `len`.
            unsafe {
                let at = rows[r].add(c * W);
                let x = _mm512_maskz_loadu_ps(keep, at);
                _mm512_mask_storeu_ps(at, first_lanes(len - c * W), _mm512_maskz_mul_ps(keep, x, inv));
            }
        }
    }
}

/// [`softmax_stored`] of the stored rows `rows` (row `i` at `row(i)`, over its first
/// `limit(i)` of `len` floats): four side by side, then the rows left one at a time.
///
/// # Safety
/// As [`softmax_stored`], for each row of `rows`.
unsafe fn softmax_stored_rows(
    row: impl Fn(usize) -> *mut f32,
    limit: impl Fn(usize) -> usize,
    rows: Range<usize>,
    len: usize,
) {
    let mut i = rows.start;
    while i + 4 <= rows.end {
        let at: [usize; 4] = std::array::from_fn(|r| i + r);
        // SAFETY: the caller's rows; AVX-512F.
        unsafe { softmax_stored(at.map(&row), at.map(&limit), len) };
        i += 4;
    }
    for i in i..rows.end {
        // SAFETY: as above.
        unsafe { softmax_stored([row(i)], [limit(i)], len) };
    }
}

/// Rows `i..i + R` of [`products`], all `R·C` vectors of them in registers: each element a
/// chain of fused multiply-adds over the terms in order, as the GEMM's micro-kernel, scaled
/// by `alpha` after the sum; then, with `SOFTMAX`, the softmax of each row.
///
/// # Safety
/// As [`products`], for rows `i..i + R` and `C` vectors covering `width`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn product<
    const R: usize,
    const C: usize,
    const SOFTMAX: bool,
    const ROWS: bool,
    L: Fn(usize) -> usize,
>(
    a: *const f32,
    ts: isize,
    rs: isize,
    b: Strided,
    i: usize,
    terms: usize,
    width: usize,
    alpha: f32,
    limit: Option<&L>,
    out: Strided,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut live = [0u16; C];
    for (c, live) in live.iter_mut().enumerate() {
        *live = crate::kernels::simd::first_lanes(width.saturating_sub(c * W));
    }
    // Row r's term t at a + t·ts + r·rs, rs a constant 1 for a transposed factor.
    let rs = if ROWS { rs } else { 1 };
    // SAFETY: the caller's rows i..i+R of each of the terms of the left factor.
    let mut a = unsafe { a.offset(i as isize * rs) };
    for t in 0..terms {
        let mut bv = [_mm512_setzero_ps(); C];
        for (c, bv) in bv.iter_mut().enumerate() {
            // SAFETY: the lanes loaded are columns below width of row t of b (the caller).
            *bv = unsafe { _mm512_maskz_loadu_ps(live[c], b.addr(t, c * W)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let w = _mm512_set1_ps(unsafe { *a.offset(r as isize * rs) });
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(w, bv, *acc);
            }
        }
        // The next term's rows (past the last only computed, never read).
        a = a.wrapping_offset(ts);
    }
    let s = _mm512_set1_ps(alpha);
    // By indices (`each!`), not `iter_mut().flatten()`: the flattened iterator kept the sums
    // on the stack, each one stored, loaded, scaled and stored again.
    each!(acc, R, C, |v| _mm512_mul_ps(v, s));
    if SOFTMAX && let Some(limit) = limit {
        let mut row_live = [[0u16; C]; R];
        for (r, row_live) in row_live.iter_mut().enumerate() {
            let n = limit(i + r).min(width);
            for (c, l) in row_live.iter_mut().enumerate() {
                *l = crate::kernels::simd::first_lanes(n.saturating_sub(c * W));
            }
        }
        softmax_rows!(acc, row_live, R, C);
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &acc) in acc.iter().enumerate() {
            // SAFETY: columns below width of row i + r of out (the caller).
            unsafe {
                if out.cs == 1 {
                    _mm512_mask_storeu_ps(out.addr(i + r, c * W), live[c], acc);
                } else {
                    let mut v = [0.0f32; W];
                    _mm512_storeu_ps(v.as_mut_ptr(), acc);
                    let n = width.saturating_sub(c * W).min(W);
                    for (e, &x) in v[..n].iter().enumerate() {
                        *out.addr(i + r, c * W + e) = x;
                    }
                }
            }
        }
    }
}

/// [`super::step_head`] in registers, where [`in_registers`] takes it: `false` (and nothing
/// written) where it does not.
///
/// # Safety
/// As [`super::step_head`].
pub(super) unsafe fn try_step_head<F: Float, S: Cached<F>>(
    h: &StepHead<'_, F, S>,
    scores: &mut [F],
    out: &mut [F],
) -> bool {
    let cache = in_registers::<F, S>(h.kb, out.len());
    // SAFETY: as `in_registers_as!` asks; the caller vouches for the keys and values.
    unsafe { in_registers_as!(cache, StepHead, h, scores, out, step_head_avx512) }
}

/// [`super::step_row`] in registers (`dv` value features a head), where [`in_registers`]
/// takes it and there are keys: `false` (and nothing written) where not.
///
/// # Safety
/// As [`super::step_row`].
pub(super) unsafe fn try_step_row<F: Float, S: Cached<F>>(
    r: &StepRow<'_, F, S>,
    dv: usize,
    scores: &mut [F],
    out: &mut [F],
) -> bool {
    let cache = in_registers::<F, S>(r.kb, dv).filter(|_| r.kb > 0);
    // SAFETY: as `in_registers_as!` asks; the caller vouches for the heads.
    unsafe { in_registers_as!(cache, StepRow, r, scores, out, step_row_avx512) }
}

/// Whether a decoding step of `kb` keys and `dv` value features per head runs in registers
/// (`f32`, AVX-512F with BW and VL, at most [`MAX_KEYS`] of each), and over which cache;
/// `None` for the slices.
fn in_registers<F: 'static, S: 'static>(kb: usize, dv: usize) -> Option<StepCache> {
    let vectors = kb <= MAX_KEYS
        && dv <= MAX_KEYS
        && crate::kernels::gemm::Isa::best() == Some(crate::kernels::gemm::Isa::Avx512)
        && avx512_bw_vl();
    super::step_cache::<F, S>(vectors)
}

/// Whether the CPU has AVX-512BW and VL besides AVX-512F: [`super::step_head`]'s vector path (the
/// masked 16-bit loads of a bf16 cache need them; every CPU with AVX-512 since Skylake-SP
/// has them).
fn avx512_bw_vl() -> bool {
    static HAS: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        crate::kernels::cpu::avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    });
    *HAS
}

/// Sixteen cached elements as `f32` lanes (lanes outside `mask` zero, and not read).
trait Lanes: Copy {
    /// # Safety
    /// The CPU has AVX-512F, BW and VL; the lanes of `mask` are readable at `p`.
    unsafe fn lanes(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn lanes(p: *const f32, mask: u16) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p) }
    }
}

impl Lanes for u16 {
    #[inline(always)]
    unsafe fn lanes(p: *const u16, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; a bf16's bits are the high half of its f32's.
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// [`super::step_head`] with the scores and the output in registers (four vectors each at most).
///
/// # Safety
/// As [`super::step_head`]; the CPU has AVX-512F, BW and VL; `kb` and `out.len()` are at most
/// [`MAX_KEYS`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn step_head_avx512<S: Lanes>(h: &StepHead<'_, f32, S>, scores: &mut [f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (kb, dv) = (h.kb, out.len());
    let masks = |len: usize| -> [u16; 4] {
        std::array::from_fn(|c| crate::kernels::simd::first_lanes(len.saturating_sub(c * W)))
    };
    let (mk, mv) = (masks(kb), masks(dv));
    let mut acc = [_mm512_setzero_ps(); 4];
    for (d, &qd) in h.q.iter().enumerate() {
        let qd = _mm512_set1_ps(qd * h.scale);
        // SAFETY: row d of the keys holds kb floats (caller); the masks cover them.
        let row = unsafe { h.kt.offset(d as isize * h.kt_rs) };
        for c in 0..4 {
            if mk[c] != 0 {
                let k = unsafe { S::lanes(row.add(c * W), mk[c]) };
                acc[c] = _mm512_fmadd_ps(qd, k, acc[c]);
            }
        }
    }
    let scores = &mut scores[..kb];
    for c in 0..4 {
        if mk[c] != 0 {
            // SAFETY: the mask covers the scores' floats of vector c.
            unsafe { _mm512_mask_storeu_ps(scores.as_mut_ptr().add(c * W), mk[c], acc[c]) };
        }
    }
    crate::kernels::softmax::softmax_row_inline(scores, h.mask);
    let mut acc = [_mm512_setzero_ps(); 4];
    for (j, &p) in scores.iter().enumerate() {
        if h.mask.allows(j) {
            let p = _mm512_set1_ps(p);
            // SAFETY: row j of the values holds dv floats (caller); the masks cover them.
            let row = unsafe { h.v.offset(j as isize * h.v_rs) };
            for c in 0..4 {
                if mv[c] != 0 {
                    let x = unsafe { S::lanes(row.add(c * W), mv[c]) };
                    acc[c] = _mm512_fmadd_ps(p, x, acc[c]);
                }
            }
        }
    }
    for c in 0..4 {
        if mv[c] != 0 {
            // SAFETY: the mask covers out's floats of vector c.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(c * W), mv[c], acc[c]) };
        }
    }
}

/// [`super::step_row`] with AVX-512: the heads in groups of eight or four side by side, the
/// rest one at a time ([`step_head_avx512`]).
///
/// # Safety
/// As [`super::step_row`]; the CPU has AVX-512F, BW and VL; `1 ≤ kb ≤ MAX_KEYS`, `d_v ≤
/// MAX_KEYS`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn step_row_avx512<S: Lanes>(r: &StepRow<'_, f32, S>, scores: &mut [f32], out: &mut [f32]) {
    let dv = out.len() / r.heads;
    let widest = r.kb.div_ceil(W).max(dv.div_ceil(W));
    let mut hi = 0;
    while hi < r.heads {
        let left = r.heads - hi;
        // SAFETY (each): heads hi.. of the row (caller), the group inside them.
        unsafe {
            if left >= 8 && widest <= 2 {
                group_avx512::<S, 8>(r, hi, out);
                hi += 8;
            } else if left >= 4 {
                group_avx512::<S, 4>(r, hi, out);
                hi += 4;
            } else {
                step_head_avx512(&r.head(hi), scores, &mut out[hi * dv..][..dv]);
                hi += 1;
            }
        }
    }
}

/// Heads `first..first + G` of `r` side by side: their scores and softmax
/// ([`group_scores`]), then their outputs ([`group_values`]), each over as many vectors as
/// the keys, resp. the value features, fill.
///
/// # Safety
/// As [`step_row_avx512`]; `first + G ≤ heads`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn group_avx512<S: Lanes, const G: usize>(r: &StepRow<'_, f32, S>, first: usize, out: &mut [f32]) {
    let mut probs = [[0.0f32; MAX_KEYS]; G];
    let dv = out.len() / r.heads;
    // SAFETY (all): forwarded from this function's contract; each vector count is the one
    // that kb, resp. d_v, fills (at most 4, as both are at most MAX_KEYS).
    unsafe {
        match r.kb.div_ceil(W) {
            1 => group_scores::<S, G, 1>(r, first, &mut probs),
            2 => group_scores::<S, G, 2>(r, first, &mut probs),
            3 => group_scores::<S, G, 3>(r, first, &mut probs),
            _ => group_scores::<S, G, 4>(r, first, &mut probs),
        }
        match dv.div_ceil(W) {
            0 => {}
            1 => group_values::<S, G, 1>(r, first, &probs, out),
            2 => group_values::<S, G, 2>(r, first, &probs, out),
            3 => group_values::<S, G, 3>(r, first, &probs, out),
            _ => group_values::<S, G, 4>(r, first, &probs, out),
        }
    }
}

/// The attention weights of heads `first..first + G` over their `kb ≤ 16·NK` keys, into
/// `probs`: each score a chain of fused multiply-adds over the features in order from
/// `q_d·scale`, as [`step_head_avx512`], the `G` heads' chains interleaved; then the softmax,
/// in registers for a plain limit (`softmax_rows!`), else of each head's stored row.
///
/// # Safety
/// As [`group_avx512`]; `kb` fills `NK` vectors.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn group_scores<S: Lanes, const G: usize, const NK: usize>(
    r: &StepRow<'_, f32, S>,
    first: usize,
    probs: &mut [[f32; MAX_KEYS]; G],
) {
    use std::arch::x86_64::*;
    let kb = r.kb;
    let dk = r.q.len() / r.heads;
    let mk: [u16; NK] = std::array::from_fn(|c| crate::kernels::simd::first_lanes(kb.saturating_sub(c * W)));
    // The heads' queries by pointer: a bounds check in the loop (a way out of it, to a panic)
    // had kept a copy of every accumulator in memory, stored after each multiply-add.
    let q: [*const f32; G] = std::array::from_fn(|g| r.q[(first + g) * dk..][..dk].as_ptr());
    let kts: [*const S; G] = std::array::from_fn(|g| r.kt_of(first + g));
    let mut acc = [[_mm512_setzero_ps(); NK]; G];
    for d in 0..dk {
        for (g, acc) in acc.iter_mut().enumerate() {
            // SAFETY: d < d_k, inside head first + g's queries (sliced above).
            let qd = _mm512_set1_ps(unsafe { *q[g].add(d) } * r.scale);
            // SAFETY: head first + g's row d of keys holds kb elements (caller); the masks
            // cover them.
            let row = unsafe { kts[g].offset(d as isize * r.kt_rs) };
            for (c, acc) in acc.iter_mut().enumerate() {
                let k = unsafe { S::lanes(row.add(c * W), mk[c]) };
                *acc = _mm512_fmadd_ps(qd, k, *acc);
            }
            // The next rows' lines where this row's lie in theirs.
            if let Some((next, _)) = r.next {
                ask_ahead(row, NK * W, next);
            }
        }
    }
    if r.mask.keys.is_none() && r.mask.pairs.is_none() {
        let limit = r.mask.limit.min(kb);
        let live: [[u16; NK]; G] =
            [std::array::from_fn(|c| crate::kernels::simd::first_lanes(limit.saturating_sub(c * W))); G];
        softmax_rows!(acc, live, G, NK);
        for (p, acc) in probs.iter_mut().zip(&acc) {
            for (c, &x) in acc.iter().enumerate() {
                // SAFETY: NK vectors fit a row of MAX_KEYS floats.
                unsafe { _mm512_storeu_ps(p.as_mut_ptr().add(c * W), x) };
            }
        }
    } else {
        for (p, acc) in probs.iter_mut().zip(&acc) {
            for (c, &x) in acc.iter().enumerate() {
                // SAFETY: as above; the mask covers kb floats.
                unsafe { _mm512_mask_storeu_ps(p.as_mut_ptr().add(c * W), mk[c], x) };
            }
            crate::kernels::softmax::softmax_row_inline(&mut p[..kb], r.mask);
        }
    }
}

/// The outputs of heads `first..first + G` (`d_v ≤ 16·NO` features each) from their weights
/// in `probs`: each feature a chain of fused multiply-adds over the allowed positions in
/// order, as [`step_head_avx512`], the `G` heads' chains interleaved.
///
/// # Safety
/// As [`group_avx512`]; `d_v` fills `NO` vectors.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::needless_range_loop)] // j indexes a position in every head's weights
unsafe fn group_values<S: Lanes, const G: usize, const NO: usize>(
    r: &StepRow<'_, f32, S>,
    first: usize,
    probs: &[[f32; MAX_KEYS]; G],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let dv = out.len() / r.heads;
    let mv: [u16; NO] = std::array::from_fn(|c| crate::kernels::simd::first_lanes(dv.saturating_sub(c * W)));
    let plain = r.mask.keys.is_none() && r.mask.pairs.is_none();
    let vs: [*const S; G] = std::array::from_fn(|g| r.v_of(first + g));
    let mut acc = [[_mm512_setzero_ps(); NO]; G];
    for j in 0..r.mask.limit.min(r.kb) {
        if plain || r.mask.allows(j) {
            for (g, acc) in acc.iter_mut().enumerate() {
                let p = _mm512_set1_ps(probs[g][j]);
                // SAFETY: head first + g's value row j holds d_v elements (caller); the
                // masks cover them.
                let row = unsafe { vs[g].offset(j as isize * r.v_rs) };
                for (c, acc) in acc.iter_mut().enumerate() {
                    let x = unsafe { S::lanes(row.add(c * W), mv[c]) };
                    *acc = _mm512_fmadd_ps(p, x, *acc);
                }
                if let Some((_, next)) = r.next {
                    ask_ahead(row, NO * W, next);
                }
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        let o = &mut out[(first + g) * dv..][..dv];
        for (c, &x) in acc.iter().enumerate() {
            // SAFETY: the mask covers the head's d_v floats of vector c.
            unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr().add(c * W), mv[c], x) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::{Isa, gemm};
    use crate::kernels::small_head::tests::{KEYS, assert_rows_bits, random, row_softmaxes, score};
    use crate::kernels::softmax::{RowMask, softmax_row, softmax_row_backward};
    use ndarray::{Array2, s};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn same(a: &Array2<f32>, b: ndarray::ArrayView2<f32>) -> bool {
        a.dim() == b.dim() && a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Heads of every kind of size this path takes: edges of vectors, of 8 × 8 blocks and of
    /// four-row blocks, a few-row head, the widest d_k, heads of more keys than a row's
    /// softmax in registers (in blocks of queries under a causal mask, the last block longer
    /// than the others).
    const HEADS: [(usize, usize, usize, usize); 11] = [
        (1, 5, 8, 8),
        (9, 1, 8, 5),
        (16, 16, 16, 16),
        (13, 17, 31, 20),
        (33, 33, 32, 32),
        (32, 64, 64, 64),
        (40, 50, 128, 48),
        (70, 7, 9, 3),
        (100, 100, 32, 32),
        (50, 130, 16, 24),
        (81, 300, 24, 40),
    ];

    /// Query blocks with the keys they see at most, and key blocks with the first query that
    /// sees one, as the attention layer cuts a head: blocks of 32 under a causal mask (the
    /// last taking 16 to 47), else one.
    #[allow(clippy::type_complexity)]
    fn blocks(
        tq: usize,
        kb: usize,
        causal: bool,
        mask: &impl Fn(usize) -> RowMask<'static>,
    ) -> (
        Vec<(std::ops::Range<usize>, usize)>,
        Vec<(std::ops::Range<usize>, usize)>,
    ) {
        let cut = |n: usize| {
            let count = if causal { (n + 16) / 32 } else { 1 }.max(1);
            (0..count).map(move |i| i * 32..if i + 1 == count { n } else { (i + 1) * 32 })
        };
        let queries = cut(tq).map(|r| (r.clone(), r.map(|i| mask(i).limit).max().unwrap_or(0).min(kb)));
        let keys = cut(kb).map(|r| ((0..tq).find(|&i| mask(i).limit > r.start).unwrap_or(tq), r));
        (queries.collect(), keys.map(|(f, r)| (r, f)).collect())
    }

    /// Mask kinds: (causal, padding flags, dropout).
    const KINDS: [(bool, bool, bool); 4] = [
        (false, false, false),
        (true, false, false),
        (true, false, true),
        (false, true, true),
    ];

    fn mask(causal: bool, flags: bool, kb: usize) -> impl Fn(usize) -> RowMask<'static> {
        move |i| RowMask {
            limit: if causal { (i + 1).min(kb) } else { kb },
            keys: flags.then_some(&KEYS[..kb + 3]),
            pairs: None,
        }
    }

    struct Case {
        q: Array2<f32>,
        k: Array2<f32>,
        v: Array2<f32>,
        /// The dropout mask by key, and the same mask stored, `[tq, kb]`.
        drop: Option<(DropRows, Array2<f32>)>,
        scale: f32,
    }

    /// `x` inside a wider array, its rows `x.ncols() + 3` apart, as a head's rows lie inside
    /// `[B, T, H·d]`: a path that took the row stride for the row length would show.
    fn spaced(x: &Array2<f32>) -> Array2<f32> {
        let mut wide = Array2::from_elem((x.nrows(), x.ncols() + 3), f32::NAN);
        wide.slice_mut(s![.., ..x.ncols()]).assign(x);
        wide
    }

    fn case(rng: &mut StdRng, (tq, kb, dk, dv): (usize, usize, usize, usize), dropped: bool) -> Case {
        let mut k = random(rng, (kb, dk));
        k[[0, 0]] = 40.0; // a large score
        // A head inside a wider array, as in [B, H, Tq, Tk]: rows kb + 5 apart, from an
        // offset.
        let key = crate::kernels::DropKey::draw(0.3, rng);
        let rows = DropRows {
            key,
            at: 1000,
            stride: kb + 5,
        };
        let drop = (rows, rows.dense(tq, kb));
        Case {
            q: random(rng, (tq, dk)),
            k,
            v: random(rng, (kb, dv)),
            drop: dropped.then_some(drop),
            scale: 1.0 / (dk as f32).sqrt(),
        }
    }

    /// The general path's forward: two GEMM calls and a softmax per row.
    fn general_forward(
        c: &Case,
        mask: &impl Fn(usize) -> RowMask<'static>,
        tk: usize,
    ) -> (Array2<f32>, Array2<f32>) {
        let (tq, kb, dv) = (c.q.nrows(), c.k.nrows(), c.v.ncols());
        let mut probs = Array2::zeros((tq, tk));
        gemm(c.scale, c.q.view(), c.k.t(), 0.0, probs.slice_mut(s![.., ..kb]));
        for (i, mut row) in probs.rows_mut().into_iter().enumerate() {
            softmax_row(row.as_slice_mut().unwrap(), mask(i));
        }
        let mut out = Array2::from_elem((tq, dv), f32::NAN);
        let p = match &c.drop {
            Some((_, m)) => &probs.slice(s![.., ..kb]) * m,
            None => probs.slice(s![.., ..kb]).to_owned(),
        };
        gemm(1.0, p.view(), c.v.view(), 0.0, out.view_mut());
        (probs, out)
    }

    fn skip() -> bool {
        let skip = Isa::best() != Some(Isa::Avx512);
        if skip {
            eprintln!("skipped: this CPU has no AVX-512F, the only path of small_head");
        }
        skip
    }

    #[test]
    fn forward_equals_the_general_path_bit_for_bit() {
        if skip() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(3);
        for dims in HEADS {
            let (tq, kb, _, dv) = dims;
            for (causal, flags, dropped) in KINDS {
                let c = case(&mut rng, dims, dropped);
                let tk = kb + 3;
                let mask = mask(causal, flags, kb);
                let (want_p, want_o) = general_forward(&c, &mask, tk);
                let mut probs = Array2::from_elem((tq, tk), f32::NAN);
                // Output columns strided, as a head's columns inside [B, T, H·d_v] are not.
                let mut wide = Array2::from_elem((tq, 2 * dv), f32::NAN);
                let mut out = wide.slice_mut(s![.., ..;2]);
                let q = spaced(&c.q);
                let q = q.slice(s![.., ..c.q.ncols()]);
                let head = SmallHead::new(q, c.k.view(), c.v.view()).expect("a head this path takes");
                let drop = c.drop.as_ref().map(|m| m.0);
                let mut p = probs.view_mut();
                let queries = blocks(tq, kb, causal, &mask).0.into_iter();
                // SAFETY: f32, and the views given to new are alive.
                unsafe {
                    if flags {
                        let rows = |i, row: &mut [f32]| softmax_row(row, mask(i));
                        head.forward(
                            c.scale,
                            RowSoftmax::<fn(usize) -> usize, _>::Rows(rows),
                            queries,
                            drop,
                            &mut p,
                            &mut out,
                        );
                    } else {
                        let limit = |i| mask(i).limit;
                        let limit = RowSoftmax::<_, fn(usize, &mut [f32])>::Limit(limit);
                        head.forward(c.scale, limit, queries, drop, &mut p, &mut out);
                    }
                }
                let name = format!("{dims:?}, causal {causal}, flags {flags}, dropout {dropped}");
                assert!(same(&want_p, probs.view()), "probabilities differ: {name}");
                assert!(same(&want_o, out.view()), "outputs differ: {name}");
                assert!(
                    wide.slice(s![.., 1..;2]).iter().all(|x| x.is_nan()),
                    "wrote between columns: {name}"
                );
            }
        }
    }

    #[test]
    fn backward_equals_the_general_path_bit_for_bit() {
        if skip() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(4);
        let mut taken = 0;
        for dims in HEADS {
            let (tq, kb, dk, dv) = dims;
            for (causal, flags, dropped) in KINDS {
                let c = case(&mut rng, dims, dropped);
                let mask = mask(causal, flags, kb);
                let (probs, _) = general_forward(&c, &mask, kb);
                let g = random(&mut rng, (tq, dv));
                // The general path: four GEMM calls and the softmax's backward per row.
                let pd = match &c.drop {
                    Some((_, m)) => &probs * m,
                    None => probs.clone(),
                };
                let mut want_v = Array2::zeros((kb, dv));
                gemm(1.0, pd.t(), g.view(), 0.0, want_v.view_mut());
                let mut gp = Array2::zeros((tq, kb));
                gemm(1.0, g.view(), c.v.t(), 0.0, gp.view_mut());
                if let Some((_, m)) = &c.drop {
                    gp *= m;
                }
                let mut gs = Array2::zeros((tq, kb));
                for i in 0..tq {
                    let (p, gpi) = (probs.row(i), gp.row(i));
                    softmax_row_backward(
                        p.as_slice().unwrap(),
                        gpi.as_slice().unwrap(),
                        gs.row_mut(i).into_slice().unwrap(),
                        mask(i),
                    );
                }
                let mut want_q = Array2::zeros((tq, dk));
                gemm(c.scale, gs.view(), c.k.view(), 0.0, want_q.view_mut());
                let mut want_k = Array2::zeros((kb, dk));
                gemm(c.scale, gs.t(), c.q.view(), 0.0, want_k.view_mut());

                let q = spaced(&c.q);
                let q = q.slice(s![.., ..dk]);
                let head = SmallHead::new(q, c.k.view(), c.v.view()).expect("a head this path takes");
                let name = format!("{dims:?}, causal {causal}, flags {flags}, dropout {dropped}");
                if !head.takes_backward() {
                    assert!(dk > MAX_KEYS || !packed_in_one_block(kb, tq), "{name}");
                    continue;
                }
                taken += 1;
                let mut grads = (
                    Array2::from_elem((tq, dk), f32::NAN),
                    Array2::from_elem((kb, dk), f32::NAN),
                    Array2::from_elem((kb, 2 * dv), f32::NAN),
                );
                let drop = c.drop.as_ref().map(|m| m.0);
                // One query: a row stride of 0, as ndarray may give an axis of length 1.
                let probs_view = if tq == 1 {
                    use ndarray::ShapeBuilder;
                    ndarray::ArrayView2::from_shape((1, kb).strides((0, 1)), probs.as_slice().unwrap())
                        .unwrap()
                } else {
                    probs.view()
                };
                let sb = |i, p: &[f32], gp: &[f32], gs: &mut [f32]| softmax_row_backward(p, gp, gs, mask(i));
                let (queries, keys) = blocks(tq, kb, causal, &mask);
                // SAFETY: f32, the views given to new are alive, and it takes the backward.
                unsafe {
                    head.backward(
                        c.scale,
                        queries.into_iter(),
                        keys.into_iter(),
                        probs_view,
                        drop,
                        spaced(&g).slice(s![.., ..dv]),
                        sb,
                        &mut grads.0.view_mut(),
                        &mut grads.1.view_mut(),
                        &mut grads.2.slice_mut(s![.., ..;2]),
                    )
                };
                assert!(same(&want_q, grads.0.view()), "∂L/∂Q differs: {name}");
                assert!(same(&want_k, grads.1.view()), "∂L/∂K differs: {name}");
                assert!(
                    same(&want_v, grads.2.slice(s![.., ..;2])),
                    "∂L/∂V differs: {name}"
                );
            }
        }
        // (70, 7, 9, 3) has a few-row ∂L/∂V (7 rows of 70 terms); (40, 50, 128, 48) too wide a d_k.
        assert_eq!(taken, 4 * (HEADS.len() - 2));
    }

    #[test]
    fn exp_all_is_exp_f32_bit_for_bit() {
        if !crate::kernels::cpu::avx512() {
            eprintln!("skipped: this CPU has no AVX-512F (or VASWANI_MAX_ISA asks for less)");
            return;
        }
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            88.7,
            88.72,
            88.73,
            -86.5,
            -86.49,
            -86.51,
            -87.0,
            100.0,
            -100.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            -1e-30,
        ];
        let mut rng = StdRng::seed_from_u64(5);
        xs.extend((0..4096).map(|_| rng.random_range(-90.0f32..90.0)));
        // A block of 3 rows of 2 vectors at a time, as a softmax of rows of 32 keys has them.
        const BLOCK: usize = 3 * 2 * W;
        xs.resize(xs.len().next_multiple_of(BLOCK), 0.5);
        #[target_feature(enable = "avx512f")]
        fn block(x: &[f32], out: &mut [f32], nonpositive: &mut [f32]) {
            use std::arch::x86_64::*;
            // SAFETY (loads and stores): 3·2 vectors of 16 floats, inside the three slices.
            let mut v: [[__m512; 2]; 3] = std::array::from_fn(|r| {
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(x[(2 * r + c) * W..].as_ptr()) })
            });
            let mut below = v;
            exp_all!(v, 3, 2);
            exp_all!(below, 3, 2, at_most_zero);
            for r in 0..3 {
                for c in 0..2 {
                    unsafe { _mm512_storeu_ps(out[(2 * r + c) * W..].as_mut_ptr(), v[r][c]) };
                    unsafe { _mm512_storeu_ps(nonpositive[(2 * r + c) * W..].as_mut_ptr(), below[r][c]) };
                }
            }
        }
        for chunk in xs.chunks_exact(BLOCK) {
            let (mut got, mut below) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
            // SAFETY: AVX-512F checked above.
            unsafe { block(chunk, &mut got, &mut below) };
            for ((&x, &g), &b) in chunk.iter().zip(&got).zip(&below) {
                let want = crate::kernels::simd::exp_f32(x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "exp_all!({x}) = {g}, exp_f32 = {want}"
                );
                // The form without the upper clamp, for inputs at most 0 or NaN.
                assert!(
                    !(x <= 0.0 || x.is_nan())
                        || b.to_bits() == want.to_bits()
                        || (b.is_nan() && want.is_nan()),
                    "exp_all!({x}, at_most_zero) = {b}, exp_f32 = {want}"
                );
            }
        }
    }

    /// The softmax of a block of rows in registers gives the bits of the general softmax of
    /// each row alone, for rows with no allowed key, with only −∞ scores, with NaN, ±∞ and
    /// scores far apart, at every block shape the products use.
    #[test]
    fn softmax_rows_equals_the_row_softmax_bit_for_bit() {
        if skip() {
            return;
        }
        #[target_feature(enable = "avx512f")]
        fn block<const R: usize, const C: usize>(rows: &mut [[f32; 64]], limits: &[usize]) {
            use std::arch::x86_64::*;
            // SAFETY (loads and stores): C ≤ 4 vectors of 16 floats inside rows of 64.
            let mut x: [[__m512; C]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(rows[r][c * W..].as_ptr()) })
            });
            let live: [[u16; C]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|c| crate::kernels::simd::first_lanes(limits[r].saturating_sub(c * W)))
            });
            softmax_rows!(x, live, R, C);
            for r in 0..R {
                for c in 0..C {
                    unsafe { _mm512_storeu_ps(rows[r][c * W..].as_mut_ptr(), x[r][c]) };
                }
            }
        }
        fn check<const R: usize, const C: usize>(rng: &mut StdRng) {
            for round in 0..200 {
                let width = C * W;
                let mut rows = vec![[0.0f32; 64]; R];
                let mut limits = vec![0; R];
                for (r, (row, limit)) in rows.iter_mut().zip(&mut limits).enumerate() {
                    *limit = match (round + r) % 5 {
                        0 => 0,
                        1 => width,
                        _ => rng.random_range(1..=width),
                    };
                    for x in row[..width].iter_mut() {
                        *x = score(rng);
                    }
                    // Some rows with only −∞ allowed.
                    if round % 7 == r % 7 {
                        row[..width].fill(f32::NEG_INFINITY);
                    }
                }
                let want = row_softmaxes(&rows, width, &limits);
                // SAFETY: AVX-512F (`skip` checked it).
                unsafe { block::<R, C>(&mut rows, &limits) };
                assert_rows_bits(&rows, &want, width, &limits, &format!("{R}×{C}, round {round}"));
            }
        }
        let mut rng = StdRng::seed_from_u64(11);
        check::<16, 1>(&mut rng);
        check::<8, 1>(&mut rng);
        check::<4, 2>(&mut rng);
        check::<4, 3>(&mut rng);
        check::<4, 4>(&mut rng);
        check::<1, 2>(&mut rng);
    }

    #[test]
    fn stored_rows_softmax_equals_the_row_softmax_bit_for_bit() {
        if skip() {
            return;
        }
        fn check<const R: usize>(rng: &mut StdRng) {
            for round in 0..150 {
                // Rows of 1 to 300 floats (vectors partly filled, odd and even counts of them),
                // each with its own limit, some past the row's end.
                let len = rng.random_range(1..=300);
                let mut rows = vec![vec![0.0f32; len]; R];
                let mut limits = [0; R];
                for (r, (row, limit)) in rows.iter_mut().zip(&mut limits).enumerate() {
                    // Every third round, every row whole (the vectors' plain loads and stores).
                    *limit = match (round + r) % 6 {
                        _ if round % 3 == 0 => len + round % 2,
                        0 => 0,
                        1 => len,
                        2 => len + 5,
                        _ => rng.random_range(1..=len),
                    };
                    for x in row.iter_mut() {
                        *x = score(rng);
                    }
                    if round % 7 == r % 7 {
                        row.fill(f32::NEG_INFINITY);
                    }
                }
                let want = row_softmaxes(&rows, len, &limits);
                let at: [*mut f32; R] = std::array::from_fn(|r| rows[r].as_mut_ptr());
                // SAFETY: AVX-512F (`skip` checked it); R rows of `len` floats each.
                unsafe { softmax_stored(at, limits, len) };
                assert_rows_bits(
                    &rows,
                    &want,
                    len,
                    &limits,
                    &format!("{R} rows of {len}, round {round}"),
                );
            }
        }
        let mut rng = StdRng::seed_from_u64(12);
        check::<4>(&mut rng);
        check::<1>(&mut rng);
    }
}
