//! Multi-head attention (§3.2.2):
//! `MultiHead(Q, K, V) = Concat(head₁, …, head_h)·W_O`, `headᵢ = Attention(Q·W_Qᵢ, K·W_Kᵢ, V·W_Vᵢ)`.
//!
//! h heads of width `d_k = d_v = d_model / h` attend in parallel, each in its own learned
//! subspace; their outputs are **concatenated** (not averaged) and projected back to
//! d_model by W_O. With `d_k = d_model/h` the cost is that of one head of full width (§3.2.2).
//!
//! The projections are single GEMMs over all `[B·T, d_model]` rows. Head i of `Q·W_Qᵀ` is
//! columns `i·d_k .. (i+1)·d_k` of the result; the attention core reads it through a strided
//! `[B, H, T, d_k]` view and writes its output straight into the concatenated layout, so
//! splitting and concatenating heads cost no copies.
//!
//! - Self-attention: queries, keys and values all come from x (`memory = None`).
//! - Cross-attention (encoder-decoder attention, §3.2.3): queries from the decoder stream x,
//!   keys and values from the encoder output `memory`, which may be of another length.
//!
//! Each W is stored `[out, in]` as in PyTorch (`y = x·Wᵀ + b`), with the paper's names:
//! `w_q`, `w_k`, `w_v` (PyTorch packs them as the rows of `in_proj_weight`, in that order)
//! and `w_o` (`out_proj.weight`).
//!
//! # Backward
//! Through `W_O` as a linear layer, through the attention core (see
//! [`crate::layers::attention`]), then through `W_Q`, `W_K`, `W_V` as linear layers. In
//! self-attention x feeds all three projections and its gradient is their sum.
//!
//! PyTorch equivalent: `nn.MultiheadAttention(d_model, n_heads, dropout=p_drop,
//! batch_first=True)`, called as `mha(x, x, x)` or `mha(x, memory, memory)`.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array3;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::layers::{Mask, MultiHeadConfig};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let mha = MultiHeadConfig::new(16, 4).init(&mut rng)?;
//! let x = Array3::<f32>::ones((2, 5, 16)); // [B, T, d_model]
//! let memory = Array3::<f32>::ones((2, 7, 16)); // [B, S, d_model]
//! let (y, weights) = mha.infer_with_weights(x.view(), Some(memory.view()), &Mask::none());
//! assert_eq!(y.dim(), (2, 5, 16));
//! assert_eq!(weights.dim(), (2, 4, 5, 7)); // [B, H, T, S]: one map per head
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{
    Array1, Array2, Array3, Array4, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis,
    CowArray, Ix2, Ix4, s,
};
use rand::Rng;

use crate::error::{Result, check};
use crate::kernels::gemm::bf16::{to_bf16, to_bf16_slice};
use crate::kernels::parallel::{Disjoint, for_each_chunk_mut, for_each_index, join_gradients};
use crate::kernels::precision::{Precision, precision};
use crate::kernels::small_head::Cached;
use crate::kernels::workspace::{self, Recycle};
use crate::kernels::{
    Float, PackedB, add_column_sums, bias_sums_in_packing, filled, gemm, gemm_packed, gemm_weight_grad,
};
use crate::layers::attention::{
    AttentionCoreCache, Pass, attention_backward, attention_infer, attention_step, resolve_or_panic,
};
use crate::layers::linear::{affine, affine_backward, check_backward_weights};
use crate::layers::mask::{Mask, ResolvedMask};
use crate::params::xavier_uniform;

/// Configuration of [`MultiHead`] attention.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MultiHeadConfig {
    /// Model width; must be divisible by `n_heads`.
    pub d_model: usize,
    /// Number of heads h.
    pub n_heads: usize,
    /// Dropout on the attention weights (training only). PyTorch's `nn.Transformer` passes
    /// its `dropout` (0.1) here.
    pub p_drop: f32,
    /// Whether the four projections have biases.
    pub bias: bool,
}

/// Parameters of [`MultiHead`] attention (and their gradients).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(bound = ""))]
pub struct MultiHeadParams<F: Float = f32> {
    /// W_Q, `[d_model, d_model]`: all heads' query projections, head i in rows `i·d_k..`.
    pub w_q: Array2<F>,
    /// Query bias `[d_model]`.
    pub b_q: Option<Array1<F>>,
    /// W_K, `[d_model, d_model]`.
    pub w_k: Array2<F>,
    /// Key bias `[d_model]`.
    pub b_k: Option<Array1<F>>,
    /// W_V, `[d_model, d_model]`.
    pub w_v: Array2<F>,
    /// Value bias `[d_model]`.
    pub b_v: Option<Array1<F>>,
    /// W_O, `[d_model, d_model]`: projects the concatenated heads.
    pub w_o: Array2<F>,
    /// Output bias `[d_model]`.
    pub b_o: Option<Array1<F>>,
}
crate::impl_params!(MultiHeadParams {
    w_q,
    b_q,
    w_k,
    b_k,
    w_v,
    b_v,
    w_o,
    b_o
});

/// Multi-head attention. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct MultiHead<F: Float = f32> {
    /// Its configuration.
    pub cfg: MultiHeadConfig,
    /// Its parameters.
    pub p: MultiHeadParams<F>,
}
crate::delegate_params!(MultiHead => p);

/// What [`MultiHead::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct MultiHeadCache<F: Float = f32> {
    /// `(B, Tq, Tk)`.
    dims: (usize, usize, usize),
    /// Query input rows `[B·Tq, d]`.
    x: Array2<F>,
    /// Key/value input rows `[B·Tk, d]` for cross-attention; `None` in self-attention.
    memory: Option<Array2<F>>,
    q: Array2<F>,
    k: Array2<F>,
    v: Array2<F>,
    /// The concatenated head outputs `[B·Tq, d]`, input of W_O.
    ctx: Array2<F>,
    core: AttentionCoreCache<F>,
}
crate::kernels::workspace::impl_recycle!(MultiHeadCache<F: Float> { x, memory, q, k, v, ctx, core });

/// The most positions a cache makes room for before the first step; it grows past them by
/// doubling.
const MAX_INITIAL_CAPACITY: usize = 1024;

/// The keys and values of positions already seen, per head, for decoding step by step: the
/// self-attention cache grows by the new positions at each step ([`MultiHead::infer_cached`]),
/// the cross-attention cache is the encoder output projected once ([`MultiHead::project_kv`]).
///
/// A cache begun in bf16 precision ([`crate::kernels::precision::with_precision`] with
/// [`crate::Precision::Bf16`], `f32` models) holds its keys and values rounded to bf16, as the
/// bf16 products hold their operands, and as PyTorch's autocast computes attention. A
/// decoding step reads every cached key and value once: in half the bytes, the bf16 greedy
/// decode of the `small` reference workload took 31–34 ms instead of 36–38, `base` 310–315
/// instead of 442–467 (Intel Xeon, one thread). Attention over it still computes in `f32`,
/// each value widened exactly as it is read.
#[derive(Clone, Debug)]
pub struct KvCache<F: Float = f32> {
    store: Store<F>,
    len: usize,
    /// The buffers of the last [`KvCache::select`], reused by the next.
    spare: Option<Store<F>>,
}

impl<F: Float> Recycle for KvCache<F> {
    /// Gives the buffers to the current workspace, where the next cache of their size takes
    /// them: a packed model's decodes, one after another, reuse their caches' memory rather
    /// than have the allocator hand out (and the kernel zero) fresh pages for each. A bf16
    /// cache's bits are left to the allocator: kept too, they made no measurable difference
    /// to a bf16 decode (AMD EPYC Zen 4), whose faulted pages are its other arrays'.
    fn give_back(self) {
        self.store.give_back();
        if let Some(spare) = self.spare {
            spare.give_back();
        }
    }
}

/// A cache's buffers: the keys transposed, `[B, H, d_k, capacity]`, positions `..len` filled
/// (a decoding step's scores are then `d_k` sums of contiguous runs over the positions), and
/// the values, `[B, H, capacity, d_k]`; as `F`, or as bf16 bits.
#[derive(Clone, Debug)]
enum Store<F> {
    Full { kt: Array4<F>, v: Array4<F> },
    Bf16 { kt: Array4<u16>, v: Array4<u16> },
}

impl<F: Float> Store<F> {
    /// Zeroed buffers for `b` sequences of `h` heads of `dk` features, room for `cap`
    /// positions or a few more: the capacity rounded up to whole cache lines of keys. `F`
    /// buffers come from the current workspace when it holds some of their size (a packed
    /// model's decodes hand their caches on to the next, [`KvCache`]'s [`Recycle`]).
    ///
    /// The buffers start on a cache line ([`workspace::line_start`]), and each row of
    /// transposed keys fills whole lines (a value row does too where `d_k` does): rows of 32
    /// keys or values (128 bytes) had lain across three lines each, so that a decoding step's
    /// attention read half as many lines again as it used, and every vector of them from two.
    fn zeros(bf16: bool, b: usize, h: usize, dk: usize, cap: usize) -> Self {
        /// `v` (zeroed, [`workspace::line_pad`] elements more than `dim` holds) as `dim` from
        /// its first element on a line.
        fn lined<T>(v: Vec<T>, dim: (usize, usize, usize, usize)) -> Array4<T> {
            let len = v.len() - workspace::line_pad::<T>();
            let off = workspace::line_start(&v);
            Array1::from_vec(v)
                .slice_move(s![off..off + len])
                .into_shape_with_order(dim)
                .expect("a buffer of the shape's size")
        }
        // Each sequence's buffers zeroed by the team, a run of sequences on each thread.
        fn zeros<T: Copy + Default + Send>(dim: (usize, usize, usize, usize)) -> Array4<T> {
            let seq = dim.1 * dim.2 * dim.3;
            lined(
                workspace::zeros_by_team(dim.0 * seq + workspace::line_pad::<T>(), seq.max(1)),
                dim,
            )
        }
        fn full<F: Float>(dim: (usize, usize, usize, usize)) -> Array4<F> {
            let seq = dim.1 * dim.2 * dim.3;
            match workspace::take::<F>(dim.0 * seq + workspace::line_pad::<F>()) {
                Some(mut v) => {
                    let len = v.len();
                    for_each_chunk_mut(&mut v, seq.max(1), len, |_, c| {
                        crate::kernels::simd::fill(c, F::ZERO)
                    });
                    lined(v, dim)
                }
                None => zeros(dim),
            }
        }
        let line = if bf16 {
            workspace::line_elements::<u16>()
        } else {
            workspace::line_elements::<F>()
        };
        let cap = cap.next_multiple_of(line);
        if bf16 {
            Store::Bf16 {
                kt: zeros((b, h, dk, cap)),
                v: zeros((b, h, cap, dk)),
            }
        } else {
            Store::Full {
                kt: full((b, h, dk, cap)),
                v: full((b, h, cap, dk)),
            }
        }
    }

