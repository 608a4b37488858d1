#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod blocks;
pub mod error;
pub mod gradcheck;
pub mod guide;
pub mod infer;
#[cfg(feature = "serde")]
pub mod io;
pub mod kernels;
pub mod layers;
pub mod models;
pub mod params;
pub mod train;

pub use error::{Error, Result};
pub use kernels::Float;
pub use kernels::precision::Precision;
pub use params::{Params, Tensors};

pub use ndarray;
pub use rand;
