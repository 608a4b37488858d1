//! The precision of the matrix products: `f32` (the default) or bf16 mixed precision.
//!
//! In bf16 mixed precision the operands of the large matrix products (the linear layers,
//! the output projection, their backward products) are rounded to bf16 (round to nearest,
//! ties to even; denormals, below 2⁻¹²⁶, to zero, as the hardware's conversion and products
//! treat them) and their products accumulated in `f32`; everything else stays `f32`:
//! the parameters and the optimizer's moments, layer norm, softmax and the attention core,
//! the loss, every reduction. This is what `torch.autocast("cpu", dtype=torch.bfloat16)`
//! does to `nn.Linear`. A decode begun in bf16 (or with weights packed in bf16) also holds
//! its key/value caches in bf16 ([`crate::layers::KvCache`]); attention over them still
//! computes in `f32`.
//!
//! The choice is made for a stretch of work with [`with_precision`] (the trainer does it for
//! its steps when [`crate::train::TrainerConfig::precision`] asks for bf16), and holds on
//! every thread the crate's loops run on inside it. Outside it, products are `f32`. Models of
//! `f64` are not affected: bf16 applies to `f32` products only.
//!
//! Which kernel multiplies in bf16 is chosen at run time ([`Bf16Path::best`]): Intel's AMX
//! tiles, else AVX512-BF16's `vdpbf16ps`, else `f32` kernels over the rounded values. The
//! choice changes only the order in which products are summed, never which values are
//! multiplied; [`bf16_path`] says which one runs.
//!
//! # Examples
//! ```
//! use vaswani::kernels::precision::{Precision, precision, with_precision};
//! assert_eq!(precision(), Precision::F32);
//! with_precision(Precision::Bf16, || assert_eq!(precision(), Precision::Bf16));
//! println!("bf16 products run on {:?}", vaswani::kernels::precision::bf16_path());
//! ```
//!
//! Training in bf16 is a setting of the trainer:
//! ```
//! use vaswani::Precision;
//! use vaswani::train::TrainerConfig;
//! let cfg = TrainerConfig::paper(512, 4000).with_precision(Precision::Bf16);
//! assert_eq!(cfg.precision, Precision::Bf16);
//! ```
//!
//! Each product converts the weight it multiplies as it packs it, so a training step converts
//! every weight once in each of the two layouts its products read (`X·Wᵀ` forward, `∂Y·W`
//! backward). A step of several micro-batches (gradient accumulation) converts them once, at
//! its start, for all of them, and holds the converted weights for the step: 4 bytes a weight.
//!
//! Inference in bf16: pack the model inside [`with_precision`], and its weights are
//! converted to bf16 once, there; every product with them then runs in bf16, wherever the
//! packed model is used. A model whose weights were stored in bf16 (a PyTorch state_dict or
//! a checkpoint with `BF16` tensors) loads exactly into `f32` and packs back to the same
//! bf16 values (denormals excepted: they become zeros, as the hardware reads them anyway).
//! ```
//! use vaswani::Precision;
//! use vaswani::blocks::BlockConfig;
//! use vaswani::kernels::precision::with_precision;
//! use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, TokenBatch};
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//!
//! # fn main() -> vaswani::Result<()> {
//! let model: EncoderDecoder = EncoderDecoderConfig::new(20, 20, BlockConfig::new(32, 4, 64), 1, 1)
//!     .init(&mut StdRng::seed_from_u64(0))?;
//! let packed = with_precision(Precision::Bf16, || model.packed());
//! let src = TokenBatch::from_sequences(&[vec![3, 4, 5], vec![6, 7]], 0)?;
//! let tokens = vaswani::infer::greedy(packed.begin_decode(&src, 8)?, 1, Some(2), 8)?;
//! assert_eq!(tokens.len(), 2);
//! # Ok(())
//! # }
//! ```

use std::cell::Cell;

pub use super::gemm::bf16::{Bf16Path, bf16_to_f32, round_bf16, to_bf16};

/// The precision of the matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Precision {
    /// Everything in `f32`.
    #[default]
    F32,
    /// Matrix products with bf16 operands and `f32` accumulation; everything else `f32`.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;

    /// `fp32` or `f32`, `bf16`.
    fn from_str(s: &str) -> crate::Result<Precision> {
        match s {
            "fp32" | "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(crate::Error::InvalidInput {
                why: format!("precision {s:?}: expected fp32 or bf16"),
            }),
        }
    }
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with the matrix products in precision `p` (on this thread, and on every thread
/// the crate's parallel loops started inside `f` run on), then restores the previous one,
/// also if `f` panics.
pub fn with_precision<R>(p: Precision, f: impl FnOnce() -> R) -> R {
    super::with_cell(&CURRENT, p, f)
}

/// Runs `f` in bf16 precision when `bf16`, else in the caller's: a call on weights packed in
/// bf16 runs as they were packed (its products, its caches and its choice of threads),
/// wherever it is called.
pub(crate) fn with_bf16_if<R>(bf16: bool, f: impl FnOnce() -> R) -> R {
    if bf16 {
        with_precision(Precision::Bf16, f)
    } else {
        f()
    }
}

/// The precision of the matrix products on this thread now.
pub fn precision() -> Precision {
    CURRENT.get()
}

/// The kernel that bf16 products run on in this process: see [`Bf16Path::best`].
pub fn bf16_path() -> Bf16Path {
    Bf16Path::best()
}
