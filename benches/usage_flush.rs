//! One usage flush with 10,000 and 100,000 used keys: every key's counters serialised and the
//! usage file rewritten whole (temp file, fsync, rename), as housekeeping does every
//! `usage.flush_interval`. Each key is counted once more before each flush, as under load.
//!
//! `cargo bench --bench usage_flush`

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keygate::state::usage::UsageBook;

fn usage_flush(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage_flush");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for keys in [10_000usize, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        let book = UsageBook::open(dir.path().join("usage.json"));
        let cells = book.cells();
        let now = 1_796_661_768;
        for i in 0..keys {
            let usage = cells.get_or_make(&format!("{:012x}", i * 7919));
            usage.seen(now, IpAddr::V4(Ipv4Addr::LOCALHOST));
            usage.accepted();
        }
        book.tick(now);
        let used = book.all();
        group.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
            b.iter(|| {
                for (_, usage) in &used {
                    usage.accepted();
                }
                book.flush().unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, usage_flush);
criterion_main!(benches);
