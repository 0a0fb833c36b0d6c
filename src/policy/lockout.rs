//! When an address that keeps presenting bad keys is locked out (`lockout` in the config).
//! The counts themselves live in [`crate::state::lockouts`].

/// When to lock an address out, and for how long (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub max_failures: u32,
    pub window: i64,
    pub cooldown: i64,
}
