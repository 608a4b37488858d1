//! The decoder-only Transformer: a causal language model, the paper's encoder layer run under
//! a causal mask (the "decoder" of GPT and of Liu et al. 2018, which drops the
//! cross-attention of Figure 1's decoder because there is no source).
//!
//! ```text
//! ids x₀ … x_{T−1} → Embedding·√d_model + positions → Dropout → N × layer (causal) → [LayerNorm]
//!                  → h·Eᵀ (tied, §3.4) or Linear → logits; position t scores token x_{t+1}
//! ```
//!
//! Each layer is an [`EncoderLayer`](crate::blocks::EncoderLayer) (self-attention and
//! feed-forward, each in an Add & Norm residual) whose self-attention is masked as the
//! paper's decoder (§3.2.3): "We need to prevent leftward information flow in the decoder to
//! preserve the auto-regressive property. We implement this inside of scaled dot-product
//! attention by masking out (setting to −∞) all values in the input of the softmax which
//! correspond to illegal connections." Position t therefore sees positions 0..=t only, and its
//! logits are a distribution over the token at t + 1: one forward pass trains every prefix
//! of every sequence at once.
//!
//! A pre-norm stack ends with a LayerNorm ([`FinalNorm::Auto`]), as GPT-2's `ln_f`. The
//! defaults are the paper's where it has one: sinusoidal positions (§3.5), post-norm, the
//! output projection tied to the embedding (§3.4). Sinusoids need no table, so generation can
//! run past any length; learned positions ([`Positions::Learned`], as GPT-2, "nearly
//! identical results" in Table 3 row E) cap the context at `max_len`, and
//! [`continue_prompt`](crate::infer::continue_prompt) then crops to the last `max_len` tokens.
//!
//! # Shapes
//! B sequences of (padded) length T in a [`TokenBatch`] → logits `[B·T, V]`: row `b·T + t`
//! holds the scores of the token after position t of sequence b. Rows of padded positions
//! hold finite numbers that mean nothing; the loss skips them.
//!
//! # PyTorch equivalent
//! ```text
//! layer = nn.TransformerEncoderLayer(d_model, nhead, d_ff, dropout, activation,
//!                                    batch_first=True, norm_first=norm_first)
//! blocks = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model) if norm_first else None)
//! emb = nn.Embedding(V, d_model)
//! head = nn.Linear(d_model, V, bias=False); head.weight = emb.weight     # tie_output
//! mask = nn.Transformer.generate_square_subsequent_mask(T)
//! h = blocks(dropout(emb(ids) * math.sqrt(d_model) + pe[:T]), mask=mask, is_causal=True)
//! logits = head(h)
//! ```
//! Parameter names: `embed.weight`, `input.weight` (a learned position table),
//! `blocks.layers.{i}.…` as in [`EncoderLayer`](crate::blocks::EncoderLayer), `blocks.norm.…`
//! and `head.weight` (untied only).
//!
//! # Example
//! ```
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::blocks::BlockConfig;
//! use vaswani::infer::{Sampling, continue_prompt};
//! use vaswani::models::{DecoderOnlyConfig, LmBatch, TokenBatch};
//! use vaswani::train::{Trainer, TrainerConfig};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let cfg = DecoderOnlyConfig::new(12, BlockConfig::new(16, 2, 32), 2);
//! let model = cfg.init(&mut rng)?;
//! assert_eq!(cfg.cost(1, 1).params, vaswani::Params::num_params(&model) as u64);
//!
//! // Logits for every position: [B·T, V].
//! let tokens = TokenBatch::from_sequences(&[vec![3, 4, 5, 6], vec![7, 8]], 0)?;
//! assert_eq!(model.infer(&tokens)?.dim(), (2 * 4, 12));
//!
//! // One training step: each sequence predicts itself shifted by one.
//! let batch = LmBatch::from_sequences(&[vec![3, 4, 5, 6], vec![7, 8]], 0)?;
//! let mut trainer = Trainer::new(model, TrainerConfig::paper(16, 100))?;
//! trainer.step(&[batch], &mut rng)?;
//!
//! // Generation runs the prompt once, then one position per token (a key/value cache).
//! let next = continue_prompt(&trainer.model, &[3, 4], 5, Sampling::Temperature(0.8), &mut rng)?;
//! assert_eq!(next.len(), 5);
//! let bits = trainer.model.bits_per_token(&tokens)?;
//! assert!(bits > 0.0);
//! # Ok::<(), vaswani::Error>(())
//! ```

