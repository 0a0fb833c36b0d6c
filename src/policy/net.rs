//! Networks: the CIDR sets of `allowed_cidrs` and `trusted_proxies`, and how one entry is read.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A set of IPv4 and IPv6 networks, each matched only against addresses of its own version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl CidrSet {
    /// Parses every entry, naming each one that is not a CIDR or address.
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = &'a String>,
    ) -> Result<CidrSet, Vec<(usize, String)>> {
        let mut set = CidrSet::default();
        let mut errors = Vec::new();
        for (i, text) in entries.into_iter().enumerate() {
            match parse_net(text) {
                Ok(IpNet::V4(n)) => set.v4.push(n),
                Ok(IpNet::V6(n)) => set.v6.push(n),
                Err(e) => errors.push((i, e)),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `ip` falls in a network of its own version. IPv4-mapped IPv6 counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.v4.iter().any(|n| n.contains(&a)),
            IpAddr::V6(a) => self.v6.iter().any(|n| n.contains(&a)),
        }
    }
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address (`10.1.2.3`).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{text}` is not a CIDR or an IP address"))
}
