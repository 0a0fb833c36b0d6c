//! A key's metadata: kept with the key, returned by the admin and verify APIs, and the
//! members a route names forwarded upstream as `X-Keygate-Meta-*`, encoded so that no value
//! can inject a header, whatever the client sends.

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn chosen_members_reach_the_upstream_and_no_value_can_inject_a_header() {
    let up = Upstream::start().await;
    let routes = route(
        "/",
        up.addr,
        "production",
        "forward_meta: [plan, customer_id, region, big, missing]",
    );
    let gw = TestGateway::start(&config_yaml(&routes, "")).await;
    let big = "x".repeat(3_000);
    let meta = json!({
        "plan": "pro",
        "customer_id": "cus_1\r\nX-Evil: 1",
        "region": "Zürich 100%",
        "big": big,
        "secret_sauce": "not forwarded",
        "limits": {"seats": 5}
    });
    let made = admin(
        &gw,
        "POST",
        "/v1/api-keys",
        Some(json!({"namespace": "acme", "environment": "production", "meta": meta})),
    )
    .await;
    assert_eq!(made.status, 201, "{:?}", made.json());
    assert_eq!(made.json()["meta"], meta, "the record carries it as given");
    let key = made.json()["key"].as_str().unwrap().to_string();
    let id = made.json()["id"].as_str().unwrap().to_string();

    let r = send(
        Req::get(gw.proxy, "/v1/x")
            .bearer(&key)
            .header("x-keygate-meta-plan", "enterprise")
            .header("X-Keygate-Meta-Region", "forged")
            .header("x_keygate_meta_plan", "forged"),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    let values = |name: &str| -> Vec<String> {
        seen.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        values("x-keygate-meta-plan"),
        ["pro"],
        "the client's value never wins"
    );
    assert_eq!(
        values("x-keygate-meta-customer-id"),
        ["cus_1%0D%0AX-Evil:%201"]
    );
    assert_eq!(values("x-keygate-meta-region"), ["Z%C3%BCrich%20100%25"]);
    assert_eq!(values("x-keygate-meta-big"), std::slice::from_ref(&big));
    assert!(
        seen.headers.get("x-evil").is_none(),
        "no header was injected"
    );
    for absent in [
        "x-keygate-meta-missing",
        "x-keygate-meta-secret-sauce",
        "x-keygate-meta-limits",
    ] {
        assert!(seen.headers.get(absent).is_none(), "{absent}");
    }

    // The admin API shows it; a patch replaces it whole, and null removes it.
    let shown = admin(&gw, "GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(shown.json()["meta"], meta);
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"meta": {"plan": "free"}})),
    )
    .await;
    assert_eq!(r.json()["meta"], json!({"plan": "free"}));
    send(Req::get(gw.proxy, "/v1/x").bearer(&key)).await;
    assert_eq!(
        up.last().headers["x-keygate-meta-plan"],
        "free",
        "live at once"
    );
    assert!(up
        .last()
        .headers
        .get("x-keygate-meta-customer-id")
        .is_none());
    let r = admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"meta": null})),
    )
    .await;
    assert_eq!(r.json()["meta"], serde_json::Value::Null);
    send(Req::get(gw.proxy, "/v1/x").bearer(&key)).await;
    assert!(up.last().headers.get("x-keygate-meta-plan").is_none());

    // The verify API returns it.
    admin(
        &gw,
        "PATCH",
        &format!("/v1/api-keys/{id}"),
        Some(json!({"meta": {"plan": "team"}})),
    )
    .await;
    let v = admin(&gw, "POST", "/v1/keys/verify", Some(json!({"key": key}))).await;
    assert_eq!(
        v.json()["key"]["meta"],
        json!({"plan": "team"}),
        "{:?}",
        v.json()
    );
    gw.stop().await;
}

#[tokio::test]
async fn bad_meta_is_refused_naming_the_field() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&route("/", up.addr, "production", ""), "")).await;
    for meta in [
        json!("a string"),
        json!([1, 2]),
        json!({"big": "y".repeat(4_100)}),
    ] {
        let r = admin(
            &gw,
            "POST",
            "/v1/api-keys",
            Some(json!({"namespace": "acme", "environment": "production", "meta": meta})),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), r.json()["field"].as_str()),
            (400, Some("meta")),
            "{:?}",
            r.json()
        );
    }
    // A route's forwarded names are checked at load.
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(
            &route("/", up.addr, "production", "forward_meta: [\"bad name\"]"),
            "",
        ),
    );
    let (code, _, err) = support::process::run(&["--config", "keygate.yaml", "check"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("routes[0].forward_meta[0]"), "{err}");
    gw.stop().await;
}

#[test]
fn the_cli_sets_and_clears_meta() {
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
        &["--meta", "plan=pro", "--meta", "customer_id=cus_9"],
    );
    assert_eq!(made["meta"], json!({"plan": "pro", "customer_id": "cus_9"}));
    let id = made["id"].as_str().unwrap();
    let (code, out, err) = support::process::run(
        &[
            "--config",
            "keygate.yaml",
            "keys",
            "update",
            id,
            "--clear-meta",
            "--json",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"meta\": null"), "{out}");
    let (code, _, err) = support::process::run(
        &[
            "--config",
            "keygate.yaml",
            "keys",
            "update",
            id,
            "--meta",
            "nonsense",
        ],
        dir.path(),
    );
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "keygate: error: --meta: `nonsense` is not NAME=VALUE"
    );
}
