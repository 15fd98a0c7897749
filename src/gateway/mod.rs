//! The HTTP gateway (hyper 1 on tokio): routes, validation, and streaming.
//!
//! Layout, each file importing only the ones listed before it:
//! - [`router`]: the route table (404/405 and each route's guard derive from it).
//! - `auth`, `quota`, [`template`], `cpu`: API keys and tenants, rate limits, chat templates
//!   (public: `starling chat` renders with them too), the bounded pool CPU-heavy request
//!   work runs on.
//! - `models`, `records`: the served models (a swappable table) and what is known of each.
//! - `state`: [`AppState`], what every handler reads.
//! - `lifecycle`: loading, unloading and reloading models while serving.
//! - `extract`: request bodies in. [`service`]: the generation service (validate →
//!   `EngineCommand` → events → result) behind every generating route and the CLI.
//! - `render`: responses out (JSON, native SSE, OpenAI chunks).
//! - `routes`: native, OpenAI, admin and ops handlers, which never import each other.
//! - `server`: accept loop, authentication, rate limits, dispatch, graceful shutdown.
//!
//! The gateway shares nothing mutable with engines.

mod auth;
mod cpu;
mod extract;
mod lifecycle;
mod models;
mod quota;
mod records;
mod render;
pub mod router;
mod routes;
mod server;
pub mod service;
mod state;
pub mod structured;
pub mod template;
pub mod tools;

pub use auth::{Access, Authenticator, Caller};
pub use lifecycle::{load_configured, mark_configured_loading};
pub use models::{ModelTable, Models};
pub use quota::{Quotas, RateInfo};
pub use records::{LifecycleError, LoadSpec, ModelLimits, ModelRecord, ModelRegistry, ModelState, Reservation};
pub use render::Body;
pub use routes::ops::capture_seconds;
pub use routes::ui::page_bytes as ui_page_bytes;
pub use server::serve;
pub use state::{AppState, Ctx, Live};
