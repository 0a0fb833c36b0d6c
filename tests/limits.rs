//! Several named rate limits per key (README, "Keys"): spent all or nothing, named in the
//! RateLimit headers, kept across a change to another limit, refused with 400 naming the
//! field when they cannot be counted.

mod support;

use serde_json::json;
use support::process::{self, Process};
use support::*;

/// The real binary: a key with a wide and a narrow limit. The narrow one refuses twenty
/// requests; then it is removed, and the wide one shows it was charged only for the one
/// request both admitted (were the refusals charged, it would be spent; were it made anew,
/// it would be full).
#[test]
fn a_later_limit_refusing_leaves_the_earlier_ones_uncharged() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), ""),
    );
    let made = process::create_key_json(
        dir.path(),
        &["--limit", "wide=5/h", "--limit", "narrow=1/h"],
    );
    assert_eq!(
        made["rate_limits"],
        json!([{"name": "wide", "limit": "5/h"}, {"name": "narrow", "limit": "1/h"}])
    );
    let (id, key) = (
        made["id"].as_str().unwrap().to_string(),
        made["key"].as_str().unwrap().to_string(),
    );
    let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
    let (proxy, admin) = gw.addresses();
    rt.block_on(async {
        let first = send(Req::get(proxy, "/v1/x").bearer(&key)).await;
        assert_eq!(first.status, 200);
        assert_eq!(
            first.header("ratelimit-policy"),
            "\"wide\";q=5;w=3600, \"narrow\";q=1;w=3600"
        );
        assert!(
            first.header("ratelimit").starts_with("\"wide\";r=4;")
                && first.header("ratelimit").contains("\"narrow\";r=0;"),
            "{}",
            first.header("ratelimit")
        );
        for _ in 0..20 {
            let r = send(Req::get(proxy, "/v1/x").bearer(&key)).await;
            assert_eq!((r.status.as_u16(), r.code()), (429, "rate_limited".into()));
            assert!(
                r.header("ratelimit").starts_with("\"narrow\";r=0;"),
                "{}",
                r.header("ratelimit")
            );
            assert!(!r.header("retry-after").is_empty());
        }
        assert_eq!(up.hits(), 1, "no refused request reached the upstream");
        let r = send(
            Req::get(admin, &format!("/v1/api-keys/{id}"))
                .method("PATCH")
                .bearer(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(json!({"rate_limits": [{"name": "wide", "limit": "5/h"}]}).to_string()),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        let next = send(Req::get(proxy, "/v1/x").bearer(&key)).await;
        assert_eq!(next.status, 200);
        assert!(
            next.header("ratelimit").starts_with("\"wide\";r=3;"),
            "the wide limit kept its count, charged for the admitted request only: {}",
            next.header("ratelimit")
        );
    });
    drop(gw);
}

/// Limits that cannot be counted are refused with 400 naming `rate_limits` (the CLI: one
/// line naming `--limit`), and nothing is written.
#[tokio::test]
async fn limits_that_cannot_be_counted_are_refused() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    let limit = |name: &str, rate: &str| json!({"name": name, "limit": rate});
    let eleven: Vec<_> = (0..11).map(|i| limit(&format!("l{i}"), "1/s")).collect();
    for bad in [
        json!([limit("Upper", "1/s")]),
        json!([limit("", "1/s")]),
        json!([limit(&"x".repeat(33), "1/s")]),
        json!([limit("key", "1/s")]),
        json!([limit("quota", "1/s")]),
        json!([limit("a", "1/s"), limit("a", "2/s")]),
        json!([limit("a", "10/day")]),
        json!([limit("a", "0/s")]),
        json!([{"name": "a", "limit": "1/s", "burst": 0}]),
        json!([{"name": "a", "limit": "1/s", "burst": 1_000_001}]),
        json!([{"name": "a", "limit": "1/s", "extra": 1}]),
        json!(eleven),
        json!("1/s"),
    ] {
        let r = admin(
            &gw,
            "POST",
            "/v1/api-keys",
            Some(json!({"namespace": "acme", "environment": "production", "rate_limits": bad})),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some("rate_limits")),
            "{bad}: {:?}",
            r.json()
        );
    }
    let listed = admin(&gw, "GET", "/v1/api-keys", None).await;
    assert_eq!(listed.json()["keys"], json!([]), "nothing was written");

    let dir = gw.dir.path();
    for (flag, says) in [
        ("nocolon", "--limit: `nocolon` is not NAME=RATE"),
        ("a=1/s:x", "--limit: `a=1/s:x` is not NAME=RATE"),
        ("a=5/fortnight", "--limit:"),
        ("key=1/s", "--limit:"),
    ] {
        let (code, _, err) = process::run(
            &[
                "--config",
                "keygate.yaml",
                "keys",
                "create",
                "--namespace",
                "acme",
                "--environment",
                "production",
                "--limit",
                flag,
            ],
            dir,
        );
        assert_ne!(code, 0, "{flag}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(says), "{flag}: {err}");
    }
    gw.stop().await;
}
