//! Starling: a CPU-first LLM inference server.
//!
//! The modules form a one-way stack: each imports only modules on lower layers (and,
//! within a layer, never two modules each other). `tests/layout.rs` checks it.
//!
//! 1. Foundation:
//!    - [`types`]: ids and small values every part shares (`RequestId`, `TokenId`, ...).
//!    - [`error`]: the one mapping from classified errors to HTTP status and snake_case `type`.
//!    - [`config`]: raw serde config as written in YAML/JSON, validated into typed limits.
//!    - [`protocol`]: the messages between gateway and engine (commands in, stream events
//!      out) and the sampling parameters both speak.
//!    - [`stale`]: sweeping temporary files a crashed process left behind.
//! 2. [`telemetry`]: metrics, logging, Chrome traces, readiness and liveness from plain
//!    numbers.
//! 3. The parts an engine is made of:
//!    - [`kv`]: the bounded KV block arena, block tables, sessions and eviction.
//!    - [`model`]: GGUF reader, tensor validation, quantized kernels, the forward pass.
//!    - [`tokenizer`]: GGUF vocabularies tokenized as llama.cpp does (SentencePiece by hand,
//!      BPE and WordPiece through Hugging Face `tokenizers`), streaming detokenizer.
//!    - [`sampler`]: sampling steps as pure functions over a logits row; stop strings;
//!      content policies.
//!    - [`grammar`]: JSON schemas, regexes, Lark grammars and choices compiled by
//!      `llguidance` into per-request token constraints.
//!    - [`registry`]: model sources (model directories, http URLs) and the verified
//!      download cache.
//! 4. [`engine`]: the per-model engine thread; its tick `Schedule` is built from a pipeline
//!    file; components, systems (the stages) and the observer of finished requests.
//! 5. [`gateway`]: the hyper HTTP server: the route table, auth, quotas, the generation
//!    service, rendering, and the admin model lifecycle.
//! 6. [`bench`]: `starling bench`: prefill, decode and batched throughput, engine
//!    aggregate, HTTP load, peak RSS.
//!
//! Above them, the `starling` binary (`src/main.rs`, `src/cli/`) parses arguments and runs
//! one command module.

pub mod config;
pub mod error;
pub mod protocol;
pub mod stale;
pub mod types;

pub mod telemetry;

pub mod grammar;
pub mod kv;
pub mod model;
pub mod registry;
pub mod sampler;
pub mod tokenizer;

pub mod engine;

pub mod gateway;

pub mod bench;
