//! The model runtime: GGUF files, architecture descriptions (one file per family in
//! `families/`), quantized kernels, and the one forward pass every family runs.

pub mod arch;
pub mod desc;
pub mod eval;
pub mod families;
pub mod ggml_type;
pub mod gguf;
pub mod gguf_writer;
pub mod inspect;
pub mod kernels;
pub mod ops;
pub mod runtime;
pub mod transformer;
