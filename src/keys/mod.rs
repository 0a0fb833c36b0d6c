//! Keys: the format (generate, checksum, parse), the records kept in the store, and the
//! lifecycle operations that the CLI and the admin API share.

pub mod format;
pub mod store;

use serde::{Deserialize, Serialize};

use crate::clock::{parse_rfc3339, rfc3339};
use crate::config::units::parse_rate;
use crate::config::Config;
use crate::pipeline::client_ip::parse_net;
use crate::pipeline::scope::Scope;
pub use store::{Store, StoreFile};

/// A key's stored status. `expired` is not stored: it follows from `expires_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Inactive,
    Revoked,
}

/// One key as stored: everything but the key itself, of which only the hash is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The first 8 hex digits of the hash, longer only where needed to be unique.
    pub id: String,
    /// `sha256:<64 hex digits>` of the whole key.
    pub hash: String,
    /// The key's readable prefix, such as `kg_live`.
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
    /// RFC 3339; none means the key never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub status: Status,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl KeyRecord {
    /// The status a user sees: `expired` once `expires_at` has passed, unless revoked.
    pub fn effective_status(&self, now: i64) -> &'static str {
        match self.status {
            Status::Revoked => "revoked",
            _ if self
                .expires_at
                .as_deref()
                .and_then(|t| parse_rfc3339(t).ok())
                .is_some_and(|t| t <= now) =>
            {
                "expired"
            }
            Status::Active => "active",
            Status::Inactive => "inactive",
        }
    }

    /// The key as users and the API see it: no hash, derived status.
    pub fn view(&self, now: i64) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "namespace": self.namespace,
            "environment": self.environment,
            "scopes": self.scopes,
            "allowed_cidrs": self.allowed_cidrs,
            "rate_limit": self.rate_limit,
            "burst": self.burst,
            "expires_at": self.expires_at,
            "status": self.effective_status(now),
            "created_at": self.created_at,
            "last_used_at": null,
            "note": self.note,
        })
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
    #[error("the key store is invalid, fix it first:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Store(Vec<crate::config::ConfigError>),
    #[error("the key store could not be written: {0}")]
    Io(#[from] std::io::Error),
    #[error("the OS random source failed: {0}")]
    Random(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        field,
        message: message.into(),
    }
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

/// A namespace name: 1 to 63 of `a-z 0-9 _ -`, starting with a letter or digit.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns.as_bytes()[0].is_ascii_alphanumeric()
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

/// What `keys create` (and `POST /v1/api-keys`) asks for.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub namespace: String,
    pub environment: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub allowed_cidrs: Vec<String>,
    pub rate_limit: Option<String>,
    pub burst: Option<u32>,
    /// RFC 3339 time, or a duration from now such as `30d`.
    pub expires: Option<String>,
    pub note: String,
}

impl NewKey {
    /// Checks every field, returning the first problem with the field it names.
    fn validate(&self, config: &Config, now: i64) -> Result<Option<i64>, KeyError> {
        validate_namespace(&self.namespace).map_err(|e| invalid("namespace", e))?;
        if config.strict && !config.namespaces.contains_key(&self.namespace) {
            return Err(invalid(
                "namespace",
                format!(
                    "`{}` is not declared in the config, which is strict",
                    self.namespace
                ),
            ));
        }
        validate_environment(&self.environment).map_err(|e| invalid("environment", e))?;
        for s in &self.scopes {
            Scope::parse(s).map_err(|e| invalid("scopes", e))?;
        }
        for c in &self.allowed_cidrs {
            parse_net(c).map_err(|e| invalid("allowed_cidrs", e))?;
        }
        if let Some(r) = &self.rate_limit {
            parse_rate(r).map_err(|e| invalid("rate_limit", e))?;
        }
        match (self.burst, &self.rate_limit) {
            (Some(0), _) => return Err(invalid("burst", "must be at least 1")),
            (Some(_), None) => return Err(invalid("burst", "needs a rate limit as well")),
            _ => {}
        }
        if self.name.len() > 200 || self.name.chars().any(char::is_control) {
            return Err(invalid(
                "name",
                "must be at most 200 characters, with no control characters",
            ));
        }
        if self.note.len() > 2000 {
            return Err(invalid("note", "must be at most 2000 characters"));
        }
        let expires_at = match self.expires.as_deref() {
            None | Some("") | Some("never") => None,
            Some(text) => Some(parse_expiry(text, now).map_err(|e| invalid("expires_at", e))?),
        };
        if expires_at.is_some_and(|t| t <= now) {
            return Err(invalid("expires_at", "must be in the future"));
        }
        Ok(expires_at)
    }
}

