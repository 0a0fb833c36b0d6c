//! Admin tokens: who may call the admin API, and as what ([`Role`]).
//!
//! A token is declared in one of three places:
//! - the config's `admin_tokens`, each the SHA-256 of a token (changed only in the config);
//! - the environment variable `KEYGATE_ADMIN_TOKEN` (plaintext, role `admin`, named `env`);
//! - the store, beside the keys ([`super::Side::AdminTokens`]): made by `keygate tokens
//!   create` or `POST /v1/admin-tokens`, each kept as the JSON of an [`AdminTokenRecord`],
//!   its hash and never the token, and revoked by removing it.
//!
//! Tokens keygate makes have the key format with the prefix [`format::ADMIN_TOKEN_PREFIX`]
//! (`kga_<27 random base62><6 base62 checksum>`), so that secret scanners match them and a
//! mistyped one is told apart from a wrong one.

use serde::{Deserialize, Serialize};

use super::check::Problem;
use super::{format, hex, parse_sha256, KeyError, LeakAction};
use crate::clock::{parse_rfc3339, rfc3339};
use crate::config::{AdminTokenConfig, Config, Problems};

/// The longest name of a token kept in the store.
pub const MAX_NAME: usize = 64;

/// The name `KEYGATE_ADMIN_TOKEN` goes by; no stored token may take it.
pub const ENV_NAME: &str = "env";

/// An admin token as the admin API checks it: who it is, the SHA-256 of the token, what it
/// may do, where it is declared and until when it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub hash: [u8; 32],
    pub role: Role,
    pub source: Source,
    /// Unix seconds from which it is refused; `None`: never.
    pub expires: Option<i64>,
}

impl AdminToken {
    /// Whether the token is refused at `now` for having expired.
    pub fn expired(&self, now: i64) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

/// What an admin token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: the default.
    Admin,
    /// The GET routes, usage and audit: nothing that changes a key or counts a request.
    Read,
    /// `POST /v1/keys/verify`, and nothing else.
    Verify,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "read" => Some(Role::Read),
            "verify" => Some(Role::Verify),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Read => "read",
            Role::Verify => "verify",
        }
    }
}

/// Where an admin token is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config's `admin_tokens`.
    Config,
    /// `KEYGATE_ADMIN_TOKEN`.
    Env,
    /// The store: made by `keygate tokens create` or `POST /v1/admin-tokens`.
    Store,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Env => "env",
            Source::Store => "store",
        }
    }
}

/// A token kept in the store: everything but the token itself, of which only the hash is
/// kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenRecord {
    /// 1 to 64 of `a-z 0-9 _ . -`: the actor in the audit log and `created_by`.
    pub name: String,
    /// `sha256:<64 hex digits>` of the whole token.
    pub hash: String,
    /// `admin`, `read` or `verify`.
    pub role: String,
    /// RFC 3339.
    pub created_at: String,
    /// Who made it: the admin token's name, or `cli:<user>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_by: String,
    /// RFC 3339; none means the token never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// Why `name` cannot name a stored token, if it cannot: 1 to 64 of `a-z 0-9 _ . -` (it is
/// the token's id in URLs and the actor in the audit log), and not `env`.
pub fn name_problem(name: &str) -> Option<String> {
    let shaped = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
    if !shaped {
        return Some(format!(
            "a token's name is 1 to {MAX_NAME} of a-z, 0-9, `_`, `.` and `-`"
        ));
    }
    (name == ENV_NAME).then(|| format!("`{ENV_NAME}` is the name of KEYGATE_ADMIN_TOKEN"))
}

/// The one check of a stored token, as every writer and every snapshot build runs it: the
/// token as the admin API checks it, or the first problem, by field.
pub fn check(r: &AdminTokenRecord) -> Result<AdminToken, Problem> {
    if let Some(e) = name_problem(&r.name) {
        return Err(Problem::new("name", e));
    }
    let hash = parse_sha256(&r.hash).map_err(|e| Problem::new("hash", e))?;
    let role = Role::parse(&r.role).ok_or_else(|| Problem::new("role", role_problem(&r.role)))?;
    parse_rfc3339(&r.created_at).map_err(|e| Problem::new("created_at", e))?;
    let expires = r
        .expires_at
        .as_deref()
        .map(parse_rfc3339)
        .transpose()
        .map_err(|e| Problem::new("expires_at", e))?;
    Ok(AdminToken {
        name: r.name.clone(),
        hash,
        role,
        source: Source::Store,
        expires,
    })
}

