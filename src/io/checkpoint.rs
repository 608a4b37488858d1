//! Checkpoints: a whole model, its config, and optionally the optimizer state and step, in one
//! safetensors file.
//!
//! Layout: every parameter under its dotted name (`encoder.layers.0.self_attn.w_q`), in the
//! model's float type; with training state, the Adam moments under `optimizer.m.<name>` and
//! `optimizer.v.<name>`, or the SGD velocity under `optimizer.velocity.<name>`. The header's metadata holds `format = "vaswani"`,
//! `format_version = "1"`, the model `kind`, the float type, the `config` as JSON, with
//! training state the `step` and the `trainer` settings as JSON, and a `checksum` over all of
//! that and every tensor, so that a corrupted file is an error, never a different model.
//! The same model and training state always give the same bytes (the header's keys are
//! written in sorted order).
//!
//! Saving is atomic (a synced temporary file renamed over the target). Loading validates
//! everything before trusting it: the file structure (see [`super::tensors`]), the format and
//! version, the kind, the config (checked as `init` checks it), the parameter count the config
//! implies against the file's real size *before* the model is allocated, then the exact key
//! set (every missing and unexpected name is reported at once) and every shape and type.
//!
//! # Example
//! ```
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::blocks::BlockConfig;
//! use vaswani::io::{load_model, save_model};
//! use vaswani::models::{EncoderDecoder, EncoderDecoderConfig};
//!
//! let model: EncoderDecoder = EncoderDecoderConfig::new(20, 20, BlockConfig::new(16, 2, 32), 1, 1)
//!     .init(&mut StdRng::seed_from_u64(0))?;
//! let path = std::env::temp_dir().join(format!("vaswani-doc-{}.safetensors", std::process::id()));
//! save_model(&path, &model)?;
//! let loaded: EncoderDecoder = load_model(&path)?;
//! assert_eq!(loaded, model);
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), vaswani::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::path::Path;

use rand::SeedableRng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::tensors::{OwnedTensor, TensorFile, TensorInfo, digest, write_tensor_file};
use crate::error::{Error, Result};
use crate::kernels::Float;
use crate::models::{
    DecoderOnly, DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig, EncoderOnly, EncoderOnlyConfig,
    Trainable,
};
use crate::params::Params;
use crate::train::{Adam, MAX_STEPS, OptimizerConfig, OptimizerState, Sgd, Trainer, TrainerConfig};

/// The value of the `format` metadata key.
pub const FORMAT: &str = "vaswani";
/// The checkpoint format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The metadata key of the checksum.
const CHECKSUM: &str = "checksum";

/// A model that can be saved and loaded: it knows its kind and config, and can be rebuilt
/// from the config. Its float type is [`Trainable::Float`], so loading needs only the model
/// type: `load_model::<EncoderDecoder>(path)` (f32) or `load_model::<EncoderDecoder<f64>>`.
pub trait Checkpointable: Trainable {
    /// The `kind` written in the metadata, e.g. `"encoder_decoder"`.
    const KIND: &'static str;
    /// The model's config, stored as JSON.
    type Config: Serialize + DeserializeOwned + Clone + PartialEq + Debug;
    /// The model's config.
    fn config(&self) -> &Self::Config;
    /// A model of this config (its values are overwritten by the loader).
    ///
    /// # Errors
    /// A config error.
    fn from_config(cfg: &Self::Config) -> Result<Self>;
    /// The number of scalar parameters of a model of this config, without building it
    /// (saturating for absurd configs).
    fn param_count(cfg: &Self::Config) -> u64;
}

impl<F: Float> Checkpointable for EncoderDecoder<F> {
    const KIND: &'static str = "encoder_decoder";
    type Config = EncoderDecoderConfig;
    fn config(&self) -> &EncoderDecoderConfig {
        &self.cfg
    }
    fn from_config(cfg: &EncoderDecoderConfig) -> Result<Self> {
        cfg.init_as(&mut rand::rngs::SmallRng::seed_from_u64(0))
    }
    fn param_count(cfg: &EncoderDecoderConfig) -> u64 {
        cfg.cost(1, 1, 1).params
    }
}

impl<F: Float> Checkpointable for EncoderOnly<F> {
    const KIND: &'static str = "encoder_only";
    type Config = EncoderOnlyConfig;
    fn config(&self) -> &EncoderOnlyConfig {
        &self.cfg
    }
    fn from_config(cfg: &EncoderOnlyConfig) -> Result<Self> {
        cfg.init_as(&mut rand::rngs::SmallRng::seed_from_u64(0))
    }
    fn param_count(cfg: &EncoderOnlyConfig) -> u64 {
        cfg.cost(1, 1).params
    }
}

