//! Stage 6: the key's rate limit, a GCRA from governor. It runs last, so refused requests
//! never spend a key's budget.
//!
//! Limiters live in [`Limiters`], keyed by key id and outside any snapshot: a reload hands
//! each new snapshot the same limiter for an unchanged policy, so buckets survive reloads
//! (and regeneration, which keeps the id).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::Clock as _;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::clock::Clock;
use crate::policy::rate::{ceil_secs, Budget, RatePolicy};

type Gcra = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// One key's limiter.
#[derive(Debug)]
pub struct KeyLimiter {
    policy: RatePolicy,
    gcra: Gcra,
}

impl KeyLimiter {
    fn new(policy: RatePolicy, clock: &Clock) -> Self {
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

/// Spends one unit of the key's rate budget, or says how long to wait: `Err((wait, reset))`.
pub fn admit(limiter: &KeyLimiter, clock: &Clock) -> Result<Budget, (u64, u64)> {
    let interval = limiter.policy.interval();
    match limiter.gcra.check() {
        Ok(state) => {
            let remaining = state.remaining_burst_capacity();
            let missing = limiter.policy.burst.saturating_sub(remaining);
            Ok(Budget {
                name: "key",
                remaining: u64::from(remaining),
                reset: ceil_secs(interval.saturating_mul(missing)),
            })
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(clock.now());
            let reset =
                ceil_secs(interval.saturating_mul(limiter.policy.burst)).max(ceil_secs(wait));
            Err((ceil_secs(wait).max(1), reset))
        }
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
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::header::RETRY_AFTER;
    use http::HeaderMap;

    use crate::config::units::Rate;
    use crate::policy::rate::{policy_header, RateHeaders, RATELIMIT, RATELIMIT_POLICY};

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
    fn burst_then_refusal_then_refill_on_the_fake_clock() {
        let clock = Clock::fake(UNIX_EPOCH + Duration::from_secs(1_000));
        let limiter = KeyLimiter::new(policy(2, 1, 2), &clock);
        assert_eq!(admit(&limiter, &clock).unwrap().remaining, 1);
        admit(&limiter, &clock).unwrap();
        let (retry_after, _) =
            admit(&limiter, &clock).expect_err("third request in the same instant");
        assert_eq!(retry_after, 1);
        clock.advance(Duration::from_millis(500));
        assert!(admit(&limiter, &clock).is_ok());
        assert!(admit(&limiter, &clock).is_err());
    }

    #[test]
    fn headers_follow_the_draft_syntax() {
        let clock = Clock::fake(SystemTime::UNIX_EPOCH);
        let limiter = KeyLimiter::new(policy(100, 1, 200), &clock);
        let budget = admit(&limiter, &clock).unwrap();
        let quota = crate::policy::quota::Quota::parse("1000/day").unwrap();
        let headers = RateHeaders {
            policy: policy_header(Some(limiter.policy()), Some(&quota)).unwrap(),
            budgets: [
                Some(budget),
                Some(Budget {
                    name: "quota",
                    remaining: 999,
                    reset: 3600,
                }),
            ],
            retry_after: None,
        };
        let mut h = HeaderMap::new();
        headers.write(&mut h, false);
        assert_eq!(
            h[RATELIMIT_POLICY],
            "\"key\";q=200;w=2, \"quota\";q=1000;w=86400"
        );
        assert_eq!(h[RATELIMIT], "\"key\";r=199;t=1, \"quota\";r=999;t=3600");
        assert!(h.get(RETRY_AFTER).is_none());
    }

    #[test]
    fn the_fastest_and_slowest_policies_build_and_admit() {
        let clock = Clock::fake(SystemTime::UNIX_EPOCH);
        for (count, per, burst) in [
            (1_000_000, 1, 1_000_000),
            (1, 3600, 1_000_000),
            (1, 3600, 1),
        ] {
            let limiter = KeyLimiter::new(policy(count, per, burst), &clock);
            assert!(admit(&limiter, &clock).is_ok());
            assert!(policy_header(Some(limiter.policy()), None).is_some());
        }
        // Past the checked range the limiter still builds rather than abort.
        let limiter = KeyLimiter::new(policy(u32::MAX, 1, u32::MAX), &clock);
        assert!(admit(&limiter, &clock).is_ok());
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
