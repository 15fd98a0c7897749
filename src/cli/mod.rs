//! The `starling` commands, one module each; `main.rs` parses the arguments and calls one.

pub mod bench;
pub mod catalog;
pub mod chat;
pub mod common;
pub mod generate;
pub mod inspect;
pub mod models;
pub mod perplexity;
pub mod progress;
pub mod serve;
pub mod tokenize;
