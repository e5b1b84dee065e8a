//! The `cryptvm run` and `cryptvm ctl` commands.

pub mod ctl;
pub mod run;
pub mod terminal;
