//! The attention weights of a whole model, layer by layer and head by head, for looking at.

use ndarray::{Array4, ArrayView2, s};

use crate::kernels::Float;

/// Every attention map of one pass without dropout: `softmax(QKᵀ/√d_k)` of each layer, each
/// head and each sequence of the batch, after masking and before dropout (what PyTorch's
/// `need_weights=True, average_attn_weights=False` returns). Each row sums to 1 over the keys
/// it may see, and is 0 where it may not (a row that may see no key is all 0).
///
/// From [`EncoderDecoder::attention`](crate::models::EncoderDecoder::attention),
/// [`EncoderOnly::attention`](crate::models::EncoderOnly::attention) and
/// [`DecoderOnly::attention`](crate::models::DecoderOnly::attention). The maps of a decode are
/// those of a pass over the source and `[BOS]` followed by the decoded tokens: a cached decode
/// computes exactly the rows of that pass, one at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionMaps<F: Float = f32> {
    /// Encoder self-attention of each layer, `[B, H, S, S]` (queries × keys); empty for a
    /// decoder-only model.
    pub encoder: Vec<Array4<F>>,
    /// Decoder self-attention of each layer, `[B, H, T, T]`, causal; for a decoder-only model
    /// its layers' attention; empty for an encoder-only model.
    pub decoder: Vec<Array4<F>>,
    /// Decoder cross-attention over the source of each layer, `[B, H, T, S]`; empty unless
    /// the model is an encoder-decoder.
    pub cross: Vec<Array4<F>>,
}

impl<F: Float> AttentionMaps<F> {
    /// One map, `[queries, keys]`: of `layer`'s `head` for sequence `b`, in `maps` (one of
    /// the three fields).
    ///
    /// # Panics
    /// If `layer`, `b` or `head` is out of range.
    pub fn map(maps: &[Array4<F>], layer: usize, b: usize, head: usize) -> ArrayView2<'_, F> {
        let m = &maps[layer];
        assert!(
            b < m.dim().0 && head < m.dim().1,
            "AttentionMaps::map: sequence {b}, head {head} of maps {:?}",
            m.shape()
        );
        m.slice(s![b, head, .., ..])
    }
}
