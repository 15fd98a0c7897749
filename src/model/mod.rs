//! The model runtime: GGUF files, quantized kernels, and the llama-family forward pass.

pub mod ggml_type;
pub mod gguf;
pub mod kernels;
