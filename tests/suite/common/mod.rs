//! Set-ups shared by the integration tests' modules.

pub mod copy_task;