    /// Gives an `F` store's buffers to the current workspace, whole (the arrays start a few
    /// elements into them, [`Store::zeros`]).
    fn give_back(self) {
        if let Store::Full { kt, v } = self {
            workspace::give(kt.into_raw_vec_and_offset().0);
            workspace::give(v.into_raw_vec_and_offset().0);
        }
    }

    /// `(B, H, d_k, capacity)`.
    fn dim(&self) -> (usize, usize, usize, usize) {
        match self {
            Store::Full { kt, .. } => kt.dim(),
            Store::Bf16 { kt, .. } => kt.dim(),
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self, Store::Bf16 { .. })
    }

    /// Copies the first `len` positions of the sequences `rows` into sequences
    /// `0..rows.len()` of `to`, a store of the same kind ([`copy_rows`]).
    fn copy_into(&self, to: &mut Store<F>, rows: &[usize], len: usize) {
        match (self, to) {
            (Store::Full { kt, v }, Store::Full { kt: to_kt, v: to_v }) => {
                copy_rows(kt, v, to_kt, to_v, rows, len)
            }
            (Store::Bf16 { kt, v }, Store::Bf16 { kt: to_kt, v: to_v }) => {
                copy_rows(kt, v, to_kt, to_v, rows, len)
            }
            _ => unreachable!("a store is copied into one of its kind"),
        }
    }

    /// Gives sequence `i` the first `len` positions of sequence `rows[i]` for every `i` with
    /// `rows[i] != i`, in place ([`move_rows`]), through `spare` for the rows `saved_rows`
    /// that some destination overwrites.
    fn move_within(
        &mut self,
        spare: Option<&mut Store<F>>,
        saved_rows: &[usize],
        rows: &[usize],
        len: usize,
    ) {
        match (self, spare) {
            (Store::Full { kt, v }, None) => move_rows(kt, v, None, saved_rows, rows, len),
            (Store::Full { kt, v }, Some(Store::Full { kt: s_kt, v: s_v })) => {
                move_rows(kt, v, Some((s_kt, s_v)), saved_rows, rows, len)
            }
            (Store::Bf16 { kt, v }, None) => move_rows(kt, v, None, saved_rows, rows, len),
            (Store::Bf16 { kt, v }, Some(Store::Bf16 { kt: s_kt, v: s_v })) => {
                move_rows(kt, v, Some((s_kt, s_v)), saved_rows, rows, len)
            }
            _ => unreachable!("a store is saved in one of its kind"),
        }
    }

    /// Keeps the first `n` sequences, in the same buffers.
    fn truncate(&mut self, n: usize) {
        match self {
            Store::Full { kt, v } => {
                kt.slice_collapse(s![..n, .., .., ..]);
                v.slice_collapse(s![..n, .., .., ..]);
            }
            Store::Bf16 { kt, v } => {
                kt.slice_collapse(s![..n, .., .., ..]);
                v.slice_collapse(s![..n, .., .., ..]);
            }
        }
    }
}

/// Some of a cache's sequences (all of them, or a run of them), read-only: what attention
/// over the cache reads.
#[derive(Clone, Copy, Debug)]
enum StoreRef<'a, F> {
    Full {
        kt: ArrayView4<'a, F>,
        v: ArrayView4<'a, F>,
    },
    Bf16 {
        kt: ArrayView4<'a, u16>,
        v: ArrayView4<'a, u16>,
    },
}

/// A run of a cache's sequences, writable: where a decoding step appends their positions.
#[derive(Debug)]
enum StoreMut<'a, F> {
    Full {
        kt: ArrayViewMut4<'a, F>,
        v: ArrayViewMut4<'a, F>,
    },
    Bf16 {
        kt: ArrayViewMut4<'a, u16>,
        v: ArrayViewMut4<'a, u16>,
    },
}

impl<F: Float> Store<F> {
    fn view(&self) -> StoreRef<'_, F> {
        match self {
            Store::Full { kt, v } => StoreRef::Full {
                kt: kt.view(),
                v: v.view(),
            },
            Store::Bf16 { kt, v } => StoreRef::Bf16 {
                kt: kt.view(),
                v: v.view(),
            },
        }
    }

    fn view_mut(&mut self) -> StoreMut<'_, F> {
        match self {
            Store::Full { kt, v } => StoreMut::Full {
                kt: kt.view_mut(),
                v: v.view_mut(),
            },
            Store::Bf16 { kt, v } => StoreMut::Bf16 {
                kt: kt.view_mut(),
                v: v.view_mut(),
            },
        }
    }

    /// The sequences in runs of `per` (the last run shorter), each writable on its own.
    fn runs_mut(&mut self, per: usize) -> Vec<StoreMut<'_, F>> {
        let per = per.max(1);
        match self {
            Store::Full { kt, v } => kt
                .axis_chunks_iter_mut(Axis(0), per)
                .zip(v.axis_chunks_iter_mut(Axis(0), per))
                .map(|(kt, v)| StoreMut::Full { kt, v })
                .collect(),
            Store::Bf16 { kt, v } => kt
                .axis_chunks_iter_mut(Axis(0), per)
                .zip(v.axis_chunks_iter_mut(Axis(0), per))
                .map(|(kt, v)| StoreMut::Bf16 { kt, v })
                .collect(),
        }
    }
}

impl<F: Float> StoreMut<'_, F> {
    fn view(&self) -> StoreRef<'_, F> {
        match self {
            StoreMut::Full { kt, v } => StoreRef::Full {
                kt: kt.view(),
                v: v.view(),
            },
            StoreMut::Bf16 { kt, v } => StoreRef::Bf16 {
                kt: kt.view(),
                v: v.view(),
            },
        }
    }
}

impl<'a, F: Float> StoreRef<'a, F> {
    /// `(B, H, d_k, capacity)`.
    fn dim(&self) -> (usize, usize, usize, usize) {
        match self {
            StoreRef::Full { kt, .. } => kt.dim(),
            StoreRef::Bf16 { kt, .. } => kt.dim(),
        }
    }

    /// The sequences `seqs`.
    fn sequences(self, seqs: std::ops::Range<usize>) -> Self {
        match self {
            StoreRef::Full { kt, v } => StoreRef::Full {
                kt: kt.slice_move(s![seqs.clone(), .., .., ..]),
                v: v.slice_move(s![seqs, .., .., ..]),
            },
            StoreRef::Bf16 { kt, v } => StoreRef::Bf16 {
                kt: kt.slice_move(s![seqs.clone(), .., .., ..]),
                v: v.slice_move(s![seqs, .., .., ..]),
            },
        }
    }

    /// The first `len` positions as `F`: a view of a full store, a widened copy of a bf16
    /// one.
    fn filled(self, len: usize, keys: bool) -> CowArray<'a, F, Ix4> {
        let widen = |h: &u16| Cached::<F>::widen(*h);
        match (self, keys) {
            (StoreRef::Full { kt, .. }, true) => kt.slice_move(s![.., .., .., ..len]).into(),
            (StoreRef::Full { v, .. }, false) => v.slice_move(s![.., .., ..len, ..]).into(),
            (StoreRef::Bf16 { kt, .. }, true) => kt.slice(s![.., .., .., ..len]).map(widen).into(),
            (StoreRef::Bf16 { v, .. }, false) => v.slice(s![.., .., ..len, ..]).map(widen).into(),
        }
    }
}

/// The cached positions of some sequences, read-only (a whole [`KvCache`], or a run of its
/// sequences): what attention over the cache reads. Its rows are the store's sequences, or,
/// mapped ([`KvView::mapped`]), row `i` reads sequence `rows[i]` (the beams of a source read
/// its memory's keys and values where they are).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvView<'a, F: Float> {
    store: StoreRef<'a, F>,
    len: usize,
    rows: Option<&'a [usize]>,
}

impl<'a, F: Float> KvView<'a, F> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn batch_size(&self) -> usize {
        self.rows.map_or(self.store.dim().0, <[usize]>::len)
    }

    fn is_bf16(&self) -> bool {
        matches!(self.store, StoreRef::Bf16 { .. })
    }

    /// The view whose row `i` reads sequence `rows[i]`.
    ///
    /// # Panics
    /// If a row is not below the number of sequences, or the view is mapped already.
    pub(crate) fn mapped(self, rows: &'a [usize]) -> Self {
        let n = self.store.dim().0;
        assert!(
            self.rows.is_none() && rows.iter().all(|&r| r < n),
            "KvView::mapped: rows {rows:?} over {n} sequences"
        );
        KvView {
            rows: Some(rows),
            ..self
        }
    }

    /// The rows `seqs`.
    pub(crate) fn sequences(self, seqs: std::ops::Range<usize>) -> Self {
        match self.rows {
            Some(rows) => KvView {
                rows: Some(&rows[seqs]),
                ..self
            },
            None => KvView {
                store: self.store.sequences(seqs),
                ..self
            },
        }
    }

    /// The keys, `[B, H, len, d_k]` (a strided view of the transposed store).
    fn keys(self) -> CowArray<'a, F, Ix4> {
        let mut k = self.keys_t();
        k.swap_axes(2, 3);
        k
    }

    /// The keys transposed, `[B, H, d_k, len]`.
    fn keys_t(self) -> CowArray<'a, F, Ix4> {
        self.filled(true)
    }

    fn values(self) -> CowArray<'a, F, Ix4> {
        self.filled(false)
    }

    /// The keys (transposed) or values of every row: the store's as [`StoreRef::filled`],
    /// each row's sequence copied where the view is mapped.
    fn filled(self, keys: bool) -> CowArray<'a, F, Ix4> {
        let all = self.store.filled(self.len, keys);
        match self.rows {
            Some(rows) => all.select(Axis(0), rows).into(),
            None => all,
        }
    }

    /// Attention of one query per row over the cache ([`attention_step`]).
    fn attend_step(self, q: ArrayView2<F>, mask: &ResolvedMask, out: ArrayViewMut2<F>) {
        let len = self.len;
        match self.store {
            StoreRef::Full { kt, v } => attention_step(
                q,
                kt.slice(s![.., .., .., ..len]),
                v.slice(s![.., .., ..len, ..]),
                self.rows,
                mask,
                out,
            ),
            StoreRef::Bf16 { kt, v } => attention_step(
                q,
                kt.slice(s![.., .., .., ..len]),
                v.slice(s![.., .., ..len, ..]),
                self.rows,
                mask,
                out,
            ),
        }
    }
}

