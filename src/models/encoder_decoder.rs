//! The encoder-decoder Transformer of Figure 1: a sequence-to-sequence model.
//!
//! ```text
//! source ids → Embedding·√d_model + positions → Dropout → Encoder ──────────┐ memory
//! target ids → Embedding·√d_model + positions → Dropout → Decoder(·, memory) → Linear → logits
//! ```
//!
//! The target is fed shifted right ("teacher forcing"): the decoder sees `[BOS, y₁, …, yₙ]`
//! and is trained to predict `[y₁, …, yₙ, EOS]`; the causal mask keeps position i from
//! seeing later positions (§3.2.3). Source and target may share one embedding, and the
//! output projection may reuse the target embedding (§3.4: "we share the same weight matrix
//! between the two embedding layers and the pre-softmax linear transformation").
//!
//! # Example
//! ```
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::blocks::BlockConfig;
//! use vaswani::models::{EncoderDecoderConfig, Seq2SeqBatch};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let cfg = EncoderDecoderConfig::new(20, 20, BlockConfig::new(16, 2, 32), 1, 1);
//! let model = cfg.init(&mut rng)?;
//! // BOS = 1, EOS = 2, PAD = 0.
//! let batch = Seq2SeqBatch::from_pairs(&[(vec![5, 6, 7], vec![7, 6, 5]), (vec![8], vec![8])], 1, 2, 0)?;
//! let logits = model.infer(&batch.src, &batch.tgt_in)?;
//! assert_eq!(logits.dim(), (2 * 4, 20)); // [B·T, V]
//! // Decoding lives in `vaswani::infer`: greedy from BOS = 1 to EOS = 2, 5 tokens at most.
//! let decoded = vaswani::infer::greedy(model.begin_decode(&batch.src, 5)?, 1, Some(2), 5)?;
//! assert_eq!(decoded.len(), 2);
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array2, Array3, ArrayView2, s};
use rand::Rng;

use std::borrow::Cow;

use crate::blocks::decoder_layer::PackedDecoderLayer;
use crate::blocks::encoder_layer::PackedEncoderLayer;
use crate::blocks::{
    BlockConfig, Decoder, DecoderCache, DecoderConfig, DecoderState, Encoder, EncoderCache, EncoderConfig,
    FinalNorm, flat,
};
use crate::error::{Error, Result, check};
use crate::kernels::gemm::{exceed_last_level_cache, with_streamed_weights};
use crate::kernels::parallel::{join, product_flops, threads, with_team_for_products};
use crate::kernels::precision::{Precision, with_bf16_if};
use crate::kernels::workspace::{KeptWorkspace, Recycle};
use crate::kernels::{Float, PackedB};
use crate::layers::{Embedding, EmbeddingCache, EmbeddingConfig, Linear, LinearConfig, Mask};
use crate::models::attention_maps::AttentionMaps;
use crate::models::batch::{TokenBatch, check_rows, check_step_tokens};
use crate::models::cost::Cost;
use crate::models::input::{InputCache, InputStage, Positions};
use crate::models::output::{
    OutputCache, check_targets, output_backward, output_forward, output_infer_packed, pack_output, token_loss,
};
use crate::models::trainable::{LossStats, Trainable};

/// Configuration of an [`EncoderDecoder`].
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EncoderDecoderConfig {
    /// Source vocabulary size.
    pub src_vocab: usize,
    /// Target vocabulary size.
    pub tgt_vocab: usize,
    /// The layers' sizes and switches, shared by encoder and decoder.
    pub block: BlockConfig,
    /// Encoder layers N.
    pub n_encoder_layers: usize,
    /// Decoder layers N.
    pub n_decoder_layers: usize,
    /// Whether each stack ends with a LayerNorm.
    pub final_norm: FinalNorm,
    /// How positions are encoded.
    pub positions: Positions,
    /// One embedding for source and target (needs equal vocabularies).
    pub share_embeddings: bool,
    /// The output projection is the target embedding (§3.4).
    pub tie_output: bool,
}

/// The encoder-decoder Transformer. Its gradients have its own type.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderDecoder<F: Float = f32> {
    /// Its configuration.
    pub cfg: EncoderDecoderConfig,
    /// The source embedding (also the target's when shared).
    pub src_embed: Embedding<F>,
    /// The target embedding; `None` when shared with the source.
    pub tgt_embed: Option<Embedding<F>>,
    /// Positions and dropout for the source.
    pub src_input: InputStage<F>,
    /// Positions and dropout for the target.
    pub tgt_input: InputStage<F>,
    /// The encoder stack.
    pub encoder: Encoder<F>,
    /// The decoder stack.
    pub decoder: Decoder<F>,
    /// The output projection; `None` when tied to the target embedding.
    pub head: Option<Linear<F>>,
}
crate::impl_params!(EncoderDecoder {
    src_embed,
    tgt_embed,
    src_input,
    tgt_input,
    encoder,
    decoder,
    head
});

/// What [`EncoderDecoder::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct EncoderDecoderCache<F: Float = f32> {
    src_embed: EmbeddingCache,
    src_input: InputCache<F>,
    encoder: EncoderCache<F>,
    tgt_embed: EmbeddingCache,
    tgt_input: InputCache<F>,
    decoder: DecoderCache<F>,
    output: OutputCache<F>,
}
crate::kernels::workspace::impl_recycle!(EncoderDecoderCache<F: Float> { src_input, encoder, tgt_input, decoder, output });

