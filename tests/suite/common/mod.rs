//! Set-ups shared by the integration tests' modules.
#![allow(dead_code)]

pub mod copy_task;
