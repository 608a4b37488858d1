//! Attention masks whose meaning cannot be mistaken: every constructor says whether its
//! flags mark what is *kept* or what is *blocked*.
//!
//! The libraries this crate's users come from disagree on the polarity of a boolean mask:
//! in PyTorch's `nn.MultiheadAttention` `True` means "blocked", in its
//! `scaled_dot_product_attention` `True` means "attend", and Flax and burn pick their own. A
//! [`Mask`] is built only through named constructors ([`Mask::causal`],
//! [`Mask::key_lengths`], [`Mask::key_padding`], [`Mask::kept_pairs`],
//! [`Mask::blocked_pairs`]), and masks are combined with [`Mask::and`] ("attend only where
//! both allow"), never by adding `−∞`.
//!
//! A query whose every key is blocked gets an output of zeros and passes no gradient (see
//! [`crate::kernels::softmax_row`]).
//!
//! | PyTorch argument | here |
//! |---|---|
//! | `tgt_mask = generate_square_subsequent_mask(T)`, `is_causal=True` | [`Mask::causal`] |
//! | `src_key_padding_mask` / `tgt_key_padding_mask` (`True` = padding) | [`Mask::key_padding`] |
//! | `attn_mask` of bools (`True` = not allowed) | [`Mask::blocked_pairs`] |
//! | `F.scaled_dot_product_attention(attn_mask=…)` bools (`True` = attend) | [`Mask::kept_pairs`] |
//!
//! # Example
//! ```
//! use vaswani::ndarray::array;
//! use vaswani::layers::Mask;
//!
//! // Two sequences of 3 target tokens, the second padded after 2: causal and padded.
//! let mask = Mask::causal().and(Mask::key_lengths(&[3, 2]));
//! let r = mask.resolve(2, 3, 3)?;
//! assert!(r.allows(0, 2, 1));  // query 2 sees key 1
//! assert!(!r.allows(0, 1, 2)); // but query 1 does not see key 2 (the future)
//! assert!(!r.allows(1, 2, 2)); // and key 2 of sequence 1 is padding
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array2, Array3, ArrayView1, ArrayView2, ArrayView3, Axis};

use crate::error::{Error, Result};
use crate::kernels::RowMask;

/// Which keys each query may attend to, for a batch. See the [module docs](self).
///
/// The default mask keeps everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mask {
    causal: bool,
    key_lengths: Vec<Vec<usize>>,
    keys_kept: Vec<Array2<bool>>,
    pairs_kept: Vec<PairsKept>,
}

#[derive(Clone, Debug, PartialEq)]
enum PairsKept {
    /// `[Tq, Tk]`, the same for every sequence of the batch.
    Shared(Array2<bool>),
    /// `[B, Tq, Tk]`.
    PerBatch(Array3<bool>),
}

impl Mask {
    /// Keeps every (query, key) pair.
    pub fn none() -> Self {
        Mask::default()
    }

    /// Each query sees only keys at its own position or before (the decoder's self-attention,
    /// §3.2.3).
    ///
    /// With `Tq` queries and `Tk ≥ Tq` keys the queries are taken to be the *last* `Tq`
    /// positions (as in step-by-step decoding with a cache): query i sees keys
    /// `0 ..= i + Tk − Tq`. With `Tq = Tk` that is the lower triangle.
    pub fn causal() -> Self {
        Mask {
            causal: true,
            ..Mask::default()
        }
    }

    /// Sequence b has `lengths[b]` real keys, then padding: keys at or after `lengths[b]` are
    /// blocked. Padded keys never reach the output, even when they hold NaN.
    pub fn key_lengths(lengths: &[usize]) -> Self {
        Mask {
            key_lengths: vec![lengths.to_vec()],
            ..Mask::default()
        }
    }

    /// Blocks the keys flagged as padding: `is_padding[[b, j]] == true` means key j of sequence
    /// b is padding. This is the polarity of PyTorch's `key_padding_mask`.
    pub fn key_padding(is_padding: ArrayView2<bool>) -> Self {
        Mask {
            keys_kept: vec![is_padding.mapv(|pad| !pad)],
            ..Mask::default()
        }
    }

    /// Keeps exactly the (query, key) pairs flagged `true`: `[Tq, Tk]` for the whole batch,
    /// or `[B, Tq, Tk]` per sequence. This is the polarity of PyTorch's
    /// `scaled_dot_product_attention` boolean `attn_mask`.
    pub fn kept_pairs(kept: impl Into<PairFlags>) -> Self {
        Mask {
            pairs_kept: vec![kept.into().0],
            ..Mask::default()
        }
    }