/// A decode in progress (see [`EncoderDecoder::begin_decode`]): the source's padding mask, the
/// decoder's key/value caches, and the decoder's and output projection's weights packed once
/// for the decode's many small products (`f32` on CPUs with the crate's vector kernels).
///
/// It borrows the model it was begun with, so the model cannot change under the packed
/// weights, and [`EncoderDecoder::decode_step`] refuses a state begun with another model.
#[derive(Clone, Debug)]
pub struct DecodeState<'m, F: Float = f32> {
    src_lengths: Vec<usize>,
    src_mask: Mask,
    decoder: DecoderState<F>,
    b: usize,
    model: &'m EncoderDecoder<F>,
    packed: Option<Cow<'m, PackedDecode<F>>>,
}

/// The weights a decode step multiplies by, packed once per decode (or once for many, by
/// [`EncoderDecoder::packed`]).
#[derive(Clone, Debug)]
struct PackedDecode<F: Float> {
    decoder: Vec<PackedDecoderLayer<F>>,
    output: PackedB,
    /// Whether a step's weights are more than the last-level cache holds: each product of a
    /// step then reads its weight from memory ([`with_streamed_weights`]).
    streamed: bool,
    /// The memory of a decode's key/value caches, kept for the next decode with these
    /// weights (a clone starts without).
    caches: KeptWorkspace,
}

impl<F: Float> Drop for DecodeState<'_, F> {
    /// Gives the caches' memory to the packed weights' keeping, for the next decode.
    fn drop(&mut self) {
        // Weights packed for this decode alone go with it, and so would the memory.
        if let Some(Cow::Borrowed(packed)) = &self.packed {
            let state = self.decoder.take();
            packed.caches.run(|| state.give_back());
        }
    }
}

/// An [`EncoderDecoder`] with its weights packed once for inference (see
/// [`EncoderDecoder::packed`]): the same results as the model's own methods, without the
/// packing of every weight on every call, and with the memory of one call's activations
/// kept for the next (and of a decode's `f32` key/value caches, from the end of one decode
/// begun on it to the beginning of the next: freed then if that one does not take it). It
/// borrows the model, which cannot change meanwhile.
#[derive(Clone, Debug)]
pub struct PackedEncoderDecoder<'m, F: Float = f32> {
    model: &'m EncoderDecoder<F>,
    encoder: Option<Vec<PackedEncoderLayer<F>>>,
    decode: Option<PackedDecode<F>>,
    /// The memory of one call's activations, kept for the next (see
    /// [`crate::kernels::workspace`]).
    workspace: KeptWorkspace,
}

impl<'m, F: Float> DecodeState<'m, F> {
    /// The number of target positions fed so far.
    pub fn len(&self) -> usize {
        self.decoder.len()
    }

    /// Whether no target position has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.decoder.is_empty()
    }

    /// The number of sequences decoded side by side.
    pub fn batch_size(&self) -> usize {
        self.b
    }

    /// The model decoding.
    pub fn model(&self) -> &'m EncoderDecoder<F> {
        self.model
    }

    /// Keeps the sequences `rows`, in that order, with their sources: a row may appear more
    /// than once (beams of one source) or not at all (a sequence that ended). The next step
    /// then takes one token per kept row.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a row that is not below the batch size.
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        check_rows(rows, self.b, "a decode")?;
        self.decoder.select(rows);
        self.src_lengths = rows.iter().map(|&r| self.src_lengths[r]).collect();
        self.src_mask = Mask::key_lengths(&self.src_lengths);
        self.b = rows.len();
        Ok(())
    }
}

/// A decode needs something to translate: no source sequence may be empty.
pub(crate) fn check_sources(src: &TokenBatch) -> Result<()> {
    match src.lengths().iter().position(|&len| len == 0) {
        Some(i) => Err(Error::InvalidInput {
            why: format!("source sequence {i} is empty: there is nothing to decode from"),
        }),
        None => Ok(()),
    }
}

/// A training batch: source, decoder input and decoder target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq2SeqBatch {
    /// The source sequences.
    pub src: TokenBatch,
    /// The decoder input, `[BOS, y₁, …, yₙ]`.
    pub tgt_in: TokenBatch,
    /// The decoder target, `[y₁, …, yₙ, EOS]`: same lengths as `tgt_in`.
    pub tgt_out: TokenBatch,
}

impl Seq2SeqBatch {
    /// A batch from (source, target) pairs: the target is shifted right behind `bos` for the
    /// decoder input and followed by `eos` for the decoder target; rows are padded with `pad`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty list.
    pub fn from_pairs<S: AsRef<[usize]>, T: AsRef<[usize]>>(
        pairs: &[(S, T)],
        bos: usize,
        eos: usize,
        pad: usize,
    ) -> Result<Self> {
        let src: Vec<&[usize]> = pairs.iter().map(|(s, _)| s.as_ref()).collect();
        let tgt_in: Vec<Vec<usize>> = pairs
            .iter()
            .map(|(_, t)| std::iter::once(bos).chain(t.as_ref().iter().copied()).collect())
            .collect();
        let tgt_out: Vec<Vec<usize>> = pairs
            .iter()
            .map(|(_, t)| t.as_ref().iter().copied().chain(std::iter::once(eos)).collect())
            .collect();
        Ok(Seq2SeqBatch {
            src: TokenBatch::from_sequences(&src, pad)?,
            tgt_in: TokenBatch::from_sequences(&tgt_in, pad)?,
            tgt_out: TokenBatch::from_sequences(&tgt_out, pad)?,
        })
    }
}

