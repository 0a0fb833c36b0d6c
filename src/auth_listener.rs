//! The auth listener (`listen.auth`): an ingress asks it "may this request pass?" and gets
//! the proxy's own decision: the same route matching, credential, lookup, policy, quota,
//! limits, usage, audit and lockout, through [`pipeline::decide`]. Only the forwarding is
//! left out.
//!
//! The request asked about is read from the asking request, as nginx `auth_request`,
//! Traefik `ForwardAuth`, Caddy `forward_auth` and Envoy `ext_authz` send it:
//! - method: `X-Forwarded-Method`, then `X-Original-Method`, else the request's own;
//! - path: `X-Forwarded-Uri`, then `X-Original-URI`, else the request's own; the query plays
//!   no part. Under `auth.envoy_path_prefix` the rest of the path is the original path and
//!   the method is the request's, as Envoy's `path_prefix` sends them;
//! - host: `X-Forwarded-Host`, else `Host`;
//! - client: the peer is the ingress, so the client is read from `X-Forwarded-For` (or
//!   `X-Real-IP`), and only when the peer is in `trusted_proxies`.
//!
//! Allowed: 200 with the identity and RateLimit headers, for the ingress to copy upstream.
//! Refused: the proxy's refusal, plus `X-Keygate-Code` and the problem body again in
//! `X-Keygate-Problem` (nginx keeps only an auth answer's headers).

use std::net::IpAddr;

use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response};
use hyper::body::Incoming;

use crate::access_log;
use crate::body::ResponseBody;
use crate::gateway::Gateway;
use crate::headers::{
    X_KEYGATE_CODE, X_KEYGATE_ENVIRONMENT, X_KEYGATE_KEY_ID, X_KEYGATE_NAMESPACE,
    X_KEYGATE_PROBLEM, X_REQUEST_ID,
};
use crate::metrics::AskedBy;
use crate::pipeline::{
    self, client_ip, credential, forward, Admission, Ask, Client, ClientConn, Logged,
};
use crate::policy::net::CidrSet;
use crate::rejection::Rejection;
use crate::state::history::{self, Entry};

/// The headers that name the original method, and the original URI, in the order read.
pub const METHOD_HEADERS: [&str; 2] = ["x-forwarded-method", "x-original-method"];
pub const URI_HEADERS: [&str; 2] = ["x-forwarded-uri", "x-original-uri"];

/// Answers one question from an ingress.
pub async fn handle(
    gw: &Gateway,
    req: Request<Incoming>,
    conn: &ClientConn,
) -> Response<ResponseBody> {
    let started = std::time::Instant::now();
    let snapshot = gw.snapshot.load_full();
    let trusted = &snapshot.trusted_proxies;
    let request_id = trusted
        .contains(conn.peer_ip)
        .then(|| forward::trusted_request_id(req.headers()))
        .flatten()
        .unwrap_or_else(|| gw.request_ids.next());
    let original = match Original::read(&req, snapshot.envoy_path_prefix.as_deref()) {
        Ok(original) => original,
        Err(rejection) => {
            gw.metrics.decisions.count(AskedBy::Auth, Some(&rejection));
            let line = gw.access_log.as_ref().and_then(|log| {
                let client = client_address(conn.peer_ip, req.headers(), trusted);
                let head = Logged::of(
                    &req,
                    gw.clock.wall(),
                    &request_id,
                    client,
                    conn,
                    started.elapsed(),
                );
                log.begin(&head.with(&snapshot, None, None), false)
            });
            let code = rejection.code();
            return access_log::finish(refusal(rejection, request_id), line, Some(code), None);
        }
    };
    let client_ip = client_address(conn.peer_ip, req.headers(), trusted);
    let client = Client::Known(client_ip);
    let ask = Ask {
        method: &original.method,
        path: Some(original.path),
        host: original.host,
        token: credential::extract(req.headers(), snapshot.x_api_key),
    };
    // The line names the original request, as the ingress described it.
    let log = |route, key, accepted| {
        gw.access_log.as_ref().and_then(|log| {
            let head = Logged::of(
                &req,
                gw.clock.wall(),
                &request_id,
                client_ip,
                conn,
                started.elapsed(),
            );
            let mut head = head.with(&snapshot, route, key);
            head.method = &original.method;
            head.path = original.path;
            head.query = None;
            log.begin(&head, accepted)
        })
    };
    // The key's history, with the original request too.
    let remember = |key: &crate::snapshot::KeyEntry, status, code| {
        if !gw.history.is_on() {
            return;
        }
        let at = history::millis(gw.clock.wall());
        let entry = Entry::new(at, client_ip, &original.method, original.path, &request_id);
        gw.history.record(key.usage(), entry.answered(status, code));
    };
    match pipeline::decide(gw, &snapshot, ask, client).await {
        Ok(Admission {
            key,
            identity,
            rate,
            route,
            ..
        }) => {
            gw.metrics.decisions.count(AskedBy::Auth, None);
            let line = log(route, Some(key), true);
            remember(key, 200, None);
            let mut response = Response::new(ResponseBody::empty());
            let headers = response.headers_mut();
            headers.insert(X_KEYGATE_KEY_ID, key.id_header().clone());
            headers.insert(X_KEYGATE_NAMESPACE, key.namespace.header().clone());
            headers.insert(X_KEYGATE_ENVIRONMENT, key.environment.header().clone());
            crate::pipeline::forward::insert_identity_and_meta(headers, route, key, identity);
            headers.insert(X_REQUEST_ID, request_id.clone());
            if let Some(rate) = rate {
                rate.write(headers, false);
            }
            access_log::finish(response, line, None, None)
        }
        Err(refused) => {
            gw.metrics
                .decisions
                .count(AskedBy::Auth, Some(&refused.rejection));
            let line = log(refused.route, refused.key, false);
            let code = refused.rejection.code();
            if let Some(key) = refused.key {
                remember(key, refused.rejection.status().as_u16(), Some(code));
            }
            access_log::finish(
                refusal(refused.rejection, request_id.clone()),
                line,
                Some(code),
                None,
            )
        }
    }
}

