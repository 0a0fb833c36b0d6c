//! `/v1/identities`: the operator's customers, whose limits, quota, credits and metadata
//! every key naming them shares. Kept in the key store beside the keys (so every node of a
//! shared store has them, and a backup holds them), put in force before the answer, and
//! audited (`identity.created`, `identity.updated`, `identity.deleted`).

use http::StatusCode;
use serde_json::Value;

use super::keys::{
    credits_left_in_redis, decode_path, local_usage, merged, quota_state, shared_usage,
    with_credits_left, Answer,
};
use super::{json, read_value, write_side, Call};
use crate::audit::AuditEvent;
use crate::keys::identity::{self, IdentityBody, IdentityRecord};
use crate::keys::{set_member, Side};
use crate::rejection::Rejection;

/// The identity the call names, as stored.
fn stored(call: &Call<'_>, id: &str) -> Option<IdentityRecord> {
    identity::find(&call.gw.snapshot.load().stored_identities, id)
}

/// An identity as the API shows it: as stored, with what its credits have left now and its
/// next refill.
fn view(call: &Call<'_>, r: &IdentityRecord) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    let now = call.gw.clock.unix_secs();
    if let (Some(c), Some(stored)) = (
        r.credits
            .as_ref()
            .and_then(|c| crate::keys::check::check_credits(c).ok()),
        v.get("credits").cloned(),
    ) {
        let shown = call
            .gw
            .credits
            .show(&format!("@{}", r.id), &stored, &c, now);
        set_member(&mut v, "credits", shown);
    }
    v
}

/// With shared limits (Redis): what each identity's credits have left over every node,
/// by identity id.
async fn shared_credits_left(
    call: &Call<'_>,
    records: &[IdentityRecord],
) -> std::collections::HashMap<String, u64> {
    let with = records
        .iter()
        .filter_map(|r| {
            let c = crate::keys::check::check_credits(r.credits.as_ref()?).ok()?;
            Some((format!("@{}", r.id), c))
        })
        .collect();
    credits_left_in_redis(call, with)
        .await
        .into_iter()
        .filter_map(|(at, left)| Some((at.strip_prefix('@')?.to_string(), left)))
        .collect()
}

fn invalid(p: crate::keys::check::Problem) -> Rejection {
    Rejection::InvalidRequest {
        field: Some(p.field.into()),
        detail: p.message,
    }
}

/// The id from the path, checked.
fn path_id(call: &Call<'_>) -> Result<String, Rejection> {
    let refused = |detail: String| Rejection::InvalidRequest {
        field: Some("id".into()),
        detail,
    };
    let id = decode_path(&call.id)
        .ok_or_else(|| refused("the id in the path is not percent-encoded UTF-8".into()))?;
    match identity::id_problem(&id) {
        Some(e) => Err(refused(e)),
        None => Ok(id),
    }
}

fn audit(call: &Call<'_>, action: &str, reason: String) {
    call.audit(AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, action).reason(reason));
}

/// `GET /v1/identities`: every identity, in the order they were made.
pub(crate) async fn list(call: &Call<'_>) -> Answer {
    let snapshot = call.gw.snapshot.load_full();
    let records: Vec<IdentityRecord> = snapshot
        .stored_identities
        .iter()
        .filter_map(|d| serde_json::from_value::<IdentityRecord>(d.clone()).ok())
        .collect();
    let left = shared_credits_left(call, &records).await;
    let identities: Vec<Value> = records
        .iter()
        .map(|r| with_credits_left(view(call, r), left.get(&r.id).copied()))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "identities": identities }),
    ))
}

/// `GET /v1/identities/{id}`.
pub(crate) async fn get(call: &Call<'_>) -> Answer {
    let id = path_id(call)?;
    let r = stored(call, &id).ok_or(Rejection::IdentityNotFound)?;
    let left = shared_credits_left(call, std::slice::from_ref(&r)).await;
    let v = with_credits_left(view(call, &r), left.get(&r.id).copied());
    Ok(json(StatusCode::OK, &v))
}

