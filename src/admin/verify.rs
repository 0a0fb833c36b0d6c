//! `POST /v1/keys/verify`: the proxy's decision for a service that calls no proxy. The body
//! names the key and, optionally, the request it came with; the answer is always 200 with
//! `valid`, the code the proxy would give, the key and its rate-limit state. A verify is a
//! request: it is counted, spends the key's limits and quota, and is audited as one.

use std::net::IpAddr;

use http::{Method, Response, StatusCode};
use serde::Deserialize;

use super::{json, Call};
use crate::body::ResponseBody;
use crate::metrics::AskedBy;
use crate::pipeline::{decide, Admission, Ask, Client};
use crate::policy::rate::RateHeaders;
use crate::rejection::Rejection;
use crate::snapshot::KeyEntry;

/// The longest key, path and host a verify body may hold.
pub const MAX_KEY_LEN: usize = 4096;
pub const MAX_PATH_LEN: usize = 8192;
pub const MAX_HOST_LEN: usize = 255;
pub const MAX_METHOD_LEN: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VerifyBody {
    key: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    ip: Option<String>,
}

/// A verify body, checked: every value within its documented range.
#[derive(Debug)]
struct Checked {
    method: Method,
    path: Option<String>,
    host: Option<String>,
    ip: Option<IpAddr>,
}

fn invalid(field: &str, detail: String) -> Rejection {
    Rejection::InvalidRequest {
        field: Some(field.into()),
        detail,
    }
}

impl VerifyBody {
    fn check(&self) -> Result<Checked, Rejection> {
        if self.key.len() > MAX_KEY_LEN {
            return Err(invalid(
                "key",
                format!("a key is at most {MAX_KEY_LEN} bytes"),
            ));
        }
        let method = match &self.method {
            None => Method::GET,
            Some(m) => Some(m)
                .filter(|m| (1..=MAX_METHOD_LEN).contains(&m.len()))
                .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
                .ok_or_else(|| {
                    invalid(
                        "method",
                        format!("`{m}` is not an HTTP method of 1 to {MAX_METHOD_LEN} letters"),
                    )
                })?,
        };
        let path = match &self.path {
            None => None,
            Some(p) if p.starts_with('/') && p.len() <= MAX_PATH_LEN => {
                // The query plays no part in a decision.
                Some(
                    p.split_once('?')
                        .map_or(p.as_str(), |(path, _)| path)
                        .to_string(),
                )
            }
            Some(_) => {
                return Err(invalid(
                    "path",
                    format!("the path must start with `/` and be at most {MAX_PATH_LEN} bytes"),
                ))
            }
        };
        let host = match &self.host {
            Some(h)
                if h.is_empty()
                    || h.len() > MAX_HOST_LEN
                    || !h.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                return Err(invalid(
                    "host",
                    format!("the host must be 1 to {MAX_HOST_LEN} printable ASCII characters"),
                ))
            }
            h => h.clone(),
        };
        let ip = self
            .ip
            .as_deref()
            .map(|text| {
                text.parse::<IpAddr>()
                    .map(|ip| ip.to_canonical())
                    .map_err(|_| invalid("ip", format!("`{text}` is not an IPv4 or IPv6 address")))
            })
            .transpose()?;
        Ok(Checked {
            method,
            path,
            host,
            ip,
        })
    }
}

