//! The admin listener: probes, reload, and the key-management API. Every route but the probes
//! and the OpenAPI document needs an admin token (`Authorization: Bearer <token>`), compared
//! in constant time against the SHA-256 of each token (the config's, `KEYGATE_ADMIN_TOKEN`'s
//! and the store's); an expired one is refused like a wrong one. The token's name is the
//! actor in the audit log.

mod alerts;
mod console;
mod identities;
mod keys;
mod tokens;
mod verify;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;

use crate::audit::AuditEvent;
use crate::body::ResponseBody;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::keys::format;
use crate::keys::lifecycle::{check_grace, CheckedKey, CheckedPatch};
use crate::keys::{KeyPatch, NewKey};
use crate::rejection::Rejection;
use crate::reload::Trigger;
use crate::snapshot::{AdminToken, Role};

/// Every admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    OpenApi,
    Reload,
    ListKeys,
    CreateKey,
    GetKey,
    UpdateKey,
    RevokeKey,
    RegenerateKey,
    RotateKey,
    DisableKey,
    EnableKey,
    Namespaces,
    Audit,
    Metrics,
    Usage,
    KeyUsage,
    Verify,
    TopUpCredits,
    ReportLeaked,
    ListIdentities,
    GetIdentity,
    PutIdentity,
    PatchIdentity,
    DeleteIdentity,
    IdentityUsage,
    KeyRequests,
    ListAlerts,
    CreateAlert,
    GetAlert,
    UpdateAlert,
    DeleteAlert,
    ListAdminTokens,
    CreateAdminToken,
    RevokeAdminToken,
}

impl Endpoint {
    /// Whether a token of `role` may call this endpoint. The probes and the OpenAPI document
    /// need no token at all.
    pub fn allowed_for(self, role: Role) -> bool {
        use Endpoint::*;
        match role {
            Role::Admin => true,
            Role::Verify => self == Verify,
            Role::Read => matches!(
                self,
                ListKeys
                    | GetKey
                    | Namespaces
                    | Audit
                    | Metrics
                    | Usage
                    | KeyUsage
                    | KeyRequests
                    | ListAlerts
                    | GetAlert
                    | ListIdentities
                    | GetIdentity
                    | IdentityUsage
            ),
        }
    }
}

/// The routing table: method, path template, endpoint. The OpenAPI document is checked
/// against it in the tests, both ways.
pub const ROUTES: &[(&str, &str, Endpoint)] = &[
    ("GET", "/healthz", Endpoint::Healthz),
    ("GET", "/readyz", Endpoint::Readyz),
    ("GET", "/v1/openapi.json", Endpoint::OpenApi),
    ("POST", "/v1/reload", Endpoint::Reload),
    ("GET", "/v1/api-keys", Endpoint::ListKeys),
    ("POST", "/v1/api-keys", Endpoint::CreateKey),
    ("POST", "/v1/api-keys/leaked", Endpoint::ReportLeaked),
    ("GET", "/v1/api-keys/{id}", Endpoint::GetKey),
    ("PATCH", "/v1/api-keys/{id}", Endpoint::UpdateKey),
    ("DELETE", "/v1/api-keys/{id}", Endpoint::RevokeKey),
    (
        "POST",
        "/v1/api-keys/{id}/regenerate",
        Endpoint::RegenerateKey,
    ),
    ("POST", "/v1/api-keys/{id}/rotate", Endpoint::RotateKey),
    ("POST", "/v1/api-keys/{id}/disable", Endpoint::DisableKey),
    ("POST", "/v1/api-keys/{id}/enable", Endpoint::EnableKey),
    ("POST", "/v1/api-keys/{id}/credits", Endpoint::TopUpCredits),
    ("GET", "/v1/namespaces", Endpoint::Namespaces),
    ("GET", "/v1/audit", Endpoint::Audit),
    ("GET", "/metrics", Endpoint::Metrics),
    ("GET", "/v1/usage", Endpoint::Usage),
    ("GET", "/v1/api-keys/{id}/usage", Endpoint::KeyUsage),
    ("GET", "/v1/api-keys/{id}/requests", Endpoint::KeyRequests),
    ("POST", "/v1/keys/verify", Endpoint::Verify),
    ("GET", "/v1/alerts", Endpoint::ListAlerts),
    ("POST", "/v1/alerts", Endpoint::CreateAlert),
    ("GET", "/v1/alerts/{id}", Endpoint::GetAlert),
    ("PATCH", "/v1/alerts/{id}", Endpoint::UpdateAlert),
    ("DELETE", "/v1/alerts/{id}", Endpoint::DeleteAlert),
    ("GET", "/v1/identities", Endpoint::ListIdentities),
    ("GET", "/v1/identities/{id}", Endpoint::GetIdentity),
    ("PUT", "/v1/identities/{id}", Endpoint::PutIdentity),
    ("PATCH", "/v1/identities/{id}", Endpoint::PatchIdentity),
    ("DELETE", "/v1/identities/{id}", Endpoint::DeleteIdentity),
    ("GET", "/v1/identities/{id}/usage", Endpoint::IdentityUsage),
    ("GET", "/v1/admin-tokens", Endpoint::ListAdminTokens),
    ("POST", "/v1/admin-tokens", Endpoint::CreateAdminToken),
    (
        "DELETE",
        "/v1/admin-tokens/{name}",
        Endpoint::RevokeAdminToken,
    ),
];

