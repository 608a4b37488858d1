//! Batches as models take them: padded token ids or feature vectors, each with the real
//! length of every sequence. Constructors check the layout, so a model never sees lengths
//! that disagree with the ids.

use ndarray::{Array2, Array3, ArrayD, ArrayView2, ArrayView3, Ix3};

use crate::error::{Error, Result};
use crate::kernels::Float;
use crate::layers::{Embedding, EmbeddingCache, Mask};

/// Token ids `[B, T]`, padded after each sequence's length. What sits in the padding is
/// never read: it may be any number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    ids: Array2<usize>,
    lengths: Vec<usize>,
}

impl TokenBatch {
    /// A batch from padded ids and the length of each row.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty batch (B = 0), [`Error::ShapeMismatch`] if there is
    /// not one length per row, [`Error::InvalidInput`] if a length exceeds T.
    pub fn new(ids: Array2<usize>, lengths: Vec<usize>) -> Result<Self> {
        let (b, t) = ids.dim();
        check_lengths(b, t, &lengths)?;
        Ok(TokenBatch { ids, lengths })
    }

    /// A batch without padding: every row is a whole sequence.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty batch.
    pub fn full(ids: Array2<usize>) -> Result<Self> {
        let lengths = vec![ids.ncols(); ids.nrows()];
        TokenBatch::new(ids, lengths)
    }

    /// A batch from sequences of different lengths, padded with `pad` to the longest.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty list.
    pub fn from_sequences<S: AsRef<[usize]>>(seqs: &[S], pad: usize) -> Result<Self> {
        let (ids, lengths) = pad_batch(seqs, pad)?;
        TokenBatch::new(ids, lengths)
    }

