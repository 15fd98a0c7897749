//! The engine: one OS thread per loaded model owns a `World` and a `Schedule` built from a
//! pipeline file, and runs one schedule pass per tick.
//!
//! The gateway talks to it only through a bounded command channel (in) and per-request
//! bounded event channels (out), plus the read-only [`resources::EngineStatus`].
//!
//! - [`runner`]: the thread, its loop, and the world and schedule it builds.
//! - [`pipeline`]: pipeline files, the ordered list of stages.
//! - [`components`] and [`systems`]: the ECS data and the stages, one file each.
//! - [`resources`]: what the stages share within a tick; [`scheduler`]: admission and
//!   fairness policy as plain structs.
//! - [`observe`]: stage and tick timing, and the record of each finished request.
//! - [`load`]: a configured model brought up with its engine.
//! - [`speculate`]: the drafts of speculative decoding.

pub mod components;
pub mod load;
pub mod observe;
pub mod pipeline;
pub mod resources;
pub mod runner;
pub mod scheduler;
pub mod speculate;
pub mod systems;

pub use runner::{EngineHandle, EngineParts, build_schedule, build_world};
