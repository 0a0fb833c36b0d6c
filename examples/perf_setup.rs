//! Writes a gateway set-up for load tests (`benches/load.sh`, `../shared/perf/run.sh`): a
//! config that listens on 127.0.0.1:18083, proxies to 127.0.0.1:18080 with one worker,
//! allows only 127.0.0.1, and a key store of N keys made in one go, with their secrets in
//! `keys.txt`. For the peers doing the same job it also writes `nginx-keys.conf` (a map
//! entry per `Bearer <key>`) and `haproxy-keys.map` (SHA-256 of each key to its id).
//!
//! With `--customer`, each key models a customer as issue 18's cost figure asks: credits
//! (far more than a run spends), an identity (one of 100, each with metadata and a rate
//! limit of its own) and two named rate limits in place of the one limit, all far above
//! the load (`benches/customer_cost.sh` compares the two shapes).
//!
//! `cargo run --release --example perf_setup -- DIR [N] [--customer]`

use std::path::PathBuf;

use keygate::keys::{
    format, hex, CreditsRecord, KeyRecord, NamedLimitRecord, Status, Store, StoreFile,
};

/// Identities the customer shape spreads its keys over.
const IDENTITIES: usize = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (flags, args): (Vec<String>, Vec<String>) =
        std::env::args().skip(1).partition(|a| a.starts_with("--"));
    let customer = match flags.as_slice() {
        [] => false,
        [one] if one == "--customer" => true,
        _ => return Err("usage: perf_setup DIR [N] [--customer]".into()),
    };
    let mut args = args.into_iter();
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: perf_setup DIR [N] [--customer]")?,
    );
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("keygate.yaml"),
        "# Load-harness set-up written by examples/perf_setup.rs.\n\
         listen: {proxy: 127.0.0.1:18083, admin: 127.0.0.1:18093}\n\
         keys_file: keys.yaml\n\
         workers: 1\n\
         routes:\n  - path_prefix: /\n    upstream: http://127.0.0.1:18080\n    environment: production\n",
    )?;
    let mut secrets = String::with_capacity(n * 48);
    let mut nginx = String::with_capacity(n * 64);
    let mut haproxy = String::with_capacity(n * 80);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let secret = format::generate("kg_live")?;
        let hash = hex(&format::hash(&secret));
        let limit = |name: &str, limit: &str, burst| NamedLimitRecord {
            name: name.into(),
            limit: limit.into(),
            burst,
        };
        let mut record = KeyRecord {
            id: format!("{}{:x}", &hash[..8], i),
            hash: format!("sha256:{hash}"),
            prefix: "kg_live".into(),
            name: format!("perf-{i}"),
            namespace: "perf".into(),
            environment: "production".into(),
            scopes: vec![],
            allowed_cidrs: vec!["127.0.0.1/32".into()],
            // Far above what one key sees in a run, as in the nginx and HAProxy set-ups.
            rate_limit: Some("100000/s".into()),
            burst: Some(1000),
            expires_at: None,
            status: Status::Active,
            created_at: "2026-01-01T00:00:00Z".into(),
            created_by: "perf_setup".into(),
            ..KeyRecord::default()
        };
        if customer {
            record.rate_limit = None;
            record.burst = None;
            record.rate_limits = vec![
                limit("second", "100000/s", Some(1000)),
                limit("hourly", "1000000/h", None),
            ];
            record.credits = Some(CreditsRecord {
                remaining: 1_000_000_000_000,
                refill: None,
                set_at: Some("2026-01-01T00:00:00Z".into()),
                version: 1,
            });
            record.identity = Some(format!("cus_{}", i % IDENTITIES));
        }
        keys.push(record);
        secrets.push_str(&secret);
        secrets.push('\n');
        nginx.push_str(&format!("\"Bearer {secret}\" 1;\n"));
        haproxy.push_str(&format!("{hash} k{i}\n"));
    }
    let store = Store::new(dir.join("keys.yaml"));
    let lock = store.lock()?;
    let identities = match customer {
        false => Vec::new(),
        true => (0..IDENTITIES)
            .map(|i| {
                serde_json::json!({
                    "id": format!("cus_{i}"),
                    "rate_limits": [{"name": "minute", "limit": "1000000/m", "burst": 100000}],
                    "meta": {"plan": "pro", "customer_id": format!("cus_{i}")},
                    "created_at": "2026-01-01T00:00:00Z",
                })
            })
            .collect(),
    };
    store.save(
        &StoreFile {
            keys,
            identities,
            ..StoreFile::default()
        },
        &lock,
    )?;
    std::fs::write(dir.join("keys.txt"), secrets)?;
    std::fs::write(dir.join("nginx-keys.conf"), nginx)?;
    std::fs::write(dir.join("haproxy-keys.map"), haproxy)?;
    println!(
        "{n} keys in {}; secrets in {}",
        store.path().display(),
        dir.join("keys.txt").display()
    );
    Ok(())
}
