//! The key lifecycle, shared by the CLI and the admin API: create, disable/enable, revoke,
//! regenerate, rotate with overlap, update and import. Each operation is one locked
//! read-modify-write of the store, so concurrent writers never lose each other's changes.

use std::collections::HashSet;

use super::check::{self, check_record, check_text, MAX_NAME_CHARS, MAX_NOTE_CHARS};
use super::records::Records;
use super::{
    format, hex, prefix_for, validate_environment, validate_namespace, KeyError, KeyRecord, Status,
    Store, StoreFile,
};
use crate::clock::{parse_rfc3339, rfc3339, LATEST};
use crate::config::units::parse_duration;
use crate::config::Config;
use crate::policy::net::parse_net;
use crate::policy::scope::Scope;

/// Who acts, on which store, under which config, and when (Unix seconds).
#[derive(Debug, Clone, Copy)]
pub struct Op<'a> {
    pub store: &'a Store,
    pub config: &'a Config,
    pub actor: &'a str,
    pub now: i64,
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
    /// Named rate limits beside `rate_limit`.
    pub rate_limits: Vec<super::NamedLimitRecord>,
    /// The customer (identity) the key belongs to.
    pub identity: Option<String>,
    /// `N/day` or `N/month`.
    pub quota: Option<String>,
    /// RFC 3339 time, or a duration from now such as `30d`; `never` or empty for none.
    pub expires: Option<String>,
    pub note: String,
    /// The operator's own data about the key; at most 4 KiB as JSON.
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
    /// Credits for a limited-use key; set at the create (`set_at` is ignored).
    pub credits: Option<super::CreditsRecord>,
}

/// What `keys update` (and `PATCH /v1/api-keys/{id}`) changes. `None` leaves a field alone;
/// `Some(None)` clears an optional one.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub rate_limit: Option<Option<String>>,
    pub burst: Option<Option<u32>>,
    /// Replaces the named rate limits whole (empty: none).
    pub rate_limits: Option<Vec<super::NamedLimitRecord>>,
    /// `Some(None)` takes the key out of its identity.
    pub identity: Option<Option<String>>,
    pub quota: Option<Option<String>>,
    pub expires: Option<Option<String>>,
    pub note: Option<String>,
    /// `Some(None)` removes the key's meta; `Some(Some(m))` replaces it whole.
    pub meta: Option<Option<serde_json::Map<String, serde_json::Value>>>,
    /// `Some(None)` makes the key unlimited again; `Some(Some(c))` sets its credits anew,
    /// from now (what was spent before no longer counts).
    pub credits: Option<Option<super::CreditsRecord>>,
}

/// A create's fields, checked against the config: the prefix its key gets, the rate and
/// quota in their canonical spelling, and the expiry as Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedKey {
    pub prefix: String,
    pub rate_limit: Option<String>,
    pub quota: Option<String>,
    pub expires_at: Option<i64>,
}

impl NewKey {
    /// Checks every field against `config` at `now`, without touching the store.
    pub fn check(&self, config: &Config, now: i64) -> Result<CheckedKey, KeyError> {
        check_namespace(config, &self.namespace, &self.environment)?;
        check_scopes(&self.scopes)?;
        check_cidrs(&self.allowed_cidrs)?;
        let rate_limit = check_rate(self.rate_limit.as_deref(), self.burst)?;
        let quota = check_quota(self.quota.as_deref())?;
        check_name(&self.name)?;
        check_note(&self.note)?;
        check_meta(self.meta.as_ref())?;
        if let Some(c) = &self.credits {
            super::check::check_credits(c).map_err(|p| invalid("credits", p.message))?;
        }
        let expires_at = check_expiry(self.expires.as_deref(), now)?;
        let prefix = prefix_for(config, &self.namespace, &self.environment);
        check_prefix(&prefix)?;
        Ok(CheckedKey {
            prefix,
            rate_limit,
            quota,
            expires_at,
        })
    }

    /// The record this create makes for the key whose hash is `hash_hex`, checked as every
    /// reader of the store checks it.
    pub fn into_record(
        self,
        config: &Config,
        now: i64,
        actor: &str,
        id: String,
        hash_hex: &str,
    ) -> Result<KeyRecord, KeyError> {
        let CheckedKey {
            prefix,
            rate_limit,
            quota,
            expires_at,
        } = self.check(config, now)?;
        checked(
            KeyRecord {
                id,
                hash: format!("sha256:{hash_hex}"),
                prefix,
                name: self.name,
                namespace: self.namespace,
                environment: self.environment,
                scopes: self.scopes,
                allowed_cidrs: self.allowed_cidrs,
                rate_limit,
                burst: self.burst,
                rate_limits: self.rate_limits,
                identity: self.identity,
                quota,
                expires_at: expires_at.map(rfc3339),
                status: Status::Active,
                created_at: rfc3339(now),
                note: self.note,
                created_by: actor.to_string(),
                updated_at: None,
                revoked_at: None,
                regenerated_at: None,
                rotated_from: None,
                rotated_to: None,
                imported: false,
                meta: self.meta,
                credits: self.credits.map(|c| set_now(c, now)),
                leaked_at: None,
                leak_url: None,
            },
            config,
        )
    }
}