fn role_problem(text: &str) -> String {
    format!("`{text}` is not a role: use admin, read or verify")
}

/// The stored tokens, compiled; each problem is named `admin_tokens[i].field`.
pub fn compile_stored(docs: &[serde_json::Value], p: &mut Problems) -> Vec<AdminToken> {
    let mut tokens = Vec::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        match serde_json::from_value::<AdminTokenRecord>(doc.clone()) {
            Err(e) => p.push(format!("admin_tokens[{i}]"), e.to_string()),
            Ok(r) => match check(&r) {
                Ok(token) if tokens.iter().any(|t: &AdminToken| t.name == token.name) => p.push(
                    format!("admin_tokens[{i}].name"),
                    format!("another stored token is named `{}`", token.name),
                ),
                Ok(token) => tokens.push(token),
                Err(problem) => p.push(
                    format!("admin_tokens[{i}].{}", problem.path()),
                    problem.message,
                ),
            },
        }
    }
    tokens
}

/// The config's tokens, then `KEYGATE_ADMIN_TOKEN`'s (its SHA-256, when set); each problem
/// is named by its place in the config.
pub fn compile_config(config: &Config, env: Option<[u8; 32]>, p: &mut Problems) -> Vec<AdminToken> {
    let mut tokens = Vec::with_capacity(config.admin_tokens.len().saturating_add(1));
    for (i, token) in config.admin_tokens.iter().enumerate() {
        let (name, hash, path, role) = match token {
            AdminTokenConfig::Hash(h) => (
                format!("token{i}"),
                h,
                format!("admin_tokens[{i}]"),
                Role::Admin,
            ),
            AdminTokenConfig::Named(named) => {
                let role = match named.role.as_deref() {
                    None => Role::Admin,
                    Some(text) => Role::parse(text).unwrap_or_else(|| {
                        p.push(format!("admin_tokens[{i}].role"), role_problem(text));
                        Role::Admin
                    }),
                };
                (
                    named.name.clone(),
                    &named.hash,
                    format!("admin_tokens[{i}].hash"),
                    role,
                )
            }
        };
        match parse_sha256(hash) {
            Ok(hash) => tokens.push(AdminToken {
                name,
                hash,
                role,
                source: Source::Config,
                expires: None,
            }),
            Err(e) => p.push(
                path,
                format!("{e}; store the SHA-256 of the token, never the token"),
            ),
        }
    }
    if let Some(hash) = env {
        tokens.push(AdminToken {
            name: ENV_NAME.into(),
            hash,
            role: Role::Admin,
            source: Source::Env,
            expires: None,
        });
    }
    tokens
}

/// What `keygate tokens create` and `POST /v1/admin-tokens` ask for.
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    pub name: String,
    pub role: String,
    /// RFC 3339, or a duration from now such as `30d`; none (or `never`): no expiry.
    pub expires: Option<String>,
}

/// Checks `new` and makes its token: the record to store and the token, which exists
/// nowhere else. `by` is who makes it; `now` the time.
pub fn mint(new: &NewToken, by: &str, now: i64) -> Result<(AdminTokenRecord, String), KeyError> {
    let invalid = |field: &'static str, message: String| KeyError::Invalid { field, message };
    if let Some(e) = name_problem(&new.name) {
        return Err(invalid("name", e));
    }
    let role = Role::parse(&new.role).ok_or_else(|| invalid("role", role_problem(&new.role)))?;
    let expires = super::lifecycle::check_expiry(new.expires.as_deref(), now)?;
    let token = format::generate_admin_token().map_err(|e| KeyError::Random(e.to_string()))?;
    let record = AdminTokenRecord {
        name: new.name.clone(),
        hash: format!("sha256:{}", hex(&format::hash(&token))),
        role: role.as_str().into(),
        created_at: rfc3339(now),
        created_by: by.into(),
        expires_at: expires.map(rfc3339),
    };
    Ok((record, token))
}