impl EncoderDecoderConfig {
    /// A model of the given vocabularies and layer counts over `block`, with sinusoidal
    /// positions, separate embeddings and an untied output projection (switch them with
    /// the `with_*` methods).
    pub fn new(
        src_vocab: usize,
        tgt_vocab: usize,
        block: BlockConfig,
        n_encoder_layers: usize,
        n_decoder_layers: usize,
    ) -> Self {
        EncoderDecoderConfig {
            src_vocab,
            tgt_vocab,
            block,
            n_encoder_layers,
            n_decoder_layers,
            final_norm: FinalNorm::Auto,
            positions: Positions::Sinusoidal,
            share_embeddings: false,
            tie_output: false,
        }
    }

    /// The paper's base model (Table 3): N = 6, d_model = 512, d_ff = 2048, h = 8,
    /// P_drop = 0.1, post-norm, one vocabulary shared by source and target with the
    /// embeddings and the output projection tied (§3.4).
    pub fn base(vocab: usize) -> Self {
        EncoderDecoderConfig::new(vocab, vocab, BlockConfig::new(512, 8, 2048), 6, 6)
            .with_share_embeddings(true)
            .with_tie_output(true)
    }

    /// The paper's big model (Table 3): N = 6, d_model = 1024, d_ff = 4096, h = 16,
    /// P_drop = 0.3, shared and tied as [`EncoderDecoderConfig::base`].
    pub fn big(vocab: usize) -> Self {
        EncoderDecoderConfig::new(
            vocab,
            vocab,
            BlockConfig::new(1024, 16, 4096).with_p_drop(0.3),
            6,
            6,
        )
        .with_share_embeddings(true)
        .with_tie_output(true)
    }

    /// The same config with source and target embeddings shared or not.
    pub fn with_share_embeddings(mut self, share: bool) -> Self {
        self.share_embeddings = share;
        self
    }

    /// The same config with the output projection tied to the target embedding or not.
    pub fn with_tie_output(mut self, tie: bool) -> Self {
        self.tie_output = tie;
        self
    }

    /// The same config with another position encoding.
    pub fn with_positions(mut self, positions: Positions) -> Self {
        self.positions = positions;
        self
    }

    /// The same config with another final-norm choice for both stacks.
    pub fn with_final_norm(mut self, final_norm: FinalNorm) -> Self {
        self.final_norm = final_norm;
        self
    }

    /// Checks the config without building anything.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero sizes, heads that do not divide d_model, rates out
    /// of range, or shared embeddings over vocabularies of different sizes.
    pub fn check(&self) -> Result<()> {
        check::positive("src_vocab", self.src_vocab)?;
        check::positive("tgt_vocab", self.tgt_vocab)?;
        check::positive("n_encoder_layers", self.n_encoder_layers)?;
        check::positive("n_decoder_layers", self.n_decoder_layers)?;
        if let Positions::Learned { max_len } = self.positions {
            check::positive("max_len", max_len)?;
        }
        self.block.check()?;
        if self.share_embeddings && self.src_vocab != self.tgt_vocab {
            return Err(Error::config(
                "share_embeddings",
                format!(
                    "needs one vocabulary, got src_vocab = {} and tgt_vocab = {}",
                    self.src_vocab, self.tgt_vocab
                ),
            ));
        }
        Ok(())
    }

    /// Builds the model in `f32`, the type for training and inference;
    /// [`EncoderDecoderConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`EncoderDecoderConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<EncoderDecoder> {
        self.init_as(rng)
    }

    /// Builds the model with PyTorch's initialisation (see each layer).
    ///
    /// # Errors
    /// As [`EncoderDecoderConfig::check`].
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<EncoderDecoder<F>> {
        self.check()?;
        let d = self.block.d_model;
        let src_embed = EmbeddingConfig::new(self.src_vocab, d).init_as(rng)?;
        let tgt_embed = (!self.share_embeddings)
            .then(|| EmbeddingConfig::new(self.tgt_vocab, d).init_as(rng))
            .transpose()?;
        let src_input = InputStage::new(d, self.positions, self.block.p_drop, rng)?;
        let tgt_input = InputStage::new(d, self.positions, self.block.p_drop, rng)?;
        let encoder = self.encoder_config().init_as(rng)?;
        let decoder = self.decoder_config().init_as(rng)?;
        let head = (!self.tie_output)
            .then(|| LinearConfig::new(d, self.tgt_vocab).with_bias(false).init_as(rng))
            .transpose()?;
        Ok(EncoderDecoder {
            cfg: self.clone(),
            src_embed,
            tgt_embed,
            src_input,
            tgt_input,
            encoder,
            decoder,
            head,
        })
    }

    fn encoder_config(&self) -> EncoderConfig {
        EncoderConfig::new(self.block.clone(), self.n_encoder_layers).with_final_norm(self.final_norm)
    }

    fn decoder_config(&self) -> DecoderConfig {
        DecoderConfig::new(self.block.clone(), self.n_decoder_layers).with_final_norm(self.final_norm)
    }

    /// Parameter count and FLOPs for a batch of `batch` pairs of source length `src_len`
    /// and target length `tgt_len`, before anything is built (FLOP model: dense m→n is 2mn
    /// per token, attention 4·Tq·Tk·d per sequence, the output projection counts, a training
    /// step is 3× the forward).
    pub fn cost(&self, batch: usize, src_len: usize, tgt_len: usize) -> Cost {
        // Each part counts itself (in f64: a config read from a file may hold absurd sizes,
        // which must saturate, not wrap).
        let d = self.block.d_model;
        let embeds = EmbeddingConfig::new(self.src_vocab, d).params()
            + if self.share_embeddings {
                0.0
            } else {
                EmbeddingConfig::new(self.tgt_vocab, d).params()
            };
        let output = LinearConfig::new(d, self.tgt_vocab).with_bias(false);
        let head = if self.tie_output { 0.0 } else { output.params() };
        let learned = 2.0 * self.positions.params(d);
        let (encoder, decoder) = (self.encoder_config(), self.decoder_config());
        let params = embeds + head + learned + encoder.params() + decoder.params();
        let forward =
            batch as f64 * (encoder.flops(src_len) + decoder.flops(tgt_len, src_len) + output.flops(tgt_len));
        Cost::from_f64(params, forward)
    }
}

