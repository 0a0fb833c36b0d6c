//! The spine: one function that runs the stages in the contract's order. Each stage is a
//! plain function that either passes the request on or returns a [`Rejection`].
//!
//! client address → lockout → route → credential → lookup → policy → quota → rate limit
//! → usage → forward
//!
//! [`decide`] is everything before the forwarding, and the proxy ([`handle`]), the auth
//! listener ([`crate::auth_listener`]) and the verify API all call it, so the three cannot
//! decide differently.

pub mod authorize;
pub mod client_ip;
pub mod credential;
pub mod forward;
pub mod rate_limit;
pub mod route;
pub mod shared_limit;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::access_log;
use crate::audit::AuditEvent;
use crate::body::ResponseBody;
use crate::clock::Clock;
use crate::gateway::Gateway;
use crate::policy::credits::Credits;
use crate::policy::rate::{Budget, Name, RateHeaders};
use crate::rejection::Rejection;
use crate::snapshot::identities::Identity;
use crate::snapshot::{KeyEntry, Snapshot};
use crate::state::credits::{CreditBook, Refused as CreditsRefused};
use crate::state::history::{self, Entry};
use crate::state::limiters::KeyLimiter;
use crate::state::lockouts::{self, Lockouts};
use crate::state::usage::KeyUsage;
use route::Route;

