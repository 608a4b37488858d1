//! The encoder-only Transformer: an encoder stack over tokens or feature vectors, pooled to
//! one vector per sequence, then a linear head that classifies or regresses.
//!
//! ```text
//! token ids  → Embedding·√d_model ─┐
//!                                  ├→ + positions → Dropout → Encoder → Pool → Linear → [B, n_out]
//! features   → Linear(d_in → d) ───┘                  (padding masked)   (mean or first)
//! ```
//!
//! It is the left half of Figure 1 with the decoder replaced by a pooling step and a head:
//! the shape of a sentence classifier (BERT's `[CLS]` head) or of a classifier of sensor
//! windows and time series, where each position is a vector of `d_in` measurements rather than
//! a token. Padded positions are blocked as attention keys and left out of the pooling, so a
//! sequence gives the same output alone or padded inside a batch.
//!
//! - [`Pooling::Mean`]: the mean of the encoder outputs over the real (unpadded) positions.
//!   A sequence of length 0 pools to zeros (its output is the head's bias), never NaN.
//! - [`Pooling::First`]: the encoder output at position 0, for a `[CLS]`-style token put
//!   first by the caller. A sequence of length 0 pools to zeros here too.
//! - [`Head::Classify`]: logits over `classes`; the training loss is cross-entropy with the
//!   trainer's label smoothing (§5.4), a mean over the examples.
//! - [`Head::Regress`]: `outputs` real values; the training loss is the mean squared error
//!   over the outputs, averaged over the examples (PyTorch's `F.mse_loss` with the default
//!   mean reduction).
//!
//! Feature inputs have their padded rows zeroed before anything reads them, so NaN or
//! garbage in the padding cannot reach an output or a gradient (not even through `0·NaN`).
//!
//! # Shapes
//! Tokens `[B, T]` or features `[B, T, d_in]`, with one length per sequence → outputs
//! `[B, n_out]`, `n_out` = `classes` or `outputs`. Inside: rows `[B·T, d_model]`, encoder
//! `[B, T, d_model]`, pooled `[B, d_model]`.
//!
//! PyTorch equivalent (features, mean pooling, classification):
//! ```text
//! proj = nn.Linear(d_in, d_model)                  # or nn.Embedding(V, d_model) · √d_model
//! enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, nhead, d_ff, dropout,
//!                             batch_first=True), num_layers)
//! head = nn.Linear(d_model, classes)
//! h = enc(drop(proj(x) + pe[:T]), src_key_padding_mask=pad)          # pad: True = padding
//! keep = (~pad).unsqueeze(-1).float()
//! pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)             # Pooling::First: h[:, 0]
//! logits = head(pooled)
//! loss = F.cross_entropy(logits, labels, label_smoothing=eps)      # or F.mse_loss(out, y)
//! ```
//! Differences: `nn.TransformerEncoder` builds no final LayerNorm unless given one (here
//! [`FinalNorm::Auto`] adds one to a pre-norm stack); a sequence of length 0, whose every
//! key is padding, can give NaN in PyTorch's attention and pools to zeros here.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array2;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::blocks::BlockConfig;
//! use vaswani::models::{EncoderOnlyConfig, FeatureBatch, Head, InputKind, LabeledBatch, Targets};
//! use vaswani::train::{Trainer, TrainerConfig};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! // Windows of 3 sensor channels, classified into 4 activities.
//! let cfg = EncoderOnlyConfig::new(
//!     InputKind::Features { d_in: 3 },
//!     BlockConfig::new(16, 2, 32),
//!     2,
//!     Head::Classify { classes: 4 },
//! );
//! let model = cfg.init(&mut rng)?;
//! // Two windows of 5 and 3 readings, padded to T = 5.
//! let windows = FeatureBatch::from_sequences(&[Array2::from_elem((5, 3), 0.5), Array2::zeros((3, 3))])?;
//! let logits = model.infer(&windows)?;
//! assert_eq!(logits.dim(), (2, 4)); // [B, classes]
//! assert_eq!(model.predict(&windows)?.len(), 2);
//!
//! // One training step, then the loss without dropout or gradients (evaluation).
//! let batch = LabeledBatch::new(windows, Targets::Classes(vec![1, 3]));
//! let mut trainer = Trainer::new(model, TrainerConfig::paper(16, 100))?;
//! let stats = trainer.step(&[batch.clone()], &mut rng)?;
//! assert_eq!(stats.loss.tokens, 2); // counted in examples
//! let eval = trainer.model.loss(&batch, 0.0)?;
//! assert!(eval.loss.is_finite());
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, s};
use rand::Rng;

