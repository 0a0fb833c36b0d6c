//! Keys: the format (generate, checksum, parse), the records kept in the store, and the
//! lifecycle operations ([`lifecycle`]) that the CLI and the admin API share.

pub mod admin_token;
pub mod check;
pub mod format;
pub mod identity;
pub mod lifecycle;
pub mod records;
pub mod redis_store;
pub mod sqlite_store;
pub mod store;

use serde::{Deserialize, Serialize};

use crate::clock::{parse_rfc3339, rfc3339};
use crate::config::Config;
pub use lifecycle::{
    create, export, import, leaked, load, parse_import, regenerate, rotate, set_status, top_up,
    update, ImportEntry, KeyPatch, LeakAction, LeakFound, Loaded, NewKey, TopUp,
};
pub use store::{ListQuery, RecordSink, Side, Store, StoreFile};

/// A key's stored status. `expired` is not stored: it follows from `expires_at`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Active,
    Inactive,
    Revoked,
}

/// One key as stored: everything but the key itself, of which only the hash is kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The first 8 hex digits of the hash, longer only where needed to be unique. A
    /// regenerated key keeps its id.
    pub id: String,
    /// `sha256:<64 hex digits>` of the whole key.
    pub hash: String,
    /// The key's readable prefix, such as `kg_live`; empty for imported keys.
    #[serde(default)]
    pub prefix: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub namespace: String,
    pub environment: String,
    /// `<action>:<path pattern>`; none means full access.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// CIDRs the key may be used from; none means anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_cidrs: Vec<String>,
    /// `N/s`, `N/m` or `N/h`; none means no per-key limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// Requests allowed at once; defaults to the rate's N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Named rate limits beside `rate_limit`, all spent together or not at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<NamedLimitRecord>,
    /// The operator's customer the key belongs to: its identity's limits apply too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// `N/day` or `N/month`; none means the tier's quota, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    /// RFC 3339; none means the key never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub status: Status,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// Who made the key: the admin token's name, or `cli:<user>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_by: String,
    /// RFC 3339 of the last change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// RFC 3339 of revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// RFC 3339 of the last regeneration (new secret, same id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regenerated_at: Option<String>,
    /// The key this one replaced by rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
    /// The key that replaces this one; this one expires when the grace ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_to: Option<String>,
    /// Brought in by `keys import`: not in keygate's format, so looked up without the
    /// checksum pre-check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imported: bool,
    /// The operator's own data about the key (a plan, a customer id): a JSON object of at
    /// most [`check::MAX_META_BYTES`] as JSON. Routes may forward chosen members upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
    /// The key's credits, if it is a limited-use key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsRecord>,
    /// RFC 3339: when the key was reported leaked (a secret scanner, the report route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaked_at: Option<String>,
    /// Where it was found, as the report said (a URL, or the scanner's source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leak_url: Option<String>,
}

/// One of a key's named rate limits: `{name, limit, burst?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedLimitRecord {
    /// 1 to 32 of `a-z`, `0-9`, `_` and `-`; not `key` or `quota`, which name the short
    /// form and the quota in the `RateLimit` headers.
    pub name: String,
    /// `N/s`, `N/m` or `N/h`.
    pub limit: String,
    /// Requests allowed at once; defaults to the rate's N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// A key's credits as stored: the balance as set, when it was set (spending counts from
/// then), and the refill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsRecord {
    pub remaining: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<RefillRecord>,
    /// RFC 3339. Set by every writer that sets `remaining`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_at: Option<String>,
    /// How many times the balance was set: each setting counts its spending afresh (two
    /// settings in one second are still two).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A refill as stored and as the API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefillRecord {
    pub amount: u64,
    /// `daily` or `monthly`.
    pub interval: String,
    /// For `monthly`: the day of the month (1 to 31; the month's last day when shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_of_month: Option<u32>,
}

/// When and from where a key was last presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUse {
    /// Unix seconds.
    pub at: i64,
    pub ip: Option<String>,
}

