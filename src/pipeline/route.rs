//! Stage 2: which route takes the request? Paths are normalised first, so that a scope check
//! and the upstream see the same path (`/v1/../admin` cannot pass as `/v1/**`).

use std::borrow::Cow;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;

use crate::config::units::{parse_duration, parse_size};
use crate::config::{Problems, RouteConfig};
use crate::rejection::Rejection;

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    host: Option<HostMatch>,
    prefix: String,
    pub upstream: Upstream,
    pub environment: String,
    pub namespaces: Vec<String>,
    pub strip_prefix: bool,
    pub preserve_host: bool,
    pub keep_authorization: bool,
    pub response_timeout: Duration,
    pub max_request_body: u64,
    /// This route's request counters, shared across snapshots by route name.
    pub counters: std::sync::Arc<crate::metrics::RouteCounters>,
    /// The snapshot's upstream pool this route uses.
    pub client: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum HostMatch {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
}

/// Where a route sends requests.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The upstream URL's path, without a trailing slash (`""` for none).
    pub base_path: String,
    /// `Host` to send when the client's is not preserved.
    pub host_header: HeaderValue,
}

/// Routes in match order: host-specific before any-host, then longest prefix first.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.prefix.len().cmp(&a.prefix.len()))
        });
        RouteTable { routes }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn has_name(&self, name: &str) -> bool {
        self.routes.iter().any(|r| r.name == name)
    }

    /// The route for a host (from `Host` or the URI) and a normalised path.
    pub fn select(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .find(|r| r.matches_host(host) && prefix_matches(&r.prefix, path))
    }
}

impl Route {
    fn matches_host(&self, host: Option<&str>) -> bool {
        match (&self.host, host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(HostMatch::Exact(want)), Some(h)) => want.eq_ignore_ascii_case(h),
            (Some(HostMatch::Suffix(suffix)), Some(h)) => {
                h.len() > suffix.len()
                    && h.as_bytes()[h.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }

    /// Whether the path sent upstream differs from the request's.
    pub fn rewrites_path(&self) -> bool {
        !self.upstream.base_path.is_empty() || (self.strip_prefix && self.prefix != "/")
    }

    /// The path to send upstream: base path, then the request path (less the prefix when
    /// stripping), then the query.
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> String {
        let rest = if self.strip_prefix && self.prefix != "/" {
            match &path[self.prefix.len()..] {
                "" => "/",
                rest => rest,
            }
        } else {
            path
        };
        let mut out = String::with_capacity(
            self.upstream.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1),
        );
        out.push_str(&self.upstream.base_path);
        out.push_str(rest);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    /// Compiles one route, recording each problem under `path`.
    pub fn compile(
        raw: &RouteConfig,
        path: &str,
        defaults: &RouteDefaults,
        problems: &mut Problems,
    ) -> Option<Route> {
        let mut ok = true;
        let mut bad = |field: &str, msg: String| {
            problems.push(format!("{path}.{field}"), msg);
            ok = false;
        };
        let host = match raw.host.as_deref().map(str::trim) {
            None => None,
            Some(h) if h.is_empty() || h.contains(['/', ' ', ':']) => {
                bad(
                    "host",
                    format!("`{h}` is not a host name (no scheme, port or path)"),
                );
                None
            }
            Some(h) => Some(match h.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') => {
                    HostMatch::Suffix(suffix.to_ascii_lowercase())
                }
                Some(_) => {
                    bad(
                        "host",
                        format!("`{h}`: a wildcard host must look like `*.example.com`"),
                    );
                    HostMatch::Exact(String::new())
                }
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            }),
        };
        let prefix = raw.path_prefix.trim();
        let prefix = if !prefix.starts_with('/') {
            bad("path_prefix", format!("`{prefix}` must start with `/`"));
            String::from("/")
        } else if normalize_path(prefix).map(|p| p != prefix).unwrap_or(true) {
            bad(
                "path_prefix",
                format!("`{prefix}` must be a plain path (no `.`, `..` or encoded slashes)"),
            );
            String::from("/")
        } else {
            match prefix.trim_end_matches('/') {
                "" => String::from("/"),
                p => p.to_string(),
            }
        };
        let upstream = match parse_upstream(&raw.upstream) {
            Ok(u) => Some(u),
            Err(e) => {
                bad("upstream", e);
                None
            }
        };
        if let Err(e) = crate::keys::validate_environment(&raw.environment) {
            bad("environment", e);
        }
        for (i, ns) in raw.namespaces.iter().enumerate() {
            if let Err(e) = crate::keys::validate_namespace(ns) {
                bad(&format!("namespaces[{i}]"), e);
            }
        }
        let response_timeout = match raw.response_timeout.as_deref().map(parse_duration) {
            None => defaults.response_timeout,
            Some(Ok(d)) if !d.is_zero() => d,
            Some(Ok(_)) => {
                bad("response_timeout", "must be greater than zero".into());
                defaults.response_timeout
            }
            Some(Err(e)) => {
                bad("response_timeout", e);
                defaults.response_timeout
            }
        };
        let max_request_body = match raw.max_request_body.as_deref().map(parse_size) {
            None => defaults.max_request_body,
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                bad("max_request_body", e);
                defaults.max_request_body
            }
        };
        if !ok {
            return None;
        }
        let name = raw.name.clone().unwrap_or_else(|| match &raw.host {
            Some(h) => format!("{h}{prefix}"),
            None => prefix.clone(),
        });
        Some(Route {
            name,
            host,
            prefix,
            upstream: upstream?,
            environment: raw.environment.clone(),
            namespaces: raw.namespaces.clone(),
            strip_prefix: raw.strip_prefix,
            preserve_host: raw.preserve_host,
            keep_authorization: raw.keep_authorization,
            response_timeout,
            max_request_body,
            counters: Default::default(),
            client: 0,
        })
    }
}

