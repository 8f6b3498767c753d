//! Pagoda: an LLM inference appliance. This crate is the `pagoda` binary's library: the engine,
//! the model code over a backend boundary, and the command line. See ARCHITECTURE.md for the map.

pub mod api;
pub mod backend;
pub mod cli;
pub mod engine;
pub mod kv_cache;
pub mod launch;
pub mod metadata;
pub mod model;
pub mod selftest;
pub mod storage;
pub mod telemetry;
pub mod tokenizer;
pub mod weights;