pub(super) async fn verify(
    call: &Call<'_>,
    body: VerifyBody,
) -> Result<Response<ResponseBody>, Rejection> {
    let checked = body.check()?;
    let gw = call.gw;
    let snapshot = gw.snapshot.load_full();
    let ask = Ask {
        method: &checked.method,
        path: checked.path.as_deref(),
        host: checked.host.as_deref(),
        token: match body.key.as_str() {
            "" => Err(Rejection::MissingKey),
            key => Ok(key),
        },
    };
    let client = match checked.ip {
        Some(ip) => Client::Known(ip),
        None => Client::Unnamed { caller: call.peer },
    };
    let answer = match decide(gw, &snapshot, ask, client).await {
        Ok(Admission { key, rate, .. }) => {
            gw.metrics.decisions.count(AskedBy::Verify, None);
            Answer {
                valid: true,
                code: None,
                status: StatusCode::OK.as_u16(),
                key: Some(KeyView::of(key, &snapshot)),
                ratelimit: rate.as_ref().and_then(RateView::of),
            }
        }
        Err(refused) => {
            let rejection = refused.rejection;
            gw.metrics
                .decisions
                .count(AskedBy::Verify, Some(&rejection));
            // The key is named only when the lookup found it.
            let key = crate::pipeline::credential::identify(&snapshot, &body.key)
                .ok()
                .filter(|_| !matches!(rejection, Rejection::TooManyFailedAttempts { .. }));
            let rate = match &rejection {
                Rejection::RateLimited(rate) | Rejection::QuotaExceeded(rate) => RateView::of(rate),
                _ => None,
            };
            Answer {
                valid: false,
                code: Some(rejection.code()),
                status: rejection.status().as_u16(),
                key: key.map(|k| KeyView::of(k, &snapshot)),
                ratelimit: rate,
            }
        }
    };
    Ok(json(StatusCode::OK, &answer))
}

#[derive(Debug, serde::Serialize)]
struct Answer {
    valid: bool,
    /// The refusal's code; `null` when valid.
    code: Option<&'static str>,
    /// The status the proxy would answer with.
    status: u16,
    key: Option<KeyView>,
    ratelimit: Option<RateView>,
}

/// What a verify answer says of a key: what the snapshot holds, read without the store.
#[derive(Debug, serde::Serialize)]
struct KeyView {
    id: String,
    namespace: String,
    environment: String,
    status: crate::keys::Status,
    scopes: Vec<String>,
    allowed_cidrs_set: bool,
    expires_at: Option<String>,
    /// The key's metadata, or `null`.
    meta: Option<serde_json::Value>,
    /// The key's identity, with its metadata, or `null`.
    identity: Option<serde_json::Value>,
}

impl KeyView {
    fn of(key: &KeyEntry, snapshot: &crate::snapshot::Snapshot) -> KeyView {
        let identity = key.identity_id().map(|id| {
            let meta = crate::pipeline::identity_of(snapshot, key)
                .and_then(|i| i.meta.as_ref())
                .and_then(|m| serde_json::from_str::<serde_json::Value>(&m.json).ok());
            serde_json::json!({ "id": id, "meta": meta })
        });
        KeyView {
            id: key.id.to_string(),
            namespace: key.namespace.as_str().to_string(),
            environment: key.environment.as_str().to_string(),
            status: key.status,
            scopes: key.scopes.texts().map(String::from).collect(),
            allowed_cidrs_set: !key.allowed_cidrs.is_empty(),
            expires_at: key.expires_at().map(crate::clock::rfc3339),
            meta: key.meta().and_then(|m| serde_json::from_str(&m.json).ok()),
            identity,
        }
    }
}

/// The budget nearest to running out: the rate limit (`key`), a named limit, or the quota.
#[derive(Debug, serde::Serialize)]
struct RateView {
    policy: String,
    limit: u64,
    remaining: u64,
    /// Seconds until the budget is whole again.
    reset: u64,
    /// Seconds until the next request would be admitted, when refused.
    retry_after: Option<u64>,
}

impl RateView {
    fn of(rate: &RateHeaders) -> Option<RateView> {
        rate.budgets
            .iter()
            .flatten()
            .chain(&rate.more)
            .min_by_key(|b| b.remaining)
            .map(|b| RateView {
                policy: b.name.as_str().to_string(),
                limit: b.limit,
                remaining: b.remaining,
                reset: b.reset,
                retry_after: rate.retry_after,
            })
    }
}
