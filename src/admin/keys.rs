//! The key-management routes: list, create, read, update, revoke, disable/enable,
//! regenerate, rotate; namespaces with their tier usage; the audit log.
//!
//! Writes go through the same lifecycle module as the CLI, on a blocking thread, and the
//! gateway reloads before answering, so a change is live when the API says it is done.

use std::collections::{BTreeMap, HashMap};

use http::header::{HeaderValue, LOCATION};
use http::{Response, StatusCode};
use serde::Deserialize;

use super::{json, Call};
use crate::audit::{self, AuditEvent};
use crate::body::ResponseBody;
use crate::clock::rfc3339;
use crate::keys::lifecycle::Op;
use crate::keys::{self, set_member, KeyError, KeyPatch, KeyRecord, ListQuery, NewKey, Status};
use crate::rejection::Rejection;
use crate::reload::Wrote;
use crate::state::usage::UsageReport;

pub(crate) type Answer = Result<Response<ResponseBody>, Rejection>;

/// `POST /v1/api-keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    namespace: String,
    environment: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    allowed_cidrs: Vec<String>,
    #[serde(default)]
    rate_limit: Option<String>,
    #[serde(default)]
    burst: Option<u32>,
    /// Named limits beside `rate_limit`, all spent together or not at all.
    #[serde(default)]
    rate_limits: Vec<crate::keys::NamedLimitRecord>,
    /// The customer the key belongs to.
    #[serde(default)]
    identity: Option<String>,
    /// `N/day` or `N/month`.
    #[serde(default)]
    quota: Option<String>,
    /// RFC 3339, or a duration from now such as `30d`.
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    note: String,
    /// A JSON object, at most 4 KiB as JSON.
    #[serde(default)]
    meta: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    credits: Option<CreditsBody>,
}

/// Credits as a body gives them: the balance, and the refill.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreditsBody {
    remaining: u64,
    #[serde(default)]
    refill: Option<crate::keys::RefillRecord>,
}

impl From<CreditsBody> for crate::keys::CreditsRecord {
    fn from(body: CreditsBody) -> Self {
        crate::keys::CreditsRecord {
            remaining: body.remaining,
            refill: body.refill,
            set_at: None,
            version: 0,
        }
    }
}

/// `PATCH /v1/api-keys/{id}`: absent fields stay, `null` clears an optional one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    #[serde(default, deserialize_with = "present")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    scopes: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    allowed_cidrs: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    burst: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    rate_limits: Option<Option<Vec<crate::keys::NamedLimitRecord>>>,
    #[serde(default, deserialize_with = "present")]
    identity: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    quota: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    note: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    meta: Option<Option<serde_json::Map<String, serde_json::Value>>>,
    #[serde(default, deserialize_with = "present")]
    credits: Option<Option<CreditsBody>>,
}

impl From<CreateBody> for NewKey {
    fn from(body: CreateBody) -> NewKey {
        NewKey {
            namespace: body.namespace,
            environment: body.environment,
            name: body.name,
            scopes: body.scopes,
            allowed_cidrs: body.allowed_cidrs,
            rate_limit: body.rate_limit,
            burst: body.burst,
            rate_limits: body.rate_limits,
            identity: body.identity,
            quota: body.quota,
            expires: body.expires_at,
            note: body.note,
            meta: body.meta,
            credits: body.credits.map(Into::into),
        }
    }
}

impl From<PatchBody> for KeyPatch {
    /// `null` clears: an empty name, list or note.
    fn from(body: PatchBody) -> KeyPatch {
        KeyPatch {
            name: body.name.map(Option::unwrap_or_default),
            scopes: body.scopes.map(Option::unwrap_or_default),
            allowed_cidrs: body.allowed_cidrs.map(Option::unwrap_or_default),
            rate_limit: body.rate_limit,
            burst: body.burst,
            rate_limits: body.rate_limits.map(Option::unwrap_or_default),
            identity: body.identity,
            quota: body.quota,
            expires: body.expires_at,
            note: body.note.map(Option::unwrap_or_default),
            meta: body.meta,
            credits: body.credits.map(|c| c.map(Into::into)),
        }
    }
}

/// Tells a present `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /v1/api-keys/{id}/rotate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateBody {
    /// Seconds the old key keeps working. Default: `rotation.default_grace`.
    #[serde(default)]
    pub(crate) grace_seconds: Option<u64>,
}

