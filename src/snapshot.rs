//! The immutable view every request is decided against: keys by hash, compiled routes,
//! scopes and CIDRs pre-parsed. A reload builds and validates a whole new snapshot beside
//! the one in force, then swaps it in with arc-swap; a failed build changes nothing.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::alerts::AlertRules;
use crate::config::ranges::{self, size_in, within};
use crate::config::units::parse_duration_in;
use crate::config::{parse_yaml, read_source, Config, ConfigError, LimitBackend, Problems};
use crate::keys::check::{check_record, CheckedRecord};
use crate::keys::{format, validate_namespace, KeyRecord, RecordSink, Side, Store};
use crate::metrics::Metrics;
use crate::pipeline::forward::{PoolSettings, UpstreamClient};
use crate::pipeline::route::{Route, RouteDefaults, RouteTable};
use crate::policy::lockout::LockoutPolicy;
use crate::policy::net::CidrSet;
use crate::policy::quota::Quota;
use crate::policy::rate::{policy_header, Name, RatePolicy, SharedPolicy, SharedRate};
use crate::policy::scope::ScopeSet;
use crate::state::limiters::Limiters;
use crate::state::shared_limits::{SharedLimiter, SharedSettings};
use crate::state::usage::UsageBook;
use crate::tls::CertSet;

pub use crate::keys::store::{FileStamp, Written};

mod hash_shard;
pub mod identities;
mod key_index;
pub use key_index::{Clash, KeyEntry, KeyHash, KeyId, KeyIndex, Limits};

pub use crate::keys::admin_token::{AdminToken, Role};

/// Listener settings, read at start (a reload does not rebind listeners).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSettings {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The auth listener, when `listen.auth` is set.
    pub auth: Option<SocketAddr>,
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1 and HTTP/2).
    pub idle_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    pub tunnel_idle: Duration,
    pub drain: Duration,
    pub proxy_tls: bool,
    pub admin_tls: bool,
}

/// The gateway's whole decided state at one generation. Cloning it is cheap: the keys are
/// shared shard by shard, the routes and pools by reference.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    /// What the config file and key store were when this snapshot was read.
    pub fingerprint: Fingerprint,
    /// Every file the snapshot was read from (watched for changes).
    pub files: Vec<PathBuf>,
    /// The listeners' certificates, if they speak TLS.
    pub proxy_certs: Option<Arc<CertSet>>,
    pub admin_certs: Option<Arc<CertSet>>,
    /// Upstream connection pools; each route names one by index.
    pub clients: Vec<UpstreamClient>,
    keys: KeyIndex,
    pub routes: Arc<RouteTable>,
    pub trusted_proxies: CidrSet,
    pub x_api_key: bool,
    pub lockout: Option<LockoutPolicy>,
    /// The config's alert rules, then those kept in the key store.
    pub alerts: AlertRules,
    /// GitHub's secret-scanning endpoint on the proxy listener, when configured.
    pub github: Option<crate::scanning::Github>,
    /// The alert rules kept in the key store, as stored.
    pub stored_alerts: Vec<serde_json::Value>,
    /// The identities kept in the key store, compiled; and as stored.
    pub identities: Arc<identities::Identities>,
    pub stored_identities: Vec<serde_json::Value>,
    /// Some keys were imported: a token that is not in keygate's format may still be one,
    /// unless it starts like a keygate key (`prefix_bases`).
    pub accepts_unformatted: bool,
    pub prefix_bases: Vec<String>,
    /// Every admin token: the config's, `KEYGATE_ADMIN_TOKEN`'s, then the store's.
    pub admin_tokens: Vec<AdminToken>,
    /// The admin tokens kept in the store, as stored.
    pub stored_admin_tokens: Vec<serde_json::Value>,
    /// `auth.envoy_path_prefix`: under it, the auth listener reads the original path.
    pub envoy_path_prefix: Option<String>,

    pub listeners: ListenerSettings,
    pub config: Config,
    pub config_path: PathBuf,
    /// Where the keys were read from, and where key changes are written.
    pub store: Store,
    /// For a Redis store, the version the keys were read at; for a SQLite store, the change
    /// feed's number.
    pub store_version: Option<u64>,
    /// With `rate_limit.backend: redis`: the shared limiter.
    pub shared_limits: Option<Arc<SharedLimiter>>,
}

/// The stamps of every file a snapshot was read from: the config, the key store,
/// certificates and CA bundles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<FileStamp>);

impl Fingerprint {
    pub fn of(files: &[PathBuf]) -> Fingerprint {
        Fingerprint(files.iter().map(|f| FileStamp::of(f)).collect())
    }

    /// The snapshot's files as they are now.
    pub fn current(snapshot: &Snapshot) -> Fingerprint {
        Fingerprint::of(&snapshot.files)
    }

