//! Scaled dot-product attention (Eq. 1, §3.2.1): `Attention(Q, K, V) = softmax(QKᵀ/√d_k)·V`.
//!
//! Each query row of Q is compared with every key row of K; the scores are scaled by
//! `1/√d_k` "to counteract" the growth of dot products with d_k (§3.2.1, footnote 4), masked
//! (see [`Mask`]), turned into weights by a softmax over the keys, optionally dropped out,
//! and used to average the rows of V.
//!
//! The core, [`attention_forward`] and [`attention_backward`], works on 4-D views
//! `[B, H, T, d]` with any strides; [`attention_infer`] is its forward pass for inference,
//! which keeps no weights (each head's in a buffer of the thread's while it runs).
//! [`crate::layers::MultiHead`] hands it per-head views of its `[B·T, d_model]` projections
//! (head h is columns `h·d_k .. (h+1)·d_k`), so heads are never copied apart or
//! concatenated back: the output is written in place into the concatenated layout. A head
//! of up to 512 keys, on AVX-512 CPUs, runs in vector registers instead of as two GEMM
//! calls, with the same arithmetic and bits (`kernels::small_head`). Under a causal mask a
//! head goes in blocks of 32 queries, each computing its scores, softmax and products only
//! up to the last key one of its queries sees (its backward, in blocks of keys, from the
//! first query that sees one): the blocked half is skipped rather than computed and zeroed,
//! with the same results. The (b, h) pairs run in parallel on the rayon pool; each is
//! computed whole by one thread, so results do not depend on the thread count. The
//! attention dropout mask over `[B, H, Tq, Tk]` takes one draw from the caller's RNG before
//! the parallel part (the key of [`DropKey`], as
//! [`dropout_mask`](crate::kernels::dropout_mask) of that shape would take) and is never
//! stored: each head computes the factors of its weights, in (b, h, i, j) order, where it
//! multiplies them, only below the keys a block of queries sees, forward and backward.
//!
//! # Backward
//! With `S = QKᵀ/√d_k`, `P = softmax(S)`, `P' = P ⊙ M` (dropout mask M), `O = P'V` and
//! `G = ∂L/∂O`:
//! `∂L/∂V = P'ᵀG`, `∂L/∂P = (G·Vᵀ) ⊙ M`,
//! `∂L/∂S = P ⊙ (∂L/∂P − rowsum(P ⊙ ∂L/∂P))` (zero at blocked keys),
//! `∂L/∂Q = ∂L/∂S · K / √d_k`, `∂L/∂K = (∂L/∂S)ᵀ · Q / √d_k`.
//!
//! # Masked keys
//! Keys blocked for every query of a sequence (padding, by [`Mask::key_lengths`] or
//! [`Mask::key_padding`]) never reach the output or the gradients, even if their keys or
//! values hold NaN: padding by length is skipped outright (less work, too), padding by flags
//! is zeroed in a copy of K and V when it holds a non-finite value. Keys blocked for only some
//! queries (causal, explicit pairs) get weight exactly 0, so *finite* values there change
//! nothing, bit for bit; NaN there would reach the output through `0·NaN`, as in PyTorch,
//! except where a causal head's blocks skip the pair (beyond its block of 32 queries).
//!
//! PyTorch equivalent: `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)`, whose
//! fully masked rows also come out as zeros.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array3;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::layers::{AttentionConfig, Mask};
//!
//! let attn = AttentionConfig::new().init()?;
//! let q = Array3::<f32>::ones((2, 4, 8)); // [B, Tq, d_k]
//! let kv = Array3::<f32>::ones((2, 6, 8)); // [B, Tk, d_k]
//! let (out, cache) = attn.forward(q.view(), kv.view(), kv.view(), &Mask::key_lengths(&[6, 3]), &mut StdRng::seed_from_u64(0));
//! assert_eq!(out.dim(), (2, 4, 8));
//! let w = cache.weights(); // [B, 1, Tq, Tk]
//! assert_eq!(w[[1, 0, 0, 5]], 0.0); // padding gets no weight
//! assert!((w.slice(vaswani::ndarray::s![1, 0, 0, ..]).sum() - 1.0).abs() < 1e-6);
//! # Ok::<(), vaswani::Error>(())
//! ```

use std::ops::Range;

use ndarray::{
    Array2, Array3, Array4, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis, CowArray,
    s,
};
use rand::{Rng, RngCore};

use crate::error::{Result, check};
use crate::kernels::dropout::DropRows;
use crate::kernels::parallel::{PairViews, for_each_chunk_mut, for_each_index};
use crate::kernels::precision::{Precision, with_precision};
use crate::kernels::simd::widest;
use crate::kernels::small_head::{Cached, StepRow, step_row};
#[cfg(target_arch = "x86_64")]
use crate::kernels::small_head::{
    RowSoftmax, SmallHead, head_backward_avx2, head_forward_avx2, product_avx2,
};
use crate::kernels::softmax::{softmax_row_backward_inline, softmax_row_inline};
use crate::kernels::workspace::{with_thread_scratch, with_weights_scratch};
use crate::kernels::{DropKey, Float, gemm, gemm_blocks, parallel_worth};
use crate::layers::mask::{Mask, ResolvedMask};

/// Configuration of [`ScaledDotProductAttention`].
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AttentionConfig {
    /// Dropout on the attention weights, in training only.
    pub p_drop: f32,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        AttentionConfig::new()
    }
}

/// Scaled dot-product attention on `[B, T, d]` inputs. See the [module docs](self).
///
/// It has no parameters: Q, K and V come in already projected.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaledDotProductAttention {
    /// Its configuration.
    pub cfg: AttentionConfig,
}

/// What the backward pass needs from the forward pass: the inputs, the softmax weights and
/// the dropout mask.
#[derive(Clone, Debug)]
pub struct AttentionCache<F: Float = f32> {
    q: Array3<F>,
    k: Array3<F>,
    v: Array3<F>,
    core: AttentionCoreCache<F>,
}
crate::kernels::workspace::impl_recycle!(AttentionCache<F: Float> { q, k, v, core });

/// The weights and dropout mask of [`attention_forward`], for [`attention_backward`].
#[derive(Clone, Debug)]
pub struct AttentionCoreCache<F: Float = f32> {
    /// `[B, H, Tq, Tk]`: softmax weights, before dropout.
    probs: Array4<F>,
    /// The dropout mask over `[B, H, Tq, Tk]` by its key (each factor, 0 or 1/(1−p), computed
    /// where it is needed, never stored); `None` without dropout.
    drop: Option<DropKey>,
    mask: ResolvedMask,
}
crate::kernels::workspace::impl_recycle!(AttentionCoreCache<F: Float> { probs });

impl AttentionConfig {
    /// No attention dropout.
    pub fn new() -> Self {
        AttentionConfig { p_drop: 0.0 }
    }

