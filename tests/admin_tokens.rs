//! Admin tokens as managed credentials (README, "Admin tokens"): made by `keygate tokens
//! create` or `POST /v1/admin-tokens`, kept hashed in the store beside the config's, in force
//! on the running gateway without a restart, revoked for good, expiring on time, with a last
//! use; and never written down in plaintext.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::process::{self, Process};
use support::redis::RedisServer;
use support::*;

const SQLITE: &str = "store: {kind: sqlite, path: keys.db}\n";

/// How long a change written by another process may take to reach the gateway before the
/// test calls it lost; the README says within a second.
const LIVE: Duration = Duration::from_secs(5);

/// A call to the admin API at `addr` with `token`, and a JSON body if given.
async fn call(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut req = Req::get(addr, path).method(method).bearer(token);
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    send(req).await
}

/// Makes a token over the API with the test's admin token; returns the answer's view and the
/// token, handed to the secret ledger.
async fn made(addr: SocketAddr, body: Value) -> (Value, String) {
    let r = call(addr, ADMIN_TOKEN, "POST", "/v1/admin-tokens", Some(body)).await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let v = r.json();
    let token = v["token"].as_str().unwrap().to_string();
    ledger::secret(&token);
    (v, token)
}

async fn gateway(store: &str) -> (Upstream, TestGateway) {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), store)).await;
    (up, gw)
}

/// `keygate --config keygate.yaml tokens ARGS…` in `dir`.
fn tokens_cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--config", "keygate.yaml", "tokens"];
    all.extend_from_slice(args);
    process::run(&all, dir)
}

/// `tokens create … --json`, asserting success: the view, and the token (in the ledger).
fn cli_create(dir: &Path, args: &[&str]) -> (Value, String) {
    let mut all = vec!["create", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = tokens_cli(dir, &all);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    ledger::secret(&token);
    (v, token)
}

fn audit_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| {
            v["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("admin_token."))
        })
        .collect()
}

/// Every file under `dir`, as bytes, for a search.
fn every_file(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                found.push((path.display().to_string(), bytes));
            }
        }
    }
    found
}

fn assert_nowhere(dir: &Path, tokens: &[&str]) {
    for (file, bytes) in every_file(dir) {
        let text = String::from_utf8_lossy(&bytes);
        for token in tokens {
            assert!(!text.contains(token), "a token in plaintext in {file}");
        }
    }
}