    /// The file store's stamp (the second file), when the keys are in a file.
    fn store(&self, snapshot: &Snapshot) -> Option<&FileStamp> {
        snapshot.store.is_file().then(|| self.0.get(1)).flatten()
    }
}

/// What a build needs besides the files.
pub struct BuildContext<'a> {
    pub config_path: &'a Path,
    pub generation: u64,
    pub limiters: &'a Limiters,
    pub metrics: &'a Metrics,
    pub usage: &'a UsageBook,
    /// The snapshot in force, whose upstream pool is reused when its settings are unchanged.
    pub previous: Option<&'a Snapshot>,
    /// SHA-256 of the `KEYGATE_ADMIN_TOKEN` environment variable, if set.
    pub env_admin_token: Option<[u8; 32]>,
}

impl Snapshot {
    pub fn key_by_hash(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        self.keys.by_hash(hash)
    }

    pub fn key_by_id(&self, id: &str) -> Option<&KeyEntry> {
        self.keys.by_id(id)
    }

    /// Every key, for housekeeping and reports.
    pub fn keys(&self) -> impl Iterator<Item = &KeyEntry> + Clone {
        self.keys.iter()
    }

    pub fn has_key_id(&self, id: &str) -> bool {
        self.keys.by_id(id).is_some()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The key index, for comparing what a change copied.
    pub fn key_index(&self) -> &KeyIndex {
        &self.keys
    }

    /// Reads, parses and validates the config and its key store, reporting every problem.
    pub fn load(ctx: &BuildContext<'_>) -> Result<Snapshot, Vec<ConfigError>> {
        let config_stamp = FileStamp::of(ctx.config_path);
        let config_src = read_source(ctx.config_path)?;
        let config: Config = parse_yaml(ctx.config_path, &config_src)?;
        let keys_path = config.keys_path(ctx.config_path);
        // Stamped before they are read: a change after this reloads again.
        let files = config.files(ctx.config_path);
        let mut fingerprint = Fingerprint::of(&files);
        if let Some(first) = fingerprint.0.first_mut() {
            *first = config_stamp;
        }
        let store = Store::for_config(&config, ctx.config_path).map_err(|e| {
            let mut p = Problems::default();
            p.push(e.path, e.message);
            p.locate(ctx.config_path, &config_src)
        })?;
        // Each record is compiled as it is read, and dropped: a million keys' records are
        // never all in memory at once.
        let mut build = KeyBuild::new(&config, ctx);
        let (store_src, store_version, mut errors) = match store.load_each(&mut build) {
            Ok((src, version)) => (src, version, Vec::new()),
            Err(e) => (String::new(), None, e),
        };
        let keys = build.finish();
        match Self::assemble(ctx, config, keys) {
            Ok(snapshot) if errors.is_empty() => Ok(Snapshot {
                fingerprint,
                files,
                store_version,
                ..snapshot
            }),
            Ok(_) => Err(errors),
            Err((config_problems, key_problems)) => {
                let mut all = config_problems.locate(ctx.config_path, &config_src);
                all.extend(key_problems.locate(&keys_path, &store_src));
                all.append(&mut errors);
                Err(all)
            }
        }
    }

    /// Builds a snapshot from a parsed config and key records, without reading files. Errors
    /// carry paths but no line numbers, as there is no source text to find them in.
    pub fn from_parts(
        ctx: &BuildContext<'_>,
        config: Config,
        records: &[KeyRecord],
    ) -> Result<Snapshot, Vec<ConfigError>> {
        let keys_path = config.keys_path(ctx.config_path);
        let mut build = KeyBuild::new(&config, ctx);
        records.iter().for_each(|r| build.compile(r));
        let keys = build.finish();
        Self::assemble(ctx, config, keys).map_err(|(c, k)| {
            let mut all = c.locate(ctx.config_path, "");
            all.extend(k.locate(&keys_path, ""));
            all
        })
    }

    /// Whether a write to the file store started from the store this snapshot was read from,
    /// so that applying the write's records gives exactly the store after it. Not so when
    /// another process wrote in between: then only a whole build is exact. A Redis store's
    /// writes always follow (other nodes' changes reach this one through its change stream).
    pub fn follows(&self, written: &Written) -> bool {
        match (written, self.fingerprint.store(self)) {
            (Written::File { before, .. }, Some(stamp)) => stamp == before,
            (Written::Feed { before, .. }, None) => self.store_version == Some(*before),
            _ => false,
        }
    }

    /// The next snapshot after a change to `records`, each a new key or the new state of the
    /// key with its id (keys are never deleted, only revoked). Everything else is shared with
    /// `self`: the config, routes and pools, and every key shard the change does not touch.
    /// The record check is the same as a whole build's, so a bad record changes nothing.
    pub fn with_key_changes(
        &self,
        ctx: &BuildContext<'_>,
        records: &[KeyRecord],
        written: Option<&Written>,
    ) -> Result<Snapshot, Vec<ConfigError>> {
        let mut next = self.clone();
        next.generation = ctx.generation;
        // The store now holds this write: the file watch need not read the file again, and
        // the change feed's follower skips what the snapshot has.
        match written {
            Some(Written::File { after, .. }) if self.store.is_file() => {
                if let Some(slot) = next.fingerprint.0.get_mut(1) {
                    *slot = *after;
                }
            }
            Some(Written::Feed { after, .. }) => next.store_version = Some(*after),
            _ => {}
        }
        let mut p = Problems::default();
        for r in records {
            match compile_entry(r, &self.config, ctx, &next.keys) {
                Ok(entry) => {
                    if next.keys.upsert(entry).is_err() {
                        p.push(
                            format!("keys.{}.hash", r.id),
                            "another key has the same hash",
                        );
                    }
                }
                Err(problems) => {
                    for (field, message) in problems {
                        p.push(format!("keys.{}.{field}", r.id), message);
                    }
                }
            }
        }
        if !p.is_empty() {
            return Err(p.locate(self.store.path(), ""));
        }
        next.accepts_unformatted = next.keys.any_imported();
        Ok(next)
    }

    /// The next snapshot after a side collection of the store (alert rules, identities,
    /// admin tokens) became `stored` through `written`: everything else is shared with
    /// `self`. A document that does not compile changes nothing.
    pub fn with_side(
        &self,
        ctx: &BuildContext<'_>,
        side: Side,
        stored: Vec<serde_json::Value>,
        written: Option<&Written>,
    ) -> Result<Snapshot, Vec<ConfigError>> {
        let mut next = self.clone();
        next.generation = ctx.generation;
        match written {
            Some(Written::File { after, .. }) if self.store.is_file() => {
                if let Some(slot) = next.fingerprint.0.get_mut(1) {
                    *slot = *after;
                }
            }
            Some(Written::Feed { after, .. }) => next.store_version = Some(*after),
            _ => {}
        }
        let mut p = Problems::default();
        match side {
            Side::Alerts => {
                let base = self.config_path.parent().unwrap_or(Path::new("."));
                let mut alerts = AlertRules::compile(&self.config.alerts, base, &mut p);
                alerts.add_stored(&stored, &mut p);
                next.alerts = alerts;
                next.stored_alerts = stored;
            }
            Side::Identities => {
                next.identities = Arc::new(compile_identities(&stored, &self.config, ctx, &mut p));
                next.stored_identities = stored;
            }
            Side::AdminTokens => {
                next.admin_tokens = self
                    .admin_tokens
                    .iter()
                    .filter(|t| t.source != crate::keys::admin_token::Source::Store)
                    .cloned()
                    .chain(crate::keys::admin_token::compile_stored(&stored, &mut p))
                    .collect();
                next.stored_admin_tokens = stored;
            }
        }
        if !p.is_empty() {
            return Err(p.locate(self.store.path(), ""));
        }
        Ok(next)
    }

    /// The snapshot of a config and its compiled keys, or the problems of each.
    fn assemble(
        ctx: &BuildContext<'_>,
        config: Config,
        built: BuiltKeys,
    ) -> Result<Snapshot, (Problems, Problems)> {
        let BuiltKeys {
            keys,
            problems: mut key_problems,
            alerts: stored_alerts,
            identities: stored_identities,
            admin_tokens: stored_admin_tokens,
        } = built;
        let mut config_problems = Problems::default();
        let mut compiled = compile_config(&config, ctx, &mut config_problems);
        // The store's alert rules join the config's, checked the same way, and located in
        // the store.
        if let Some(c) = &mut compiled {
            c.alerts.add_stored(&stored_alerts, &mut key_problems);
        }
        let identities = compile_identities(&stored_identities, &config, ctx, &mut key_problems);
        // The store's admin tokens join the config's, located in the store.
        let stored_tokens =
            crate::keys::admin_token::compile_stored(&stored_admin_tokens, &mut key_problems);
        if let Some(c) = &mut compiled {
            c.admin_tokens.extend(stored_tokens);
        }
        let compiled = match compiled {
            Some(c) if key_problems.is_empty() => c,
            _ => return Err((config_problems, key_problems)),
        };
        Ok(Snapshot {
            generation: ctx.generation,
            fingerprint: Fingerprint::default(),
            files: config.files(ctx.config_path),
            proxy_certs: compiled.proxy_certs,
            admin_certs: compiled.admin_certs,
            clients: compiled.clients,
            accepts_unformatted: keys.any_imported(),
            keys,
            routes: Arc::new(compiled.routes),
            trusted_proxies: compiled.trusted_proxies,
            x_api_key: config.x_api_key,
            lockout: compiled.lockout,
            alerts: compiled.alerts,
            github: compiled.github,
            stored_alerts,
            identities: Arc::new(identities),
            stored_identities,
            prefix_bases: crate::keys::lifecycle::prefix_bases(&config),
            admin_tokens: compiled.admin_tokens,
            stored_admin_tokens,
            envoy_path_prefix: compiled.envoy_path_prefix,

            listeners: compiled.listeners,
            store: compiled.store,
            store_version: None,
            shared_limits: compiled.shared_limits,
            config,
            config_path: ctx.config_path.to_path_buf(),
        })
    }
}

struct CompiledConfig {
    routes: RouteTable,
    trusted_proxies: CidrSet,
    admin_tokens: Vec<AdminToken>,
    envoy_path_prefix: Option<String>,
    clients: Vec<UpstreamClient>,
    proxy_certs: Option<Arc<CertSet>>,
    admin_certs: Option<Arc<CertSet>>,