/// Runs a lifecycle operation for the call and makes what it wrote live.
async fn change<T: Wrote + Send + 'static>(
    call: &Call<'_>,
    operation: impl FnOnce(Op<'_>) -> Result<T, KeyError> + Send + 'static,
) -> Result<(T, Vec<String>), Rejection> {
    crate::reload::change_keys(call.gw, &call.actor, operation).await
}

/// Reads the key the call names from the store, on a blocking thread.
async fn record(call: &Call<'_>) -> Result<KeyRecord, Rejection> {
    let store = call.gw.snapshot.load().store.clone();
    let id = call.id.to_string();
    tokio::task::spawn_blocking(move || store.get(&id))
        .await
        .map_err(|_| Rejection::Internal)??
        .ok_or(Rejection::KeyNotFound)
}

/// With a Redis store: today's usage of `ids` summed over every node. Empty otherwise, or
/// when Redis cannot be reached (then each view shows this node's own counts).
pub(super) async fn shared_usage(
    call: &Call<'_>,
    ids: Vec<String>,
) -> HashMap<String, UsageReport> {
    let snapshot = call.gw.snapshot.load_full();
    if snapshot.store.redis().is_none() {
        return HashMap::new();
    }
    let now = call.gw.clock.unix_secs();
    let read = tokio::task::spawn_blocking(move || match snapshot.store.redis() {
        Some(redis) => crate::shared_usage::read(redis, &ids, now),
        None => Ok(HashMap::new()),
    });
    match read.await {
        Ok(Ok(map)) => map,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "usage across nodes unavailable; showing this node's");
            HashMap::new()
        }
        Err(_) => HashMap::new(),
    }
}

/// A key's usage as this node counted it.
pub(super) fn local_usage(call: &Call<'_>, id: &str, now: i64) -> UsageReport {
    call.gw
        .usage
        .get(id)
        .map(|u| u.report(now))
        .unwrap_or_default()
}

/// `shared` (usage over every node) with this node's per-minute series, and the later of
/// the two last uses (this node's may not be pushed yet).
pub(super) fn merged(mut shared: UsageReport, local: UsageReport) -> UsageReport {
    shared.series = local.series;
    let local_at = local.last_use.as_ref().map(|u| u.at);
    if local_at > shared.last_use.as_ref().map(|u| u.at) {
        shared.last_use = local.last_use;
    }
    shared
}

/// A view with usage summed over every node, when there is such a sum.
fn with_shared(
    call: &Call<'_>,
    mut v: serde_json::Value,
    shared: Option<&UsageReport>,
) -> serde_json::Value {
    let (Some(shared), Some(id)) = (shared, v.get("id").and_then(|id| id.as_str())) else {
        return v;
    };
    let now = call.gw.clock.unix_secs();
    let r = merged(shared.clone(), local_usage(call, id, now));
    copy_counts(&mut v, &r.counts_json());
    set_member(
        &mut v,
        "last_used_at",
        r.last_use.as_ref().map(|u| rfc3339(u.at)),
    );
    set_member(
        &mut v,
        "last_used_ip",
        r.last_use.as_ref().and_then(|u| u.ip.clone()),
    );
    v
}

/// Copies today's request count and error rate from `counts` into `v`.
fn copy_counts(v: &mut serde_json::Value, counts: &serde_json::Value) {
    for name in ["requests_today", "error_rate"] {
        set_member(v, name, counts.get(name).cloned().unwrap_or_default());
    }
}

/// A key's record as the API shows it, with today's request count and error rate.
fn view(call: &Call<'_>, record: &KeyRecord) -> serde_json::Value {
    let quiet = call.gw.snapshot.load().config.quiet_period_secs();
    let now = call.gw.clock.unix_secs();
    let mut v = record.view(now, call.gw.usage.last_use(&record.id).as_ref(), quiet);
    copy_counts(&mut v, &local_usage(call, &record.id, now).counts_json());
    if let Some(c) = record.credits.as_ref() {
        if let Ok(credits) = crate::keys::check::check_credits(c) {
            let stored = v.get("credits").cloned().unwrap_or_default();
            let shown = call.gw.credits.show(&record.id, &stored, &credits, now);
            set_member(&mut v, "credits", shown);
        }
    }
    v
}

fn with_secret(
    mut v: serde_json::Value,
    secret: String,
    warnings: Vec<String>,
) -> serde_json::Value {
    set_member(&mut v, "key", secret);
    with_warnings(v, warnings)
}

