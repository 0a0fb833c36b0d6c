//! Usage, quotas, lockouts, alerts and metrics, against the real gateway and real servers.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::keys::NewKey;
use serde_json::Value;
use support::process::{keygate_ok, Process};
use support::*;

async fn admin_get(gw: &TestGateway, path: &str) -> Answer {
    send(Req::get(gw.admin, path).bearer(ADMIN_TOKEN)).await
}

/// The upstream, a gateway with `extra` config, and housekeeping slowed so tests drive it.
async fn setup(extra: &str) -> (Upstream, TestGateway) {
    let up = Upstream::start().await;
    let extra = format!("usage:\n  flush_interval: 1h\n{extra}");
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), &extra)).await;
    (up, gw)
}

#[tokio::test]
async fn usage_counts_match_a_known_sequence_exactly() {
    let (_up, gw) = setup("").await;
    let (record, key) = gw
        .create_key(NewKey {
            scopes: vec!["read:/v1/**".into()],
            rate_limit: Some("4/m".into()),
            ..new_key("acme", "production")
        })
        .await;
    let get = |path: &'static str| send(Req::get(gw.proxy, path).bearer(&key));
    assert_eq!(get("/v1/a").await.status, 200);
    assert_eq!(get("/v1/status/404").await.status, 404);
    assert_eq!(get("/v1/status/503").await.status, 503);
    assert_eq!(
        send(Req::post(gw.proxy, "/v1/a").bearer(&key)).await.code(),
        "scope_denied"
    );
    assert_eq!(get("/v1/b").await.status, 200);
    assert_eq!(get("/v1/c").await.code(), "rate_limited");
    // Refusals that never identify a key are counted apart.
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/a")).await.code(),
        "missing_key"
    );
    gw.gateway().housekeeping();

    let u = admin_get(&gw, &format!("/v1/api-keys/{}/usage", record.id))
        .await
        .json();
    assert_eq!(u["requests_today"], 6, "{u}");
    assert_eq!(u["accepted_today"], 4);
    assert_eq!(u["refused_today"], 2);
    assert_eq!(u["upstream_4xx_today"], 1);
    assert_eq!(u["upstream_5xx_today"], 1);
    assert_eq!(u["upstream_errors_today"], 1);
    assert_eq!(
        u["by_code_today"],
        serde_json::json!({"rate_limited": 1, "scope_denied": 1})
    );
    assert_eq!(u["error_rate"], 0.6667, "(2 refused + 1 4xx + 1 5xx) / 6");
    assert_eq!(u["last_used_ip"], "127.0.0.1");
    let series = u["series"].as_array().unwrap();
    assert_eq!(series.len(), 1);
    assert_eq!(
        (
            series[0]["accepted"].as_u64(),
            series[0]["refused"].as_u64(),
            series[0]["errors"].as_u64()
        ),
        (Some(4), Some(2), Some(2))
    );

    let org = admin_get(&gw, "/v1/usage").await.json();
    assert_eq!(org["totals"]["requests_today"], 6, "{org}");
    assert_eq!(org["namespaces"][0]["namespace"], "acme");
    assert_eq!(org["top_by_requests"][0]["key_id"], record.id.as_str());
    assert_eq!(org["unidentified_refusals_today"]["missing_key"], 1);
    // The codes and the per-minute series, summed over the keys.
    assert_eq!(
        org["by_code_today"],
        serde_json::json!({"rate_limited": 1, "scope_denied": 1})
    );
    assert_eq!(
        org["series"], u["series"],
        "one key: the org's minutes are its own"
    );
    // A second key's traffic in the same minute adds to the same minute.
    let (_, other) = gw.create_key(new_key("acme", "production")).await;
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/a").bearer(&other))
            .await
            .status,
        200
    );
    gw.gateway().housekeeping();
    let org = admin_get(&gw, "/v1/usage").await.json();
    let minutes = org["series"].as_array().unwrap();
    assert_eq!(minutes.len(), 1, "{org}");
    assert_eq!(minutes[0]["accepted"], 5);
    assert_eq!(org["totals"]["keys_used_today"], 2);

    // The CLI reads what the gateway flushed.
    let shown = keygate_ok(gw.dir.path(), &["keys", "show", &record.id]);
    assert!(
        shown.contains("today:") && shown.contains("6 requests (4 accepted, 2 refused)"),
        "{shown}"
    );
    assert!(shown.contains("rate_limited 1, scope_denied 1"), "{shown}");
    let listed = keygate_ok(gw.dir.path(), &["keys", "list"]);
    let row: Vec<&str> = listed.lines().nth(1).unwrap().split_whitespace().collect();
    assert!(
        listed.contains("LAST USED") && row[5].ends_with('Z'),
        "{listed}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn gateway_failures_count_as_upstream_errors() {
    let up = Upstream::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let routes = [
        route("/", up.addr, "production", "response_timeout: 300ms"),
        route("/down", closed, "production", ""),
    ]
    .concat();
    let gw = TestGateway::start(&config_yaml(&routes, "usage:\n  flush_interval: 1h")).await;
    let (record, key) = gw.create_key(new_key("acme", "production")).await;
    assert_eq!(
        send(Req::get(gw.proxy, "/down/x").bearer(&key))
            .await
            .status,
        502
    );
    assert_eq!(
        send(Req::get(gw.proxy, "/slow").bearer(&key)).await.status,
        504
    );
    let u = admin_get(&gw, &format!("/v1/api-keys/{}/usage", record.id))
        .await
        .json();
    assert_eq!(
        (
            u["accepted_today"].as_u64(),
            u["failed_today"].as_u64(),
            u["upstream_errors_today"].as_u64()
        ),
        (Some(2), Some(2), Some(2)),
        "{u}"
    );
    assert_eq!(
        u["by_code_today"],
        serde_json::json!({"upstream_timeout": 1, "upstream_unavailable": 1})
    );
    gw.stop().await;
}

