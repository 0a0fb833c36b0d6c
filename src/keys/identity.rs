//! Identities: the operator's own customer, named by their id, whose rate limits, quota,
//! credits and metadata every key of theirs shares, so that a customer cannot multiply
//! their limits by making more keys. A key names its identity (`identity`); an identity
//! is kept in the store beside the keys ([`super::Side::Identities`]), each as the JSON
//! of an [`IdentityRecord`]. A key may name an identity that has no record: it then shares
//! nothing but the name, which is still forwarded upstream.

use serde::{Deserialize, Serialize};

use super::check::{check_credits, check_named_limits, check_text, meta_problem, Problem};
use super::{CreditsRecord, NamedLimitRecord};
use crate::policy::credits::Credits;
use crate::policy::quota::Quota;
use crate::policy::rate::RatePolicy;

/// The longest identity id, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// An identity as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRecord {
    pub id: String,
    /// Named rate limits every key of the identity spends together.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<NamedLimitRecord>,
    /// `N/day` or `N/month`, counted over all the identity's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    /// Credits every key of the identity spends from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsRecord>,
    /// The operator's own data about the customer; at most 4 KiB as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// What a valid identity compiles to.
#[derive(Debug, Clone)]
pub struct CheckedIdentity {
    pub named: Vec<(String, RatePolicy)>,
    pub quota: Option<Quota>,
    pub credits: Option<Credits>,
}

/// Why `id` cannot name an identity, if it cannot: 1 to 255 bytes of text without control
/// characters or bidirectional overrides (it is the operator's own customer id, sent
/// upstream as `X-Keygate-Identity`).
pub fn id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Some(format!(
            "an identity id is 1 to {MAX_ID_BYTES} bytes; this one is {}",
            id.len()
        ));
    }
    check_text(id, MAX_ID_BYTES, false)
        .err()
        .map(|e| format!("an identity id {e}"))
}

/// The one check of an identity, as every writer and every snapshot build runs it: the
/// first problem, by field.
pub fn check_identity(r: &IdentityRecord) -> Result<CheckedIdentity, Problem> {
    if let Some(e) = id_problem(&r.id) {
        return Err(Problem::new("id", e));
    }
    let named = check_named_limits(&r.rate_limits)?;
    let quota = r
        .quota
        .as_deref()
        .map(Quota::parse)
        .transpose()
        .map_err(|e| Problem::new("quota", e))?;
    let credits = r.credits.as_ref().map(check_credits).transpose()?;
    if let Some(e) = r.meta.as_ref().and_then(meta_problem) {
        return Err(Problem::new("meta", e));
    }
    for (field, time) in [
        ("created_at", Some(&r.created_at)),
        ("updated_at", r.updated_at.as_ref()),
    ] {
        if let Some(Err(e)) = time.map(|t| crate::clock::parse_rfc3339(t)) {
            return Err(Problem::new(field, e));
        }
    }
    Ok(CheckedIdentity {
        named,
        quota,
        credits,
    })
}

/// What a PUT (or `keygate identities put`) gives: everything but the id and the times.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityBody {
    #[serde(default)]
    pub rate_limits: Vec<NamedLimitRecord>,
    #[serde(default)]
    pub quota: Option<String>,
    #[serde(default)]
    pub credits: Option<CreditsBody>,
    #[serde(default)]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Credits as a body gives them: the balance, and the refill.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsBody {
    pub remaining: u64,
    #[serde(default)]
    pub refill: Option<super::RefillRecord>,
}

impl IdentityRecord {
    /// The identity `id` as `body` describes it, replacing `before` if it exists: the
    /// creation time stays, and credits equal to those set before keep counting what was
    /// spent (a PUT repeated changes nothing); different ones are set anew from `now`.
    pub fn from_body(
        id: &str,
        body: IdentityBody,
        before: Option<&IdentityRecord>,
        now: i64,
    ) -> Result<IdentityRecord, Problem> {
        let now_text = crate::clock::rfc3339(now);
        let last = before.and_then(|b| b.credits.as_ref());
        let credits = body.credits.map(|c| match last {
            Some(l) if l.remaining == c.remaining && l.refill == c.refill => l.clone(),
            _ => CreditsRecord {
                remaining: c.remaining,
                refill: c.refill,
                set_at: Some(now_text.clone()),
                version: last.map_or(0, |l| l.version).saturating_add(1),
            },
        });
        let mut record = IdentityRecord {
            id: id.to_string(),
            rate_limits: body.rate_limits,
            quota: body
                .quota
                .map(|q| Quota::parse(&q).map(|q| q.to_string()))
                .transpose()
                .map_err(|e| Problem::new("quota", e))?,
            credits,
            meta: body.meta,
            created_at: before.map_or_else(|| now_text.clone(), |b| b.created_at.clone()),
            updated_at: before.map(|_| now_text),
        };
        check_identity(&record)?;
        // A put that changes nothing keeps the time of the last change, whenever it comes.
        if let Some(before) = before {
            let now = std::mem::replace(&mut record.updated_at, before.updated_at.clone());
            if record != *before {
                record.updated_at = now;
            }
        }
        Ok(record)
    }