    listeners: ListenerSettings,
    lockout: Option<LockoutPolicy>,
    alerts: AlertRules,
    github: Option<crate::scanning::Github>,
    store: Store,
    shared_limits: Option<Arc<SharedLimiter>>,
}

fn compile_config(
    config: &Config,
    ctx: &BuildContext<'_>,
    p: &mut Problems,
) -> Option<CompiledConfig> {
    let addr = |text: &str, path: &str, p: &mut Problems| match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push(
                path,
                format!("`{text}` is not an address such as 127.0.0.1:8080"),
            );
            None
        }
    };
    let proxy = addr(&config.listen.proxy, "listen.proxy", p);
    let admin = addr(&config.listen.admin, "listen.admin", p);
    let auth = match &config.listen.auth {
        Some(text) => addr(text, "listen.auth", p).map(Some),
        None => Some(None),
    };
    let envoy_path_prefix = config.auth.envoy_path_prefix.as_deref().and_then(|prefix| {
        match check_envoy_prefix(prefix) {
            Ok(()) => Some(prefix.to_string()),
            Err(e) => {
                p.push("auth.envoy_path_prefix", e);
                None
            }
        }
    });
    let duration = |text: &str, path: &str, (min, max): (Duration, Duration), p: &mut Problems| {
        parse_duration_in(text, min, max)
            .map_err(|e| p.push(path, e))
            .ok()
    };
    let l = &config.limits;
    let header_read_timeout = duration(
        &l.header_read_timeout,
        "limits.header_read_timeout",
        ranges::HEADER_READ_TIMEOUT,
        p,
    );
    let idle_timeout = duration(
        &l.idle_timeout,
        "limits.idle_timeout",
        ranges::IDLE_TIMEOUT,
        p,
    );
    let max_header_size = size_in(
        &l.max_header_size,
        ranges::MAX_HEADER_SIZE,
        "limits.max_header_size",
        p,
    );
    let max_request_body = size_in(
        &l.max_request_body,
        ranges::MAX_REQUEST_BODY,
        "limits.max_request_body",
        p,
    );
    let connect_timeout = duration(
        &config.upstream.connect_timeout,
        "upstream.connect_timeout",
        ranges::CONNECT_TIMEOUT,
        p,
    );
    let response_timeout = duration(
        &config.upstream.response_timeout,
        "upstream.response_timeout",
        ranges::RESPONSE_TIMEOUT,
        p,
    );
    let pool_idle_timeout = duration(
        &config.upstream.pool_idle_timeout,
        "upstream.pool_idle_timeout",
        ranges::POOL_IDLE_TIMEOUT,
        p,
    );
    within(
        config.upstream.pool_max_idle_per_host,
        ranges::POOL_MAX_IDLE,
        "upstream.pool_max_idle_per_host",
        p,
    );
    within(config.workers, ranges::WORKERS, "workers", p);
    within(
        config.audit.auth_failures_per_minute,
        ranges::AUTH_FAILURES_PER_MINUTE,
        "audit.auth_failures_per_minute",
        p,
    );
    duration(
        &config.usage.flush_interval,
        "usage.flush_interval",
        ranges::FLUSH_INTERVAL,
        p,
    );
    duration(
        &config.rotation.quiet_period,
        "rotation.quiet_period",
        ranges::QUIET_PERIOD,
        p,
    );
    duration(
        &config.rotation.default_grace,
        "rotation.default_grace",
        ranges::GRACE,
        p,
    );
    within(
        config.request_history.per_key,
        ranges::HISTORY_PER_KEY,
        "request_history.per_key",
        p,
    );
    within(
        config.request_history.max_total,
        ranges::HISTORY_MAX_TOTAL,
        "request_history.max_total",
        p,
    );
    if let Some(log) = &config.access_log {
        if log.path.trim().is_empty() {
            p.push("access_log.path", "give a file, or `-` for standard output");
        }
        if !(log.sample > 0.0 && log.sample <= 1.0) {
            p.push(
                "access_log.sample",
                format!(
                    "{} is not a share of requests: give more than 0 and at most 1",
                    log.sample
                ),
            );
        }
    }

    let trusted_proxies = CidrSet::parse(&config.trusted_proxies).unwrap_or_else(|errs| {
        for (i, e) in errs {
            p.push(format!("trusted_proxies[{i}]"), e);
        }
        CidrSet::default()
    });

    let admin_tokens = crate::keys::admin_token::compile_config(config, ctx.env_admin_token, p);

    for (name, ns) in &config.namespaces {
        let path = format!("namespaces.{name}");
        if let Err(e) = validate_namespace(name) {
            p.push(&path, e);
        }
        if let Some(tier) = &ns.tier {
            if !config.tiers.contains_key(tier) {
                p.push(
                    format!("{path}.tier"),
                    format!("`{tier}` is not one of the declared tiers"),
                );
            }
        }
        if let Some(prefix) = &ns.prefix {
            if !format::valid_prefix(&format!("{prefix}_live")) || prefix.contains('_') {
                p.push(
                    format!("{path}.prefix"),
                    format!("`{prefix}` must be 1 to 27 of a-z and 0-9"),
                );
            }
        }
    }

    for (i, name) in config.environments.iter().enumerate() {
        if let Err(e) = crate::keys::validate_environment(name) {
            p.push(format!("environments[{i}]"), e);
        }
    }

    for (name, tier) in &config.tiers {
        if let Some(q) = &tier.quota {
            if let Err(e) = Quota::parse(q) {
                p.push(format!("tiers.{name}.quota"), e);
            }
        }
    }
    let lockout_window = duration(
        &config.lockout.window,
        "lockout.window",
        ranges::LOCKOUT_WINDOW,
        p,
    );
    let lockout_cooldown = duration(
        &config.lockout.cooldown,
        "lockout.cooldown",
        ranges::LOCKOUT_COOLDOWN,
        p,
    );
    let max_failures = within(
        config.lockout.max_failures,
        ranges::MAX_FAILURES,
        "lockout.max_failures",
        p,
    );
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX).max(1);
    let lockout = match (
        config.lockout.enabled,
        lockout_window,
        lockout_cooldown,
        max_failures,
    ) {
        (true, Some(window), Some(cooldown), Some(max_failures)) => Some(LockoutPolicy {
            max_failures,
            window: secs(window),
            cooldown: secs(cooldown),
        }),
        _ => None,
    };
    let base = ctx.config_path.parent().unwrap_or(Path::new("."));
    let alerts = AlertRules::compile(&config.alerts, base, p);
    let github = crate::scanning::Github::compile(&config.secret_scanning, p);
    let proxy_certs = config
        .tls
        .proxy
        .as_ref()
        .and_then(|t| CertSet::load(t, base, "tls.proxy", p))
        .map(Arc::new);
    let admin_certs = config
        .tls
        .admin
        .as_ref()
        .and_then(|t| CertSet::load(t, base, "tls.admin", p))
        .map(Arc::new);
    let tunnel_idle = duration(
        &l.tunnel_idle_timeout,
        "limits.tunnel_idle_timeout",
        ranges::TUNNEL_IDLE_TIMEOUT,
        p,
    );
    let drain = duration(
        &l.drain_timeout,
        "limits.drain_timeout",
        ranges::DRAIN_TIMEOUT,
        p,
    );
    let max_connections = within(
        l.max_connections,
        ranges::MAX_CONNECTIONS,
        "limits.max_connections",
        p,
    );
    let max_headers = within(l.max_headers, ranges::MAX_HEADERS, "limits.max_headers", p);
    let h2_streams = within(
        l.h2_max_concurrent_streams,
        ranges::H2_STREAMS,
        "limits.h2_max_concurrent_streams",
        p,
    );
    let mut pool_wants = Vec::new();

    let defaults = RouteDefaults {
        response_timeout: response_timeout.unwrap_or(Duration::from_secs(30)),
        max_request_body: max_request_body.unwrap_or(10 << 20),
    };
    let mut routes = Vec::with_capacity(config.routes.len());
    for (i, raw) in config.routes.iter().enumerate() {
        if let Some(mut route) = Route::compile(raw, &format!("routes[{i}]"), &defaults, p) {
            route.counters = ctx.metrics.route(&route.name);
            let ca_file = raw.ca_file.as_ref().map(|f| base.join(f));
            if ca_file.is_some() && route.upstream.scheme != http::uri::Scheme::HTTPS {
                p.push(
                    format!("routes[{i}].ca_file"),
                    "a CA bundle only applies to https:// upstreams",
                );
            }
            let ca = ca_file
                .as_deref()
                .map(crate::tls::read_ca_file)
                .transpose()
                .unwrap_or_else(|e| {
                    p.push(format!("routes[{i}].ca_file"), e);
                    None
                });
            pool_wants.push((routes.len(), ca_file, ca, raw.http2));
            routes.push(route);
        }
        for ns in &raw.namespaces {
            if config.strict && !config.namespaces.contains_key(ns) {
                p.push(
                    format!("routes[{i}].namespaces"),
                    format!("`{ns}` is not a declared namespace"),
                );
            }
        }
    }

    let store = Store::for_config(config, ctx.config_path)
        .map_err(|e| p.push(e.path, e.message))
        .ok();
    let shared_limits = compile_shared_limits(config, ctx, p);
    if !p.is_empty() {
        return None;
    }
    // One pool per distinct settings, reused from the snapshot in force when unchanged (a
    // CA bundle's file stamp is part of its settings, so an edited bundle gets a new pool).
    let mut clients: Vec<UpstreamClient> = Vec::new();
    for (at, ca_file, ca, http2) in pool_wants {
        let settings = PoolSettings {
            connect_timeout: connect_timeout?,
            idle_timeout: pool_idle_timeout?,
            max_idle_per_host: config.upstream.pool_max_idle_per_host,
            ca_stamp: ca_file.as_deref().map(FileStamp::of),
            ca_file,
            http2,
        };
        let index = match clients.iter().position(|c| c.settings() == &settings) {
            Some(i) => i,
            None => {
                let reused = ctx
                    .previous
                    .and_then(|prev| prev.clients.iter().find(|c| c.settings() == &settings));
                let index = clients.len();
                clients.push(match reused {
                    Some(c) => c.clone(),
                    None => UpstreamClient::new(
                        settings,
                        ca.as_deref(),
                        ctx.metrics.upstream_connections.clone(),
                    )
                    .map_err(|e| {
                        p.push(
                            format!("routes[{at}].upstream"),
                            format!("cannot set up TLS towards the upstream: {e}"),
                        )
                    })
                    .ok()?,
                });
                index
            }
        };
        if let Some(route) = routes.get_mut(at) {
            route.client = index;
        }
    }
    Some(CompiledConfig {
        routes: RouteTable::new(routes),
        trusted_proxies,
        admin_tokens,
        envoy_path_prefix,
        clients,
        proxy_certs,
        admin_certs,
        lockout,
        alerts,
        github,
        store: store?.remembering(),
        shared_limits: shared_limits?,
        listeners: ListenerSettings {
            proxy: proxy?,
            admin: admin?,
            auth: auth?,
            header_read_timeout: header_read_timeout?,
            idle_timeout: idle_timeout?,
            max_header_size: usize::try_from(max_header_size?).ok()?,
            max_headers: max_headers?,
            max_connections: max_connections?,
            h2_max_concurrent_streams: h2_streams?,
            tunnel_idle: tunnel_idle?,
            drain: drain?,
            proxy_tls: config.tls.proxy.is_some(),
            admin_tls: config.tls.admin.is_some(),
        },
    })
}