use crate::blocks::{BlockConfig, Encoder, EncoderCache, EncoderConfig, FinalNorm, flat};
use crate::error::{Error, Result, check};
use crate::kernels::Float;
use crate::kernels::decide;
use crate::kernels::loss::cross_entropy;
use crate::kernels::workspace::Recycle;
use crate::layers::{Embedding, EmbeddingCache, EmbeddingConfig, Linear, LinearCache, LinearConfig, Mask};
use crate::models::attention_maps::AttentionMaps;
use crate::models::batch::{FeatureBatch, TokenBatch};
use crate::models::cost::Cost;
use crate::models::input::{InputCache, InputStage, Positions};
use crate::models::trainable::{LossStats, Trainable};

/// What the model reads at each position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum InputKind {
    /// Token ids below `vocab`, embedded and scaled by √d_model (§3.4).
    Tokens {
        /// Vocabulary size V.
        vocab: usize,
    },
    /// Vectors of `d_in` features (sensor channels, time-series variables), projected to
    /// d_model by a linear layer with bias.
    Features {
        /// Features per position.
        d_in: usize,
    },
}

/// How the encoder outputs of a sequence become one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Pooling {
    /// The mean over the real (unpadded) positions; zeros for a sequence of length 0.
    #[default]
    Mean,
    /// The output at position 0 (a `[CLS]`-style first token); zeros for a sequence of
    /// length 0.
    First,
}

/// What the model predicts from the pooled vector, and its training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Head {
    /// Logits over `classes`; loss: cross-entropy with label smoothing.
    Classify {
        /// Number of classes.
        classes: usize,
    },
    /// `outputs` real values; loss: mean squared error.
    Regress {
        /// Number of outputs.
        outputs: usize,
    },
}

impl Head {
    /// The head's width: `classes` or `outputs`.
    pub fn n_out(self) -> usize {
        match self {
            Head::Classify { classes } => classes,
            Head::Regress { outputs } => outputs,
        }
    }
}

/// Configuration of an [`EncoderOnly`] model.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EncoderOnlyConfig {
    /// Tokens or feature vectors.
    pub input: InputKind,
    /// The layers' sizes and switches.
    pub block: BlockConfig,
    /// Encoder layers N.
    pub n_layers: usize,
    /// Whether the stack ends with a LayerNorm.
    pub final_norm: FinalNorm,
    /// How positions are encoded.
    pub positions: Positions,
    /// How a sequence is pooled to one vector.
    pub pooling: Pooling,
    /// Classification or regression.
    pub head: Head,
}

/// The encoder-only Transformer. Its gradients have its own type. See the
/// [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderOnly<F: Float = f32> {
    /// Its configuration.
    pub cfg: EncoderOnlyConfig,
    /// The token embedding, for [`InputKind::Tokens`].
    pub embed: Option<Embedding<F>>,
    /// The input projection d_in → d_model, for [`InputKind::Features`].
    pub input_proj: Option<Linear<F>>,
    /// Positions and dropout.
    pub input: InputStage<F>,
    /// The encoder stack.
    pub encoder: Encoder<F>,
    /// The head d_model → classes or outputs.
    pub head: Linear<F>,
}
crate::impl_params!(EncoderOnly {
    embed,
    input_proj,
    input,
    encoder,
    head
});

