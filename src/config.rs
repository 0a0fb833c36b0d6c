//! The gateway's YAML config: documented types (the doc comments are the config reference),
//! loading with file:line:column errors, and the collector that lets validation report every
//! problem at once.
//!
//! Semantic checks (addresses, URLs, CIDRs, scopes, durations) run when a snapshot is built
//! from the config and the key store, so `keygate check`, `serve` and a reload share them.

pub mod locate;
pub mod ranges;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the gateway listens. Read at start; a reload does not move listeners.
    #[serde(default)]
    pub listen: Listen,
    /// The key store, relative to this file. Default `keys.yaml`.
    #[serde(default = "default_keys_file")]
    pub keys_file: String,
    /// Where key records live: `{kind: file, path: keys.yaml}` (the default, the same as
    /// `keys_file`) or `{kind: redis, url: "redis://host:6379/0"}` for several nodes.
    #[serde(default)]
    pub store: StoreConfig,
    /// Where rate limits and quotas are counted: on this node (`backend: local`, the
    /// default) or shared by every node through Redis (`backend: redis`).
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Admin API tokens, each `sha256:<hex>` or `{name: NAME, hash: "sha256:<hex>"}`. The
    /// plaintext token in the environment variable `KEYGATE_ADMIN_TOKEN` is accepted too.
    #[serde(default)]
    pub admin_tokens: Vec<AdminTokenConfig>,
    /// Peers (CIDRs or addresses) whose `X-Forwarded-For` is believed. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Also accept the key in `X-API-Key`. Default `false`: only `Authorization: Bearer`.
    #[serde(default)]
    pub x_api_key: bool,
    /// Routes, matched by host and longest path prefix.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Tiers: how many active keys a namespace of each tier may hold.
    #[serde(default)]
    pub tiers: BTreeMap<String, TierConfig>,
    /// Declared namespaces, with their tier and optional key prefix.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// Environments keys may be made for beyond those the routes serve, such as one a route
    /// will serve after the next deploy. Each 1 to 32 of `a-z0-9`. New keys must name an
    /// environment a route serves or one listed here.
    #[serde(default)]
    pub environments: Vec<String>,
    /// When true, keys may only belong to declared namespaces. Default `false`.
    #[serde(default)]
    pub strict: bool,
    /// Request limits and timeouts on the proxy listener.
    #[serde(default)]
    pub limits: Limits,
    /// Connection settings towards upstreams.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Worker threads for the proxy, 0 to 1024. `0` (the default) means one per core.
    #[serde(default)]
    pub workers: usize,
    /// The audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Per-key usage kept across restarts.
    #[serde(default)]
    pub usage: UsageConfig,
    /// Key rotation.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// Brute-force protection: locking out addresses that keep presenting bad keys.
    #[serde(default)]
    pub lockout: LockoutConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Alert rules and their webhook.
    #[serde(default)]
    pub alerts: crate::alerts::AlertsConfig,
    /// TLS on the listeners.
    #[serde(default)]
    pub tls: crate::tls::TlsConfig,
    /// The auth listener's reading of forwarded requests.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Leaked keys reported by secret scanners.
    #[serde(default)]
    pub secret_scanning: crate::scanning::SecretScanningConfig,
    /// One line per request: `{path: FILE | "-", format: json | combined, sample, query}`.
    /// Off by default. Read at start.
    #[serde(default)]
    pub access_log: Option<crate::access_log::AccessLogConfig>,
    /// W3C Trace Context.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Each key's recent requests, for `GET /v1/api-keys/{id}/requests`.
    #[serde(default)]
    pub request_history: crate::state::history::HistoryConfig,
}

/// `tracing:` in the config. A request's `traceparent` is always passed to the upstream
/// untouched, and its trace id is in the access log.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Give a request that comes without a valid `traceparent` one, whose trace id is its
    /// request id. Default `false`.
    #[serde(default)]
    pub generate_traceparent: bool,
}