/// Handles one proxied request from start to finish.
pub async fn handle(
    gw: &Arc<Gateway>,
    mut req: Request<Incoming>,
    conn: &Arc<ClientConn>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let snapshot = gw.snapshot.load_full();
    // GitHub's secret-scanning reports come in on this listener, with no key of their own.
    if let Some(gh) = &snapshot.github {
        if req.uri().path() == gh.path {
            return crate::scanning::github(gw, req, gh).await;
        }
    }
    let peer_ip = conn.peer_ip;
    let peer_trusted = snapshot.trusted_proxies.contains(peer_ip);
    let request_id = peer_trusted
        .then(|| forward::trusted_request_id(req.headers()))
        .flatten()
        .unwrap_or_else(|| gw.request_ids.next());
    let span = tracing::debug_span!("request", id = ?request_id, method = %req.method());

    let client_ip = client_ip::resolve(peer_ip, req.headers(), &snapshot.trusted_proxies);
    let client = Client::Known(client_ip);
    let ask = Ask::of(&req, snapshot.x_api_key);
    // Without shared limits the decision is synchronous: it runs inside the request's span
    // without wrapping a future in it, which would cost every request.
    let decided = match snapshot.shared_limits {
        None => {
            let _entered = span.enter();
            decide_locally(gw, &snapshot, ask, client)
        }
        Some(_) => {
            decide(gw, &snapshot, ask, client)
                .instrument(span.clone())
                .await
        }
    };
    let (route, key, identity, normalized_path, rate) = match decided {
        Ok(Admission {
            route: Some(route),
            key,
            identity,
            normalized_path,
            rate,
            ..
        }) => (route, key, identity, normalized_path, rate),
        // A request that names its path always gets a route or a refusal.
        Ok(_) => {
            tracing::warn!("a proxied request was admitted without a route");
            return Rejection::Internal.into_response(Some(request_id));
        }
        Err(refused) => {
            let took = started.elapsed();
            gw.metrics.gateway_time.observe(took);
            let code = refused.rejection.code();
            if let Some(key) = refused.key.filter(|_| gw.history.is_on()) {
                let entry = Entry::new(
                    history::millis(gw.clock.wall()),
                    client_ip,
                    req.method(),
                    req.uri().path(),
                    &request_id,
                );
                let status = refused.rejection.status().as_u16();
                gw.history
                    .record(key.usage(), entry.answered(status, Some(code)));
            }
            // The response first, so that its line is written whole at once; the request id
            // goes in after, when the line no longer borrows it.
            let mut response = refused.rejection.into_response(None);
            if let Some(log) = &gw.access_log {
                let head = Logged::of(&req, gw.clock.wall(), &request_id, client_ip, conn, took);
                log.answered(
                    &head.with(&snapshot, refused.route, refused.key),
                    &response,
                    code,
                );
            }
            response
                .headers_mut()
                .insert(crate::headers::X_REQUEST_ID, request_id);
            return response;
        }
    };
    if snapshot.config.tracing.generate_traceparent && access_log::trace_id(req.headers()).is_none()
    {
        if let Some(made) = access_log::new_traceparent(&request_id) {
            req.headers_mut().insert(crate::headers::TRACEPARENT, made);
        }
    }
    let decision = forward::Forward {
        route,
        key,
        identity,
        conn,
        peer_trusted,
        normalized_path: normalized_path.as_deref(),
        request_id: request_id.clone(),
        rate,
        tunnels: &gw.tunnels,
        tunnel_idle: snapshot.listeners.tunnel_idle,
    };
    let sent = Instant::now();
    let took = sent.saturating_duration_since(started);
    gw.metrics.gateway_time.observe(took);
    let now = gw.clock.wall();
    let line = gw.access_log.as_ref().and_then(|log| {
        let head = Logged::of(&req, now, &decision.request_id, client_ip, conn, took);
        log.begin(&head.with(&snapshot, Some(route), Some(key)), true)
    });
    let entry = gw.history.is_on().then(|| {
        Entry::new(
            history::millis(now),
            client_ip,
            req.method(),
            req.uri().path(),
            &decision.request_id,
        )
    });
    gw.metrics.upstream_sent();
    // The snapshot build gives every route the index of one of its own clients.
    let result = match snapshot.clients.get(route.client) {
        Some(client) => {
            forward::forward(client, decision, req)
                .instrument(span)
                .await
        }
        None => {
            tracing::warn!(client = route.client, "a route names no upstream client");
            Err(Rejection::Internal)
        }
    };
    gw.metrics.upstream_done();
    let upstream_took = sent.elapsed();
    gw.metrics.upstream_time.observe(upstream_took);
    match result {
        Ok(response) => {
            let status = response.status().as_u16();
            key.usage().outcome(status, None);
            if let Some(i) = identity {
                i.usage().outcome(status, None);
            }
            route.counters.upstream(status);
            if let Some(entry) = entry {
                gw.history.record(key.usage(), entry.answered(status, None));
            }
            access_log::finish(response, line, None, Some(upstream_took))
        }
        Err(rejection) => {
            tracing::debug!(code = rejection.code(), key_id = %key.id, "upstream failed");
            key.usage().outcome(0, Some(&rejection));
            if let Some(i) = identity {
                i.usage().outcome(0, Some(&rejection));
            }
            route.counters.failed(&rejection);
            let code = rejection.code();
            let status = rejection.status().as_u16();
            if let Some(entry) = entry {
                gw.history
                    .record(key.usage(), entry.answered(status, Some(code)));
            }
            access_log::finish(
                rejection.into_response(Some(request_id)),
                line,
                Some(code),
                Some(upstream_took),
            )
        }
    }
}

/// What the access log says of a request, before the route and key are known.
pub(crate) struct Logged<'r> {
    head: access_log::Head<'r>,
}

impl<'r> Logged<'r> {
    pub(crate) fn of(
        req: &'r Request<Incoming>,
        time: std::time::SystemTime,
        request_id: &'r HeaderValue,
        client: IpAddr,
        conn: &'r ClientConn,
        took: std::time::Duration,
    ) -> Logged<'r> {
        Logged {
            head: access_log::Head {
                time,
                request_id,
                client,
                client_text: (client == conn.peer_ip).then(|| conn.peer_header.as_bytes()),
                method: req.method(),
                path: req.uri().path(),
                query: req.uri().query(),
                version: req.version(),
                headers: req.headers(),
                // Exact for a `Content-Length` or no body, unknown for a chunked one.
                bytes_in: http_body::Body::size_hint(req.body()).exact(),
                route: None,
                key_id: None,
                namespace: None,
                identity: None,
                gateway: took,
            },
        }
    }

    /// The line's head, with the route and key the decision found.
    pub(crate) fn with(
        mut self,
        snapshot: &'r Snapshot,
        route: Option<&'r Route>,
        key: Option<&'r KeyEntry>,
    ) -> access_log::Head<'r> {
        self.head.route = route.map(|r| r.name.as_str());
        if let Some(key) = key {
            self.head.key_id = Some(key.id.as_bytes());
            self.head.namespace = Some(key.namespace.as_str());
            self.head.identity = identity_of(snapshot, key).map(|i| &*i.id);
        }
        self.head
    }
}