/// Runs the store's own check on a record about to be written: what a writer stores always
/// loads. The first problem is the answer, named by its field.
pub fn checked(record: KeyRecord, config: &Config) -> Result<KeyRecord, KeyError> {
    match check_record(&record, config) {
        Ok(_) => Ok(record),
        Err(problems) => {
            let first = problems.into_iter().next();
            Err(first.map_or_else(
                || invalid("body", "the key record is invalid"),
                |p| {
                    // A prefix comes from the namespace and environment a user chose.
                    let field = if p.field == "prefix" {
                        "environment"
                    } else {
                        p.field
                    };
                    invalid(field, p.message)
                },
            ))
        }
    }
}

/// A patch's fields that can be checked without the key: the new expiry and quota, where the
/// patch sets them (`Some(None)` clears).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPatch {
    pub expires_at: Option<Option<i64>>,
    pub quota: Option<Option<String>>,
}

impl KeyPatch {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.scopes.is_none()
            && self.allowed_cidrs.is_none()
            && self.rate_limit.is_none()
            && self.burst.is_none()
            && self.rate_limits.is_none()
            && self.identity.is_none()
            && self.quota.is_none()
            && self.expires.is_none()
            && self.note.is_none()
            && self.meta.is_none()
            && self.credits.is_none()
    }

    /// Checks every field that does not depend on the key at `now`. The rate and burst are
    /// checked again together with the key's own, as either may come from it.
    pub fn check(&self, now: i64) -> Result<CheckedPatch, KeyError> {
        if self.is_empty() {
            return Err(invalid(
                "body",
                "nothing to change: give at least one field",
            ));
        }
        if let Some(scopes) = &self.scopes {
            check_scopes(scopes)?;
        }
        if let Some(cidrs) = &self.allowed_cidrs {
            check_cidrs(cidrs)?;
        }
        if let Some(meta) = &self.meta {
            check_meta(meta.as_ref())?;
        }
        if let Some(Some(c)) = &self.credits {
            super::check::check_credits(c).map_err(|p| invalid("credits", p.message))?;
        }
        if let Some(Some(rate)) = &self.rate_limit {
            check_rate(Some(rate), None)?;
        }
        if let Some(Some(burst)) = self.burst {
            if !(1..=check::MAX_BURST).contains(&burst) {
                return Err(invalid(
                    "burst",
                    format!("must be from 1 to {}", check::MAX_BURST),
                ));
            }
        }
        if let Some(name) = &self.name {
            check_name(name)?;
        }
        if let Some(note) = &self.note {
            check_note(note)?;
        }
        Ok(CheckedPatch {
            expires_at: self
                .expires
                .as_ref()
                .map(|text| check_expiry(text.as_deref(), now))
                .transpose()?,
            quota: self
                .quota
                .as_ref()
                .map(|q| check_quota(q.as_deref()))
                .transpose()?,
        })
    }

    /// Applies the patch to `record` at `now`, and checks the result as every reader of the
    /// store checks it.
    pub fn apply(self, record: &mut KeyRecord, config: &Config, now: i64) -> Result<(), KeyError> {
        let CheckedPatch { expires_at, quota } = self.check(now)?;
        not_revoked(record)?;
        let rate = self
            .rate_limit
            .clone()
            .unwrap_or_else(|| record.rate_limit.clone());
        // Clearing the rate clears its burst too.
        let burst = match (&rate, self.burst) {
            (None, None) => None,
            (_, Some(burst)) => burst,
            (Some(_), None) => record.burst,
        };
        let mut next = record.clone();
        next.rate_limit = check_rate(rate.as_deref(), burst)?;
        next.burst = burst;
        if let Some(name) = self.name {
            next.name = name;
        }
        if let Some(scopes) = self.scopes {
            next.scopes = scopes;
        }
        if let Some(cidrs) = self.allowed_cidrs {
            next.allowed_cidrs = cidrs;
        }
        if let Some(limits) = self.rate_limits {
            next.rate_limits = limits;
        }
        if let Some(identity) = self.identity {
            next.identity = identity;
        }
        if let Some(note) = self.note {
            next.note = note;
        }
        if let Some(meta) = self.meta {
            next.meta = meta;
        }
        if let Some(credits) = self.credits {
            // A new setting of the balance: the version after the key's last.
            let last = record.credits.as_ref().map_or(0, |c| c.version);
            next.credits = credits.map(|c| {
                set_now(
                    super::CreditsRecord {
                        version: last,
                        set_at: None,
                        ..c
                    },
                    now,
                )
            });
        }
        if let Some(expires_at) = expires_at {
            next.expires_at = expires_at.map(rfc3339);
        }
        if let Some(quota) = quota {
            next.quota = quota;
        }
        next.updated_at = Some(rfc3339(now));
        *record = checked(next, config)?;
        Ok(())
    }
}

/// Refuses a rotation grace past [`MAX_GRACE_SECS`].
pub fn check_grace(grace_secs: u64) -> Result<(), KeyError> {
    if grace_secs > MAX_GRACE_SECS {
        return Err(invalid(
            "grace_seconds",
            format!("a grace of at most {MAX_GRACE_SECS} seconds (10 years)"),
        ));
    }
    Ok(())
}

