//! Leaked keys, shut off in seconds (README, "Leaked keys"). A test "GitHub" (a P-256 key
//! pair made here, its public-keys document served on loopback) signs reports and posts them
//! to the real binary; the report route and `keygate keys leaked` take the same path. What
//! does not verify, or is not a report, changes nothing.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::process::{self, Process};
use support::*;

/// A test GitHub: the key it signs with, and the server publishing its public half as
/// GitHub's `/meta/public_keys/secret_scanning` does.
struct TestGithub {
    pair: ring::signature::EcdsaKeyPair,
    id: String,
    keys: Recorder,
}

const KEY_ID: &str = "bcb53661c06b4728e59d897fb6165d5c9cda0fd9cdf9d09ead458168deb7518c";
const PATH: &str = "/.well-known/keygate/secret-scanning/github";
const FOUND_AT: &str = "https://github.com/acme/app/blob/0a1b2c/.env";

impl TestGithub {
    async fn start() -> TestGithub {
        // rcgen writes the SubjectPublicKeyInfo PEM as any issuer would; ring signs.
        let made = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &made.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let document = json!({"public_keys": [
            {"key_identifier": "0f0e0d0c", "key": "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n", "is_current": false},
            {"key_identifier": KEY_ID, "key": made.public_key_pem(), "is_current": true},
        ]});
        TestGithub {
            pair,
            id: KEY_ID.into(),
            keys: Recorder::start(200, &document.to_string()).await,
        }
    }

    fn config(&self, action: &str) -> String {
        format!(
            "secret_scanning:\n  github: {{public_keys_url: \"http://{}/meta/public_keys/secret_scanning\", action: {action}}}\n",
            self.keys.addr
        )
    }

    /// GitHub's signature header for `body`: base64 of an ASN.1 DER ECDSA signature.
    fn sign(&self, body: &[u8]) -> String {
        let signature = self
            .pair
            .sign(&ring::rand::SystemRandom::new(), body)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(signature.as_ref())
    }
}

/// GitHub's report of `tokens`, all found at [`FOUND_AT`].
fn report_of(tokens: &[&str]) -> Vec<u8> {
    let found: Vec<Value> = tokens
        .iter()
        .map(|t| json!({"token": t, "type": "keygate_api_key", "url": FOUND_AT, "source": "content"}))
        .collect();
    serde_json::to_vec(&found).unwrap()
}

async fn post_report(
    proxy: std::net::SocketAddr,
    body: &[u8],
    id: &str,
    signature: &str,
) -> Answer {
    send(
        Req::post(proxy, PATH)
            .header("content-type", "application/json")
            .header("Github-Public-Key-Identifier", id)
            .header("Github-Public-Key-Signature", signature)
            .body(body.to_vec()),
    )
    .await
}

fn sha256_hex(token: &str) -> String {
    keygate::keys::hex(&keygate::keys::format::hash(token))
}

/// Tokens that are no key of ours: a made-up key that fails the checksum, a well-formed key
/// keygate never issued, another vendor's token.
fn strangers() -> [String; 3] {
    [
        format!("kg_live_{}", "A".repeat(33)),
        keygate::keys::format::generate("kg_live").unwrap(),
        format!("ghp_{}", "x1".repeat(18)),
    ]
}

fn audit_lines(dir: &Path, action: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["action"] == action)
        .collect()
}

