//! PyTorch interop: `torch.nn.Transformer` state_dicts, under PyTorch's own key names, into and
//! out of the crate's [`Encoder`] and [`Decoder`] stacks.
//!
//! | PyTorch key (per layer i) | here |
//! |---|---|
//! | `encoder.layers.{i}.self_attn.in_proj_weight` `[3d, d]` | `w_q`, `w_k`, `w_v` stacked by rows |
//! | `….self_attn.in_proj_bias` `[3d]` | `b_q`, `b_k`, `b_v` |
//! | `….self_attn.out_proj.weight` / `.bias` | `w_o` / `b_o` |
//! | `….linear1.weight` / `.bias`, `….linear2.weight` / `.bias` | `ffn.w1` / `b1`, `ffn.w2` / `b2` |
//! | `….norm1.weight` / `.bias` (and `norm2`, decoder `norm3`) | `norm1.gamma` / `beta`, … |
//! | `decoder.layers.{i}.multihead_attn.…` | `cross_attn.…` |
//! | `encoder.norm.…`, `decoder.norm.…` | the stacks' final LayerNorms |
//!
//! A state_dict does not say how many heads the model has, where its norms sit, which
//! activation it uses or its layer-norm ε: the caller gives them in a
//! [`TorchTransformerConfig`]. Loading checks the exact key set and every shape and reports
//! all differences at once, as `load_state_dict(strict=True)` does. Gradients map back to the
//! same names ([`TorchTransformer::state_dict`] of a gradient tree).
//!
//! `examples/pytorch_parity.rs` runs [`parity`] on a file written by
//! `scripts/pytorch_fixtures.py`; `tests/suite/pytorch_parity.rs` holds every committed fixture to
//! PyTorch's outputs and gradients.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{Array3, ArrayD, ArrayViewMutD, Axis, Ix3};
use rand::SeedableRng;

use super::tensors::{OwnedTensor, TensorFile, write_tensor_file};
use crate::blocks::{BlockConfig, Decoder, DecoderConfig, Encoder, EncoderConfig, FinalNorm};
use crate::error::{Error, Result};
use crate::kernels::{Activation, Float};
use crate::layers::{Mask, MultiHeadParams};
use crate::params::Params;

/// What `torch.nn.Transformer` was built with, beyond what its state_dict shows; the field
/// names are PyTorch's constructor arguments.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TorchTransformerConfig {
    /// `d_model`.
    pub d_model: usize,
    /// `nhead`.
    pub nhead: usize,
    /// `num_encoder_layers`.
    pub num_encoder_layers: usize,
    /// `num_decoder_layers`.
    pub num_decoder_layers: usize,
    /// `dim_feedforward`.
    pub dim_feedforward: usize,
    /// `activation`: `"relu"` or `"gelu"` (the exact erf form, as PyTorch's string means).
    #[serde(with = "torch_activation")]
    pub activation: Activation,
    /// `norm_first`.
    pub norm_first: bool,
    /// `layer_norm_eps`.
    pub layer_norm_eps: f32,
}

impl Default for TorchTransformerConfig {
    /// `nn.Transformer()`'s defaults: d_model 512, 8 heads, 6 + 6 layers, feed-forward 2048,
    /// ReLU, post-norm, ε = 1e-5.
    fn default() -> Self {
        TorchTransformerConfig {
            d_model: 512,
            nhead: 8,
            num_encoder_layers: 6,
            num_decoder_layers: 6,
            dim_feedforward: 2048,
            activation: Activation::Relu,
            norm_first: false,
            layer_norm_eps: 1e-5,
        }
    }
}

