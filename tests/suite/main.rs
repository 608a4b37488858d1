//! The integration tests, one module a subject, built as one test binary: each file of
//! `tests/` is a crate of its own, and each would instantiate the library's generic models,
//! layers and kernels again at the test profile's optimisation level (22 such crates took
//! most of a 16-minute `cargo test` build on two cores).

mod common;

mod allocations;
mod api;
mod attention;
mod blocks;
mod checkpoint;
mod copy_task;
mod cost;
mod custom_layer;
mod decoder_only;
mod decoding;
mod docs;
mod empty_batch;
mod encoder_only;
mod examples;
mod hardening;
mod infer;
mod layering;
mod models;
mod padding;
mod precision;
mod pytorch_parity;

/// Every test's allocations go through a counter per thread ([`allocations`]).
#[global_allocator]
static ALLOCATOR: allocations::Counting = allocations::Counting;