/// Brute-force protection.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockoutConfig {
    /// Off by default, so that a shared address (an office behind NAT, a test rig) is never
    /// refused for someone else's mistakes until an operator opts in. Default `false`.
    #[serde(default)]
    pub enabled: bool,
    /// Failed guesses (`malformed_key`, `unknown_key`) from one address that lock it out,
    /// 1 to 1,000,000. Default `20`.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// The window the failures are counted in, 1s to 24h. Default `1m`.
    #[serde(default = "default_lockout_window")]
    pub window: String,
    /// How long a locked-out address gets 429 `too_many_failed_attempts`, 1s to 30d.
    /// Default `5m`.
    #[serde(default = "default_cooldown")]
    pub cooldown: String,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            enabled: false,
            max_failures: default_max_failures(),
            window: default_lockout_window(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_max_failures() -> u32 {
    20
}
fn default_lockout_window() -> String {
    "1m".into()
}
fn default_cooldown() -> String {
    "5m".into()
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Also export per-key request counts labelled by key id. Default `false`: labels stay
    /// bounded by routes and codes.
    #[serde(default)]
    pub per_key: bool,
}

/// The audit log: append-only JSON lines.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Path, relative to this file. Default `audit.log`. Read at start.
    #[serde(default = "default_audit_file")]
    pub file: String,
    /// Failed authentications written per client IP and code each minute (0 to 1,000,000);
    /// the rest are counted in one summary line. Default `10`.
    #[serde(default = "default_auth_failures_per_minute")]
    pub auth_failures_per_minute: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: default_audit_file(),
            auth_failures_per_minute: default_auth_failures_per_minute(),
        }
    }
}

fn default_audit_file() -> String {
    "audit.log".into()
}
fn default_auth_failures_per_minute() -> u32 {
    10
}

/// Where key records live.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `file` (default), `sqlite` or `redis`.
    #[serde(default)]
    pub kind: StoreKind,
    /// For `file` and `sqlite`: the store's path, relative to this file (default:
    /// `keys_file` for a file, `keys.db` for a database).
    #[serde(default)]
    pub path: Option<String>,
    /// For `redis`: `redis://[user:password@]host:port[/db]`.
    #[serde(default)]
    pub url: Option<String>,
    /// For `redis`: the prefix of keygate's Redis keys. Default `keygate`.
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    File,
    Sqlite,
    Redis,
}

impl StoreConfig {
    pub fn prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or("keygate")
    }
}

/// Where rate limits and quotas are counted.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `local` (default): each node counts alone. `redis`: every node shares one count, one
    /// Redis round trip per limited request.
    #[serde(default)]
    pub backend: LimitBackend,
    /// For `redis`: the Redis URL. Default: `store.url`.
    #[serde(default)]
    pub url: Option<String>,
    /// For `redis`: what to do while Redis cannot be reached. `open`: allow and count;
    /// `closed`: refuse with 503 `limiter_unavailable`; `local` (default): each node limits
    /// on its own at limit/`nodes`.
    #[serde(default)]
    pub fail_mode: FailMode,
    /// How many nodes share the limits, for `fail_mode: local`, 1 to 1000. Default 1.
    #[serde(default = "default_nodes")]
    pub nodes: u32,
    /// A Redis call that takes longer counts as Redis being unreachable, 1ms to 10s.
    /// Default `50ms`.
    #[serde(default = "default_limit_timeout")]
    pub timeout: String,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            backend: LimitBackend::default(),
            url: None,
            fail_mode: FailMode::default(),
            nodes: default_nodes(),
            timeout: default_limit_timeout(),
        }
    }
}

fn default_nodes() -> u32 {
    1
}
fn default_limit_timeout() -> String {
    "50ms".into()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LimitBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    Open,
    Closed,
    #[default]
    Local,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
            FailMode::Local => "local",
        }
    }
}

/// Per-key usage (last use for now), flushed to a file so it survives restarts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Path, relative to this file. Default `usage.json`. Read at start.
    #[serde(default = "default_usage_file")]
    pub file: String,
    /// How often usage is written out (and at shutdown), 10ms to 1h. Default `5s`.
    #[serde(default = "default_flush_interval")]
    pub flush_interval: String,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            file: default_usage_file(),
            flush_interval: default_flush_interval(),
        }
    }
}

fn default_usage_file() -> String {
    "usage.json".into()
}
fn default_flush_interval() -> String {
    "5s".into()
}

/// Rotation with overlap.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// A key being rotated out counts as `safe_to_revoke` once it has been silent this long,
    /// 1s to 365d. Default `1h`.
    #[serde(default = "default_quiet_period")]
    pub quiet_period: String,
    /// Grace when none is given, 1s to 3650d. Default `24h`.
    #[serde(default = "default_grace")]
    pub default_grace: String,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            quiet_period: default_quiet_period(),
            default_grace: default_grace(),
        }
    }
}

