//! The one integration-test binary: one `mod` per area (one link step on a 2-core machine).
mod cli;
mod config;
mod engine;
mod families;
mod gateway;
mod gguf;
mod kernels;
mod kv;
mod layout;
mod model;
mod observability;
mod registry;
mod registry_tls;
mod sampler;
mod scheduler;
mod support;
mod tokenizer;
