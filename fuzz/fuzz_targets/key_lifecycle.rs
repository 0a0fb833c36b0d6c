//! All the way from bytes to a decision: any bytes, cut at 0xFF bytes (which JSON text never
//! holds) into a create body, a patch body and a request line, go through the admin API's
//! parsing and checks to a key record, the record through the store's text and back, the
//! store into a snapshot build, and the request through the gateway's decision. It holds:
//! - a body is read, or refused with a 4xx;
//! - a record the writers accept always builds into a snapshot (what a writer stores, a
//!   reader loads), and survives the store's text unchanged;
//! - the request is admitted or refused with a 4xx, never a panic; an admitted request is
//!   on a route of the key's environment, from an allowed address, within its scopes.
#![no_main]

use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use keygate::clock::Clock;
use keygate::config::{parse_yaml, Config};
use keygate::keys::store::{parse, render};
use keygate::keys::StoreFile;
use keygate::metrics::Metrics;
use keygate::state::credits::CreditBook;
use keygate::state::lockouts::Lockouts;
use keygate::state::limiters::Limiters;
use keygate::state::usage::UsageBook;
use keygate::snapshot::{BuildContext, Snapshot};
use libfuzzer_sys::fuzz_target;

/// Routes by namespace, environment and path parameters; a tier with a quota; a namespace
/// with its own prefix.
const CONFIG: &str = "\
listen: {proxy: 127.0.0.1:0, admin: 127.0.0.1:0}
x_api_key: true
trusted_proxies: [10.0.0.0/8]
tiers: {pro: {max_keys: 5, quota: 1000/day}}
namespaces:
  acme: {tier: pro}
  longprefix: {prefix: abcdefghijklmnopqrstu}
routes:
  - {path_prefix: /admin, upstream: \"http://127.0.0.1:9\", environment: production, namespaces: [ops]}
  - {path_prefix: /v2, upstream: \"http://127.0.0.1:9\", environment: production, allow_path_parameters: true}
  - {path_prefix: /, upstream: \"http://127.0.0.1:9\", environment: production}
  - {host: staging.example, path_prefix: /, upstream: \"http://127.0.0.1:9\", environment: staging}
";

/// 2026-12-01T00:00:00Z.
const NOW: i64 = 1_796_083_200;

struct World {
    config: Config,
    runtime: tokio::runtime::Runtime,
    limiters: Limiters,
    metrics: Metrics,
    usage: UsageBook,
    clock: Clock,
    /// A snapshot with no keys, whose upstream pool each build reuses.
    base: Snapshot,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let config: Config =
            parse_yaml(Path::new("fuzz.yaml"), CONFIG).expect("the fuzz config reads");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let clock = Clock::fake(std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOW as u64));
        let (limiters, metrics, usage) = (Limiters::new(), Metrics::default(), UsageBook::in_memory());
        let base = {
            let _in = runtime.enter();
            let ctx = BuildContext {
                config_path: Path::new("fuzz.yaml"),
                generation: 1,
                limiters: &limiters,
                metrics: &metrics,
                usage: &usage,
                previous: None,
                env_admin_token: None,
            };
            Snapshot::from_parts(&ctx, config.clone(), &[]).expect("the fuzz config builds")
        };
        World { config, runtime, limiters, metrics, usage, clock, base }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let mut parts = data.split(|b| *b == 0xFF);
    let (create, patch, request) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (record, secret, patched) = match keygate::admin::key_from_bodies(create, patch, &w.config, NOW) {
        Ok(made) => made,
        Err(refusal) => {
            assert!(refusal.status().is_client_error(), "{refusal:?}");
            return;
        }
    };
    if let Err(refusal) = &patched {
        assert!(refusal.status().is_client_error(), "{refusal:?}");
    }

    // Through the store's text and back, unchanged.
    let file = StoreFile { keys: vec![record], ..StoreFile::default() };
    let text = render(&file).expect("a record renders");
    let read = parse(Path::new("keys.yaml"), &text).expect("what a writer stores, a reader loads");
    assert_eq!(read, file);

    // Into a snapshot: a record the writers accept always builds.
    let _in = w.runtime.enter();
    let ctx = BuildContext {
        config_path: Path::new("fuzz.yaml"),
        generation: 2,
        limiters: &w.limiters,
        metrics: &w.metrics,
        usage: &w.usage,
        previous: Some(&w.base),
        env_admin_token: None,
    };
    let snapshot = Snapshot::from_parts(&ctx, w.config.clone(), &read.keys)
        .unwrap_or_else(|errors| panic!("an accepted record failed to build: {errors:?}"));
    assert_eq!(snapshot.key_count(), 1);

    // One request decided against it: method, client, host and path from the third part.
    let text = String::from_utf8_lossy(request);
    let mut words = text.splitn(4, ' ');
    let method = words.next().and_then(|m| m.parse::<http::Method>().ok()).unwrap_or(http::Method::GET);
    let client = words.next().and_then(|c| c.parse::<IpAddr>().ok()).unwrap_or([127, 0, 0, 1].into());
    let host = words.next().unwrap_or("api.example");
    let path = words.next().unwrap_or("/");
    let Ok(req) = http::Request::builder()
        .method(method.clone())
        .uri(path)
        .header("host", host)
        .header("authorization", format!("Bearer {secret}"))
        .body(())
    else {
        return;
    };
    let key = &read.keys[0];
    let ask = keygate::pipeline::Ask::of(&req, false);
    let (lockouts, credits) = (Lockouts::default(), CreditBook::in_memory());
    let state = keygate::pipeline::State { lockouts: &lockouts, credits: &credits };
    match keygate::pipeline::admit(&snapshot, &w.clock, ask, keygate::pipeline::Client::Known(client), state) {
        Ok(admitted) => {
            assert_eq!(admitted.key.id, key.id);
            let route = admitted.route.expect("a request with a path has a route");
            assert_eq!(route.environment, key.environment);
            assert!(key.status == keygate::keys::Status::Active);
            assert!(admitted.key.allowed_cidrs.is_empty() || admitted.key.allowed_cidrs.contains(client));
            assert!(route.namespaces.is_empty() || route.namespaces.contains(&key.namespace));
        }
        Err(refused) => {
            let status = refused.rejection.status();
            assert!(status.is_client_error(), "{:?}", refused.rejection);
        }
    }
});