/// The stored token named `name`.
pub fn find(docs: &[serde_json::Value], name: &str) -> Option<AdminTokenRecord> {
    docs.get(position(docs, name)?)
        .and_then(|d| serde_json::from_value(d.clone()).ok())
}

fn position(docs: &[serde_json::Value], name: &str) -> Option<usize> {
    docs.iter()
        .position(|d| d.get("name").and_then(serde_json::Value::as_str) == Some(name))
}

/// Adds `record` to the stored tokens, unless one of them, or one of `taken` (the config's
/// and the environment's), has its name: then `false`, and nothing changes.
pub fn add(
    docs: &mut Vec<serde_json::Value>,
    record: &AdminTokenRecord,
    taken: &[AdminToken],
) -> Result<bool, KeyError> {
    if position(docs, &record.name).is_some() || taken.iter().any(|t| t.name == record.name) {
        return Ok(false);
    }
    docs.push(serde_json::to_value(record).map_err(|e| KeyError::Io(std::io::Error::other(e)))?);
    Ok(true)
}

/// What a revocation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Removed: the token as it was.
    Done(AdminTokenRecord),
    /// No stored token has the name.
    NotFound,
    /// The call's own token, and the last that works with role `admin`.
    LastAdmin,
}

/// Removes the stored token `name`. A call authenticated by `caller` (its hash; `None` for
/// the CLI, which needs no token) may not remove its own token when it is the last working
/// `admin` token: counting `others` (the config's and the environment's) and the store's.
pub fn revoke(
    docs: &mut Vec<serde_json::Value>,
    name: &str,
    caller: Option<&[u8; 32]>,
    others: &[AdminToken],
    now: i64,
) -> Revoked {
    let Some(at) = position(docs, name) else {
        return Revoked::NotFound;
    };
    let Some(record) = find(docs, name) else {
        return Revoked::NotFound;
    };
    if let (Some(caller), Ok(token)) = (caller, check(&record)) {
        let working_admin = |t: &AdminToken| t.role == Role::Admin && !t.expired(now);
        let mut stored = Problems::default();
        let remaining = compile_stored(docs, &mut stored)
            .into_iter()
            .filter(|t| t.name != name)
            .chain(others.iter().filter(|t| t.source != Source::Store).cloned())
            .filter(working_admin)
            .count();
        if &token.hash == caller && working_admin(&token) && remaining == 0 {
            return Revoked::LastAdmin;
        }
    }
    docs.remove(at);
    Revoked::Done(record)
}

/// The stored tokens among `hashes` (leaked ones): removed when `revoke`, kept otherwise.
pub fn leaked(
    docs: &mut Vec<serde_json::Value>,
    hashes: &[[u8; 32]],
    revoke: bool,
) -> Vec<AdminTokenRecord> {
    let mut found = Vec::new();
    docs.retain(|doc| {
        let record = serde_json::from_value::<AdminTokenRecord>(doc.clone()).ok();
        let hit = record.filter(|r| {
            parse_sha256(&r.hash).is_ok_and(|h| hashes.iter().any(|leaked| leaked == &h))
        });
        match hit {
            Some(r) => {
                found.push(r);
                !revoke
            }
            None => true,
        }
    });
    found
}

/// An admin token among the tokens a leak report names, and what is done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakedToken {
    pub name: String,
    pub source: Source,
    /// `Revoke` for a stored token (unless the report only reports); `Report` for the
    /// config's and the environment's, which only their owner can remove.
    pub action: LeakAction,
}