/// The request a decision is about: the proxied request itself, or the original request that
/// an ingress (the auth listener) or a service (the verify API) describes.
#[derive(Debug)]
pub struct Ask<'r> {
    pub method: &'r Method,
    /// The request target's path, without the query. `None` for a verify call that names no
    /// path: only the key itself is judged then, not a route's environment, namespace and
    /// scopes.
    pub path: Option<&'r str>,
    pub host: Option<&'r str>,
    /// The presented credential, or why there is none. A missing key is refused only after
    /// the route is found, so an unknown path is `no_route` with or without a key.
    pub token: Result<&'r str, Rejection>,
}

impl<'r> Ask<'r> {
    /// What a request asks about itself.
    pub fn of<B>(req: &'r Request<B>, allow_x_api_key: bool) -> Ask<'r> {
        Ask {
            method: req.method(),
            path: Some(req.uri().path()),
            host: host_of(req),
            token: credential::extract(req.headers(), allow_x_api_key),
        }
    }
}

/// The request's `Host`, or its URI's authority (HTTP/2).
pub fn host_of<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
}

/// Whose request a decision is about.
#[derive(Debug, Clone, Copy)]
pub enum Client {
    /// The client's own address: address rules and lockouts apply to it.
    Known(IpAddr),
    /// A verify call that named no address. Keys bound to addresses are refused, since no
    /// address can be shown to be in their rules; lockouts do not apply, since the caller is
    /// not the client. The caller's own address is recorded as the key's last user.
    Unnamed { caller: IpAddr },
}

impl Client {
    /// The address recorded in usage and the audit log.
    pub fn ip(self) -> IpAddr {
        match self {
            Client::Known(ip) | Client::Unnamed { caller: ip } => ip,
        }
    }

    /// The address lockouts count against, if any.
    fn lockable(self) -> Option<IpAddr> {
        match self {
            Client::Known(ip) => Some(ip),
            Client::Unnamed { .. } => None,
        }
    }
}

/// The whole decision, as the proxy, the auth listener and the verify API make it: the
/// synchronous checks, then the shared limits (Redis) when configured. A refusal is counted
/// and audited here; an admission counts as accepted. Only the forwarding is left to the
/// caller.
pub async fn decide<'s>(
    gw: &Gateway,
    snapshot: &'s Snapshot,
    ask: Ask<'_>,
    client: Client,
) -> Result<Admission<'s>, Refused<'s>> {
    let Some(shared) = &snapshot.shared_limits else {
        return decide_locally(gw, snapshot, ask, client);
    };
    let mut admission = match admit(snapshot, &gw.clock, ask, client, State::of(gw)) {
        Ok(a) => a,
        Err(refused) => {
            account_refusal(gw, snapshot, &refused, client);
            return Err(refused);
        }
    };
    let cost = admission.route.map_or(1, |r| r.cost);
    match shared_limit::admit(
        shared,
        admission.key,
        admission.identity,
        &gw.clock,
        cost,
        &gw.credits,
    )
    .await
    {
        Ok((rate, left)) => {
            admission.rate = rate;
            admission.credits_left = left;
        }
        Err(rejection) => {
            let refused = Refused {
                rejection,
                route: admission.route,
                key: Some(admission.key),
            };
            account_refusal(gw, snapshot, &refused, client);
            return Err(refused);
        }
    }
    admission.accepted();
    Ok(admission)
}

