//! The admin API and the key lifecycle, end to end: every route against a running gateway,
//! and the proxy's behaviour after each change.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::process::{create_key_json, keygate_ok};
use support::*;

/// A gateway with one production route, and tiers: `tiny` allows 2 keys (namespace `small`).
/// Two more environments are declared: `staging`, and one whose prefix is too long for a key.
async fn setup() -> (Upstream, TestGateway) {
    let up = Upstream::start().await;
    let extra = format!(
        "tiers:\n  tiny: {{max_keys: 2}}\n  unlimited: {{}}\nnamespaces:\n  small: {{tier: tiny}}\n  acme: {{tier: unlimited}}\nrotation:\n  quiet_period: 10m\nenvironments: [staging, {}]\n",
        "e".repeat(31)
    );
    let extra = extra.as_str();
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), extra)).await;
    (up, gw)
}

async fn proxy(gw: &TestGateway, key: &str) -> Answer {
    send(Req::get(gw.proxy, "/v1/things").bearer(key)).await
}

fn secret(v: &Value) -> String {
    v["key"]
        .as_str()
        .expect("the answer carries the secret")
        .to_string()
}

#[tokio::test]
async fn create_read_list_and_the_secret_appears_once() {
    let (_up, gw) = setup().await;
    let r = admin(&gw, "POST", "/v1/api-keys", Some(json!({
        "namespace": "acme", "environment": "production", "name": "ci deploy",
        "scopes": ["read:/v1/**"], "allowed_cidrs": ["127.0.0.0/8"], "rate_limit": "100/s", "burst": 200,
        "expires_at": "30d", "note": "for the pipeline"
    }))).await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let created = r.json();
    let key = secret(&created);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(r.header("location"), format!("/v1/api-keys/{id}"));
    assert_eq!(created["created_by"], "tests");
    assert_eq!(created["status"], "active");
    assert_eq!(created["rate_limit"], "100/s");
    // Live at once: the answer came after the reload.
    assert_eq!(proxy(&gw, &key).await.status, 200);
    let shown = admin(&gw, "GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(shown.status, 200);
    assert!(
        shown.json().get("key").is_none(),
        "the secret is never shown again"
    );
    assert!(!String::from_utf8_lossy(&shown.body).contains(&key));
    assert_eq!(shown.json()["last_used_ip"], "127.0.0.1");
    assert!(shown.json()["last_used_at"].is_string());
    let list = admin(&gw, "GET", "/v1/api-keys", None).await.json();
    assert_eq!(list["keys"].as_array().unwrap().len(), 1);
    assert!(list["next_cursor"].is_null());
    assert!(!list.to_string().contains(&key));
    let r = admin(&gw, "GET", "/v1/api-keys/ffffffff", None).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (404, "key_not_found")
    );
    gw.stop().await;
}

#[tokio::test]
async fn bad_bodies_name_the_field() {
    let (_up, gw) = setup().await;
    for (body, field) in [
        (
            json!({"namespace": "acme", "environment": "production", "allowed_cidrs": ["10.0.0.0/33"]}),
            "allowed_cidrs",
        ),
        (
            json!({"namespace": "acme", "environment": "production", "scopes": ["delete:/x"]}),
            "scopes",
        ),
        (
            json!({"namespace": "acme", "environment": "production", "rate_limit": "fast"}),
            "rate_limit",
        ),
        (
            json!({"namespace": "acme", "environment": "production", "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            json!({"namespace": "Not Valid", "environment": "production"}),
            "namespace",
        ),
        (
            json!({"namespace": "acme", "environment": "production", "colour": "blue"}),
            "colour",
        ),
        (json!({"environment": "production"}), "namespace"),
        // A typo: no route serves it, so the key could never be used.
        (
            json!({"namespace": "acme", "environment": "prodution"}),
            "environment",
        ),
    ] {
        let r = admin(&gw, "POST", "/v1/api-keys", Some(body.clone())).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (400, "invalid_request"),
            "{body}"
        );
        assert_eq!(r.json()["field"], field, "{body}: {}", r.json());
        assert_eq!(r.header("content-type"), "application/problem+json");
    }
    let r = send(
        Req::post(gw.admin, "/v1/api-keys")
            .bearer(ADMIN_TOKEN)
            .body("{not json"),
    )
    .await;
    assert_eq!(r.code(), "invalid_request");
    let r = send(
        Req::post(gw.admin, "/v1/api-keys")
            .bearer(ADMIN_TOKEN)
            .body(vec![b' '; 2 << 20]),
    )
    .await;
    assert_eq!(r.status, 413);
    let r = admin(&gw, "PUT", "/v1/api-keys/abc", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), "GET, PATCH, DELETE");
    gw.stop().await;
}