mod torch_activation {
    use crate::kernels::Activation;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Activation, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match a {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Activation, D::Error> {
        match String::deserialize(d)?.as_str() {
            "relu" => Ok(Activation::Relu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_tanh" => Ok(Activation::GeluTanh),
            other => Err(serde::de::Error::custom(format!(
                "activation {other:?}: expected \"relu\" or \"gelu\""
            ))),
        }
    }
}

impl TorchTransformerConfig {
    /// The block config of the crate's layers: dropout 0 (for inference and parity), PyTorch's
    /// ε and placement.
    pub fn block(&self) -> BlockConfig {
        BlockConfig::new(self.d_model, self.nhead, self.dim_feedforward)
            .with_p_drop(0.0)
            .with_activation(self.activation)
            .with_norm_first(self.norm_first)
            .with_eps(self.layer_norm_eps)
    }
}

/// The encoder and decoder stacks of a `torch.nn.Transformer`, with PyTorch's final norms
/// (`nn.Transformer` always builds `encoder.norm` and `decoder.norm`, post-norm included).
#[derive(Clone, Debug, PartialEq)]
pub struct TorchTransformer<F: Float = f32> {
    /// PyTorch's settings.
    pub cfg: TorchTransformerConfig,
    /// `encoder`.
    pub encoder: Encoder<F>,
    /// `decoder`.
    pub decoder: Decoder<F>,
}
crate::impl_params!(TorchTransformer { encoder, decoder });

impl<F: Float> TorchTransformer<F> {
    /// A freshly initialised model of this config.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad config.
    pub fn new(cfg: &TorchTransformerConfig, rng: &mut impl rand::Rng) -> Result<Self> {
        let block = cfg.block();
        let encoder = EncoderConfig::new(block.clone(), cfg.num_encoder_layers)
            .with_final_norm(FinalNorm::Always)
            .init_as(rng)?;
        let decoder = DecoderConfig::new(block, cfg.num_decoder_layers)
            .with_final_norm(FinalNorm::Always)
            .init_as(rng)?;
        Ok(TorchTransformer {
            cfg: cfg.clone(),
            encoder,
            decoder,
        })
    }

    /// Loads a state_dict saved with `safetensors.torch.save_file(model.state_dict(), path)`.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Checkpoint`] for an unreadable file; [`Error::Checkpoint`]
    /// listing every missing and unexpected key and every wrong shape.
    pub fn load(path: impl AsRef<Path>, cfg: &TorchTransformerConfig) -> Result<Self> {
        Self::from_file(&TensorFile::read(path)?, cfg, &[])
    }

    /// Loads the state_dict held in `file`, ignoring the tensors named in `other` (inputs
    /// stored beside the weights).
    ///
    /// # Errors
    /// As [`TorchTransformer::load`].
    pub fn from_file(file: &TensorFile, cfg: &TorchTransformerConfig, other: &[&str]) -> Result<Self> {
        let mut model = Self::new(cfg, &mut rand::rngs::SmallRng::seed_from_u64(0))
            .map_err(|e| file.error(format!("config: {e}")))?;
        let shapes: BTreeMap<String, Vec<usize>> = model
            .state_dict()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec()))
            .collect();
        let present: BTreeMap<String, Vec<usize>> = file
            .tensors()
            .into_iter()
            .filter(|t| !other.contains(&t.name.as_str()))
            .map(|t| (t.name, t.shape))
            .collect();
        let missing: Vec<&String> = shapes.keys().filter(|k| !present.contains_key(*k)).collect();
        let unexpected: Vec<&String> = present.keys().filter(|k| !shapes.contains_key(*k)).collect();
        let wrong: Vec<String> = shapes
            .iter()
            .filter_map(|(k, s)| {
                present
                    .get(k)
                    .filter(|p| *p != s)
                    .map(|p| format!("size mismatch for {k}: copying a param with shape {p:?} from the file, the shape in the model is {s:?}"))
            })
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() || !wrong.is_empty() {
            return Err(file.error(format!(
                "state_dict does not fit the config: missing keys {missing:?}, unexpected keys {unexpected:?}{}",
                wrong.iter().map(|w| format!("; {w}")).collect::<String>()
            )));
        }
        let mut values = HashMap::new();
        for name in shapes.keys() {
            values.insert(name.clone(), file.float::<F>(name)?);
        }
        for (name, parts) in model.bindings() {
            let full = &values[&name];
            let mut row = 0;
            for mut part in parts {
                let rows = part.shape()[0];
                part.assign(&full.slice_axis(Axis(0), (row..row + rows).into()));
                row += rows;
            }
        }
        Ok(model)
    }

    /// The tensors under PyTorch's names (packed `in_proj` included), in PyTorch's order. Of a
    /// gradient tree, the gradients under the same names.
    pub fn state_dict(&self) -> Vec<(String, ArrayD<F>)> {
        let mut copy = self.clone();
        copy.bindings()
            .into_iter()
            .map(|(name, parts)| {
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                (
                    name,
                    ndarray::concatenate(Axis(0), &views).expect("parts share their trailing shape"),
                )
            })
            .collect()
    }