    /// The same config with dropout `p` on the attention weights.
    pub fn with_p_drop(mut self, p: f32) -> Self {
        self.p_drop = p;
        self
    }

    /// Builds the layer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if the dropout rate is not in [0, 1).
    pub fn init(&self) -> Result<ScaledDotProductAttention> {
        check::dropout("p_drop", self.p_drop)?;
        Ok(ScaledDotProductAttention { cfg: self.clone() })
    }
}

impl ScaledDotProductAttention {
    /// Forward pass in training mode (dropout on), keeping what backward needs.
    ///
    /// # Shapes
    /// `q` `[B, Tq, d_k]`, `k` `[B, Tk, d_k]`, `v` `[B, Tk, d_v]` → `[B, Tq, d_v]`.
    ///
    /// # Panics
    /// If the shapes do not fit together or the mask does not fit `(B, Tq, Tk)`.
    pub fn forward<F: Float>(
        &self,
        q: ArrayView3<F>,
        k: ArrayView3<F>,
        v: ArrayView3<F>,
        mask: &Mask,
        rng: &mut impl Rng,
    ) -> (Array3<F>, AttentionCache<F>) {
        let (out, core) = self.run(q, k, v, mask, Pass::Train(rng));
        let cache = AttentionCache {
            q: q.to_owned(),
            k: k.to_owned(),
            v: v.to_owned(),
            core: core.expect("kept"),
        };
        (out, cache)
    }

    /// Forward pass without dropout or cache.
    ///
    /// # Panics
    /// As [`ScaledDotProductAttention::forward`].
    pub fn infer<F: Float>(
        &self,
        q: ArrayView3<F>,
        k: ArrayView3<F>,
        v: ArrayView3<F>,
        mask: &Mask,
    ) -> Array3<F> {
        self.run(q, k, v, mask, Pass::Infer).0
    }

    /// Forward pass without dropout, handing back the attention weights `[B, Tq, Tk]`.
    ///
    /// # Panics
    /// As [`ScaledDotProductAttention::forward`].
    pub fn infer_with_weights<F: Float>(
        &self,
        q: ArrayView3<F>,
        k: ArrayView3<F>,
        v: ArrayView3<F>,
        mask: &Mask,
    ) -> (Array3<F>, Array3<F>) {
        let (out, core) = self.run(q, k, v, mask, Pass::Weights);
        (out, core.expect("kept").probs.index_axis_move(Axis(1), 0))
    }

    /// The output, and the core's cache unless `pass` is [`Pass::Infer`].
    fn run<F: Float>(
        &self,
        q: ArrayView3<F>,
        k: ArrayView3<F>,
        v: ArrayView3<F>,
        mask: &Mask,
        pass: Pass<'_>,
    ) -> (Array3<F>, Option<AttentionCoreCache<F>>) {
        let (b, tq, _) = q.dim();
        let dv = v.dim().2;
        let mask = resolve_or_panic(mask, b, tq, k.dim().1);
        let mut out = Array3::zeros((b, tq, dv));
        let (q, k, v) = (
            q.insert_axis(Axis(1)),
            k.insert_axis(Axis(1)),
            v.insert_axis(Axis(1)),
        );
        let core = pass.attend(
            q,
            k,
            v,
            mask,
            self.cfg.p_drop,
            out.view_mut().insert_axis(Axis(1)),
        );
        (out, core)
    }

    /// Backward pass: returns `(∂L/∂Q, ∂L/∂K, ∂L/∂V)`.
    ///
    /// # Panics
    /// If `grad_out` is not `[B, Tq, d_v]`.
    pub fn backward<F: Float>(
        &self,
        cache: &AttentionCache<F>,
        grad_out: ArrayView3<F>,
    ) -> (Array3<F>, Array3<F>, Array3<F>) {
        let mut grad_q = Array3::zeros(cache.q.dim());
        let mut grad_k = Array3::zeros(cache.k.dim());
        let mut grad_v = Array3::zeros(cache.v.dim());
        attention_backward(
            cache.q.view().insert_axis(Axis(1)),
            cache.k.view().insert_axis(Axis(1)),
            cache.v.view().insert_axis(Axis(1)),
            &cache.core,
            grad_out.insert_axis(Axis(1)),
            grad_q.view_mut().insert_axis(Axis(1)),
            grad_k.view_mut().insert_axis(Axis(1)),
            grad_v.view_mut().insert_axis(Axis(1)),
        );
        (grad_q, grad_k, grad_v)
    }
}

impl<F: Float> AttentionCache<F> {
    /// The attention weights of the forward pass, `[B, 1, Tq, Tk]`, before dropout.
    pub fn weights(&self) -> ArrayView4<'_, F> {
        self.core.weights()
    }
}

impl<F: Float> AttentionCoreCache<F> {
    /// The attention weights, `[B, H, Tq, Tk]`, before dropout.
    pub fn weights(&self) -> ArrayView4<'_, F> {
        self.probs.view()
    }

    /// Takes the weights out of the cache.
    pub fn into_weights(self) -> Array4<F> {
        self.probs
    }
}

/// Resolves a mask inside a layer, where a mismatch is the caller's bug.
pub(crate) fn resolve_or_panic(mask: &Mask, b: usize, tq: usize, tk: usize) -> ResolvedMask {
    mask.resolve(b, tq, tk)
        .unwrap_or_else(|e| panic!("attention: the mask does not fit (B, Tq, Tk) = ({b}, {tq}, {tk}): {e}"))
}

/// `x[i, j, ..rows, ..cols]`, as `x.slice(s![i, j, ..rows, ..cols])` gives it, without
/// ndarray's general slicing: four of those per head had taken a tenth of the tiny workload's
/// eval forward.
///
/// # Panics
/// If the view does not lie inside `x`.
fn head_view<'a, F>(
    x: &ArrayView4<'a, F>,
    i: usize,
    j: usize,
    rows: usize,
    cols: usize,
) -> ArrayView2<'a, F> {
    let (a, b, r, c) = x.dim();
    assert!(
        i < a && j < b && rows <= r && cols <= c,
        "head_view ({i}, {j}), {rows} × {cols}, of {:?}",
        x.shape()
    );
    let s = x.strides();
    // SAFETY: elements (i, j, ..rows, ..cols) lie inside x (asserted), at x's strides; the
    // strides pass as usize and are read back as isize (negative ones included).
    unsafe {
        ArrayView2::from_shape_ptr(
            ndarray::ShapeBuilder::strides((rows, cols), (s[2] as usize, s[3] as usize)),
            x.as_ptr().offset(i as isize * s[0] + j as isize * s[1]),
        )
    }
}