/// One key to import: the existing plaintext key, and optionally a name and scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportEntry {
    /// 1-based line in the import file, for error messages (which never show the key).
    pub line: usize,
    pub key: String,
    pub name: String,
    pub scopes: Vec<String>,
}

/// The longest grace a rotation may give the old key: ten years.
pub const MAX_GRACE_SECS: u64 = 10 * 365 * 86_400;

fn invalid(field: &'static str, message: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        field,
        message: message.into(),
    }
}

/// Credits as set now: spending counts from this instant, unless the writer keeps the
/// instant they were set at (a top-up within the same period, which must not forget what
/// was spent). No body of the API or flag of the CLI can give `set_at`.
fn set_now(c: super::CreditsRecord, now: i64) -> super::CreditsRecord {
    match c.set_at {
        Some(_) => c,
        None => super::CreditsRecord {
            set_at: Some(rfc3339(now)),
            version: c.version.saturating_add(1),
            ..c
        },
    }
}

/// Tops up a key's credits in one write of the store; `left` says what is left of the
/// credits a record holds now (the gateway's count, or the journal's for the CLI). Returns
/// the key as written and its credits before.
pub fn top_up(
    op: Op<'_>,
    id: &str,
    how: TopUp,
    left: impl FnOnce(&KeyRecord) -> u64,
) -> Result<(KeyRecord, Option<super::CreditsRecord>), KeyError> {
    transact(op.store, |records| {
        let mut record = find(records, id)?;
        not_revoked(&record)?;
        let before = record.credits.clone();
        let now_left = left(&record);
        record.credits = Some(topped_up(&record, how, now_left, op.now)?);
        record.updated_at = Some(rfc3339(op.now));
        let record = checked(record, op.config)?;
        records.put(record.clone())?;
        Ok((record, before))
    })
}

/// How a top-up changes a key's credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUp {
    /// To exactly this many, from now.
    Set(u64),
    /// This many more than are left.
    Add(u64),
}

/// The key's credits after `top_up`, given what is `left` of them now: an addition within
/// the period they were set in raises the balance as set and keeps what was spent; after a
/// refill, or for a set, the balance starts anew from now.
pub fn topped_up(
    record: &KeyRecord,
    top_up: TopUp,
    left: u64,
    now: i64,
) -> Result<super::CreditsRecord, KeyError> {
    let Some(current) = &record.credits else {
        return Err(invalid(
            "credits",
            "the key has no credits to top up: set them first",
        ));
    };
    let policy = super::check::check_credits(current).map_err(|p| invalid("credits", p.message))?;
    let same_period = policy.balance(now).period == policy.balance(policy.set_at).period;
    let next = match top_up {
        TopUp::Set(n) => super::CreditsRecord {
            remaining: n,
            set_at: None,
            ..current.clone()
        },
        TopUp::Add(n) if same_period => super::CreditsRecord {
            remaining: current.remaining.saturating_add(n),
            ..current.clone()
        },
        TopUp::Add(n) => super::CreditsRecord {
            remaining: left.saturating_add(n),
            set_at: None,
            ..current.clone()
        },
    };
    if next.remaining > crate::policy::credits::MAX_CREDITS {
        return Err(invalid(
            "credits",
            format!("at most {} credits", crate::policy::credits::MAX_CREDITS),
        ));
    }
    Ok(set_now(next, now))
}

fn check_meta(meta: Option<&serde_json::Map<String, serde_json::Value>>) -> Result<(), KeyError> {
    match meta.and_then(super::check::meta_problem) {
        Some(e) => Err(invalid("meta", e)),
        None => Ok(()),
    }
}

fn check_scopes(scopes: &[String]) -> Result<(), KeyError> {
    scopes
        .iter()
        .try_for_each(|s| Scope::parse(s).map(drop).map_err(|e| invalid("scopes", e)))
}

fn check_cidrs(cidrs: &[String]) -> Result<(), KeyError> {
    cidrs.iter().try_for_each(|c| {
        parse_net(c)
            .map(drop)
            .map_err(|e| invalid("allowed_cidrs", e))
    })
}

/// The rate in its canonical spelling (`100/s`), checked together with the burst.
fn check_rate(rate: Option<&str>, burst: Option<u32>) -> Result<Option<String>, KeyError> {
    check::check_rate(rate, burst)
        .map(|policy| policy.map(|p| p.rate.to_string()))
        .map_err(|p| invalid(p.field, p.message))
}

/// The quota in its canonical spelling (`10000/day`).
fn check_quota(quota: Option<&str>) -> Result<Option<String>, KeyError> {
    quota
        .map(|q| {
            crate::policy::quota::Quota::parse(q)
                .map(|q| q.to_string())
                .map_err(|e| invalid("quota", e))
        })
        .transpose()
}

fn check_name(name: &str) -> Result<(), KeyError> {
    check_text(name, MAX_NAME_CHARS, false).map_err(|e| invalid("name", e))
}

fn check_note(note: &str) -> Result<(), KeyError> {
    check_text(note, MAX_NOTE_CHARS, true).map_err(|e| invalid("note", e))
}

