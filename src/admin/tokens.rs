//! `/v1/admin-tokens`: admin tokens as managed credentials. Those made here (or by `keygate
//! tokens create`) are kept in the key store, hashed, beside those in the config; a change
//! is in force before the answer, and audited (`admin_token.created`,
//! `admin_token.revoked`). The config's tokens and `KEYGATE_ADMIN_TOKEN` are listed too, and
//! change only where they are written. Role `admin` only.

use http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::keys::{decode_path, Answer};
use super::{json, write_side, Call};
use crate::audit::AuditEvent;
use crate::keys::admin_token::{self, AdminToken, AdminTokenRecord, NewToken, Revoked, Source};
use crate::keys::{set_member, Side};
use crate::rejection::Rejection;
use crate::snapshot::Snapshot;

/// `POST /v1/admin-tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    name: String,
    /// `admin`, `read` or `verify`.
    role: String,
    /// RFC 3339, or a duration from now such as `30d`.
    #[serde(default)]
    expires_at: Option<String>,
}

/// A token as the API shows it: never the token, nor its hash.
fn view(call: &Call<'_>, snapshot: &Snapshot, token: &AdminToken, now: i64) -> Value {
    let record = (token.source == Source::Store)
        .then(|| admin_token::find(&snapshot.stored_admin_tokens, &token.name))
        .flatten();
    let last_used = call.gw.token_use.last_used(&token.hash);
    admin_token::view(token, record.as_ref(), last_used, now)
}

fn audit(call: &Call<'_>, action: &str, record: &AdminTokenRecord) {
    call.audit(
        AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, action)
            .reason(admin_token::describe(record)),
    );
}

/// `GET /v1/admin-tokens`: every token, the config's first, then `KEYGATE_ADMIN_TOKEN`,
/// then the store's in the order they were made.
pub(crate) async fn list(call: &Call<'_>) -> Answer {
    let snapshot = call.gw.snapshot.load_full();
    let now = call.gw.clock.unix_secs();
    let tokens: Vec<Value> = snapshot
        .admin_tokens
        .iter()
        .map(|t| view(call, &snapshot, t, now))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "tokens": tokens }),
    ))
}

/// `POST /v1/admin-tokens`: 201 with the token as listed, plus `token`, this once.
pub(crate) async fn create(call: &Call<'_>, body: CreateBody) -> Answer {
    let now = call.gw.clock.unix_secs();
    let new = NewToken {
        name: body.name,
        role: body.role,
        expires: body.expires_at,
    };
    let (record, token) = admin_token::mint(&new, &call.actor, now)?;
    let snapshot = call.gw.snapshot.load_full();
    if snapshot.admin_tokens.iter().any(|t| t.name == record.name) {
        return Err(Rejection::AdminTokenExists);
    }
    // The store's own are checked under its lock, where another writer's are seen.
    let taken: Vec<AdminToken> = snapshot
        .admin_tokens
        .iter()
        .filter(|t| t.source != Source::Store)
        .cloned()
        .collect();
    let written = record.clone();
    let added = write_side(call, Side::AdminTokens, move |docs| {
        admin_token::add(docs, &written, &taken)
    })
    .await?;
    if !added {
        return Err(Rejection::AdminTokenExists);
    }
    audit(call, "admin_token.created", &record);
    let made = admin_token::check(&record).map_err(|_| Rejection::Internal)?;
    let mut shown = admin_token::view(&made, Some(&record), None, now);
    set_member(&mut shown, "token", token);
    Ok(json(StatusCode::CREATED, &shown))
}

/// `DELETE /v1/admin-tokens/{name}`: revokes a stored token, refused from its next call;
/// the token as it was. The config's and the environment's answer 409
/// `admin_token_in_config`; the call's own token, when it is the last working `admin` one,
/// 409 `last_admin_token`.
pub(crate) async fn revoke(call: &Call<'_>) -> Answer {
    let name = decode_path(&call.id).ok_or_else(|| Rejection::InvalidRequest {
        field: Some("name".into()),
        detail: "the name in the path is not percent-encoded UTF-8".into(),
    })?;
    let snapshot = call.gw.snapshot.load_full();
    let now = call.gw.clock.unix_secs();
    let not_stored = |snapshot: &Snapshot| {
        if snapshot
            .admin_tokens
            .iter()
            .any(|t| t.name == name && t.source != Source::Store)
        {
            return Rejection::AdminTokenInConfig;
        }
        match admin_token::name_problem(&name) {
            Some(detail) => Rejection::InvalidRequest {
                field: Some("name".into()),
                detail,
            },
            None => Rejection::AdminTokenNotFound,
        }
    };
    // Checked on the snapshot first, so that a refusal writes nothing; then again under the
    // store's lock, where another writer's change is seen.
    let mut trial = snapshot.stored_admin_tokens.clone();
    match admin_token::revoke(
        &mut trial,
        &name,
        Some(&call.token_hash),
        &snapshot.admin_tokens,
        now,
    ) {
        Revoked::Done(_) => {}
        Revoked::NotFound => return Err(not_stored(&snapshot)),
        Revoked::LastAdmin => return Err(Rejection::LastAdminToken),
    }
    let (others, caller, target) = (snapshot.admin_tokens.clone(), call.token_hash, name.clone());
    let outcome = write_side(call, Side::AdminTokens, move |docs| {
        Ok(admin_token::revoke(
            docs,
            &target,
            Some(&caller),
            &others,
            now,
        ))
    })
    .await?;
    let record = match outcome {
        Revoked::Done(record) => record,
        Revoked::NotFound => return Err(not_stored(&call.gw.snapshot.load_full())),
        Revoked::LastAdmin => return Err(Rejection::LastAdminToken),
    };
    audit(call, "admin_token.revoked", &record);
    let was = admin_token::check(&record).map_err(|_| Rejection::Internal)?;
    let last_used = call.gw.token_use.last_used(&was.hash);
    Ok(json(
        StatusCode::OK,
        &admin_token::view(&was, Some(&record), last_used, now),
    ))
}
