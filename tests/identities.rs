//! Identities (README, "Keys"): a customer's rate limits, quota, credits and metadata,
//! shared by every key that names them, so more keys never mean more requests; managed at
//! `/v1/identities`, kept in the store, forwarded as `X-Keygate-Identity`.

mod support;

use serde_json::{json, Value};
use support::process::Process;
use support::*;

async fn call(
    admin_addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut req = Req::get(admin_addr, path)
        .method(method)
        .bearer(ADMIN_TOKEN);
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    send(req).await
}

async fn key_of(admin_addr: std::net::SocketAddr, identity: Option<&str>) -> String {
    let r = call(
        admin_addr,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production", "identity": identity})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    assert_eq!(r.json()["identity"], json!(identity));
    r.json()["key"].as_str().unwrap().to_string()
}

async fn codes(proxy: std::net::SocketAddr, keys: [&String; 3]) -> Vec<String> {
    let mut out = Vec::new();
    for k in keys {
        out.push(send(Req::get(proxy, "/v1/x").bearer(k)).await.code());
    }
    out
}

fn audit_actions(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["action"].as_str().map(str::to_string))
        .filter(|a| a.starts_with("identity."))
        .collect()
}

/// The real binary: two keys of one identity share its rate limit, its quota and its
/// credits; the upstream hears the identity and its metadata; the identity's usage sums
/// its keys'; a change to the identity is in force at once; removing it leaves the keys
/// working, still named.
#[test]
fn keys_of_one_identity_share_its_limits() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", "forward_meta: [plan]"),
            "",
        ),
    );
    let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
    let (proxy, admin_addr) = gw.addresses();
    rt.block_on(async {
        let made = call(
            admin_addr,
            "PUT",
            "/v1/identities/cus_1",
            Some(json!({"rate_limits": [{"name": "hourly", "limit": "3/h"}], "meta": {"plan": "pro"}})),
        )
        .await;
        assert_eq!(made.status, 201, "{:?}", made.json());
        assert_eq!(made.header("location"), "/v1/identities/cus_1");
        let (a, b) = (key_of(admin_addr, Some("cus_1")).await, key_of(admin_addr, Some("cus_1")).await);
        // The listing finds an identity's keys, and only them.
        key_of(admin_addr, Some("cus_2")).await;
        let listed = call(admin_addr, "GET", "/v1/api-keys?identity=cus_1&status=all", None).await;
        assert_eq!(listed.json()["keys"].as_array().map(Vec::len), Some(2), "{:?}", listed.json());
        let listed = call(admin_addr, "GET", "/v1/api-keys?identity=nobody", None).await;
        assert_eq!(listed.json()["keys"], json!([]));
        let refused = call(admin_addr, "GET", "/v1/api-keys?identity=a%07b", None).await;
        assert_eq!((refused.status.as_u16(), refused.json()["field"].clone()), (400, json!("identity")));
        let mut admitted = 0;
        for i in 0..8 {
            let r = send(Req::get(proxy, "/v1/x").bearer(if i % 2 == 0 { &a } else { &b })).await;
            match r.status.as_u16() {
                200 => admitted += 1,
                429 => {
                    assert_eq!(r.code(), "rate_limited");
                    assert!(r.header("ratelimit").starts_with("\"identity.hourly\";r=0;"), "{}", r.header("ratelimit"));
                }
                other => panic!("{other}: {:?}", r.json()),
            }
        }
        assert_eq!(admitted, 3, "two keys, one limit");
        let seen = up.last();
        assert_eq!(seen.headers["x-keygate-identity"], "cus_1");
        assert_eq!(seen.headers["x-keygate-meta-plan"], "pro");

        let usage = call(admin_addr, "GET", "/v1/identities/cus_1/usage", None).await.json();
        assert_eq!(usage["identity"], "cus_1");
        assert_eq!(usage["requests_today"], 8, "{usage}");

        // A quota and credits instead: two a day over both keys, then three credits.
        let r = call(admin_addr, "PUT", "/v1/identities/cus_1", Some(json!({"quota": "2/day"}))).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(codes(proxy, [&a, &b, &a]).await, ["", "", "quota_exceeded"]);
        let r = call(admin_addr, "PUT", "/v1/identities/cus_1", Some(json!({"credits": {"remaining": 3}}))).await;
        assert_eq!(r.json()["credits"]["remaining"], 3, "{:?}", r.json());
        assert_eq!(codes(proxy, [&a, &b, &a]).await, ["", "", ""]);
        assert_eq!(codes(proxy, [&b, &a, &b]).await, ["credits_exhausted", "credits_exhausted", "credits_exhausted"]);
        let shown = call(admin_addr, "GET", "/v1/identities/cus_1", None).await.json();
        assert_eq!(shown["credits"]["remaining"], 0, "{shown}");

        // A patch removing the credits; then the identity goes, and its keys stay named.
        let r = call(admin_addr, "PATCH", "/v1/identities/cus_1", Some(json!({"credits": null}))).await;
        assert_eq!((r.status.as_u16(), r.json().get("credits")), (200, None), "{:?}", r.json());
        assert_eq!(codes(proxy, [&a, &b, &a]).await, ["", "", ""]);
        let listed = call(admin_addr, "GET", "/v1/identities", None).await.json();
        assert_eq!(listed["identities"].as_array().map(Vec::len), Some(1));
        let r = call(admin_addr, "DELETE", "/v1/identities/cus_1", None).await;
        assert_eq!(r.status, 200);
        let r = call(admin_addr, "GET", "/v1/identities/cus_1", None).await;
        assert_eq!((r.status.as_u16(), r.code()), (404, "identity_not_found".into()));
        assert_eq!(send(Req::get(proxy, "/v1/x").bearer(&a)).await.status, 200);
        assert_eq!(up.last().headers["x-keygate-identity"], "cus_1");
        assert!(up.last().headers.get("x-keygate-meta-plan").is_none());

        // A client cannot claim an identity.
        let plain = key_of(admin_addr, None).await;
        send(Req::get(proxy, "/v1/x").bearer(&plain).header("x-keygate-identity", "cus_9").header("x_keygate_identity", "cus_9")).await;
        assert!(up.last().headers.get("x-keygate-identity").is_none());
        assert!(up.last().headers.get("x_keygate_identity").is_none());
    });
    let actions = audit_actions(dir.path());
    assert_eq!(
        actions,
        [
            "identity.created",
            "identity.updated",
            "identity.updated",
            "identity.updated",
            "identity.deleted"
        ]
    );
    drop(gw);
}