use std::borrow::Cow;

use ndarray::{Array2, ArrayView2, s};
use rand::Rng;

use crate::blocks::encoder_layer::PackedEncoderLayer;
use crate::blocks::{BlockConfig, Encoder, EncoderCache, EncoderConfig, FinalNorm, flat, unrows};
use crate::error::{Error, Result, check};
use crate::kernels::gemm::{exceed_last_level_cache, with_streamed_weights};
use crate::kernels::precision::{Precision, with_bf16_if};
use crate::kernels::{Float, PackedB};

use crate::kernels::loss::log_sum_exp;
use crate::kernels::parallel::for_each_chunk_mut;
use crate::kernels::workspace::{KeptWorkspace, Recycle};
use crate::layers::{Embedding, EmbeddingCache, EmbeddingConfig, KvCache, Linear, LinearConfig, Mask};
use crate::models::attention_maps::AttentionMaps;
use crate::models::batch::{TokenBatch, check_rows, check_step_tokens};
use crate::models::cost::Cost;
use crate::models::input::{InputCache, InputStage, Positions};
use crate::models::output::{
    OutputCache, check_targets, output_backward, output_forward, output_infer, output_infer_packed,
    pack_output, token_loss,
};
use crate::models::trainable::{LossStats, Trainable};

/// Configuration of a [`DecoderOnly`] language model.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DecoderOnlyConfig {
    /// Vocabulary size V.
    pub vocab: usize,
    /// The layers' sizes and switches.
    pub block: BlockConfig,
    /// Layers N.
    pub n_layers: usize,
    /// Whether the stack ends with a LayerNorm ([`FinalNorm::Auto`]: when pre-norm).
    pub final_norm: FinalNorm,
    /// How positions are encoded.
    pub positions: Positions,
    /// The output projection is the embedding, `logits = h·Eᵀ` (§3.4).
    pub tie_output: bool,
}

/// A decoder-only (causal) language model. See the [module docs](self). Its gradients have
/// its own type.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderOnly<F: Float = f32> {
    /// Its configuration.
    pub cfg: DecoderOnlyConfig,
    /// The token embedding (also the output projection when tied).
    pub embed: Embedding<F>,
    /// Positions and dropout.
    pub input: InputStage<F>,
    /// The layers, run with a causal mask, and the final LayerNorm if any.
    pub blocks: Encoder<F>,
    /// The output projection; `None` when tied to the embedding.
    pub head: Option<Linear<F>>,
}
crate::impl_params!(DecoderOnly {
    embed,
    input,
    blocks,
    head
});

/// What [`DecoderOnly::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct DecoderOnlyCache<F: Float = f32> {
    embed: EmbeddingCache,
    input: InputCache<F>,
    blocks: EncoderCache<F>,
    output: OutputCache<F>,
}
crate::kernels::workspace::impl_recycle!(DecoderOnlyCache<F: Float> { input, blocks, output });

impl<F: Float> DecoderOnlyCache<F> {
    /// The stack's cache: each layer's attention weights, for instance.
    pub fn blocks(&self) -> &EncoderCache<F> {
        &self.blocks
    }
}

/// A language-model training batch: each sequence's tokens but the last, and the same
/// sequence shifted left by one (the token each position must predict).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmBatch {
    /// `seq[..n − 1]` of each sequence.
    pub input: TokenBatch,
    /// `seq[1..]` of each sequence: same lengths as `input`.
    pub target: TokenBatch,
}