impl<F: Float> EncoderDecoder<F> {
    /// The embedding the target uses (the source's when shared).
    pub fn target_embedding(&self) -> &Embedding<F> {
        self.tgt_embed.as_ref().unwrap_or(&self.src_embed)
    }

    fn check_batches(&self, src: &TokenBatch, tgt: &TokenBatch) -> Result<()> {
        if src.batch_size() != tgt.batch_size() {
            return Err(Error::shape(
                "target batch size (must equal the source's)",
                &[src.batch_size()],
                &[tgt.batch_size()],
            ));
        }
        src.check_vocab(self.cfg.src_vocab)?;
        tgt.check_vocab(self.cfg.tgt_vocab)?;
        for (input, len) in [(&self.src_input, src.seq_len()), (&self.tgt_input, tgt.seq_len())] {
            if let Some(max) = input.max_len().filter(|&max| len > max) {
                return Err(Error::SequenceTooLong { len, max });
            }
        }
        Ok(())
    }

    /// Forward pass in training mode: logits `[B·T, V]` for every target position, and the
    /// cache for [`EncoderDecoder::backward`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the batch sizes differ, [`Error::TokenOutOfRange`] for an
    /// id outside its vocabulary, [`Error::SequenceTooLong`] past a learned position table.
    pub fn forward(
        &self,
        src: &TokenBatch,
        tgt_in: &TokenBatch,
        rng: &mut impl Rng,
    ) -> Result<(Array2<F>, EncoderDecoderCache<F>)> {
        crate::kernels::parallel::with_team(|| {
            self.check_batches(src, tgt_in)?;
            let (b, s, t) = (src.batch_size(), src.seq_len(), tgt_in.seq_len());
            let src_mask = src.padding_mask();
            let (x, src_embed) = src.embed_forward(&self.src_embed)?;
            let (x, src_input) = self.src_input.forward(x, b, s, 0, rng)?;
            let (memory, encoder) = self.encoder.forward(x.view(), &src_mask, rng);
            let (y, tgt_embed) = tgt_in.embed_forward(self.target_embedding())?;
            let (y, tgt_input) = self.tgt_input.forward(y, b, t, 0, rng)?;
            let self_mask = Mask::causal().and(tgt_in.padding_mask());
            let (h, decoder) = self
                .decoder
                .forward(y.view(), memory.view(), &self_mask, &src_mask, rng);
            let h = flat(h);
            let (logits, output) = output_forward(self.head.as_ref(), self.target_embedding(), h.view());
            Ok((
                logits,
                EncoderDecoderCache {
                    src_embed,
                    src_input,
                    encoder,
                    tgt_embed,
                    tgt_input,
                    decoder,
                    output,
                },
            ))
        })
    }

    /// Backward pass from `∂L/∂logits` `[B·T, V]`: adds every parameter's gradient into `g`.
    ///
    /// # Panics
    /// If `grad_logits` does not have the logits' shape.
    pub fn backward(
        &self,
        cache: &EncoderDecoderCache<F>,
        grad_logits: ArrayView2<F>,
        g: &mut EncoderDecoder<F>,
    ) {
        crate::kernels::parallel::with_team(|| {
            let (b, t) = InputStage::dims(&cache.tgt_input);
            let g_embed = g.tgt_embed.as_mut().unwrap_or(&mut g.src_embed);
            let grad_h = output_backward(
                self.head.as_ref(),
                self.target_embedding(),
                &cache.output,
                grad_logits,
                g.head.as_mut(),
                g_embed,
            );
            let grad_h = crate::blocks::unrows(grad_h, b, t);
            let (grad_y, grad_memory) = self
                .decoder
                .backward(&cache.decoder, grad_h.view(), &mut g.decoder);
            let grad_y = self
                .tgt_input
                .backward(&cache.tgt_input, grad_y.view(), &mut g.tgt_input);
            let gt = g.tgt_embed.as_mut().unwrap_or(&mut g.src_embed);
            self.target_embedding()
                .backward(&cache.tgt_embed, grad_y.view(), &mut gt.p);
            let grad_x = self
                .encoder
                .backward(&cache.encoder, grad_memory.view(), &mut g.encoder);
            let grad_x = self
                .src_input
                .backward(&cache.src_input, grad_x.view(), &mut g.src_input);
            self.src_embed
                .backward(&cache.src_embed, grad_x.view(), &mut g.src_embed.p);
        })
    }

