//! Key changes through the admin API are applied to the snapshot in force as deltas: live
//! on the very next request, without reading the store again, and sharing every key shard
//! they do not touch. A write by another process in between makes the gateway read the
//! whole store instead, so that change is not missed.
//!
//! The gateways here run without the file watch, so nothing but the admin API's own path
//! can make a change live.

mod support;

use serde_json::{json, Value};
use support::*;

async fn proxy(gw: &TestGateway, key: &str, path: &str) -> (u16, String) {
    let a = send(Req::get(gw.proxy, path).bearer(key)).await;
    (a.status.as_u16(), a.code())
}

async fn create(gw: &TestGateway, body: Value) -> (String, String) {
    let a = admin(gw, "POST", "/v1/api-keys", Some(body)).await;
    assert_eq!(a.status, 201, "{:?}", a.json());
    let v = a.json();
    let secret = v["key"].as_str().unwrap().to_string();
    support::ledger::secret(&secret);
    (v["id"].as_str().unwrap().to_string(), secret)
}

fn acme() -> Value {
    json!({"namespace": "acme", "environment": "production"})
}

async fn setup() -> (Upstream, TestGateway) {
    let up = Upstream::start().await;
    let config = config_yaml(&route("/", up.addr, "production", ""), "");
    let gw = TestGateway::start_with(&config, false).await;
    for _ in 0..50 {
        let made = gw
            .with_op(|op| keygate::keys::lifecycle::create(op, new_key("acme", "production")))
            .unwrap();
        support::ledger::secret(&made.1);
    }
    assert_eq!(gw.reload().await.0, 200);
    (up, gw)
}