/// `auth.envoy_path_prefix`: one or more path segments, `/envoy` or `/authz/check`, of at
/// most 256 bytes, without a trailing slash, dot segments or percent-encoding.
fn check_envoy_prefix(prefix: &str) -> Result<(), String> {
    let segments_ok = prefix.strip_prefix('/').is_some_and(|rest| {
        rest.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        })
    });
    if prefix.len() > 256 || !segments_ok {
        return Err(format!(
            "`{prefix}` is not a path prefix such as /envoy: segments of letters, digits and -._~, at most 256 bytes, no trailing slash"
        ));
    }
    Ok(())
}

/// A whole build's key index, made a record at a time.
struct KeyBuild<'a> {
    config: &'a Config,
    ctx: &'a BuildContext<'a>,
    keys: KeyIndex,
    problems: Problems,
    /// The next record's place in the store.
    at: usize,
    /// The alert rules kept in the store.
    alerts: Vec<serde_json::Value>,
    /// The identities kept in the store.
    identities: Vec<serde_json::Value>,
    /// The admin tokens kept in the store.
    admin_tokens: Vec<serde_json::Value>,
}

impl<'a> KeyBuild<'a> {
    fn new(config: &'a Config, ctx: &'a BuildContext<'a>) -> Self {
        KeyBuild {
            config,
            ctx,
            keys: KeyIndex::default(),
            problems: Problems::default(),
            at: 0,
            alerts: Vec::new(),
            identities: Vec::new(),
            admin_tokens: Vec::new(),
        }
    }