/// For each of `hashes` (the SHA-256 of each token a leak report names), the admin token of
/// `tokens` it is, and what is done with it. A token has no disabled state, so `disable`
/// revokes it as `revoke` does: an admin credential in public must stop working.
pub fn leak_actions(
    hashes: &[[u8; 32]],
    tokens: &[AdminToken],
    action: LeakAction,
) -> Vec<Option<LeakedToken>> {
    hashes
        .iter()
        .map(|hash| {
            let token = tokens.iter().find(|t| &t.hash == hash)?;
            Some(LeakedToken {
                name: token.name.clone(),
                source: token.source,
                action: match (token.source, action) {
                    (Source::Store, LeakAction::Revoke | LeakAction::Disable) => LeakAction::Revoke,
                    _ => LeakAction::Report,
                },
            })
        })
        .collect()
}

/// The hashes among `hashes` of the stored tokens [`leak_actions`] revokes.
pub fn to_revoke(hashes: &[[u8; 32]], actions: &[Option<LeakedToken>]) -> Vec<[u8; 32]> {
    hashes
        .iter()
        .zip(actions)
        .filter(|(_, a)| {
            a.as_ref()
                .is_some_and(|a| a.source == Source::Store && a.action == LeakAction::Revoke)
        })
        .map(|(h, _)| *h)
        .collect()
}

/// A stored token in one line, for the audit log: its name, role and expiry.
pub fn describe(r: &AdminTokenRecord) -> String {
    match &r.expires_at {
        Some(at) => format!("{} (role {}, expires {at})", r.name, r.role),
        None => format!("{} (role {}, never expires)", r.name, r.role),
    }
}