    /// The padded ids, `[B, T]`.
    pub fn ids(&self) -> ArrayView2<'_, usize> {
        self.ids.view()
    }

    /// The real length of each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// B.
    pub fn batch_size(&self) -> usize {
        self.ids.nrows()
    }

    /// T, the padded length.
    pub fn seq_len(&self) -> usize {
        self.ids.ncols()
    }

    /// The number of real tokens, Σ lengths.
    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Sequence b without its padding.
    pub fn sequence(&self, b: usize) -> Vec<usize> {
        self.ids.row(b).iter().take(self.lengths[b]).copied().collect()
    }

    /// Checks that every real id is below `vocab`.
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`] naming the first bad id, its (row, position) and `vocab`.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        for (b, (row, &len)) in self.ids.rows().into_iter().zip(&self.lengths).enumerate() {
            if let Some((t, &id)) = row.iter().take(len).enumerate().find(|&(_, &id)| id >= vocab) {
                return Err(Error::TokenOutOfRange {
                    id,
                    position: (b, t),
                    vocab,
                });
            }
        }
        Ok(())
    }

    /// The ids with the padding replaced by 0, safe to look up in any vocabulary.
    pub(crate) fn lookup_ids(&self) -> Array2<usize> {
        let mut ids = self.ids.clone();
        for (mut row, &len) in ids.rows_mut().into_iter().zip(&self.lengths) {
            row.iter_mut().skip(len).for_each(|id| *id = 0);
        }
        ids
    }

    /// The ids embedded by `e` (`[B·T, d]` rows), with the rows of padded positions zero: the
    /// padding is looked up as id 0 (any id would do) and what that row holds, NaN included,
    /// goes no further.
    pub(crate) fn embed<F: Float>(&self, e: &Embedding<F>) -> Result<Array2<F>> {
        Ok(self.zero_padding(e.infer(self.lookup_ids().view())?))
    }

    /// [`TokenBatch::embed`] in training, with the embedding's cache.
    pub(crate) fn embed_forward<F: Float>(&self, e: &Embedding<F>) -> Result<(Array2<F>, EmbeddingCache)> {
        let (x, cache) = e.forward(self.lookup_ids().view())?;
        Ok((self.zero_padding(x), cache))
    }

    /// `x` (`[B·T, d]` rows) with the rows of padded positions zeroed.
    fn zero_padding<F: Float>(&self, mut x: Array2<F>) -> Array2<F> {
        let t = self.seq_len();
        for (b, &len) in self.lengths.iter().enumerate() {
            x.slice_mut(ndarray::s![b * t + len..(b + 1) * t, ..])
                .fill(F::ZERO);
        }
        x
    }

    /// The targets for a loss: row-major ids with padded positions set to [`IGNORE`].
    pub(crate) fn loss_targets(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.ids.len());
        for (row, &len) in self.ids.rows().into_iter().zip(&self.lengths) {
            out.extend(
                row.iter()
                    .enumerate()
                    .map(|(t, &id)| if t < len { id } else { IGNORE }),
            );
        }
        out
    }

    /// The mask that blocks the padded keys.
    pub fn padding_mask(&self) -> Mask {
        Mask::key_lengths(&self.lengths)
    }
}

/// Pads `seqs` with `pad` to the longest: returns the `[B, T]` ids and each length.
///
/// # Errors
/// [`Error::InvalidInput`] for an empty batch.
pub fn pad_batch<S: AsRef<[usize]>>(seqs: &[S], pad: usize) -> Result<(Array2<usize>, Vec<usize>)> {
    if seqs.is_empty() {
        return Err(Error::InvalidInput {
            why: "an empty batch (no sequences)".into(),
        });
    }
    let lengths: Vec<usize> = seqs.iter().map(|s| s.as_ref().len()).collect();
    let t = lengths.iter().copied().max().unwrap_or(0);
    let mut ids = Array2::from_elem((seqs.len(), t), pad);
    for (mut row, s) in ids.rows_mut().into_iter().zip(seqs) {
        for (dst, &id) in row.iter_mut().zip(s.as_ref()) {
            *dst = id;
        }
    }
    Ok((ids, lengths))
}

/// Checks the tokens `[B, T]` fed by `what` to a decode of `b` sequences that has been fed
/// `pos` positions: one row per sequence, at least one token, every id below `vocab`
/// (reported at its position in the sequence).
pub(crate) fn check_step_tokens(
    tokens: ArrayView2<usize>,
    b: usize,
    pos: usize,
    vocab: usize,
    what: &str,
) -> Result<()> {
    let (rows, t) = tokens.dim();
    if rows != b {
        return Err(Error::shape(
            format!("{what} tokens [B, T] (one row per sequence)"),
            &[b, t],
            &[rows, t],
        ));
    }
    if t == 0 {
        return Err(Error::InvalidInput {
            why: format!("{what}: no token to feed (T = 0)"),
        });
    }
    crate::layers::embedding::check_ids(tokens, vocab, pos)
}

/// Checks the rows a `select` keeps of a batch of `b` sequences (`what`: "a decode").
pub(crate) fn check_rows(rows: &[usize], b: usize, what: &str) -> Result<()> {
    match rows.iter().find(|&&r| r >= b) {
        Some(&r) => Err(Error::InvalidInput {
            why: format!("select: row {r} of {what} of {b} sequences"),
        }),
        None => Ok(()),
    }
}

/// Checks B > 0, one length per row, and no length past T.
fn check_lengths(b: usize, t: usize, lengths: &[usize]) -> Result<()> {
    if b == 0 {
        return Err(Error::InvalidInput {
            why: "an empty batch (no sequences)".into(),
        });
    }
    if lengths.len() != b {
        return Err(Error::shape(
            "lengths (one per batch row)",
            &[b],
            &[lengths.len()],
        ));
    }
    if let Some((row, &len)) = lengths.iter().enumerate().find(|&(_, &l)| l > t) {
        return Err(Error::InvalidInput {
            why: format!("length {len} of batch row {row} exceeds the {t} positions of the batch"),
        });
    }
    Ok(())
}

/// The target id that the loss skips (padding).
pub(crate) const IGNORE: usize = usize::MAX;

/// Feature vectors `[B, T, d_in]` (sensor windows, time series), padded after each
/// sequence's length. Padded rows are never read: they may hold anything, NaN included.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureBatch<F: Float = f32> {
    x: Array3<F>,
    lengths: Vec<usize>,
}

impl<F: Float> FeatureBatch<F> {
    /// A batch from padded features and the length of each sequence.
    ///
    /// # Errors
    /// As [`TokenBatch::new`].
    pub fn new(x: Array3<F>, lengths: Vec<usize>) -> Result<Self> {
        let (b, t, _) = x.dim();
        check_lengths(b, t, &lengths)?;
        Ok(FeatureBatch { x, lengths })
    }

    /// A batch from sequences of different lengths, each `[len, d_in]` (one row per
    /// position), padded with zeros to the longest: the features' [`TokenBatch::from_sequences`].
    ///
    /// ```
    /// use vaswani::models::FeatureBatch;
    /// use vaswani::ndarray::Array2;
    ///
    /// // Two windows of 3 sensor channels, 5 and 2 readings long.
    /// let windows = vec![Array2::<f32>::ones((5, 3)), Array2::ones((2, 3))];
    /// let batch = FeatureBatch::from_sequences(&windows)?;
    /// assert_eq!(batch.x().dim(), (2, 5, 3));
    /// assert_eq!(batch.lengths(), &[5, 2]);
    /// # Ok::<(), vaswani::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty list, [`Error::ShapeMismatch`] naming the first
    /// sequence whose width is not the first sequence's.
    pub fn from_sequences<'a, S>(seqs: impl IntoIterator<Item = S>) -> Result<Self>
    where
        S: Into<ArrayView2<'a, F>>,
        F: 'a,
    {
        let seqs: Vec<ArrayView2<'a, F>> = seqs.into_iter().map(Into::into).collect();
        let Some(first) = seqs.first() else {
            return Err(Error::InvalidInput {
                why: "an empty batch (no sequences)".into(),
            });
        };
        let d_in = first.ncols();
        if let Some((i, s)) = seqs.iter().enumerate().find(|(_, s)| s.ncols() != d_in) {
            return Err(Error::shape(
                format!("features of sequence {i} (width of sequence 0)"),
                &[s.nrows(), d_in],
                &[s.nrows(), s.ncols()],
            ));
        }
        let lengths: Vec<usize> = seqs.iter().map(|s| s.nrows()).collect();
        let t = lengths.iter().copied().max().unwrap_or(0);
        let mut x = Array3::zeros((seqs.len(), t, d_in));
        for (mut row, s) in x.outer_iter_mut().zip(&seqs) {
            row.slice_mut(ndarray::s![..s.nrows(), ..]).assign(s);
        }
        FeatureBatch::new(x, lengths)
    }

    /// A batch from an array of any rank, which must be `[B, T, d_in]`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the expected layout for another rank, else as
    /// [`FeatureBatch::new`].
    pub fn from_dyn(x: ArrayD<F>, lengths: Vec<usize>) -> Result<Self> {
        let shape = x.shape().to_vec();
        let x = x.into_dimensionality::<Ix3>().map_err(|_| Error::InvalidInput {
            why: format!("features must be [batch, length, features], got an array of shape {shape:?}"),
        })?;
        FeatureBatch::new(x, lengths)
    }

    /// The features, `[B, T, d_in]`.
    pub fn x(&self) -> ArrayView3<'_, F> {
        self.x.view()
    }

    /// The real length of each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// B.
    pub fn batch_size(&self) -> usize {
        self.x.dim().0
    }

    /// An opt-in check that every real (unpadded) value is finite.
    ///
    /// # Errors
    /// [`Error::NonFinite`] naming the first (row, position) holding NaN or an infinity.
    pub fn check_finite(&self) -> Result<()> {
        for (b, &len) in self.lengths.iter().enumerate() {
            for t in 0..len {
                if self.x.slice(ndarray::s![b, t, ..]).iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!("features at batch row {b}, position {t}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The features with padded rows zeroed, so that nothing non-finite in the padding can
    /// reach a gradient through `0·NaN`.
    pub(crate) fn clean_features(&self) -> Array3<F> {
        let mut x = self.x.as_standard_layout().into_owned();
        for (b, &len) in self.lengths.iter().enumerate() {
            x.slice_mut(ndarray::s![b, len.., ..]).fill(F::ZERO);
        }
        x
    }

    /// The mask that blocks the padded positions.
    pub fn padding_mask(&self) -> Mask {
        Mask::key_lengths(&self.lengths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn layout_is_checked() {
        assert!(TokenBatch::new(Array2::zeros((0, 3)), vec![]).is_err());
        assert!(matches!(
            TokenBatch::new(Array2::zeros((2, 3)), vec![3]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(TokenBatch::new(Array2::zeros((2, 3)), vec![3, 4]).is_err());
        let b = TokenBatch::from_sequences(&[vec![4, 5, 6], vec![7]], 99).unwrap();
        assert_eq!(b.lengths(), &[3, 1]);
        assert_eq!(b.tokens(), 4);
        assert_eq!(b.sequence(1), vec![7]);
        // The pad id 99 is outside a vocabulary of 10 but is never read.
        assert!(b.check_vocab(10).is_ok());
        assert!(matches!(
            b.check_vocab(6),
            Err(Error::TokenOutOfRange {
                id: 6,
                position: (0, 2),
                vocab: 6
            })
        ));
        assert_eq!(b.lookup_ids(), array![[4, 5, 6], [7, 0, 0]]);
        assert_eq!(b.loss_targets(), vec![4, 5, 6, 7, IGNORE, IGNORE]);
    }

    #[test]
    fn features_rank_and_finiteness() {
        let err = FeatureBatch::<f32>::from_dyn(ArrayD::zeros(vec![4, 3]), vec![3; 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[batch, length, features]"), "{err}");
        let mut x = Array3::<f32>::zeros((2, 3, 2));
        x[[1, 2, 0]] = f32::NAN; // padding of row 1
        let f = FeatureBatch::new(x.clone(), vec![3, 2]).unwrap();
        assert!(f.check_finite().is_ok());
        assert!(f.clean_features().iter().all(|v| v.is_finite()));
        x[[0, 1, 1]] = f32::INFINITY;
        let f = FeatureBatch::new(x, vec![3, 2]).unwrap();
        assert!(matches!(f.check_finite(), Err(Error::NonFinite { .. })));
    }
}