    fn compile(&mut self, r: &KeyRecord) {
        let i = self.at;
        self.at = self.at.saturating_add(1);
        let problems = &mut self.problems;
        let mut problem = |field: &str, message: &str| {
            problems.push(
                format!("keys[{i}].{field}"),
                format!("key `{}`: {message}", r.id),
            )
        };
        match compile_entry(r, self.config, self.ctx, &self.keys) {
            Ok(entry) => match self.keys.insert(entry) {
                Ok(()) => {}
                Err(Clash::Id) => problem("id", "another key has the same id"),
                Err(Clash::Hash) => problem("hash", "another key has the same hash"),
            },
            Err(found) => {
                for (field, message) in found {
                    problem(&field, &message);
                }
            }
        }
    }

    fn finish(self) -> BuiltKeys {
        BuiltKeys {
            keys: self.keys,
            problems: self.problems,
            alerts: self.alerts,
            identities: self.identities,
            admin_tokens: self.admin_tokens,
        }
    }
}

impl RecordSink for KeyBuild<'_> {
    fn expect(&mut self, count: usize) {
        self.keys.reserve(count);
    }

    fn add(&mut self, record: KeyRecord) {
        self.compile(&record);
    }

    fn side(&mut self, side: Side, docs: Vec<serde_json::Value>) {
        match side {
            Side::Alerts => self.alerts = docs,
            Side::Identities => self.identities = docs,
            Side::AdminTokens => self.admin_tokens = docs,
        }
    }
}

