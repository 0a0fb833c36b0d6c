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
use crate::policy::rate::{Budget, Name, RateHeaders, SharedPolicy, SharedRate};
use crate::rejection::Rejection;
use crate::snapshot::identities::Identity;
use crate::snapshot::KeyEntry;
use crate::state::credits::CreditBook;
use crate::state::shared_limits::{counters, Counted, Party, SharedLimiter};

/// What a shared decision said: the RateLimit headers (`None`: the key has no rate or
/// quota), and the credits left (`None`: the key has none).
pub type Shared = (Option<RateHeaders>, Option<u64>);

/// Counts one request against the shared limits of the key and of the identity it names,
/// and spends `cost` of their credits, all or nothing, in one script. `Ok((None, None))`:
/// neither has any.
pub async fn admit(
    shared: &Arc<SharedLimiter>,
    key: &KeyEntry,
    identity: Option<&Identity>,
    clock: &Clock,
    cost: u64,
    credits: &CreditBook,
) -> Result<Shared, Rejection> {
    let unlimited = SharedPolicy::default();
    let own = (key.shared().is_some() || key.credits().is_some()).then(|| Party {
        id: key.id.as_str(),
        policy: key.shared().unwrap_or(&unlimited),
        credits: key.credits(),
    });
    let theirs = identity.filter(|i| i.is_limited()).map(|i| Party {
        id: &i.counted_as,
        policy: &i.shared,
        credits: i.credits.as_ref(),
    });
    let parties: Vec<Party<'_>> = own.into_iter().chain(theirs).collect();
    if parties.is_empty() {
        return Ok((None, None));
    }
    let now = clock.unix_secs();
    if shared.is_up() {
        let settings = shared.settings();
        match tokio::time::timeout(settings.timeout, shared.call(&parties, cost, now)).await {
            Ok(Ok(reply)) => {
                shared.count(true);
                return decide(key, identity, &parties, &reply, now);
            }
            Ok(Err(e)) => shared.went_down(&e.to_string()),
            Err(_) => shared.went_down(&format!("no answer within {:?}", settings.timeout)),
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

/// Reads the script's reply (see [`SharedLimiter::call`]) into the decision and its
/// RateLimit headers, named as the local limiter names them.
fn decide(
    key: &KeyEntry,
    identity: Option<&Identity>,
    parties: &[Party<'_>],
    reply: &[i64],
    now: i64,
) -> Result<Shared, Rejection> {
    // Redis's numbers are counts and durations: a negative one, or one missing, counts as 0.
    let at = |i: usize| reply.get(i).copied().unwrap_or(0);
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    let secs = |us: i64| unsigned(us).div_ceil(1_000_000);
    let (outcome, which, wait_us) = (at(0), unsigned(at(1)), at(2));
    // The counters' values, then the rates' pairs.
    let values = reply.get(3..).unwrap_or_default();
    let counted: Vec<(Counted<'_>, u64)> = counters(parties)
        .enumerate()
        .map(|(i, c)| (c, unsigned(values.get(i).copied().unwrap_or(0))))
        .collect();
    let rates: Vec<(&SharedRate, &Party<'_>)> = parties
        .iter()
        .flat_map(|p| p.policy.rates.iter().map(move |r| (r, p)))
        .collect();
    let quota_budget = |party: &Party<'_>, q: &Quota, used: u64| Budget {
        name: quota_name(party, identity),
        limit: q.limit,
        remaining: q.limit.saturating_sub(used),
        reset: q.window(now).1.saturating_sub(now).max(1).unsigned_abs(),
    };
    let mut quotas = counted.iter().filter_map(|(c, used)| match c {
        Counted::Quota(party, q) => Some(quota_budget(party, q, *used)),
        Counted::Credits(..) => None,
    });
    let header = || super::limits_policy(key, identity);
    match outcome {
        0 => {
            let left = counted
                .iter()
                .filter_map(|(c, spent)| match c {
                    Counted::Credits(_, credits) => {
                        Some(credits.balance(now).budget.saturating_sub(*spent))
                    }
                    Counted::Quota(..) => None,
                })
                .min();
            let Some(policy) = header() else {
                return Ok((None, left));
            };
            // Each rate's remaining and reset follow the counters, in order.
            let pairs = values.get(counted.len()..).unwrap_or_default().chunks(2);
            let mut budgets = rates.iter().zip(pairs).map(|((rate, _), pair)| Budget {
                name: rate.name.clone(),
                limit: u64::from(rate.burst),
                remaining: unsigned(pair.first().copied().unwrap_or(0)),
                reset: secs(pair.get(1).copied().unwrap_or(0)),
            });
            let first = budgets.next();
            let first_quota = quotas.next();
            let more = budgets.chain(quotas).collect();
            let rate = RateHeaders {
                policy,
                budgets: [first, first_quota],
                more,
                retry_after: None,
            };
            Ok((Some(rate), left))
        }
        1 => {
            let refused = usize::try_from(which)
                .ok()
                .and_then(|j| rates.get(j.checked_sub(1)?));
            Err(Rejection::RateLimited(Box::new(RateHeaders {
                policy: header().unwrap_or(http::HeaderValue::from_static("")),
                budgets: [
                    refused.map(|(rate, _)| Budget {
                        name: rate.name.clone(),
                        limit: u64::from(rate.burst),
                        remaining: 0,
                        reset: secs(
                            i64::try_from(rate.emission_us.saturating_mul(u64::from(rate.burst)))
                                .unwrap_or(i64::MAX),
                        ),
                    }),
                    quotas.next(),
                ],
                more: Vec::new(),
                retry_after: Some(secs(wait_us).max(1)),
            })))
        }
        _ => {
            let refusing = usize::try_from(which)
                .ok()
                .and_then(|i| counted.get(i.checked_sub(1)?));
            match refusing {
                Some((Counted::Credits(_, credits), _)) => {
                    Err(super::credits_exhausted(Some(credits), now))
                }
                Some((Counted::Quota(party, q), used)) => {
                    let budget = quota_budget(party, q, *used);
                    Err(Rejection::QuotaExceeded(Box::new(RateHeaders {
                        policy: header().unwrap_or(http::HeaderValue::from_static("")),
                        retry_after: Some(budget.reset),
                        budgets: [None, Some(budget)],
                        more: Vec::new(),
                    })))
                }
                // A reply this keygate's script never gives: refused, as the script said.
                None => Err(Rejection::LimiterUnavailable),
            }
        }
    }
}

/// The quota's name in the RateLimit headers: `quota` for the key's, `identity.quota` for
/// its identity's.
fn quota_name(party: &Party<'_>, identity: Option<&Identity>) -> Name {
    match identity {
        Some(i) if party.id == &*i.counted_as => i.quota_name.clone(),
        _ => Name::Quota,
    }
}
