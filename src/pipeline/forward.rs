//! Stage 7: send the request upstream and stream the answer back.
//!
//! On the way up: hop-by-hop headers go (RFC 9110 §7.6.1, with any named in `Connection`),
//! `Authorization` and `X-API-Key` go unless the route keeps them, client-sent `X-Keygate-*`
//! headers go, and so do the client-address headers (`Forwarded`, `X-Real-IP`,
//! `X-Forwarded-Host` and kin) of a peer that is not a trusted proxy. A header spelled with
//! underscores for dashes (`X_Keygate_Key_Id`) goes whenever its dashed twin would be
//! removed or set by the gateway, since CGI, WSGI and Rack servers read the two alike. Then
//! the gateway's own identity and forwarding headers come in. Bodies stream both ways.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{caused_by_body_limit, RequestBody, ResponseBody};
use crate::pipeline::credential::X_API_KEY;
use crate::pipeline::route::Route;
use crate::pipeline::{BodyInFlight, ClientConn};
use crate::policy::rate::RateHeaders;
use crate::rejection::Rejection;
use crate::snapshot::identities::Identity;
use crate::snapshot::KeyEntry;

mod pool;
pub use pool::{UpstreamBody, UpstreamClient};

pub use crate::headers::{
    X_FORWARDED_FOR, X_FORWARDED_PROTO, X_KEYGATE_ENVIRONMENT, X_KEYGATE_IDENTITY,
    X_KEYGATE_KEY_ID, X_KEYGATE_NAMESPACE, X_REQUEST_ID,
};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). `name` is
/// lowercase, as every `HeaderName` is; a match on the text, not a scan of a list.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

/// Headers that name the client or the address it used, which only a trusted proxy may set.
/// `X-Forwarded-For` and `X-Forwarded-Proto` are not here: the gateway writes those itself.
fn client_address(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-real-ip"
            | "x-client-ip"
            | "true-client-ip"
            | "x-cluster-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
            | "x-original-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-forwarded-server"
    )
}

/// Settings of one upstream connection pool. Routes with the same settings share a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    /// Trust only these CAs for `https://` upstreams (a route's `ca_file`); none: the web PKI.
    pub ca_file: Option<std::path::PathBuf>,
    /// The CA bundle's file stamp, so an edited bundle makes a new pool.
    pub ca_stamp: Option<crate::snapshot::FileStamp>,
    /// Speak HTTP/2 to the upstream (ALPN over TLS, prior knowledge over plain TCP).
    pub http2: bool,
}

/// Request ids: a random per-process prefix and a counter, 32 hex digits in all. Each
/// serving worker counts in its own part, whose number leads the counter's half, so that
/// workers never share the counter's cache line and never make the same id.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    counters: crate::metrics::PerWorker<1>,
}

impl RequestIds {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        // Without OS randomness the ids are still unique within this process.
        let _ = getrandom::fill(&mut seed);
        RequestIds {
            prefix: u64::from_le_bytes(seed),
            counters: crate::metrics::PerWorker::default(),
        }
    }

    pub fn next(&self) -> HeaderValue {
        let (part, count) = self.counters.add(0, 1);
        // The part (below 16) in the top byte, the part's count below it, from 1, so that an
        // id's second half, a generated traceparent's parent id, is never all zeros. A part
        // would need 2^56 requests to reach the next part's ids.
        let n = ((part as u64) << 56) | (count.wrapping_add(1) & ((1 << 56) - 1));
        let mut buf = [0u8; 32];
        write_hex(&mut buf[..16], self.prefix);
        write_hex(&mut buf[16..], n);
        // Hex digits always make a valid header value: the fallback is never taken.
        HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

fn write_hex(out: &mut [u8], mut n: u64) {
    for slot in out.iter_mut().rev() {
        let [low, ..] = n.to_le_bytes();
        *slot = crate::keys::hex_digit(low);
        n >>= 4;
    }
}

/// A client-sent request id is kept only from a trusted proxy, and only if it is sane.
pub fn trusted_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(X_REQUEST_ID)?;
    let ok = (1..=128).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
    ok.then(|| v.clone())
}

/// Everything forwarding needs to know about the decision made.
pub struct Forward<'a> {
    pub route: &'a Route,
    pub key: &'a KeyEntry,
    pub identity: Option<&'a Identity>,
    /// The client's connection: its peer's address (the hop that connected to us) as a
    /// header value, whether it is TLS, and its activity, which a request body counts in.
    pub conn: &'a Arc<ClientConn>,
    /// Whether the peer is a trusted proxy, whose forwarding headers are extended.
    pub peer_trusted: bool,
    /// The normalised path, when it differs from the request's.
    pub normalized_path: Option<&'a str>,
    pub request_id: HeaderValue,
    pub rate: Option<RateHeaders>,
    /// Where upgraded connections are counted, so a drain can wait for them.
    pub tunnels: &'a Arc<Tunnels>,
    /// An upgraded connection with no traffic either way for this long is closed.
    pub tunnel_idle: Duration,
}

