//! Route modules: each turns wire shapes into calls of the generation service, the
//! lifecycle or the telemetry, and never imports another route module.

pub mod admin;
pub mod native;
pub mod openai;
pub mod ops;
pub mod ui;
