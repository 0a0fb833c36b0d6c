//! Test support: a real upstream HTTP server and the real gateway, both on 127.0.0.1:0, and a
//! small HTTP client. Nothing here is mocked: requests cross real sockets.
#![allow(dead_code)]

pub mod browser;
pub mod ingress;
pub mod ledger;
pub mod process;
pub mod redis;
pub mod smtp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use keygate::clock::Clock;
use keygate::config::Config;
use keygate::gateway::Gateway;
use keygate::keys::{self, KeyRecord, NewKey, Store};
use keygate::server::{self, Running};

/// What the upstream saw of the last request it answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body_bytes: u64,
}

/// A real upstream. Paths decide what it does:
/// - a path containing `/slow` never answers (the gateway's timeout must);
/// - `/big/N` streams N bytes back;
/// - a path ending in `/close` answers with `Connection: close`;
/// - anything else reads the whole body (streaming, counting) and answers 200 with JSON.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub last: Arc<Mutex<Option<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(None));
        let (h, l) = (hits.clone(), last.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, l) = (h.clone(), l.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (h, l) = (h.clone(), l.clone());
                        async move { Ok::<_, Infallible>(answer(req, h, l).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, hits, last }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Seen {
        self.last
            .lock()
            .unwrap()
            .clone()
            .expect("the upstream saw a request")
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    hits: Arc<AtomicU64>,
    last: Arc<Mutex<Option<Seen>>>,
) -> Response<UpBody> {
    hits.fetch_add(1, Ordering::SeqCst);
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if path.contains("/slow") {
        std::future::pending::<()>().await;
    }
    if let Some(ms) = path
        .rsplit_once("/delay/")
        .and_then(|(_, ms)| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut body_bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    // `Authorization` reaches the upstream only on a route that keeps it
    // (`keep_authorization`), the operator's choice; gateway.rs and secrets.rs check that it
    // goes otherwise. Every other header, and the path and query, must hold no secret.
    let received: Vec<String> = std::iter::once(format!("{} {}", parts.method, parts.uri))
        .chain(
            parts
                .headers
                .iter()
                .filter(|(name, _)| *name != http::header::AUTHORIZATION)
                .map(|(name, value)| {
                    format!("{name}: {}", String::from_utf8_lossy(value.as_bytes()))
                }),
        )
        .collect();
    ledger::output("what the upstream received", received.join("\n").as_bytes());
    *last.lock().unwrap() = Some(Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers.clone(),
        body_bytes,
    });
    if let Some(n) = path
        .strip_prefix("/big/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        return Response::new(BodyExt::boxed(stream_of(n)));
    }
    if let Some(code) = path
        .rsplit_once("/status/")
        .and_then(|(_, c)| c.parse::<u16>().ok())
    {
        let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from_static(b"{}"))));
        *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        return response;
    }
    if path.ends_with("/close") {
        let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from_static(b"bye"))));
        response
            .headers_mut()
            .insert("connection", "close".parse().unwrap());
        return response;
    }
    let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from(format!(
        "{{\"body_bytes\":{body_bytes}}}"
    )))));
    response
        .headers_mut()
        .insert("keep-alive", "timeout=5".parse().unwrap());
    response
        .headers_mut()
        .insert("x-upstream", "yes".parse().unwrap());
    response
}

/// A body of `n` bytes made 64 KiB at a time, never held whole.
pub fn stream_of(
    n: u64,
) -> StreamBody<impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut left = n;
    StreamBody::new(futures_stream(move || {
        if left == 0 {
            return None;
        }
        let take = left.min(chunk.len() as u64);
        left -= take;
        Some(Ok(Frame::data(chunk.slice(..take as usize))))
    }))
}

/// A stream from a closure, without pulling in a futures crate.
fn futures_stream<T>(
    next: impl FnMut() -> Option<T> + Unpin,
) -> impl futures_core::Stream<Item = T> {
    struct S<F>(F);
    impl<T, F: FnMut() -> Option<T> + Unpin> futures_core::Stream for S<F> {
        type Item = T;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready((self.get_mut().0)())
        }
    }
    S(next)
}

/// A gateway running in this process on a fake clock, with its own config folder.
pub struct TestGateway {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub clock: Clock,
    pub running: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub auth: Option<SocketAddr>,
    pub admin_token: String,
}

/// The admin token every test config accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token-please-ignore";