/// A run of a [`KvCache`]'s sequences, borrowed for a decoding step apart from the others
/// ([`KvCache::runs_mut`]): each thread steps its own sequences through a whole decoder
/// layer, appending to their caches without waiting for the others. The cache counts the
/// appended positions once every run has been stepped ([`KvCache::advance`]).
#[derive(Debug)]
pub(crate) struct KvRows<'a, F: Float> {
    store: StoreMut<'a, F>,
    len: usize,
}

impl<F: Float> KvRows<'_, F> {
    pub(crate) fn batch_size(&self) -> usize {
        self.view().batch_size()
    }

    pub(crate) fn view(&self) -> KvView<'_, F> {
        KvView {
            store: self.store.view(),
            len: self.len,
            rows: None,
        }
    }

    /// Appends `[B, H, T, d_k]` keys and values, for which the cache made room
    /// ([`KvCache::runs_mut`]).
    fn push(&mut self, k: ArrayView4<F>, v: ArrayView4<F>) {
        let len = self.len;
        match &mut self.store {
            StoreMut::Full { kt, v: vv } => append(kt.view_mut(), vv.view_mut(), len, k, v, as_they_are::<F>),
            StoreMut::Bf16 { kt, v: vv } => {
                append(kt.view_mut(), vv.view_mut(), len, k, v, rounded_to_bf16::<F>)
            }
        }
        self.len += k.dim().2;
    }
}

/// Two caches are equal when they hold the same positions (whatever their capacities).
impl<F: Float> PartialEq for KvCache<F> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.keys_t() == other.keys_t() && self.values() == other.values()
    }
}

impl<F: Float> KvCache<F> {
    /// The number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.store.dim().0
    }

    /// Whether the keys and values are held in bf16.
    pub fn is_bf16(&self) -> bool {
        self.store.is_bf16()
    }

    /// Every sequence's cached positions, read-only.
    pub(crate) fn view(&self) -> KvView<'_, F> {
        KvView {
            store: self.store.view(),
            len: self.len,
            rows: None,
        }
    }

    fn keys_t(&self) -> CowArray<'_, F, Ix4> {
        self.view().keys_t()
    }

    fn values(&self) -> CowArray<'_, F, Ix4> {
        self.view().values()
    }

    /// The sequences in runs of `per` (the last shorter), each to be stepped apart by `t`
    /// positions, for which room is made here; [`KvCache::advance`] counts them once every
    /// run has its keys and values.
    pub(crate) fn runs_mut(&mut self, t: usize, per: usize) -> Vec<KvRows<'_, F>> {
        self.reserve(t);
        let len = self.len;
        self.store
            .runs_mut(per)
            .into_iter()
            .map(|store| KvRows { store, len })
            .collect()
    }

    /// All the sequences as one run ([`KvCache::runs_mut`]).
    pub(crate) fn rows_mut(&mut self, t: usize) -> KvRows<'_, F> {
        self.reserve(t);
        let len = self.len;
        KvRows {
            store: self.store.view_mut(),
            len,
        }
    }

    /// Counts `t` positions appended to every sequence through [`KvCache::runs_mut`].
    pub(crate) fn advance(&mut self, t: usize) {
        assert!(
            self.len + t <= self.store.dim().3,
            "KvCache::advance: {} + {t} positions in a capacity of {}",
            self.len,
            self.store.dim().3
        );
        self.len += t;
    }

    /// Keeps the sequences `rows` of the batch, in that order: a row may appear more than once
    /// (a beam copied) or not at all (a sequence that ended). The capacity is kept.
    ///
    /// # Panics
    /// If a row is not below the batch size.
    pub fn select(&mut self, rows: &[usize]) {
        let b = self.batch_size();
        assert!(
            rows.iter().all(|&r| r < b),
            "KvCache::select: rows {rows:?} for a batch of {b}"
        );
        if rows.iter().copied().eq(0..b) {
            return;
        }
        let n = rows.len();
        if n > b {
            // More sequences than the buffers hold: one copy per kept row into the spare
            // buffers (kept from the last select), then the two swap. Each sequence's block
            // is contiguous; the capacity is kept.
            let mut to = self.spare_for(n);
            self.store.copy_into(&mut to, rows, self.len);
            to.truncate(n);
            self.spare = Some(std::mem::replace(&mut self.store, to));
            return;
        }
        // In place: only the sequences that change are written. A beam search keeps most of
        // its beams where they were (four in five of a small beam decode's rows at a step),
        // and had copied every row of every cache at every step. A source that some
        // destination overwrites is first saved in the spare buffers, at its own place.
        let overwritten = |r: usize| r < n && rows[r] != r;
        let mut saved: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|&(i, &r)| r != i && overwritten(r))
            .map(|(_, &r)| r)
            .collect();
        saved.sort_unstable();
        saved.dedup();
        let mut spare = (!saved.is_empty()).then(|| self.spare_for(n));
        self.store.move_within(spare.as_mut(), &saved, rows, self.len);
        if spare.is_some() {
            self.spare = spare;
        }
        self.store.truncate(n);
    }

    /// The spare buffers (taken out: the caller puts them back), with room for `n` sequences
    /// of the store's heads, features, capacity and kind: those kept from the last select
    /// when they have it, else new ones.
    fn spare_for(&mut self, n: usize) -> Store<F> {
        let (_, h, dk, cap) = self.store.dim();
        let bf16 = self.store.is_bf16();
        let fits = |x: &Store<F>| {
            let (sb, sh, sdk, scap) = x.dim();
            sb >= n && (sh, sdk, scap) == (h, dk, cap) && x.is_bf16() == bf16
        };
        self.spare
            .take()
            .filter(fits)
            .unwrap_or_else(|| Store::zeros(bf16, n, h, dk, cap))
    }

    /// Appends `[B, H, T, d_k]` keys and values, growing the buffers (doubling) if needed.
    fn push(&mut self, k: ArrayView4<F>, v: ArrayView4<F>) {
        let t = k.dim().2;
        self.rows_mut(t).push(k, v);
        self.advance(t);
    }

    /// Makes room for `t` more positions, growing the buffers (doubling) if needed.
    fn reserve(&mut self, t: usize) {
        let (b, h, dk, cap) = self.store.dim();
        let (len, need) = (self.len, self.len + t);
        if need > cap {
            let cap = need.max(2 * cap).max(8);
            let mut grown = Store::zeros(self.store.is_bf16(), b, h, dk, cap);
            self.store.copy_into(&mut grown, &(0..b).collect::<Vec<_>>(), len);
            self.store = grown;
            self.spare = None;
        }
    }
}

/// Features appended to an `F` cache: as they are, not copied.
fn as_they_are<'x, F>(x: &'x [F], _: &'x mut [F]) -> &'x [F] {
    x
}

/// Features appended to a bf16 cache: rounded into `y`.
fn rounded_to_bf16<'x, F: Float>(x: &'x [F], y: &'x mut [u16]) -> &'x [u16] {
    match F::as_f32(x) {
        Some(x) => to_bf16_slice(x, y),
        None => {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = to_bf16(x.to_f64() as f32);
            }
        }
    }
    y
}

/// Copies the first `len` positions of the sequences `rows` of a cache's keys (transposed)
/// and values into sequences `0..rows.len()` of `to_kt` and `to_v`, whose heads and features
/// are the same and whose capacity is the same or larger, cut into runs by [`copy_run`].
fn copy_rows<S: Copy + Send + Sync>(
    kt: &Array4<S>,
    v: &Array4<S>,
    to_kt: &mut Array4<S>,
    to_v: &mut Array4<S>,
    rows: &[usize],
    len: usize,
) {
    let (_, h, dk, cap) = kt.dim();
    let to_cap = to_kt.dim().3;
    let (kt, v) = (
        kt.as_slice().expect("standard layout"),
        v.as_slice().expect("standard layout"),
    );
    let (to_kt, to_v) = (
        Disjoint::new(to_kt.as_slice_mut().expect("standard layout")),
        Disjoint::new(to_v.as_slice_mut().expect("standard layout")),
    );
    let (to_seq, seq) = (h * dk * to_cap, h * dk * cap);
    let per = copy_run(rows.len(), rows.len() * h * dk * len);
    for_each_index(rows.len().div_ceil(per), |p| {
        for (i, &r) in rows.iter().enumerate().skip(p * per).take(per) {
            // SAFETY: destination sequence i, disjoint from every other's (each holds
            // h · d_k · to_cap elements in either buffer).
            let to = unsafe { (to_kt.range(i * to_seq, to_seq), to_v.range(i * to_seq, to_seq)) };
            let from = (&kt[r * seq..(r + 1) * seq], &v[r * seq..(r + 1) * seq]);
            copy_sequence(to, from, (h, dk, cap, to_cap), len);
        }
    });
}