    /// Blocks exactly the (query, key) pairs flagged `true`: `[Tq, Tk]` or `[B, Tq, Tk]`. This
    /// is the polarity of PyTorch's `nn.MultiheadAttention` / `nn.Transformer` boolean masks.
    pub fn blocked_pairs(blocked: impl Into<PairFlags>) -> Self {
        let pairs = match blocked.into().0 {
            PairsKept::Shared(a) => PairsKept::Shared(a.mapv(|b| !b)),
            PairsKept::PerBatch(a) => PairsKept::PerBatch(a.mapv(|b| !b)),
        };
        Mask {
            pairs_kept: vec![pairs],
            ..Mask::default()
        }
    }

    /// A pair is kept only if both masks keep it.
    pub fn and(mut self, other: Mask) -> Self {
        self.causal |= other.causal;
        self.key_lengths.extend(other.key_lengths);
        self.keys_kept.extend(other.keys_kept);
        self.pairs_kept.extend(other.pairs_kept);
        self
    }

    /// Whether the mask is causal.
    pub fn is_causal(&self) -> bool {
        self.causal
    }

    /// Whether the mask keeps every pair (no component at all).
    pub fn is_none(&self) -> bool {
        *self == Mask::default()
    }

    /// Whether key `j` of sequence `b` is padding for every query: at or past one of the
    /// sequence's key lengths, or flagged by key padding. Parts built for fewer sequences or
    /// keys say nothing about the rest (resolving the mask reports that mismatch).
    pub(crate) fn is_padding(&self, b: usize, j: usize) -> bool {
        self.key_lengths
            .iter()
            .any(|l| l.get(b).is_some_and(|&len| j >= len))
            || self
                .keys_kept
                .iter()
                .any(|k| k.get((b, j)).is_some_and(|&kept| !kept))
    }

    /// The mask of the sequences `seqs` of a batch of `b`: the parts built per sequence cut to
    /// those, the others (the causal flag, pairs shared by the batch) as they are.
    pub(crate) fn sequences(&self, b: usize, seqs: std::ops::Range<usize>) -> Mask {
        let cut = |l: &Vec<usize>| {
            if l.len() == b {
                l[seqs.clone()].to_vec()
            } else {
                l.clone()
            }
        };
        Mask {
            causal: self.causal,
            key_lengths: self.key_lengths.iter().map(cut).collect(),
            keys_kept: self
                .keys_kept
                .iter()
                .map(|k| {
                    if k.nrows() == b {
                        k.slice(ndarray::s![seqs.clone(), ..]).to_owned()
                    } else {
                        k.clone()
                    }
                })
                .collect(),
            pairs_kept: self
                .pairs_kept
                .iter()
                .map(|p| match p {
                    PairsKept::PerBatch(a) if a.dim().0 == b => {
                        PairsKept::PerBatch(a.slice(ndarray::s![seqs.clone(), .., ..]).to_owned())
                    }
                    p => p.clone(),
                })
                .collect(),
        }
    }

    /// Checks the mask against a batch of `b` sequences of `tq` queries and `tk` keys and
    /// combines its parts for fast lookup.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if a part was built for another batch size or length, and
    /// [`Error::InvalidInput`] if a key length exceeds `tk`.
    pub fn resolve(&self, b: usize, tq: usize, tk: usize) -> Result<ResolvedMask> {
        let mut limits: Option<Vec<usize>> = None;
        for lengths in &self.key_lengths {
            if lengths.len() != b {
                return Err(Error::shape(
                    "mask key lengths (one per sequence)",
                    &[b],
                    &[lengths.len()],
                ));
            }
            if let Some((i, &len)) = lengths.iter().enumerate().find(|&(_, &len)| len > tk) {
                return Err(Error::InvalidInput {
                    why: format!("mask: key length {len} of sequence {i} is longer than the {tk} keys"),
                });
            }
            limits = Some(match limits {
                None => lengths.clone(),
                Some(l) => l.iter().zip(lengths).map(|(a, b)| (*a).min(*b)).collect(),
            });
        }
        let mut keys: Option<Array2<bool>> = None;
        for kept in &self.keys_kept {
            if kept.dim() != (b, tk) {
                return Err(Error::shape("mask key padding [B, Tk]", &[b, tk], kept.shape()));
            }
            keys = Some(match keys {
                None => kept.clone(),
                Some(k) => ndarray::Zip::from(&k).and(kept).map_collect(|&a, &b| a && b),
            });
        }
        let mut pairs: Option<Array3<bool>> = None;
        for part in &self.pairs_kept {
            let full = match part {
                PairsKept::Shared(a) => {
                    if a.dim() != (tq, tk) {
                        return Err(Error::shape("mask pairs [Tq, Tk]", &[tq, tk], a.shape()));
                    }
                    a.view().insert_axis(Axis(0)).to_owned()
                }
                PairsKept::PerBatch(a) => {
                    if a.dim() != (b, tq, tk) {
                        return Err(Error::shape("mask pairs [B, Tq, Tk]", &[b, tq, tk], a.shape()));
                    }
                    a.clone()
                }
            };
            pairs = Some(match pairs {
                None => full,
                Some(p) if p.dim().0 == full.dim().0 => {
                    ndarray::Zip::from(&p).and(&full).map_collect(|&a, &b| a && b)
                }
                Some(p) => {
                    // One shared, one per batch: broadcast the shared one.
                    let (small, big) = if p.dim().0 == 1 { (p, full) } else { (full, p) };
                    let small = small
                        .broadcast(big.dim())
                        .expect("shared pairs broadcast over the batch");
                    ndarray::Zip::from(&big).and(&small).map_collect(|&a, &b| a && b)
                }
            });
        }
        Ok(ResolvedMask {
            b,
            tq,
            tk,
            causal: self.causal,
            limits,
            keys,
            pairs,
        })
    }
}