fn default_quiet_period() -> String {
    "1h".into()
}
fn default_grace() -> String {
    "24h".into()
}

impl Config {
    /// The environments new keys may name: those the routes serve and those declared in
    /// `environments`, sorted. Empty only when there are neither.
    pub fn environments(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self
            .routes
            .iter()
            .map(|r| r.environment.as_str())
            .chain(self.environments.iter().map(String::as_str))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Listen::default(),
            keys_file: default_keys_file(),
            store: StoreConfig::default(),
            rate_limit: RateLimitConfig::default(),
            admin_tokens: Vec::new(),
            trusted_proxies: Vec::new(),
            x_api_key: false,
            routes: Vec::new(),
            tiers: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            environments: Vec::new(),
            strict: false,
            limits: Limits::default(),
            upstream: UpstreamConfig::default(),
            workers: 0,
            audit: AuditConfig::default(),
            usage: UsageConfig::default(),
            rotation: RotationConfig::default(),
            lockout: LockoutConfig::default(),
            metrics: MetricsConfig::default(),
            alerts: crate::alerts::AlertsConfig::default(),
            tls: crate::tls::TlsConfig::default(),
            auth: AuthConfig::default(),
            secret_scanning: crate::scanning::SecretScanningConfig::default(),
            access_log: None,
            tracing: TracingConfig::default(),
            request_history: crate::state::history::HistoryConfig::default(),
        }
    }
}

fn default_keys_file() -> String {
    "keys.yaml".into()
}

/// Listener addresses.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// The proxy listener. Default `127.0.0.1:8080`.
    #[serde(default = "default_proxy_addr")]
    pub proxy: String,
    /// The admin API listener. Default `127.0.0.1:9090`.
    #[serde(default = "default_admin_addr")]
    pub admin: String,
    /// The auth listener, where an ingress (nginx `auth_request`, Traefik `ForwardAuth`,
    /// Caddy `forward_auth`, Envoy `ext_authz`) asks about its requests. Off unless set.
    #[serde(default)]
    pub auth: Option<String>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            proxy: default_proxy_addr(),
            admin: default_admin_addr(),
            auth: None,
        }
    }
}

/// How the auth listener reads the request it is asked about.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Envoy's `ext_authz` HTTP service sends the original path under its `path_prefix`:
    /// requests under this prefix (for example `/envoy`) ask about the rest of the path,
    /// with their own method. Default: none.
    #[serde(default)]
    pub envoy_path_prefix: Option<String>,
}

fn default_proxy_addr() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_addr() -> String {
    "127.0.0.1:9090".into()
}

/// One admin token: a bare hash, or a named one (the name is recorded as the actor) with an
/// optional role: `admin` (the default), `read` or `verify`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum AdminTokenConfig {
    Hash(String),
    Named(NamedToken),
}