/// A batch as an [`EncoderOnly`] model reads it: token ids or feature vectors.
///
/// The model's entry points ([`EncoderOnly::infer`], [`EncoderOnly::predict`], …) take
/// anything that converts into it: a [`TokenBatch`], a [`FeatureBatch`] or an `EncoderInput`,
/// by value or by reference (a reference is copied, which costs little beside the model).
#[derive(Clone, Debug, PartialEq)]
pub enum EncoderInput<F: Float = f32> {
    /// Token ids `[B, T]`, for [`InputKind::Tokens`].
    Tokens(TokenBatch),
    /// Feature vectors `[B, T, d_in]`, for [`InputKind::Features`].
    Features(FeatureBatch<F>),
}

impl<F: Float> From<TokenBatch> for EncoderInput<F> {
    fn from(batch: TokenBatch) -> Self {
        EncoderInput::Tokens(batch)
    }
}

impl<F: Float> From<FeatureBatch<F>> for EncoderInput<F> {
    fn from(batch: FeatureBatch<F>) -> Self {
        EncoderInput::Features(batch)
    }
}

/// A copy of the batch: lets the model's entry points take `&batch` (of either kind).
impl<F: Float> From<&TokenBatch> for EncoderInput<F> {
    fn from(batch: &TokenBatch) -> Self {
        EncoderInput::Tokens(batch.clone())
    }
}

/// A copy of the batch: lets the model's entry points take `&batch` (of either kind).
impl<F: Float> From<&FeatureBatch<F>> for EncoderInput<F> {
    fn from(batch: &FeatureBatch<F>) -> Self {
        EncoderInput::Features(batch.clone())
    }
}

/// A copy of the input: lets the model's entry points take `&input`.
impl<F: Float> From<&EncoderInput<F>> for EncoderInput<F> {
    fn from(input: &EncoderInput<F>) -> Self {
        input.clone()
    }
}

impl<F: Float> EncoderInput<F> {
    /// B.
    pub fn batch_size(&self) -> usize {
        self.lengths().len()
    }

    /// T, the padded length.
    pub fn seq_len(&self) -> usize {
        match self {
            EncoderInput::Tokens(t) => t.seq_len(),
            EncoderInput::Features(f) => f.x().dim().1,
        }
    }

    /// The real length of each sequence.
    pub fn lengths(&self) -> &[usize] {
        match self {
            EncoderInput::Tokens(t) => t.lengths(),
            EncoderInput::Features(f) => f.lengths(),
        }
    }

    /// The mask that blocks the padded keys.
    pub fn padding_mask(&self) -> Mask {
        Mask::key_lengths(self.lengths())
    }
}

/// What a batch should be predicted as.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets<F: Float = f32> {
    /// One class per example, for [`Head::Classify`].
    Classes(Vec<usize>),
    /// `[B, outputs]` values, for [`Head::Regress`].
    Values(Array2<F>),
}

/// A training batch: inputs and their targets.
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledBatch<F: Float = f32> {
    /// The sequences.
    pub input: EncoderInput<F>,
    /// One target per sequence.
    pub targets: Targets<F>,
}

impl<F: Float> LabeledBatch<F> {
    /// A batch of `input` with `targets`. Nothing is checked until the model reads it.
    pub fn new(input: impl Into<EncoderInput<F>>, targets: Targets<F>) -> Self {
        LabeledBatch {
            input: input.into(),
            targets,
        }
    }
}

/// What [`EncoderOnly::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct EncoderOnlyCache<F: Float = f32> {
    embed: InputProjCache<F>,
    input: InputCache<F>,
    encoder: EncoderCache<F>,
    lengths: Vec<usize>,
    head: LinearCache<F>,
}
crate::kernels::workspace::impl_recycle!(EncoderOnlyCache<F: Float> { embed, input, encoder, head });

#[derive(Clone, Debug)]
enum InputProjCache<F: Float> {
    Tokens(EmbeddingCache),
    Features(LinearCache<F>),
}
impl<F: Float> crate::kernels::workspace::Recycle for InputProjCache<F> {
    fn give_back(self) {
        if let InputProjCache::Features(c) = self {
            c.give_back();
        }
    }
}