/// The OpenAPI 3.1 document for this API, kept in the repository.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Writes a side collection of the store (alert rules, identities, admin tokens) through
/// `change`, then puts the new collection in force before the answer (see
/// [`crate::reload::change_side`]). Returns what `change` returned.
pub(crate) async fn write_side<T: Send + 'static>(
    call: &Call<'_>,
    side: crate::keys::Side,
    change: impl FnOnce(&mut Vec<serde_json::Value>) -> Result<T, crate::keys::KeyError>
        + Send
        + 'static,
) -> Result<T, Rejection> {
    crate::reload::change_side(call.gw, &call.actor, side, change).await
}

/// Largest admin request body.
const MAX_BODY: usize = 1 << 20;

/// Handles one admin request.
pub async fn handle(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    let peer_ip = peer.ip().to_canonical();
    let path = req.uri().path().to_string();
    match route(gw, req, peer_ip).await {
        Ok(response) => response,
        Err(rejection) => {
            tracing::debug!(code = rejection.code(), peer = %peer_ip, path, "admin call refused");
            rejection.into_response(None)
        }
    }
}

/// A request no route takes: `allowed` lists the methods the path does take (empty: 404;
/// otherwise 405 with `Allow`).
#[derive(Debug, PartialEq, Eq)]
pub struct Unmatched {
    pub allowed: Vec<&'static str>,
}

/// Finds the endpoint for a method and path, with the `{id}` (or `{name}`) it captured.
pub fn match_route(method: &Method, path: &str) -> Result<(Endpoint, Option<String>), Unmatched> {
    let mut allowed = Vec::new();
    for &(m, template, endpoint) in ROUTES {
        if let Some(id) = match_template(template, path) {
            if m == method.as_str() {
                return Ok((endpoint, id));
            }
            allowed.push(m);
        }
    }
    Err(Unmatched { allowed })
}

/// `Some(captured id)` if `path` fits `template` (`Some(None)` when it has no placeholder
/// such as `{id}`).
fn match_template(template: &str, path: &str) -> Option<Option<String>> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut id = None;
    let placeholder = |segment: &str| segment.starts_with('{') && segment.ends_with('}');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(id),
            (Some(a), Some(seg)) if placeholder(a) && !seg.is_empty() => id = Some(seg.to_string()),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