/// The most headers [`forward`] adds to an upstream request besides forwarded metadata:
/// `Connection` and `Upgrade`, the key's id, namespace and environment, its identity,
/// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Request-Id`.
const ADDED_UPSTREAM: usize = 9;

/// Inserts `X-Keygate-Identity` when the key names an identity, and the `meta` members the
/// route forwards, each as `X-Keygate-Meta-<Name>`: the key's own, else its identity's.
pub fn insert_identity_and_meta(
    h: &mut http::HeaderMap,
    route: Option<&Route>,
    key: &KeyEntry,
    identity: Option<&Identity>,
) {
    if let Some(v) = key.identity_header() {
        h.insert(X_KEYGATE_IDENTITY, v.clone());
    }
    let (Some(route), own, shared) = (route, key.meta(), identity.and_then(|i| i.meta.as_ref()))
    else {
        return;
    };
    if own.is_none() && shared.is_none() {
        return;
    }
    for (field, header) in &route.forward_meta {
        let value = own
            .and_then(|m| m.header(field))
            .or_else(|| shared.and_then(|m| m.header(field)));
        if let Some(value) = value {
            h.insert(header.clone(), value.clone());
        }
    }
}

/// Sends the request to the route's upstream and returns its streamed response. An upgrade
/// (WebSocket or any other protocol) that the upstream accepts with 101 is spliced through.
pub async fn forward(
    client: &UpstreamClient,
    f: Forward<'_>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Rejection> {
    let route = f.route;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_request_body) {
        return Err(Rejection::BodyTooLarge);
    }
    let upgrade = upgrade_protocol(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    // The request's own path and query go upstream as they are unless the route rewrites
    // them: no new string, no re-parse.
    let path_and_query = match (
        f.normalized_path,
        route.rewrites_path(),
        parts.uri.path_and_query(),
    ) {
        (None, false, Some(pq)) => pq.clone(),
        _ => {
            let path = f.normalized_path.unwrap_or(parts.uri.path());
            let upstream_path = route.upstream_path(path, parts.uri.query());
            PathAndQuery::from_maybe_shared(bytes::Bytes::from(upstream_path))
                .map_err(|_| Rejection::InvalidPath)?
        }
    };
    // The client's host is kept only for a route that preserves it.
    let client_host = route.preserve_host.then(|| {
        parts.headers.get(HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
    });
    // Origin form; the pool makes it absolute for HTTP/2.
    parts.uri = Uri::from(path_and_query);
    parts.version = Version::HTTP_11;

    let h = &mut parts.headers;
    strip_headers(
        h,
        Some(Inbound {
            client_address: !(f.peer_trusted || route.keep_forwarding_headers),
            api_key: !route.keep_authorization,
        }),
    );
    // Room for every header added below at once: the map hyper parsed has room for the
    // client's few, and growing it header by header reallocates and rehashes it at each
    // power of two (twice for a key with an identity).
    // (Failing only past the map's 32,768 headers, far beyond hyper's 100 parsed.)
    let _ = h.try_reserve(ADDED_UPSTREAM.saturating_add(route.forward_meta.len()));
    if let Some(protocol) = &upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, protocol.clone());
    }
    h.insert(X_KEYGATE_KEY_ID, f.key.id_header().clone());
    h.insert(X_KEYGATE_NAMESPACE, f.key.namespace.header().clone());
    h.insert(X_KEYGATE_ENVIRONMENT, f.key.environment.header().clone());
    insert_identity_and_meta(h, Some(route), f.key, f.identity);
    set_forwarded_for(h, &f.conn.peer_header, f.peer_trusted);
    if !(f.peer_trusted && h.contains_key(X_FORWARDED_PROTO)) {
        h.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if f.conn.tls { "https" } else { "http" }),
        );
    }
    h.insert(X_REQUEST_ID, f.request_id.clone());
    let host = client_host
        .flatten()
        .unwrap_or_else(|| route.upstream.host_header.clone());
    h.insert(HOST, host);

    // A body still to come keeps the exchange in flight for the connection's timer, so its
    // bytes are never taken for the next request's head.
    let in_flight = (!http_body::Body::is_end_stream(&body)).then(|| BodyInFlight::new(f.conn));
    let body = RequestBody::new(body, route.max_request_body, in_flight);
    let upstream_req = Request::from_parts(parts, body);
    let exchange = client.send(
        &route.upstream.scheme,
        &route.upstream.authority,
        upstream_req,
    );
    let mut response = match tokio::time::timeout(route.response_timeout, exchange).await {
        Err(_) => return Err(Rejection::UpstreamTimeout),
        Ok(Err(e)) => {
            if caused_by_body_limit(&*e) {
                return Err(Rejection::BodyTooLarge);
            }
            tracing::debug!(route = %route.name, error = %e, "upstream request failed");
            return Err(Rejection::UpstreamUnavailable);
        }
        Ok(Ok(response)) => response,
    };

    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let tunnel = match (client_upgrade, switching) {
        (Some(client_side), true) => Some((client_side, hyper::upgrade::on(&mut response))),
        _ => None,
    };
    let (mut parts, body) = response.into_parts();
    let protocol = tunnel
        .as_ref()
        .and_then(|_| parts.headers.get(UPGRADE).cloned());
    strip_headers(&mut parts.headers, None);
    if let Some(rate) = f.rate {
        rate.write(&mut parts.headers, false);
    }
    parts.headers.insert(X_REQUEST_ID, f.request_id);
    if let (Some((client_side, upstream_side)), Some(protocol)) = (tunnel, protocol) {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol);
        body.upgraded();
        let guard = f.tunnels.enter();
        let idle = f.tunnel_idle;
        tokio::spawn(async move {
            let _open = guard;
            match tokio::try_join!(client_side, upstream_side) {
                Ok((a, b)) => splice(TokioIo::new(a), TokioIo::new(b), idle).await,
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            }
        });
        return Ok(Response::from_parts(parts, ResponseBody::empty()));
    }
    Ok(Response::from_parts(
        parts,
        ResponseBody::Upstream(crate::body::ProxiedBody::new(body)),
    ))
}

