//! ECS components: one concern each. Request entities carry the request ones; session
//! entities carry [`SessionName`], [`SessionCache`] and [`LastUsed`].
//!
//! Each doc says which stage writes the component and which stages read it.

mod request;
mod session;

pub use request::*;
pub use session::*;