impl KeyRecord {
    /// The status a user sees: `expired` once `expires_at` has passed, unless revoked.
    pub fn effective_status(&self, now: i64) -> &'static str {
        match self.status {
            Status::Revoked => "revoked",
            _ if self.expires_at_unix().is_some_and(|t| t <= now) => "expired",
            Status::Active => "active",
            Status::Inactive => "inactive",
        }
    }

    /// `expires_at` as Unix seconds, when set and readable.
    pub fn expires_at_unix(&self) -> Option<i64> {
        self.expires_at
            .as_deref()
            .and_then(|t| parse_rfc3339(t).ok())
    }

    /// Counts against the namespace's tier: not revoked, not expired.
    pub fn counts_toward_limit(&self, now: i64) -> bool {
        matches!(self.effective_status(now), "active" | "inactive")
    }

    /// The key as users and the API see it: no hash, derived status, last use, and for a key
    /// being rotated out, whether it has been quiet long enough to revoke.
    pub fn view(
        &self,
        now: i64,
        last_use: Option<&LastUse>,
        quiet_period: i64,
    ) -> serde_json::Value {
        let mut v = serde_json::json!({
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "namespace": self.namespace,
            "environment": self.environment,
            "scopes": self.scopes,
            "allowed_cidrs": self.allowed_cidrs,
            "rate_limit": self.rate_limit,
            "burst": self.burst,
            "quota": self.quota,
            "expires_at": self.expires_at,
            "status": self.effective_status(now),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "updated_at": self.updated_at,
            "last_used_at": last_use.map(|u| rfc3339(u.at)),
            "last_used_ip": last_use.and_then(|u| u.ip.clone()),
            "note": self.note,
            "meta": self.meta,
            "credits": self.credits,
        });
        let optional = [
            (
                "revoked_at",
                self.revoked_at.clone().map(serde_json::Value::from),
            ),
            (
                "regenerated_at",
                self.regenerated_at.clone().map(Into::into),
            ),
            ("rotated_from", self.rotated_from.clone().map(Into::into)),
            ("rotated_to", self.rotated_to.clone().map(Into::into)),
            ("imported", self.imported.then_some(true.into())),
            ("identity", self.identity.clone().map(Into::into)),
            (
                "rate_limits",
                (!self.rate_limits.is_empty())
                    .then(|| serde_json::to_value(&self.rate_limits).unwrap_or_default()),
            ),
            ("leaked_at", self.leaked_at.clone().map(Into::into)),
            ("leak_url", self.leak_url.clone().map(Into::into)),
            (
                "safe_to_revoke",
                self.rotated_to
                    .as_ref()
                    .map(|_| self.safe_to_revoke(now, last_use, quiet_period).into()),
            ),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                set_member(&mut v, name, value);
            }
        }
        v
    }

    /// A key being rotated out is safe to revoke once nothing has presented it for the quiet
    /// period, or once it has expired and nothing can.
    pub fn safe_to_revoke(&self, now: i64, last_use: Option<&LastUse>, quiet_period: i64) -> bool {
        self.effective_status(now) == "expired"
            || last_use.is_none_or(|u| now.saturating_sub(u.at) >= quiet_period)
    }
}

/// Why a key operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no key has id `{0}`")]
    NotFound(String),
    #[error("key `{0}` is revoked, and a revoked key cannot be changed")]
    Revoked(String),
    #[error("namespace `{namespace}` already has {active} of the {max} keys its tier `{tier}` allows; revoke an unused key first")]
    LimitReached {
        namespace: String,
        tier: String,
        max: u32,
        active: usize,
    },
    #[error("key `{id}` is already being rotated to `{next}`; rotate `{next}` instead, or wait for the grace to end")]
    Rotating { id: String, next: String },
    #[error("{0}")]
    Import(String),
    #[error("the key store is invalid, fix it first:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Store(Vec<crate::config::ConfigError>),
    #[error("the key store could not be written: {0}")]
    Io(#[from] std::io::Error),
    #[error("the OS random source failed: {0}")]
    Random(String),
    /// The store is in Redis and Redis cannot be reached, or the database cannot be used
    /// (unreadable, corrupt, or locked by another writer past the busy timeout).
    #[error("{0}")]
    Unavailable(String),
}

/// An environment name: 1 to 32 of `a-z 0-9`.
pub fn validate_environment(env: &str) -> Result<(), String> {
    if !env.is_empty()
        && env.len() <= 32
        && env
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(format!(
            "`{env}` is not an environment name: use 1 to 32 of a-z and 0-9"
        ))
    }
}