/// The protocol an upgrade request asks for: `Upgrade: X` with `upgrade` among the
/// `Connection` tokens.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    // Most requests ask for none: one lookup of a standard name settles it.
    let protocol = headers.get(UPGRADE)?;
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| protocol.clone())
}

/// Upgraded connections in flight.
#[derive(Debug, Default)]
pub struct Tunnels {
    open: AtomicUsize,
    closed: tokio::sync::Notify,
}

/// Counts one tunnel while it lives.
#[derive(Debug)]
pub struct TunnelGuard(Arc<Tunnels>);

impl Tunnels {
    pub fn enter(self: &Arc<Self>) -> TunnelGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        TunnelGuard(self.clone())
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no tunnel is open.
    pub async fn drained(&self) {
        loop {
            let closed = self.closed.notified();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.closed.notify_waiters();
    }
}

/// Copies both ways until either side closes or nothing moves for `idle`.
async fn splice<A, B>(a: A, b: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(0));
    let started = std::time::Instant::now();
    let mut a = Activity {
        inner: a,
        last: last.clone(),
        started,
    };
    let mut b = Activity {
        inner: b,
        last: last.clone(),
        started,
    };
    let watch = async {
        loop {
            tokio::time::sleep(idle.checked_div(4).unwrap_or(idle)).await;
            let quiet = started
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "tunnel closed with an error");
            }
        }
        () = watch => tracing::debug!("tunnel idle; closed"),
    }
}

/// A stream that notes when bytes last moved through it.
struct Activity<T> {
    inner: T,
    last: Arc<AtomicU64>,
    started: std::time::Instant,
}