fn with_warnings(mut v: serde_json::Value, warnings: Vec<String>) -> serde_json::Value {
    if !warnings.is_empty() {
        set_member(&mut v, "warnings", warnings);
    }
    v
}

pub(crate) fn created(v: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = json(StatusCode::CREATED, v);
    if let Some(location) = v
        .get("id")
        .and_then(|id| id.as_str())
        .and_then(|id| HeaderValue::from_str(&format!("/v1/api-keys/{id}")).ok())
    {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

/// Decoded query parameters (`+` and `%XX` understood).
fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A query-string member decoded: `+` is a space, and a `%` that starts no escape, or bytes
/// that are not UTF-8, are kept as they come (replaced).
pub(crate) fn decode(s: &str) -> String {
    let (bytes, _) = percent_decode(s, true);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A path segment decoded: `+` is itself, and a bad escape or bytes that are not UTF-8 make
/// it `None`, for the caller to refuse.
pub(crate) fn decode_path(s: &str) -> Option<String> {
    match percent_decode(s, false) {
        (bytes, true) => String::from_utf8(bytes).ok(),
        (_, false) => None,
    }
}

/// `s` with its `%XX` escapes decoded (and `+` as a space when `plus_is_space`), and whether
/// every `%` started an escape.
fn percent_decode(s: &str, plus_is_space: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(s.len());
    let mut valid = true;
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        match b {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let escaped = tail
                    .split_first_chunk::<2>()
                    .and_then(|(hex, after)| Some((escaped_byte(hex)?, after)));
                match escaped {
                    Some((byte, after)) => {
                        out.push(byte);
                        rest = after;
                    }
                    None => {
                        valid = false;
                        out.push(b'%');
                    }
                }
            }
            b => out.push(b),
        }
    }
    (out, valid)
}

/// The byte two hex digits stand for.
fn escaped_byte(hex: &[u8; 2]) -> Option<u8> {
    // from_str_radix alone would read `+1` as 1.
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

fn bad_param(field: &str, detail: impl Into<String>) -> Rejection {
    Rejection::InvalidRequest {
        field: Some(field.into()),
        detail: detail.into(),
    }
}

fn limit_param(
    params: &BTreeMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, Rejection> {
    match params.get("limit") {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                bad_param(
                    "limit",
                    format!("limit must be a whole number from 1 to {max}"),
                )
            }),
    }
}

/// `GET /v1/api-keys?status=&search=&namespace=&limit=&cursor=`, newest first.
pub(crate) async fn list(call: &Call<'_>, query: &str) -> Answer {
    let params = query_params(query);
    let status = params.get("status").map(String::as_str).unwrap_or("active");
    if !["active", "inactive", "expired", "revoked", "all"].contains(&status) {
        return Err(bad_param(
            "status",
            "status must be one of active, inactive, expired, revoked, all",
        ));
    }
    let limit = limit_param(&params, 50, 500)?;
    let search = params
        .get("search")
        .map(|s| s.to_lowercase())
        .filter(|s| !s.is_empty());
    let namespace = params.get("namespace").filter(|s| !s.is_empty());
    let identity = match params.get("identity").filter(|s| !s.is_empty()) {
        Some(id) => match crate::keys::identity::id_problem(id) {
            Some(e) => return Err(bad_param("identity", &e)),
            None => Some(id.clone()),
        },
        None => None,
    };
    // The cursor is the sort position of the last key shown (`<created_at>~<id>`), so a page
    // boundary survives keys changing status or going away in between.
    let after = match params.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(cursor) => {
            let not_ours = || {
                bad_param(
                    "cursor",
                    "the cursor is not from this listing; start again without it",
                )
            };
            // `<created_at>~<id>`: an id is lowercase hex.
            let (at, id) = cursor
                .split_once('~')
                .filter(|(at, id)| {
                    !at.is_empty()
                        && !id.is_empty()
                        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                })
                .ok_or_else(not_ours)?;
            Some((at.to_string(), id.to_string()))
        }
    };
    let query = ListQuery {
        status: status.to_string(),
        namespace: namespace.cloned(),
        search,
        identity,
        limit,
        after,
        now: call.gw.clock.unix_secs(),
    };
    let store = call.gw.snapshot.load().store.clone();
    let (page, more) = tokio::task::spawn_blocking(move || store.list(&query))
        .await
        .map_err(|_| Rejection::Internal)??;
    let next_cursor = more
        .then(|| page.last().map(|r| format!("{}~{}", r.created_at, r.id)))
        .flatten();
    let shared = shared_usage(call, page.iter().map(|r| r.id.clone()).collect()).await;
    let left = shared_credits_left(call, &page).await;
    let views: Vec<_> = page
        .iter()
        .map(|r| {
            let v = with_shared(call, view(call, r), shared.get(&r.id));
            with_credits_left(v, left.get(&r.id).copied())
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"keys": views, "next_cursor": next_cursor}),
    ))
}

