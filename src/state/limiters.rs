//! Each key's rate limiter, a GCRA from governor, and the registry that keeps them between
//! snapshots: keyed by key id and outside any snapshot, a reload hands each new snapshot the
//! same limiter for an unchanged policy, so buckets survive reloads (and regeneration, which
//! keeps the id). The request stage that spends them is [`crate::pipeline::rate_limit`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};

use crate::clock::Clock;
use crate::policy::rate::{Name, RatePolicy};

pub(crate) type Gcra = RateLimiter<NotKeyed, Tat, Clock, StateInformationMiddleware>;
type Instant = <Clock as governor::clock::Clock>::Instant;

/// A GCRA's one number, its theoretical arrival time (nanoseconds since the limiter began;
/// 0 before the first request), shared with the [`Limit`] that can put it back.
#[derive(Debug, Clone, Default)]
pub struct Tat(Arc<AtomicU64>);

/// What governor's own in-memory state does, compare-and-swap on one word, with the word
/// kept where [`KeyLimiter::admit_all`] can read it before and restore it after.
impl StateStore for Tat {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (result, next) = f((prev != 0).then(|| Nanos::from(prev)))?;
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(result),
                Err(now) => prev = now,
            }
        }
    }
}

/// The most limits one request spends together: a key's rate limit and 10 named limits,
/// and its identity's 10 (the ranges `keys::check` holds every record to), with room over.
const SPENT_TOGETHER: usize = 24;

/// One of a key's limits: its name in the `RateLimit` headers, its policy and its GCRA.
#[derive(Debug)]
pub struct Limit {
    pub(crate) name: Name,
    pub(crate) policy: RatePolicy,
    /// The policy's interval, worked out once: a request's budget reads it.
    pub(crate) interval: std::time::Duration,
    pub(crate) gcra: Gcra,
    tat: Tat,
}

impl Limit {
    fn new(name: Name, policy: RatePolicy, clock: &Clock) -> Self {
        let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
        // `interval` is never zero, so the fallback is never taken; it keeps this total.
        let quota = Quota::with_period(policy.interval())
            .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
            .allow_burst(burst);
        let tat = Tat::default();
        Limit {
            name,
            policy,
            interval: policy.interval(),
            gcra: Gcra::new(quota, tat.clone(), clock.clone()),
            tat,
        }
    }
}

/// One key's limiters: its rate limit (`key`) and its named limits, in order.
#[derive(Debug)]
pub struct KeyLimiter {
    pub(crate) limits: Box<[Arc<Limit>]>,
    /// Held while a key with several limits spends them, so that when a later one refuses,
    /// the earlier ones are put back exactly as they were.
    serial: Mutex<()>,
}

/// The limits a key has: its rate limit, named `key`, then its named limits.
pub type Policies<'a> = (Option<RatePolicy>, &'a [(Arc<str>, RatePolicy)]);

impl KeyLimiter {
    /// Fresh limiters for `policies` (the registry makes them through [`Limiters`]).
    #[cfg(test)]
    pub(crate) fn new(policies: Policies<'_>, clock: &Clock) -> Self {
        Self::after(None, policies, clock)
    }

    /// The limiters for `policies`, keeping each limit of `before` whose name and policy
    /// stay (with its count), so that changing one named limit leaves the others' buckets
    /// as they were.
    fn after(before: Option<&KeyLimiter>, (rate, named): Policies<'_>, clock: &Clock) -> Self {
        let kept = |name: &str, policy: RatePolicy| {
            before?
                .limits
                .iter()
                .find(|l| l.name.as_str() == name && l.policy == policy)
                .cloned()
        };
        let limits = rate
            .map(|p| kept("key", p).unwrap_or_else(|| Arc::new(Limit::new(Name::Key, p, clock))))
            .into_iter()
            .chain(named.iter().map(|(n, p)| {
                kept(n, *p)
                    .unwrap_or_else(|| Arc::new(Limit::new(Name::Named(Arc::clone(n)), *p, clock)))
            }))
            .collect();
        KeyLimiter {
            limits,
            serial: Mutex::new(()),
        }
    }

    /// Whether this limiter counts exactly `policies`.
    fn counts(&self, (rate, named): Policies<'_>) -> bool {
        let ours = self.limits.iter().map(|l| (l.name.as_str(), l.policy));
        let theirs = rate
            .map(|p| ("key", p))
            .into_iter()
            .chain(named.iter().map(|(n, p)| (&**n, *p)));
        ours.eq(theirs)
    }
}