#[tokio::test]
async fn every_admin_change_is_a_delta_live_on_the_next_request() {
    let (_up, gw) = setup().await;
    let reloads = counter(gw.admin, "keygate_reloads_total").await;
    let generation = gw.gateway().snapshot.load().generation;

    // Create: live at once, and only the shards the new key lives in were copied.
    let before = gw.gateway().snapshot.load_full();
    let (id, key) = create(&gw, acme()).await;
    assert_eq!(proxy(&gw, &key, "/v1/x").await.0, 200);
    let after = gw.gateway().snapshot.load_full();
    assert_eq!(after.key_count(), 51);
    let copied = after.key_index().unshared_shards(before.key_index());
    assert!(copied <= 2, "a create copied {copied} shards");

    // Update: the new scopes decide the next request.
    let a = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"scopes": ["read:/v1/public/**"]})),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    assert_eq!(
        proxy(&gw, &key, "/v1/x").await,
        (403, "scope_denied".into())
    );
    assert_eq!(proxy(&gw, &key, "/v1/public/a").await.0, 200);

    // Disable and enable.
    let path = format!("/v1/api-keys/{id}");
    assert_eq!(
        admin(&gw, "POST", &format!("{path}/disable"), None)
            .await
            .status,
        200
    );
    assert_eq!(
        proxy(&gw, &key, "/v1/public/a").await,
        (401, "inactive_key".into())
    );
    assert_eq!(
        admin(&gw, "POST", &format!("{path}/enable"), None)
            .await
            .status,
        200
    );
    assert_eq!(proxy(&gw, &key, "/v1/public/a").await.0, 200);

    // Regenerate: the old secret's hash leaves the index, the new one joins it.
    let a = admin(&gw, "POST", &format!("{path}/regenerate"), None).await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    let new_key = a.json()["key"].as_str().unwrap().to_string();
    support::ledger::secret(&new_key);
    assert_eq!(
        proxy(&gw, &key, "/v1/public/a").await,
        (401, "unknown_key".into())
    );
    assert_eq!(proxy(&gw, &new_key, "/v1/public/a").await.0, 200);

    // Rotate: two records in one change, both live.
    let a = admin(
        &gw,
        "POST",
        &format!("{path}/rotate"),
        Some(json!({"grace_seconds": 3600})),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.json());
    let rotated = a.json()["key"].as_str().unwrap().to_string();
    support::ledger::secret(&rotated);
    assert_eq!(proxy(&gw, &new_key, "/v1/public/a").await.0, 200);
    assert_eq!(proxy(&gw, &rotated, "/v1/public/a").await.0, 200);

    // Revoke.
    assert_eq!(admin(&gw, "DELETE", &path, None).await.status, 200);
    assert_eq!(
        proxy(&gw, &new_key, "/v1/public/a").await,
        (401, "revoked_key".into())
    );
    assert_eq!(proxy(&gw, &rotated, "/v1/public/a").await.0, 200);

    // Seven changes, none of them a reload, each a generation.
    assert_eq!(
        counter(gw.admin, "keygate_key_changes_applied_total").await,
        7
    );
    assert_eq!(counter(gw.admin, "keygate_reloads_total").await, reloads);
    assert_eq!(gw.gateway().snapshot.load().generation, generation + 7);

    // The deltas add up to the store: a whole read decides every key the same way.
    let delta = gw.gateway().snapshot.load_full();
    assert_eq!(gw.reload().await.0, 200);
    let whole = gw.gateway().snapshot.load_full();
    assert_eq!(whole.key_count(), delta.key_count());
    for k in delta.keys() {
        let w = whole.key_by_id(&k.id).expect("the same ids");
        assert_eq!(
            (
                &w.namespace,
                w.status,
                w.expires_at(),
                format!("{:?}", w.scopes)
            ),
            (
                &k.namespace,
                k.status,
                k.expires_at(),
                format!("{:?}", k.scopes)
            ),
            "key {}",
            k.id
        );
    }
    for (secret, want) in [(&key, 401), (&new_key, 401), (&rotated, 200)] {
        assert_eq!(proxy(&gw, secret, "/v1/public/a").await.0, want);
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_write_by_another_process_in_between_is_read_whole() {
    let (_up, gw) = setup().await;
    let reloads = counter(gw.admin, "keygate_reloads_total").await;

    // A change through the API: a delta, and the gateway now remembers the store it wrote.
    let (_, first) = create(&gw, acme()).await;
    assert_eq!(
        counter(gw.admin, "keygate_key_changes_applied_total").await,
        1
    );

    // Another process (the CLI) writes a key; with no file watch it is not live yet.
    let (_, cli_key) = gw
        .with_op(|op| keygate::keys::lifecycle::create(op, new_key("acme", "production")))
        .unwrap();
    support::ledger::secret(&cli_key);
    assert_eq!(
        proxy(&gw, &cli_key, "/v1/x").await,
        (401, "unknown_key".into())
    );

    // The admin API's next write starts from a store the snapshot was not read from, and
    // that the gateway did not write: it reads the file again rather than its own memory of
    // it (which would drop the CLI's key), and applying its own record alone would miss the
    // CLI's key, so the gateway reads the whole store.
    let (_, api_key) = create(&gw, acme()).await;
    assert_eq!(proxy(&gw, &api_key, "/v1/x").await.0, 200);
    assert_eq!(proxy(&gw, &cli_key, "/v1/x").await.0, 200);
    assert_eq!(
        counter(gw.admin, "keygate_reloads_total").await,
        reloads + 1
    );
    assert_eq!(
        counter(gw.admin, "keygate_key_changes_applied_total").await,
        1
    );

    // Every key is in the file, not only in the snapshot: a whole read still accepts them.
    assert_eq!(gw.reload().await.0, 200);
    for key in [&first, &cli_key, &api_key] {
        assert_eq!(proxy(&gw, key, "/v1/x").await.0, 200);
    }

    // Now the snapshot is the store again, and the next change is a delta.
    let (_, next) = create(&gw, acme()).await;
    assert_eq!(proxy(&gw, &next, "/v1/x").await.0, 200);
    assert_eq!(
        counter(gw.admin, "keygate_key_changes_applied_total").await,
        2
    );
    assert_eq!(
        counter(gw.admin, "keygate_reloads_total").await,
        reloads + 2
    );
    gw.stop().await;
}

/// A delta hands the changed key the same rate-limit bucket when its limit did not change,
/// so editing a key never refills its budget; a new limit starts a new bucket.
#[tokio::test]
async fn a_delta_keeps_the_bucket_of_an_unchanged_limit() {
    let (_up, gw) = setup().await;
    let (id, key) = create(
        &gw,
        json!({"namespace": "acme", "environment": "production", "rate_limit": "2/h", "burst": 2}),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(proxy(&gw, &key, "/v1/x").await.0, 200);
    }
    assert_eq!(
        proxy(&gw, &key, "/v1/x").await,
        (429, "rate_limited".into())
    );

    let path = format!("/v1/api-keys/{id}");
    let a = admin(&gw, "PATCH", &path, Some(json!({"note": "edited"}))).await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    assert_eq!(
        proxy(&gw, &key, "/v1/x").await,
        (429, "rate_limited".into()),
        "an edit refilled the bucket"
    );

    let a = admin(
        &gw,
        "PATCH",
        &path,
        Some(json!({"rate_limit": "3/h", "burst": 3})),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    assert_eq!(
        proxy(&gw, &key, "/v1/x").await.0,
        200,
        "a new limit, a new bucket"
    );
    assert_eq!(
        counter(gw.admin, "keygate_key_changes_applied_total").await,
        3
    );
    gw.stop().await;
}
