//! The cost of deciding a request: parse + checksum, SHA-256, lookup, policy (status, expiry,
//! environment, namespace, CIDR, scope), at 1k, 100k and 1M keys. The figure to watch is
//! how flat it stays as the key count grows.
//!
//! - `verify/N`: the same traffic at every store size, 1,000 distinct keys presented in
//!   turn, chosen evenly through the store (not its first keys, which sit together in
//!   memory): what the key count alone costs.
//! - `verify_cold/N`: 65,536 distinct keys at random places in the store, more than the
//!   caches hold, so nearly every lookup starts cold: the worst case.
//!
//! The gateway's allocator (mimalloc) is this bench's too, so entries lie in memory as they
//! do in the gateway.
//!
//! `cargo bench --bench verify`

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::Request;

use keygate::clock::Clock;
use keygate::config::{Config, RouteConfig};
use keygate::keys::{format, hex, KeyRecord, Status};
use keygate::metrics::Metrics;
use keygate::pipeline::{admit, Ask, Client, State};
use keygate::snapshot::{BuildContext, Snapshot};
use keygate::state::credits::CreditBook;
use keygate::state::lockouts::Lockouts;
use keygate::state::{limiters::Limiters, usage::UsageBook};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn config() -> Config {
    Config {
        routes: vec![RouteConfig::new("/", "http://127.0.0.1:9", "production")],
        ..Config::default()
    }
}

/// `n` keys with scopes and CIDRs, and the secrets of those `present` picks to present.
fn snapshot_with(
    n: usize,
    present: impl Fn(usize) -> bool,
    limiters: &Limiters,
    usage: &UsageBook,
) -> (Snapshot, Vec<String>) {
    let metrics = Metrics::default();
    let mut secrets = Vec::new();
    let records: Vec<KeyRecord> = (0..n)
        .map(|i| {
            let secret = format::generate("kg_live").unwrap();
            let hash = hex(&format::hash(&secret));
            if present(i) {
                secrets.push(secret);
            }
            KeyRecord {
                id: format!("{:08x}{i:x}", i),
                hash: format!("sha256:{hash}"),
                prefix: "kg_live".into(),
                name: String::new(),
                namespace: format!("ns{}", i % 100),
                environment: "production".into(),
                scopes: vec!["read:/v1/**".into(), "write:/v1/uploads/*".into()],
                allowed_cidrs: vec!["10.0.0.0/8".into(), "127.0.0.0/8".into()],
                rate_limit: None,
                burst: None,
                expires_at: Some("2999-01-01T00:00:00Z".into()),
                status: Status::Active,
                created_at: "2026-01-01T00:00:00Z".into(),
                ..KeyRecord::default()
            }
        })
        .collect();
    let ctx = BuildContext {
        config_path: Path::new("bench.yaml"),
        generation: 1,
        limiters,
        metrics: &metrics,
        usage,
        previous: None,
        env_admin_token: None,
    };
    (
        Snapshot::from_parts(&ctx, config(), &records).expect("valid bench snapshot"),
        secrets,
    )
}

fn verify(c: &mut Criterion) {
    let clock = Clock::real();
    let limiters = Limiters::new();
    let usage = UsageBook::in_memory();
    let lockouts = Lockouts::default();
    let credits = CreditBook::in_memory();
    let state = State {
        lockouts: &lockouts,
        credits: &credits,
    };
    let peer = Client::Known("127.0.0.1".parse::<IpAddr>().unwrap());
    let mut run = |group: &str, n: usize, present: &dyn Fn(usize) -> bool| {
        let (snapshot, secrets) = snapshot_with(n, present, &limiters, &usage);
        let requests: Vec<Request<()>> = secrets
            .iter()
            .map(|s| {
                Request::get("/v1/users/42")
                    .header("authorization", format!("Bearer {s}"))
                    .body(())
                    .unwrap()
            })
            .collect();
        let mut group = c.benchmark_group(group);
        group.throughput(Throughput::Elements(1));
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                let admission = admit(&snapshot, &clock, Ask::of(&requests[i], false), peer, state)
                    .expect("admitted");
                black_box(admission.key.id.len())
            })
        });
        group.finish();
    };
    for n in [1_000usize, 100_000, 1_000_000] {
        let every = n / 1_000;
        run("verify", n, &|i| i % every == 0);
    }
    // A fixed pseudo-random choice of 65,536 of the million keys (a multiplicative hash of
    // the position, so the picks are spread and repeatable).
    let n = 1_000_000;
    run("verify_cold", n, &|i| {
        (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48 < (65_536u64 << 16) / n as u64
    });

    let mut stages = c.benchmark_group("stages");
    let key = format::generate("kg_live").unwrap();
    stages.bench_function("format_parse", |b| {
        b.iter(|| format::parse(black_box(&key)).is_ok())
    });
    stages.bench_function("sha256", |b| b.iter(|| format::hash(black_box(&key))));
    let unknown = Request::get("/v1/x")
        .header("authorization", format!("Bearer {key}"))
        .body(())
        .unwrap();
    let (snapshot, _) = snapshot_with(1_000, |_| false, &limiters, &usage);
    stages.bench_function("refuse_unknown_key", |b| {
        b.iter(|| {
            admit(
                &snapshot,
                &clock,
                Ask::of(black_box(&unknown), false),
                peer,
                state,
            )
            .is_err()
        })
    });
    stages.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = verify
}
criterion_main!(benches);
