//! Stage 6, shared: rate limits and quotas counted in Redis, so that a key's 100/s means
//! 100/s across every node (`rate_limit.backend: redis`). The Redis side, its script and
//! connection, is [`crate::state::shared_limits`]; this stage spends it and reads the answer.
//!
//! When Redis cannot be reached (an error, or no answer within `rate_limit.timeout`), the
//! node switches to `rate_limit.fail_mode` and says so once in the log: `open` lets requests
//! through, `closed` refuses them with 503 `limiter_unavailable`, and `local` limits on the
//! node's own GCRA and quota at limit/`nodes`. A background probe notices Redis coming back,
//! and the node switches back by itself. No request waits on a Redis that is known down.

use std::sync::Arc;

use crate::clock::Clock;
use crate::config::FailMode;
use crate::policy::quota::Quota;
use crate::policy::rate::{Budget, Name, RateHeaders, SharedPolicy};
use crate::rejection::Rejection;
use crate::snapshot::identities::Identity;
use crate::snapshot::KeyEntry;
use crate::state::credits::CreditBook;
use crate::state::shared_limits::SharedLimiter;

/// What a shared decision said: the RateLimit headers (`None`: the key has no rate or
/// quota), and the credits left (`None`: the key has none).
pub type Shared = (Option<RateHeaders>, Option<u64>);

/// Counts one request against the key's shared limits and spends `cost` of its credits, all
/// or nothing, in one script. `Ok((None, None))`: the key has neither.
pub async fn admit(
    shared: &Arc<SharedLimiter>,
    key: &KeyEntry,
    identity: Option<&Identity>,
    clock: &Clock,
    cost: u64,
    credits: &CreditBook,
) -> Result<Shared, Rejection> {
    let credit_policy = key.credits();
    let unlimited = SharedPolicy::default();
    let policy = match (key.shared(), credit_policy) {
        (Some(p), _) => p,
        (None, Some(_)) => &unlimited,
        (None, None) => return Ok((None, None)),
    };
    let now = clock.unix_secs();
    if shared.is_up() {
        match tokio::time::timeout(
            shared.settings().timeout,
            shared.call(
                key.id.as_str(),
                policy,
                credit_policy.map(|c| (c, cost)),
                now,
            ),
        )
        .await
        {
            Ok(Ok(reply)) => {
                shared.count(true);
                let left = credit_policy.map(|c| {
                    let spent = u64::try_from(reply.get(4).copied().unwrap_or(0)).unwrap_or(0);
                    c.balance(now).budget.saturating_sub(spent)
                });
                if reply.first() == Some(&3) {
                    return Err(super::credits_exhausted(credit_policy, now));
                }
                let rate = match key.shared() {
                    Some(p) => decide(key, p, &reply, now)?,
                    None => None,
                };
                return Ok((rate, left));
            }
            Ok(Err(e)) => shared.went_down(&e.to_string()),
            Err(_) => {
                shared.went_down(&format!("no answer within {:?}", shared.settings().timeout))
            }
        }
    }
    shared.count(false);
    match shared.settings().fail_mode {
        FailMode::Open => Ok((None, None)),
        FailMode::Closed => Err(Rejection::LimiterUnavailable),
        // This node's own count: its share of the limits, and its own credits book.
        FailMode::Local => {
            let left = super::spend_credits(credits, key, identity, cost, now)?;
            match super::limits(key, identity, clock, now) {
                Ok(rate) => Ok((rate, left)),
                Err(rejection) => {
                    super::refund_credits(credits, key, identity, cost);
                    Err(rejection)
                }
            }
        }
    }
}

fn decide(
    key: &KeyEntry,
    policy: &SharedPolicy,
    reply: &[i64],
    now: i64,
) -> Result<Option<RateHeaders>, Rejection> {
    let header = key
        .limits_header()
        .cloned()
        .unwrap_or(http::HeaderValue::from_static(""));
    // Redis's numbers are counts and durations: a negative one, or one missing, counts as 0.
    let at = |i: usize| reply.get(i).copied().unwrap_or(0);
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    let secs = |us: i64| unsigned(us).div_ceil(1_000_000);
    let reset_secs = |q: &Quota| q.window(now).1.saturating_sub(now).max(1).unsigned_abs();
    let (outcome, which, wait_us, used) = (at(0), at(1), at(2), at(3));
    let quota_budget = |used: i64| {
        policy.quota.map(|q| Budget {
            name: Name::Quota,
            limit: q.limit,
            remaining: q.limit.saturating_sub(unsigned(used)),
            reset: reset_secs(&q),
        })
    };
    match outcome {
        0 => {
            // Each rate's remaining and reset follow the first five numbers, in order.
            let pairs = reply.get(5..).unwrap_or_default().chunks(2);
            let mut budgets = policy.rates.iter().zip(pairs).map(|(rate, pair)| Budget {
                name: rate.name.clone(),
                limit: u64::from(rate.burst),
                remaining: unsigned(pair.first().copied().unwrap_or(0)),
                reset: secs(pair.get(1).copied().unwrap_or(0)),
            });
            let first = budgets.next();
            Ok(Some(RateHeaders {
                policy: header,
                budgets: [first, quota_budget(used)],
                more: budgets.collect(),
                retry_after: None,
            }))
        }
        1 => {
            let refused = usize::try_from(which)
                .ok()
                .and_then(|j| policy.rates.get(j.checked_sub(1)?));
            Err(Rejection::RateLimited(Box::new(RateHeaders {
                policy: header,
                budgets: [
                    refused.map(|rate| Budget {
                        name: rate.name.clone(),
                        limit: u64::from(rate.burst),
                        remaining: 0,
                        reset: secs(
                            i64::try_from(rate.emission_us.saturating_mul(u64::from(rate.burst)))
                                .unwrap_or(i64::MAX),
                        ),
                    }),
                    quota_budget(used),
                ],
                more: Vec::new(),
                retry_after: Some(secs(wait_us).max(1)),
            })))
        }
        _ => {
            let reset = policy.quota.as_ref().map_or(1, reset_secs);
            Err(Rejection::QuotaExceeded(Box::new(RateHeaders {
                policy: header,
                more: Vec::new(),
                budgets: [None, quota_budget(used)],
                retry_after: Some(reset),
            })))
        }
    }
}