impl EncoderOnlyConfig {
    /// A model of `n_layers` layers of `block` over `input`, with sinusoidal positions, mean
    /// pooling and the final LayerNorm chosen by norm placement (switch them with the
    /// `with_*` methods).
    pub fn new(input: InputKind, block: BlockConfig, n_layers: usize, head: Head) -> Self {
        EncoderOnlyConfig {
            input,
            block,
            n_layers,
            final_norm: FinalNorm::Auto,
            positions: Positions::Sinusoidal,
            pooling: Pooling::Mean,
            head,
        }
    }

    /// The same config with another position encoding.
    pub fn with_positions(mut self, positions: Positions) -> Self {
        self.positions = positions;
        self
    }

    /// The same config with another pooling.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// The same config with another final-norm choice.
    pub fn with_final_norm(mut self, final_norm: FinalNorm) -> Self {
        self.final_norm = final_norm;
        self
    }

    /// The same config with another head.
    pub fn with_head(mut self, head: Head) -> Self {
        self.head = head;
        self
    }

    /// Checks the config without building anything.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero size (vocab, d_in, n_layers, max_len, classes,
    /// outputs, or in the block), heads that do not divide d_model, or rates out of range.
    pub fn check(&self) -> Result<()> {
        match self.input {
            InputKind::Tokens { vocab } => check::positive("vocab", vocab)?,
            InputKind::Features { d_in } => check::positive("d_in", d_in)?,
        }
        check::positive("n_layers", self.n_layers)?;
        if let Positions::Learned { max_len } = self.positions {
            check::positive("max_len", max_len)?;
        }
        match self.head {
            Head::Classify { classes } => check::positive("classes", classes)?,
            Head::Regress { outputs } => check::positive("outputs", outputs)?,
        }
        self.block.check()
    }

    /// Builds the model in `f32`, the type for training and inference;
    /// [`EncoderOnlyConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`EncoderOnlyConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<EncoderOnly> {
        self.init_as(rng)
    }

    /// Builds the model with PyTorch's initialisation (see each layer).
    ///
    /// # Errors
    /// As [`EncoderOnlyConfig::check`].
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<EncoderOnly<F>> {
        self.check()?;
        let d = self.block.d_model;
        let (embed, input_proj) = match self.input {
            InputKind::Tokens { vocab } => (Some(EmbeddingConfig::new(vocab, d).init_as(rng)?), None),
            InputKind::Features { d_in } => (None, Some(LinearConfig::new(d_in, d).init_as(rng)?)),
        };
        let input = InputStage::new(d, self.positions, self.block.p_drop, rng)?;
        let encoder = self.encoder_config().init_as(rng)?;
        let head = LinearConfig::new(d, self.head.n_out()).init_as(rng)?;
        Ok(EncoderOnly {
            cfg: self.clone(),
            embed,
            input_proj,
            input,
            encoder,
            head,
        })
    }

    fn encoder_config(&self) -> EncoderConfig {
        EncoderConfig::new(self.block.clone(), self.n_layers).with_final_norm(self.final_norm)
    }

    /// Parameter count and FLOPs for a batch of `batch` sequences of length `len`, before
    /// anything is built, under the FLOP model of [`Cost`]: the input projection of feature
    /// models counts (dense d_in → d_model per position), the token embedding and the pooling
    /// do not, the head counts once per sequence.
    pub fn cost(&self, batch: usize, len: usize) -> Cost {
        // Each part counts itself (in f64: a config read from a file may hold absurd sizes,
        // which must saturate, not wrap).
        let d = self.block.d_model;
        let (input, projection) = match self.input {
            InputKind::Tokens { vocab } => (EmbeddingConfig::new(vocab, d).params(), 0.0),
            InputKind::Features { d_in } => {
                let proj = LinearConfig::new(d_in, d);
                (proj.params(), proj.flops(len))
            }
        };
        let learned = self.positions.params(d);
        let head = LinearConfig::new(d, self.head.n_out());
        let encoder = self.encoder_config();
        let params = input + learned + encoder.params() + head.params();
        // The head reads one pooled vector per sequence.
        let forward = batch as f64 * (projection + encoder.flops(len) + head.flops(1));
        Cost::from_f64(params, forward)
    }
}

