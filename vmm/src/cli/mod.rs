//! The `cryptvm run` and `cryptvm ctl` commands.

pub mod capped_output;
pub mod ctl;
pub mod run;
pub mod terminal;
