//! Regression tests for the attacks that once got through, each against the real binary:
//! values that aborted the gateway, idle HTTP/2 connections that held their slots, paths
//! and headers that an upstream reads otherwise than the gateway did, and names that forged
//! a row of a listing. (The open-file limit under systemd's default is in `hostile.rs`.)

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::process::{create_key_json, keygate_ok, run, Process};
use support::*;

/// A gateway process in a fresh folder with `routes` and `extra` config, and one key of
/// namespace `acme` in production.
struct Setup {
    dir: tempfile::TempDir,
    gw: Process,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    secret: String,
}

fn start(routes: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(routes, extra),
    );
    let secret = create_key_json(dir.path(), &[])["key"]
        .as_str()
        .unwrap()
        .to_string();
    support::ledger::secret(&secret);
    let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
    let (proxy, admin) = gw.addresses();
    Setup {
        dir,
        gw,
        proxy,
        admin,
        secret,
    }
}

impl Setup {
    async fn admin_call(&self, method: &str, path: &str, body: &str) -> Answer {
        send(
            Req::post(self.admin, path)
                .method(method)
                .bearer(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// The gateway is alive and serves: its process runs, and a key is accepted.
    async fn still_serves(&mut self) {
        assert!(
            self.gw.child.try_wait().unwrap().is_none(),
            "the gateway exited: {:?}",
            self.gw.output.lock().unwrap()
        );
        let r = send(Req::get(self.proxy, "/v1/x").bearer(&self.secret)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let (code, _, err) = run(&["--config", "keygate.yaml", "check"], self.dir.path());
        assert_eq!(code, 0, "the store still checks clean: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_rates_and_far_expiries_are_refused_and_the_gateway_keeps_serving() {
    let up = Upstream::start().await;
    let mut s = start(&route("/", up.addr, "production", ""), "");
    let id = create_key_json(s.dir.path(), &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    for rate in ["2000000000/s", "4294967295/s", "1000001/s"] {
        let body =
            format!(r#"{{"namespace":"acme","environment":"production","rate_limit":"{rate}"}}"#);
        let r = s.admin_call("POST", "/v1/api-keys", &body).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some("rate_limit")),
            "{rate}"
        );
        let r = s
            .admin_call(
                "PATCH",
                &format!("/v1/api-keys/{id}"),
                &format!(r#"{{"rate_limit":"{rate}"}}"#),
            )
            .await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some("rate_limit")),
            "{rate}"
        );
        let (code, _, err) = run(
            &[
                "--config",
                "keygate.yaml",
                "keys",
                "create",
                "--namespace",
                "acme",
                "--environment",
                "production",
                "--rate-limit",
                rate,
            ],
            s.dir.path(),
        );
        assert_eq!(code, 1, "{rate}");
        assert!(
            err.starts_with("keygate: error: --rate-limit: ") && err.lines().count() == 1,
            "{err}"
        );
    }
    for expiry in ["3000000d", "99999999999d", "10000-01-01T00:00:00Z"] {
        let body =
            format!(r#"{{"namespace":"acme","environment":"production","expires_at":"{expiry}"}}"#);
        let r = s.admin_call("POST", "/v1/api-keys", &body).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some("expires_at")),
            "{expiry}"
        );
        let r = s
            .admin_call(
                "PATCH",
                &format!("/v1/api-keys/{id}"),
                &format!(r#"{{"expires_at":"{expiry}"}}"#),
            )
            .await;
        assert_eq!(r.status, 400, "{expiry}");
        let (code, _, err) = run(
            &[
                "--config",
                "keygate.yaml",
                "keys",
                "update",
                &id,
                "--expires",
                expiry,
            ],
            s.dir.path(),
        );
        assert_eq!(code, 1, "{expiry}: {err}");
        assert!(err.contains("--expires"), "{err}");
    }
    s.still_serves().await;
}

/// Reads until the peer closes; true if it did within `limit`.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The HTTP/2 connection preface and an empty SETTINGS frame: a client that then says no
/// more.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_and_cannot_fill_the_cap() {
    let up = Upstream::start().await;
    let s = start(
        &route("/", up.addr, "production", ""),
        "limits:\n  max_connections: 24\n  header_read_timeout: 1s\n  idle_timeout: 1s\n",
    );
    let mut idle = Vec::new();
    for _ in 0..24 {
        let mut c = TcpStream::connect(s.proxy).await.unwrap();
        c.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
        idle.push(c);
    }
    // The 25th client waits for a slot; the idle ones are closed after the first-request
    // deadline, so it is served (send() allows it 20 s).
    let r = send(Req::get(s.proxy, "/v1/x").bearer(&s.secret).h2()).await;
    assert_eq!(r.status, 200);
    for c in &mut idle {
        assert!(
            closed_within(c, Duration::from_secs(10)).await,
            "an idle HTTP/2 connection was closed"
        );
    }

    // A client that made a request and then went quiet is closed too, after idle_timeout
    // (at most half a header timeout later); the bound here is generous for a loaded machine.
    let tcp = TcpStream::connect(s.proxy).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let closed = tokio::spawn(conn);
    let request = http::Request::get(format!("http://{}/v1/x", s.proxy))
        .header("authorization", format!("Bearer {}", s.secret))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(15), closed).await;
    assert!(ended.is_ok(), "the quiet HTTP/2 connection was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_forms_that_upstreams_merge_or_split_cannot_pass_routes_or_scopes() {
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}{}",
        route("/v1/admin", up.addr, "production", "namespaces: [ops]"),
        route("/v2", up.addr, "production", "allow_path_parameters: true"),
        route("/", up.addr, "production", ""),
    );
    let s = start(&routes, "");
    let scoped = create_key_json(
        s.dir.path(),
        &[
            "--scope",
            "read:/v1/public/**",
            "--scope",
            "read:/v2/public/**",
        ],
    );
    let scoped = scoped["key"].as_str().unwrap().to_string();
    support::ledger::secret(&scoped);
    // Live now, without waiting for the file watch.
    assert_eq!(s.admin_call("POST", "/v1/reload", "").await.status, 200);
    let get = |path: &str, key: &str| send(Req::get(s.proxy, path).bearer(key));

    // Repeated slashes merge, so the admin route (for namespace ops) takes these.
    for path in ["//v1/admin/users", "/v1//admin/users", "/v1/admin//users"] {
        let r = get(path, &s.secret).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (403, "namespace_denied".into()),
            "{path}"
        );
    }
    // And the merged path is what goes upstream.
    let r = get("/v1//x///y", &s.secret).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().path, "/v1/x/y");

