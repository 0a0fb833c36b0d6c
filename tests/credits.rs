//! Limited-use keys: credits spent exactly under concurrency, refilled on the calendar,
//! given back when a later check refuses, topped up, and never handed back by a crash.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::process::Process;
use support::*;

/// Creates a key with `body`'s settings through the admin API: (id, secret).
async fn key_with(gw: &TestGateway, mut body: serde_json::Value) -> (String, String) {
    body["namespace"] = "acme".into();
    body["environment"] = "production".into();
    let r = admin(gw, "POST", "/v1/api-keys", Some(body)).await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

async fn left(gw: &TestGateway, id: &str) -> u64 {
    admin(gw, "GET", &format!("/v1/api-keys/{id}"), None)
        .await
        .json()["credits"]["remaining"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_at_once_spend_exactly_a_hundred_credits() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    let (id, key) = key_with(&gw, json!({"credits": {"remaining": 100}})).await;
    let (admitted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let (key, admitted, refused, proxy) =
            (key.clone(), admitted.clone(), refused.clone(), gw.proxy);
        tasks.push(tokio::spawn(async move {
            let r = send(Req::get(proxy, "/v1/x").bearer(&key)).await;
            match (r.status.as_u16(), r.code().as_str()) {
                (200, _) => admitted.fetch_add(1, Ordering::Relaxed),
                (429, "credits_exhausted") => {
                    assert!(
                        r.headers.get("retry-after").is_none(),
                        "no refill, no Retry-After"
                    );
                    refused.fetch_add(1, Ordering::Relaxed)
                }
                other => panic!("{other:?}"),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        (
            admitted.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed)
        ),
        (100, 900)
    );
    assert_eq!(up.hits(), 100, "only the admitted reached the upstream");
    assert_eq!(left(&gw, &id).await, 0);
    gw.stop().await;
}

#[tokio::test]
async fn refills_come_on_the_calendar_and_a_refused_request_spends_nothing() {
    let up = Upstream::start().await;
    let routes = format!(
        "{}{}",
        route("/", up.addr, "production", ""),
        route("/reports", up.addr, "production", "cost: 5")
    );
    let gw = TestGateway::start(&config_yaml(&routes, "")).await;
    // 2030-03-06T12:00:00Z on the gateway's clock: a fixed day, so the calendar below holds.
    let noon = keygate::clock::parse_rfc3339("2030-03-06T12:00:00Z").unwrap();
    let now = gw.clock.unix_secs();
    gw.clock
        .advance(Duration::from_secs((noon - now).try_into().unwrap()));

    let (daily_id, daily) = key_with(
        &gw,
        json!({"credits": {"remaining": 2, "refill": {"amount": 12, "interval": "daily"}}}),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(
            send(Req::get(gw.proxy, "/v1/x").bearer(&daily))
                .await
                .status,
            200
        );
    }
    let r = send(Req::get(gw.proxy, "/v1/x").bearer(&daily)).await;
    assert_eq!(r.code(), "credits_exhausted");
    assert_eq!(
        r.header("retry-after"),
        "43200",
        "twelve hours to 00:00 UTC"
    );
    // One second before midnight: still none. At midnight: the refill's 12.
    gw.clock.advance(Duration::from_secs(43_199));
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&daily))
            .await
            .code(),
        "credits_exhausted"
    );
    gw.clock.advance(Duration::from_secs(1));
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&daily))
            .await
            .status,
        200
    );
    assert_eq!(left(&gw, &daily_id).await, 11);
    // A route's cost: 5 a request.
    assert_eq!(
        send(Req::get(gw.proxy, "/reports/q").bearer(&daily))
            .await
            .status,
        200
    );
    assert_eq!(left(&gw, &daily_id).await, 6);

    // Monthly on the 15th: from March 7th, the refill comes on March 15th.
    let (_, monthly) = key_with(
        &gw,
        json!({"credits": {"remaining": 0, "refill": {"amount": 1, "interval": "monthly", "day_of_month": 15}}}),
    )
    .await;
    let r = send(Req::get(gw.proxy, "/v1/x").bearer(&monthly)).await;
    assert_eq!(r.header("retry-after"), (8 * 86_400).to_string());
    gw.clock.advance(Duration::from_secs(8 * 86_400));
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&monthly))
            .await
            .status,
        200
    );

    // A rate limit that refuses after the credits were spent gives them back.
    let (limited_id, limited) = key_with(
        &gw,
        json!({"credits": {"remaining": 10}, "rate_limit": "1/m"}),
    )
    .await;
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&limited))
            .await
            .status,
        200
    );
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&limited))
            .await
            .code(),
        "rate_limited"
    );
    assert_eq!(
        left(&gw, &limited_id).await,
        9,
        "the refused request spent nothing"
    );
    gw.stop().await;
}