/// Boolean (query, key) flags for [`Mask::kept_pairs`] and [`Mask::blocked_pairs`]: built from
/// an `Array2<bool>` `[Tq, Tk]` or an `Array3<bool>` `[B, Tq, Tk]` (or their views).
#[derive(Clone, Debug, PartialEq)]
pub struct PairFlags(PairsKept);

impl From<Array2<bool>> for PairFlags {
    fn from(a: Array2<bool>) -> Self {
        PairFlags(PairsKept::Shared(a))
    }
}
impl From<ArrayView2<'_, bool>> for PairFlags {
    fn from(a: ArrayView2<'_, bool>) -> Self {
        PairFlags(PairsKept::Shared(a.to_owned()))
    }
}
impl From<Array3<bool>> for PairFlags {
    fn from(a: Array3<bool>) -> Self {
        PairFlags(PairsKept::PerBatch(a))
    }
}
impl From<ArrayView3<'_, bool>> for PairFlags {
    fn from(a: ArrayView3<'_, bool>) -> Self {
        PairFlags(PairsKept::PerBatch(a.to_owned()))
    }
}

/// A [`Mask`] checked against one batch shape, ready for lookup.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedMask {
    b: usize,
    tq: usize,
    tk: usize,
    causal: bool,
    /// Per sequence, the number of real keys.
    limits: Option<Vec<usize>>,
    /// `[B, Tk]`, true = kept.
    keys: Option<Array2<bool>>,
    /// `[B or 1, Tq, Tk]`, true = kept.
    pairs: Option<Array3<bool>>,
}

impl ResolvedMask {
    /// The batch size, query length and key length it was resolved for.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.b, self.tq, self.tk)
    }

    /// Whether later queries see more keys (a causal mask): attention then skips the
    /// blocked keys of each block of queries.
    pub(crate) fn is_causal(&self) -> bool {
        self.causal
    }

    /// Whether query `i` of sequence `b` may attend to key `j`.
    pub fn allows(&self, b: usize, i: usize, j: usize) -> bool {
        self.row(b, i).allows(j)
    }

    /// The keys that query `i` of sequence `b` may attend to.
    pub fn row(&self, b: usize, i: usize) -> RowMask<'_> {
        RowMask {
            limit: self.limit(b, i),
            keys: self.keys.as_ref().map(|k| slice(k.row(b))),
            pairs: self.pairs.as_ref().map(|p| {
                let pb = if p.dim().0 == 1 { 0 } else { b };
                slice(p.index_axis(Axis(0), pb).index_axis_move(Axis(0), i))
            }),
        }
    }

    /// Keys at or after this index are blocked for query `i` of sequence `b` (padding by
    /// length, causal): the limit of [`ResolvedMask::row`].
    pub(crate) fn limit(&self, b: usize, i: usize) -> usize {
        let limit = self.key_limit(b);
        if self.causal {
            limit.min((i + 1 + self.tk).saturating_sub(self.tq))
        } else {
            limit
        }
    }

    /// The first query of sequence `b` whose [`ResolvedMask::limit`] passes key `j` (the
    /// limits never fall from one query to the next), or the query length if none does.
    pub(crate) fn first_query(&self, b: usize, j: usize) -> usize {
        if j >= self.key_limit(b) {
            self.tq
        } else if self.causal {
            // Query i sees key j when i + 1 + Tk − Tq > j.
            (j + self.tq).saturating_sub(self.tk).min(self.tq)
        } else {
            0
        }
    }

    /// Keys at or after this index are blocked for every query of sequence `b` (padding by
    /// length): attention never reads them.
    pub fn key_limit(&self, b: usize) -> usize {
        self.limits.as_ref().map_or(self.tk, |l| l[b])
    }

    /// Per key of sequence `b`, whether some flag blocks it for every query (padding by flags),
    /// or `None` when no such flags were given.
    pub fn keys_kept(&self, b: usize) -> Option<&[bool]> {
        self.keys.as_ref().map(|k| slice(k.row(b)))
    }

    /// The (sequence, query) pairs whose every key is blocked: their attention output is
    /// zero. Useful to find padding or masking mistakes.
    pub fn fully_blocked_rows(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for b in 0..self.b {
            for i in 0..self.tq {
                let row = self.row(b, i);
                if !(0..self.tk).any(|j| row.allows(j)) {
                    out.push((b, i));
                }
            }
        }
        out
    }
}

