//! The one integration-test binary: one `mod` per area (one link step on a 2-core machine).
mod config;
mod gateway;
mod gguf;
mod kernels;
mod model;
mod sampler;
mod support;
mod tokenizer;