#[test]
fn usage_survives_a_restart() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", ""),
            "usage:\n  flush_interval: 1h",
        ),
    );
    let created: Value = serde_json::from_str(&keygate_ok(
        dir.path(),
        &[
            "keys",
            "create",
            "--namespace",
            "acme",
            "--environment",
            "production",
            "--quota",
            "100/day",
            "--json",
        ],
    ))
    .unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    );
    let token = [("KEYGATE_ADMIN_TOKEN", "restart-token")];
    let usage_of = |admin| {
        rt.block_on(send(
            Req::get(admin, &format!("/v1/api-keys/{id}/usage")).bearer("restart-token"),
        ))
        .json()
    };

    let mut first = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &token);
    let (proxy, admin) = first.addresses();
    for _ in 0..3 {
        assert_eq!(
            rt.block_on(send(Req::get(proxy, "/x").bearer(&key))).status,
            200
        );
    }
    assert_eq!(usage_of(admin)["accepted_today"], 3);
    // SIGTERM drains and flushes usage before exiting.
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(10)), Some(0));

    let second = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &token);
    let (proxy, admin) = second.addresses();
    let u = usage_of(admin);
    assert_eq!(
        (u["accepted_today"].as_u64(), u["quota"]["used"].as_u64()),
        (Some(3), Some(3)),
        "{u}"
    );
    assert_eq!(
        rt.block_on(send(Req::get(proxy, "/x").bearer(&key))).status,
        200
    );
    assert_eq!(usage_of(admin)["accepted_today"], 4);
    drop(second);
}

#[tokio::test]
async fn quotas_refuse_past_the_limit_and_reset_at_midnight() {
    let (_up, gw) =
        setup("tiers:\n  metered: {quota: 2/day}\nnamespaces:\n  small: {tier: metered}\n").await;
    let (_, own) = gw
        .create_key(NewKey {
            quota: Some("3/day".into()),
            rate_limit: Some("100/s".into()),
            ..new_key("acme", "production")
        })
        .await;
    let (_, tiered) = gw.create_key(new_key("small", "production")).await;
    for i in 0..3 {
        let r = send(Req::get(gw.proxy, "/x").bearer(&own)).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(
            r.header("ratelimit-policy"),
            "\"key\";q=100;w=1, \"quota\";q=3;w=86400"
        );
        assert!(
            r.header("ratelimit").ends_with(&format!(
                "\"quota\";r={};t={}",
                2 - i,
                seconds_to_midnight(&gw)
            )),
            "{}",
            r.header("ratelimit")
        );
    }
    let r = send(Req::get(gw.proxy, "/x").bearer(&own)).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (429, "quota_exceeded")
    );
    assert_eq!(
        r.header("retry-after"),
        seconds_to_midnight(&gw).to_string()
    );
    assert!(r.header("ratelimit").contains("\"quota\";r=0"));
    // The tier's quota applies to keys without their own.
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&tiered)).await.status,
        200
    );
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&tiered)).await.status,
        200
    );
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&tiered)).await.code(),
        "quota_exceeded"
    );
    // A refusal by quota spends no rate budget, and midnight resets the quota.
    gw.clock
        .advance(Duration::from_secs(seconds_to_midnight(&gw) + 1));
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&own)).await.status,
        200
    );
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&tiered)).await.status,
        200
    );
    gw.stop().await;
}

