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
#[derive(Debug)]
pub struct Limiters {
    clock: Clock,
    by_id: Mutex<HashMap<String, Arc<KeyLimiter>>>,
}

impl Limiters {
    pub fn new(clock: Clock) -> Self {
        Limiters {
            clock,
            by_id: Mutex::new(HashMap::new()),
        }
    }

    /// The limiter for a key: its current one when the policy is unchanged, else a fresh
    /// one. Nothing is recorded until [`Limiters::commit`], so a failed reload changes nothing.
    pub fn limiter_for(&self, id: &str, policy: RatePolicy) -> Arc<KeyLimiter> {
        let map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(l) if l.policy == policy => l.clone(),
            _ => Arc::new(KeyLimiter::new(policy, &self.clock)),
        }
    }

    /// Records the limiters of keys a change put in force (`None`: the key has none now).
    pub fn keep<'a>(&self, changed: impl Iterator<Item = (&'a String, Option<Arc<KeyLimiter>>)>) {
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        for (id, limiter) in changed {
            match limiter {
                Some(l) => {
                    map.insert(id.clone(), l);
                }
                None => {
                    map.remove(id);
                }
            }
        }
    }

    /// Records the limiters of the snapshot now in force, forgetting the keys it dropped.
    pub fn commit(&self, in_force: impl Iterator<Item = (String, Arc<KeyLimiter>)>) {
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        *map = in_force.collect();
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
        limiters.commit([("k1".to_string(), a.clone())].into_iter());
        assert!(Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", policy(1, 60, 1))
        ));
        assert!(!Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", policy(2, 60, 2))
        ));
    }
}
