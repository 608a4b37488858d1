//! Beam search (§6.1): "we used beam search with a beam size of 4 and length penalty
//! α = 0.6", the length penalty of Wu et al. (2016), GNMT:
//! `score(Y) = log P(Y) / lp(Y)`, `lp(Y) = ((5 + |Y|) / 6)^α`.
//!
//! At each step every live beam of a sequence is extended by every token. Of the `k` best
//! extensions (by `log P`), those that end in EOS become finished hypotheses and the others
//! stay live; the extensions ranked `k + 1` to `2·k` that do not end in EOS fill the places of
//! those that ended, so that `k` beams stay live (fairseq's rule: with `k = 1` this is greedy
//! decoding). A sequence stops when it has `k` finished hypotheses and no live beam can
//! still score above the worst of them: with α = 0 a live beam's `log P` only falls; with
//! α > 0 its score is bounded by `log P / lp(max length)`. Without a maximum length and with
//! α > 0 the bound does not exist, and the sequence stops at `k` finished hypotheses.

use std::cmp::Ordering;
use std::sync::Mutex;

use ndarray::Array2;

use super::{Step, check_start, feed_common};
use crate::error::{Error, Result};
use crate::kernels::loss::log_sum_exp;
use crate::kernels::{Float, check_finite};

/// Settings of [`beam_search`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamSearch {
    /// Beams kept per sequence, k (the paper: 4). At least 1; 1 is greedy decoding.
    pub width: usize,
    /// The length penalty's exponent α (the paper: 0.6; 0 for none). Finite and ≥ 0.
    pub alpha: f64,
    /// Hypotheses returned per sequence, best first: at least 1, at most `width`.
    pub n_best: usize,
}

impl BeamSearch {
    /// `width` beams, no length penalty, the best hypothesis only.
    pub fn new(width: usize) -> Self {
        BeamSearch {
            width,
            alpha: 0.0,
            n_best: 1,
        }
    }

    /// The paper's setting (§6.1): 4 beams, α = 0.6, the best hypothesis only.
    pub fn paper() -> Self {
        BeamSearch {
            width: 4,
            alpha: 0.6,
            n_best: 1,
        }
    }

    /// The same settings with length penalty exponent `alpha`.
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// The same settings returning the `n` best hypotheses.
    pub fn with_n_best(mut self, n: usize) -> Self {
        self.n_best = n;
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a width of 0, an α that is not finite and ≥ 0, or an
    /// `n_best` outside 1..=width.
    pub fn check(&self) -> Result<()> {
        crate::error::check::positive("width", self.width)?;
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(Error::config(
                "alpha",
                format!(
                    "a length penalty exponent must be finite and ≥ 0, got {}",
                    self.alpha
                ),
            ));
        }
        if !(1..=self.width).contains(&self.n_best) {
            return Err(Error::config(
                "n_best",
                format!("must be in 1..={} (the width), got {}", self.width, self.n_best),
            ));
        }
        Ok(())
    }

    /// `lp(Y) = ((5 + |Y|) / 6)^α` for a hypothesis of `len` tokens (EOS counted).
    pub fn length_penalty(&self, len: usize) -> f64 {
        ((5.0 + len as f64) / 6.0).powf(self.alpha)
    }
}

/// One output of [`beam_search`].
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// The new tokens, without the prefix and without EOS.
    pub tokens: Vec<usize>,
    /// `log P` of the tokens given the prefix, EOS included if the hypothesis ended with it.
    pub log_prob: f64,
    /// `log_prob / lp(Y)`, `|Y|` counting EOS if it ended with it: what hypotheses are ranked by.
    pub score: f64,
    /// Whether it ended with EOS (not at the maximum length).
    pub ended: bool,
}

/// A live beam: the state row that holds its caches, its tokens and `log P`.
struct Beam {
    row: usize,
    tokens: Vec<usize>,
    log_prob: f64,
}

/// Beam search over every sequence of `state`, each from its prefix, until it ends in `eos`
/// (with `None`, only the length ends a hypothesis) or has `max_new` new tokens: for each sequence, the `n_best` hypotheses by score, best
/// first (ties in the order they were found).
///
/// Each sequence's beams depend only on its own logits, so a sequence gets the same
/// hypotheses decoded alone or in a batch (up to the rounding of the batched products).
/// Width 1 is greedy decoding.
///
/// # Errors
/// As [`generate`](super::generate), and [`Error::InvalidConfig`] for bad settings
/// ([`BeamSearch::check`]).
pub fn beam_search<F: Float, S: Step<F>, P: AsRef<[usize]>>(
    state: S,
    prefixes: &[P],
    search: &BeamSearch,
    eos: Option<usize>,
    max_new: usize,
) -> Result<Vec<Vec<Hypothesis>>> {
    let limits = vec![max_new; prefixes.len()];
    beam_search_with_limits(state, prefixes, search, eos, &limits)
}

