//! Rates and the `RateLimit` headers: a key's limit as a value, and the headers a decision
//! sends. The limiter that spends a budget is the request stage's
//! ([`crate::pipeline::rate_limit`]).

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::HeaderMap;

use crate::config::units::Rate;

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A key's whole (cluster-wide) limits, counted in Redis by every node (`rate_limit.backend: redis`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SharedPolicy {
    /// The rate limit (`key`) and the named limits, in order.
    pub rates: Box<[SharedRate]>,
    pub quota: Option<crate::policy::quota::Quota>,
}

/// One of a key's rate limits as Redis counts it.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedRate {
    pub name: Name,
    /// Microseconds between requests at the sustained rate.
    pub emission_us: u64,
    pub burst: u32,
}

impl SharedRate {
    pub fn new(name: Name, policy: RatePolicy) -> Self {
        SharedRate {
            name,
            emission_us: u64::try_from(policy.interval().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
            burst: policy.burst,
        }
    }
}

/// A key's limit: `rate`, with up to `burst` requests at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RatePolicy {
    pub rate: Rate,
    pub burst: u32,
}

impl RatePolicy {
    /// Time for one unit of budget to come back: at least a nanosecond, though a checked
    /// rate (at most `MAX_RATE` per second) never comes near it.
    pub(crate) fn interval(&self) -> Duration {
        // A count of 0 (which parse_rate refuses) counts as 1.
        self.rate
            .per
            .checked_div(self.rate.count)
            .unwrap_or(self.rate.per)
            .max(Duration::from_nanos(1))
    }

    /// The window over which a full burst refills, in whole seconds (at least 1).
    fn window_secs(&self) -> u64 {
        ceil_secs(self.interval().saturating_mul(self.burst)).max(1)
    }
}

/// A policy's name in the `RateLimit` headers: `key` for the rate limit, a named limit's
/// own name, or `quota`.
///
/// Every decision copies the names of the limits it spent into its headers. A named limit's
/// name is interned the first time a snapshot compiles it, so that copy is a pointer's, with
/// no reference count to move twice a request; past [`MAX_INTERNED`] distinct names (which
/// only an operator makes) a name is shared by count instead.
#[derive(Debug, Clone, Eq)]
pub enum Name {
    Key,
    Named(&'static str),
    Shared(std::sync::Arc<str>),
    Quota,
}

/// Distinct named-limit names interned for the life of the process; at most 41 bytes each
/// (`identity.` and a name of up to 32), so at most a few hundred KiB.
pub const MAX_INTERNED: usize = 4096;

impl Name {
    /// The name of a named limit (or of an identity's: `identity.<name>`).
    pub fn named(name: &str) -> Name {
        use std::collections::HashSet;
        use std::sync::{Mutex, OnceLock};
        static INTERNED: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut interned = INTERNED
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(kept) = interned.get(name) {
            return Name::Named(kept);
        }
        if interned.len() >= MAX_INTERNED {
            return Name::Shared(name.into());
        }
        let kept: &'static str = Box::leak(name.into());
        interned.insert(kept);
        Name::Named(kept)
    }

