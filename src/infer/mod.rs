//! Decoding: one step interface that both token-predicting model families implement, and the
//! policies that drive it — greedy, sampling (temperature, top-k, top-p) and beam search
//! (§6.1) — for batches of sequences of different lengths.
//!
//! A model does not know how it is decoded. It hands out a state that holds its key/value
//! caches ([`EncoderDecoder::begin_decode`], [`DecoderOnly::begin_generate`]); the state is a
//! [`Step`]: it is fed tokens and answers the logits of the next position, and it can keep,
//! copy or drop sequences of its batch, which is all a beam needs. The policies here take any
//! [`Step`], so a user can drive their own loop the same way.
//!
//! Every sequence starts from a prefix: `[BOS]` for a translation, the prompt for a language
//! model. Prefixes may differ in length: the shortest common part is fed in one pass, and
//! longer prefixes are then fed token by token beside the sequences already generating.
//! Sequences that end (at `eos` or at their maximum length) are dropped from the batch, so
//! the others do not pay for them.
//!
//! # Example
//! ```
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::blocks::BlockConfig;
//! use vaswani::infer::{BeamSearch, Sampling, beam_search, generate};
//! use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, TokenBatch};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let model: EncoderDecoder = EncoderDecoderConfig::new(12, 12, BlockConfig::new(16, 2, 32), 1, 1)
//!     .init(&mut rng)?;
//! let src = TokenBatch::from_sequences(&[vec![3, 4, 5], vec![6, 7]], 0)?;
//! let (bos, eos) = (1, 2);
//!
//! // Greedy: the most likely token at every step, at most 10 tokens.
//! let state = model.begin_decode(&src, 10)?;
//! let greedy = generate(state, &[vec![bos], vec![bos]], Sampling::Greedy, Some(eos), 10, &mut rng)?;
//! assert_eq!(greedy, vaswani::infer::greedy(model.begin_decode(&src, 10)?, bos, Some(eos), 10)?);
//!
//! // Beam search as in the paper (§6.1): 4 beams, length penalty α = 0.6; the 2 best.
//! let beam = BeamSearch::paper().with_n_best(2);
//! let state = model.begin_decode(&src, 10)?;
//! let hypotheses = beam_search(state, &[vec![bos], vec![bos]], &beam, Some(eos), 10)?;
//! assert_eq!(hypotheses.len(), 2);
//! assert!(hypotheses[0][0].score >= hypotheses[0][1].score);
//! # Ok::<(), vaswani::Error>(())
//! ```
//!
//! [`EncoderDecoder::begin_decode`]: crate::models::EncoderDecoder::begin_decode
//! [`DecoderOnly::begin_generate`]: crate::models::DecoderOnly::begin_generate

mod beam;
mod sample;

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};
use crate::kernels::Float;
use crate::models::{DecodeState, GenerateState};

pub use beam::{BeamSearch, Hypothesis, beam_search};
pub use sample::{Sampling, continue_prompt, generate, greedy, greedy_uncached};

/// A decode in progress: a batch of sequences, each fed the same number of positions, with the
/// key/value caches of those positions.
pub trait Step<F: Float> {
    /// The number of sequences.
    fn batch_size(&self) -> usize;

    /// The number of positions fed so far (the same for every sequence).
    fn len(&self) -> usize;

    /// Whether no position has been fed yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of tokens the model predicts over.
    fn vocab(&self) -> usize;

    /// Feeds `tokens` `[B, T]`, the next `T ≥ 1` tokens of every sequence, and returns the
    /// logits `[B, V]` of the position after the last of them.
    ///
    /// # Errors
    /// For tokens that do not fit the batch or the vocabulary, or a sequence longer than the
    /// model allows.
    fn feed(&mut self, tokens: ArrayView2<usize>) -> Result<Array2<F>>;

    /// Keeps the sequences `rows`, in that order: a row may be repeated (beams copied) or left
    /// out (a sequence that ended).
    ///
    /// # Errors
    /// For a row that is not below the batch size.
    fn select(&mut self, rows: &[usize]) -> Result<()>;
}

