//! Hostile clients get bounded, documented answers: huge headers, huge forwarding chains,
//! bytes that are not text, keys of 1 byte and 1 MB, and thousands of idle connections.
//! (The slowloris and h2 reset-flood cases live in `gateway.rs` and `tls.rs`.)

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::process::Process;
use support::*;

/// Sends raw bytes on a fresh connection; returns the status line's code, or 0 if the
/// gateway closed the connection without answering. Bounded to 5 s.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // The gateway may answer and close before it has read everything: that is fine.
    let _ = conn.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the gateway answered or closed within 5 s");
    support::ledger::output("answer to a raw request", &buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn get_with(header: &str) -> Vec<u8> {
    format!("GET /v1/x HTTP/1.1\r\nhost: a\r\n{header}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn oversized_odd_and_broken_requests_get_bounded_answers() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(
        &route("/", up.addr, "production", ""),
        "trusted_proxies: [127.0.0.0/8]\n",
    ))
    .await;
    let (_, secret) = gw.create_key(new_key("acme", "production")).await;

    // 1 MB of header: refused by the header size limit (64 KiB by default) with 431.
    let huge = format!("x-big: {}", "a".repeat(1 << 20));
    let (code, _) = raw(gw.proxy, &get_with(&huge)).await;
    assert_eq!(code, 431, "1 MB header");
    // A 1 MB key: the same.
    let (code, _) = raw(
        gw.proxy,
        &get_with(&format!("authorization: Bearer {}", "k".repeat(1 << 20))),
    )
    .await;
    assert_eq!(code, 431, "1 MB key");
    // A 1-byte key: malformed, 401, before any lookup.
    let r = send(Req::get(gw.proxy, "/v1/x").bearer("k")).await;
    assert_eq!((r.status.as_u16(), r.code()), (401, "malformed_key".into()));
    // A key that is not UTF-8, and one with control characters.
    let mut bad =
        b"GET /v1/x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer kg_live_\xff\xfe\xfd\r\n\r\n"
            .to_vec();
    let (code, text) = raw(gw.proxy, &bad).await;
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("malformed_key"), "{text}");
    bad = b"GET /v1/x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer kg_\x01\x02\r\n\r\n".to_vec();
    let (code, _) = raw(gw.proxy, &bad).await;
    assert!(
        code == 400 || code == 0,
        "control characters: the parser refuses ({code})"
    );
    // A header name that is not a token.
    let (code, _) = raw(gw.proxy, b"GET /v1/x HTTP/1.1\r\nho st: a\r\n\r\n").await;
    assert!(code == 400 || code == 0, "{code}");
    // Not HTTP at all.
    let (code, _) = raw(
        gw.proxy,
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03hello\r\n\r\n",
    )
    .await;
    assert!(code == 400 || code == 0, "{code}");

    // A valid key still works after all that.
    let r = send(Req::get(gw.proxy, "/v1/x").bearer(&secret)).await;
    assert_eq!(r.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_ten_thousand_hop_forwarding_chain_is_read_in_bounded_time() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(
        &route("/", up.addr, "production", ""),
        "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\nlimits:\n  max_header_size: 1MiB\n",
    ))
    .await;
    let key = |cidr: &str| keygate::keys::NewKey {
        allowed_cidrs: vec![cidr.into()],
        ..new_key("acme", "production")
    };
    let (_, far_left) = gw.create_key(key("203.0.113.7/32")).await;
    let (_, hops) = gw.create_key(key("10.0.0.0/8")).await;
    // A client, then 9,999 trusted hops. Only the last 32 entries are examined: the gateway
    // never walks the whole chain, and takes the 32nd hop from the right as the client.
    let mut chain = String::from("203.0.113.7");
    for i in 0..9_999 {
        chain.push_str(&format!(
            ", 10.{}.{}.{}",
            i / 65_536 % 256,
            i / 256 % 256,
            i % 256
        ));
    }
    let started = Instant::now();
    let call = |secret: &str, chain: &str| {
        send(
            Req::get(gw.proxy, "/v1/x")
                .bearer(secret)
                .header("x-forwarded-for", chain),
        )
    };
    assert_eq!(call(&far_left, &chain).await.code(), "ip_not_allowed");
    assert_eq!(call(&hops, &chain).await.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    // An untrusted entry at the right end is the client, however long the chain.
    chain.push_str(", 198.51.100.1");
    assert_eq!(call(&hops, &chain).await.code(), "ip_not_allowed");
    gw.stop().await;
}

/// How many file descriptors this process may open.
fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_cost_little_and_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start().await;
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", ""),
            "limits:\n  header_read_timeout: 3s\n  max_connections: 20000\nworkers: 1\n",
        ),
    );
    let made = process::create_key_json(dir.path(), &[]);
    let secret = made["key"].as_str().unwrap().to_string();
    let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
    let (proxy, _) = gw.addresses();
    let before = gw.memory_kb("VmRSS");
    // Both this test and the gateway hold one descriptor per connection.
    let n = 10_000.min(fd_limit().saturating_sub(500));
    let mut idle = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        idle.push(TcpStream::connect(proxy).await.unwrap());
    }
    // A real client is still served at once.
    let r = send(Req::get(proxy, "/v1/x").bearer(&secret)).await;
    assert_eq!(r.status, 200);
    let during = gw.memory_kb("VmRSS");
    let per_conn = (during.saturating_sub(before) * 1024) as f64 / n as f64;
    eprintln!(
        "{n} idle connections opened in {:?}; gateway RSS {before} kB -> {during} kB ({per_conn:.0} bytes per connection)",
        started.elapsed()
    );
    assert!(
        per_conn < 16.0 * 1024.0,
        "{per_conn} bytes per idle connection"
    );
    // The header read timeout closes every one of them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut closed = 0;
    for mut c in idle {
        let mut b = [0u8; 64];
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(_)) = tokio::time::timeout(left, c.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, n,
        "every idle connection was cut off by the header timeout"
    );
    drop(gw);
}
