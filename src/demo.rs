//! `keygate demo`: the whole product with no set-up. An in-process echo upstream, a
//! temporary config and key store with one fresh key, the gateway and its admin API.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::clock::Clock;
use crate::config::Config;
use crate::keys::{self, NewKey, Store};

/// Starts an HTTP server on `addr` that answers every request with a JSON echo of what it
/// received (method, path, headers and body size): the stand-in for a real API.
pub async fn spawn_echo_upstream(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(echo(req).await)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let mut received = 0usize;
    let mut body = body;
    while let Some(Ok(frame)) = body.frame().await {
        received = received.saturating_add(frame.data_ref().map_or(0, |d| d.len()));
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let body = serde_json::json!({
        "upstream": "echo",
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
        "body_bytes": received,
    });
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Runs the demo until Ctrl-C, then removes its temporary files.
pub fn run(proxy: &str, admin: &str) -> Result<(), String> {
    let proxy: SocketAddr = proxy
        .parse()
        .map_err(|_| format!("--proxy: `{proxy}` is not an address"))?;
    let admin: SocketAddr = admin
        .parse()
        .map_err(|_| format!("--admin: `{admin}` is not an address"))?;
    let dir = temp_dir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let result =
        crate::cli::runtime(crate::cli::Threads::PerCore)?.block_on(demo(&dir, proxy, admin));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn demo(dir: &std::path::Path, proxy: SocketAddr, admin: SocketAddr) -> Result<(), String> {
    let upstream = spawn_echo_upstream(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
    let admin_token = keys::format::generate("kg_admin").map_err(|e| e.to_string())?;
    let config_path = dir.join("keygate.yaml");
    let config_text = format!(
        "# Written by `keygate demo`; removed when it stops.\n\
         listen:\n  proxy: {proxy}\n  admin: {admin}\n\
         keys_file: keys.yaml\n\
         admin_tokens: [\"sha256:{token_hash}\"]\n\
         routes:\n  - path_prefix: /\n    upstream: http://{upstream}\n    environment: production\n",
        token_hash = keys::hex(&keys::format::hash(&admin_token)),
    );
    std::fs::write(&config_path, config_text)
        .map_err(|e| format!("cannot write the demo config: {e}"))?;
    let config = Config::load(&config_path).map_err(|e| format!("{e:?}"))?;
    let store = Store::new(config.keys_path(&config_path));
    let clock = Clock::real();
    let new = NewKey {
        namespace: "demo".into(),
        environment: "production".into(),
        name: "demo key".into(),
        rate_limit: Some("5/s".into()),
        burst: Some(10),
        ..NewKey::default()
    };
    let op = keys::lifecycle::Op {
        store: &store,
        config: &config,
        actor: "demo",
        now: clock.unix_secs(),
    };
    let (record, secret) = keys::create(op, new).map_err(|e| e.to_string())?;
    let gateway =
        crate::gateway::Gateway::new(&config_path, clock).map_err(|e| format!("{e:?}"))?;
    let signals = crate::server::Signals::catch().map_err(|e| e.to_string())?;
    let running = crate::server::start(gateway, true)
        .await
        .map_err(|e| e.to_string())?;
    let p = running.proxy_addr;
    println!(
        "\nkeygate demo is running. Ctrl-C stops it.\n\n\
         \x20 proxy     http://{p}  ->  echo upstream http://{upstream}\n\
         \x20 admin     http://{a}  (admin token: {admin_token})\n\
         \x20 console   http://{a}/console  (sign in with the admin token)\n\
         \x20 key store {store}\n\n\
         A new API key (id {id}, 5 requests/s, burst 10). Only its SHA-256 is stored:\n\n\
         \x20 {secret}\n\n\
         Accepted (200, the echo shows what the upstream received):\n\
         \x20 curl -i -H 'Authorization: Bearer {secret}' http://{p}/v1/hello\n\n\
         Refused (401 missing_key, the request never reaches the upstream):\n\
         \x20 curl -i http://{p}/v1/hello\n\n\
         Try `keygate --config {config} keys revoke {id}` in another shell: the first curl\n\
         turns into 401 revoked_key within a second, with no restart.\n",
        a = running.admin_addr,
        store = store.path().display(),
        id = record.id,
        config = config_path.display(),
    );
    running
        .run_until_signal(signals)
        .await
        .map_err(|e| e.to_string())
}

fn temp_dir() -> std::io::Result<PathBuf> {
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| std::io::Error::other(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!(
        "keygate-demo-{}-{}",
        std::process::id(),
        keys::hex(&suffix)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