impl<F: Float> Checkpointable for DecoderOnly<F> {
    const KIND: &'static str = "decoder_only";
    type Config = DecoderOnlyConfig;
    fn config(&self) -> &DecoderOnlyConfig {
        &self.cfg
    }
    fn from_config(cfg: &DecoderOnlyConfig) -> Result<Self> {
        cfg.init_as(&mut rand::rngs::SmallRng::seed_from_u64(0))
    }
    fn param_count(cfg: &DecoderOnlyConfig) -> u64 {
        cfg.cost(1, 1).params
    }
}

/// What a checkpoint holds, read without knowing the model type: for inspection.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    /// The model kind.
    pub kind: String,
    /// The float type of the parameters, `"f32"` or `"f64"`.
    pub dtype: String,
    /// The format version.
    pub version: u32,
    /// The model config, as JSON.
    pub config: String,
    /// The optimizer step, if training state is saved.
    pub step: Option<u64>,
    /// The trainer settings as JSON, if training state is saved.
    pub trainer: Option<String>,
    /// Every tensor, sorted by name.
    pub tensors: Vec<TensorInfo>,
    /// The number of model parameters (optimizer tensors excluded).
    pub params: u64,
}

/// Saves a model (no training state).
///
/// # Errors
/// [`Error::Io`] if the file cannot be written; the previous file at `path` is then intact.
pub fn save_model<M: Checkpointable>(path: impl AsRef<Path>, model: &M) -> Result<()> {
    write(path.as_ref(), model, None)
}

/// Saves a trainer's model, optimizer state, step and settings, so that
/// [`load_trainer`] continues exactly where it stopped.
///
/// # Errors
/// As [`save_model`].
pub fn save_trainer<M: Checkpointable>(path: impl AsRef<Path>, trainer: &Trainer<M>) -> Result<()> {
    write(
        path.as_ref(),
        &trainer.model,
        Some((&trainer.optimizer, &trainer.cfg)),
    )
}

fn write<M: Checkpointable>(
    path: &Path,
    model: &M,
    train: Option<(&OptimizerState<M::Float, M>, &TrainerConfig)>,
) -> Result<()> {
    let json = |v: &dyn erased::Json| {
        v.to_json().map_err(|e| Error::Checkpoint {
            path: path.display().to_string(),
            why: e,
        })
    };
    let mut metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("kind".to_string(), M::KIND.to_string()),
        ("dtype".to_string(), <M::Float as Float>::NAME.to_string()),
        ("config".to_string(), json(model.config())?),
    ]);
    let mut tensors = Vec::new();
    model.visit("", &mut |name, t| {
        tensors.push((name.to_string(), OwnedTensor::float(t)))
    });
    if let Some((optimizer, cfg)) = train {
        metadata.insert("step".into(), optimizer.steps().to_string());
        metadata.insert("trainer".into(), json(cfg)?);
        let mut save = |prefix: &str, state: &M| {
            state.visit(prefix, &mut |name, t| {
                tensors.push((name.to_string(), OwnedTensor::float(t)))
            })
        };
        match optimizer {
            OptimizerState::Adam(adam) => {
                save("optimizer.m", &adam.m);
                save("optimizer.v", &adam.v);
            }
            OptimizerState::Sgd(sgd) => save("optimizer.velocity", &sgd.velocity),
        }
    }
    let checksum = digest(&tensors, &metadata);
    metadata.insert(CHECKSUM.into(), format!("{checksum:016x}"));
    write_tensor_file(path, &tensors, metadata)
}

/// Reads a checkpoint's kind, config and tensor list without building the model.
///
/// # Errors
/// [`Error::Io`] or [`Error::Checkpoint`] for a file that is not a valid checkpoint.
pub fn inspect(path: impl AsRef<Path>) -> Result<CheckpointInfo> {
    let file = TensorFile::read(path)?;
    header(&file)
}

