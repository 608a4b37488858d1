//! The key/value cache of a decode: the keys and values of the positions already seen, per
//! head, which each new position's queries attend to.
//!
//! The paper trains on whole target sequences at once, the decoder's self-attention masked so
//! that no position sees those after it (§3.2.3). Generating, one position at a time, each
//! step would otherwise project every earlier position again; with the cache a step projects
//! only its new position's key and value, appends them to the cache and attends over all that
//! it holds ([`MultiHead::infer_cached`](crate::layers::MultiHead::infer_cached)): the same
//! attention as over the whole prefix. Cross-attention's keys and values,
//! the encoder output through `W_K` and `W_V`, do not change during a decode and are
//! projected once ([`MultiHead::project_kv`](crate::layers::MultiHead::project_kv)). Beam
//! search keeps, copies and drops sequences of the batch ([`KvCache::select`]).
//!
//! The layout serves a step's reads: the keys transposed, `[B, H, d_k, positions]`, so that a
//! step's scores are `d_k` sums over contiguous runs of positions, and the values `[B, H,
//! positions, d_k]`; each row starts on a cache line.

use ndarray::{Array1, Array4, ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis, CowArray, Ix4, s};

use crate::kernels::Float;
use crate::kernels::gemm::bf16::{to_bf16, to_bf16_slice};
use crate::kernels::parallel::{Disjoint, for_each_chunk_mut, for_each_index};
use crate::kernels::small_head::Cached;
use crate::kernels::workspace::{self, Recycle};
use crate::layers::attention::attention_step;
use crate::layers::mask::ResolvedMask;

/// The most positions a cache makes room for before the first step; it grows past them by
/// doubling.
const MAX_INITIAL_CAPACITY: usize = 1024;

/// The keys and values of positions already seen, per head, for decoding step by step: the
/// self-attention cache grows by the new positions at each step
/// ([`MultiHead::infer_cached`](crate::layers::MultiHead::infer_cached)), the cross-attention
/// cache is the encoder output projected once
/// ([`MultiHead::project_kv`](crate::layers::MultiHead::project_kv)).
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

    pub(super) fn is_bf16(&self) -> bool {
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
    pub(super) fn keys(self) -> CowArray<'a, F, Ix4> {
        let mut k = self.keys_t();
        k.swap_axes(2, 3);
        k
    }

    /// The keys transposed, `[B, H, d_k, len]`.
    fn keys_t(self) -> CowArray<'a, F, Ix4> {
        self.filled(true)
    }

    pub(super) fn values(self) -> CowArray<'a, F, Ix4> {
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
    pub(super) fn attend_step(self, q: ArrayView2<F>, mask: &ResolvedMask, out: ArrayViewMut2<F>) {
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
    pub(super) fn push(&mut self, k: ArrayView4<F>, v: ArrayView4<F>) {
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
    /// An empty cache for `b` sequences of `h` heads of `dk` features, with room for
    /// `capacity` positions (at most [`MAX_INITIAL_CAPACITY`]) before it grows; its keys and
    /// values as bf16 bits with `bf16` ([`crate::layers::MultiHead::empty_cache`] says when).
    pub(super) fn empty(bf16: bool, b: usize, h: usize, dk: usize, capacity: usize) -> Self {
        // A hint, not a promise: "until the end of the sequence" (`usize::MAX`) allocates no
        // more than a long sequence would, and the cache doubles past it as steps need.
        let capacity = capacity.min(MAX_INITIAL_CAPACITY);
        KvCache {
            store: Store::zeros(bf16, b, h, dk, capacity),
            len: 0,
            spare: None,
        }
    }

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
    pub(super) fn push(&mut self, k: ArrayView4<F>, v: ArrayView4<F>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::bf16::round_bf16;
    use crate::kernels::precision::{Precision, with_precision};
    use crate::layers::{Mask, MultiHead, MultiHeadConfig};
    use ndarray::{Array2, Array3};
    use rand::{Rng, SeedableRng, rngs::StdRng};

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
}