impl LmBatch {
    /// A batch from whole sequences, padded with `pad`: the input is `seq[..n − 1]` and the
    /// target `seq[1..]`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty list, or for a sequence shorter than 2 tokens (it
    /// has nothing to predict; it is refused rather than skipped so that no data is dropped
    /// without a word).
    pub fn from_sequences<S: AsRef<[usize]>>(seqs: &[S], pad: usize) -> Result<Self> {
        if let Some((i, s)) = seqs.iter().enumerate().find(|(_, s)| s.as_ref().len() < 2) {
            return Err(Error::InvalidInput {
                why: format!(
                    "sequence {i} has {} token(s): a language-model example needs at least 2 (one to \
                     read, one to predict)",
                    s.as_ref().len()
                ),
            });
        }
        let input: Vec<&[usize]> = seqs.iter().map(|s| &s.as_ref()[..s.as_ref().len() - 1]).collect();
        let target: Vec<&[usize]> = seqs.iter().map(|s| &s.as_ref()[1..]).collect();
        Ok(LmBatch {
            input: TokenBatch::from_sequences(&input, pad)?,
            target: TokenBatch::from_sequences(&target, pad)?,
        })
    }
}

impl DecoderOnlyConfig {
    /// A model of `n_layers` layers of `block` over `vocab` tokens, with the paper's choices:
    /// sinusoidal positions, the output projection tied to the embedding, and the final
    /// LayerNorm chosen by the norm placement (switch them with the `with_*` methods).
    pub fn new(vocab: usize, block: BlockConfig, n_layers: usize) -> Self {
        DecoderOnlyConfig {
            vocab,
            block,
            n_layers,
            final_norm: FinalNorm::Auto,
            positions: Positions::Sinusoidal,
            tie_output: true,
        }
    }

    /// The same config with the output projection tied to the embedding or not.
    pub fn with_tie_output(mut self, tie: bool) -> Self {
        self.tie_output = tie;
        self
    }

    /// The same config with another position encoding.
    pub fn with_positions(mut self, positions: Positions) -> Self {
        self.positions = positions;
        self
    }

    /// The same config with another final-norm choice.
    pub fn with_final_norm(mut self, final_norm: FinalNorm) -> Self {
        self.final_norm = final_norm;
        self
    }

    /// Checks the config without building anything.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero sizes (vocab, layers, a learned table's `max_len`,
    /// the block's), heads that do not divide d_model, dropout outside [0, 1) or ε not finite
    /// and positive.
    pub fn check(&self) -> Result<()> {
        check::positive("vocab", self.vocab)?;
        check::positive("n_layers", self.n_layers)?;
        if let Positions::Learned { max_len } = self.positions {
            check::positive("max_len", max_len)?;
        }
        self.block.check()
    }

    /// Builds the model in `f32`, the type for training and inference;
    /// [`DecoderOnlyConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`DecoderOnlyConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<DecoderOnly> {
        self.init_as(rng)
    }

    /// Builds the model with PyTorch's initialisation (see each layer).
    ///
    /// # Errors
    /// As [`DecoderOnlyConfig::check`].
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<DecoderOnly<F>> {
        self.check()?;
        let d = self.block.d_model;
        let embed = EmbeddingConfig::new(self.vocab, d).init_as(rng)?;
        let input = InputStage::new(d, self.positions, self.block.p_drop, rng)?;
        let blocks = self.blocks_config().init_as(rng)?;
        let head = (!self.tie_output)
            .then(|| LinearConfig::new(d, self.vocab).with_bias(false).init_as(rng))
            .transpose()?;
        Ok(DecoderOnly {
            cfg: self.clone(),
            embed,
            input,
            blocks,
            head,
        })
    }

    fn blocks_config(&self) -> EncoderConfig {
        EncoderConfig::new(self.block.clone(), self.n_layers).with_final_norm(self.final_norm)
    }

    /// Parameter count and FLOPs for `batch` sequences of length `len`, before anything is
    /// built (FLOP model: dense m→n is 2mn per token, attention 4·T·T·d per
    /// sequence even though the causal mask lets half of it be skipped, the output projection
    /// counts, a training step is 3× the forward).
    pub fn cost(&self, batch: usize, len: usize) -> Cost {
        // Each part counts itself (in f64: a config read from a file may hold absurd sizes,
        // which must saturate, not wrap).
        let d = self.block.d_model;
        let output = LinearConfig::new(d, self.vocab).with_bias(false);
        let head = if self.tie_output { 0.0 } else { output.params() };
        let learned = self.positions.params(d);
        let blocks = self.blocks_config();
        let params = EmbeddingConfig::new(self.vocab, d).params() + head + learned + blocks.params();
        let forward = batch as f64 * (blocks.flops(len) + output.flops(len));
        Cost::from_f64(params, forward)
    }
}