async fn route(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response<ResponseBody>, Rejection> {
    // HEAD answers as GET does; the server sends the headers without the body.
    if req.method() == Method::GET || req.method() == Method::HEAD {
        if let Some(page) = console::serve(req.uri().path()) {
            return Ok(page);
        }
    }
    let (endpoint, id) = match match_route(req.method(), req.uri().path()) {
        Ok(found) => found,
        Err(Unmatched { allowed }) if allowed.is_empty() => return Err(Rejection::NotFound),
        Err(Unmatched { allowed }) => {
            let mut response = Rejection::MethodNotAllowed.into_response(None);
            if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(ALLOW, v);
            }
            return Ok(response);
        }
    };
    match endpoint {
        Endpoint::Healthz => return Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
        Endpoint::Readyz => {
            let generation = gw.snapshot.load().generation;
            return Ok(if gw.draining.load(Ordering::SeqCst) {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "draining"}),
                )
            } else {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ready", "generation": generation}),
                )
            });
        }
        Endpoint::OpenApi => {
            let mut response =
                Response::new(ResponseBody::full(Bytes::from_static(OPENAPI.as_bytes())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(response);
        }
        _ => {}
    }
    let now = gw.clock.unix_secs();
    let token = match authenticate(&gw.snapshot.load().admin_tokens, &req, now) {
        Ok(found) => found,
        Err(rejection) => {
            gw.audit.auth_failed(now, peer, "invalid_admin_token", None);
            return Err(rejection);
        }
    };
    gw.token_use.used(&token.hash, now);
    let AdminToken {
        name: actor,
        role,
        hash: token_hash,
        ..
    } = token;
    if !endpoint.allowed_for(role) {
        gw.audit.record(
            &AuditEvent::new(gw.clock.unix_secs(), &actor, "admin.denied")
                .ip(Some(peer))
                .failed(format!(
                    "a {} token may not call {} {}",
                    role.as_str(),
                    req.method(),
                    req.uri().path()
                )),
        );
        return Err(Rejection::InsufficientRole);
    }
    let call = Call {
        gw,
        actor,
        token_hash,
        peer,
        id: id.unwrap_or_default(),
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let within = gw.snapshot.load().listeners.header_read_timeout;
    match endpoint {
        Endpoint::Reload => match crate::reload::reload(gw, Trigger::Admin(&call.actor)).await {
            Ok(outcome) => Ok(json(StatusCode::OK, &outcome)),
            Err(errors) => Err(Rejection::ReloadFailed(errors)),
        },
        Endpoint::ListKeys => keys::list(&call, &query).await,
        Endpoint::GetKey => keys::get(&call).await,
        Endpoint::CreateKey => keys::create(&call, read_json(req, within).await?).await,
        Endpoint::UpdateKey => keys::update(&call, read_json(req, within).await?).await,
        Endpoint::RevokeKey => keys::set_status(&call, crate::keys::Status::Revoked).await,
        Endpoint::DisableKey => keys::set_status(&call, crate::keys::Status::Inactive).await,
        Endpoint::EnableKey => keys::set_status(&call, crate::keys::Status::Active).await,
        Endpoint::RegenerateKey => keys::regenerate(&call).await,
        Endpoint::RotateKey => keys::rotate(&call, read_json_or_empty(req, within).await?).await,
        Endpoint::Namespaces => keys::namespaces(&call).await,
        Endpoint::Audit => keys::audit(&call, &query).await,
        Endpoint::Usage => keys::org_usage(&call, &query).await,
        Endpoint::KeyUsage => keys::key_usage(&call).await,
        Endpoint::KeyRequests => keys::key_requests(&call, &query).await,
        Endpoint::Verify => verify::verify(&call, read_json(req, within).await?).await,
        Endpoint::TopUpCredits => keys::top_up(&call, read_json(req, within).await?).await,
        Endpoint::ReportLeaked => keys::leaked(&call, read_json(req, within).await?).await,
        Endpoint::ListAlerts => alerts::list(&call).await,
        Endpoint::GetAlert => alerts::get(&call).await,
        Endpoint::CreateAlert => alerts::create(&call, read_json(req, within).await?).await,
        Endpoint::UpdateAlert => alerts::update(&call, read_json(req, within).await?).await,
        Endpoint::DeleteAlert => alerts::delete(&call).await,
        Endpoint::ListIdentities => identities::list(&call).await,
        Endpoint::GetIdentity => identities::get(&call).await,
        Endpoint::PutIdentity => identities::put(&call, read_json(req, within).await?).await,
        Endpoint::PatchIdentity => identities::patch(&call, read_json(req, within).await?).await,
        Endpoint::DeleteIdentity => identities::delete(&call).await,
        Endpoint::IdentityUsage => identities::usage(&call).await,
        Endpoint::ListAdminTokens => tokens::list(&call).await,
        Endpoint::CreateAdminToken => tokens::create(&call, read_json(req, within).await?).await,
        Endpoint::RevokeAdminToken => tokens::revoke(&call).await,
        Endpoint::Metrics => {
            let gw = call.gw.clone();
            let text = tokio::task::spawn_blocking(move || gw.render_metrics())
                .await
                .map_err(|_| Rejection::Internal)?;
            let mut response = Response::new(ResponseBody::full(text));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        Endpoint::Healthz | Endpoint::Readyz | Endpoint::OpenApi => Err(Rejection::Internal),
    }
}

/// One authenticated admin call.
pub(crate) struct Call<'a> {
    pub gw: &'a Arc<Gateway>,
    pub actor: String,
    /// The SHA-256 of the admin token that made the call.
    pub token_hash: [u8; 32],
    pub peer: IpAddr,
    /// The `{id}` of the path, or empty.
    pub id: String,
}

impl Call<'_> {
    pub fn audit(&self, event: AuditEvent) {
        self.gw.audit.record(&event.ip(Some(self.peer)));
    }
}