/// `n` and a noun in English: "1 key", "2 keys".
pub fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A namespace name: 1 to 63 of `a-z 0-9 _ -`, starting with a letter or digit.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    let ok = ns.len() <= 63
        && ns.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{ns}` is not a namespace name: use 1 to 63 of a-z, 0-9, `_` and `-`"
        ))
    }
}

/// The prefix for keys of `namespace` in `environment`: `<base>_<tag>` where the base is the
/// namespace's `prefix` (default `kg`) and the tag is `live`, `test`, `dev` or the name.
pub fn prefix_for(config: &Config, namespace: &str, environment: &str) -> String {
    let base = config
        .namespaces
        .get(namespace)
        .and_then(|ns| ns.prefix.as_deref())
        .unwrap_or("kg");
    let tag = match environment {
        "production" => "live",
        "staging" => "test",
        "development" => "dev",
        other => other,
    };
    format!("{base}_{tag}")
}

/// Sets a member of a JSON object. Every view and report keygate builds is an object; were
/// one not, it would stay as it is rather than panic as `value[name] = …` does.
pub(crate) fn set_member(
    v: &mut serde_json::Value,
    name: &str,
    value: impl Into<serde_json::Value>,
) {
    if let Some(object) = v.as_object_mut() {
        object.insert(name.to_owned(), value.into());
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for &b in bytes {
        s.push(char::from(hex_digit(b >> 4)));
        s.push(char::from(hex_digit(b)));
    }
    s
}

/// The lowercase hex digit of the low four bits of `n`.
#[allow(clippy::indexing_slicing)] // n & 15 is below 16, the table's length.
pub(crate) fn hex_digit(n: u8) -> u8 {
    b"0123456789abcdef"[usize::from(n & 15)]
}

/// Parses `sha256:<64 hex>` (the `sha256:` is optional) into the 32 bytes. The error names
/// the value's length only, never the value: a pasted plaintext token must not reach a log.
pub fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let hex_part = text.strip_prefix("sha256:").unwrap_or(text);
    let bad = || {
        format!(
            "must be `sha256:` followed by 64 hex digits (a {}-character value was given; it is not shown)",
            text.len()
        )
    };
    // A digit's value, or `None` for anything else (a sign included).
    let digit = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    if hex_part.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex_part.as_bytes().chunks_exact(2)) {
        let [hi, lo] = pair else {
            return Err(bad());
        };
        *byte = match (digit(*hi), digit(*lo)) {
            (Some(hi), Some(lo)) => hi << 4 | lo,
            _ => return Err(bad()),
        };
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            hash: format!("sha256:{}", "ab".repeat(32)),
            prefix: "kg_live".into(),
            name: String::new(),
            namespace: "acme".into(),
            environment: "production".into(),
            scopes: vec![],
            allowed_cidrs: vec![],
            rate_limit: None,
            burst: None,
            rate_limits: Vec::new(),
            identity: None,
            quota: None,
            expires_at: None,
            status: Status::Active,
            created_at: "2026-01-01T00:00:00Z".into(),
            note: String::new(),
            created_by: String::new(),
            updated_at: None,
            revoked_at: None,
            regenerated_at: None,
            rotated_from: None,
            rotated_to: None,
            imported: false,
            meta: None,
            credits: None,
            leaked_at: None,
            leak_url: None,
        }
    }

    #[test]
    fn prefixes_show_the_environment() {
        let mut config = Config::default();
        assert_eq!(prefix_for(&config, "x", "production"), "kg_live");
        assert_eq!(prefix_for(&config, "x", "staging"), "kg_test");
        assert_eq!(prefix_for(&config, "x", "development"), "kg_dev");
        assert_eq!(prefix_for(&config, "x", "qa"), "kg_qa");
        config.namespaces.insert(
            "acme".into(),
            crate::config::NamespaceConfig {
                tier: None,
                prefix: Some("acme".into()),
            },
        );
        assert_eq!(prefix_for(&config, "acme", "production"), "acme_live");
    }

    #[test]
    fn sha256_text_round_trips_and_never_echoes() {
        let bytes = format::hash("k");
        assert_eq!(
            parse_sha256(&format!("sha256:{}", hex(&bytes))).unwrap(),
            bytes
        );
        assert!(parse_sha256(&format!("sha256:{}", "+f".repeat(32))).is_err());
        let err = parse_sha256("kg_live_pasted-secret").unwrap_err();
        assert!(!err.contains("pasted-secret"), "{err}");
    }

    #[test]
    fn expired_status_is_derived() {
        let mut r = record("a");
        r.expires_at = Some("2026-01-02T00:00:00Z".into());
        let day = 86_400;
        let t = parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(r.effective_status(t), "active");
        assert_eq!(r.effective_status(t + day), "expired");
        assert!(!r.counts_toward_limit(t + day));
        r.status = Status::Revoked;
        assert_eq!(r.effective_status(t + day), "revoked");
    }

    #[test]
    fn safe_to_revoke_follows_the_quiet_period() {
        let mut r = record("a");
        r.rotated_to = Some("b".into());
        let used = LastUse {
            at: 1_000,
            ip: None,
        };
        assert!(!r.safe_to_revoke(1_500, Some(&used), 3_600));
        assert!(r.safe_to_revoke(4_600, Some(&used), 3_600));
        assert!(
            r.safe_to_revoke(1_500, None, 3_600),
            "never used: nothing to wait for"
        );
        assert_eq!(r.view(1_500, Some(&used), 3_600)["safe_to_revoke"], false);
        assert!(record("c").view(0, None, 1).get("safe_to_revoke").is_none());
    }
}