fn header(file: &TensorFile) -> Result<CheckpointInfo> {
    let meta = file.metadata();
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| file.error(format!("not a vaswani checkpoint: no `{key}` in its metadata")))
    };
    if get("format")? != FORMAT {
        return Err(file.error(format!(
            "not a vaswani checkpoint: format is {:?}",
            meta["format"]
        )));
    }
    let version: u32 = get("format_version")?
        .parse()
        .map_err(|_| file.error("format_version is not a number"))?;
    if version != FORMAT_VERSION {
        return Err(file.error(format!(
            "format version {version}, this crate reads version {FORMAT_VERSION}"
        )));
    }
    let stored = get(CHECKSUM)?;
    let actual = format!("{:016x}", file.digest(CHECKSUM));
    if *stored != actual {
        return Err(file.error(format!(
            "checksum mismatch (stored {stored}, computed {actual}): the file is corrupted"
        )));
    }
    let step = match meta.get("step") {
        Some(s) => {
            let step: u64 = s
                .parse()
                .map_err(|_| file.error(format!("step {s:?} is not a number")))?;
            // Bounded before use: the next step must not overflow.
            if step > MAX_STEPS {
                return Err(file.error(format!(
                    "step {step} is past the largest step count, 2^53 = {MAX_STEPS}"
                )));
            }
            Some(step)
        }
        None => None,
    };
    let tensors = file.tensors();
    let params = tensors
        .iter()
        .filter(|t| !t.name.starts_with("optimizer."))
        .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
        .fold(0u64, u64::saturating_add);
    Ok(CheckpointInfo {
        kind: get("kind")?.clone(),
        dtype: get("dtype")?.clone(),
        version,
        config: get("config")?.clone(),
        step,
        trainer: meta.get("trainer").cloned(),
        tensors,
        params,
    })
}

