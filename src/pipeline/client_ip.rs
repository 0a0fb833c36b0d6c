//! Stage 1: who is the client? The peer's address, unless the peer is a trusted proxy; then
//! the right-most `X-Forwarded-For` entry that is not itself a trusted proxy. Entries from
//! untrusted peers are never believed.

use std::net::IpAddr;

use crate::policy::net::CidrSet;
use http::HeaderMap;

/// How many `X-Forwarded-For` entries are examined at most; a longer chain is cut there,
/// so a client cannot make the gateway walk 10,000 entries.
pub const MAX_FORWARDED_HOPS: usize = 32;

/// The client's address for this request.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted: &CidrSet) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let mut client = peer;
    let entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|v| v.as_bytes().rsplit(|&b| b == b','))
        .take(MAX_FORWARDED_HOPS);
    for entry in entries {
        // An entry that cannot be read ends the trust: the hop that wrote it is the client.
        let Some(ip) = parse_forwarded_entry(entry) else {
            break;
        };
        client = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:567`, `2001:db8::1` or `[2001:db8::1]:567`.
fn parse_forwarded_entry(raw: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest
            .split_once(']')?
            .0
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical());
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn set(entries: &[&str]) -> CidrSet {
        CidrSet::parse(
            entries
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .iter(),
        )
        .unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_matching_by_version() {
        let s = set(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(s.contains(ip("10.1.2.3")));
        assert!(!s.contains(ip("11.1.2.3")));
        assert!(s.contains(ip("2001:db8::7")));
        assert!(!s.contains(ip("2001:db9::7")));
        // An IPv4-mapped IPv6 address is matched as IPv4.
        assert!(s.contains(ip("::ffff:10.9.9.9")));
        // A version with no rules matches nothing.
        let only_v6 = set(&["::/0"]);
        assert!(!only_v6.contains(ip("1.2.3.4")));
        assert!(only_v6.contains(ip("::1")));
    }

    #[test]
    fn bare_addresses_and_garbage() {
        let s = set(&["192.168.1.7"]);
        assert!(s.contains(ip("192.168.1.7")));
        assert!(!s.contains(ip("192.168.1.8")));
        let err = CidrSet::parse(["10.0.0.0/33".to_string(), "ok".to_string()].iter());
        assert_eq!(err.unwrap_err().len(), 2);
    }

    #[test]
    fn untrusted_peer_ignores_forwarded_for() {
        let trusted = set(&["10.0.0.0/8"]);
        let peer = ip("203.0.113.9");
        assert_eq!(resolve(peer, &xff(&["1.1.1.1"]), &trusted), peer);
        assert_eq!(resolve(peer, &xff(&["1.1.1.1"]), &CidrSet::default()), peer);
    }

    #[test]
    fn trusted_chain_is_trimmed_from_the_right() {
        let trusted = set(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        let h = xff(&["6.6.6.6, 198.51.100.4", "10.0.0.2"]);
        assert_eq!(resolve(peer, &h, &trusted), ip("198.51.100.4"));
        // All trusted: the left-most entry is as far as we can see.
        assert_eq!(
            resolve(peer, &xff(&["10.1.1.1, 10.2.2.2"]), &trusted),
            ip("10.1.1.1")
        );
        // No header: the peer itself.
        assert_eq!(resolve(peer, &HeaderMap::new(), &trusted), peer);
        // Ports and brackets are understood.
        assert_eq!(
            resolve(peer, &xff(&["[2001:db8::5]:443"]), &trusted),
            ip("2001:db8::5")
        );
        assert_eq!(
            resolve(peer, &xff(&["198.51.100.4:1234"]), &trusted),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn garbage_entry_stops_at_the_last_trusted_hop() {
        let trusted = set(&["10.0.0.0/8"]);
        let h = xff(&["1.2.3.4, not-an-ip, 10.0.0.3"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.3"));
    }

    #[test]
    fn long_chains_are_bounded() {
        let trusted = set(&["10.0.0.0/8"]);
        let long = vec!["10.0.0.9"; 10_000].join(",");
        let h = xff(&[&format!("1.2.3.4,{long}")]);
        // The real client is beyond the examined hops, so the last one examined is used.
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.9"));
    }
}