impl<F: Float> EncoderOnly<F> {
    /// Checks that `input` fits the model: its kind, ids or feature width, and length.
    fn check_input(&self, input: &EncoderInput<F>) -> Result<()> {
        match (&self.cfg.input, input) {
            (InputKind::Tokens { vocab }, EncoderInput::Tokens(t)) => t.check_vocab(*vocab)?,
            (InputKind::Features { d_in }, EncoderInput::Features(f)) => {
                let (b, t, w) = f.x().dim();
                if w != *d_in {
                    return Err(Error::shape("features [B, T, d_in]", &[b, t, *d_in], &[b, t, w]));
                }
            }
            (InputKind::Tokens { vocab }, EncoderInput::Features(_)) => {
                return Err(Error::InvalidInput {
                    why: format!("feature vectors given to a model over tokens (vocabulary of {vocab})"),
                });
            }
            (InputKind::Features { d_in }, EncoderInput::Tokens(_)) => {
                return Err(Error::InvalidInput {
                    why: format!("token ids given to a model over feature vectors (d_in = {d_in})"),
                });
            }
        }
        let len = input.seq_len();
        if let Some(max) = self.input.max_len().filter(|&max| len > max) {
            return Err(Error::SequenceTooLong { len, max });
        }
        Ok(())
    }

    /// Forward pass in training mode: outputs `[B, n_out]` (logits or values), and the cache
    /// for [`EncoderOnly::backward`].
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for tokens given to a feature model or the reverse,
    /// [`Error::ShapeMismatch`] for features whose width is not d_in,
    /// [`Error::TokenOutOfRange`] for an id outside the vocabulary,
    /// [`Error::SequenceTooLong`] past a learned position table.
    pub fn forward(
        &self,
        input: impl Into<EncoderInput<F>>,
        rng: &mut impl Rng,
    ) -> Result<(Array2<F>, EncoderOnlyCache<F>)> {
        self.forward_input(&input.into(), rng)
    }

    fn forward_input(
        &self,
        input: &EncoderInput<F>,
        rng: &mut impl Rng,
    ) -> Result<(Array2<F>, EncoderOnlyCache<F>)> {
        crate::kernels::parallel::with_team(|| {
            self.check_input(input)?;
            let (b, t) = (input.batch_size(), input.seq_len());
            let (x, embed) = match (input, &self.embed, &self.input_proj) {
                (EncoderInput::Tokens(tokens), Some(embed), _) => {
                    let (x, c) = tokens.embed_forward(embed)?;
                    (x, InputProjCache::Tokens(c))
                }
                (EncoderInput::Features(features), _, Some(proj)) => {
                    let (x, c) = proj.forward(flat(features.clean_features()).view());
                    (x, InputProjCache::Features(c))
                }
                _ => unreachable!("check_input matched the input kind to the model"),
            };
            let (x, input_cache) = self.input.forward(x, b, t, 0, rng)?;
            let (h, encoder) = self.encoder.forward(x.view(), &input.padding_mask(), rng);
            let pooled = pool(h.view(), input.lengths(), self.cfg.pooling);
            let (y, head) = self.head.forward(pooled.view());
            Ok((
                y,
                EncoderOnlyCache {
                    embed,
                    input: input_cache,
                    encoder,
                    lengths: input.lengths().to_vec(),
                    head,
                },
            ))
        })
    }

