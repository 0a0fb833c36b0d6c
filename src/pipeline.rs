//! The spine: one function that runs the stages in the contract's order. Each stage is a
//! plain function that either passes the request on or returns a [`Rejection`].
//!
//! client address → route → credential → lookup → policy → rate limit → usage → forward

pub mod authorize;
pub mod client_ip;
pub mod credential;
pub mod forward;
pub mod rate_limit;
pub mod route;
pub mod scope;
pub mod usage;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::header::HOST;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::body::ResponseBody;
use crate::clock::Clock;
use crate::rejection::Rejection;
use crate::server::Gateway;
use crate::snapshot::{KeyEntry, Snapshot};
use rate_limit::RateHeaders;
use route::Route;

/// Handles one proxied request from start to finish.
pub async fn handle(
    gw: &Gateway,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    let snapshot = gw.snapshot.load_full();
    let peer_ip = peer.ip().to_canonical();
    let peer_trusted = snapshot.trusted_proxies.contains(peer_ip);
    let request_id = peer_trusted
        .then(|| forward::trusted_request_id(req.headers()))
        .flatten()
        .unwrap_or_else(|| gw.request_ids.next());
    let span = tracing::debug_span!("request", id = ?request_id, method = %req.method());
    let entered = span.enter();

    let client = client_ip::resolve(peer_ip, req.headers(), &snapshot.trusted_proxies);
    let admission = match admit(&snapshot, &gw.clock, &req, client) {
        Ok(a) => a,
        Err(refused) => {
            let key_id = refused.key.map(|k| k.id.as_str());
            tracing::debug!(code = refused.rejection.code(), client = %client, key_id, "refused");
            if refused.rejection.status() == StatusCode::UNAUTHORIZED {
                gw.audit.auth_failed(
                    gw.clock.unix_secs(),
                    client,
                    refused.rejection.code(),
                    key_id,
                );
            }
            return refused.rejection.into_response(Some(request_id));
        }
    };
    drop(entered);
    let decision = forward::Forward {
        route: admission.route,
        key: admission.key,
        peer: peer_ip,
        peer_trusted,
        normalized_path: admission.normalized_path.as_deref(),
        request_id: request_id.clone(),
        rate: admission.rate,
        x_api_key: snapshot.x_api_key,
    };
    match forward::forward(&snapshot.upstream, decision, req)
        .instrument(span)
        .await
    {
        Ok(response) => response,
        Err(rejection) => {
            tracing::debug!(code = rejection.code(), key_id = %admission.key.id, "upstream refused");
            rejection.into_response(Some(request_id))
        }
    }
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Admission<'s> {
    pub route: &'s Route,
    pub key: &'s KeyEntry,
    /// Set when normalisation changed the path.
    pub normalized_path: Option<String>,
    pub rate: Option<RateHeaders>,
}

/// A refused request, with the key when the refusal came after it was identified.
#[derive(Debug)]
pub struct Refused<'s> {
    pub rejection: Rejection,
    pub key: Option<&'s KeyEntry>,
}

impl From<Rejection> for Refused<'_> {
    fn from(rejection: Rejection) -> Self {
        Refused {
            rejection,
            key: None,
        }
    }
}

/// Decides whether a request from `client` may go upstream, in the contract's order.
/// Synchronous and free of I/O, so it can be tested and benchmarked on its own.
pub fn admit<'s, B>(
    snapshot: &'s Snapshot,
    clock: &Clock,
    req: &Request<B>,
    client: IpAddr,
) -> Result<Admission<'s>, Refused<'s>> {
    let path = route::normalize_path(req.uri().path())?;
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host());
    let route = snapshot
        .routes
        .select(host, &path)
        .ok_or(Rejection::NoRoute)?;
    let token = credential::extract(req.headers(), snapshot.x_api_key)?;
    let key = credential::identify(snapshot, token)?;
    let now = clock.unix_secs();
    key.usage.record(now, client);
    let refused = |rejection| Refused {
        rejection,
        key: Some(key),
    };
    authorize::authorize(key, route, client, req.method(), &path, now).map_err(refused)?;
    let rate = match &key.limiter {
        Some(limiter) => Some(rate_limit::admit(limiter, clock).map_err(refused)?),
        None => None,
    };
    Ok(Admission {
        route,
        key,
        normalized_path: match path {
            Cow::Owned(p) => Some(p),
            Cow::Borrowed(_) => None,
        },
        rate,
    })
}
