//! The auth listener and the verify API give the proxy's decisions. The proxy's request
//! table (support/ingress.rs) runs through the proxy itself, through the auth listener in
//! each ingress's exact request shape (Traefik's X-Forwarded-*, nginx's X-Original-*,
//! Envoy's path prefix), and through `POST /v1/keys/verify`; every answer must match.
//! Real nginx and Caddy in front of the auth listener are in tests/ingress.rs.

mod support;

use support::ingress::{check_refusal, fixture, Case, Fixture, READ_TOKEN, VERIFY_TOKEN};
use support::*;

fn with_auth(mut r: Req, case: &Case) -> Req {
    if let Some(a) = &case.authorization {
        r = r.header("authorization", a);
    }
    r
}

/// Traefik's ForwardAuth: a GET to the auth address with the original request in
/// X-Forwarded-Method, -Uri, -Host, -Proto and -For, and the client's own headers.
fn traefik(auth: std::net::SocketAddr, case: &Case) -> Req {
    let r = Req::get(auth, "/")
        .header("x-forwarded-method", case.method)
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", "api.example")
        .header("x-forwarded-uri", &format!("{}?page=2", case.path))
        .header("x-forwarded-for", case.from);
    with_auth(r, case)
}

/// nginx's auth_request by its older convention: X-Original-Method, X-Original-URI and
/// X-Real-IP on a subrequest to the auth location.
fn nginx(auth: std::net::SocketAddr, case: &Case) -> Req {
    let r = Req::get(auth, "/_keygate")
        .header("x-original-method", case.method)
        .header("x-original-uri", case.path)
        .header("x-real-ip", case.from)
        .header("host", "api.example");
    with_auth(r, case)
}

/// Envoy's ext_authz HTTP service: the original method, `path_prefix` then the original
/// path, and the default header allow-list (Host, Authorization) plus x-forwarded-for.
fn envoy(auth: std::net::SocketAddr, case: &Case) -> Req {
    let r = Req::get(auth, &format!("/envoy{}", case.path))
        .method(case.method)
        .header("host", "api.example")
        .header("x-forwarded-for", case.from)
        .header("x-envoy-expected-rq-timeout-ms", "500");
    with_auth(r, case)
}

async fn run_table(f: &Fixture, via: &str, shape: impl Fn(&Case) -> Req) {
    for case in &f.cases {
        let r = send(shape(case)).await;
        check_refusal(case, &r, via);
        if case.status == 200 {
            assert!(r.body.is_empty(), "{via}: {}", case.what);
            assert_eq!(r.header("x-keygate-namespace"), "acme");
            assert_eq!(r.header("x-keygate-environment"), "production");
            assert!(!r.header("x-keygate-key-id").is_empty());
            assert!(!r.header("x-request-id").is_empty());
        } else {
            assert_eq!(
                r.header("x-keygate-code"),
                case.code,
                "{via}: {}",
                case.what
            );
            let problem: serde_json::Value =
                serde_json::from_str(r.header("x-keygate-problem")).unwrap();
            assert_eq!(problem, r.json(), "{via}: the header repeats the body");
        }
    }
}

#[tokio::test]
async fn the_table_through_the_proxy() {
    let f = fixture("").await;
    let hits = f.up.hits();
    let mut accepted = 0;
    for case in &f.cases {
        let r = send(with_auth(
            Req::get(f.gw.proxy, case.path)
                .method(case.method)
                .from(case.from),
            case,
        ))
        .await;
        check_refusal(case, &r, "proxy");
        accepted += u64::from(case.status == 200);
    }
    assert_eq!(
        f.up.hits() - hits,
        accepted,
        "only accepted requests went up"
    );
    f.gw.stop().await;
}