/// What a read of the store built: the keys, their problems, and the side collections as
/// stored.
struct BuiltKeys {
    keys: KeyIndex,
    problems: Problems,
    alerts: Vec<serde_json::Value>,
    identities: Vec<serde_json::Value>,
    admin_tokens: Vec<serde_json::Value>,
}

/// How many nodes share the limits: 1 when limits are local.
fn limit_nodes(config: &Config) -> NonZeroU32 {
    match config.rate_limit.backend {
        LimitBackend::Redis => NonZeroU32::new(config.rate_limit.nodes.min(*ranges::NODES.end()))
            .unwrap_or(NonZeroU32::MIN),
        LimitBackend::Local => NonZeroU32::MIN,
    }
}

/// The store's identities compiled, each problem located in the store.
fn compile_identities(
    stored: &[serde_json::Value],
    config: &Config,
    ctx: &BuildContext<'_>,
    problems: &mut Problems,
) -> identities::Identities {
    let (compiled, found) = identities::Identities::compile(
        stored,
        ctx.limiters,
        &ctx.usage.cells(),
        limit_nodes(config),
        &|meta| key_meta(meta, config),
    );
    for (path, message) in found {
        problems.push(path, message);
    }
    compiled
}

/// One stored key, checked and compiled for the request path; or each problem with its
/// field.
fn compile_entry(
    r: &KeyRecord,
    config: &Config,
    ctx: &BuildContext<'_>,
    interner: &KeyIndex,
) -> Result<KeyEntry, Vec<(String, String)>> {
    // With shared limits, how many nodes share them (at least 1); 0 when limits are local.
    let shared_nodes = match config.rate_limit.backend {
        LimitBackend::Redis => config.rate_limit.nodes.clamp(1, *ranges::NODES.end()),
        LimitBackend::Local => 0,
    };
    let checked = check_record(r, config).map_err(|problems| {
        problems
            .into_iter()
            .map(|bad| (bad.path(), bad.message))
            .collect::<Vec<_>>()
    })?;
    let (namespace, environment) =
        interner.intern(|i| (i.label(&r.namespace), i.label(&r.environment)));
    let (Some(namespace), Some(environment)) = (namespace, environment) else {
        // The check allows only a-z, 0-9, `_` and `-` in these.
        return Err(vec![(
            "namespace".into(),
            "cannot be sent as a header".into(),
        )]);
    };
    let CheckedRecord {
        hash,
        scopes,
        allowed_cidrs,
        rate: policy,
        named,
        quota,
        expires_at,
        ..
    } = checked;
    let quota = quota.or_else(|| tier_quota(config, &r.namespace));
    let share = NonZeroU32::new(shared_nodes);
    let limits = || {
        let named: Box<[(Arc<str>, RatePolicy)]> = named
            .iter()
            .map(|(n, p)| (Arc::from(n.as_str()), *p))
            .collect();
        let shared = share.map(|_| SharedPolicy {
            rates: policy
                .map(|p| SharedRate::new(Name::Key, p))
                .into_iter()
                .chain(
                    named
                        .iter()
                        .map(|(n, p)| SharedRate::new(Name::named(n), *p)),
                )
                .collect(),
            quota,
        });
        Limits {
            rate: match share {
                Some(n) if n.get() > 1 => policy.map(|p| node_share(p, n)),
                _ => policy,
            },
            header: policy_header(policy, &named, quota.as_ref()),
            named: match share {
                Some(n) if n.get() > 1 => named
                    .iter()
                    .map(|(name, p)| (Arc::clone(name), node_share(*p, n)))
                    .collect(),
                _ => named,
            },
            limiters: ctx.limiters.clone(),
            quota: match share {
                Some(n) if n.get() > 1 => quota.map(|q| Quota {
                    limit: (q.limit / NonZeroU64::from(n)).max(1),
                    ..q
                }),
                _ => quota,
            },
            shared,
        }
    };
    let written = policy;
    let (scopes, allowed_cidrs, limits, identity) = interner.intern(|i| {
        (
            i.scopes(&r.scopes, || ScopeSet::new(scopes)),
            i.cidrs(&r.allowed_cidrs, || allowed_cidrs),
            i.limits((written, named.clone(), quota), limits),
            r.identity.as_deref().map(|id| i.identity(id)),
        )
    });
    Ok(KeyEntry {
        hash: KeyHash(hash),
        id: KeyId::new(&r.id),
        namespace,
        environment,
        status: r.status,
        imported: r.imported,
        expires: expires_at.unwrap_or(key_index::NEVER),
        scopes,
        allowed_cidrs,
        limits,
        cells: ctx.usage.cells(),
        usage: OnceLock::new(),
        limiter: OnceLock::new(),
        extra: match (&r.meta, checked.credits, identity) {
            (None, None, None) => None,
            (meta, credits, identity) => Some(Box::new(key_index::Extra {
                meta: meta.as_ref().map(|m| key_meta(m, config)),
                credits,
                identity,
                credit_cell: Default::default(),
            })),
        },
    })
}

