//! The model runtime: GGUF files, quantized kernels, and the llama-family forward pass.

pub mod arch;
pub mod eval;
pub mod ggml_type;
pub mod gguf;
pub mod gguf_writer;
pub mod inspect;
pub mod kernels;
pub mod llama;
pub mod ops;
pub mod runtime;