/// [`beam_search`] with a maximum length per sequence.
pub(crate) fn beam_search_with_limits<F: Float, S: Step<F>, P: AsRef<[usize]>>(
    mut state: S,
    prefixes: &[P],
    search: &BeamSearch,
    eos: Option<usize>,
    limits: &[usize],
) -> Result<Vec<Vec<Hypothesis>>> {
    search.check()?;
    let max_new = limits.iter().copied().max().unwrap_or(0);
    check_start(&state, prefixes, eos, max_new)?;
    let b = prefixes.len();
    let mut finished: Vec<Vec<Hypothesis>> = vec![Vec::new(); b];
    let mut beams: Vec<Vec<Beam>> = (0..b)
        .map(|i| {
            vec![Beam {
                row: i,
                tokens: Vec::new(),
                log_prob: 0.0,
            }]
        })
        .collect();
    for (i, beam) in beams.iter_mut().enumerate() {
        if limits[i] == 0 {
            finished[i].push(Hypothesis {
                tokens: Vec::new(),
                log_prob: 0.0,
                score: 0.0,
                ended: false,
            });
            beam.clear();
        }
    }
    let mut logits = if beams.iter().any(|b| !b.is_empty()) {
        feed_common(&mut state, prefixes)?
    } else {
        Array2::zeros((b, state.vocab()))
    };
    let prefix_lens: Vec<usize> = prefixes.iter().map(|p| p.as_ref().len()).collect();
    loop {
        let t = state.len();
        let (mut rows, mut next) = (Vec::new(), Vec::new());
        // Each sequence's extensions from its own logits, the sequences side by side on the
        // threads (a beam's log-probabilities take an `f64` exponential per token).
        let extended: Vec<Mutex<Option<Extension>>> = (0..b).map(|_| Mutex::new(None)).collect();
        let extends = |i: usize| !beams[i].is_empty() && t >= prefix_lens[i];
        let per = b.div_ceil(crate::kernels::parallel::threads().max(1)).max(1);
        crate::kernels::parallel::for_each_index(b.div_ceil(per), |p| {
            for i in (p * per..((p + 1) * per).min(b)).filter(|&i| extends(i)) {
                let mut ended = Vec::new();
                let live = extend(&beams[i], &logits, i, search, eos, limits[i], &mut ended);
                *extended[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(live.map(|l| (l, ended)));
            }
        });
        for (i, extended) in extended.into_iter().enumerate() {
            if beams[i].is_empty() {
                continue;
            }
            let prefix = prefixes[i].as_ref();
            if t < prefix.len() {
                // Still in the prefix: one beam, the given token.
                let beam = &mut beams[i][0];
                rows.push(beam.row);
                next.push(prefix[t]);
                beam.row = rows.len() - 1;
                continue;
            }
            let (live, ended) = extended
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every live sequence past its prefix was extended")?;
            finished[i].extend(ended);
            finished[i].sort_by(|a, c| c.score.total_cmp(&a.score));
            finished[i].truncate(search.width);
            beams[i] = if done(&live, &finished[i], search, limits[i]) {
                Vec::new()
            } else {
                live
            };
            for beam in &mut beams[i] {
                rows.push(beam.row);
                next.push(*beam.tokens.last().expect("a live beam has a token"));
                beam.row = rows.len() - 1;
            }
        }
        if rows.is_empty() {
            break;
        }
        state.select(&rows)?;
        let tokens = Array2::from_shape_vec((next.len(), 1), next).expect("one token per row");
        logits = state.feed(tokens.view())?;
    }
    Ok(finished
        .into_iter()
        .map(|mut f| {
            f.truncate(search.n_best);
            f
        })
        .collect())
}

/// A sequence's step: its live beams and the hypotheses that ended, or the error.
type Extension = Result<(Vec<Beam>, Vec<Hypothesis>)>;

/// One step of sequence `seq`: every extension of its live `beams` by the logits of their
/// rows; those ending in `eos` (or reaching `limit` tokens) go to `finished`, the best `width`
/// others are returned live (their rows still the parents').
fn extend<F: Float>(
    beams: &[Beam],
    logits: &Array2<F>,
    seq: usize,
    search: &BeamSearch,
    eos: Option<usize>,
    limit: usize,
    finished: &mut Vec<Hypothesis>,
) -> Result<Vec<Beam>> {
    let keep = 2 * search.width;
    // (log P, beam, token), best first; ties by beam, then token.
    let order = |a: &(f64, usize, usize), c: &(f64, usize, usize)| {
        c.0.total_cmp(&a.0).then(a.1.cmp(&c.1)).then(a.2.cmp(&c.2))
    };
    let mut candidates: Vec<(f64, usize, usize)> = Vec::with_capacity(keep * beams.len());
    for (j, beam) in beams.iter().enumerate() {
        let row = logits.row(beam.row);
        check_finite(row, || format!("the logits of the next token of sequence {seq}"))?;
        // log P(v) = z_v − log Z rises with z_v: a beam's best `keep` tokens are those of its
        // largest logits (ties to the lower token), found in one pass rather than by ranking
        // every token's log-probability.
        let log_z = log_sum_exp(row);
        candidates.extend(
            top_tokens(row, keep)
                .into_iter()
                .map(|v| (beam.log_prob + (row[v].to_f64() - log_z), j, v)),
        );
    }
    candidates.sort_by(order);
    candidates.truncate(keep);
    // The best `width` extensions go on (EOS among them ends its hypothesis); the `width`
    // after them fill the places of those that ended, so that `width` beams stay live.
    let mut live = Vec::with_capacity(search.width);
    let mut places = search.width;
    for (rank, (log_prob, j, v)) in candidates.into_iter().enumerate() {
        let parent = &beams[j];
        if Some(v) == eos {
            if rank < search.width {
                finished.push(Hypothesis {
                    tokens: parent.tokens.clone(),
                    log_prob,
                    score: log_prob / search.length_penalty(parent.tokens.len() + 1),
                    ended: true,
                });
            }
            continue;
        }
        if places == 0 {
            break;
        }
        places -= 1;
        let mut tokens = parent.tokens.clone();
        tokens.push(v);
        if tokens.len() >= limit {
            // At the maximum length: finished without EOS.
            let score = log_prob / search.length_penalty(tokens.len());
            finished.push(Hypothesis {
                tokens,
                log_prob,
                score,
                ended: false,
            });
        } else {
            live.push(Beam {
                row: parent.row,
                tokens,
                log_prob,
            });
        }
    }
    Ok(live)
}

/// The tokens of the `keep` largest entries of `row`, largest first, ties to the lower token.
fn top_tokens<F: Float>(row: ndarray::ArrayView1<F>, keep: usize) -> Vec<usize> {
    let mut best: Vec<(F, usize)> = Vec::with_capacity(keep + 1);
    for (v, &x) in row.iter().enumerate() {
        if best.len() == keep && best.last().is_none_or(|&(worst, _)| x <= worst) {
            continue;
        }
        // After every entry at least as large (they came first, or are larger).
        let at = best.partition_point(|&(y, _)| y >= x);
        best.insert(at, (x, v));
        best.truncate(keep);
    }
    best.into_iter().map(|(_, v)| v).collect()
}

/// Whether a sequence is done: no live beam, or `width` finished hypotheses that no live
/// beam can still beat.
fn done(live: &[Beam], finished: &[Hypothesis], search: &BeamSearch, limit: usize) -> bool {
    if live.is_empty() {
        return true;
    }
    if finished.len() < search.width {
        return false;
    }
    let worst = finished.last().expect("width ≥ 1 finished").score;
    let best_live = live.iter().map(|b| b.log_prob).fold(f64::NEG_INFINITY, f64::max);
    // log P ≤ 0 only falls; divided by the largest penalty it may still get, it bounds every
    // score the beam can reach.
    let bound = if search.alpha == 0.0 {
        best_live
    } else if limit == usize::MAX {
        return true;
    } else {
        best_live / search.length_penalty(limit)
    };
    bound.partial_cmp(&worst) != Some(Ordering::Greater)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_tokens_are_the_largest_ties_to_the_lower_token() {
        let row = ndarray::arr1(&[0.5f32, 2.0, -1.0, 2.0, 0.5, 3.0, 0.5, -7.0]);
        for keep in 1..=9 {
            // Naive: every token ranked by (value down, token up).
            let mut all: Vec<usize> = (0..row.len()).collect();
            all.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            all.truncate(keep);
            assert_eq!(top_tokens(row.view(), keep), all, "keep {keep}");
        }
    }
}