/// An expiry given as RFC 3339 or as a duration from `now`; `never` or empty means none.
/// It must be in the future, and no later than 9999-12-31T23:59:59Z (field `expires_at`).
pub fn check_expiry(text: Option<&str>, now: i64) -> Result<Option<i64>, KeyError> {
    let at = match text.map(str::trim) {
        None | Some("") | Some("never") => return Ok(None),
        Some(t) => parse_expiry(t, now).map_err(|e| invalid("expires_at", e))?,
    };
    if at <= now {
        return Err(invalid("expires_at", "must be in the future"));
    }
    if at > LATEST {
        return Err(invalid(
            "expires_at",
            "must be no later than 9999-12-31T23:59:59Z",
        ));
    }
    Ok(Some(at))
}

/// An expiry given as RFC 3339 or as a duration from `now`.
pub fn parse_expiry(text: &str, now: i64) -> Result<i64, String> {
    if let Ok(t) = parse_rfc3339(text) {
        return Ok(t);
    }
    parse_duration(text)
        .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
        .map_err(|_| format!("`{text}` is neither an RFC 3339 time nor a duration such as 30d"))
}

fn check_namespace(config: &Config, namespace: &str, environment: &str) -> Result<(), KeyError> {
    validate_namespace(namespace).map_err(|e| invalid("namespace", e))?;
    if config.strict && !config.namespaces.contains_key(namespace) {
        return Err(invalid(
            "namespace",
            format!("`{namespace}` is not declared in the config, which is strict"),
        ));
    }
    validate_environment(environment).map_err(|e| invalid("environment", e))?;
    check_served(config, environment)
}