impl<F: Float> Step<F> for DecodeState<'_, F> {
    fn batch_size(&self) -> usize {
        DecodeState::batch_size(self)
    }

    fn len(&self) -> usize {
        DecodeState::len(self)
    }

    fn vocab(&self) -> usize {
        self.model().cfg.tgt_vocab
    }

    fn feed(&mut self, tokens: ArrayView2<usize>) -> Result<Array2<F>> {
        let model = self.model();
        model.decode_steps(self, tokens)
    }

    fn select(&mut self, rows: &[usize]) -> Result<()> {
        DecodeState::select(self, rows)
    }
}

impl<F: Float> Step<F> for GenerateState<'_, F> {
    fn batch_size(&self) -> usize {
        GenerateState::batch_size(self)
    }

    fn len(&self) -> usize {
        GenerateState::len(self)
    }

    fn vocab(&self) -> usize {
        self.model().cfg.vocab
    }

    fn feed(&mut self, tokens: ArrayView2<usize>) -> Result<Array2<F>> {
        let model = self.model();
        model.generate_steps(self, tokens)
    }

    fn select(&mut self, rows: &[usize]) -> Result<()> {
        GenerateState::select(self, rows)
    }
}

/// The checks every policy makes before its first step: one non-empty prefix per sequence of
/// a fresh state, ids in the vocabulary, `eos` in the vocabulary, and a way to stop.
fn check_start<F: Float, S: Step<F>, P: AsRef<[usize]>>(
    state: &S,
    prefixes: &[P],
    eos: Option<usize>,
    max_new: usize,
) -> Result<()> {
    let b = state.batch_size();
    if prefixes.len() != b {
        return Err(Error::shape(
            "prefixes (one per sequence)",
            &[b],
            &[prefixes.len()],
        ));
    }
    if !state.is_empty() {
        return Err(Error::InvalidInput {
            why: format!(
                "decoding starts from a fresh state; this one has been fed {} positions",
                state.len()
            ),
        });
    }
    check_prefixes(state.vocab(), prefixes, eos, max_new)
}

/// The checks of [`check_start`] that need no state: non-empty prefixes of ids in the
/// vocabulary, `eos` in it, and a way to stop.
fn check_prefixes<P: AsRef<[usize]>>(
    vocab: usize,
    prefixes: &[P],
    eos: Option<usize>,
    max_new: usize,
) -> Result<()> {
    if let Some(i) = prefixes.iter().position(|p| p.as_ref().is_empty()) {
        return Err(Error::InvalidInput {
            why: format!(
                "prefix {i} is empty: every sequence starts from at least one token (BOS or a prompt)"
            ),
        });
    }
    for (i, p) in prefixes.iter().enumerate() {
        if let Some((t, &id)) = p.as_ref().iter().enumerate().find(|&(_, &id)| id >= vocab) {
            return Err(Error::TokenOutOfRange {
                id,
                position: (i, t),
                vocab,
            });
        }
    }
    if let Some(eos) = eos.filter(|&e| e >= vocab) {
        return Err(Error::InvalidInput {
            why: format!("eos = {eos} is outside the vocabulary of {vocab}"),
        });
    }
    if eos.is_none() && max_new == usize::MAX {
        return Err(Error::InvalidInput {
            why: "no eos and no maximum length: the decode would never stop".into(),
        });
    }
    Ok(())
}

/// Feeds the part every prefix has, `[B, min length]`, in one pass: the logits after it.
fn feed_common<F: Float, S: Step<F>, P: AsRef<[usize]>>(state: &mut S, prefixes: &[P]) -> Result<Array2<F>> {
    let common = prefixes.iter().map(|p| p.as_ref().len()).min().unwrap_or(0);
    let tokens = Array2::from_shape_fn((prefixes.len(), common), |(i, t)| prefixes[i].as_ref()[t]);
    if prefixes.is_empty() {
        return Ok(Array2::zeros((0, state.vocab())));
    }
    state.feed(tokens.view())
}