/// What a forward pass of attention is for, which decides what it draws and what it keeps.
pub(crate) enum Pass<'a> {
    /// Training: dropout on the weights (at the layer's rate), drawn from the generator, and
    /// the core's cache kept for the backward pass ([`attention_forward`]).
    Train(&'a mut dyn RngCore),
    /// No dropout; the core's cache, with every head's weights, kept: the weights asked for.
    Weights,
    /// Inference: no dropout, nothing kept ([`attention_infer`]).
    Infer,
}

impl Pass<'_> {
    /// The attention core over `q`, `k`, `v` (`[B, H, T, d]`) into `out` for this pass, with
    /// dropout at `p_drop` in training; the core's cache unless this is [`Pass::Infer`].
    pub(crate) fn attend<F: Float>(
        self,
        q: ArrayView4<F>,
        k: ArrayView4<F>,
        v: ArrayView4<F>,
        mask: ResolvedMask,
        p_drop: f32,
        out: ArrayViewMut4<F>,
    ) -> Option<AttentionCoreCache<F>> {
        match self {
            Pass::Train(mut rng) => Some(attention_forward(q, k, v, mask, p_drop, Some(&mut rng), out)),
            Pass::Weights => Some(attention_forward(
                q,
                k,
                v,
                mask,
                0.0,
                None::<&mut &mut dyn RngCore>,
                out,
            )),
            Pass::Infer => {
                attention_infer(q, k, v, &mask, out);
                None
            }
        }
    }
}

/// `out ← softmax(QKᵀ/√d_k + mask)·V` per (batch, head), with dropout `p` on the weights when
/// `rng` is given. Returns the weights and dropout mask for [`attention_backward`]. Every
/// element of `out` is written (its old values are never read).
///
/// # Shapes
/// `q` `[B, H, Tq, d_k]`, `k` `[B, H, Tk, d_k]`, `v` `[B, H, Tk, d_v]`, `out`
/// `[B, H, Tq, d_v]`, all with any strides; `mask` resolved for `(B, Tq, Tk)`.
///
/// # Panics
/// If the shapes do not fit together.
pub fn attention_forward<F: Float>(
    q: ArrayView4<F>,
    k: ArrayView4<F>,
    v: ArrayView4<F>,
    mask: ResolvedMask,
    p_drop: f32,
    rng: Option<&mut impl Rng>,
    out: ArrayViewMut4<F>,
) -> AttentionCoreCache<F> {
    let (b, h, tq, _) = q.dim();
    let tk = k.dim().2;
    let drop = match rng {
        // One draw from the RNG, as `dropout_mask` of the whole [B, H, Tq, Tk] would take.
        Some(rng) if p_drop > 0.0 => Some(DropKey::draw(p_drop, rng)),
        _ => None,
    };
    // SAFETY: `attend` writes every element of every head's [Tq, Tk] weights it is given
    // before reading it (it is given all of them here).
    let probs = unsafe {
        crate::kernels::workspace::filled((b, h, tq, tk), |probs| {
            attend(q, k, v, &mask, drop, Some(probs), out)
        })
    };
    AttentionCoreCache { probs, drop, mask }
}

/// [`attention_forward`] without dropout and without keeping the weights: the same `out`, bit
/// for bit, for a forward pass that has no backward (inference). Each head's weights live in
/// a buffer of the thread's, one head at a time, rather than in a `[B, H, Tq, Tk]` array
/// written out and dropped (over 256 positions 8 MiB a call for 4 sequences of 8 heads).
///
/// # Shapes
/// As [`attention_forward`].
///
/// # Panics
/// If the shapes do not fit together.
pub fn attention_infer<F: Float>(
    q: ArrayView4<F>,
    k: ArrayView4<F>,
    v: ArrayView4<F>,
    mask: &ResolvedMask,
    out: ArrayViewMut4<F>,
) {
    attend(q, k, v, mask, None, None, out);
}

/// The heads of [`attention_forward`] and [`attention_infer`]: the weights into `probs`
/// (`[B, H, Tq, Tk]`, each element written before it is read) or, without it, into a
/// buffer of the thread's, a head at a time.
fn attend<F: Float>(
    q: ArrayView4<F>,
    k: ArrayView4<F>,
    v: ArrayView4<F>,
    mask: &ResolvedMask,
    drop: Option<DropKey>,
    probs: Option<ArrayViewMut4<F>>,
    mut out: ArrayViewMut4<F>,
) {
    let (b, h, tq, dk) = q.dim();
    let (tk, dv) = (k.dim().2, v.dim().3);
    assert!(
        k.dim() == (b, h, tk, dk) && v.dim() == (b, h, tk, dv) && out.dim() == (b, h, tq, dv),
        "attention: q {:?}, k {:?}, v {:?}, out {:?}: expected [B, H, Tq, d_k], [B, H, Tk, d_k], [B, H, Tk, d_v], [B, H, Tq, d_v]",
        q.shape(),
        k.shape(),
        v.shape(),
        out.shape()
    );
    assert_eq!(
        mask.dims(),
        (b, tq, tk),
        "attention: mask resolved for another shape"
    );
    if b * h * tq * dv == 0 || tk == 0 {
        out.fill(F::ZERO);
        if let Some(mut probs) = probs {
            probs.fill(F::ZERO);
        }
        return;
    }
    let scale = F::ONE / F::from_f64((dk as f64).sqrt());
    let outs = PairViews::new(out);
    // Every row of every head's weights is written whole below (the scores' columns by a
    // product, then the softmax over the whole row, or zeros past the keys), so they are
    // not zeroed first (two passes over [B, H, Tq, Tk] per call had been most of a `memset`
    // that took 1.7% of the attention core alone at the base shape).
    let all_probs = probs.map(PairViews::new);
    let one_head = |bi: usize, hi: usize, out: &mut ArrayViewMut2<F>, probs: &mut ArrayViewMut2<F>| {
        let kb = mask.key_limit(bi);
        let (k, v) = (head_view(&k, bi, hi, kb, dk), head_view(&v, bi, hi, kb, dv));
        let cleaned = clean_padding(k, v, mask.keys_kept(bi));
        let (k, v) = cleaned.as_ref().map_or((k, v), |(k, v)| (k.view(), v.view()));
        let dropped = head_drop(drop, (b, h, tq, tk), bi, hi);
        let q = head_view(&q, bi, hi, tq, dk);
        // The register paths: each row's softmax in registers where its mask is a plain
        // limit, else the general path's row softmax.
        #[cfg(target_arch = "x86_64")]
        {
            let softmax = || {
                let first = mask.row(bi, 0);
                if first.keys.is_none() && first.pairs.is_none() {
                    RowSoftmax::Limit(|i| mask.limit(bi, i))
                } else {
                    RowSoftmax::Rows(|i, row: &mut [F]| widest!(softmax_row_inline(row, mask.row(bi, i))))
                }
            };
            let queries = query_blocks(mask, bi, tq, kb);
            if let Some(head) = SmallHead::new(q, k, v) {
                // SAFETY: F is f32 (checked by `new`), and the views it took are alive.
                unsafe { head.forward(scale.to_f64() as f32, softmax(), queries, dropped, probs, out) };
                return;
            }
            if head_forward_avx2(q, k, v, scale, queries, softmax(), dropped, probs, out) {
                return;
            }
        }
        let gemm = products::<F>(mask);
        for (rows, width) in query_blocks(mask, bi, tq, kb) {
            let mut probs = probs.slice_mut(s![rows.clone(), ..]);
            let mut out = out.slice_mut(s![rows.clone(), ..]);
            if width == 0 {
                // Queries that see no key: zero weights, zero output.
                probs.fill(F::ZERO);
                out.fill(F::ZERO);
                continue;
            }
            // S = Q·Kᵀ/√d_k over the keys these queries see (not padding by length, not
            // past the last key a causal mask shows them).
            gemm(
                scale,
                q.slice(s![rows.clone(), ..]),
                k.slice(s![..width, ..]).t(),
                F::ZERO,
                probs.slice_mut(s![.., ..width]),
            );
            // Each row's softmax reads its keys below its limit (at most `width`) and
            // writes zeros from there to the end of the row.
            widest!(for (i, mut row) in rows.clone().zip(probs.rows_mut()) {
                softmax_row_inline(row.as_slice_mut().expect("contiguous"), mask.row(bi, i));
            });
            let (p, v) = (probs.slice(s![.., ..width]), v.slice(s![..width, ..]));
            match dropped {
                Some(m) => with_thread_scratch(p.len(), |buf| {
                    gemm(F::ONE, m.times_into(rows.start, p, buf).view(), v, F::ZERO, out)
                }),
                None => gemm(F::ONE, p, v, F::ZERO, out),
            }
        }
    };
    let one = |pair: usize| {
        let (bi, hi) = (pair / h, pair % h);
        // SAFETY: each pair is taken by one part only.
        let mut out = unsafe { outs.get(bi, hi) };
        match &all_probs {
            // SAFETY: as above.
            Some(all) => one_head(bi, hi, &mut out, &mut unsafe { all.get(bi, hi) }),
            None => with_weights_scratch(tq * tk, |buf: &mut [F]| {
                let mut probs = ArrayViewMut2::from_shape((tq, tk), buf).expect("tq·tk elements");
                one_head(bi, hi, &mut out, &mut probs)
            }),
        }
    };
    // The attention core computes in f32 whatever the precision of the products around it
    // (the register path always did; the GEMM calls of the general path take bf16 operands
    // under bf16 precision otherwise).
    let one = |pair: usize| with_precision(Precision::F32, || one(pair));
    if parallel_worth(b * h * tq * tk * (dk + dv)) {
        for_each_index(b * h, one);
    } else {
        (0..b * h).for_each(one);
    }
}

