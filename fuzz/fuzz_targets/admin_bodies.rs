//! The admin API's JSON bodies, read and checked as the routes do before they touch the
//! store: any bytes get a checked body or a 4xx refusal, never a panic or a 5xx. Anything
//! that is not a JSON object is refused. What a create accepts makes keys that parse back,
//! expires in the future, and spells its rate and quota so they read back the same.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use keygate::config::units::parse_rate;
use keygate::config::{parse_yaml, Config};
use keygate::keys::format;
use keygate::keys::lifecycle::MAX_GRACE_SECS;
use keygate::policy::quota::Quota;
use libfuzzer_sys::fuzz_target;

/// A namespace with a long prefix of its own, so long environment names reach the format's
/// prefix limit; and one without. New keys must name an environment a route serves or the
/// config declares: a long one is declared.
const CONFIG: &str = "\
listen: {proxy: 127.0.0.1:0, admin: 127.0.0.1:0}
environments: [staging, development, longenvironmentname0123456789abc]
namespaces:
  acme: {}
  longprefix: {prefix: abcdefghijklmnopqrstu}
routes:
  - {path_prefix: /, upstream: \"http://127.0.0.1:9\", environment: production}
";

/// 2026-12-01T00:00:00Z.
const NOW: i64 = 1_796_083_200;

fn config() -> &'static Config {
    static CONFIG_ONCE: OnceLock<Config> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| {
        parse_yaml::<Config>(Path::new("fuzz.yaml"), CONFIG).expect("the fuzz config reads")
    })
}

fuzz_target!(|data: &[u8]| {
    let read = keygate::admin::read_bodies(data, config(), NOW);
    for refusal in [
        read.create.as_ref().err(),
        read.patch.as_ref().err(),
        read.rotate_grace.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    {
        assert!(refusal.status().is_client_error(), "{refusal:?}");
    }
    let is_object = serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| v.is_object());
    if !is_object {
        assert!(read.create.is_err() && read.patch.is_err() && read.rotate_grace.is_err());
    }
    if let Ok(key) = &read.create {
        let made = format::generate(&key.prefix).expect("randomness");
        assert_eq!(format::parse(&made).map(|p| p.prefix), Ok(key.prefix.as_str()));
        assert!(key.expires_at.is_none_or(|at| at > NOW));
        if let Some(rate) = &key.rate_limit {
            assert_eq!(&parse_rate(rate).expect("canonical rate").to_string(), rate);
        }
        if let Some(quota) = &key.quota {
            assert_eq!(&Quota::parse(quota).expect("canonical quota").to_string(), quota);
        }
    }
    if let Ok(patch) = &read.patch {
        assert!(patch.expires_at.flatten().is_none_or(|at| at > NOW));
    }
    if let Ok(Some(grace)) = read.rotate_grace {
        assert!(grace <= MAX_GRACE_SECS);
    }
});