    /// The encoder's output ("memory") `[B, S, d_model]`, without dropout.
    ///
    /// # Errors
    /// As [`EncoderDecoder::forward`] for the source.
    pub fn encode(&self, src: &TokenBatch) -> Result<Array3<F>> {
        self.encode_with(src, None)
    }

    /// [`EncoderDecoder::encode`] with the encoder's weights packed, or not (`None`).
    fn encode_with(&self, src: &TokenBatch, packed: Option<&[PackedEncoderLayer<F>]>) -> Result<Array3<F>> {
        crate::kernels::parallel::with_team(|| {
            src.check_vocab(self.cfg.src_vocab)?;
            if let Some(max) = self.src_input.max_len().filter(|&max| src.seq_len() > max) {
                return Err(Error::SequenceTooLong {
                    len: src.seq_len(),
                    max,
                });
            }
            let (b, s) = (src.batch_size(), src.seq_len());
            let x = self.src_input.infer(src.embed(&self.src_embed)?, b, s, 0)?;
            Ok(match packed {
                Some(p) => self.encoder.infer_packed(x.view(), &src.padding_mask(), p),
                None => self.encoder.infer(x.view(), &src.padding_mask()),
            })
        })
    }

    /// Every attention map of a pass without dropout over `src` and the decoder input
    /// `tgt_in`: encoder self-attention, decoder self-attention and cross-attention, layer by
    /// layer. For the maps of a decode, pass `[BOS]` followed by the decoded tokens.
    ///
    /// # Errors
    /// As [`EncoderDecoder::infer`].
    pub fn attention(&self, src: &TokenBatch, tgt_in: &TokenBatch) -> Result<AttentionMaps<F>> {
        crate::kernels::parallel::with_team(|| {
            self.check_batches(src, tgt_in)?;
            let (b, s) = (src.batch_size(), src.seq_len());
            let x = self.src_input.infer(src.embed(&self.src_embed)?, b, s, 0)?;
            let (memory, encoder) = self.encoder.infer_with_weights(x.view(), &src.padding_mask());
            let t = tgt_in.seq_len();
            let y = self
                .tgt_input
                .infer(tgt_in.embed(self.target_embedding())?, b, t, 0)?;
            let self_mask = Mask::causal().and(tgt_in.padding_mask());
            let (_, layers) =
                self.decoder
                    .infer_with_weights(y.view(), memory.view(), &self_mask, &src.padding_mask());
            let (decoder, cross) = layers.into_iter().map(|w| (w.self_attn, w.cross_attn)).unzip();
            Ok(AttentionMaps {
                encoder,
                decoder,
                cross,
            })
        })
    }

    /// Logits `[B·T, V]` of the decoder over a memory from [`EncoderDecoder::encode`], without
    /// dropout.
    ///
    /// # Errors
    /// As [`EncoderDecoder::forward`] for the target, and [`Error::ShapeMismatch`] if the
    /// memory does not fit the batch.
    pub fn decode(&self, memory: &Array3<F>, src: &TokenBatch, tgt_in: &TokenBatch) -> Result<Array2<F>> {
        self.decode_with(memory, src, tgt_in, None)
    }

    /// [`EncoderDecoder::decode`] with the decoder's and output's weights packed (the
    /// decoder's with the memory's projections), or not (`None`).
    fn decode_with(
        &self,
        memory: &Array3<F>,
        src: &TokenBatch,
        tgt_in: &TokenBatch,
        packed: Option<&PackedDecode<F>>,
    ) -> Result<Array2<F>> {
        crate::kernels::parallel::with_team(|| {
            self.check_batches(src, tgt_in)?;
            let (b, t) = (tgt_in.batch_size(), tgt_in.seq_len());
            let expected = [b, src.seq_len(), self.cfg.block.d_model];
            if memory.shape() != expected {
                return Err(Error::shape("memory [B, S, d_model]", &expected, memory.shape()));
            }
            let y = self
                .tgt_input
                .infer(tgt_in.embed(self.target_embedding())?, b, t, 0)?;
            let self_mask = Mask::causal().and(tgt_in.padding_mask());
            let h = flat(match packed {
                Some(p) => self.decoder.infer_packed(
                    y.view(),
                    memory.view(),
                    &self_mask,
                    &src.padding_mask(),
                    &p.decoder,
                ),
                None => self
                    .decoder
                    .infer(y.view(), memory.view(), &self_mask, &src.padding_mask()),
            });
            Ok(self.logits(h.view(), packed))
        })
    }

    /// The output projection of decoder rows `[N, d_model]` → `[N, V]`.
    fn logits(&self, h: ArrayView2<F>, packed: Option<&PackedDecode<F>>) -> Array2<F> {
        output_infer_packed(
            self.head.as_ref(),
            self.target_embedding(),
            packed.map(|p| &p.output),
            h,
        )
    }

