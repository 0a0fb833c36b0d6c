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
    // That the walk is bounded shows in the answers, not in a time: a gateway that walked
    // the whole trusted chain would take 203.0.113.7 as the client and let `far_left` in.
    assert_eq!(call(&far_left, &chain).await.code(), "ip_not_allowed");
    assert_eq!(call(&hops, &chain).await.status, 200);
    eprintln!(
        "two requests with a 10,000-hop X-Forwarded-For answered in {:?}",
        started.elapsed()
    );
    // An untrusted entry at the right end is the client, however long the chain.
    chain.push_str(", 198.51.100.1");
    assert_eq!(call(&hops, &chain).await.code(), "ip_not_allowed");
    gw.stop().await;
}

/// Connections the idle-connection test holds at once.
const IDLE: usize = 10_000;

/// Raises this test process's soft open-file limit to its hard limit, so that it can hold
/// `needed` descriptors; fails the test, naming the limit, if the hard limit is too low.
fn raise_own_open_file_limit(needed: u64) {
    let (soft, hard) = rlimit::Resource::NOFILE
        .get()
        .expect("the open-file limit reads");
    assert!(
        hard >= needed,
        "this test holds {IDLE} connections and needs {needed} open files, but the hard limit \
         is {hard}: raise it (ulimit -Hn, or LimitNOFILE)"
    );
    if soft < needed {
        rlimit::Resource::NOFILE
            .set(hard, hard)
            .expect("the soft open-file limit can be raised to the hard limit");
    }
}

/// The regression test for "the connection cap is a fiction under systemd's default file
/// limit": the gateway starts with a soft limit of 1024, as systemd gives services, raises it
/// itself, and holds 10,000 idle connections at once. They cost little, a real client is still
/// served, and every one is cut off by the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_cost_little_and_are_cut_off() {
    // The test holds one descriptor per connection too, and some for itself.
    raise_own_open_file_limit(IDLE as u64 + 1_000);
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start().await;
    // The header read timeout must outlast opening every connection on a loaded machine, so
    // that all of them are open at once.
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", ""),
            "limits:\n  header_read_timeout: 20s\n  max_connections: 20000\nworkers: 1\n",
        ),
    );
    let made = process::create_key_json(dir.path(), &[]);
    let secret = made["key"].as_str().unwrap().to_string();
    let gw = Process::spawn_with_open_file_limit(
        1024,
        &["--config", "keygate.yaml", "serve"],
        dir.path(),
        &[],
    );
    let (proxy, _) = gw.addresses();
    // It started with 1024 and raised its own soft limit to the hard limit.
    let line = gw.wait_for_line("open-file limit", Duration::from_secs(5));
    assert_eq!(process::log_field(&line, "was"), Some("1024"), "{line}");
    let limit = gw.open_file_limit();
    assert!(
        limit > IDLE as u64 + 256,
        "the gateway's open-file limit is {limit}: {line}"
    );
    let before = gw.memory_kb("VmRSS");
    let own_sockets = gw.open_sockets();
    let started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    // A bound against a gateway that stops accepting, not a speed: opening them all takes
    // 2 to 6 s on a loaded 2-core machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    while idle.len() < IDLE {
        for _ in 0..32.min(IDLE - idle.len()) {
            idle.push(TcpStream::connect(proxy).await.unwrap());
        }
        // Paced by the listener's accept queue (128 long): past it the kernel drops SYNs, and
        // each dropped one costs the client a second.
        while accept_queue(proxy).expect("the gateway listens") >= 64 {
            assert!(
                Instant::now() < deadline,
                "the gateway stopped accepting after {} connections; it said {:?}",
                idle.len(),
                gw.output.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // The kernel completes a handshake before the gateway accepts, so a connection is held
    // only once the gateway's own descriptors count it; under a soft limit of 1024 they never
    // would. (Its own few sockets, listeners and the like, make this lenient by a handful.)
    let held = eventually(Duration::from_secs(30), async || {
        accept_queue(proxy) == Some(0) && gw.open_sockets() >= IDLE
    })
    .await;
    assert!(
        held,
        "{IDLE} connections open, but the gateway holds {} sockets (limit {limit}); it said {:?}",
        gw.open_sockets(),
        gw.output.lock().unwrap()
    );
    let held_after = started.elapsed();
    // A real client is still served at once.
    let r = send(Req::get(proxy, "/v1/x").bearer(&secret)).await;
    assert_eq!(r.status, 200);
    let during = gw.memory_kb("VmRSS");
    let per_conn = (during.saturating_sub(before) * 1024) as f64 / IDLE as f64;
    eprintln!(
        "{IDLE} idle connections held by the gateway at once after {held_after:?} \
         (it started with a soft open-file limit of 1024 and raised it to {limit}; {} \
         sockets, {own_sockets} of them its own before); gateway RSS {before} kB -> {during} kB \
         ({per_conn:.0} bytes per connection)",
        gw.open_sockets()
    );
    assert!(
        per_conn < 16.0 * 1024.0,
        "{per_conn} bytes per idle connection"
    );
    // The header read timeout closes every one of them: 20 s after each was accepted, so
    // the bound here is generous (it only stops a hang).
    // A cut-off connection reads as closed (or an answer, or a reset); only silence until
    // the deadline means the gateway kept it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut closed, mut answered, mut reset) = (0, 0, 0);
    for mut c in idle {
        let mut b = [0u8; 64];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.read(&mut b)).await {
            Ok(Ok(0)) => closed += 1,
            Ok(Ok(_)) => answered += 1,
            Ok(Err(_)) => reset += 1,
            Err(_) => {}
        }
    }
    eprintln!("cut off: {closed} closed, {answered} answered, {reset} reset");
    assert_eq!(
        closed + answered + reset,
        IDLE,
        "every idle connection was cut off by the header timeout"
    );
    drop(gw);
}
