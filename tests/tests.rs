//! The one integration-test binary: one `mod` per area (one link step on a 2-core machine).
mod gguf;
mod kernels;
mod tokenizer;
mod config;
mod sampler;
mod model;
