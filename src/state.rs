//! What the gateway keeps between snapshots and across restarts, below both the snapshot and
//! the request stages: each key's rate limiter and usage counters, the usage book's
//! persistence, the failed guesses counted per address for lockouts, and the shared
//! limiter's Redis client. The stages only read and spend these; housekeeping flushes and
//! sweeps them.

pub mod credits;
pub mod limiters;
pub mod lockouts;
pub mod shared_limits;
pub mod usage;
