//! Stage 6: the key's rate limit, spent from the key's limiter
//! ([`crate::state::limiters`]). It runs last, so refused requests never spend a key's
//! budget.

use crate::clock::Clock;
use crate::policy::rate::{ceil_secs, Budget};
use crate::state::limiters::{admit_all, KeyLimiter};

/// Spends one request from each limit of `sets` (the key's, then its identity's), all or
/// none. `Ok` holds the first limit's budget after, and the others' (none for a key with
/// one limit, so the common case allocates nothing); `Err` holds how long to wait, and the
/// refusing limit's budget.
pub fn admit(
    sets: &[&KeyLimiter],
    clock: &Clock,
) -> Result<(Option<Budget>, Vec<Budget>), (u64, Budget)> {
    let now = clock.monotonic_nanos();
    let mut first = None;
    // One allocation, and none for a single limit.
    let limits: usize = sets.iter().map(|s| s.limits.len()).sum();
    let mut more = Vec::with_capacity(limits.saturating_sub(1));
    let spent = admit_all(sets, now, |limit, remaining| {
        let missing = limit.burst.saturating_sub(remaining);
        let budget = Budget {
            name: limit.name.clone(),
            limit: u64::from(limit.burst),
            remaining: u64::from(remaining),
            reset: limit.secs_for(missing),
        };
        if first.is_none() {
            first = Some(budget);
        } else {
            more.push(budget);
        }
    });
    match spent {
        Ok(()) => Ok((first, more)),
        Err((limit, not_until)) => {
            let wait = std::time::Duration::from_nanos(not_until.saturating_sub(now));
            let full = limit.interval().saturating_mul(limit.burst);
            Err((
                ceil_secs(wait).max(1),
                Budget {
                    name: limit.name.clone(),
                    limit: u64::from(limit.burst),
                    remaining: 0,
                    reset: ceil_secs(full).max(ceil_secs(wait)),
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::header::RETRY_AFTER;
    use http::HeaderMap;

    use crate::config::units::Rate;
    use crate::policy::rate::{
        policy_header, Name, RateHeaders, RatePolicy, RATELIMIT, RATELIMIT_POLICY,
    };
    use crate::state::limiters::Gcra;

    fn policy(count: u32, per: u64, burst: u32) -> RatePolicy {
        RatePolicy {
            rate: Rate {
                count,
                per: Duration::from_secs(per),
            },
            burst,
        }
    }

    fn one(p: RatePolicy) -> KeyLimiter {
        KeyLimiter::new((Some(p), &[]))
    }

    fn remaining(spent: &(Option<Budget>, Vec<Budget>)) -> Vec<(String, u64)> {
        spent
            .0
            .iter()
            .chain(&spent.1)
            .map(|b| (b.name.as_str().to_string(), b.remaining))
            .collect()
    }

    #[test]
    fn burst_then_refusal_then_refill_on_the_fake_clock() {
        let clock = Clock::fake(UNIX_EPOCH + Duration::from_secs(1_000));
        let limiter = one(policy(2, 1, 2));
        let first = admit(&[&limiter], &clock).unwrap();
        assert_eq!(remaining(&first), [("key".to_string(), 1)]);
        assert!(first.1.is_empty(), "one limit: nothing allocated for more");
        admit(&[&limiter], &clock).unwrap();
        let (retry_after, refused) =
            admit(&[&limiter], &clock).expect_err("third request in the same instant");
        assert_eq!((retry_after, refused.name), (1, Name::Key));
        clock.advance(Duration::from_millis(500));
        assert!(admit(&[&limiter], &clock).is_ok());
        assert!(admit(&[&limiter], &clock).is_err());
    }

    /// A later limit refusing leaves the earlier ones as they were: over 50 requests that
    /// the second limit (3 at once) mostly refuses, the first (10 at once) is charged only
    /// for the 3 admitted.
    #[test]
    fn a_refusing_limit_leaves_the_earlier_ones_uncharged() {
        let clock = Clock::fake(UNIX_EPOCH + Duration::from_secs(1_000));
        let named: Vec<(Arc<str>, RatePolicy)> = vec![
            ("second".into(), policy(10, 3600, 10)),
            ("hour".into(), policy(3, 3600, 3)),
        ];
        let limiter = KeyLimiter::new((None, &named));
        let mut admitted = 0;
        for _ in 0..50 {
            match admit(&[&limiter], &clock) {
                Ok(spent) => {
                    admitted += 1;
                    assert_eq!(
                        remaining(&spent),
                        [
                            ("second".to_string(), 10 - admitted),
                            ("hour".to_string(), 3 - admitted)
                        ]
                    );
                }
                Err((_, refused)) => assert_eq!(refused.name.as_str(), "hour"),
            }
        }
        assert_eq!(admitted, 3);
        // The first limit was charged for the 3 admitted only: 7 left, 6 after this probe.
        let left = limiter
            .limits
            .first()
            .map(|l| l.check(clock.monotonic_nanos()));
        assert_eq!(left, Some(Gcra::Admitted { remaining: 6 }));
    }

    #[test]
    fn headers_follow_the_draft_syntax() {
        let clock = Clock::fake(SystemTime::UNIX_EPOCH);
        let named: Vec<(Arc<str>, RatePolicy)> = vec![("daily".into(), policy(1000, 3600, 1000))];
        let limiter = KeyLimiter::new((Some(policy(100, 1, 200)), &named));
        let (rate, more) = admit(&[&limiter], &clock).unwrap();
        let quota = crate::policy::quota::Quota::parse("1000/day").unwrap();
        let headers = RateHeaders {
            policy: policy_header(Some(policy(100, 1, 200)), &named, Some(&quota)).unwrap(),
            budgets: [
                rate,
                Some(Budget {
                    name: Name::Quota,
                    limit: 1000,
                    remaining: 999,
                    reset: 3600,
                }),
            ],
            more,
            retry_after: None,
        };
        let mut h = HeaderMap::new();
        headers.write(&mut h, false);
        assert_eq!(
            h[RATELIMIT_POLICY],
            "\"key\";q=200;w=2, \"daily\";q=1000;w=3600, \"quota\";q=1000;w=86400"
        );
        assert_eq!(
            h[RATELIMIT],
            "\"key\";r=199;t=1, \"daily\";r=999;t=4, \"quota\";r=999;t=3600"
        );
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
            let limiter = one(policy(count, per, burst));
            assert!(admit(&[&limiter], &clock).is_ok());
            assert!(policy_header(Some(policy(count, per, burst)), &[], None).is_some());
        }
        // Past the checked range the limiter still builds rather than abort.
        let limiter = one(policy(u32::MAX, 1, u32::MAX));
        assert!(admit(&[&limiter], &clock).is_ok());
    }
}
