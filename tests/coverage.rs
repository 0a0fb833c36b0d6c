//! Settings the README documents that no other suite exercised: `strict`, the HTTP/2 stream
//! cap, the header count limit, and admin authentication on every admin route.

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::process::{run, Process};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_keeps_keys_and_routes_to_declared_namespaces() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let strict = "strict: true\nnamespaces:\n  acme: {}\n";
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), strict),
    );
    // The CLI refuses an undeclared namespace, naming the flag, and takes a declared one.
    let create = |ns: &str| {
        run(
            &[
                "--config",
                "keygate.yaml",
                "keys",
                "create",
                "--namespace",
                ns,
                "--environment",
                "production",
            ],
            dir.path(),
        )
    };
    let (code, _, err) = create("elsewhere");
    assert_eq!(code, 1);
    assert!(
        err.contains("--namespace") && err.contains("strict"),
        "{err}"
    );
    assert_eq!(create("acme").0, 0);
    // So does the API.
    let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
    let (_, admin) = gw.addresses();
    let body = |ns: &str| format!(r#"{{"namespace":"{ns}","environment":"production"}}"#);
    let post = |ns: &str| {
        send(
            Req::post(admin, "/v1/api-keys")
                .bearer(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(body(ns)),
        )
    };
    let r = post("elsewhere").await;
    assert_eq!(
        (r.status.as_u16(), r.json()["field"].as_str()),
        (400, Some("namespace"))
    );
    assert_eq!(post("acme").await.status, 201);
    drop(gw);

    // A route naming an undeclared namespace is a located config error.
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", "namespaces: [acme, ghosts]"),
            strict,
        ),
    );
    let (code, _, err) = run(&["--config", "keygate.yaml", "check"], dir.path());
    assert_eq!(code, 1);
    assert!(
        err.lines()
            .any(|l| l.starts_with("keygate.yaml:") && l.contains("routes[0].namespaces")),
        "{err}"
    );
    // Without strict the same config checks clean: the refusals above came from it.
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", "namespaces: [acme, ghosts]"),
            "",
        ),
    );
    let (code, _, err) = run(&["--config", "keygate.yaml", "check"], dir.path());
    assert_eq!(code, 0, "{err}");
}

/// The SETTINGS the gateway sends at the start of an HTTP/2 connection, as (id, value).
async fn server_settings(addr: std::net::SocketAddr) -> Vec<(u16, u32)> {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut header = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut header))
        .await
        .expect("the server's first frame within 10 s")
        .unwrap();
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    assert_eq!(header[3], 4, "the first frame is SETTINGS");
    let mut payload = vec![0u8; len];
    c.read_exact(&mut payload).await.unwrap();
    payload
        .chunks(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_http2_stream_cap_is_what_the_server_advertises() {
    const MAX_CONCURRENT_STREAMS: u16 = 3;
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(
        &route("/", up.addr, "production", ""),
        "limits:\n  h2_max_concurrent_streams: 7\n",
    ))
    .await;
    let settings = server_settings(gw.proxy).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 7)),
        "{settings:?}"
    );
    gw.stop().await;
    // And the default, 256.
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    assert!(server_settings(gw.proxy)
        .await
        .contains(&(MAX_CONCURRENT_STREAMS, 256)));
    gw.stop().await;
}

/// A raw HTTP/1.1 request with `extra` more headers; the status, or 0 if the connection
/// closed without one.
async fn status_with_headers(addr: std::net::SocketAddr, key: &str, extra: usize) -> u16 {
    let mut request = format!("GET /v1/x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {key}\r\n");
    for i in 0..extra {
        request.push_str(&format!("x-extra-{i}: {i}\r\n"));
    }
    request.push_str("connection: close\r\n\r\n");
    let mut c = TcpStream::connect(addr).await.unwrap();
    let _ = c.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .expect("an answer or a close within 10 s");
    String::from_utf8_lossy(&out)
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn more_headers_than_max_headers_are_refused() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(
        &route("/", up.addr, "production", ""),
        "limits:\n  max_headers: 10\n",
    ))
    .await;
    let (_, key) = gw.create_key(new_key("acme", "production")).await;
    // host, authorization and connection, plus 7: exactly 10.
    assert_eq!(status_with_headers(gw.proxy, &key, 7).await, 200);
    let over = status_with_headers(gw.proxy, &key, 8).await;
    assert!(over == 431 || over == 0, "11 headers got {over}");
    assert_eq!(
        up.hits(),
        1,
        "the refused request never reached the upstream"
    );
    gw.stop().await;
}

#[tokio::test]
async fn every_admin_route_but_the_probes_needs_a_token() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    let public = ["/healthz", "/readyz", "/v1/openapi.json"];
    let mut checked = 0;
    for (method, template, _) in keygate::admin::ROUTES {
        let path = template
            .replace("{id}", "0123abcd")
            .replace("{name}", "0123abcd");
        if public.contains(&path.as_str()) {
            let r = send(Req::get(gw.admin, &path)).await;
            assert_eq!(r.status, 200, "{path} is open");
            continue;
        }
        for token in [None, Some("not-the-token"), Some("")] {
            let mut req = Req::post(gw.admin, &path)
                .method(method)
                .header("content-type", "application/json")
                .body("{}");
            if let Some(t) = token {
                req = req.header("authorization", &format!("Bearer {t}"));
            }
            let r = send(req).await;
            assert_eq!(
                (r.status.as_u16(), r.code()),
                (401, "invalid_admin_token".to_string()),
                "{method} {path} with {token:?}"
            );
            assert!(
                r.header("www-authenticate").starts_with("Bearer"),
                "{method} {path}"
            );
            checked += 1;
        }
        // The right token gets past authentication (whatever the route then answers).
        let r = send(
            Req::post(gw.admin, &path)
                .method(method)
                .bearer(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body("{}"),
        )
        .await;
        assert_ne!(r.status, 401, "{method} {path} with the token");
    }
    // The console's page is served without a token; every call behind it needs one.
    for page in ["/", "/console"] {
        assert_eq!(send(Req::get(gw.admin, page)).await.status, 200, "{page}");
    }
    assert!(checked >= 45, "{checked} refusals checked");
    gw.stop().await;
}
