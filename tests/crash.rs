//! Crash safety: writers are killed (SIGKILL) at random points while they create and revoke
//! keys. After every kill the store must parse, and every change that was acknowledged (the
//! CLI exited 0, the admin API answered) must be in it. The same for the usage file. A writer
//! that fails on its own (an error, or no answer before the kill) fails the test.
//!
//! The random points come from a seeded generator; the seed is printed, and
//! `KEYGATE_CRASH_SEED=N` replays a run.

mod support;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::keys::{Status, Store};
use support::process::{self, Process};
use support::*;

/// A small deterministic generator (xorshift), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("KEYGATE_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("crash test seed: {seed} (KEYGATE_CRASH_SEED={seed} replays it)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What was acknowledged: key ids created, and key ids revoked.
#[derive(Default)]
struct Acked {
    created: HashSet<String>,
    revoked: HashSet<String>,
}

/// The store kinds the suite runs on.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    File,
    Sqlite,
}

impl Kind {
    fn store_name(self) -> &'static str {
        match self {
            Kind::File => "keys.yaml",
            Kind::Sqlite => "keys.db",
        }
    }

    fn config(self) -> &'static str {
        match self {
            Kind::File => "usage:\n  flush_interval: 50ms\n",
            Kind::Sqlite => {
                "usage:\n  flush_interval: 50ms\nstore: {kind: sqlite, path: keys.db}\n"
            }
        }
    }

    fn open(self, path: &Path) -> Store {
        match self {
            Kind::File => Store::new(path),
            Kind::Sqlite => Store::sqlite(path),
        }
    }
}

/// The store opens and parses, and holds every acknowledged change.
fn check_store(kind: Kind, path: &Path, acked: &Acked, after: &str) {
    let (file, _) = kind
        .open(path)
        .load()
        .unwrap_or_else(|e| panic!("after {after}, the store does not parse: {e:?}"));
    let by_id: HashMap<&str, Status> = file
        .keys
        .iter()
        .map(|k| (k.id.as_str(), k.status))
        .collect();
    for id in &acked.created {
        assert!(
            by_id.contains_key(id.as_str()),
            "after {after}, acknowledged key {id} is lost"
        );
    }
    for id in &acked.revoked {
        assert_eq!(
            by_id.get(id.as_str()),
            Some(&Status::Revoked),
            "after {after}, revocation of {id} is lost"
        );
    }
}

fn setup_dir(kind: Kind) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let routes = route("/", "127.0.0.1:9".parse().unwrap(), "production", "");
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&routes, kind.config()),
    );
    dir
}

/// The temporary file a writer with `pid` makes beside `store` while it writes
/// (`store::write_atomically`): present only between its creation and the rename.
fn temp_file_of(store: &Path, pid: u32) -> std::path::PathBuf {
    let name = store.file_name().unwrap().to_string_lossy();
    store.with_file_name(format!(".{name}.tmp-{pid}"))
}

#[test]
fn acknowledged_cli_writes_survive_sigkill() {
    cli_writers_killed(Kind::File);
}

#[test]
fn acknowledged_cli_writes_to_sqlite_survive_sigkill() {
    cli_writers_killed(Kind::Sqlite);
}