    /// The body that makes this identity again (for a patch to change).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "rate_limits": self.rate_limits,
            "quota": self.quota,
            "credits": self.credits.as_ref().map(|c| serde_json::json!({
                "remaining": c.remaining,
                "refill": c.refill,
            })),
            "meta": self.meta,
        })
    }
}

/// The stored identity `id`, if there is one readable.
pub fn find(docs: &[serde_json::Value], id: &str) -> Option<IdentityRecord> {
    docs.iter()
        .filter(|d| d.get("id").and_then(|v| v.as_str()) == Some(id))
        .find_map(|d| serde_json::from_value(d.clone()).ok())
}

/// Puts `record` in the stored identities, replacing the one with its id: whether it is new.
pub fn put(docs: &mut Vec<serde_json::Value>, record: &IdentityRecord) -> bool {
    let doc = serde_json::to_value(record).unwrap_or_default();
    match docs
        .iter_mut()
        .find(|d| d.get("id").and_then(|v| v.as_str()) == Some(record.id.as_str()))
    {
        Some(slot) => {
            *slot = doc;
            false
        }
        None => {
            docs.push(doc);
            true
        }
    }
}

/// Removes the stored identity `id`: the record it was, if there was one.
pub fn remove(docs: &mut Vec<serde_json::Value>, id: &str) -> Option<IdentityRecord> {
    let at = docs
        .iter()
        .position(|d| d.get("id").and_then(|v| v.as_str()) == Some(id))?;
    serde_json::from_value(docs.remove(at)).ok()
}

/// One line about an identity for the audit log: its limits, never its metadata's values.
pub fn describe(r: &IdentityRecord) -> String {
    let mut parts: Vec<String> = r
        .rate_limits
        .iter()
        .map(|l| format!("{} {}", l.name, l.limit))
        .collect();
    if let Some(q) = &r.quota {
        parts.push(format!("quota {q}"));
    }
    if let Some(c) = &r.credits {
        parts.push(format!("credits {}", c.remaining));
    }
    if r.meta.is_some() {
        parts.push("meta".into());
    }
    if parts.is_empty() {
        parts.push("no limits".into());
    }
    format!("{}: {}", r.id, parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(id: &str) -> IdentityRecord {
        IdentityRecord {
            id: id.into(),
            rate_limits: Vec::new(),
            quota: None,
            credits: None,
            meta: None,
            created_at: "2026-12-01T00:00:00Z".into(),
            updated_at: None,
        }
    }

    /// A put repeated a second later (or a day) is no change: the record, its update time
    /// included, is what it was, so nothing audits it as one. A put that changes a field
    /// takes the new time.
    #[test]
    fn a_repeated_put_keeps_the_last_change_time() {
        let body = IdentityBody {
            quota: Some("5/day".into()),
            credits: Some(CreditsBody {
                remaining: 50,
                refill: None,
            }),
            ..IdentityBody::default()
        };
        let made = IdentityRecord::from_body("cus_1", body.clone(), None, 1_000).unwrap();
        let replaced =
            IdentityRecord::from_body("cus_1", body.clone(), Some(&made), 1_001).unwrap();
        let again =
            IdentityRecord::from_body("cus_1", body.clone(), Some(&replaced), 90_000).unwrap();
        assert_eq!(again, replaced);
        let changed = IdentityBody {
            quota: Some("6/day".into()),
            ..body
        };
        let later = IdentityRecord::from_body("cus_1", changed, Some(&again), 90_001).unwrap();
        assert_ne!(later.updated_at, again.updated_at);
    }

    #[test]
    fn ids_are_text_of_at_most_255_bytes() {
        assert!(id_problem("cus_123").is_none());
        assert!(id_problem("Zürich Analytics GmbH").is_none());
        assert!(id_problem(&"x".repeat(255)).is_none());
        for bad in ["", "a\nb", "a\u{0}b", "a\u{202e}b"] {
            assert!(id_problem(bad).is_some(), "{bad:?}");
        }
        assert!(id_problem(&"x".repeat(256)).is_some());
    }

    #[test]
    fn each_field_is_checked_by_name() {
        let mut r = identity("cus_1");
        assert!(check_identity(&r).is_ok());
        r.quota = Some("10/fortnight".into());
        assert_eq!(check_identity(&r).unwrap_err().field, "quota");
        r.quota = None;
        r.rate_limits = vec![NamedLimitRecord {
            name: "key".into(),
            limit: "1/s".into(),
            burst: None,
        }];
        assert_eq!(check_identity(&r).unwrap_err().field, "rate_limits");
    }
}
