//! Components of a session entity: a named, cached conversation prefix.

use bevy_ecs::prelude::*;

use crate::kv::arena::BlockTable;
use crate::types::{SessionId, TenantId, Timestamp, TokenId};

/// The session's name and owner. Written by admit when the session is first used.
#[derive(Component, Clone, Debug)]
pub struct SessionName {
    pub tenant: TenantId,
    pub id: SessionId,
}

/// The session's cached tokens and their K/V blocks while no request holds them.
/// Taken by batch when a request continues the session, given back by evict.
#[derive(Component, Debug, Default)]
pub struct SessionCache {
    pub tokens: Vec<TokenId>,
    pub table: BlockTable,
    /// A request of this session is running: the session must not be evicted.
    pub in_flight: bool,
}

/// Last time the session was used (LRU and TTL). Written by admit and evict.
#[derive(Component, Clone, Copy, Debug)]
pub struct LastUsed(pub Timestamp);

/// Marks a session whose close was requested. Written by admit; evict frees the session.
#[derive(Component, Debug)]
pub struct CloseRequested;