fn slice<'a>(row: ArrayView1<'a, bool>) -> &'a [bool] {
    row.to_slice().expect("mask rows are contiguous")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// `first_query` (a closed form) is the first query whose limit passes the key, found by
    /// search: causal or not, with padding, and with more or fewer keys than queries.
    #[test]
    fn first_query_is_the_first_whose_limit_passes_the_key() {
        for (tq, tk) in [(5, 5), (3, 8), (8, 3), (1, 4)] {
            for mask in [
                Mask::causal(),
                Mask::none(),
                Mask::causal().and(Mask::key_lengths(&[tk, tk / 2])),
            ] {
                let r = mask.resolve(2, tq, tk).unwrap();
                for b in 0..2 {
                    for j in 0..tk {
                        let want = (0..tq).find(|&i| r.limit(b, i) > j).unwrap_or(tq);
                        assert_eq!(
                            r.first_query(b, j),
                            want,
                            "{mask:?}, {tq} × {tk}, sequence {b}, key {j}"
                        );
                        let monotone = (1..tq).all(|i| r.limit(b, i) >= r.limit(b, i - 1));
                        assert!(monotone);
                    }
                }
            }
        }
    }

    #[test]
    fn causal_is_lower_triangle_and_offsets_for_fewer_queries() {
        let r = Mask::causal().resolve(1, 3, 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                assert_eq!(r.allows(0, i, j), j <= i);
            }
        }
        // One query (the newest position) against 5 cached keys sees all 5.
        let r = Mask::causal().resolve(1, 1, 5).unwrap();
        assert!((0..5).all(|j| r.allows(0, 0, j)));
    }

    #[test]
    fn polarity_is_explicit() {
        let flags = array![[true, false], [false, true]];
        let kept = Mask::kept_pairs(flags.clone()).resolve(1, 2, 2).unwrap();
        let blocked = Mask::blocked_pairs(flags).resolve(1, 2, 2).unwrap();
        assert!(kept.allows(0, 0, 0) && !kept.allows(0, 0, 1));
        assert!(!blocked.allows(0, 0, 0) && blocked.allows(0, 0, 1));
        let pad = Mask::key_padding(array![[false, true]].view())
            .resolve(1, 2, 2)
            .unwrap();
        assert!(pad.allows(0, 1, 0) && !pad.allows(0, 0, 1));
    }

    #[test]
    fn and_combines_every_part() {
        let per_batch = Array3::from_shape_fn((2, 3, 3), |(b, i, j)| !(b == 1 && i == 2 && j == 0));
        let m = Mask::causal()
            .and(Mask::key_lengths(&[3, 2]))
            .and(Mask::key_lengths(&[2, 3]))
            .and(Mask::key_padding(
                array![[false, false, false], [false, true, false]].view(),
            ))
            .and(Mask::kept_pairs(per_batch))
            .and(Mask::blocked_pairs(array![
                [false, false, false],
                [false, false, false],
                [false, false, true]
            ]));
        let r = m.resolve(2, 3, 3).unwrap();
        let allowed = |b| {
            (0..3)
                .map(|i| (0..3).filter(|&j| r.allows(b, i, j)).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(allowed(0), vec![vec![0], vec![0, 1], vec![0, 1]]);
        assert_eq!(allowed(1), vec![vec![0], vec![0], vec![]]);
        assert_eq!(r.fully_blocked_rows(), vec![(1, 2)]);
    }

    #[test]
    fn wrong_shapes_are_errors() {
        assert!(matches!(
            Mask::key_lengths(&[1, 2]).resolve(3, 2, 2),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            Mask::key_lengths(&[3]).resolve(1, 2, 2),
            Err(Error::InvalidInput { .. })
        ));
        assert!(
            Mask::key_padding(Array2::from_elem((1, 4), false).view())
                .resolve(1, 2, 3)
                .is_err()
        );
        assert!(
            Mask::kept_pairs(Array2::from_elem((2, 2), true))
                .resolve(1, 2, 3)
                .is_err()
        );
        assert!(
            Mask::kept_pairs(Array3::from_elem((2, 2, 3), true))
                .resolve(1, 2, 3)
                .is_err()
        );
        assert!(Mask::none().resolve(5, 7, 9).is_ok());
    }
}