/// A new key's environment must be one a route serves or the config declares: a key for any
/// other (a typo such as `prodution`) would be refused everywhere with `wrong_environment`.
/// A config with no routes and no `environments` has nothing to check against.
fn check_served(config: &Config, environment: &str) -> Result<(), KeyError> {
    let served = config.environments();
    if served.is_empty() || served.contains(&environment) {
        return Ok(());
    }
    let list = served
        .iter()
        .map(|e| format!("`{e}`"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(invalid(
        "environment",
        format!(
            "`{environment}` is not an environment any route serves; choose one of {list} (or declare it under `environments` in the config)"
        ),
    ))
}

/// Refuses to add `adding` keys to a namespace whose tier is full.
fn ensure_capacity(
    op: &Op<'_>,
    records: &mut dyn Records,
    namespace: &str,
    adding: usize,
) -> Result<(), KeyError> {
    let Some(tier) = op
        .config
        .namespaces
        .get(namespace)
        .and_then(|n| n.tier.as_ref())
    else {
        return Ok(());
    };
    let Some(max) = op.config.tiers.get(tier).and_then(|t| t.max_keys) else {
        return Ok(());
    };
    let active = records.counted(namespace, op.now)?;
    if active.saturating_add(adding) > max as usize {
        return Err(KeyError::LimitReached {
            namespace: namespace.into(),
            tier: tier.clone(),
            max,
            active,
        });
    }
    Ok(())
}

/// The store's whole content in the file store's format (`keygate keys export`): hashes
/// only, every field and state, ordered by creation time and then id, whatever the store's
/// kind keeps. Exporting what [`load`] wrote gives the same bytes, in any kind of store.
pub fn export(store: &Store) -> Result<String, KeyError> {
    let (mut file, _) = store.load().map_err(KeyError::Store)?;
    file.keys
        .sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(super::store::render(&file)?)
}

/// What [`load`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub added: usize,
    pub replaced: usize,
}

/// Writes the records of an exported document into the store, whatever its kind: each one
/// replaces the record with its id, or joins the store after the others, as it is (state,
/// times, rotation links). Keys the document does not name are kept. Every record gets the
/// one record check first, and two keys may not share an id or a hash: all or nothing.
pub fn load(op: Op<'_>, incoming: StoreFile) -> Result<Loaded, KeyError> {
    let mut ids = HashSet::with_capacity(incoming.keys.len());
    for (i, r) in incoming.keys.iter().enumerate() {
        let at = |what: String| KeyError::Import(format!("keys[{i}] (id `{}`): {what}", r.id));
        if let Err(problems) = check_record(r, op.config) {
            let all: Vec<String> = problems
                .iter()
                .map(|p| format!("{}: {}", p.path(), p.message))
                .collect();
            return Err(at(all.join("; ")));
        }
        if !ids.insert(r.id.as_str()) {
            return Err(at("another record in the file has this id".into()));
        }
    }
    let sides = [
        (super::Side::Alerts, "name", incoming.alerts),
        (super::Side::Identities, "id", incoming.identities),
        (super::Side::AdminTokens, "name", incoming.admin_tokens),
    ];
    let loaded = transact(op.store, |records| {
        let mut done = Loaded {
            added: 0,
            replaced: 0,
        };
        for r in incoming.keys {
            if records
                .hash_owner(&r.hash)?
                .is_some_and(|owner| owner != r.id)
            {
                return Err(KeyError::Import(format!(
                    "key `{}` has the hash of another key in the store or the file",
                    r.id
                )));
            }
            if records.id_taken(&r.id)? {
                done.replaced = done.replaced.saturating_add(1);
            } else {
                done.added = done.added.saturating_add(1);
            }
            records.put(r)?;
        }
        Ok(done)
    })?;
    // The file's alert rules, identities and admin tokens replace the store's of the same
    // name (or id), and join them otherwise: in a write of their own each, after the keys.
    for (side, name, docs) in sides {
        if docs.is_empty() {
            continue;
        }
        op.store.change_side(side, |stored| {
            for doc in docs {
                match stored.iter_mut().find(|d| d.get(name) == doc.get(name)) {
                    Some(slot) => *slot = doc,
                    None => stored.push(doc),
                }
            }
            Ok(())
        })?;
    }
    Ok(loaded)
}

/// One locked read-modify-write of the store: all of it is written, or none.
fn transact<T>(
    store: &Store,
    change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
) -> Result<T, KeyError> {
    store.transact(change)
}

fn find(records: &mut dyn Records, id: &str) -> Result<KeyRecord, KeyError> {
    records
        .get(id)?
        .ok_or_else(|| KeyError::NotFound(id.to_string()))
}

fn not_revoked(record: &KeyRecord) -> Result<(), KeyError> {
    if record.status == Status::Revoked {
        return Err(KeyError::Revoked(record.id.clone()));
    }
    Ok(())
}

/// Refuses a prefix past the key format's limit: a namespace's prefix and a long environment
/// name can add up to one.
fn check_prefix(prefix: &str) -> Result<(), KeyError> {
    if format::valid_prefix(prefix) {
        return Ok(());
    }
    Err(invalid(
        "environment",
        format!(
            "keys of this namespace and environment would start `{prefix}_`, longer than the {} characters a key prefix may have: use a shorter environment name (or namespace prefix)",
            format::MAX_PREFIX_LEN
        ),
    ))
}

/// A fresh secret with `prefix`, and its `sha256:` hash text.
fn new_secret(prefix: &str) -> Result<(String, String), KeyError> {
    check_prefix(prefix)?;
    let secret = format::generate(prefix).map_err(|e| KeyError::Random(e.to_string()))?;
    let hash = hex(&format::hash(&secret));
    Ok((secret, hash))
}

/// The first 8 hex digits of the hash, lengthened until no other key has it.
fn unique_id(hash_hex: &str, records: &mut dyn Records) -> Result<String, KeyError> {
    for n in 8..hash_hex.len() {
        let id = hash_hex.get(..n).unwrap_or(hash_hex);
        if !records.id_taken(id)? {
            return Ok(id.to_string());
        }
    }
    Ok(hash_hex.to_string())
}

/// Creates a key: returns its record and the secret, which exists nowhere else.
pub fn create(op: Op<'_>, new: NewKey) -> Result<(KeyRecord, String), KeyError> {
    let prefix = new.check(op.config, op.now)?.prefix;
    let (secret, hash) = new_secret(&prefix)?;
    let record = transact(op.store, |records| {
        ensure_capacity(&op, records, &new.namespace, 1)?;
        let id = unique_id(&hash, records)?;
        let record = new.into_record(op.config, op.now, op.actor, id, &hash)?;
        records.put(record.clone())?;
        Ok(record)
    })?;
    Ok((record, secret))
}

/// Disables, enables or revokes a key. Revocation is final; revoking twice is a no-op.
pub fn set_status(op: Op<'_>, id: &str, status: Status) -> Result<KeyRecord, KeyError> {
    transact(op.store, |records| {
        let record = find(records, id)?;
        if record.status == Status::Revoked {
            return if status == Status::Revoked {
                Ok(record)
            } else {
                Err(KeyError::Revoked(id.to_string()))
            };
        }
        let mut next = record.clone();
        next.status = status;
        next.updated_at = Some(rfc3339(op.now));
        if status == Status::Revoked {
            next.revoked_at = Some(rfc3339(op.now));
        }
        let next = checked(next, op.config)?;
        records.put(next.clone())?;
        Ok(next)
    })
}

/// What to do with a key reported leaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakAction {
    /// Revoke it: refused for good from the next request (the default).
    Revoke,
    /// Disable it: refused until an operator enables it.
    Disable,
    /// Only mark it leaked, and tell (audit, alert).
    Report,
}

