//! Keep-alive connections to upstreams, driven through `hyper::client::conn`.
//!
//! One pool per distinct [`PoolSettings`], shared by the routes that have them, holding the
//! connections of each upstream origin. HTTP/1.1 connections are leased one request at a
//! time: the response body carries the lease and gives the connection back when it has been
//! read to the end. An HTTP/2 upstream gets one multiplexed connection, shared.
//!
//! Compared with a general-purpose client there is no pool checkout through a channel, no
//! boxed request future and no task per request: a checkout is a short uncontended lock
//! and a pop from a per-origin stack of idle senders, most recently used first.
//!
//! Each serving worker ([`crate::server::worker`]) keeps its own connections: a connection's
//! task runs on the worker that opened it, so a request leases one whose task shares its
//! thread, and no lock or cache line is shared between workers.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::PoolSettings;
use crate::body::RequestBody;

type Connector = hyper_rustls::HttpsConnector<CountingConnector>;
type Http1 = http1::SendRequest<RequestBody>;
type Http2 = http2::SendRequest<RequestBody>;

/// Why an upstream exchange failed: connecting, or the exchange itself (whose source may be
/// the request body's limit).
pub type SendError = Box<dyn StdError + Send + Sync>;

/// A pool of keep-alive connections to upstreams, for `http://` and `https://` alike. Cheap
/// to clone: clones share the pool.
#[derive(Debug, Clone)]
pub struct UpstreamClient(Arc<Pool>);

#[derive(Debug)]
struct Pool {
    connector: Connector,
    settings: PoolSettings,
    /// Each worker's origins, at its number's place (workers past [`SLOTS`] share).
    slots: [Slot; SLOTS],
}

/// Workers with their own idle connections; more share them, by their number modulo this.
const SLOTS: usize = 64;

/// One worker's origins, on a cache line of its own. Origins are only ever added, so an
/// origin's index is stable for the pool's life.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(Mutex<Vec<Origin>>);

#[derive(Debug)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Vec<Idle>,
    /// The shared HTTP/2 connection.
    shared: Option<Http2>,
}

#[derive(Debug)]
struct Idle {
    sender: Http1,
    since: Instant,
}

/// The TCP connector, counting the connections it opens: requests minus connections is how
/// often the pool was reused.
#[derive(Debug, Clone)]
struct CountingConnector {
    inner: HttpConnector,
    opened: Arc<AtomicU64>,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = <HttpConnector as tower_service::Service<Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = <HttpConnector as tower_service::Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.inner.call(uri)
    }
}

