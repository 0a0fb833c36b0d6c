//! TLS, HTTP/2, WebSockets, limits and graceful operation: the gateway facing the internet.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use support::process::Process;
use support::*;

/// A test CA, made fresh for each test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (and 127.0.0.1) with `serial`: (cert PEM, key PEM, cert DER).
    fn leaf(&self, names: &[&str], serial: u64) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// Writes a file as an operator's tooling would: atomically.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS handshake with the gateway: the negotiated ALPN protocol, the leaf it showed, and
/// the stream.
async fn handshake(
    addr: SocketAddr,
    ca: &Ca,
    name: &str,
) -> (
    Option<Vec<u8>>,
    CertificateDer<'static>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"h2", b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = stream.get_ref();
    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
    let leaf = conn.peer_certificates().unwrap()[0].clone().into_owned();
    (alpn, leaf, stream)
}

async fn h2_get(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    key: &str,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    http::StatusCode,
) {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let status = h2_send(&mut send, key).await;
    (send, status)
}

async fn h2_send(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    key: &str,
) -> http::StatusCode {
    let req = http::Request::get("https://localhost/v1/x")
        .header("authorization", format!("Bearer {key}"))
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn https_with_alpn_h2_and_a_certificate_swap_without_a_restart() {
    let up = Upstream::start().await;
    let ca = Ca::new("keygate test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert1, key1, der1) = ca.leaf(&["localhost"], 1);
    let (cert3, key3, der3) = ca.leaf(&["other.test"], 3);
    for (name, text) in [
        ("gw.pem", &cert1),
        ("gw.key", &key1),
        ("other.pem", &cert3),
        ("other.key", &key3),
    ] {
        write(&dir.path().join(name), text);
    }
    let tls = format!(
        "tls:\n  proxy:\n    cert: {0}/gw.pem\n    key: {0}/gw.key\n    sni:\n      - {{host: other.test, cert: {0}/other.pem, key: {0}/other.key}}\n",
        dir.path().display()
    );
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), &tls)).await;
    let (_, key) = gw.create_key(new_key("acme", "production")).await;

    let (alpn, leaf, stream) = handshake(gw.proxy, &ca, "localhost").await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN offers h2");
    assert_eq!(leaf, der1);
    let (mut open, status) = h2_get(stream, &key).await;
    assert_eq!(status, 200);
    assert_eq!(up.last().headers["x-forwarded-proto"], "https");

    // SNI picks the other certificate.
    let (_, other, _) = handshake(gw.proxy, &ca, "other.test").await;
    assert_eq!(other, der3);

    // A new certificate (serial 2) on disk is served to new handshakes without a restart;
    // the connection already open keeps working.
    let (cert2, key2, der2) = ca.leaf(&["localhost"], 2);
    replace(&dir.path().join("gw.key"), &key2);
    replace(&dir.path().join("gw.pem"), &cert2);
    let swapped = eventually(Duration::from_secs(5), async || {
        handshake(gw.proxy, &ca, "localhost").await.1 == der2
    })
    .await;
    assert!(swapped, "the new certificate is served");
    assert_eq!(h2_send(&mut open, &key).await, 200);

    // A broken certificate is refused and the one in force stays.
    replace(&dir.path().join("gw.pem"), "not a certificate");
    let (status, body) = gw.reload().await;
    assert_eq!(status, 422);
    assert!(
        body["errors"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("tls.proxy"),
        "{body}"
    );
    assert_eq!(handshake(gw.proxy, &ca, "localhost").await.1, der2);
    gw.stop().await;
}

/// An HTTPS upstream with a certificate from its own CA; it records the HTTP version.
async fn tls_upstream(ca: &Ca) -> (SocketAddr, Arc<std::sync::Mutex<Vec<http::Version>>>) {
    let (cert, key, _) = ca.leaf(&["localhost"], 9);
    let certs: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let versions: Arc<std::sync::Mutex<Vec<http::Version>>> = Arc::default();
    let seen = versions.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(req.version());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"secure")),
                            ))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, versions)
}

#[tokio::test]
async fn https_upstreams_trust_their_own_ca_and_speak_h2_when_asked() {
    let private = Ca::new("upstream private CA");
    let (upstream, versions) = tls_upstream(&private).await;
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("private-ca.pem"), &private.pem);
    let https = format!("https://localhost:{}", upstream.port());
    let routes = [
        format!("  - path_prefix: /private\n    upstream: {https}\n    environment: production\n    ca_file: {}/private-ca.pem\n", dir.path().display()),
        format!("  - path_prefix: /h2\n    upstream: {https}\n    environment: production\n    http2: true\n    ca_file: {}/private-ca.pem\n", dir.path().display()),
        format!("  - path_prefix: /public\n    upstream: {https}\n    environment: production\n"),
    ]
    .concat();
    let gw = TestGateway::start(&config_yaml(&routes, "")).await;
    let (_, key) = gw.create_key(new_key("acme", "production")).await;
    let r = send(Req::get(gw.proxy, "/private/x").bearer(&key)).await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"secure"[..]));
    assert_eq!(
        versions.lock().unwrap().last(),
        Some(&http::Version::HTTP_11)
    );
    let r = send(Req::get(gw.proxy, "/h2/x").bearer(&key)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        versions.lock().unwrap().last(),
        Some(&http::Version::HTTP_2),
        "HTTP/2 to the upstream via ALPN"
    );
    // The web PKI does not trust the private CA.
    let r = send(Req::get(gw.proxy, "/public/x").bearer(&key)).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (502, "upstream_unavailable")
    );
    gw.stop().await;
}

