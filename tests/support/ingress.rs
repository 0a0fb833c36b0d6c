//! The proxy's request table, for every way of asking keygate: the proxy itself, the auth
//! listener in each ingress's request shape, real nginx and Caddy in front of it, and the
//! verify API. One gateway per run, with the auth listener on, keys in every state, and
//! routes whose refusals cover every code a request can get before the upstream.

use keygate::keys;

use super::*;

/// An admin token of each role, beside the suite's `admin` one.
pub const VERIFY_TOKEN: &str = "verify-role-token-for-tests";
pub const READ_TOKEN: &str = "read-role-token-for-tests";

pub struct Fixture {
    pub gw: TestGateway,
    pub up: Upstream,
    pub auth: SocketAddr,
    pub cases: Vec<Case>,
    pub good_id: String,
    pub good: String,
}

/// One request of the table, and the proxy's answer to it.
#[derive(Debug, Clone)]
pub struct Case {
    pub what: &'static str,
    pub method: &'static str,
    pub path: &'static str,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The client's address (the tests send from it, or name it in forwarded headers).
    pub from: &'static str,
    pub status: u16,
    /// The refusal's code; empty when accepted.
    pub code: &'static str,
}

fn sha(token: &str) -> String {
    keys::hex(&keys::format::hash(token))
}

