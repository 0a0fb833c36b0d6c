//! How long a key's first request waits for the usage book while a housekeeping pass walks
//! it. A key's first request since start makes the key's usage cell in the book; every usage
//! flush and minute tick (`UsageBook::all`) and every Redis usage push
//! (`UsageBook::unpushed`) walks the whole book. At a million used keys a walk takes a
//! fifth of a second, and a first request that meets it waits for the part of the book it
//! needs.
//!
//! The worst case, measured: one thread walks the book's million cells back to back
//! (`all`, as the flush and the tick do), while the main thread makes 2,000 new keys' cells
//! one a millisecond, timing each. Printed: the waits' median, 99th and 99.9th percentiles
//! and maximum, the walks done meanwhile and their mean time.
//!
//! `cargo bench --bench registry_wait` (KEYS=100000 for a smaller book)

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keygate::state::usage::UsageBook;

const NOW: i64 = 1_796_661_768;
const FIRST_USES: usize = 2_000;

fn main() {
    let keys: usize = std::env::var("KEYS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(1_000_000);
    let book = UsageBook::in_memory();
    let cells = book.cells();
    for i in 0..keys {
        let usage = cells.get_or_make(&format!("{:012x}", i * 7919));
        usage.seen(NOW, IpAddr::V4(Ipv4Addr::LOCALHOST));
        usage.accepted();
    }
    let walking = AtomicBool::new(true);
    let walks = AtomicU64::new(0);
    let walked = AtomicU64::new(0);
    let mut waits: Vec<Duration> = Vec::with_capacity(FIRST_USES);
    std::thread::scope(|s| {
        s.spawn(|| {
            while walking.load(Ordering::Relaxed) {
                let started = Instant::now();
                std::hint::black_box(book.all().len());
                walked.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                walks.fetch_add(1, Ordering::Relaxed);
            }
        });
        // The walker's first pass under way before the first request.
        std::thread::sleep(Duration::from_millis(50));
        for i in 0..FIRST_USES {
            let id = format!("new{i:09}");
            let started = Instant::now();
            std::hint::black_box(cells.get_or_make(&id));
            waits.push(started.elapsed());
            std::thread::sleep(Duration::from_millis(1));
        }
        walking.store(false, Ordering::Relaxed);
    });
    waits.sort();
    let at = |q: f64| {
        let i = ((waits.len() as f64 - 1.0) * q).round() as usize;
        waits[i.min(waits.len() - 1)]
    };
    println!(
        "registry_wait: {keys} used keys, {FIRST_USES} first uses during {} walks: \
         median {:?}, p99 {:?}, p99.9 {:?}, max {:?}; a walk took {} ms on average",
        walks.load(Ordering::Relaxed),
        at(0.5),
        at(0.99),
        at(0.999),
        waits[waits.len() - 1],
        walked.load(Ordering::Relaxed) / walks.load(Ordering::Relaxed).max(1) / 1000,
    );
}