impl<F: Float> DecoderOnly<F> {
    /// Checks ids against the vocabulary and the length against a learned table.
    fn check_tokens(&self, tokens: &TokenBatch) -> Result<()> {
        tokens.check_vocab(self.cfg.vocab)?;
        let len = tokens.seq_len();
        match self.input.max_len() {
            Some(max) if len > max => Err(Error::SequenceTooLong { len, max }),
            _ => Ok(()),
        }
    }

    /// Causal, and padded keys blocked too. For a real position the causal part alone already
    /// hides the padding (it lies after the sequence); the key lengths keep padded positions
    /// reading real tokens only.
    fn mask(tokens: &TokenBatch) -> Mask {
        Mask::causal().and(tokens.padding_mask())
    }

    /// Forward pass in training mode (dropout on): logits `[B·T, V]` and the cache for
    /// [`DecoderOnly::backward`].
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`] for a real id ≥ V (padding is never read),
    /// [`Error::SequenceTooLong`] for T past a learned position table.
    pub fn forward(
        &self,
        tokens: &TokenBatch,
        rng: &mut impl Rng,
    ) -> Result<(Array2<F>, DecoderOnlyCache<F>)> {
        crate::kernels::parallel::with_team(|| {
            self.check_tokens(tokens)?;
            let (b, t) = (tokens.batch_size(), tokens.seq_len());
            let (x, embed) = tokens.embed_forward(&self.embed)?;
            let (x, input) = self.input.forward(x, b, t, 0, rng)?;
            let (h, blocks) = self.blocks.forward(x.view(), &Self::mask(tokens), rng);
            let h = flat(h);
            let (logits, output) = output_forward(self.head.as_ref(), &self.embed, h.view());
            Ok((
                logits,
                DecoderOnlyCache {
                    embed,
                    input,
                    blocks,
                    output,
                },
            ))
        })
    }

    /// Backward pass from `∂L/∂logits` `[B·T, V]`: adds every parameter's gradient into `g`
    /// (the tied embedding receives both its uses).
    ///
    /// # Panics
    /// If `grad_logits` does not have the logits' shape, or `g` is not shaped as the model.
    pub fn backward(&self, cache: &DecoderOnlyCache<F>, grad_logits: ArrayView2<F>, g: &mut DecoderOnly<F>) {
        crate::kernels::parallel::with_team(|| {
            let (b, t) = InputStage::dims(&cache.input);
            let grad_h = output_backward(
                self.head.as_ref(),
                &self.embed,
                &cache.output,
                grad_logits,
                g.head.as_mut(),
                &mut g.embed,
            );
            let grad_x = self
                .blocks
                .backward(&cache.blocks, unrows(grad_h, b, t).view(), &mut g.blocks);
            let grad_x = self.input.backward(&cache.input, grad_x.view(), &mut g.input);
            self.embed.backward(&cache.embed, grad_x.view(), &mut g.embed.p);
        })
    }

    /// Logits `[B·T, V]` without dropout, with the layers' and the output's weights `packed`
    /// (`None`: as they are, packed by each product).
    fn infer_with(&self, tokens: &TokenBatch, packed: Option<&PackedGenerate<F>>) -> Result<Array2<F>> {
        crate::kernels::parallel::with_team(|| {
            self.check_tokens(tokens)?;
            let (b, t) = (tokens.batch_size(), tokens.seq_len());
            let x = self.input.infer(tokens.embed(&self.embed)?, b, t, 0)?;
            let mask = Self::mask(tokens);
            Ok(match packed {
                Some(p) => {
                    let h = flat(self.blocks.infer_packed(x.view(), &mask, &p.layers));
                    output_infer_packed(self.head.as_ref(), &self.embed, Some(&p.output), h.view())
                }
                None => {
                    let h = flat(self.blocks.infer(x.view(), &mask));
                    output_infer(self.head.as_ref(), &self.embed, h.view())
                }
            })
        })
    }

    /// Every layer's (causal) self-attention maps of a pass without dropout over `tokens`, in
    /// [`AttentionMaps::decoder`]. For the maps of a generation, pass the prompt followed by
    /// the generated tokens.
    ///
    /// # Errors
    /// As [`DecoderOnly::forward`].
    pub fn attention(&self, tokens: &TokenBatch) -> Result<AttentionMaps<F>> {
        crate::kernels::parallel::with_team(|| {
            self.check_tokens(tokens)?;
            let (b, t) = (tokens.batch_size(), tokens.seq_len());
            let x = self.input.infer(tokens.embed(&self.embed)?, b, t, 0)?;
            let (_, decoder) = self.blocks.infer_with_weights(x.view(), &Self::mask(tokens));
            Ok(AttentionMaps {
                encoder: Vec::new(),
                decoder,
                cross: Vec::new(),
            })
        })
    }

    /// Logits `[B·T, V]` without dropout (evaluation).
    ///
    /// # Errors
    /// As [`DecoderOnly::forward`].
    pub fn infer(&self, tokens: &TokenBatch) -> Result<Array2<F>> {
        self.infer_with(tokens, None)
    }

    /// The log-likelihood, in nats, of every real token after the first of each sequence given
    /// the tokens before it: `Σ_b Σ_{1 ≤ t < len_b} ln p(x_t | x_<t)`, summed in `f64` in
    /// row order. It adds over batches; divide by the number of predicted tokens,
    /// `Σ_b max(len_b − 1, 0)`, for a mean (0 when there is none).
    ///
    /// The last token of a sequence is only predicted, never read, so with learned positions
    /// a sequence may hold `max_len + 1` tokens (as the sequences of an [`LmBatch`] do).
    ///
    /// # Errors
    /// [`Error::TokenOutOfRange`] for a real id ≥ V, [`Error::SequenceTooLong`] for T past
    /// `max_len + 1`.
    pub fn log_likelihood(&self, tokens: &TokenBatch) -> Result<f64> {
        Ok(self.score(tokens, None)?.0)
    }

    /// The mean negative log-likelihood in bits (log base 2) of the real tokens after the
    /// first of each sequence: `−log_likelihood / (ln 2 · Σ_b (len_b − 1))`. For characters it
    /// is bits per character.
    ///
    /// # Errors
    /// As [`DecoderOnly::log_likelihood`], and [`Error::InvalidInput`] if no sequence has 2
    /// tokens (nothing is predicted).
    pub fn bits_per_token(&self, tokens: &TokenBatch) -> Result<f64> {
        bits(self.score(tokens, None)?)
    }

    /// The log-likelihood in nats and the number of predicted tokens, with the weights
    /// `packed` or not ([`DecoderOnly::infer_with`]). The model reads each sequence but its
    /// last token.
    fn score(&self, tokens: &TokenBatch, packed: Option<&PackedGenerate<F>>) -> Result<(f64, usize)> {
        tokens.check_vocab(self.cfg.vocab)?;
        let t = tokens.seq_len();
        if let Some(max) = self.input.max_len().filter(|&max| t > max + 1) {
            return Err(Error::SequenceTooLong { len: t, max: max + 1 });
        }
        let t_in = t.saturating_sub(1);
        let input = TokenBatch::new(
            tokens.ids().slice(s![.., ..t_in]).to_owned(),
            tokens
                .lengths()
                .iter()
                .map(|&len| len.saturating_sub(1))
                .collect(),
        )?;
        let logits = self.infer_with(&input, packed)?;
        // (row of the logits, token it predicts) for every real token after a first.
        let targets: Vec<(usize, usize)> = input
            .lengths()
            .iter()
            .enumerate()
            .flat_map(|(b, &len)| (0..len).map(move |i| (b * t_in + i, tokens.ids()[[b, i + 1]])))
            .collect();
        // Each token's log-probability `z_y − ln Σ exp(z)` in `f64` (as `log_softmax` gives
        // it), the rows side by side on the team (on the calling thread alone they had been
        // a sixth of its samples in a small model's `log_likelihood` on two threads, the
        // other thread waiting), then summed in row order.
        let mut log_probs = vec![0.0f64; targets.len()];
        let work = targets.len() * self.cfg.vocab * 16;
        crate::kernels::parallel::with_team(|| {
            for_each_chunk_mut(&mut log_probs, 1, work, |at, out| {
                for (lp, &(r, y)) in out.iter_mut().zip(&targets[at..]) {
                    let row = logits.row(r);
                    *lp = row[y].to_f64() - log_sum_exp(row);
                }
            })
        });
        let ll = log_probs.iter().fold(0.0, |ll, &lp| ll + lp);
        Ok((ll, targets.len()))
    }
}

/// The mean negative log-likelihood in bits of `(log-likelihood in nats, predicted tokens)`.
fn bits((ll, count): (f64, usize)) -> Result<f64> {
    if count == 0 {
        return Err(Error::InvalidInput {
            why: "no token to predict: every sequence is shorter than 2 tokens".into(),
        });
    }
    Ok(-ll / (count as f64 * std::f64::consts::LN_2))
}

/// A generation in progress (from [`DecoderOnly::begin_generate`] or
/// [`PackedDecoderOnly::begin_generate`]): every layer's key/value cache of the positions fed
/// so far, for a batch of sequences fed side by side.
#[derive(Clone, Debug)]
pub struct GenerateState<'m, F: Float = f32> {
    caches: Vec<KvCache<F>>,
    b: usize,
    len: usize,
    model: &'m DecoderOnly<F>,
    /// The weights a step multiplies by, packed once for the whole generation or borrowed
    /// from a [`PackedDecoderOnly`] (`None` where nothing packs, [`PackedB`]).
    packed: Option<Cow<'m, PackedGenerate<F>>>,
}

/// The layers' and the output projection's weights packed for a generation's many small
/// products (once per generation, or once for many by [`DecoderOnly::packed`]).
#[derive(Clone, Debug)]
struct PackedGenerate<F: Float> {
    layers: Vec<PackedEncoderLayer<F>>,
    output: PackedB,
    /// Whether a step's weights are more than the last-level cache holds: each product of a
    /// step then reads its weight from memory ([`with_streamed_weights`]).
    streamed: bool,
    /// The memory of a generation's key/value caches, kept for the next generation with
    /// these weights (a clone starts without).
    caches: KeptWorkspace,
}

impl<F: Float> Drop for GenerateState<'_, F> {
    /// Gives the caches' memory to the packed weights' keeping, for the next generation.
    fn drop(&mut self) {
        // Weights packed for this decode alone go with it, and so would the memory.
        if let Some(Cow::Borrowed(packed)) = &self.packed {
            let caches = std::mem::take(&mut self.caches);
            packed.caches.run(|| caches.give_back());
        }
    }
}

impl<F: Float> PackedGenerate<F> {
    fn is_bf16(&self) -> bool {
        self.output.precision() == Precision::Bf16
    }
}

/// A [`DecoderOnly`] with its weights packed once for inference (see [`DecoderOnly::packed`]):
/// the same results as the model's own methods, without the packing of every weight at every
/// call or generation, and with the memory of one call's activations kept for the next (and
/// of a generation's `f32` key/value caches, from the end of one generation begun on it to
/// the beginning of the next: freed then if that one does not take it). It borrows the
/// model, which cannot change meanwhile.
#[derive(Clone, Debug)]
pub struct PackedDecoderOnly<'m, F: Float = f32> {
    model: &'m DecoderOnly<F>,
    packed: Option<PackedGenerate<F>>,
    /// The memory of one call's activations, kept for the next (see
    /// [`crate::kernels::workspace`]).
    workspace: KeptWorkspace,
}

impl<'m, F: Float> PackedDecoderOnly<'m, F> {
    /// The model it packs.
    pub fn model(&self) -> &'m DecoderOnly<F> {
        self.model
    }

    /// [`DecoderOnly::infer`] with the packed weights: logits `[B·T, V]`.
    ///
    /// # Errors
    /// As [`DecoderOnly::infer`].
    pub fn infer(&self, tokens: &TokenBatch) -> Result<Array2<F>> {
        self.run(|| self.model.infer_with(tokens, self.packed.as_ref()))
    }

    /// [`DecoderOnly::log_likelihood`] with the packed weights.
    ///
    /// # Errors
    /// As [`DecoderOnly::log_likelihood`].
    pub fn log_likelihood(&self, tokens: &TokenBatch) -> Result<f64> {
        self.run(|| Ok(self.model.score(tokens, self.packed.as_ref())?.0))
    }

    /// [`DecoderOnly::bits_per_token`] with the packed weights.
    ///
    /// # Errors
    /// As [`DecoderOnly::bits_per_token`].
    pub fn bits_per_token(&self, tokens: &TokenBatch) -> Result<f64> {
        self.run(|| bits(self.model.score(tokens, self.packed.as_ref())?))
    }

    /// [`DecoderOnly::begin_generate`] with the packed weights, which the generation borrows
    /// rather than packing its own (continue with [`DecoderOnly::generate_steps`] on the
    /// model, or with any policy of [`crate::infer`]).
    pub fn begin_generate(&self, b: usize, capacity: usize) -> GenerateState<'_, F> {
        self.model
            .begin_generate_with(b, capacity, self.packed.as_ref().map(Cow::Borrowed))
    }

    /// Runs `f` with this handle's workspace, in bf16 precision if the weights were packed
    /// in bf16 ([`with_bf16_if`]).
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let bf16 = self.packed.as_ref().is_some_and(PackedGenerate::is_bf16);
        with_bf16_if(bf16, || self.workspace.run(f))
    }
}

impl<'m, F: Float> GenerateState<'m, F> {
    /// The number of positions fed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of sequences fed side by side.
    pub fn batch_size(&self) -> usize {
        self.b
    }

    /// The model generating.
    pub fn model(&self) -> &'m DecoderOnly<F> {
        self.model
    }

    /// Keeps the sequences `rows`, in that order: a row may appear more than once (beams of
    /// one prompt) or not at all (a sequence that ended).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a row that is not below the batch size.
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        check_rows(rows, self.b, "a generation")?;
        for cache in &mut self.caches {
            cache.select(rows);
        }
        self.b = rows.len();
        Ok(())
    }
}

impl<F: Float> DecoderOnly<F> {
    /// Starts generating `b` sequences side by side with a key/value cache: each
    /// [`DecoderOnly::generate_steps`] then costs only the new positions' work. `capacity` is
    /// a hint of how many positions to make room for (the caches grow past it; `usize::MAX`
    /// allocates no more than a long sequence would).
    ///
    /// The weights are packed once here for the generation's steps (a transposed copy of each
    /// into the GEMM kernels' layout; in bf16 under bf16 precision, whose steps then run in
    /// bf16 wherever they are called).
    ///
    /// A program that generates again and again packs the weights once for all of them with
    /// [`DecoderOnly::packed`].
    pub fn begin_generate(&self, b: usize, capacity: usize) -> GenerateState<'_, F> {
        let packed = crate::kernels::parallel::with_team(|| self.pack_generate());
        self.begin_generate_with(b, capacity, packed.map(Cow::Owned))
    }

    /// [`DecoderOnly::begin_generate`] with the given packed weights.
    fn begin_generate_with<'m>(
        &'m self,
        b: usize,
        capacity: usize,
        packed: Option<Cow<'m, PackedGenerate<F>>>,
    ) -> GenerateState<'m, F> {
        // Weights packed in bf16 generate in bf16 wherever they are used: their key/value
        // caches too (see `KvCache`).
        let bf16 = packed.as_deref().is_some_and(PackedGenerate::is_bf16);
        // The caches in the memory of the last generation with these weights, if any.
        let begin = || with_bf16_if(bf16, || self.blocks.begin(b, capacity));
        let caches = match packed.as_deref() {
            Some(p) => p.caches.run(begin),
            None => begin(),
        };
        GenerateState {
            caches,
            b,
            len: 0,
            model: self,
            packed,
        }
    }

    /// The model with its weights packed once for inference: for a program that evaluates or
    /// generates again and again, [`PackedDecoderOnly`]'s methods give the model's results
    /// without repacking every weight at every call or generation (packing is a transposed
    /// copy of each weight into the GEMM kernels' layout; `f32` on CPUs with the crate's
    /// vector kernels, and in bf16 under bf16 precision on any CPU, whose calls then run in
    /// bf16; elsewhere a no-op).
    pub fn packed(&self) -> PackedDecoderOnly<'_, F> {
        PackedDecoderOnly {
            model: self,
            packed: crate::kernels::parallel::with_team(|| self.pack_generate()),
            workspace: KeptWorkspace::default(),
        }
    }

    /// The layers' and the output projection's weights packed; `None` where nothing packs.
    fn pack_generate(&self) -> Option<PackedGenerate<F>> {
        let output = pack_output(self.head.as_ref(), &self.embed)?;
        let layers = self.blocks.pack()?;
        let step_bytes = output.bytes() + layers.iter().map(PackedEncoderLayer::step_bytes).sum::<usize>();
        Some(PackedGenerate {
            layers,
            output,
            streamed: exceed_last_level_cache(step_bytes),
            caches: KeptWorkspace::default(),
        })
    }

    /// Feeds the next `T` tokens of every sequence, `tokens` `[B, T]` (a prompt in one pass,
    /// or one token), and returns the logits `[B, V]` for the position after the last of them:
    /// the same numbers as the last row of [`DecoderOnly::infer`] over the whole sequence (in
    /// bf16, to the rounding of the keys and values its caches hold in bf16).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a number of rows other than B, [`Error::InvalidInput`] for
    /// `T = 0` or a state begun with another model, [`Error::TokenOutOfRange`] for an id ≥ V
    /// (at its position in the sequence), [`Error::SequenceTooLong`] past a learned position
    /// table.
    pub fn generate_steps(
        &self,
        state: &mut GenerateState<'_, F>,
        tokens: ArrayView2<usize>,
    ) -> Result<Array2<F>> {
        let bf16 = state.packed.as_deref().is_some_and(PackedGenerate::is_bf16);
        let streamed = state.packed.as_deref().is_some_and(|p| p.streamed);
        let run = || {
            if !std::ptr::eq(state.model, self) {
                return Err(Error::InvalidInput {
                    why: "generate_steps: the state was begun with another model".into(),
                });
            }
            let (b, t) = tokens.dim();
            let pos = state.len;
            check_step_tokens(tokens, state.b, pos, self.cfg.vocab, "generate_steps")?;
            if let Some(max) = self.input.max_len().filter(|&max| pos + t > max) {
                return Err(Error::SequenceTooLong { len: pos + t, max });
            }
            if b == 0 {
                state.len = pos + t;
                return Ok(Array2::zeros((0, self.cfg.vocab)));
            }
            let x = self.input.infer(self.embed.infer(tokens)?, b, t, pos)?;
            let packed = state.packed.as_deref();
            let h = flat(self.blocks.infer_step_packed(
                x.view(),
                &mut state.caches,
                packed.map(|p| p.layers.as_slice()),
            ));
            state.len = pos + t;
            // The last position of each sequence.
            let last = h.slice(s![t - 1..;t, ..]);
            Ok(output_infer_packed(
                self.head.as_ref(),
                &self.embed,
                packed.map(|p| &p.output),
                last,
            ))
        };
        // Weights packed in bf16 step in bf16 wherever the step is called, as they were packed.
        with_bf16_if(bf16, || {
            crate::kernels::parallel::with_team(|| with_streamed_weights(streamed, run))
        })
    }
}

impl<F: Float> Trainable for DecoderOnly<F> {
    type Float = F;
    type Batch = LmBatch;

    fn batch_tokens(batch: &LmBatch) -> usize {
        batch.target.tokens()
    }

    fn train_flops(&self, batch: &LmBatch) -> u64 {
        self.cfg
            .cost(batch.input.batch_size(), batch.input.seq_len())
            .train_flops
    }

    /// Cross-entropy over every real target token (padding skipped), with the trainer's label
    /// smoothing.
    fn accumulate<R: Rng>(
        &self,
        batch: &LmBatch,
        smoothing: f64,
        weight: f64,
        grads: &mut Self,
        rng: &mut R,
    ) -> Result<LossStats> {
        check_targets(
            &batch.input,
            &batch.target,
            self.cfg.vocab,
            "language-model targets",
        )?;
        let (logits, cache) = self.forward(&batch.input, rng)?;
        let ce = token_loss(logits.view(), &batch.target, smoothing, weight)?;
        self.backward(&cache, ce.grad.view(), grads);
        let stats = LossStats::from(&ce);
        // Back to the caller's workspace, if any, for the next batch.
        (cache, logits, ce.grad).give_back();
        Ok(stats)
    }
}