    /// Writes [`TorchTransformer::state_dict`] as a safetensors file that
    /// `model.load_state_dict(safetensors.torch.load_file(path))` accepts.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, OwnedTensor)> = self
            .state_dict()
            .into_iter()
            .map(|(n, t)| (n, OwnedTensor::float(t.view())))
            .collect();
        write_tensor_file(path, &tensors, BTreeMap::new())
    }

    /// Every PyTorch key with the crate's tensors it is made of, stacked by rows.
    fn bindings(&mut self) -> Vec<(String, Vec<ArrayViewMutD<'_, F>>)> {
        fn mha<'a, F: Float>(
            out: &mut Vec<(String, Vec<ArrayViewMutD<'a, F>>)>,
            prefix: &str,
            p: &'a mut MultiHeadParams<F>,
        ) {
            let d = |a: &'a mut ndarray::Array2<F>| a.view_mut().into_dyn();
            let b = |a: &'a mut Option<ndarray::Array1<F>>| {
                a.as_mut()
                    .expect("nn.Transformer has biases")
                    .view_mut()
                    .into_dyn()
            };
            out.push((
                format!("{prefix}in_proj_weight"),
                vec![d(&mut p.w_q), d(&mut p.w_k), d(&mut p.w_v)],
            ));
            out.push((
                format!("{prefix}in_proj_bias"),
                vec![b(&mut p.b_q), b(&mut p.b_k), b(&mut p.b_v)],
            ));
            out.push((format!("{prefix}out_proj.weight"), vec![d(&mut p.w_o)]));
            out.push((format!("{prefix}out_proj.bias"), vec![b(&mut p.b_o)]));
        }
        fn ffn<'a, F: Float>(
            out: &mut Vec<(String, Vec<ArrayViewMutD<'a, F>>)>,
            prefix: &str,
            p: &'a mut crate::layers::FeedForwardParams<F>,
        ) {
            let b = |a: &'a mut Option<ndarray::Array1<F>>| {
                a.as_mut()
                    .expect("nn.Transformer has biases")
                    .view_mut()
                    .into_dyn()
            };
            out.push((
                format!("{prefix}linear1.weight"),
                vec![p.w1.view_mut().into_dyn()],
            ));
            out.push((format!("{prefix}linear1.bias"), vec![b(&mut p.b1)]));
            out.push((
                format!("{prefix}linear2.weight"),
                vec![p.w2.view_mut().into_dyn()],
            ));
            out.push((format!("{prefix}linear2.bias"), vec![b(&mut p.b2)]));
        }
        fn norm<'a, F: Float>(
            out: &mut Vec<(String, Vec<ArrayViewMutD<'a, F>>)>,
            name: &str,
            p: &'a mut crate::layers::LayerNormParams<F>,
        ) {
            out.push((format!("{name}.weight"), vec![p.gamma.view_mut().into_dyn()]));
            out.push((format!("{name}.bias"), vec![p.beta.view_mut().into_dyn()]));
        }
        let mut out = Vec::new();
        for (i, l) in self.encoder.layers.iter_mut().enumerate() {
            let p = format!("encoder.layers.{i}.");
            mha(&mut out, &format!("{p}self_attn."), &mut l.self_attn.p);
            ffn(&mut out, &p, &mut l.ffn.p);
            norm(&mut out, &format!("{p}norm1"), &mut l.norm1.norm.p);
            norm(&mut out, &format!("{p}norm2"), &mut l.norm2.norm.p);
        }
        if let Some(n) = &mut self.encoder.norm {
            norm(&mut out, "encoder.norm", &mut n.p);
        }
        for (i, l) in self.decoder.layers.iter_mut().enumerate() {
            let p = format!("decoder.layers.{i}.");
            mha(&mut out, &format!("{p}self_attn."), &mut l.self_attn.p);
            mha(&mut out, &format!("{p}multihead_attn."), &mut l.cross_attn.p);
            ffn(&mut out, &p, &mut l.ffn.p);
            norm(&mut out, &format!("{p}norm1"), &mut l.norm1.norm.p);
            norm(&mut out, &format!("{p}norm2"), &mut l.norm2.norm.p);
            norm(&mut out, &format!("{p}norm3"), &mut l.norm3.norm.p);
        }
        if let Some(n) = &mut self.decoder.norm {
            norm(&mut out, "decoder.norm", &mut n.p);
        }
        out
    }
}

/// The `config` of a parity input: the model's settings and whether the target
/// self-attention is causal.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParityConfig {
    /// The `nn.Transformer` settings.
    #[serde(flatten)]
    pub model: TorchTransformerConfig,
    /// `true`: the target self-attention gets `generate_square_subsequent_mask(T)`.
    pub causal: bool,
}

const PARITY_INPUTS: [&str; 5] = [
    "src",
    "tgt",
    "grad_output",
    "src_key_padding_mask",
    "tgt_key_padding_mask",
];