/// The proxy's refusal, with the code and the problem body in headers as well.
fn refusal(rejection: Rejection, request_id: HeaderValue) -> Response<ResponseBody> {
    let code = HeaderValue::from_static(rejection.code());
    let mut response = rejection.into_response(Some(request_id));
    let problem = match response.body() {
        ResponseBody::Full(Some(body)) => HeaderValue::from_maybe_shared(body.clone()).ok(),
        _ => None,
    };
    let headers = response.headers_mut();
    headers.insert(X_KEYGATE_CODE, code);
    if let Some(problem) = problem {
        headers.insert(X_KEYGATE_PROBLEM, problem);
    }
    response
}

/// The request an ingress asks about.
#[derive(Debug)]
struct Original<'r> {
    method: Method,
    path: &'r str,
    host: Option<&'r str>,
}

impl<'r> Original<'r> {
    fn read(req: &'r Request<Incoming>, envoy_prefix: Option<&str>) -> Result<Self, Rejection> {
        let headers = req.headers();
        let host = first_value(headers, "x-forwarded-host").or_else(|| pipeline::host_of(req));
        let own_path = req.uri().path();
        if let Some(rest) = envoy_prefix.and_then(|p| under_prefix(own_path, p)) {
            return Ok(Original {
                method: req.method().clone(),
                path: rest,
                host,
            });
        }
        let method = match METHOD_HEADERS.iter().find_map(|h| headers.get(*h)) {
            None => req.method().clone(),
            Some(value) => Method::from_bytes(value.as_bytes())
                .ok()
                .filter(|_| value.len() <= 32)
                .ok_or_else(|| Rejection::InvalidRequest {
                    field: Some("X-Forwarded-Method".into()),
                    detail: "the original method is not an HTTP method of 1 to 32 letters".into(),
                })?,
        };
        let path = match URI_HEADERS.iter().find_map(|h| headers.get(*h)) {
            None => own_path,
            Some(value) => {
                let uri = value.to_str().map_err(|_| Rejection::InvalidPath)?;
                uri.split_once('?').map_or(uri, |(path, _)| path)
            }
        };
        Ok(Original { method, path, host })
    }
}

/// The path under an Envoy `path_prefix`: `/envoy/v1/x` under `/envoy` is `/v1/x`, and
/// `/envoy` alone is `/`. `None` when the path is not under the prefix.
fn under_prefix<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    match path.strip_prefix(prefix)? {
        "" => Some("/"),
        rest if rest.starts_with('/') => Some(rest),
        _ => None,
    }
}

/// A header's first value, or the first of a comma-separated list (`X-Forwarded-Host` may
/// hold one per hop: the first is the client's).
fn first_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let value = headers.get(name)?.to_str().ok()?;
    let first = value.split(',').next().unwrap_or(value).trim();
    (!first.is_empty()).then_some(first)
}

/// The client of the request asked about. The peer is the ingress: only when it is a trusted
/// proxy is its `X-Forwarded-For` believed, or, when it sends none, its `X-Real-IP`.
/// Otherwise the client is the peer itself, so an untrusted ingress's clients share its
/// address for address rules and lockouts.
fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &CidrSet) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    if headers.contains_key(forward::X_FORWARDED_FOR) {
        return client_ip::resolve(peer, headers, trusted);
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
        .map_or(peer, |ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_prefix_takes_whole_segments() {
        assert_eq!(under_prefix("/envoy/v1/x", "/envoy"), Some("/v1/x"));
        assert_eq!(under_prefix("/envoy", "/envoy"), Some("/"));
        assert_eq!(under_prefix("/envoy/", "/envoy"), Some("/"));
        assert_eq!(under_prefix("/envoyx/v1", "/envoy"), None);
        assert_eq!(under_prefix("/v1/envoy", "/envoy"), None);
    }

    #[test]
    fn real_ip_only_from_a_trusted_peer_and_only_without_forwarded_for() {
        let trusted = CidrSet::parse(["10.0.0.0/8".to_string()].iter()).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-real-ip", HeaderValue::from_static("203.0.113.7"));
        let ingress: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_address(ingress, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_address(stranger, &h, &trusted), stranger);
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.9"));
        assert_eq!(
            client_address(ingress, &h, &trusted),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
        h.insert("x-real-ip", HeaderValue::from_static("not an address"));
        h.remove("x-forwarded-for");
        assert_eq!(client_address(ingress, &h, &trusted), ingress);
    }

    #[test]
    fn the_first_forwarded_host_is_the_clients() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("api.example, edge.internal"),
        );
        assert_eq!(first_value(&h, "x-forwarded-host"), Some("api.example"));
        h.insert("x-forwarded-host", HeaderValue::from_static(" , x"));
        assert_eq!(first_value(&h, "x-forwarded-host"), None);
    }
}
