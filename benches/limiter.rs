//! Rate-limiter alternatives at 10,000 keys, each allowing plenty (so every check passes and
//! what is measured is the bookkeeping):
//! - `ours`: keygate's GCRA, one per key, reached through the key's entry in the snapshot (no
//!   lookup: the entry holds an `Arc` to it);
//! - `governor_keyed`: governor's keyed limiter over a DashMap (one quota for every key, so
//!   it could not give keys their own rates anyway);
//! - `dashmap_of_direct`: a DashMap from key id to a direct limiter, looked up per request.
//!
//! `cargo bench --bench limiter`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dashmap::DashMap;
use governor::{Quota, RateLimiter};
use keygate::clock::Clock;
use keygate::config::units::Rate;
use keygate::pipeline::rate_limit::admit;
use keygate::policy::rate::RatePolicy;
use keygate::state::limiters::Limiters;

const KEYS: usize = 10_000;

fn limiters(c: &mut Criterion) {
    let ids: Vec<String> = (0..KEYS).map(|i| format!("{i:08x}")).collect();
    let policy = RatePolicy {
        rate: Rate {
            count: 1_000_000,
            per: Duration::from_secs(1),
        },
        burst: 1_000_000,
    };
    let quota = Quota::per_second(NonZeroU32::new(1_000_000).unwrap());
    let mut group = c.benchmark_group("limiter");

    let clock = Clock::real();
    let registry = Limiters::new();
    let ours: Vec<_> = ids
        .iter()
        .map(|id| registry.limiter_for(id, (Some(policy), &[])))
        .collect();
    let mut i = 0;
    group.bench_function("ours", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(admit(&[&ours[i]], &clock).is_ok())
        })
    });

    let keyed = RateLimiter::dashmap(quota);
    let mut i = 0;
    group.bench_function("governor_keyed", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(keyed.check_key(&ids[i]).is_ok())
        })
    });

    let map: DashMap<String, RateLimiter<_, _, _>> = ids
        .iter()
        .map(|id| (id.clone(), RateLimiter::direct(quota)))
        .collect();
    let mut i = 0;
    group.bench_function("dashmap_of_direct", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(map.get(&ids[i]).map(|l| l.check().is_ok()))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = limiters
}
criterion_main!(benches);
