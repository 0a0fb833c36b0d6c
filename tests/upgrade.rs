//! Upgrades under load: the real gateway is replaced by a new process ten times while a
//! bounded load runs on loopback, a new connection for every request. Five times the new
//! process binds beside the old one (`SO_REUSEPORT`) and the old one gets SIGTERM once the
//! new one is ready; five times both serve a socket held by a service manager (here the
//! test, as systemd would with socket activation). No request may fail and no connection may
//! be refused, and the requests each process counted must add up in the usage it leaves.
//!
//! Linux resets connections still queued on a `SO_REUSEPORT` listener when it closes unless
//! `net.ipv4.tcp_migrate_req` moves them to a sibling (README, "Deploying"). The test
//! therefore runs itself again inside a network namespace of its own (`unshare -rn`), where
//! it turns that on and sends its traffic over that namespace's loopback; it changes nothing
//! on the machine.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::process::{create_key_json, keygate_ok, Process};
use support::*;

const INSIDE: &str = "KEYGATE_TEST_OWN_NETNS";
const NAME: &str = "the_gateway_is_replaced_ten_times_under_load_and_no_request_fails";

#[test]
fn the_gateway_is_replaced_ten_times_under_load_and_no_request_fails() {
    if std::env::var_os(INSIDE).is_none() {
        let status = Command::new("unshare")
            .args(["-rn", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(INSIDE, "1")
            .status()
            .expect("unshare (util-linux) runs");
        assert!(
            status.success(),
            "the test inside its own network namespace failed"
        );
        return;
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2) runs");
    assert!(up.success(), "loopback up in the test's namespace");
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1").expect("tcp_migrate_req set");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(replaced_under_load());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// Clients that each open a new connection for every request until `stop`, at most 5 minutes.
fn load(
    proxy: SocketAddr,
    key: &str,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Seen>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|_| {
            let (key, stop, seen) = (key.to_string(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(300) {
                    match send_or_why(proxy, "GET", "/v1/x", &key, "").await {
                        Ok(a) if a.status == 200 => {
                            seen.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(a) => seen
                            .failures
                            .lock()
                            .unwrap()
                            .push(format!("{} {:?}", a.status, a.body)),
                        Err(why) => seen.failures.lock().unwrap().push(why),
                    }
                }
            })
        })
        .collect()
}

/// Waits until the load has had `more` answers since now.
async fn answers(seen: &Seen, more: u64) {
    let from = seen.ok.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.ok.load(Ordering::SeqCst) < from + more {
        assert!(Instant::now() < deadline, "the load stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops `old` with SIGTERM once `new` serves, and checks it drained and exited 0.
fn replace(old: &mut Process, new: &Process) {
    new.wait_for_line("keygate listening", Duration::from_secs(30));
    old.signal("TERM");
    assert_eq!(
        old.wait_exit(Duration::from_secs(30)),
        Some(0),
        "the old gateway drains and exits 0"
    );
}

async fn replaced_under_load() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config = |proxy: u16| {
        config_yaml(&route("/", upstream.addr, "production", ""), "")
            .replacen(
                "proxy: 127.0.0.1:0",
                &format!("proxy: 127.0.0.1:{proxy}"),
                1,
            )
            .replacen(
                "admin: 127.0.0.1:0",
                &format!("admin: 127.0.0.1:{admin_port}"),
                1,
            )
    };
    write(&dir.path().join("keygate.yaml"), &config(proxy_port));
    let made = create_key_json(dir.path(), &[]);
    let (key, id) = (made["key"].as_str().unwrap(), made["id"].as_str().unwrap());
    let serve = ["serve", "--config", "keygate.yaml"];

    // Five times beside the old one on the same address.
    let proxy: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let mut current = Process::spawn(&serve, dir.path(), &[]);
    current.wait_for_line("keygate listening", Duration::from_secs(30));
    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
    let clients = load(proxy, key, &stop, &seen);
    for _ in 0..5 {
        answers(&seen, 200).await;
        let next = Process::spawn(&serve, dir.path(), &[]);
        replace(&mut current, &next);
        current = next;
    }
    answers(&seen, 200).await;

    // Five times on a socket the service manager holds: a port of its own, the same config.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let socket_proxy = held.local_addr().unwrap();
    let socket_clients = load(socket_proxy, key, &stop, &seen);
    let mut on_socket = Process::spawn_with_socket(&held, &serve, dir.path(), &[]);
    on_socket.wait_for_line("keygate listening", Duration::from_secs(30));
    for _ in 0..5 {
        answers(&seen, 200).await;
        let next = Process::spawn_with_socket(&held, &serve, dir.path(), &[]);
        replace(&mut on_socket, &next);
        on_socket = next;
    }
    answers(&seen, 200).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients.into_iter().chain(socket_clients) {
        c.await.unwrap();
    }
    let failures = seen.failures.lock().unwrap().clone();
    let ok = seen.ok.load(Ordering::SeqCst);
    eprintln!(
        "upgrade: {ok} requests answered 200 across 10 replacements; {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "failed or refused: {:?}",
        &failures[..failures.len().min(20)]
    );

    // Every request was counted by the process that answered it, and the counts add up in
    // the usage the last ones leave.
    for mut last in [current, on_socket] {
        last.signal("TERM");
        assert_eq!(last.wait_exit(Duration::from_secs(30)), Some(0));
    }
    assert_eq!(
        requests_counted(dir.path(), id),
        ok,
        "usage adds up across replacements"
    );
}

/// The key's requests today, as the usage file says.
fn requests_counted(dir: &Path, id: &str) -> u64 {
    let shown: serde_json::Value =
        serde_json::from_str(&keygate_ok(dir, &["keys", "show", id, "--json"])).unwrap();
    shown["usage"]["requests_today"]
        .as_u64()
        .or_else(|| shown["requests_today"].as_u64())
        .unwrap_or_else(|| panic!("no requests_today in {shown}"))
}