/// The real binary under each action: the keys GitHub found are revoked, disabled or only
/// reported, and refused (or not) from the very next request; every token is labelled by
/// its SHA-256; the audit log and the webhook hear of each key found, never of its token.
/// Then the time from the POST to the key's first refusal, over 15 reports.
#[test]
fn signed_reports_shut_known_keys_off_as_configured() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (action, refusal) in [
        ("revoke", Some("revoked_key")),
        ("disable", Some("inactive_key")),
        ("report", None),
    ] {
        let (gh, hook, up) = rt.block_on(async {
            (
                TestGithub::start().await,
                Recorder::start(200, "").await,
                Upstream::start().await,
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let extra = format!(
            "{}alerts:\n  webhook: {{url: \"http://{}/hook\", retries: 0}}\n",
            gh.config(action),
            hook.addr
        );
        write(
            &dir.path().join("keygate.yaml"),
            &config_yaml(&route("/", up.addr, "production", ""), &extra),
        );
        let made: Vec<Value> = (0..3)
            .map(|_| process::create_key_json(dir.path(), &[]))
            .collect();
        let key = |i: usize| made[i]["key"].as_str().unwrap().to_string();
        let id = |i: usize| made[i]["id"].as_str().unwrap().to_string();
        let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
        let (proxy, admin_addr) = gw.addresses();
        rt.block_on(async {
            for i in 0..3 {
                assert_eq!(
                    send(Req::get(proxy, "/v1/x").bearer(&key(i))).await.status,
                    200
                );
            }
            let [made_up, unknown, foreign] = strangers();
            let (a, b) = (key(0), key(1));
            let tokens = [a.as_str(), &made_up, b.as_str(), &unknown, &foreign];
            let body = report_of(&tokens);
            let r = post_report(proxy, &body, &gh.id, &gh.sign(&body)).await;
            assert_eq!(r.status, 200, "{action}: {:?}", r.json());
            assert_eq!(r.header("content-type"), "application/json");
            let labels = r.json();
            let labels = labels.as_array().unwrap();
            assert_eq!(labels.len(), tokens.len());
            for (token, label) in tokens.iter().zip(labels) {
                let ours = *token == a || *token == b;
                assert_eq!(
                    label,
                    &json!({
                        "token_hash": sha256_hex(token),
                        "token_type": "keygate_api_key",
                        "label": if ours { "true_positive" } else { "false_positive" },
                    }),
                    "{action}"
                );
            }
            for i in [0, 1] {
                let next = send(Req::get(proxy, "/v1/x").bearer(&key(i))).await;
                match refusal {
                    Some(code) => {
                        assert_eq!((next.status.as_u16(), next.code()), (401, code.to_string()))
                    }
                    None => assert_eq!(next.status, 200, "report only marks the key"),
                }
                let shown = send(
                    Req::get(admin_addr, &format!("/v1/api-keys/{}", id(i))).bearer(ADMIN_TOKEN),
                )
                .await
                .json();
                assert_eq!(shown["leak_url"], FOUND_AT);
                assert!(shown["leaked_at"].is_string(), "{shown}");
            }
            let untouched = send(Req::get(proxy, "/v1/x").bearer(&key(2))).await;
            assert_eq!(untouched.status, 200, "a key not reported keeps working");

            let written = async || audit_lines(dir.path(), "key.leaked").len() >= 2;
            assert!(eventually(Duration::from_secs(5), written).await);
            let audited = audit_lines(dir.path(), "key.leaked");
            assert_eq!(audited.len(), 2, "{action}: {audited:?}");
            for line in &audited {
                assert_eq!(line["actor"], "github");
                let text = line.to_string();
                assert!(text.contains(FOUND_AT) && text.contains(action), "{text}");
            }
            let alerted = eventually(Duration::from_secs(5), async || hook.count() >= 2).await;
            assert!(alerted, "{action}: the webhook heard {}", hook.count());
            let mut alerts = hook.json_bodies();
            alerts.sort_by_key(|a| a["key_id"].as_str().map(str::to_string));
            let mut ids = vec![id(0), id(1)];
            ids.sort();
            for (alert, id) in alerts.iter().zip(&ids) {
                assert_eq!(
                    (
                        &alert["event"],
                        &alert["key_id"],
                        &alert["namespace"],
                        &alert["url"],
                        &alert["action"]
                    ),
                    (
                        &json!("key.leaked"),
                        &json!(id),
                        &json!("acme"),
                        &json!(FOUND_AT),
                        &json!(action)
                    ),
                );
            }
            let told = std::fs::read_to_string(dir.path().join("audit.log")).unwrap()
                + &alerts.iter().map(Value::to_string).collect::<String>()
                + &gw.output.lock().unwrap().join("\n");
            for token in tokens {
                assert!(!told.contains(token), "a reported token was written down");
            }
            if action == "revoke" {
                time_to_refusal(proxy, admin_addr, &gh).await;
            }
        });
        drop(gw);
    }
}

/// Reports 15 fresh keys one at a time and times each from the POST to its first refused
/// request (README, "Leaked keys"). The change is live before the answer, so the first
/// request after it is refused; the figure is the whole round trip.
async fn time_to_refusal(
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    gh: &TestGithub,
) {
    let mut took = Vec::new();
    for _ in 0..15 {
        let made = send(
            Req::post(admin, "/v1/api-keys")
                .bearer(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(json!({"namespace": "acme", "environment": "production"}).to_string()),
        )
        .await
        .json();
        let key = made["key"].as_str().unwrap().to_string();
        assert_eq!(
            send(Req::get(proxy, "/v1/x").bearer(&key)).await.status,
            200
        );
        let body = report_of(&[&key]);
        let signature = gh.sign(&body);
        let started = Instant::now();
        assert_eq!(
            post_report(proxy, &body, &gh.id, &signature).await.status,
            200
        );
        let next = send(Req::get(proxy, "/v1/x").bearer(&key)).await;
        took.push(started.elapsed());
        assert_eq!(
            next.code(),
            "revoked_key",
            "refused from the first request after"
        );
    }
    took.sort();
    eprintln!(
        "leaks: POST to first refusal over {} reports: median {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
}

/// What a report would change: the key store, and the audit log's lines (but reloads', which
/// the file watch may add at any time).
fn state(gw: &TestGateway) -> (Vec<u8>, Vec<String>) {
    let audit = std::fs::read_to_string(gw.dir.path().join("audit.log")).unwrap_or_default();
    (
        std::fs::read(gw.keys_path()).unwrap(),
        audit
            .lines()
            .filter(|l| !l.contains("\"config.reloaded\""))
            .map(str::to_string)
            .collect(),
    )
}

/// A bad signature, a missing one, a changed byte, an unknown key identifier whose refresh
/// fails, an oversized body and a body that is not GitHub's JSON: each is refused and changes
/// nothing. The public keys are fetched again for an unknown identifier at most once a
/// minute, and a failed fetch keeps the keys already known.
#[tokio::test]
async fn reports_that_do_not_verify_change_nothing() {
    let up = Upstream::start().await;
    let gh = TestGithub::start().await;
    let gw = TestGateway::start(&config_yaml(
        &route("/", up.addr, "production", ""),
        &gh.config("revoke"),
    ))
    .await;
    let (_, key) = gw.create_key(new_key("acme", "production")).await;
    let body = report_of(&[&key]);
    let signature = gh.sign(&body);
    let before = state(&gw);

    let mut changed = body.clone();
    let at = changed.len() - 5;
    changed[at] ^= 0x01;
    let oversized = {
        let mut big = b"[".to_vec();
        big.resize((1 << 20) + 1, b' ');
        big
    };
    let not_json = b"token=kg_live_x".to_vec();
    let not_a_report = br#"{"token": "x"}"#.to_vec();
    // What is sent (body, signature) and the refusal it gets, with `gh.id` as identifier.
    let cases = [
        (
            "another body's signature",
            &body,
            gh.sign(b"[]"),
            (401, "invalid_signature"),
        ),
        (
            "a signature that is not base64",
            &body,
            "%%%".into(),
            (401, "invalid_signature"),
        ),
        (
            "no signature",
            &body,
            String::new(),
            (401, "invalid_signature"),
        ),
        (
            "a changed byte",
            &changed,
            signature.clone(),
            (401, "invalid_signature"),
        ),
        (
            "over 1 MiB",
            &oversized,
            gh.sign(&oversized),
            (413, "body_too_large"),
        ),
        (
            "not JSON",
            &not_json,
            gh.sign(&not_json),
            (400, "invalid_request"),
        ),
        (
            "not GitHub's array",
            &not_a_report,
            gh.sign(&not_a_report),
            (400, "invalid_request"),
        ),
    ];
    for (what, body, signature, (status, code)) in cases {
        let r = if signature.is_empty() {
            send(
                Req::post(gw.proxy, PATH)
                    .header("Github-Public-Key-Identifier", &gh.id)
                    .body(body.clone()),
            )
            .await
        } else {
            post_report(gw.proxy, body, &gh.id, &signature).await
        };
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (status, code.to_string()),
            "{what}"
        );
        assert_eq!(state(&gw), before, "{what} changed something");
        let still = send(Req::get(gw.proxy, "/v1/x").bearer(&key)).await;
        assert_eq!(still.status, 200, "{what}");
    }
    assert_eq!(
        gh.keys.count(),
        1,
        "the keys were fetched once, for the first report"
    );

    // An identifier GitHub does not publish: within the minute, no fetch; after it, one
    // fetch, which fails here; the known key stays known.
    let unknown = post_report(gw.proxy, &body, "feedface", &signature).await;
    assert_eq!((unknown.status.as_u16(), gh.keys.count()), (401, 1));
    gw.clock.advance(Duration::from_secs(61));
    gh.keys.answer(503, "down");
    let unknown = post_report(gw.proxy, &body, "feedface", &signature).await;
    assert_eq!(unknown.code(), "invalid_signature");
    assert_eq!(
        gh.keys.count(),
        2,
        "an unknown identifier fetches the keys again"
    );
    let again = post_report(gw.proxy, &body, "deadbeef", &signature).await;
    assert_eq!(
        (again.status.as_u16(), gh.keys.count()),
        (401, 2),
        "at most once a minute"
    );
    assert_eq!(state(&gw), before);
    let get = send(Req::get(gw.proxy, PATH)).await;
    assert_eq!(get.status, 405);

    let r = post_report(gw.proxy, &body, &gh.id, &signature).await;
    assert_eq!(
        r.json()[0]["label"],
        "true_positive",
        "the report as signed still counts"
    );
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&key)).await.code(),
        "revoked_key"
    );
    gw.stop().await;
}