    pub fn as_str(&self) -> &str {
        match self {
            Name::Key => "key",
            Name::Named(n) => n,
            Name::Shared(n) => n,
            Name::Quota => "quota",
        }
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        match (self, other) {
            (Name::Key, Name::Key) | (Name::Quota, Name::Quota) => true,
            (Name::Named(_) | Name::Shared(_), Name::Named(_) | Name::Shared(_)) => {
                self.as_str() == other.as_str()
            }
            _ => false,
        }
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// One budget's state for the `RateLimit` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The policy's name.
    pub name: Name,
    /// The budget when whole: the rate limit's burst, or the quota.
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the budget is whole again.
    pub reset: u64,
}

/// The rate-limit headers of one decision, sent on accepted and refused requests alike.
#[derive(Debug, Clone)]
pub struct RateHeaders {
    /// `RateLimit-Policy`, precomputed per key.
    pub policy: HeaderValue,
    /// The first rate limit's budget and the quota's.
    pub budgets: [Option<Budget>; 2],
    /// The budgets of a key's other limits, in order (named limits after the first).
    pub more: Vec<Budget>,
    /// Seconds until the next request would be admitted; set on refusal.
    pub retry_after: Option<u64>,
}

impl RateHeaders {
    /// Adds `RateLimit-Policy`, `RateLimit` and, on refusal, `Retry-After`. Takes the
    /// headers by value, so that the policy's value moves into the map without a count.
    pub fn write(self, headers: &mut HeaderMap, refused: bool) {
        // Built in a buffer kept per thread, then copied once into the value: one allocation.
        thread_local! {
            static VALUE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let value = VALUE.with(|kept| match kept.try_borrow_mut() {
            Ok(mut kept) => self.rate_limit_value(&mut kept),
            Err(_) => self.rate_limit_value(&mut Vec::new()),
        });
        headers.insert(RATELIMIT_POLICY, self.policy);
        if let Some(v) = value {
            headers.insert(RATELIMIT, v);
        }
        if refused {
            if let Some(secs) = self.retry_after {
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
        }
    }

    /// `RateLimit`: `"<name>";r=<remaining>;t=<reset>` for each budget, joined by `, `,
    /// written by hand into `value`, as this runs on every limited request and core::fmt
    /// costs several times as much. Names, digits and punctuation: always a valid value.
    fn rate_limit_value(&self, value: &mut Vec<u8>) -> Option<HeaderValue> {
        value.clear();
        let [rate, quota] = &self.budgets;
        for b in rate.iter().chain(&self.more).chain(quota) {
            if !value.is_empty() {
                value.extend_from_slice(b", ");
            }
            value.push(b'"');
            value.extend_from_slice(b.name.as_str().as_bytes());
            value.extend_from_slice(b"\";r=");
            crate::access_log::push_u64(value, b.remaining);
            value.extend_from_slice(b";t=");
            crate::access_log::push_u64(value, b.reset);
        }
        HeaderValue::from_bytes(value).ok()
    }

    /// The named budget's state.
    pub fn budget(&self, name: &str) -> Option<&Budget> {
        self.budgets
            .iter()
            .flatten()
            .chain(&self.more)
            .find(|b| b.name == *name)
    }
}

/// `RateLimit-Policy` for a key with a rate limit, named limits, a quota, or any of them.
pub fn policy_header(
    rate: Option<RatePolicy>,
    named: &[(std::sync::Arc<str>, RatePolicy)],
    quota: Option<&crate::policy::quota::Quota>,
) -> Option<HeaderValue> {
    let mut parts = Vec::new();
    for (name, p) in rate
        .iter()
        .map(|p| ("key", p))
        .chain(named.iter().map(|(n, p)| (&**n, p)))
    {
        parts.push(format!("\"{name}\";q={};w={}", p.burst, p.window_secs()));
    }
    if let Some(q) = quota {
        parts.push(format!("\"quota\";q={};w={}", q.limit, q.window_secs()));
    }
    // Digits, quotes and punctuation: always a valid header value.
    HeaderValue::from_str(&parts.join(", "))
        .ok()
        .filter(|_| !parts.is_empty())
}

pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratelimit_header_names_every_budget_in_order() {
        let budget = |name: Name, remaining, reset| Budget {
            name,
            limit: 10,
            remaining,
            reset,
        };
        let headers = RateHeaders {
            policy: HeaderValue::from_static("\"key\";q=10;w=1"),
            budgets: [
                Some(budget(Name::Key, 9, 1)),
                Some(budget(Name::Quota, 0, 86_400)),
            ],
            more: vec![budget(
                Name::named("identity.hourly"),
                18_446_744_073_709_551_615,
                3600,
            )],
            retry_after: Some(7),
        };
        let mut map = HeaderMap::new();
        headers.clone().write(&mut map, false);
        assert_eq!(
            map[RATELIMIT],
            "\"key\";r=9;t=1, \"identity.hourly\";r=18446744073709551615;t=3600, \"quota\";r=0;t=86400"
        );
        assert!(map.get(RETRY_AFTER).is_none());
        headers.write(&mut map, true);
        assert_eq!(map[RETRY_AFTER], "7");
    }
}