/// Starts the gateway with `listen.auth` and `extra` config, fills it, and lists the table.
/// The table's rate-limited and quota keys allow one request: each fixture runs its table
/// once, in order.
pub async fn fixture(extra: &str) -> Fixture {
    let up = Upstream::start().await;
    let routes = [
        route("/v1", up.addr, "production", ""),
        route("/staging", up.addr, "staging", ""),
        route("/partners", up.addr, "production", "namespaces: [partner]"),
    ]
    .concat();
    let config = format!(
        "listen:\n  proxy: 127.0.0.1:0\n  admin: 127.0.0.1:0\n  auth: 127.0.0.1:0\nkeys_file: keys.yaml\n\
         trusted_proxies: [127.0.0.1/32]\nauth:\n  envoy_path_prefix: /envoy\n\
         admin_tokens:\n  - {{name: tests, hash: \"sha256:{}\"}}\n  - {{name: verifier, hash: \"sha256:{}\", role: verify}}\n  - {{name: auditor, hash: \"sha256:{}\", role: read}}\n\
         routes:\n{routes}\n{extra}\n",
        sha(ADMIN_TOKEN),
        sha(VERIFY_TOKEN),
        sha(READ_TOKEN),
    );
    let gw = TestGateway::start_with(&config, false).await;
    let auth = gw.auth.expect("the auth listener is on");
    let RefusalKeys {
        good: (good_record, good),
        revoked: revoked_secret,
        disabled: disabled_secret,
        expired: expiring,
        walled,
        reader,
        limited,
        quota,
    } = gw.refusal_keys("127.0.0.2/32").await;
    let unknown = keys::format::generate("kg_live").unwrap();
    super::ledger::secret(&unknown);
    let bearer = |k: &str| Some(format!("Bearer {k}"));
    let case = |what, method, path, authorization, from, status, code| Case {
        what,
        method,
        path,
        authorization,
        from,
        status,
        code,
    };
    let cases = vec![
        case(
            "accepted",
            "GET",
            "/v1/x",
            bearer(&good),
            "127.0.0.9",
            200,
            "",
        ),
        case(
            "no key",
            "GET",
            "/v1/x",
            None,
            "127.0.0.9",
            401,
            "missing_key",
        ),
        case(
            "another scheme",
            "GET",
            "/v1/x",
            Some("Basic Zm9vOmJhcg==".into()),
            "127.0.0.9",
            401,
            "malformed_key",
        ),
        case(
            "a short key",
            "GET",
            "/v1/x",
            bearer("kg_live_short"),
            "127.0.0.9",
            401,
            "malformed_key",
        ),
        case(
            "an unknown key",
            "GET",
            "/v1/x",
            bearer(&unknown),
            "127.0.0.9",
            401,
            "unknown_key",
        ),
        case(
            "an expired key",
            "GET",
            "/v1/x",
            bearer(&expiring),
            "127.0.0.9",
            401,
            "expired_key",
        ),
        case(
            "a revoked key",
            "GET",
            "/v1/x",
            bearer(&revoked_secret),
            "127.0.0.9",
            401,
            "revoked_key",
        ),
        case(
            "a disabled key",
            "GET",
            "/v1/x",
            bearer(&disabled_secret),
            "127.0.0.9",
            401,
            "inactive_key",
        ),
        case(
            "another environment",
            "GET",
            "/staging/x",
            bearer(&good),
            "127.0.0.9",
            401,
            "wrong_environment",
        ),
        case(
            "another namespace",
            "GET",
            "/partners/x",
            bearer(&good),
            "127.0.0.9",
            403,
            "namespace_denied",
        ),
        case(
            "an address outside the key's",
            "GET",
            "/v1/x",
            bearer(&walled),
            "127.0.0.3",
            403,
            "ip_not_allowed",
        ),
        case(
            "the key's own address",
            "GET",
            "/v1/x",
            bearer(&walled),
            "127.0.0.2",
            200,
            "",
        ),
        case(
            "a write with a read scope",
            "POST",
            "/v1/x",
            bearer(&reader),
            "127.0.0.9",
            403,
            "scope_denied",
        ),
        case(
            "a dot segment into another route",
            "GET",
            "/v1/../partners/x",
            bearer(&reader),
            "127.0.0.9",
            403,
            "namespace_denied",
        ),
        case(
            "an encoded slash",
            "GET",
            "/v1/a%2Fb",
            bearer(&good),
            "127.0.0.9",
            400,
            "invalid_path",
        ),
        case(
            "no route",
            "GET",
            "/nowhere",
            bearer(&good),
            "127.0.0.9",
            404,
            "no_route",
        ),
        case(
            "the rate limit's one request",
            "GET",
            "/v1/x",
            bearer(&limited),
            "127.0.0.9",
            200,
            "",
        ),
        case(
            "past the rate limit",
            "GET",
            "/v1/x",
            bearer(&limited),
            "127.0.0.9",
            429,
            "rate_limited",
        ),
        case(
            "the quota's one request",
            "GET",
            "/v1/x",
            bearer(&quota),
            "127.0.0.9",
            200,
            "",
        ),
        case(
            "past the quota",
            "GET",
            "/v1/x",
            bearer(&quota),
            "127.0.0.9",
            429,
            "quota_exceeded",
        ),
    ];
    Fixture {
        gw,
        up,
        auth,
        cases,
        good_id: good_record.id,
        good,
    }
}

/// Checks an answer to `case` the way a client of the proxy would see it.
pub fn check_refusal(case: &Case, r: &Answer, via: &str) {
    let what = format!("{via}: {} ({} {})", case.what, case.method, case.path);
    assert_eq!(r.status.as_u16(), case.status, "{what}: {:?}", r.body);
    if case.status == 200 {
        return;
    }
    assert_eq!(r.code(), case.code, "{what}: {:?}", r.body);
    assert_eq!(
        r.header("content-type"),
        "application/problem+json",
        "{what}"
    );
    assert_eq!(r.json()["status"], case.status, "{what}");
    if case.status == 401 {
        assert_eq!(
            r.header("www-authenticate"),
            "Bearer realm=\"keygate\", error=\"invalid_token\"",
            "{what}"
        );
    }
    if case.status == 429 {
        let retry: u64 = r.header("retry-after").parse().unwrap_or(0);
        assert!(
            retry >= 1,
            "{what}: Retry-After {:?}",
            r.header("retry-after")
        );
        assert!(!r.header("ratelimit").is_empty(), "{what}");
        assert!(!r.header("ratelimit-policy").is_empty(), "{what}");
    }
}

/// A free loopback port, for a server the test starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