/// [`decide`] when every limit is counted on this node: synchronous.
fn decide_locally<'s>(
    gw: &Gateway,
    snapshot: &'s Snapshot,
    ask: Ask<'_>,
    client: Client,
) -> Result<Admission<'s>, Refused<'s>> {
    match admit(snapshot, &gw.clock, ask, client, State::of(gw)) {
        Ok(admission) => {
            admission.accepted();
            Ok(admission)
        }
        Err(refused) => {
            account_refusal(gw, snapshot, &refused, client);
            Err(refused)
        }
    }
}

/// Counts a refusal where it belongs (route, key or the anonymous cell), audits failed
/// authentications, and locks out addresses that keep guessing.
fn account_refusal(gw: &Gateway, snapshot: &Snapshot, refused: &Refused<'_>, client: Client) {
    let rejection = &refused.rejection;
    let key_id = refused.key.map(|k| k.id.as_str());
    tracing::debug!(code = rejection.code(), client = %client.ip(), key_id, "refused");
    refused
        .route
        .map_or(&gw.metrics.unrouted, |r| &r.counters)
        .refused(rejection);
    match refused.key {
        Some(key) => {
            key.usage().refused(rejection);
            if let Some(i) = identity_of(snapshot, key) {
                i.usage().refused(rejection);
            }
        }
        None => gw.usage.anonymous.refused(rejection),
    }
    if rejection.status() != StatusCode::UNAUTHORIZED {
        return;
    }
    let now = gw.clock.unix_secs();
    gw.audit
        .auth_failed(now, client.ip(), rejection.code(), key_id);
    let (Some(policy), Some(ip)) = (snapshot.lockout.as_ref(), client.lockable()) else {
        return;
    };
    if lockouts::counts_as_guess(rejection) && gw.lockouts.failure(ip, now, policy) {
        gw.metrics.lockouts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client = %ip, cooldown_secs = policy.cooldown, "address locked out for failed authentications");
        gw.audit.record(
            &AuditEvent::new(now, "gateway", "auth.locked_out")
                .ip(Some(ip))
                .failed(format!(
                    "{} failed authentications within {}s; locked out for {}s",
                    policy.max_failures, policy.window, policy.cooldown
                )),
        );
    }
}

/// What is known of a client connection before its first request: made once per connection.
#[derive(Debug)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// The peer's address, IPv4-mapped addresses as IPv4.
    pub peer_ip: IpAddr,
    /// The same, as a header value for `X-Forwarded-For`.
    pub peer_header: http::HeaderValue,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// What the connection's requests are doing, for its idle timer.
    pub activity: Activity,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = peer.ip().to_canonical();
        // An address's text is always a valid header value; the fallback is never taken.
        let peer_header = http::HeaderValue::from_str(&peer_ip.to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        ClientConn {
            peer,
            peer_ip,
            peer_header,
            tls,
            activity: Activity::default(),
        }
    }
}

/// Requests begun on one connection, those still in flight, and the reads its stream made.
/// The connection's timer reads them; the request path and the stream only count.
#[derive(Debug, Default)]
pub struct Activity {
    begun: AtomicU64,
    /// Handlers that have not returned, and request bodies still on their way upstream.
    in_flight: AtomicU64,
    /// Reads that brought bytes, counted by the connection's stream ([`Activity::read`]).
    reads: AtomicU64,
    /// `reads` when the last handler returned or body ended: reads past it, with nothing in
    /// flight, are the next request's head on its way.
    reads_at_rest: AtomicU64,
    /// The connection speaks HTTP/2, whose reads are frames rather than heads.
    h2: AtomicBool,
}

/// Counts one request in flight while it lives.
#[derive(Debug)]
pub struct Busy<'a>(&'a Activity);

/// Counts a request body in flight until it ends or is dropped.
#[derive(Debug)]
pub struct BodyInFlight(Arc<ClientConn>);

