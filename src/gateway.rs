//! The gateway's shared state: the snapshot in force, the clock, and the state that outlives
//! snapshots (limiters, usage, the audit log, lockouts, metrics). The request stages, the
//! admin routes and the reloads all read it; the listeners in [`crate::server`] serve it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::alerts::{AlertEvent, AlertState};
use crate::audit::{Audit, AuditEvent};
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::metrics::{Gauges, Metrics};
use crate::pipeline::forward::{RequestIds, Tunnels};
use crate::snapshot::{BuildContext, Snapshot};
use crate::state::credits::CreditBook;
use crate::state::limiters::Limiters;
use crate::state::lockouts::Lockouts;
use crate::state::token_use::TokenUse;
use crate::state::usage::UsageBook;
use crate::tls::CertResolver;

/// Everything the listeners share: the snapshot in force, the clock, and the state that
/// outlives snapshots (limiters, usage, the audit log).
#[derive(Debug)]
pub struct Gateway {
    pub snapshot: ArcSwap<Snapshot>,
    pub clock: Clock,
    pub limiters: Limiters,
    pub usage: UsageBook,
    /// Each key's recent requests.
    pub history: crate::state::history::History,
    /// What limited-use keys have spent, with its journal.
    pub credits: CreditBook,
    /// When each admin token was last used, with its file.
    pub token_use: TokenUse,
    pub audit: Audit,
    /// One line per request, when `access_log` is configured.
    pub access_log: Option<crate::access_log::AccessLog>,
    pub lockouts: Lockouts,
    pub metrics: Metrics,
    pub alert_state: AlertState,
    /// GitHub's secret-scanning keys, as last fetched.
    pub github_keys: crate::scanning::GithubKeys,
    /// Upgraded connections (WebSocket) in flight, for the drain.
    pub tunnels: Arc<Tunnels>,
    /// The listeners' certificate resolvers, when they speak TLS; reloads swap their sets.
    pub proxy_certs: Option<Arc<CertResolver>>,
    pub admin_certs: Option<Arc<CertResolver>>,
    pub request_ids: RequestIds,
    pub config_path: PathBuf,
    env_admin_token: Option<[u8; 32]>,
    /// Serialises reloads, so two triggers at once cannot race.
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Key changes applied to the snapshot as deltas, without a reload.
    pub key_changes: AtomicU64,
    /// Set when shutdown begins: `/readyz` turns unready.
    pub draining: AtomicBool,
    /// Snapshots replaced while requests still held them, freed off the request threads
    /// once nothing else does (see [`Gateway::install`]).
    retired: std::sync::Mutex<Vec<Arc<Snapshot>>>,
}