#[tokio::test]
async fn the_table_in_traefiks_shape() {
    let f = fixture("").await;
    run_table(&f, "traefik", |c| traefik(f.auth, c)).await;
    // Nothing reached the upstream: the auth listener only decides.
    assert_eq!(f.up.hits(), 0);
    let metrics = send(Req::get(f.gw.admin, "/metrics").bearer(ADMIN_TOKEN)).await;
    let text = String::from_utf8_lossy(&metrics.body);
    let allowed = f.cases.iter().filter(|c| c.status == 200).count() as u64;
    assert_eq!(
        metric(
            &text,
            "keygate_auth_decisions_total{source=\"auth\",code=\"allowed\"}"
        ),
        allowed
    );
    assert_eq!(
        metric(
            &text,
            "keygate_auth_decisions_total{source=\"auth\",code=\"rate_limited\"}"
        ),
        1
    );
    f.gw.stop().await;
}

#[tokio::test]
async fn the_table_in_nginxs_shape() {
    let f = fixture("").await;
    run_table(&f, "nginx", |c| nginx(f.auth, c)).await;
    f.gw.stop().await;
}

#[tokio::test]
async fn the_table_in_envoys_shape() {
    let f = fixture("").await;
    run_table(&f, "envoy", |c| envoy(f.auth, c)).await;
    f.gw.stop().await;
}

#[tokio::test]
async fn usage_and_the_audit_log_count_forward_auth_like_the_proxy() {
    let f = fixture("").await;
    for _ in 0..3 {
        let case = &f.cases[0];
        assert_eq!(send(traefik(f.auth, case)).await.status, 200);
    }
    let usage = admin(
        &f.gw,
        "GET",
        &format!("/v1/api-keys/{}/usage", f.good_id),
        None,
    )
    .await;
    assert_eq!(usage.json()["accepted_today"], 3, "{:?}", usage.json());
    // Failed authentications through the auth listener are audited with the client's
    // address, not the ingress's.
    let unknown = f.cases.iter().find(|c| c.code == "unknown_key").unwrap();
    send(traefik(f.auth, unknown)).await;
    f.gw.gateway().audit.flush();
    let audit = admin(&f.gw, "GET", "/v1/audit?action=auth.failed", None).await;
    let events = audit.json()["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        events
            .iter()
            .any(|e| e["ip"] == unknown.from && e["outcome"] == "failure"),
        "{events:?}"
    );
    f.gw.stop().await;
}

#[tokio::test]
async fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
    let f = fixture("").await;
    let walled = f
        .cases
        .iter()
        .find(|c| c.what == "the key's own address")
        .unwrap();
    // From the trusted ingress (127.0.0.1), the forwarded address is the client's.
    assert_eq!(send(traefik(f.auth, walled)).await.status, 200);
    // From anywhere else, X-Forwarded-For and X-Real-IP are not believed: the peer is the
    // client, and it is not in the key's addresses.
    let r = send(traefik(f.auth, walled).from("127.0.0.7")).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (403, "ip_not_allowed")
    );
    let r = send(nginx(f.auth, walled).from("127.0.0.7")).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (403, "ip_not_allowed")
    );
    f.gw.stop().await;
}

#[tokio::test]
async fn a_bad_forwarded_method_is_refused_naming_the_header() {
    let f = fixture("").await;
    let r = send(
        Req::get(f.auth, "/")
            .header("x-forwarded-method", "G(E)T")
            .header("x-forwarded-uri", "/v1/x")
            .bearer(&f.good),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["field"], "X-Forwarded-Method");
    assert_eq!(r.header("x-keygate-code"), "invalid_request");
    // A URI that is not a path is the proxy's invalid_path.
    let r = send(
        Req::get(f.auth, "/")
            .header("x-forwarded-uri", "v1/x")
            .bearer(&f.good),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (400, "invalid_path")
    );
    f.gw.stop().await;
}

