//! A full reload: read, parse and validate the config and a 100,000-key store, compile
//! routes, scopes and CIDRs, and index the keys (what every reload does before the swap).
//! Beside it, what an admin key change costs instead: one record applied as a delta to a
//! snapshot of 1,000,000 keys (`key_change/*`), which must not grow with the key count.
//!
//! `cargo bench --bench reload`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::config::{Config, RouteConfig};
use keygate::keys::{format, hex, KeyRecord, Status, Store, StoreFile};
use keygate::metrics::Metrics;
use keygate::snapshot::{BuildContext, Snapshot};
use keygate::state::limiters::Limiters;
use keygate::state::usage::UsageBook;

fn record(i: usize) -> KeyRecord {
    let hash = hex(&format::hash(&format!("bench-key-{i}")));
    KeyRecord {
        id: hash[..12].to_string(),
        hash: format!("sha256:{hash}"),
        prefix: "kg_live".into(),
        namespace: format!("ns{}", i % 100),
        environment: "production".into(),
        scopes: vec!["read:/v1/**".into()],
        allowed_cidrs: vec!["10.0.0.0/8".into()],
        rate_limit: Some("100/s".into()),
        status: Status::Active,
        created_at: "2026-01-01T00:00:00Z".into(),
        ..KeyRecord::default()
    }
}

fn reload(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("keygate.yaml");
    std::fs::write(
        &config_path,
        "keys_file: keys.yaml\nroutes:\n  - {path_prefix: /, upstream: 'http://127.0.0.1:9', environment: production}\n",
    )
    .unwrap();
    let keys: Vec<KeyRecord> = (0..100_000).map(record).collect();
    let store = Store::new(dir.path().join("keys.yaml"));
    let lock = store.lock().unwrap();
    store
        .save(
            &StoreFile {
                keys,
                ..StoreFile::default()
            },
            &lock,
        )
        .unwrap();
    drop(lock);

    let (limiters, usage, metrics) = (Limiters::new(), UsageBook::in_memory(), Metrics::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("reload");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("100k_keys", |b| {
        b.iter(|| {
            let ctx = BuildContext {
                config_path: &config_path,
                generation: 1,
                limiters: &limiters,
                metrics: &metrics,
                usage: &usage,
                previous: None,
                env_admin_token: None,
            };
            Snapshot::load(&ctx).expect("a valid store").key_count()
        })
    });
    group.finish();
}

/// One key changed in a snapshot of a million: an update of a key it holds (its scopes), a
/// new key, and a regenerate (the same id under a new hash, so two hash shards change).
fn key_change(c: &mut Criterion) {
    const N: usize = 1_000_000;
    let config = Config {
        routes: vec![RouteConfig::new("/", "http://127.0.0.1:9", "production")],
        ..Config::default()
    };
    let (limiters, usage, metrics) = (Limiters::new(), UsageBook::in_memory(), Metrics::default());
    let ctx = BuildContext {
        config_path: std::path::Path::new("bench.yaml"),
        generation: 1,
        limiters: &limiters,
        metrics: &metrics,
        usage: &usage,
        previous: None,
        env_admin_token: None,
    };
    let records: Vec<KeyRecord> = (0..N).map(record).collect();
    let snapshot = Snapshot::from_parts(&ctx, config, &records).expect("a valid snapshot");
    assert_eq!(snapshot.key_count(), N);

    let mut group = c.benchmark_group("key_change");
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(5));
    let mut i = 0;
    group.bench_function("update_1m", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            let mut changed = records[i].clone();
            changed.scopes = vec!["read:/v1/public/**".into()];
            snapshot
                .with_key_changes(&ctx, &[changed], None)
                .expect("applied")
                .key_count()
        })
    });
    let mut fresh = N;
    group.bench_function("create_1m", |b| {
        b.iter(|| {
            fresh += 1;
            let new = record(fresh);
            snapshot
                .with_key_changes(&ctx, &[new], None)
                .expect("applied")
                .key_count()
        })
    });
    group.bench_function("regenerate_1m", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            fresh += 1;
            let mut regenerated = records[i].clone();
            regenerated.hash = record(fresh).hash;
            snapshot
                .with_key_changes(&ctx, &[regenerated], None)
                .expect("applied")
                .key_count()
        })
    });
    group.finish();
}

criterion_group!(benches, reload, key_change);
criterion_main!(benches);