/// Route settings that fall back to the config's global values.
#[derive(Debug, Clone, Copy)]
pub struct RouteDefaults {
    pub response_timeout: Duration,
    pub max_request_body: u64,
}

fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let bad = |why: &str| format!("`{text}` is not an upstream URL: {why}");
    let uri: http::Uri = text
        .trim()
        .parse()
        .map_err(|_| bad("write http://host:port[/path]"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| bad("it needs http://"))?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(bad("it needs http:// or https://"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad("it needs a host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    if uri.query().is_some() {
        return Err(bad("a query string is not allowed"));
    }
    let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| bad("bad host"))?;
    Ok(Upstream {
        scheme,
        authority,
        base_path: uri.path().trim_end_matches('/').to_string(),
        host_header,
    })
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

/// Normalises a request path as RFC 3986 §6.2.2 does: `%2E` read as `.`, then dot segments
/// removed. Encoded slashes and backslashes are refused, because upstreams disagree on them
/// and one that decodes `%2F` would see a different path from the one the scopes saw.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Rejection> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Rejection::InvalidPath);
    }
    let mut suspicious = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Rejection::InvalidPath),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(Rejection::InvalidPath)?;
                match hex {
                    [b'2', b'f' | b'F'] | [b'5', b'c' | b'C'] => {
                        return Err(Rejection::InvalidPath)
                    }
                    [b'2', b'e' | b'E'] => suspicious = true,
                    [a, b] if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => {}
                    _ => return Err(Rejection::InvalidPath),
                }
                i += 3;
                continue;
            }
            b'.' if bytes[i - 1] == b'/' => suspicious = true,
            _ => {}
        }
        i += 1;
    }
    if !suspicious {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = path.replace("%2e", ".").replace("%2E", ".");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for seg in &out {
        normalized.push('/');
        normalized.push_str(seg);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    Ok(Cow::Owned(normalized))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str, upstream: &str) -> Route {
        let raw = RouteConfig {
            host: host.map(String::from),
            ..RouteConfig::new(prefix, upstream, "production")
        };
        let defaults = RouteDefaults {
            response_timeout: Duration::from_secs(1),
            max_request_body: 1,
        };
        let mut p = Problems::default();
        Route::compile(&raw, "routes[0]", &defaults, &mut p).expect("valid route")
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let table = RouteTable::new(vec![
            route(None, "/", "http://a:1"),
            route(None, "/v1", "http://b:1"),
            route(Some("api.example.com"), "/", "http://c:1"),
            route(Some("*.example.org"), "/", "http://d:1"),
        ]);
        let up =
            |h: Option<&str>, p: &str| table.select(h, p).map(|r| r.upstream.authority.to_string());
        assert_eq!(up(None, "/v1/x").as_deref(), Some("b:1"));
        assert_eq!(up(None, "/v1").as_deref(), Some("b:1"));
        assert_eq!(up(None, "/v10").as_deref(), Some("a:1"));
        assert_eq!(
            up(Some("API.example.com:8080"), "/v1/x").as_deref(),
            Some("c:1")
        );
        assert_eq!(up(Some("x.example.org"), "/").as_deref(), Some("d:1"));
        assert_eq!(up(Some("example.org"), "/").as_deref(), Some("a:1"));
        let only_v1 = RouteTable::new(vec![route(None, "/v1/", "http://b:1")]);
        assert!(only_v1.select(None, "/v2").is_none());
    }

    #[test]
    fn upstream_paths() {
        let mut r = route(None, "/v1", "http://up:9/base/");
        assert_eq!(
            r.upstream_path("/v1/users", Some("a=1")),
            "/base/v1/users?a=1"
        );
        r.strip_prefix = true;
        assert_eq!(r.upstream_path("/v1/users", None), "/base/users");
        assert_eq!(r.upstream_path("/v1", None), "/base/");
    }

    #[test]
    fn bad_routes_report_every_field() {
        let raw = RouteConfig {
            host: Some("http://x".into()),
            namespaces: vec!["".into()],
            response_timeout: Some("soon".into()),
            max_request_body: Some("big".into()),
            ..RouteConfig::new("v1", "ftp://x", "Prod!")
        };
        let defaults = RouteDefaults {
            response_timeout: Duration::from_secs(1),
            max_request_body: 1,
        };
        let mut p = Problems::default();
        assert!(Route::compile(&raw, "routes[3]", &defaults, &mut p).is_none());
        let errs = p.locate(std::path::Path::new("x"), "");
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[3].host",
                "routes[3].path_prefix",
                "routes[3].upstream",
                "routes[3].environment",
                "routes[3].namespaces[0]",
                "routes[3].response_timeout",
                "routes[3].max_request_body"
            ]
        );
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalize_path("/v1/users").unwrap(), "/v1/users");
        assert!(matches!(
            normalize_path("/v1/users").unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(normalize_path("/v1/../admin").unwrap(), "/admin");
        assert_eq!(normalize_path("/v1/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(normalize_path("/v1/./x/.").unwrap(), "/v1/x/");
        assert_eq!(normalize_path("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize_path("/v1/..").unwrap(), "/");
        assert_eq!(normalize_path("/v1/.hidden").unwrap(), "/v1/.hidden");
        for bad in [
            "v1", "*", "/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b", "/a%zz", "/a%2",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad} should be refused");
        }
    }
}