impl Activity {
    pub fn begin(&self, version: http::Version) -> Busy<'_> {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if version == http::Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        Busy(self)
    }

    /// Requests begun so far, and whether any is in flight now.
    pub fn state(&self) -> (u64, bool) {
        (
            self.begun.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed) > 0,
        )
    }

    /// A read brought bytes. Only the connection's own task reads its stream, so a load and
    /// a store count it (no read-modify-write on every read).
    pub fn read(&self) {
        let n = self.reads.load(Ordering::Relaxed);
        self.reads.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// Whether an HTTP/1 request's head is on its way: bytes came after the last exchange
    /// came to rest, and nothing is in flight.
    pub fn head_pending(&self) -> bool {
        !self.h2.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.reads.load(Ordering::Relaxed) != self.reads_at_rest.load(Ordering::Relaxed)
    }

    fn end(&self) {
        self.reads_at_rest
            .store(self.reads.load(Ordering::Relaxed), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl BodyInFlight {
    pub fn new(conn: &Arc<ClientConn>) -> Self {
        conn.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        BodyInFlight(conn.clone())
    }
}

impl Drop for BodyInFlight {
    fn drop(&mut self) {
        self.0.activity.end();
    }
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Admission<'s> {
    /// The route the request takes; `None` only for a verify call that named no path.
    pub route: Option<&'s Route>,
    pub key: &'s KeyEntry,
    /// The key's identity, when it names one that has a record.
    pub identity: Option<&'s Identity>,
    /// Set when normalisation changed the path.
    pub normalized_path: Option<String>,
    pub rate: Option<RateHeaders>,
    /// A limited-use key's credits left after this request; `None` for a key without.
    pub credits_left: Option<u64>,
}

impl Admission<'_> {
    /// Counts the admission in the key's usage and its identity's.
    fn accepted(&self) {
        self.key.usage().accepted();
        if let Some(i) = self.identity {
            i.usage().accepted();
        }
    }
}

/// The identity `key` names, if it has a record.
pub fn identity_of<'s>(snapshot: &'s Snapshot, key: &KeyEntry) -> Option<&'s Identity> {
    snapshot.identities.get(key.identity_id()?)
}

/// The state a decision reads and spends, outside the snapshot.
#[derive(Debug, Clone, Copy)]
pub struct State<'g> {
    pub lockouts: &'g Lockouts,
    pub credits: &'g CreditBook,
}

impl<'g> State<'g> {
    pub fn of(gw: &'g Gateway) -> Self {
        State {
            lockouts: &gw.lockouts,
            credits: &gw.credits,
        }
    }
}

/// A refused request, with the route and key when the refusal came after they were found.
#[derive(Debug)]
pub struct Refused<'s> {
    pub rejection: Rejection,
    pub route: Option<&'s Route>,
    pub key: Option<&'s KeyEntry>,
}

impl From<Rejection> for Refused<'_> {
    fn from(rejection: Rejection) -> Self {
        Refused {
            rejection,
            route: None,
            key: None,
        }
    }
}

