//! The `tandem` binary's library half: configuration loading, client commands, the demo and the
//! benchmarks. `main.rs` is only argument parsing and dispatch.
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod demo;
pub mod readers;
