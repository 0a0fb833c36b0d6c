//! The SQLite key store against the real binary and a gateway: changes from another process
//! are live within a second, and the admin API's before it answers, both as deltas; writers
//! in several processes all land; a corrupt or locked database is a clear error, and the
//! snapshot in force keeps serving.

mod support;

use std::time::{Duration, Instant};

use support::process::{self, create_key_json, keygate_ok};
use support::*;

const SQLITE: &str = "store: {kind: sqlite, path: keys.db}\n";

async fn sqlite_gateway(up: &Upstream) -> TestGateway {
    TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), SQLITE)).await
}

async fn status_of(gw: &TestGateway, secret: &str) -> u16 {
    send(Req::get(gw.proxy, "/v1/x").bearer(secret))
        .await
        .status
        .as_u16()
}

/// How long until `secret` gets `want`, if within `limit`.
async fn live_within(gw: &TestGateway, secret: &str, want: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    let live = eventually(limit, async || status_of(gw, secret).await == want).await;
    assert!(live, "{want} within {limit:?}");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_another_process_are_live_within_a_second_and_the_apis_at_once() {
    let up = Upstream::start().await;
    let gw = sqlite_gateway(&up).await;
    let reloads = counter(gw.admin, "keygate_reloads_total").await;
    let deltas = counter(gw.admin, "keygate_key_changes_applied_total").await;

    let made = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(serde_json::json!({"namespace": "acme", "environment": "production", "name": "Web"})),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.json());
    let secret = made.json()["key"].as_str().unwrap().to_string();
    ledger::secret(&secret);
    assert_eq!(status_of(&gw, &secret).await, 200, "live before the answer");

    let dir = gw.dir.path();
    let cli = create_key_json(dir, &["--name", "ci bot"]);
    let (cli_id, cli_secret) = (
        cli["id"].as_str().unwrap().to_string(),
        cli["key"].as_str().unwrap().to_string(),
    );
    ledger::secret(&cli_secret);
    let took = live_within(&gw, &cli_secret, 200, Duration::from_secs(1)).await;
    eprintln!("a key made by `keygate keys create` was live after {took:?}");
    keygate_ok(dir, &["keys", "revoke", &cli_id]);
    let took = live_within(&gw, &cli_secret, 401, Duration::from_secs(1)).await;
    eprintln!("a revocation by `keygate keys revoke` was live after {took:?}");

    // Every change was a delta: no whole-store reload.
    assert_eq!(counter(gw.admin, "keygate_reloads_total").await, reloads);
    assert!(counter(gw.admin, "keygate_key_changes_applied_total").await >= deltas + 3);

    // The listing's filters, search and cursor, answered by the database.
    let page = admin(&gw, "GET", "/v1/api-keys?status=all&limit=1", None).await;
    let body = page.json();
    assert_eq!(body["keys"].as_array().unwrap().len(), 1, "{body}");
    let cursor = body["next_cursor"].as_str().unwrap().to_string();
    let next = admin(
        &gw,
        "GET",
        &format!("/v1/api-keys?status=all&limit=1&cursor={cursor}"),
        None,
    )
    .await
    .json();
    assert_eq!(next["keys"].as_array().unwrap().len(), 1, "{next}");
    assert!(next["next_cursor"].is_null(), "{next}");
    assert_ne!(body["keys"][0]["id"], next["keys"][0]["id"]);
    let found = admin(&gw, "GET", "/v1/api-keys?status=revoked&search=CI", None).await;
    let found = found.json();
    assert_eq!(found["keys"][0]["id"], cli_id.as_str(), "{found}");
    assert_eq!(found["keys"].as_array().unwrap().len(), 1, "{found}");
    let one = admin(&gw, "GET", &format!("/v1/api-keys/{cli_id}"), None).await;
    assert_eq!(one.json()["status"], "revoked");
    // Namespaces count from the database: the revoked key is not in use.
    let spaces = admin(&gw, "GET", "/v1/namespaces", None).await.json();
    let acme = spaces["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "acme")
        .unwrap_or_else(|| panic!("{spaces}"));
    assert_eq!(acme["keys_in_use"], 1, "{spaces}");
    assert_eq!(
        admin(&gw, "GET", "/v1/api-keys/ffffffff", None)
            .await
            .status,
        404
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_in_several_processes_and_the_api_all_land() {
    let up = Upstream::start().await;
    let gw = sqlite_gateway(&up).await;
    let dir = gw.dir.path().to_path_buf();
    let (processes, each, api) = (4, 8, 16);
    let cli: Vec<_> = (0..processes)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                (0..each)
                    .map(|_| {
                        let (code, out, err) = process::run(
                            &[
                                "--config",
                                "keygate.yaml",
                                "keys",
                                "create",
                                "--namespace",
                                "acme",
                                "--environment",
                                "production",
                                "--json",
                            ],
                            &dir,
                        );
                        assert_eq!(code, 0, "{err}");
                        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
                        ledger::secret(v["key"].as_str().unwrap());
                        v["key"].as_str().unwrap().to_string()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut secrets = Vec::new();
    for _ in 0..api {
        let made = admin(
            &gw,
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"namespace": "acme", "environment": "production"})),
        )
        .await;
        assert_eq!(made.status, 201, "{}", made.json());
        let secret = made.json()["key"].as_str().unwrap().to_string();
        ledger::secret(&secret);
        secrets.push(secret);
    }
    for t in cli {
        secrets.extend(t.join().unwrap());
    }
    assert_eq!(secrets.len(), processes * each + api);
    let all_live = eventually(Duration::from_secs(2), async || {
        gw.gateway().snapshot.load().key_count() == secrets.len()
    })
    .await;
    assert!(all_live, "every key is in the snapshot");
    for secret in &secrets {
        assert_eq!(status_of(&gw, secret).await, 200);
    }
    let listed = keygate_ok(&dir, &["keys", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["keys"].as_array().unwrap().len(), secrets.len());
    gw.stop().await;
}

/// A one-line error from the CLI: exit 1, and a single line on stderr.
fn refused_in_one_line(dir: &std::path::Path, args: &[&str], says: &str) {
    let mut all = vec!["--config", "keygate.yaml"];
    all.extend_from_slice(args);
    let (code, _, err) = process::run(&all, dir);
    assert_ne!(code, 0, "{args:?} refused");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line: {err}"
    );
    assert!(err.contains(says), "{args:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_or_corrupt_database_is_a_clear_error_and_the_snapshot_stays() {
    let up = Upstream::start().await;
    let gw = sqlite_gateway(&up).await;
    let dir = gw.dir.path().to_path_buf();
    let made = create_key_json(&dir, &[]);
    let secret = made["key"].as_str().unwrap().to_string();
    ledger::secret(&secret);
    live_within(&gw, &secret, 200, Duration::from_secs(1)).await;
    let create = || {
        admin(
            &gw,
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"namespace": "acme", "environment": "production"})),
        )
    };

    // Another process holds the write lock past the busy timeout (5 s).
    let db = dir.join("keys.db");
    let holder = {
        let db = db.clone();
        std::thread::spawn(move || {
            let con = rusqlite::Connection::open(&db).unwrap();
            con.execute_batch("BEGIN IMMEDIATE").unwrap();
            std::thread::sleep(Duration::from_millis(6_500));
            con.execute_batch("ROLLBACK").unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let cli = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            refused_in_one_line(
                &dir,
                &[
                    "keys",
                    "create",
                    "--namespace",
                    "acme",
                    "--environment",
                    "production",
                ],
                "database is locked",
            )
        })
    };
    let started = Instant::now();
    let locked = create().await;
    assert_eq!(locked.status, 503, "{}", locked.json());
    assert_eq!(
        locked.json()["code"],
        "store_unavailable",
        "{}",
        locked.json()
    );
    assert!(started.elapsed() >= Duration::from_secs(4), "it waited");
    cli.join().unwrap();
    assert_eq!(status_of(&gw, &secret).await, 200, "the snapshot serves");
    holder.join().unwrap();
    assert_eq!(
        create().await.status,
        201,
        "writes resume once the lock is gone"
    );

    // Replaced by something that is not a database.
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, "this is no database\n".repeat(400)).unwrap();
    std::fs::rename(&garbage, &db).unwrap();
    for side in ["keys.db-wal", "keys.db-shm"] {
        let _ = std::fs::remove_file(dir.join(side));
    }
    let corrupt = create().await;
    assert_eq!(corrupt.status, 503, "{}", corrupt.json());
    assert!(
        corrupt.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not a database")),
        "{}",
        corrupt.json()
    );
    assert_eq!(status_of(&gw, &secret).await, 200, "the snapshot serves");
    refused_in_one_line(
        &dir,
        &[
            "keys",
            "create",
            "--namespace",
            "acme",
            "--environment",
            "production",
        ],
        "not a database",
    );
    refused_in_one_line(&dir, &["keys", "show", "ffffffff"], "not a database");
    let (code, _, err) = process::run(&["--config", "keygate.yaml", "check"], &dir);
    assert_ne!(code, 0);
    assert!(
        err.contains("keys.db") && err.contains("not a database"),
        "{err}"
    );
    let (reload, _) = gw.reload().await;
    assert_ne!(reload, 200, "a reload from it is refused");
    assert_eq!(
        status_of(&gw, &secret).await,
        200,
        "the snapshot still serves"
    );
    gw.stop().await;
}