fn seconds_to_midnight(gw: &TestGateway) -> u64 {
    let now = gw.clock.unix_secs();
    ((now.div_euclid(86_400) + 1) * 86_400 - now) as u64
}

#[tokio::test]
async fn guessing_locks_an_address_out_and_only_that_address() {
    let (up, gw) =
        setup("lockout:\n  enabled: true\n  max_failures: 5\n  window: 1m\n  cooldown: 5m\n").await;
    let (_, key) = gw.create_key(new_key("acme", "production")).await;
    for i in 0..5 {
        let guess = keygate::keys::format::generate("kg_live").unwrap();
        assert_eq!(
            send(Req::get(gw.proxy, "/x").bearer(&guess)).await.code(),
            "unknown_key",
            "guess {i}"
        );
    }
    let hits = up.hits();
    let r = send(Req::get(gw.proxy, "/x").bearer(&key)).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (429, "too_many_failed_attempts"),
        "even a valid key is refused, without a lookup"
    );
    assert_eq!(r.header("retry-after"), "300");
    assert_eq!(up.hits(), hits);
    // Another address is not affected.
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&key).from("127.0.0.2"))
            .await
            .status,
        200
    );
    // Audited and metered.
    let audit = admin_get(&gw, "/v1/audit?action=auth.locked_out")
        .await
        .json();
    assert_eq!(audit["events"][0]["ip"], "127.0.0.1");
    let metrics = admin_get(&gw, "/metrics").await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("keygate_lockouts_total 1"));
    // The cool-down ends.
    gw.clock.advance(Duration::from_secs(301));
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&key)).await.status,
        200
    );
    gw.stop().await;
}

/// A real webhook receiver on loopback; it fails its first delivery to exercise retries.
async fn webhook_server() -> (std::net::SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (sink, calls) = (sink.clone(), calls.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (sink, calls) = (sink.clone(), calls.clone());
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut response = http::Response::new(Full::new(Bytes::new()));
                            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            } else {
                                sink.lock()
                                    .unwrap()
                                    .push(serde_json::from_slice(&body).unwrap());
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, got)
}

