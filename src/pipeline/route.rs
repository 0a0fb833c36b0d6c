//! Stage 2: which route takes the request? Paths are normalised first, so that a scope check
//! and the upstream see the same path (`/v1/../admin` cannot pass as `/v1/**`).

use std::borrow::Cow;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;

use crate::config::ranges;
use crate::config::units::{parse_duration_in, parse_size};
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
    pub keep_forwarding_headers: bool,
    pub allow_path_parameters: bool,
    pub response_timeout: Duration,
    pub max_request_body: u64,
    /// The key's `meta` members this route sends upstream, with their header names.
    pub forward_meta: Vec<(String, http::HeaderName)>,
    /// Credits a request here spends from a limited-use key.
    pub cost: u64,
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
                    && h.as_bytes()
                        .get(h.len().saturating_sub(suffix.len())..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix.as_bytes()))
            }
        }
    }

    /// Whether the path sent upstream differs from the request's.
    pub fn rewrites_path(&self) -> bool {
        !self.upstream.base_path.is_empty() || (self.strip_prefix && self.prefix != "/")
    }

    /// The path to send upstream: base path, then the request path (less the prefix's
    /// segments when stripping), then the query. The prefix is stripped by segments, not by
    /// length, because the path with `;parameters` kept has the segments of the path the
    /// route matched, but longer ones (`/v2;v=1/x` under `/v2` sends `/x`).
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> String {
        let rest = if self.strip_prefix && self.prefix != "/" {
            let segments = self.prefix.matches('/').count();
            let cut = path
                .match_indices('/')
                .nth(segments)
                .map_or(path.len(), |(at, _)| at);
            match path.get(cut..).unwrap_or_default() {
                "" => "/",
                rest => rest,
            }
        } else {
            path
        };
        let mut out = String::with_capacity(
            self.upstream
                .base_path
                .len()
                .saturating_add(rest.len())
                .saturating_add(query.map_or(0, |q| q.len().saturating_add(1))),
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
        } else if normalize_path(prefix)
            .map_or(true, |p| p.path != prefix || p.with_params.is_some())
        {
            bad(
                "path_prefix",
                format!(
                    "`{prefix}` must be a plain path (no `.`, `..`, `//`, `;` or encoded slashes)"
                ),
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
        let (min, max) = ranges::RESPONSE_TIMEOUT;
        let response_timeout = match raw
            .response_timeout
            .as_deref()
            .map(|t| parse_duration_in(t, min, max))
        {
            None => defaults.response_timeout,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                bad("response_timeout", e);
                defaults.response_timeout
            }
        };
        let max_request_body = match raw.max_request_body.as_deref().map(parse_size) {
            None => defaults.max_request_body,
            Some(Ok(n)) if ranges::MAX_REQUEST_BODY.contains(&n) => n,
            Some(Ok(_)) => {
                bad("max_request_body", "must be at most 1TiB".into());
                defaults.max_request_body
            }
            Some(Err(e)) => {
                bad("max_request_body", e);
                defaults.max_request_body
            }
        };
        if raw.forward_meta.len() > MAX_FORWARD_META {
            bad(
                "forward_meta",
                format!("at most {MAX_FORWARD_META} members"),
            );
        }
        let forward_meta = raw
            .forward_meta
            .iter()
            .enumerate()
            .filter_map(|(i, field)| match meta_header(field) {
                Some(header) => Some((field.clone(), header)),
                None => {
                    bad(
                        &format!("forward_meta[{i}]"),
                        format!("`{field}` must be 1 to 64 of A-Za-z0-9_-"),
                    );
                    None
                }
            })
            .collect();
        if raw.cost > MAX_COST {
            bad("cost", format!("must be from 0 to {MAX_COST}"));
        }
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
            keep_forwarding_headers: raw.keep_forwarding_headers,
            allow_path_parameters: raw.allow_path_parameters,
            response_timeout,
            max_request_body,
            forward_meta,
            cost: raw.cost,
            counters: Default::default(),
            client: 0,
        })
    }
}

/// The most credits one request can cost.
const MAX_COST: u64 = 1_000_000;

/// Most `meta` members one route forwards.
const MAX_FORWARD_META: usize = 20;

/// The header a forwarded `meta` member goes in: `X-Keygate-Meta-<field>`, lowercased, with
/// `_` written `-` (nginx drops header names with underscores). `None` for a field name
/// that is not 1 to 64 of `A-Za-z0-9_-`.
pub fn meta_header(field: &str) -> Option<http::HeaderName> {
    let ok = (1..=64).contains(&field.len())
        && field
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return None;
    }
    let name = format!(
        "x-keygate-meta-{}",
        field.to_ascii_lowercase().replace('_', "-")
    );
    http::HeaderName::from_bytes(name.as_bytes()).ok()
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
    if let Some(bracketed) = host.strip_prefix('[') {
        return bracketed.split_once(']').map_or(host, |(h, _)| h);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// A request path as the gateway decides on it.
#[derive(Debug, PartialEq, Eq)]
pub struct NormalPath<'a> {
    /// What routes and scopes see: `%2E` read as `.`, dot segments removed, repeated
    /// slashes merged, and each segment without its `;parameters`. Borrowed when that is the
    /// request's own path.
    pub path: Cow<'a, str>,
    /// Set when the path had `;parameters`: the same path with them kept, which is what goes
    /// upstream on a route that allows them (any other route refuses the request).
    pub with_params: Option<String>,
}

