//! One token at a time: greedy decoding and sampling, for a batch of any [`Step`], and the
//! two model-level shortcuts: greedy translation without a cache (the reference the cached
//! decode is tested against) and continuing one prompt of a language model.

use ndarray::{Array2, ArrayView1, Axis};
use rand::{Rng, SeedableRng};

use super::{Step, check_prefixes, check_start, feed_common};
use crate::error::{Error, Result, check};
use crate::kernels::{Float, argmax, check_finite, decide};
use crate::models::encoder_decoder::check_sources;
use crate::models::{DecoderOnly, EncoderDecoder, TokenBatch};

/// How [`generate`] and [`continue_prompt`] pick each next token from its logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id on ties). Draws nothing from the RNG.
    Greedy,
    /// A draw from `softmax(logits / t)`: t < 1 sharpens, t > 1 flattens. t must be finite
    /// and positive.
    Temperature(f64),
    /// A draw from `softmax(logits / temperature)` restricted to the `k` highest logits (ties
    /// broken by the lower id); `k ≥ V` keeps every token.
    TopK {
        /// How many tokens stay candidates (at least 1).
        k: usize,
        /// The temperature, finite and positive.
        temperature: f64,
    },
    /// Nucleus sampling: a draw from `softmax(logits / temperature)` restricted to the
    /// fewest most likely tokens whose probabilities sum to at least `p` (the most likely
    /// token always stays; ties broken by the lower id).
    TopP {
        /// The probability mass kept, in (0, 1].
        p: f64,
        /// The temperature, finite and positive.
        temperature: f64,
    },
}

impl Sampling {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a temperature that is not finite and positive (field
    /// `temperature`), `k = 0` (field `top_k`) or `p` outside (0, 1] (field `top_p`).
    pub fn check(&self) -> Result<()> {
        let temperature = match *self {
            Sampling::Greedy => return Ok(()),
            Sampling::Temperature(t) => t,
            Sampling::TopK { k, temperature } => {
                check::positive("top_k", k)?;
                temperature
            }
            Sampling::TopP { p, temperature } => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(Error::config("top_p", format!("must be in (0, 1], got {p}")));
                }
                temperature
            }
        };
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::config(
                "temperature",
                format!("must be finite and positive, got {temperature}"),
            ));
        }
        Ok(())
    }

    /// Picks a token id from one row of logits `[V]`, drawing at most one uniform number from
    /// `rng`. The arithmetic is in `f64`, sequential and in a fixed order, so a seeded `rng`
    /// gives the same choice on every run and for any thread count.
    ///
    /// # Errors
    /// As [`Sampling::check`]; [`Error::NonFinite`] if a logit is NaN or infinite, and
    /// [`Error::InvalidInput`] for an empty row.
    pub fn pick<F: Float>(&self, logits: ArrayView1<F>, rng: &mut impl Rng) -> Result<usize> {
        self.check()?;
        if logits.is_empty() {
            return Err(Error::InvalidInput {
                why: "no logits to pick a token from (V = 0)".into(),
            });
        }
        check_finite(logits, || "the logits of the next token".into())?;
        let (k, temperature, top_p) = match *self {
            Sampling::Greedy => return Ok(argmax(logits)),
            Sampling::Temperature(t) => (logits.len(), t, 1.0),
            Sampling::TopK { k, temperature } => (k.min(logits.len()), temperature, 1.0),
            Sampling::TopP { p, temperature } => (logits.len(), temperature, p),
        };
        // Candidates by decreasing logit, ties by increasing id: a fixed order.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].to_f64().total_cmp(&logits[a].to_f64()).then(a.cmp(&b)));
        order.truncate(k);
        let max = logits[order[0]].to_f64();
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&j| ((logits[j].to_f64() - max) / temperature).exp())
            .collect();
        if top_p < 1.0 {
            // The shortest head of the order whose share of the mass reaches p.
            let total: f64 = weights.iter().sum();
            let mut mass = 0.0;
            let keep = (weights.iter())
                .position(|&w| {
                    mass += w;
                    mass >= top_p * total
                })
                .map_or(weights.len(), |i| i + 1);
            order.truncate(keep);
            weights.truncate(keep);
        }
        let k = order.len();
        let total: f64 = weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        for (&j, &w) in order.iter().zip(&weights) {
            if u < w {
                return Ok(j);
            }
            u -= w;
        }
        // Rounding left u just past the last weight.
        Ok(order[k - 1])
    }
}

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