/// Queries (and keys) per block under a causal mask: each block of queries computes its
/// scores, softmax and products up to the last key one of them sees, each block of keys its
/// gradients from the first query that sees one, so the blocked half of a head is skipped
/// rather than computed and then zeroed.
pub(crate) const QUERY_BLOCK: usize = 32;

/// `0..n` in blocks: under a causal mask of [`QUERY_BLOCK`], the last one taking what is left
/// (16 to 47, so that no block has the few rows that the GEMM's few-row kernels would take:
/// [`gemm_blocks`] sums each element as the whole product does); else one block.
pub(crate) fn blocks(n: usize, causal: bool) -> impl Iterator<Item = Range<usize>> + Clone {
    let count = if causal {
        (n + QUERY_BLOCK / 2) / QUERY_BLOCK
    } else {
        1
    }
    .max(1);
    (0..count).map(move |i| i * QUERY_BLOCK..if i + 1 == count { n } else { (i + 1) * QUERY_BLOCK })
}

/// The product of the general path's heads: [`gemm`], or under a causal mask (whose heads
/// run in [`blocks`]) [`gemm_blocks`].
type Product<F> = fn(F, ArrayView2<F>, ArrayView2<F>, F, ArrayViewMut2<F>);

fn products<F: Float>(mask: &ResolvedMask) -> Product<F> {
    if mask.is_causal() {
        gemm_blocks::<F>
    } else {
        gemm::<F>
    }
}

/// The queries `0..tq` of sequence `bi` in [`blocks`], each with the number of keys its
/// queries see at most (at most `kb`, the keys that are not padding by length).
pub(crate) fn query_blocks(
    mask: &ResolvedMask,
    bi: usize,
    tq: usize,
    kb: usize,
) -> impl Iterator<Item = (Range<usize>, usize)> + Clone + '_ {
    // A row's limit never falls from one query to the next: the block's last row has the
    // largest.
    blocks(tq, mask.is_causal()).map(move |rows| {
        let width = rows.end.checked_sub(1).map_or(0, |i| mask.limit(bi, i).min(kb));
        (rows, width)
    })
}

/// The keys `0..kb` of sequence `bi` in [`blocks`], each with the first query that sees one
/// of them (no query before it does; the query length if none does): the backward's
/// products over the queries of each key (`∂L/∂V`, `∂L/∂K`) start there.
pub(crate) fn key_blocks(
    mask: &ResolvedMask,
    bi: usize,
    kb: usize,
) -> impl Iterator<Item = (Range<usize>, usize)> + Clone + '_ {
    blocks(kb, mask.is_causal()).map(move |keys| {
        let first = mask.first_query(bi, keys.start);
        (keys, first)
    })
}

/// The dropout mask of head `(bi, hi)`, `[Tq, Tk]` inside the mask by `drop`'s key over
/// `dims` `[B, H, Tq, Tk]`.
fn head_drop(
    drop: Option<DropKey>,
    (_, h, tq, tk): (usize, usize, usize, usize),
    bi: usize,
    hi: usize,
) -> Option<DropRows> {
    drop.map(|key| DropRows {
        key,
        at: (bi * h + hi) * tq * tk,
        stride: tk,
    })
}

