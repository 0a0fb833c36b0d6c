//! Secret hygiene, end to end: the real binary, at the most verbose log level, goes through
//! the whole key lifecycle and every kind of refusal. Then everything it wrote or said is
//! searched for every secret made along the way, and for the admin token: its log, the audit
//! log, the usage file, the key store, `/metrics`, usage and audit answers, and every refusal
//! body. The one place a secret may appear is the answer that hands it out.

mod support;

use std::path::Path;
use std::time::Duration;

use support::process::{self, Process};
use support::*;

/// Every place `needle` was found, by name.
fn found_in<'a>(needle: &str, haystacks: &'a [(String, String)]) -> Vec<&'a str> {
    haystacks
        .iter()
        .filter(|(_, text)| text.contains(needle))
        .map(|(name, _)| name.as_str())
        .collect()
}

/// A copy of `sources` with `needle` written into the middle of source `at`, renamed so the
/// search's answer can name it alone.
fn plant(sources: &[(String, String)], at: usize, needle: &str) -> Vec<(String, String)> {
    let mut copy = sources.to_vec();
    let (name, text) = &mut copy[at];
    let mut middle = text.len() / 2;
    while !text.is_char_boundary(middle) {
        middle -= 1;
    }
    text.insert_str(middle, needle);
    name.push_str(" (with a planted secret)");
    copy
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_ever_logged_stored_or_echoed() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", ""),
            "x_api_key: true\nmetrics:\n  per_key: true\nusage:\n  flush_interval: 100ms\naudit:\n  auth_failures_per_minute: 1000\n",
        ),
    );
    let mut secrets: Vec<String> = vec![ADMIN_TOKEN.to_string()];
    let mut seen: Vec<(String, String)> = Vec::new();

    // The CLI: create, then the key's JSON; everything it printed besides the secret's own
    // answer is searched.
    let made = process::create_key_json(dir.path(), &["--name", "cli-key"]);
    let cli_secret = made["key"].as_str().unwrap().to_string();
    let cli_id = made["id"].as_str().unwrap().to_string();
    secrets.push(cli_secret.clone());
    let shown = process::keygate_ok(dir.path(), &["keys", "show", &cli_id]);
    seen.push(("keys show".into(), shown));
    let listed = process::keygate_ok(dir.path(), &["keys", "list", "--json"]);
    seen.push(("keys list".into(), listed));

    let gw = Process::spawn(
        &["--config", "keygate.yaml", "serve"],
        dir.path(),
        &[("KEYGATE_LOG", "trace")],
    );
    let (proxy, admin) = gw.addresses();
    let call = |method: &str, path: &str, body: Option<serde_json::Value>, token: &str| {
        let mut req = Req::get(admin, path).method(method).bearer(token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        send(req)
    };

    // The admin API: create, regenerate and rotate hand out secrets (those answers alone may
    // hold them); everything else is searched.
    let created = call(
        "POST",
        "/v1/api-keys",
        Some(serde_json::json!({"namespace": "acme", "environment": "production", "name": "api-key"})),
        ADMIN_TOKEN,
    )
    .await
    .json();
    let api_id = created["id"].as_str().unwrap().to_string();
    secrets.push(created["key"].as_str().unwrap().to_string());
    let regenerated = call(
        "POST",
        &format!("/v1/api-keys/{api_id}/regenerate"),
        None,
        ADMIN_TOKEN,
    )
    .await
    .json();
    secrets.push(regenerated["key"].as_str().unwrap().to_string());
    let rotated = call(
        "POST",
        &format!("/v1/api-keys/{cli_id}/rotate"),
        None,
        ADMIN_TOKEN,
    )
    .await
    .json();
    let new_secret = rotated["key"].as_str().unwrap().to_string();
    secrets.push(new_secret.clone());

    // Traffic: accepted (Bearer and X-API-Key), refused for every reason a secret could be
    // echoed in, and near-misses of real secrets.
    let live = [&cli_secret, &new_secret, &secrets[3]];
    for s in live {
        let r = send(Req::get(proxy, "/v1/ok").bearer(s)).await;
        assert_eq!(r.status, 200);
        seen.push((
            "proxy 200 answer".into(),
            String::from_utf8_lossy(&r.body).into(),
        ));
        let r = send(Req::get(proxy, "/v1/ok").header("x-api-key", s)).await;
        assert_eq!(r.status, 200);
        // The upstream never sees the key.
        let upstream_saw = format!("{:?}", up.last().headers);
        seen.push(("what the upstream received".into(), upstream_saw));
    }
    let revoked = &secrets[2]; // the API key's first secret, replaced by regenerate
    let typo = {
        let mut t = cli_secret.clone().into_bytes();
        let last = t.len() - 1;
        t[last] = if t[last] == b'a' { b'b' } else { b'a' };
        String::from_utf8(t).unwrap()
    };
    for (what, key) in [
        ("old secret", revoked.as_str()),
        ("typo", typo.as_str()),
        ("admin token on the proxy", ADMIN_TOKEN),
        ("garbage", "not-a-key"),
    ] {
        let r = send(Req::get(proxy, "/v1/x").bearer(key)).await;
        assert_eq!(r.status, 401, "{what}");
        seen.push((
            format!("proxy refusal ({what})"),
            format!("{:?} {}", r.headers, String::from_utf8_lossy(&r.body)),
        ));
    }
    // Wrong admin tokens, including a real API key.
    for token in [cli_secret.as_str(), "kg_admin_wrong"] {
        let r = call("GET", "/v1/api-keys", None, token).await;
        assert_eq!(r.status, 401);
        seen.push((
            "admin refusal".into(),
            String::from_utf8_lossy(&r.body).into(),
        ));
    }
    // Bad bodies, whose errors quote what they were given.
    let r = call(
        "POST",
        "/v1/api-keys",
        Some(serde_json::json!({"namespace": "acme", "environment": "production", "key": cli_secret})),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(r.status, 400);
    seen.push((
        "admin 400 (unknown field)".into(),
        String::from_utf8_lossy(&r.body).into(),
    ));

    // Everything the gateway shows about itself, once a usage flush has written the traffic
    // above (every 100 ms) to the usage file.
    let usage_file = dir.path().join("usage.json");
    let flushed = eventually(Duration::from_secs(10), async || {
        read(&usage_file).contains(&cli_id)
            || read(&dir.path().join("usage.changes.jsonl")).contains(&cli_id)
    })
    .await;
    assert!(flushed, "the usage file holds the CLI key's traffic");
    for path in [
        "/metrics".to_string(),
        "/v1/usage".into(),
        "/v1/audit?limit=1000".into(),
        "/v1/api-keys?status=all".into(),
        format!("/v1/api-keys/{cli_id}"),
        format!("/v1/api-keys/{cli_id}/usage"),
        "/v1/namespaces".into(),
    ] {
        let r = call("GET", &path, None, ADMIN_TOKEN).await;
        assert_eq!(r.status, 200, "{path}");
        seen.push((
            format!("GET {path}"),
            String::from_utf8_lossy(&r.body).into(),
        ));
    }
    gw.signal("TERM");
    let mut gw = gw;
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    seen.push((
        "the gateway's log (trace level)".into(),
        gw.output.lock().unwrap().join("\n"),
    ));
    for file in [
        "audit.log",
        "usage.json",
        "usage.changes.jsonl",
        "usage.requests.jsonl",
        "keys.yaml",
        "keygate.yaml",
    ] {
        seen.push((file.into(), read(&dir.path().join(file))));
    }
    assert!(seen
        .iter()
        .any(|(n, t)| n == "audit.log" && t.contains("auth.failed")));
    assert!(seen
        .iter()
        .any(|(n, t)| n.starts_with("the gateway") && t.lines().count() > 20));

    // A check on the search itself: each secret, planted in the middle of a copy of one of
    // the real sources (a different one for each), is found there and nowhere else; and its
    // last 20 characters alone, planted in another, are found by the search for pieces.
    for (i, secret) in secrets.iter().enumerate() {
        let piece = &secret[secret.len() - 20..];
        let whole_in = (i * 5) % seen.len();
        let piece_in = (i * 5 + 3) % seen.len();
        let planted = plant(&seen, whole_in, secret);
        let name = planted[whole_in].0.clone();
        assert_eq!(found_in(secret, &planted), [name.as_str()]);
        assert_eq!(found_in(piece, &planted), [name.as_str()]);
        let planted = plant(&seen, piece_in, piece);
        let name = planted[piece_in].0.clone();
        assert!(found_in(secret, &planted).is_empty());
        assert_eq!(found_in(piece, &planted), [name.as_str()]);
    }

    let bytes: usize = seen.iter().map(|(_, t)| t.len()).sum();
    let log_lines = gw.output.lock().unwrap().len();
    for secret in &secrets {
        let leaks = found_in(secret, &seen);
        assert!(leaks.is_empty(), "a secret appears in: {leaks:?}");
        // Nor any long piece of it (a prefix cut short would still be a leak).
        let body = &secret[secret.len() - 20..];
        let leaks = found_in(body, &seen);
        assert!(leaks.is_empty(), "part of a secret appears in: {leaks:?}");
    }
    eprintln!(
        "searched {} sources ({bytes} bytes, {log_lines} log lines at trace level) for {} secrets: none found",
        seen.len(),
        secrets.len()
    );
}