/// A WebSocket echo server on loopback.
async fn ws_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websockets_are_authenticated_then_spliced() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let echo = ws_echo().await;
    let gw = TestGateway::start(&config_yaml(&route("/", echo, "production", ""), "")).await;
    let (_, key) = gw.create_key(new_key("acme", "production")).await;
    let url = format!("ws://{}/socket", gw.proxy);
    let mut request = url.clone().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgraded through the gateway");
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "keygate"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    assert_eq!(gw.gateway().tunnels.open(), 1);
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(
        eventually(Duration::from_secs(3), async || gw.gateway().tunnels.open()
            == 0)
        .await
    );
    // Without a key the upgrade is refused like any request.
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    gw.stop().await;
}

#[tokio::test]
async fn past_the_connection_cap_accept_waits_and_nothing_breaks() {
    let (up, gw) = {
        let up = Upstream::start().await;
        let gw = TestGateway::start(&config_yaml(
            &route("/", up.addr, "production", ""),
            "limits:\n  max_connections: 2\n  header_read_timeout: 30s",
        ))
        .await;
        (up, gw)
    };
    let (_, key) = gw.create_key(new_key("acme", "production")).await;
    let held: Vec<_> =
        futures_join_all((0..2).map(|_| tokio::net::TcpStream::connect(gw.proxy))).await;
    // Both held connections are accepted (the accept queue is empty), then a third
    // connection's handshake completes and it waits in the queue: the gateway does not
    // accept it while two are open.
    assert!(
        eventually(Duration::from_secs(10), async || {
            accept_queue(gw.proxy) == Some(0)
        })
        .await
    );
    let proxy = gw.proxy;
    let k = key.clone();
    let waiting = tokio::spawn(async move { send(Req::get(proxy, "/x").bearer(&k)).await.status });
    let queued = eventually(Duration::from_secs(10), async || {
        accept_queue(gw.proxy) == Some(1)
    })
    .await;
    assert!(queued, "the third connection waits in the accept queue");
    assert!(
        !waiting.is_finished() && up.hits() == 0,
        "a third connection waits while two are held"
    );
    drop(held);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert_eq!(status, 200);
    // Many more connections than the cap: still no crash, still serving.
    let flood: Vec<_> =
        futures_join_all((0..50).map(|_| tokio::net::TcpStream::connect(gw.proxy))).await;
    drop(flood);
    let ok = eventually(Duration::from_secs(5), async || {
        send(Req::get(gw.proxy, "/x").bearer(&key)).await.status == 200
    })
    .await;
    assert!(ok);
    gw.stop().await;
}

async fn futures_join_all<
    F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>>,
>(
    futures: impl Iterator<Item = F>,
) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for f in futures {
        out.push(f.await.unwrap());
    }
    out
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_h2_reset_flood_is_cut_off() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), ""),
    );
    let key = support::process::create_key_json(dir.path(), &[])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, _) = gw.addresses();
    let before = cpu_ticks(gw.pid());
    let (sent, cut_off) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut sent = 0;
        for _ in 0..20_000 {
            let req = http::Request::get(format!("http://{proxy}/x"))
                .header("authorization", format!("Bearer {key}"))
                .body(())
                .unwrap();
            let Ok(ready) =
                tokio::time::timeout(Duration::from_secs(2), client.clone().ready()).await
            else {
                break;
            };
            let Ok(mut ready) = ready else { break };
            let Ok((_, mut stream)) = ready.send_request(req, false) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
        let cut_off = tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .is_ok();
        (sent, cut_off)
    });
    assert!(
        cut_off,
        "the gateway ends a connection that floods resets ({sent} sent)"
    );
    assert!(sent < 20_000, "the flood was stopped early ({sent} resets)");
    // Afterwards the gateway goes idle again, and serves. CPU time is the gateway's own, so
    // a busy machine slows it down but cannot make it higher: a gateway left spinning on the
    // dead connection would spend most of a core (100 ticks a second). The check waits, up
    // to 10 one-second windows, for one under 20 ticks (a fifth of a core).
    let after_flood = cpu_ticks(gw.pid());
    let mut windows = Vec::new();
    while windows.len() < 10 && windows.last().is_none_or(|&t| t >= 20) {
        let start = cpu_ticks(gw.pid());
        std::thread::sleep(Duration::from_secs(1));
        windows.push(cpu_ticks(gw.pid()) - start);
    }
    eprintln!(
        "flood: {sent} resets, {} ticks during it; ticks in each second after it: {windows:?}",
        after_flood - before
    );
    assert!(
        windows.last().is_some_and(|&t| t < 20),
        "the gateway's CPU settles after the flood (ticks per second: {windows:?})"
    );
    assert_eq!(
        rt.block_on(send(Req::get(proxy, "/x").bearer(&key))).status,
        200
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_refuses_new_connections() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", ""),
            "limits:\n  drain_timeout: 10s",
        ),
    );
    let key = support::process::create_key_json(dir.path(), &[])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, admin) = gw.addresses();
    let k = key.clone();
    let in_flight =
        rt.spawn(async move { send(Req::get(proxy, "/delay/2000").bearer(&k)).await.status });
    // SIGTERM once the request has reached the upstream, where it waits 2 s.
    let reached = rt.block_on(eventually(Duration::from_secs(10), async || up.hits() == 1));
    assert!(reached, "the request reached the upstream");
    gw.signal("TERM");
    rt.block_on(async {
        let unready = eventually(Duration::from_secs(10), async || {
            send(Req::get(admin, "/readyz")).await.status == 503
        })
        .await;
        assert!(unready, "unready once draining starts");
        assert_eq!(
            send(Req::get(admin, "/healthz")).await.status,
            200,
            "still live"
        );
        let closed = eventually(Duration::from_secs(10), async || {
            tokio::net::TcpStream::connect(proxy).await.is_err()
        })
        .await;
        assert!(closed, "no new proxy connections");
    });
    let status = rt.block_on(in_flight).unwrap();
    assert_eq!(status, 200, "the 2-second request finished");
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
}

