//! Crash safety: writers are killed (SIGKILL) at random points while they create and revoke
//! keys. After every kill the store must parse, and every change that was acknowledged (the
//! CLI exited 0, the admin API answered) must be in it. The same for the usage file.
//!
//! The random points come from a seeded generator; the seed is printed, and
//! `KEYGATE_CRASH_SEED=N` replays a run.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keygate::keys::{Status, Store};
use support::process::Process;
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

/// The store parses, and holds every acknowledged change.
fn check_store(path: &Path, acked: &Acked, after: &str) {
    let (file, _) = Store::new(path)
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

fn setup_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let routes = route("/", "127.0.0.1:9".parse().unwrap(), "production", "");
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&routes, "usage:\n  flush_interval: 50ms\n"),
    );
    dir
}

#[test]
fn acknowledged_cli_writes_survive_sigkill() {
    let dir = setup_dir();
    let store = dir.path().join("keys.yaml");
    let mut rng = Rng::new();
    let mut acked = Acked::default();
    let mut active: Vec<String> = Vec::new();
    let (mut ops, mut kills) = (0, 0);
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
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if rng.below(4) == 0 {
            // Kill it somewhere between start and finish.
            std::thread::sleep(Duration::from_micros(rng.below(15_000)));
            let _ = child.kill();
            kills += 1;
        }
        let out = child.wait_with_output().unwrap();
        let what = if target.is_some() { "revoke" } else { "create" };
        support::ledger::cli(&["keys", what], &out.stdout, &out.stderr);
        if out.status.success() {
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
        check_store(&store, &acked, &format!("op {ops} ({kills} kills)"));
    }
    eprintln!(
        "CLI: {ops} operations, {kills} SIGKILLs, {} creates and {} revokes acknowledged, none lost",
        acked.created.len(),
        acked.revoked.len()
    );
    assert!(
        kills >= 100 && acked.created.len() >= 100,
        "enough happened: {kills} kills"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_api_writes_and_the_usage_file_survive_sigkill_of_the_gateway() {
    let dir = setup_dir();
    let store = dir.path().join("keys.yaml");
    let usage = dir.path().join("usage.json");
    let mut rng = Rng::new();
    let mut acked = Acked::default();
    let mut active: Vec<String> = Vec::new();
    let (mut ops, mut kills) = (0u64, 0);
    let started = Instant::now();
    while ops < 500 && started.elapsed() < Duration::from_secs(120) {
        let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
        let (_, admin) = gw.addresses();
        // Writers hammer the admin API until the gateway is killed under them.
        let deadline = Instant::now() + Duration::from_millis(100 + rng.below(400));
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let mut targets = active.clone();
            let seed = rng.below(1 << 30) + w;
            writers.push(tokio::spawn(async move {
                let mut mine = Acked::default();
                let mut n = 0u64;
                let mut pick = seed;
                loop {
                    n += 1;
                    pick = pick.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let revoke = !targets.is_empty() && pick.is_multiple_of(3);
                    let answer = if revoke {
                        let id = targets.swap_remove((pick >> 33) as usize % targets.len());
                        try_call(admin, "DELETE", &format!("/v1/api-keys/{id}"), "")
                            .await
                            .map(|(s, _)| (s, id))
                    } else {
                        try_call(
                            admin,
                            "POST",
                            "/v1/api-keys",
                            r#"{"namespace":"acme","environment":"production"}"#,
                        )
                        .await
                        .map(|(s, v)| (s, v["id"].as_str().unwrap_or_default().to_string()))
                    };
                    match answer {
                        Some((200, id)) if revoke => {
                            mine.revoked.insert(id);
                        }
                        Some((201, id)) => {
                            mine.created.insert(id);
                        }
                        Some(_) => {}
                        None => return (mine, n),
                    }
                }
            }));
        }
        tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
        gw.signal("KILL");
        kills += 1;
        for w in writers {
            let (mine, n) = w.await.unwrap();
            ops += n;
            for id in mine.created {
                active.push(id.clone());
                acked.created.insert(id);
            }
            for id in mine.revoked {
                active.retain(|a| *a != id);
                acked.revoked.insert(id);
            }
        }
        drop(gw);
        check_store(&store, &acked, &format!("{kills} gateway kills"));
        if usage.exists() {
            let text = std::fs::read_to_string(&usage).unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| {
                panic!("after {kills} kills the usage file does not parse: {e}")
            });
        }
    }
    eprintln!(
        "admin API: {ops} calls, {kills} SIGKILLs of the gateway, {} creates and {} revokes acknowledged, none lost; the usage file parsed after every kill",
        acked.created.len(),
        acked.revoked.len()
    );
    assert!(kills >= 3 && acked.created.len() >= 50, "enough happened");
}