impl<T> Activity<T> {
    fn touch(&self) {
        let millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(millis, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        poll
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What goes from a request on its way upstream, besides the hop-by-hop headers.
#[derive(Debug, Clone, Copy)]
struct Inbound {
    /// The client-address headers ([`client_address`]): the peer is not a trusted proxy.
    client_address: bool,
    /// `Authorization` and `X-API-Key`: the route does not keep credentials.
    api_key: bool,
}

impl Inbound {
    /// Whether a client-sent header goes. `name` is lowercase, as every `HeaderName` is.
    fn removes(self, name: &str) -> bool {
        if name.contains('_') {
            // An underscore twin is never legitimate where its dashed form is one the
            // gateway sets or guards: an upstream may read it as that form.
            let dashed = name.replace('_', "-");
            return dashed.starts_with("x-keygate-")
                || client_address(&dashed)
                || matches!(
                    dashed.as_str(),
                    "x-forwarded-for" | "x-forwarded-proto" | "x-request-id" | X_API_KEY
                );
        }
        name.starts_with("x-keygate-")
            || (self.client_address && client_address(name))
            || (self.api_key && matches!(name, "authorization" | X_API_KEY))
    }
}

/// Removes the hop-by-hop headers, including every header `Connection` names, and, on the
/// way upstream (`inbound`), the client's headers that must not reach it. One pass over the
/// names, each judged by a match on its text: a message carries a handful of headers, so
/// this beats probing for each name. Nothing is allocated unless a header besides
/// `Connection` (and those it names) goes.
fn strip_headers(headers: &mut HeaderMap, inbound: Option<Inbound>) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    if let http::header::Entry::Occupied(connection) = headers.entry(CONNECTION) {
        let (_, values) = connection.remove_entry_mult();
        for value in values {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                // `close` names no header, and `keep-alive` goes below by its own right.
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    doomed.push(name);
                }
            }
        }
    }
    for name in headers.keys() {
        let text = name.as_str();
        if hop_by_hop(text) || inbound.is_some_and(|i| i.removes(text)) {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// A trusted proxy's chain is extended with the peer; an untrusted client's is replaced,
/// so the upstream never sees a forged hop. `peer` is the peer's address as a header value,
/// made once per connection.
fn set_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue, peer_trusted: bool) {
    if peer_trusted && headers.contains_key(X_FORWARDED_FOR) {
        let mut chain = Vec::with_capacity(64);
        for v in headers.get_all(X_FORWARDED_FOR) {
            chain.extend_from_slice(v.as_bytes());
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(peer.as_bytes());
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)) {
            headers.insert(X_FORWARDED_FOR, v);
            return;
        }
    }
    headers.insert(X_FORWARDED_FOR, peer.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-stays", HeaderValue::from_static("1"));
        h.insert("x-keygate-key-id", HeaderValue::from_static("forged"));
        let mut response = h.clone();
        strip_headers(&mut response, None);
        assert_eq!(
            response.len(),
            2,
            "a response keeps x-keygate-*: {response:?}"
        );
        let keep_all = Inbound {
            client_address: false,
            api_key: false,
        };
        strip_headers(&mut h, Some(keep_all));
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-stays"));
    }

    #[test]
    fn twins_and_client_address_headers_go() {
        let untrusted = Inbound {
            client_address: true,
            api_key: true,
        };
        let trusted = Inbound {
            client_address: false,
            api_key: false,
        };
        for name in [
            "x_keygate_key_id",
            "x-keygate_namespace",
            "x_forwarded_for",
            "x_real_ip",
            "x_api_key",
            "x_request_id",
        ] {
            assert!(untrusted.removes(name) && trusted.removes(name), "{name}");
        }
        for name in [
            "forwarded",
            "x-real-ip",
            "x-forwarded-host",
            "x-client-ip",
            "x-api-key",
        ] {
            assert!(untrusted.removes(name) && !trusted.removes(name), "{name}");
        }
        for name in ["x-custom_thing", "accept", "x-forwarded-for", "user_agent"] {
            assert!(!untrusted.removes(name), "{name}");
        }
    }

    #[test]
    fn forwarded_for_is_extended_only_for_trusted_peers() {
        let peer = HeaderValue::from_static("10.0.0.1");
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("7.7.7.7"));
        set_forwarded_for(&mut h, &peer, true);
        assert_eq!(h[X_FORWARDED_FOR], "6.6.6.6, 7.7.7.7, 10.0.0.1");
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        set_forwarded_for(&mut h, &peer, false);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1");
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(trusted_request_id(&{
            let mut h = HeaderMap::new();
            h.insert(X_REQUEST_ID, a.clone());
            h
        })
        .is_some());
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has spaces"));
        assert!(trusted_request_id(&h).is_none());
    }

    /// Workers count in parts of their own: ids made on three threads at once (no worker,
    /// workers 1 and 17, which shares worker 1's part number modulo 16 but not its thread) are
    /// all different, and each part's first id's second half is not all zeros.
    #[test]
    fn request_ids_made_by_different_workers_never_meet() {
        let ids = std::sync::Arc::new(RequestIds::new());
        let made: Vec<Vec<HeaderValue>> = [0, 1, 2, 17]
            .into_iter()
            .map(|worker| {
                let ids = ids.clone();
                std::thread::spawn(move || {
                    if worker > 0 {
                        crate::server::become_worker(worker);
                    }
                    (0..1000).map(|_| ids.next()).collect()
                })
            })
            .map(|t| t.join().unwrap())
            .collect();
        let all: std::collections::HashSet<&HeaderValue> = made.iter().flatten().collect();
        assert_eq!(all.len(), 4000);
        for first in made.iter().filter_map(|ids| ids.first()) {
            assert_ne!(&first.as_bytes()[16..], b"0000000000000000");
            assert_eq!(first.len(), 32);
        }
        assert!(made[2][0].as_bytes()[16..].starts_with(b"02"));
    }
}