    /// The decoder's (with the memory's projections if `memory`) and the output's weights
    /// packed; `None` where nothing packs.
    fn pack_decode(&self, memory: bool) -> Option<PackedDecode<F>> {
        let output = pack_output(self.head.as_ref(), self.target_embedding())?;
        let decoder = self.decoder.pack_with(memory)?;
        let step_bytes = output.bytes() + decoder.iter().map(PackedDecoderLayer::step_bytes).sum::<usize>();
        Some(PackedDecode {
            decoder,
            output,
            streamed: exceed_last_level_cache(step_bytes),
            caches: KeptWorkspace::default(),
        })
    }

    /// The model with its weights packed once for inference: for a model that evaluates or
    /// decodes many batches, [`PackedEncoderDecoder`]'s methods give the model's results
    /// without repacking every weight on every call (packing is a transposed copy of each
    /// weight into the GEMM kernels' layout; `f32` on CPUs with the crate's vector kernels,
    /// and under bf16 precision on any CPU, elsewhere a no-op).
    pub fn packed(&self) -> PackedEncoderDecoder<'_, F> {
        crate::kernels::parallel::with_team(|| PackedEncoderDecoder {
            model: self,
            encoder: self.encoder.pack(),
            decode: self.pack_decode(true),
            workspace: KeptWorkspace::default(),
        })
    }

    /// Runs the inference call `f`, whose largest products have `rows` rows of the model's
    /// width, on the team unless they are too small to pay for a second thread
    /// ([`with_team_for_products`]); in bf16 precision when `bf16` (weights packed in bf16,
    /// [`with_bf16_if`]).
    fn inference<R>(&self, bf16: bool, rows: usize, f: impl FnOnce() -> R) -> R {
        with_bf16_if(bf16, || with_team_for_products(rows, self.cfg.block.d_model, f))
    }

    /// Teacher-forced logits `[B·T, V]` without dropout (evaluation).
    ///
    /// # Errors
    /// As [`EncoderDecoder::forward`].
    pub fn infer(&self, src: &TokenBatch, tgt_in: &TokenBatch) -> Result<Array2<F>> {
        self.inference(false, rows(src, tgt_in), || {
            self.check_batches(src, tgt_in)?;
            let memory = self.encode(src)?;
            self.decode(&memory, src, tgt_in)
        })
    }

    /// The teacher-forced loss of a batch without dropout (evaluation): the mean
    /// cross-entropy over the real target tokens, with label smoothing `smoothing`.
    ///
    /// # Errors
    /// As [`EncoderDecoder::forward`], and for targets shaped unlike the decoder input.
    pub fn loss(&self, batch: &Seq2SeqBatch, smoothing: f64) -> Result<LossStats> {
        crate::kernels::parallel::with_team(|| {
            check_targets(
                &batch.tgt_in,
                &batch.tgt_out,
                self.cfg.tgt_vocab,
                "decoder targets",
            )?;
            let logits = self.infer(&batch.src, &batch.tgt_in)?;
            Ok(LossStats::from(&token_loss(
                logits.view(),
                &batch.tgt_out,
                smoothing,
                1.0,
            )?))
        })
    }

    /// Encodes `src` and starts decoding it step by step with a key/value cache: each
    /// [`EncoderDecoder::decode_step`] then costs one position's work instead of the whole
    /// prefix's. `capacity` is the number of target positions to make room for (the caches
    /// grow past it if needed).
    ///
    /// # Errors
    /// As [`EncoderDecoder::encode`], and [`Error::InvalidInput`] for an empty source sequence.
    pub fn begin_decode(&self, src: &TokenBatch, capacity: usize) -> Result<DecodeState<'_, F>> {
        let packed = crate::kernels::parallel::with_team(|| self.pack_decode(false));
        self.begin_decode_with(src, capacity, None, packed.map(Cow::Owned))
    }

    /// [`EncoderDecoder::begin_decode`] with the given packed weights.
    fn begin_decode_with<'m>(
        &'m self,
        src: &TokenBatch,
        capacity: usize,
        encoder: Option<&[PackedEncoderLayer<F>]>,
        packed: Option<Cow<'m, PackedDecode<F>>>,
    ) -> Result<DecodeState<'m, F>> {
        // The threads are chosen by the rows of a decoding step, not of the source: the
        // cross-attention caches built here are read by every step, and steps that run alone
        // (`with_team_for_products`) read them where their own thread wrote them. Tiny bf16
        // greedy decode on two threads (Intel Xeon with AMX, three runs): 0.88–0.99 ms with the
        // source's 256 rows encoded on both threads, 0.88–0.90 on the steps' one.
        let rows = src.batch_size();
        // Weights packed in bf16 decode in bf16 wherever they are used: their key/value caches
        // too (see `KvCache`).
        let bf16 = is_bf16(packed.as_deref());
        self.inference(bf16, rows, || {
            check_sources(src)?;
            let memory = self.encode_with(src, encoder)?;
            // The caches in the memory of the last decode with these weights, if any.
            let begin = || self.decoder.begin(memory.view(), capacity);
            let decoder = match packed.as_deref() {
                Some(p) => p.caches.run(begin),
                None => begin(),
            };
            Ok(DecodeState {
                src_lengths: src.lengths().to_vec(),
                src_mask: src.padding_mask(),
                decoder,
                b: src.batch_size(),
                model: self,
                packed,
            })
        })
    }

    /// Feeds the next target token of every sequence and returns the logits `[B, V]` for the
    /// position after it: the same numbers as the last row of [`EncoderDecoder::decode`] over
    /// the whole prefix (in bf16, to the rounding of the keys and values its caches hold in
    /// bf16).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a number of tokens other than B,
    /// [`Error::TokenOutOfRange`] for an id outside the target vocabulary,
    /// [`Error::SequenceTooLong`] past a learned position table.
    pub fn decode_step(&self, state: &mut DecodeState<'_, F>, tokens: &[usize]) -> Result<Array2<F>> {
        if tokens.len() != state.b {
            return Err(Error::shape(
                "decode_step tokens (one per sequence)",
                &[state.b],
                &[tokens.len()],
            ));
        }
        let ids = ArrayView2::from_shape((state.b, 1), tokens).expect("one token per sequence");
        self.decode_steps(state, ids)
    }

    /// Feeds the next `T` target tokens of every sequence, `tokens` `[B, T]` (a forced prefix
    /// in one pass), and returns the logits `[B, V]` for the position after the last of them.
    ///
    /// # Errors
    /// As [`EncoderDecoder::decode_step`]; [`Error::InvalidInput`] for `T = 0`.
    pub fn decode_steps(
        &self,
        state: &mut DecodeState<'_, F>,
        tokens: ArrayView2<usize>,
    ) -> Result<Array2<F>> {
        let rows = state.b * tokens.ncols();
        let bf16 = is_bf16(state.packed.as_deref());
        let streamed = state.packed.as_deref().is_some_and(|p| p.streamed);
        self.inference(bf16, rows, || {
            if !std::ptr::eq(state.model, self) {
                return Err(Error::InvalidInput {
                    why: "decode_step: the decode state was begun with another model".into(),
                });
            }
            let (b, t) = tokens.dim();
            let pos = state.len();
            check_step_tokens(tokens, state.b, pos, self.cfg.tgt_vocab, "decode_steps")?;
            if let Some(max) = self.tgt_input.max_len().filter(|&max| pos + t > max) {
                return Err(Error::SequenceTooLong { len: pos + t, max });
            }
            if b == 0 {
                return Ok(Array2::zeros((0, self.cfg.tgt_vocab)));
            }
            let y = self
                .tgt_input
                .infer(self.target_embedding().infer(tokens)?, b, t, pos)?;
            let packed = state.packed.as_deref();
            with_streamed_weights(streamed, || {
                let h = flat(self.decoder.infer_step_packed(
                    y.view(),
                    &mut state.decoder,
                    &state.src_mask,
                    packed.map(|p| p.decoder.as_slice()),
                ));
                // The last position of each sequence.
                let last = h.slice(s![t - 1..;t, ..]);
                Ok(self.logits(last, packed))
            })
        })
    }
}