/// Reads a JSON body of at most 1 MiB, arriving `within` the time given, into `T`, naming
/// the field at fault on error.
async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    within: Duration,
) -> Result<T, Rejection> {
    let bytes = read_body(req, within).await?;
    parse_json(&bytes)
}

/// Like [`read_json`], but an empty body reads as `{}`.
async fn read_json_or_empty<T: DeserializeOwned>(
    req: Request<Incoming>,
    within: Duration,
) -> Result<T, Rejection> {
    let bytes = read_body(req, within).await?;
    // No body at all is the empty object; whitespace alone is not JSON, and is refused.
    parse_json(if bytes.is_empty() { b"{}" } else { &bytes })
}

/// A slow body cannot hold an admin connection: past `within`, the answer is 408.
async fn read_body(req: Request<Incoming>, within: Duration) -> Result<Bytes, Rejection> {
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(within, read).await {
        Err(_) => Err(Rejection::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Rejection::BodyTooLarge),
        Ok(Err(_)) => Err(Rejection::InvalidRequest {
            field: None,
            detail: "the request body could not be read".into(),
        }),
    }
}

/// Reads a JSON object into `T`. Anything but an object is refused (serde would otherwise
/// read a struct from an array, by position), and a whole number written with a fraction of
/// zero (`30.0`) reads as the integer it is, as JSON Schema's `integer` says.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Rejection> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Rejection::InvalidRequest {
            field: None,
            detail: format!("invalid JSON body: {e}"),
        })?;
    if !value.is_object() {
        return Err(Rejection::InvalidRequest {
            field: None,
            detail: "the body must be a JSON object".into(),
        });
    }
    read_value(value)
}

/// Reads a JSON object already parsed into `T`, as [`parse_json`] does.
pub(crate) fn read_value<T: DeserializeOwned>(
    mut value: serde_json::Value,
) -> Result<T, Rejection> {
    whole_numbers(&mut value);
    serde_json::from_value::<T>(value.clone()).map_err(|e| {
        let detail = e.to_string();
        // The top-level member at fault first: a member missing inside `credits` names
        // `credits`. Then the one serde names, for a member missing at the top.
        let missing = detail.starts_with("missing field");
        let field = field_at_fault::<T>(&value, missing).or_else(|| {
            detail
                .split('`')
                .nth(1)
                .filter(|_| {
                    detail.starts_with("unknown field") || detail.starts_with("missing field")
                })
                .map(String::from)
        });
        Rejection::InvalidRequest {
            field,
            detail: format!("invalid JSON body: {detail}"),
        }
    })
}