/// The contract of `examples/pytorch_parity.rs`: reads IN (a `nn.Transformer(batch_first=True,
/// dropout=0.0)` state_dict, `src` `[B, S, d]`, `tgt` `[B, T, d]`, `grad_output` `[B, T, d]`,
/// optional `src_key_padding_mask` `[B, S]` and `tgt_key_padding_mask` `[B, T]` as U8 with
/// 1 = padded (the source mask is also the memory mask), and metadata `config` (a
/// [`ParityConfig`] as JSON)), and writes OUT: `output` `[B, T, d]`; for
/// `L = Σ output ⊙ grad_output`, `grad.src`, `grad.tgt` and `grad.<name>` for every
/// state_dict name; and `weights.<name>`, the crate's own export of the weights it loaded.
///
/// # Errors
/// [`Error::Io`] / [`Error::Checkpoint`] for unreadable or malformed files, a missing
/// `config`, inputs of the wrong rank or shape, or a state_dict that does not fit the config.
pub fn parity(input: impl AsRef<Path>, output: impl AsRef<Path>) -> Result<()> {
    let file = TensorFile::read(input)?;
    let cfg_json = file
        .metadata()
        .get("config")
        .ok_or_else(|| file.error("no `config` in the metadata"))?;
    let cfg: ParityConfig = serde_json::from_str(cfg_json).map_err(|e| file.error(format!("config: {e}")))?;
    let model = TorchTransformer::<f32>::from_file(&file, &cfg.model, &PARITY_INPUTS)?;
    let d = cfg.model.d_model;
    let rank3 = |name: &str| -> Result<Array3<f32>> {
        let t = file.float::<f32>(name)?;
        let shape = t.shape().to_vec();
        let t = t
            .into_dimensionality::<Ix3>()
            .map_err(|_| file.error(format!("{name} must be [B, length, d_model], got {shape:?}")))?;
        if t.dim().2 != d {
            return Err(Error::shape(
                format!("{name} [B, length, d_model]"),
                &[t.dim().0, t.dim().1, d],
                t.shape(),
            ));
        }
        Ok(t)
    };
    let (src, tgt, grad_output) = (rank3("src")?, rank3("tgt")?, rank3("grad_output")?);
    let (b, s, t) = (src.dim().0, src.dim().1, tgt.dim().1);
    if tgt.dim().0 != b {
        return Err(Error::shape("tgt (batch as src)", &[b, t, d], tgt.shape()));
    }
    if grad_output.dim() != tgt.dim() {
        return Err(Error::shape(
            "grad_output (shaped as tgt)",
            tgt.shape(),
            grad_output.shape(),
        ));
    }
    let padding = |name: &str, len: usize| -> Result<Mask> {
        if !file.contains(name) {
            return Ok(Mask::none());
        }
        let m = file.bytes_tensor(name)?;
        if m.shape() != [b, len] {
            return Err(Error::shape(name, &[b, len], m.shape()));
        }
        let flags = m
            .into_dimensionality::<ndarray::Ix2>()
            .expect("checked rank")
            .mapv(|v| v != 0);
        Ok(Mask::key_padding(flags.view()))
    };
    let src_mask = padding("src_key_padding_mask", s)?;
    let mut tgt_mask = padding("tgt_key_padding_mask", t)?;
    if cfg.causal {
        tgt_mask = tgt_mask.and(Mask::causal());
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0); // dropout is 0: unused
    let (memory, enc_cache) = model.encoder.forward(src.view(), &src_mask, &mut rng);
    let (out, dec_cache) = model
        .decoder
        .forward(tgt.view(), memory.view(), &tgt_mask, &src_mask, &mut rng);
    let mut grads = model.zeros_like();
    let (grad_tgt, grad_memory) = model
        .decoder
        .backward(&dec_cache, grad_output.view(), &mut grads.decoder);
    let grad_src = model
        .encoder
        .backward(&enc_cache, grad_memory.view(), &mut grads.encoder);
    let mut tensors = vec![
        ("output".to_string(), OwnedTensor::float(out.view().into_dyn())),
        (
            "grad.src".to_string(),
            OwnedTensor::float(grad_src.view().into_dyn()),
        ),
        (
            "grad.tgt".to_string(),
            OwnedTensor::float(grad_tgt.view().into_dyn()),
        ),
    ];
    for (name, g) in grads.state_dict() {
        tensors.push((format!("grad.{name}"), OwnedTensor::float(g.view())));
    }
    for (name, w) in model.state_dict() {
        tensors.push((format!("weights.{name}"), OwnedTensor::float(w.view())));
    }
    let metadata = BTreeMap::from([("config".to_string(), cfg_json.clone())]);
    write_tensor_file(output, &tensors, metadata)
}
