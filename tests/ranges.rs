//! Every number a user can give has a documented range. The real gateway is sent every
//! out-of-range value of every numeric field, through the admin API and through the CLI,
//! and answers 400 naming the field (or exits 1 naming the flag) each time, and keeps
//! serving; the config's numbers are refused by `keygate check` with their place. A store
//! record that cannot build is named, and never aborts anything.

mod support;

use support::process::{create_key_json, keygate_ok, run, Process};
use support::*;

/// A key create or patch body that holds one out-of-range value, and the field to blame.
const BAD_BODIES: &[(&str, &str)] = &[
    ("rate_limit", r#""rate_limit": "0/s""#),
    ("rate_limit", r#""rate_limit": "1000001/s""#),
    ("rate_limit", r#""rate_limit": "2000000000/s""#),
    ("rate_limit", r#""rate_limit": "4294967296/s""#),
    ("rate_limit", r#""rate_limit": "-1/s""#),
    ("rate_limit", r#""rate_limit": "10/day""#),
    ("burst", r#""rate_limit": "10/s", "burst": 0"#),
    ("burst", r#""rate_limit": "10/s", "burst": 1000001"#),
    ("burst", r#""rate_limit": "10/s", "burst": 4294967296"#),
    ("burst", r#""rate_limit": "10/s", "burst": -1"#),
    ("burst", r#""rate_limit": "10/s", "burst": 1.5"#),
    ("burst", r#""rate_limit": "10/s", "burst": 1e300"#),
    ("quota", r#""quota": "0/day""#),
    ("quota", r#""quota": "1000000000001/day""#),
    ("quota", r#""quota": "18446744073709551616/month""#),
    ("expires_at", r#""expires_at": "3000000d""#),
    ("expires_at", r#""expires_at": "99999999999d""#),
    ("expires_at", r#""expires_at": "18446744073709551615s""#),
    ("expires_at", r#""expires_at": "10000-01-01T00:00:00Z""#),
    ("expires_at", r#""expires_at": "1969-12-31T23:59:59Z""#),
    ("expires_at", r#""expires_at": "-5d""#),
];

/// A CLI flag with one out-of-range value, for `keys create` and `keys update`.
const BAD_FLAGS: &[(&str, &str)] = &[
    ("--rate-limit", "0/s"),
    ("--rate-limit", "1000001/s"),
    ("--rate-limit", "4294967295/s"),
    ("--burst", "0"),
    ("--burst", "1000001"),
    ("--burst", "4294967296"),
    ("--burst", "-1"),
    ("--quota", "0/day"),
    ("--quota", "1000000000001/month"),
    ("--expires", "3000000d"),
    ("--expires", "99999999999d"),
    ("--expires", "10000-01-01T00:00:00Z"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_out_of_range_value_is_refused_by_the_api_and_the_cli_and_the_gateway_serves_on() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), ""),
    );
    let made = create_key_json(dir.path(), &["--rate-limit", "100/s"]);
    let (id, secret) = (made["id"].as_str().unwrap(), made["key"].as_str().unwrap());
    support::ledger::secret(secret);
    let mut gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
    let (proxy, admin) = gw.addresses();
    let store_before = std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap();
    let call = |method: &'static str, path: String, body: String| {
        send(
            Req::post(admin, &path)
                .method(method)
                .bearer(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(body),
        )
    };
    let mut refused = 0;
    for (field, member) in BAD_BODIES {
        for (method, path, body) in [
            (
                "POST",
                "/v1/api-keys".to_string(),
                format!(r#"{{"namespace": "acme", "environment": "production", {member}}}"#),
            ),
            (
                "PATCH",
                format!("/v1/api-keys/{id}"),
                format!("{{{member}}}"),
            ),
        ] {
            let r = call(method, path.clone(), body.clone()).await;
            assert_eq!(r.status, 400, "{method} {path} {body}: {:?}", r.body);
            assert_eq!(r.json()["field"], *field, "{method} {body}: {}", r.json());
            refused += 1;
        }
    }
    for grace in ["-1", "315360001", "18446744073709551616", "1.5", "\"1d\""] {
        let r = call(
            "POST",
            format!("/v1/api-keys/{id}/rotate"),
            format!(r#"{{"grace_seconds": {grace}}}"#),
        )
        .await;
        assert_eq!(r.status, 400, "grace {grace}: {:?}", r.body);
        assert_eq!(r.json()["field"], "grace_seconds", "grace {grace}");
        refused += 1;
    }
    for (path, field) in [
        ("/v1/api-keys?limit=0", "limit"),
        ("/v1/api-keys?limit=1001", "limit"),
        ("/v1/api-keys?limit=99999999999999999999999", "limit"),
        ("/v1/audit?limit=0", "limit"),
        ("/v1/usage?top=0", "top"),
        ("/v1/usage?top=101", "top"),
    ] {
        let r = send(Req::get(admin, path).bearer(ADMIN_TOKEN)).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some(field)),
            "{path}"
        );
        refused += 1;
    }
    for (flag, value) in BAD_FLAGS {
        let mut create = vec![
            "--config",
            "keygate.yaml",
            "keys",
            "create",
            "--namespace",
            "acme",
            "--environment",
            "production",
        ];
        let mut update = vec!["--config", "keygate.yaml", "keys", "update", id];
        if *flag == "--burst" {
            create.extend(["--rate-limit", "10/s"]);
            update.extend(["--rate-limit", "10/s"]);
        }
        for mut args in [create, update] {
            args.extend([*flag, value]);
            let (code, _, err) = run(&args, dir.path());
            assert_eq!(code, 1, "{args:?}");
            // One line says what is wrong; a usage mistake adds a pointer to --help.
            let first = err.lines().next().unwrap_or_default();
            assert!(err.lines().count() <= 2, "{err}");
            assert!(
                first.contains(flag.trim_start_matches('-')),
                "{args:?} names the flag: {err}"
            );
            refused += 1;
        }
    }
    for grace in ["3651d", "99999999999d", "soon"] {
        let (code, _, err) = run(
            &[
                "--config",
                "keygate.yaml",
                "keys",
                "rotate",
                id,
                "--grace",
                grace,
            ],
            dir.path(),
        );
        assert_eq!(code, 1, "--grace {grace}");
        assert!(err.contains("--grace") && err.lines().count() == 1, "{err}");
        refused += 1;
    }
    eprintln!("{refused} out-of-range values refused, each naming its field or flag");

    // Nothing was written, nothing aborted, and the key in force still works.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap(),
        store_before
    );
    assert!(gw.child.try_wait().unwrap().is_none(), "the gateway runs");
    let r = send(Req::get(proxy, "/v1/x").bearer(secret)).await;
    assert_eq!(r.status, 200);
    keygate_ok(dir.path(), &["check"]);
}

/// Config numbers out of range: `keygate check` exits 1 and names each, with its place.
#[test]
fn out_of_range_config_numbers_are_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ("limits.max_connections", "limits:\n  max_connections: 0\n"),
        (
            "limits.max_connections",
            "limits:\n  max_connections: 18446744073709551615\n",
        ),
        ("limits.max_headers", "limits:\n  max_headers: 0\n"),
        (
            "limits.h2_max_concurrent_streams",
            "limits:\n  h2_max_concurrent_streams: 0\n",
        ),
        (
            "limits.header_read_timeout",
            "limits:\n  header_read_timeout: 99999999999d\n",
        ),
        ("limits.idle_timeout", "limits:\n  idle_timeout: 0s\n"),
        (
            "limits.drain_timeout",
            "limits:\n  drain_timeout: 99999999999d\n",
        ),
        (
            "limits.tunnel_idle_timeout",
            "limits:\n  tunnel_idle_timeout: 30d\n",
        ),
        (
            "limits.max_header_size",
            "limits:\n  max_header_size: 1KiB\n",
        ),
        (
            "limits.max_request_body",
            "limits:\n  max_request_body: 2000GiB\n",
        ),
        ("workers", "workers: 100000\n"),
        (
            "usage.flush_interval",
            "usage:\n  flush_interval: 99999999999d\n",
        ),
        (
            "rotation.default_grace",
            "rotation:\n  default_grace: 99999d\n",
        ),
        ("rotation.quiet_period", "rotation:\n  quiet_period: 0s\n"),
        ("lockout.max_failures", "lockout:\n  max_failures: 0\n"),
        ("lockout.cooldown", "lockout:\n  cooldown: 99999999999d\n"),
        ("rate_limit.nodes", "rate_limit:\n  nodes: 0\n"),
        (
            "upstream.connect_timeout",
            "upstream:\n  connect_timeout: 99999999999d\n",
        ),
        (
            "upstream.pool_max_idle_per_host",
            "upstream:\n  pool_max_idle_per_host: 1000000\n",
        ),
        (
            "audit.auth_failures_per_minute",
            "audit:\n  auth_failures_per_minute: 4000000000\n",
        ),
        (
            "alerts.webhook.retries",
            "alerts:\n  webhook: {url: \"http://127.0.0.1:9/\", retries: 11}\n",
        ),
        (
            "alerts.webhook.timeout",
            "alerts:\n  webhook: {url: \"http://127.0.0.1:9/\", timeout: 1h}\n",
        ),
        (
            "secret_scanning.github.public_keys_url",
            "secret_scanning:\n  github: {public_keys_url: \"ftp://keys\"}\n",
        ),
        (
            "secret_scanning.github.action",
            "secret_scanning:\n  github: {public_keys_url: \"http://127.0.0.1:9/k\", action: delete}\n",
        ),
        (
            "secret_scanning.github.path",
            "secret_scanning:\n  github: {public_keys_url: \"http://127.0.0.1:9/k\", path: \"no-slash\"}\n",
        ),
    ];
    for (path, yaml) in bad {
        let config = format!(
            "listen: {{proxy: 127.0.0.1:0, admin: 127.0.0.1:0}}\nroutes:\n  - {{path_prefix: /, upstream: \"http://127.0.0.1:9\", environment: production}}\n{yaml}"
        );
        write(&dir.path().join("keygate.yaml"), &config);
        let (code, _, err) = run(&["--config", "keygate.yaml", "check"], dir.path());
        assert_eq!(code, 1, "{yaml}");
        let line = err
            .lines()
            .find(|l| l.contains(path))
            .unwrap_or_else(|| panic!("{path} is named: {err}"));
        assert!(line.starts_with("keygate.yaml:"), "located: {line}");
        // serve refuses the same config with the same words, and never aborts.
        let (code, _, serve_err) = run(&["--config", "keygate.yaml", "serve"], dir.path());
        assert_eq!(code, 1, "serve refuses {yaml}: {serve_err}");
        assert!(serve_err.contains(path), "{serve_err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_build_is_named_and_never_aborts() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), ""),
    );
    let made = create_key_json(dir.path(), &[]);
    let secret = made["key"].as_str().unwrap().to_string();
    support::ledger::secret(&secret);
    let store = dir.path().join("keys.yaml");
    let good = std::fs::read_to_string(&store).unwrap();
    // A record as a hand edit or an older keygate could leave it: a rate that once aborted
    // the snapshot build.
    let bad_record = "- {id: deadbeef, hash: \"sha256:0000000000000000000000000000000000000000000000000000000000000000\", prefix: kg_live, namespace: acme, environment: production, rate_limit: 2000000000/s, status: active, created_at: \"2026-01-01T00:00:00Z\"}\n";
    let bad = format!("{good}{bad_record}");

    // A running gateway keeps its snapshot, and says why on /v1/reload and in its log.
    let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
    let (proxy, admin) = gw.addresses();
    write(&store, &bad);
    let r = send(Req::post(admin, "/v1/reload").bearer(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 422);
    let errors = r.json()["errors"].clone();
    let first = &errors[0];
    assert_eq!(first["path"], "keys[1].rate_limit", "{errors}");
    assert!(
        first["message"].as_str().unwrap().contains("deadbeef"),
        "{errors}"
    );
    assert!(first["line"].as_u64().unwrap() > 0, "located: {errors}");
    assert_eq!(
        send(Req::get(proxy, "/v1/x").bearer(&secret)).await.status,
        200
    );
    gw.wait_for_line("reload refused", std::time::Duration::from_secs(10));
    let log = gw.output.lock().unwrap().join("\n");
    assert!(log.contains("keys[1].rate_limit"), "{log}");
    drop(gw);

    // check names it; serve refuses to start with the same words, exit 1, no abort.
    let (code, _, err) = run(&["--config", "keygate.yaml", "check"], dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("keys.yaml:")
            && err.contains("keys[1].rate_limit")
            && err.contains("deadbeef"),
        "{err}"
    );
    let (code, _, err) = run(&["--config", "keygate.yaml", "serve"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("keys[1].rate_limit") && err.contains("deadbeef"),
        "{err}"
    );
    // Nor do the key commands abort on it: they say what to fix.
    let (code, _, err) = run(&["--config", "keygate.yaml", "keys", "list"], dir.path());
    assert!(code == 0 || code == 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