impl<'m, F: Float> PackedEncoderDecoder<'m, F> {
    /// The model it packs.
    pub fn model(&self) -> &'m EncoderDecoder<F> {
        self.model
    }

    /// [`EncoderDecoder::encode`] with the packed weights.
    ///
    /// # Errors
    /// As [`EncoderDecoder::encode`], and [`Error::InvalidInput`] for an empty source sequence.
    pub fn encode(&self, src: &TokenBatch) -> Result<Array3<F>> {
        self.with_workspace(|| self.model.encode_with(src, self.encoder.as_deref()))
    }

    /// Runs `f` with this handle's workspace, if no other call holds it.
    fn with_workspace<R>(&self, f: impl FnOnce() -> R) -> R {
        self.workspace.run(f)
    }

    /// [`EncoderDecoder::decode`] with the packed weights.
    ///
    /// # Errors
    /// As [`EncoderDecoder::decode`].
    pub fn decode(&self, memory: &Array3<F>, src: &TokenBatch, tgt_in: &TokenBatch) -> Result<Array2<F>> {
        self.with_workspace(|| self.model.decode_with(memory, src, tgt_in, self.decode.as_ref()))
    }

    /// [`EncoderDecoder::infer`] with the packed weights: teacher-forced logits `[B·T, V]`.
    /// On two threads, a batch of small products runs as its two halves, one per thread (the
    /// same bits as on one thread).
    ///
    /// # Errors
    /// As [`EncoderDecoder::infer`].
    pub fn infer(&self, src: &TokenBatch, tgt_in: &TokenBatch) -> Result<Array2<F>> {
        let bf16 = is_bf16(self.decode.as_ref());
        // Where nothing packs (`f64`, a CPU without the vector kernels), the products are the
        // model's own, whose bits depend on their number of rows: never cut in halves.
        let packed = self.encoder.is_some() && self.decode.is_some();
        let width = self.model.cfg.block.d_model;
        self.with_workspace(|| {
            self.model.inference(bf16, rows(src, tgt_in), || {
                self.model.check_batches(src, tgt_in)?;
                by_halves(packed, src, tgt_in, width, |src, tgt_in| {
                    let memory = self.model.encode_with(src, self.encoder.as_deref())?;
                    let logits = self.model.decode_with(&memory, src, tgt_in, self.decode.as_ref());
                    memory.give_back();
                    logits
                })
            })
        })
    }

    /// [`EncoderDecoder::begin_decode`] with the packed weights (continue with
    /// [`EncoderDecoder::decode_step`] on the model).
    ///
    /// # Errors
    /// As [`EncoderDecoder::begin_decode`].
    pub fn begin_decode(&self, src: &TokenBatch, capacity: usize) -> Result<DecodeState<'_, F>> {
        self.model.begin_decode_with(
            src,
            capacity,
            self.encoder.as_deref(),
            self.decode.as_ref().map(Cow::Borrowed),
        )
    }
}