/// An expiry given as RFC 3339 or as a duration from `now`.
pub fn parse_expiry(text: &str, now: i64) -> Result<i64, String> {
    if let Ok(t) = parse_rfc3339(text) {
        return Ok(t);
    }
    crate::config::units::parse_duration(text)
        .map(|d| now + d.as_secs() as i64)
        .map_err(|_| format!("`{text}` is neither an RFC 3339 time nor a duration such as 30d"))
}

/// Creates a key: returns its record and the secret, which exists nowhere else.
pub fn create(
    store: &Store,
    config: &Config,
    new: NewKey,
    now: i64,
) -> Result<(KeyRecord, String), KeyError> {
    let expires_at = new.validate(config, now)?;
    let prefix = prefix_for(config, &new.namespace, &new.environment);
    let secret = format::generate(&prefix).map_err(|e| KeyError::Random(e.to_string()))?;
    let hash = hex(&format::hash(&secret));
    let lock = store.lock()?;
    let (mut file, _) = store.load().map_err(KeyError::Store)?;
    let id = unique_id(&hash, &file.keys);
    let record = KeyRecord {
        id,
        hash: format!("sha256:{hash}"),
        prefix,
        name: new.name,
        namespace: new.namespace,
        environment: new.environment,
        scopes: new.scopes,
        allowed_cidrs: new.allowed_cidrs,
        rate_limit: new
            .rate_limit
            .map(|r| parse_rate(&r).map(|r| r.to_string()).unwrap_or(r)),
        burst: new.burst,
        expires_at: expires_at.map(rfc3339),
        status: Status::Active,
        created_at: rfc3339(now),
        note: new.note,
    };
    file.keys.push(record.clone());
    store.save(&file, &lock)?;
    Ok((record, secret))
}

/// The first 8 hex digits of the hash, lengthened until no other key has it.
fn unique_id(hash_hex: &str, existing: &[KeyRecord]) -> String {
    (8..=hash_hex.len())
        .map(|n| &hash_hex[..n])
        .find(|id| !existing.iter().any(|r| r.id == *id))
        .unwrap_or(hash_hex)
        .to_string()
}

/// Sets a key's status: disable, enable or revoke. Revocation is final.
pub fn set_status(store: &Store, id: &str, status: Status) -> Result<KeyRecord, KeyError> {
    let lock = store.lock()?;
    let (mut file, _) = store.load().map_err(KeyError::Store)?;
    let record = file
        .keys
        .iter_mut()
        .find(|r| r.id == id)
        .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
    if record.status == Status::Revoked && status != Status::Revoked {
        return Err(KeyError::Revoked(id.to_string()));
    }
    record.status = status;
    let record = record.clone();
    store.save(&file, &lock)?;
    Ok(record)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses `sha256:<64 hex>` (the `sha256:` is optional) into the 32 bytes. The error names the
/// value's length only, never the value.
pub fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let hex_part = text.strip_prefix("sha256:").unwrap_or(text);
    // The value is never repeated: a pasted plaintext token or key must not reach a log.
    let bad = || {
        format!("must be `sha256:` followed by 64 hex digits (a {}-character value was given; it is not shown)", text.len())
    };
    if hex_part.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex_part.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> KeyRecord {
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
            expires_at: None,
            status: Status::Active,
            created_at: "2026-01-01T00:00:00Z".into(),
            note: String::new(),
        }
    }

    #[test]
    fn ids_lengthen_only_on_collision() {
        let hash = "0123456789abcdef".repeat(4);
        assert_eq!(unique_id(&hash, &[]), "01234567");
        assert_eq!(unique_id(&hash, &[record("01234567")]), "012345678");
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
    fn sha256_text_round_trips() {
        let bytes = format::hash("k");
        assert_eq!(
            parse_sha256(&format!("sha256:{}", hex(&bytes))).unwrap(),
            bytes
        );
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
        r.status = Status::Revoked;
        assert_eq!(r.effective_status(t + day), "revoked");
    }
}
