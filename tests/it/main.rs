//! The integration tests: one binary, one module per area. They use the real model fixtures in
//! `../shared/fixtures` (transformers' own outputs) and the real `pagoda` binary.

mod architectures;
mod batching;
mod bench;
mod cli;
mod common;
mod cuda;
mod fields;
mod gguf;
mod hardening;
mod http;
mod hub;
mod load_errors;
mod metadata;
mod operations;
mod params;
mod prompt_logprobs;
mod reference;
mod routes;
mod secrets;
mod server;
mod structured;
mod sync;
mod tidy;
mod tools;
mod vllm_cli;