/// Spends one request from every limit of `sets` (a key's, then its identity's), or from
/// none: `spent` hears each limit's state after, in order, once all have admitted; `Err`
/// names the first limit that refused, and when it would admit one. A single limit needs
/// no lock; several are spent under their sets' locks, always taken in the same order (a
/// key's before its identity's), and a refusal puts the earlier ones back as they were.
/// Only limits before the refusing one are ever put back, and a set's limits are touched
/// without its lock only when it has one limit and is spent alone, which is then never
/// put back by another request.
pub(crate) fn admit_all<'l>(
    sets: &[&'l KeyLimiter],
    mut spent: impl FnMut(&'l Limit, StateSnapshot),
) -> Result<(), (&'l Limit, NotUntil<Instant>)> {
    if let [set] = sets {
        if let [only] = &*set.limits {
            return match only.gcra.check() {
                Ok(state) => {
                    spent(only, state);
                    Ok(())
                }
                Err(not_until) => Err((only, not_until)),
            };
        }
    }
    // A key's set and its identity's: two locks, and no allocation.
    fn lock<'s>(set: &&'s KeyLimiter) -> std::sync::MutexGuard<'s, ()> {
        set.serial.lock().unwrap_or_else(|e| e.into_inner())
    }
    let (_key, _identity) = (sets.first().map(lock), sets.get(1).map(lock));
    let _others: Vec<_> = sets.iter().skip(2).map(lock).collect();
    let limits = || sets.iter().flat_map(|set| set.limits.iter());
    // Each limit's arrival time before this request, to put back on a refusal. A key and
    // its identity have at most SPENT_TOGETHER limits (ranges: 1 + 10 named, and 10).
    let mut before = [0u64; SPENT_TOGETHER];
    let mut states: [Option<StateSnapshot>; SPENT_TOGETHER] = [const { None }; SPENT_TOGETHER];
    for (i, limit) in limits().enumerate() {
        let was = limit.tat.0.load(Ordering::Acquire);
        match limit.gcra.check() {
            Ok(state) => {
                if let (Some(b), Some(s)) = (before.get_mut(i), states.get_mut(i)) {
                    *b = was;
                    *s = Some(state);
                }
            }
            Err(not_until) => {
                for (l, was) in limits().zip(before).take(i) {
                    l.tat.0.store(was, Ordering::Release);
                }
                return Err((limit, not_until));
            }
        }
    }
    for (limit, state) in limits().zip(states) {
        if let Some(state) = state {
            spent(limit, state);
        }
    }
    Ok(())
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

    /// The key's limiter for `policies`: the one in use if it counts the same limits, else
    /// a new one (full), which is kept for the snapshots to come.
    pub fn limiter_for(&self, id: &str, policies: Policies<'_>) -> Arc<KeyLimiter> {
        let mut map = self.0.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(l) if l.counts(policies) => l.clone(),
            before => {
                let made = Arc::new(KeyLimiter::after(
                    before.map(|l| &**l),
                    policies,
                    &self.0.clock,
                ));
                map.insert(id.to_string(), made.clone());
                made
            }
        }
    }

    /// Brings the limiters up to the keys' limits (`limits_of` an id) after a whole
    /// rebuild: a key gone, or left with no rate limit, loses its limiters; a key whose
    /// limits changed keeps the counts of those that stayed. Costs one pass over the keys
    /// ever used, not over every key.
    pub fn retain<'s>(&self, limits_of: impl Fn(&str) -> Option<Policies<'s>>) {
        let mut map = self.0.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let clock = &self.0.clock;
        map.retain(|id, l| match limits_of(id) {
            None => false,
            Some(p) if l.counts(p) => true,
            Some(p) => {
                *l = Arc::new(KeyLimiter::after(Some(l), p, clock));
                true
            }
        });
    }

    /// The same for the keys `ids` alone: after a key-change delta.
    pub fn recheck<'a, 's>(
        &self,
        ids: impl Iterator<Item = &'a String>,
        limits_of: impl Fn(&str) -> Option<Policies<'s>>,
    ) {
        let mut map = self.0.by_id.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            let Some(l) = map.get(id) else { continue };
            match limits_of(id) {
                None => {
                    map.remove(id);
                }
                Some(p) if l.counts(p) => {}
                Some(p) => {
                    let next = Arc::new(KeyLimiter::after(Some(l), p, &self.0.clock));
                    map.insert(id.clone(), next);
                }
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
        let a = limiters.limiter_for("k1", (Some(policy(1, 60, 1)), &[]));
        let b = limiters.limiter_for("k2", (Some(policy(1, 60, 1)), &[]));
        assert!(Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", (Some(policy(1, 60, 1)), &[]))
        ));
        // A rebuild keeps k1 with its policy, and forgets k2, which is gone.
        limiters.retain(|id| (id == "k1").then_some((Some(policy(1, 60, 1)), &[][..])));
        assert_eq!(limiters.len(), 1);
        assert!(Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", (Some(policy(1, 60, 1)), &[]))
        ));
        assert!(!Arc::ptr_eq(
            &b,
            &limiters.limiter_for("k2", (Some(policy(1, 60, 1)), &[]))
        ));
        // A delta that changes k1's policy starts it afresh.
        limiters.recheck(["k1".to_string()].iter(), |_| {
            Some((Some(policy(2, 60, 2)), &[][..]))
        });
        assert!(!Arc::ptr_eq(
            &a,
            &limiters.limiter_for("k1", (Some(policy(2, 60, 2)), &[]))
        ));
    }

    /// Changing one of a key's limits keeps the others' counts: the named limit that stays
    /// is the same limit, the rate that changed is a new one.
    #[test]
    fn a_changed_limit_leaves_the_others_counts() {
        let clock = Clock::fake(SystemTime::UNIX_EPOCH);
        let limiters = Limiters::new(clock);
        let daily: Vec<(Arc<str>, RatePolicy)> = vec![("daily".into(), policy(100, 3600, 100))];
        let before = limiters.limiter_for("k1", (Some(policy(1, 60, 1)), &daily));
        let changed = (Some(policy(5, 60, 5)), &daily[..]);
        limiters.recheck(["k1".to_string()].iter(), |_| Some(changed));
        let after = limiters.limiter_for("k1", changed);
        let same = |i: usize| Arc::ptr_eq(&before.limits[i], &after.limits[i]);
        assert_eq!((same(0), same(1)), (false, true));
        // A key left with no rate limit at all loses its limiters.
        limiters.retain(|_| None);
        assert!(limiters.is_empty());
    }
}