    /// Backward pass from `∂L/∂outputs` `[B, n_out]`: adds every parameter's gradient into
    /// `g`.
    ///
    /// # Panics
    /// If `grad_out` does not have the outputs' shape, or `g` is not shaped as the model.
    pub fn backward(&self, cache: &EncoderOnlyCache<F>, grad_out: ArrayView2<F>, g: &mut EncoderOnly<F>) {
        crate::kernels::parallel::with_team(|| {
            let (b, t) = InputStage::dims(&cache.input);
            let grad_pooled = self.head.backward(&cache.head, grad_out, &mut g.head.p);
            let grad_h = pool_backward(grad_pooled.view(), &cache.lengths, t, self.cfg.pooling);
            let grad_x = self
                .encoder
                .backward(&cache.encoder, grad_h.view(), &mut g.encoder);
            let grad_x = self.input.backward(&cache.input, grad_x.view(), &mut g.input);
            debug_assert_eq!(grad_x.nrows(), b * t);
            match (
                &cache.embed,
                &self.embed,
                &mut g.embed,
                &self.input_proj,
                &mut g.input_proj,
            ) {
                (InputProjCache::Tokens(c), Some(embed), Some(ge), _, _) => {
                    embed.backward(c, grad_x.view(), &mut ge.p);
                }
                (InputProjCache::Features(c), _, _, Some(proj), Some(gp)) => {
                    // The gradient at the features is not needed.
                    proj.backward(c, grad_x.view(), &mut gp.p);
                }
                _ => panic!("EncoderOnly::backward: the gradient tree does not match the model's input kind"),
            }
        })
    }

    /// The encoder's output `[B, T, d_model]` at every position, without dropout. Rows at
    /// padded positions hold numbers that mean nothing.
    ///
    /// # Errors
    /// As [`EncoderOnly::forward`].
    pub fn encode(&self, input: impl Into<EncoderInput<F>>) -> Result<Array3<F>> {
        self.encode_input(&input.into())
    }

    fn encode_input(&self, input: &EncoderInput<F>) -> Result<Array3<F>> {
        crate::kernels::parallel::with_team(|| {
            let x = self.embedded(input)?;
            Ok(self.encoder.infer(x.view(), &input.padding_mask()))
        })
    }

    /// Every layer's self-attention maps of a pass without dropout over `input`, in
    /// [`AttentionMaps::encoder`].
    ///
    /// # Errors
    /// As [`EncoderOnly::forward`].
    pub fn attention(&self, input: &EncoderInput<F>) -> Result<AttentionMaps<F>> {
        crate::kernels::parallel::with_team(|| {
            let x = self.embedded(input)?;
            let (_, encoder) = self.encoder.infer_with_weights(x.view(), &input.padding_mask());
            Ok(AttentionMaps {
                encoder,
                decoder: Vec::new(),
                cross: Vec::new(),
            })
        })
    }

    /// The checked input, embedded (or projected) with positions, `[B, T, d_model]`.
    fn embedded(&self, input: &EncoderInput<F>) -> Result<Array3<F>> {
        self.check_input(input)?;
        let (b, t) = (input.batch_size(), input.seq_len());
        let x = match (input, &self.embed, &self.input_proj) {
            (EncoderInput::Tokens(tokens), Some(embed), _) => tokens.embed(embed)?,
            (EncoderInput::Features(features), _, Some(proj)) => {
                proj.infer(flat(features.clean_features()).view())
            }
            _ => unreachable!("check_input matched the input kind to the model"),
        };
        self.input.infer(x, b, t, 0)
    }

    /// The pooled vectors `[B, d_model]` (a sequence embedding), without dropout.
    ///
    /// # Errors
    /// As [`EncoderOnly::forward`].
    pub fn pooled(&self, input: impl Into<EncoderInput<F>>) -> Result<Array2<F>> {
        self.pooled_input(&input.into())
    }

    fn pooled_input(&self, input: &EncoderInput<F>) -> Result<Array2<F>> {
        crate::kernels::parallel::with_team(|| {
            let h = self.encode_input(input)?;
            Ok(pool(h.view(), input.lengths(), self.cfg.pooling))
        })
    }

