//! `/v1/alerts`: alert rules. Those made here are kept in the key store beside the keys
//! (so every node of a shared store has them, and a backup holds them) and audited; those
//! written in the config are listed too, and change only with the config.

use http::StatusCode;
use serde_json::Value;

use super::keys::{created, decode_path, Answer};
use super::{json, read_value, Call};
use crate::alerts::{AlertRules, Rule, RuleConfig};
use crate::audit::AuditEvent;
use crate::config::Problems;
use crate::keys::KeyError;
use crate::rejection::Rejection;

/// Longest rule name the API takes. Names are the rules' ids in URLs, so they are kept to
/// letters, digits, `.`, `_` and `-`.
const MAX_NAME: usize = 64;

/// A rule as the API shows it: as written, with where it lives.
fn view(rule: &Rule) -> Value {
    let mut v = serde_json::to_value(&rule.source).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "source".into(),
            (if rule.stored { "api" } else { "config" }).into(),
        );
        o.entry("email").or_insert_with(|| Value::Array(Vec::new()));
    }
    v
}

fn invalid(field: &str, detail: impl Into<String>) -> Rejection {
    Rejection::InvalidRequest {
        field: Some(field.into()),
        detail: detail.into(),
    }
}

/// `GET /v1/alerts`: every rule, the config's first, and what can deliver them.
pub(crate) async fn list(call: &Call<'_>) -> Answer {
    let snapshot = call.gw.snapshot.load_full();
    let rules: Vec<Value> = snapshot.alerts.rules.iter().map(view).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "rules": rules,
            "webhook": snapshot.alerts.webhook.is_some(),
            "email": snapshot.alerts.smtp.is_some(),
        }),
    ))
}

/// `GET /v1/alerts/{id}`.
pub(crate) async fn get(call: &Call<'_>) -> Answer {
    let snapshot = call.gw.snapshot.load_full();
    let rule = snapshot
        .alerts
        .get(&decode_path(&call.id).unwrap_or_default())
        .ok_or(Rejection::AlertNotFound)?;
    Ok(json(StatusCode::OK, &view(rule)))
}

/// Checks a rule as the config's are checked, against the delivery the config sets up.
fn check(rule: &RuleConfig, alerts: &AlertRules) -> Result<(), Rejection> {
    let name = &rule.name;
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "name",
            format!("a rule's name is 1 to {MAX_NAME} of letters, digits, `.`, `_` and `-`"),
        ));
    }
    let mut p = Problems::default();
    let mut one = AlertRules {
        rules: Vec::new(),
        webhook: None,
        smtp: alerts.smtp.clone(),
    };
    let stored = serde_json::to_value(rule).map_err(|_| Rejection::Internal)?;
    one.add_stored(&[stored], &mut p);
    match p.located_first() {
        None => Ok(()),
        Some((path, message)) => {
            // `alerts[0].email[1]` names `email`; `alerts[0]` names the rule as a whole.
            let field = path
                .split_once('.')
                .map(|(_, f)| f.split('[').next().unwrap_or(f).to_string());
            Err(Rejection::InvalidRequest {
                field,
                detail: message,
            })
        }
    }
}

/// Writes the store's rules through `change`, then puts the new rules in force.
async fn write<T: Send + 'static>(
    call: &Call<'_>,
    change: impl FnOnce(&mut Vec<Value>) -> Result<T, KeyError> + Send + 'static,
) -> Result<T, Rejection> {
    super::write_side(call, crate::keys::Side::Alerts, change).await
}

/// The position of the stored rule named `name`.
fn position(rules: &[Value], name: &str) -> Option<usize> {
    rules
        .iter()
        .position(|r| r.get("name").and_then(Value::as_str) == Some(name))
}

fn audit(call: &Call<'_>, action: &str, reason: String) {
    call.audit(AuditEvent::new(call.gw.clock.unix_secs(), &call.actor, action).reason(reason));
}

