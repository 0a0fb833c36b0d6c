//! The real `keygate` binary as operators run it: streaming without growing memory,
//! SIGHUP reloads, SIGTERM drains and exits 0, and the demo.

mod support;

use std::time::Duration;

use support::process::{create_key_json, run, Process};
use support::*;

fn write_config(dir: &std::path::Path, upstream: std::net::SocketAddr, extra: &str) {
    let routes = route("/", upstream, "production", "");
    write(&dir.join("keygate.yaml"), &config_yaml(&routes, extra));
}

fn create_key(dir: &std::path::Path) -> String {
    create_key_json(dir, &[])["key"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_body_streams_both_ways_without_growing_memory() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), up.addr, "limits:\n  max_request_body: 1GiB");
    let key = create_key(dir.path());
    let gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, _) = gw.addresses();

    // Warm up, then take the baseline.
    assert_eq!(
        send(Req::get(proxy, "/warm").bearer(&key)).await.status,
        200
    );
    let baseline = gw.memory_kb("VmRSS");

    const SIZE: u64 = 100 * 1024 * 1024;
    let client: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let upload = http::Request::post(format!("http://{proxy}/upload"))
        .header("authorization", format!("Bearer {key}"))
        .body(stream_of(SIZE))
        .unwrap();
    let r = client.request(upload).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.last().body_bytes,
        SIZE,
        "every byte reached the upstream"
    );

    let download = http::Request::get(format!("http://{proxy}/big/{SIZE}"))
        .header("authorization", format!("Bearer {key}"))
        .body(stream_of(0))
        .unwrap();
    let mut body = client.request(download).await.unwrap().into_body();
    let mut received = 0u64;
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, SIZE);

    let peak = gw.memory_kb("VmHWM");
    let growth_mb = peak.saturating_sub(baseline) / 1024;
    eprintln!("baseline RSS {baseline} kB, peak {peak} kB, growth {growth_mb} MB");
    assert!(
        growth_mb < 32,
        "peak memory grew {growth_mb} MB over {} MB moved",
        (2 * SIZE) >> 20
    );
}

#[test]
fn sighup_reloads_and_sigterm_drains_then_exits_zero() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), up.addr, "");
    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (_, admin) = gw.addresses();
    let generation = |rt: &tokio::runtime::Runtime| {
        rt.block_on(send(Req::get(admin, "/readyz"))).json()["generation"].as_u64()
    };
    assert_eq!(generation(&rt), Some(1));
    gw.signal("HUP");
    let reloaded = rt.block_on(eventually(Duration::from_secs(5), async || {
        send(Req::get(admin, "/readyz")).await.json()["generation"].as_u64() == Some(2)
    }));
    assert!(
        reloaded,
        "SIGHUP must reload: {:?}",
        gw.output.lock().unwrap()
    );
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

/// `workers: 2`: two serving threads, each with its own runtime and its own copy of the
/// listening socket. Many connections at once are all answered; SIGTERM with requests in
/// flight drains them before the process exits 0, and every one is answered.
#[test]
fn two_workers_serve_and_drain_together() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), up.addr, "workers: 2");
    let key = create_key(dir.path());
    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, _) = gw.addresses();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    for worker in ["keygate-w1", "keygate-w2"] {
        assert!(
            threads.iter().any(|t| t == worker),
            "no {worker} in {threads:?}"
        );
    }
    let statuses = rt.block_on(async {
        let clients: Vec<_> = (0..64)
            .map(|i| tokio::spawn(send(Req::get(proxy, &format!("/v1/{i}")).bearer(&key))))
            .collect();
        let mut statuses = Vec::new();
        for c in clients {
            statuses.push(c.await.unwrap().status);
        }
        statuses
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let before = up.hits();
    let in_flight: Vec<_> = (0..8)
        .map(|_| rt.spawn(send(Req::get(proxy, "/delay/700").bearer(&key))))
        .collect();
    let arrived = rt.block_on(eventually(Duration::from_secs(5), async || {
        up.hits() >= before + 8
    }));
    assert!(arrived, "the slow requests reached the upstream");
    gw.signal("TERM");
    for request in in_flight {
        assert_eq!(rt.block_on(request).unwrap().status, 200);
    }
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn serve_refuses_a_broken_config_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        "routes:\n  - upstream: nope\n    environment: production\n",
    );
    let (code, _, err) = run(&["serve", "--config", "keygate.yaml"], dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("keygate.yaml:2:15: routes[0].upstream"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn the_demo_serves_its_key_and_refuses_without_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Process::spawn(
        &["demo", "--proxy", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        dir.path(),
        &[],
    );
    let accepted = demo.wait_for_line("curl -i -H 'Authorization: Bearer", Duration::from_secs(20));
    let key = accepted
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_string();
    let url = accepted.split_whitespace().last().unwrap().to_string();
    let addr: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let r = rt.block_on(send(Req::get(addr, "/v1/hello").bearer(&key)));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["upstream"], "echo");
    assert!(r.json()["headers"].get("authorization").is_none());
    let r = rt.block_on(send(Req::get(addr, "/v1/hello")));
    assert_eq!(r.code(), "missing_key");
    demo.signal("INT");
    assert_eq!(demo.wait_exit(Duration::from_secs(10)), Some(0));
}

/// `KEYGATE_LOG_FORMAT=json`: every line the gateway logs is one JSON object with its level,
/// message and fields (a refusal among them, naming its code and never the key); any other
/// value is refused in one line, before anything starts.
#[test]
fn process_logs_are_json_lines_when_asked() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), up.addr, "");
    let env = [("KEYGATE_LOG_FORMAT", "json"), ("KEYGATE_LOG", "debug")];
    let gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &env);
    let line = gw.wait_for_line("keygate listening", Duration::from_secs(20));
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "keygate listening", "{v}");
    let proxy: std::net::SocketAddr = v["fields"]["proxy"].as_str().unwrap().parse().unwrap();
    let secret = "kg_live_0000000000000000000000000000000";
    rt.block_on(send(Req::get(proxy, "/v1/x").bearer(secret)));
    let refused = gw.wait_for_line("\"refused\"", Duration::from_secs(5));
    let r: serde_json::Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(r["level"], "DEBUG");
    assert!(r["fields"]["code"].as_str().is_some(), "{r}");
    let lines = gw.output.lock().unwrap().clone();
    for l in lines.iter().filter(|l| !l.is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not JSON: {l}"
        );
        assert!(!l.contains(secret), "a secret in the log: {l}");
    }
    drop(gw);
    let out = std::process::Command::new(keygate_bin())
        .args(["--config", "keygate.yaml", "check"])
        .current_dir(dir.path())
        .env("KEYGATE_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "keygate: error: KEYGATE_LOG_FORMAT is `xml`: json or text"
    );
}