/// Decides whether a request from `client` may go upstream, in the contract's order.
/// Synchronous and free of I/O, so it can be tested and benchmarked on its own. With
/// `rate_limit.backend: redis` it leaves the limits to [`shared_limit`].
pub fn admit<'s>(
    snapshot: &'s Snapshot,
    clock: &Clock,
    ask: Ask<'_>,
    client: Client,
    state: State<'_>,
) -> Result<Admission<'s>, Refused<'s>> {
    let State { lockouts, credits } = state;
    let now = clock.unix_secs();
    if let (Some(_), Some(ip)) = (&snapshot.lockout, client.lockable()) {
        lockouts.check(ip, now)?;
    }
    let target = match ask.path {
        Some(path) => {
            let route::NormalPath { path, with_params } = route::normalize_path(path)?;
            let route = snapshot
                .routes
                .select(ask.host, &path)
                .ok_or(Rejection::NoRoute)?;
            if with_params.is_some() && !route.allow_path_parameters {
                return Err(Refused {
                    rejection: Rejection::InvalidPath,
                    route: Some(route),
                    key: None,
                });
            }
            Some((route, path, with_params))
        }
        None => None,
    };
    let route = target.as_ref().map(|(route, ..)| *route);
    let on_route = |rejection| Refused {
        rejection,
        route,
        key: None,
    };
    let token = ask.token.map_err(on_route)?;
    let key = credential::identify(snapshot, token).map_err(on_route)?;
    key.usage().seen(now, client.ip());
    let refused = |rejection| Refused {
        rejection,
        route,
        key: Some(key),
    };
    let on = target
        .as_ref()
        .map(|(route, path, _)| (*route, ask.method, path.as_ref()));
    authorize::authorize(key, on, client, now).map_err(refused)?;
    let identity = identity_of(snapshot, key);
    if let Some(i) = identity {
        i.usage().seen(now, client.ip());
    }
    // Shared limits and credits are counted in Redis by `decide`, after this synchronous
    // part.
    if snapshot.shared_limits.is_some() {
        return Ok(Admission {
            route,
            key,
            identity,
            credits_left: None,
            normalized_path: normalized(target),
            rate: None,
        });
    }
    // Credits are spent first: a later refusal gives them back, which a rate limiter's
    // bucket cannot do.
    let cost = route.map_or(1, |r| r.cost);
    let credits_left = spend_credits(credits, key, identity, cost, now).map_err(refused)?;
    let rate = match limits(key, identity, clock, now) {
        Ok(rate) => rate,
        Err(rejection) => {
            refund_credits(credits, key, identity, cost);
            return Err(refused(rejection));
        }
    };
    Ok(Admission {
        route,
        key,
        identity,
        credits_left,
        normalized_path: normalized(target),
        rate,
    })
}

