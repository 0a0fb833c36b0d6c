//! One usage flush, as housekeeping runs it every `usage.flush_interval`, in two shapes:
//!
//! - `usage_flush/all_changed/N`: each of N used keys is counted once more before each
//!   flush, as when every key is busy. The changes outgrow the journal, so every flush
//!   rewrites the usage file whole (temp file, fsync, rename).
//! - `usage_flush/one_percent_changed/N`: a hundredth of N used keys, a different hundredth
//!   each time, is counted before each flush, as when most keys are idle. The flush appends
//!   their records to the journal and syncs it; now and then the journal has grown to the
//!   file's size and a flush rewrites the file instead, which the mean takes in.
//!
//! - `housekeeping_idle/N`: the rest of a housekeeping pass over N used keys none of which
//!   was used since the last: the minute's tick and the request history's flush.
//!
//! - `redis_push_pass/N`: what the Redis usage push (every second) takes from N used keys
//!   of which a hundredth moved: `UsageBook::unpushed`. Beside it, `registry_copy/N`:
//!   `UsageBook::all`, the copy of every cell the push began with before it read the marks,
//!   and then read every cell's counters.
//!
//! `cargo bench --bench usage_flush`

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keygate::state::history::{History, HistoryConfig};
use keygate::state::usage::{KeyUsage, UsageBook};

const NOW: i64 = 1_796_661_768;

/// A book of `keys` used keys, flushed until it appends to its journal.
fn book(dir: &std::path::Path, keys: usize) -> (UsageBook, Vec<Arc<KeyUsage>>) {
    let book = UsageBook::open(dir.join("usage.json"));
    let cells = book.cells();
    let used = (0..keys)
        .map(|i| {
            let usage = cells.get_or_make(&format!("{:012x}", i * 7919));
            usage.seen(NOW, IpAddr::V4(Ipv4Addr::LOCALHOST));
            usage.accepted();
            usage
        })
        .collect();
    book.tick(NOW);
    for _ in 0..5 {
        book.flush().unwrap();
    }
    (book, used)
}

fn usage_flush(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage_flush");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for keys in [10_000usize, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        let (book, used) = book(dir.path(), keys);
        group.bench_with_input(BenchmarkId::new("all_changed", keys), &keys, |b, _| {
            b.iter(|| {
                for usage in &used {
                    usage.accepted();
                }
                book.flush().unwrap();
            })
        });
    }
    for keys in [100_000usize, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let (book, used) = book(dir.path(), keys);
        let mut next = 0usize;
        group.bench_with_input(
            BenchmarkId::new("one_percent_changed", keys),
            &keys,
            |b, _| {
                b.iter(|| {
                    for _ in 0..keys / 100 {
                        if let Some(usage) = used.get(next) {
                            usage.accepted();
                        }
                        next = (next + 7919) % keys;
                    }
                    book.flush().unwrap();
                })
            },
        );
    }
    for keys in [100_000usize, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let (book, _used) = book(dir.path(), keys);
        let history = History::open(
            &HistoryConfig::default(),
            Some(&dir.path().join("usage.json")),
            &book,
        );
        history.flush(&book).unwrap();
        group.bench_with_input(
            BenchmarkId::new("housekeeping_idle", keys),
            &keys,
            |b, _| {
                b.iter(|| {
                    book.tick(NOW);
                    history.flush(&book).unwrap();
                })
            },
        );
    }
    {
        let keys = 1_000_000usize;
        let dir = tempfile::tempdir().unwrap();
        let (book, used) = book(dir.path(), keys);
        book.unpushed();
        let mut next = 0usize;
        group.bench_with_input(BenchmarkId::new("redis_push_pass", keys), &keys, |b, _| {
            b.iter(|| {
                for _ in 0..keys / 100 {
                    if let Some(usage) = used.get(next) {
                        usage.accepted();
                    }
                    next = (next + 7919) % keys;
                }
                book.unpushed().len()
            })
        });
        group.bench_with_input(BenchmarkId::new("registry_copy", keys), &keys, |b, _| {
            b.iter(|| book.all().len())
        });
    }
    group.finish();
}

criterion_group!(benches, usage_flush);
criterion_main!(benches);
