//! Engine ⇄ gateway messages.