/// `GET /v1/api-keys/{id}`.
pub(crate) async fn get(call: &Call<'_>) -> Answer {
    let record = &record(call).await?;
    let shared = shared_usage(call, vec![record.id.clone()]).await;
    let left = shared_credits_left(call, std::slice::from_ref(record)).await;
    let v = with_shared(call, view(call, record), shared.get(&record.id));
    Ok(json(
        StatusCode::OK,
        &with_credits_left(v, left.get(&record.id).copied()),
    ))
}

/// With shared limits (Redis): what each record's credits have left, as Redis counts them
/// for every node. Empty without shared limits (this node's book is the count, and `view`
/// reads it), or when Redis cannot be reached.
async fn shared_credits_left(call: &Call<'_>, records: &[KeyRecord]) -> HashMap<String, u64> {
    let with = records
        .iter()
        .filter_map(|r| {
            let c = crate::keys::check::check_credits(r.credits.as_ref()?).ok()?;
            Some((r.id.clone(), c))
        })
        .collect();
    credits_left_in_redis(call, with).await
}

/// With shared limits (Redis): what the credits of each of `with` (where Redis counts
/// them, and their setting) have left, as Redis counts them. Empty without shared limits,
/// or when Redis cannot be reached.
pub(super) async fn credits_left_in_redis(
    call: &Call<'_>,
    with: Vec<(String, crate::policy::credits::Credits)>,
) -> HashMap<String, u64> {
    let snapshot = call.gw.snapshot.load_full();
    let Some(shared) = &snapshot.shared_limits else {
        return HashMap::new();
    };
    let now = call.gw.clock.unix_secs();
    let keys: Vec<(&str, &crate::policy::credits::Credits)> =
        with.iter().map(|(id, c)| (id.as_str(), c)).collect();
    let read = tokio::time::timeout(shared.settings().timeout, shared.credits_spent(&keys, now));
    match read.await {
        Ok(Ok(spent)) => with
            .iter()
            .zip(spent)
            .map(|((id, c), spent)| (id.clone(), c.balance(now).budget.saturating_sub(spent)))
            .collect(),
        _ => HashMap::new(),
    }
}

/// `v` with `credits.remaining` set to `left`, when it is known.
pub(super) fn with_credits_left(mut v: serde_json::Value, left: Option<u64>) -> serde_json::Value {
    if let (Some(left), Some(credits)) =
        (left, v.get_mut("credits").and_then(|c| c.as_object_mut()))
    {
        credits.insert("remaining".into(), left.into());
    }
    v
}

/// `POST /v1/api-keys`: 201 with the record and, this once, the secret.
pub(crate) async fn create(call: &Call<'_>, body: CreateBody) -> Answer {
    let new = NewKey::from(body);
    let ((record, secret), warnings) = change(call, move |op| keys::create(op, new)).await?;
    call.audit(AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, "key.created").key(&record));
    Ok(created(&with_secret(view(call, &record), secret, warnings)))
}

/// `PATCH /v1/api-keys/{id}`.
pub(crate) async fn update(call: &Call<'_>, body: PatchBody) -> Answer {
    let patch = KeyPatch::from(body);
    let id = call.id.clone();
    let ((record, changes), mut warnings) =
        change(call, move |op| keys::update(op, &id, patch)).await?;
    let takes_effect = [
        "scopes",
        "allowed_cidrs",
        "rate_limit",
        "burst",
        "quota",
        "expires_at",
    ];
    if changes
        .iter()
        .any(|c| takes_effect.iter().any(|f| c.starts_with(&format!("{f}:"))))
    {
        warnings.insert(
            0,
            "the new scopes, addresses, limits or expiry apply from the next request: calls that passed before may start failing".into(),
        );
    }
    if !changes.is_empty() {
        call.audit(
            AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, "key.updated")
                .key(&record)
                .reason(changes.join("; ")),
        );
    }
    Ok(json(
        StatusCode::OK,
        &with_warnings(view(call, &record), warnings),
    ))
}