/// Normalises a request path as RFC 3986 §6.2.2 does (`%2E` read as `.`, dot segments
/// removed), merges repeated slashes as nginx's `merge_slashes` and Envoy's do, and reads
/// `;` as the start of a segment's parameters, as Tomcat, Jetty and Spring do: so that the
/// scopes and the upstream cannot read one path two ways (`/v1/public/..;/admin`,
/// `//v1/admin`). Encoded slashes, backslashes, semicolons and NULs are refused, because
/// upstreams disagree on them.
pub fn normalize_path(path: &str) -> Result<NormalPath<'_>, Rejection> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Rejection::InvalidPath);
    }
    let (mut suspicious, mut params) = (false, false);
    let mut previous = 0u8;
    let mut rest = bytes;
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        match b {
            b'\\' => return Err(Rejection::InvalidPath),
            b'%' => {
                let hex = rest.get(..2).ok_or(Rejection::InvalidPath)?;
                match hex {
                    [b'2', b'f' | b'F']
                    | [b'5', b'c' | b'C']
                    | [b'3', b'b' | b'B']
                    | [b'0', b'0'] => return Err(Rejection::InvalidPath),
                    [b'2', b'e' | b'E'] => suspicious = true,
                    [a, b] if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => {}
                    _ => return Err(Rejection::InvalidPath),
                }
                rest = rest.get(2..).unwrap_or_default();
            }
            b'.' | b'/' if previous == b'/' => suspicious = true,
            b';' => params = true,
            _ => {}
        }
        previous = b;
    }
    if !suspicious && !params {
        return Ok(NormalPath {
            path: Cow::Borrowed(path),
            with_params: None,
        });
    }
    let decoded = path.replace("%2e", ".").replace("%2E", ".");
    // Each kept segment: its name (before any `;`) and the whole segment.
    let mut kept: Vec<(&str, &str)> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, &segment) in segments.iter().enumerate() {
        let name = segment.split(';').next().unwrap_or_default();
        match name {
            "." => {}
            ".." => {
                kept.pop();
            }
            // A repeated slash is merged; so is a segment of parameters alone (`/a/;x/b`).
            "" if i != last => {}
            _ => {
                kept.push((name, segment));
                continue;
            }
        }
        if i == last {
            kept.push(("", ""));
        }
    }
    let join = |whole: bool| {
        let mut out = String::with_capacity(decoded.len());
        for (name, segment) in &kept {
            out.push('/');
            out.push_str(if whole { segment } else { name });
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    };
    Ok(NormalPath {
        path: Cow::Owned(join(false)),
        with_params: params.then(|| join(true)),
    })
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
        assert_eq!(r.upstream_path("/v1;v=2/users;x", None), "/base/users;x");
        // The path with `;parameters` kept is longer than the one the route matched: cut at
        // the prefix's length it would split the `é`, which used to panic.
        let mut r = route(None, "/a/bé", "http://up:9/");
        r.strip_prefix = true;
        assert_eq!(r.upstream_path("/a;x/bé/c", None), "/c");
        assert_eq!(r.upstream_path("/a;/bé", None), "/");
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

    fn normal(path: &str) -> String {
        normalize_path(path).unwrap().path.into_owned()
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normal("/v1/users"), "/v1/users");
        assert!(matches!(
            normalize_path("/v1/users").unwrap().path,
            Cow::Borrowed(_)
        ));
        assert_eq!(normal("/v1/../admin"), "/admin");
        assert_eq!(normal("/v1/%2e%2E/admin"), "/admin");
        assert_eq!(normal("/v1/./x/."), "/v1/x/");
        assert_eq!(normal("/../../etc"), "/etc");
        assert_eq!(normal("/v1/.."), "/");
        assert_eq!(normal("/v1/.hidden"), "/v1/.hidden");
        assert_eq!(normal("/"), "/");
        for bad in [
            "v1", "*", "/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b", "/a%zz", "/a%2", "/a%3Bb", "/a%00",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn repeated_slashes_merge() {
        assert_eq!(normal("//v1/admin/users"), "/v1/admin/users");
        assert_eq!(normal("/v1//admin/users"), "/v1/admin/users");
        assert_eq!(normal("/v1///admin//"), "/v1/admin/");
        assert_eq!(normal("//"), "/");
        assert_eq!(normal("/v1/.//../admin"), "/admin");
        assert!(normalize_path("/v1//x").unwrap().with_params.is_none());
    }

    #[test]
    fn parameters_are_not_part_of_a_segment() {
        let p = normalize_path("/v1/public/..;/admin").unwrap();
        assert_eq!(
            (p.path.as_ref(), p.with_params.as_deref()),
            ("/v1/admin", Some("/v1/admin"))
        );
        let p = normalize_path("/v1/admin;jsessionid=x/users").unwrap();
        assert_eq!(p.path, "/v1/admin/users");
        assert_eq!(
            p.with_params.as_deref(),
            Some("/v1/admin;jsessionid=x/users")
        );
        let p = normalize_path("/v1/;x/users;v=2").unwrap();
        assert_eq!(p.path, "/v1/users");
        assert_eq!(p.with_params.as_deref(), Some("/v1/users;v=2"));
        assert_eq!(normal("/v1/x;"), "/v1/x");
    }
}