/// Loads a model saved by [`save_model`] or [`save_trainer`] (training state is ignored).
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::Checkpoint`] if it is not a valid
/// checkpoint, is of another kind, holds a config that does not validate or that implies more
/// parameters than the file holds, or whose tensors do not match the config exactly (every
/// missing and unexpected name, wrong shape or type is reported).
pub fn load_model<M: Checkpointable>(path: impl AsRef<Path>) -> Result<M> {
    let file = TensorFile::read(path)?;
    read_model(&file)
}

fn read_model<M: Checkpointable>(file: &TensorFile) -> Result<M> {
    let info = header(file)?;
    if info.kind != M::KIND {
        return Err(wrong_kind(file, &info.kind, M::KIND));
    }
    let cfg: M::Config =
        serde_json::from_str(&info.config).map_err(|e| file.error(format!("config: {e}")))?;
    // Bound the allocation by the file's real size before building anything: every
    // parameter takes at least 2 bytes in the file (F16/BF16).
    let expected = M::param_count(&cfg);
    let room = file.len_bytes() as u64 / 2;
    if expected > room {
        return Err(file.error(format!(
            "the config implies {expected} parameters, more than a file of {} bytes can hold",
            file.len_bytes()
        )));
    }
    let mut model = M::from_config(&cfg).map_err(|e| file.error(format!("config: {e}")))?;
    fill(file, &mut model, "", "optimizer.")?;
    Ok(model)
}

/// Loads a checkpoint's weights into an existing model, after checking that the file's config
/// is the model's: the way to catch "a checkpoint for another model" (other heads, norm
/// placement, activation, sizes) that would otherwise load and compute garbage.
///
/// # Errors
/// As [`load_model`], and [`Error::Checkpoint`] listing every config field that differs.
pub fn load_into<M: Checkpointable>(path: impl AsRef<Path>, model: &mut M) -> Result<()> {
    let file = TensorFile::read(path)?;
    let info = header(&file)?;
    if info.kind != M::KIND {
        return Err(wrong_kind(&file, &info.kind, M::KIND));
    }
    let theirs: serde_json::Value =
        serde_json::from_str(&info.config).map_err(|e| file.error(format!("config: {e}")))?;
    // Through text, as the file's config went, so that an f32 field compares as written.
    let ours = serde_json::to_string(model.config())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s))
        .map_err(|e| file.error(format!("config: {e}")))?;
    let mut differences = Vec::new();
    json_diff("", &ours, &theirs, &mut differences);
    if !differences.is_empty() {
        return Err(file.error(format!(
            "its config differs from the model's: {}",
            differences.join("; ")
        )));
    }
    fill(&file, model, "", "optimizer.")
}

/// "holds an encoder_only model, not an encoder_decoder".
fn wrong_kind(file: &TensorFile, found: &str, wanted: &str) -> Error {
    file.error(format!(
        "holds {} model, not {}",
        with_article(found),
        with_article(wanted)
    ))
}

/// `word` behind "a" or "an" as it is spelled (the kinds and dtypes have no silent letters).
fn with_article(word: &str) -> String {
    let vowel = word.starts_with(|c: char| "aeiouAEIOU".contains(c));
    format!("{} {word}", if vowel { "an" } else { "a" })
}

/// Every path at which two JSON values differ, as `path: model X, file Y`.
fn json_diff(path: &str, ours: &serde_json::Value, theirs: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => json_diff(&p, x, y, out),
                    (x, y) => out.push(format!("{p}: model {}, file {}", show(x), show(y))),
                }
            }
        }
        _ if ours != theirs => out.push(format!("{path}: model {ours}, file {theirs}")),
        _ => {}
    }
}

fn show(v: Option<&serde_json::Value>) -> String {
    v.map_or_else(|| "absent".to_string(), |v| v.to_string())
}

/// Copies the file's tensors into `target` after an exact name, shape and type check: the
/// file's names under `prefix` (`prefix.…`, and not starting with `skip`) must be exactly the
/// target's.
fn fill<F: Float, P: Params<F>>(file: &TensorFile, target: &mut P, prefix: &str, skip: &str) -> Result<()> {
    let under = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}.")
    };
    let wanted: BTreeMap<String, Vec<usize>> = target
        .shapes()
        .into_iter()
        .map(|(n, s)| (crate::params::join(prefix, &n), s))
        .collect();
    let present: BTreeMap<String, TensorInfo> = file
        .tensors()
        .into_iter()
        .filter(|t| t.name.starts_with(&under) && (skip.is_empty() || !t.name.starts_with(skip)))
        .map(|t| (t.name.clone(), t))
        .collect();
    let missing: Vec<&String> = wanted.keys().filter(|n| !present.contains_key(*n)).collect();
    let unexpected: Vec<&String> = present.keys().filter(|n| !wanted.contains_key(*n)).collect();
    let wrong: Vec<String> = wanted
        .iter()
        .filter_map(|(n, s)| {
            present
                .get(n)
                .filter(|t| &t.shape != s)
                .map(|t| format!("{n}: file {:?}, model {s:?}", t.shape))
        })
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() || !wrong.is_empty() {
        let mut why = String::from("the tensors do not match the config:");
        if !missing.is_empty() {
            why += &format!(" missing {missing:?};");
        }
        if !unexpected.is_empty() {
            why += &format!(" unexpected {unexpected:?};");
        }
        if !wrong.is_empty() {
            why += &format!(" wrong shapes {wrong:?};");
        }
        return Err(file.error(why.trim_end_matches(';').to_string()));
    }
    let mut values = Vec::with_capacity(wanted.len());
    for name in wanted.keys() {
        values.push((name.clone(), file.float::<F>(name)?));
    }
    let values: HashMap<String, ndarray::ArrayD<F>> = values.into_iter().collect();
    target.visit_mut(prefix, &mut |name, mut t| t.assign(&values[name]));
    Ok(())
}

/// Loads a trainer saved by [`save_trainer`]: model, optimizer moments, step and settings.
///
/// # Errors
/// As [`load_model`], and [`Error::Checkpoint`] if the file holds no training state.
pub fn load_trainer<M: Checkpointable>(path: impl AsRef<Path>) -> Result<Trainer<M>> {
    let file = TensorFile::read(path)?;
    let model: M = read_model(&file)?;
    let info = header(&file)?;
    let (Some(step), Some(trainer)) = (info.step, info.trainer) else {
        return Err(file.error("holds no training state (saved with save_model, not save_trainer)"));
    };
    let cfg: TrainerConfig =
        serde_json::from_str(&trainer).map_err(|e| file.error(format!("trainer settings: {e}")))?;
    let settings = |e: Error| file.error(format!("trainer settings: {e}"));
    let optimizer = match &cfg.optimizer {
        OptimizerConfig::Adam(adam) => {
            let (mut m, mut v) = (model.zeros_like(), model.zeros_like());
            fill(&file, &mut m, "optimizer.m", "")?;
            fill(&file, &mut v, "optimizer.v", "")?;
            OptimizerState::Adam(Adam::from_state(adam.clone(), m, v, step).map_err(settings)?)
        }
        OptimizerConfig::Sgd { momentum } => {
            let mut velocity = model.zeros_like();
            fill(&file, &mut velocity, "optimizer.velocity", "")?;
            OptimizerState::Sgd(Sgd::from_state(*momentum, velocity, step).map_err(settings)?)
        }
    };
    Trainer::resume(model, optimizer, cfg).map_err(settings)
}

/// Serialising the configs through one function that does not depend on their type.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Result<String, String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String, String> {
            serde_json::to_string(self).map_err(|e| e.to_string())
        }
    }
}
