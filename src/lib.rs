//! Starling: a CPU-first LLM inference server.
//!
//! Layout (each module owns one concern; see `docs/ARCHITECTURE.md`):
//! - [`types`]: ids and small values every part shares (`RequestId`, `SessionId`, `TokenId`, ...).
//! - [`error`]: the one mapping from classified errors to HTTP status and snake_case `type`.
//! - [`config`]: raw serde config as written in YAML/JSON, validated into typed limits.
//! - [`protocol`]: the messages between gateway and engine (commands in, stream events out).
//! - [`engine`]: the per-model engine thread; builds the tick `Schedule` from a pipeline file.
//! - [`components`]: ECS components, one concern each; request and session entities carry them.
//! - [`systems`]: the tick's stages (admit, tokenize, batch, forward, sample, emit, evict).
//! - [`model`]: GGUF reader, tensor validation, quantized kernels, the llama forward pass.
//! - [`tokenizer`]: GGUF vocabularies turned into Hugging Face `tokenizers`, streaming detokenizer.
//! - [`sampler`]: sampling steps as pure functions over a logits row; stop strings; policies.
//! - [`kv`]: the bounded KV block arena, block tables, sessions and eviction.
//! - [`telemetry`]: logging, Chrome traces of ticks, Prometheus metrics.
//! - [`gateway`]: the hyper HTTP server: routes, auth, validation, SSE, admin model lifecycle.
//! - [`registry`]: model sources (model directories, http URLs) and the verified download cache.
//! - [`bench`]: `starling bench`: prefill, decode and batched throughput, engine aggregate, peak RSS.
//! - [`seams`]: the small traits (`Tokenizer`, `Sampler`, `KvCache`, `Scheduler`, `ModelRuntime`)
//!   that let tests drive one part without the others.

pub mod bench;
pub mod components;
pub mod config;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod kv;
pub mod model;
pub mod protocol;
pub mod registry;
pub mod sampler;
pub mod seams;
pub mod stale;
pub mod systems;
pub mod telemetry;
pub mod tokenizer;
pub mod types;
