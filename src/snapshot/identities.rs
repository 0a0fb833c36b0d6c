//! The snapshot's identities: each stored identity compiled for the request path, found by
//! id. A key finds its identity here on each request, so changing an identity makes a new
//! map and shares every key. What an identity counts (its limiters, its quota's usage cell,
//! its credits) is kept outside any snapshot under `@<id>`, which no key id can be (key ids
//! are hex), so it survives reloads as a key's does.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Arc, OnceLock};

use http::HeaderValue;

use crate::keys::identity::{check_identity, IdentityRecord};
use crate::policy::credits::Credits;
use crate::policy::quota::Quota;
use crate::policy::rate::{policy_header, Name, RatePolicy, SharedPolicy, SharedRate};
use crate::state::limiters::{KeyLimiter, Limiters, Policies};
use crate::state::usage::{Cells, KeyUsage};
use crate::state::IdHasher;

/// Distinct key parts of `RateLimit-Policy` an identity keeps joined with its own; keys
/// with other limits join theirs on each request.
const JOINED_KEPT: usize = 8;

/// One identity, compiled.
#[derive(Debug)]
pub struct Identity {
    pub id: Box<str>,
    /// `X-Keygate-Identity`: the id, percent-encoded where it is not visible ASCII.
    pub header: HeaderValue,
    /// Where its limiters, usage and credits are counted: `@<id>`.
    pub counted_as: Box<str>,
    /// Its named limits, each named `identity.<name>` in the RateLimit headers (this node's
    /// share, with shared limits).
    pub named: Box<[(Arc<str>, RatePolicy)]>,
    /// Its limits and quota whole, as Redis counts them with shared limits.
    pub shared: SharedPolicy,
    /// Its quota (this node's share, with shared limits).
    pub quota: Option<Quota>,
    /// `identity.quota`, the quota's name in the RateLimit headers.
    pub quota_name: Name,
    pub credits: Option<Credits>,
    /// Its credits' cell in the book, kept from the first spending.
    pub credit_cell: crate::state::credits::CellSlot,
    /// The metadata, with the members routes forward as header values.
    pub meta: Option<super::key_index::KeyMeta>,
    /// `RateLimit-Policy`'s part for the identity's limits and quota.
    pub policy_header: Option<HeaderValue>,
    /// `RateLimit-Policy` of its keys' limits and its own, joined: kept for the first few
    /// distinct key parts its keys have, so a request joins nothing. Each is set once and read
    /// with a plain load, where a swappable list cost two atomic writes a request.
    joined: [OnceLock<(HeaderValue, HeaderValue)>; JOINED_KEPT],
    limiters: Limiters,
    limiter: OnceLock<Arc<KeyLimiter>>,
    cells: Cells,
    usage: OnceLock<Arc<KeyUsage>>,
}

impl Identity {
    /// The identity's rate limiters, made on its first rate-limited request; `None` when it
    /// has no rate limits.
    pub fn limiter(&self) -> Option<&KeyLimiter> {
        let policies = self.rate_limits()?;
        Some(
            self.limiter
                .get_or_init(|| self.limiters.limiter_for(&self.counted_as, policies)),
        )
    }

    /// `RateLimit-Policy` for a key whose own limits' part is `own` and this identity's.
    pub fn policy_with(&self, own: &HeaderValue) -> Option<HeaderValue> {
        let shared = self.policy_header.as_ref()?;
        // Keys with the same limits share one part: the same bytes, found without comparing.
        let same = |part: &HeaderValue| {
            let (a, b) = (part.as_bytes(), own.as_bytes());
            (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
        };
        let mut free = None;
        for slot in &self.joined {
            match slot.get() {
                Some((part, both)) if same(part) => return Some(both.clone()),
                Some(_) => {}
                None => {
                    free = Some(slot);
                    break;
                }
            }
        }
        let both = [own.as_bytes(), shared.as_bytes()].join(&b", "[..]);
        let both = HeaderValue::from_maybe_shared(bytes::Bytes::from(both)).ok()?;
        // Two first requests at once may both set a slot: the second takes the next free one,
        // or none, and either way answers the value it made.
        if let Some(slot) = free {
            let _ = slot.set((own.clone(), both.clone()));
        }
        Some(both)
    }

    /// Whether it limits its keys at all: by a rate, a quota or credits.
    pub fn is_limited(&self) -> bool {
        !self.named.is_empty() || self.quota.is_some() || self.credits.is_some()
    }

    /// The identity's named limits, if it has any.
    pub fn rate_limits(&self) -> Option<Policies<'_>> {
        (!self.named.is_empty()).then_some((None, &self.named))
    }

    /// The usage cell its quota counts in: every request of any of its keys.
    pub fn usage(&self) -> &KeyUsage {
        self.usage
            .get_or_init(|| self.cells.get_or_make(&self.counted_as))
    }
}

/// Every identity of a snapshot, by id.
#[derive(Debug, Default)]
pub struct Identities {
    /// Hashed by FNV-1a: ids are the operator's, never a client's.
    by_id: HashMap<Box<str>, Arc<Identity>, BuildHasherDefault<IdHasher>>,
}

impl Identities {
    pub fn get(&self, id: &str) -> Option<&Identity> {
        self.by_id.get(id).map(|i| &**i)
    }

    /// Where each identity is counted (`@<id>`).
    pub fn counted(&self) -> impl Iterator<Item = &str> {
        self.by_id.values().map(|i| &*i.counted_as)
    }

    /// The identity that counts as `counted` (`@<id>`), for the limiter and usage registries.
    pub fn counted_as(&self, counted: &str) -> Option<&Identity> {
        self.get(counted.strip_prefix('@')?)
    }