/// Gives sequence `i` of a cache's keys (transposed) and values the first `len` positions of
/// sequence `rows[i]`, for every `i` with `rows[i] != i`, in place. A source that some
/// destination overwrites is one of `saved_rows`, first copied to the same sequence of
/// `spare` (same heads, features and capacity, at least `rows.len()` sequences); the others
/// are not written here. Both passes cut into runs as [`copy_rows`], each sequence saved and
/// written by the thread whose run holds it (saved by the thread of the run the copies went
/// to, a tiny beam decode on two threads had taken 5–7% longer than with every row copied).
fn move_rows<S: Copy + Send + Sync>(
    kt: &mut Array4<S>,
    v: &mut Array4<S>,
    spare: Option<(&mut Array4<S>, &mut Array4<S>)>,
    saved_rows: &[usize],
    rows: &[usize],
    len: usize,
) {
    let (_, h, dk, cap) = kt.dim();
    let (seq, dims) = (h * dk * cap, (h, dk, cap, cap));
    let (kt, v) = (
        Disjoint::new(kt.as_slice_mut().expect("standard layout")),
        Disjoint::new(v.as_slice_mut().expect("standard layout")),
    );
    let per = copy_run(rows.len(), rows.len() * h * dk * len);
    let runs = rows.len().div_ceil(per);
    let saved = spare.map(|(s_kt, s_v)| {
        let (s_b, s_h, s_dk, s_cap) = s_kt.dim();
        assert!(
            s_b >= rows.len() && (s_h, s_dk, s_cap) == (h, dk, cap),
            "KvCache: spare buffers {:?} for {} rows of {:?}",
            s_kt.shape(),
            rows.len(),
            (h, dk, cap)
        );
        let (s_kt, s_v) = (
            Disjoint::new(s_kt.as_slice_mut().expect("standard layout")),
            Disjoint::new(s_v.as_slice_mut().expect("standard layout")),
        );
        for_each_index(runs, |p| {
            for &r in saved_rows.iter().filter(|&&r| r / per == p) {
                // SAFETY: spare sequence r written by this iteration alone (the saved rows
                // are distinct); the store is only read in this pass.
                let (to, from) = unsafe {
                    (
                        (s_kt.range(r * seq, seq), s_v.range(r * seq, seq)),
                        (kt.shared(r * seq, seq), v.shared(r * seq, seq)),
                    )
                };
                copy_sequence(to, from, dims, len);
            }
        });
        (s_kt, s_v)
    });
    for_each_index(runs, |p| {
        for (i, &r) in rows.iter().enumerate().skip(p * per).take(per) {
            if r == i {
                continue;
            }
            // SAFETY: destination sequence i is written by this iteration alone (each
            // destination once); a source is either saved (read from the spare buffers, not
            // written in this pass) or a row no destination is (`r` past the kept rows, or
            // kept where it is), only read here.
            let to = unsafe { (kt.range(i * seq, seq), v.range(i * seq, seq)) };
            let from = unsafe {
                match (&saved, saved_rows.binary_search(&r)) {
                    (Some((s_kt, s_v)), Ok(_)) => (s_kt.shared(r * seq, seq), s_v.shared(r * seq, seq)),
                    (None, Ok(_)) => unreachable!("saved rows come with spare buffers"),
                    (_, Err(_)) => (kt.shared(r * seq, seq), v.shared(r * seq, seq)),
                }
            };
            copy_sequence(to, from, dims, len);
        }
    });
}

/// The sequences a part of a copy of `rows` destination sequences takes: on the team above a
/// few kilobytes (`elems` elements per buffer in all), each destination by the thread that a
/// decoding step's runs give it (a beam search reorders its caches at every step: on the
/// calling thread alone the copies had been a sixth of its samples in a small beam decode on
/// two threads, the other thread waiting).
fn copy_run(rows: usize, elems: usize) -> usize {
    let parts = if crate::kernels::parallel_worth(2 * elems) {
        crate::kernels::parallel::threads().min(rows)
    } else {
        1
    };
    rows.div_ceil(parts.max(1)).max(1)
}

/// Copies the first `len` positions of one sequence's keys (transposed) and values, `from`,
/// into another's, `to`; `dims` is `(h, d_k, capacity of from, capacity of to)`.
fn copy_sequence<S: Copy>(
    to: (&mut [S], &mut [S]),
    from: (&[S], &[S]),
    (h, dk, cap, to_cap): (usize, usize, usize, usize),
    len: usize,
) {
    // Runs of `run` filled elements every `stride` elements, `per_row` runs per sequence:
    // the transposed keys hold `len` of every `cap` positions per (head, feature), the values
    // `len · d_k` of every `cap · d_k` per head.
    for (dst, src, run, stride, to_stride, per_row) in [
        (to.0, from.0, len, cap, to_cap, h * dk),
        (to.1, from.1, len * dk, cap * dk, to_cap * dk, h),
    ] {
        for j in 0..per_row {
            dst[j * to_stride..j * to_stride + run].copy_from_slice(&src[j * stride..j * stride + run]);
        }
    }
}

/// Writes keys `k` and values `v` `[B, H, T, d_k]` at positions `len..len + T` of a cache's
/// keys (transposed) and values, which have room for them; `conv` gives a run of features
/// (a position's keys or values, every head's) into the cache's type.
///
/// The buffers are in standard layout (as [`Store::zeros`] makes them): each pair `(b, h)`
/// is a run of `d_k · cap` elements, feature d of position p at `d·cap + p` among the keys and
/// at `p·d_k + d` among the values. Through an ndarray view of each pair instead (its
/// construction, strides and offsets at every run), the appends had taken a tenth of a tiny
/// greedy decode; in one process against that form (Intel Xeon, one thread), tiny decoding
/// 2.6–2.9% faster in `f32` and 2.4–3.5% in bf16, small 1.0–1.8% and 4.1%.
fn append<F: Float, S: Copy + Default + Send + Sync>(
    mut kt: ArrayViewMut4<S>,
    mut vv: ArrayViewMut4<S>,
    len: usize,
    k: ArrayView4<F>,
    v: ArrayView4<F>,
    conv: impl for<'x> Fn(&'x [F], &'x mut [S]) -> &'x [S] + Sync,
) {
    let (b, h, t, dk) = k.dim();
    let cap = kt.dim().3;
    if b * h * t * dk == 0 {
        return;
    }
    assert!(
        kt.is_standard_layout()
            && vv.is_standard_layout()
            && kt.dim() == (b, h, dk, cap)
            && vv.dim() == (b, h, cap, dk),
        "KvCache: buffers {:?} and {:?} for keys {:?}",
        kt.shape(),
        vv.shape(),
        k.shape()
    );
    // Each sequence's rows on the thread that runs its attention next (the same cut into
    // contiguous runs of sequences as `attention_step`'s), so that the cache's lines are
    // written in the core that reads them: written by one thread and read by the other,
    // the helper's half of a small bf16 decode's attention ran half again as long.
    let parts = crate::kernels::parallel::threads().clamp(1, b.max(1));
    let per = b.div_ceil(parts).max(1);
    let (kt, vv) = (
        Disjoint::new(kt.as_slice_mut().expect("standard layout")),
        Disjoint::new(vv.as_slice_mut().expect("standard layout")),
    );
    for_each_index(b.div_ceil(per), |i| {
        let seqs = i * per..((i + 1) * per).min(b);
        let pairs = seqs.start * h * dk * cap..seqs.end * h * dk * cap;
        // SAFETY: the sequences of this part, disjoint from other parts' (both buffers hold
        // d_k · cap elements a pair).
        let (kt, vv) = unsafe {
            (
                kt.range(pairs.start, pairs.len()),
                vv.range(pairs.start, pairs.len()),
            )
        };
        // A position's features of every head, gathered (if strided) and converted at once:
        // a call of `conv` per head had cost more than its arithmetic (bf16's conversion
        // of 16 features).
        let n = h * dk;
        let (mut from_stack, mut to_stack) = ([F::zero(); RUN], [S::default(); RUN]);
        let (mut from_heap, mut to_heap);
        let (from, to): (&mut [F], &mut [S]) = if n <= RUN {
            (&mut from_stack[..n], &mut to_stack[..n])
        } else {
            from_heap = vec![F::zero(); n];
            to_heap = vec![S::default(); n];
            (&mut from_heap, &mut to_heap)
        };
        for (s, (kt, vv)) in kt
            .chunks_exact_mut(h * dk * cap)
            .zip(vv.chunks_exact_mut(h * dk * cap))
            .enumerate()
        {
            let bi = seqs.start + s;
            for j in 0..t {
                let p = len + j;
                let keys = conv(position(&k, bi, j, from), to);
                // Feature d of position p: row d of each head's [d_k, cap].
                for (kt, key) in kt.chunks_exact_mut(dk * cap).zip(keys.chunks_exact(dk)) {
                    for (d, &y) in key.iter().enumerate() {
                        kt[d * cap + p] = y;
                    }
                }
                let values = conv(position(&v, bi, j, from), to);
                for (vv, value) in vv.chunks_exact_mut(dk * cap).zip(values.chunks_exact(dk)) {
                    vv[p * dk..(p + 1) * dk].copy_from_slice(value);
                }
            }
        }
    });
}

/// Every head's features of `x[bi, .., j, ..]`, head after head: where they lie if they are
/// contiguous so, else gathered into `buf` (`H · d_k` long).
#[inline(always)]
fn position<'a, F: Float>(x: &'a ArrayView4<'_, F>, bi: usize, j: usize, buf: &'a mut [F]) -> &'a [F] {
    let (_, h, _, dk) = x.dim();
    let s = x.strides();
    // SAFETY: (bi, .., j, ..) is inside x (the caller's loops); by pointer, as ndarray's
    // indexing (bounds checks, four strides) had made the memory's keys, a whole source at
    // once, slower to cache.
    unsafe {
        let src = x.as_ptr().offset(bi as isize * s[0] + j as isize * s[2]);
        if s[3] == 1 && (h == 1 || s[1] == dk as isize) {
            return std::slice::from_raw_parts(src, h * dk);
        }
        for (hi, head) in buf.chunks_exact_mut(dk).enumerate() {
            for (d, f) in head.iter_mut().enumerate() {
                *f = *src.offset(hi as isize * s[1] + d as isize * s[3]);
            }
        }
    }
    buf
}

