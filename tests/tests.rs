//! The one integration-test binary: one `mod` per area (one link step on a 2-core machine).
mod config;
mod gguf;
mod kernels;
mod model;
mod observability;
mod sampler;
mod tokenizer;