#[tokio::test]
async fn the_admin_listener_speaks_tls_when_told_to() {
    let up = Upstream::start().await;
    let ca = Ca::new("keygate admin CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = ca.leaf(&["localhost"], 7);
    write(&dir.path().join("admin.pem"), &cert);
    write(&dir.path().join("admin.key"), &key);
    let tls = format!(
        "tls:\n  admin:\n    cert: {0}/admin.pem\n    key: {0}/admin.key\n",
        dir.path().display()
    );
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), &tls)).await;
    // The admin listener shows its certificate, and answers over HTTPS with a token.
    let (_, leaf, stream) = handshake(gw.admin, &ca, "localhost").await;
    assert_eq!(leaf, der);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (path, want) in [("/healthz", 200), ("/v1/api-keys", 200)] {
        let req = http::Request::get(format!("https://localhost{path}"))
            .header("host", "localhost")
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want, "{path}");
        resp.into_body().collect().await.unwrap();
    }
    // Plain HTTP to it gets no HTTP answer; the proxy listener stays plain.
    let plain = tokio::time::timeout(
        Duration::from_secs(10),
        support::try_send(gw.admin, "GET", "/healthz", ADMIN_TOKEN, ""),
    )
    .await
    .expect("the TLS listener ends a plain connection");
    assert!(plain.is_none(), "plain HTTP was answered: {plain:?}");
    assert_eq!(send_get_status(gw.proxy).await, 401);
    gw.stop().await;
}

async fn send_get_status(addr: SocketAddr) -> u16 {
    send(Req::get(addr, "/v1/x")).await.status.as_u16()
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_and_a_busy_one_is_not() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let echo = ws_echo().await;
    let gw = TestGateway::start(&config_yaml(
        &route("/", echo, "production", ""),
        "limits:\n  tunnel_idle_timeout: 1s\n",
    ))
    .await;
    let (_, key) = gw.create_key(new_key("acme", "production")).await;
    let connect = || {
        let mut request = format!("ws://{}/socket", gw.proxy)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    // Taken before the tunnels open: the idle timer of each starts with its tunnel, so a
    // time taken after them would fall short of the 1 s by the time the opening took.
    let opened = std::time::Instant::now();
    let (mut quiet, _) = connect().await.unwrap();
    let (mut busy, _) = connect().await.unwrap();
    // The busy one talks every 100 ms, well inside the 1 s; the quiet one says nothing.
    let started = std::time::Instant::now();
    let mut exchanges = 0;
    let quiet_closed = loop {
        busy.send(Message::text("ping")).await.unwrap();
        assert_eq!(busy.next().await.unwrap().unwrap(), Message::text("ping"));
        exchanges += 1;
        let ended = tokio::time::timeout(Duration::from_millis(100), quiet.next()).await;
        if let Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) = ended {
            break true;
        }
        // A bound against a hang: the timeout is 1 s.
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
    };
    assert!(quiet_closed, "the idle tunnel was closed");
    eprintln!(
        "idle tunnel closed after {:?}; the busy one made {exchanges} exchanges meanwhile",
        started.elapsed()
    );
    // Still open and working, having never been idle for a whole timeout.
    busy.send(Message::text("still")).await.unwrap();
    assert_eq!(busy.next().await.unwrap().unwrap(), Message::text("still"));
    assert!(
        opened.elapsed() >= Duration::from_secs(1),
        "the busy tunnel outlived the timeout"
    );
    gw.stop().await;
}
