//! Writes a gateway set-up for load tests (`benches/load.sh`, `../shared/perf/run.sh`): a
//! config that listens on 127.0.0.1:18083, proxies to 127.0.0.1:18080 with one worker,
//! allows only 127.0.0.1, and a key store of N keys made in one go, with their secrets in
//! `keys.txt`. For the peers doing the same job it also writes `nginx-keys.conf` (a map
//! entry per `Bearer <key>`) and `haproxy-keys.map` (SHA-256 of each key to its id).
//!
//! `cargo run --release --example perf_setup -- DIR [N]`

use std::path::PathBuf;

use keygate::keys::{format, hex, KeyRecord, Status, Store, StoreFile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: perf_setup DIR [N]")?);
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
        keys.push(KeyRecord {
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
        });
        secrets.push_str(&secret);
        secrets.push('\n');
        nginx.push_str(&format!("\"Bearer {secret}\" 1;\n"));
        haproxy.push_str(&format!("{hash} k{i}\n"));
    }
    let store = Store::new(dir.join("keys.yaml"));
    let lock = store.lock()?;
    store.save(
        &StoreFile {
            keys,
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