/// A key's metadata, with the members any route forwards made into header values.
fn key_meta(
    meta: &serde_json::Map<String, serde_json::Value>,
    config: &Config,
) -> key_index::KeyMeta {
    let mut forwarded: Vec<(Box<str>, http::HeaderValue)> = Vec::new();
    for field in config.routes.iter().flat_map(|r| &r.forward_meta) {
        if let (Some(value), false) = (
            meta.get(field),
            forwarded.iter().any(|(f, _)| &**f == field.as_str()),
        ) {
            forwarded.push((field.as_str().into(), crate::headers::meta_value(value)));
        }
    }
    key_index::KeyMeta {
        json: serde_json::Value::Object(meta.clone()).to_string().into(),
        forwarded: forwarded.into(),
    }
}

/// The shared limiter `rate_limit` asks for, reused from the snapshot in force when its
/// settings are unchanged (so its connection survives reloads). `Some(None)`: limits are
/// local.
fn compile_shared_limits(
    config: &Config,
    ctx: &BuildContext<'_>,
    p: &mut Problems,
) -> Option<Option<Arc<SharedLimiter>>> {
    let rl = &config.rate_limit;
    let nodes = within(rl.nodes, ranges::NODES, "rate_limit.nodes", p);
    if rl.backend == LimitBackend::Local {
        return Some(None);
    }
    let (min, max) = ranges::LIMITER_TIMEOUT;
    let timeout = parse_duration_in(&rl.timeout, min, max)
        .map_err(|e| p.push("rate_limit.timeout", e))
        .ok();
    let Some(url) = config.limiter_url() else {
        p.push(
            "rate_limit.url",
            "a redis backend needs `url: redis://host:port` here or under `store`",
        );
        return None;
    };
    let settings = SharedSettings {
        url: url.to_string(),
        shown: crate::keys::redis_store::redact(url),
        prefix: config.store.prefix().to_string(),
        fail_mode: rl.fail_mode,
        nodes: nodes?,
        timeout: timeout?,
    };
    if let Some(same) = ctx
        .previous
        .and_then(|prev| prev.shared_limits.as_ref())
        .filter(|l| l.settings() == &settings)
    {
        return Some(Some(same.clone()));
    }
    match SharedLimiter::new(settings) {
        Ok(l) => Some(Some(l)),
        Err(e) => {
            p.push("rate_limit.url", e);
            None
        }
    }
}

/// This node's share of a limit shared by `nodes`: the same burst split, at 1/`nodes` of
/// the rate.
fn node_share(policy: RatePolicy, nodes: NonZeroU32) -> RatePolicy {
    RatePolicy {
        rate: crate::config::units::Rate {
            count: policy.rate.count,
            // At most an hour times ranges::NODES, far from overflowing.
            per: policy.rate.per.saturating_mul(nodes.get()),
        },
        burst: (policy.burst / nodes).max(1),
    }
}

/// The quota of a namespace's tier, if it has one.
fn tier_quota(config: &Config, namespace: &str) -> Option<Quota> {
    let tier = config.namespaces.get(namespace)?.tier.as_ref()?;
    Quota::parse(config.tiers.get(tier)?.quota.as_deref()?).ok()
}