    /// Outputs `[B, n_out]` (logits or values) without dropout (evaluation).
    ///
    /// # Errors
    /// As [`EncoderOnly::forward`].
    pub fn infer(&self, input: impl Into<EncoderInput<F>>) -> Result<Array2<F>> {
        self.infer_input(&input.into())
    }

    fn infer_input(&self, input: &EncoderInput<F>) -> Result<Array2<F>> {
        crate::kernels::parallel::with_team(|| Ok(self.head.infer(self.pooled_input(input)?.view())))
    }

    /// The most likely class of each sequence (the first, on ties).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a regression model, else as [`EncoderOnly::forward`].
    pub fn predict(&self, input: impl Into<EncoderInput<F>>) -> Result<Vec<usize>> {
        crate::kernels::parallel::with_team(|| {
            if let Head::Regress { outputs } = self.cfg.head {
                return Err(Error::InvalidInput {
                    why: format!(
                        "predict needs a classification head; this model regresses {outputs} outputs"
                    ),
                });
            }
            (self.infer(input)?.rows().into_iter().enumerate())
                .map(|(i, row)| decide(row, || format!("the class logits of batch row {i}")))
                .collect()
        })
    }

    /// The loss of a batch without dropout and without gradients (evaluation), as in
    /// training: cross-entropy with label smoothing `smoothing` for a classifier (mean over
    /// the examples, with the accuracy), the mean squared error for a regressor (`smoothing`
    /// unused).
    ///
    /// # Errors
    /// As [`EncoderOnly::forward`], and for targets that do not fit the head (see
    /// [`Trainable::accumulate`]).
    pub fn loss(&self, batch: &LabeledBatch<F>, smoothing: f64) -> Result<LossStats> {
        crate::kernels::parallel::with_team(|| {
            self.check_targets(batch)?;
            let y = self.infer_input(&batch.input)?;
            Ok(self.loss_and_grad(y.view(), &batch.targets, smoothing)?.0)
        })
    }

    /// Checks that the targets fit the head and the batch.
    fn check_targets(&self, batch: &LabeledBatch<F>) -> Result<()> {
        let b = batch.input.batch_size();
        match (&self.cfg.head, &batch.targets) {
            (Head::Classify { classes }, Targets::Classes(labels)) => {
                if labels.len() != b {
                    return Err(Error::shape(
                        "class labels (one per example)",
                        &[b],
                        &[labels.len()],
                    ));
                }
                if let Some((i, &label)) = labels.iter().enumerate().find(|&(_, &y)| y >= *classes) {
                    return Err(Error::InvalidInput {
                        why: format!(
                            "label {label} of example {i} is not below the number of classes, {classes}"
                        ),
                    });
                }
            }
            (Head::Regress { outputs }, Targets::Values(values)) => {
                if values.dim() != (b, *outputs) {
                    return Err(Error::shape(
                        "regression targets [B, outputs]",
                        &[b, *outputs],
                        values.shape(),
                    ));
                }
            }
            (Head::Classify { classes }, Targets::Values(_)) => {
                return Err(Error::InvalidInput {
                    why: format!("regression values given as targets to a classifier of {classes} classes"),
                });
            }
            (Head::Regress { outputs }, Targets::Classes(_)) => {
                return Err(Error::InvalidInput {
                    why: format!("class labels given as targets to a regressor of {outputs} outputs"),
                });
            }
        }
        Ok(())
    }

    /// The loss of outputs `y` against checked targets, and `∂loss/∂y`.
    fn loss_and_grad(
        &self,
        y: ArrayView2<F>,
        targets: &Targets<F>,
        smoothing: f64,
    ) -> Result<(LossStats, Array2<F>)> {
        Ok(match targets {
            Targets::Classes(labels) => {
                let ce = cross_entropy(y, labels, None, smoothing)?;
                let stats = LossStats {
                    loss: ce.loss,
                    tokens: ce.tokens,
                    correct: ce.correct,
                };
                (stats, ce.grad)
            }
            Targets::Values(values) => {
                let (loss, grad) = mean_squared_error(y, values.view());
                let stats = LossStats {
                    loss,
                    tokens: y.nrows(),
                    correct: 0,
                };
                (stats, grad)
            }
        })
    }
}