#[tokio::test]
async fn a_wrong_admin_token_is_refused_and_audited() {
    let (_up, gw) = setup().await;
    for auth in ["Bearer nope", "Bearer ", "Basic dGVzdA=="] {
        let r = send(Req::get(gw.admin, "/v1/api-keys").header("authorization", auth)).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (401, "invalid_admin_token")
        );
    }
    let r = send(Req::get(gw.admin, "/v1/api-keys")).await;
    assert_eq!(r.status, 401);
    let events = admin(&gw, "GET", "/v1/audit?action=auth.failed", None)
        .await
        .json();
    let events = events["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["reason"] == "invalid_admin_token"),
        "{events:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn disable_enable_revoke_through_the_api() {
    let (_up, gw) = setup().await;
    let created = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production"})),
    )
    .await
    .json();
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        secret(&created),
    );
    let r = admin(&gw, "POST", &format!("/v1/api-keys/{id}/disable"), None).await;
    assert_eq!(r.json()["status"], "inactive");
    assert_eq!(proxy(&gw, &key).await.code(), "inactive_key");
    admin(&gw, "POST", &format!("/v1/api-keys/{id}/enable"), None).await;
    assert_eq!(proxy(&gw, &key).await.status, 200);
    let r = admin(&gw, "DELETE", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(r.json()["status"], "revoked");
    assert!(r.json()["revoked_at"].is_string());
    assert_eq!(proxy(&gw, &key).await.code(), "revoked_key");
    let r = admin(&gw, "POST", &format!("/v1/api-keys/{id}/enable"), None).await;
    assert_eq!((r.status.as_u16(), r.code().as_str()), (409, "key_revoked"));
    // History is kept: revoked keys are listed under their status, not by default.
    assert!(admin(&gw, "GET", "/v1/api-keys", None).await.json()["keys"]
        .as_array()
        .unwrap()
        .is_empty());
    let revoked = admin(&gw, "GET", "/v1/api-keys?status=revoked", None)
        .await
        .json();
    assert_eq!(revoked["keys"][0]["id"], id.as_str());
    gw.stop().await;
}

#[tokio::test]
async fn regenerate_keeps_the_id_and_kills_the_old_secret() {
    let (_up, gw) = setup().await;
    let created = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production", "rate_limit": "1/h"})),
    )
    .await
    .json();
    let (id, old) = (
        created["id"].as_str().unwrap().to_string(),
        secret(&created),
    );
    assert_eq!(proxy(&gw, &old).await.status, 200);
    let r = admin(&gw, "POST", &format!("/v1/api-keys/{id}/regenerate"), None).await;
    assert_eq!(r.status, 200);
    let new = secret(&r.json());
    assert_ne!(new, old);
    assert_eq!(r.json()["id"], id.as_str());
    assert!(r.json()["warnings"][0]
        .as_str()
        .unwrap()
        .contains("old secret"));
    assert_eq!(proxy(&gw, &old).await.code(), "unknown_key");
    // Same id, same bucket: the one request an hour was already spent.
    assert_eq!(proxy(&gw, &new).await.code(), "rate_limited");
    gw.stop().await;
}

