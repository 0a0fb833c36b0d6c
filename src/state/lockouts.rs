//! Brute-force protection's state: failed key guesses (`malformed_key`, `unknown_key`)
//! counted per client address, outside the snapshot. Past the policy's `max_failures`
//! within `window` ([`LockoutPolicy`]), the address is refused with 429
//! `too_many_failed_attempts` for `cooldown`: the pipeline checks it first, before any
//! credential is read, which closes off guessing keys at line rate. While no address is
//! locked out, the check is one atomic load.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

pub use crate::policy::lockout::LockoutPolicy;
use crate::rejection::Rejection;

#[derive(Debug, Clone, Copy)]
struct Strikes {
    window_start: i64,
    failures: u32,
    locked_until: i64,
}

/// Addresses tracked at most; past it, new addresses are not tracked (and the sweep frees
/// room), so a flood from many addresses cannot grow memory without bound.
const MAX_TRACKED: usize = 100_000;

/// Failure counts and lockouts by client address. Lives outside the snapshot.
#[derive(Debug, Default)]
pub struct Lockouts {
    strikes: DashMap<IpAddr, Strikes>,
    locked: AtomicUsize,
}

impl Lockouts {
    /// Refuses a locked-out address.
    pub fn check(&self, ip: IpAddr, now: i64) -> Result<(), Rejection> {
        if self.locked.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        match self.strikes.get(&ip) {
            Some(s) if s.locked_until > now => Err(Rejection::TooManyFailedAttempts {
                retry_after: s.locked_until.abs_diff(now),
            }),
            _ => Ok(()),
        }
    }

    /// Counts a failed guess; returns true if it locked the address out.
    pub fn failure(&self, ip: IpAddr, now: i64, policy: &LockoutPolicy) -> bool {
        if self.strikes.len() >= MAX_TRACKED && !self.strikes.contains_key(&ip) {
            return false;
        }
        let mut s = self.strikes.entry(ip).or_insert(Strikes {
            window_start: now,
            failures: 0,
            locked_until: 0,
        });
        if s.locked_until > now {
            return false;
        }
        if now.saturating_sub(s.window_start) >= policy.window {
            *s = Strikes {
                window_start: now,
                failures: 0,
                locked_until: 0,
            };
        }
        s.failures = s.failures.saturating_add(1);
        if s.failures >= policy.max_failures {
            s.locked_until = now.saturating_add(policy.cooldown);
            s.failures = 0;
            s.window_start = now;
            self.locked.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Forgets expired lockouts and stale counts (housekeeping).
    pub fn sweep(&self, now: i64, window: i64) {
        self.strikes
            .retain(|_, s| s.locked_until > now || now.saturating_sub(s.window_start) < window);
        let locked = self.strikes.iter().filter(|s| s.locked_until > now).count();
        self.locked.store(locked, Ordering::Relaxed);
    }

    /// Addresses locked out now.
    pub fn locked_count(&self, now: i64) -> usize {
        if self.locked.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.strikes.iter().filter(|s| s.locked_until > now).count()
    }
}

/// Whether a refusal is a failed guess that counts toward a lockout.
pub fn counts_as_guess(rejection: &Rejection) -> bool {
    matches!(rejection, Rejection::MalformedKey | Rejection::UnknownKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: LockoutPolicy = LockoutPolicy {
        max_failures: 3,
        window: 60,
        cooldown: 300,
    };

    #[test]
    fn locks_after_the_threshold_and_expires() {
        let l = Lockouts::default();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let other: IpAddr = "203.0.113.10".parse().unwrap();
        assert!(!l.failure(ip, 1000, &POLICY));
        assert!(!l.failure(ip, 1001, &POLICY));
        assert!(l.failure(ip, 1002, &POLICY), "the third failure locks");
        let Err(Rejection::TooManyFailedAttempts { retry_after }) = l.check(ip, 1010) else {
            panic!("locked")
        };
        assert_eq!(retry_after, 292);
        assert!(
            l.check(other, 1010).is_ok(),
            "other addresses are not affected"
        );
        assert!(l.check(ip, 1302).is_ok(), "the cool-down ends");
        l.sweep(1302, 60);
        assert_eq!(l.locked_count(1302), 0);
    }

    #[test]
    fn failures_spread_over_windows_do_not_lock() {
        let l = Lockouts::default();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        for minute in 0..10 {
            l.failure(ip, minute * 61, &POLICY);
            l.failure(ip, minute * 61 + 1, &POLICY);
        }
        assert!(l.check(ip, 700).is_ok());
    }
}
