//! Properties that must hold for every input, checked on thousands of generated ones
//! (proptest; a failure prints the smallest input that breaks it).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;

use keygate::config::{parse_yaml, Config};
use keygate::keys::format;
use keygate::keys::Store;
use keygate::pipeline::client_ip::resolve;
use keygate::policy::net::CidrSet;
use keygate::policy::scope::{Action, Scope, ScopeSet};

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn prefix() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}(_[a-z0-9]{1,8}){0,2}"
}

proptest! {
    // 2,000 cases a property in the suite; `PROPTEST_CASES=N` for a longer run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    /// Every key made passes the format check, with its own prefix.
    #[test]
    fn made_keys_parse_back(prefix in prefix()) {
        let key = format::generate(&prefix).unwrap();
        let parsed = format::parse(&key).unwrap();
        prop_assert_eq!(parsed.prefix, prefix.as_str());
        prop_assert_eq!(parsed.token, key.as_str());
    }

    /// Any one character changed after the prefix (a typo) fails the checksum.
    #[test]
    fn one_typo_never_passes(prefix in prefix(), at in any::<prop::sample::Index>(), shift in 1..62usize) {
        let key = format::generate(&prefix).unwrap();
        let body = prefix.len() + 1;
        let i = body + at.index(key.len() - body);
        let mut bytes = key.clone().into_bytes();
        // Another base62 character, never the same one.
        let was = BASE62.iter().position(|&c| c == bytes[i]).unwrap();
        bytes[i] = BASE62[(was + shift) % 62];
        let typo = String::from_utf8(bytes).unwrap();
        prop_assert!(format::parse(&typo).is_err(), "{} passed", typo);
    }

    /// The format check never panics, whatever it is given.
    #[test]
    fn the_format_check_takes_anything(token in ".{0,80}") {
        let _ = format::parse(&token);
    }

    /// A scope grants exactly what its pattern says: an action at most its own, on paths whose
    /// segments match the pattern's one by one (`*`: any one non-empty segment; a final `**`:
    /// anything after), and nothing else.
    #[test]
    fn a_scope_never_grants_more_than_its_pattern(
        action in 0..3usize,
        pattern in prop::collection::vec(prop_oneof![Just("*".to_string()), "[ab]{1,2}"], 0..4),
        open in any::<bool>(),
        path in prop::collection::vec(prop_oneof![Just(String::new()), "[ab]{1,2}"], 0..6),
        asked in 0..3usize,
    ) {
        let actions = [Action::Read, Action::Write, Action::Admin];
        let names = ["read", "write", "admin"];
        let mut filter = format!("/{}", pattern.join("/"));
        if open {
            filter.push_str(if pattern.is_empty() { "**" } else { "/**" });
        }
        let scope = Scope::parse(&format!("{}:{filter}", names[action])).unwrap();
        let path = format!("/{}", path.join("/"));
        let segments: Vec<&str> = path[1..].split('/').collect();
        // `/` alone is one empty segment; `/**` is no segment, then anything.
        let wanted: Vec<&str> = match (pattern.is_empty(), open) {
            (true, false) => vec![""],
            _ => pattern.iter().map(String::as_str).collect(),
        };
        let fits = if open { segments.len() >= wanted.len() } else { segments.len() == wanted.len() }
            && wanted.iter().zip(&segments).all(|(p, s)| if *p == "*" { !s.is_empty() } else { p == s });
        let expected = asked <= action && fits;
        prop_assert_eq!(scope.allows(actions[asked], &path), expected, "{}:{} on {}", names[action], filter, path);
    }

    /// A key with no scopes may do anything; with scopes, only what one of them allows.
    #[test]
    fn a_scope_set_is_the_union_of_its_scopes(
        which in prop::collection::vec(0..4usize, 0..3),
        method in prop_oneof![Just(Method::GET), Just(Method::POST), Just(Method::DELETE), Just(Method::TRACE)],
        path in "/[ab]{1,2}(/[ab]{1,2}){0,2}",
    ) {
        let all = ["read:/a/**", "write:/b/*", "admin:/a/b", "read:*"];
        let scopes: Vec<Scope> = which.iter().map(|&i| Scope::parse(all[i]).unwrap()).collect();
        let one_allows = scopes.iter().any(|s| s.allows(Action::required_for(&method), &path));
        let set = ScopeSet::new(scopes.clone());
        prop_assert_eq!(set.allows(&method, &path), scopes.is_empty() || one_allows);
    }

    /// A CIDR set holds an address exactly when one of its networks of the same version does.
    #[test]
    fn cidr_sets_match_like_their_networks(
        nets in prop::collection::vec((any::<u32>(), 0u8..=32), 0..4),
        ip in any::<u32>(),
    ) {
        let texts: Vec<String> = nets.iter().map(|(a, len)| format!("{}/{len}", Ipv4Addr::from(*a))).collect();
        let set = CidrSet::parse(&texts).unwrap_or_else(|e| panic!("{e:?}"));
        let ip = Ipv4Addr::from(ip);
        let expected = nets.iter().any(|(a, len)| {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
            (u32::from(ip) & mask) == (a & mask)
        });
        prop_assert_eq!(set.contains(IpAddr::V4(ip)), expected);
    }

    /// The client address is the peer, or an entry of `X-Forwarded-For` when the peer is
    /// trusted; never anything else, whatever the header holds.
    #[test]
    fn the_client_is_the_peer_or_a_forwarded_entry(
        entries in prop::collection::vec(prop_oneof![
            any::<u32>().prop_map(|a| Ipv4Addr::from(a).to_string()),
            Just("10.0.0.1".to_string()),
            ".{0,12}",
        ], 0..40),
        trusted_peer in any::<bool>(),
    ) {
        let peer: IpAddr = if trusted_peer { "10.9.9.9" } else { "192.0.2.1" }.parse().unwrap();
        let trusted = CidrSet::parse(&["10.0.0.0/8".to_string()]).unwrap();
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&entries.join(", ")) {
            headers.insert("x-forwarded-for", v);
        }
        let client = resolve(peer, &headers, &trusted);
        if !trusted_peer {
            prop_assert_eq!(client, peer);
        } else {
            let listed = entries.iter().any(|e| e.trim().parse::<IpAddr>().ok() == Some(client));
            prop_assert!(client == peer || listed, "{} from {:?}", client, entries);
        }
    }

    /// The config and key-store loaders answer any text with a value or located errors,
    /// never a panic.
    #[test]
    fn the_loaders_take_anything(text in "(.|\n){0,200}") {
        let _ = parse_yaml::<Config>(Path::new("fuzz.yaml"), &text);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, &text).unwrap();
        let _ = Store::new(&path).load();
    }

    /// The same for text shaped like the store's own layout, so the fast path is exercised.
    #[test]
    fn the_store_fast_path_takes_anything(lines in prop::collection::vec("\\{.{0,60}\\}", 0..5)) {
        let text = format!("version: 1\nkeys:\n{}", lines.iter().map(|l| format!("- {l}\n")).collect::<String>());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, &text).unwrap();
        let _ = Store::new(&path).load();
    }
}
