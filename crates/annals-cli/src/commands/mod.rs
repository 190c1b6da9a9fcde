//! One module per group of commands.

pub mod bench;
pub mod data;
pub mod serve;
pub mod transfer;