/// The member of `body` that makes it fail to read as `T`: the one whose removal leaves a
/// body that reads, or that then only lacks that member. serde's type errors (`expected
/// u32`) do not name the member; this finds it, on the error path only. When the body
/// failed for a member `missing` at the top, a present member is at fault only if the body
/// reads without it (the missing one was inside it): removing a required member present
/// would report that one missing first, though it is fine.
fn field_at_fault<T: DeserializeOwned>(body: &serde_json::Value, missing: bool) -> Option<String> {
    let object = body.as_object()?;
    object.keys().find_map(|name| {
        let mut without = object.clone();
        without.remove(name);
        match serde_json::from_value::<T>(serde_json::Value::Object(without)) {
            Ok(_) => Some(name.clone()),
            Err(e)
                if !missing
                    && e.to_string()
                        .starts_with(&format!("missing field `{name}`")) =>
            {
                Some(name.clone())
            }
            Err(_) => None,
        }
    })
}

/// What the admin API makes of one body, read as each JSON body it takes, as far as a route
/// goes before it touches the store. For the fuzzer, which holds that any bytes get these or
/// a refusal, never a panic.
#[doc(hidden)]
pub struct BodyReadings {
    pub create: Result<CheckedKey, Rejection>,
    pub patch: Result<CheckedPatch, Rejection>,
    pub rotate_grace: Result<Option<u64>, Rejection>,
}

#[doc(hidden)]
pub fn read_bodies(bytes: &[u8], config: &Config, now: i64) -> BodyReadings {
    BodyReadings {
        create: parse_json::<keys::CreateBody>(bytes)
            .and_then(|body| Ok(NewKey::from(body).check(config, now)?)),
        patch: parse_json::<keys::PatchBody>(bytes)
            .and_then(|body| Ok(KeyPatch::from(body).check(now)?)),
        rotate_grace: parse_json::<keys::RotateBody>(bytes).and_then(|body| {
            body.grace_seconds.map(check_grace).transpose()?;
            Ok(body.grace_seconds)
        }),
    }
}

/// A key as a create body makes it and a patch body then changes it, through the same
/// functions the routes call, without the store: its record, its secret, and the patch's
/// outcome. For the fuzzer, which follows the record into a snapshot and a request.
#[doc(hidden)]
pub fn key_from_bodies(
    create: &[u8],
    patch: &[u8],
    config: &Config,
    now: i64,
) -> Result<(crate::keys::KeyRecord, String, Result<(), Rejection>), Rejection> {
    let new = NewKey::from(parse_json::<keys::CreateBody>(create)?);
    let prefix = new.check(config, now)?.prefix;
    let secret = format::generate(&prefix).map_err(|_| Rejection::Internal)?;
    let hash = crate::keys::hex(&format::hash(&secret));
    let id = hash.get(..8).unwrap_or(&hash).to_string();
    let mut record = new.into_record(config, now, "fuzz", id, &hash)?;
    let patched = parse_json::<keys::PatchBody>(patch)
        .and_then(|body| Ok(KeyPatch::from(body).apply(&mut record, config, now)?));
    Ok((record, secret, patched))
}