impl LeakAction {
    pub fn parse(text: &str) -> Result<LeakAction, String> {
        match text {
            "revoke" => Ok(LeakAction::Revoke),
            "disable" => Ok(LeakAction::Disable),
            "report" => Ok(LeakAction::Report),
            other => Err(format!(
                "`{other}` is not an action: revoke, disable or report"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LeakAction::Revoke => "revoke",
            LeakAction::Disable => "disable",
            LeakAction::Report => "report",
        }
    }
}

/// One reported token: its SHA-256 (hex), and the key or admin token it is, if keygate
/// knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeakFound {
    pub token_hash: String,
    /// The key as written after the action; `None` for a token that is not one of ours.
    pub key: Option<KeyRecord>,
    /// The admin token it is, and what was done with it.
    pub admin_token: Option<super::admin_token::LeakedToken>,
}

/// Marks each of `tokens` that is one of the store's keys as leaked at `url`, and takes
/// `action` on it, in one write of the store. Tokens that are no key of ours (another
/// vendor's, made up, or a typo that fails the checksum) change nothing. The tokens
/// themselves are only hashed, never kept or returned.
pub fn leaked(
    op: Op<'_>,
    tokens: &[String],
    action: LeakAction,
    url: &str,
) -> Result<Vec<LeakFound>, KeyError> {
    // A scanner's URL is kept as far as a record can hold it, not refused: the leak matters
    // more than its address.
    let url: String = url
        .chars()
        .filter(|&c| !c.is_control() && !super::check::is_bidi_control(c))
        .take(super::check::MAX_LEAK_URL_CHARS)
        .collect();
    transact(op.store, |records| {
        let mut found = Vec::with_capacity(tokens.len());
        for token in tokens {
            // The hash decides: only a key keygate stores has it (a typo or another
            // vendor's token cannot).
            let token_hash = hex(&format::hash(token));
            let key = match records.hash_owner(&format!("sha256:{token_hash}"))? {
                None => None,
                Some(id) => {
                    let mut next = find(records, &id)?;
                    next.leaked_at = Some(rfc3339(op.now));
                    next.leak_url = (!url.is_empty()).then(|| url.clone());
                    next.updated_at = Some(rfc3339(op.now));
                    match (action, next.status) {
                        (_, Status::Revoked) | (LeakAction::Report, _) => {}
                        (LeakAction::Revoke, _) => {
                            next.status = Status::Revoked;
                            next.revoked_at = Some(rfc3339(op.now));
                        }
                        (LeakAction::Disable, _) => next.status = Status::Inactive,
                    }
                    let next = checked(next, op.config)?;
                    records.put(next.clone())?;
                    Some(next)
                }
            };
            found.push(LeakFound {
                token_hash,
                key,
                admin_token: None,
            });
        }
        Ok(found)
    })
}

/// Gives a key a new secret; the old one is refused from the next request. The id, settings,
/// usage history and rate-limit bucket stay with the key.
pub fn regenerate(op: Op<'_>, id: &str) -> Result<(KeyRecord, String), KeyError> {
    transact(op.store, |records| {
        let record = find(records, id)?;
        not_revoked(&record)?;
        let prefix = prefix_for(op.config, &record.namespace, &record.environment);
        let (secret, hash) = new_secret(&prefix)?;
        let mut next = record.clone();
        next.hash = format!("sha256:{hash}");
        next.prefix = prefix;
        next.imported = false;
        next.regenerated_at = Some(rfc3339(op.now));
        next.updated_at = next.regenerated_at.clone();
        let next = checked(next, op.config)?;
        records.put(next.clone())?;
        Ok((next, secret))
    })
}

/// Replaces a key with a new one of the same settings. The old one keeps working for
/// `grace_secs`, then answers `expired_key`. Returns the new record and secret, and the old
/// record. Rotation is allowed at the tier's limit: the old key is on its way out.
pub fn rotate(
    op: Op<'_>,
    id: &str,
    grace_secs: u64,
) -> Result<(KeyRecord, String, KeyRecord), KeyError> {
    check_grace(grace_secs)?;
    transact(op.store, |records| {
        let old = find(records, id)?;
        not_revoked(&old)?;
        if let Some(next) = &old.rotated_to {
            if old.effective_status(op.now) != "expired" {
                return Err(KeyError::Rotating {
                    id: id.to_string(),
                    next: next.clone(),
                });
            }
        }
        let prefix = prefix_for(op.config, &old.namespace, &old.environment);
        let (secret, hash) = new_secret(&prefix)?;
        let new_id = unique_id(&hash, records)?;
        // The new key gets the old one's lifetime, counted from now.
        let lifetime = old
            .expires_at_unix()
            .zip(parse_rfc3339(&old.created_at).ok())
            .map(|(end, start)| end.saturating_sub(start).max(0));
        let new = KeyRecord {
            id: new_id.clone(),
            hash: format!("sha256:{hash}"),
            prefix,
            imported: false,
            status: Status::Active,
            created_at: rfc3339(op.now),
            created_by: op.actor.to_string(),
            expires_at: lifetime.map(|l| rfc3339(op.now.saturating_add(l).min(LATEST))),
            updated_at: None,
            revoked_at: None,
            regenerated_at: None,
            rotated_from: Some(old.id.clone()),
            rotated_to: None,
            ..old.clone()
        };
        let new = checked(new, op.config)?;
        let grace_end = op
            .now
            .saturating_add(i64::try_from(grace_secs).unwrap_or(i64::MAX));
        let mut retiring = old.clone();
        let ends = retiring
            .expires_at_unix()
            .map_or(grace_end, |t| t.min(grace_end));
        retiring.expires_at = Some(rfc3339(ends));
        retiring.rotated_to = Some(new_id);
        retiring.updated_at = Some(rfc3339(op.now));
        let retiring = checked(retiring, op.config)?;
        records.put(retiring.clone())?;
        records.put(new.clone())?;
        Ok((new, secret, retiring))
    })
}

/// Changes a key's name, scopes, CIDRs, limits, expiry or note.
/// Applies `patch` to the key; returns the key and what really changed (a field sent with
/// the value it already had is not a change), each as `field: old → new`. Nothing is
/// written when nothing changed.
pub fn update(op: Op<'_>, id: &str, patch: KeyPatch) -> Result<(KeyRecord, Vec<String>), KeyError> {
    patch.check(op.now)?;
    transact(op.store, |records| {
        let before = find(records, id)?;
        let mut record = before.clone();
        patch.apply(&mut record, op.config, op.now)?;
        let changes = changes(&before, &record);
        if changes.is_empty() {
            return Ok((before, changes));
        }
        records.put(record.clone())?;
        Ok((record, changes))
    })
}

/// The fields a patch can change that differ between `before` and `after`, each as
/// `field: old → new`, values in JSON and cut to 80 characters. Records hold no secret, so
/// neither does this.
pub fn changes(before: &KeyRecord, after: &KeyRecord) -> Vec<String> {
    fn shown<T: serde::Serialize>(value: &T) -> String {
        let text = serde_json::to_string(value).unwrap_or_default();
        match text.char_indices().nth(80) {
            Some((cut, _)) => format!("{}…", text.get(..cut).unwrap_or_default()),
            None => text,
        }
    }
    let mut out = Vec::new();
    let mut field = |name: &str, old: String, new: String| {
        if old != new {
            out.push(format!("{name}: {old} → {new}"));
        }
    };
    field("name", shown(&before.name), shown(&after.name));
    field("scopes", shown(&before.scopes), shown(&after.scopes));
    field(
        "allowed_cidrs",
        shown(&before.allowed_cidrs),
        shown(&after.allowed_cidrs),
    );
    field(
        "rate_limit",
        shown(&before.rate_limit),
        shown(&after.rate_limit),
    );
    field("burst", shown(&before.burst), shown(&after.burst));
    field(
        "rate_limits",
        shown(&before.rate_limits),
        shown(&after.rate_limits),
    );
    field("identity", shown(&before.identity), shown(&after.identity));
    field("quota", shown(&before.quota), shown(&after.quota));
    field(
        "expires_at",
        shown(&before.expires_at),
        shown(&after.expires_at),
    );
    field("note", shown(&before.note), shown(&after.note));
    field("meta", shown(&before.meta), shown(&after.meta));
    field("credits", shown(&before.credits), shown(&after.credits));
    out
}

/// Reads an import file: one plaintext key per line, or CSV `key,name,scopes` (scopes
/// separated by spaces; a header line starting with `key` is skipped). Blank lines and
/// `#` comments are ignored. Errors name the line, never the key.
pub fn parse_import(text: &str) -> Result<Vec<ImportEntry>, KeyError> {
    let mut entries = Vec::new();
    for (line, raw) in (1usize..).zip(text.lines()) {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let fields =
            split_csv(trimmed).map_err(|e| KeyError::Import(format!("line {line}: {e}")))?;
        // split_csv always gives at least one field.
        let Some((first, rest)) = fields.split_first() else {
            continue;
        };
        if entries.is_empty() && first.eq_ignore_ascii_case("key") {
            continue;
        }
        if fields.len() > 3 {
            return Err(KeyError::Import(format!(
                "line {line}: expected `key[,name[,scopes]]`, found {} fields",
                fields.len()
            )));
        }
        let key = first.trim().to_string();
        if !(8..=512).contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::Import(format!(
                "line {line}: a key must be 8 to 512 visible ASCII characters with no spaces (the key is not shown)"
            )));
        }
        entries.push(ImportEntry {
            line,
            key,
            name: rest
                .first()
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            scopes: rest
                .get(1)
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
        });
    }
    Ok(entries)
}