/// A config with the given routes YAML (a list under `routes:`) and extra top-level YAML.
pub fn config_yaml(routes: &str, extra: &str) -> String {
    format!(
        "listen:\n  proxy: 127.0.0.1:0\n  admin: 127.0.0.1:0\nkeys_file: keys.yaml\nadmin_tokens:\n  - {{name: tests, hash: \"sha256:{}\"}}\nroutes:\n{routes}\n{extra}\n",
        keys::hex(&keys::format::hash(ADMIN_TOKEN))
    )
}

/// One route to `upstream` for `environment`, with extra route keys.
pub fn route(prefix: &str, upstream: SocketAddr, environment: &str, extra: &str) -> String {
    let mut r = format!("  - path_prefix: {prefix}\n    upstream: http://{upstream}\n    environment: {environment}\n");
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        r.push_str(&format!("    {}\n", line.trim()));
    }
    r
}

impl TestGateway {
    pub async fn start(config: &str) -> TestGateway {
        Self::start_with(config, true).await
    }

    pub async fn start_with(config: &str, watch: bool) -> TestGateway {
        ledger::capture_logs();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("keygate.yaml");
        std::fs::write(&config_path, config).unwrap();
        let clock = Clock::fake(SystemTime::now());
        let gateway =
            Gateway::new(&config_path, clock.clone()).unwrap_or_else(|e| panic!("config: {e:?}"));
        let running = server::start(gateway, watch).await.unwrap();
        TestGateway {
            proxy: running.proxy_addr,
            admin: running.admin_addr,
            auth: running.auth_addr,
            dir,
            config_path,
            clock,
            running: Some(running),
            admin_token: ADMIN_TOKEN.to_string(),
        }
    }

    /// Another gateway on this one's config and store, as after a restart: its `dir` is an
    /// empty folder of its own, and its files are this gateway's.
    pub async fn beside(&self) -> TestGateway {
        let clock = Clock::fake(SystemTime::now());
        let gateway = Gateway::new(&self.config_path, clock.clone())
            .unwrap_or_else(|e| panic!("config: {e:?}"));
        let running = server::start(gateway, false).await.unwrap();
        TestGateway {
            proxy: running.proxy_addr,
            admin: running.admin_addr,
            auth: running.auth_addr,
            dir: tempfile::tempdir().unwrap(),
            config_path: self.config_path.clone(),
            clock,
            running: Some(running),
            admin_token: ADMIN_TOKEN.to_string(),
        }
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.running.as_ref().unwrap().gateway
    }

    pub fn store(&self) -> Store {
        let config = Config::load(&self.config_path).unwrap();
        Store::for_config(&config, &self.config_path).unwrap()
    }

    pub fn keys_path(&self) -> PathBuf {
        self.dir.path().join("keys.yaml")
    }

    /// Runs a lifecycle operation the way the CLI does, acting as `tests`.
    pub fn with_op<T>(&self, f: impl FnOnce(keys::lifecycle::Op<'_>) -> T) -> T {
        let config = Config::load(&self.config_path).unwrap();
        let store = self.store();
        f(keys::lifecycle::Op {
            store: &store,
            config: &config,
            actor: "tests",
            now: self.clock.unix_secs(),
        })
    }

    /// Creates a key the way the CLI does, then reloads so the test need not wait for the
    /// file watch.
    pub async fn create_key(&self, new: NewKey) -> (KeyRecord, String) {
        let made = self.with_op(|op| keys::create(op, new)).unwrap();
        ledger::secret(&made.1);
        self.reload().await;
        made
    }

    pub async fn reload(&self) -> (StatusCode, serde_json::Value) {
        let r = send(Req::post(self.admin, "/v1/reload").bearer(ADMIN_TOKEN)).await;
        (r.status, r.json())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(1)).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        ledger::files("a gateway in a test process", self.dir.path());
    }
}

/// A key in each state a request can be refused for, all in `acme`/`production`: the record
/// of `good`, and the secrets of the rest.
pub struct RefusalKeys {
    pub good: (KeyRecord, String),
    pub revoked: String,
    pub disabled: String,
    /// Made to expire in an hour; expired once [`TestGateway::refusal_keys`] returns.
    pub expired: String,
    /// Usable only from the addresses it was made for.
    pub walled: String,
    /// Only `read:/v1/**`.
    pub reader: String,
    /// One request a minute.
    pub limited: String,
    /// One request a day.
    pub quota: String,
}

