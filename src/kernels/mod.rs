//! Scalar kernels: the arithmetic every layer is built from.
//!
//! Each kernel has a naive twin (`*_naive`) written for clarity, and the tests hold the two
//! together at odd sizes, with strided and transposed inputs and NaN-filled outputs.

pub mod activations;
pub mod dropout;
pub mod float;
pub mod gemm;
pub mod layer_norm;
pub mod softmax;

pub use activations::Activation;
pub use dropout::dropout_mask;
pub use float::{Float, MaybeSerde};
pub use gemm::{gemm, gemm_batched, gemm_naive};
pub use layer_norm::{
    layer_norm_row, layer_norm_row_backward, layer_norm_row_naive, layer_norm_rows, layer_norm_rows_backward,
};
pub use softmax::{RowMask, softmax_row, softmax_row_backward, softmax_row_naive};