/// The path to send upstream when normalisation changed it.
fn normalized(target: Option<(&Route, Cow<'_, str>, Option<String>)>) -> Option<String> {
    target.and_then(|(_, path, with_params)| match (with_params, path) {
        (Some(p), _) | (None, Cow::Owned(p)) => Some(p),
        (None, Cow::Borrowed(_)) => None,
    })
}

/// Spends `cost` of a limited-use key's credits and of its identity's: what is left of
/// the scarcer, or `None` when neither has credits. Both or neither: when the identity's
/// are exhausted, the key's are given back.
fn spend_credits(
    book: &CreditBook,
    key: &KeyEntry,
    identity: Option<&Identity>,
    cost: u64,
    now: i64,
) -> Result<Option<u64>, Rejection> {
    let spend = |id: &dyn std::ops::Deref<Target = str>, credits: &Credits, slot| match book
        .spend(id, credits, cost, now, slot)
    {
        Ok(left) => Ok(left),
        Err(CreditsRefused::Exhausted { .. }) => Err(credits_exhausted(Some(credits), now)),
        Err(CreditsRefused::Unavailable) => Err(Rejection::Internal),
    };
    let own = key
        .credits()
        .map(|c| spend(&key.id, c, key.credit_cell()))
        .transpose()?;
    let shared = match identity.and_then(|i| Some((i, i.credits.as_ref()?))) {
        None => None,
        Some((i, c)) => match spend(&i.counted_as, c, Some(&i.credit_cell)) {
            Ok(left) => Some(left),
            Err(rejection) => {
                if own.is_some() {
                    book.refund(&key.id, cost);
                }
                return Err(rejection);
            }
        },
    };
    Ok(match (own, shared) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// Gives back what [`spend_credits`] spent, when a later check refuses.
fn refund_credits(book: &CreditBook, key: &KeyEntry, identity: Option<&Identity>, cost: u64) {
    if key.credits().is_some() {
        book.refund(&key.id, cost);
    }
    if let Some(i) = identity.filter(|i| i.credits.is_some()) {
        book.refund(&i.counted_as, cost);
    }
}

/// 429 `credits_exhausted`, with `Retry-After` to the next refill when there is one.
fn credits_exhausted(credits: Option<&Credits>, now: i64) -> Rejection {
    Rejection::CreditsExhausted {
        retry_after: credits
            .and_then(|c| c.balance(now).next_refill)
            .map(|t| t.saturating_sub(now).max(1).unsigned_abs()),
    }
}

/// `RateLimit-Policy` for the limits of the key and of its identity, if either has any.
fn limits_policy(key: &KeyEntry, identity: Option<&Identity>) -> Option<HeaderValue> {
    let identity = identity.filter(|i| i.policy_header.is_some());
    match (key.limits_header(), identity) {
        (None, None) => None,
        (Some(own), None) => Some(own.clone()),
        (None, Some(i)) => i.policy_header.clone(),
        (Some(own), Some(i)) => i.policy_with(own).or_else(|| Some(own.clone())),
    }
}

/// Stages 6 and 7: the quotas (checked first, counted last) and the rate limits, the key's
/// and its identity's, so that a refused request spends none of them.
fn limits(
    key: &KeyEntry,
    identity: Option<&Identity>,
    clock: &Clock,
    now: i64,
) -> Result<Option<RateHeaders>, Rejection> {
    let Some(policy) = limits_policy(key, identity) else {
        return Ok(None);
    };
    // Each quota with the cell it counts in and the name it goes by.
    let quotas = key
        .quota()
        .map(|q| (q, key.usage(), Name::Quota))
        .into_iter()
        .chain(identity.and_then(|i| Some((i.quota?, i.usage(), i.quota_name.clone()))));
    // At most two (the key's and the identity's), kept without allocating.
    let mut counted: [Option<(&KeyUsage, Budget)>; 2] = [None, None];
    for (slot, (q, cell, name)) in counted.iter_mut().zip(quotas) {
        let (period, end) = q.window(now);
        let reset = end.saturating_sub(now).max(1).unsigned_abs();
        let used = cell.quota_used(period);
        let budget = |used: u64| Budget {
            name: name.clone(),
            limit: q.limit,
            remaining: q.limit.saturating_sub(used),
            reset,
        };
        if used >= q.limit {
            return Err(Rejection::QuotaExceeded(Box::new(RateHeaders {
                policy,
                budgets: [None, Some(budget(used))],
                more: Vec::new(),
                retry_after: Some(reset),
            })));
        }
        *slot = Some((cell, budget(used)));
    }
    // The key's limiter set and its identity's, without allocating.
    let both;
    let sets: &[&KeyLimiter] = match (key.limiter(), identity.and_then(Identity::limiter)) {
        (Some(own), Some(shared)) => {
            both = [own, shared];
            &both
        }
        (Some(one), None) | (None, Some(one)) => {
            both = [one, one];
            &both[..1]
        }
        (None, None) => &[],
    };
    let (rate, mut more) = if sets.is_empty() {
        (None, Vec::new())
    } else {
        match rate_limit::admit(sets, clock) {
            Ok(spent) => spent,
            Err((wait, refused)) => {
                return Err(Rejection::RateLimited(Box::new(RateHeaders {
                    policy,
                    budgets: [Some(refused), counted[0].as_ref().map(|(_, b)| b.clone())],
                    more: Vec::new(),
                    retry_after: Some(wait),
                })));
            }
        }
    };
    // The quotas count the admitted request: the first goes with the key's budgets, any
    // other (the identity's) after the rate limits.
    let mut quota_budgets = counted.into_iter().flatten().map(|(cell, mut budget)| {
        budget.remaining = budget.limit.saturating_sub(cell.quota_spend());
        budget
    });
    let first_quota = quota_budgets.next();
    more.extend(quota_budgets);
    Ok(Some(RateHeaders {
        policy,
        budgets: [rate, first_quota],
        more,
        retry_after: None,
    }))
}
