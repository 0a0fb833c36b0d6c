//! Each key's rate limiters and the registry that keeps them between snapshots: keyed by key
//! id and outside any snapshot, a reload hands each new snapshot the same limiter for an
//! unchanged policy, so buckets survive reloads (and regeneration, which keeps the id). The
//! request stage that spends them is [`crate::pipeline::rate_limit`].
//!
//! A limit is a GCRA (the generic cell rate algorithm, as governor and keygate's Redis script
//! count it): one number, the theoretical arrival time, moved by compare-and-swap. A key's
//! limits lie in one allocation with their arrival times inline, so that spending a key's
//! limits follows one pointer from the key, not one per limit and another per count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::policy::rate::{Name, RatePolicy};

/// The most limits one request spends together: a key's rate limit and 10 named limits,
/// and its identity's 10 (the ranges `keys::check` holds every record to), with room over.
const SPENT_TOGETHER: usize = 24;

/// One of a key's limits: its name in the `RateLimit` headers, its policy, and its GCRA.
/// One cache line each: a request reads every field of every limit it spends, and a limit
/// that straddled two lines cost a second miss at every key's turn.
#[derive(Debug)]
#[repr(align(64))]
pub struct Limit {
    /// The theoretical arrival time: nanoseconds on the clock's monotonic count, 0 before
    /// the first request.
    tat: AtomicU64,
    /// Nanoseconds between requests at the sustained rate (at least 1).
    emission: u64,
    /// How far past now the arrival time may run: `emission` × (burst − 1).
    tolerance: u64,
    /// The requests allowed at once.
    pub(crate) burst: u32,
    pub(crate) name: Name,
}

/// A limit's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gcra {
    /// Admitted, with this many requests still allowed at once.
    Admitted { remaining: u32 },
    /// Refused: the next request is admitted at this time (the clock's nanoseconds).
    NotUntil(u64),
}

impl Limit {
    fn new(name: Name, policy: RatePolicy, tat: u64) -> Self {
        let emission = emission(policy);
        Limit {
            tat: AtomicU64::new(tat),
            emission,
            tolerance: emission.saturating_mul(u64::from(policy.burst.saturating_sub(1))),
            burst: policy.burst,
            name,
        }
    }

    /// Whether this limit is the one named `name` that counts as `policy` does (a rate
    /// written another way, `60/m` for `1/s`, counts the same).
    fn is(&self, name: &str, policy: RatePolicy) -> bool {
        self.name.as_str() == name
            && self.emission == emission(policy)
            && self.burst == policy.burst
    }

    /// The policy's interval: a request's budget reads it.
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_nanos(self.emission)
    }

    /// Whole seconds, rounded up, until `requests` more are allowed: a budget's reset. In
    /// nanoseconds while they fit in 64 bits (584 years), as every request's budget does.
    pub(crate) fn secs_for(&self, requests: u32) -> u64 {
        match self.emission.checked_mul(u64::from(requests)) {
            Some(nanos) => nanos.div_ceil(1_000_000_000),
            None => crate::policy::rate::ceil_secs(self.interval().saturating_mul(requests)),
        }
    }

    /// Spends one request at `now` (the clock's nanoseconds), or refuses it.
    pub(crate) fn check(&self, now: u64) -> Gcra {
        let mut prev = self.tat.load(Ordering::Acquire);
        loop {
            let tat = if prev == 0 { now } else { prev };
            let earliest = tat.saturating_sub(self.tolerance);
            if now < earliest {
                return Gcra::NotUntil(earliest);
            }
            let next = tat.max(now).saturating_add(self.emission);
            match self
                .tat
                .compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // What a request at `now` may still run ahead, in whole requests.
                    let ahead = now
                        .saturating_add(self.emission)
                        .saturating_add(self.tolerance)
                        .saturating_sub(next)
                        .min(self.tolerance);
                    let remaining = ahead.checked_div(self.emission).unwrap_or(0);
                    return Gcra::Admitted {
                        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                    };
                }
                Err(now_there) => prev = now_there,
            }
        }
    }
}

