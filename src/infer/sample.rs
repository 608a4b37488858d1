//! One token at a time: greedy decoding and sampling.

use ndarray::Array2;
use rand::Rng;

use super::{Sampling, Step, check_start, feed_common};
use crate::error::{Error, Result};
use crate::kernels::Float;

/// Decodes every sequence of `state` from its prefix, picking each next token with
/// `sampling`, until it picks `eos` or has `max_new` new tokens. Returns each sequence's new
/// tokens (neither the prefix nor `eos`).
///
/// `state` must be fresh (nothing fed), with one prefix per sequence: `[BOS]` for a
/// translation, the prompt for a language model. A sequence that ends is dropped from the
/// batch. Draws come from `rng` in sequence order at every step (none for
/// [`Sampling::Greedy`]), in `f64` and in a fixed order: a seeded `rng` gives the same tokens
/// on every run and for any thread count.
///
/// # Errors
/// [`Error::InvalidInput`] for an empty prefix, a used state, `eos` outside the vocabulary,
/// or no way to stop (`eos` is `None` and `max_new` is `usize::MAX`);
/// [`Error::TokenOutOfRange`] for a prefix id outside it; [`Error::InvalidConfig`] for bad
/// sampling settings; [`Error::NonFinite`] for NaN or infinite logits during the decode; and
/// the model's errors (a sequence longer than a learned position table).
pub fn generate<F: Float, S: Step<F>, P: AsRef<[usize]>>(
    mut state: S,
    prefixes: &[P],
    sampling: Sampling,
    eos: Option<usize>,
    max_new: usize,
    rng: &mut impl Rng,
) -> Result<Vec<Vec<usize>>> {
    sampling.check()?;
    check_start(&state, prefixes, eos, max_new)?;
    let b = prefixes.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); b];
    if max_new == 0 || b == 0 {
        return Ok(out);
    }
    let mut logits = feed_common(&mut state, prefixes)?;
    // The sequence of each row of the state.
    let mut live: Vec<usize> = (0..b).collect();
    loop {
        let t = state.len();
        let mut next = Vec::with_capacity(live.len());
        let mut kept = Vec::with_capacity(live.len());
        for (row, &i) in live.iter().enumerate() {
            let prefix = prefixes[i].as_ref();
            let token = if t < prefix.len() {
                prefix[t]
            } else {
                let token = sampling.pick(logits.row(row), rng).map_err(|e| match e {
                    Error::NonFinite { .. } => Error::NonFinite {
                        what: format!("the logits of the next token of sequence {i}"),
                    },
                    e => e,
                })?;
                if Some(token) == eos {
                    continue;
                }
                out[i].push(token);
                if out[i].len() == max_new {
                    continue;
                }
                token
            };
            next.push(token);
            kept.push(row);
        }
        if kept.is_empty() {
            return Ok(out);
        }
        if kept.len() < live.len() {
            state.select(&kept)?;
            live = kept.iter().map(|&r| live[r]).collect();
        }
        logits = state.feed(
            Array2::from_shape_vec((next.len(), 1), next)
                .expect("one token per row")
                .view(),
        )?;
    }
}
