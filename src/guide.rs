#![doc = include_str!("../docs/guide/README.md")]

#[doc = include_str!("../docs/guide/architecture.md")]
pub mod architecture {}

#[doc = include_str!("../docs/guide/attention.md")]
pub mod attention {}

#[doc = include_str!("../docs/guide/normalisation.md")]
pub mod normalisation {}

#[doc = include_str!("../docs/guide/backward.md")]
pub mod backward {}

#[doc = include_str!("../docs/guide/your-data.md")]
pub mod your_data {}

#[doc = include_str!("../docs/positional-encoding.md")]
///
/// The pictures: `cargo run --release --example positional_encoding` draws the table as a
/// heat map and a few of its dimensions over position, and prints the check that `PE(pos + k)`
/// is the same rotation of `PE(pos)` at every position (largest difference about 1e-14).
pub mod positional_encoding {}

#[doc = include_str!("../docs/performance.md")]
pub mod performance {}