/// `POST /v1/api-keys/{id}/credits`: `{"add": N}` or `{"set": N}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreditsTopUp {
    #[serde(default, deserialize_with = "not_null")]
    add: Option<u64>,
    #[serde(default, deserialize_with = "not_null")]
    set: Option<u64>,
}

/// An optional member that may be absent but not `null`: the schema gives it no null, and a
/// null read as absent would let `{"add": 5, "set": null}` through as a plain top-up.
fn not_null<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `POST /v1/api-keys/{id}/credits`: tops a key's credits up (`add`) or sets them (`set`);
/// the key, with what it has left.
pub(crate) async fn top_up(call: &Call<'_>, body: CreditsTopUp) -> Answer {
    use crate::keys::lifecycle::TopUp;
    let how = match (body.add, body.set) {
        (Some(n), None) => TopUp::Add(n),
        (None, Some(n)) => TopUp::Set(n),
        _ => {
            return Err(Rejection::InvalidRequest {
                field: Some("body".into()),
                detail: "give exactly one of add and set".into(),
            })
        }
    };
    let id = call.id.clone();
    let gw = call.gw.clone();
    let now = call.gw.clock.unix_secs();
    // With shared limits, Redis's count; else this node's.
    let shared_left = shared_credits_left(call, std::slice::from_ref(&record(call).await?)).await;
    let ((record, before), warnings) = change(call, move |op| {
        keys::top_up(op, &id, how, |r| match shared_left.get(&r.id) {
            Some(left) => *left,
            None => r
                .credits
                .as_ref()
                .and_then(|c| crate::keys::check::check_credits(c).ok())
                .map_or(0, |c| gw.credits.left(&r.id, &c, now)),
        })
    })
    .await?;
    let said = match how {
        TopUp::Add(n) => format!("added {n}"),
        TopUp::Set(n) => format!("set to {n}"),
    };
    let was = before.map_or(0, |c| c.remaining);
    call.audit(
        AuditEvent::new(now, &call.actor, "key.credits_set")
            .key(&record)
            .reason(format!("{said}; the balance as set was {was}")),
    );
    let left = shared_credits_left(call, std::slice::from_ref(&record)).await;
    Ok(json(
        StatusCode::OK,
        &with_credits_left(
            with_warnings(view(call, &record), warnings),
            left.get(&record.id).copied(),
        ),
    ))
}

/// The most tokens one report may carry: a full report fits the 1 MiB body.
const MAX_LEAKED_TOKENS: usize = 1_000;
/// The longest token looked at, in characters: keygate's keys have at most 72.
const MAX_LEAKED_TOKEN_CHARS: usize = 128;

/// `POST /v1/api-keys/leaked`: `{"keys": [...], "action"?, "source"?}`. Each token that is
/// one of keygate's keys is marked leaked and revoked (or disabled, or only reported), as the
/// GitHub endpoint does; the answer labels each by its hash, never the token.
pub(crate) async fn leaked(call: &Call<'_>, body: crate::scanning::ReportBody) -> Answer {
    let invalid = |field: &str, detail: String| Rejection::InvalidRequest {
        field: Some(field.into()),
        detail,
    };
    if body.keys.is_empty() || body.keys.len() > MAX_LEAKED_TOKENS {
        return Err(invalid(
            "keys",
            format!(
                "give 1 to {MAX_LEAKED_TOKENS} keys; this has {}",
                body.keys.len()
            ),
        ));
    }
    if body
        .keys
        .iter()
        .any(|k| k.chars().count() > MAX_LEAKED_TOKEN_CHARS)
    {
        return Err(invalid(
            "keys",
            format!("each key is at most {MAX_LEAKED_TOKEN_CHARS} characters"),
        ));
    }
    let action = match body.action.as_deref() {
        None => keys::LeakAction::Revoke,
        Some(a) => keys::LeakAction::parse(a).map_err(|e| invalid("action", e))?,
    };
    let source = body.source.unwrap_or_default();
    if let Err(e) = keys::check::check_text(&source, keys::check::MAX_LEAK_URL_CHARS, false) {
        return Err(invalid("source", e));
    }
    let (found, warnings) =
        crate::scanning::report(call.gw, body.keys, action, &source, &call.actor).await?;
    Ok(json(
        StatusCode::OK,
        &with_warnings(crate::scanning::answer(&found, action), warnings),
    ))
}