/// Features of a position (every head's) converted on the stack when appending to a cache;
/// wider models take a buffer on the heap.
const RUN: usize = 1024;

/// The projections of a [`MultiHead`] packed once for the many products of a decode
/// ([`crate::kernels::PackedB`]): W_Q, W_K and W_V side by side (self-attention) or W_Q alone
/// (cross-attention, whose keys and values are projected once), and W_O. Made by
/// [`MultiHead::pack`], valid while the layer is borrowed.
#[derive(Clone, Debug)]
pub(crate) struct PackedMultiHead<F: Float> {
    /// `[W_Q W_K W_V]ᵀ` (self-attention) or `W_Qᵀ` (cross-attention).
    input: PackedB,
    /// The biases of `input`, side by side.
    input_bias: Option<Array1<F>>,
    /// Cross-attention over a whole memory: `[W_K W_V]ᵀ` and their biases.
    memory: Option<(PackedB, Option<Array1<F>>)>,
    /// `W_Oᵀ`.
    output: PackedB,
}

impl<F: Float> PackedMultiHead<F> {
    /// The bytes of the weights a decoding step multiplies by: `input` and `output` (the
    /// memory's projections run once, before the steps).
    pub(crate) fn step_bytes(&self) -> usize {
        self.input.bytes() + self.output.bytes()
    }
}

impl MultiHeadConfig {
    /// Its number of parameters, W_Q, W_K, W_V, W_O and their biases, in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn params(&self) -> f64 {
        let d = self.d_model as f64;
        4.0 * d * d + if self.bias { 4.0 * d } else { 0.0 }
    }

    /// FLOPs of a forward pass of one sequence of `tq` queries over `tk` keys (self-attention:
    /// `tq = tk`): the projections, `2 · d_model²` per query for W_Q and W_O and per key for
    /// W_K and W_V, and the attention products, `4 · tq · tk · d_model` (Eq. 1: QKᵀ and the
    /// weighted sum of V). The softmax is not counted.
    pub fn flops(&self, tq: usize, tk: usize) -> f64 {
        let (d, q, k) = (self.d_model as f64, tq as f64, tk as f64);
        2.0 * d * d * (2.0 * q + 2.0 * k) + 4.0 * q * k * d
    }

    /// `n_heads` heads over `d_model`, with biases and PyTorch's `nn.Transformer` attention
    /// dropout of 0.1.
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        MultiHeadConfig {
            d_model,
            n_heads,
            p_drop: 0.1,
            bias: true,
        }
    }

    /// The same config with attention dropout `p`.
    pub fn with_p_drop(mut self, p: f32) -> Self {
        self.p_drop = p;
        self
    }

    /// The same config with the projection biases on or off.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// The width of one head, `d_k = d_model / n_heads`.
    pub fn d_k(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`MultiHeadConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`MultiHeadConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<MultiHead> {
        self.init_as(rng)
    }

    /// Builds the layer. W_Q, W_K and W_V are Xavier-uniform as the `[3·d_model, d_model]`
    /// matrix PyTorch packs them in (fan-out 3·d_model), W_O Xavier-uniform, biases zero:
    /// PyTorch's initialisation.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if d_model or n_heads is 0,
    /// d_model is not divisible by n_heads, or the dropout rate is not in [0, 1).
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<MultiHead<F>> {
        check::heads(self.d_model, self.n_heads)?;
        check::tensor("d_model", &[3, self.d_model, self.d_model], size_of::<F>())?;
        check::dropout("p_drop", self.p_drop)?;
        let d = self.d_model;
        let mut in_proj = || xavier_uniform((d, d), d, 3 * d, rng);
        let (w_q, w_k, w_v) = (in_proj(), in_proj(), in_proj());
        let w_o = xavier_uniform((d, d), d, d, rng);
        let bias = || self.bias.then(|| Array1::zeros(d));
        Ok(MultiHead {
            cfg: self.clone(),
            p: MultiHeadParams {
                w_q,
                b_q: bias(),
                w_k,
                b_k: bias(),
                w_v,
                b_v: bias(),
                w_o,
                b_o: bias(),
            },
        })
    }
}