/// Nanoseconds between requests at `policy`'s sustained rate (at least 1).
fn emission(policy: RatePolicy) -> u64 {
    u64::try_from(policy.interval().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// One key's limiters: its rate limit (`key`) and its named limits, in order.
#[derive(Debug)]
pub struct KeyLimiter {
    pub(crate) limits: Box<[Limit]>,
    /// Held while a key with several limits spends them, so that when a later one refuses,
    /// the earlier ones are put back exactly as they were.
    serial: Mutex<()>,
}

/// The limits a key has: its rate limit, named `key`, then its named limits.
pub type Policies<'a> = (Option<RatePolicy>, &'a [(Arc<str>, RatePolicy)]);

impl KeyLimiter {
    /// Fresh limiters for `policies` (the registry makes them through [`Limiters`]).
    #[cfg(test)]
    pub(crate) fn new(policies: Policies<'_>) -> Self {
        Self::after(None, policies)
    }

    /// The limiters for `policies`, each limit of `before` whose name and policy stay
    /// starting from its count there, so that changing one named limit leaves the others'
    /// buckets as they were. The count is copied when the limiter is made: what the old
    /// limiter admits after that, in the instant before the new snapshot takes over, is not
    /// carried (at most the requests in flight across one reload).
    fn after(before: Option<&KeyLimiter>, (rate, named): Policies<'_>) -> Self {
        let kept = |name: &str, policy: RatePolicy| {
            before
                .and_then(|b| b.limits.iter().find(|l| l.is(name, policy)))
                .map_or(0, |l| l.tat.load(Ordering::Acquire))
        };
        let limits = rate
            .map(|p| Limit::new(Name::Key, p, kept("key", p)))
            .into_iter()
            .chain(
                named
                    .iter()
                    .map(|(n, p)| Limit::new(Name::named(n), *p, kept(n, *p))),
            )
            .collect();
        KeyLimiter {
            limits,
            serial: Mutex::new(()),
        }
    }

    /// Whether this limiter counts exactly `policies`.
    fn counts(&self, (rate, named): Policies<'_>) -> bool {
        let theirs = rate
            .map(|p| ("key", p))
            .into_iter()
            .chain(named.iter().map(|(n, p)| (&**n, *p)));
        self.limits.len() == theirs.clone().count()
            && self.limits.iter().zip(theirs).all(|(l, (n, p))| l.is(n, p))
    }
}

/// Spends one request at `now` (the clock's nanoseconds) from every limit of `sets` (a
/// key's, then its identity's), or from none: `spent` hears each limit's requests left
/// after, in order, once all have admitted; `Err` names the first limit that refused, and
/// when it would admit one. A single limit needs no lock; several are spent under their
/// sets' locks, always taken in the same order (a key's before its identity's), and a
/// refusal puts the earlier ones back as they were. Only limits before the refusing one
/// are ever put back, and a set's limits are touched without its lock only when it has one
/// limit and is spent alone, which is then never put back by another request.
pub(crate) fn admit_all<'l>(
    sets: &[&'l KeyLimiter],
    now: u64,
    mut spent: impl FnMut(&'l Limit, u32),
) -> Result<(), (&'l Limit, u64)> {
    if let [set] = sets {
        if let [only] = &*set.limits {
            return match only.check(now) {
                Gcra::Admitted { remaining } => {
                    spent(only, remaining);
                    Ok(())
                }
                Gcra::NotUntil(at) => Err((only, at)),
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
    // Each limit's arrival time before this request, to put back on a refusal, and what it
    // has left after. A key and its identity have at most SPENT_TOGETHER limits (ranges: 1
    // + 10 named, and 10).
    let mut before = [(0u64, 0u32); SPENT_TOGETHER];
    for (i, limit) in limits().enumerate() {
        let was = limit.tat.load(Ordering::Acquire);
        match limit.check(now) {
            Gcra::Admitted { remaining } => {
                if let Some(slot) = before.get_mut(i) {
                    *slot = (was, remaining);
                }
            }
            Gcra::NotUntil(at) => {
                for (l, (was, _)) in limits().zip(before).take(i) {
                    l.tat.store(was, Ordering::Release);
                }
                return Err((limit, at));
            }
        }
    }
    for (limit, (_, remaining)) in limits().zip(before) {
        spent(limit, remaining);
    }
    Ok(())
}

/// Every key's limiter, by key id.
/// Every key's limiter that has been used, by key id, outside any snapshot. A limiter is made
/// on its key's first request, not at load; a snapshot's entry asks for it here, so a new
/// snapshot gets the same limiter (and bucket) for an unchanged policy. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Limiters(Arc<Registry>);

#[derive(Debug, Default)]
struct Registry {
    by_id: Mutex<HashMap<String, Arc<KeyLimiter>>>,
}

/// One registry is one registry: what the interned limits that hold a handle compare by.
impl PartialEq for Limiters {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Limiters {
    pub fn new() -> Self {
        Limiters::default()
    }

    /// The key's limiter for `policies`: the one in use if it counts the same limits, else
    /// a new one (full), which is kept for the snapshots to come.
    pub fn limiter_for(&self, id: &str, policies: Policies<'_>) -> Arc<KeyLimiter> {
        let mut map = self.0.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(l) if l.counts(policies) => l.clone(),
            before => {
                let made = Arc::new(KeyLimiter::after(before.map(|l| &**l), policies));
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
        map.retain(|id, l| match limits_of(id) {
            None => false,
            Some(p) if l.counts(p) => true,
            Some(p) => {
                *l = Arc::new(KeyLimiter::after(Some(l), p));
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
                    let next = Arc::new(KeyLimiter::after(Some(l), p));
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

    #[test]
    fn a_limit_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Limit>(), 64);
    }

    /// A budget's reset in whole nanoseconds is the one the interval's `Duration` gives,
    /// rounded up, including past 64 bits of nanoseconds.
    #[test]
    fn a_reset_in_nanoseconds_is_the_durations_rounded_up() {
        for (count, per, burst) in [
            (1, 1, 1),
            (3, 1, 3),
            (7, 60, 7),
            (10_000, 86_400, 10_000),
            (1, 31 * 86_400, u32::MAX),
            (u32::MAX, 1, u32::MAX),
        ] {
            let limit = Limit::new(Name::Key, policy(count, per, burst), 0);
            for missing in [0, 1, 2, burst / 2, burst.saturating_sub(1), burst, u32::MAX] {
                let want = crate::policy::rate::ceil_secs(limit.interval().saturating_mul(missing));
                assert_eq!(
                    limit.secs_for(missing),
                    want,
                    "{count}/{per}s, {missing} missing"
                );
            }
        }
    }

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
        let limiters = Limiters::new();
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
    /// goes on from its count, the rate that changed starts full.
    #[test]
    fn a_changed_limit_leaves_the_others_counts() {
        let limiters = Limiters::new();
        let daily: Vec<(Arc<str>, RatePolicy)> = vec![("daily".into(), policy(100, 3600, 100))];
        let before = limiters.limiter_for("k1", (Some(policy(1, 60, 1)), &daily));
        for _ in 0..3 {
            before.limits[1].check(1);
        }
        let changed = (Some(policy(5, 60, 5)), &daily[..]);
        limiters.recheck(["k1".to_string()].iter(), |_| Some(changed));
        let after = limiters.limiter_for("k1", changed);
        let left = |i: usize| match after.limits[i].check(2) {
            Gcra::Admitted { remaining } => remaining,
            Gcra::NotUntil(_) => 0,
        };
        assert_eq!((left(0), left(1)), (4, 96), "3 spent before, 1 now");
        // A key left with no rate limit at all loses its limiters.
        limiters.retain(|_| None);
        assert!(limiters.is_empty());
    }

    /// A limit written another way that counts the same keeps its limiter and count; a
    /// changed burst is a new limit.
    #[test]
    fn a_limit_that_counts_the_same_is_not_a_change() {
        let limiters = Limiters::new();
        let per_second = limiters.limiter_for("k1", (Some(policy(1, 1, 5)), &[]));
        for _ in 0..5 {
            per_second.limits[0].check(1);
        }
        let per_minute = limiters.limiter_for("k1", (Some(policy(60, 60, 5)), &[]));
        assert!(Arc::ptr_eq(&per_second, &per_minute));
        assert!(matches!(per_minute.limits[0].check(1), Gcra::NotUntil(_)));
        let more_burst = limiters.limiter_for("k1", (Some(policy(60, 60, 6)), &[]));
        assert!(!Arc::ptr_eq(&per_second, &more_burst));
    }

    /// keygate's GCRA admits and refuses exactly as governor's does, with the same
    /// requests left, over policies from the fastest to the slowest and arrivals at random
    /// gaps (a fixed-seed generator, so a failure repeats).
    #[test]
    fn the_gcra_counts_as_governors_does() {
        use governor::clock::Clock as _;
        use std::num::NonZeroU32;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (count, per, burst) in [
            (1, 1, 1),
            (10, 1, 5),
            (3, 60, 3),
            (1000, 1, 1),
            (7, 3600, 20),
        ] {
            let p = policy(count, per, burst);
            let clock = crate::clock::Clock::fake(SystemTime::UNIX_EPOCH);
            let quota = governor::Quota::with_period(p.interval())
                .unwrap()
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let theirs = governor::RateLimiter::direct_with_clock(quota, clock.clone())
                .with_middleware::<governor::middleware::StateInformationMiddleware>();
            let ours = Limit::new(Name::Key, p, 0);
            let mut admitted = 0;
            for _ in 0..2_000 {
                let gap = p.interval().as_nanos() as u64 * (next() % 3) / 2;
                clock.advance(Duration::from_nanos(gap));
                let now = clock.now().as_u64();
                match (ours.check(now), theirs.check()) {
                    (Gcra::Admitted { remaining }, Ok(state)) => {
                        assert_eq!(remaining, state.remaining_burst_capacity());
                        admitted += 1;
                    }
                    (Gcra::NotUntil(at), Err(not_until)) => {
                        assert_eq!(at, not_until.earliest_possible().as_u64())
                    }
                    (a, b) => panic!("{count}/{per}s burst {burst}: ours {a:?}, governor {b:?}"),
                }
            }
            assert!(admitted > 0 && admitted < 2_000, "both answers were seen");
        }
    }
}