/// A `read` token made by the CLI reaches the running gateway by itself: it lists keys,
/// is refused creating one and managing tokens (403 `insufficient_role`), and the listing
/// shows it with where it lives.
async fn a_read_token_made_by_the_cli_may_only_read(store: &str) {
    let (_up, gw) = gateway(store).await;
    let dir = gw.dir.path();
    let (shown, reader) = cli_create(dir, &["--name", "reader", "--role", "read"]);
    assert!(reader.starts_with("kga_"), "a kga_ token");
    keygate::keys::format::parse(&reader).expect("a token with a checksum");
    assert_eq!(
        (
            shown["name"].clone(),
            shown["role"].clone(),
            shown["source"].clone()
        ),
        (json!("reader"), json!("read"), json!("store"))
    );
    assert!(shown["created_by"].as_str().unwrap().starts_with("cli:"));
    let live = eventually(LIVE, async || {
        call(gw.admin, &reader, "GET", "/v1/api-keys", None)
            .await
            .status
            == 200
    })
    .await;
    assert!(
        live,
        "the CLI's token works on the running gateway without a restart"
    );
    let refused = call(
        gw.admin,
        &reader,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production"})),
    )
    .await;
    assert_eq!(
        (refused.status.as_u16(), refused.code()),
        (403, "insufficient_role".into())
    );
    for (method, path) in [
        ("GET", "/v1/admin-tokens"),
        ("DELETE", "/v1/admin-tokens/reader"),
    ] {
        let r = call(gw.admin, &reader, method, path, None).await;
        assert_eq!(r.status, 403, "{method} {path} needs role admin");
    }
    let listed = call(gw.admin, ADMIN_TOKEN, "GET", "/v1/admin-tokens", None).await;
    assert_eq!(listed.status, 200);
    let names: Vec<(Value, Value)> = listed.json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].clone(), t["source"].clone()))
        .collect();
    assert_eq!(
        names,
        [
            (json!("tests"), json!("config")),
            (json!("reader"), json!("store"))
        ]
    );
    // The store holds the hash, never the token.
    let hash = keygate::keys::hex(&keygate::keys::format::hash(&reader));
    let store: Vec<u8> = every_file(dir)
        .into_iter()
        .filter(|(f, _)| f.contains("keys."))
        .flat_map(|(_, b)| b)
        .collect();
    assert!(String::from_utf8_lossy(&store).contains(&hash));
    assert_nowhere(dir, &[&reader]);
    assert_eq!(audit_lines(dir)[0]["action"], "admin_token.created");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_made_by_the_cli_may_only_read_file_store() {
    a_read_token_made_by_the_cli_may_only_read("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_made_by_the_cli_may_only_read_sqlite_store() {
    a_read_token_made_by_the_cli_may_only_read(SQLITE).await;
}

/// A token made over the API works on the very next call, makes keys in its own name, and
/// once revoked gets 401 on its very next call; both are audited.
async fn a_token_works_at_once_and_a_revoked_one_is_refused_at_once(store: &str) {
    let (_up, gw) = gateway(store).await;
    let (shown, deployer) = made(
        gw.admin,
        json!({"name": "deploy-bot", "role": "admin", "expires_at": "30d"}),
    )
    .await;
    assert_eq!(shown["created_by"], "tests");
    assert_eq!(shown["status"], "active");
    assert!(shown["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(shown["last_used_at"], Value::Null);
    let key = call(
        gw.admin,
        &deployer,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production"})),
    )
    .await;
    assert_eq!(key.status, 201, "works before any reload: {:?}", key.json());
    assert_eq!(key.json()["created_by"], "deploy-bot");
    ledger::secret(key.json()["key"].as_str().unwrap());

    let r = call(
        gw.admin,
        ADMIN_TOKEN,
        "DELETE",
        "/v1/admin-tokens/deploy-bot",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["name"], "deploy-bot");
    assert!(r.json().get("token").is_none(), "never the token again");
    let next = call(gw.admin, &deployer, "GET", "/v1/api-keys", None).await;
    assert_eq!(
        (next.status.as_u16(), next.code()),
        (401, "invalid_admin_token".into())
    );
    assert_eq!(
        next.header("www-authenticate"),
        "Bearer realm=\"keygate-admin\""
    );
    let again = call(
        gw.admin,
        ADMIN_TOKEN,
        "DELETE",
        "/v1/admin-tokens/deploy-bot",
        None,
    )
    .await;
    assert_eq!(
        (again.status.as_u16(), again.code()),
        (404, "admin_token_not_found".into())
    );
    // A restart reads the same store: the token stays revoked.
    let after = gw.beside().await;
    let next = call(after.admin, &deployer, "GET", "/v1/api-keys", None).await;
    assert_eq!(next.status, 401);
    after.stop().await;
    gw.gateway().audit.flush();
    let audited: Vec<(Value, Value)> = audit_lines(gw.dir.path())
        .iter()
        .map(|v| (v["action"].clone(), v["actor"].clone()))
        .collect();
    assert_eq!(
        audited,
        [
            (json!("admin_token.created"), json!("tests")),
            (json!("admin_token.revoked"), json!("tests"))
        ]
    );
    assert_nowhere(gw.dir.path(), &[&deployer]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_works_at_once_and_a_revoked_one_is_refused_at_once_file_store() {
    a_token_works_at_once_and_a_revoked_one_is_refused_at_once("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_works_at_once_and_a_revoked_one_is_refused_at_once_sqlite_store() {
    a_token_works_at_once_and_a_revoked_one_is_refused_at_once(SQLITE).await;
}

/// The last working admin token cannot revoke itself (409 `last_admin_token`), and nothing
/// changes; with a second one it can. The config's tokens cannot be revoked here (409
/// `admin_token_in_config`).
async fn the_last_admin_token_cannot_revoke_itself(store: &str) {
    let up = Upstream::start().await;
    // The config's only token may read: the store's are the only admin tokens.
    let config = config_yaml(&route("/", up.addr, "production", ""), store)
        .replace("{name: tests, hash:", "{name: tests, role: read, hash:");
    let gw = TestGateway::start(&config).await;
    let dir = gw.dir.path();
    let (_, root) = cli_create(dir, &["--name", "root", "--role", "admin"]);
    let live = eventually(LIVE, async || {
        call(gw.admin, &root, "GET", "/v1/admin-tokens", None)
            .await
            .status
            == 200
    })
    .await;
    assert!(live);
    let r = call(gw.admin, &root, "DELETE", "/v1/admin-tokens/root", None).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "last_admin_token".into())
    );
    assert_eq!(r.header("content-type"), "application/problem+json");
    assert_eq!(
        call(gw.admin, &root, "GET", "/v1/api-keys", None)
            .await
            .status,
        200
    );
    // An expired admin token does not count as one left.
    let r = call(
        gw.admin,
        &root,
        "POST",
        "/v1/admin-tokens",
        Some(json!({"name": "brief", "role": "admin", "expires_at": "1h"})),
    )
    .await;
    assert_eq!(r.status, 201);
    ledger::secret(r.json()["token"].as_str().unwrap());
    gw.clock.advance(Duration::from_secs(2 * 3600));
    let r = call(gw.admin, &root, "DELETE", "/v1/admin-tokens/root", None).await;
    assert_eq!(
        r.code(),
        "last_admin_token",
        "an expired admin token is no admin left"
    );
    // The config's token: 409, named as the config's.
    let r = call(gw.admin, &root, "DELETE", "/v1/admin-tokens/tests", None).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "admin_token_in_config".into())
    );
    assert!(r.json()["detail"].as_str().unwrap().contains("config file"));
    // With a second working admin token, the first may go, and is refused from then on.
    let r = call(
        gw.admin,
        &root,
        "POST",
        "/v1/admin-tokens",
        Some(json!({"name": "second", "role": "admin"})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let second = r.json()["token"].as_str().unwrap().to_string();
    ledger::secret(&second);
    let r = call(gw.admin, &root, "DELETE", "/v1/admin-tokens/root", None).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        call(gw.admin, &root, "GET", "/v1/api-keys", None)
            .await
            .status,
        401
    );
    let r = call(gw.admin, &second, "DELETE", "/v1/admin-tokens/second", None).await;
    assert_eq!(r.code(), "last_admin_token");
    // The CLI needs no token: it may revoke any stored one, but not the config's.
    let (code, _, err) = tokens_cli(dir, &["revoke", "tests"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("keygate: error: admin token `tests` is written in the config file"),
        "{err}"
    );
    let (code, out, err) = tokens_cli(dir, &["revoke", "second"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("Revoked admin token second"), "{out}");
    let gone = eventually(LIVE, async || {
        call(gw.admin, &second, "GET", "/v1/api-keys", None)
            .await
            .status
            == 401
    })
    .await;
    assert!(gone, "the CLI's revocation reaches the running gateway");
    let (code, _, err) = tokens_cli(dir, &["revoke", "second"]);
    assert_eq!(
        (code, err.trim()),
        (
            1,
            "keygate: error: no admin token in the store is named `second`"
        )
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_token_cannot_revoke_itself_file_store() {
    the_last_admin_token_cannot_revoke_itself("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_token_cannot_revoke_itself_sqlite_store() {
    the_last_admin_token_cannot_revoke_itself(SQLITE).await;
}

/// A token past its expiry gets 401 (on the gateway's fake clock, no sleep), and is listed
/// as expired; the CLI's `--expires` is read as `keys create` reads it.
async fn an_expired_token_is_refused(store: &str) {
    let (_up, gw) = gateway(store).await;
    let (_, brief) = made(
        gw.admin,
        json!({"name": "brief", "role": "read", "expires_at": "1h"}),
    )
    .await;
    assert_eq!(
        call(gw.admin, &brief, "GET", "/v1/api-keys", None)
            .await
            .status,
        200
    );
    gw.clock.advance(Duration::from_secs(3599));
    assert_eq!(
        call(gw.admin, &brief, "GET", "/v1/api-keys", None)
            .await
            .status,
        200
    );
    gw.clock.advance(Duration::from_secs(1));
    let r = call(gw.admin, &brief, "GET", "/v1/api-keys", None).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (401, "invalid_admin_token".into())
    );
    let listed = call(gw.admin, ADMIN_TOKEN, "GET", "/v1/admin-tokens", None)
        .await
        .json();
    let brief_view = &listed["tokens"][1];
    assert_eq!(
        (brief_view["name"].clone(), brief_view["status"].clone()),
        (json!("brief"), json!("expired"))
    );
    let (code, _, err) = tokens_cli(
        gw.dir.path(),
        &[
            "create",
            "--name",
            "x",
            "--role",
            "read",
            "--expires",
            "yesterday",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.starts_with("keygate: error: --expires: "), "{err}");
    let (v, _) = cli_create(
        gw.dir.path(),
        &["--name", "monthly", "--role", "verify", "--expires", "30d"],
    );
    let at = keygate::clock::parse_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let now = keygate::clock::Clock::real().unix_secs();
    assert!((at - now - 30 * 86_400).abs() < 60, "{v}");
    gw.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_refused_file_store() {
    an_expired_token_is_refused("").await;
}

#[tokio::test]
async fn an_expired_token_is_refused_sqlite_store() {
    an_expired_token_is_refused(SQLITE).await;
}

/// A token's last use is noted as it authenticates and shown by the listing; housekeeping
/// writes it down, so the CLI's listing and a restarted gateway show it too.
async fn last_use_is_listed(store: &str) {
    let (_up, gw) = gateway(store).await;
    let (_, user) = made(gw.admin, json!({"name": "user", "role": "read"})).await;
    let last_used = |listed: &Value, name: &str| {
        listed["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["last_used_at"].clone())
            .unwrap()
    };
    let listed = call(gw.admin, ADMIN_TOKEN, "GET", "/v1/admin-tokens", None)
        .await
        .json();
    assert_eq!(last_used(&listed, "user"), Value::Null);
    gw.clock.advance(Duration::from_secs(90));
    assert_eq!(
        call(gw.admin, &user, "GET", "/v1/usage", None).await.status,
        200
    );
    // Every authenticated call is a use, one its role refuses too; a wrong token is none.
    gw.clock.advance(Duration::from_secs(60));
    let at = keygate::clock::rfc3339(gw.clock.unix_secs());
    let refused = call(gw.admin, &user, "POST", "/v1/reload", None).await;
    assert_eq!(refused.status, 403);
    gw.clock.advance(Duration::from_secs(60));
    let wrong = format!("{user}x");
    assert_eq!(
        call(gw.admin, &wrong, "GET", "/v1/usage", None)
            .await
            .status,
        401
    );
    let listed = call(gw.admin, ADMIN_TOKEN, "GET", "/v1/admin-tokens", None)
        .await
        .json();
    assert_eq!(last_used(&listed, "user"), json!(at));
    // The listing's own call is a use of the config's token.
    let now = keygate::clock::rfc3339(gw.clock.unix_secs());
    assert_eq!(last_used(&listed, "tests"), json!(now));

    gw.gateway().housekeeping();
    let (code, out, err) = tokens_cli(gw.dir.path(), &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let cli: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(last_used(&cli, "user"), json!(at));
    let (_, table, _) = tokens_cli(gw.dir.path(), &["list"]);
    let row = table.lines().find(|l| l.starts_with("user ")).unwrap();
    assert!(
        row.contains(&at) && row.contains("read") && row.contains("store"),
        "{table}"
    );
    assert!(!table.contains(&user) && !out.contains(&user));
    let after = gw.beside().await;
    let listed = call(after.admin, ADMIN_TOKEN, "GET", "/v1/admin-tokens", None)
        .await
        .json();
    assert_eq!(
        last_used(&listed, "user"),
        json!(at),
        "kept across a restart"
    );
    after.stop().await;
    gw.stop().await;
}

#[tokio::test]
async fn last_use_is_listed_file_store() {
    last_use_is_listed("").await;
}

#[tokio::test]
async fn last_use_is_listed_sqlite_store() {
    last_use_is_listed(SQLITE).await;
}

/// Bad input is 400 naming the field, a name taken is 409, and neither writes anything.
#[tokio::test]
async fn bad_tokens_are_refused_by_field() {
    let (_up, gw) = gateway("").await;
    let long = "x".repeat(65);
    for (body, field) in [
        (json!({"name": "Deploy", "role": "read"}), "name"),
        (json!({"name": "", "role": "read"}), "name"),
        (json!({"name": long, "role": "read"}), "name"),
        (json!({"name": "a b", "role": "read"}), "name"),
        (json!({"name": "env", "role": "read"}), "name"),
        (json!({"name": "ci", "role": "root"}), "role"),
        (json!({"name": "ci"}), "role"),
        (json!({"role": "read"}), "name"),
        (
            json!({"name": "ci", "role": "read", "expires_at": "yesterday"}),
            "expires_at",
        ),
        (
            json!({"name": "ci", "role": "read", "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            json!({"name": "ci", "role": "read", "expires_at": 30}),
            "expires_at",
        ),
        (
            json!({"name": "ci", "role": "read", "scopes": []}),
            "scopes",
        ),
    ] {
        let r = call(
            gw.admin,
            ADMIN_TOKEN,
            "POST",
            "/v1/admin-tokens",
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), r.code(), r.json()["field"].clone()),
            (400, "invalid_request".into(), json!(field)),
            "{body}"
        );
    }
    let r = call(
        gw.admin,
        ADMIN_TOKEN,
        "POST",
        "/v1/admin-tokens",
        Some(json!({"name": "tests", "role": "read"})),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "admin_token_exists".into())
    );
    made(gw.admin, json!({"name": "ci", "role": "read"})).await;
    let r = call(
        gw.admin,
        ADMIN_TOKEN,
        "POST",
        "/v1/admin-tokens",
        Some(json!({"name": "ci", "role": "admin"})),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "admin_token_exists".into())
    );
    let r = call(
        gw.admin,
        ADMIN_TOKEN,
        "DELETE",
        "/v1/admin-tokens/Not%20A%20Name",
        None,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["field"].clone()),
        (400, json!("name"))
    );
    let r = call(
        gw.admin,
        ADMIN_TOKEN,
        "DELETE",
        "/v1/admin-tokens/nobody",
        None,
    )
    .await;
    assert_eq!(r.code(), "admin_token_not_found");
    let listed = call(gw.admin, ADMIN_TOKEN, "GET", "/v1/admin-tokens", None)
        .await
        .json();
    assert_eq!(listed["tokens"].as_array().map(Vec::len), Some(2));
    // The CLI: one line naming the flag, exit 1, nothing written.
    for (args, flag) in [
        (vec!["--name", "Bad Name", "--role", "read"], "--name: "),
        (vec!["--name", "ok", "--role", "root"], "--role: "),
        (vec!["--name", "ci", "--role", "read"], "--name: "),
    ] {
        let mut all = vec!["create"];
        all.extend(args.iter().copied());
        let (code, out, err) = tokens_cli(gw.dir.path(), &all);
        assert_eq!((code, out.as_str()), (1, ""), "{args:?}");
        assert!(
            err.starts_with(&format!("keygate: error: {flag}")) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    let (_, out, _) = tokens_cli(gw.dir.path(), &["list", "--json"]);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["tokens"].as_array().map(Vec::len), Some(2));
    gw.stop().await;
}

/// A stored `kga_` token reported leaked (the admin route, the CLI with gitleaks' report) is
/// revoked and audited; a config token reported is recognised, audited and left with a
/// warning, as only its owner can remove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_token_is_revoked_if_it_is_a_stored_one() {
    let (_up, gw) = gateway(SQLITE).await;
    let (_, leaked) = made(gw.admin, json!({"name": "leaky", "role": "admin"})).await;
    let (_, reported) = made(gw.admin, json!({"name": "kept", "role": "read"})).await;
    let r = call(
        gw.admin,
        ADMIN_TOKEN,
        "POST",
        "/v1/api-keys/leaked",
        Some(json!({"keys": [leaked, ADMIN_TOKEN, "kga_not_a_token"], "source": "https://paste.example/1"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let answer = r.json();
    let entries: Vec<(Value, Value, Value)> = answer["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["label"].clone(),
                e["admin_token"].clone(),
                e["action"].clone(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (json!("true_positive"), json!("leaky"), json!("revoke")),
            (json!("true_positive"), json!("tests"), json!("report")),
            (json!("false_positive"), Value::Null, Value::Null),
        ]
    );
    assert!(
        answer["warnings"][0].as_str().unwrap().contains("`tests`"),
        "{answer}"
    );
    assert_eq!(
        call(gw.admin, &leaked, "GET", "/v1/api-keys", None)
            .await
            .status,
        401
    );
    assert_eq!(
        call(gw.admin, ADMIN_TOKEN, "GET", "/v1/api-keys", None)
            .await
            .status,
        200
    );
    gw.gateway().audit.flush();

    // The CLI, from gitleaks' report kept outside the gateway's folder: `report` keeps it.
    let reports = tempfile::tempdir().unwrap();
    let gitleaks = reports.path().join("gitleaks.json");
    write(
        &gitleaks,
        &json!([{"RuleID": "keygate-admin-token", "Secret": reported, "File": "ci.env"}])
            .to_string(),
    );
    let leaked_cli = |action: &str| {
        let mut args = vec!["--config", "keygate.yaml", "keys", "leaked"];
        let path = gitleaks.display().to_string();
        args.extend([path.as_str(), "--action", action]);
        process::run(&args, gw.dir.path())
    };
    let (code, out, err) = leaked_cli("report");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "true_positive   admin token kept: report");
    assert_eq!(
        call(gw.admin, &reported, "GET", "/v1/api-keys", None)
            .await
            .status,
        200
    );
    let (code, out, _) = leaked_cli("disable");
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "true_positive   admin token kept: revoke",
        "a token has no disabled state"
    );
    let gone = eventually(LIVE, async || {
        call(gw.admin, &reported, "GET", "/v1/api-keys", None)
            .await
            .status
            == 401
    })
    .await;
    assert!(gone);
    let leaks: Vec<String> = audit_lines(gw.dir.path())
        .iter()
        .filter(|v| v["action"] == "admin_token.leaked")
        .map(|v| v["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(leaks.len(), 4, "{leaks:?}");
    assert!(leaks[0].starts_with("leaky (store): found at https://paste.example/1; action: revoke"));
    assert!(leaks[1].starts_with("tests (config)"));
    assert_nowhere(gw.dir.path(), &[&leaked, &reported, ADMIN_TOKEN]);
    gw.stop().await;
}

/// The real binary: a token made by the CLI and one made over the API work at once, and are
/// written nowhere in plaintext: not in the store, the audit log, the last-use book, nor the
/// process's log (at debug level).
#[test]
fn tokens_appear_in_no_file_and_no_log_of_the_real_binary() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), SQLITE),
    );
    let gw = Process::spawn(
        &["--config", "keygate.yaml", "serve"],
        dir.path(),
        &[("KEYGATE_LOG", "keygate=debug")],
    );
    let (_, admin_addr) = gw.addresses();
    let (_, by_cli) = cli_create(dir.path(), &["--name", "by-cli", "--role", "admin"]);
    let by_api = rt.block_on(async {
        let (_, by_api) = made(admin_addr, json!({"name": "by-api", "role": "read"})).await;
        let live = eventually(LIVE, async || {
            call(admin_addr, &by_cli, "GET", "/v1/admin-tokens", None)
                .await
                .status
                == 200
        })
        .await;
        assert!(live);
        assert_eq!(
            call(admin_addr, &by_api, "GET", "/v1/usage", None)
                .await
                .status,
            200
        );
        let r = call(
            admin_addr,
            &by_cli,
            "DELETE",
            "/v1/admin-tokens/by-api",
            None,
        )
        .await;
        assert_eq!(r.status, 200);
        let r = call(admin_addr, &by_api, "GET", "/v1/usage", None).await;
        assert_eq!(r.status, 401);
        by_api
    });
    let mut gw = gw;
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    let log = gw.output.lock().unwrap().join("\n");
    assert!(log.contains("admin call refused"), "the debug log was read");
    for token in [&by_cli, &by_api] {
        assert!(
            !log.contains(token.as_str()),
            "a token in the process's log"
        );
    }
    assert_nowhere(dir.path(), &[&by_cli, &by_api]);
    let book = std::fs::read_to_string(dir.path().join("admin-tokens-used.json")).unwrap();
    assert!(book.contains(&keygate::keys::hex(&keygate::keys::format::hash(&by_cli))));
    let actions: Vec<Value> = audit_lines(dir.path())
        .iter()
        .map(|v| v["action"].clone())
        .collect();
    assert_eq!(
        actions,
        [
            json!("admin_token.created"),
            json!("admin_token.created"),
            json!("admin_token.revoked")
        ]
    );
}

/// Two nodes on one Redis store: a token made on one works on the other, and a revocation
/// on the other reaches the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_made_on_one_redis_node_works_on_the_other() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let store = format!(
        "store: {{kind: redis, url: \"{}\", prefix: kgtokens}}\n",
        redis.url()
    );
    let config = config_yaml(&route("/", up.addr, "production", ""), &store);
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let (_, token) = made(a.admin, json!({"name": "shared", "role": "read"})).await;
    assert_eq!(
        call(a.admin, &token, "GET", "/v1/api-keys", None)
            .await
            .status,
        200
    );
    let on_b = eventually(LIVE, async || {
        call(b.admin, &token, "GET", "/v1/api-keys", None)
            .await
            .status
            == 200
    })
    .await;
    assert!(on_b, "node b accepts node a's token");
    let r = call(
        b.admin,
        ADMIN_TOKEN,
        "DELETE",
        "/v1/admin-tokens/shared",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        call(b.admin, &token, "GET", "/v1/api-keys", None)
            .await
            .status,
        401
    );
    let off_a = eventually(LIVE, async || {
        call(a.admin, &token, "GET", "/v1/api-keys", None)
            .await
            .status
            == 401
    })
    .await;
    assert!(off_a, "node a refuses it once node b revoked it");
    a.stop().await;
    b.stop().await;
}