impl<F: Float> MultiHead<F> {
    /// Forward pass in training mode (attention dropout on), keeping what backward needs.
    ///
    /// `memory = None` is self-attention; `Some(m)` is cross-attention with keys and values
    /// from m.
    ///
    /// # Shapes
    /// `x` `[B, Tq, d_model]`, `memory` `[B, Tk, d_model]` → `[B, Tq, d_model]`; the mask is
    /// for `(B, Tq, Tk)` (Tk = Tq in self-attention).
    ///
    /// # Panics
    /// If a width is not d_model, the batch sizes differ, or the mask does not fit.
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
        rng: &mut impl Rng,
    ) -> (Array3<F>, MultiHeadCache<F>) {
        let (y, cache) = self.run(x, memory, mask, Pass::Train(rng));
        (y, cache.expect("kept"))
    }

    /// Forward pass without dropout and without cache.
    ///
    /// # Panics
    /// As [`MultiHead::forward`].
    pub fn infer(&self, x: ArrayView3<F>, memory: Option<ArrayView3<F>>, mask: &Mask) -> Array3<F> {
        self.run(x, memory, mask, Pass::Infer).0
    }

    /// Forward pass without dropout that also hands back every head's attention weights,
    /// `[B, H, Tq, Tk]` (PyTorch: `need_weights=True, average_attn_weights=False`).
    ///
    /// # Panics
    /// As [`MultiHead::forward`].
    pub fn infer_with_weights(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
    ) -> (Array3<F>, Array4<F>) {
        let (y, cache) = self.run(x, memory, mask, Pass::Weights);
        (y, cache.expect("kept").core.into_weights())
    }

    /// `(B, Tq, Tk)` of queries `x` `[B, Tq, d_model]` over `memory` `[B, Tk, d_model]` (or
    /// over `x` itself).
    ///
    /// # Panics
    /// If the shapes do not fit together.
    fn check_pair(&self, x: ArrayView3<F>, memory: Option<ArrayView3<F>>) -> (usize, usize, usize) {
        let d = self.cfg.d_model;
        let (b, tq, dx) = x.dim();
        let src = memory.unwrap_or(x);
        let (bm, tk, dm) = src.dim();
        assert!(
            dx == d && dm == d && bm == b,
            "MultiHead: x {:?}, memory {:?}: expected [B, Tq, d_model = {d}] and [B, Tk, d_model = {d}]",
            x.shape(),
            src.shape()
        );
        (b, tq, tk)
    }

    /// The output, and the cache for the backward pass unless `pass` is [`Pass::Infer`].
    fn run(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
        pass: Pass<'_>,
    ) -> (Array3<F>, Option<MultiHeadCache<F>>) {
        let d = self.cfg.d_model;
        let (b, tq, tk) = self.check_pair(x, memory);
        let mask = resolve_or_panic(mask, b, tq, tk);
        let x_rows = rows(x);
        let m_rows = memory.map(rows);
        let src_rows = m_rows.as_ref().unwrap_or(&x_rows);
        let p = &self.p;
        let q = affine(x_rows.view(), p.w_q.view(), p.b_q.as_ref().map(|b| b.view()));
        let k = affine(src_rows.view(), p.w_k.view(), p.b_k.as_ref().map(|b| b.view()));
        let v = affine(src_rows.view(), p.w_v.view(), p.b_v.as_ref().map(|b| b.view()));
        let (ctx, core) = self.all_heads(
            self.heads(q.view(), b, tq),
            self.heads(k.view(), b, tk),
            self.heads(v.view(), b, tk),
            mask,
            pass,
        );
        let y = affine(ctx.view(), p.w_o.view(), p.b_o.as_ref().map(|b| b.view()));
        let y = y.into_shape_with_order((b, tq, d)).expect("standard layout");
        let cache = core.map(|core| MultiHeadCache {
            dims: (b, tq, tk),
            x: x_rows,
            memory: m_rows,
            q,
            k,
            v,
            ctx,
            core,
        });
        (y, cache)
    }

    /// Backward pass: adds the parameter gradients into `g` and returns `(∂L/∂x, ∂L/∂memory)`
    /// (`None` in self-attention, where x's gradient already includes the key and value paths).
    ///
    /// # Panics
    /// If `grad_y` is not `[B, Tq, d_model]`.
    pub fn backward(
        &self,
        cache: &MultiHeadCache<F>,
        grad_y: ArrayView3<F>,
        g: &mut MultiHeadParams<F>,
    ) -> (Array3<F>, Option<Array3<F>>) {
        let (b, tq, tk) = cache.dims;
        let d = self.cfg.d_model;
        assert_eq!(
            grad_y.dim(),
            (b, tq, d),
            "MultiHead::backward: grad_y is {:?}, expected [B, Tq, d_model] = {:?}",
            grad_y.shape(),
            [b, tq, d]
        );
        let p = &self.p;
        let grad_y = grad_y.as_standard_layout();
        let grad_y = grad_y
            .view()
            .into_shape_with_order((b * tq, d))
            .expect("standard layout");
        let grad_ctx = affine_backward(
            cache.ctx.view(),
            p.w_o.view(),
            grad_y,
            g.w_o.view_mut(),
            g.b_o.as_mut().map(|b| b.view_mut()),
        );
        // The three gradients come from the workspace unzeroed: `attention_backward` writes
        // every element of them before it reads any (each pair of sequence and head writes
        // its own rows: products with β = 0, and zeros for keys past the key limit).
        let core =
            |gq: ndarray::ArrayViewMut2<F>, gk: ndarray::ArrayViewMut2<F>, gv: ndarray::ArrayViewMut2<F>| {
                attention_backward(
                    self.heads(cache.q.view(), b, tq),
                    self.heads(cache.k.view(), b, tk),
                    self.heads(cache.v.view(), b, tk),
                    &cache.core,
                    self.heads(grad_ctx.view(), b, tq),
                    self.heads_mut(gq, b, tq),
                    self.heads_mut(gk, b, tk),
                    self.heads_mut(gv, b, tk),
                )
            };
        let (mut grad_k, mut grad_v) = (None, None);
        // SAFETY: `core` writes every element of the three views before reading any (above).
        let grad_q = unsafe {
            filled((b * tq, d), |gq| {
                grad_k = Some(filled((b * tk, d), |gk| {
                    grad_v = Some(filled((b * tk, d), |gv| core(gq, gk, gv)));
                }));
            })
        };
        let (grad_k, grad_v) = (grad_k.expect("filled"), grad_v.expect("filled"));
        grad_ctx.give_back();
        let src = cache.memory.as_ref().unwrap_or(&cache.x);
        // Weight gradients, then the input gradients summed by the GEMMs themselves (β = 1):
        // ∂L/∂x = G_Q·W_Q (+ G_K·W_K + G_V·W_V in self-attention).
        fn bias<F: Float>(b: &mut Option<Array1<F>>) -> Option<ndarray::ArrayViewMut1<'_, F>> {
            b.as_mut().map(|b| b.view_mut())
        }
        let (gw, gb) = (
            [g.w_q.view_mut(), g.w_k.view_mut(), g.w_v.view_mut()],
            [bias(&mut g.b_q), bias(&mut g.b_k), bias(&mut g.b_v)],
        );
        let (grads, inputs) = ([&grad_q, &grad_k, &grad_v], [&cache.x, src, src]);
        for i in 0..3 {
            check_backward_weights(
                inputs[i].view(),
                grads[i].view(),
                gw[i].view(),
                gb[i].as_ref().map(|b| b.len()),
            );
        }
        // The biases' column sums with the weight gradients where their bf16 packing takes
        // them, else with the input gradients, whose operands pack in less time.
        let in_packing = bias_sums_in_packing::<F>();
        let (gb_w, gb_x) = if in_packing {
            (gb, [None, None, None])
        } else {
            ([None, None, None], gb)
        };
        let weights = || {
            for ((i, gw), gb) in gw.into_iter().enumerate().zip(gb_w) {
                gemm_weight_grad(grads[i].view(), inputs[i].view(), gw, gb);
            }
        };
        let biases = || {
            for (i, gb) in gb_x.into_iter().enumerate() {
                if let Some(gb) = gb {
                    add_column_sums(grads[i].view(), gb);
                }
            }
        };
        // The input gradients beside the weight gradients (same FLOPs), into arrays taken here.
        let mut grad_src = None;
        // SAFETY: a GEMM with β = 0 writes every element (then the others add to it).
        let grad_x = unsafe {
            filled((b * tq, d), |gx| match cache.memory {
                Some(_) => {
                    grad_src = Some(filled((b * tk, d), |gs| {
                        join_gradients(weights, || {
                            gemm(F::ONE, grad_q.view(), p.w_q.view(), F::ZERO, gx);
                            let mut gs = gs;
                            gemm(F::ONE, grad_k.view(), p.w_k.view(), F::ZERO, gs.view_mut());
                            gemm(F::ONE, grad_v.view(), p.w_v.view(), F::ONE, gs);
                            biases();
                        })
                    }));
                }
                None => join_gradients(weights, || {
                    let mut gx = gx;
                    gemm(F::ONE, grad_q.view(), p.w_q.view(), F::ZERO, gx.view_mut());
                    gemm(F::ONE, grad_k.view(), p.w_k.view(), F::ONE, gx.view_mut());
                    gemm(F::ONE, grad_v.view(), p.w_v.view(), F::ONE, gx);
                    biases();
                }),
            })
        };
        (grad_q, grad_k, grad_v).give_back();
        let to3 = |a: Array2<F>, t: usize| a.into_shape_with_order((b, t, d)).expect("standard layout");
        (to3(grad_x, tq), grad_src.map(|gs| to3(gs, tk)))
    }

    /// An empty self-attention cache for `b` sequences, with room for `capacity` positions
    /// before it grows; in bf16 for an `f32` layer in bf16 precision (see [`KvCache`]).
    pub fn empty_cache(&self, b: usize, capacity: usize) -> KvCache<F> {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        // A hint, not a promise: "until the end of the sequence" (`usize::MAX`) allocates no
        // more than a long sequence would, and the cache doubles past it as steps need.
        let capacity = capacity.min(MAX_INITIAL_CAPACITY);
        let bf16 =
            precision() == Precision::Bf16 && std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>();
        KvCache {
            store: Store::zeros(bf16, b, h, dk, capacity),
            len: 0,
            spare: None,
        }
    }

    /// Cross-attention keys and values of `memory` `[B, S, d_model]`, projected once for a
    /// whole decode.
    ///
    /// # Panics
    /// If `memory` is not `[B, S, d_model]`.
    pub fn project_kv(&self, memory: ArrayView3<F>) -> KvCache<F> {
        let (b, s_len, d) = memory.dim();
        assert_eq!(
            d,
            self.cfg.d_model,
            "MultiHead::project_kv: memory is {:?}, expected [B, S, d_model = {}]",
            memory.shape(),
            self.cfg.d_model
        );
        let m = rows_in_place(memory);
        let p = &self.p;
        let k = affine(m.view(), p.w_k.view(), p.b_k.as_ref().map(|b| b.view()));
        let v = affine(m.view(), p.w_v.view(), p.b_v.as_ref().map(|b| b.view()));
        let mut cache = self.empty_cache(b, s_len);
        cache.push(self.heads(k.view(), b, s_len), self.heads(v.view(), b, s_len));
        cache
    }

    /// Self-attention for new positions `x` `[B, Tq, d_model]` that follow the `cache.len()`
    /// positions already cached: their keys and values are appended, and each new position
    /// attends causally to every position up to itself. Equal to [`MultiHead::infer`] over the
    /// whole sequence with a causal mask, restricted to the new rows.
    ///
    /// # Panics
    /// If `x` is not `[B, Tq, d_model]` for the cache's B.
    pub fn infer_cached(&self, x: ArrayView3<F>, cache: &mut KvCache<F>) -> Array3<F> {
        let tq = x.dim().1;
        let y = self.infer_cached_rows(x, &mut cache.rows_mut(tq));
        cache.advance(tq);
        y
    }

    /// [`MultiHead::infer_cached`] over a run of a cache's sequences.
    fn infer_cached_rows(&self, x: ArrayView3<F>, cache: &mut KvRows<F>) -> Array3<F> {
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size(),
            "MultiHead::infer_cached: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        let x_rows = rows_in_place(x);
        let p = &self.p;
        let k = affine(x_rows.view(), p.w_k.view(), p.b_k.as_ref().map(|b| b.view()));
        let v = affine(x_rows.view(), p.w_v.view(), p.b_v.as_ref().map(|b| b.view()));
        cache.push(self.heads(k.view(), b, tq), self.heads(v.view(), b, tq));
        self.attend(x_rows.view(), tq, cache.view(), &Mask::causal())
    }

    /// Attention of `x` `[B, Tq, d_model]` over cached keys and values (cross-attention over a
    /// memory from [`MultiHead::project_kv`]); `mask` is for `(B, Tq, cache.len())`.
    ///
    /// # Panics
    /// If `x` does not fit the cache or the mask does not fit.
    pub fn infer_with_cache(&self, x: ArrayView3<F>, cache: &KvCache<F>, mask: &Mask) -> Array3<F> {
        self.infer_with_view(x, cache.view(), mask)
    }

    /// [`MultiHead::infer_with_cache`] over a run of a cache's sequences.
    fn infer_with_view(&self, x: ArrayView3<F>, cache: KvView<F>, mask: &Mask) -> Array3<F> {
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size(),
            "MultiHead::infer_with_cache: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        self.attend(rows_in_place(x).view(), tq, cache, mask)
    }

    /// Queries from `x_rows` (`tq` positions per sequence), attention over the cache, W_O.
    fn attend(&self, x_rows: ArrayView2<F>, tq: usize, cache: KvView<F>, mask: &Mask) -> Array3<F> {
        let b = cache.batch_size();
        let d = self.cfg.d_model;
        let p = &self.p;
        let q = affine(x_rows, p.w_q.view(), p.b_q.as_ref().map(|b| b.view()));
        // One query over a bf16 cache reads it in place rather than widened into a copy;
        // over an `f32` one this path keeps the general attention (and its bits).
        let ctx = self.context(q.view(), tq, cache, mask, tq == 1 && cache.is_bf16());
        let y = affine(ctx.view(), p.w_o.view(), p.b_o.as_ref().map(|b| b.view()));
        y.into_shape_with_order((b, tq, d)).expect("standard layout")
    }

    /// The heads' outputs `[B·Tq, d_model]` for projected queries `q` `[B·Tq, d_model]` over
    /// the cache: one query per sequence on the decoding step's path when `step`, else the
    /// general attention.
    fn context(&self, q: ArrayView2<F>, tq: usize, cache: KvView<F>, mask: &Mask, step: bool) -> Array2<F> {
        let b = cache.batch_size();
        let mask = resolve_or_panic(mask, b, tq, cache.len());
        // SAFETY: both `attention_step` and `attention_infer` write every element of their
        // output.
        unsafe {
            crate::kernels::workspace::filled((b * tq, self.cfg.d_model), |mut ctx| {
                if step {
                    cache.attend_step(q, &mask, ctx);
                } else {
                    attention_infer(
                        self.heads(q.as_standard_layout().view(), b, tq),
                        cache.keys().view(),
                        cache.values().view(),
                        &mask,
                        self.heads_mut(ctx.view_mut(), b, tq),
                    );
                }
            })
        }
    }

    /// The projections packed for decoding: Q, K and V together for self-attention
    /// (`self_attention`), Q alone for cross-attention; `None` where nothing packs (see
    /// [`PackedB`]).
    pub(crate) fn pack(&self, self_attention: bool) -> Option<PackedMultiHead<F>> {
        self.pack_with(self_attention, false)
    }

    /// [`MultiHead::pack`], for cross-attention with W_K and W_V packed too (`memory`), for
    /// products over a whole memory rather than over a cache projected once.
    pub(crate) fn pack_with(&self, self_attention: bool, memory: bool) -> Option<PackedMultiHead<F>> {
        let p = &self.p;
        let both = |a: &Option<Array1<F>>, b: &Option<Array1<F>>| match (a, b) {
            (Some(a), Some(b)) => Some(Some(
                ndarray::concatenate(Axis(0), &[a.view(), b.view()]).expect("1-D"),
            )),
            (None, None) => Some(None),
            _ => None,
        };
        let memory = if memory && !self_attention {
            Some((PackedB::concat(&[p.w_k.t(), p.w_v.t()])?, both(&p.b_k, &p.b_v)?))
        } else {
            None
        };
        let (input, input_bias) = if self_attention {
            let input = PackedB::concat(&[p.w_q.t(), p.w_k.t(), p.w_v.t()])?;
            let bias = match (&p.b_q, &p.b_k, &p.b_v) {
                (Some(q), Some(k), Some(v)) => {
                    Some(ndarray::concatenate(Axis(0), &[q.view(), k.view(), v.view()]).expect("1-D"))
                }
                _ => None,
            };
            (input, bias)
        } else {
            (PackedB::new(p.w_q.t())?, p.b_q.clone())
        };
        if self_attention && input_bias.is_none() && (p.b_q.is_some() || p.b_k.is_some() || p.b_v.is_some()) {
            // Some but not all of the three biases: not a layout this crate builds.
            return None;
        }
        Some(PackedMultiHead {
            input,
            input_bias,
            memory,
            output: PackedB::new(p.w_o.t())?,
        })
    }

    /// [`MultiHead::infer`] with the projections of [`MultiHead::pack_with`] (`None`: the weights
    /// as they are): Q, K and V in one product in self-attention, K and V in one in
    /// cross-attention.
    pub(crate) fn infer_packed(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
        packed: Option<&PackedMultiHead<F>>,
    ) -> Array3<F> {
        let packed = match packed {
            Some(p) if memory.is_none() || p.memory.is_some() => p,
            _ => return self.infer(x, memory, mask),
        };
        let d = self.cfg.d_model;
        let (b, tq, tk) = self.check_pair(x, memory);
        let mask = resolve_or_panic(mask, b, tq, tk);
        let x_rows = rows_in_place(x);
        let product = |a: ArrayView2<F>, w: &PackedB, bias: &Option<Array1<F>>| {
            // SAFETY: gemm_packed writes every element.
            unsafe {
                filled((a.nrows(), w.dim().1), |c| {
                    gemm_packed(a, w, bias.as_ref().map(|b| b.view()), false, c)
                })
            }
        };
        let input = product(x_rows.view(), &packed.input, &packed.input_bias);
        let kv = memory.map(|m| {
            let (w, bias) = packed.memory.as_ref().expect("checked above");
            product(rows_in_place(m).view(), w, bias)
        });
        let (q, k, v) = match &kv {
            None => {
                let [q, k, v] = self.split_heads::<3>(input.view(), b, tq);
                (q, k, v)
            }
            Some(kv) => {
                let [q] = self.split_heads::<1>(input.view(), b, tq);
                let [k, v] = self.split_heads::<2>(kv.view(), b, tk);
                (q, k, v)
            }
        };
        let (ctx, _) = self.all_heads(q, k, v, mask, Pass::Infer);
        let y = product(ctx.view(), &packed.output, &self.p.b_o);
        (input, kv, ctx).give_back();
        y.into_shape_with_order((b, tq, d)).expect("standard layout")
    }

    /// `[B·T, N·d_model]` rows (N projections side by side) as N `[B, H, T, d_k]` per-head
    /// views, without copies.
    fn split_heads<'a, const N: usize>(
        &self,
        x: ArrayView2<'a, F>,
        b: usize,
        t: usize,
    ) -> [ArrayView4<'a, F>; N] {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        let x = x
            .into_shape_with_order((b, t, N, h, dk))
            .expect("standard layout");
        std::array::from_fn(|i| x.index_axis_move(Axis(2), i).permuted_axes([0, 2, 1, 3]))
    }

    /// [`MultiHead::infer_cached`] with the projections of [`MultiHead::pack`] (`None`: the
    /// weights as they are).
    pub(crate) fn infer_cached_packed(
        &self,
        x: ArrayView3<F>,
        cache: &mut KvRows<F>,
        packed: Option<&PackedMultiHead<F>>,
    ) -> Array3<F> {
        let Some(packed) = packed else {
            return self.infer_cached_rows(x, cache);
        };
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size() && packed.input.dim() == (d, 3 * d),
            "MultiHead::infer_cached: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        let x_rows = rows_in_place(x);
        // SAFETY: gemm_packed writes every element.
        let qkv = unsafe {
            filled((b * tq, 3 * d), |c| {
                gemm_packed(
                    x_rows.view(),
                    &packed.input,
                    packed.input_bias.as_ref().map(|b| b.view()),
                    false,
                    c,
                )
            })
        };
        // Q, K and V read where the product left them, side by side in each row: copied out
        // first, the three parts and the input rows had been a twentieth of the main
        // thread's time in a small greedy decode on two threads, while the other waited.
        let [_, k, v] = self.split_heads::<3>(qkv.view(), b, tq);
        cache.push(k, v);
        let y = self.attend_projected(
            qkv.slice(s![.., ..d]),
            tq,
            cache.view(),
            &Mask::causal(),
            &packed.output,
        );
        qkv.give_back();
        y
    }

    /// [`MultiHead::infer_with_cache`] with the projections of [`MultiHead::pack`].
    pub(crate) fn infer_with_cache_packed(
        &self,
        x: ArrayView3<F>,
        cache: KvView<F>,
        mask: &Mask,
        packed: Option<&PackedMultiHead<F>>,
    ) -> Array3<F> {
        let Some(packed) = packed else {
            return self.infer_with_view(x, cache, mask);
        };
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size() && packed.input.dim() == (d, d),
            "MultiHead::infer_with_cache: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        let x_rows = rows_in_place(x);
        // SAFETY: gemm_packed writes every element.
        let q = unsafe {
            filled((b * tq, d), |c| {
                gemm_packed(
                    x_rows.view(),
                    &packed.input,
                    packed.input_bias.as_ref().map(|b| b.view()),
                    false,
                    c,
                )
            })
        };
        let y = self.attend_projected(q.view(), tq, cache, mask, &packed.output);
        q.give_back();
        y
    }

    /// Attention of projected queries `[B·Tq, d_model]` over the cache, then W_O packed.
    fn attend_projected(
        &self,
        q: ArrayView2<F>,
        tq: usize,
        cache: KvView<F>,
        mask: &Mask,
        w_o: &PackedB,
    ) -> Array3<F> {
        let b = cache.batch_size();
        let d = self.cfg.d_model;
        let ctx = self.context(q, tq, cache, mask, tq == 1);
        // SAFETY: gemm_packed writes every element.
        let y = unsafe {
            filled((b * tq, d), |c| {
                gemm_packed(ctx.view(), w_o, self.p.b_o.as_ref().map(|b| b.view()), false, c)
            })
        };
        ctx.give_back();
        y.into_shape_with_order((b, tq, d)).expect("standard layout")
    }

    /// `[B·T, d_model]` rows as `[B, H, T, d_k]` per-head views (no copy).
    fn heads<'a>(&self, x: ArrayView2<'a, F>, b: usize, t: usize) -> ArrayView4<'a, F> {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        x.into_shape_with_order((b, t, h, dk))
            .expect("standard layout")
            .permuted_axes([0, 2, 1, 3])
    }

    /// The attention core over every head (`q` `[B, H, Tq, d_k]`, `k` and `v` `[B, H, Tk,
    /// d_k]`) for `pass`: the context `[B·Tq, d]`, its heads concatenated, and the core's
    /// cache unless `pass` is [`Pass::Infer`]. The context is not zeroed first: the core writes
    /// every element of it.
    fn all_heads(
        &self,
        q: ArrayView4<'_, F>,
        k: ArrayView4<'_, F>,
        v: ArrayView4<'_, F>,
        mask: ResolvedMask,
        pass: Pass<'_>,
    ) -> (Array2<F>, Option<AttentionCoreCache<F>>) {
        let (b, tq) = (q.dim().0, q.dim().2);
        let mut core = None;
        // SAFETY: `attention_forward` and `attention_infer` write every element of their output.
        let ctx = unsafe {
            crate::kernels::workspace::filled((b * tq, self.cfg.d_model), |ctx| {
                core = pass.attend(q, k, v, mask, self.cfg.p_drop, self.heads_mut(ctx, b, tq));
            })
        };
        (ctx, core)
    }

    fn heads_mut<'a>(&self, x: ArrayViewMut2<'a, F>, b: usize, t: usize) -> ArrayViewMut4<'a, F> {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        x.into_shape_with_order((b, t, h, dk))
            .expect("standard layout")
            .permuted_axes([0, 2, 1, 3])
    }
}

