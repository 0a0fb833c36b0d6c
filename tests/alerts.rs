//! Alert rules managed through the admin API (`/v1/alerts`): kept in the key store beside the
//! keys, in every kind of store, audited, held to the same checks as the config's rules, and
//! evaluated like them.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::redis::RedisServer;
use support::*;

const READ_TOKEN: &str = "test-read-token-please-ignore";

/// A gateway on `store` (extra config), with a rule in the config and a read-only token.
async fn gateway(up: &Upstream, store: &str) -> TestGateway {
    let read_hash = keygate::keys::hex(&keygate::keys::format::hash(READ_TOKEN));
    let extra = format!(
        "{store}alerts:\n  rules:\n    - {{name: from config, requests_per_minute: 1000}}\n"
    );
    let mut yaml = config_yaml(&route("/", up.addr, "production", ""), &extra);
    yaml = yaml.replace(
        "admin_tokens:\n",
        &format!("admin_tokens:\n  - {{name: reader, hash: \"sha256:{read_hash}\", role: read}}\n"),
    );
    TestGateway::start(&yaml).await
}

async fn call(gw: &TestGateway, method: &str, path: &str, body: Option<Value>) -> Answer {
    admin(gw, method, path, body).await
}

fn names(list: &Value) -> Vec<(String, String)> {
    list["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["source"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn rules_are_made_changed_and_removed_through_the_api_and_kept_with_the_keys() {
    let up = Upstream::start().await;
    let gw = gateway(&up, "").await;
    let list = call(&gw, "GET", "/v1/alerts", None).await.json();
    assert_eq!(names(&list), [("from config".into(), "config".into())]);
    assert_eq!(
        (list["webhook"].as_bool(), list["email"].as_bool()),
        (Some(false), Some(false))
    );

    // Made: 201, in force, listed after the config's, kept in the key store, audited.
    let made = call(
        &gw,
        "POST",
        "/v1/alerts",
        Some(json!({"name": "hot-acme", "namespace": "acme", "requests_per_minute": 2})),
    )
    .await;
    assert_eq!(made.status, 201, "{:?}", made.json());
    assert_eq!(made.json()["source"], "api");
    assert_eq!(made.json()["email"], json!([]));
    let list = call(&gw, "GET", "/v1/alerts", None).await.json();
    assert_eq!(
        names(&list),
        [
            ("from config".into(), "config".into()),
            ("hot-acme".into(), "api".into())
        ]
    );
    let store = std::fs::read_to_string(gw.dir.path().join("keys.yaml")).unwrap();
    assert!(
        store.contains("alerts:\n- {\"name\":\"hot-acme\""),
        "{store}"
    );

    // It fires on real traffic like a config rule.
    let (record, key) = gw.create_key(new_key("acme", "production")).await;
    for _ in 0..3 {
        assert_eq!(
            send(Req::get(gw.proxy, "/x").bearer(&key)).await.status,
            200
        );
    }
    gw.gateway().housekeeping();
    gw.clock.advance(Duration::from_secs(60));
    let fired: Vec<_> = gw
        .gateway()
        .housekeeping()
        .into_iter()
        .map(|e| (e.event, e.rule, e.key_id))
        .collect();
    assert_eq!(
        fired,
        [("alert.fired", "hot-acme".to_string(), record.id.clone())]
    );

    // Changed by a merge patch: the condition switched, the old one removed with null.
    let r = call(
        &gw,
        "PATCH",
        "/v1/alerts/hot-acme",
        Some(json!({"requests_per_minute": null, "error_rate_percent": 50, "over": "10m"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        (
            r.json()["error_rate_percent"].as_f64(),
            r.json().get("requests_per_minute")
        ),
        (Some(50.0), None)
    );
    let got = call(&gw, "GET", "/v1/alerts/hot-acme", None).await.json();
    assert_eq!(got["over"], "10m");

    // Refusals, each with its code, and the field when one is to blame.
    for (method, path, body, status, code, field) in [
        (
            "POST",
            "/v1/alerts",
            json!({"name": "hot-acme", "quota_percent": 5}),
            409,
            "alert_exists",
            None,
        ),
        (
            "POST",
            "/v1/alerts",
            json!({"name": "from config", "quota_percent": 5}),
            409,
            "alert_exists",
            None,
        ),
        (
            "POST",
            "/v1/alerts",
            json!({"name": "has space", "quota_percent": 5}),
            400,
            "invalid_request",
            Some("name"),
        ),
        (
            "POST",
            "/v1/alerts",
            json!({"name": "x", "quota_percent": 500}),
            400,
            "invalid_request",
            Some("quota_percent"),
        ),
        (
            "POST",
            "/v1/alerts",
            json!({"name": "x", "quota_percent": 5, "colour": "red"}),
            400,
            "invalid_request",
            Some("colour"),
        ),
        (
            "POST",
            "/v1/alerts",
            json!({"name": "x", "quota_percent": 5, "email": ["ops@example.test"]}),
            400,
            "invalid_request",
            Some("email"),
        ),
        (
            "POST",
            "/v1/alerts",
            json!({"name": "x", "quota_percent": 5, "requests_per_minute": 3}),
            400,
            "invalid_request",
            None,
        ),
        (
            "PATCH",
            "/v1/alerts/hot-acme",
            json!({"name": "renamed"}),
            400,
            "invalid_request",
            Some("name"),
        ),
        (
            "PATCH",
            "/v1/alerts/hot-acme",
            json!({"over": "3s"}),
            400,
            "invalid_request",
            Some("over"),
        ),
        (
            "PATCH",
            "/v1/alerts/from%20config",
            json!({"quota_percent": 5}),
            409,
            "alert_in_config",
            None,
        ),
        (
            "PATCH",
            "/v1/alerts/nothing",
            json!({"quota_percent": 5}),
            404,
            "alert_not_found",
            None,
        ),
    ] {
        let r = call(&gw, method, path, Some(body.clone())).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (status, code.to_string()),
            "{body}: {:?}",
            r.json()
        );
        assert_eq!(r.json()["field"].as_str(), field, "{body}");
    }
    let r = call(&gw, "DELETE", "/v1/alerts/from%20config", None).await;
    assert_eq!(r.code(), "alert_in_config");
    let r = call(&gw, "GET", "/v1/alerts/from%20config", None).await;
    assert_eq!(r.json()["source"], "config");

    // A read token reads, and changes nothing.
    let read = |method: &str, path: &str| {
        let mut r = Req::get(gw.admin, path).method(method).bearer(READ_TOKEN);
        if method != "GET" && method != "DELETE" {
            r = r
                .header("content-type", "application/json")
                .body(r#"{"name": "r", "quota_percent": 5}"#);
        }
        send(r)
    };
    assert_eq!(read("GET", "/v1/alerts").await.status, 200);
    assert_eq!(read("GET", "/v1/alerts/hot-acme").await.status, 200);
    for (method, path) in [
        ("POST", "/v1/alerts"),
        ("PATCH", "/v1/alerts/hot-acme"),
        ("DELETE", "/v1/alerts/hot-acme"),
    ] {
        assert_eq!(
            read(method, path).await.code(),
            "insufficient_role",
            "{method} {path}"
        );
    }

    // Kept across a restart: read from the store by a new gateway on the same files.
    let again = gw.beside().await;
    let list = call(&again, "GET", "/v1/alerts", None).await.json();
    assert_eq!(names(&list).len(), 2);
    again.stop().await;

    // Removed, and audited every step of the way.
    let r = call(&gw, "DELETE", "/v1/alerts/hot-acme", None).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["name"].as_str()),
        (200, Some("hot-acme"))
    );
    assert_eq!(
        call(&gw, "GET", "/v1/alerts/hot-acme", None).await.code(),
        "alert_not_found"
    );
    let store = std::fs::read_to_string(gw.dir.path().join("keys.yaml")).unwrap();
    assert!(!store.contains("hot-acme"), "{store}");
    let audit = call(&gw, "GET", "/v1/audit?limit=100", None).await.json();
    let actions: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str().filter(|a| a.starts_with("alert.")))
        .collect();
    assert_eq!(
        actions,
        [
            "alert.deleted",
            "alert.updated",
            "alert.fired",
            "alert.created"
        ]
    );
    let updated = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "alert.updated")
        .unwrap();
    assert!(
        updated["reason"].as_str().unwrap().contains(
            "requests per minute > 2 → hot-acme: namespace acme, error rate > 50% over 10m"
        ),
        "{updated}"
    );
    gw.stop().await;
}