/// A token as `GET /v1/admin-tokens` and `keygate tokens list` show it: never the token,
/// nor its hash. `record` is the stored record of a stored token.
pub fn view(
    token: &AdminToken,
    record: Option<&AdminTokenRecord>,
    last_used: Option<i64>,
    now: i64,
) -> serde_json::Value {
    serde_json::json!({
        "name": token.name,
        "role": token.role.as_str(),
        "source": token.source.as_str(),
        "status": if token.expired(now) { "expired" } else { "active" },
        "created_at": record.map(|r| r.created_at.clone()),
        "created_by": record.map(|r| r.created_by.clone()).filter(|b| !b.is_empty()),
        "expires_at": token.expires.map(rfc3339),
        "last_used_at": last_used.map(rfc3339),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_763_884_800;

    fn new(name: &str, role: &str) -> NewToken {
        NewToken {
            name: name.into(),
            role: role.into(),
            expires: None,
        }
    }

    #[test]
    fn names_are_short_lowercase_words() {
        for good in ["ci", "deploy-bot", "a.b_c-1", &"x".repeat(MAX_NAME)] {
            assert_eq!(name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "CI",
            "a b",
            "a/b",
            "é",
            &"x".repeat(MAX_NAME + 1),
            "env",
        ] {
            assert!(name_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn a_minted_token_is_a_kga_key_stored_only_as_its_hash() {
        let (record, token) = mint(&new("ci", "read"), "tests", NOW).unwrap();
        let parsed = format::parse(&token).unwrap();
        assert_eq!(parsed.prefix, format::ADMIN_TOKEN_PREFIX);
        let stored = serde_json::to_string(&record).unwrap();
        assert!(!stored.contains(&token));
        let checked = check(&record).unwrap();
        assert_eq!(checked.hash, format::hash(&token));
        assert_eq!((checked.role, checked.expires), (Role::Read, None));
        let field = |n: NewToken| match mint(&n, "t", NOW) {
            Err(KeyError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(new("Bad Name", "read")), "name");
        assert_eq!(field(new("ci", "root")), "role");
        let mut past = new("ci", "admin");
        past.expires = Some("2000-01-01T00:00:00Z".into());
        assert_eq!(field(past), "expires_at");
        let mut month = new("ci", "admin");
        month.expires = Some("30d".into());
        let (r, _) = mint(&month, "t", NOW).unwrap();
        assert_eq!(check(&r).unwrap().expires, Some(NOW + 30 * 86_400));
    }

    #[test]
    fn the_last_working_admin_token_cannot_revoke_itself() {
        let (a, _) = mint(&new("a", "admin"), "t", NOW).unwrap();
        let (b, _) = mint(&new("b", "read"), "t", NOW).unwrap();
        let mut docs = vec![
            serde_json::to_value(&a).unwrap(),
            serde_json::to_value(&b).unwrap(),
        ];
        let a_hash = check(&a).unwrap().hash;
        // Alone with a read token: refused, and nothing changes.
        assert_eq!(
            revoke(&mut docs, "a", Some(&a_hash), &[], NOW),
            Revoked::LastAdmin
        );
        assert_eq!(docs.len(), 2);
        // An expired admin token in the config does not count; a working one does.
        let mut config = AdminToken {
            name: "ops".into(),
            hash: [7; 32],
            role: Role::Admin,
            source: Source::Config,
            expires: Some(NOW),
        };
        let others = [config.clone()];
        assert_eq!(
            revoke(&mut docs, "a", Some(&a_hash), &others, NOW),
            Revoked::LastAdmin
        );
        config.expires = None;
        assert_eq!(
            revoke(&mut docs, "a", Some(&a_hash), &[config], NOW),
            Revoked::Done(a.clone())
        );
        assert_eq!(docs.len(), 1);
        // The CLI has no token of its own, and another's revocation is no self-revocation.
        assert_eq!(
            revoke(&mut docs, "b", Some(&a_hash), &[], NOW),
            Revoked::Done(b)
        );
        assert_eq!(revoke(&mut docs, "b", None, &[], NOW), Revoked::NotFound);
    }

    #[test]
    fn names_are_unique_across_the_config_and_the_store() {
        let (a, _) = mint(&new("a", "admin"), "t", NOW).unwrap();
        let mut docs = Vec::new();
        assert!(add(&mut docs, &a, &[]).unwrap());
        assert!(!add(&mut docs, &a, &[]).unwrap());
        let (ops, _) = mint(&new("ops", "admin"), "t", NOW).unwrap();
        let config = check(&ops).map(|t| AdminToken {
            source: Source::Config,
            ..t
        });
        assert!(!add(&mut docs, &ops, &[config.unwrap()]).unwrap());
        assert_eq!(docs.len(), 1);
        let mut p = Problems::default();
        docs.push(docs[0].clone());
        assert_eq!(compile_stored(&docs, &mut p).len(), 1);
        assert!(!p.is_empty(), "a second `a` is a problem of the store");
    }

    #[test]
    fn leaked_tokens_are_found_by_hash_and_removed_when_revoked() {
        let (a, token) = mint(&new("a", "admin"), "t", NOW).unwrap();
        let (b, _) = mint(&new("b", "admin"), "t", NOW).unwrap();
        let mut docs = vec![
            serde_json::to_value(&a).unwrap(),
            serde_json::to_value(&b).unwrap(),
        ];
        let hashes = [format::hash(&token), format::hash("not a token")];
        assert_eq!(leaked(&mut docs, &hashes, false), std::slice::from_ref(&a));
        assert_eq!(docs.len(), 2);
        assert_eq!(leaked(&mut docs, &hashes, true), [a]);
        assert_eq!(find(&docs, "a"), None);
        assert_eq!(find(&docs, "b"), Some(b));
    }

    #[test]
    fn only_stored_tokens_are_revoked_when_leaked() {
        let token = |name: &str, source| AdminToken {
            name: name.into(),
            hash: format::hash(name),
            role: Role::Admin,
            source,
            expires: None,
        };
        let tokens = [token("ops", Source::Config), token("ci", Source::Store)];
        let hashes = [
            format::hash("ci"),
            format::hash("nobody"),
            format::hash("ops"),
        ];
        let actions = leak_actions(&hashes, &tokens, LeakAction::Disable);
        let did: Vec<_> = actions
            .iter()
            .map(|a| a.as_ref().map(|a| (a.name.as_str(), a.action)))
            .collect();
        assert_eq!(
            did,
            [
                Some(("ci", LeakAction::Revoke)),
                None,
                Some(("ops", LeakAction::Report))
            ]
        );
        assert_eq!(to_revoke(&hashes, &actions), [format::hash("ci")]);
        let reported = leak_actions(&hashes, &tokens, LeakAction::Report);
        assert!(to_revoke(&hashes, &reported).is_empty());
    }
}
