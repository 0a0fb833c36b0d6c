//! What the gateway keeps between snapshots and across restarts, below both the snapshot and
//! the request stages: each key's rate limiter and usage counters, the usage book's
//! persistence, the failed guesses counted per address for lockouts, the shared limiter's
//! Redis client, and when each admin token was last used. The stages only read and spend
//! these; housekeeping flushes and sweeps them.

pub mod credits;
pub mod history;
pub mod limiters;
pub mod lockouts;
pub mod shared_limits;
pub mod token_use;
pub mod usage;

use std::hash::Hasher;

/// FNV-1a, for ids: short, made by keygate or its operators (never by a client), so a fast
/// hash that an attacker could collide costs nothing here.
#[derive(Debug)]
pub struct IdHasher(u64);

impl Default for IdHasher {
    fn default() -> Self {
        IdHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        // Folded and multiplied, so the map's control bits (the top 7) see every byte.
        (self.0 ^ (self.0 >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}
