//! Set-ups shared by the integration tests. A test file that needs one declares `mod common;`
//! and uses its part; the rest is unused there.
#![allow(dead_code)]

pub mod copy_task;