/// CLI writers, one after another, some killed at a random point. For the file store some
/// kills are aimed at the write itself (its temporary file); SQLite's transaction leaves no
/// such mark, so there the points are random only.
fn cli_writers_killed(kind: Kind) {
    let dir = setup_dir(kind);
    let store = dir.path().join(kind.store_name());
    let mut rng = Rng::new();
    let mut acked = Acked::default();
    let mut active: Vec<String> = Vec::new();
    // Kills counted only when the child died of SIGKILL; a signal sent to a child that had
    // already exited does nothing, and is not counted.
    let (mut ops, mut kills, mut in_write, mut too_late, mut aimed) = (0, 0, 0, 0, 0);
    // How long an unsignalled writer runs (a moving average), so that the random kills land
    // within a run on a fast machine as on a slow one.
    let mut run_us: u64 = 15_000;
    let started = Instant::now();
    while ops < 600 && started.elapsed() < Duration::from_secs(120) {
        ops += 1;
        let revoke = !active.is_empty() && rng.below(3) == 0;
        let target = revoke.then(|| active[rng.below(active.len() as u64) as usize].clone());
        let mut cmd = Command::new(keygate_bin());
        cmd.current_dir(dir.path())
            .args(["--config", "keygate.yaml", "keys"]);
        match &target {
            Some(id) => cmd.args(["revoke", id]),
            None => cmd.args([
                "create",
                "--namespace",
                "acme",
                "--environment",
                "production",
                "--json",
            ]),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let spawned = Instant::now();
        let signalled = rng.below(3) == 0;
        if signalled && kind == Kind::File && rng.below(3) == 0 {
            // Aimed: killed as soon as its temporary file appears (or after 50 ms), so some
            // kills land inside the write even where writes are quick.
            aimed += 1;
            let temp = temp_file_of(&store, pid);
            let until = Instant::now() + Duration::from_millis(50);
            while !temp.exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_micros(50));
            }
            let _ = child.kill();
        } else if signalled {
            // Somewhere between start and finish.
            std::thread::sleep(Duration::from_micros(rng.below(run_us * 9 / 10 + 1)));
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let what = if target.is_some() { "revoke" } else { "create" };
        support::ledger::cli(&["keys", what], &out.stdout, &out.stderr);
        match out.status.signal() {
            Some(9) => {
                kills += 1;
                // The temporary file outlives only a writer killed after making it and
                // before renaming it over the store: a kill inside the write.
                let temp = temp_file_of(&store, pid);
                if temp.exists() {
                    in_write += 1;
                    // Cleared, so a later writer with the same PID is not counted for it.
                    std::fs::remove_file(&temp).unwrap();
                }
            }
            Some(other) => panic!("keygate keys {what} died of signal {other}"),
            None if out.status.success() => {
                too_late += usize::from(signalled);
                if !signalled {
                    let took = u64::try_from(spawned.elapsed().as_micros()).unwrap_or(u64::MAX);
                    run_us = (run_us * 7 + took.min(1_000_000)) / 8;
                }
                match target {
                    Some(id) => {
                        active.retain(|a| *a != id);
                        acked.revoked.insert(id);
                    }
                    None => {
                        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                        let id = v["id"].as_str().unwrap().to_string();
                        active.push(id.clone());
                        acked.created.insert(id);
                    }
                }
            }
            // A writer that fails on its own is a bug, whatever the kills around it did.
            None => panic!(
                "keygate keys {what} failed without being killed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
        check_store(kind, &store, &acked, &format!("op {ops} ({kills} kills)"));
    }
    eprintln!(
        "CLI, {} store: {ops} operations, {kills} writers killed by SIGKILL ({}; \
         {too_late} more signals came after the writer had exited), {} creates and {} revokes \
         acknowledged, none lost",
        kind.store_name(),
        match kind {
            Kind::File => format!(
                "{in_write} of them inside the write, between the temporary file and the \
                 rename; {aimed} kills were aimed at it"
            ),
            Kind::Sqlite =>
                "at random points; a transaction leaves no mark to count kills inside it by".into(),
        },
        acked.created.len(),
        acked.revoked.len()
    );
    assert!(
        kills >= 100 && acked.created.len() >= 100,
        "enough happened: {kills} kills"
    );
    assert!(
        kind == Kind::Sqlite || in_write > 0,
        "at least one kill landed inside a write ({kills} kills)"
    );
}

/// An admin call that may find the gateway dead: the status, or None if no answer came.
async fn try_call(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
    let answer = try_send(admin, method, path, ADMIN_TOKEN, body).await?;
    Some((answer.status.as_u16(), answer.json()))
}

/// What one writer (or the traffic task) saw during one life of the gateway.
#[derive(Default)]
struct Life {
    acked: Acked,
    calls: u64,
    /// Answers the contract does not predict, and silence before the kill.
    failures: Vec<String>,
}

/// The usage file parses and holds the traffic key's usage.
fn check_usage(usage: &Path, key_id: &str, after: &str) {
    let text = std::fs::read_to_string(usage)
        .unwrap_or_else(|e| panic!("after {after}, the usage file is gone: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("after {after}, the usage file does not parse: {e}"));
    assert!(
        v["keys"].get(key_id).is_some(),
        "after {after}, the usage file lost the traffic key: {text}"
    );
    // The journal of changes beside it: every whole line parses; only a last line the kill
    // cut short (no newline yet) may not, and the gateway passes over it when it reads.
    let journal = usage.with_extension("changes.jsonl");
    let text = std::fs::read_to_string(&journal).unwrap_or_default();
    let whole = text.rsplit_once('\n').map_or("", |(whole, _)| whole);
    for line in whole.lines() {
        let change: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("after {after}, a whole usage journal line does not parse: {e}: {line}")
        });
        assert!(
            change["id"].is_string() && change["u"].is_object(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_api_writes_and_the_usage_file_survive_sigkill_of_the_gateway() {
    api_writers_killed(Kind::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_api_writes_to_sqlite_survive_sigkill_of_the_gateway() {
    api_writers_killed(Kind::Sqlite).await;
}

/// Four admin API writers and proxied traffic, until the gateway is killed under them.
async fn api_writers_killed(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start().await;
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), kind.config()),
    );
    let store = dir.path().join(kind.store_name());
    let usage = dir.path().join("usage.json");
    let mut rng = Rng::new();
    let mut acked = Acked::default();
    // A key for proxy traffic in every life, so that every life has usage to flush.
    let traffic = process::create_key_json(dir.path(), &[]);
    let (traffic_id, traffic_key) = (
        traffic["id"].as_str().unwrap().to_string(),
        traffic["key"].as_str().unwrap().to_string(),
    );
    acked.created.insert(traffic_id.clone());
    // A first life writes the usage file, so that every kill below finds one to check.
    {
        let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
        let (proxy, _) = gw.addresses();
        let r = try_send(proxy, "GET", "/v1/x", &traffic_key, "").await;
        assert_eq!(r.map(|r| r.status.as_u16()), Some(200));
        let written = eventually(Duration::from_secs(10), async || {
            std::fs::read_to_string(&usage).is_ok_and(|t| t.contains(&traffic_id))
        })
        .await;
        assert!(written, "the usage file holds the traffic key within 10 s");
        gw.signal("KILL");
    }
    check_usage(&usage, &traffic_id, "the first life");
    let mut active: Vec<String> = Vec::new();
    let (mut ops, mut kills, mut requests) = (0u64, 0, 0u64);
    let (mut in_store_write, mut in_usage_write) = (0, 0);
    let started = Instant::now();
    while ops < 500 && started.elapsed() < Duration::from_secs(120) {
        let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
        let (proxy, admin) = gw.addresses();
        // Set just before the kill: a call that gets no answer while it is false failed on
        // its own.
        let killed = Arc::new(AtomicBool::new(false));
        // Writers hammer the admin API until the gateway is killed under them. Each revokes
        // only its own share of the live keys.
        let deadline = Instant::now() + Duration::from_millis(100 + rng.below(400));
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let mut targets: Vec<String> =
                active.iter().skip(w as usize).step_by(4).cloned().collect();
            let seed = rng.below(1 << 30) + w;
            let killed = killed.clone();
            writers.push(tokio::spawn(async move {
                let mut life = Life::default();
                let mut pick = seed;
                loop {
                    life.calls += 1;
                    pick = pick.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let revoke = !targets.is_empty() && pick.is_multiple_of(3);
                    let (what, answer, id) = if revoke {
                        let id = targets.swap_remove((pick >> 33) as usize % targets.len());
                        let path = format!("/v1/api-keys/{id}");
                        (
                            "revoke",
                            try_call(admin, "DELETE", &path, "").await,
                            Some(id),
                        )
                    } else {
                        let body = r#"{"namespace":"acme","environment":"production"}"#;
                        (
                            "create",
                            try_call(admin, "POST", "/v1/api-keys", body).await,
                            None,
                        )
                    };
                    match (answer, id) {
                        (Some((200, _)), Some(id)) => {
                            life.acked.revoked.insert(id);
                        }
                        (Some((201, v)), None) => {
                            life.acked
                                .created
                                .insert(v["id"].as_str().unwrap().to_string());
                        }
                        (Some((status, v)), _) => {
                            life.failures.push(format!("{what}: {status} {v}"));
                        }
                        (None, _) => {
                            if !killed.load(Ordering::SeqCst) {
                                life.failures
                                    .push(format!("{what}: no answer before the kill"));
                            }
                            return life;
                        }
                    }
                }
            }));
        }
        let traffic_task = {
            let (key, killed) = (traffic_key.clone(), killed.clone());
            tokio::spawn(async move {
                let mut life = Life::default();
                loop {
                    life.calls += 1;
                    match try_send(proxy, "GET", "/v1/x", &key, "").await {
                        Some(r) if r.status == 200 => {}
                        Some(r) => life.failures.push(format!("proxy: {}", r.status)),
                        None => {
                            if !killed.load(Ordering::SeqCst) {
                                life.failures
                                    .push("proxy: no answer before the kill".into());
                            }
                            return life;
                        }
                    }
                }
            })
        };
        tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
        killed.store(true, Ordering::SeqCst);
        gw.signal("KILL");
        kills += 1;
        let mut failures = Vec::new();
        for w in writers {
            let life = w.await.unwrap();
            ops += life.calls;
            failures.extend(life.failures);
            for id in life.acked.created {
                active.push(id.clone());
                acked.created.insert(id);
            }
            for id in life.acked.revoked {
                active.retain(|a| *a != id);
                acked.revoked.insert(id);
            }
        }
        let life = traffic_task.await.unwrap();
        requests += life.calls;
        failures.extend(life.failures);
        assert!(
            failures.is_empty(),
            "life {kills}: calls failed on their own: {failures:?}"
        );
        // Wait for the kill to land, then look for the writes it interrupted.
        let pid = gw.pid();
        let mut gw = gw;
        gw.wait_exit(Duration::from_secs(10));
        for (file, count) in [(&store, &mut in_store_write), (&usage, &mut in_usage_write)] {
            let temp = temp_file_of(file, pid);
            if temp.exists() {
                *count += 1;
                std::fs::remove_file(&temp).unwrap();
            }
        }
        drop(gw);
        check_store(kind, &store, &acked, &format!("{kills} gateway kills"));
        check_usage(&usage, &traffic_id, &format!("{kills} gateway kills"));
    }
    eprintln!(
        "admin API, {} store: {ops} calls and {requests} proxied requests, {kills} SIGKILLs of the gateway \
         ({in_store_write} inside a key-store write, {in_usage_write} inside a usage write), {} creates and {} revokes acknowledged, none lost; the usage file parsed and held the \
         traffic key after every kill",
        kind.store_name(),
        acked.created.len(),
        acked.revoked.len()
    );
    assert!(kills >= 3 && acked.created.len() >= 50, "enough happened");
}