/// `POST /v1/alerts`: 201 with the new rule.
pub(crate) async fn create(call: &Call<'_>, body: Value) -> Answer {
    // A member's absence is its default; `null` is not a value any member takes.
    if let Some(field) = body
        .as_object()
        .and_then(|o| o.iter().find(|(_, v)| v.is_null()))
        .map(|(k, _)| k)
    {
        return Err(invalid(
            field,
            format!("`{field}` cannot be null: leave it out instead"),
        ));
    }
    let rule: RuleConfig = read_value(body)?;
    let snapshot = call.gw.snapshot.load_full();
    if snapshot.alerts.get(&rule.name).is_some() {
        return Err(Rejection::AlertExists);
    }
    check(&rule, &snapshot.alerts)?;
    let value = serde_json::to_value(&rule).map_err(|_| Rejection::Internal)?;
    let name = rule.name.clone();
    let added = write(call, move |rules| {
        if position(rules, &name).is_some() {
            return Ok(false);
        }
        rules.push(value);
        Ok(true)
    })
    .await?;
    if !added {
        return Err(Rejection::AlertExists);
    }
    audit(call, "alert.created", describe(&rule));
    let snapshot = call.gw.snapshot.load_full();
    let made = snapshot.alerts.get(&rule.name).ok_or(Rejection::Internal)?;
    Ok(created(&view(made)))
}

/// `PATCH /v1/alerts/{id}`: a JSON merge patch (RFC 7396) of the rule: members replace,
/// `null` removes. The name is the rule's id and cannot change.
pub(crate) async fn update(call: &Call<'_>, patch: Value) -> Answer {
    let name = decode_path(&call.id).unwrap_or_default();
    let snapshot = call.gw.snapshot.load_full();
    let current = snapshot.alerts.get(&name).ok_or(Rejection::AlertNotFound)?;
    if !current.stored {
        return Err(Rejection::AlertInConfig);
    }
    let Some(patch) = patch.as_object() else {
        return Err(invalid("body", "the body must be a JSON object"));
    };
    let mut merged = serde_json::to_value(&current.source).map_err(|_| Rejection::Internal)?;
    if let Some(o) = merged.as_object_mut() {
        for (member, value) in patch {
            if member == "name" && value != &Value::from(name.as_str()) {
                return Err(invalid(
                    "name",
                    "the name is the rule's id and cannot change",
                ));
            }
            if value.is_null() {
                o.remove(member);
            } else {
                o.insert(member.clone(), value.clone());
            }
        }
    }
    let rule: RuleConfig = read_value(merged)?;
    check(&rule, &snapshot.alerts)?;
    let before = current.source.clone();
    let value = serde_json::to_value(&rule).map_err(|_| Rejection::Internal)?;
    let target = name.clone();
    let found = write(call, move |rules| match position(rules, &target) {
        Some(i) => {
            if let Some(slot) = rules.get_mut(i) {
                *slot = value;
            }
            Ok(true)
        }
        None => Ok(false),
    })
    .await?;
    if !found {
        return Err(Rejection::AlertNotFound);
    }
    audit(
        call,
        "alert.updated",
        format!("{name}: {} → {}", describe(&before), describe(&rule)),
    );
    let snapshot = call.gw.snapshot.load_full();
    let now = snapshot.alerts.get(&name).ok_or(Rejection::Internal)?;
    Ok(json(StatusCode::OK, &view(now)))
}

/// `DELETE /v1/alerts/{id}`: the rule as it was.
pub(crate) async fn delete(call: &Call<'_>) -> Answer {
    let name = decode_path(&call.id).unwrap_or_default();
    let snapshot = call.gw.snapshot.load_full();
    let current = snapshot.alerts.get(&name).ok_or(Rejection::AlertNotFound)?;
    if !current.stored {
        return Err(Rejection::AlertInConfig);
    }
    let shown = view(current);
    let description = describe(&current.source);
    let target = name.clone();
    let removed = write(call, move |rules| {
        Ok(position(rules, &target).map(|i| rules.remove(i)).is_some())
    })
    .await?;
    if !removed {
        return Err(Rejection::AlertNotFound);
    }
    audit(call, "alert.deleted", description);
    Ok(json(StatusCode::OK, &shown))
}

/// A rule in one line, for the audit log: its name, scope, condition and recipients.
fn describe(rule: &RuleConfig) -> String {
    let scope = match (&rule.key, &rule.namespace) {
        (Some(k), _) => format!("key {k}"),
        (None, Some(ns)) => format!("namespace {ns}"),
        (None, None) => "every key".into(),
    };
    let condition = match (
        rule.requests_per_minute,
        rule.error_rate_percent,
        rule.quota_percent,
    ) {
        (Some(n), _, _) => format!("requests per minute > {n}"),
        (_, Some(p), _) => format!(
            "error rate > {p}% over {}",
            rule.over.as_deref().unwrap_or("5m")
        ),
        (_, _, Some(p)) => format!("quota used >= {p}%"),
        _ => "no condition".into(),
    };
    let email = if rule.email.is_empty() {
        String::new()
    } else {
        format!(", email {}", rule.email.join(", "))
    };
    format!("{}: {scope}, {condition}{email}", rule.name)
}
