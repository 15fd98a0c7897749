//! Components of a session entity: a named, cached conversation prefix.

use bevy_ecs::prelude::*;

use crate::types::{SessionId, TenantId, Timestamp};

/// The session's name and owner. Written by admit when the session is first used.
#[derive(Component, Clone, Debug)]
pub struct SessionName {
    pub tenant: TenantId,
    pub id: SessionId,
}

/// A session's engine-side state. Its tokens and K/V blocks, while no request holds them,
/// are parked in the KV cache under this entity (`KvCache::park_session`); batch takes
/// them back when a request continues the session, evict parks them again.
#[derive(Component, Debug, Default)]
pub struct SessionCache {
    /// A request of this session is running: the session must not be evicted.
    pub in_flight: bool,
}

/// Last time the session was used (LRU and TTL). Written by admit and evict.
#[derive(Component, Clone, Copy, Debug)]
pub struct LastUsed(pub Timestamp);

/// Marks a session whose close was requested. Written by admit; evict frees the session.
#[derive(Component, Debug)]
pub struct CloseRequested;
