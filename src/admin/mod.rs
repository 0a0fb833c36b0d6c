//! The admin listener: health, readiness and reload. Every route but the probes needs an
//! admin token (`Authorization: Bearer <token>`), compared in constant time against the
//! SHA-256 of each configured token.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::keys::format;
use crate::rejection::Rejection;
use crate::server::Gateway;
use crate::snapshot::AdminToken;

/// Handles one admin request.
pub async fn handle(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    match route(gw, &req).await {
        Ok(response) => response,
        Err(rejection) => {
            tracing::debug!(code = rejection.code(), peer = %peer, path = req.uri().path(), "admin call refused");
            rejection.into_response(None)
        }
    }
}

async fn route(
    gw: &Arc<Gateway>,
    req: &Request<Incoming>,
) -> Result<Response<ResponseBody>, Rejection> {
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/healthz" => {
            only(method, &Method::GET)?;
            return Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})));
        }
        "/readyz" => {
            only(method, &Method::GET)?;
            let snapshot = gw.snapshot.load();
            return Ok(if gw.draining.load(Ordering::SeqCst) {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "draining"}),
                )
            } else {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ready", "generation": snapshot.generation}),
                )
            });
        }
        _ => {}
    }
    let actor = authenticate(&gw.snapshot.load().admin_tokens, req)?;
    match path {
        "/v1/reload" => {
            only(method, &Method::POST)?;
            tracing::info!(actor = %actor, "reload requested");
            match crate::reload::reload(gw, "admin").await {
                Ok(outcome) => Ok(json(StatusCode::OK, &outcome)),
                Err(errors) => Err(Rejection::ReloadFailed(errors)),
            }
        }
        _ => Err(Rejection::NotFound),
    }
}

fn only(method: &Method, allowed: &Method) -> Result<(), Rejection> {
    if method == allowed {
        Ok(())
    } else {
        Err(Rejection::MethodNotAllowed)
    }
}

/// The name of the admin token presented, or a refusal. Every configured token is compared,
/// in constant time, so timing says nothing about which token came close.
fn authenticate<B>(tokens: &[AdminToken], req: &Request<B>) -> Result<String, Rejection> {
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
    for token in tokens {
        if constant_time_eq(&token.hash, &digest) {
            found = Some(token);
        }
    }
    found
        .map(|t| t.name.clone())
        .ok_or(Rejection::AdminUnauthorized)
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ResponseBody> {
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
        let tokens = vec![
            AdminToken {
                name: "ops".into(),
                hash: format::hash("s3cret"),
            },
            AdminToken {
                name: "ci".into(),
                hash: format::hash("other"),
            },
        ];
        let req = |auth: &str| {
            Request::builder()
                .header(AUTHORIZATION, auth)
                .body(())
                .unwrap()
        };
        assert_eq!(authenticate(&tokens, &req("Bearer s3cret")).unwrap(), "ops");
        assert_eq!(authenticate(&tokens, &req("bearer other")).unwrap(), "ci");
        assert!(authenticate(&tokens, &req("Bearer s3cre")).is_err());
        assert!(authenticate(&tokens, &req("Basic s3cret")).is_err());
        assert!(authenticate(&[], &req("Bearer s3cret")).is_err());
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] = 8;
        assert!(!constant_time_eq(&a, &b));
    }
}