impl TestGateway {
    /// Makes [`RefusalKeys`] the way the CLI does (`walled` bound to `cidr`), reloads, and
    /// moves the fake clock two hours on, so that the expiring key has expired.
    pub async fn refusal_keys(&self, cidr: &str) -> RefusalKeys {
        let key = |change: fn(&mut NewKey)| {
            let mut new = new_key("acme", "production");
            change(&mut new);
            new
        };
        let good = self.create_key(new_key("acme", "production")).await;
        let (revoked, revoked_secret) = self.create_key(new_key("acme", "production")).await;
        let (disabled, disabled_secret) = self.create_key(new_key("acme", "production")).await;
        self.with_op(|op| keys::set_status(op, &revoked.id, keys::Status::Revoked))
            .unwrap();
        self.with_op(|op| keys::set_status(op, &disabled.id, keys::Status::Inactive))
            .unwrap();
        let expiring = self
            .create_key(key(|k| k.expires = Some("1h".into())))
            .await
            .1;
        let mut walled = new_key("acme", "production");
        walled.allowed_cidrs = vec![cidr.to_string()];
        let walled = self.create_key(walled).await.1;
        let reader = self
            .create_key(key(|k| k.scopes = vec!["read:/v1/**".into()]))
            .await
            .1;
        let limited = self
            .create_key(key(|k| k.rate_limit = Some("1/m".into())))
            .await
            .1;
        let quota = self
            .create_key(key(|k| k.quota = Some("1/day".into())))
            .await
            .1;
        self.reload().await;
        self.clock.advance(Duration::from_secs(7200));
        RefusalKeys {
            good,
            revoked: revoked_secret,
            disabled: disabled_secret,
            expired: expiring,
            walled,
            reader,
            limited,
            quota,
        }
    }
}

pub fn new_key(namespace: &str, environment: &str) -> NewKey {
    NewKey {
        namespace: namespace.into(),
        environment: environment.into(),
        ..NewKey::default()
    }
}

/// Fills the store of the config at `config_path` with a key in every state: active,
/// inactive, expired, revoked, a rotated pair, a regenerated key and an imported one (eight
/// records, all in `acme`/`production`). Returns the secrets, which no store may hold.
pub fn every_key_state(config_path: &Path) -> Vec<String> {
    use keygate::keys::lifecycle::{self, Op};
    let config = Config::load(config_path).expect("a valid config");
    let store = Store::for_config(&config, config_path).expect("a store");
    let now = Clock::real().unix_secs();
    let op = |now| Op {
        store: &store,
        config: &config,
        actor: "test",
        now,
    };
    let mut secrets = Vec::new();
    let mut make = |now, expires: Option<&str>| {
        let new = NewKey {
            expires: expires.map(str::to_string),
            ..new_key("acme", "production")
        };
        let (record, secret) = lifecycle::create(op(now), new).expect("created");
        ledger::secret(&secret);
        secrets.push(secret);
        record.id
    };
    make(now, None);
    let inactive = make(now, None);
    // Made three years ago, for a day.
    make(now - 3 * 365 * 86_400, Some("1d"));
    let revoked = make(now, None);
    let rotated = make(now, None);
    let regenerated = make(now, None);
    lifecycle::set_status(op(now), &inactive, keys::Status::Inactive).unwrap();
    lifecycle::set_status(op(now), &revoked, keys::Status::Revoked).unwrap();
    let (_, secret, _) = lifecycle::rotate(op(now), &rotated, 3600).unwrap();
    secrets.push(secret);
    let (_, secret) = lifecycle::regenerate(op(now), &regenerated).unwrap();
    secrets.push(secret);
    let legacy = "legacy-service-key-0001".to_string();
    let entries = lifecycle::parse_import(&legacy).unwrap();
    lifecycle::import(op(now), "acme", "production", entries).unwrap();
    secrets.push(legacy);
    for s in &secrets {
        ledger::secret(s);
    }
    secrets
}

/// A request under construction.
pub struct Req {
    pub method: http::Method,
    pub addr: SocketAddr,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub http2: bool,
    /// The source address to send from (any 127.0.0.0/8 address works on Linux).
    pub from: Option<std::net::IpAddr>,
}