/// Greedy decoding from `bos`: the most likely token at every step, until `eos` (with `None`,
/// only the length stops) or `max_len` new tokens; each sequence's new tokens, without `eos`.
/// [`generate`] with [`Sampling::Greedy`] from one `[bos]` per sequence.
///
/// ```
/// # use vaswani::rand::{SeedableRng, rngs::StdRng};
/// # use vaswani::blocks::BlockConfig;
/// # use vaswani::models::{EncoderDecoderConfig, TokenBatch};
/// use vaswani::infer::greedy;
/// # let model = EncoderDecoderConfig::new(9, 9, BlockConfig::new(8, 2, 16), 1, 1).init(&mut StdRng::seed_from_u64(0))?;
/// let src = TokenBatch::from_sequences(&[vec![3, 4, 5]], 0)?;
/// let out = greedy(model.begin_decode(&src, 10)?, 1, Some(2), 10)?;
/// assert!(out[0].len() <= 10);
/// # Ok::<(), vaswani::Error>(())
/// ```
///
/// # Errors
/// As [`generate`].
pub fn greedy<F: Float, S: Step<F>>(
    state: S,
    bos: usize,
    eos: Option<usize>,
    max_len: usize,
) -> Result<Vec<Vec<usize>>> {
    let prefixes = vec![[bos]; state.batch_size()];
    // Greedy draws nothing from the generator.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0);
    generate(state, &prefixes, Sampling::Greedy, eos, max_len, &mut rng)
}

/// Greedy decoding without a cache, re-running the decoder over the whole prefix at every
/// step as PyTorch's `nn.Transformer` must: the reference [`greedy`] is tested against, and
/// the slow baseline it is measured against.
///
/// # Errors
/// As [`greedy`], and as [`EncoderDecoder::begin_decode`] for the source.
pub fn greedy_uncached<F: Float>(
    model: &EncoderDecoder<F>,
    src: &TokenBatch,
    bos: usize,
    eos: Option<usize>,
    max_len: usize,
) -> Result<Vec<Vec<usize>>> {
    check_sources(src)?;
    check_prefixes(model.cfg.tgt_vocab, &vec![[bos]; src.batch_size()], eos, max_len)?;
    let memory = model.encode(src)?;
    let b = src.batch_size();
    let mut prefix = vec![vec![bos]; b];
    let mut done = vec![false; b];
    let mut out = vec![Vec::new(); b];
    for step in 0..max_len {
        let tgt = TokenBatch::full(Array2::from_shape_fn((b, step + 1), |(i, t)| prefix[i][t]))?;
        let logits = model.decode(&memory, src, &tgt)?;
        let v = logits.ncols();
        let last = logits
            .into_shape_with_order((b, step + 1, v))
            .expect("standard layout");
        for (i, row) in last.index_axis(Axis(1), step).rows().into_iter().enumerate() {
            let token = decide(row, || format!("the logits of the next token of sequence {i}"))?;
            if !done[i] {
                if Some(token) == eos {
                    done[i] = true;
                } else {
                    out[i].push(token);
                }
            }
            prefix[i].push(token);
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(out)
}

/// Continues one `prompt` of a language model by `n` tokens picked with `sampling`; returns
/// the `n` new tokens.
///
/// With a key/value cache: the prompt is run once, then each step costs one position's
/// work. When prompt and output would not fit a learned position table, the context is
/// cropped to its last `max_len` tokens instead, which moves every position, so each step
/// then re-runs the whole window.
///
/// # Errors
/// [`Error::InvalidInput`] for an empty prompt, [`Error::TokenOutOfRange`] for a prompt id
/// ≥ V (at its position `(0, t)` in the prompt, also where the context is cropped), and as
/// [`Sampling::pick`] (bad settings, non-finite logits).
pub fn continue_prompt<F: Float>(
    model: &DecoderOnly<F>,
    prompt: &[usize],
    n: usize,
    sampling: Sampling,
    rng: &mut impl Rng,
) -> Result<Vec<usize>> {
    sampling.check()?;
    if prompt.is_empty() {
        return Err(Error::InvalidInput {
            why: "an empty prompt: generation needs at least one token to start from".into(),
        });
    }
    // The whole prompt, at its own positions, even where only its end is run.
    let row = |ids: &[usize]| {
        TokenBatch::full(Array2::from_shape_vec((1, ids.len()), ids.to_vec()).expect("one row"))
    };
    row(prompt)?.check_vocab(model.cfg.vocab)?;
    let max = model.input.max_len();
    if max.is_none_or(|max| prompt.len() + n <= max) {
        let state = model.begin_generate(1, prompt.len() + n);
        return Ok(generate(state, &[prompt], sampling, None, n, rng)?.remove(0));
    }
    // Past a learned table: the context slides, positions shift, and the whole window is run
    // again at each step.
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let start = max.map_or(0, |max| seq.len().saturating_sub(max));
        let logits = model.infer(&row(&seq[start..])?)?;
        seq.push(sampling.pick(logits.row(logits.nrows() - 1), rng)?);
    }
    Ok(seq.split_off(prompt.len()))
}