/// Pools `h` `[B, T, d]` to `[B, d]` over each sequence's real positions.
fn pool<F: Float>(h: ArrayView3<F>, lengths: &[usize], pooling: Pooling) -> Array2<F> {
    let (b, _, d) = h.dim();
    let mut out = Array2::zeros((b, d));
    for ((mut row, seq), &len) in out.rows_mut().into_iter().zip(h.outer_iter()).zip(lengths) {
        if len == 0 {
            continue;
        }
        match pooling {
            Pooling::First => row.assign(&seq.row(0)),
            Pooling::Mean => {
                // Summed in position order, then divided: the same for any thread count.
                for x in seq.slice(s![..len, ..]).rows() {
                    row += &x;
                }
                let n = F::from_f64(len as f64);
                row.mapv_inplace(|v| v / n);
            }
        }
    }
    out
}

/// Backward of [`pool`]: `∂L/∂h` `[B, T, d]` from `∂L/∂pooled` `[B, d]`; zero at padded
/// positions.
fn pool_backward<F: Float>(grad: ArrayView2<F>, lengths: &[usize], t: usize, pooling: Pooling) -> Array3<F> {
    let (b, d) = grad.dim();
    let mut out = Array3::zeros((b, t, d));
    for ((mut seq, g), &len) in out.outer_iter_mut().zip(grad.rows()).zip(lengths) {
        if len == 0 {
            continue;
        }
        match pooling {
            Pooling::First => seq.row_mut(0).assign(&g),
            Pooling::Mean => {
                let n = F::from_f64(len as f64);
                let share = g.mapv(|v| v / n);
                for mut x in seq.slice_mut(s![..len, ..]).rows_mut() {
                    x.assign(&share);
                }
            }
        }
    }
    out
}

/// Mean squared error over the outputs, averaged over the examples, and its gradient:
/// `L = Σ (y − t)² / (B·n)`, `∂L/∂y = 2(y − t) / (B·n)`. Summed in row-major order in `f64`.
fn mean_squared_error<F: Float>(y: ArrayView2<F>, targets: ArrayView2<F>) -> (f64, Array2<F>) {
    let count = y.len().max(1) as f64;
    let mut sum = 0.0;
    let mut grad = Array2::zeros(y.dim());
    for ((g, &yi), &ti) in grad.iter_mut().zip(y.iter()).zip(targets.iter()) {
        let diff = yi.to_f64() - ti.to_f64();
        sum += diff * diff;
        *g = F::from_f64(2.0 * diff / count);
    }
    (sum / count, grad)
}

impl<F: Float> Trainable for EncoderOnly<F> {
    type Float = F;
    type Batch = LabeledBatch<F>;

    /// The number of examples (sequences): the loss is a mean over them.
    fn batch_tokens(batch: &LabeledBatch<F>) -> usize {
        batch.input.batch_size()
    }

    fn train_flops(&self, batch: &LabeledBatch<F>) -> u64 {
        self.cfg
            .cost(batch.input.batch_size(), batch.input.seq_len())
            .train_flops
    }

    fn accumulate<R: Rng>(
        &self,
        batch: &LabeledBatch<F>,
        smoothing: f64,
        weight: f64,
        grads: &mut Self,
        rng: &mut R,
    ) -> Result<LossStats> {
        self.check_targets(batch)?;
        let (y, cache) = self.forward_input(&batch.input, rng)?;
        let (stats, mut grad) = self.loss_and_grad(y.view(), &batch.targets, smoothing)?;
        if weight != 1.0 {
            grad.mapv_inplace(|v| v * F::from_f64(weight));
        }
        self.backward(&cache, grad.view(), grads);
        // Back to the caller's workspace, if any, for the next batch.
        (cache, y, grad).give_back();
        Ok(stats)
    }
}