/// Bad identities are refused with 400 naming the field, and nothing is written.
#[tokio::test]
async fn bad_identities_are_refused_by_field() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    let long = "x".repeat(256);
    for (path, body, field) in [
        (
            "/v1/identities/cus_1",
            json!({"quota": "5/fortnight"}),
            "quota",
        ),
        (
            "/v1/identities/cus_1",
            json!({"rate_limits": [{"name": "key", "limit": "1/s"}]}),
            "rate_limits",
        ),
        (
            "/v1/identities/cus_1",
            json!({"credits": {"remaining": -1}}),
            "credits",
        ),
        (
            "/v1/identities/cus_1",
            json!({"credits": {"refill": {"amount": 5}}}),
            "credits",
        ),
        ("/v1/identities/cus_1", json!({"meta": "pro"}), "meta"),
        (
            "/v1/identities/cus_1",
            json!({"meta": {"big": "x".repeat(5000)}}),
            "meta",
        ),
        ("/v1/identities/cus_1", json!({"plan": "pro"}), "plan"),
        ("/v1/identities/a%0Ab", json!({}), "id"),
        (&format!("/v1/identities/{long}"), json!({}), "id"),
    ] {
        let r = admin(&gw, "PUT", path, Some(body.clone())).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some(field)),
            "{path} {body}: {:?}",
            r.json()
        );
    }
    for identity in [json!("a\u{7}b"), json!(""), json!(long), json!(5)] {
        let r = admin(
            &gw,
            "POST",
            "/v1/api-keys",
            Some(json!({"namespace": "acme", "environment": "production", "identity": identity})),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some("identity")),
            "{identity}"
        );
    }
    let listed = admin(&gw, "GET", "/v1/identities", None).await;
    assert_eq!(listed.json()["identities"], json!([]));
    let r = admin(&gw, "PATCH", "/v1/identities/nobody", Some(json!({}))).await;
    assert_eq!(r.code(), "identity_not_found");
    gw.stop().await;
}

/// `keygate identities`: put (made, then replaced, audited only when it changed), list,
/// show and delete, kept in the store a running gateway reads; a bad value is one line
/// naming the flag, and changes nothing.
#[test]
fn the_cli_manages_identities() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", "127.0.0.1:9".parse().unwrap(), "production", ""),
            "",
        ),
    );
    let run = |args: &[&str]| {
        let mut all = vec!["--config", "keygate.yaml", "identities"];
        all.extend_from_slice(args);
        support::process::run(&all, dir.path())
    };
    let (code, out, err) = run(&[
        "put",
        "cus_1",
        "--limit",
        "hourly=100/h:10",
        "--quota",
        "1000/day",
        "--credits",
        "50",
        "--refill",
        "50/month",
        "--meta",
        "plan=pro",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let made: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        made["rate_limits"],
        json!([{"name": "hourly", "limit": "100/h", "burst": 10}])
    );
    assert_eq!(made["quota"], "1000/day");
    assert_eq!(made["credits"]["remaining"], 50);
    assert_eq!(
        made["credits"]["refill"],
        json!({"amount": 50, "interval": "monthly"})
    );
    assert_eq!(made["meta"], json!({"plan": "pro"}));
    let (code, out, _) = run(&["put", "cus_1", "--quota", "5/day"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("Replaced identity cus_1"), "{out}");
    let (code, _, _) = run(&["put", "cus_1", "--quota", "5/day"]);
    assert_eq!(code, 0);
    let (code, out, err) = run(&["put", "cus_1", "--quota", "5/fortnight"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("keygate: error: --quota: ") && err.trim().lines().count() == 1,
        "{err}"
    );
    let (code, _, err) = run(&["put", "a\u{7}b"]);
    assert_eq!(code, 1);
    assert!(err.contains("identity id"), "{err}");
    let (code, out, _) = run(&["list", "--json"]);
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["identities"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed["identities"][0]["quota"], "5/day");
    assert!(
        listed["identities"][0].get("credits").is_none(),
        "a put replaces whole"
    );
    let (code, out, _) = run(&["show", "cus_1", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["id"], "cus_1");
    let (code, _, err) = run(&["show", "cus_2"]);
    assert_eq!(
        (code, err.trim()),
        (1, "keygate: error: no identity has id `cus_2`")
    );
    let (code, _, _) = run(&["delete", "cus_1"]);
    assert_eq!(code, 0);
    let (code, _, _) = run(&["delete", "cus_1"]);
    assert_eq!(code, 1);
    let (_, out, _) = run(&["list"]);
    assert_eq!(out.trim(), "No identities.");
    assert_eq!(
        audit_actions(dir.path()),
        ["identity.created", "identity.updated", "identity.deleted"]
    );
}
