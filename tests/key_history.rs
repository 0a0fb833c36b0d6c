//! The exposure window: each key's recent requests, by time range and status, through a
//! restart, bounded; and the audit log by time range.

mod support;

use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;
use support::*;

fn rfc3339(gw: &TestGateway) -> String {
    let secs = gw
        .clock
        .wall()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

async fn history(gw: &TestGateway, id: &str, query: &str) -> Vec<Value> {
    let r = send(
        Req::get(gw.admin, &format!("/v1/api-keys/{id}/requests?{query}")).bearer(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()["requests"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_requests_in_a_time_range_survive_a_restart_with_their_addresses() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    let (record, key) = gw.create_key(new_key("acme", "production")).await;
    for _ in 0..5 {
        assert_eq!(
            send(Req::get(gw.proxy, "/before").bearer(&key))
                .await
                .status,
            200
        );
    }
    gw.clock.advance(Duration::from_secs(60));
    let since = rfc3339(&gw);
    // The window: 50 requests from two addresses, some refused for their scope... and a
    // query string that must not be kept.
    let mut sent = Vec::new();
    for i in 0..50 {
        let ip = if i % 2 == 0 { "127.0.0.1" } else { "127.0.0.2" };
        let r = send(
            Req::get(gw.proxy, &format!("/in/{i}?secret=s{i}"))
                .bearer(&key)
                .from(ip),
        )
        .await;
        assert_eq!(r.status, 200);
        sent.push((ip, format!("/in/{i}"), r.header("x-request-id").to_string()));
        gw.clock.advance(Duration::from_millis(100));
    }
    let until = rfc3339(&gw);
    gw.clock.advance(Duration::from_secs(60));
    for _ in 0..5 {
        assert_eq!(
            send(Req::get(gw.proxy, "/after").bearer(&key)).await.status,
            200
        );
    }
    // A refusal that identified the key is history too.
    let r = send(
        Req::get(gw.admin, &format!("/v1/api-keys/{}", record.id))
            .method("DELETE")
            .bearer(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = send(
        Req::get(gw.proxy, "/after-revoke")
            .bearer(&key)
            .from("127.0.0.2"),
    )
    .await;
    assert_eq!(r.status, 401);

    let all = history(&gw, &record.id, "").await;
    assert_eq!(all.len(), 61);
    assert_eq!(all[0]["path"], "/after-revoke");
    assert_eq!(all[0]["code"], "revoked_key");
    assert_eq!(all[0]["ip"], "127.0.0.2");
    assert_eq!(history(&gw, &record.id, "status=4xx").await.len(), 1);
    assert_eq!(history(&gw, &record.id, "status=200").await.len(), 60);

    // A restart: the history is flushed with usage, and read back by the next gateway.
    let g = gw.gateway().clone();
    tokio::task::spawn_blocking(move || g.housekeeping())
        .await
        .unwrap();
    let next = gw.beside().await;
    let window = history(&next, &record.id, &format!("since={since}&until={until}")).await;
    let got: Vec<(String, String, String)> = window
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 200);
            assert_eq!(r["method"], "GET");
            assert_eq!(r["code"], Value::Null);
            (
                r["ip"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
                r["request_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = sent
        .iter()
        .rev()
        .map(|(ip, p, id)| (ip.to_string(), p.clone(), id.clone()))
        .collect();
    assert_eq!(
        got, want,
        "exactly the window, newest first, with the addresses"
    );
    let times: Vec<&str> = window.iter().map(|r| r["time"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] > w[1]),
        "millisecond times, newest first"
    );

    for (query, field) in [
        ("since=yesterday", "since"),
        ("until=1", "until"),
        ("status=6xx", "status"),
        ("status=99", "status"),
    ] {
        let r = send(
            Req::get(
                next.admin,
                &format!("/v1/api-keys/{}/requests?{query}", record.id),
            )
            .bearer(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(r.status, 400, "{query}");
        assert_eq!(r.json()["field"], field, "{query}");
    }
    let r = send(Req::get(next.admin, "/v1/api-keys/nokey/requests").bearer(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 404);

    // The audit log by time: the revocation is inside a range around it, and outside one
    // that ends before it.
    let audit = |q: String| {
        let admin = next.admin;
        async move {
            let r = send(
                Req::get(admin, &format!("/v1/audit?action=key.revoked&{q}")).bearer(ADMIN_TOKEN),
            )
            .await;
            assert_eq!(r.status, 200);
            r.json()["events"].as_array().unwrap().len()
        }
    };
    assert_eq!(audit(String::new()).await, 1);
    assert_eq!(audit(format!("since={since}")).await, 1);
    assert_eq!(audit(format!("until={since}")).await, 0);
    let r = send(Req::get(next.admin, "/v1/audit?since=nope").bearer(ADMIN_TOKEN)).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["field"].clone()),
        (400, Value::from("since"))
    );
    next.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_stays_bounded() {
    let up = Upstream::start().await;
    let extra = "request_history:\n  per_key: 100\n";
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), extra)).await;
    let (record, key) = gw.create_key(new_key("acme", "production")).await;
    for i in 0..300 {
        assert_eq!(
            send(Req::get(gw.proxy, &format!("/r/{i}")).bearer(&key))
                .await
                .status,
            200
        );
    }
    let kept = history(&gw, &record.id, "").await;
    assert_eq!(kept.len(), 100);
    assert_eq!(kept[0]["path"], "/r/299");
    assert_eq!(kept[99]["path"], "/r/200");
    gw.stop().await;
}