/// Splits one CSV line, honouring double quotes (`""` is a quote inside quotes).
fn split_csv(line: &str) -> Result<Vec<String>, &'static str> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    if quoted {
        return Err("an opening quote is never closed");
    }
    fields.push(field);
    Ok(fields)
}

/// Imports existing keys in one write of the store. Only their hashes are kept. A key in
/// keygate's own format keeps its prefix and checksum check; a key that carries a keygate
/// prefix but fails the checksum is refused; any other key is marked `imported` and is
/// looked up without the format pre-check.
pub fn import(
    op: Op<'_>,
    namespace: &str,
    environment: &str,
    entries: Vec<ImportEntry>,
) -> Result<Vec<KeyRecord>, KeyError> {
    check_namespace(op.config, namespace, environment)?;
    let bases = prefix_bases(op.config);
    let mut prepared = Vec::with_capacity(entries.len());
    for entry in entries {
        let line = entry.line;
        check_scopes(&entry.scopes).map_err(|e| KeyError::Import(format!("line {line}: {e}")))?;
        check_name(&entry.name).map_err(|e| KeyError::Import(format!("line {line}: {e}")))?;
        let (prefix, imported) = match format::parse(&entry.key) {
            Ok(parsed) => (parsed.prefix.to_string(), false),
            Err(_) if bases.iter().any(|b| entry.key.starts_with(b.as_str())) => {
                return Err(KeyError::Import(format!(
                    "line {line}: the key carries a keygate prefix but fails its checksum (the key is not shown)"
                )));
            }
            Err(_) => (String::new(), true),
        };
        prepared.push((
            line,
            hex(&format::hash(&entry.key)),
            prefix,
            imported,
            entry.name,
            entry.scopes,
        ));
    }
    transact(op.store, |records| {
        ensure_capacity(&op, records, namespace, prepared.len())?;
        let mut added = Vec::with_capacity(prepared.len());
        for (line, hash, prefix, imported, name, scopes) in prepared {
            let hash_text = format!("sha256:{hash}");
            if records.hash_owner(&hash_text)?.is_some() {
                return Err(KeyError::Import(format!(
                    "line {line}: this key is already in the store or earlier in the file"
                )));
            }
            let id = unique_id(&hash, records)?;
            let record = KeyRecord {
                id,
                hash: hash_text,
                prefix,
                name,
                namespace: namespace.to_string(),
                environment: environment.to_string(),
                scopes,
                allowed_cidrs: Vec::new(),
                rate_limit: None,
                burst: None,
                rate_limits: Vec::new(),
                identity: None,
                quota: None,
                expires_at: None,
                status: Status::Active,
                created_at: rfc3339(op.now),
                note: String::new(),
                created_by: op.actor.to_string(),
                updated_at: None,
                revoked_at: None,
                regenerated_at: None,
                meta: None,
                credits: None,
                leaked_at: None,
                leak_url: None,
                rotated_from: None,
                rotated_to: None,
                imported,
            };
            let record = checked(record, op.config)
                .map_err(|e| KeyError::Import(format!("line {line}: {e}")))?;
            records.put(record.clone())?;
            added.push(record);
        }
        Ok(added)
    })
}