impl Gateway {
    /// Opens the audit log and usage book and builds generation 1 from the config.
    pub fn new(config_path: &Path, clock: Clock) -> Result<Arc<Gateway>, Vec<ConfigError>> {
        let config = Config::load(config_path)?;
        let env_admin_token = std::env::var("KEYGATE_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(|t| crate::keys::format::hash(&t));
        let audit_path = config.audit_path(config_path);
        let audit = Audit::open(audit_path.clone(), config.audit.auth_failures_per_minute)
            .map_err(|e| {
                vec![ConfigError::whole_file(
                    &audit_path,
                    format!("cannot open the audit log: {e}"),
                )]
            })?;
        let access_log = match &config.access_log {
            Some(log) => Some(
                crate::access_log::AccessLog::open(log, config_path).map_err(|e| {
                    let mut p = crate::config::Problems::default();
                    p.push(
                        "access_log.path",
                        format!("cannot open the access log: {e}"),
                    );
                    let src = std::fs::read_to_string(config_path).unwrap_or_default();
                    p.locate(config_path, &src)
                })?,
            ),
            None => None,
        };
        let usage = UsageBook::open(config.usage_path(config_path));
        let history = crate::state::history::History::open(
            &config.request_history,
            Some(&config.usage_path(config_path)),
            &usage,
        );
        let credits = CreditBook::open(crate::state::credits::journal_path(
            &config.usage_path(config_path),
        ));
        let token_use = TokenUse::open(crate::state::token_use::book_path(
            &config.usage_path(config_path),
        ));
        let limiters = Limiters::new();
        let metrics = Metrics::default();
        let snapshot = Snapshot::load(&BuildContext {
            config_path,
            generation: 1,
            limiters: &limiters,
            metrics: &metrics,
            usage: &usage,
            previous: None,
            env_admin_token,
        })?;
        let resolver = |set: &Option<Arc<crate::tls::CertSet>>| {
            set.clone().map(|s| Arc::new(CertResolver::new(s)))
        };
        let (proxy_certs, admin_certs) = (
            resolver(&snapshot.proxy_certs),
            resolver(&snapshot.admin_certs),
        );
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            clock,
            limiters,
            usage,
            history,
            credits,
            token_use,
            audit,
            access_log,
            lockouts: Lockouts::default(),
            metrics,
            alert_state: AlertState::default(),
            github_keys: crate::scanning::GithubKeys::default(),
            tunnels: Arc::default(),
            proxy_certs,
            admin_certs,
            request_ids: RequestIds::new(),
            config_path: config_path.to_path_buf(),
            env_admin_token,
            reload_lock: tokio::sync::Mutex::new(()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            key_changes: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            retired: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Builds the next generation beside the one in force. Blocking: file I/O and parsing.
    pub(crate) fn build_next(&self) -> Result<Snapshot, Vec<ConfigError>> {
        let current = self.snapshot.load_full();
        Snapshot::load(&self.context(&current))
    }

    /// The snapshot in force with `records` changed (see [`Snapshot::with_key_changes`]).
    pub(crate) fn next_with_key_changes(
        &self,
        current: &Snapshot,
        records: &[crate::keys::KeyRecord],
        written: Option<&crate::snapshot::Written>,
    ) -> Result<Snapshot, Vec<ConfigError>> {
        current.with_key_changes(&self.context(current), records, written)
    }

    /// The snapshot in force with a side collection of the store now `stored` (see
    /// [`Snapshot::with_side`]); put in force with [`Gateway::put_side`].
    pub(crate) fn next_with_side(
        &self,
        current: &Snapshot,
        side: crate::keys::Side,
        stored: Vec<serde_json::Value>,
        written: Option<&crate::snapshot::Written>,
    ) -> Result<Snapshot, Vec<ConfigError>> {
        current.with_side(&self.context(current), side, stored, written)
    }

    /// Puts in force a snapshot that differs from the one in force only in a side
    /// collection (alert rules, identities, admin tokens).
    pub(crate) fn put_side(&self, snapshot: Snapshot) {
        // Only identities hold limiters: when they changed, theirs are rechecked, by name,
        // and no key's is visited (a deleted identity's usage cell waits for the next whole
        // build). Alert rules and admin tokens have none.
        let before = self.snapshot.load_full();
        if !Arc::ptr_eq(&before.identities, &snapshot.identities) {
            let counted: std::collections::BTreeSet<String> = before
                .identities
                .counted()
                .chain(snapshot.identities.counted())
                .map(str::to_string)
                .collect();
            self.limiters.recheck(counted.iter(), |id| {
                snapshot
                    .identities
                    .counted_as(id)
                    .and_then(|i| i.rate_limits())
            });
        }
        self.put_in_force(snapshot);
    }

    /// Keeps the limiters and usage cells of the keys and identities (`@<id>`) `snapshot`
    /// still has, brought up to their limits now.
    fn retain_counts(&self, snapshot: &Snapshot) {
        self.limiters.retain(|id| match id.strip_prefix('@') {
            Some(_) => snapshot
                .identities
                .counted_as(id)
                .and_then(|i| i.rate_limits()),
            None => snapshot.key_by_id(id).and_then(|k| k.rate_limits()),
        });
        self.usage
            .retain(|id| snapshot.has_key_id(id) || snapshot.identities.counted_as(id).is_some());
    }

    fn context<'a>(&'a self, current: &'a Snapshot) -> BuildContext<'a> {
        BuildContext {
            config_path: &self.config_path,
            generation: current.generation.saturating_add(1),
            limiters: &self.limiters,
            metrics: &self.metrics,
            usage: &self.usage,
            previous: Some(current),
            env_admin_token: self.env_admin_token,
        }
    }

    /// Puts a built snapshot in force. Blocking: with many keys, the bookkeeping and freeing
    /// the old snapshot take tens of milliseconds, which must not stall a request thread.
    pub(crate) fn install(&self, snapshot: Snapshot) {
        for (resolver, set, what) in [
            (&self.proxy_certs, &snapshot.proxy_certs, "proxy"),
            (&self.admin_certs, &snapshot.admin_certs, "admin"),
        ] {
            match (resolver, set) {
                (Some(r), Some(set)) => r.swap(set.clone()),
                (None, None) => {}
                _ => tracing::warn!(
                    listener = what,
                    "turning TLS on or off takes a restart; the listener keeps its mode"
                ),
            }
        }
        self.retain_counts(&snapshot);
        self.metrics
            .retain_routes(|name| snapshot.routes.has_name(name));
        self.put_in_force(snapshot);
    }

    /// Puts in force a snapshot that differs from the one in force only in the keys `ids`:
    /// only their bookkeeping is touched, so the cost does not grow with the key count.
    pub(crate) fn install_key_changes(&self, snapshot: Snapshot, ids: &[String]) {
        self.limiters.recheck(ids.iter(), |id| {
            snapshot.key_by_id(id).and_then(|k| k.rate_limits())
        });
        self.put_in_force(snapshot);
    }

    fn put_in_force(&self, snapshot: Snapshot) {
        self.token_use
            .retain(|hash| snapshot.admin_tokens.iter().any(|t| &t.hash == hash));
        let old = self.snapshot.swap(Arc::new(snapshot));
        // Requests still running on the old snapshot hold it, and the last of them would free
        // it on a request thread. It is kept here instead, and freed by the next install or
        // housekeeping once nothing else holds it.
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.push(old);
        retired.retain(|s| Arc::strong_count(s) > 1);
    }

    /// Frees the retired snapshots nothing holds any more. Blocking.
    fn free_retired(&self) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|s| Arc::strong_count(s) > 1);
    }

    /// Rolls usage forward, sweeps lockouts, evaluates alerts, flushes usage and closes the
    /// audit log's sampling windows. Blocking. Returns the alerts that changed state, for the
    /// caller to deliver.
    pub fn housekeeping(&self) -> Vec<AlertEvent> {
        let now = self.clock.unix_secs();
        let snapshot = self.snapshot.load_full();
        self.usage.tick(now);
        if let Some(policy) = &snapshot.lockout {
            self.lockouts.sweep(now, policy.window);
        }
        let events = self
            .alert_state
            .evaluate(&snapshot.alerts, snapshot.keys(), now);
        for e in &events {
            if e.event == "alert.fired" {
                self.metrics.alerts_fired.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(event = e.event, rule = %e.rule, key_id = %e.key_id, value = e.value, "alert");
            let event = AuditEvent::new(now, "alerts", e.event)
                .key_id(&e.key_id)
                .reason(format!("{}: {} (value {})", e.rule, e.condition, e.value));
            self.audit.record(&event);
        }
        if let Err(e) = self.credits.compact() {
            tracing::warn!(error = %e, "the credits journal could not be compacted; will retry");
        }
        if let Err(e) = self.usage.flush() {
            tracing::warn!(error = %e, "usage flush failed; will retry");
        }
        if let Err(e) = self.history.flush(&self.usage) {
            tracing::warn!(error = %e, "the request history could not be written; will retry");
        }
        if let Err(e) = self.token_use.flush() {
            tracing::warn!(error = %e, "the admin tokens' last uses could not be written; will retry");
        }
        self.audit.sweep(now);
        self.free_retired();
        for client in &snapshot.clients {
            client.reap();
        }
        events
    }

    /// Writes the access log's last lines and stops its writer. Blocking.
    pub fn close_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.close();
        }
    }