/// `DELETE /v1/api-keys/{id}` (revoke), `POST …/disable`, `POST …/enable`.
pub(crate) async fn set_status(call: &Call<'_>, status: Status) -> Answer {
    let id = call.id.clone();
    let (record, warnings) = change(call, move |op| keys::set_status(op, &id, status)).await?;
    let action = match status {
        Status::Revoked => "key.revoked",
        Status::Inactive => "key.disabled",
        Status::Active => "key.enabled",
    };
    call.audit(AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, action).key(&record));
    Ok(json(
        StatusCode::OK,
        &with_warnings(view(call, &record), warnings),
    ))
}

/// `POST /v1/api-keys/{id}/regenerate`: the record and, this once, the new secret.
pub(crate) async fn regenerate(call: &Call<'_>) -> Answer {
    let id = call.id.clone();
    let ((record, secret), mut warnings) =
        change(call, move |op| keys::regenerate(op, &id)).await?;
    warnings.insert(
        0,
        "the old secret stopped working: clients still using it get 401 unknown_key".into(),
    );
    call.audit(
        AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, "key.regenerated").key(&record),
    );
    Ok(json(
        StatusCode::OK,
        &with_secret(view(call, &record), secret, warnings),
    ))
}

/// `POST /v1/api-keys/{id}/rotate` with `{"grace_seconds": N}`: 201 with the new key's record
/// and secret, and the old key's record as `previous_key`.
pub(crate) async fn rotate(call: &Call<'_>, body: RotateBody) -> Answer {
    let default_grace = crate::config::units::parse_duration(
        &call.gw.snapshot.load().config.rotation.default_grace,
    )
    .map_or(86_400, |d| d.as_secs());
    let grace = body.grace_seconds.unwrap_or(default_grace);
    let id = call.id.clone();
    let ((new, secret, old), warnings) =
        change(call, move |op| keys::rotate(op, &id, grace)).await?;
    call.audit(
        AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, "key.created")
            .key(&new)
            .rotated_from(&old.id),
    );
    call.audit(
        AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, "key.rotated")
            .key(&old)
            .reason(format!(
                "replaced by {}; the old key works until {}",
                new.id,
                old.expires_at.as_deref().unwrap_or("now")
            )),
    );
    let mut v = with_secret(view(call, &new), secret, warnings);
    set_member(&mut v, "previous_key", view(call, &old));
    Ok(created(&v))
}

/// `GET /v1/namespaces`: each namespace with its tier, limit and keys in use.
pub(crate) async fn namespaces(call: &Call<'_>) -> Answer {
    let snapshot = call.gw.snapshot.load_full();
    let config = &snapshot.config;
    let now = call.gw.clock.unix_secs();
    let store = snapshot.store.clone();
    let counts = tokio::task::spawn_blocking(move || store.namespace_counts(now))
        .await
        .map_err(|_| Rejection::Internal)??;
    let mut names: Vec<&str> = config.namespaces.keys().map(String::as_str).collect();
    names.extend(counts.keys().map(String::as_str));
    names.sort_unstable();
    names.dedup();
    let list: Vec<_> = names
        .into_iter()
        .map(|name| {
            let declared = config.namespaces.get(name);
            let tier = declared.and_then(|n| n.tier.clone());
            let max_keys = tier
                .as_ref()
                .and_then(|t| config.tiers.get(t))
                .and_then(|t| t.max_keys);
            let in_use = counts.get(name).copied().unwrap_or(0);
            serde_json::json!({
                "name": name,
                "declared": declared.is_some(),
                "tier": tier,
                "max_keys": max_keys,
                "keys_in_use": in_use,
                "prefix": declared.and_then(|n| n.prefix.clone()).unwrap_or_else(|| "kg".into()),
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"namespaces": list, "environments": config.environments()}),
    ))
}

/// `GET /v1/audit?limit=&key_id=&action=`, newest first.
pub(crate) async fn audit(call: &Call<'_>, query: &str) -> Answer {
    let params = query_params(query);
    let filter = audit::Filter {
        limit: limit_param(&params, 100, 1000)?,
        key_id: params.get("key_id").filter(|s| !s.is_empty()).cloned(),
        action: params.get("action").filter(|s| !s.is_empty()).cloned(),
        since: time_param(&params, "since")?,
        until: time_param(&params, "until")?,
    };
    let gw = call.gw.clone();
    // Flush first, so the answer includes every event recorded so far.
    let events = tokio::task::spawn_blocking(move || {
        gw.audit.flush();
        audit::read(gw.audit.path(), &filter)
    })
    .await
    .map_err(|_| Rejection::Internal)?
    .map_err(|e| {
        tracing::error!(error = %e, "audit log unreadable");
        Rejection::Internal
    })?;
    Ok(json(StatusCode::OK, &serde_json::json!({"events": events})))
}