/// `POST /v1/api-keys/leaked`: the same action, audit and alert path for any scanner.
#[tokio::test]
async fn the_report_route_shuts_keys_off_and_refuses_bad_reports() {
    let up = Upstream::start().await;
    let hook = Recorder::start(200, "").await;
    let gw = TestGateway::start(&config_yaml(
        &route("/", up.addr, "production", ""),
        &format!(
            "alerts:\n  webhook: {{url: \"http://{}/hook\", retries: 0}}\n",
            hook.addr
        ),
    ))
    .await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(gw.create_key(new_key("acme", "production")).await);
    }
    let [made_up, _, _] = strangers();
    let source = "gitleaks in CI, job 42";
    for (body, field) in [
        (json!({"keys": []}), "keys"),
        (json!({"keys": "kg_live_x"}), "keys"),
        (json!({"keys": ["x".repeat(129)]}), "keys"),
        (json!({"keys": [keys[0].1], "action": "delete"}), "action"),
        (
            json!({"keys": [keys[0].1], "source": "line\nbreak"}),
            "source",
        ),
        (json!({"keys": [keys[0].1], "token": "x"}), "token"),
    ] {
        let r = admin(&gw, "POST", "/v1/api-keys/leaked", Some(body.clone())).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some(field)),
            "{body}: {:?}",
            r.json()
        );
    }
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&keys[0].1))
            .await
            .status,
        200
    );
    assert!(audit_lines(gw.dir.path(), "key.leaked").is_empty());

    let r = admin(
        &gw,
        "POST",
        "/v1/api-keys/leaked",
        Some(
            json!({"keys": [keys[0].1, made_up, keys[1].1], "action": "disable", "source": source}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let answer = r.json();
    let labels: Vec<(&str, Option<&str>, Option<&str>)> = answer["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["label"].as_str().unwrap(),
                k["key_id"].as_str(),
                k["action"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        labels,
        [
            (
                "true_positive",
                Some(keys[0].0.id.as_str()),
                Some("disable")
            ),
            ("false_positive", None, None),
            (
                "true_positive",
                Some(keys[1].0.id.as_str()),
                Some("disable")
            ),
        ]
    );
    assert_eq!(answer["keys"][1]["token_hash"], sha256_hex(&made_up));
    for (record, key) in &keys[..2] {
        assert_eq!(
            send(Req::get(gw.proxy, "/v1/x").bearer(key)).await.code(),
            "inactive_key"
        );
        let shown = admin(&gw, "GET", &format!("/v1/api-keys/{}", record.id), None)
            .await
            .json();
        assert_eq!(
            (shown["status"].as_str(), shown["leak_url"].as_str()),
            (Some("inactive"), Some(source))
        );
    }
    // The default action revokes.
    let r = admin(
        &gw,
        "POST",
        "/v1/api-keys/leaked",
        Some(json!({"keys": [keys[2].1]})),
    )
    .await;
    assert_eq!(r.json()["keys"][0]["action"], "revoke");
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&keys[2].1))
            .await
            .code(),
        "revoked_key"
    );

    let written = async || audit_lines(gw.dir.path(), "key.leaked").len() >= 3;
    assert!(eventually(Duration::from_secs(5), written).await);
    let audited = audit_lines(gw.dir.path(), "key.leaked");
    assert_eq!(audited.len(), 3);
    assert_eq!(audited[0]["actor"], "tests");
    assert!(eventually(Duration::from_secs(5), async || hook.count() >= 3).await);
    let told = std::fs::read_to_string(gw.dir.path().join("audit.log")).unwrap()
        + &hook
            .json_bodies()
            .iter()
            .map(Value::to_string)
            .collect::<String>();
    for (_, key) in &keys {
        assert!(!told.contains(key.as_str()), "a token was written down");
    }
    gw.stop().await;
}