#[tokio::test]
async fn alerts_reach_the_webhook_and_resolve() {
    let up = Upstream::start().await;
    let (hook, received) = webhook_server().await;
    let extra = format!(
        "usage:\n  flush_interval: 100ms\nalerts:\n  webhook: {{url: \"http://{hook}/alerts\", timeout: 2s, retries: 2}}\n  rules:\n    - {{name: hot, namespace: acme, requests_per_minute: 3}}\n"
    );
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), &extra)).await;
    let (record, key) = gw.create_key(new_key("acme", "production")).await;
    for _ in 0..5 {
        assert_eq!(
            send(Req::get(gw.proxy, "/x").bearer(&key)).await.status,
            200
        );
    }
    // Housekeeping has seen this minute once its series holds the minute's 5 requests (a
    // key's first tick starts its series); then the minute is closed.
    let usage_path = format!("/v1/api-keys/{}/usage", record.id);
    let seen = eventually(Duration::from_secs(10), async || {
        let r = send(Req::get(gw.admin, &usage_path).bearer(ADMIN_TOKEN)).await;
        r.json()["series"]
            .as_array()
            .is_some_and(|s| s.iter().any(|m| m["accepted"] == 5))
    })
    .await;
    assert!(seen, "housekeeping recorded the minute's traffic");
    gw.clock.advance(Duration::from_secs(60));
    let fired = eventually(Duration::from_secs(10), async || {
        received
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "alert.fired")
    })
    .await;
    assert!(
        fired,
        "the webhook got alert.fired (after one failed attempt)"
    );
    let event = received
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "alert.fired")
        .cloned()
        .unwrap();
    assert_eq!(
        (event["rule"].as_str(), event["key_id"].as_str()),
        (Some("hot"), Some(record.id.as_str()))
    );
    assert_eq!(
        (event["value"].as_f64(), event["threshold"].as_f64()),
        (Some(5.0), Some(3.0))
    );
    // A quiet minute resolves it.
    gw.clock.advance(Duration::from_secs(60));
    let resolved = eventually(Duration::from_secs(10), async || {
        received
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "alert.resolved")
    })
    .await;
    assert!(resolved);
    let audit = admin_get(&gw, "/v1/audit?action=alert.fired").await.json();
    assert_eq!(audit["events"][0]["key_id"], record.id.as_str());
    gw.stop().await;
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let (_up, gw) = setup("").await;
    let (_, key) = gw
        .create_key(NewKey {
            rate_limit: Some("1/h".into()),
            ..new_key("acme", "production")
        })
        .await;
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&key)).await.status,
        200
    );
    assert_eq!(
        send(Req::get(gw.proxy, "/x").bearer(&key)).await.code(),
        "rate_limited"
    );
    assert_eq!(send(Req::get(gw.proxy, "/x")).await.code(), "missing_key");
    let r = admin_get(&gw, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} {labels:?} missing from:\n{text}"))
    };
    assert_eq!(
        value(
            "keygate_requests_total",
            &[("route", "/"), ("outcome", "forwarded"), ("code", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "keygate_requests_total",
            &[
                ("route", "/"),
                ("outcome", "refused"),
                ("code", "rate_limited")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "keygate_requests_total",
            &[
                ("route", "/"),
                ("outcome", "refused"),
                ("code", "missing_key")
            ]
        ),
        1.0
    );
    assert_eq!(value("keygate_rate_limited_total", &[]), 1.0);
    assert_eq!(value("keygate_keys", &[]), 1.0);
    assert!(value("keygate_snapshot_generation", &[]) >= 2.0);
    assert!(value("keygate_reloads_total", &[]) >= 1.0);
    assert_eq!(value("keygate_upstream_connections_opened_total", &[]), 1.0);
    let histogram = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "keygate_request_duration_seconds"
                && s.labels.get("part") == Some("upstream")
        })
        .expect("the upstream histogram");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(buckets.last().unwrap().count, 1.0)
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert!(
        !text.contains("key_id="),
        "no key ids as labels unless turned on"
    );
    gw.stop().await;
}

#[tokio::test]
async fn per_key_metrics_only_when_turned_on() {
    let (_up, gw) = setup("metrics:\n  per_key: true\n").await;
    let (record, key) = gw.create_key(new_key("acme", "production")).await;
    send(Req::get(gw.proxy, "/x").bearer(&key)).await;
    let text = String::from_utf8(admin_get(&gw, "/metrics").await.body.to_vec()).unwrap();
    assert!(
        text.contains(&format!(
            "keygate_key_requests_today{{key_id=\"{}\",namespace=\"acme\",outcome=\"accepted\"}} 1",
            record.id
        )),
        "{text}"
    );
    gw.stop().await;
}