/// A named admin token.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    pub name: String,
    pub hash: String,
    /// `admin` (the default), `read` or `verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A route: which requests it takes, where they go, and which keys may use it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs. Default: the host and prefix.
    #[serde(default)]
    pub name: Option<String>,
    /// Match this `Host` only (port ignored, case-insensitive); `*.example.com` matches any
    /// subdomain. Default: any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Match paths under this prefix, on segment boundaries (`/v1` takes `/v1` and `/v1/x`,
    /// not `/v10`). Default `/`.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Where matching requests go: `http://host:port[/base/path]`.
    pub upstream: String,
    /// Keys of other environments are refused here with `wrong_environment`.
    pub environment: String,
    /// If set, only keys of these namespaces may use the route (`namespace_denied`).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Remove `path_prefix` from the path before forwarding. Default `false`.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Send the client's `Host` upstream instead of the upstream's own. Default `false`.
    #[serde(default)]
    pub preserve_host: bool,
    /// Forward the client's `Authorization` (and `X-API-Key`) header. Default `false`: they
    /// are removed.
    #[serde(default)]
    pub keep_authorization: bool,
    /// Forward the client-address headers (`Forwarded`, `X-Real-IP`, `X-Forwarded-Host`,
    /// `X-Client-IP` and kin) even from a peer that is not in `trusted_proxies`. Default
    /// `false`: only a trusted proxy's reach the upstream, so it never logs a forged hop.
    #[serde(default)]
    pub keep_forwarding_headers: bool,
    /// Accept path parameters (`/a;jsessionid=x/b`): routes and scopes then see each segment
    /// without its parameters (`/a/b`), as Tomcat, Jetty and Spring read it, and the
    /// upstream gets the path with them. Default `false`: a `;` in the path is refused with
    /// 400 `invalid_path`.
    #[serde(default)]
    pub allow_path_parameters: bool,
    /// Time allowed for the upstream's response headers, 1ms to 1h. Default:
    /// `upstream.response_timeout`.
    #[serde(default)]
    pub response_timeout: Option<String>,
    /// Largest request body, up to 1TiB. Default: `limits.max_request_body`.
    #[serde(default)]
    pub max_request_body: Option<String>,
    /// For an `https://` upstream: trust only the CAs in this PEM file (relative to the
    /// config file) instead of the web PKI.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Speak HTTP/2 to the upstream (ALPN over TLS, prior knowledge over plain TCP).
    /// Default `false`.
    #[serde(default)]
    pub http2: bool,
    /// Members of the key's `meta` to send upstream, each as `X-Keygate-Meta-<Name>` (`_`
    /// written `-`): at most 20 names of 1 to 64 of `A-Za-z0-9_-`. Default: none.
    #[serde(default)]
    pub forward_meta: Vec<String>,
    /// Credits a request here spends from a limited-use key, 0 to 1,000,000. Default `1`.
    #[serde(default = "default_cost")]
    pub cost: u64,
}

fn default_cost() -> u64 {
    1
}

impl RouteConfig {
    /// A route for `path_prefix` to `upstream` in `environment`, every other field defaulted.
    pub fn new(path_prefix: &str, upstream: &str, environment: &str) -> Self {
        RouteConfig {
            name: None,
            host: None,
            path_prefix: path_prefix.into(),
            upstream: upstream.into(),
            environment: environment.into(),
            namespaces: Vec::new(),
            strip_prefix: false,
            preserve_host: false,
            keep_authorization: false,
            keep_forwarding_headers: false,
            allow_path_parameters: false,
            response_timeout: None,
            max_request_body: None,
            ca_file: None,
            http2: false,
            forward_meta: Vec::new(),
            cost: 1,
        }
    }
}

fn default_prefix() -> String {
    "/".into()
}

/// A tier of service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Active keys a namespace of this tier may hold. Absent: unlimited.
    #[serde(default)]
    pub max_keys: Option<u32>,
    /// Requests each key of this tier may make per day or month (`N/day`, `N/month`),
    /// unless the key has a quota of its own. Absent: no quota.
    #[serde(default)]
    pub quota: Option<String>,
}

/// A declared namespace.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// The namespace's tier, one of `tiers`.
    #[serde(default)]
    pub tier: Option<String>,
    /// Key prefix base for this namespace (`acme` gives `acme_live_…`). Default `kg`.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// Limits on the proxy listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body a route accepts unless it says otherwise, up to 1TiB.
    /// Default `10MiB`.
    #[serde(default = "default_max_body")]
    pub max_request_body: String,
    /// Time a client has to send its request headers (slowloris defence), 100ms to 10m:
    /// over HTTP/1 from the first byte of each request; over either protocol, from the
    /// connection's start to its first complete request; and on the admin listener, for the
    /// request body too. Default `10s`.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout: String,
    /// A connection (HTTP/1 keep-alive or HTTP/2) with no request in flight for this long is
    /// closed, 1s to 1h; it is closed at most half a `header_read_timeout` later than that.
    /// Default `60s`.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// Largest total size of request headers, 8KiB to 16MiB. Default `64KiB`.
    #[serde(default = "default_max_headers_size")]
    pub max_header_size: String,
    /// Most request headers (HTTP/1.1), 1 to 10,000. Default `100`.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Open connections per listener, 1 to 1,000,000; past it, new ones wait to be accepted.
    /// Default `10000`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTP/2 streams at once per connection, 1 to 10,000. Default `256`.
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
    /// An upgraded connection (WebSocket) with no traffic for this long is closed, 1s to 7d.
    /// Default `5m`.
    #[serde(default = "default_tunnel_idle")]
    pub tunnel_idle_timeout: String,
    /// On SIGTERM, how long in-flight requests and upgraded connections may finish, 1ms to
    /// 1h. Default `30s`.
    #[serde(default = "default_drain")]
    pub drain_timeout: String,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body: default_max_body(),
            header_read_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            max_header_size: default_max_headers_size(),
            max_headers: default_max_headers(),
            max_connections: default_max_connections(),
            h2_max_concurrent_streams: default_h2_streams(),
            tunnel_idle_timeout: default_tunnel_idle(),
            drain_timeout: default_drain(),
        }
    }
}

