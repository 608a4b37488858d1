//! The pieces both token-predicting models share: the output projection (a `Linear` or the
//! tied embedding, §3.4) and the token loss over padded targets.

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};
use crate::kernels::loss::{CrossEntropy, cross_entropy};
use crate::kernels::{Float, PackedB, filled, gemm_packed};
use crate::layers::{Embedding, Linear, LinearCache, ProjectionCache};
use crate::models::batch::{IGNORE, TokenBatch};
use crate::models::trainable::LossStats;

/// What the output projection's backward pass needs.
#[derive(Clone, Debug)]
pub(crate) enum OutputCache<F: Float> {
    /// Through the tied embedding.
    Tied(ProjectionCache<F>),
    /// Through a separate linear layer.
    Linear(LinearCache<F>),
}
impl<F: Float> crate::kernels::workspace::Recycle for OutputCache<F> {
    fn give_back(self) {
        match self {
            OutputCache::Tied(c) => c.give_back(),
            OutputCache::Linear(c) => c.give_back(),
        }
    }
}

/// Logits `[N, V]` of hidden rows `h`, through `head` or, when there is none, the tied
/// embedding; with the cache for [`output_backward`].
pub(crate) fn output_forward<F: Float>(
    head: Option<&Linear<F>>,
    embed: &Embedding<F>,
    h: ArrayView2<F>,
) -> (Array2<F>, OutputCache<F>) {
    match head {
        Some(head) => {
            let (l, c) = head.forward(h);
            (l, OutputCache::Linear(c))
        }
        None => {
            let (l, c) = embed.project(h);
            (l, OutputCache::Tied(c))
        }
    }
}

/// [`output_forward`] without a cache.
pub(crate) fn output_infer<F: Float>(
    head: Option<&Linear<F>>,
    embed: &Embedding<F>,
    h: ArrayView2<F>,
) -> Array2<F> {
    match head {
        Some(head) => head.infer(h),
        None => embed.project_infer(h),
    }
}

/// The output projection's weight (the head's, or the tied embedding's) packed once for the
/// many products of a decode; `None` where nothing packs ([`PackedB`]).
pub(crate) fn pack_output<F: Float>(head: Option<&Linear<F>>, embed: &Embedding<F>) -> Option<PackedB> {
    match head {
        Some(head) => PackedB::new(head.p.weight.t()),
        None => PackedB::new(embed.p.weight.t()),
    }
}

/// [`output_infer`] with the weight of [`pack_output`] (`None`: the weight as it is).
pub(crate) fn output_infer_packed<F: Float>(
    head: Option<&Linear<F>>,
    embed: &Embedding<F>,
    packed: Option<&PackedB>,
    h: ArrayView2<F>,
) -> Array2<F> {
    match packed {
        Some(w) => {
            let bias = head.and_then(|g| g.p.bias.as_ref());
            // SAFETY: gemm_packed writes every element.
            unsafe {
                filled((h.nrows(), w.dim().1), |logits| {
                    gemm_packed(h, w, bias.map(|b| b.view()), false, logits)
                })
            }
        }
        None => output_infer(head, embed, h),
    }
}

/// Backward of [`output_forward`]: adds the head's (or the tied embedding's) gradient and
/// returns `∂L/∂h`.
///
/// # Panics
/// If the gradient tree's tying differs from the model's.
pub(crate) fn output_backward<F: Float>(
    head: Option<&Linear<F>>,
    embed: &Embedding<F>,
    cache: &OutputCache<F>,
    grad_logits: ArrayView2<F>,
    g_head: Option<&mut Linear<F>>,
    g_embed: &mut Embedding<F>,
) -> Array2<F> {
    match (cache, head, g_head) {
        (OutputCache::Linear(c), Some(head), Some(gh)) => head.backward(c, grad_logits, &mut gh.p),
        (OutputCache::Tied(c), None, None) => embed.project_backward(c, grad_logits, &mut g_embed.p),
        _ => panic!("output_backward: the gradient tree does not match the model's tying"),
    }
}

/// Checks that `targets` are shaped as `input` and inside the vocabulary.
pub(crate) fn check_targets(
    input: &TokenBatch,
    targets: &TokenBatch,
    vocab: usize,
    what: &str,
) -> Result<()> {
    if targets.ids().dim() != input.ids().dim() {
        return Err(Error::shape(
            format!("{what} (shaped as the input)"),
            input.ids().shape(),
            targets.ids().shape(),
        ));
    }
    // Same shape, different real lengths: name the first sequence that differs.
    if let Some((row, (t, i))) =
        (targets.lengths().iter().zip(input.lengths()).enumerate()).find(|(_, (t, i))| t != i)
    {
        return Err(Error::InvalidInput {
            why: format!(
                "{what}: sequence {row} has {t} real target tokens but {i} real input tokens (each target must be as long as its input)"
            ),
        });
    }
    targets.check_vocab(vocab)
}

/// The mean token cross-entropy of `logits` `[B·T, V]` against the real tokens of `targets`,
/// its gradient scaled by `weight` (a micro-batch's share of a step).
pub(crate) fn token_loss<F: Float>(
    logits: ArrayView2<F>,
    targets: &TokenBatch,
    smoothing: f64,
    weight: f64,
) -> Result<CrossEntropy<F>> {
    let mut ce = cross_entropy(logits, &targets.loss_targets(), Some(IGNORE), smoothing)?;
    if weight != 1.0 {
        ce.grad.mapv_inplace(|v| v * F::from_f64(weight));
    }
    Ok(ce)
}

impl<F: Float> From<&CrossEntropy<F>> for LossStats {
    fn from(ce: &CrossEntropy<F>) -> Self {
        LossStats {
            loss: ce.loss,
            tokens: ce.tokens,
            correct: ce.correct,
        }
    }
}