/// [`attention_forward`] for one query per sequence (a decoding step), without dropout and
/// without weights to keep: `q` `[B, H·d_k]` rows, the cached keys transposed `kt`
/// `[N, H, d_k, Tk]` and values `v` `[N, H, Tk, d_v]` (positions, resp. features,
/// contiguous), `out` `[B, H·d_v]` rows; row `i` attends over cached sequence `seqs[i]`
/// (several rows may read one sequence, as the beams of a source read its memory), or over
/// sequence `i` without `seqs` (N = B). Per (row, head): the scores as `d_k` scaled sums of
/// contiguous runs over the positions, the softmax, and the weighted sum of value rows, on
/// slices (the general path's per-head GEMM calls and views cost more than their arithmetic
/// at one query), a row's heads side by side ([`step_row`]). The cache holds `S`: `F`, or
/// bf16 bits (`u16`) that are widened to `f32` as they are read.
///
/// # Panics
/// If the shapes do not fit, a row's sequence is not below N, or the last axes of `kt` and
/// `v` are not contiguous.
pub(crate) fn attention_step<F: Float, S: Cached<F>>(
    q: ArrayView2<F>,
    kt: ArrayView4<S>,
    v: ArrayView4<S>,
    seqs: Option<&[usize]>,
    mask: &ResolvedMask,
    out: ArrayViewMut2<F>,
) {
    let (n_seqs, h, dk, tk) = kt.dim();
    let dv = v.dim().3;
    let b = seqs.map_or(n_seqs, <[usize]>::len);
    assert!(
        q.dim() == (b, h * dk)
            && v.dim() == (n_seqs, h, tk, dv)
            && out.dim() == (b, h * dv)
            && mask.dims() == (b, 1, tk)
            && seqs.is_none_or(|s| s.iter().all(|&i| i < n_seqs)),
        "attention_step: q {:?}, keys transposed {:?}, v {:?}, out {:?}, rows' sequences {:?}",
        q.shape(),
        kt.shape(),
        v.shape(),
        out.shape(),
        seqs
    );
    let seq = |bi: usize| seqs.map_or(bi, |s| s[bi]) as isize;
    let unit = |x: &ArrayView4<S>| x.strides()[3] == 1 || x.dim().3 <= 1;
    assert!(
        unit(&kt) && unit(&v),
        "attention_step: cached keys and values need contiguous rows"
    );
    // The queries where they lie when each row's are contiguous (a slice of the rows of Q,
    // K and V side by side), else copied so.
    let q = if q.ncols() <= 1 || q.strides()[1] == 1 {
        CowArray::from(q)
    } else {
        q.as_standard_layout()
    };
    let (qp, q_rs) = (q.as_ptr() as usize, if b > 1 { q.strides()[0] } else { 0 });
    let mut out = out;
    let out = out
        .as_slice_mut()
        .expect("attention_step: out must be contiguous");
    let scale = F::ONE / F::from_f64((dk as f64).sqrt());
    let (ks, vs) = (kt.strides(), v.strides());
    let (kp, vp) = (kt.as_ptr() as usize, v.as_ptr() as usize);
    // Rows of few heads go through `step_row` together, as one row of their heads side by
    // side, where their masks are the same and their caches one stride apart (consecutive
    // sequences, or the same one, as the beams of a source read): the vector paths run up
    // to eight heads' chains of multiply-adds interleaved, and a row of four leaves half of
    // them idle. Each head's arithmetic is the same either way (its own chains, in order), so
    // the bits are.
    let together = if h < STEP_HEADS && q_rs == (h * dk) as isize {
        STEP_HEADS / h
    } else {
        1
    };
    // The keys and values of the rows stepped next asked for while these are stepped
    // (`small_head::ask_ahead`), where what the step reads is more than L2 holds: a decoding step
    // reads each sequence's cache once (8 heads of 32 keys and values of 32 features: 64 KiB
    // in 16 runs of 4 KiB), which the step's weights have pushed out of L2 since the last
    // step, and the hardware's prefetcher, trained afresh on each head's run, had asked for
    // its lines late. Small greedy decode, AMD EPYC Zen 4, one thread, `perf record` of the
    // builds one after the other, four pairs: the samples in the step's attention 381–567M →
    // 300–394M, the decode 106.3–137.5 → 102.3–118.2 ms, each pair faster; two threads 302–496M
    // → 285–440M; the AVX2 kernels (`VASWANI_MAX_ISA=avx2`) 645–790M → 438–538M. The base
    // workload's heads, runs of 16 KiB that the prefetcher follows, about level (505–546M →
    // 470–534M). Caches that stay in L2 (the tiny workload's, 128 KiB a layer) ask for
    // nothing: there the asks had cost more than they saved.
    let cached = b * h * tk * (dk + dv);
    let ask_ahead = cached * std::mem::size_of::<S>() > crate::kernels::gemm::l2_cache_bytes();
    for_each_chunk_mut(out, h * dv, cached, |at, rows| {
        let mut scores = vec![F::ZERO; tk];
        let (first, n) = (at / (h * dv), rows.len() / (h * dv));
        let mut r = 0;
        while r < n {
            let bi = first + r;
            let (kb, row_mask) = (mask.key_limit(bi).min(tk), mask.row(bi, 0));
            // The step from one row's sequence to the next's, the same for every row of the
            // group.
            let apart = if r + 1 < n { seq(bi + 1) - seq(bi) } else { 0 };
            let m = (1..together.min(n - r))
                .take_while(|&i| {
                    mask.key_limit(bi + i).min(tk) == kb
                        && same_mask(&mask.row(bi + i, 0), &row_mask)
                        && seq(bi + i) == seq(bi) + i as isize * apart
                })
                .count()
                + 1;
            // SAFETY: row bi of q and the m - 1 after it, h · d_k contiguous features each,
            // one after the other when m > 1 (`together` asks for their row stride).
            let q = unsafe {
                std::slice::from_raw_parts((qp as *const F).offset(bi as isize * q_rs), m * h * dk)
            };
            let step = StepRow {
                q,
                scale,
                heads: m * h,
                row_heads: h,
                kt: (kp as *const S).wrapping_offset(seq(bi) * ks[0]),
                kt_hs: ks[1],
                kt_ss: apart * ks[0],
                kt_rs: ks[2],
                v: (vp as *const S).wrapping_offset(seq(bi) * vs[0]),
                v_hs: vs[1],
                v_ss: apart * vs[0],
                v_rs: vs[2],
                kb,
                mask: row_mask,
                // The rows stepped next, from the first row after these.
                next: (ask_ahead && r + m < n).then(|| {
                    let ahead = seq(bi + m) - seq(bi);
                    (ahead * ks[0], ahead * vs[0])
                }),
            };
            // SAFETY: for every head hi of rows bi..bi + m, which read sequences seq(bi) +
            // i · apart (checked above, each below the caches' count, asserted), (seq, hi,
            // d < d_k, ..kb) is inside kt and (seq, hi, j < kb, ..d_v) inside v, whose last
            // axes have unit stride (asserted above); the rows hold m · h · d_v floats.
            unsafe { step_row(&step, &mut scores, &mut rows[r * h * dv..(r + m) * h * dv]) };
            r += m;
        }
    });
}

/// Heads a decoding step's vector paths run side by side at most ([`attention_step`]).
const STEP_HEADS: usize = 8;

/// Whether two rows' masks allow the same entries (the same limit, and the same flags or
/// none).
fn same_mask(a: &crate::kernels::RowMask<'_>, b: &crate::kernels::RowMask<'_>) -> bool {
    a.limit == b.limit && a.keys == b.keys && a.pairs == b.pairs
}