/// Whether `packed` holds bf16 weights.
fn is_bf16<F: Float>(packed: Option<&PackedDecode<F>>) -> bool {
    packed.is_some_and(|p| p.output.precision() == Precision::Bf16)
}

/// A packed model's inference call whose products take `2 · rows · width²` FLOPs below this
/// many runs, on a team of two threads, as two calls over the halves of the batch, one on
/// each thread ([`by_halves`]). Such products take tens of microseconds, and cut between two
/// cores they cost about what the second core gives. Measured on a 2-core AMD EPYC Zen 4
/// (`bench --what eval_forward`, interleaved builds): the tiny workload's eval forward (2²¹
/// FLOPs a product) on two threads 2.11–2.22 ms with its products cut, against 1.76–2.23 on
/// one thread; by halves 0.91–1.25 ms. The small workload's (2²⁷) took 47.3–50.7 ms by halves
/// and 47.9–53.3 cut, base's the same either way: above this size the products stay cut.
const HALVES_BELOW_PRODUCT_FLOPS: u64 = 1 << 24;

/// `f(src, tgt_in)`, or for a `packed` model on a team of exactly two threads with small
/// products (below [`HALVES_BELOW_PRODUCT_FLOPS`]), `f` on the first half of the sequences on
/// one thread and on the second half on the other, the logits stacked.
///
/// For a model whose weights are packed only: each sequence's logits then come from the same
/// arithmetic either way (the packed products compute a row the same way whatever the number
/// of rows; attention, layer norms and softmax work sequence by sequence or row by row), so
/// the bits are the same (tested). The model's own products are not all so: with few rows
/// some take kernels that round differently (`kernels::small_gemm`), so where nothing packed
/// (`f64`, or a CPU without the vector kernels) the halves had given other bits on two
/// threads than on one.
fn by_halves<F: Float>(
    packed: bool,
    src: &TokenBatch,
    tgt_in: &TokenBatch,
    width: usize,
    f: impl Fn(&TokenBatch, &TokenBatch) -> Result<Array2<F>> + Sync,
) -> Result<Array2<F>> {
    let b = src.batch_size();
    if !packed
        || b < 2
        || threads() != 2
        || product_flops(rows(src, tgt_in), width) >= HALVES_BELOW_PRODUCT_FLOPS
    {
        return f(src, tgt_in);
    }
    let half = |x: &TokenBatch, r: std::ops::Range<usize>| {
        TokenBatch::new(
            x.ids().slice(s![r.clone(), ..]).to_owned(),
            x.lengths()[r].to_vec(),
        )
    };
    let (src0, src1) = (half(src, 0..b / 2)?, half(src, b / 2..b)?);
    let (tgt0, tgt1) = (half(tgt_in, 0..b / 2)?, half(tgt_in, b / 2..b)?);
    let (mut first, mut second) = (None, None);
    join(
        || first = Some(f(&src0, &tgt0)),
        || second = Some(f(&src1, &tgt1)),
    );
    let (first, second) = (first.expect("ran")?, second.expect("ran")?);
    Ok(
        ndarray::concatenate(ndarray::Axis(0), &[first.view(), second.view()])
            .expect("the halves' logits have the same width"),
    )
}

/// The rows of an inference call's largest products: every position of the longer of the two
/// batches (see [`with_team_for_products`]).
fn rows(src: &TokenBatch, tgt_in: &TokenBatch) -> usize {
    src.batch_size() * src.seq_len().max(tgt_in.seq_len())
}

impl<F: Float> Trainable for EncoderDecoder<F> {
    type Float = F;
    type Batch = Seq2SeqBatch;

    fn batch_tokens(batch: &Seq2SeqBatch) -> usize {
        batch.tgt_out.tokens()
    }

    fn train_flops(&self, batch: &Seq2SeqBatch) -> u64 {
        let (b, s, t) = (
            batch.src.batch_size(),
            batch.src.seq_len(),
            batch.tgt_in.seq_len(),
        );
        self.cfg.cost(b, s, t).train_flops
    }

    fn accumulate<R: Rng>(
        &self,
        batch: &Seq2SeqBatch,
        smoothing: f64,
        weight: f64,
        grads: &mut Self,
        rng: &mut R,
    ) -> Result<LossStats> {
        check_targets(
            &batch.tgt_in,
            &batch.tgt_out,
            self.cfg.tgt_vocab,
            "decoder targets",
        )?;
        let (logits, cache) = self.forward(&batch.src, &batch.tgt_in, rng)?;
        let ce = token_loss(logits.view(), &batch.tgt_out, smoothing, weight)?;
        self.backward(&cache, ce.grad.view(), grads);
        let stats = LossStats::from(&ce);
        // Back to the caller's workspace, if any, for the next batch.
        (cache, logits, ce.grad).give_back();
        Ok(stats)
    }
}
