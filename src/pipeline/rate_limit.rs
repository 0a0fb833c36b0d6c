//! Stage 6: the key's rate limit, spent from the key's limiter
//! ([`crate::state::limiters`]). It runs last, so refused requests never spend a key's
//! budget.

use governor::clock::Clock as _;

use crate::clock::Clock;
use crate::policy::rate::{ceil_secs, Budget};
use crate::state::limiters::KeyLimiter;

/// Spends one unit of the key's rate budget, or says how long to wait: `Err((wait, reset))`.
pub fn admit(limiter: &KeyLimiter, clock: &Clock) -> Result<Budget, (u64, u64)> {
    let interval = limiter.policy.interval();
    match limiter.gcra.check() {
        Ok(state) => {
            let remaining = state.remaining_burst_capacity();
            let missing = limiter.policy.burst.saturating_sub(remaining);
            Ok(Budget {
                name: "key",
                limit: u64::from(limiter.policy.burst),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::header::RETRY_AFTER;
    use http::HeaderMap;

    use crate::config::units::Rate;
    use crate::policy::rate::{
        policy_header, RateHeaders, RatePolicy, RATELIMIT, RATELIMIT_POLICY,
    };

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
                    limit: 1000,
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
}