fn default_max_body() -> String {
    "10MiB".into()
}
fn default_header_timeout() -> String {
    "10s".into()
}
fn default_idle_timeout() -> String {
    "60s".into()
}
fn default_max_headers() -> usize {
    100
}
fn default_max_connections() -> usize {
    10_000
}
fn default_h2_streams() -> u32 {
    256
}
fn default_tunnel_idle() -> String {
    "5m".into()
}
fn default_drain() -> String {
    "30s".into()
}
fn default_max_headers_size() -> String {
    "64KiB".into()
}

/// Connections to upstreams.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Time to open a TCP connection, 1ms to 5m; past it the answer is 502. Default `2s`.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    /// Time to the upstream's response headers, 1ms to 1h; past it the answer is 504.
    /// Default `30s`.
    #[serde(default = "default_response_timeout")]
    pub response_timeout: String,
    /// How long an idle pooled connection is kept, 1ms to 1h. Default `90s`.
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: String,
    /// Idle connections kept per upstream, 0 to 100,000. Default `256`.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            pool_idle_timeout: default_pool_idle(),
            pool_max_idle_per_host: default_pool_max_idle(),
        }
    }
}

fn default_connect_timeout() -> String {
    "2s".into()
}
fn default_response_timeout() -> String {
    "30s".into()
}
fn default_pool_idle() -> String {
    "90s".into()
}
fn default_pool_max_idle() -> usize {
    256
}

impl Config {
    /// Reads and parses a config file. Structural errors (syntax, unknown fields, wrong
    /// types) stop the parse; semantic ones are found when the snapshot is built.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let src = read_source(path)?;
        parse_yaml(path, &src)
    }

    /// The key store's path: `keys_file`, relative to the config file's folder.
    pub fn keys_path(&self, config_path: &Path) -> PathBuf {
        relative_to(
            config_path,
            match (&self.store.path, self.store.kind) {
                (Some(path), _) => path,
                (None, StoreKind::Sqlite) => "keys.db",
                (None, _) => &self.keys_file,
            },
        )
    }

    /// The Redis URL rate limits are shared through, when they are.
    pub fn limiter_url(&self) -> Option<&str> {
        (self.rate_limit.backend == LimitBackend::Redis)
            .then(|| self.rate_limit.url.as_deref().or(self.store.url.as_deref()))
            .flatten()
    }

    /// Every file a snapshot of this config is read from: the config itself (first), the key
    /// store, the listeners' certificates and keys, and the routes' CA bundles.
    pub fn files(&self, config_path: &Path) -> Vec<PathBuf> {
        let mut files = vec![config_path.to_path_buf()];
        if self.store.kind == StoreKind::File {
            files.push(self.keys_path(config_path));
        }
        for tls in [&self.tls.proxy, &self.tls.admin].into_iter().flatten() {
            files.push(relative_to(config_path, &tls.cert));
            files.push(relative_to(config_path, &tls.key));
            for sni in &tls.sni {
                files.push(relative_to(config_path, &sni.cert));
                files.push(relative_to(config_path, &sni.key));
            }
        }
        files.extend(
            self.routes
                .iter()
                .filter_map(|r| r.ca_file.as_deref())
                .map(|f| relative_to(config_path, f)),
        );
        files
    }

    /// The audit log's path, relative to the config file's folder.
    pub fn audit_path(&self, config_path: &Path) -> PathBuf {
        relative_to(config_path, &self.audit.file)
    }

    /// The usage file's path, relative to the config file's folder.
    pub fn usage_path(&self, config_path: &Path) -> PathBuf {
        relative_to(config_path, &self.usage.file)
    }

    /// The rotation quiet period in seconds (the default if the text is invalid; `check`
    /// reports that).
    pub fn quiet_period_secs(&self) -> i64 {
        units::parse_duration(&self.rotation.quiet_period)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .unwrap_or(3600)
    }
}