/// Backward of [`attention_forward`]: writes `∂L/∂Q`, `∂L/∂K` and `∂L/∂V` (overwriting them).
///
/// # Shapes
/// As [`attention_forward`], with `grad_out` shaped as its `out` and each gradient as its
/// input.
///
/// # Panics
/// If the shapes differ from those of the forward pass.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Float>(
    q: ArrayView4<F>,
    k: ArrayView4<F>,
    v: ArrayView4<F>,
    cache: &AttentionCoreCache<F>,
    grad_out: ArrayView4<F>,
    mut grad_q: ArrayViewMut4<F>,
    mut grad_k: ArrayViewMut4<F>,
    mut grad_v: ArrayViewMut4<F>,
) {
    let (b, h, tq, dk) = q.dim();
    let (tk, dv) = (k.dim().2, v.dim().3);
    assert!(
        cache.probs.dim() == (b, h, tq, tk)
            && grad_out.dim() == (b, h, tq, dv)
            && grad_q.dim() == q.dim()
            && grad_k.dim() == k.dim()
            && grad_v.dim() == v.dim(),
        "attention_backward: q {:?}, k {:?}, v {:?}, weights {:?}, grad_out {:?}",
        q.shape(),
        k.shape(),
        v.shape(),
        cache.probs.shape(),
        grad_out.shape()
    );
    if b * h * tq * tk * dk * dv == 0 {
        grad_q.fill(F::ZERO);
        grad_k.fill(F::ZERO);
        grad_v.fill(F::ZERO);
        return;
    }
    let mask = &cache.mask;
    let scale = F::ONE / F::from_f64((dk as f64).sqrt());
    let (gqs, gks, gvs) = (
        PairViews::new(grad_q.view_mut()),
        PairViews::new(grad_k.view_mut()),
        PairViews::new(grad_v.view_mut()),
    );
    let one_head = |pair: usize| {
        let (bi, hi) = (pair / h, pair % h);
        // SAFETY: each pair is taken by one part only.
        let (mut grad_q, mut grad_k, mut grad_v) =
            unsafe { (gqs.get(bi, hi), gks.get(bi, hi), gvs.get(bi, hi)) };
        // The products below write ∂Q and the rows of ∂K and ∂V below the key limit; the keys
        // past it get no gradient.
        let kb = mask.key_limit(bi);
        grad_k.slice_mut(s![kb.., ..]).fill(F::ZERO);
        grad_v.slice_mut(s![kb.., ..]).fill(F::ZERO);
        let (k, v) = (head_view(&k, bi, hi, kb, dk), head_view(&v, bi, hi, kb, dv));
        let cleaned = clean_padding(k, v, mask.keys_kept(bi));
        let (k, v) = cleaned.as_ref().map_or((k, v), |(k, v)| (k.view(), v.view()));
        let probs = head_view(&cache.probs.view(), bi, hi, tq, kb);
        let drop = head_drop(cache.drop, (b, h, tq, tk), bi, hi);
        let g = head_view(&grad_out, bi, hi, tq, dv);
        #[cfg(target_arch = "x86_64")]
        let softmax_backward = |i, p: &[F], gp: &[F], gs: &mut [F]| {
            widest!(softmax_row_backward_inline(p, gp, gs, mask.row(bi, i)))
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(head) = SmallHead::new(head_view(&q, bi, hi, tq, dk), k, v)
            && head.takes_backward()
        {
            let (gq, gk, gv) = (
                &mut grad_q,
                &mut grad_k.slice_mut(s![..kb, ..]),
                &mut grad_v.slice_mut(s![..kb, ..]),
            );
            // SAFETY: F is f32 (checked by `new`), the views it took are alive, and it takes
            // the backward pass (checked).
            unsafe {
                head.backward(
                    scale.to_f64() as f32,
                    query_blocks(mask, bi, tq, kb),
                    key_blocks(mask, bi, kb),
                    probs,
                    drop,
                    g,
                    softmax_backward,
                    gq,
                    gk,
                    gv,
                )
            };
            return;
        }
        let q = head_view(&q, bi, hi, tq, dk);
        // The AVX2 path's row backward: in vector registers where the rows' masks are plain
        // limits, as the forward pass's softmax.
        #[cfg(target_arch = "x86_64")]
        let softmax_backward = {
            let first = mask.row(bi, 0);
            if first.keys.is_none() && first.pairs.is_none() {
                RowSoftmax::Limit(|i| mask.limit(bi, i))
            } else {
                RowSoftmax::Rows(softmax_backward)
            }
        };
        #[cfg(target_arch = "x86_64")]
        if head_backward_avx2(
            !mask.is_causal(),
            q,
            k,
            v,
            scale,
            query_blocks(mask, bi, tq, kb),
            key_blocks(mask, bi, kb),
            probs,
            drop,
            g,
            softmax_backward,
            &mut grad_q,
            &mut grad_k.slice_mut(s![..kb, ..]),
            &mut grad_v.slice_mut(s![..kb, ..]),
        ) {
            return;
        }
        // Under a causal mask the products below skip what the mask blocks: by blocks of
        // queries, the keys past the last one they see; by blocks of keys, the queries before
        // the first that sees one (their weights and gradients there are exactly 0).
        let general = products::<F>(mask);
        // On the AVX2 path, the products in registers where they take the same bits.
        let gemm = |alpha: F, left: ArrayView2<F>, right: ArrayView2<F>, beta: F, out: ArrayViewMut2<F>| {
            #[cfg(target_arch = "x86_64")]
            let mut out = out;
            #[cfg(target_arch = "x86_64")]
            if beta == F::ZERO && product_avx2(!mask.is_causal(), alpha, left, right, &mut out) {
                return;
            }
            general(alpha, left, right, beta, out)
        };
        // P ⊙ M, ∂L/∂P and ∂L/∂S in this thread's scratch, reused from head to head.
        let parts = if drop.is_some() { 3 } else { 2 };
        with_thread_scratch(parts * tq * kb, |buf: &mut [F]| {
            let (grad_p, rest) = buf.split_at_mut(tq * kb);
            let (grad_s, kept) = rest.split_at_mut(tq * kb);
            let dropped = drop.map(|m| m.times_into(0, probs, kept));
            let p_kept = dropped.as_ref().map_or(probs, |d| d.view());
            // `out[keys] = α·left[first.., keys]ᵀ·right[first..]` by blocks of keys, zero for keys
            // no query sees: the products over the queries of each key.
            let by_keys = |alpha: F, left: ArrayView2<F>, right: ArrayView2<F>, mut out: ArrayViewMut2<F>| {
                for (keys, first) in key_blocks(mask, bi, kb) {
                    let mut out = out.slice_mut(s![keys.clone(), ..]);
                    if first == tq {
                        out.fill(F::ZERO);
                    } else {
                        let (left, right) = (left.slice(s![first.., keys]), right.slice(s![first.., ..]));
                        gemm(alpha, left.t(), right, F::ZERO, out);
                    }
                }
            };
            // ∂L/∂V = P'ᵀ·G
            by_keys(F::ONE, p_kept, g, grad_v.view_mut());
            // ∂L/∂P = (G·Vᵀ) ⊙ M, then ∂L/∂S = P ⊙ (∂L/∂P − rowsum(P ⊙ ∂L/∂P)), zero at blocked
            // keys (each row read below its limit, at most its block's width).
            // Zeros past each block's width, as the softmax's backward reads the whole row.
            grad_p.fill(F::ZERO);
            grad_s.fill(F::ZERO);
            let mut grad_p = ArrayViewMut2::from_shape((tq, kb), grad_p).expect("tq · kb elements");
            let mut grad_s = ArrayViewMut2::from_shape((tq, kb), grad_s).expect("tq · kb elements");
            for (rows, width) in query_blocks(mask, bi, tq, kb) {
                let mut gp = grad_p.slice_mut(s![rows.clone(), ..width]);
                if width > 0 {
                    gemm(
                        F::ONE,
                        g.slice(s![rows.clone(), ..]),
                        v.slice(s![..width, ..]).t(),
                        F::ZERO,
                        gp.view_mut(),
                    );
                }
                if let Some(m) = drop {
                    for (i, mut row) in rows.clone().zip(gp.rows_mut()) {
                        m.apply(i, row.as_slice_mut().expect("contiguous"));
                    }
                }
                widest!(for i in rows.clone() {
                    softmax_row_backward_inline(
                        probs.row(i).to_slice().expect("contiguous"),
                        grad_p.row(i).to_slice().expect("contiguous"),
                        grad_s.row_mut(i).into_slice().expect("contiguous"),
                        mask.row(bi, i),
                    );
                });
                // ∂L/∂Q = ∂L/∂S·K/√d_k
                let mut gq = grad_q.slice_mut(s![rows.clone(), ..]);
                if width == 0 {
                    gq.fill(F::ZERO);
                } else {
                    gemm(
                        scale,
                        grad_s.slice(s![rows, ..width]),
                        k.slice(s![..width, ..]),
                        F::ZERO,
                        gq,
                    );
                }
            }
            // ∂L/∂K = (∂L/∂S)ᵀ·Q/√d_k
            by_keys(scale, grad_s.view(), q, grad_k.view_mut());
        });
    };
    // The attention core computes in f32 whatever the precision of the products around
    // it (the register path always did; the GEMM calls of the general path take bf16
    // operands under bf16 precision otherwise).
    let one = |pair: usize| with_precision(Precision::F32, || one_head(pair));
    if parallel_worth(b * h * tq * tk * (dk + dv)) {
        for_each_index(b * h, one);
    } else {
        (0..b * h).for_each(one);
    }
}

/// For padding by flags: copies of K and V of one (sequence, head) with the padded rows
/// zeroed, made only when a padded row holds a non-finite value (so that `0·NaN` cannot reach
/// the output).
fn clean_padding<F: Float>(
    k: ArrayView2<F>,
    v: ArrayView2<F>,
    kept: Option<&[bool]>,
) -> Option<(Array2<F>, Array2<F>)> {
    let kept = kept?;
    let dirty = |x: &ArrayView2<F>| {
        x.rows()
            .into_iter()
            .zip(kept)
            .any(|(r, &keep)| !keep && r.iter().any(|e| !e.is_finite()))
    };
    if !dirty(&k) && !dirty(&v) {
        return None;
    }
    let clean = |x: ArrayView2<F>| {
        let mut c = x.to_owned();
        for (mut r, &keep) in c.rows_mut().into_iter().zip(kept) {
            if !keep {
                r.fill(F::ZERO);
            }
        }
        c
    };
    Some((clean(k), clean(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Mask;
    use ndarray::{Array2, Array4, Axis, s};
    use rand::{SeedableRng, rngs::StdRng};

    /// A decoding step's random inputs: queries `[rows, h · d_k]`, and `n` sequences' cached
    /// keys (transposed, `[n, h, d_k, tk]`) and values (`[n, h, tk, d_k]`).
    fn random_step(
        rng: &mut StdRng,
        rows: usize,
        n: usize,
        h: usize,
        dk: usize,
        tk: usize,
    ) -> (Array2<f32>, Array4<f32>, Array4<f32>) {
        let q = Array2::from_shape_fn((rows, h * dk), |_| rng.random_range(-2.0f32..2.0));
        let kt = Array4::from_shape_fn((n, h, dk, tk), |_| rng.random_range(-2.0f32..2.0));
        let v = Array4::from_shape_fn((n, h, tk, dk), |_| rng.random_range(-2.0f32..2.0));
        (q, kt, v)
    }

    /// The forward pass of inference, which keeps no weights, gives the bits of the forward
    /// pass that keeps them: heads of few keys (softmax in registers), of 65 to 512 (stored
    /// rows) and of more (the general path), in `f32` and `f64`, under no mask, a causal one,
    /// key lengths and padding flags.
    #[test]
    fn inference_without_weights_gives_the_forward_bits() {
        fn check<F: Float>(rng: &mut StdRng, (b, h, tq, tk, dk): (usize, usize, usize, usize, usize)) {
            let mut draw =
                |t: usize| Array4::from_shape_fn((b, h, t, dk), |_| F::from_f64(rng.random_range(-2.0..2.0)));
            let (q, k, v) = (draw(tq), draw(tk), draw(tk));
            let lengths: Vec<usize> = (0..b).map(|i| tk - i * tk / (2 * b)).collect();
            let padding = Array2::from_shape_fn((b, tk), |(i, j)| (i + j) % 5 == 3);
            let masks = [
                ("no mask", Mask::none()),
                ("causal", Mask::causal()),
                ("key lengths", Mask::key_lengths(&lengths)),
                ("padding", Mask::key_padding(padding.view())),
            ];
            for (what, mask) in masks {
                if what == "causal" && tq != tk {
                    continue;
                }
                let mask = mask.resolve(b, tq, tk).unwrap();
                let mut kept = Array4::from_elem((b, h, tq, dk), F::from_f64(f64::NAN));
                let mut lean = kept.clone();
                attention_forward(
                    q.view(),
                    k.view(),
                    v.view(),
                    mask.clone(),
                    0.0,
                    None::<&mut StdRng>,
                    kept.view_mut(),
                );
                attention_infer(q.view(), k.view(), v.view(), &mask, lean.view_mut());
                for (x, y) in kept.iter().zip(&lean) {
                    assert_eq!(
                        x.to_f64().to_bits(),
                        y.to_f64().to_bits(),
                        "{what}, {tq} queries over {tk} keys"
                    );
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(33);
        for shape in [
            (2, 2, 16, 16, 8),
            (2, 3, 40, 100, 16),
            (1, 2, 33, 530, 8),
            (2, 2, 96, 96, 32),
        ] {
            check::<f32>(&mut rng, shape);
        }
        check::<f64>(&mut rng, (2, 2, 20, 70, 8));
    }

    /// A decoding step over sequences of few heads, taken together where their masks agree,
    /// gives the bits of each sequence's step alone: sequences of two and four heads, key
    /// lengths that agree for runs of one to three sequences, and padding flags that set one
    /// sequence apart from its equal neighbours.
    #[test]
    fn sequences_taken_together_give_each_ones_bits() {
        let mut rng = StdRng::seed_from_u64(31);
        let (b, tk, dk) = (7, 11, 8);
        let lengths = [11, 11, 11, 4, 9, 9, 11];
        let padding = Array2::from_shape_fn((b, tk), |(i, j)| i == 5 && j == 2);
        for h in [2, 4] {
            let (q, kt, v) = random_step(&mut rng, b, b, h, dk, tk);
            for padded in [false, true] {
                let mask = |rows: std::ops::Range<usize>| {
                    if padded {
                        Mask::key_padding(padding.slice(s![rows, ..]))
                    } else {
                        Mask::key_lengths(&lengths[rows])
                    }
                };
                let all = mask(0..b).resolve(b, 1, tk).unwrap();
                let mut together = Array2::from_elem((b, h * dk), f32::NAN);
                attention_step(q.view(), kt.view(), v.view(), None, &all, together.view_mut());
                for bi in 0..b {
                    let one = mask(bi..bi + 1).resolve(1, 1, tk).unwrap();
                    let mut alone = Array2::from_elem((1, h * dk), f32::NAN);
                    attention_step(
                        q.slice(s![bi..bi + 1, ..]),
                        kt.slice(s![bi..bi + 1, .., .., ..]),
                        v.slice(s![bi..bi + 1, .., .., ..]),
                        None,
                        &one,
                        alone.view_mut(),
                    );
                    for (x, y) in alone.iter().zip(together.row(bi)) {
                        assert_eq!(
                            x.to_bits(),
                            y.to_bits(),
                            "{h} heads, sequence {bi}, padded {padded}"
                        );
                    }
                }
            }
        }
    }

    /// Queries read in place from rows wider than them (Q beside K and V, as a decoding step's
    /// one product leaves them), or with features strided (copied first), give the bits of
    /// the same queries in a contiguous array, with and without sequences taken together.
    #[test]
    fn queries_read_in_place_from_wider_rows_give_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(32);
        let (b, tk, dk) = (5, 9, 8);
        let lengths = [9, 9, 4, 9, 9];
        for h in [2, 8] {
            let d = h * dk;
            let wide = Array2::from_shape_fn((b, 3 * d), |_| rng.random_range(-2.0f32..2.0));
            let kt = Array4::from_shape_fn((b, h, dk, tk), |_| rng.random_range(-2.0f32..2.0));
            let v = Array4::from_shape_fn((b, h, tk, dk), |_| rng.random_range(-2.0f32..2.0));
            let mask = Mask::key_lengths(&lengths).resolve(b, 1, tk).unwrap();
            let q = wide.slice(s![.., d..2 * d]);
            let mut expected = Array2::from_elem((b, d), f32::NAN);
            attention_step(
                q.to_owned().view(),
                kt.view(),
                v.view(),
                None,
                &mask,
                expected.view_mut(),
            );
            let reversed = Array2::from_shape_fn((b, d), |(i, j)| q[[i, d - 1 - j]]);
            let cols = reversed.slice(s![.., ..;-1]);
            assert_eq!(cols, q);
            for (what, q) in [("rows of Q, K and V", q), ("strided features", cols)] {
                let mut got = Array2::from_elem((b, d), f32::NAN);
                attention_step(q, kt.view(), v.view(), None, &mask, got.view_mut());
                for (x, y) in got.iter().zip(&expected) {
                    assert_eq!(x.to_bits(), y.to_bits(), "{h} heads, {what}");
                }
            }
        }
    }

    /// Rows that read mapped sequences of the cache (several rows one sequence, as beams
    /// read their source's memory; runs of the same sequence, of consecutive ones, and
    /// scattered) give the bits of a step over each row's sequence copied out, for two, four
    /// and eight heads (taken together or not), with key lengths per row; also over caches
    /// more than L2 holds, where each step asks for the next rows' lines while it reads its
    /// own (the sequences read backwards, one twice in a row, one again after others).
    #[test]
    fn rows_mapped_to_sequences_give_the_bits_of_their_sequences_copied() {
        let mut rng = StdRng::seed_from_u64(33);
        let scattered = vec![0, 0, 0, 0, 1, 2, 3, 3, 1, 0, 2, 2];
        let scattered_lengths: Vec<usize> = scattered.iter().map(|&i| [10, 7, 10, 3][i]).collect();
        // Sequences of 40 positions of d_k 32: with two heads, as many as fill L2, and three.
        let big = crate::kernels::gemm::l2_cache_bytes() / (2 * 40 * 2 * 32 * 4) + 3;
        let mut backwards: Vec<usize> = (0..big).rev().collect();
        backwards.extend([1, 1, 0, big - 1]);
        let backwards_lengths: Vec<usize> = (0..backwards.len())
            .map(|i| if i % 5 == 4 { 17 } else { 40 })
            .collect();
        let cases = [
            (4, 10, 8, scattered, scattered_lengths),
            (big, 40, 32, backwards, backwards_lengths),
        ];
        for (n, tk, dk, seqs, lengths) in cases {
            let b = seqs.len();
            for h in [2, 4, 8] {
                let (q, kt, v) = random_step(&mut rng, b, n, h, dk, tk);
                let mask = Mask::key_lengths(&lengths).resolve(b, 1, tk).unwrap();
                let mut mapped = Array2::from_elem((b, h * dk), f32::NAN);
                attention_step(
                    q.view(),
                    kt.view(),
                    v.view(),
                    Some(&seqs),
                    &mask,
                    mapped.view_mut(),
                );
                let (kt_rows, v_rows) = (kt.select(Axis(0), &seqs), v.select(Axis(0), &seqs));
                let mut copied = Array2::from_elem((b, h * dk), f32::NAN);
                attention_step(
                    q.view(),
                    kt_rows.view(),
                    v_rows.view(),
                    None,
                    &mask,
                    copied.view_mut(),
                );
                assert!(copied.iter().all(|x| x.is_finite()));
                for (i, (x, y)) in mapped.iter().zip(&copied).enumerate() {
                    assert_eq!(
                        x.to_bits(),
                        y.to_bits(),
                        "{n} sequences, {h} heads, row {}",
                        i / (h * dk)
                    );
                }
            }
        }
    }
}