#[tokio::test]
async fn credits_are_topped_up_and_set_through_the_api_and_audited() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    let (id, key) = key_with(&gw, json!({"credits": {"remaining": 3}})).await;
    for _ in 0..2 {
        send(Req::get(gw.proxy, "/v1/x").bearer(&key)).await;
    }
    let path = format!("/v1/api-keys/{id}/credits");
    let r = admin(&gw, "POST", &path, Some(json!({"add": 10}))).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.json()["credits"]["remaining"],
        11,
        "1 left + 10, what was spent still counts"
    );
    let r = admin(&gw, "POST", &path, Some(json!({"set": 2}))).await;
    assert_eq!(r.json()["credits"]["remaining"], 2, "set anew");
    for _ in 0..2 {
        assert_eq!(
            send(Req::get(gw.proxy, "/v1/x").bearer(&key)).await.status,
            200
        );
    }
    assert_eq!(
        send(Req::get(gw.proxy, "/v1/x").bearer(&key)).await.code(),
        "credits_exhausted"
    );
    for (body, field) in [
        (json!({}), "body"),
        (json!({"add": 1, "set": 2}), "body"),
        (json!({"add": -1}), "add"),
    ] {
        let r = admin(&gw, "POST", &path, Some(body.clone())).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some(field)),
            "{body}"
        );
    }
    let audit = admin(
        &gw,
        "GET",
        &format!("/v1/audit?key_id={id}&action=key.credits_set"),
        None,
    )
    .await
    .json();
    assert_eq!(audit["events"].as_array().unwrap().len(), 2);
    // A key without credits has none to top up.
    let (plain, _) = key_with(&gw, json!({})).await;
    let r = admin(
        &gw,
        "POST",
        &format!("/v1/api-keys/{plain}/credits"),
        Some(json!({"add": 1})),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["field"].as_str()),
        (400, Some("credits"))
    );
    gw.stop().await;
}

#[tokio::test]
async fn bad_credits_are_refused_naming_the_field() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    for credits in [
        json!({"remaining": -1}),
        json!({"remaining": 1_000_000_000_001u64}),
        json!({"remaining": 5, "refill": {"interval": "daily"}}),
        json!({"remaining": 5, "refill": {"amount": 5, "interval": "weekly"}}),
        json!({"remaining": 5, "refill": {"amount": 0, "interval": "daily"}}),
        json!({"remaining": 5, "refill": {"amount": 5, "interval": "monthly", "day_of_month": 32}}),
        json!({"remaining": 5, "set_at": "2026-01-01T00:00:00Z"}),
    ] {
        let r = admin(
            &gw,
            "POST",
            "/v1/api-keys",
            Some(json!({"namespace": "acme", "environment": "production", "credits": credits})),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some("credits")),
            "{credits}: {:?}",
            r.json()
        );
    }
    gw.stop().await;
}

/// The real binary, killed with SIGKILL while it spends: after a restart no spent credit
/// comes back, and at most one lease of unspent credits is lost (README, "Credits").
#[test]
fn a_crash_never_hands_credits_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&route("/", up.addr, "production", ""), ""),
    );
    let made = support::process::create_key_json(dir.path(), &["--credits", "1000"]);
    let (id, key) = (
        made["id"].as_str().unwrap().to_string(),
        made["key"].as_str().unwrap().to_string(),
    );
    let mut admitted = 0u64;
    for round in 0..3 {
        let gw = Process::spawn(&["--config", "keygate.yaml", "serve"], dir.path(), &[]);
        let (proxy, _) = gw.addresses();
        let sent = 37 + round * 11;
        rt.block_on(async {
            for _ in 0..sent {
                if send(Req::get(proxy, "/v1/x").bearer(&key)).await.status == 200 {
                    admitted += 1;
                }
            }
        });
        gw.signal("KILL");
        drop(gw);
    }
    let (code, out, err) = support::process::run(
        &["--config", "keygate.yaml", "keys", "show", &id, "--json"],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let left = shown["credits"]["remaining"].as_u64().unwrap();
    eprintln!(
        "credits: {admitted} admitted over 3 runs each ended by SIGKILL; {left} left of 1000 (lease 10 each run)"
    );
    assert_eq!(admitted, 37 + 48 + 59);
    assert!(left <= 1000 - admitted, "no spent credit came back: {left}");
    assert!(
        left + 3 * 10 >= 1000 - admitted,
        "at most a lease a crash was lost: {left}"
    );
}

#[test]
fn the_cli_makes_tops_up_and_shows_credits() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", "127.0.0.1:9".parse().unwrap(), "production", ""),
            "",
        ),
    );
    let made = support::process::create_key_json(
        dir.path(),
        &["--credits", "100", "--refill", "1000/month@15"],
    );
    assert_eq!(
        made["credits"]["refill"],
        json!({"amount": 1000, "interval": "monthly", "day_of_month": 15})
    );
    assert_eq!(made["credits"]["remaining"], 100);
    let id = made["id"].as_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["--config", "keygate.yaml", "keys"];
        all.extend_from_slice(args);
        support::process::run(&all, dir.path())
    };
    let (code, out, err) = run(&["credits", id, "--add", "5"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("Key {id}: 105 credits left."));
    let (code, out, _) = run(&["credits", id, "--set", "7", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["credits"]["remaining"], 7);
    let (code, _, err) = run(&[
        "create",
        "--namespace",
        "acme",
        "--environment",
        "production",
        "--credits",
        "5",
        "--refill",
        "5/week",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--refill"), "{err}");
    let (code, _, err) = run(&["update", id, "--clear-credits"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["credits", id, "--add", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("--credits: the key has no credits"), "{err}");
}
