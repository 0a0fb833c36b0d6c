//! A tiny upstream and a gateway in one process, configured in code-written YAML:
//! creates a key, calls through the gateway with and without it, and prints what happened.
//!
//! `cargo run --example quickstart`

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keygate::clock::Clock;
use keygate::config::Config;
use keygate::keys::{self, NewKey, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let upstream = keygate::demo::spawn_echo_upstream("127.0.0.1:0".parse()?).await?;
    let dir = std::env::temp_dir().join(format!("keygate-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("keygate.yaml");
    std::fs::write(
        &config_path,
        format!(
            "listen: {{proxy: 127.0.0.1:0, admin: 127.0.0.1:0}}\n\
             routes:\n  - path_prefix: /api\n    upstream: http://{upstream}\n    environment: production\n    strip_prefix: true\n"
        ),
    )?;
    let config = Config::load(&config_path).map_err(|e| format!("{e:?}"))?;
    let clock = Clock::real();
    let new = NewKey {
        namespace: "example".into(),
        environment: "production".into(),
        scopes: vec!["read:/api/**".into()],
        ..NewKey::default()
    };
    let store = Store::new(config.keys_path(&config_path));
    let op = keys::lifecycle::Op {
        store: &store,
        config: &config,
        actor: "quickstart",
        now: clock.unix_secs(),
    };
    let (record, secret) = keys::create(op, new)?;
    let gateway =
        keygate::gateway::Gateway::new(&config_path, clock).map_err(|e| format!("{e:?}"))?;
    let running = keygate::server::start(gateway, false).await?;
    println!(
        "key {} created; gateway on {}",
        record.id, running.proxy_addr
    );

    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for (method, auth) in [("GET", true), ("GET", false), ("POST", true)] {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/api/hello", running.proxy_addr));
        if auth {
            req = req.header("authorization", format!("Bearer {secret}"));
        }
        let response = client.request(req.body(Empty::new())?).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let summary: serde_json::Value = serde_json::from_slice(&body)?;
        let what = summary
            .get("code")
            .or(summary.get("path"))
            .cloned()
            .unwrap_or_default();
        println!(
            "{method} /api/hello {} -> {status} {what}",
            if auth { "with key" } else { "no key" }
        );
    }
    running.shutdown(Duration::from_secs(1)).await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
