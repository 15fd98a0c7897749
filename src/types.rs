//! Identifiers and small value types shared by every part of Starling.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A vocabulary index. GGUF vocabularies fit in 32 bits.
pub type TokenId = u32;

/// Process-unique id of one generation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl RequestId {
    /// A fresh id, unique within this process.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        RequestId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A client-chosen session name (`"session_id"` on the wire).
    SessionId
);
string_id!(
    /// The id a model is served under (`"model"` on the wire).
    ModelId
);
string_id!(
    /// The tenant an API key belongs to; `anonymous` when auth is off.
    TenantId
);

/// A point on the engine's monotonic clock, in microseconds since the clock's origin.
/// Engine code reads time only through `TickClock`, so tests can inject it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_duration(d: Duration) -> Self {
        Timestamp(d.as_micros() as u64)
    }

    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }

    pub fn after(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.as_micros() as u64))
    }
}

/// Converts wall time into `Timestamp`s relative to a fixed origin.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicOrigin(pub Instant);

impl MonotonicOrigin {
    pub fn now(&self) -> Timestamp {
        Timestamp::from_duration(self.0.elapsed())
    }
}
