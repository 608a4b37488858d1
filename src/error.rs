//! The crate's one error type.
//!
//! Errors are for input that comes from outside the program: configs, token ids, batches,
//! masks and files. A wrong shape passed to a single layer's `forward` or `backward` is a
//! bug in the calling code; those functions `assert!` with both shapes in the message and
//! list it under `# Panics`.

use std::fmt;
use std::sync::Arc;

/// What went wrong, with the values involved.
///
/// Errors compare equal when their variant and fields are equal; two [`Error::Io`] compare
/// their paths and the [`std::io::ErrorKind`] of their sources.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A config field has a value the layer cannot be built with.
    InvalidConfig {
        /// The field, for example `"d_model"`.
        field: &'static str,
        /// Why the value is refused, naming the value.
        why: String,
    },
    /// Two shapes that must agree do not.
    ShapeMismatch {
        /// What was being checked, for example `"source batch"`.
        what: String,
        /// The shape that was expected.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A token id is not below the vocabulary size.
    TokenOutOfRange {
        /// The id.
        id: usize,
        /// Its batch row and position.
        position: (usize, usize),
        /// The vocabulary size.
        vocab: usize,
    },
    /// A sequence is longer than a table or a configured maximum allows.
    SequenceTooLong {
        /// The sequence length.
        len: usize,
        /// The largest length allowed.
        max: usize,
    },
    /// The input holds NaN or an infinity where a finite value is required.
    NonFinite {
        /// Which input.
        what: String,
    },
    /// A file could not be read or written. [`std::error::Error::source`] returns the
    /// operating system's error, whose [`kind`](std::io::Error::kind) says why.
    Io {
        /// The file.
        path: String,
        /// The operating system's error (shared, so that the error stays `Clone`).
        source: Arc<std::io::Error>,
    },
    /// A file is not a valid checkpoint or state_dict, or does not fit the model.
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// Anything else about the input that is not a shape: an empty batch, a mask that does
    /// not fit, inconsistent lengths.
    InvalidInput {
        /// What is wrong.
        why: String,
    },
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A config error for `field`.
    pub fn config(field: &'static str, why: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            why: why.into(),
        }
    }

    /// An I/O error for `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source: Arc::new(source),
        }
    }

    /// A shape error. The two shapes must differ: an error that names the same shape twice
    /// tells the user nothing (a mismatch that is not in the shape is
    /// [`Error::InvalidInput`]).
    pub fn shape(what: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Error::ShapeMismatch {
            what: what.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConfig { field, why } => write!(f, "invalid config: {field}: {why}"),
            Error::ShapeMismatch { what, expected, got } => {
                write!(f, "{what}: expected shape {expected:?}, got {got:?}")
            }
            Error::TokenOutOfRange {
                id,
                position: (b, t),
                vocab,
            } => write!(
                f,
                "token id {id} at batch row {b}, position {t} is out of range for a vocabulary of {vocab}"
            ),
            Error::SequenceTooLong { len, max } => {
                write!(f, "sequence of length {len} is longer than the maximum of {max}")
            }
            Error::NonFinite { what } => write!(f, "{what} holds NaN or an infinity"),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::Checkpoint { path, why } => write!(f, "{path}: {why}"),
            Error::InvalidInput { why } => write!(f, "invalid input: {why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        use Error::*;
        match (self, other) {
            (InvalidConfig { field: a, why: x }, InvalidConfig { field: b, why: y }) => a == b && x == y,
            (
                ShapeMismatch {
                    what: a,
                    expected: x,
                    got: p,
                },
                ShapeMismatch {
                    what: b,
                    expected: y,
                    got: q,
                },
            ) => a == b && x == y && p == q,
            (
                TokenOutOfRange {
                    id: a,
                    position: x,
                    vocab: p,
                },
                TokenOutOfRange {
                    id: b,
                    position: y,
                    vocab: q,
                },
            ) => a == b && x == y && p == q,
            (SequenceTooLong { len: a, max: x }, SequenceTooLong { len: b, max: y }) => a == b && x == y,
            (NonFinite { what: a }, NonFinite { what: b }) => a == b,
            (Io { path: a, source: x }, Io { path: b, source: y }) => a == b && x.kind() == y.kind(),
            (Checkpoint { path: a, why: x }, Checkpoint { path: b, why: y }) => a == b && x == y,
            (InvalidInput { why: a }, InvalidInput { why: b }) => a == b,
            _ => false,
        }
    }
}

/// Config checks shared by every layer's `init`.
pub(crate) mod check {
    use super::{Error, Result};

    /// `value` must be at least 1.
    pub fn positive(field: &'static str, value: usize) -> Result<()> {
        if value == 0 {
            return Err(Error::config(field, "must be at least 1, got 0"));
        }
        Ok(())
    }

    /// A dropout rate must be finite and in [0, 1).
    pub fn dropout(field: &'static str, p: f32) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config(
                field,
                format!("a dropout rate must be in [0, 1), got {p}"),
            ));
        }
        Ok(())
    }

    /// A layer-norm epsilon must be finite and positive.
    pub fn eps(field: &'static str, eps: f32) -> Result<()> {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::config(
                field,
                format!("must be finite and positive, got {eps}"),
            ));
        }
        Ok(())
    }

    /// A parameter tensor of shape `dims` with elements of `elem` bytes must be addressable,
    /// and its memory available now: a vast config (a vocabulary of 10¹²) is an error naming
    /// `field`, not a panic or an abort inside the allocator. The memory is only reserved and
    /// given back, so that the allocation that follows can succeed; a system that promises
    /// every allocation (Linux with `vm.overcommit_memory = 1`) may still fail later.
    pub fn tensor(field: &'static str, dims: &[usize], elem: usize) -> Result<()> {
        let bytes = (dims.iter())
            .try_fold(elem, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= isize::MAX as usize);
        let Some(bytes) = bytes else {
            return Err(Error::config(
                field,
                format!("a parameter tensor of shape {dims:?} is too large to address"),
            ));
        };
        if bytes >= 1 << 30 {
            let mut probe: Vec<u8> = Vec::new();
            if probe.try_reserve_exact(bytes).is_err() {
                return Err(Error::config(
                    field,
                    format!(
                        "a parameter tensor of shape {dims:?} needs {:.1} GiB, more than can be allocated",
                        bytes as f64 / (1u64 << 30) as f64
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `d_model` must split evenly into `n_heads` heads.
    pub fn heads(d_model: usize, n_heads: usize) -> Result<()> {
        positive("d_model", d_model)?;
        positive("n_heads", n_heads)?;
        if !d_model.is_multiple_of(n_heads) {
            return Err(Error::config(
                "n_heads",
                format!(
                    "d_model = {d_model} is not divisible by n_heads = {n_heads} (each head needs d_k = d_model / n_heads)"
                ),
            ));
        }
        Ok(())
    }
}
