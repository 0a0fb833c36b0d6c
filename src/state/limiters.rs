//! Each key's rate limiter, a GCRA from governor, and the registry that keeps them between
//! snapshots: keyed by key id and outside any snapshot, a reload hands each new snapshot the
//! same limiter for an unchanged policy, so buckets survive reloads (and regeneration, which
//! keeps the id). The request stage that spends them is [`crate::pipeline::rate_limit`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::clock::Clock;
use crate::policy::rate::RatePolicy;

pub(crate) type Gcra = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// One key's limiter.
#[derive(Debug)]
pub struct KeyLimiter {
    pub(crate) policy: RatePolicy,
    pub(crate) gcra: Gcra,
}

impl KeyLimiter {
    pub(crate) fn new(policy: RatePolicy, clock: &Clock) -> Self {
        let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
        // `interval` is never zero, so the fallback is never taken; it keeps this total.
        let quota = Quota::with_period(policy.interval())
            .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
            .allow_burst(burst);
        KeyLimiter {
            policy,
            gcra: RateLimiter::direct_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
        }
    }

    pub fn policy(&self) -> RatePolicy {
        self.policy
    }
}

/// Every key's limiter, by key id.
/// Every key's limiter that has been used, by key id, outside any snapshot. A limiter is made
/// on its key's first request, not at load; a snapshot's entry asks for it here, so a new
/// snapshot gets the same limiter (and bucket) for an unchanged policy. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Limiters(Arc<Registry>);

#[derive(Debug)]
struct Registry {
    clock: Clock,
    by_id: Mutex<HashMap<String, Arc<KeyLimiter>>>,
}

/// One registry is one registry: what the interned limits that hold a handle compare by.
impl PartialEq for Limiters {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Limiters {
    pub fn new(clock: Clock) -> Self {
        Limiters(Arc::new(Registry {
            clock,
            by_id: Mutex::new(HashMap::new()),
        }))
    }

    /// The key's limiter for `policy`: the one in use if its policy is the same, else a new
    /// one (full), which is kept for the snapshots to come.
    pub fn limiter_for(&self, id: &str, policy: RatePolicy) -> Arc<KeyLimiter> {
        let mut map = self.0.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(l) if l.policy == policy => l.clone(),
            _ => {
                let made = Arc::new(KeyLimiter::new(policy, &self.0.clock));
                map.insert(id.to_string(), made.clone());
                made
            }
        }
    }

    /// Keeps the limiters whose key still has the same policy (`rate_of` the id): after a
    /// whole rebuild. Costs one pass over the keys ever used, not over every key.
    pub fn retain(&self, rate_of: impl Fn(&str) -> Option<RatePolicy>) {
        let mut map = self.0.by_id.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, l| rate_of(id) == Some(l.policy));
    }

    /// The same for the keys `ids` alone: after a key-change delta.
    pub fn recheck<'a>(
        &self,
        ids: impl Iterator<Item = &'a String>,
        rate_of: impl Fn(&str) -> Option<RatePolicy>,
    ) {
        let mut map = self.0.by_id.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if map.get(id).is_some_and(|l| rate_of(id) != Some(l.policy)) {
                map.remove(id);
            }
        }
    }

    /// How many limiters exist: one per key used since its policy last changed.
    pub fn len(&self) -> usize {
        self.0.by_id.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    use crate::config::units::Rate;

    fn policy(count: u32, per: u64, burst: u32) -> RatePolicy {
        RatePolicy {
            rate: Rate {
                count,
                per: Duration::from_secs(per),
            },
            burst,
        }
    }

    #[test]
    fn limiters_survive_only_unchanged_policies() {
        let clock = Clock::fake(SystemTime::UNIX_EPOCH);
        let limiters = Limiters::new(clock);
        let a = limiters.limiter_for("k1", policy(1, 60, 1));
        let b = limiters.limiter_for("k2", policy(1, 60, 1));
        assert!(Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", policy(1, 60, 1))
        ));
        // A rebuild keeps k1 with its policy, and forgets k2, which is gone.
        limiters.retain(|id| (id == "k1").then(|| policy(1, 60, 1)));
        assert_eq!(limiters.len(), 1);
        assert!(Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", policy(1, 60, 1))
        ));
        assert!(!Arc::ptr_eq(
            &b,
            &limiters.limiter_for("k2", policy(1, 60, 1))
        ));
        // A delta that changes k1's policy starts it afresh.
        limiters.recheck(["k1".to_string()].iter(), |_| Some(policy(2, 60, 2)));
        assert!(!Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", policy(2, 60, 2))
        ));
    }
}
