//! One module per group of commands.

pub mod bench;
pub mod data;
pub mod log;
pub mod serve;
pub mod transfer;