/// Turns every number with a zero fraction (`4048.0`) into the integer it is.
fn whole_numbers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) => {
            // A whole f64 in [0, 2^64) or [-2^63, 0) is exactly a u64 or an i64: the casts
            // below are checked by the ranges before them and lose nothing.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0) {
                if (0.0..u64::MAX as f64).contains(&f) {
                    *value = serde_json::Value::from(f as u64);
                } else if (i64::MIN as f64..0.0).contains(&f) {
                    *value = serde_json::Value::from(f as i64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        serde_json::Value::Object(map) => map.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

/// The admin token presented, or a refusal: none presented, none matches, or the one that
/// matches has expired at `now`. Every token is compared, in constant time, so timing says
/// nothing about which token came close.
fn authenticate<B>(
    tokens: &[AdminToken],
    req: &Request<B>,
    now: i64,
) -> Result<AdminToken, Rejection> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or(Rejection::AdminUnauthorized)?;
    let digest = format::hash(presented);
    let mut found: Option<&AdminToken> = None;
    // Every token is compared, so the time taken does not tell which one matched.
    for token in tokens {
        if constant_time_eq(&token.hash, &digest) {
            found = Some(token);
        }
    }
    match found {
        Some(token) if !token.expired(now) => Ok(token.clone()),
        _ => Err(Rejection::AdminUnauthorized),
    }
}

/// Equality whose time does not depend on where the inputs differ (`subtle`).
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_tokens_are_matched_by_hash() {
        use crate::keys::admin_token::Source;
        let tokens = vec![
            AdminToken {
                name: "ops".into(),
                hash: format::hash("s3cret"),
                role: Role::Admin,
                source: Source::Config,
                expires: None,
            },
            AdminToken {
                name: "ci".into(),
                hash: format::hash("other"),
                role: Role::Verify,
                source: Source::Store,
                expires: Some(1_000),
            },
        ];
        let req = |auth: &str| {
            Request::builder()
                .header(AUTHORIZATION, auth)
                .body(())
                .unwrap()
        };
        let who =
            |auth: &str, now: i64| authenticate(&tokens, &req(auth), now).map(|t| (t.name, t.role));
        assert_eq!(
            who("Bearer s3cret", 0).unwrap(),
            ("ops".to_string(), Role::Admin)
        );
        assert_eq!(
            who("bearer other", 999).unwrap(),
            ("ci".to_string(), Role::Verify)
        );
        assert!(who("bearer other", 1_000).is_err(), "expired");
        assert!(who("Bearer s3cre", 0).is_err());
        assert!(who("Basic s3cret", 0).is_err());
        assert!(authenticate(&[], &req("Bearer s3cret"), 0).is_err());
    }

    #[test]
    fn roles_allow_what_they_say() {
        for &(_, _, endpoint) in ROUTES {
            assert!(endpoint.allowed_for(Role::Admin));
            assert_eq!(
                endpoint.allowed_for(Role::Verify),
                endpoint == Endpoint::Verify
            );
        }
        let read: Vec<_> = ROUTES
            .iter()
            .filter(|(_, _, e)| e.allowed_for(Role::Read))
            .map(|(m, ..)| *m)
            .collect();
        assert!(!read.is_empty() && read.iter().all(|m| *m == "GET"));
        assert!(!Endpoint::Verify.allowed_for(Role::Read));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] = 8;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn routes_match_templates_and_methods() {
        let (e, id) = match_route(&Method::POST, "/v1/api-keys/ab12cd34/rotate").unwrap();
        assert_eq!((e, id.as_deref()), (Endpoint::RotateKey, Some("ab12cd34")));
        assert_eq!(
            match_route(&Method::GET, "/v1/api-keys").unwrap().0,
            Endpoint::ListKeys
        );
        let unmatched = match_route(&Method::PUT, "/v1/api-keys/x").unwrap_err();
        assert_eq!(unmatched.allowed, ["GET", "PATCH", "DELETE"]);
        assert!(match_route(&Method::GET, "/v1/api-keys//rotate")
            .unwrap_err()
            .allowed
            .is_empty());
        assert!(match_route(&Method::GET, "/v2")
            .unwrap_err()
            .allowed
            .is_empty());
        let (e, name) = match_route(&Method::DELETE, "/v1/admin-tokens/ci").unwrap();
        assert_eq!(
            (e, name.as_deref()),
            (Endpoint::RevokeAdminToken, Some("ci"))
        );
        assert_eq!(
            match_route(&Method::GET, "/v1/admin-tokens/ci")
                .unwrap_err()
                .allowed,
            ["DELETE"]
        );
    }
}