impl Req {
    pub fn get(addr: SocketAddr, path: &str) -> Req {
        Req {
            method: http::Method::GET,
            addr,
            path: path.into(),
            headers: vec![],
            body: Bytes::new(),
            http2: false,
            from: None,
        }
    }
    pub fn post(addr: SocketAddr, path: &str) -> Req {
        Req {
            method: http::Method::POST,
            ..Req::get(addr, path)
        }
    }
    pub fn method(mut self, m: &str) -> Req {
        self.method = m.parse().unwrap();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn bearer(self, key: &str) -> Req {
        self.header("authorization", &format!("Bearer {key}"))
    }
    pub fn body(mut self, b: impl Into<Bytes>) -> Req {
        self.body = b.into();
        self
    }
    pub fn h2(mut self) -> Req {
        self.http2 = true;
        self
    }
    pub fn from(mut self, ip: &str) -> Req {
        self.from = Some(ip.parse().unwrap());
        self
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

pub async fn send(req: Req) -> Answer {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(req.from);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(req.http2)
        .build(connector);
    let method = req.method.to_string();
    let mut builder = Request::builder()
        .method(req.method)
        .uri(format!("http://{}{}", req.addr, req.path));
    for (k, v) in &req.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(builder.body(Full::new(req.body)).unwrap()),
    )
    .await
    .expect("the gateway answers within 20s")
    .expect("the request is sent");
    let version = response.version();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    ledger::answer(
        &method,
        &req.path,
        parts.status.as_u16(),
        &parts.headers,
        &body,
    );
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
        version,
    }
}

/// A JSON call that may find nobody answering, as under chaos or kills: the answer, or None
/// if none came within 5 s. Never panics.
pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> Option<Answer> {
    send_or_why(addr, method, path, token, body).await.ok()
}

/// As [`try_send`], but says why no answer came: the time-out, or the client's error with
/// its causes (refused, reset, closed before the answer).
pub async fn send_or_why(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> Result<Answer, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("request: {e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "no answer head within 5 s".to_string())?
        .map_err(|e| format!("client error: {}", error_chain(&e)))?;
    let version = response.version();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .map_err(|_| format!("{}: no whole body within 5 s", parts.status))?
        .map_err(|e| format!("{}: body error: {}", parts.status, error_chain(&e)))?
        .to_bytes();
    ledger::answer(method, path, parts.status.as_u16(), &parts.headers, &body);
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
        version,
    })
}

/// An error with each of its sources, for a message that says what really failed.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A call to the admin API of `gw` with the test's admin token, and a JSON body if given.
pub async fn admin(
    gw: &TestGateway,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Answer {
    let mut req = Req::get(gw.admin, path).method(method).bearer(ADMIN_TOKEN);
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    send(req).await
}

/// A counter's or gauge's value in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// A counter's or gauge's value in the `/metrics` of the admin listener at `admin`.
pub async fn counter(admin: SocketAddr, name: &str) -> u64 {
    let answer = send(Req::get(admin, "/metrics").bearer(ADMIN_TOKEN)).await;
    metric(&String::from_utf8_lossy(&answer.body), name)
}

/// Polls `check` every 50 ms for up to `limit`; true once it holds.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many connections wait in the accept queue of the IPv4 listener on `addr`: the kernel
/// completed their handshakes, and the listener has not accepted them yet. `None` if no such
/// listener exists. Read from `/proc/net/tcp`, where a listening socket's `rx_queue` is its
/// accept queue's length; listeners come first there, so only they are read.
pub fn accept_queue(addr: SocketAddr) -> Option<u64> {
    use std::io::BufRead;
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let file = std::fs::File::open("/proc/net/tcp").ok()?;
    for line in std::io::BufReader::new(file).lines().skip(1) {
        let line = line.ok()?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) != Some(&"0A") {
            return None;
        }
        if fields.get(1) == Some(&local.as_str()) {
            let (_, rx) = fields.get(4)?.split_once(':')?;
            return u64::from_str_radix(rx, 16).ok();
        }
    }
    None
}

/// The path of the built `keygate` binary.
pub fn keygate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A small HTTP server on loopback that answers every request with the status and body it
/// holds now, and keeps what each request sent: a webhook receiver, or a document server
/// whose answer a test can turn into a failure.
#[derive(Clone)]
pub struct Recorder {
    pub addr: SocketAddr,
    answer: Arc<Mutex<(u16, String)>>,
    received: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Recorder {
    pub async fn start(status: u16, body: &str) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let recorder = Recorder {
            addr: listener.local_addr().unwrap(),
            answer: Arc::new(Mutex::new((status, body.to_string()))),
            received: Arc::default(),
        };
        let r = recorder.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let r = r.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body = body.unwrap_or_default();
                            ledger::output("what a test server received", &body);
                            r.received.lock().unwrap().push((path, body));
                            let (status, text) = r.answer.lock().unwrap().clone();
                            let mut response = Response::new(Full::new(Bytes::from(text)));
                            *response.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        recorder
    }

    /// Answers from now on with `status` and `body`.
    pub fn answer(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_string());
    }

    /// How many requests came.
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Each request's body, parsed as JSON.
    pub fn json_bodies(&self) -> Vec<serde_json::Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, b)| serde_json::from_slice(b).ok())
            .collect()
    }
}