    /// What `GET /metrics` shows.
    pub fn render_metrics(&self) -> String {
        let snapshot = self.snapshot.load_full();
        let now = self.clock.unix_secs();
        let per_key = if snapshot.config.metrics.per_key {
            snapshot
                .keys()
                .map(|k| {
                    let r = k.usage_report(now);
                    (
                        k.id.to_string(),
                        k.namespace.to_string(),
                        r.accepted,
                        r.refused,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        self.metrics.render(&Gauges {
            generation: snapshot.generation,
            keys: snapshot.key_count(),
            routes: snapshot.routes.len(),
            reloads: self.reloads.load(Ordering::Relaxed),
            reload_failures: self.reload_failures.load(Ordering::Relaxed),
            key_changes: self.key_changes.load(Ordering::Relaxed),
            locked_out_ips: self.lockouts.locked_count(now),
            audit_lost: self.audit.lost.load(Ordering::Relaxed),
            access_log_dropped: self.access_log.as_ref().map(|l| l.dropped()),
            per_key,
            shared_limits: snapshot.shared_limits.as_ref().map(|l| {
                (
                    l.is_up(),
                    l.decided.load(Ordering::Relaxed),
                    l.fallbacks.load(Ordering::Relaxed),
                )
            }),
        })
    }
}