    /// The stored identities compiled, with `nodes` sharing their limits (1 when limits are
    /// local); each problem is named `identities[i].field`.
    pub fn compile(
        stored: &[serde_json::Value],
        limiters: &Limiters,
        cells: &Cells,
        nodes: NonZeroU32,
        meta_of: &dyn Fn(&serde_json::Map<String, serde_json::Value>) -> super::key_index::KeyMeta,
    ) -> (Identities, Vec<(String, String)>) {
        let mut by_id = HashMap::with_capacity_and_hasher(stored.len(), Default::default());
        let mut problems = Vec::new();
        for (i, doc) in stored.iter().enumerate() {
            let record: IdentityRecord = match serde_json::from_value(doc.clone()) {
                Ok(r) => r,
                Err(e) => {
                    problems.push((format!("identities[{i}]"), e.to_string()));
                    continue;
                }
            };
            let checked = match check_identity(&record) {
                Ok(c) => c,
                Err(p) => {
                    problems.push((format!("identities[{i}].{}", p.path()), p.message));
                    continue;
                }
            };
            let named: Box<[(Arc<str>, RatePolicy)]> = checked
                .named
                .iter()
                .map(|(n, p)| (Arc::from(format!("identity.{n}")), share(*p, nodes)))
                .collect();
            let whole: Box<[(Arc<str>, RatePolicy)]> = checked
                .named
                .iter()
                .map(|(n, p)| (Arc::from(format!("identity.{n}")), *p))
                .collect();
            let policy_header = policy_header(None, &whole, None).map(|h| match checked.quota {
                Some(q) => identity_quota_header(&h, &q),
                None => h,
            });
            let policy_header = policy_header.or_else(|| {
                checked
                    .quota
                    .and_then(|q| HeaderValue::from_str(&quota_part(&q)).ok())
            });
            let identity = Identity {
                header: crate::headers::meta_value(&serde_json::Value::String(record.id.clone())),
                counted_as: format!("@{}", record.id).into(),
                named,
                shared: SharedPolicy {
                    rates: whole
                        .iter()
                        .map(|(n, p)| SharedRate::new(Name::named(n), *p))
                        .collect(),
                    quota: checked.quota,
                },
                quota: checked.quota.map(|q| Quota {
                    limit: (q.limit / NonZeroU64::from(nodes)).max(1),
                    ..q
                }),
                quota_name: Name::named("identity.quota"),
                credits: checked.credits,
                credit_cell: Default::default(),
                meta: record.meta.as_ref().map(meta_of),
                policy_header,
                joined: Default::default(),
                limiters: limiters.clone(),
                limiter: OnceLock::new(),
                cells: cells.clone(),
                usage: OnceLock::new(),
                id: record.id.into(),
            };
            if by_id
                .insert(identity.id.clone(), Arc::new(identity))
                .is_some()
            {
                problems.push((
                    format!("identities[{i}].id"),
                    "another identity has this id".into(),
                ));
            }
        }
        (Identities { by_id }, problems)
    }
}

/// `"identity.quota";q=N;w=S`.
fn quota_part(q: &Quota) -> String {
    format!("\"identity.quota\";q={};w={}", q.limit, q.window_secs())
}

/// `rates` with the identity's quota after them.
fn identity_quota_header(rates: &HeaderValue, q: &Quota) -> HeaderValue {
    let text = format!("{}, {}", rates.to_str().unwrap_or_default(), quota_part(q));
    HeaderValue::from_str(&text).unwrap_or_else(|_| rates.clone())
}

/// This node's share of a limit `nodes` share (the limit itself when 1).
fn share(p: RatePolicy, nodes: NonZeroU32) -> RatePolicy {
    match nodes.get() {
        1 => p,
        _ => super::node_share(p, nodes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::usage::UsageBook;

    fn identity(doc: serde_json::Value) -> Arc<Identity> {
        let book = UsageBook::in_memory();
        let meta_of = |_: &serde_json::Map<String, serde_json::Value>| unreachable!();
        let one = NonZeroU32::MIN;
        let (compiled, problems) =
            Identities::compile(&[doc], &Limiters::default(), &book.cells(), one, &meta_of);
        assert!(problems.is_empty(), "{problems:?}");
        compiled.by_id.into_values().next().unwrap()
    }

    #[test]
    fn each_key_part_is_joined_with_the_identitys_own() {
        let i = identity(serde_json::json!({
            "id": "cus_1",
            "rate_limits": [{"name": "minute", "limit": "60/m"}],
            "created_at": "2026-01-01T00:00:00Z",
        }));
        let own = "\"identity.minute\";q=60;w=60";
        assert_eq!(i.policy_header.as_ref().unwrap(), own);
        // More distinct key parts than are kept: each is still joined right, kept or not,
        // and a part made anew (other bytes, the same text) is found by its text.
        for round in 0..2 {
            for n in 1..=(JOINED_KEPT + 3) {
                let part = HeaderValue::from_str(&format!("\"key\";q={n};w=1")).unwrap();
                let both = i.policy_with(&part).unwrap();
                assert_eq!(
                    both,
                    format!("\"key\";q={n};w=1, {own}").as_str(),
                    "round {round}"
                );
            }
        }
        assert!(i.joined.iter().all(|slot| slot.get().is_some()));
        assert_eq!(
            i.joined
                .first()
                .and_then(|s| s.get())
                .map(|(part, _)| part.clone()),
            Some(HeaderValue::from_static("\"key\";q=1;w=1"))
        );
    }
}