/// `PUT /v1/identities/{id}`: makes the identity (201) or replaces it whole (200).
pub(crate) async fn put(call: &Call<'_>, body: IdentityBody) -> Answer {
    let id = path_id(call)?;
    let now = call.gw.clock.unix_secs();
    let before = stored(call, &id);
    let record = IdentityRecord::from_body(&id, body, before.as_ref(), now).map_err(invalid)?;
    save(call, record, before).await
}

/// `PATCH /v1/identities/{id}`: a JSON merge patch of the identity's body (members replace,
/// `null` removes).
pub(crate) async fn patch(call: &Call<'_>, patch: Value) -> Answer {
    let id = path_id(call)?;
    let before = stored(call, &id).ok_or(Rejection::IdentityNotFound)?;
    let Some(patch) = patch.as_object() else {
        return Err(Rejection::InvalidRequest {
            field: Some("body".into()),
            detail: "the body must be a JSON object".into(),
        });
    };
    let mut body = before.body();
    if let Some(o) = body.as_object_mut() {
        for (member, value) in patch {
            if value.is_null() {
                o.remove(member);
            } else {
                o.insert(member.clone(), value.clone());
            }
        }
        o.retain(|_, v| !v.is_null());
    }
    let body: IdentityBody = read_value(body)?;
    let now = call.gw.clock.unix_secs();
    let record = IdentityRecord::from_body(&id, body, Some(&before), now).map_err(invalid)?;
    save(call, record, Some(before)).await
}

/// Writes `record`, in force before the answer, and audits the change.
async fn save(call: &Call<'_>, record: IdentityRecord, before: Option<IdentityRecord>) -> Answer {
    let written = record.clone();
    let created = write_side(call, Side::Identities, move |docs| {
        Ok(identity::put(docs, &written))
    })
    .await?;
    let shown = view(call, &record);
    if created {
        audit(call, "identity.created", identity::describe(&record));
        let mut response = json(StatusCode::CREATED, &shown);
        if let Ok(v) = http::HeaderValue::from_str(&format!("/v1/identities/{}", call.id)) {
            response.headers_mut().insert(http::header::LOCATION, v);
        }
        return Ok(response);
    }
    if before.as_ref() != Some(&record) {
        let was = before.as_ref().map(identity::describe).unwrap_or_default();
        audit(
            call,
            "identity.updated",
            format!("{was} → {}", identity::describe(&record)),
        );
    }
    Ok(json(StatusCode::OK, &shown))
}

/// `DELETE /v1/identities/{id}`: the identity as it was. Keys that name it keep the name
/// (still forwarded) and lose its limits.
pub(crate) async fn delete(call: &Call<'_>) -> Answer {
    let id = path_id(call)?;
    let target = id.clone();
    let removed = write_side(call, Side::Identities, move |docs| {
        Ok(identity::remove(docs, &target))
    })
    .await?
    .ok_or(Rejection::IdentityNotFound)?;
    audit(call, "identity.deleted", identity::describe(&removed));
    Ok(json(StatusCode::OK, &view(call, &removed)))
}

/// `GET /v1/identities/{id}/usage`: today's counts over every key of the identity, by
/// code, its last use, its quota, and the per-minute series of the last 24 hours.
pub(crate) async fn usage(call: &Call<'_>) -> Answer {
    let id = path_id(call)?;
    let snapshot = call.gw.snapshot.load_full();
    let record = stored(call, &id);
    let now = call.gw.clock.unix_secs();
    let counted = format!("@{id}");
    if record.is_none() && call.gw.usage.get(&counted).is_none() {
        return Err(Rejection::IdentityNotFound);
    }
    // With a Redis store, the counts of every node, as a key's usage reads them.
    let local = local_usage(call, &counted, now);
    let report = match shared_usage(call, vec![counted.clone()])
        .await
        .remove(&counted)
    {
        Some(shared) => merged(shared, local),
        None => local,
    };
    let mut v = report.to_json(now);
    set_member(&mut v, "identity", id.as_str());
    if let Some(i) = snapshot.identities.get(&id) {
        if let Some(quota) = &i.quota {
            let state = quota_state(quota, |p| i.usage().quota_used(p), now);
            set_member(&mut v, "quota", state);
        }
    }
    Ok(json(StatusCode::OK, &v))
}