async fn verify(f: &Fixture, token: &str, body: serde_json::Value) -> Answer {
    send(
        Req::post(f.gw.admin, "/v1/keys/verify")
            .bearer(token)
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await
}

#[tokio::test]
async fn the_table_through_the_verify_api() {
    let f = fixture("").await;
    for case in &f.cases {
        let key = match case.authorization.as_deref() {
            None => String::new(),
            Some(a) => a.strip_prefix("Bearer ").unwrap_or(a).to_string(),
        };
        let r = verify(
            &f,
            VERIFY_TOKEN,
            serde_json::json!({
                "key": key, "method": case.method, "path": case.path,
                "host": "api.example", "ip": case.from,
            }),
        )
        .await;
        assert_eq!(r.status, 200, "{}: {:?}", case.what, r.body);
        let v = r.json();
        assert_eq!(v["valid"], case.status == 200, "{}: {v}", case.what);
        assert_eq!(v["status"], case.status, "{}: {v}", case.what);
        if case.status == 200 {
            assert!(v["code"].is_null(), "{v}");
            assert_eq!(v["key"]["namespace"], "acme");
            assert_eq!(v["key"]["environment"], "production");
            assert_eq!(v["key"]["status"], "active");
        } else {
            assert_eq!(v["code"], case.code, "{}: {v}", case.what);
        }
        if case.code == "rate_limited" || case.code == "quota_exceeded" {
            assert_eq!(v["ratelimit"]["remaining"], 0, "{v}");
            assert_eq!(v["ratelimit"]["limit"], 1, "{v}");
            assert!(v["ratelimit"]["retry_after"].as_u64().unwrap() >= 1, "{v}");
        }
        if ["unknown_key", "malformed_key", "missing_key"].contains(&case.code) {
            assert!(v["key"].is_null(), "{}: {v}", case.what);
        } else {
            assert!(v["key"]["id"].is_string(), "{}: {v}", case.what);
        }
    }
    // Without a path only the key is judged; without an address, a key bound to addresses
    // cannot be shown to be used from one of them.
    let r = verify(&f, VERIFY_TOKEN, serde_json::json!({"key": f.good})).await;
    assert_eq!(r.json()["valid"], true, "{:?}", r.json());
    let walled = f
        .cases
        .iter()
        .find(|c| c.what == "the key's own address")
        .unwrap();
    let secret = walled
        .authorization
        .as_deref()
        .unwrap()
        .trim_start_matches("Bearer ");
    let r = verify(&f, VERIFY_TOKEN, serde_json::json!({"key": secret})).await;
    assert_eq!(r.json()["code"], "ip_not_allowed");
    let r = verify(
        &f,
        VERIFY_TOKEN,
        serde_json::json!({"key": secret, "ip": "127.0.0.2"}),
    )
    .await;
    assert_eq!(r.json()["valid"], true);
    // The secret is in no log and no audit event.
    f.gw.gateway().audit.flush();
    let audit = std::fs::read_to_string(f.gw.gateway().audit.path()).unwrap_or_default();
    assert!(!audit.contains(&f.good) && !audit.contains(secret));
    f.gw.stop().await;
}

#[tokio::test]
async fn bad_verify_bodies_get_400_naming_the_field() {
    let f = fixture("").await;
    let long = "k".repeat(5000);
    for (body, field) in [
        (serde_json::json!({}), "key"),
        (serde_json::json!({"key": 7}), "key"),
        (serde_json::json!({"key": long}), "key"),
        (
            serde_json::json!({"key": f.good, "method": "G E T"}),
            "method",
        ),
        (serde_json::json!({"key": f.good, "method": ""}), "method"),
        (serde_json::json!({"key": f.good, "path": "v1/x"}), "path"),
        (serde_json::json!({"key": f.good, "host": "a b"}), "host"),
        (serde_json::json!({"key": f.good, "ip": "10.0.0.300"}), "ip"),
        (
            serde_json::json!({"key": f.good, "dry_run": true}),
            "dry_run",
        ),
    ] {
        let r = verify(&f, VERIFY_TOKEN, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert_eq!(r.json()["field"], field, "{body}: {:?}", r.json());
    }
    let r = send(
        Req::post(f.gw.admin, "/v1/keys/verify")
            .bearer(VERIFY_TOKEN)
            .body("not json"),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (400, "invalid_request")
    );
    // Nothing was counted by a refused body.
    let usage = admin(
        &f.gw,
        "GET",
        &format!("/v1/api-keys/{}/usage", f.good_id),
        None,
    )
    .await;
    assert_eq!(usage.json()["requests_today"], 0, "{:?}", usage.json());
    f.gw.stop().await;
}

#[tokio::test]
async fn roles_hold_each_token_to_its_calls() {
    let f = fixture("").await;
    let id = &f.good_id;
    let call = |token: &'static str, method: &'static str, path: String, body: Option<&str>| {
        let mut r = Req::get(f.gw.admin, &path).method(method).bearer(token);
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        send(r)
    };
    let create = r#"{"namespace": "acme", "environment": "production"}"#;
    let verify_body = format!(r#"{{"key": "{}"}}"#, f.good);
    // A verify token verifies, and can do nothing else.
    for (method, path, body) in [
        ("POST", "/v1/api-keys".to_string(), Some(create)),
        ("GET", "/v1/api-keys".to_string(), None),
        ("GET", format!("/v1/api-keys/{id}"), None),
        ("DELETE", format!("/v1/api-keys/{id}"), None),
        ("POST", format!("/v1/api-keys/{id}/rotate"), None),
        ("GET", "/v1/audit".to_string(), None),
        ("POST", "/v1/reload".to_string(), None),
    ] {
        let r = call(VERIFY_TOKEN, method, path.clone(), body).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (403, "insufficient_role"),
            "verify token: {method} {path}"
        );
    }
    let r = call(
        VERIFY_TOKEN,
        "POST",
        "/v1/keys/verify".into(),
        Some(&verify_body),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["valid"].as_bool()),
        (200, Some(true))
    );
    // A read token reads, and changes nothing.
    for (method, path) in [
        ("GET", "/v1/api-keys".to_string()),
        ("GET", format!("/v1/api-keys/{id}")),
        ("GET", format!("/v1/api-keys/{id}/usage")),
        ("GET", "/v1/usage".to_string()),
        ("GET", "/v1/audit".to_string()),
        ("GET", "/v1/namespaces".to_string()),
        ("GET", "/metrics".to_string()),
    ] {
        let r = call(READ_TOKEN, method, path.clone(), None).await;
        assert_eq!(r.status, 200, "read token: {method} {path}: {:?}", r.body);
    }
    for (method, path, body) in [
        ("POST", "/v1/api-keys".to_string(), Some(create)),
        (
            "PATCH",
            format!("/v1/api-keys/{id}"),
            Some(r#"{"note": "x"}"#),
        ),
        ("DELETE", format!("/v1/api-keys/{id}"), None),
        ("POST", format!("/v1/api-keys/{id}/disable"), None),
        ("POST", format!("/v1/api-keys/{id}/regenerate"), None),
        ("POST", "/v1/reload".to_string(), None),
        ("POST", "/v1/keys/verify".to_string(), Some(&verify_body)),
    ] {
        let r = call(READ_TOKEN, method, path.clone(), body).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (403, "insufficient_role"),
            "read token: {method} {path}"
        );
    }
    // The key is untouched, and every refused call is in the audit log under its token.
    let key = admin(&f.gw, "GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(key.json()["status"], "active");
    assert_eq!(key.json()["note"].as_str().unwrap_or(""), "");
    f.gw.gateway().audit.flush();
    let audit = admin(
        &f.gw,
        "GET",
        "/v1/audit?action=admin.denied&limit=100",
        None,
    )
    .await;
    let events = audit.json()["events"].as_array().cloned().unwrap();
    assert_eq!(events.len(), 14, "{events:?}");
    assert!(events.iter().any(|e| e["actor"] == "verifier"));
    assert!(events.iter().any(|e| e["actor"] == "auditor"));
    assert!(events.iter().all(|e| e["outcome"] == "failure"));
    f.gw.stop().await;
}

#[test]
fn a_bad_role_or_envoy_prefix_is_a_located_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.yaml");
    write(
        &path,
        "listen:\n  auth: nowhere\nauth:\n  envoy_path_prefix: envoy/\nadmin_tokens:\n  - {name: a, hash: \"sha256:0000000000000000000000000000000000000000000000000000000000000000\", role: root}\nroutes: []\n",
    );
    let (code, _, err) = support::process::run(&["check", "--config", "keygate.yaml"], dir.path());
    assert_eq!(code, 1, "{err}");
    for field in [
        "listen.auth",
        "auth.envoy_path_prefix",
        "admin_tokens[0].role",
    ] {
        assert!(err.contains(field), "{field} in {err}");
    }
}
