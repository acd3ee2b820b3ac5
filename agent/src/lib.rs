#![forbid(unsafe_code)]

pub mod cli;
pub mod policy;
pub mod state;
