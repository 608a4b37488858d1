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