pub(crate) fn relative_to(config_path: &Path, file: &str) -> PathBuf {
    config_path.parent().unwrap_or(Path::new(".")).join(file)
}

/// Reads a file as UTF-8, or names why it could not.
pub fn read_source(path: &Path) -> Result<String, Vec<ConfigError>> {
    std::fs::read_to_string(path).map_err(|e| vec![ConfigError::whole_file(path, e.to_string())])
}

/// Deserializes YAML text, turning serde_yaml's error into a located [`ConfigError`].
/// An empty document deserializes as `T::default()`.
pub fn parse_yaml<T: DeserializeOwned + Default>(
    path: &Path,
    src: &str,
) -> Result<T, Vec<ConfigError>> {
    match serde_yaml::from_str::<Option<T>>(src) {
        Ok(value) => Ok(value.unwrap_or_default()),
        Err(e) => {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let mut message = e.to_string();
            if let Some(at) = message.rfind(" at line ") {
                message.truncate(at);
            }
            Err(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                column,
                path: String::new(),
                message,
            }])
        }
    }
}

/// One problem in a config file or key store, located as precisely as it can be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is not tied to a place in the file.
    pub line: usize,
    /// 1-based; 0 when the problem is not tied to a place in the file.
    pub column: usize,
    /// The value's path in the document, such as `routes[0].upstream`.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn whole_file(path: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            path: String::new(),
            message: message.into(),
        }
    }

    /// An error at a config path (`store.url`), located later if the source is at hand.
    pub fn at(file: &Path, path: &str, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            ..ConfigError::whole_file(file, message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Collects problems with their document paths, to be located all at once.
#[derive(Debug, Default)]
pub struct Problems {
    items: Vec<(String, String)>,
}

impl Problems {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.items.push((path.into(), message.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The first problem found, as its path and message: for an API that answers one.
    pub fn located_first(self) -> Option<(String, String)> {
        self.items.into_iter().next()
    }

    /// Turns the collected problems into located errors against `src`, the text of `file`.
    pub fn locate(self, file: &Path, src: &str) -> Vec<ConfigError> {
        let mut wanted: Vec<&str> = self.items.iter().flat_map(|(p, _)| ancestors(p)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let found = locate::locate(src, &wanted);
        self.items
            .iter()
            .map(|(path, message)| {
                // A defaulted field has no place of its own: point at its nearest parent.
                let (line, column) = ancestors(path)
                    .find_map(|p| found.get(p).copied())
                    .unwrap_or((0, 0));
                ConfigError {
                    file: file.to_path_buf(),
                    line,
                    column,
                    path: path.clone(),
                    message: message.clone(),
                }
            })
            .collect()
    }
}

/// `a.b[1].c`, then `a.b[1]`, `a.b`, `a`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let cur = next?;
        next = cur.rfind(['.', '[']).map(|i| &cur[..i]);
        Some(cur)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_located() {
        let src = "listen:\n  proxy: 127.0.0.1:1\nroutes:\n  - upstream: http://x\n    environment: production\n    colour: blue\n";
        let errs = parse_yaml::<Config>(Path::new("gw.yaml"), src).unwrap_err();
        assert_eq!(errs.len(), 1);
        let e = &errs[0];
        assert_eq!((e.line, e.column), (6, 5), "{e}");
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        assert!(e.to_string().starts_with("gw.yaml:6:5: "), "{e}");
    }

    #[test]
    fn empty_file_is_the_default() {
        let c = parse_yaml::<Config>(Path::new("gw.yaml"), "# nothing\n").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.keys_file, "keys.yaml");
    }

    #[test]
    fn problems_fall_back_to_the_nearest_located_parent() {
        let src = "routes:\n  - upstream: http://x\n    environment: production\n";
        let mut p = Problems::default();
        p.push("routes[0].upstream", "bad");
        p.push("routes[0].response_timeout", "missing value");
        let errs = p.locate(Path::new("gw.yaml"), src);
        assert_eq!((errs[0].line, errs[0].column), (2, 15));
        assert_eq!((errs[1].line, errs[1].column), (2, 5));
    }
}