impl UpstreamClient {
    /// A pool with `settings`, trusting `ca` (the parsed `ca_file`) or the web PKI, counting
    /// new connections in `opened`. Fails only if the TLS provider refuses keygate's TLS
    /// versions, which ring does not.
    pub fn new(
        settings: PoolSettings,
        ca: Option<&[rustls::pki_types::CertificateDer<'static>]>,
        opened: Arc<AtomicU64>,
    ) -> Result<Self, rustls::Error> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(settings.connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let tls = crate::tls::client_config(ca)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let tcp = CountingConnector { inner: tcp, opened };
        let connector = if settings.http2 {
            builder.enable_http2().wrap_connector(tcp)
        } else {
            builder.enable_http1().wrap_connector(tcp)
        };
        Ok(UpstreamClient(Arc::new(Pool {
            connector,
            settings,
            slots: std::array::from_fn(|_| Slot::default()),
        })))
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.0.settings
    }

    /// Sends `req` to `scheme://authority` over a pooled connection, or a new one. The
    /// request's URI must be in origin form for HTTP/1.1 (`/path?query`); for HTTP/2 it is
    /// made absolute here. A request that a pooled connection closed before taking is sent
    /// again on a new connection, once.
    pub async fn send(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let pool = &self.0;
        let slot = crate::server::worker().checked_rem(SLOTS).unwrap_or(0);
        let origin = pool.origin(slot, scheme, authority);
        if pool.settings.http2 {
            let mut uri = std::mem::take(req.uri_mut()).into_parts();
            uri.scheme = Some(scheme.clone());
            uri.authority = Some(authority.clone());
            *req.uri_mut() = Uri::from_parts(uri)?;
            let mut sender = self.http2(slot, origin, scheme, authority).await?;
            let response = sender.send_request(req).await?;
            return Ok(response.map(|body| UpstreamBody { body, lease: None }));
        }
        loop {
            let (mut sender, pooled) = match pool.checkout(slot, origin) {
                Some(sender) => (sender, true),
                None => (self.connect_http1(scheme, authority).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let lease = Some(Lease {
                        pool: self.0.clone(),
                        slot,
                        origin,
                        sender,
                    });
                    return Ok(response.map(|body| UpstreamBody { body, lease }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// Closes idle connections that have outlived the idle timeout or were closed by the
    /// upstream. Run from housekeeping.
    pub fn reap(&self) {
        let pool = &self.0;
        let now = Instant::now();
        for slot in 0..SLOTS {
            for origin in pool.lock(slot).iter_mut() {
                origin.idle.retain(|i| {
                    !i.sender.is_closed()
                        && now.duration_since(i.since) < pool.settings.idle_timeout
                });
                if origin.shared.as_ref().is_some_and(|s| s.is_closed()) {
                    origin.shared = None;
                }
            }
        }
    }

    /// Idle connections held, for tests and metrics.
    pub fn idle(&self) -> usize {
        (0..SLOTS)
            .map(|slot| {
                self.0
                    .lock(slot)
                    .iter()
                    .map(|o| o.idle.len())
                    .sum::<usize>()
            })
            .sum()
    }

    async fn connect(&self, scheme: &Scheme, authority: &Authority) -> Result<Io, SendError> {
        let uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let mut connector = self.0.connector.clone();
        std::future::poll_fn(|cx| tower_service::Service::<Uri>::poll_ready(&mut connector, cx))
            .await?;
        tower_service::Service::call(&mut connector, uri).await
    }

    async fn connect_http1(
        &self,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Http1, SendError> {
        let io = self.connect(scheme, authority).await?;
        let (sender, connection) = http1::Builder::new().writev(false).handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    async fn http2(
        &self,
        slot: usize,
        origin: usize,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Http2, SendError> {
        let shared = self.0.lock(slot).get(origin).and_then(|o| o.shared.clone());
        if let Some(mut sender) = shared {
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let io = self.connect(scheme, authority).await?;
        let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        sender.ready().await?;
        if let Some(o) = self.0.lock(slot).get_mut(origin) {
            o.shared = Some(sender.clone());
        }
        Ok(sender)
    }
}

type Io = <Connector as tower_service::Service<Uri>>::Response;

impl Pool {
    /// Worker `slot`'s origins (`slot` is below [`SLOTS`]; any other reads the first).
    fn lock(&self, slot: usize) -> MutexGuard<'_, Vec<Origin>> {
        let Slot(origins) = self.slots.get(slot).unwrap_or(&self.slots[0]);
        // The lock guards plain pushes and pops; a panic elsewhere cannot leave it torn.
        origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn origin(&self, slot: usize, scheme: &Scheme, authority: &Authority) -> usize {
        let mut origins = self.lock(slot);
        if let Some(i) = origins
            .iter()
            .position(|o| o.authority == *authority && o.scheme == *scheme)
        {
            return i;
        }
        let index = origins.len();
        origins.push(Origin {
            scheme: scheme.clone(),
            authority: authority.clone(),
            idle: Vec::new(),
            shared: None,
        });
        index
    }

    /// The most recently used idle connection that is ready for a request. Closed ones are
    /// dropped on the way; ones still finishing their last exchange are left for later.
    fn checkout(&self, slot: usize, origin: usize) -> Option<Http1> {
        let mut origins = self.lock(slot);
        let idle = &mut origins.get_mut(origin)?.idle;
        // From the newest down: removing one shifts only those already passed.
        for at in (0..idle.len()).rev() {
            match idle.get(at) {
                Some(c) if c.sender.is_closed() => {
                    idle.remove(at);
                }
                Some(c) if c.sender.is_ready() => return Some(idle.remove(at).sender),
                _ => {}
            }
        }
        None
    }

    fn give_back(&self, slot: usize, origin: usize, sender: Http1) {
        if sender.is_closed() {
            return;
        }
        let mut origins = self.lock(slot);
        let Some(Origin { idle, .. }) = origins.get_mut(origin) else {
            return;
        };
        if idle.len() < self.settings.max_idle_per_host {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// An HTTP/1.1 connection lent to one exchange.
#[derive(Debug)]
struct Lease {
    pool: Arc<Pool>,
    slot: usize,
    origin: usize,
    sender: Http1,
}

/// An upstream response body. For HTTP/1.1 it holds the connection's lease and returns the
/// connection to the pool once the body has been read to its end; a body dropped early
/// takes its connection down with it, since the rest of the body would still be on the wire.
#[derive(Debug)]
pub struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
    /// Keeps the connection out of the pool: it now carries an upgraded protocol.
    pub fn upgraded(mut self) {
        self.lease = None;
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if self.body.is_end_stream() {
                lease.pool.give_back(lease.slot, lease.origin, lease.sender);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            // Read to the end (a chunked body does not say so through `is_end_stream`).
            if let Some(lease) = this.lease.take() {
                lease.pool.give_back(lease.slot, lease.origin, lease.sender);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