/// `keygate keys leaked FILE` reads a plain list, gitleaks' JSON report and TruffleHog's JSON
/// lines, takes the action asked for, audits each key found and calls the webhook.
#[test]
fn the_cli_reads_plain_lists_gitleaks_and_trufflehog() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hook = rt.block_on(Recorder::start(200, ""));
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", "127.0.0.1:9".parse().unwrap(), "production", ""),
            &format!(
                "alerts:\n  webhook: {{url: \"http://{}/hook\", retries: 0}}\n",
                hook.addr
            ),
        ),
    );
    let made: Vec<Value> = (0..4)
        .map(|_| process::create_key_json(dir.path(), &[]))
        .collect();
    let key = |i: usize| made[i]["key"].as_str().unwrap().to_string();
    let id = |i: usize| made[i]["id"].as_str().unwrap().to_string();
    // The scanners' reports live outside the gateway's folder: they hold the secrets.
    let reports = tempfile::tempdir().unwrap();
    let file = |name: &str, text: String| {
        let path = reports.path().join(name);
        write(&path, &text);
        path.display().to_string()
    };
    let plain = file(
        "plain.txt",
        format!("# pasted in a chat\n{}\nnot-a-key\n\n", key(0)),
    );
    let gitleaks = file(
        "gitleaks.json",
        json!([{"RuleID": "keygate-api-key", "Secret": key(1), "Match": format!("KEY={}", key(1)), "File": "app/.env", "StartLine": 3}]).to_string(),
    );
    let trufflehog = file(
        "trufflehog.jsonl",
        format!(
            "{}\n",
            json!({"SourceMetadata": {"Data": {"Git": {"file": "a.env"}}}, "DetectorName": "Keygate", "Raw": key(2), "Verified": false})
        ),
    );

    let out = process::keygate_ok(
        dir.path(),
        &[
            "keys",
            "leaked",
            &plain,
            "--source",
            "https://paste.example/abc",
        ],
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("true_positive   key {} (acme): revoke", id(0)),
            format!("false_positive  sha256:{}", sha256_hex("not-a-key")),
        ]
    );
    let out = process::keygate_ok(
        dir.path(),
        &["keys", "leaked", &gitleaks, "--action", "disable", "--json"],
    );
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["keys"][0]["key_id"], json!(id(1)));
    assert_eq!(answer["keys"][0]["token_hash"], json!(sha256_hex(&key(1))));
    process::keygate_ok(
        dir.path(),
        &["keys", "leaked", &trufflehog, "--action", "report"],
    );

    for (i, status, url) in [
        (0, "revoked", Some("https://paste.example/abc")),
        (1, "inactive", None),
        (2, "active", None),
    ] {
        let shown: Value = serde_json::from_str(&process::keygate_ok(
            dir.path(),
            &["keys", "show", &id(i), "--json"],
        ))
        .unwrap();
        assert_eq!(shown["status"], status, "key {i}");
        assert!(shown["leaked_at"].is_string(), "key {i}: {shown}");
        assert_eq!(shown["leak_url"].as_str(), url, "key {i}");
    }
    let untouched: Value = serde_json::from_str(&process::keygate_ok(
        dir.path(),
        &["keys", "show", &id(3), "--json"],
    ))
    .unwrap();
    assert_eq!(
        (untouched["status"].as_str(), untouched.get("leaked_at")),
        (Some("active"), None)
    );

    assert_eq!(audit_lines(dir.path(), "key.leaked").len(), 3);
    assert_eq!(hook.count(), 3, "the CLI calls the webhook before it exits");
    let told = std::fs::read_to_string(dir.path().join("audit.log")).unwrap()
        + &hook
            .json_bodies()
            .iter()
            .map(Value::to_string)
            .collect::<String>();
    for i in 0..4 {
        assert!(!told.contains(&key(i)), "a token was written down");
    }

    for (args, says) in [
        (
            vec!["keys", "leaked", plain.as_str(), "--action", "delete"],
            "--action: `delete` is not an action",
        ),
        (
            vec!["keys", "leaked", "/nonexistent/leaks.txt"],
            "/nonexistent/leaks.txt",
        ),
        (
            vec!["keys", "leaked", plain.as_str(), "--source", "a\u{7}b"],
            "--source",
        ),
    ] {
        let mut all = vec!["--config", "keygate.yaml"];
        all.extend(args.iter().copied());
        let (code, _, err) = process::run(&all, dir.path());
        assert_ne!(code, 0);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(says), "{err}");
    }
    let empty = file("empty.txt", "# nothing found\n".into());
    let (code, _, err) = process::run(
        &["--config", "keygate.yaml", "keys", "leaked", &empty],
        dir.path(),
    );
    assert!(code != 0 && err.contains("no keys in it"), "{err}");
}