impl<F: Float> MultiHeadCache<F> {
    /// Every head's attention weights of the forward pass, `[B, H, Tq, Tk]`, before dropout.
    pub fn weights(&self) -> ArrayView4<'_, F> {
        self.core.weights()
    }
}

/// `[B, T, d]` as `[B·T, d]` rows: a view where `x` is in standard layout, else a copy.
fn rows_in_place<F: Float>(x: ArrayView3<'_, F>) -> CowArray<'_, F, Ix2> {
    let (b, t, d) = x.dim();
    if x.is_standard_layout() {
        x.into_shape_with_order((b * t, d))
            .expect("standard layout")
            .into()
    } else {
        rows(x).into()
    }
}

/// `[B, T, d]` as owned standard-layout rows `[B·T, d]`.
fn rows<F: Float>(x: ArrayView3<F>) -> Array2<F> {
    let (b, t, d) = x.dim();
    crate::kernels::workspace::owned(x)
        .into_shape_with_order((b * t, d))
        .expect("standard layout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::bf16::round_bf16;
    use crate::kernels::precision::with_precision;
    use rand::{SeedableRng, rngs::StdRng};

    /// A cache's buffers start on a cache line, and so does each row of its transposed keys
    /// (the capacity rounded up to whole lines, by no more than a line), in `f32`, `f64` and
    /// bf16; a cache given back to a workspace lends its buffers to the next of its size,
    /// zeroed (the workspace hands them out full of NaN in the crate's tests).
    #[test]
    fn cache_buffers_start_on_lines_and_come_back_from_a_workspace_zeroed() {
        fn check<T>(kt: &Array4<T>, v: &Array4<T>, cap: usize) {
            let line = 64 / std::mem::size_of::<T>();
            // (An empty buffer has nothing to align.)
            assert!(
                kt.is_empty()
                    || (kt.as_ptr() as usize).is_multiple_of(64) && (v.as_ptr() as usize).is_multiple_of(64)
            );
            let have = kt.dim().3;
            assert!(
                have >= cap && have.is_multiple_of(line) && have < cap + line,
                "{have} for {cap}"
            );
            assert_eq!(v.dim().2, have);
        }
        for cap in [0, 1, 5, 16, 33] {
            for bf16 in [false, true] {
                match Store::<f32>::zeros(bf16, 3, 2, 8, cap) {
                    Store::Full { kt, v } => check(&kt, &v, cap),
                    Store::Bf16 { kt, v } => check(&kt, &v, cap),
                }
            }
            match Store::<f64>::zeros(false, 3, 2, 8, cap) {
                Store::Full { kt, v } => check(&kt, &v, cap),
                Store::Bf16 { .. } => unreachable!("an f64 store"),
            }
        }
        let mut rng = StdRng::seed_from_u64(5);
        let layer: MultiHead = MultiHeadConfig::new(48, 3).init(&mut rng).unwrap();
        let mut ws = workspace::Workspace::new();
        workspace::with_workspace(&mut ws, || {
            let mut cache = layer.empty_cache(4, 32);
            let k = Array4::from_shape_fn((4, 3, 32, 16), |_| rng.random_range(-2.0f32..2.0));
            cache.push(k.view(), k.view());
            let ptrs = |c: &KvCache| match &c.store {
                Store::Full { kt, v } => [kt.as_ptr() as usize, v.as_ptr() as usize],
                Store::Bf16 { .. } => unreachable!("an f32 cache"),
            };
            let mut before = ptrs(&cache);
            cache.give_back();
            let again = layer.empty_cache(4, 32);
            let mut after = ptrs(&again);
            // (Two buffers of one size: either may serve either.)
            before.sort_unstable();
            after.sort_unstable();
            assert_eq!(after, before, "the buffers come back");
            match &again.store {
                Store::Full { kt, v } => {
                    check(kt, v, 32);
                    assert!(kt.iter().chain(v.iter()).all(|&x| x.to_bits() == 0));
                }
                Store::Bf16 { .. } => unreachable!("an f32 cache"),
            }
        });
    }

    /// Keys and values appended from arrays whose features are strided (gathered) fill a
    /// cache as the same values in standard layout do, over a push of several positions, one
    /// past the capacity and one of none (into a cache with room for none).
    #[test]
    fn strided_and_contiguous_pushes_fill_the_same_cache() {
        let mut rng = StdRng::seed_from_u64(4);
        let layer: MultiHead = MultiHeadConfig::new(48, 3).init(&mut rng).unwrap();
        let (b, h, dk) = (5, 3, 16);
        for bf16 in [false, true] {
            let precision = if bf16 { Precision::Bf16 } else { Precision::F32 };
            let (mut plain, mut strided) =
                with_precision(precision, || (layer.empty_cache(b, 0), layer.empty_cache(b, 0)));
            for t in [0, 3, 1, 0, 4] {
                // [B, H, d_k, T] permuted to [B, H, T, d_k]: features T apart.
                let k = Array4::from_shape_fn((b, h, dk, t), |_| rng.random_range(-2.0f32..2.0));
                let v = Array4::from_shape_fn((b, h, dk, t), |_| rng.random_range(-2.0f32..2.0));
                let (k, v) = (k.permuted_axes([0, 1, 3, 2]), v.permuted_axes([0, 1, 3, 2]));
                assert!(t < 2 || k.strides()[3] != 1);
                strided.push(k.view(), v.view());
                plain.push(k.as_standard_layout().view(), v.as_standard_layout().view());
            }
            assert_eq!(plain.len(), 8);
            assert_eq!(plain, strided, "bf16 {bf16}");
            let q = Array2::from_shape_fn((b, h * dk), |_| rng.random_range(-2.0f32..2.0));
            let mask = Mask::none().resolve(b, 1, plain.len()).unwrap();
            let (mut a, mut c) = (Array2::zeros((b, h * dk)), Array2::zeros((b, h * dk)));
            plain.view().attend_step(q.view(), &mask, a.view_mut());
            strided.view().attend_step(q.view(), &mask, c.view_mut());
            assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(a.iter().any(|&x| x != 0.0));
        }
    }

    /// Selecting rows (kept, swapped, repeated, dropped, more rows than the batch) leaves
    /// each kept row with its source's positions, as copying every row does, whether the rows
    /// move in place or through the spare buffers; the cache then takes further positions
    /// and selections. On one thread and on two (the copies cut into runs).
    #[test]
    fn selecting_rows_gives_each_row_its_sources_positions() {
        let mut rng = StdRng::seed_from_u64(11);
        let layer: MultiHead = MultiHeadConfig::new(64, 4).init(&mut rng).unwrap();
        let (h, dk) = (4, 16);
        let fixed: Vec<Vec<usize>> = vec![
            vec![1, 0, 2, 3, 4, 5],
            vec![1, 2, 0, 3, 4, 5],
            vec![0, 0, 0, 3, 3, 3],
            vec![5, 4, 3, 2, 1, 0],
            vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5],
            vec![11, 9, 7, 5, 3],
            vec![4, 4, 0, 1],
            vec![3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3],
        ];
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for bf16 in [false, true] {
                let round = |x: f32| if bf16 { round_bf16(x) } else { x };
                let mut b = 6;
                let precision = if bf16 { Precision::Bf16 } else { Precision::F32 };
                let mut cache = with_precision(precision, || layer.empty_cache(b, 2));
                assert_eq!(cache.is_bf16(), bf16);
                // Naively: each sequence's keys and values `[H, len, d_k]`, copied whole.
                let mut held: Vec<(Array3<f32>, Array3<f32>)> =
                    vec![(Array3::zeros((h, 0, dk)), Array3::zeros((h, 0, dk))); b];
                let mut selections = fixed.clone();
                for _ in 0..12 {
                    let n = rng.random_range(1..=24);
                    selections.push((0..n).map(|i| if rng.random_bool(0.7) { i } else { n }).collect());
                }
                for rows in selections {
                    // A random row where the list asks for one, or past the batch.
                    let rows: Vec<usize> = rows
                        .iter()
                        .map(|&r| if r < b { r } else { rng.random_range(0..b) })
                        .collect();
                    let t = rng.random_range(1..=4);
                    let random = |rng: &mut StdRng| {
                        Array4::from_shape_fn((b, h, t, dk), |_| rng.random_range(-2.0f32..2.0))
                    };
                    let (k, v) = (random(&mut rng), random(&mut rng));
                    cache.push(k.view(), v.view());
                    for (i, (hk, hv)) in held.iter_mut().enumerate() {
                        *hk = ndarray::concatenate(Axis(1), &[hk.view(), k.slice(s![i, .., .., ..])])
                            .unwrap()
                            .mapv(round);
                        *hv = ndarray::concatenate(Axis(1), &[hv.view(), v.slice(s![i, .., .., ..])])
                            .unwrap()
                            .mapv(round);
                    }
                    pool.install(|| cache.select(&rows));
                    held = rows.iter().map(|&r| held[r].clone()).collect();
                    b = rows.len();
                    assert_eq!(cache.batch_size(), b);
                    let (keys, values) = (cache.view().keys(), cache.values());
                    for (i, (hk, hv)) in held.iter().enumerate() {
                        let at = format!("row {i} after {rows:?} (bf16 {bf16}, {threads} threads)");
                        assert_eq!(keys.slice(s![i, .., .., ..]), hk.view(), "keys of {at}");
                        assert_eq!(values.slice(s![i, .., .., ..]), hv.view(), "values of {at}");
                    }
                }
            }
        }
    }

    /// A bf16 cache holds the pushed keys and values rounded to bf16 through growth and
    /// selection, and a decoding step over it gives the bits of a step over an `f32` cache of
    /// the rounded values.
    #[test]
    fn a_bf16_cache_holds_rounded_values_and_attends_as_f32_over_them() {
        let mut rng = StdRng::seed_from_u64(3);
        let layer: MultiHead = MultiHeadConfig::new(32, 4).init(&mut rng).unwrap();
        let (b, h, dk) = (3, 4, 8);
        let mut half = with_precision(Precision::Bf16, || layer.empty_cache(b, 2));
        let mut full = layer.empty_cache(b, 2);
        assert!(half.is_bf16() && !full.is_bf16());
        let random = |rng: &mut StdRng, t: usize| {
            Array4::from_shape_fn((b, h, t, dk), |_| rng.random_range(-2.0f32..2.0))
        };
        // Three pushes grow both past their capacity of 2.
        for t in [1, 2, 3] {
            let (k, v) = (random(&mut rng, t), random(&mut rng, t));
            half.push(k.view(), v.view());
            full.push(k.mapv(round_bf16).view(), v.mapv(round_bf16).view());
        }
        assert_eq!(half.len(), 6);
        assert_eq!(half, full, "the same values after growing");
        for rows in [vec![2, 0, 0], vec![1]] {
            half.select(&rows);
            full.select(&rows);
            assert_eq!(half, full, "the same values after selecting {rows:?}");
        }
        assert!(half.is_bf16());
        let q = Array2::from_shape_fn((1, h * dk), |_| rng.random_range(-2.0f32..2.0));
        let mask = Mask::none().resolve(1, 1, half.len()).unwrap();
        let (mut a, mut c) = (Array2::zeros((1, h * dk)), Array2::zeros((1, h * dk)));
        half.view().attend_step(q.view(), &mask, a.view_mut());
        full.view().attend_step(q.view(), &mask, c.view_mut());
        assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(a.iter().any(|&x| x != 0.0));
    }
}