#[tokio::test]
async fn rotation_overlaps_then_the_old_key_expires() {
    let (_up, gw) = setup().await;
    let created = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production", "scopes": ["read:/v1/**"]})),
    )
    .await
    .json();
    let (old_id, old) = (
        created["id"].as_str().unwrap().to_string(),
        secret(&created),
    );
    let r = admin(
        &gw,
        "POST",
        &format!("/v1/api-keys/{old_id}/rotate"),
        Some(json!({"grace_seconds": 3600})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let rotated = r.json();
    let (new_id, new) = (
        rotated["id"].as_str().unwrap().to_string(),
        secret(&rotated),
    );
    assert_ne!(new_id, old_id);
    assert_eq!(rotated["scopes"][0], "read:/v1/**", "the same settings");
    assert_eq!(rotated["rotated_from"], old_id.as_str());
    assert_eq!(rotated["previous_key"]["id"], old_id.as_str());
    assert_eq!(rotated["previous_key"]["rotated_to"], new_id.as_str());
    let again = admin(&gw, "POST", &format!("/v1/api-keys/{old_id}/rotate"), None).await;
    assert_eq!(
        (again.status.as_u16(), again.code().as_str()),
        (409, "key_rotating")
    );
    // Both work during the grace; the old one's last use is reported.
    assert_eq!(proxy(&gw, &old).await.status, 200);
    assert_eq!(proxy(&gw, &new).await.status, 200);
    let shown = admin(&gw, "GET", &format!("/v1/api-keys/{old_id}"), None)
        .await
        .json();
    assert!(shown["last_used_at"].is_string());
    assert_eq!(shown["safe_to_revoke"], false, "it was used a moment ago");
    // Quiet for longer than the quiet period (10m), still in the grace: safe to revoke.
    gw.clock.advance(Duration::from_secs(11 * 60));
    let shown = admin(&gw, "GET", &format!("/v1/api-keys/{old_id}"), None)
        .await
        .json();
    assert_eq!(
        (shown["status"].as_str(), shown["safe_to_revoke"].as_bool()),
        (Some("active"), Some(true))
    );
    // Past the grace: expired_key.
    gw.clock.advance(Duration::from_secs(3600));
    assert_eq!(proxy(&gw, &old).await.code(), "expired_key");
    assert_eq!(proxy(&gw, &new).await.status, 200);
    // A body of whitespace alone is not JSON: refused, and nothing rotated.
    let blank = send(
        Req::get(gw.admin, &format!("/v1/api-keys/{new_id}/rotate"))
            .method("POST")
            .bearer(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body("\t"),
    )
    .await;
    assert_eq!(
        (blank.status.as_u16(), blank.code()),
        (400, "invalid_request".to_string())
    );
    let r = admin(&gw, "POST", &format!("/v1/api-keys/{new_id}/rotate"), None).await;
    assert_eq!(
        r.status, 201,
        "rotating the new key again works, with the default grace"
    );
    gw.stop().await;
}

#[tokio::test]
async fn edits_take_effect_and_warn() {
    let (_up, gw) = setup().await;
    let created = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production"})),
    )
    .await
    .json();
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        secret(&created),
    );
    assert_eq!(proxy(&gw, &key).await.status, 200);
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"scopes": ["read:/v2/**"], "name": "narrowed"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert!(r.json()["warnings"][0]
        .as_str()
        .unwrap()
        .contains("may start failing"));
    assert_eq!(r.json()["name"], "narrowed");
    assert_eq!(proxy(&gw, &key).await.code(), "scope_denied");
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"allowed_cidrs": ["10.0.0.0/8"], "scopes": []})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(proxy(&gw, &key).await.code(), "ip_not_allowed");
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"allowed_cidrs": [], "rate_limit": "1/h"})),
    )
    .await;
    assert_eq!(r.json()["rate_limit"], "1/h");
    assert_eq!(proxy(&gw, &key).await.status, 200);
    assert_eq!(proxy(&gw, &key).await.code(), "rate_limited");
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"rate_limit": null})),
    )
    .await;
    assert!(r.json()["rate_limit"].is_null() && r.json()["burst"].is_null());
    assert_eq!(proxy(&gw, &key).await.status, 200);
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"note": "no warning for notes"})),
    )
    .await;
    assert!(r.json().get("warnings").is_none());
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"note": null, "name": null})),
    )
    .await;
    assert_eq!(
        (r.json()["note"].as_str(), r.json()["name"].as_str()),
        (Some(""), Some("")),
        "null clears"
    );
    let r = admin(&gw, "PATCH", &format!("/v1/api-keys/{id}"), Some(json!({}))).await;
    assert_eq!(r.code(), "invalid_request");
    gw.stop().await;
}

#[tokio::test]
async fn tiers_cap_active_keys_and_revoked_or_expired_ones_free_a_slot() {
    let (_up, gw) = setup().await;
    let create = |expires: Option<&str>| {
        let mut body = json!({"namespace": "small", "environment": "production"});
        if let Some(e) = expires {
            body["expires_at"] = e.into();
        }
        admin(&gw, "POST", "/v1/api-keys", Some(body))
    };
    let first = create(None).await.json();
    let second = create(Some("1h")).await.json();
    let r = create(None).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (409, "key_limit_reached")
    );
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("revoke an unused key first"));
    // A disabled key still counts.
    admin(
        &gw,
        "POST",
        &format!("/v1/api-keys/{}/disable", first["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(create(None).await.status, 409);
    // An expired key does not.
    gw.clock.advance(Duration::from_secs(3601));
    assert_eq!(create(None).await.status, 201);
    assert_eq!(create(None).await.status, 409);
    // A revoked key does not.
    admin(
        &gw,
        "DELETE",
        &format!("/v1/api-keys/{}", first["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(create(None).await.status, 201);
    // Rotation is allowed at the limit: the old key is on its way out.
    let listed = admin(&gw, "GET", "/v1/api-keys?namespace=small", None)
        .await
        .json();
    let any = listed["keys"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        admin(
            &gw,
            "POST",
            &format!("/v1/api-keys/{any}/rotate"),
            Some(json!({"grace_seconds": 60}))
        )
        .await
        .status,
        201
    );
    let ns = admin(&gw, "GET", "/v1/namespaces", None).await.json();
    let small = ns["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "small")
        .unwrap()
        .clone();
    assert_eq!(
        (small["tier"].as_str(), small["max_keys"].as_u64()),
        (Some("tiny"), Some(2))
    );
    assert_eq!(small["keys_in_use"], 3, "two keys plus the one in rotation");
    let _ = second;
    gw.stop().await;
}

#[tokio::test]
async fn listing_filters_searches_and_pages() {
    let (_up, gw) = setup().await;
    for i in 0..7 {
        let name = if i % 2 == 0 {
            format!("web {i}")
        } else {
            format!("batch {i}")
        };
        admin(
            &gw,
            "POST",
            "/v1/api-keys",
            Some(json!({"namespace": "acme", "environment": "production", "name": name})),
        )
        .await;
        gw.clock.advance(Duration::from_secs(1));
    }
    let r = admin(&gw, "GET", "/v1/api-keys?search=WEB", None)
        .await
        .json();
    assert_eq!(r["keys"].as_array().unwrap().len(), 4);
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10 {
        let page = admin(
            &gw,
            "GET",
            &format!("/v1/api-keys?limit=3&cursor={cursor}"),
            None,
        )
        .await
        .json();
        seen.extend(
            page["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["name"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    assert_eq!(seen[0], "web 6", "newest first");
    // A page boundary survives the key it points at leaving the listing.
    let first = admin(&gw, "GET", "/v1/api-keys?limit=2", None).await.json();
    let last_id = first["keys"][1]["id"].as_str().unwrap().to_string();
    admin(&gw, "DELETE", &format!("/v1/api-keys/{last_id}"), None).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let next = admin(
        &gw,
        "GET",
        &format!("/v1/api-keys?limit=2&cursor={cursor}"),
        None,
    )
    .await
    .json();
    assert_eq!(next["keys"][0]["name"], "web 4");
    assert_eq!(
        admin(&gw, "GET", "/v1/api-keys?status=&limit=", None)
            .await
            .status,
        400,
        "an empty status or limit is refused, as the OpenAPI document says"
    );
    assert_eq!(
        admin(&gw, "GET", "/v1/api-keys?status=bogus", None)
            .await
            .json()["field"],
        "status"
    );
    assert_eq!(
        admin(&gw, "GET", "/v1/api-keys?limit=0", None).await.json()["field"],
        "limit"
    );
    assert_eq!(
        admin(&gw, "GET", "/v1/api-keys?cursor=nope", None)
            .await
            .json()["field"],
        "cursor"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_through_api_and_cli_at_once_lose_nothing() {
    let (_up, gw) = setup().await;
    let admin_addr = gw.admin;
    let dir = gw.dir.path().to_path_buf();
    let mut api = Vec::new();
    for w in 0..4 {
        api.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..50 {
                let body = json!({"namespace": "acme", "environment": "production", "name": format!("api {w}-{i}")});
                let r = send(Req::post(admin_addr, "/v1/api-keys").bearer(ADMIN_TOKEN).body(body.to_string())).await;
                assert_eq!(r.status, 201, "{:?}", r.json());
                ids.push(r.json()["id"].as_str().unwrap().to_string());
            }
            ids
        }));
    }
    let cli: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| {
                        create_key_json(&dir, &[])["id"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in api {
        ids.extend(t.await.unwrap());
    }
    for t in cli {
        ids.extend(t.join().unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400);
    let out = keygate_ok(&dir, &["keys", "list", "--json"]);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listed["keys"].as_array().unwrap().len(),
        400,
        "every acknowledged create is in the store"
    );
    assert!(keygate_ok(&dir, &["check"]).contains("400 keys"));
    gw.stop().await;
}

#[tokio::test]
async fn cli_changes_reach_the_running_gateway() {
    let (_up, gw) = setup().await;
    let dir = gw.dir.path().to_path_buf();
    let created = create_key_json(&dir, &[]);
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        secret(&created),
    );
    let within = |want: &'static str, key: String| {
        let gw = &gw;
        async move {
            eventually(Duration::from_secs(3), async || {
                let r = proxy(gw, &key).await;
                (if r.status == 200 {
                    "ok".to_string()
                } else {
                    r.code()
                }) == want
            })
            .await
        }
    };
    assert!(within("ok", key.clone()).await);
    keygate_ok(&dir, &["keys", "update", &id, "--scope", "write:/nothing"]);
    assert!(within("scope_denied", key.clone()).await);
    keygate_ok(&dir, &["keys", "update", &id, "--clear-scopes"]);
    assert!(within("ok", key.clone()).await);
    let out: Value =
        serde_json::from_str(&keygate_ok(&dir, &["keys", "regenerate", &id, "--json"])).unwrap();
    let regenerated = secret(&out);
    assert!(within("unknown_key", key.clone()).await);
    assert!(within("ok", regenerated.clone()).await);
    let out: Value = serde_json::from_str(&keygate_ok(
        &dir,
        &["keys", "rotate", &id, "--grace", "1h", "--json"],
    ))
    .unwrap();
    let rotated = secret(&out);
    assert_eq!(out["previous_key"]["id"], id.as_str());
    assert!(within("ok", rotated.clone()).await);
    assert!(
        within("ok", regenerated.clone()).await,
        "the old key works during the grace"
    );
    let shown = keygate_ok(&dir, &["keys", "show", &id]);
    assert!(
        shown.contains("rotated to") && shown.contains("safe to revoke"),
        "{shown}"
    );
    keygate_ok(&dir, &["keys", "revoke", &id]);
    assert!(within("revoked_key", regenerated).await);
    gw.stop().await;
}

#[tokio::test]
async fn imported_keys_work_without_the_format_check() {
    let (_up, gw) = setup().await;
    let dir = gw.dir.path().to_path_buf();
    let kong_key = "4f3c2b1a-legacy-kong-key-0001";
    let stranger = "some-other-token-never-imported";
    // Before any import, a token not in keygate's format is refused without a lookup.
    assert_eq!(proxy(&gw, stranger).await.code(), "malformed_key");
    let file = dir.join("kong.csv");
    write(
        &file,
        &format!("key,name,scopes\n{kong_key},legacy ci,read:/v1/**\nplain-kong-key-000002,,\n"),
    );
    let out = keygate_ok(
        &dir,
        &[
            "keys",
            "import",
            "--namespace",
            "acme",
            "--environment",
            "production",
            "kong.csv",
        ],
    );
    assert!(out.contains("Imported 2 keys"), "{out}");
    let ok = eventually(Duration::from_secs(3), async || {
        proxy(&gw, kong_key).await.status == 200
    })
    .await;
    assert!(ok, "an imported key works");
    assert_eq!(
        send(Req::post(gw.proxy, "/v1/x").bearer(kong_key))
            .await
            .code(),
        "scope_denied"
    );
    assert_eq!(
        proxy(&gw, stranger).await.code(),
        "unknown_key",
        "now looked up, and not found"
    );
    // Keys that carry a keygate prefix must still pass the checksum.
    assert_eq!(
        proxy(&gw, "kg_live_notARealKeyButLooksLikeOne")
            .await
            .code(),
        "malformed_key"
    );
    write(&file, "kg_live_notARealKeyButLooksLikeOne12345\n");
    let (code, _, err) = support::process::run(
        &[
            "--config",
            "keygate.yaml",
            "keys",
            "import",
            "--namespace",
            "acme",
            "--environment",
            "production",
            "kong.csv",
        ],
        &dir,
    );
    assert_eq!(code, 1);
    assert!(err.contains("line 1") && !err.contains("notAReal"), "{err}");
    // Importing the same key twice is refused.
    write(&file, &format!("{kong_key}\n"));
    let (code, _, err) = support::process::run(
        &[
            "--config",
            "keygate.yaml",
            "keys",
            "import",
            "--namespace",
            "acme",
            "--environment",
            "production",
            "kong.csv",
        ],
        &dir,
    );
    assert_eq!(code, 1);
    assert!(err.contains("already in the store"), "{err}");
    let store = std::fs::read_to_string(gw.keys_path()).unwrap();
    assert!(!store.contains(kong_key), "only hashes are stored");
    gw.stop().await;
}

#[test]
fn importing_100k_keys_takes_seconds() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", "127.0.0.1:9".parse().unwrap(), "production", ""),
            "",
        ),
    );
    let mut text = String::with_capacity(100_000 * 40);
    for i in 0..100_000u32 {
        text.push_str(&format!(
            "legacy-key-{i:08}-{:08x}\n",
            i.wrapping_mul(2_654_435_761)
        ));
    }
    write(&dir.path().join("keys.txt"), &text);
    let started = std::time::Instant::now();
    let out = keygate_ok(
        dir.path(),
        &[
            "keys",
            "import",
            "--namespace",
            "acme",
            "--environment",
            "production",
            "keys.txt",
        ],
    );
    let took = started.elapsed();
    eprintln!("imported 100,000 keys in {took:?}");
    assert!(out.contains("Imported 100000 keys"), "{out}");
    // The time is printed, not asserted: README gives it as a figure.
    assert!(keygate_ok(dir.path(), &["check"]).contains("100000 keys"));
}

#[tokio::test]
async fn the_audit_log_records_who_did_what_and_never_a_secret() {
    let (_up, gw) = setup().await;
    let mut secrets = Vec::new();
    let created = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production"})),
    )
    .await
    .json();
    let id = created["id"].as_str().unwrap().to_string();
    secrets.push(secret(&created));
    admin(&gw, "POST", &format!("/v1/api-keys/{id}/disable"), None).await;
    admin(&gw, "POST", &format!("/v1/api-keys/{id}/enable"), None).await;
    admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"note": "x"})),
    )
    .await;
    secrets.push(secret(
        &admin(&gw, "POST", &format!("/v1/api-keys/{id}/regenerate"), None)
            .await
            .json(),
    ));
    let rotated = admin(
        &gw,
        "POST",
        &format!("/v1/api-keys/{id}/rotate"),
        Some(json!({"grace_seconds": 0})),
    )
    .await
    .json();
    secrets.push(secret(&rotated));
    admin(
        &gw,
        "DELETE",
        &format!("/v1/api-keys/{}", rotated["id"].as_str().unwrap()),
        None,
    )
    .await;
    secrets.push(secret(&create_key_json(gw.dir.path(), &[])));
    admin(&gw, "POST", "/v1/reload", None).await;
    for s in &secrets {
        proxy(&gw, s).await;
    }
    proxy(&gw, "kg_live_madeUpmadeUpmadeUpmadeUpmadeUp123456").await;

    let events = admin(&gw, "GET", "/v1/audit?limit=100", None).await.json();
    let actions: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in [
        "key.created",
        "key.disabled",
        "key.enabled",
        "key.updated",
        "key.regenerated",
        "key.rotated",
        "key.revoked",
        "config.reloaded",
        "auth.failed",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    let first = &events["events"][0];
    for field in ["time", "actor", "action", "key_id", "ip", "outcome"] {
        assert!(first.get(field).is_some(), "{field} in {first}");
    }
    let by_key = admin(
        &gw,
        "GET",
        &format!("/v1/audit?key_id={id}&action=key.disabled"),
        None,
    )
    .await
    .json();
    assert_eq!(by_key["events"].as_array().unwrap().len(), 1);
    assert_eq!(by_key["events"][0]["actor"], "tests");
    assert_eq!(by_key["events"][0]["ip"], "127.0.0.1");
    // The key a rotation made has its own `key.created`, naming the key it replaces.
    let new_id = rotated["id"].as_str().unwrap();
    let made = admin(
        &gw,
        "GET",
        &format!("/v1/audit?key_id={new_id}&action=key.created"),
        None,
    )
    .await
    .json();
    assert_eq!(made["events"][0]["rotated_from"], id.as_str(), "{made}");
    // An update records what really changed, old → new; one that changes nothing, nothing.
    let before = admin(
        &gw,
        "GET",
        &format!("/v1/audit?key_id={id}&action=key.updated"),
        None,
    )
    .await
    .json()["events"]
        .as_array()
        .unwrap()
        .len();
    let current = admin(&gw, "GET", &format!("/v1/api-keys/{id}"), None)
        .await
        .json();
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"name": current["name"], "note": "y"})),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"note": "y"})),
    )
    .await;
    assert_eq!(r.status, 200);
    let updates = admin(
        &gw,
        "GET",
        &format!("/v1/audit?key_id={id}&action=key.updated"),
        None,
    )
    .await
    .json();
    let updates = updates["events"].as_array().unwrap();
    assert_eq!(
        updates.len(),
        before + 1,
        "the unchanged PATCH is not an update"
    );
    assert_eq!(updates[0]["reason"], r#"note: "x" → "y""#);
    // No secret anywhere on disk.
    gw.gateway().housekeeping();
    for file in [
        "audit.log",
        "keys.yaml",
        "usage.json",
        "usage.changes.jsonl",
        "usage.requests.jsonl",
        "keygate.yaml",
    ] {
        let text = std::fs::read_to_string(gw.dir.path().join(file)).unwrap_or_default();
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret leaked into {file}");
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn the_openapi_document_matches_the_router_both_ways() {
    let (_up, gw) = setup().await;
    let r = send(Req::get(gw.admin, "/v1/openapi.json")).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.1")),
        Some(true)
    );
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete", "head", "options"]
                .contains(&method.as_str())
            {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    let mut served: Vec<(String, String)> = keygate::admin::ROUTES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    gw.stop().await;
}

/// Regressions for what schemathesis found against the OpenAPI document.
#[tokio::test]
async fn conformance_findings_stay_fixed() {
    let (_up, gw) = setup().await;
    // An alert rule with `"key": null` was made as a rule for every key: a schema-violating
    // body accepted. Now a 400 naming the field, and no rule made.
    let r = admin(
        &gw,
        "POST",
        "/v1/alerts",
        Some(json!({"name": "Zfle", "key": null, "requests_per_minute": 10})),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.json()["field"], "key");
    let r = admin(&gw, "GET", "/v1/alerts/Zfle", None).await;
    assert_eq!(r.status, 404);
    // A long environment name made a key prefix past the format's limit: a 500 (and, in a
    // release build, a key that could never be used). Now a 400 naming the field.
    let long_env = "e".repeat(31);
    let r = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": long_env})),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (400, "invalid_request".into())
    );
    assert_eq!(r.json()["field"], "environment");
    // A body that is not a JSON object was read by position into the fields.
    let made = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production"})),
    )
    .await;
    let id = made.json()["id"].as_str().unwrap().to_string();
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!([null, null])),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"].as_str().unwrap().contains("JSON object"));
    // A credits change with a null beside its number was read as that number alone.
    let r = admin(
        &gw,
        "POST",
        &format!("/v1/api-keys/{id}/credits"),
        Some(json!({"add": 5, "set": null})),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.json()["field"], "set");
    // A whole number written as 4048.0 is an integer, as JSON Schema says.
    let r = admin(
        &gw,
        "POST",
        &format!("/v1/api-keys/{id}/rotate"),
        Some(json!({"grace_seconds": 4048.0})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // A grace so long that the expiry overflowed.
    let r = admin(
        &gw,
        "POST",
        &format!("/v1/api-keys/{id}/rotate"),
        Some(json!({"grace_seconds": 140_737_488_355_329u64})),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.json()["field"], "grace_seconds");
    // An empty number is not a number.
    for path in [
        "/v1/usage?top=",
        "/v1/api-keys?limit=",
        "/v1/audit?limit=",
        "/v1/api-keys?status=",
    ] {
        let r = admin(&gw, "GET", path, None).await;
        assert_eq!(r.status, 400, "{path}");
    }
    gw.stop().await;
}

/// An environment no route serves (a typo such as `prodution`) would make a key that every
/// route refuses: the API answers 400 naming the environments that exist, accepts one the
/// config declares, and lists them all for forms.
#[tokio::test]
async fn a_key_for_an_environment_nothing_serves_is_refused_naming_those_that_exist() {
    let (_up, gw) = setup().await;
    let r = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "prodution"})),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["field"].as_str()),
        (400, Some("environment"))
    );
    let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
    for named in ["`prodution`", "`production`", "`staging`"] {
        assert!(detail.contains(named), "{detail}");
    }
    let r = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "staging"})),
    )
    .await;
    assert_eq!(r.status, 201, "a declared environment is accepted");
    let r = admin(&gw, "GET", "/v1/namespaces", None).await;
    assert_eq!(
        r.json()["environments"],
        json!(["e".repeat(31), "production", "staging"])
    );
}