    // Path parameters are refused where the route does not allow them.
    for path in [
        "/v1/admin;jsessionid=x/users",
        "/v1/public/..;/admin",
        "/v1/x%3By",
        "/v1/x%00",
    ] {
        let r = get(path, &scoped).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (400, "invalid_path".into()),
            "{path}"
        );
    }
    // Where they are allowed, routes and scopes read the segment without them, as Tomcat
    // and Spring do, and the upstream gets them.
    let r = get("/v2/public/..;/admin", &scoped).await;
    assert_eq!((r.status.as_u16(), r.code()), (403, "scope_denied".into()));
    let r = get("/v2/public/a;v=1/b", &scoped).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().path, "/v2/public/a;v=1/b");
}

/// A raw HTTP/1.1 request, for header spellings a client library would normalise.
async fn raw_get(addr: std::net::SocketAddr, headers: &str) -> u16 {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(
        format!("GET /v1/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{headers}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out)
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identity_and_address_headers_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}",
        route(
            "/kept",
            up.addr,
            "production",
            "keep_forwarding_headers: true"
        ),
        route("/", up.addr, "production", ""),
    );
    let s = start(&routes, "");
    let forged = "X_Keygate_Key_Id: forged\r\nX_Keygate_Namespace: forged\r\nX-Keygate_Environment: forged\r\n\
        X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
        X-Forwarded-Host: evil.example\r\nX-Client-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nX-API-Key: kg_live_not_for_upstream\r\n";
    let auth = format!("Authorization: Bearer {}\r\n", s.secret);
    assert_eq!(raw_get(s.proxy, &format!("{auth}{forged}")).await, 200);
    let seen = up.last().headers;
    for name in [
        "x_keygate_key_id",
        "x_keygate_namespace",
        "x-keygate_environment",
        "x_forwarded_for",
        "x_real_ip",
        "forwarded",
        "x-real-ip",
        "x-forwarded-host",
        "x-client-ip",
        "true-client-ip",
        "x-api-key",
    ] {
        assert!(
            !seen.contains_key(name),
            "{name} reached the upstream: {seen:?}"
        );
    }
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_ne!(seen["x-keygate-key-id"], "forged");

    // Over HTTP/2 too (header names arrive lowercase there).
    let r = send(
        Req::get(s.proxy, "/v1/x")
            .bearer(&s.secret)
            .h2()
            .header("x_keygate_key_id", "forged")
            .header("x-real-ip", "6.6.6.6"),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last().headers;
    assert!(
        !seen.contains_key("x_keygate_key_id") && !seen.contains_key("x-real-ip"),
        "{seen:?}"
    );

    // A route that opts out keeps the client-address headers, never the twins.
    let kept = format!(
        "{auth}X-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: a.example\r\nX_Keygate_Key_Id: forged\r\n"
    );
    let mut c = TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(
        format!("GET /kept HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{kept}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let seen = up.last();
    assert_eq!(seen.path, "/kept");
    assert_eq!(seen.headers["x-real-ip"], "6.6.6.6");
    assert_eq!(seen.headers["x-forwarded-host"], "a.example");
    assert!(!seen.headers.contains_key("x_keygate_key_id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_notes_cannot_forge_a_row_of_the_listing() {
    let up = Upstream::start().await;
    let s = start(&route("/", up.addr, "production", ""), "");
    for (field, value) in [
        ("name", "ci\nffffffff  kg_live  forged"),
        ("name", "tab\there"),
        ("name", "rtl\u{202E}txt"),
        ("note", "carriage\rreturn"),
        ("note", "escape\u{1b}[2J"),
    ] {
        let body =
            serde_json::json!({"namespace": "acme", "environment": "production", field: value});
        let r = s
            .admin_call("POST", "/v1/api-keys", &body.to_string())
            .await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some(field)),
            "{value:?}"
        );
        let flag = format!("--{field}");
        let (code, _, err) = run(
            &[
                "--config",
                "keygate.yaml",
                "keys",
                "create",
                "--namespace",
                "acme",
                "--environment",
                "production",
                &flag,
                value,
            ],
            s.dir.path(),
        );
        assert_eq!(code, 1, "{value:?}");
        assert!(err.contains(&flag) && err.lines().count() == 1, "{err}");
    }
    // A note may span lines; the listing stays one row per key.
    let body = r#"{"namespace":"acme","environment":"production","note":"line one\nline two"}"#;
    assert_eq!(s.admin_call("POST", "/v1/api-keys", body).await.status, 201);
    let listing = keygate_ok(s.dir.path(), &["keys", "list"]);
    assert_eq!(
        listing.lines().count(),
        3,
        "a header and two keys: {listing}"
    );
}