/// systemd's notification protocol through a real notify socket (a Unix datagram socket
/// bound here, named by `NOTIFY_SOCKET`): `READY=1` once serving, `WATCHDOG=1` at half of
/// `WATCHDOG_USEC`, `RELOADING=1` then `READY=1` around a SIGHUP reload, `STOPPING=1` when
/// SIGTERM starts the drain.
#[test]
fn the_service_manager_hears_ready_reloading_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), up.addr, "");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = path.to_str().unwrap();
    let env = [("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "400000")];
    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &env);
    // Every datagram until one is `want` (bounded in time), the watchdog's among them.
    let mut heard = Vec::new();
    let mut until = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let said = String::from_utf8_lossy(&buf[..n]).into_owned();
                heard.push(said.clone());
                if said.starts_with(want) {
                    return said;
                }
            }
        }
        panic!("no {want:?} within 10 s; heard {heard:?}");
    };
    assert_eq!(until("READY=1"), "READY=1\nSTATUS=serving 0 keys");
    // Listening when it says so.
    let (_, admin) = gw.addresses();
    assert_eq!(rt.block_on(send(Req::get(admin, "/readyz"))).status, 200);
    until("WATCHDOG=1");
    gw.signal("HUP");
    assert_eq!(until("RELOADING=1"), "RELOADING=1\nSTATUS=reloading");
    until("READY=1");
    gw.signal("TERM");
    until("STOPPING=1");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Listeners bind with `SO_REUSEPORT`: a new keygate starts beside a running one on the same
/// proxy address (where the second bind used to fail), both answer, and once the old one
/// drains and exits the new one goes on answering on that address.
#[test]
fn a_new_gateway_starts_beside_the_old_on_the_same_address() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), up.addr, "");
    let key = create_key(dir.path());
    let mut old = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, _) = old.addresses();
    // The same config, with the old one's proxy address in place of port 0.
    let config = std::fs::read_to_string(dir.path().join("keygate.yaml")).unwrap();
    let fixed = config.replacen("proxy: 127.0.0.1:0", &format!("proxy: {proxy}"), 1);
    write(&dir.path().join("next.yaml"), &fixed);
    let new = Process::spawn(&["serve", "--config", "next.yaml"], dir.path(), &[]);
    let (again, _) = new.addresses();
    assert_eq!(again, proxy, "the new one listens on the same address");
    let get = || {
        rt.block_on(send(Req::get(proxy, "/v1/x").bearer(&key)))
            .status
    };
    for _ in 0..20 {
        assert_eq!(get(), 200);
    }
    old.signal("TERM");
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));
    for _ in 0..20 {
        assert_eq!(get(), 200);
    }
    drop(new);
}

/// Systemd socket activation, through systemd's own `systemd-socket-activate`: it holds the
/// listening socket and starts keygate with it (`LISTEN_FDS`, named `proxy`), and keygate
/// serves on that socket instead of binding its configured address; the first request,
/// made before keygate ran, waits in the socket's queue and is answered.
#[test]
fn a_socket_handed_over_by_the_service_manager_serves_as_the_proxy() {
    use std::process::{Command, Stdio};
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-socket-activate is not installed: socket activation is not tested here");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), up.addr, "");
    let key = create_key(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    /// Stops the activator (and keygate, which it became) by its PID, even if the test fails.
    struct Stopped(Option<std::process::Child>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            if let Some(mut child) = self.0.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let activator = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=proxy"])
        .args([keygate_bin(), "serve", "--config", "keygate.yaml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Stopped(Some(activator));
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The activator listens at once; keygate starts on the first connection.
    let answered = rt.block_on(eventually(Duration::from_secs(15), async || {
        tokio::net::TcpStream::connect(proxy).await.is_ok()
            && send(Req::get(proxy, "/v1/x").bearer(&key)).await.status == 200
    }));
    let mut activator = guard.0.take().unwrap();
    let pid = activator.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let exited = activator.wait().unwrap();
    assert!(answered, "keygate did not answer on the handed-over socket");
    assert!(exited.success(), "SIGTERM drains and exits 0: {exited:?}");
}