/// An RFC 3339 time in the query, as Unix seconds.
fn time_param(params: &BTreeMap<String, String>, name: &str) -> Result<Option<i64>, Rejection> {
    match params.get(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => crate::clock::parse_rfc3339(v).map(Some).map_err(|_| {
            bad_param(
                name,
                format!("{name} must be an RFC 3339 time, such as 2026-12-07T09:00:00Z"),
            )
        }),
    }
}

/// `GET /v1/api-keys/{id}/requests?since=&until=&status=`: the key's recent requests, newest
/// first. `status` is a status (`401`) or a class (`4xx`).
pub(crate) async fn key_requests(call: &Call<'_>, query: &str) -> Answer {
    let params = query_params(query);
    let since = time_param(&params, "since")?.map_or(i64::MIN, |s| s.saturating_mul(1000));
    // Until the end of the second named.
    let until = time_param(&params, "until")?
        .map_or(i64::MAX, |u| u.saturating_mul(1000).saturating_add(999));
    let status = match params.get("status").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(status_filter(v).ok_or_else(|| {
            bad_param(
                "status",
                "status must be a status from 100 to 599, or a class such as 4xx",
            )
        })?),
    };
    let record = record(call).await?;
    let entries = match call.gw.usage.get(&record.id) {
        Some(usage) => crate::state::history::History::of(
            &usage,
            since,
            until,
            |s| status.is_none_or(|(lo, hi)| (lo..=hi).contains(&s)),
            usize::MAX,
        ),
        None => Vec::new(),
    };
    let requests: Vec<serde_json::Value> = entries.iter().map(|e| e.to_json()).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "requests": requests }),
    ))
}

/// `401` → 401..=401; `4xx` → 400..=499.
fn status_filter(text: &str) -> Option<(u16, u16)> {
    if let Ok(n) = text.parse::<u16>() {
        return (100..=599).contains(&n).then_some((n, n));
    }
    let class = text
        .strip_suffix("xx")
        .or_else(|| text.strip_suffix("XX"))?;
    let c = class.parse::<u16>().ok().filter(|c| (1..=5).contains(c))?;
    Some((
        c.saturating_mul(100),
        c.saturating_mul(100).saturating_add(99),
    ))
}

/// A key's usage report as JSON, with its quota's state when it has one. `shared`: its usage
/// summed over every node, when the store is in Redis.
fn usage_json(
    call: &Call<'_>,
    id: &str,
    namespace: &str,
    now: i64,
    shared: Option<UsageReport>,
) -> serde_json::Value {
    let snapshot = call.gw.snapshot.load();
    let local = local_usage(call, id, now);
    let report = match shared {
        Some(shared) => merged(shared, local),
        None => local,
    };
    let mut v = report.to_json(now);
    set_member(&mut v, "key_id", id);
    set_member(&mut v, "namespace", namespace);
    if let Some(key) = snapshot.key_by_id(id) {
        if let Some(quota) = key.quota() {
            set_member(
                &mut v,
                "quota",
                quota_state(&quota, |p| key.quota_used(p), now),
            );
        }
    }
    v
}

/// A quota's state now, as the usage routes show it; `used_in` counts a period.
pub(super) fn quota_state(
    quota: &crate::policy::quota::Quota,
    used_in: impl Fn(i64) -> u64,
    now: i64,
) -> serde_json::Value {
    let (period, end) = quota.window(now);
    serde_json::json!({
        "quota": quota.to_string(),
        "limit": quota.limit,
        "used": used_in(period),
        "resets_at": crate::clock::rfc3339(end),
    })
}

/// `GET /v1/api-keys/{id}/usage`.
pub(crate) async fn key_usage(call: &Call<'_>) -> Answer {
    let record = record(call).await?;
    let now = call.gw.clock.unix_secs();
    let shared = shared_usage(call, vec![record.id.clone()])
        .await
        .remove(&record.id);
    Ok(json(
        StatusCode::OK,
        &usage_json(call, &record.id, &record.namespace, now, shared),
    ))
}

/// Today's sums over some keys, and how many of them were used.
#[derive(Default)]
struct Totals {
    counts: crate::state::usage::UsageReport,
    keys_used: u64,
}