/// In a SQLite store and in Redis, rules are kept as the keys are: a new gateway on the same
/// SQLite file has them, and a second node on the same Redis takes them up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_live_in_sqlite_and_in_redis_too() {
    let up = Upstream::start().await;
    let sqlite = gateway(&up, "store: {kind: sqlite, path: keys.db}\n").await;
    let r = call(
        &sqlite,
        "POST",
        "/v1/alerts",
        Some(json!({"name": "quota", "quota_percent": 90})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let again = sqlite.beside().await;
    assert_eq!(
        names(&call(&again, "GET", "/v1/alerts", None).await.json())
            .last()
            .cloned(),
        Some(("quota".into(), "api".into()))
    );
    // `keys export` carries the rules, so a backup holds them.
    let (code, exported, err) = support::process::run(
        &["--config", "keygate.yaml", "keys", "export"],
        sqlite.dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        exported.contains("alerts:\n- {\"name\":\"quota\",\"quota_percent\":90.0}"),
        "{exported}"
    );
    again.stop().await;
    sqlite.stop().await;

    let redis = RedisServer::start();
    let store = format!(
        "store: {{kind: redis, url: \"{}\", prefix: kgalerts}}\n",
        redis.url()
    );
    let a = gateway(&up, &store).await;
    let b = gateway(&up, &store).await;
    let r = call(
        &a,
        "POST",
        "/v1/alerts",
        Some(json!({"name": "errors", "error_rate_percent": 20})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let reached = eventually(Duration::from_secs(10), async || {
        names(&call(&b, "GET", "/v1/alerts", None).await.json()).len() == 2
    })
    .await;
    assert!(reached, "the other node takes the rule up");
    // A key made after it still goes through the write indexes, which the rule did not
    // put out of step.
    let (id, _) = a.create_key(new_key("acme", "production")).await;
    assert!(!id.id.is_empty());
    a.stop().await;
    b.stop().await;
}