/// `kg_` and every namespace's `<prefix>_`: the starts of keygate-format keys.
pub fn prefix_bases(config: &Config) -> Vec<String> {
    let mut bases = vec!["kg_".to_string()];
    bases.extend(
        config
            .namespaces
            .values()
            .filter_map(|n| n.prefix.as_ref())
            .map(|p| format!("{p}_")),
    );
    bases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_lengthen_only_on_collision() {
        let hash = "0123456789abcdef".repeat(4);
        let mut file = StoreFile::default();
        let mut records = super::super::records::DocumentRecords::new(&mut file);
        assert_eq!(unique_id(&hash, &mut records).unwrap(), "01234567");
        records.put(crate::keys::tests::record("01234567")).unwrap();
        assert_eq!(unique_id(&hash, &mut records).unwrap(), "012345678");
    }

    #[test]
    fn checks_need_no_store_and_name_the_field() {
        let config: Config = crate::config::parse_yaml(
            std::path::Path::new("k.yaml"),
            "namespaces: {acme: {prefix: abcdefghijklmnopqrstu}}\n",
        )
        .unwrap();
        let new = |environment: &str| NewKey {
            namespace: "acme".into(),
            environment: environment.into(),
            rate_limit: Some(" 10 / min ".into()),
            expires: Some("1d".into()),
            ..NewKey::default()
        };
        let checked = new("staging").check(&config, 1_000).unwrap();
        assert_eq!(checked.prefix, "abcdefghijklmnopqrstu_test");
        assert_eq!(checked.rate_limit.as_deref(), Some("10/m"));
        assert_eq!(checked.expires_at, Some(1_000 + 86_400));
        // A prefix past the format's 32 characters would make keys that never parse.
        let err = new("abcdefghijk").check(&config, 1_000).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::Invalid {
                    field: "environment",
                    ..
                }
            ),
            "{err}"
        );
        let field = |patch: KeyPatch| match patch.check(1_000) {
            Err(KeyError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(KeyPatch::default()), "body");
        let burst_zero = KeyPatch {
            burst: Some(Some(0)),
            ..KeyPatch::default()
        };
        assert_eq!(field(burst_zero), "burst");
        assert!(matches!(
            check_grace(MAX_GRACE_SECS + 1),
            Err(KeyError::Invalid {
                field: "grace_seconds",
                ..
            })
        ));
    }

    #[test]
    fn import_files_read_plain_and_csv() {
        let text = "# exported from Kong\nkey,name,scopes\nabcdefgh12345678,ci bot,read:/v1/** write:/v1/x\n\"quoted,key123\",\"a \"\"b\"\"\",\nplainkey0000001\n\n";
        let entries = parse_import(text).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].scopes, ["read:/v1/**", "write:/v1/x"]);
        assert_eq!(entries[0].name, "ci bot");
        assert_eq!(entries[1].key, "quoted,key123");
        assert_eq!(entries[1].name, "a \"b\"");
        assert_eq!(
            (entries[2].line, entries[2].key.as_str()),
            (5, "plainkey0000001")
        );
    }

    #[test]
    fn import_errors_name_the_line_never_the_key() {
        let err = parse_import("good-key-1234\nshort\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("line 2:") && !err.contains("short"),
            "{err}"
        );
        let err = parse_import("\"unclosed-secret-key\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("unclosed-secret-key"), "{err}");
    }
}