impl Totals {
    fn add(&mut self, r: &crate::state::usage::UsageReport) {
        self.counts.add_counts(r);
        self.keys_used = self.keys_used.saturating_add(1);
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = self.counts.counts_json();
        set_member(&mut v, "keys_used_today", self.keys_used);
        v
    }
}

/// `GET /v1/usage?namespace=&top=`: today's totals, org-wide and by namespace, with the top
/// keys by traffic and by error rate.
pub(crate) async fn org_usage(call: &Call<'_>, query: &str) -> Answer {
    let params = query_params(query);
    let top = match params.get("top") {
        None => 10,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| bad_param("top", "top must be a whole number from 1 to 100"))?,
    };
    let only = params.get("namespace").filter(|s| !s.is_empty());
    let now = call.gw.clock.unix_secs();
    let snapshot = call.gw.snapshot.load_full();
    let mut org = Totals::default();
    let mut by_ns: BTreeMap<String, Totals> = BTreeMap::new();
    let mut per_key = Vec::new();
    // Only keys that were ever used have a cell: the report costs what the traffic made, not
    // what the key count is.
    let cells = call.gw.usage.all();
    for (key, cell) in cells.iter().filter_map(|(id, cell)| {
        let key = snapshot.key_by_id(id)?;
        only.is_none_or(|ns| key.namespace.as_str() == ns.as_str())
            .then_some((key, cell))
    }) {
        let r = cell.report(now);
        if r.requests() == 0 {
            continue;
        }
        org.add(&r);
        by_ns.entry(key.namespace.to_string()).or_default().add(&r);
        per_key.push((
            key.id.to_string(),
            key.namespace.to_string(),
            r.requests(),
            r.error_rate(),
        ));
    }
    let entry = |(id, ns, requests, rate): &(String, String, u64, f64)| {
        serde_json::json!({
            "key_id": id,
            "namespace": ns,
            "requests_today": requests,
            "error_rate": (rate * 10_000.0).round() / 10_000.0,
        })
    };
    per_key.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    let by_traffic: Vec<_> = per_key.iter().take(top).map(entry).collect();
    // The error rate of a key with a handful of requests says little: at least 10 are needed.
    let mut by_errors: Vec<_> = per_key.iter().filter(|k| k.2 >= 10 && k.3 > 0.0).collect();
    by_errors.sort_by(|a, b| b.3.total_cmp(&a.3).then_with(|| a.0.cmp(&b.0)));
    let by_errors: Vec<_> = by_errors.into_iter().take(top).map(entry).collect();
    let namespaces: Vec<_> = by_ns
        .iter()
        .map(|(name, t)| {
            let mut v = t.to_json();
            set_member(&mut v, "namespace", name.clone());
            v
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "date": crate::clock::date(now),
            "totals": org.to_json(),
            "namespaces": namespaces,
            "top_by_requests": by_traffic,
            "top_by_error_rate": by_errors,
            "by_code_today": org.counts.by_code.iter().filter(|(_, n)| **n > 0).collect::<BTreeMap<_, _>>(),
            "series": org.counts.series_json(),
            "unidentified_refusals_today": call.gw.usage.anonymous.report(now).by_code,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let p = query_params("search=ci+bot%21&status=all&empty=&bad=%zz&tail=%4");
        assert_eq!(p["search"], "ci bot!");
        assert_eq!(p["status"], "all");
        assert_eq!(p["empty"], "");
        assert_eq!(p["bad"], "%zz");
        assert_eq!(p["tail"], "%4");
        // Not the byte 0x01: `+` is not a hex digit, so the `%` stays and `+` is a space.
        assert_eq!(query_params("a=%+1")["a"], "% 1");
        let p = query_params("e=%C3%A9&pct=%&two=%%41");
        assert_eq!(p["e"], "é");
        assert_eq!(p["pct"], "%");
        assert_eq!(p["two"], "%A");
    }

    #[test]
    fn path_ids_decode_strictly() {
        assert_eq!(decode_path("a+b").as_deref(), Some("a+b"));
        assert_eq!(decode_path("a%2Bb%20c").as_deref(), Some("a+b c"));
        assert_eq!(decode_path("caf%C3%A9").as_deref(), Some("café"));
        for bad in ["%FF", "%zz", "a%", "%4", "%C3"] {
            assert_eq!(decode_path(bad), None, "{bad}");
        }
    }
}