/// An alert rule with email recipients, under real traffic through the proxy: the message
/// reaches a real SMTP server (STARTTLS and AUTH required) with the key id and the figure,
/// and nothing secret.
#[tokio::test]
async fn alerts_are_emailed_through_a_real_smtp_server() {
    let smtp = support::smtp::SmtpServer::start();
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("smtp-ca.pem");
    std::fs::write(&ca, &smtp.ca_pem).unwrap();
    let var = format!("KEYGATE_TEST_SMTP_PASSWORD_{}", smtp.port);
    // Read once, when the config is loaded: never written into it.
    std::env::set_var(&var, &smtp.password);
    let extra = format!(
        "usage:\n  flush_interval: 100ms\nalerts:\n  smtp: {{url: \"smtp://127.0.0.1:{port}\", from: \"keygate <keygate@example.test>\", username: {user}, password_env: {var}, ca_file: \"{ca}\", timeout: 5s}}\n  rules:\n    - {{name: hot, namespace: acme, requests_per_minute: 3, email: [\"On call <oncall@example.test>\"]}}\n",
        port = smtp.port,
        user = support::smtp::USER,
        ca = ca.display(),
    );
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), &extra)).await;
    let (record, key) = gw.create_key(new_key("acme", "production")).await;
    for _ in 0..5 {
        assert_eq!(
            send(Req::get(gw.proxy, "/x").bearer(&key)).await.status,
            200
        );
    }
    let usage_path = format!("/v1/api-keys/{}/usage", record.id);
    let seen = eventually(Duration::from_secs(10), async || {
        let r = send(Req::get(gw.admin, &usage_path).bearer(ADMIN_TOKEN)).await;
        r.json()["series"]
            .as_array()
            .is_some_and(|s| s.iter().any(|m| m["accepted"] == 5))
    })
    .await;
    assert!(seen, "housekeeping recorded the minute's traffic");
    gw.clock.advance(Duration::from_secs(60));
    let arrived = eventually(Duration::from_secs(15), async || {
        !smtp.received().is_empty()
    })
    .await;
    assert!(arrived, "the alert email reached the SMTP server");
    let (envelope, message) = smtp.received().remove(0);
    assert_eq!(
        envelope["rcpt_tos"],
        serde_json::json!(["oncall@example.test"])
    );
    assert_eq!(envelope["mail_from"], "keygate@example.test");
    assert_eq!(
        (
            envelope["tls"].as_bool(),
            envelope["authenticated"].as_bool()
        ),
        (Some(true), Some(true)),
        "sent over STARTTLS, after AUTH"
    );
    let subject = format!("Subject: [keygate] hot fired: key {}", record.id);
    assert!(message.contains(&subject), "{message}");
    assert!(message.contains("Value:      5"), "{message}");
    assert!(message.contains("Threshold:  3"), "{message}");
    assert!(!message.contains(&key), "no secret in the message");
    assert!(
        !message.contains(&smtp.password),
        "no password in the message"
    );
    // A quiet minute resolves it: a second message.
    gw.clock.advance(Duration::from_secs(60));
    let resolved = eventually(Duration::from_secs(15), async || {
        smtp.received()
            .iter()
            .any(|(_, m)| m.contains("hot resolved"))
    })
    .await;
    assert!(resolved, "the resolution is emailed too");
    assert_eq!(
        counter(gw.admin, "keygate_alert_email_failures_total").await,
        0
    );
    gw.stop().await;
}

/// Bad SMTP settings are config errors at load, each naming its field: a lost alert later
/// would be worse.
#[test]
fn bad_smtp_settings_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.yaml");
    for (alerts, field) in [
        ("smtp: {url: \"http://mail\", from: a@b.c}", "alerts.smtp.url"),
        ("smtp: {url: \"smtp://mail\", from: \"not an address\"}", "alerts.smtp.from"),
        ("smtp: {url: \"smtp://mail\", from: a@b.c, starttls: maybe}", "alerts.smtp.starttls"),
        (
            "smtp: {url: \"smtp://mail\", from: a@b.c, username: u, password_env: KEYGATE_NO_SUCH_VAR_EVER}",
            "alerts.smtp.password_env",
        ),
        ("smtp: {url: \"smtp://mail\", from: a@b.c, ca_file: missing.pem}", "alerts.smtp.ca_file"),
        (
            "rules: [{name: r, requests_per_minute: 1, email: [ops@example.test]}]",
            "alerts.rules[0].email",
        ),
        (
            "smtp: {url: \"smtp://mail\", from: a@b.c}\n  rules: [{name: r, requests_per_minute: 1, email: [\"not an address\"]}]",
            "alerts.rules[0].email[0]",
        ),
    ] {
        write(
            &path,
            &config_yaml(
                &route("/", "127.0.0.1:9".parse().unwrap(), "production", ""),
                &format!("alerts:\n  {alerts}\n"),
            ),
        );
        let (code, _, err) = support::process::run(&["--config", "keygate.yaml", "check"], dir.path());
        assert_eq!(code, 1, "{alerts}");
        assert!(err.contains(field), "{alerts}: {err}");
    }
}
