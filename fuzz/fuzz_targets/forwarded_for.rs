//! CIDR lists and `X-Forwarded-For`: any header value resolves to the peer or one of its
//! entries, and only through trusted hops.
#![no_main]

use http::{HeaderMap, HeaderValue};
use keygate::pipeline::client_ip::resolve;
use keygate::policy::net::CidrSet;
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

fuzz_target!(|data: &[u8]| {
    let (cidrs, xff) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"10.0.0.0/8"[..], data),
    };
    let entries: Vec<String> = String::from_utf8_lossy(cidrs)
        .split(',')
        .map(str::to_string)
        .collect();
    let Ok(trusted) = CidrSet::parse(&entries) else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(xff) {
        headers.insert("x-forwarded-for", v);
    }
    let peer: IpAddr = "10.1.2.3".parse().unwrap();
    let client = resolve(peer, &headers, &trusted);
    // Only a trusted peer's header is believed, and only an address that is in it.
    if client != peer {
        assert!(trusted.contains(peer));
        assert!(headers.contains_key("x-forwarded-for"));
    }
});
