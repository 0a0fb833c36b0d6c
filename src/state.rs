//! What the gateway keeps between snapshots and across restarts, below both the snapshot and
//! the request stages: each key's rate limiter and usage counters, and the usage book's
//! persistence. The stages only read and spend these; housekeeping flushes them.

pub mod limiters;
pub mod usage;
